"""The take-over channel's messages: a new shardswitch taking over from a running one (docs/takeover.md).

Theory of operation
-------------------
The new process (NEW) and the running one (OLD) talk over one
``AF_UNIX``/``SOCK_SEQPACKET`` socket, which NEW hands to OLD through OLD's
control socket.  Each message is one datagram: a tagged msgpack
:mod:`msgspec` struct and the descriptors attached to it (``SCM_RIGHTS``),
as on the coordinator-worker channel (:class:`shardswitch.ipc.Channel`, which
carries them, with this module's limits: :data:`MAX_MESSAGE` bytes and
:data:`MAX_FDS` descriptors, the kernel's own limit per message; a message
cut short is refused, never half read).

Versions: :data:`PROTOCOL` numbers these messages.  NEW opens with
:class:`Hello`, naming its protocol and the device-state formats it reads
(those of live migration, :mod:`shardswitch.migration.format`); OLD answers
:class:`Offer` with the newest format both know (:func:`choose_format`) or
:class:`Refuse`, whose reason names both sides' versions.  Each side checks
the other's protocol with :func:`check_protocol`.  Nothing here does I/O or
keeps state: the two sides' state machines live with their process.

What each message may hold is bounded by its type (msgspec constraints:
string lengths, version ranges), so a hostile peer gets a decode error, not
an allocation of its choosing.
"""

from __future__ import annotations

from typing import Annotated, Final, Union

import msgspec

from shardswitch.migration import format as state_format

#: The take-over protocol these messages are (a peer speaking another is refused).
PROTOCOL: Final = 1
#: Largest message (a datagram must fit the socket's send buffer: a batch of flows' records is cut to fit;
#: their sockets ride along as descriptors).
MAX_MESSAGE: Final = 64 << 10
#: Most descriptors in one message: the kernel's SCM_MAX_FD.
MAX_FDS: Final = 253
#: Seconds OLD's workers may stay paused (steps 5 to 7) before OLD aborts on its own.
QUIESCE_DEADLINE: Final = 10.0

Version = Annotated[int, msgspec.Meta(ge=1, le=0xFFFF)]
Reason = Annotated[str, msgspec.Meta(max_length=1024)]
#: The formats NEW reads: at most a few dozen versions.
Formats = Annotated[tuple[Version, ...], msgspec.Meta(min_length=1, max_length=64)]
Pid = Annotated[int, msgspec.Meta(ge=1, le=(1 << 22))]
#: OLD's settings, a msgpack-encoded Config (bounded: a settings file is small, and the Offer must fit a message).
Settings = Annotated[bytes, msgspec.Meta(max_length=32 << 10)]
Pairs = Annotated[int, msgspec.Meta(ge=1, le=256)]


class TakeoverError(Exception):
    """The take-over cannot go on: a version the other side does not speak, a message out of turn."""


class Hello(msgspec.Struct, tag=True, frozen=True, kw_only=True):
    """NEW -> OLD, first: who asks (its PID), its take-over protocol, the device-state formats it reads."""

    protocol: Version
    reads: Formats
    pid: Pid
    #: NEW's version, for the log and the errors.
    version: Annotated[str, msgspec.Meta(max_length=64)]


class Offer(msgspec.Struct, tag=True, frozen=True, kw_only=True):
    """OLD -> NEW: OLD's protocol and version, the format the flows will come in, its settings and pairs."""

    protocol: Version
    version: Annotated[str, msgspec.Meta(max_length=64)]
    format: Version
    settings: Settings
    pairs: Pairs


class Refuse(msgspec.Struct, tag=True, frozen=True):
    """Either side: the take-over will not happen (OLD serves on, NEW exits with ``reason``)."""

    reason: Reason


class Abort(msgspec.Struct, tag=True, frozen=True):
    """Either side, at any step before :class:`Ready`: stop; OLD resumes whatever it paused."""

    reason: Reason


class Ready(msgspec.Struct, tag=True, frozen=True):
    """NEW -> OLD, last: NEW serves the guest; OLD closes its copies and exits."""


#: What OLD receives, and what NEW receives.
ToOld = Union[Hello, Abort, Ready]
ToNew = Union[Offer, Refuse, Abort]


def check_protocol(theirs: int, side: str) -> None:
    """Refuse a peer (``side``: "the new process" / "the running one") whose protocol is not ours."""
    if theirs != PROTOCOL:
        raise TakeoverError(f"{side} speaks take-over protocol {theirs}, this one {PROTOCOL}")


def choose_format(reads: tuple[int, ...], writes: tuple[int, ...] = (state_format.VERSION,)) -> int:
    """The newest device-state format in both ``reads`` (NEW's) and ``writes`` (OLD's); TakeoverError naming
    both when there is none."""
    common = set(reads) & set(writes)
    if not common:
        raise TakeoverError(f"no device-state format in common: the new process reads "
                            f"{', '.join(map(str, sorted(reads)))}, the running one writes "
                            f"{', '.join(map(str, sorted(writes)))}")
    return max(common)


def hello(version: str, pid: int, reads: tuple[int, ...] = (state_format.VERSION,)) -> Hello:
    """NEW's opening message."""
    return Hello(protocol=PROTOCOL, reads=reads, pid=pid, version=version)


def answer_hello(message: Hello, version: str, settings: bytes, pairs: int,
                 writes: tuple[int, ...] = (state_format.VERSION,)) -> Offer | Refuse:
    """OLD's answer to ``message``: an Offer, or a Refuse whose reason names both sides' versions."""
    try:
        check_protocol(message.protocol, f"the new process (shardswitch {message.version})")
        chosen = choose_format(message.reads, writes)
    except TakeoverError as err:
        return Refuse(f"{err} (running: shardswitch {version})")
    return Offer(protocol=PROTOCOL, version=version, format=chosen, settings=settings, pairs=pairs)
