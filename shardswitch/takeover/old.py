"""The running switch's side of a take-over (OLD in docs/takeover.md): the channel, one step at a time.

Theory of operation
-------------------
A client of the control socket that may take over (root or the switch's own
user: :meth:`~shardswitch.coordinator.access.AccessPolicy.owns`) sends
``{"cmd": "takeover"}`` with one end of a ``SOCK_SEQPACKET`` socketpair.
:func:`check_channel` makes sure it is one; the coordinator then keeps it as
an :class:`OldSide`, watched in its loop, and answers ``accepted`` (or
``busy`` while another take-over is in flight).  From then on the channel
speaks :mod:`.wire`: the new process's :class:`~.wire.Hello` gets an
:class:`~.wire.Offer` (the format its flows would come in, this switch's
settings and queue pairs) or a :class:`~.wire.Refuse` naming both versions.

Built so far: steps 1 and 2.  Nothing is paused or handed over yet, so any
end of the session (the new process gone, a message out of turn or that
does not decode, :data:`STEP_DEADLINE` passed, an :class:`~.wire.Abort`)
leaves this switch exactly as it was: the session is closed and logged, and
a new take-over may start.
"""

from __future__ import annotations

import logging
import os
import selectors
import socket
import stat
import time
from enum import Enum
from typing import Callable

from shardswitch.ipc import Channel, IpcError
from shardswitch.loglimit import LogLimiter
from shardswitch.takeover import wire

log = logging.getLogger("shardswitch")

#: Seconds the new process has for each step before the take-over is given up.
STEP_DEADLINE = 30.0


class TakeoverRefused(Exception):
    """A take-over request that is not taken (its message is the control answer's error)."""


class Step(Enum):
    """Where a take-over stands, from the running switch's side."""

    HELLO = "awaiting the new process's hello"
    OFFERED = "offered: awaiting the new process's preparation"


def check_channel(fds: list[int]) -> socket.socket:
    """The take-over channel among the request's descriptors: exactly one, a unix SEQPACKET socket (anything
    else is closed and refused with TakeoverRefused)."""
    try:
        if len(fds) != 1:
            raise TakeoverRefused(f"a take-over request carries one descriptor (a SOCK_SEQPACKET socket), "
                                  f"not {len(fds)}")
        if not stat.S_ISSOCK(os.fstat(fds[0]).st_mode):
            raise TakeoverRefused("the take-over descriptor is not a socket")
        sock = socket.socket(fileno=fds[0])
    except (TakeoverRefused, OSError) as err:
        for fd in fds:
            os.close(fd)
        raise TakeoverRefused(str(err)) from None
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_SEQPACKET:
        sock.close()
        raise TakeoverRefused("the take-over descriptor is not a unix SOCK_SEQPACKET socket")
    sock.setblocking(False)
    return sock


class OldSide:
    """One take-over in progress, seen from the running switch."""

    def __init__(self, sel: selectors.BaseSelector, sock: socket.socket, version: str, settings: bytes, pairs: int,
                 on_end: Callable[[], None], limiter: LogLimiter,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """Serve the channel ``sock`` in ``sel``: this switch is ``version``, runs with ``settings`` (a
        msgpack Config) on ``pairs`` queue pairs; ``on_end`` is called once the session is over; its log
        lines go through ``limiter``, the switch's (sessions one after another share its budget)."""
        self.sel = sel
        self.channel = Channel(sock, wire.ToOld, wire.MAX_MESSAGE, wire.MAX_FDS)
        self.version = version
        self.settings = settings
        self.pairs = pairs
        self.on_end = on_end
        self.clock = clock
        self.step = Step.HELLO
        self.deadline = clock() + STEP_DEADLINE
        #: The new process, once it said hello (for the log).
        self.peer = "the new process"
        self.limiter = limiter
        self.open = True
        sel.register(sock, selectors.EVENT_READ, self.on_readable)

    def on_readable(self) -> None:
        """One message from the new process (or its end of the channel closing)."""
        try:
            message, fds = self.channel.recv(socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except IpcError as err:
            self.end(f"{self.peer} went away or sent what cannot be read ({err})")
            return
        for fd in fds:                 # no step so far takes descriptors from the new process
            os.close(fd)
        if isinstance(message, wire.Abort):
            self.end(f"{self.peer} gave up: {message.reason}")
        elif isinstance(message, wire.Hello) and self.step == Step.HELLO:
            self._hello(message)
        else:
            self._refuse(f"{type(message).__name__} out of turn ({self.step.value})")

    def _hello(self, message: wire.Hello) -> None:
        """Step 2: the offer, or a refusal naming both versions."""
        self.peer = f"the new process (pid {message.pid}, shardswitch {message.version})"
        answer = wire.answer_hello(message, self.version, self.settings, self.pairs)
        if isinstance(answer, wire.Refuse):
            self._refuse(answer.reason)
            return
        if not self._send(answer):
            return
        log.info("take-over: %s asked; offered format %d, %d queue pair(s)", self.peer, answer.format, self.pairs)
        self.step = Step.OFFERED
        self.deadline = self.clock() + STEP_DEADLINE

    def _refuse(self, reason: str) -> None:
        """Tell the new process why not, and end."""
        self._send(wire.Refuse(reason[:1024]))
        self.end(f"refused {self.peer}: {reason}")

    def _send(self, message: wire.Offer | wire.Refuse | wire.Abort) -> bool:
        """Send one message; a channel that cannot take it ends the session (False)."""
        try:
            self.channel.send(message)          # the socket is non-blocking: a full channel is an error
        except IpcError as err:
            self.end(f"cannot write to {self.peer} ({err})")
            return False
        return True

    def expire(self, now: float) -> float | None:
        """Give up a step not taken in time; the seconds until the current step's deadline."""
        if not self.open:
            return None
        if now >= self.deadline:
            self._send(wire.Abort(f"no answer within {STEP_DEADLINE:g} s ({self.step.value})"))
            self.end(f"{self.peer} did not go on within {STEP_DEADLINE:g} s ({self.step.value})")
            return None
        return self.deadline - now

    def status(self) -> dict[str, object]:
        """The take-over's entry in ``shardswitch status``."""
        return {"peer": self.peer, "step": self.step.value}

    def end(self, why: str) -> None:
        """Close the channel: this switch serves on, unchanged."""
        if not self.open:
            return
        self.open = False
        self.limiter.warning("takeover-end", "take-over ended, serving on: %s", why)
        try:
            self.sel.unregister(self.channel.sock)
        except (KeyError, ValueError):
            pass
        self.channel.close()
        self.on_end()
