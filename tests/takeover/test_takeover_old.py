"""A running switch asked to be taken over, by a test playing the new process (steps 1 and 2 of
docs/takeover.md): the offer, refusals (busy, a stranger, a bad descriptor, versions it cannot serve, junk on
the channel) and, whatever the new process does or fails to do, the switch serving on unchanged."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from shardswitch.coordinator.control import ControlRefused, query
from shardswitch.ipc import Channel
from shardswitch.settings import Config
from shardswitch.takeover import wire
from tests.coordinator.accesskit import OPERATORS, STRANGER, answer_of, as_user, ask
from tests.switch import Switch
from tests.switchkit import arp_roundtrip, ready_frontend, wait_until


@pytest.fixture
def switch(tmp_path: Path, nobody_dir: Path) -> Iterator[Switch]:
    """A 2-worker switch whose sockets any user may reach (its control group: OPERATORS)."""
    nobody_dir.chmod(0o755)
    with Switch(tmp_path, workers=2, socket_path=str(nobody_dir / "ss.sock"),
                args=["--control-group", str(OPERATORS), "-H", "vm1"]) as sw:
        yield sw


def ask_takeover(sw: Switch) -> tuple[dict[str, object], Channel]:
    """Ask for a take-over with one end of a SEQPACKET pair; the answer and the new process's end."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        answer = asked(sw, [theirs.fileno()])
    finally:
        theirs.close()
    return answer, Channel(ours, wire.ToNew, wire.MAX_MESSAGE, wire.MAX_FDS)


def asked(sw: Switch, fds: list[int]) -> dict[str, object]:
    """The control answer to a take-over request carrying ``fds`` (an error answer as ``{"error": ...}``)."""
    try:
        return query(sw.control, "takeover", fds=fds)
    except ControlRefused as err:
        return {"error": str(err)}


def serves_on(sw: Switch) -> None:
    """The switch still answers and moves frames, with no take-over in progress."""
    wait_until(lambda: sw.status()["takeover"] is None or None, "the take-over session to end")
    with ready_frontend(sw) as fe:
        arp_roundtrip(fe, 0)
        arp_roundtrip(fe, 1)


def test_hello_gets_the_offer_then_the_switch_serves_on(switch: Switch) -> None:
    """The new process's hello gets an offer: the format, this switch's settings (its own Config, host name
    included) and queue pairs; status shows the step; the new process leaving ends it, nothing changed."""
    answer, channel = ask_takeover(switch)
    assert answer == {"takeover": "accepted"}
    channel.send(wire.hello("9.9", os.getpid()))
    offer, fds = channel.recv()
    assert isinstance(offer, wire.Offer) and fds == []
    assert (offer.protocol, offer.format, offer.pairs) == (wire.PROTOCOL, 1, 2)
    settings = msgspec.msgpack.decode(offer.settings, type=Config)
    assert (settings.workers, settings.hostname, settings.socket) == (2, "vm1", switch.socket)
    assert switch.status()["takeover"]["step"].startswith("offered")
    channel.close()
    serves_on(switch)
    assert "take-over ended, serving on" in switch.log()


def test_one_at_a_time_and_only_its_owner(switch: Switch) -> None:
    """While one take-over is in flight a second is refused (busy); a member of --control-group, who may ask
    for status, may not take over; once the first has gone a new one is accepted."""
    answer, first = ask_takeover(switch)
    assert answer == {"takeover": "accepted"}
    second, other = ask_takeover(switch)
    assert str(second["error"]).startswith("busy: a take-over is in flight")
    other.close()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    request = b'{"cmd": "takeover"}\n'
    try:
        stranger = answer_of(as_user(STRANGER, OPERATORS, ask(switch.control, request, [theirs.fileno()])))
    finally:
        theirs.close()
        ours.close()
    assert stranger == {"error": "not allowed: only root and uid 65534 may takeover"}
    first.close()
    wait_until(lambda: switch.status()["takeover"] is None or None, "the first take-over to end")
    again, channel = ask_takeover(switch)
    assert again == {"takeover": "accepted"}
    channel.close()
    serves_on(switch)


@pytest.mark.parametrize("kind", ["pipe", "stream", "none"])
def test_the_channel_must_be_a_seqpacket_socket(switch: Switch, kind: str) -> None:
    """A pipe, a stream socket or no descriptor instead of the channel: refused, with what was wrong."""
    keep: list[int] = []
    wanted = {"pipe": "not a socket", "stream": "not a unix SOCK_SEQPACKET socket",
              "none": "carries one descriptor"}[kind]
    if kind == "pipe":
        keep = list(os.pipe())
    elif kind == "stream":
        keep = [s.detach() for s in socket.socketpair()]
    fds = keep[:1]
    try:
        answer = asked(switch, fds)
    finally:
        for fd in keep:
            os.close(fd)
    assert wanted in str(answer["error"])
    serves_on(switch)


@pytest.mark.parametrize(("hello", "reason"), [
    (wire.Hello(protocol=1, reads=(9,), pid=1, version="9.9"), "the new process reads 9, the running one writes 1"),
    (wire.Hello(protocol=2, reads=(1,), pid=1, version="9.9"), "speaks take-over protocol 2, this one 1"),
])
def test_versions_it_cannot_serve_are_refused(switch: Switch, hello: wire.Hello, reason: str) -> None:
    """A new process of a format or protocol this switch does not write: a Refuse naming both versions."""
    _answer, channel = ask_takeover(switch)
    channel.send(hello)
    refuse, _fds = channel.recv()
    assert isinstance(refuse, wire.Refuse) and reason in refuse.reason and "running: shardswitch" in refuse.reason
    channel.close()
    serves_on(switch)


def test_junk_on_the_channel_ends_the_session(switch: Switch) -> None:
    """Bytes that do not decode, then a message out of turn: each ends the session, the switch serves on."""
    _answer, channel = ask_takeover(switch)
    channel.sock.send(b"\xc1 not msgpack")
    serves_on(switch)
    _answer, channel = ask_takeover(switch)
    channel.send(wire.Ready())
    refuse, _fds = channel.recv()
    assert isinstance(refuse, wire.Refuse) and "out of turn" in refuse.reason
    channel.close()
    serves_on(switch)
