"""UDP flows: codecs, timers and -u forwarding in-process; echo, many flows, DNS and hand-over through a switch.

The in-process tests run a real worker (attached to a table of their own)
in the test's namespace and only ever talk to sockets they bound on
127.0.0.1.  The switch tests run shardswitch in a test namespace (tests.guest.netns)
holding a UDP echo server on 127.0.0.1 and ::1: the gateway 10.0.2.2 and our
IPv6 link-local address are mapped there; the namespace's resolv.conf names
a stub resolver on 127.0.0.53, where the echo server also listens on port 53
to play the DNS upstream.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shardswitch.frontend.client import VhostUserFrontend
from shardswitch.ipc import Channel, ForwardSetup, PortFd, ToWorker, WorkerSetup
from shardswitch.net import checksum, icmpv6, ipv4, ipv6
from shardswitch.net.drop import DropReason
from shardswitch.net.params import GuestParams
from shardswitch.shm.table import FlowTable
from shardswitch.worker.listen import bind_all
from shardswitch.worker.worker import Worker
from shardswitch.net.udp import parse6
from shardswitch.worker.udp import UdpFlow
from shardswitch.worker.udptimeout import UdpTimeouts
from tests.guest.netns import TestNetns
from tests.switch import Switch
from tests.switchkit import ready_frontend, start_server, wait_status, wait_until, worker_pids
from tests.worker.udpkit import (ECHO_PORT, GATEWAY4, GUEST4, GUEST6, GUEST_MAC, OUR_MAC, ROUTER6,
                                conntrack_udp_timeouts, decode, frame4, frame6, received, start_echo_server)

#: The address the switch tests give with --dns-forward.
DNSFWD = "10.0.2.3"


# -- codecs ----------------------------------------------------------------------------


def test_ipv6_codec_round_trip_and_errors() -> None:
    """build_frame6/parse6 agree; a zero or wrong checksum and bad lengths are refused."""
    frame = frame6(1234, 53, b"query")
    packet = ipv6.parse(memoryview(frame)[14:])
    got = parse6(packet)
    assert (got.src_port, got.dst_port, bytes(got.payload)) == (1234, 53, b"query")
    for offset, value, reason in ((60, b"\x00\x00", DropReason.UDP_BAD_CHECKSUM),
                                  (58, b"\x00\x04", DropReason.UDP_MALFORMED),
                                  (58, b"\x00\xff", DropReason.UDP_MALFORMED)):
        bad = bytearray(frame)
        bad[offset:offset + 2] = value
        with pytest.raises(Exception) as exc:
            parse6(ipv6.parse(memoryview(bytes(bad))[14:]))
        assert getattr(exc.value, "reason", None) == reason


# -- in-process worker ----------------------------------------------------------------


def bind_detached(specs: tuple[str, ...], kind: int, option: str) -> tuple[PortFd, ...]:
    """One worker's sockets for ``specs`` as the coordinator binds them, detached from their socket objects
    (the worker built in this very process adopts, and closes, them)."""
    (copy,) = bind_all(specs, kind, option, 1)
    for sock, _desc in copy:
        sock.detach()
    return tuple(desc for _sock, desc in copy)


def free_port() -> int:
    """A UDP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def make_worker(table: FlowTable, udp_ports: tuple[str, ...] = (),
                timeouts: UdpTimeouts = UdpTimeouts()) -> tuple[Worker, list[socket.socket]]:
    """Worker 0 attached to ``table``, mapping the gateway to 127.0.0.1, with UDP idle ``timeouts``."""
    peer, ours = socket.socketpair()
    params = GuestParams(address=GUEST4, prefix_len=24, gateway=GATEWAY4)
    setup = WorkerSetup(pair=0, params=params, flow_table=table.instance, forward=ForwardSetup(map_host_loopback=(GATEWAY4,)),
                        udp_listeners=bind_detached(udp_ports, socket.SOCK_DGRAM, "-u"), udp_timeouts=timeouts)
    return Worker(setup, Channel(ours, ToWorker)), [peer, ours]


@pytest.fixture
def server() -> Iterator[socket.socket]:
    """A UDP socket on 127.0.0.1 standing for a host server."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.settimeout(2.0)
    yield s
    s.close()


def send(w: Worker, frame: bytes, now: float) -> None:
    """Feed one guest frame to the worker's endpoint; it must be consumed."""
    out: list[bytes] = []
    assert w.endpoint.handle_frame(memoryview(frame), now, out) is None


def close_worker(w: Worker, socks: list[socket.socket]) -> None:
    """Close everything the worker and the fixture opened."""
    w.flows.close_all()
    w.udp.close()
    assert w.table is not None
    w.table.close()
    w.epoll.close()
    for s in socks:
        s.close()


def udp_flow(w: Worker, guest_port: int) -> UdpFlow:
    """The worker's UDP flow from the guest's ``guest_port``."""
    flow = next(f for f in w.flows.flows.values() if isinstance(f, UdpFlow) and f.guest_port == guest_port)
    return flow


def timeouts_in_table(table: FlowTable) -> dict[int, int]:
    """Guest port -> the idle timeout published for its flow (what ``shardswitch flows`` shows)."""
    return {f.initiator.ep_port: f.timeout for f in table.list_flows()}


def test_flow_timers(table: FlowTable, server: socket.socket) -> None:
    """As passt, with the timeouts the worker was given (7 s, 50 s for streams): one way, or one datagram and one
    reply, the plain timeout; two datagrams from the guest and a reply, the stream timeout; each flow's timeout
    and activity published; expiry frees everything."""
    w, socks = make_worker(table, timeouts=UdpTimeouts(7, 50))
    try:
        port = server.getsockname()[1]
        send(w, frame4(40000, port, b"one-way"), now=1000.0)
        send(w, frame4(40001, port, b"lookup"), now=1000.0)
        send(w, frame4(40002, port, b"stream-1"), now=1000.0)
        send(w, frame4(40002, port, b"stream-2"), now=1000.0)
        got = {}
        for _ in range(4):
            data, peer = server.recvfrom(100)
            got[data] = peer
        assert set(got) == {b"one-way", b"lookup", b"stream-1", b"stream-2"}
        server.sendto(b"answer", got[b"lookup"])
        server.sendto(b"answer", got[b"stream-1"])
        time.sleep(0.1)
        for guest_port in (40001, 40002):
            w.udp.on_socket(udp_flow(w, guest_port))
        assert sorted(decode(reply) for reply in w.queue) == [(GATEWAY4, port, GUEST4, 40001, b"answer"),
                                                              (GATEWAY4, port, GUEST4, 40002, b"answer")]
        assert timeouts_in_table(table) == {40000: 7, 40001: 7, 40002: 7}     # published as created
        for flow in w.flows.flows.values():
            flow.last = 1000.0
        w.flows.tick(1000.0 + 6)
        assert timeouts_in_table(table) == {40000: 7, 40001: 7, 40002: 50}
        w.flows.tick(1000.0 + 7 + 1)
        (left,) = table.list_flows()
        assert left.initiator.ep_port == 40002 and len(w.flows.flows) == 1
        flow = udp_flow(w, 40002)
        fd = flow.sock.fileno()
        flow.last = 1100.0
        w.flows.tick(1101.0)
        assert table.list_flows()[0].last_activity == 1100.0
        w.flows.tick(1100.0 + 50)
        assert len(table.list_flows()) == 1
        w.flows.tick(1100.0 + 50 + 1)
        assert table.list_flows() == [] and w.flows.flows == {} and fd not in w.sockets and flow.sock.fileno() == -1
    finally:
        close_worker(w, socks)


def test_forwarded_flow_timeouts_count_from_the_host_client(table: FlowTable) -> None:
    """A -u flow is initiated by the host client: its datagrams alone keep the plain timeout, however many; a
    reply of the guest and a second datagram from either side make it a stream."""
    port = free_port()
    w, socks = make_worker(table, (f"127.0.0.1/{port}:5000",), timeouts=UdpTimeouts(9, 99))
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.settimeout(2.0)
    try:
        w.endpoint.guest_mac = GUEST_MAC
        (fd,) = w.udp.listeners
        for n in range(3):
            client.sendto(b"one-way-%d" % n, ("127.0.0.1", port))
        time.sleep(0.1)
        w.udp.on_listener(fd)
        assert len(w.queue) == 3
        cport = client.getsockname()[1]
        flow = udp_flow(w, 5000)
        assert (flow.from_host, flow.from_guest) == (3, 0)
        now = time.monotonic()
        w.flows.tick(now)
        (entry,) = table.list_flows()
        assert entry.initiator.ep_port == cport and entry.timeout == 9
        send(w, frame4(5000, cport, b"reply"), now=now)
        assert client.recvfrom(100)[0] == b"reply"
        w.flows.tick(now)
        assert table.list_flows()[0].timeout == 99
    finally:
        client.close()
        close_worker(w, socks)


def test_activity_counts_saturate(table: FlowTable, server: socket.socket) -> None:
    """A side's datagram count stops at 255, as passt's one-byte counters; the flow stays a stream."""
    w, socks = make_worker(table)
    try:
        port = server.getsockname()[1]
        for n in range(300):
            send(w, frame4(40010, port, b"%d" % n), now=1000.0)
        flow = udp_flow(w, 40010)
        assert flow.from_guest == 255 and flow.timeout(UdpTimeouts(30, 120)) == 30
        flow.from_host = 1
        assert flow.timeout(UdpTimeouts(30, 120)) == 120
    finally:
        close_worker(w, socks)


def test_forwarded_port_in_process(table: FlowTable) -> None:
    """-u PORT:TO: a loopback client reaches the guest's TO port from the gateway; the reply returns."""
    port = free_port()
    w, socks = make_worker(table, (f"127.0.0.1/{port}:5000",))
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.settimeout(2.0)
    try:
        w.endpoint.guest_mac = GUEST_MAC
        (fd,) = w.udp.listeners
        client.sendto(b"ping", ("127.0.0.1", port))
        time.sleep(0.1)
        w.udp.on_listener(fd)
        (frame,) = w.queue
        cport = client.getsockname()[1]
        assert decode(frame) == (GATEWAY4, cport, GUEST4, 5000, b"ping")
        (entry,) = table.list_flows()
        assert entry.initiator.ep_port == cport and entry.target.ep_port == 5000
        send(w, frame4(5000, cport, b"pong"), now=time.monotonic())
        assert client.recvfrom(100) == (b"pong", ("127.0.0.1", port))
        assert len(table.list_flows()) == 1
    finally:
        client.close()
        close_worker(w, socks)


def test_forwarded_ipv6_port_before_the_guest_mac_is_known(table: FlowTable) -> None:
    """-u [::1]/PORT: a ::1 client reaches the guest from the mapped router; broadcast MAC until the MAC is learnt."""
    port = free_port()
    peer, ours = socket.socketpair()
    params = GuestParams(address=GUEST4, prefix_len=24, gateway=GATEWAY4)
    setup = WorkerSetup(pair=0, params=params, flow_table=table.instance,
                        forward=ForwardSetup(map_host_loopback=(GATEWAY4, ROUTER6)),
                        udp_listeners=bind_detached((f"[::1]/{port}:6000",), socket.SOCK_DGRAM, "-u"))
    w = Worker(setup, Channel(ours, ToWorker))
    client = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    client.settimeout(2.0)
    try:
        w.flows.fwd.guest6 = ipv6.addr_from_str(GUEST6)
        (fd,) = w.udp.listeners
        client.sendto(b"six", ("::1", port))
        time.sleep(0.1)
        w.udp.on_listener(fd)
        (frame,) = w.queue
        assert frame[:6] == b"\xff" * 6
        cport = client.getsockname()[1]
        assert decode(GUEST_MAC + frame[6:]) == (ROUTER6, cport, GUEST6, 6000, b"six")
        send(w, frame6(6000, cport, b"back", dst=ROUTER6), now=time.monotonic())
        assert client.recvfrom(100)[:2][0] == b"back"
    finally:
        client.close()
        close_worker(w, [peer, ours])


def test_local_and_multicast_destinations_are_dropped(table: FlowTable) -> None:
    """Broadcast, multicast and loopback destinations never get a socket: each is the flow policy's drop."""
    w, socks = make_worker(table)
    try:
        for dst, reason in (("255.255.255.255", DropReason.FLOW_DST_MULTICAST),
                            ("224.0.0.251", DropReason.FLOW_DST_MULTICAST),
                            ("127.0.0.1", DropReason.FLOW_DST_LOOPBACK)):
            out: list[bytes] = []
            assert w.endpoint.handle_frame(memoryview(frame4(5353, 5353, b"x", dst=dst)), 0.0, out) == reason
        out = []
        assert w.endpoint.handle_frame(memoryview(frame6(5353, 5353, b"x", dst="ff02::fb")), 0.0, out) \
            == DropReason.FLOW_DST_MULTICAST
        assert w.flows.flows == {} and table.list_flows() == []
    finally:
        close_worker(w, socks)


# -- through a switch -------------------------------------------------------------------


@pytest.fixture
def echo_ns(netns: TestNetns, tmp_path: Path) -> TestNetns:
    """The test namespace with the UDP echo server running (:func:`start_echo_server`)."""
    return start_echo_server(netns, tmp_path)


@pytest.fixture
def switch(echo_ns: TestNetns, tmp_path: Path) -> Iterator[Switch]:
    """A 2-worker switch in the echo namespace, with --dns-forward."""
    with Switch(tmp_path, workers=2, prefix=echo_ns.exec_argv([]), args=["--dns-forward", DNSFWD]) as sw:
        yield sw


@pytest.fixture
def fe(switch: Switch) -> Iterator[VhostUserFrontend]:
    """A connected front-end with RX buffers on both pairs."""
    with ready_frontend(switch, rx=256) as frontend:
        yield frontend


def test_echo_v4_and_v6(switch: Switch, fe: VhostUserFrontend) -> None:
    """Guest -> mapped gateway and router link-local: echoed back from the address the guest used."""
    fe.send_frame(0, frame4(40000, ECHO_PORT, b"hello4"))
    assert received(fe, 0, 1) == [(GATEWAY4, ECHO_PORT, GUEST4, 40000, b"echo:hello4")]
    fe.send_frame(0, frame6(40000, ECHO_PORT, b"hello6"))
    assert received(fe, 0, 1) == [(ROUTER6, ECHO_PORT, GUEST6, 40000, b"echo:hello6")]
    flows = switch.query("flows")["flows"]
    assert len(flows) == 2 and {f["sides"][1]["ep_addr"] for f in flows} == {"127.0.0.1", "::1"}
    assert all(f["type"] == "udp" and f["owner"] == 0 for f in flows)


def test_many_flows(switch: Switch, fe: VhostUserFrontend) -> None:
    """100 concurrent flows, each answered on its own port."""
    for i in range(100):
        fe.send_frame(i % 2, frame4(41000 + i, ECHO_PORT, b"n%d" % i))
    got = received(fe, 0, 50) + received(fe, 1, 50)
    assert sorted(g[3] for g in got) == list(range(41000, 41100))
    assert all(g[4] == b"echo:n%d" % (g[3] - 41000) for g in got)
    assert len(switch.query("flows")["flows"]) == 100


def test_dns_forward(switch: Switch, fe: VhostUserFrontend) -> None:
    """Port 53 of --dns-forward goes to the namespace's resolver (127.0.0.53); the answer comes from DNSFWD:53."""
    fe.send_frame(1, frame4(45000, 53, b"query", dst=DNSFWD))
    assert received(fe, 1, 1) == [(DNSFWD, 53, GUEST4, 45000, b"echo:query")]
    (flow,) = switch.query("flows")["flows"]
    assert flow["sides"][1]["ep_addr"] == "127.0.0.53" and flow["sides"][1]["ep_port"] == 53


def shown_timeouts(switch: Switch, want: dict[int, int]) -> dict[int, int]:
    """Guest port -> timeout of every UDP flow ``shardswitch flows`` lists, once it shows ``want`` (the timeouts
    are published on the owner's next once-a-second tick)."""
    def probe() -> dict[int, int] | None:
        """The timeouts shown, if they are the wanted ones."""
        shown = {f["sides"][0]["ep_port"]: f["timeout"] for f in switch.query("flows")["flows"] if f["type"] == "udp"}
        return shown if shown == want else None

    return wait_until(probe, f"flows showing the timeouts {want}", timeout=5.0)


def test_conntrack_timeouts_reach_every_worker_and_a_replacement(echo_ns: TestNetns, tmp_path: Path) -> None:
    """The switch's namespace has nf_conntrack_udp_timeout 11 and _stream 77 (when it has conntrack; else passt's
    30 and 120): every worker's flows are under them, a killed worker's replacement's too; one datagram and one
    reply is the plain timeout, a second datagram each way makes a stream."""
    timeouts = conntrack_udp_timeouts(echo_ns, 11, 77)
    with Switch(tmp_path, workers=2, prefix=echo_ns.exec_argv([])) as switch, \
            ready_frontend(switch, rx=256) as fe:
        for pair in (0, 1):
            fe.send_frame(pair, frame4(43000 + pair, ECHO_PORT, b"one"))
            assert received(fe, pair, 1) == [(GATEWAY4, ECHO_PORT, GUEST4, 43000 + pair, b"echo:one")]
        shown_timeouts(switch, {43000: timeouts.timeout, 43001: timeouts.timeout})
        fe.send_frame(0, frame4(43000, ECHO_PORT, b"two"))
        assert received(fe, 0, 1) == [(GATEWAY4, ECHO_PORT, GUEST4, 43000, b"echo:two")]
        shown_timeouts(switch, {43000: timeouts.stream, 43001: timeouts.timeout})
        old = worker_pids(switch.status())[1]
        assert old not in (switch.pid, os.getpid())
        os.kill(old, signal.SIGKILL)
        wait_status(switch, lambda s: s["workers"][1]["pid"] not in (None, old) and s["workers"][1].get("answered")
                    and s["workers"][1]["restarts"] == 1, "worker 1 replaced", timeout=10.0)
        shown_timeouts(switch, {43000: timeouts.stream})          # the dead worker's flow freed
        fe.send_frame(1, frame4(43002, ECHO_PORT, b"after"))
        assert received(fe, 1, 1) == [(GATEWAY4, ECHO_PORT, GUEST4, 43002, b"echo:after")]
        shown_timeouts(switch, {43000: timeouts.stream, 43002: timeouts.timeout})


def test_frame_on_other_pair_is_handed_to_owner(switch: Switch, fe: VhostUserFrontend) -> None:
    """A flow created on pair 0 and continued on pair 1: one flow, pair 0 answers everything."""
    fe.send_frame(0, frame4(42000, ECHO_PORT, b"first"))
    assert len(received(fe, 0, 1)) == 1
    for i in range(4):
        fe.send_frame(1, frame4(42000, ECHO_PORT, b"more%d" % i))
    assert [g[4] for g in received(fe, 0, 4)] == [b"echo:more%d" % i for i in range(4)]
    flows = switch.query("flows")["flows"]
    assert len(flows) == 1 and flows[0]["owner"] == 0
    workers = switch.status()["workers"]
    assert workers[1]["handed_out"] == 4 and workers[0]["handed_in"] == 4


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_port_unreachable_relayed(switch: Switch, fe: VhostUserFrontend, v6: bool) -> None:
    """A datagram to a closed port on the host: the guest gets port unreachable (ICMP 3/3, ICMPv6 1/4) from
    the address it sent to, quoting its own datagram, so its client fails at once."""
    closed = 7999
    if v6:
        sent = frame6(46000, closed, b"anyone?")
    else:
        sent = frame4(46000, closed, b"anyone?")
    fe.send_frame(0, sent)
    deadline = time.monotonic() + 5
    errors: list[bytes] = []
    while not errors and time.monotonic() < deadline:
        for frame in fe.recv_frames(0, timeout=0.5):
            if not v6 and frame[12:14] == b"\x08\x00" and frame[23] == 1:
                errors.append(frame)
            elif v6 and frame[12:14] == b"\x86\xdd" and frame[20] == 58 and frame[54] == 1:
                errors.append(frame)
    assert len(errors) == 1
    frame = errors[0]
    assert frame[:6] == GUEST_MAC and frame[6:12] == OUR_MAC
    view = memoryview(frame)[14:]
    if v6:
        p6 = ipv6.parse(view)
        message = icmpv6.parse(p6)           # checksum verified
        assert (ipv6.addr_to_str(p6.src), ipv6.addr_to_str(p6.dst)) == (ROUTER6, GUEST6)
        assert (message.type, message.code) == (1, 4)
        assert bytes(p6.payload[8:]) == sent[14:]
    else:
        p4 = ipv4.parse(view)
        assert (ipv4.addr_to_str(p4.src), ipv4.addr_to_str(p4.dst)) == (GATEWAY4, GUEST4)
        assert (p4.payload[0], p4.payload[1]) == (3, 3)
        assert checksum.checksum(p4.payload) == 0
        assert bytes(p4.payload[8:]) == sent[14:]
    events = switch.status()["workers"][0]["events"]
    assert events.get("UDP_HOST_ICMP_ERROR") == 1


def test_forwarded_port_through_switch(echo_ns: TestNetns, tmp_path: Path) -> None:
    """-u 127.0.0.1/PORT:5000: a host client's datagram reaches the guest; the guest's reply reaches it."""
    port = 17007
    with Switch(tmp_path, workers=2, prefix=echo_ns.exec_argv([]), args=["-u", f"127.0.0.1/{port}:5000"]) as sw, \
            ready_frontend(sw) as fe:
        for pair in (0, 1):     # teaches both workers the guest's MAC
            fe.send_frame(pair, frame4(5001 + pair, ECHO_PORT, b"hi"))
            assert len(received(fe, pair, 1)) == 1
        client = (f"import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(5); "
                  f"s.bind(('127.0.0.1', 33333)); s.sendto(b'from-host', ('127.0.0.1', {port})); "
                  f"print(s.recvfrom(100)[0].decode())")
        proc = echo_ns.popen([sys.executable, "-c", client], stdout=subprocess.PIPE, text=True)
        got: list[tuple[int, tuple[str, int, str, int, bytes]]] = []
        deadline = time.monotonic() + 5
        while not got and time.monotonic() < deadline:
            got = [(pair, g) for pair in (0, 1) for g in received(fe, pair, 1, timeout=0.2)]
        (pair, frame), = got
        assert frame == (GATEWAY4, 33333, GUEST4, 5000, b"from-host")
        fe.send_frame(1 - pair, frame4(5000, 33333, b"from-guest"))    # handed over to the owner
        out, _ = proc.communicate(timeout=10)
        assert out.strip() == "from-guest"
        (flow,) = [f for f in sw.query("flows")["flows"] if f["sides"][0]["pif"] == "host"]
        assert flow["owner"] == pair and flow["sides"][0]["ep_port"] == 33333


#: A resolver stand-in on systemd-resolved's stub address: answers every datagram on 127.0.0.53:53 with "dns:" + it.
STUB_RESOLVER = r"""
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.53", 53))
print("ready", flush=True)
while True:
    data, peer = s.recvfrom(65535)
    s.sendto(b"dns:" + data, peer)
"""


def test_loopback_stub_resolver_works_with_default_options(netns: TestNetns, tmp_path: Path) -> None:
    """A host whose resolv.conf names only 127.0.0.53 (systemd-resolved): with no DNS option the guest's
    queries to the gateway (the DNS server it is offered) reach 127.0.0.53 and are answered from the gateway."""
    netns.resolv_conf.write_text("nameserver 127.0.0.53\n")
    start_server(netns, STUB_RESOLVER)
    with Switch(tmp_path, workers=1, prefix=netns.exec_argv([]),
                addressing=["-a", GUEST4, "-n", "24", "-g", GATEWAY4]) as sw, ready_frontend(sw, pairs=1) as fe:
        fe.send_frame(0, frame4(45001, 53, b"query"))
        assert received(fe, 0, 1) == [(GATEWAY4, 53, GUEST4, 45001, b"dns:query")]
        (flow,) = sw.query("flows")["flows"]
        assert (flow["sides"][1]["ep_addr"], flow["sides"][1]["ep_port"]) == ("127.0.0.53", 53)
