"""The flow policy and the one place that applies it (Forwarding.target): what a guest's new flow may address."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from shardswitch.frontend.client import VhostUserFrontend
from shardswitch.ipc import ForwardSetup
from shardswitch.migration import format as fmt
from shardswitch.net import flowframes, inany, ipv6, tcp
from shardswitch.net.drop import DropReason, PacketError
from shardswitch.net.params import GuestParams
from shardswitch.shm.layout import FlowSide, FlowType, Pif
from shardswitch.net.tcp import Addressing
from shardswitch.worker.counters import Event
from shardswitch.worker.fwd import Forwarding
from shardswitch.worker.policy import FlowPolicy, PolicyError, parse_prefix
from shardswitch.worker.tcp import TcpFlows
from tests.guest.netns import TestNetns
from tests.switch import Switch
from tests.switchkit import (STATE_FEATURES, drops, events, is_periodic_ra, load_state, ready_frontend,
                             start_server, worker_pids)
from tests.worker import tcpkit
from tests.worker.standin import StandInWorker
from tests.worker.tcpkit import SERVERS

A = inany.from_str
GUEST4, GUEST6 = "10.0.2.15", "2001:db8::15"
#: The UDP echo server's port on the test namespace's loopback.
UDP_PORT = 7201


def forwarding(**setup: object) -> Forwarding:
    """The Forwarding of a guest at 10.0.2.15/24 and 2001:db8::15, the gateways mapped unless ``setup`` says."""
    setup.setdefault("map_host_loopback", ("10.0.2.2", "fe80::1"))
    w = StandInWorker(GuestParams(address=GUEST4, prefix_len=24, gateway="10.0.2.2", address6=GUEST6))
    return Forwarding(w, ForwardSetup(**setup))  # type: ignore[arg-type]


def side(dst: str, port: int = 80, src: str | None = None) -> FlowSide:
    """The guest side of a flow from the guest (of ``dst``'s family) to ``dst``:``port``."""
    if src is None:
        src = GUEST4 if inany.is_v4(A(dst)) else GUEST6
    return FlowSide(Pif.GUEST, A(src), 40000, A(dst), port)


def refused(fwd: Forwarding, flow_side: FlowSide, ftype: FlowType = FlowType.TCP) -> DropReason | None:
    """The reason ``fwd`` refuses the flow for, None when it lets it go."""
    try:
        fwd.target(ftype, flow_side)
    except PacketError as err:
        return err.reason
    return None


@pytest.mark.parametrize(("dst", "reason"), [
    ("192.0.2.7", None), ("2001:db8::7", None),
    ("127.0.0.1", DropReason.FLOW_DST_LOOPBACK), ("127.1.2.3", DropReason.FLOW_DST_LOOPBACK),
    ("::1", DropReason.FLOW_DST_LOOPBACK),
    ("0.0.0.0", DropReason.FLOW_DST_UNSPECIFIED), ("0.1.2.3", DropReason.FLOW_DST_UNSPECIFIED),
    ("::", DropReason.FLOW_DST_UNSPECIFIED),
    ("224.0.0.251", DropReason.FLOW_DST_MULTICAST), ("255.255.255.255", DropReason.FLOW_DST_MULTICAST),
    ("10.0.2.255", DropReason.FLOW_DST_MULTICAST), ("240.0.0.1", DropReason.FLOW_DST_MULTICAST),
    ("ff02::fb", DropReason.FLOW_DST_MULTICAST),
    ("169.254.169.254", DropReason.FLOW_DST_LINK_LOCAL), ("169.254.0.1", DropReason.FLOW_DST_LINK_LOCAL),
    ("fe80::1234", DropReason.FLOW_DST_LINK_LOCAL), ("fd00:ec2::254", DropReason.FLOW_DST_LINK_LOCAL),
    ("100.100.100.200", DropReason.FLOW_DST_LINK_LOCAL),
])
def test_destinations(dst: str, reason: DropReason | None) -> None:
    """The default policy, with the gateways mapped: unicast destinations go, everything else has its reason."""
    assert refused(forwarding(), side(dst)) == reason


@pytest.mark.parametrize("ftype", [FlowType.TCP, FlowType.UDP, FlowType.PING4])
def test_no_map_gw_leaves_no_way_to_loopback(ftype: FlowType) -> None:
    """--no-map-gw: the host's loopback is out of reach by any address; the gateway is a host like others."""
    fwd = forwarding(map_host_loopback=())
    port = 0 if ftype == FlowType.PING4 else 80
    for dst in ("127.0.0.1", "0.0.0.0"):
        assert refused(fwd, side(dst, port), ftype) is not None, dst
    assert fwd.target(ftype, side("10.0.2.2", port)) == (A("10.0.2.2"), port)


def test_mapped_destinations_pass_the_deny_lists() -> None:
    """What the operator mapped goes where the operator said: the gateway (even link-local: the IPv6 router)
    to the host's loopback, a DNS forwarding address to its resolver, though deny lists cover them."""
    fwd = forwarding(deny=("10.0.0.0/8", "2001:db8::/32"), dns_forward=(("10.0.2.3", "127.0.0.53"),))
    assert fwd.target(FlowType.TCP, side("10.0.2.2")) == (A("127.0.0.1"), 80)
    assert fwd.target(FlowType.TCP, side("fe80::1")) == (A("::1"), 80)
    assert fwd.target(FlowType.UDP, side("10.0.2.3", 53)) == (A("127.0.0.53"), 53)
    assert refused(fwd, side("10.0.2.3", 80)) == DropReason.FLOW_DST_DENIED
    assert refused(fwd, side("2001:db8:5::1")) == DropReason.FLOW_DST_DENIED
    assert refused(fwd, side("192.0.2.1")) is None


def test_deny_list_and_allow_link_local() -> None:
    """--deny takes addresses and prefixes of both families (host bits allowed); --allow-link-local lifts the
    default refusal of link-local and metadata addresses, not the operator's own entries."""
    fwd = forwarding(deny=("192.0.2.7", "198.51.100.1/24", "2001:db8:1::/48"), allow_link_local=True)
    assert refused(fwd, side("192.0.2.7")) == DropReason.FLOW_DST_DENIED
    assert refused(fwd, side("192.0.2.8")) is None
    assert refused(fwd, side("198.51.100.200")) == DropReason.FLOW_DST_DENIED
    assert refused(fwd, side("2001:db8:1:ffff::1")) == DropReason.FLOW_DST_DENIED
    assert refused(fwd, side("2001:db8:2::1")) is None
    assert refused(fwd, side("169.254.169.254")) is None
    assert refused(fwd, side("fd00:ec2::254")) is None


def test_ports_and_sources() -> None:
    """TCP and UDP need a port; echo flows have none.  Sources must be the guest's unicast addresses."""
    fwd = forwarding()
    assert refused(fwd, side("192.0.2.7", 0)) == DropReason.FLOW_DST_UNSPECIFIED
    assert refused(fwd, side("192.0.2.7", 0), FlowType.UDP) == DropReason.FLOW_DST_UNSPECIFIED
    assert refused(fwd, side("192.0.2.7", 0), FlowType.PING4) is None
    for src in ("127.0.0.1", "0.0.0.0", "224.0.0.1", "::1", "::", "ff02::1"):
        dst = "192.0.2.7" if inany.is_v4(A(src)) else "2001:db8::7"
        assert refused(fwd, side(dst, src=src)) == DropReason.FLOW_BAD_SOURCE, src


def test_prefixes() -> None:
    """Prefix parsing: one 128-bit form for both families; garbage is a PolicyError."""
    assert parse_prefix("10.1.2.3/8") == parse_prefix("10.0.0.0/8")
    assert parse_prefix("0.0.0.0/0") != parse_prefix("::/0")
    for bad in ("", "10.0.0.0/33", "fe80::/129", "example.org", "1.2.3.4/x"):
        with pytest.raises(PolicyError):
            parse_prefix(bad)
    policy = FlowPolicy(("0.0.0.0/0",))
    with pytest.raises(PacketError):
        policy.egress(A("192.0.2.1"))
    policy.egress(A("2001:db8::1"))


# -- attacks, the way a guest makes them: frames through a running switch --------------------------------

#: A UDP echo server on the test namespace's loopback (both families), printing "ready".
UDP_ECHO = f"""
import socket, threading
def serve(family, host):
    s = socket.socket(family, socket.SOCK_DGRAM); s.bind((host, {UDP_PORT}))
    while True:
        data, peer = s.recvfrom(65535); s.sendto(data, peer)
for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
    threading.Thread(target=serve, args=(family, host), daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"""


def running_switch(tmp_path: Path, netns: TestNetns, *args: str, workers: int = 1) -> Switch:
    """A switch in ``netns`` with ``args`` (started by ``with``), the TCP servers and the UDP echo server
    listening on its loopback."""
    start_server(netns, SERVERS)
    start_server(netns, UDP_ECHO)
    return Switch(tmp_path, workers=workers, args=list(args), prefix=netns.exec_argv([]))


def udp_to(fe: VhostUserFrontend, dst: str, payload: bytes, port: int = UDP_PORT, sport: int = 40999) -> bool:
    """Send ``payload`` from the guest's ``sport`` to ``dst``:``port``; whether an echo of it came back."""
    v4 = inany.is_v4(A(dst))
    src = A(tcpkit.GUEST4 if v4 else tcpkit.GUEST6)
    fe.send_frame(0, flowframes.udp_frame(tcpkit.OUR_MAC, tcpkit.GUEST_MAC, src, A(dst), sport, port, payload,
                                          True))
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        frames = fe.recv_frames(0, timeout=0.2)
        fe.post_rx(0, len(frames))
        if any(payload in frame for frame in frames):
            return True
    return False


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_no_map_gw_keeps_the_hosts_loopback_out_of_reach(tmp_path: Path, netns: TestNetns, v6: bool) -> None:
    """--no-map-gw maps nothing: SYNs to the loopback and unspecified addresses, where services listen, are
    reset at once and counted; datagrams to them are dropped; no flow is made."""
    with running_switch(tmp_path, netns, "--no-map-gw") as sw, ready_frontend(sw, pairs=1, rx=64) as fe:
        targets = ("::1", "::") if v6 else ("127.0.0.1", "0.0.0.0")
        for n, dst in enumerate(targets):
            conn = tcpkit.GuestTcp(fe, tcpkit.ECHO, 41000 + n, v6=v6, dst=dst)
            conn.send(tcpkit.SYN, options=tcp.syn_options(1400, 7))
            (answer,) = conn.recv()
            assert answer.flags & tcpkit.RST and not answer.flags & tcpkit.SYN, dst
            assert not udp_to(fe, dst, b"probe %d" % n), dst
        assert sw.query("flows")["flows"] == []
        drops = sw.status()["workers"][0]["drops"]
        assert drops == {"FLOW_DST_LOOPBACK": 2, "FLOW_DST_UNSPECIFIED": 2}, drops


def test_the_default_mapping_still_reaches_the_loopback(tmp_path: Path, netns: TestNetns) -> None:
    """Without --no-map-gw the same services answer through the gateway, over TCP and UDP."""
    with running_switch(tmp_path, netns) as sw, ready_frontend(sw, pairs=1, rx=64) as fe:
        conn = tcpkit.GuestTcp(fe, tcpkit.ECHO, 41010)
        conn.connect()
        conn.send(tcpkit.ACK | tcpkit.PSH, b"through the gateway")
        assert conn.read(19) == b"through the gateway"
        assert udp_to(fe, tcpkit.GATEWAY4, b"udp through the gateway")


def test_v4_mapped_frames_cannot_kill_a_worker(tmp_path: Path, netns: TestNetns) -> None:
    """IPv6 SYNs to IPv4-mapped addresses (the gateway's, the loopback's) are dropped and counted at the IPv6
    parser; the worker lives on (same pid, no restart) and serves the next connection."""
    with running_switch(tmp_path, netns, workers=2) as sw, ready_frontend(sw, pairs=2, rx=64) as fe:
        pids = worker_pids(sw.status())
        for n, dst in enumerate(("::ffff:10.0.2.2", "::ffff:127.0.0.1")):
            conn = tcpkit.GuestTcp(fe, tcpkit.ECHO, 41020 + n, v6=True, dst=dst)
            conn.send(tcpkit.SYN, options=tcp.syn_options(1400, 7))
            assert conn.recv(timeout=0.5) == []
        status = sw.status()
        assert worker_pids(status) == pids and drops(status, 0)["IPV6_V4_MAPPED"] == 2
        assert all(w.get("restarts", 0) == 0 for w in status["workers"])
        conn = tcpkit.GuestTcp(fe, tcpkit.ECHO, 41030, v6=True)
        conn.connect()


def test_link_local_metadata_and_denied_destinations(tmp_path: Path, netns: TestNetns) -> None:
    """The cloud metadata address and other link-local ones are refused by default, the operator's --deny
    entries always: a RST before any socket exists (nothing leaves the namespace), counted by reason."""
    with (running_switch(tmp_path, netns, "--deny", "192.0.2.0/24", "--deny", "2001:db8:9::/48") as sw,
          ready_frontend(sw, pairs=1, rx=64) as fe):
        for n, (dst, v6) in enumerate((("169.254.169.254", False), ("192.0.2.80", False),
                                       ("2001:db8:9::1", True))):
            conn = tcpkit.GuestTcp(fe, 80, 41040 + n, v6=v6, dst=dst)
            conn.send(tcpkit.SYN, options=tcp.syn_options(1400, 7))
            (answer,) = conn.recv()
            assert answer.flags & tcpkit.RST, dst
        assert not udp_to(fe, "169.254.169.254", b"metadata?", port=80)
        drops = sw.status()["workers"][0]["drops"]
        assert drops == {"FLOW_DST_LINK_LOCAL": 2, "FLOW_DST_DENIED": 2}, drops


def test_the_guard_contains_a_crashing_socket_handler(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bug behind the v4-mapped attack, with the parser's check taken away: the SYN-ACK cannot be built
    in the socket handler; the flow layer's guard counts it and resets that connection, nothing else."""
    monkeypatch.setattr(ipv6, "V4_MAPPED_PREFIX", b"never matches")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    w = StandInWorker(GuestParams(address=tcpkit.GUEST4, prefix_len=24, gateway=tcpkit.GATEWAY4),
                      (tcpkit.GATEWAY4,))
    flows = TcpFlows(w, w.flows)
    flows.plug_into(w.endpoint)
    try:
        guest = Addressing(True, tcpkit.OUR_MAC, tcpkit.GUEST_MAC, socket.inet_pton(socket.AF_INET6, tcpkit.GUEST6),
                           socket.inet_pton(socket.AF_INET6, "::ffff:10.0.2.2"), 41050, listener.getsockname()[1])
        w.endpoint.handle_frame(memoryview(tcp.build(guest, 1000, 0, int(tcpkit.SYN), 65535)), time.monotonic(), [])
        assert len(w.flows.flows) == 1
        deadline = time.monotonic() + 3
        while w.flows.flows and time.monotonic() < deadline:
            w.poll()
        assert w.flows.flows == {} and w.counters.events[Event.FLOW_FAULT] == 1
        server, _ = listener.accept()
        server.settimeout(2)
        with pytest.raises(ConnectionResetError):
            server.recv(10)
        server.close()
    finally:
        flows.close()
        w.close()
        listener.close()


def _restored_side(dst: str, port: int, sport: int) -> tuple[fmt.Side, fmt.Side]:
    """The guest side (from the guest's ``sport`` to ``dst``:``port``) and a host side that names the same
    destination, as a source's document would."""
    return (fmt.Side(Pif.GUEST, A(tcpkit.GUEST4), sport, A(dst), port),
            fmt.Side(Pif.HOST, A(dst), port, inany.ANY6, 0))


def test_a_migration_source_cannot_name_where_flows_go(tmp_path: Path, netns: TestNetns) -> None:
    """Restored flows go through the same policy as new ones: a document asking for UDP and echo flows to
    the host's unmapped loopback (where a service listens) or to the metadata address, or a TCP connection
    whose host side is not where its guest side leads, gets none of them (counted per flow); the flow the
    guest could start itself is re-created and answers."""
    fake_socket = fmt.TcpSocketState(tcpi_state=1, tcpi_options=0, snd_ws=0, rcv_ws=0, mss=1400, timestamp=0,
                                     seq_snd=1, seq_rcv=1, snd_wl1=1, snd_wnd=65535, max_window=65535,
                                     rcv_wnd=65535, rcv_wup=1)
    tcp_guest = fmt.Side(Pif.GUEST, A(tcpkit.GUEST4), 5002, A("192.0.2.1"), 80)
    tcp_host = fmt.Side(Pif.HOST, A("127.0.0.1"), tcpkit.ECHO, A("127.0.0.1"), 45000)
    document = fmt.encode(fmt.DeviceState(pairs=[fmt.PairState(
        pair=0,
        tcp=[fmt.TcpState(guest=tcp_guest, host=tcp_host, isn=1, our_mss=1400, seq_to_guest=2,
                          seq_ack_from_guest=2, seq_from_guest=1001, seq_ack_to_guest=1001, mss=1400,
                          ws_from_guest=0, ws_to_guest=0, wnd_from_guest=65535, wnd_to_guest=65535, flags=0,
                          socket=fake_socket)],
        udp=[fmt.UdpState(*_restored_side("127.0.0.1", UDP_PORT, 5000)),
             fmt.UdpState(*_restored_side("169.254.169.254", 80, 5001)),
             fmt.UdpState(*_restored_side(tcpkit.GATEWAY4, UDP_PORT, 5003))],
        ping=[fmt.PingState(False, *_restored_side("127.0.0.1", 0, 77))])]))
    with running_switch(tmp_path, netns) as sw, \
            VhostUserFrontend.connect(sw.socket, queue_pairs=1, ignore=is_periodic_ra,
                                      protocol_features=STATE_FEATURES) as fe:
        fe.handshake()
        fe.post_rx(0, 64)
        bases = fe.stop_rings()
        assert load_state(fe, document) == 0
        fe.resume_rings(bases)
        (flow,) = sw.query("flows")["flows"]
        assert flow["type"] == "udp" and flow["sides"][0]["our_addr"] == tcpkit.GATEWAY4, flow
        assert events(sw.status(), 0)["MIGRATED_FLOW_REFUSED"] == 4
        assert udp_to(fe, tcpkit.GATEWAY4, b"restored", sport=5003)
        assert len(sw.query("flows")["flows"]) == 1
