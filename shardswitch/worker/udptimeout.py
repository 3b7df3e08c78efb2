"""UDP flow timeouts as passt's: the host's conntrack UDP timeouts and the rule that picks one per flow.

Theory of operation.  UDP has no end of connection, so a flow ends when it
has been idle for a while.  passt (``udp.c`` ``udp_get_timeout_params``,
``udp_flow.c`` ``udp_flow_timer``) takes the two timeouts the host's
connection tracking uses for UDP:

* ``/proc/sys/net/netfilter/nf_conntrack_udp_timeout`` (default 30 s): the
  timeout of a flow that does not look like a stream - one way only, or one
  datagram and one reply (a DNS lookup);
* ``nf_conntrack_udp_timeout_stream`` (default 120 s): the timeout of a flow
  whose target side has sent something and where either side has sent more
  than one datagram.

:func:`read_timeouts` reads both once, in the coordinator before it enters
its sandbox (the values of the coordinator's network namespace); every
worker, a replacement too, is forked with them
(:attr:`shardswitch.ipc.WorkerSetup.udp_timeouts`).  A file that cannot be
read, is empty or does not hold a decimal integer gives passt's default; unlike
passt, a value outside :attr:`Bound.MIN` .. :attr:`Bound.MAX` seconds is
clamped into that range (passt would take 0 or a negative value as it is, and
close every flow at its first timer run).  What is used is logged at debug
level.

Each flow counts the datagrams of each side, saturating at
:data:`ACTIVITY_MAX` (passt's ``uint8_t activity[SIDES]``); :func:`choose`
is passt's rule over those counts, a pure function.
"""

from __future__ import annotations

import logging
import os
import re
from enum import IntEnum

import msgspec

log = logging.getLogger("shardswitch")

#: Where the host keeps its conntrack settings.
NETFILTER_SYSCTLS = "/proc/sys/net/netfilter"
#: The two settings read (file names under :data:`NETFILTER_SYSCTLS`).
TIMEOUT_FILE = "nf_conntrack_udp_timeout"
STREAM_FILE = "nf_conntrack_udp_timeout_stream"
#: Largest count of datagrams kept per side (passt's counters are one byte).
ACTIVITY_MAX = 255
#: Most bytes of a setting's file read (passt reads a BUFSIZ buffer).
READ_MAX = 64
#: A setting's text as passt's strtoimax() takes it: optional blanks and sign, digits, at most a newline.
_INTEGER = re.compile(rb"[ \t\n\v\f\r]*([+-]?[0-9]+)\n?")


class Default(IntEnum):
    """passt's timeouts, seconds, when the host's settings cannot be read (UDP_TIMEOUT*_DEFAULT)."""

    TIMEOUT = 30
    STREAM = 120


class Bound(IntEnum):
    """The range a timeout read from the host is clamped into, seconds."""

    MIN = 1
    MAX = 86400


class UdpTimeouts(msgspec.Struct, frozen=True):
    """The two idle timeouts of UDP flows, seconds (passt's ``c->udp.timeout`` and ``stream_timeout``)."""

    timeout: int = Default.TIMEOUT.value
    stream: int = Default.STREAM.value


def choose(timeouts: UdpTimeouts, initiator: int, target: int) -> int:
    """The idle timeout of a flow whose initiating side sent ``initiator`` datagrams and whose target side sent
    ``target``: the stream timeout once the target answered and either side sent more than one, else the plain
    one (passt's udp_flow_timer)."""
    if target and (initiator > 1 or target > 1):
        return timeouts.stream
    return timeouts.timeout


def parse_seconds(text: bytes) -> int | None:
    """The integer a setting's file holds, or None when it holds none (empty, not a decimal integer, or
    something after it but a newline)."""
    match = _INTEGER.fullmatch(text)
    return int(match.group(1)) if match else None


def clamp(seconds: int) -> int:
    """``seconds`` within :attr:`Bound.MIN` .. :attr:`Bound.MAX`."""
    return min(max(seconds, Bound.MIN.value), Bound.MAX.value)


def read_setting(path: str, default: int) -> int:
    """The timeout in the file ``path``, clamped; ``default`` when it cannot be read or holds no integer (each
    case logged at debug level)."""
    try:
        with open(path, "rb") as f:
            text = f.read(READ_MAX + 1)
    except OSError as err:
        log.debug("cannot read %s (%s): using %d", path, err.strerror or err, default)
        return default
    value = parse_seconds(text) if len(text) <= READ_MAX else None
    if value is None:
        log.debug("no integer in %s (%r): using %d", path, text[:READ_MAX], default)
        return default
    used = clamp(value)
    if used != value:
        log.debug("%s holds %d, outside %d..%d: using %d", path, value, Bound.MIN, Bound.MAX, used)
    return used


def read_timeouts(folder: str = NETFILTER_SYSCTLS) -> UdpTimeouts:
    """The host's UDP timeouts from ``folder`` (the conntrack sysctls), passt's defaults where unreadable."""
    timeouts = UdpTimeouts(read_setting(os.path.join(folder, TIMEOUT_FILE), Default.TIMEOUT.value),
                           read_setting(os.path.join(folder, STREAM_FILE), Default.STREAM.value))
    log.debug("UDP flow timeouts: %d s, %d s for streams", timeouts.timeout, timeouts.stream)
    return timeouts
