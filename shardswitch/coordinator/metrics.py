"""Prometheus metrics: ``--metrics ADDR:PORT`` and ``shardswitch metrics``.

Theory of operation
-------------------
The figures are those of ``shardswitch status`` and ``shardswitch flows``,
taken when a scrape arrives: :func:`exposition` turns the two answers into
Prometheus' text format with prometheus-client's metric families and encoder
(a collector built per scrape, registered nowhere else), so the metrics never
disagree with the status.  Per queue pair: frames and bytes each way, drops by
reason, events, worker restarts, flows owned, each ring's state, kicks and
interrupts, listening sockets of forwarded ports; for the switch: flows by
type and state, the flow table's counters, whether a front-end is
connected, refused front-end requests, forwarding rules and their ports by
protocol, and the rule changes made at run time.

The HTTP endpoint (:class:`MetricsServer`) runs in the coordinator's selector
loop, without threads, as the control socket does (:mod:`.streams`): each
client's request is read into a bounded buffer (:data:`MAX_REQUEST`), must be
complete within :data:`DEADLINE` seconds, and the answer is written as the
socket takes it, then the rest of the request is read and dropped until the
client closes; at most :data:`MAX_CLIENTS` at once (one more is closed at
once), each within its deadline.  ``GET /metrics`` (or ``/``) is answered;
anything else gets 404, a malformed request 400.  The listening socket is
bound before the sandbox, like the forwarded ports.
"""

from __future__ import annotations

import logging
import selectors
import socket
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector, CollectorRegistry

from shardswitch.coordinator.streams import Drop, Limits, StreamClient, StreamService
from shardswitch.settings import parse_listen

log = logging.getLogger("shardswitch")

#: Longest request accepted, and how long a client may take to send it.
MAX_REQUEST = 8192
DEADLINE = 2.0
#: Clients served at once (more are closed at once).
MAX_CLIENTS = 8


class _Snapshot(Collector):
    """The metrics of one status and flows answer."""

    def __init__(self, status: dict[str, Any], flows: dict[str, Any]) -> None:
        """Take the two answers."""
        self.status = status
        self.flows = flows

    def collect(self) -> Iterator[Metric]:
        """Every metric family."""
        status = self.status
        info = GaugeMetricFamily("shardswitch_info", "Version and mode", labels=["version", "mode"])
        info.add_metric([str(status["version"]), str(status["mode"])], 1)
        yield info
        yield GaugeMetricFamily("shardswitch_uptime_seconds", "Seconds since start", value=status["uptime"])
        yield GaugeMetricFamily("shardswitch_frontend_connected", "1 while a front-end is connected",
                                value=int(status["frontend"]["connected"]))
        refused = CounterMetricFamily("shardswitch_frontend_refused", "Front-end requests refused, by request",
                                      labels=["request"])
        for request, count in sorted(status["frontend"]["refused"].items()):
            refused.add_metric([request], count)
        yield refused
        yield from _forwarding(status.get("forwarding"))
        yield from self._workers(status["workers"])
        yield from self._flows()

    @staticmethod
    def _workers(workers: list[dict[str, Any]]) -> Iterator[Metric]:
        """Per queue pair: traffic, drops, events, restarts, rings."""
        pair = ["pair"]
        frames = CounterMetricFamily("shardswitch_frames", "Frames (tx: from the guest, rx: to the guest)",
                                     labels=pair + ["direction"])
        nbytes = CounterMetricFamily("shardswitch_bytes", "Bytes of frames (tx: from the guest, rx: to it)",
                                     labels=pair + ["direction"])
        drops = CounterMetricFamily("shardswitch_drops", "Frames dropped, by reason", labels=pair + ["reason"])
        events = CounterMetricFamily("shardswitch_events", "Events that lost no frame", labels=pair + ["event"])
        restarts = CounterMetricFamily("shardswitch_worker_restarts", "Worker processes replaced", labels=pair)
        up = GaugeMetricFamily("shardswitch_worker_up", "1 when the worker answered this scrape", labels=pair)
        owned = GaugeMetricFamily("shardswitch_worker_flows", "Flows the worker owns", labels=pair)
        ring_state = GaugeMetricFamily("shardswitch_ring_state", "1 for the ring's current state",
                                       labels=pair + ["ring", "state"])
        kicks = CounterMetricFamily("shardswitch_ring_kicks", "Kicks from the guest", labels=pair + ["ring"])
        calls = CounterMetricFamily("shardswitch_ring_interrupts", "Interrupts to the guest",
                                    labels=pair + ["ring"])
        listening = GaugeMetricFamily("shardswitch_worker_listeners", "Listening sockets of forwarded ports",
                                      labels=pair + ["kind"])
        for worker in workers:
            label = str(worker["pair"])
            restarts.add_metric([label], worker["restarts"])
            up.add_metric([label], int(worker.get("answered", False)))
            if not worker.get("answered"):
                continue
            for direction in ("tx", "rx"):
                frames.add_metric([label, direction], worker[f"{direction}_frames"])
                nbytes.add_metric([label, direction], worker[f"{direction}_bytes"])
            for reason, count in sorted(worker["drops"].items()):
                drops.add_metric([label, reason], count)
            for event, count in sorted(worker["events"].items()):
                events.add_metric([label, event], count)
            owned.add_metric([label], worker["flows"])
            for kind, count in sorted(worker.get("listeners", {}).items()):
                listening.add_metric([label, kind], count)
            for ring in worker["rings"]:
                index = str(ring["index"])
                ring_state.add_metric([label, index, ring["state"]], 1)
                kicks.add_metric([label, index], ring["kicks"])
                calls.add_metric([label, index], ring["calls"])
        yield from (frames, nbytes, drops, events, restarts, up, owned, ring_state, kicks, calls, listening)

    def _flows(self) -> Iterator[Metric]:
        """Flows by type and state, and the flow table's own counters."""
        by_kind = Counter((flow["type"], flow["state"]) for flow in self.flows["flows"])
        flows = GaugeMetricFamily("shardswitch_flows", "Live flows, by type and state", labels=["type", "state"])
        for (kind, state), count in sorted(by_kind.items()):
            flows.add_metric([kind, state], count)
        yield flows
        table = self.status["flow_table"]
        yield GaugeMetricFamily("shardswitch_flow_table_capacity", "Flows the table can hold",
                                value=table["capacity"])
        counters = GaugeMetricFamily("shardswitch_flow_table", "The flow table's counters", labels=["counter"])
        for name, value in sorted(table.items()):
            if isinstance(value, int) and name != "capacity":
                counters.add_metric([name], value)
        yield counters


def _forwarding(fwd: dict[str, Any] | None) -> Iterator[Metric]:
    """Forwarding rules and ports by protocol, and the run-time changes (nothing when the status has none)."""
    if not fwd:
        return
    rules = GaugeMetricFamily("shardswitch_forward_rules", "Port forwarding rules in force", labels=["proto"])
    ports = GaugeMetricFamily("shardswitch_forward_ports", "Host ports forwarded", labels=["proto"])
    for proto in ("tcp", "udp"):
        rules.add_metric([proto], fwd["rules"].get(proto, 0))
        ports.add_metric([proto], fwd["ports"].get(proto, 0))
    changes = CounterMetricFamily("shardswitch_forward_changes", "Forwarding rules added, removed, and "
                                  "requests refused, at run time", labels=["change"])
    for change, count in sorted(fwd["changes"].items()):
        changes.add_metric([change], count)
    yield from (rules, ports, changes)


def exposition(status: dict[str, Any], flows: dict[str, Any]) -> bytes:
    """The metrics of a status and a flows answer, in Prometheus' text format."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(status, flows))
    return generate_latest(registry)


class MetricsServer:
    """The ``--metrics`` HTTP endpoint, served from the coordinator's selector loop (:mod:`.streams`)."""

    def __init__(self, sel: selectors.BaseSelector, listen: str,
                 snapshot: Callable[[], tuple[dict[str, Any], dict[str, Any]]]) -> None:
        """Bind and listen on ``listen`` (ADDR:PORT; OSError or ValueError when it cannot); ``snapshot``
        gives the status and flows answers of a scrape."""
        host, port = parse_listen(listen)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(MAX_CLIENTS)
        except OSError:
            sock.close()
            raise
        self.snapshot = snapshot
        self.address = sock.getsockname()
        self.stream = StreamService(sel, sock, Limits(MAX_CLIENTS, MAX_REQUEST, DEADLINE), self)

    def admit(self, client: StreamClient) -> bytes | None:
        """Anybody who can reach the address may scrape."""
        return None

    def respond(self, client: StreamClient) -> bytes | None:
        """The answer once the request's head is complete."""
        request = bytes(client.request)
        if b"\r\n\r\n" not in request and b"\n\n" not in request:
            return None
        line = request.split(b"\n", 1)[0].split()
        if len(line) != 3 or line[0] != b"GET" or not line[2].startswith(b"HTTP/"):
            return _http(400, b"expected GET /metrics\n")
        if line[1].split(b"?", 1)[0] not in (b"/metrics", b"/"):
            return _http(404, b"only /metrics here\n")
        return _http(200, exposition(*self.snapshot()), CONTENT_TYPE_LATEST)

    def overflow(self, client: StreamClient) -> bytes:
        """A request head longer than MAX_REQUEST."""
        return _http(400, b"request too long\n")

    def dropped(self, client: StreamClient, reason: Drop) -> bytes:
        """Busy or too slow: closed without an answer."""
        return b""

    def expire(self, now: float) -> float | None:
        """Close clients past their deadline; the seconds until the next deadline (None: no client)."""
        return self.stream.expire(now)

    def close(self) -> None:
        """Close every client and the listening socket."""
        self.stream.close()


def _http(code: int, body: bytes, content_type: str = "text/plain") -> bytes:
    """A whole HTTP/1.1 answer that closes the connection."""
    reason = {200: "OK", 400: "Bad Request", 404: "Not Found"}[code]
    head = (f"HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n").encode()
    return head + body
