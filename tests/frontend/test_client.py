"""VhostUserFrontend against a socketpair where the test plays a minimal back-end."""

from __future__ import annotations

import os
import socket
import stat
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from shardswitch.frontend.client import FrontendError, VhostUserFrontend
from shardswitch.frontend.memory import GuestRam
from shardswitch.vhost.wire import (HEADER, U64, VRING_STATE, HeaderFlags, ProtocolFeature, Request,
                                    VirtioFeature, decode_mem_table, decode_single_region,
                                    decode_vring_addr, decode_vring_state, encode_message, encode_reply)

from .ringdev import DeviceMemory, DeviceRing

NET_HDR = struct.Struct("<BBHHHHH")   # virtio_net_hdr_v1, written out independently

F = VirtioFeature
P = ProtocolFeature
ALL_FEATURES = int(F.VERSION_1 | F.PROTOCOL_FEATURES | F.MQ | F.EVENT_IDX | F.MRG_RXBUF
                   | F.INDIRECT_DESC | F.CSUM | F.HOST_TSO4)
ALL_PROTOCOL = int(P.MQ | P.REPLY_ACK | P.CONFIGURE_MEM_SLOTS | P.LOG_SHMFD)
MIB = 1 << 20


@dataclass
class Msg:
    """One message as the fake back-end received it."""

    request: int
    flags: int
    payload: bytes
    fds: list[int]


@dataclass
class FakeBackend:
    """A minimal back-end: records every message, answers GET_* and need-reply."""

    sock: socket.socket
    features: int = ALL_FEATURES
    protocol_features: int = ALL_PROTOCOL
    queue_num: int = 4
    status: int = 0
    messages: list[Msg] = field(default_factory=list)
    error: BaseException | None = None
    thread: threading.Thread | None = None

    def start(self) -> None:
        """Serve in a daemon thread until EOF."""
        self.sock.settimeout(5.0)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _recv(self, size: int, fds: list[int]) -> bytes | None:
        """Exactly ``size`` bytes (None on EOF before the first byte)."""
        data = b""
        while len(data) < size:
            chunk, new_fds, _flags, _addr = socket.recv_fds(self.sock, size - len(data), 16)
            fds.extend(new_fds)
            if not chunk:
                if data:
                    raise EOFError("EOF inside a message")
                return None
            data += chunk
        return data

    def _serve(self) -> None:
        """Receive, record, answer."""
        try:
            while True:
                fds: list[int] = []
                head = self._recv(HEADER.size, fds)
                if head is None:
                    return
                request, flags, size = HEADER.unpack(head)
                payload = self._recv(size, fds) if size else b""
                msg = Msg(request, flags, payload or b"", fds)
                self.messages.append(msg)
                reply = self.answer(msg)
                if reply is not None:
                    self.sock.sendall(encode_reply(request, reply))
        except BaseException as exc:            # reported by the test through .error
            self.error = exc

    def answer(self, msg: Msg) -> bytes | None:
        """The reply payload for ``msg``, if it gets one."""
        values = {Request.GET_FEATURES: self.features, Request.GET_PROTOCOL_FEATURES: self.protocol_features,
                  Request.GET_QUEUE_NUM: self.queue_num, Request.GET_MAX_MEM_SLOTS: 32}
        if msg.request in values:
            return U64.pack(values[Request(msg.request)])
        if msg.request == Request.GET_VRING_BASE:
            return VRING_STATE.pack(decode_vring_state("GET_VRING_BASE", msg.payload)[0], 77)
        if msg.flags & HeaderFlags.NEED_REPLY:
            return U64.pack(self.status)
        return None

    def wait_for(self, request: Request, count: int = 1, timeout: float = 2.0) -> list[Msg]:
        """Wait until ``count`` messages of ``request`` arrived; return them."""
        deadline = time.monotonic() + timeout
        while True:
            found = [m for m in self.messages if m.request == request]
            if len(found) >= count or time.monotonic() > deadline:
                assert len(found) >= count, f"only {len(found)} {request.name} received"
                return found
            time.sleep(0.002)

    def codes(self) -> list[Request]:
        """Request codes received so far."""
        return [Request(m.request) for m in self.messages]

    def stop(self) -> None:
        """Shut the back-end socket down (the thread sees EOF), join, close everything."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        if self.thread is not None:
            self.thread.join(2.0)
        self.sock.close()
        for msg in self.messages:
            for fd in msg.fds:
                os.close(fd)


@pytest.fixture
def sockets() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connected (front-end, back-end) socket pair."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    yield a, b
    a.close()
    b.close()


def frontend(sock: socket.socket, **kw: object) -> VhostUserFrontend:
    """A front-end on an existing socket with a small RAM and a short timeout."""
    kw.setdefault("ram", GuestRam(8 * MIB))
    kw.setdefault("timeout", 1.0)
    return VhostUserFrontend("socketpair", sock=sock, **kw)  # type: ignore[arg-type]


def run(sockets: tuple[socket.socket, socket.socket], **backend_kw: object) -> FakeBackend:
    """Start a fake back-end on the back-end end of ``sockets``."""
    backend = FakeBackend(sockets[1], **backend_kw)  # type: ignore[arg-type]
    backend.start()
    return backend


# -- low-level requests ------------------------------------------------------------


def test_request_with_reply(sockets: tuple[socket.socket, socket.socket]) -> None:
    """GET_FEATURES goes out as a bare header and returns the reply payload."""
    fe_sock, be_sock = sockets
    be_sock.sendall(encode_reply(Request.GET_FEATURES, U64.pack(0x1234)))
    fe = frontend(fe_sock)
    assert fe.request(Request.GET_FEATURES) == U64.pack(0x1234)
    assert be_sock.recv(100) == HEADER.pack(Request.GET_FEATURES, 0x1, 0)
    assert fe.request(Request.SET_OWNER) is None
    assert be_sock.recv(100) == HEADER.pack(Request.SET_OWNER, 0x1, 0)
    fe.close()


def test_need_reply_status(sockets: tuple[socket.socket, socket.socket]) -> None:
    """need_reply sets flag 0x8; request_status returns the u64 status."""
    fe_sock, be_sock = sockets
    be_sock.sendall(encode_reply(Request.SET_VRING_NUM, U64.pack(1)))
    fe = frontend(fe_sock)
    assert fe.request_status(Request.SET_VRING_NUM, VRING_STATE.pack(0, 256)) == 1
    assert be_sock.recv(100) == HEADER.pack(Request.SET_VRING_NUM, 0x9, 8) + VRING_STATE.pack(0, 256)
    fe.close()


@pytest.mark.parametrize("reply", [
    HEADER.pack(Request.GET_FEATURES, 0xD, 8) + U64.pack(0),      # reply | need-reply: not exactly 0x5
    HEADER.pack(Request.GET_FEATURES, 0x1, 8) + U64.pack(0),      # not marked as a reply
    HEADER.pack(Request.GET_QUEUE_NUM, 0x5, 8) + U64.pack(0),     # answers another request
    HEADER.pack(Request.GET_FEATURES, 0x5, 4) + b"\0" * 4,        # short u64
    HEADER.pack(Request.GET_FEATURES, 0x5, 1 << 20),              # absurd size
    HEADER.pack(Request.GET_FEATURES, 0x5, 8) + b"\0" * 3,        # truncated, then silence
])
def test_bad_replies_raise(sockets: tuple[socket.socket, socket.socket], reply: bytes) -> None:
    """Malformed replies are FrontendError, never a hang or a crash."""
    fe_sock, be_sock = sockets
    be_sock.sendall(reply)
    fe = frontend(fe_sock, timeout=0.2)
    with pytest.raises(FrontendError):
        fe.request(Request.GET_FEATURES)
    fe.close()


def test_timeout_and_eof(sockets: tuple[socket.socket, socket.socket]) -> None:
    """A silent back-end times out; a closed one is reported as such."""
    fe_sock, be_sock = sockets
    fe = frontend(fe_sock, timeout=0.1)
    start = time.monotonic()
    with pytest.raises(FrontendError, match="timed out"):
        fe.request(Request.GET_FEATURES)
    assert time.monotonic() - start < 1.0
    assert not fe.peer_closed(0.01)
    be_sock.close()
    assert fe.peer_closed(0.5)
    with pytest.raises(FrontendError):
        fe.request(Request.GET_PROTOCOL_FEATURES)
    fe.close()


def test_send_raw_with_fds(sockets: tuple[socket.socket, socket.socket]) -> None:
    """Arbitrary bytes and fds reach the back-end unchanged."""
    fe_sock, be_sock = sockets
    fe = frontend(fe_sock)
    garbage = encode_message(999, b"\xff" * 5, 0x3)
    fe.send_raw(garbage, [fe.ram.fd])
    data, fds, _flags, _addr = socket.recv_fds(be_sock, 100, 4)
    assert data == garbage and len(fds) == 1
    assert os.fstat(fds[0]).st_ino == os.fstat(fe.ram.fd).st_ino
    os.close(fds[0])
    with pytest.raises(FrontendError):
        fe.send_raw(b"", [fe.ram.fd])
    fe.close()


def test_connect_retries_until_listening(tmp_path: Path) -> None:
    """connect() waits for a back-end that starts listening late; gives up after its timeout."""
    path = str(tmp_path / "vhost.sock")
    with pytest.raises(FrontendError):
        VhostUserFrontend.connect(path, timeout=0.1)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)

    def listen_late() -> None:
        """Bind after a short delay."""
        listener.bind(path)
        listener.listen(1)

    timer = threading.Timer(0.1, listen_late)
    timer.start()
    fe = VhostUserFrontend.connect(path, timeout=2.0, ram=GuestRam(MIB))
    timer.join()
    conn, _ = listener.accept()
    assert stat.S_ISSOCK(os.stat(path).st_mode)
    fe.close()
    conn.close()
    listener.close()


# -- handshake -----------------------------------------------------------------------


def test_handshake_sequence_one_pair(sockets: tuple[socket.socket, socket.socket]) -> None:
    """QEMU 7.2 order, negotiated features, memory table with need-reply and the memfd."""
    backend = run(sockets)
    fe = frontend(sockets[0], mrg_rxbuf=False)
    fe.handshake()
    backend.wait_for(Request.SET_VRING_ENABLE, 2)
    R = Request
    ring_msgs = [R.SET_VRING_NUM, R.SET_VRING_BASE, R.SET_VRING_ADDR, R.SET_VRING_KICK, R.SET_VRING_CALL]
    assert backend.codes() == [R.SET_OWNER, R.GET_FEATURES, R.GET_PROTOCOL_FEATURES,
                               R.SET_PROTOCOL_FEATURES, R.GET_QUEUE_NUM, R.SET_FEATURES,
                               R.SET_MEM_TABLE, *ring_msgs, *ring_msgs,
                               R.SET_VRING_ENABLE, R.SET_VRING_ENABLE]
    msgs = {m.request: m for m in backend.messages}
    expected = int(F.VERSION_1 | F.PROTOCOL_FEATURES | F.MQ | F.EVENT_IDX | F.INDIRECT_DESC)
    assert fe.negotiated_features == expected
    assert U64.unpack(msgs[R.SET_FEATURES].payload)[0] == expected
    assert fe.protocol_features == int(P.MQ | P.REPLY_ACK)
    assert U64.unpack(msgs[R.SET_PROTOCOL_FEATURES].payload)[0] == int(P.MQ | P.REPLY_ACK)
    table = msgs[R.SET_MEM_TABLE]
    assert table.flags == HeaderFlags.VERSION | HeaderFlags.NEED_REPLY
    assert decode_mem_table(table.payload) == fe.ram.regions
    assert [os.fstat(fd).st_ino for fd in table.fds] == [os.fstat(fe.ram.fd).st_ino]
    addrs = [decode_vring_addr(m.payload) for m in backend.messages if m.request == R.SET_VRING_ADDR]
    for index, addr in enumerate(addrs):
        ring = fe.ring(index)
        assert (addr.index, addr.desc, addr.avail, addr.used) == (index, ring.desc_vva, ring.avail_vva,
                                                                 ring.used_vva)
    for request in (R.SET_VRING_KICK, R.SET_VRING_CALL):
        sent = [m for m in backend.messages if m.request == request]
        assert [U64.unpack(m.payload)[0] for m in sent] == [0, 1]
        assert all(len(m.fds) == 1 for m in sent)
    enables = [decode_vring_state("", m.payload) for m in backend.messages if m.request == R.SET_VRING_ENABLE]
    assert enables == [(0, 1), (1, 1)]
    assert fe.hdr_len == NET_HDR.size
    fe.close()
    backend.stop()
    assert backend.error is None


def test_handshake_mem_slots_two_pairs(sockets: tuple[socket.socket, socket.socket]) -> None:
    """ADD_MEM_REG per region, repeated per pair; device-wide messages only once."""
    backend = run(sockets)
    ram = GuestRam(8 * MIB, split=0xC0000, hole=0x20000)
    fe = frontend(sockets[0], queue_pairs=2, mem_slots=True, ram=ram)
    fe.handshake()
    backend.wait_for(Request.SET_VRING_ENABLE, 4)
    codes = backend.codes()
    assert codes.count(Request.SET_OWNER) == 1 and codes.count(Request.GET_QUEUE_NUM) == 1
    assert codes.count(Request.GET_FEATURES) == 2 and codes.count(Request.SET_FEATURES) == 2
    assert codes.count(Request.GET_MAX_MEM_SLOTS) == 2 and Request.SET_MEM_TABLE not in codes
    adds = [m for m in backend.messages if m.request == Request.ADD_MEM_REG]
    assert [decode_single_region("", m.payload) for m in adds] == ram.regions * 2
    assert all(len(m.fds) == 1 and m.flags & HeaderFlags.NEED_REPLY for m in adds)
    kicks = [U64.unpack(m.payload)[0] for m in backend.messages if m.request == Request.SET_VRING_KICK]
    assert kicks == [0, 1, 2, 3]
    fe.close()
    ram.close()
    backend.stop()
    assert backend.error is None


def test_handshake_without_protocol_features(sockets: tuple[socket.socket, socket.socket]) -> None:
    """No bit 30: no protocol-feature messages and no SET_VRING_ENABLE; rings start enabled."""
    backend = run(sockets, features=int(F.VERSION_1 | F.EVENT_IDX))
    fe = frontend(sockets[0])
    fe.handshake()
    backend.wait_for(Request.SET_VRING_CALL, 2)
    fe.close()
    backend.stop()
    codes = backend.codes()
    assert Request.GET_PROTOCOL_FEATURES not in codes and Request.SET_VRING_ENABLE not in codes
    assert not backend.messages[codes.index(Request.SET_MEM_TABLE)].flags & HeaderFlags.NEED_REPLY


@pytest.mark.parametrize("case", ["queue_num", "refused", "no_mq"])
def test_handshake_failures(sockets: tuple[socket.socket, socket.socket], case: str) -> None:
    """Too few queues, a refused memory table, or no multiqueue are FrontendError."""
    kw: dict[str, object] = {"queue_num": 1} if case == "queue_num" else {}
    if case == "refused":
        kw["status"] = 1
    if case == "no_mq":
        kw["protocol_features"] = int(P.REPLY_ACK)
    backend = run(sockets, **kw)
    fe = frontend(sockets[0], queue_pairs=1 if case == "refused" else 2)
    with pytest.raises(FrontendError):
        fe.handshake()
    fe.close()
    backend.stop()


def test_get_vring_base(sockets: tuple[socket.socket, socket.socket]) -> None:
    """GET_VRING_BASE returns (index, base) and checks the index."""
    fe_sock, be_sock = sockets
    be_sock.sendall(encode_reply(Request.GET_VRING_BASE, VRING_STATE.pack(1, 500)))
    be_sock.sendall(encode_reply(Request.GET_VRING_BASE, VRING_STATE.pack(0, 500)))
    fe = frontend(fe_sock)
    assert fe.get_vring_base(1) == (1, 500)
    with pytest.raises(FrontendError):
        fe.get_vring_base(1)
    fe.close()


# -- data path -----------------------------------------------------------------------


@dataclass
class Device:
    """Device-side state rebuilt from the recorded handshake."""

    mem: DeviceMemory
    rings: list[DeviceRing]
    kick: list[int]
    call: list[int]


def device_from(backend: FakeBackend, rings: int) -> Device:
    """Map the memory and locate the rings the way a back-end would."""
    backend.wait_for(Request.SET_VRING_ENABLE, rings)
    by = {code: [m for m in backend.messages if m.request == code] for code in Request}
    table = by[Request.SET_MEM_TABLE][0]
    mem = DeviceMemory(table.fds[0], decode_mem_table(table.payload))
    devrings = []
    for i in range(rings):
        num = decode_vring_state("", by[Request.SET_VRING_NUM][i].payload)[1]
        base = decode_vring_state("", by[Request.SET_VRING_BASE][i].payload)[1]
        addr = decode_vring_addr(by[Request.SET_VRING_ADDR][i].payload)
        devrings.append(DeviceRing(mem, num, addr.desc, addr.avail, addr.used, base))
    return Device(mem, devrings, [m.fds[0] for m in by[Request.SET_VRING_KICK]],
                  [m.fds[0] for m in by[Request.SET_VRING_CALL]])


def kicked(fd: int) -> bool:
    """Read-and-reset an eventfd; True if it was signalled."""
    try:
        return os.eventfd_read(fd) > 0
    except BlockingIOError:
        return False


def rx_header(num_buffers: int) -> bytes:
    """A virtio_net_hdr_v1 as a back-end writes it."""
    return NET_HDR.pack(0, 0, 0, 0, 0, 0, num_buffers)


@pytest.fixture
def started(sockets: tuple[socket.socket, socket.socket]) -> Iterator[tuple[VhostUserFrontend, Device]]:
    """A front-end with two pairs after the handshake, and the device's view."""
    backend = run(sockets)
    fe = frontend(sockets[0], queue_pairs=2, ring_size=8)
    fe.handshake()
    device = device_from(backend, 4)
    for fd in device.kick + device.call:
        os.set_blocking(fd, False)
    yield fe, device
    fe.close()
    device.mem.close()
    backend.stop()
    assert backend.error is None


def test_tx_kick_and_reclaim(started: tuple[VhostUserFrontend, Device]) -> None:
    """send_frame puts header+frame in one descriptor, kicks only when asked, reclaims."""
    fe, dev = started
    tx = dev.rings[3]
    fe.send_frame(1, b"E" * 60)
    assert kicked(dev.kick[3])                       # avail_event 0 crossed
    head = tx.pop_head()
    assert len(tx.walk(head)) == 1
    assert tx.read_chain(head) == bytes(12) + b"E" * 60
    tx.set_avail_event(tx.last_avail + 100)          # device: no kicks for a while
    assert fe.send_frames(1, [b"a", b"b"]) == 2
    assert not kicked(dev.kick[3])
    for h in (head, tx.pop_head(), tx.pop_head()):
        tx.push(h, 0)
    assert fe.reclaim_tx(1) == 3
    assert fe.send_frames(1, [b"x"] * 10) == 8       # ring of 8: the rest does not fit
    with pytest.raises(FrontendError):
        fe.send_frame(1, b"y")
    with pytest.raises(FrontendError):
        fe.send_frame(1, b"z", hdr=b"short")


def test_rx_mergeable_reassembly(started: tuple[VhostUserFrontend, Device]) -> None:
    """Frames spanning num_buffers buffers are joined; the header is stripped."""
    fe, dev = started
    rx = dev.rings[2]
    assert fe.post_rx(1, 4, 64) == 4
    assert kicked(dev.kick[2])
    heads = [rx.pop_head() for _ in range(4)]
    small = b"s" * 30
    big = bytes(range(100))
    rx.push(heads[0], rx.write_chain(heads[0], rx_header(1) + small), publish=False)
    rx.push(heads[1], rx.write_chain(heads[1], rx_header(2) + big[:52]), publish=False)
    rx.push(heads[2], rx.write_chain(heads[2], big[52:]))
    os.eventfd_write(dev.call[2], 1)
    assert fe.recv_frames(1, timeout=1.0) == [small, big]
    # a packet whose second buffer arrives later is held back until complete
    rx.push(heads[3], rx.write_chain(heads[3], rx_header(2) + b"first"))
    os.eventfd_write(dev.call[2], 1)
    assert fe.recv_frames(1, timeout=0.05) == []
    assert fe.post_rx(1, 1, 64) == 1
    last = rx.pop_head()
    # completed later by a device that forgets the interrupt: found by the poll slices
    timer = threading.Timer(0.12, lambda: rx.push(last, rx.write_chain(last, b"+second")))
    timer.start()
    assert fe.recv_packets(1, timeout=2.0) == [(rx_header(2), b"first+second")]
    timer.join()
    assert fe.rx_wakeups_without_call == 1


def test_rx_timeout_and_bad_buffers(started: tuple[VhostUserFrontend, Device]) -> None:
    """Nothing received returns [] after the timeout; broken RX elements raise."""
    fe, dev = started
    start = time.monotonic()
    assert fe.recv_frames(0, timeout=0.1) == []
    assert 0.09 < time.monotonic() - start < 1.0
    rx = dev.rings[0]
    fe.post_rx(0, 2, 64)
    first, second = rx.pop_head(), rx.pop_head()
    rx.push(first, rx.write_chain(first, b"short"))  # shorter than the header
    with pytest.raises(FrontendError):
        fe.recv_frames(0, timeout=0.1)
    rx.push(second, rx.write_chain(second, rx_header(0) + b"x"))
    with pytest.raises(FrontendError):
        fe.recv_frames(0, timeout=0.1)
