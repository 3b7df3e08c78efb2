"""vhost-user wire format: constants, message layouts and payload codecs.

This is the lowest of three layers (wire messages here; request handling in
``shardswitch.coordinator.handler``; device logic in
``shardswitch.coordinator.device``).  Nothing here does I/O: functions take
bytes and return typed values, raising :class:`VhostProtocolError` for
anything the peer got wrong.  Both our back-end and the Python test
front-end (``shardswitch.frontend``) use these definitions.

Layouts (native little-endian, as the specification requires on x86-64)::

    header          u32 request, u32 flags, u32 size                 (12 bytes)
    u64             u64 value                                        (8)
    vring state     u32 index, u32 num                               (8)
    vring addr      u32 index, u32 flags, u64 desc, u64 used,
                    u64 avail, u64 log_guest_addr                    (40)
    mem region      u64 guest_phys_addr, u64 memory_size,
                    u64 userspace_addr, u64 mmap_offset              (32)
    mem table       u32 nregions, u32 padding, nregions x mem region (8 + 32n)
    single region   u64 padding, mem region                          (40)
    log             u64 mmap_size, u64 mmap_offset                   (16)
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum, IntFlag


class VhostProtocolError(Exception):
    """The front-end sent something the protocol does not allow.

    Raised by codecs and request handlers; the connection loop turns it into
    a REPLY_ACK failure or, when the stream cannot be trusted any more, a
    logged disconnect of that front-end.
    """

    def __init__(self, message: str, *, fatal: bool = False) -> None:
        super().__init__(message)
        #: True when the byte stream itself is unusable (disconnect).
        self.fatal = fatal


class Request(IntEnum):
    """Front-end to back-end request codes."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43


class HeaderFlags(IntFlag):
    """Bits of the header's flags word."""

    VERSION = 0x1
    REPLY = 0x4
    NEED_REPLY = 0x8


VERSION_MASK = 0x3
#: Flags every reply must carry, exactly (QEMU rejects anything else).
REPLY_FLAGS = HeaderFlags.VERSION | HeaderFlags.REPLY


class VirtioFeature(IntFlag):
    """virtio / vhost feature bits as masks (GET_FEATURES / SET_FEATURES)."""

    CSUM = 1 << 0
    GUEST_CSUM = 1 << 1
    MTU = 1 << 3
    MAC = 1 << 5
    GUEST_TSO4 = 1 << 7
    GUEST_TSO6 = 1 << 8
    GUEST_UFO = 1 << 10
    HOST_TSO4 = 1 << 11
    HOST_TSO6 = 1 << 12
    MRG_RXBUF = 1 << 15
    STATUS = 1 << 16
    GUEST_ANNOUNCE = 1 << 21
    MQ = 1 << 22
    LOG_ALL = 1 << 26
    INDIRECT_DESC = 1 << 28
    EVENT_IDX = 1 << 29
    PROTOCOL_FEATURES = 1 << 30
    VERSION_1 = 1 << 32
    IN_ORDER = 1 << 35


class ProtocolFeature(IntFlag):
    """vhost-user protocol feature bits as masks."""

    MQ = 1 << 0
    LOG_SHMFD = 1 << 1
    RARP = 1 << 2
    REPLY_ACK = 1 << 3
    NET_MTU = 1 << 4
    BACKEND_REQ = 1 << 5
    CROSS_ENDIAN = 1 << 6
    CRYPTO_SESSION = 1 << 7
    PAGEFAULT = 1 << 8
    CONFIG = 1 << 9
    BACKEND_SEND_FD = 1 << 10
    HOST_NOTIFIER = 1 << 11
    INFLIGHT_SHMFD = 1 << 12
    RESET_DEVICE = 1 << 13
    INBAND_NOTIFICATIONS = 1 << 14
    CONFIGURE_MEM_SLOTS = 1 << 15
    STATUS = 1 << 16
    XEN_MMAP = 1 << 17
    SHARED_OBJECT = 1 << 18
    DEVICE_STATE = 1 << 19


#: Bits of the KICK/CALL/ERR u64 payload.
VRING_IDX_MASK = 0xFF
VRING_NOFD_MASK = 0x100
#: Bit 0 of the vring address flags: log used-ring writes.
VRING_F_LOG = 0x1

#: Regions in SET_MEM_TABLE, and slots answered to GET_MAX_MEM_SLOTS.
MAX_MEM_REGIONS = 8
MAX_MEM_SLOTS = 32
#: Largest payload accepted; larger sizes mean the stream cannot be trusted.
MAX_PAYLOAD = 4096
#: Most file descriptors accepted with one message.
MAX_FDS = MAX_MEM_REGIONS

HEADER = struct.Struct("<III")
U64 = struct.Struct("<Q")
VRING_STATE = struct.Struct("<II")
VRING_ADDR = struct.Struct("<IIQQQQ")
MEM_REGION = struct.Struct("<QQQQ")
MEM_TABLE_HEAD = struct.Struct("<II")
SINGLE_REGION = struct.Struct("<Q" + "QQQQ")
LOG = struct.Struct("<QQ")
#: SET_DEVICE_STATE_FD: direction, phase.
TRANSFER_STATE = struct.Struct("<II")

assert HEADER.size == 12
assert U64.size == 8
assert VRING_STATE.size == 8
assert VRING_ADDR.size == 40
assert MEM_REGION.size == 32
assert MEM_TABLE_HEAD.size == 8
assert SINGLE_REGION.size == 40
assert LOG.size == 16


@dataclass(frozen=True, slots=True)
class MemRegion:
    """One guest memory region as the front-end describes it."""

    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int

    def pack(self) -> bytes:
        """Encode as the 32-byte wire region."""
        return MEM_REGION.pack(self.guest_phys_addr, self.memory_size,
                               self.userspace_addr, self.mmap_offset)


@dataclass(frozen=True, slots=True)
class VringAddr:
    """Payload of SET_VRING_ADDR (addresses are front-end virtual addresses)."""

    index: int
    flags: int
    desc: int
    used: int
    avail: int
    log: int


@dataclass(frozen=True, slots=True)
class Header:
    """A decoded message header."""

    request: int
    flags: int
    size: int

    @property
    def need_reply(self) -> bool:
        """True when the front-end asked for a REPLY_ACK answer."""
        return bool(self.flags & HeaderFlags.NEED_REPLY)


def decode_header(data: bytes) -> Header:
    """Decode and check a 12-byte header.

    Raises a fatal :class:`VhostProtocolError` on a bad version or a payload
    size over :data:`MAX_PAYLOAD`: past such a header the stream has no
    trustworthy framing left.
    """
    if len(data) != HEADER.size:
        raise VhostProtocolError(f"short header: {len(data)} bytes", fatal=True)
    request, flags, size = HEADER.unpack(data)
    if flags & VERSION_MASK != HeaderFlags.VERSION:
        raise VhostProtocolError(f"unsupported protocol version in flags {flags:#x}", fatal=True)
    if size > MAX_PAYLOAD:
        raise VhostProtocolError(f"payload of {size} bytes exceeds {MAX_PAYLOAD}", fatal=True)
    return Header(request, flags, size)


def encode_message(request: int, payload: bytes = b"", flags: int = HeaderFlags.VERSION) -> bytes:
    """Build a complete message (header + payload)."""
    return HEADER.pack(request, int(flags), len(payload)) + payload


def encode_reply(request: int, payload: bytes) -> bytes:
    """Build a reply to ``request`` carrying ``payload``."""
    return encode_message(request, payload, REPLY_FLAGS)


def _expect_size(name: str, payload: bytes, size: int) -> None:
    if len(payload) != size:
        raise VhostProtocolError(f"{name}: payload is {len(payload)} bytes, expected {size}")


def decode_u64(name: str, payload: bytes) -> int:
    """Decode a u64 payload."""
    _expect_size(name, payload, U64.size)
    return int(U64.unpack(payload)[0])


def decode_vring_state(name: str, payload: bytes) -> tuple[int, int]:
    """Decode a vring state payload into (index, num)."""
    _expect_size(name, payload, VRING_STATE.size)
    index, num = VRING_STATE.unpack(payload)
    return int(index), int(num)


def decode_vring_addr(payload: bytes) -> VringAddr:
    """Decode SET_VRING_ADDR's payload."""
    _expect_size("SET_VRING_ADDR", payload, VRING_ADDR.size)
    return VringAddr(*VRING_ADDR.unpack(payload))


#: Largest dirty-page log accepted: a bitmap for 64 TiB of guest memory (2 GiB).
MAX_LOG_SIZE = 1 << 31


def decode_log(payload: bytes) -> tuple[int, int]:
    """Decode SET_LOG_BASE's payload into (mmap_size, mmap_offset): whole 64-bit words, bounded."""
    _expect_size("SET_LOG_BASE", payload, LOG.size)
    size, offset = LOG.unpack(payload)
    if not 0 < size <= MAX_LOG_SIZE or size % 8 or offset % 8 or offset > MAX_LOG_SIZE:
        raise VhostProtocolError(f"SET_LOG_BASE: log of {size} bytes at offset {offset} is not whole 64-bit "
                                 f"words within {MAX_LOG_SIZE} bytes")
    return int(size), int(offset)


class TransferDirection(IntEnum):
    """SET_DEVICE_STATE_FD's direction: the back-end writes its state (SAVE) or reads it (LOAD)."""

    SAVE = 0
    LOAD = 1


class TransferPhase(IntEnum):
    """SET_DEVICE_STATE_FD's phase: only STOPPED (the device is stopped) is defined."""

    STOPPED = 0


def decode_transfer_state(payload: bytes) -> tuple[TransferDirection, TransferPhase]:
    """SET_DEVICE_STATE_FD's payload: (direction, phase), both known values."""
    _expect_size("SET_DEVICE_STATE_FD", payload, TRANSFER_STATE.size)
    direction, phase = TRANSFER_STATE.unpack(payload)
    try:
        return TransferDirection(direction), TransferPhase(phase)
    except ValueError:
        raise VhostProtocolError(f"SET_DEVICE_STATE_FD: direction {direction}, phase {phase}: "
                                 "unknown (SAVE 0 / LOAD 1, STOPPED 0)") from None


def _decode_region(name: str, guest_phys_addr: int, memory_size: int, userspace_addr: int,
                   mmap_offset: int) -> MemRegion:
    if memory_size == 0:
        raise VhostProtocolError(f"{name}: region of size 0")
    for label, value in (("guest address", guest_phys_addr), ("user address", userspace_addr),
                         ("mmap offset", mmap_offset)):
        if value + memory_size > 1 << 64:
            raise VhostProtocolError(f"{name}: region {label} {value:#x} + size wraps around")
    return MemRegion(guest_phys_addr, memory_size, userspace_addr, mmap_offset)


def decode_mem_table(payload: bytes) -> list[MemRegion]:
    """Decode SET_MEM_TABLE's payload into its regions."""
    if len(payload) < MEM_TABLE_HEAD.size:
        raise VhostProtocolError("SET_MEM_TABLE: payload shorter than its head")
    nregions, _pad = MEM_TABLE_HEAD.unpack_from(payload)
    if not 1 <= nregions <= MAX_MEM_REGIONS:
        raise VhostProtocolError(f"SET_MEM_TABLE: {nregions} regions (1..{MAX_MEM_REGIONS} allowed)")
    _expect_size("SET_MEM_TABLE", payload, MEM_TABLE_HEAD.size + nregions * MEM_REGION.size)
    return [_decode_region("SET_MEM_TABLE", *MEM_REGION.unpack_from(payload, MEM_TABLE_HEAD.size + i * MEM_REGION.size))
            for i in range(nregions)]


def encode_mem_table(regions: list[MemRegion]) -> bytes:
    """Encode a SET_MEM_TABLE payload (used by the test front-end)."""
    return MEM_TABLE_HEAD.pack(len(regions), 0) + b"".join(r.pack() for r in regions)


def decode_single_region(name: str, payload: bytes) -> MemRegion:
    """Decode ADD_MEM_REG / REM_MEM_REG's payload."""
    _expect_size(name, payload, SINGLE_REGION.size)
    _pad, *fields = SINGLE_REGION.unpack(payload)
    return _decode_region(name, *fields)


def encode_single_region(region: MemRegion) -> bytes:
    """Encode an ADD_MEM_REG / REM_MEM_REG payload."""
    return U64.pack(0) + region.pack()


def request_name(request: int) -> str:
    """A readable name for a request code, known or not."""
    try:
        return Request(request).name
    except ValueError:
        return f"request {request}"
