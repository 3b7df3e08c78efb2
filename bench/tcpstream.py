"""Host-socket TCP streams through the workers, one flow per queue pair, driven by our Python front-end.

Theory of operation
-------------------
What a worker costs per byte of TCP, without QEMU: a fresh shardswitch in a
network namespace of the benchmark's own (:class:`~tests.guest.netns.TestNetns`)
with ``workers`` workers and ``-m 65520``, and for each queue pair a host
peer on the namespace's loopback (a process of its own: it reads and
discards, or writes zeros, as fast as the socket goes).  The parent
negotiates what a Linux guest negotiates (VERSION_1, EVENT_IDX, MRG_RXBUF,
CSUM, GUEST_CSUM, HOST_TSO4, GUEST_TSO4, INDIRECT_DESC), then forks one
driver process per pair (guest memory and eventfds are inherited, as in
:mod:`bench.frames`).  Each driver plays a guest's TCP endpoint to the
gateway address, which the switch maps to the host's loopback:

* ``up`` (guest -> host): 64 KB TSO frames (NEEDS_CSUM, gso_type TCPV4,
  header and payload in separate descriptors of at most 4 KiB, through an
  indirect table, as Linux's virtio-net sends them), as many as the
  switch's window allows; the ACKs it sends back advance the window;
* ``down`` (host -> guest): 4 KiB mergeable RX buffers, as a Linux guest
  posts them; every batch of data frames is ACKed with a window of 8 MiB.

Once every driver says its flow is connected, the parent sends them the
same two monotonic-clock marks (warm-up, then ``seconds``) and every process
works to them.  At each mark the parent reads each worker's CPU time from
``/proc`` and its byte counters from ``status``; each driver counts the
payload bytes acknowledged (up) or received in order (down).  The figures
per case: throughput in total and per pair, each worker's CPU seconds per GB
it moved, and the drivers' CPU share (a driver near 100 % means the driver
limited the rate).  On a small machine the drivers, the host peers and the
workers share the cores: the figures say how many the machine has.
"""

from __future__ import annotations

import json
import os
import select
import socket
import struct
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from shardswitch.frontend.client import BASE_FEATURES, FrontendError, VhostUserFrontend
from shardswitch.net import ipv4, tcp
from shardswitch.net.tcp import Addressing, TcpFlag
from shardswitch.vhost.wire import VirtioFeature
from shardswitch.virtio.netdev import VNET_HDR, GsoType, VnetHdrFlags
from tests.guest.netns import TestNetns, stop_process
from tests.switch import DEFAULT_ADDRESSING, Switch

from bench.frames import BenchError, collect_reports, cpu_seconds, sleep_until

GUEST_MAC = bytes.fromhex("525400123456")
SWITCH_MAC = bytes.fromhex("9a559a559a55")
#: The guest's and the gateway's addresses: those of DEFAULT_ADDRESSING (the gateway maps to the host's loopback).
GUEST_IP = DEFAULT_ADDRESSING[DEFAULT_ADDRESSING.index("-a") + 1]
GATEWAY_IP = DEFAULT_ADDRESSING[DEFAULT_ADDRESSING.index("-g") + 1]
MTU = 65520
PORT = 5301
#: TCP payload per TSO frame from the driver (a 64 KiB IPv4 packet at most).
TSO_PAYLOAD = 65000
RX_BUF = 4096
RING = 256
WSCALE = 7
FEATURES = (int(BASE_FEATURES) | VirtioFeature.EVENT_IDX | VirtioFeature.MRG_RXBUF | VirtioFeature.CSUM
            | VirtioFeature.GUEST_CSUM | VirtioFeature.HOST_TSO4 | VirtioFeature.GUEST_TSO4)
SYN, ACK, PSH = int(TcpFlag.SYN), int(TcpFlag.ACK), int(TcpFlag.PSH)
START_DELAY = 0.2
#: Longest wait for the drivers' connections (seconds).
CONNECT_GRACE = 30.0
#: What a driver writes once its flow is connected.
READY = b"R"
RESULT_GRACE = 20.0
TCP_HEADER = struct.Struct("!HHIIBBHHH")
#: The virtio-net header of a TSO frame: NEEDS_CSUM from byte 34 (the TCP header), field at +16, gso TCPV4.
VNET_TSO = VNET_HDR.pack(int(VnetHdrFlags.NEEDS_CSUM), int(GsoType.TCPV4), 54, tcp.mss_for(MTU, False), 34, 16, 0)

#: The host peer: accept one connection on 127.0.0.1:PORT, then discard (up) or write zeros (down).
PEER = """
import socket, sys
port, mode = int(sys.argv[1]), sys.argv[2]
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", port))
srv.listen(1)
print("ready", flush=True)
conn, _ = srv.accept()
buf = bytearray(1 << 20)
try:
    if mode == "up":
        while conn.recv_into(buf):
            pass
    else:
        while True:
            conn.sendall(buf)
except OSError:
    pass
"""


@dataclass(slots=True)
class StreamCase:
    """One measurement: ``workers`` workers (one flow each), one direction."""

    workers: int
    direction: str                   # "up": guest -> host, "down": host -> guest

    def __str__(self) -> str:
        return f"{self.workers} worker(s), {'guest->host' if self.direction == 'up' else 'host->guest'}"


@dataclass(slots=True)
class StreamResult:
    """Figures of one case."""

    case: StreamCase
    seconds: float
    gbit_s: list[float]              # per pair, payload as the driver counted it
    worker_cpu_gb: list[float]       # per worker: CPU seconds per GB it moved (its own counters)
    worker_cpu: list[float]          # per worker: CPU share over the interval
    driver_cpu: list[float]          # per driver: CPU share over the interval

    @property
    def total_gbit_s(self) -> float:
        """All pairs together."""
        return sum(self.gbit_s)

    def as_dict(self) -> dict[str, Any]:
        """JSON form."""
        data = asdict(self)
        data["total_gbit_s"] = self.total_gbit_s
        return data


class StreamDriver:
    """The guest's end of one TCP connection on one queue pair, in a forked process."""

    def __init__(self, fe: VhostUserFrontend, pair: int, direction: str) -> None:
        """A connection from GUEST_IP to GATEWAY_IP:PORT+pair on pair ``pair``."""
        self.fe = fe
        self.pair = pair
        self.direction = direction
        self.addr = Addressing(False, SWITCH_MAC, GUEST_MAC, socket.inet_aton(GUEST_IP),
                               socket.inet_aton(GATEWAY_IP), 40000 + pair, PORT + pair)
        self.seq = 1000
        self.ack = 0
        self.acked = self.seq          # highest ACK from the switch (up)
        self.window = 0                # the switch's window in bytes (up)
        self.ws = 0
        self.moved = 0                 # payload bytes acknowledged (up) or received in order (down)
        self.payload = memoryview(bytes(TSO_PAYLOAD))
        self.call = fe.call_fd(2 * pair)

    # -- frames --------------------------------------------------------------------

    def _send(self, flags: int, payload: bytes = b"", options: bytes = b"") -> None:
        """One ordinary segment (checksummed, no offload)."""
        frame = tcp.build(self.addr, self.seq, self.ack, flags, 0xFFFF, options, payload)
        self.fe.send_frame(self.pair, bytes(frame))

    def _tso_header(self, size: int) -> bytes:
        """virtio-net header then the Ethernet/IPv4/TCP headers of one TSO frame of ``size`` payload bytes
        at the current sequence (the TCP checksum left partial: NEEDS_CSUM)."""
        head = bytearray(VNET_TSO + SWITCH_MAC + GUEST_MAC + b"\x08\x00" + bytes(40))
        ipv4.pack_header_into(head, len(VNET_TSO) + 14, ipv4.addr_from_str(GUEST_IP),
                              ipv4.addr_from_str(GATEWAY_IP), 6, 20 + size)
        TCP_HEADER.pack_into(head, len(VNET_TSO) + 34, self.addr.src_port, self.addr.dst_port, self.seq,
                             self.ack, 5 << 4, ACK | PSH, 0xFFFF, 0, 0)
        return bytes(head)

    def _segments(self, timeout: float) -> list[tcp.TcpSegment]:
        """The segments of this connection received (headers only checked), RX buffers posted again."""
        frames = self.fe.recv_frames(self.pair, timeout=timeout)
        if frames:
            self.fe.post_rx(self.pair, len(frames) * 17, RX_BUF)
        out = []
        for frame in frames:
            if frame[12:14] != b"\x08\x00" or frame[23] != 6:
                continue
            seg = tcp.parse4(ipv4.parse(memoryview(frame)[14:]), verify=False)
            if seg.dst_port == self.addr.src_port:
                out.append(seg)
        return out

    # -- phases --------------------------------------------------------------------

    def connect(self) -> None:
        """SYN (MSS for MTU 65520, window scale 7) -> SYN-ACK -> ACK."""
        self.fe.post_rx(self.pair, RING, RX_BUF)
        self._send(SYN, options=tcp.syn_options(tcp.mss_for(MTU, False), WSCALE))
        self.seq += 1
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            for seg in self._segments(0.5):
                if seg.flags & SYN and seg.flags & ACK:
                    self.ack = (seg.seq + 1) & 0xFFFF_FFFF
                    self.acked = seg.ack
                    self.ws = seg.wscale or 0
                    self.window = seg.window          # a SYN's window is never scaled
                    self._send(ACK)
                    return
        raise BenchError(f"pair {self.pair}: no SYN-ACK")

    def run(self, marks: list[float]) -> list[dict[str, float]]:
        """Move data until the last mark; a sample (time, bytes, CPU) at each mark."""
        samples: list[dict[str, float]] = []
        step = self._up if self.direction == "up" else self._down
        for mark in marks:
            while time.monotonic() < mark:
                step()
            samples.append({"time": time.monotonic(), "moved": self.moved, "cpu": time.process_time()})
        return samples

    def _up(self) -> None:
        """Send TSO frames as the window allows (whole ones, or what is left of the window), then take the
        ACKs."""
        in_flight = (self.seq - self.acked) & 0xFFFF_FFFF
        frames = []
        sizes = []
        seq = self.seq
        room = (self.window << self.ws) - in_flight
        while room > 0 and len(frames) < 16:
            size = min(room, TSO_PAYLOAD)
            frames.append((self._tso_header(size), self.payload[:size]))
            sizes.append(size)
            self.seq = (self.seq + size) & 0xFFFF_FFFF
            room -= size
        sent = self.fe.send_gather(self.pair, frames, indirect=True) if frames else 0
        self.seq = (seq + sum(sizes[:sent])) & 0xFFFF_FFFF
        for seg in self._segments(0.002 if sent else 0.05):
            advance = (seg.ack - self.acked) & 0xFFFF_FFFF
            if seg.flags & ACK and 0 < advance <= 1 << 30:
                self.moved += advance
                self.acked = seg.ack
            self.window = seg.window

    def _down(self) -> None:
        """Take data frames in order and ACK each batch with an 8 MiB window."""
        got = 0
        for seg in self._segments(0.05):
            length = len(seg.payload)
            if length and seg.seq == self.ack:
                self.ack = (self.ack + length) & 0xFFFF_FFFF
                self.moved += length
                got += 1
        if got:
            self._send(ACK)


def _peers(netns: TestNetns, case: StreamCase) -> list[Any]:
    """One host peer per pair in the namespace, each ready to accept."""
    procs = []
    for pair in range(case.workers):
        proc = netns.popen([sys.executable, "-c", PEER, str(PORT + pair), case.direction],
                           stdout=subprocess.PIPE)
        procs.append(proc)
    for proc in procs:
        ready = select.select([proc.stdout], [], [], 10)[0]
        if not ready or not proc.stdout.readline().startswith(b"ready"):
            raise BenchError("a host peer did not start")
    return procs


def _child(driver: StreamDriver, go_fd: int, out_fd: int) -> None:
    """A forked driver: connect, say so (a byte on ``out_fd``), read the marks (``go_fd``), run, report as
    JSON, never return."""
    code = 1
    try:
        try:
            driver.connect()
            os.write(out_fd, READY)
            marks = json.loads(os.read(go_fd, 4096) or b"[]")
            if len(marks) != 2:
                raise BenchError("no marks from the parent")
            report: dict[str, Any] = {"samples": driver.run(marks)}
            code = 0
        except Exception as exc:                       # reported to the parent, which raises it
            report = {"error": f"{type(exc).__name__}: {exc}"}
        os.write(out_fd, json.dumps(report).encode())
    finally:
        os._exit(code)


def _wait_ready(fds: dict[int, int], deadline: float) -> None:
    """Each driver's READY byte (its flow is connected); a driver that fails reports instead."""
    for pair, fd in fds.items():
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise BenchError(f"pair {pair}: the driver did not connect")
        first = os.read(fd, 1)
        if first != READY:
            rest = os.read(fd, 65536) if first else b""
            raise BenchError(f"pair {pair}: {(first + rest).decode(errors='replace')[:300]}")


def run_case(case: StreamCase, seconds: float, warmup: float, tmp: Path) -> StreamResult:
    """One case in a fresh namespace and switch."""
    with TestNetns() as netns:
        peers = _peers(netns, case)
        switch = Switch(tmp, workers=case.workers, prefix=netns.exec_argv([]), addressing=[*DEFAULT_ADDRESSING, "-m", str(MTU)],
                        socket_path=str(tmp / f"stream-{case.workers}-{case.direction}.sock"))
        try:
            switch.start()
            return _measure(case, switch, seconds, warmup)
        finally:
            switch.stop()
            for proc in peers:
                stop_process(proc)


def _measure(case: StreamCase, switch: Switch, seconds: float, warmup: float) -> StreamResult:
    """Fork the drivers, sample the workers at the marks, compute."""
    try:
        fe = VhostUserFrontend.connect(switch.socket, queue_pairs=case.workers, ring_size=RING, features=FEATURES,
                                       buf_size=RX_BUF, ram=None)
    except FrontendError as exc:
        raise BenchError(f"cannot connect to the switch: {exc}") from exc
    with fe:
        fe.handshake()
        for pair in range(case.workers):     # every buffer allocated before forking (see bench.frames)
            fe.ring(2 * pair).reserve(2 * RING)
            fe.ring(2 * pair + 1).reserve(RING * (TSO_PAYLOAD // RX_BUF + 2), RING)
        workers = switch.status()["workers"]
        pids = [int(w["pid"]) for w in workers]
        children, fds, gos = [], {}, []
        for pair in range(case.workers):
            read_fd, write_fd = os.pipe()
            go_read, go_write = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(read_fd)
                os.close(go_write)
                _child(StreamDriver(fe, pair, case.direction), go_read, write_fd)
            os.close(write_fd)
            os.close(go_read)
            children.append(pid)
            fds[pair] = read_fd
            gos.append(go_write)
        try:
            # Every flow connected first (a sandboxed start can take a while): then the marks.
            _wait_ready(fds, time.monotonic() + CONNECT_GRACE)
            start = time.monotonic() + START_DELAY
            marks = [start + warmup, start + warmup + seconds]
            for go in gos:
                os.write(go, json.dumps(marks).encode())
            samples = []
            for mark in marks:
                sleep_until(mark)
                status = {int(w["pair"]): w for w in switch.status()["workers"]}
                samples.append(({pid: cpu_seconds(pid) for pid in pids}, status))
            reports = collect_reports(fds, marks[1] + RESULT_GRACE)
            failed = {pair: r["error"] for pair, r in reports.items() if "error" in r}
            if failed:
                raise BenchError("; ".join(f"pair {pair}: {error}" for pair, error in sorted(failed.items())))
        finally:
            for fd in [*fds.values(), *gos]:
                os.close(fd)
            for pid in children:
                try:
                    os.waitpid(pid, 0)
                except ChildProcessError:
                    pass
    span = seconds
    gbit, drivers = [], []
    for pair in range(case.workers):
        first, last = reports[pair]["samples"]
        span = last["time"] - first["time"]
        gbit.append((last["moved"] - first["moved"]) * 8 / span / 1e9)
        drivers.append((last["cpu"] - first["cpu"]) / span)
    cpu_gb, cpu_share = [], []
    (cpu0, st0), (cpu1, st1) = samples
    for pair, pid in enumerate(pids):
        moved = sum(int(st1[pair][k]) - int(st0[pair][k]) for k in ("rx_bytes", "tx_bytes"))
        used = cpu1[pid] - cpu0[pid]
        cpu_share.append(used / span)
        cpu_gb.append(used / (moved / 1e9) if moved else float("nan"))
    return StreamResult(case, span, gbit, cpu_gb, cpu_share, drivers)


HEADER = "  case                              Gbit/s (per pair)          worker CPU s/GB     worker CPU   driver CPU"


def format_result(item: StreamResult | tuple[StreamCase, str]) -> str:
    """One table row."""
    if isinstance(item, tuple):
        case, error = item
        return f"  {str(case):32}  failed: {error.splitlines()[0] if error else ''}"
    pairs = "/".join(f"{g:.2f}" for g in item.gbit_s)
    return (f"  {str(item.case):32}  {item.total_gbit_s:6.2f} ({pairs:14})  "
            f"{'/'.join(f'{c:.2f}' for c in item.worker_cpu_gb):18}  "
            f"{'/'.join(f'{c:.0%}' for c in item.worker_cpu):10}  {'/'.join(f'{c:.0%}' for c in item.driver_cpu)}")


def run(seconds: float, warmup: float, tmp: Path, workers: tuple[int, ...] = (1, 2)) -> list[Any]:
    """Every case: each worker count, each direction; printed as they come."""
    results: list[Any] = []
    for count in workers:
        for direction in ("up", "down"):
            case = StreamCase(count, direction)
            item: StreamResult | tuple[StreamCase, str]
            try:
                item = run_case(case, seconds, warmup, tmp)
            except (BenchError, FrontendError, RuntimeError) as exc:
                item = (case, str(exc))
            results.append(item)
            print(format_result(item), flush=True)
    return results
