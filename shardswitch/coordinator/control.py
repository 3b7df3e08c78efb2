"""The control socket: ``shardswitch status`` and friends.

A unix stream socket beside the vhost-user socket (``<socket>.ctl`` by
default).  A client sends one JSON line ``{"cmd": "status"}`` and reads one
JSON line back; the coordinator answers from its main loop and closes the
connection.  Answers are plain JSON so that scripts can use ``--json``.  A
request may carry descriptors (SCM_RIGHTS, at most :data:`MAX_FDS`: the files
of ``shardswitch capture start``, which the client opens with its own rights);
they go to the commands that take them and are closed otherwise.
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any, Callable

#: Longest request line accepted.
MAX_REQUEST = 4096
#: How long a client may take to send its request line.
REQUEST_DEADLINE = 1.0
#: Most descriptors one request may carry.
MAX_FDS = 2
#: A command: the request's fields and the descriptors it carried (owned by the command) to an answer.
FdCommand = Callable[[dict[str, Any], list[int]], dict[str, Any]]


class ControlError(Exception):
    """The control socket could not be reached, or it answered with an error."""


def serve_client(sock: socket.socket, commands: dict[str, Callable[[], dict[str, Any]]],
                 fd_commands: dict[str, FdCommand] | None = None) -> None:
    """Read one request from an accepted client, answer it, close the connection."""
    fds: list[int] = []
    fd_commands = fd_commands or {}
    try:
        sock.settimeout(REQUEST_DEADLINE)
        data = b""
        while b"\n" not in data and len(data) < MAX_REQUEST:
            chunk, got, _flags, _addr = socket.recv_fds(sock, MAX_REQUEST, MAX_FDS)
            fds += got
            if not chunk:
                break
            data += chunk
        try:
            request = json.loads(data.split(b"\n", 1)[0] or b"{}")
            name = request["cmd"]
            if name not in commands and name not in fd_commands:
                raise KeyError(name)
        except (ValueError, KeyError, TypeError):
            known = sorted([*commands, *fd_commands])
            answer: dict[str, Any] = {"error": f"bad request {data[:100]!r}; commands: {known}"}
        else:
            if name in fd_commands:
                given, fds = fds, []
                answer = fd_commands[name](request, given)
            else:
                answer = commands[name]()
        sock.sendall(json.dumps(answer).encode() + b"\n")
    except OSError:
        pass
    finally:
        for fd in fds:
            os.close(fd)
        sock.close()


def query(path: str, cmd: str, timeout: float = 10.0, args: dict[str, Any] | None = None,
          fds: list[int] | tuple[int, ...] = ()) -> dict[str, Any]:
    """Send ``cmd`` (with ``args`` and the descriptors ``fds``) to the control socket at ``path`` and return
    the decoded answer."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(path)
            request = json.dumps({**(args or {}), "cmd": cmd}).encode() + b"\n"
            if fds:
                socket.send_fds(sock, [request], list(fds))      # one short line: sent whole
            else:
                sock.sendall(request)
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
    except OSError as err:
        raise ControlError(f"cannot reach shardswitch at {path}: {err.strerror or err}") from err
    try:
        answer = json.loads(data)
    except ValueError as err:
        raise ControlError(f"unreadable answer from {path}") from err
    if not isinstance(answer, dict):
        raise ControlError(f"unexpected answer from {path}")
    if "error" in answer:
        raise ControlError(str(answer["error"]))
    return answer


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
                 if sandbox.get("enabled") else "sandbox: off (--no-sandbox)")
    lines.append(f"guest: {status.get('guest', {}).get('address')}/{status.get('guest', {}).get('prefix_len')} "
                 f"gateway {status.get('guest', {}).get('gateway')} mtu {status.get('guest', {}).get('mtu')}")
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
    """Render a flows answer for people: one line per flow."""
    flows = answer.get("flows", [])
    lines = [f"{len(flows)} flow(s), table capacity {answer.get('capacity', '?')}"]
    for f in flows:
        sides = " | ".join(_side(side) for side in f.get("sides", []))
        lines.append(f"{f['index']:>6} {f['type']:<6} {f['state']:<7} worker {f['owner']:<2} "
                     f"age {_age(f.get('age', 0.0)):>5}  {sides}")
    return "\n".join(lines)


def uptime_since(started: float) -> float:
    """Seconds since ``started`` (a time.monotonic() value)."""
    return time.monotonic() - started
