"""A vhost-user front-end (driver side) for tests and benchmarks.

Theory of operation
-------------------
:class:`VhostUserFrontend` plays QEMU's part against a vhost-user back-end:
it connects to the back-end's unix socket, owns the guest RAM
(:class:`~shardswitch.frontend.memory.GuestRam`) and one
:class:`~shardswitch.frontend.vring.DriverRing` per virtqueue (pair ``i`` =
RX vring ``2i`` + TX vring ``2i+1``), and moves Ethernet frames through them.

Control path.  :meth:`VhostUserFrontend.request` sends one message (header,
payload, file descriptors via SCM_RIGHTS in the same ``sendmsg``) and reads
the reply when the request has one (the GET_* family) or when ``need_reply``
asked for a REPLY_ACK status.  Replies are checked: same request code, flags
exactly 0x5, a sane size.  The socket is non-blocking and every wait goes
through ``poll`` with a deadline (``timeout``), so a silent or dead back-end
raises :class:`FrontendError` instead of hanging a test.
:meth:`VhostUserFrontend.send_raw` writes arbitrary bytes for malformed-message
tests, and :meth:`VhostUserFrontend.peer_closed` tells whether the back-end
hung up.

:meth:`VhostUserFrontend.handshake` reproduces QEMU 7.2's order (see
docs/vhost-user.md): per pair GET_FEATURES, GET_PROTOCOL_FEATURES,
SET_PROTOCOL_FEATURES (SET_OWNER and GET_QUEUE_NUM on pair 0 only); then per
pair SET_FEATURES, the memory table (SET_MEM_TABLE once, or ADD_MEM_REG per
region repeated for every pair when CONFIGURE_MEM_SLOTS is used), and per ring
SET_VRING_NUM, SET_VRING_BASE, SET_VRING_ADDR, SET_VRING_KICK, SET_VRING_CALL;
finally SET_VRING_ENABLE 1 for the pair's rings.  With REPLY_ACK negotiated the
memory messages carry need-reply and a non-zero status is an error.

Data path.  TX: a zeroed (or caller-given) virtio_net_hdr followed by the
frame goes into one readable chain; after :meth:`DriverRing.publish` the kick
eventfd is written only if the ring's notification logic (EVENT_IDX or
NO_NOTIFY) asks for it.  RX: :meth:`post_rx` offers writable buffers;
:meth:`recv_frames` consumes used elements, strips the header and, with
MRG_RXBUF, joins the ``num_buffers`` buffers of one packet (a packet may even
be split across calls).  Waiting polls the call eventfd in short slices and
re-checks the used ring, so a back-end that forgets an interrupt still makes
progress; such wake-ups are counted in ``rx_wakeups_without_call``.

Errors of the lower layers (:class:`RingError`, :class:`GuestRamError`)
surface as :class:`FrontendError`.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, TypeVar

from shardswitch.frontend.memory import GuestRam, GuestRamError
from shardswitch.frontend.vring import DEFAULT_BUF_SIZE, BytesLike, DriverRing, RingError, RingFullError
from shardswitch.vhost.wire import (HEADER, LOG, MAX_FDS, MAX_PAYLOAD, REPLY_FLAGS, U64, VRING_ADDR,
                                    VRING_F_LOG,
                                    VRING_STATE, HeaderFlags, ProtocolFeature, Request,
                                    VirtioFeature, encode_mem_table, encode_message,
                                    encode_single_region, request_name)
from shardswitch.virtio.netdev import NUM_BUFFERS_OFFSET, VNET_HDR_LEN, vnet_hdr_len

#: num_buffers inside the virtio-net header.
NUM_BUFFERS = struct.Struct("<H")

#: Requests the back-end always answers, and the ones whose answer is a u64-sized payload.
REPLY_REQUESTS = frozenset({
    Request.GET_FEATURES, Request.GET_PROTOCOL_FEATURES, Request.GET_QUEUE_NUM,
    Request.GET_VRING_BASE, Request.GET_CONFIG, Request.GET_INFLIGHT_FD, Request.GET_MAX_MEM_SLOTS,
    Request.GET_STATUS, Request.GET_SHARED_OBJECT, Request.SET_DEVICE_STATE_FD,
    Request.CHECK_DEVICE_STATE, Request.POSTCOPY_ADVISE,
})
EIGHT_BYTE_REPLIES = frozenset({
    Request.GET_FEATURES, Request.GET_PROTOCOL_FEATURES, Request.GET_QUEUE_NUM,
    Request.GET_VRING_BASE, Request.GET_MAX_MEM_SLOTS, Request.GET_STATUS,
    Request.SET_DEVICE_STATE_FD, Request.CHECK_DEVICE_STATE,
})

#: Default virtio features the front-end asks for (EVENT_IDX / MRG_RXBUF added per keyword).
BASE_FEATURES = (VirtioFeature.VERSION_1 | VirtioFeature.PROTOCOL_FEATURES | VirtioFeature.MQ
                 | VirtioFeature.INDIRECT_DESC)
#: Default protocol features (CONFIGURE_MEM_SLOTS added with mem_slots=True).
BASE_PROTOCOL_FEATURES = ProtocolFeature.MQ | ProtocolFeature.REPLY_ACK
#: Longest single wait on a call eventfd before re-checking the used ring (seconds).
CALL_POLL_SLICE = 0.05
#: Pause between connection attempts in connect() (seconds).
CONNECT_RETRY = 0.02


class FrontendError(Exception):
    """The back-end misbehaved, timed out or hung up, or the front-end was misused."""


_T = TypeVar("_T")

@dataclass(slots=True)
class _Queue:
    """One virtqueue: its driver ring and its kick / call eventfds."""

    index: int
    ring: DriverRing
    kick: int
    call: int


@dataclass(slots=True)
class _RxAssembly:
    """A MRG_RXBUF packet whose buffers have not all arrived yet."""

    header: bytes = b""
    parts: list[bytes] = field(default_factory=list)
    remaining: int = 0


def _deadline(timeout: float) -> float:
    """Monotonic time ``timeout`` seconds from now."""
    return time.monotonic() + timeout


def _drain_eventfd(fd: int) -> int:
    """Read and reset an eventfd counter without blocking; 0 when it was not signalled."""
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


def _close_fds(fds: Sequence[int]) -> None:
    """Close file descriptors, ignoring ones already closed."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class VhostUserFrontend:
    """A vhost-user front-end driving a back-end the way QEMU does."""

    def __init__(self, path: str, *, queue_pairs: int = 1, ring_size: int = 256,
                 features: int | None = None, event_idx: bool = True, mrg_rxbuf: bool = True,
                 ram: GuestRam | None = None, mem_slots: bool = False,
                 protocol_features: int | None = None, timeout: float = 5.0,
                 buf_size: int = DEFAULT_BUF_SIZE, sock: socket.socket | None = None,
                 ignore: Callable[[bytes], bool] | None = None) -> None:
        """Connect to ``path`` (or adopt the connected ``sock``); nothing is sent yet.

        ``ignore``: received frames it returns True for are consumed and counted, never returned.

        ``features`` is the exact virtio feature set wanted (then ``event_idx``
        and ``mrg_rxbuf`` are ignored); the negotiated set is its intersection
        with what the back-end offers.  ``protocol_features`` likewise.
        ``mem_slots`` uses ADD_MEM_REG instead of SET_MEM_TABLE when the
        back-end offers CONFIGURE_MEM_SLOTS.  ``ram`` defaults to a private
        64 MiB :class:`GuestRam`, closed with the front-end.  ``timeout``
        bounds every wait for the back-end.
        """
        if queue_pairs < 1 or 2 * queue_pairs > 256:
            raise FrontendError(f"{queue_pairs} queue pairs: 1..128 allowed")
        self.path = path
        self.queue_pairs = queue_pairs
        self.ring_size = ring_size
        self.timeout = timeout
        self.buf_size = buf_size
        self.mem_slots = mem_slots
        if features is None:
            features = int(BASE_FEATURES)
            if event_idx:
                features |= VirtioFeature.EVENT_IDX
            if mrg_rxbuf:
                features |= VirtioFeature.MRG_RXBUF
        self.wanted_features = features
        if protocol_features is None:
            protocol_features = int(BASE_PROTOCOL_FEATURES)
            if mem_slots:
                protocol_features |= ProtocolFeature.CONFIGURE_MEM_SLOTS
        self.wanted_protocol_features = protocol_features
        #: Results of the handshake.
        self.offered_features = 0
        self.negotiated_features = 0
        self.offered_protocol_features = 0
        self.protocol_features = 0
        self.queue_num: int | None = None
        self.max_mem_slots: int | None = None
        self.hdr_len = VNET_HDR_LEN
        #: RX wake-ups that found used elements although no interrupt came (see module docstring).
        self.rx_wakeups_without_call = 0
        #: Frames for which this returns True are consumed and counted in :attr:`ignored`, never returned
        #: (a test's filter for traffic it does not look at, such as periodic router advertisements).
        self.ignore = ignore
        self.ignored = 0
        self._queues: list[_Queue] = []
        self._rx: list[_RxAssembly] = [_RxAssembly() for _ in range(queue_pairs)]
        self._closed = False
        if sock is None:
            sock = self._open(path, timeout)
        sock.setblocking(False)
        self.sock = sock
        self._own_ram = ram is None
        try:
            self.ram = GuestRam() if ram is None else ram
        except (GuestRamError, OSError) as exc:
            sock.close()
            raise FrontendError(f"cannot create guest RAM: {exc}") from exc

    @staticmethod
    def _open(path: str, timeout: float) -> socket.socket:
        """Connect a unix stream socket to ``path`` once."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(timeout)
            sock.connect(path)
        except OSError as exc:
            sock.close()
            raise FrontendError(f"cannot connect to {path}: {exc}") from exc
        return sock

    @classmethod
    def connect(cls, path: str, timeout: float = 5.0, **kw: Any) -> VhostUserFrontend:
        """Connect to ``path``, retrying until the back-end accepts or ``timeout`` passes."""
        deadline = _deadline(timeout)
        while True:
            remaining = deadline - time.monotonic()
            try:
                sock = cls._open(path, max(remaining, 0.01))
            except FrontendError:
                if remaining <= 0:
                    raise
                time.sleep(min(CONNECT_RETRY, remaining))
                continue
            kw.setdefault("timeout", timeout)
            return cls(path, sock=sock, **kw)

    # -- socket I/O --------------------------------------------------------

    def _wait_socket(self, events: int, deadline: float, what: str) -> None:
        """Poll the socket for ``events`` until ``deadline``; raise on timeout."""
        if self._closed:
            raise FrontendError("front-end is closed")
        remaining = deadline - time.monotonic()
        poller = select.poll()
        poller.register(self.sock.fileno(), events)
        if remaining <= 0 or not poller.poll(remaining * 1000):
            raise FrontendError(f"timed out {what}")

    def send_raw(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Send arbitrary bytes, with ``fds`` attached to the first byte (malformed-message tests)."""
        deadline = _deadline(self.timeout)
        view = memoryview(data)
        pending_fds = list(fds)
        if pending_fds and not view:
            raise FrontendError("file descriptors need at least one byte to travel with")
        while view or pending_fds:
            self._wait_socket(select.POLLOUT, deadline, "sending to the back-end")
            try:
                if pending_fds:
                    sent = socket.send_fds(self.sock, [view], pending_fds, socket.MSG_NOSIGNAL)
                    pending_fds = []
                else:
                    sent = self.sock.send(view, socket.MSG_NOSIGNAL)
            except BlockingIOError:
                continue
            except OSError as exc:
                raise FrontendError(f"sending to the back-end failed: {exc}") from exc
            view = view[sent:]

    def _recv_exact(self, size: int, deadline: float, fds: list[int]) -> bytes:
        """Read exactly ``size`` bytes, appending any received fds to ``fds``."""
        chunks: list[bytes] = []
        got = 0
        while got < size:
            self._wait_socket(select.POLLIN, deadline, "waiting for the back-end's reply")
            try:
                data, new_fds, flags, _addr = socket.recv_fds(self.sock, size - got, MAX_FDS)
            except BlockingIOError:
                continue
            except OSError as exc:
                raise FrontendError(f"receiving from the back-end failed: {exc}") from exc
            fds.extend(new_fds)
            if flags & socket.MSG_CTRUNC:
                raise FrontendError("the back-end sent more file descriptors than fit")
            if not data:
                raise FrontendError("the back-end closed the connection")
            chunks.append(data)
            got += len(data)
        return b"".join(chunks)

    def _read_reply(self, request: int, deadline: float) -> bytes:
        """Read and check the reply to ``request``; received fds are closed."""
        fds: list[int] = []
        try:
            code, flags, size = HEADER.unpack(self._recv_exact(HEADER.size, deadline, fds))
            if flags != REPLY_FLAGS:
                raise FrontendError(f"reply to {request_name(request)} has flags {flags:#x}, "
                                    f"expected {int(REPLY_FLAGS):#x}")
            if code != request:
                raise FrontendError(f"reply to {request_name(request)} carries {request_name(code)}")
            if size > MAX_PAYLOAD:
                raise FrontendError(f"reply to {request_name(request)} announces {size} bytes")
            return self._recv_exact(size, deadline, fds) if size else b""
        finally:
            _close_fds(fds)

    def request(self, req: Request | int, payload: bytes = b"", fds: Sequence[int] = (),
                need_reply: bool = False) -> bytes | None:
        """Send one message; return the reply payload, or None when none is expected.

        A reply is read when ``req`` always has one or when ``need_reply``
        (which sets the NEED_REPLY flag); a REPLY_ACK status is returned as
        its 8 raw bytes, not interpreted (see :meth:`request_status`).
        """
        self.send_request(req, payload, fds, need_reply)
        if req not in REPLY_REQUESTS and not need_reply:
            return None
        return self.read_reply(req)

    def send_request(self, req: Request | int, payload: bytes = b"", fds: Sequence[int] = (),
                     need_reply: bool = False) -> None:
        """Send one message and read no reply (:meth:`read_reply` reads it later: a test of a back-end that
        answers late)."""
        flags = HeaderFlags.VERSION | (HeaderFlags.NEED_REPLY if need_reply else 0)
        self.send_raw(encode_message(int(req), payload, flags), fds)

    def read_reply(self, req: Request | int) -> bytes:
        """Read the reply to ``req``, sent before (within :attr:`timeout`)."""
        reply = self._read_reply(int(req), _deadline(self.timeout))
        if (req in EIGHT_BYTE_REPLIES or req not in REPLY_REQUESTS) and len(reply) != 8:
            raise FrontendError(f"reply to {request_name(req)} is {len(reply)} bytes, expected 8")
        return reply

    def reply_waiting(self) -> bool:
        """Whether the back-end has sent something not read yet (without waiting)."""
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLIN)
        return bool(poller.poll(0))

    def request_status(self, req: Request | int, payload: bytes = b"", fds: Sequence[int] = ()) -> int:
        """Send with NEED_REPLY and return the back-end's u64 status (0 = success)."""
        reply = self.request(req, payload, fds, need_reply=True)
        assert reply is not None
        return int(U64.unpack(reply)[0])

    def _get_u64(self, req: Request, payload: bytes = b"") -> int:
        """Send a GET_* request answered by a u64."""
        reply = self.request(req, payload)
        assert reply is not None
        return int(U64.unpack(reply)[0])

    def _send_acked(self, req: Request, payload: bytes, fds: Sequence[int] = ()) -> None:
        """Send, with need-reply when REPLY_ACK is negotiated; raise on a failure status."""
        if self.protocol_features & ProtocolFeature.REPLY_ACK:
            status = self.request_status(req, payload, fds)
            if status:
                raise FrontendError(f"back-end refused {req.name}: status {status:#x}")
        else:
            self.request(req, payload, fds)

    def peer_closed(self, timeout: float = 1.0) -> bool:
        """Wait up to ``timeout`` for the back-end to hang up; True if it did.

        Pending unread data (e.g. an unexpected reply) means it did not, yet.
        """
        if self._closed:
            raise FrontendError("front-end is closed")
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLIN | select.POLLHUP)
        if not poller.poll(max(timeout, 0) * 1000):
            return False
        try:
            return self.sock.recv(1, socket.MSG_PEEK) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True

    # -- handshake ---------------------------------------------------------

    def handshake(self) -> None:
        """Negotiate and start every ring of every queue pair, like QEMU 7.2."""
        if self._queues:
            raise FrontendError("handshake already done")
        for pair in range(self.queue_pairs):
            self._init_pair(pair)
        if self.queue_pairs > 1 and not (self.negotiated_features & VirtioFeature.MQ
                                         and self.protocol_features & ProtocolFeature.MQ):
            raise FrontendError(f"{self.queue_pairs} queue pairs wanted but the back-end has no multiqueue")
        self._create_queues()
        for pair in range(self.queue_pairs):
            self._start_pair(pair)

    def _init_pair(self, pair: int) -> None:
        """The per-device set-up QEMU's vhost_dev_init sends for one pair."""
        if pair == 0:
            self.request(Request.SET_OWNER)
        offered = self._get_u64(Request.GET_FEATURES)
        if pair == 0:
            self.offered_features = offered
            self.negotiated_features = offered & self.wanted_features
        if not self.negotiated_features & VirtioFeature.PROTOCOL_FEATURES:
            return
        offered_protocol = self._get_u64(Request.GET_PROTOCOL_FEATURES)
        if pair == 0:
            self.offered_protocol_features = offered_protocol
            self.protocol_features = offered_protocol & self.wanted_protocol_features
        self.request(Request.SET_PROTOCOL_FEATURES, U64.pack(self.protocol_features))
        if pair == 0 and self.protocol_features & ProtocolFeature.MQ:
            self.queue_num = self._get_u64(Request.GET_QUEUE_NUM)
            if self.queue_num < self.queue_pairs:
                raise FrontendError(f"back-end supports {self.queue_num} queue pairs, "
                                    f"{self.queue_pairs} wanted")
        if self._use_mem_slots():
            self.max_mem_slots = self._get_u64(Request.GET_MAX_MEM_SLOTS)
            if self.max_mem_slots < len(self.ram.regions):
                raise FrontendError(f"back-end has {self.max_mem_slots} memory slots, "
                                    f"{len(self.ram.regions)} regions needed")

    def _use_mem_slots(self) -> bool:
        """Whether memory goes through ADD_MEM_REG."""
        return self.mem_slots and bool(self.protocol_features & ProtocolFeature.CONFIGURE_MEM_SLOTS)

    def _create_queues(self) -> None:
        """Allocate the rings and eventfds for the negotiated features."""
        negotiated = self.negotiated_features
        self.hdr_len = vnet_hdr_len(negotiated)
        try:
            for index in range(2 * self.queue_pairs):
                ring = DriverRing(self.ram, self.ring_size,
                                  event_idx=bool(negotiated & VirtioFeature.EVENT_IDX),
                                  indirect=bool(negotiated & VirtioFeature.INDIRECT_DESC),
                                  buf_size=self.buf_size)
                kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
                call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
                self._queues.append(_Queue(index, ring, kick, call))
        except (RingError, GuestRamError) as exc:
            raise FrontendError(f"cannot set up the rings: {exc}") from exc

    def _start_pair(self, pair: int) -> None:
        """SET_FEATURES, memory, then configure and enable both rings of ``pair``."""
        self.request(Request.SET_FEATURES, U64.pack(self.negotiated_features))
        regions = self.ram.regions
        if self._use_mem_slots():
            for region in regions:
                self._send_acked(Request.ADD_MEM_REG, encode_single_region(region), [self.ram.fd])
        elif pair == 0:
            self._send_acked(Request.SET_MEM_TABLE, encode_mem_table(regions), [self.ram.fd] * len(regions))
        rings = self._queues[2 * pair:2 * pair + 2]
        for queue in rings:
            self._start_ring(queue, queue.ring.avail_idx)
        if self.negotiated_features & VirtioFeature.PROTOCOL_FEATURES:
            for queue in rings:
                self.request(Request.SET_VRING_ENABLE, VRING_STATE.pack(queue.index, 1))

    def _start_ring(self, queue: _Queue, base: int) -> None:
        """Configure one ring from ``base`` and start it (its kick descriptor starts it)."""
        ring = queue.ring
        self.request(Request.SET_VRING_NUM, VRING_STATE.pack(queue.index, ring.num))
        self.request(Request.SET_VRING_BASE, VRING_STATE.pack(queue.index, base))
        self.request(Request.SET_VRING_ADDR, VRING_ADDR.pack(queue.index, 0, ring.desc_vva,
                                                             ring.used_vva, ring.avail_vva, 0))
        self.request(Request.SET_VRING_KICK, U64.pack(queue.index), [queue.kick])
        self.request(Request.SET_VRING_CALL, U64.pack(queue.index), [queue.call])

    def stop_rings(self) -> list[int]:
        """Stop every ring as QEMU does when the guest stops (before a migration saves the device state):
        GET_VRING_BASE of each; the bases, by ring index."""
        return [self.get_vring_base(queue.index)[1] for queue in self._queues]

    def resume_rings(self, bases: list[int]) -> None:
        """Start every ring again from ``bases`` (what :meth:`stop_rings` returned), as QEMU does when the
        guest runs again: on the same back-end, or on the target of a migration."""
        for queue, base in zip(self._queues, bases, strict=True):
            self._start_ring(queue, base)
        self.request(Request.GET_FEATURES)      # a barrier: the rings are started when this is answered

    def start_dirty_log(self, size: int, fd: int) -> None:
        """Begin logging as QEMU does when a migration starts: SET_LOG_BASE with the ``size``-byte bitmap in
        memfd ``fd`` (waiting for the reply LOG_SHMFD promises), SET_FEATURES with LOG_ALL, then every ring's
        SET_VRING_ADDR again with the log flag and its used ring's guest-physical address."""
        self.send_raw(encode_message(int(Request.SET_LOG_BASE), LOG.pack(size, 0)), [fd])
        self._read_reply(int(Request.SET_LOG_BASE), _deadline(self.timeout))
        self.request(Request.SET_FEATURES, U64.pack(self.negotiated_features | VirtioFeature.LOG_ALL))
        for queue in self._queues:
            ring = queue.ring
            self.request(Request.SET_VRING_ADDR, VRING_ADDR.pack(queue.index, VRING_F_LOG, ring.desc_vva,
                                                                 ring.used_vva, ring.avail_vva,
                                                                 self.ram.gpa_of(ring.used_vva)))
        self.request(Request.GET_FEATURES)      # a barrier, as QEMU uses it: all of the above is done

    def get_vring_base(self, index: int) -> tuple[int, int]:
        """GET_VRING_BASE (stops the ring): return (index, next avail index the back-end would read)."""
        reply = self.request(Request.GET_VRING_BASE, VRING_STATE.pack(index, 0))
        assert reply is not None
        got_index, base = VRING_STATE.unpack(reply)
        if got_index != index:
            raise FrontendError(f"GET_VRING_BASE for ring {index} answered for ring {got_index}")
        return int(got_index), int(base)

    # -- queues ------------------------------------------------------------

    def _queue(self, index: int) -> _Queue:
        """The started queue ``index``, or raise."""
        if not self._queues:
            raise FrontendError("no rings yet: call handshake() first")
        if not 0 <= index < len(self._queues):
            raise FrontendError(f"no vring {index}")
        return self._queues[index]

    def ring(self, index: int) -> DriverRing:
        """The driver ring of vring ``index`` (for tests that work on it directly)."""
        return self._queue(index).ring

    def kick_fd(self, index: int) -> int:
        """The kick eventfd of vring ``index``."""
        return self._queue(index).kick

    def call_fd(self, index: int) -> int:
        """The call eventfd of vring ``index``."""
        return self._queue(index).call

    def kick(self, index: int) -> None:
        """Signal vring ``index``'s kick eventfd unconditionally."""
        os.eventfd_write(self._queue(index).kick, 1)

    def _publish(self, queue: _Queue) -> None:
        """Publish the ring and kick if the device asked to be notified."""
        queue.ring.publish()
        if queue.ring.needs_kick():
            os.eventfd_write(queue.kick, 1)

    # -- TX ----------------------------------------------------------------

    def _tx_buffer(self, frame: bytes, hdr: bytes | None) -> bytes:
        """Header plus frame, checking a caller-given header's size."""
        if hdr is None:
            return bytes(self.hdr_len) + frame
        if len(hdr) != self.hdr_len:
            raise FrontendError(f"virtio-net header must be {self.hdr_len} bytes, got {len(hdr)}")
        return hdr + frame

    def send_frame(self, pair: int, frame: bytes, *, hdr: bytes | None = None) -> None:
        """Queue one frame (behind a zero or given header) on TX ring 2*pair+1 and kick if needed."""
        if self.send_frames(pair, [frame], hdr=hdr) != 1:
            raise FrontendError(f"TX ring {2 * pair + 1} is full")

    def send_frames(self, pair: int, frames: Sequence[bytes], *, hdr: bytes | None = None) -> int:
        """Queue as many frames as fit (after reclaiming used TX chains), one kick; return the count."""
        queue = self._queue(2 * pair + 1)
        self.reclaim_tx(pair)
        return self._add_chains(queue, frames, lambda frame: queue.ring.add_out(self._tx_buffer(frame, hdr)))

    def send_gather(self, pair: int, frames: Sequence[Sequence[BytesLike]], *, indirect: bool = False) -> int:
        """Queue frames given as pieces (the virtio-net header included, first), each piece in
        descriptors of at most ``buf_size`` bytes (one indirect table per frame with ``indirect``), as
        many as fit, one kick; return the count.  A Linux guest sends its TSO frames that way."""
        queue = self._queue(2 * pair + 1)
        self.reclaim_tx(pair)
        return self._add_chains(queue, frames, lambda pieces: queue.ring.add_out(list(pieces), indirect=indirect))

    def _add_chains(self, queue: _Queue, items: Iterable[_T], add: Callable[[_T], object]) -> int:
        """``add`` one chain per item until the ring is full; publish once; return how many went in."""
        added = 0
        try:
            for item in items:
                add(item)
                added += 1
        except RingFullError:
            pass
        except RingError as exc:
            raise FrontendError(f"{'RX' if queue.index % 2 == 0 else 'TX'} ring {queue.index}: {exc}") from exc
        finally:
            if added:
                self._publish(queue)
        return added

    def reclaim_tx(self, pair: int) -> int:
        """Collect TX chains the back-end has used; return how many."""
        queue = self._queue(2 * pair + 1)
        _drain_eventfd(queue.call)
        try:
            return len(queue.ring.get_used())
        except RingError as exc:
            raise FrontendError(f"TX ring {queue.index}: {exc}") from exc

    # -- RX ----------------------------------------------------------------

    def post_rx(self, pair: int, count: int, size: int = 1536) -> int:
        """Offer up to ``count`` writable buffers of ``size`` bytes on RX ring 2*pair; return how many."""
        queue = self._queue(2 * pair)
        return self._add_chains(queue, range(count), lambda _: queue.ring.add_in([size]))

    def recv_frames(self, pair: int, timeout: float = 1.0) -> list[bytes]:
        """Wait up to ``timeout`` for received frames on pair ``pair``; return them without headers."""
        return [frame for _hdr, frame in self.recv_packets(pair, timeout)]

    def recv_packets(self, pair: int, timeout: float = 1.0) -> list[tuple[bytes, bytes]]:
        """Like :meth:`recv_frames` but return (virtio-net header, frame) pairs.

        Returns as soon as at least one complete packet arrived, or an empty
        list when ``timeout`` passed without one.
        """
        queue = self._queue(2 * pair)
        deadline = _deadline(timeout)
        poller = select.poll()
        poller.register(queue.call, select.POLLIN)
        while True:
            packets = self._drain_rx(pair, queue)
            if packets:
                return packets
            queue.ring.suppress_interrupts(False)
            if queue.ring.has_used():
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return packets
            signalled = poller.poll(min(remaining, CALL_POLL_SLICE) * 1000)
            if signalled:
                _drain_eventfd(queue.call)
            elif queue.ring.has_used():
                self.rx_wakeups_without_call += 1

    def _drain_rx(self, pair: int, queue: _Queue) -> list[tuple[bytes, bytes]]:
        """Consume used RX elements and assemble complete packets."""
        try:
            used = queue.ring.get_used()
        except RingError as exc:
            raise FrontendError(f"RX ring {queue.index}: {exc}") from exc
        assembly = self._rx[pair]
        mergeable = bool(self.negotiated_features & VirtioFeature.MRG_RXBUF)
        hdr_len = self.hdr_len
        packets: list[tuple[bytes, bytes]] = []
        for head, length, data in used:
            if assembly.remaining == 0:
                if length < hdr_len:
                    raise FrontendError(f"RX ring {queue.index}: buffer {head} holds {length} bytes, "
                                        f"less than the {hdr_len}-byte header")
                count = NUM_BUFFERS.unpack_from(data, NUM_BUFFERS_OFFSET)[0] if mergeable else 1
                if count == 0:
                    raise FrontendError(f"RX ring {queue.index}: num_buffers is 0")
                assembly.header = data[:hdr_len]
                assembly.parts = [data[hdr_len:]]
                assembly.remaining = count - 1
            else:
                assembly.parts.append(data)
                assembly.remaining -= 1
            if assembly.remaining == 0:
                parts = assembly.parts
                frame = parts[0] if len(parts) == 1 else b"".join(parts)
                assembly.parts = []
                if self.ignore is not None and self.ignore(frame):
                    self.ignored += 1
                    continue
                packets.append((assembly.header, frame))
        return packets

    # -- life cycle --------------------------------------------------------

    def close(self) -> None:
        """Close the socket, the eventfds and (if private) the guest RAM; idempotent."""
        if self._closed:
            return
        self._closed = True
        self.sock.close()
        for queue in self._queues:
            queue.ring.release()
            _close_fds([queue.kick, queue.call])
        self._queues.clear()
        if self._own_ram:
            self.ram.close()

    def __enter__(self) -> VhostUserFrontend:
        """Context manager entry: return self."""
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        """Context manager exit: close()."""
        self.close()
