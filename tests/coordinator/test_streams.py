"""Local stream clients served in a selector loop (coordinator/streams.py), in this process: partial requests
and their descriptors kept per client, the bound on clients, the deadline, the size limit, and answers
written without ever waiting for a client that does not read.

The loop is turned by hand (:func:`pump`) until what a test waits for happened; deadlines are checked by
calling ``expire`` with a chosen time, not by waiting."""

from __future__ import annotations

import os
import selectors
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from shardswitch.coordinator.streams import Drop, Limits, StreamClient, StreamService


class LineHandler:
    """Answers a line with what it got: the line and the inode of each descriptor it carried."""

    def __init__(self, answer_size: int = 0) -> None:
        """``answer_size``: pad answers to this many bytes."""
        self.answer_size = answer_size
        self.refuse: bytes | None = None
        self.drops: list[Drop] = []
        self.connected = 0

    def admit(self, client: StreamClient) -> bytes | None:
        """Everybody, unless told to refuse."""
        self.connected += 1
        return self.refuse

    def respond(self, client: StreamClient) -> bytes | None:
        """The line back, with the descriptors' inodes."""
        if b"\n" not in client.request:
            return None
        inodes = b",".join(str(os.fstat(fd).st_ino).encode() for fd in client.fds)
        answer = b"got " + bytes(client.request).rstrip(b"\n") + b" fds " + inodes
        if client.too_many_fds:
            answer += b" too many"
        return answer.ljust(self.answer_size, b".") + b"\n"

    def overflow(self, client: StreamClient) -> bytes:
        """Too long."""
        return b"too long\n"

    def dropped(self, client: StreamClient, reason: Drop) -> bytes:
        """Noted; the reason as the answer."""
        self.drops.append(reason)
        return reason.name.encode() + b"\n"


class Loop:
    """A selector, a listening socket served by a StreamService, and clients connected to it."""

    def __init__(self, path: Path, limits: Limits, handler: LineHandler) -> None:
        """Listen at ``path``."""
        self.sel = selectors.DefaultSelector()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(path))
        listener.listen(16)
        self.path = path
        self.handler = handler
        self.service = StreamService(self.sel, listener, limits, handler)
        self.clients: list[socket.socket] = []
        self.got: dict[socket.socket, bytes] = {}

    def connect(self) -> socket.socket:
        """A new client, accepted by the service before this returns."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(self.path))
        sock.setblocking(False)
        self.clients.append(sock)
        self.got[sock] = b""
        connected = self.handler.connected
        self.pump(lambda: self.handler.connected > connected)
        return sock

    def buffered(self) -> int:
        """Request bytes the service holds, all clients together."""
        return sum(len(client.request) for client in self.service.clients.values())

    def pump(self, until: Callable[[], bool], timeout: float = 10.0) -> None:
        """Turn the loop (and read what clients were sent) until ``until()``."""
        deadline = time.monotonic() + timeout
        while not until():
            assert time.monotonic() < deadline, "the loop never got there"
            for key, _events in self.sel.select(0.02):
                key.data()
            self.read_clients()

    def read_clients(self) -> None:
        """Take what each client was sent so far."""
        for sock in self.clients:
            try:
                self.got[sock] += sock.recv(1 << 20)
            except (BlockingIOError, OSError):
                pass

    def answered(self, sock: socket.socket) -> bool:
        """Whether ``sock`` holds a whole answer line."""
        return self.got[sock].endswith(b"\n")

    def close(self) -> None:
        """Close everything."""
        for sock in self.clients:
            sock.close()
        self.service.close()
        self.sel.close()


@pytest.fixture
def make_loop(tmp_path: Path) -> Iterator[Callable[..., Loop]]:
    """Build Loops that are closed after the test."""
    loops: list[Loop] = []

    def make(max_clients: int = 4, max_request: int = 256, deadline: float = 60.0, max_fds: int = 2,
             answer_size: int = 0) -> Loop:
        loop = Loop(tmp_path / f"s{len(loops)}", Limits(max_clients, max_request, deadline, max_fds),
                    LineHandler(answer_size))
        loops.append(loop)
        return loop

    yield make
    for loop in loops:
        loop.close()


def test_partial_requests_and_descriptors_kept_per_client(make_loop: Callable[..., Loop],
                                                          tmp_path: Path) -> None:
    """Two clients send their requests a few bytes at a time, interleaved, each with a descriptor: each gets
    its own line and its own descriptor back."""
    loop = make_loop()
    a, b = loop.connect(), loop.connect()
    files = [tmp_path / "fa", tmp_path / "fb"]
    fds = [os.open(f, os.O_CREAT | os.O_RDONLY) for f in files]
    try:
        socket.send_fds(a, [b"al"], [fds[0]])
        socket.send_fds(b, [b"be"], [fds[1]])
        loop.pump(lambda: loop.buffered() == 4)
        a.send(b"ph")
        b.send(b"ta\n")
        loop.pump(lambda: loop.answered(b))
        assert not loop.got[a]
        a.send(b"a\n")
        loop.pump(lambda: loop.answered(a))
    finally:
        for fd in fds:
            os.close(fd)
    assert loop.got[a] == b"got alpha fds %d\n" % files[0].stat().st_ino
    assert loop.got[b] == b"got beta fds %d\n" % files[1].stat().st_ino
    for sock in (a, b):                                 # closed at the clients' ends of stream
        sock.close()
        loop.clients.remove(sock)
    loop.pump(lambda: not loop.service.clients)


def test_descriptors_beyond_the_limit_are_closed(make_loop: Callable[..., Loop], tmp_path: Path) -> None:
    """A request that carries more descriptors than allowed keeps only the allowed number; the others are
    closed as they arrive (no descriptor of ours leaks)."""
    loop = make_loop(max_fds=1)
    held = len(os.listdir("/proc/self/fd"))
    sock = loop.connect()
    fd = os.open(tmp_path / "f", os.O_CREAT | os.O_RDONLY)
    try:
        socket.send_fds(sock, [b"x"], [fd])
        socket.send_fds(sock, [b"y"], [fd, fd])
        sock.send(b"\n")
        loop.pump(lambda: loop.answered(sock))
    finally:
        os.close(fd)
    assert loop.got[sock].endswith(b" too many\n"), loop.got[sock]
    sock.close()
    loop.clients.remove(sock)
    loop.pump(lambda: not loop.service.clients)
    assert len(os.listdir("/proc/self/fd")) == held


def test_clients_are_bounded(make_loop: Callable[..., Loop]) -> None:
    """With every slot taken, one more client is refused at once with the busy answer; once a client leaves
    a new one is served."""
    loop = make_loop(max_clients=2)
    first, _second = loop.connect(), loop.connect()
    extra = loop.connect()
    loop.pump(lambda: loop.got[extra] == b"BUSY\n")
    assert loop.handler.drops == [Drop.BUSY] and len(loop.service.clients) == 2
    first.close()
    loop.clients.remove(first)
    loop.pump(lambda: len(loop.service.clients) == 1)
    late = loop.connect()
    late.send(b"hello\n")
    loop.pump(lambda: loop.answered(late))
    assert loop.got[late] == b"got hello fds \n"


def test_refused_peer_gets_its_answer_and_is_closed(make_loop: Callable[..., Loop]) -> None:
    """A peer the handler does not admit gets the handler's answer and the end of the stream; it takes no
    slot."""
    loop = make_loop()
    loop.handler.refuse = b"no\n"
    sock = loop.connect()
    loop.pump(lambda: loop.got[sock] == b"no\n")
    sock.setblocking(True)
    sock.settimeout(5)
    assert sock.recv(100) == b""
    assert not loop.service.clients and not loop.handler.drops


def test_deadline_covers_the_whole_request(make_loop: Callable[..., Loop]) -> None:
    """A client that keeps sending without finishing is dropped at its deadline (counted, with the deadline
    answer), however often it sent; a client with a complete request is not."""
    loop = make_loop(deadline=30.0)
    slow = loop.connect()
    for count, byte in enumerate(b"never", 1):
        slow.send(bytes([byte]))
        loop.pump(lambda: loop.buffered() == count)
    client = loop.service.clients[slow_fileno(loop)]
    assert loop.service.expire(client.deadline - 1.0) is not None and slow_fileno(loop) in loop.service.clients
    assert loop.service.expire(client.deadline) is None
    loop.pump(lambda: loop.got[slow] == b"DEADLINE\n")
    assert loop.handler.drops == [Drop.DEADLINE]


def slow_fileno(loop: Loop) -> int:
    """The descriptor of the only client the service holds."""
    (fileno,) = loop.service.clients
    return fileno


def test_request_size_is_bounded(make_loop: Callable[..., Loop]) -> None:
    """A request that reaches the size limit without being complete gets the overflow answer."""
    loop = make_loop(max_request=64)
    sock = loop.connect()
    sock.send(b"x" * 100)
    loop.pump(lambda: loop.answered(sock))
    assert loop.got[sock] == b"too long\n"


def test_large_answer_never_blocks_the_loop(make_loop: Callable[..., Loop]) -> None:
    """An 8 MiB answer to a client that does not read: the loop goes on (another client is answered
    meanwhile); the whole answer arrives once the client reads; at the deadline a client that stopped
    reading mid-answer is closed without a deadline answer."""
    loop = make_loop(answer_size=8 << 20)
    reader = loop.connect()
    stalled = loop.connect()
    loop.clients.remove(stalled)                        # nobody reads it
    stalled.send(b"big\n")
    reader.send(b"big\n")
    loop.pump(lambda: loop.answered(reader))
    assert len(loop.got[reader]) == (8 << 20) + 1
    client = next(c for c in loop.service.clients.values() if c.answer is not None and len(c.answer))
    assert loop.service.expire(client.deadline) is None
    assert loop.handler.drops == []
    stalled.close()
