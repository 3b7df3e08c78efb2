"""Prometheus metrics: ``--metrics ADDR:PORT`` and ``shardswitch metrics``.

Theory of operation
-------------------
The figures are those of ``shardswitch status`` and ``shardswitch flows``,
taken when a scrape arrives: :func:`exposition` turns the two answers into
Prometheus' text format with prometheus-client's metric families and encoder
(a collector built per scrape, registered nowhere else), so the metrics never
disagree with the status.  Per queue pair: frames and bytes each way, drops by
reason, events, worker restarts, flows owned, each ring's state, kicks and
interrupts; for the switch: flows by type and state, the flow table's
counters, whether a front-end is connected, refused front-end requests.

The HTTP endpoint (:class:`MetricsServer`) runs in the coordinator's selector
loop, without threads (the coordinator's seccomp filter forbids them): each
client's request is read into a bounded buffer (:data:`MAX_REQUEST`), must be
complete within :data:`DEADLINE` seconds, and the answer is written as the
socket takes it, then the rest of the request is read and dropped until the
client closes (closing with unread bytes would reset the connection and lose
the answer); at most :data:`MAX_CLIENTS` at once, each within its deadline.  ``GET /metrics`` (or
``/``) is answered; anything else gets 404, a malformed request 400.  The
listening socket is bound before the sandbox, like the forwarded ports.
"""

from __future__ import annotations

import logging
import selectors
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector, CollectorRegistry

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
            for ring in worker["rings"]:
                index = str(ring["index"])
                ring_state.add_metric([label, index, ring["state"]], 1)
                kicks.add_metric([label, index], ring["kicks"])
                calls.add_metric([label, index], ring["calls"])
        yield from (frames, nbytes, drops, events, restarts, up, owned, ring_state, kicks, calls)

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


def exposition(status: dict[str, Any], flows: dict[str, Any]) -> bytes:
    """The metrics of a status and a flows answer, in Prometheus' text format."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(status, flows))
    return generate_latest(registry)


class _Client:
    """One HTTP client: its request so far, then its answer."""

    def __init__(self, sock: socket.socket, now: float) -> None:
        """Accepted at ``now``."""
        self.sock = sock
        self.deadline = now + DEADLINE
        self.request = b""
        self.answer = memoryview(b"")


class MetricsServer:
    """The ``--metrics`` HTTP endpoint, served from the coordinator's selector loop."""

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
        self.sel = sel
        self.sock = sock
        self.snapshot = snapshot
        self.clients: dict[int, _Client] = {}
        self.address = sock.getsockname()
        sel.register(sock, selectors.EVENT_READ, self._on_accept)

    def _on_accept(self) -> None:
        """A client connects."""
        try:
            sock, _addr = self.sock.accept()
        except OSError:
            return
        if len(self.clients) >= MAX_CLIENTS:
            sock.close()
            return
        sock.setblocking(False)
        client = _Client(sock, time.monotonic())
        self.clients[sock.fileno()] = client
        self.sel.register(sock, selectors.EVENT_READ, lambda: self._on_read(client))

    def _on_read(self, client: _Client) -> None:
        """More of a request."""
        try:
            data = client.sock.recv(MAX_REQUEST)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._close(client)
            return
        client.request += data
        if b"\r\n\r\n" not in client.request and b"\n\n" not in client.request:
            if len(client.request) >= MAX_REQUEST:
                self._answer(client, 400, b"request too long\n")
            return
        line = client.request.split(b"\n", 1)[0].split()
        if len(line) != 3 or line[0] != b"GET" or not line[2].startswith(b"HTTP/"):
            self._answer(client, 400, b"expected GET /metrics\n")
        elif line[1].split(b"?", 1)[0] not in (b"/metrics", b"/"):
            self._answer(client, 404, b"only /metrics here\n")
        else:
            self._answer(client, 200, exposition(*self.snapshot()), CONTENT_TYPE_LATEST)

    def _answer(self, client: _Client, code: int, body: bytes, content_type: str = "text/plain") -> None:
        """Start writing the answer."""
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found"}[code]
        head = (f"HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n").encode()
        client.answer = memoryview(head + body)
        self.sel.modify(client.sock, selectors.EVENT_WRITE, lambda: self._on_write(client))
        self._on_write(client)

    def _on_write(self, client: _Client) -> None:
        """More of the answer."""
        try:
            sent = client.sock.send(client.answer)
        except BlockingIOError:
            return
        except OSError:
            self._close(client)
            return
        client.answer = client.answer[sent:]
        if not client.answer:
            # Closing with unread request bytes would reset the connection and lose the answer: say we
            # are done, then read what is left until the client closes (or its deadline).
            try:
                client.sock.shutdown(socket.SHUT_WR)
            except OSError:
                self._close(client)
                return
            self.sel.modify(client.sock, selectors.EVENT_READ, lambda: self._on_drain(client))

    def _on_drain(self, client: _Client) -> None:
        """Discard what the client still sends after its answer; close at its end of stream."""
        try:
            if client.sock.recv(MAX_REQUEST):
                return
        except BlockingIOError:
            return
        except OSError:
            pass
        self._close(client)

    def _close(self, client: _Client) -> None:
        """Forget a client."""
        if self.clients.pop(client.sock.fileno(), None) is not None:
            self.sel.unregister(client.sock)
        client.sock.close()

    def expire(self, now: float) -> float | None:
        """Close clients past their deadline; the seconds until the next deadline (None: no client)."""
        for client in list(self.clients.values()):
            if client.deadline <= now:
                self._close(client)
        return min((c.deadline - now for c in self.clients.values()), default=None)

    def close(self) -> None:
        """Close every client and the listening socket."""
        for client in list(self.clients.values()):
            self._close(client)
        self.sel.unregister(self.sock)
        self.sock.close()
