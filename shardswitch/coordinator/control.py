"""The control socket: ``shardswitch status`` and friends.

A unix stream socket beside the vhost-user socket (``<socket>.ctl`` by
default).  A client sends one JSON line ``{"cmd": "status"}`` and reads one
JSON line back; the coordinator answers from its main loop and closes the
connection.  Answers are plain JSON so that scripts can use ``--json``.  A
request may carry descriptors (SCM_RIGHTS, at most :data:`MAX_FDS`: the files
of ``shardswitch capture start``, which the client opens with its own rights);
they go to the commands that take them and are closed otherwise.

:class:`ControlServer` serves each client inside the coordinator's loop
(:mod:`.streams`): a client that dribbles its request holds nobody else, a
front-end's handshake nor the watchdog.  Each client has :data:`DEADLINE`
seconds from its connection for its request (at most :data:`MAX_REQUEST`
bytes) and the answer; at most :data:`MAX_CLIENTS` at once.  Only root, the
switch's own user and ``--control-group`` are served (:mod:`.access`).  A
client refused (not allowed, busy, too slow, too long) gets a one-line error
answer where its socket takes it, is counted (``shardswitch status``) and
logged, at most a few lines per 10 s (:mod:`shardswitch.loglimit`).
"""

from __future__ import annotations

import json
import logging
import os
import selectors
import socket
import time
from collections import Counter
from typing import Any, Callable

from shardswitch.coordinator.access import AccessPolicy, Peer, peer_of
from shardswitch.coordinator.streams import Drop, Limits, StreamClient, StreamService
from shardswitch.loglimit import LogLimiter
from shardswitch.sandbox.hostpids import host_view

log = logging.getLogger("shardswitch")

#: Longest request line accepted.
MAX_REQUEST = 4096
#: Seconds a client has, from its connection, to send its request and take the answer.
DEADLINE = 5.0
#: Clients served at once; one more is refused with an error answer.
MAX_CLIENTS = 8
#: Most descriptors one request may carry.
MAX_FDS = 2
#: A command: the request's fields and the descriptors it carried (owned by the command) to an answer.
FdCommand = Callable[[dict[str, Any], list[int]], dict[str, Any]]


class ControlError(Exception):
    """The control socket could not be reached, or it answered with an error."""


class ControlRefused(ControlError):
    """The switch answered with an error (not allowed, busy, a bad request...): it runs."""


def _line(answer: dict[str, Any]) -> bytes:
    """An answer as the JSON line sent."""
    return json.dumps(answer).encode() + b"\n"


class ControlServer:
    """The control socket's clients, served from the coordinator's selector loop."""

    def __init__(self, sel: selectors.BaseSelector, sock: socket.socket, access: AccessPolicy,
                 commands: dict[str, Callable[[], dict[str, Any]]], fd_commands: dict[str, FdCommand],
                 owner_commands: frozenset[str] = frozenset()) -> None:
        """Serve the listening ``sock`` in ``sel``: ``commands`` answer requests, ``fd_commands`` requests
        with descriptors; ``access`` says who may ask, and only root and the switch's own user may use the
        ``owner_commands`` (a take-over)."""
        self.access = access
        self.commands = commands
        self.fd_commands = fd_commands
        self.owner_commands = owner_commands
        #: Clients refused or dropped, by reason (``shardswitch status``).
        self.refused: Counter[str] = Counter()
        self.limiter = LogLimiter(log)
        self.stream = StreamService(sel, sock, Limits(MAX_CLIENTS, MAX_REQUEST, DEADLINE, MAX_FDS), self)

    def admit(self, client: StreamClient) -> bytes | None:
        """Serve a peer that :class:`~shardswitch.coordinator.access.AccessPolicy` allows; refuse others."""
        try:
            peer = peer_of(client.sock)
        except OSError as err:
            self.refused["not_allowed"] += 1
            self.limiter.warning("control-peer", "control socket: refused a client without credentials (%s)", err)
            return b""
        client.label = str(peer)
        client.peer = peer
        if self.access.allows(peer):
            return None
        self.refused["not_allowed"] += 1
        self.limiter.warning("control-peer", "control socket: refused %s (allowed: %s)", peer,
                             self.access.describe())
        return _line({"error": f"not allowed: uid {peer.uid}"})

    def respond(self, client: StreamClient) -> bytes | None:
        """The answer to a complete request line."""
        line, newline, _rest = bytes(client.request).partition(b"\n")
        if not newline:
            return None
        known = sorted([*self.commands, *self.fd_commands])
        try:
            request = json.loads(line or b"{}")
            name = request["cmd"]
            if name not in self.commands and name not in self.fd_commands:
                raise KeyError(name)
        except (ValueError, KeyError, TypeError, RecursionError):
            return _line({"error": f"bad request {line[:100]!r}; commands: {known}"})
        if client.too_many_fds:
            return _line({"error": f"a request carries at most {MAX_FDS} descriptors"})
        if name in self.owner_commands and not (isinstance(client.peer, Peer) and self.access.owns(client.peer)):
            self.refused["not_owner"] += 1
            self.limiter.warning("control-owner", "control socket: refused %s %r: only root and uid %d may",
                                 client.label, name, os.geteuid())
            return _line({"error": f"not allowed: only root and uid {os.geteuid()} may {name}"})
        if name in self.fd_commands:
            given, client.fds = client.fds, []
            return _line(self.fd_commands[name](request, given))
        return _line(self.commands[name]())

    def overflow(self, client: StreamClient) -> bytes:
        """A request line longer than MAX_REQUEST."""
        self.refused["too_long"] += 1
        self.limiter.warning("control-long", "control socket: %s sent more than %d bytes without a request line",
                             client.label, MAX_REQUEST)
        return _line({"error": f"request longer than {MAX_REQUEST} bytes"})

    def dropped(self, client: StreamClient, reason: Drop) -> bytes:
        """Count and log a client let go; its error answer."""
        self.refused[reason.name.lower()] += 1
        if reason == Drop.BUSY:
            self.limiter.warning("control-busy", "control socket: refused %s: %d clients already served",
                                 client.label, MAX_CLIENTS)
            return _line({"error": f"busy: {MAX_CLIENTS} control clients at once; try again"})
        self.limiter.warning("control-deadline", "control socket: dropped %s: no complete request within %g s",
                             client.label, DEADLINE)
        return _line({"error": f"no complete request within {DEADLINE:g} s"})

    def expire(self, now: float) -> float | None:
        """Drop clients past their deadline; the seconds until the next deadline (None: no client)."""
        self.limiter.flush()
        return self.stream.expire(now)

    def status(self) -> dict[str, Any]:
        """Clients served now, those refused so far by reason, and the control group."""
        return {"clients": len(self.stream.clients), "refused": dict(self.refused), "group": self.access.group}

    def close(self) -> None:
        """Close every client and the listening socket."""
        self.stream.close()


def _connect(sock: socket.socket, path: str, timeout: float) -> None:
    """Connect ``sock`` to ``path``, waiting up to ``timeout`` while the switch's queue of connections
    waiting to be accepted is full (EAGAIN)."""
    give_up = time.monotonic() + timeout
    while True:
        try:
            sock.connect(path)
            return
        except BlockingIOError:
            if time.monotonic() >= give_up:
                raise
            time.sleep(0.01)


def query(path: str, cmd: str, timeout: float = 10.0, args: dict[str, Any] | None = None,
          fds: list[int] | tuple[int, ...] = ()) -> dict[str, Any]:
    """Send ``cmd`` (with ``args`` and the descriptors ``fds``) to the control socket at ``path`` and return
    the decoded answer."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            _connect(sock, path, timeout)
            request = json.dumps({**(args or {}), "cmd": cmd}).encode() + b"\n"
            try:
                if fds:
                    socket.send_fds(sock, [request], list(fds))      # one short line: sent whole
                else:
                    sock.sendall(request)
            except (BrokenPipeError, ConnectionResetError):
                pass                           # refused at once (not allowed, busy): its answer may wait
            data = b""
            while not data.endswith(b"\n"):
                try:
                    chunk = sock.recv(65536)
                except ConnectionResetError:
                    break
                if not chunk:
                    break
                data += chunk
    except OSError as err:
        raise ControlError(f"cannot reach shardswitch at {path}: {err.strerror or err}") from err
    if not data:
        raise ControlError(f"shardswitch at {path} closed the connection without an answer")
    try:
        answer = json.loads(data)
    except ValueError as err:
        raise ControlError(f"unreadable answer from {path}") from err
    if not isinstance(answer, dict):
        raise ControlError(f"unexpected answer from {path}")
    if "error" in answer:
        raise ControlRefused(str(answer["error"]))
    return host_view(answer) if cmd == "status" else answer      # PIDs as this host sees them


def _age(seconds: float) -> str:
    """A short human duration."""
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def format_status(status: dict[str, Any]) -> str:
    """Render a status answer for people."""
    lines = [f"shardswitch {status.get('version', '?')}, pid {status.get('pid')}, "
             f"up {_age(status.get('uptime', 0.0))}",
             f"socket: {status.get('socket')}"]
    fe = status.get("frontend", {})
    if fe.get("connected"):
        lines.append(f"front-end: connected; features {fe.get('features', 0):#x} "
                     f"({', '.join(fe.get('feature_names', [])) or 'none'}); "
                     f"protocol features {fe.get('protocol_features', 0):#x}")
    else:
        lines.append("front-end: not connected")
    if fe.get("refused"):
        lines.append("refused requests: " + ", ".join(f"{k} {v}" for k, v in sorted(fe["refused"].items())))
    sandbox = status.get("sandbox", {})
    lines.append(f"sandbox: uid {sandbox.get('uid')}, gid {sandbox.get('gid')}, no capabilities, seccomp"
                 + ("" if sandbox.get("seccomp", "kill") == "kill" else f" ({sandbox['seccomp']})")
                 + (", PID namespace" if sandbox.get("pid_namespace") else "")
                 if sandbox.get("enabled") else "sandbox: off (--no-sandbox)")
    lines.append(f"guest: {status.get('guest', {}).get('address')}/{status.get('guest', {}).get('prefix_len')} "
                 f"gateway {status.get('guest', {}).get('gateway')} mtu {status.get('guest', {}).get('mtu')}")
    fwd = status.get("forwarding")
    if fwd:
        rules, ports, changes = fwd.get("rules", {}), fwd.get("ports", {}), fwd.get("changes", {})
        lines.append(f"forwarding: TCP {rules.get('tcp', 0)} rule(s), {ports.get('tcp', 0)} port(s); "
                     f"UDP {rules.get('udp', 0)} rule(s), {ports.get('udp', 0)} port(s); "
                     f"{fwd.get('runtime_rules', 0)} added at run time (shardswitch forward list); changes: "
                     + ", ".join(f"{k} {v}" for k, v in sorted(changes.items())))
    for w in status.get("workers", []):
        head = f"worker {w['pair']}: pid {w.get('pid')}"
        if w.get("restarts"):
            head += f", restarted {w['restarts']}x (last: {w.get('last_exit')})"
        if not w.get("answered", True):
            head += ", not answering"
        lines.append(head)
        for r in w.get("rings", []):
            kind = "rx" if r["index"] % 2 == 0 else "tx"
            line = (f"  vring {r['index']} ({kind}): {r['state']}, size {r['num']}, avail {r['last_avail']}, "
                    f"used {r['used_idx']}, kicks {r['kicks']}, calls {r['calls']}")
            if r.get("error"):
                line += f", error: {r['error']}"
            lines.append(line)
        lines.append(f"  from guest: {w.get('tx_frames', 0)} frames, {w.get('tx_bytes', 0)} bytes; "
                     f"to guest: {w.get('rx_frames', 0)} frames, {w.get('rx_bytes', 0)} bytes")
        lines.append(f"  flows owned: {w.get('flows', 0)}; frames handed to their flow's owner: "
                     f"{w.get('handed_out', 0)}, taken from other workers: {w.get('handed_in', 0)}")
        if w.get("listeners"):
            lines.append("  listening sockets of forwarded ports: "
                         + ", ".join(f"{k} {v}" for k, v in sorted(w["listeners"].items())))
        for label, key in (("dropped", "drops"), ("events", "events")):
            counts = w.get(key) or {}
            if counts:
                lines.append(f"  {label}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return "\n".join(lines)


def _rate(value: float, unit: str) -> str:
    """A per-second rate with a k/M/G prefix."""
    for factor, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= factor:
            return f"{value / factor:.1f} {prefix}{unit}/s"
    return f"{value:.0f} {unit}/s"


def format_rates(before: dict[str, Any], after: dict[str, Any], seconds: float) -> str:
    """``shardswitch status --watch``: per queue pair, frames, bits and drops per second between two status
    answers ``seconds`` apart, then the totals and the flows."""
    seconds = max(seconds, 1e-6)
    old = {w["pair"]: w for w in before.get("workers", [])}
    lines = [f"shardswitch {after.get('version', '?')}, pid {after.get('pid')}, up {_age(after.get('uptime', 0.0))}"
             f"; front-end {'connected' if after.get('frontend', {}).get('connected') else 'not connected'}",
             f"{'pair':>4} {'from guest':>26} {'to guest':>26} {'drops':>10} {'flows':>7}  rings"]
    totals = [0.0, 0.0, 0.0, 0.0, 0.0]
    for w in after.get("workers", []):
        prev = old.get(w["pair"], {})
        delta = [(w.get(key, 0) - prev.get(key, 0)) / seconds
                 for key in ("tx_frames", "tx_bytes", "rx_frames", "rx_bytes")]
        drops = (sum((w.get("drops") or {}).values()) - sum((prev.get("drops") or {}).values())) / seconds
        totals = [t + d for t, d in zip(totals, [*delta, drops])]
        rings = ",".join(r["state"] for r in w.get("rings", [])) or "-"
        lines.append(f"{w['pair']:>4} {_rate(delta[0], 'f'):>12} {_rate(delta[1] * 8, 'b'):>13} "
                     f"{_rate(delta[2], 'f'):>12} {_rate(delta[3] * 8, 'b'):>13} {_rate(drops, 'f'):>10} "
                     f"{w.get('flows', 0):>7}  {rings}" + ("" if w.get("answered", True) else "  not answering"))
    lines.append(f" all {_rate(totals[0], 'f'):>12} {_rate(totals[1] * 8, 'b'):>13} {_rate(totals[2], 'f'):>12} "
                 f"{_rate(totals[3] * 8, 'b'):>13} {_rate(totals[4], 'f'):>10} "
                 f"{sum(w.get('flows', 0) for w in after.get('workers', [])):>7}")
    return "\n".join(lines)


def _side(side: dict[str, Any]) -> str:
    """One flow side as ``pif ep_addr:ep_port -> our_addr:our_port``."""
    def end(addr: str, port: int) -> str:
        return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"
    return f"{side['pif']} {end(side['ep_addr'], side['ep_port'])} > {end(side['our_addr'], side['our_port'])}"


def format_flows(answer: dict[str, Any]) -> str:
    """Render a flows answer for people: one line per flow (``timeout``: the idle timeout it is under, UDP)."""
    flows = answer.get("flows", [])
    lines = [f"{len(flows)} flow(s), table capacity {answer.get('capacity', '?')}"]
    for f in flows:
        sides = " | ".join(_side(side) for side in f.get("sides", []))
        timeout = f"timeout {str(f['timeout']) + 's':<6} " if f.get("timeout") else ""
        lines.append(f"{f['index']:>6} {f['type']:<6} {f['state']:<7} worker {f['owner']:<2} "
                     f"age {_age(f.get('age', 0.0)):>5}  {timeout}{sides}")
    return "\n".join(lines)


def uptime_since(started: float) -> float:
    """Seconds since ``started`` (a time.monotonic() value)."""
    return time.monotonic() - started
