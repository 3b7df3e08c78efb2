"""TCP connections through a real switch, driven by the Python front-end as a scripted guest.

The switch runs inside the test's namespace (``netns`` fixture), where the
gateway 10.0.2.2 is mapped to that namespace's loopback; small servers
(echo, blob, sink) listen there on 127.0.0.1.  The test plays the guest's
TCP by hand: SYN, ACKs, data, FIN, RST, and checks what the switch answers.
"""

from __future__ import annotations

import errno
import hashlib
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shardswitch.frontend.client import VhostUserFrontend
from shardswitch.net import tcp
from shardswitch.net.params import GuestParams
from shardswitch.net.tcp import Addressing
from shardswitch.worker.tcp import TcpFlow, TcpFlows
from shardswitch.worker.tcp.timers import IDLE_TIMEOUT, KEEPALIVE_INTERVAL, MAX_RETRIES, RTO_INIT
from tests.guest.netns import TestNetns
from tests.switch import Switch
from tests.switchkit import ready_frontend, start_server
from tests.worker.standin import StandInWorker
from tests.worker.tcpkit import (ACK, BLOB, BLOB_SIZE, CLOSED, ECHO, FIN, GATEWAY4, GUEST4, GUEST6_CONFIGURED,
                                 GUEST_MAC, OUR_MAC, PSH, ROUTER6, RST, SINK, SYN, GuestTcp, Seg, blob,
                                 parse_frame)

#: How far the synthetic times of timer tests stay from the deadline they test (seconds).
MARGIN = 0.05


def flows_of(switch: Switch) -> list[dict[str, Any]]:
    """The switch's TCP flows."""
    return [f for f in switch.query("flows")["flows"] if f["type"] == "tcp"]


def wait_no_flows(switch: Switch, timeout: float = 3.0) -> None:
    """Wait until the switch holds no TCP flow."""
    deadline = time.monotonic() + timeout
    while flows_of(switch) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert flows_of(switch) == []


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_handshake_echo_and_close(switch: Switch, fe: VhostUserFrontend, v6: bool) -> None:
    """SYN-ACK with our MSS, data echoed, FIN both ways, the flow is gone afterwards."""
    conn = GuestTcp(fe, ECHO, 40000, v6=v6)
    synack = conn.connect()
    assert synack.mss == 65520 - (60 if v6 else 40)
    (flow,) = flows_of(switch)
    assert flow["sides"][0]["ep_port"] == 40000
    assert flow["sides"][1]["ep_addr"] == ("::1" if v6 else "127.0.0.1")
    conn.send(ACK | PSH, b"hello, host")
    assert conn.read(11) == b"hello, host"
    conn.send(ACK)
    conn.send(FIN | ACK)
    conn.read_until_fin()
    wait_no_flows(switch)


def test_bulk_host_to_guest(switch: Switch, fe: VhostUserFrontend) -> None:
    """A blob larger than any window arrives whole and in order, then the FIN."""
    conn = GuestTcp(fe, BLOB, 40001)
    conn.connect()
    conn.read_until_fin(timeout=20.0)
    assert conn.received == blob(BLOB_SIZE)
    conn.send(FIN | ACK)
    (last,) = conn.recv()
    assert last.flags == ACK and last.ack == conn.seq
    wait_no_flows(switch)


def test_bulk_guest_to_host(switch: Switch, fe: VhostUserFrontend) -> None:
    """Data sent in 1400-byte segments reaches the host intact (the sink answers its hash)."""
    conn = GuestTcp(fe, SINK, 40002)
    conn.connect()
    data = blob(200_000)
    offset = 0
    while offset < len(data):
        chunk = data[offset:offset + 1400]
        start = conn.seq
        conn.send(ACK, chunk)
        acks = conn.recv(expect=1, timeout=2.0)
        acked = max((tcp.seq_diff(s.ack, start) for s in acks), default=0)
        if acked < len(chunk):
            conn.seq = tcp.seq_add(start, acked)     # the rest again, as a guest would
        offset += acked
    conn.send(FIN | ACK)
    conn.read_until_fin()
    assert conn.received.decode() == hashlib.sha256(data).hexdigest()
    wait_no_flows(switch)


def test_refused_is_reset(switch: Switch, fe: VhostUserFrontend) -> None:
    """Nothing listens: the SYN is answered by RST+ACK at once, and no flow stays."""
    conn = GuestTcp(fe, CLOSED, 40003)
    started = time.monotonic()
    conn.send(SYN, options=tcp.syn_options(1400, 7))
    (rst,) = conn.recv()
    assert rst.flags & RST and rst.ack == conn.seq and time.monotonic() - started < 1.0
    wait_no_flows(switch)


def test_guest_reset_closes_host_side(switch: Switch, fe: VhostUserFrontend) -> None:
    """RST from the guest: the flow goes away."""
    conn = GuestTcp(fe, ECHO, 40004)
    conn.connect()
    conn.send(RST | ACK)
    wait_no_flows(switch)


def test_segment_without_flow_is_reset(switch: Switch, fe: VhostUserFrontend) -> None:
    """An ACK for a connection the switch does not know gets a RST with its ACK number as sequence."""
    conn = GuestTcp(fe, ECHO, 40005)
    conn.ack = 12345
    conn.send(ACK, b"stale")
    (rst,) = conn.recv()
    assert rst.flags == RST and rst.seq == 12345


def test_unacked_data_is_retransmitted(switch: Switch, fe: VhostUserFrontend) -> None:
    """Data the guest does not ACK comes again after the retransmission timeout, same sequence."""
    conn = GuestTcp(fe, ECHO, 40006)
    conn.connect()
    conn.send(ACK | PSH, b"again")
    start = conn.ack
    assert conn.read(5) == b"again"
    again = [s for s in conn.recv(timeout=3.5) if s.payload]
    assert again and again[0].seq == start and again[0].payload == b"again"


def test_segment_on_other_pair_is_handed_to_owner(switch: Switch, fe: VhostUserFrontend) -> None:
    """Data for a flow of worker 0 sent on pair 1 is handed over: worker 0 answers on pair 0."""
    conn = GuestTcp(fe, ECHO, 40007)
    conn.connect()
    conn.send(ACK | PSH, b"moved", pair=1)
    assert conn.read(5) == b"moved"
    assert switch.status()["workers"][1]["handed_out"] >= 1


FORWARDED = 7100
#: A host client of the forwarded port: sends "ping", prints what comes back until end of stream.
CLIENT = f"""
import socket, sys
c = socket.create_connection((sys.argv[1], {FORWARDED}), timeout=10)
c.sendall(b"ping")
data = b""
while True:
    d = c.recv(65536)
    if not d:
        break
    data += d
print(data.decode(), flush=True)
"""


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_forwarded_port_reaches_the_guest(tmp_path: Path, netns: TestNetns, v6: bool) -> None:
    """-t: a loopback client's connection arrives as our SYN from the gateway (IPv6: from our link-local
    address, to the guest's IPv6 address as configured); data both ways; FIN both ways."""
    with Switch(tmp_path, workers=2, prefix=netns.exec_argv([]), args=["-t", str(FORWARDED)]) as sw, \
            ready_frontend(sw, rx=200) as fe:
        # Each worker learns the guest's MAC from the first frame on its own queue pair.
        for pair in (0, 1):
            GuestTcp(fe, CLOSED, 40100, pair=pair).send(RST)
        client = netns.popen([sys.executable, "-c", CLIENT, "::1" if v6 else "127.0.0.1"], stdout=subprocess.PIPE)
        syn: Seg | None = None
        pair = 0
        deadline = time.monotonic() + 5
        while syn is None and time.monotonic() < deadline:
            for pair in (0, 1):
                segs = [parse_frame(f) for f in fe.recv_frames(pair, timeout=0.1)]
                syn = next((s for s in segs if s is not None and s.flags == SYN), None)
                if syn is not None:
                    break
        assert syn is not None and syn.dport == FORWARDED and syn.mss == 65520 - (60 if v6 else 40)
        (flow,) = flows_of(sw)
        assert flow["sides"][0]["pif"] == "host"
        assert flow["sides"][1]["ep_addr"] == (GUEST6_CONFIGURED if v6 else GUEST4)
        assert flow["sides"][1]["our_addr"] == (ROUTER6 if v6 else GATEWAY4)
        conn = GuestTcp(fe, syn.sport, FORWARDED, pair=pair, v6=v6)
        guest = socket.inet_pton(socket.AF_INET6, GUEST6_CONFIGURED) if v6 else conn.addr.src
        conn.addr = Addressing(v6, OUR_MAC, GUEST_MAC, guest, conn.addr.dst, FORWARDED, syn.sport)
        conn.ack = tcp.seq_add(syn.seq, 1)
        conn.send(SYN | ACK, options=tcp.syn_options(1400, 7))
        assert conn.read(4) == b"ping"
        conn.send(ACK | PSH, b"pong")
        conn.send(FIN | ACK)
        out, _ = client.communicate(timeout=10)
        assert out.decode().strip() == "pong"
        conn.read_until_fin()
        wait_no_flows(sw)


# -- timers, driven with a synthetic clock (no switch: TcpFlows on a stand-in worker) -------------------


class TcpStandIn(StandInWorker):
    """A stand-in worker whose queued frames the tests read as TCP segments."""

    def take(self) -> list[Seg]:
        """The TCP segments queued for the guest so far."""
        segs = [parse_frame(bytes(frame)) for frame in self.queue]
        self.queue.clear()
        return [s for s in segs if s is not None]


def stand_in_flows() -> tuple[TcpStandIn, TcpFlows]:
    """TcpFlows on a stand-in worker for 10.0.2.15 behind 10.0.2.2 (mapped to the loopback), no table."""
    w = TcpStandIn(GuestParams(address=GUEST4, prefix_len=24, gateway=GATEWAY4), (GATEWAY4,))
    flows = TcpFlows(w, w.flows)
    flows.plug_into(w.endpoint)
    return w, flows


@pytest.fixture
def stand_in() -> Iterator[tuple[TcpStandIn, TcpFlows, socket.socket]]:
    """TcpFlows on a stand-in worker, and a listener on this namespace's loopback (10.0.2.2 maps there)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    w, flows = stand_in_flows()
    yield w, flows, listener
    flows.close()
    w.close()
    listener.close()


def established_with_data(w: TcpStandIn, listener: socket.socket) -> tuple[socket.socket, Seg]:
    """Guest connects through ``w``; the host side sends 100 bytes; returns (server socket, the data segment).

    Socket callbacks read the real monotonic clock, so the synthetic times of the tests start from it.
    """
    now = time.monotonic()
    port = listener.getsockname()[1]
    guest = Addressing(False, OUR_MAC, GUEST_MAC, socket.inet_aton(GUEST4), socket.inet_aton(GATEWAY4), 40200, port)
    out: list[bytes] = []
    w.endpoint.handle_frame(memoryview(tcp.build(guest, 1000, 0, int(SYN), 65535, tcp.syn_options(1400, 7))),
                            now, out)
    w.queue.extend(out)
    out.clear()
    segs: list[Seg] = []
    deadline = time.monotonic() + 3
    while not segs and time.monotonic() < deadline:
        w.poll()
        segs = w.take()
    (synack,) = segs
    assert synack.flags == SYN | ACK
    server, _ = listener.accept()
    w.endpoint.handle_frame(memoryview(tcp.build(guest, 1001, synack.seq + 1, int(ACK), 65535)), now, out)
    w.queue.extend(out)
    server.sendall(b"d" * 100)
    data: list[Seg] = []
    deadline = time.monotonic() + 3
    while not data and time.monotonic() < deadline:
        w.poll()
        data = [seg for seg in w.take() if seg.payload]
    assert len(data) == 1 and data[0].payload == b"d" * 100
    return server, data[0]


def test_retransmission_backs_off_then_resets(stand_in: tuple[TcpStandIn, TcpFlows, socket.socket]) -> None:
    """Unacknowledged data: resent after 1, 2, 4 ... s from the same sequence; after 7 tries a RST both ways."""
    w, flows, listener = stand_in
    server, data = established_with_data(w, listener)
    # Each tick is MARGIN clear of the deadline it tests (the flow's timer: when the data went, then the
    # last retransmission's ``now``), so no sum of floats lands on a deadline whose rounding could go either
    # way, and no wall time passing between two lines of the test matters.
    (flow,) = w.flows.flows.values()
    assert isinstance(flow, TcpFlow)
    fired = flow.timer
    w.flows.tick(fired + RTO_INIT - MARGIN)
    assert w.take() == []
    for attempt in range(MAX_RETRIES):
        fired += RTO_INIT * 2 ** attempt + MARGIN
        w.flows.tick(fired)
        (again,) = w.take()
        assert again.seq == data.seq and again.payload == data.payload, attempt
        w.flows.tick(fired + RTO_INIT * 2 ** (attempt + 1) - MARGIN)
        assert w.take() == [], attempt
    w.flows.tick(fired + RTO_INIT * 2 ** MAX_RETRIES + MARGIN)
    (rst,) = w.take()
    assert rst.flags & RST and w.flows.flows == {}
    server.settimeout(2)
    with pytest.raises(ConnectionResetError):
        server.recv(10)
    server.close()


def guest_acks_all(w: TcpStandIn, listener: socket.socket, data: Seg, now: float) -> None:
    """The guest ACKs the 100 bytes of ``data`` (from established_with_data): nothing left to retransmit."""
    port = listener.getsockname()[1]
    guest = Addressing(False, OUR_MAC, GUEST_MAC, socket.inet_aton(GUEST4), socket.inet_aton(GATEWAY4), 40200, port)
    w.endpoint.handle_frame(memoryview(tcp.build(guest, 1001, tcp.seq_add(data.seq, 100), ACK, 65535)), now, [])


def test_idle_connection_is_reset(stand_in: tuple[TcpStandIn, TcpFlows, socket.socket]) -> None:
    """No segment from the guest for IDLE_TIMEOUT seconds: RST, flow gone."""
    w, flows, listener = stand_in
    server, data = established_with_data(w, listener)
    now = time.monotonic()
    guest_acks_all(w, listener, data, now)
    w.flows.tick(now + 60)
    assert all(not seg.flags & RST for seg in w.take()) and len(w.flows.flows) == 1  # keepalive ACKs only
    w.flows.tick(now + IDLE_TIMEOUT + 1)
    (rst,) = w.take()
    assert rst.flags & RST and w.flows.flows == {}
    server.close()


def test_keepalive_acks_a_quiet_connection(stand_in: tuple[TcpStandIn, TcpFlows, socket.socket]) -> None:
    """A quiet established connection gets a pure ACK every KEEPALIVE_INTERVAL, not more often."""
    w, flows, listener = stand_in
    server, data = established_with_data(w, listener)
    now = time.monotonic()
    guest_acks_all(w, listener, data, now)
    w.take()
    w.flows.tick(now + KEEPALIVE_INTERVAL - 1)
    assert w.take() == []
    w.flows.tick(now + KEEPALIVE_INTERVAL + 1)
    (ka,) = w.take()
    assert ka.flags == ACK and not ka.payload and ka.ack == 1001
    w.flows.tick(now + KEEPALIVE_INTERVAL + 2)
    assert w.take() == []
    w.flows.tick(now + 2 * KEEPALIVE_INTERVAL + 2)
    assert len(w.take()) == 1
    server.close()


@pytest.mark.parametrize("peek_off", [True, False], ids=["SO_PEEK_OFF", "no-SO_PEEK_OFF"])
def test_host_data_with_and_without_peek_offset(monkeypatch: pytest.MonkeyPatch, peek_off: bool) -> None:
    """200 kB from the host arrive whole, with the kernel's peek offset or with the discard-buffer fallback."""
    if not peek_off:
        # An option number the kernel refuses: the flow falls back to peeking from 0 past a discard area.
        monkeypatch.setattr("shardswitch.worker.tcp.flows.SO_PEEK_OFF", 0x7FFF)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    w, flows = stand_in_flows()
    try:
        server, first = established_with_data(w, listener)
        (flow,) = w.flows.flows.values()
        assert flow.peek_off is peek_off
        payload = blob(200_000)
        server.sendall(payload)
        server.close()
        guest = Addressing(False, OUR_MAC, GUEST_MAC, socket.inet_aton(GUEST4), socket.inet_aton(GATEWAY4), 40200,
                           listener.getsockname()[1])
        received = bytearray(first.payload)
        ack = tcp.seq_add(first.seq, len(first.payload))
        fin = False
        deadline = time.monotonic() + 10
        while not fin and time.monotonic() < deadline:
            out: list[bytes] = []
            w.endpoint.handle_frame(memoryview(tcp.build(guest, 1001, ack, int(ACK), 1000)), time.monotonic(), out)
            w.queue.extend(out)
            w.poll(0.05)
            for seg in w.take():
                if seg.payload and seg.seq == ack:
                    received += seg.payload
                    ack = tcp.seq_add(ack, len(seg.payload))
                if seg.flags & FIN and seg.seq == ack:
                    fin = True
        assert fin and bytes(received) == b"d" * 100 + payload
    finally:
        flows.close()
        w.close()
        listener.close()


def test_forwarded_port_on_worker_that_never_saw_the_guest(tmp_path: Path, netns: TestNetns) -> None:
    """-t: a connection accepted by a worker whose queue the guest has not used yet still reaches the guest
    (the guest's MAC is shared through the flow table)."""
    with Switch(tmp_path, workers=2, prefix=netns.exec_argv([]), args=["-t", str(FORWARDED)]) as sw, \
            ready_frontend(sw, rx=200) as fe:
        GuestTcp(fe, CLOSED, 40100, pair=0).send(RST)      # the guest is seen on pair 0 only
        time.sleep(1.5)                                     # a deferred-handler tick on every worker
        connect_all = ("import socket\n"
                       f"for _ in range(16): socket.create_connection(('127.0.0.1', {FORWARDED})).close()")
        netns.run([sys.executable, "-c", connect_all], timeout=30)
        syns = [0, 0]
        deadline = time.monotonic() + 5
        while sum(syns) < 16 and time.monotonic() < deadline:
            for pair in (0, 1):
                segs = [parse_frame(f) for f in fe.recv_frames(pair, timeout=0.1)]
                syns[pair] += sum(1 for s in segs if s is not None and s.flags == SYN)
        drops = [w["drops"] for w in sw.status()["workers"]]
        assert syns[1] > 0 and sum(syns) == 16, (syns, drops)
        assert not any("TCP_NO_GUEST_ADDRESS" in d for d in drops), drops


@pytest.mark.parametrize(("options", "resolver", "dns"), [
    (["--dns-forward", "10.0.2.53"], "127.0.0.1", "10.0.2.53"),
    ([], "127.0.0.53", GATEWAY4),
], ids=["dns-forward", "loopback-stub-resolver-by-default"])
def test_dns_forward_over_tcp(tmp_path: Path, netns: TestNetns, options: list[str], resolver: str,
                              dns: str) -> None:
    """--dns-forward: a TCP connection to ADDR port 53 reaches the host's resolver (127.0.0.1:53 here); with no
    DNS option on a host whose only resolver is 127.0.0.53, the same through the gateway."""
    netns.resolv_conf.write_text(f"nameserver {resolver}\n")
    echo53 = ("import socket\n"
              f"s = socket.create_server(('{resolver}', 53))\nprint('ready', flush=True)\n"
              "c, _ = s.accept()\nc.sendall(c.recv(100))\nc.close()")
    start_server(netns, echo53)
    with Switch(tmp_path, workers=1, prefix=netns.exec_argv([]), args=options,
                addressing=["-a", GUEST4, "-n", "24", "-g", GATEWAY4, *(["--dns", "10.0.2.3"] if options else [])]) \
            as sw, ready_frontend(sw, pairs=1) as fe:
        conn = GuestTcp(fe, 53, 40200)
        conn.addr = Addressing(False, OUR_MAC, GUEST_MAC, socket.inet_aton(GUEST4),
                               socket.inet_aton(dns), 40200, 53)
        conn.connect()
        (flow,) = flows_of(sw)
        assert flow["sides"][1]["ep_addr"] == resolver and flow["sides"][1]["ep_port"] == 53
        conn.send(ACK | PSH, b"\x00\x05query")
        assert conn.read(7) == b"\x00\x05query"


def test_reset_seen_as_end_of_stream_still_resets_the_guest(
        stand_in: tuple[TcpStandIn, TcpFlows, socket.socket]) -> None:
    """The host peer resets the connection and another call takes the socket's error, so the read sees an
    end of stream: the guest gets a RST, not a FIN that would make a cut stream look whole."""
    w, flows, listener = stand_in
    server, data = established_with_data(w, listener)
    guest_acks_all(w, listener, data, time.monotonic())
    (flow,) = w.flows.flows.values()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    server.close()                                    # a RST
    time.sleep(0.1)
    assert flow.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == errno.ECONNRESET   # taken here
    segs: list[Seg] = []
    deadline = time.monotonic() + 3
    while not segs and time.monotonic() < deadline:
        w.poll()
        segs = w.take()
    assert [seg.flags & (RST | FIN) for seg in segs] == [RST]
    assert w.flows.flows == {}


def _echo_server(netns: TestNetns, host: str, port: int) -> None:
    """One connection's echo (of its first 100 bytes) on ``host``:``port`` in the test namespace."""
    start_server(netns, "import socket\n"
                        f"s = socket.create_server(('{host}', {port}))\nprint('ready', flush=True)\n"
                        "c, _ = s.accept()\nc.sendall(c.recv(100))\nc.close()")


def test_dns_host_given_explicitly(tmp_path: Path, netns: TestNetns) -> None:
    """--dns-host 127.0.0.1 while resolv.conf names 127.0.0.53: the gateway's port 53 goes to 127.0.0.1."""
    netns.resolv_conf.write_text("nameserver 127.0.0.53\n")
    _echo_server(netns, "127.0.0.1", 53)
    with Switch(tmp_path, workers=1, prefix=netns.exec_argv([]), args=["--dns-host", "127.0.0.1"],
                addressing=["-a", GUEST4, "-n", "24", "-g", GATEWAY4]) as sw, ready_frontend(sw, pairs=1) as fe:
        conn = GuestTcp(fe, 53, 40210)
        conn.connect()
        (flow,) = flows_of(sw)
        assert (flow["sides"][1]["ep_addr"], flow["sides"][1]["ep_port"]) == ("127.0.0.1", 53)
        conn.send(ACK | PSH, b"\x00\x05query")
        assert conn.read(7) == b"\x00\x05query"


def test_map_guest_addr_reaches_the_hosts_own_address(tmp_path: Path, netns: TestNetns) -> None:
    """--map-guest-addr 192.0.2.1: the guest (whose address is the host's, mirrored) reaches a server on the
    host's own address through 192.0.2.1."""
    _echo_server(netns, netns.host_addr, 7070)
    with Switch(tmp_path, workers=1, prefix=netns.exec_argv([]), addressing=[],
                args=["--map-guest-addr", "192.0.2.1"]) as sw, ready_frontend(sw, pairs=1) as fe:
        conn = GuestTcp(fe, 7070, 40220, dst="192.0.2.1")
        conn.addr = Addressing(False, OUR_MAC, GUEST_MAC, socket.inet_aton(netns.host_addr),
                               socket.inet_aton("192.0.2.1"), 40220, 7070)
        conn.connect()
        (flow,) = flows_of(sw)
        assert (flow["sides"][1]["ep_addr"], flow["sides"][1]["ep_port"]) == (netns.host_addr, 7070)
        conn.send(ACK | PSH, b"mapped")
        assert conn.read(6) == b"mapped"
