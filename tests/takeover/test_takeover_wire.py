"""The take-over channel's messages: version negotiation both ways, and a hostile peer's messages over a real
SEQPACKET socketpair (bounded, refused whole, descriptors closed)."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import msgspec
import pytest

from shardswitch.ipc import Channel, IpcError
from shardswitch.takeover import wire


@pytest.fixture
def pair() -> Iterator[tuple[Channel, Channel]]:
    """(OLD's end, NEW's end) of a take-over channel."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    old = Channel(a, wire.ToOld, wire.MAX_MESSAGE, wire.MAX_FDS)
    new = Channel(b, wire.ToNew, wire.MAX_MESSAGE, wire.MAX_FDS)
    yield old, new
    old.close()
    new.close()


def open_fds() -> set[str]:
    """This process's open descriptors (a descriptor received and kept would be a new one; the garbage
    collector may only close some meanwhile)."""
    return set(os.listdir("/proc/self/fd"))


def test_choose_format_newest_common_or_both_versions_named() -> None:
    """The newest format both know; none: an error naming what each side has."""
    assert wire.choose_format((1, 2, 3), (2, 3, 4)) == 3
    with pytest.raises(wire.TakeoverError, match="the new process reads 2, 5, the running one writes 1"):
        wire.choose_format((5, 2), (1,))


def test_hello_offer_round_trip(pair: tuple[Channel, Channel]) -> None:
    """NEW's Hello reaches OLD; OLD's Offer carries the chosen format, its settings and pairs back."""
    old, new = pair
    new.send(wire.hello("0.9", os.getpid()))
    message, fds = old.recv()
    assert isinstance(message, wire.Hello) and fds == [] and message.reads == (1,)
    old.send(wire.answer_hello(message, "0.8", b"\x80", 2))
    offer, _ = new.recv()
    assert offer == wire.Offer(protocol=wire.PROTOCOL, version="0.8", format=1, settings=b"\x80", pairs=2)


@pytest.mark.parametrize(("hello", "reason"), [
    (wire.Hello(protocol=2, reads=(1,), pid=7, version="9.0"),
     "the new process (shardswitch 9.0) speaks take-over protocol 2, this one 1 (running: shardswitch 0.8)"),
    (wire.Hello(protocol=1, reads=(7,), pid=7, version="9.0"),
     "no device-state format in common: the new process reads 7, the running one writes 1 "
     "(running: shardswitch 0.8)"),
])
def test_unknown_versions_are_refused_with_both_named(hello: wire.Hello, reason: str) -> None:
    """A newer or older NEW that OLD cannot serve: a Refuse whose reason has both versions."""
    assert wire.answer_hello(hello, "0.8", b"", 1) == wire.Refuse(reason)
    with pytest.raises(wire.TakeoverError, match="speaks take-over protocol 3, this one 1"):
        wire.check_protocol(3, "the running one")


def test_hostile_messages_are_refused_whole(pair: tuple[Channel, Channel]) -> None:
    """Bytes that do not decode, a message of the wrong direction, fields out of range, a message over the
    limits: each is an IpcError, and descriptors that came with it are closed."""
    old, new = pair
    raw = new.sock
    r, w = os.pipe()
    try:
        for data in (b"\xc1garbage",                                                    # not msgpack
                     msgspec.msgpack.encode(wire.Offer(protocol=1, version="x", format=1, settings=b"", pairs=1)),
                     msgspec.msgpack.encode({"type": "Hello", "protocol": 0, "reads": [1], "pid": 1,
                                             "version": "x"}),                            # protocol 0
                     msgspec.msgpack.encode({"type": "Hello", "protocol": 1, "reads": list(range(1, 100)),
                                             "pid": 1, "version": "x"})):                 # too many formats
            socket.send_fds(raw, [data], [r])
            before = open_fds()
            with pytest.raises(IpcError):
                old.recv()
            assert open_fds() <= before                  # what it carried was closed, not kept
        raw.send(b"\x00" * (wire.MAX_MESSAGE + 1))
        with pytest.raises(IpcError, match="over"):
            old.recv()
    finally:
        os.close(r)
        os.close(w)


def test_too_many_descriptors_are_refused(pair: tuple[Channel, Channel]) -> None:
    """More descriptors than a message may carry: refused, none of them kept (the worker channel's limit,
    8, shows it with few descriptors)."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    small = Channel(a, wire.ToOld)
    r, w = os.pipe()
    try:
        socket.send_fds(b, [msgspec.msgpack.encode(wire.Ready())], [r] * 9)
        before = open_fds()
        with pytest.raises(IpcError, match="descriptors"):
            small.recv()
        assert open_fds() <= before
    finally:
        for fd in (r, w):
            os.close(fd)
        small.close()
        b.close()
