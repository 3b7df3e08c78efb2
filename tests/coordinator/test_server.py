"""The coordinator process: socket files, client mode, clean shutdown."""

from __future__ import annotations

import os
import socket
import struct
from pathlib import Path

import pytest

from shardswitch.frontend.client import VhostUserFrontend
from tests.conftest import NOBODY
from tests.switch import Switch, assert_sandboxed, sandbox_status
from tests.switchkit import is_periodic_ra

GUEST_MAC = bytes.fromhex("525400123456")


def arp_request(target: str = "10.0.2.2") -> bytes:
    """An ARP who-has from the guest (10.0.2.15) for ``target``."""
    return (b"\xff" * 6 + GUEST_MAC + b"\x08\x06" + struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1)
            + GUEST_MAC + socket.inet_aton("10.0.2.15") + bytes(6) + socket.inet_aton(target))


def assert_arp_works(fe: VhostUserFrontend, pair: int = 0) -> None:
    """The gateway's ARP reply comes back on ``pair``."""
    fe.post_rx(pair, 8)
    fe.send_frame(pair, arp_request())
    frames = fe.recv_frames(pair, timeout=3.0)
    assert frames and frames[0][12:14] == b"\x08\x06" and frames[0][20:22] == b"\x00\x02", frames


def test_live_socket_is_refused(tmp_path: Path) -> None:
    """A second instance on a socket a live one serves exits with a clear message."""
    with Switch(tmp_path) as first:
        second = Switch(tmp_path)
        try:
            second.start()  # "up" at once: the control socket that answers is the first instance's
            assert second.proc is not None and second.proc.wait(15) == 1
            assert "is in use by a running process" in second.log()
        finally:
            second.stop()
        assert first.alive()
        assert os.path.exists(first.socket)  # the refused instance removed nothing
        first.status()


def test_stale_socket_is_replaced(tmp_path: Path) -> None:
    """A socket file nobody listens on (a dead instance's) is replaced."""
    path = tmp_path / "ss.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()
    with Switch(tmp_path) as switch, VhostUserFrontend.connect(switch.socket, ignore=is_periodic_ra) as fe:
        fe.handshake()
        assert_arp_works(fe)


def test_non_socket_file_is_never_replaced(tmp_path: Path) -> None:
    """A regular file at the socket path is left alone and reported."""
    path = tmp_path / "ss.sock"
    path.write_text("precious")
    with pytest.raises(RuntimeError, match="not a socket"):
        Switch(tmp_path).start()
    assert path.read_text() == "precious"


def test_sigterm_removes_socket_files(tmp_path: Path, nobody_dir: Path) -> None:
    """SIGTERM: exit status 0, both socket files gone, workers gone.  Started as root, the switch runs as
    nobody: its socket directory belongs to that user, as systemd's RuntimeDirectory= with User= makes it."""
    switch = Switch(tmp_path, workers=2, socket_path=str(nobody_dir / "ss.sock")).start()
    pids = [w["pid"] for w in switch.status()["workers"]]
    assert switch.stop() == 0
    assert not os.path.exists(switch.socket) and not os.path.exists(switch.control)
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]


def test_socket_left_in_a_root_directory_is_replaced_at_the_next_start(tmp_path: Path) -> None:
    """Running as nobody, the switch cannot remove its socket from a directory only root may change: it says
    so, and the next start replaces the stale socket."""
    switch = Switch(tmp_path).start()
    assert switch.stop() == 0
    assert os.path.exists(switch.socket)
    assert "cannot remove" in switch.log()
    with Switch(tmp_path) as again:
        assert again.status()["frontend"]["connected"] is False


def test_client_mode_connects_and_reconnects(tmp_path: Path, nobody_dir: Path) -> None:
    """--connect: the switch connects to a listening front-end, and again after it goes away (the front-end's
    socket is where the switch's user, nobody, may reach it)."""
    path = str(nobody_dir / "frontend.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    os.chown(path, NOBODY, NOBODY)
    listener.listen(1)
    listener.settimeout(10.0)
    try:
        with Switch(tmp_path, socket_path=path, connect=True) as switch:
            for _round in range(2):
                conn, _addr = listener.accept()
                with VhostUserFrontend(path, sock=conn) as fe:
                    fe.handshake()
                    assert_arp_works(fe)
                    assert switch.status()["frontend"]["connected"]
            assert switch.status()["mode"] == "client"
    finally:
        listener.close()


def test_service_switches_reach_the_workers(tmp_path: Path) -> None:
    """--no-dhcp and --no-icmp: a DHCP discover and an echo request are dropped (counted), nothing answered;
    ARP still works.  The discover, with no DHCP server to take it, is a UDP datagram from 0.0.0.0: the flow
    policy's FLOW_BAD_SOURCE."""
    from shardswitch.net import icmp
    from tests.net.net_testlib import DhcpTestClient, eth_frame, ip, ipv4_packet, rfc1071
    from tests.switchkit import drops, ready_frontend, wait_status

    echo = icmp.build_ping_request(7, 1, b"ping")
    echo = echo[:2] + struct.pack("!H", rfc1071(echo)) + echo[4:]
    ping = eth_frame(bytes.fromhex("9a559a559a55"), GUEST_MAC, 0x0800,
                     ipv4_packet(ip("10.0.2.15"), ip("10.0.2.2"), 1, echo))
    with Switch(tmp_path, workers=1, args=["--no-dhcp", "--no-icmp"]) as sw, ready_frontend(sw, pairs=1) as fe:
        fe.send_frames(0, [DhcpTestClient().discover(), ping])
        status = wait_status(sw, lambda s: sum(drops(s, 0).values()) >= 2, "both frames to be dropped")
        assert drops(status, 0) == {"FLOW_BAD_SOURCE": 1, "IP_PROTO_UNHANDLED": 1}
        assert fe.recv_frames(0, timeout=0.5) == []
        assert_arp_works(fe)



def test_periodic_router_advertisement_and_one_family(tmp_path: Path) -> None:
    """Worker 0 sends unsolicited RAs (to all-nodes), the first within MAX_INITIAL_RTR_ADVERT_INTERVAL of its
    RX ring running; -6 drops ARP as an unhandled EtherType, -4 a router solicitation."""
    from shardswitch.net import ndp
    from tests.net.ndpkit import rs_frame
    from tests.switchkit import drops, ready_frontend, wait_status

    def router_advertisements(fe: VhostUserFrontend, seconds: float) -> list[bytes]:
        """RA frames received on pair 0 within ``seconds``."""
        fe.post_rx(0, 8)
        frames = fe.recv_frames(0, timeout=seconds)
        return [f for f in frames if f[12:14] == b"\x86\xdd" and f[20] == 58 and f[54] == 134]

    with Switch(tmp_path, workers=2, args=["-6"]) as sw, ready_frontend(sw, keep_ra=True) as fe:
        (advert,) = router_advertisements(fe, ndp.MAX_INITIAL_RTR_ADVERT_INTERVAL + 3.0)
        assert advert[:6] == bytes.fromhex("333300000001") and advert[38:54] == socket.inet_pton(
            socket.AF_INET6, "ff02::1")
        fe.send_frames(0, [arp_request()])
        status = wait_status(sw, lambda s: sum(drops(s, 0).values()) >= 1, "the ARP request to be dropped")
        assert drops(status, 0) == {"ETHERTYPE_UNHANDLED": 1}
    with Switch(tmp_path, workers=1, args=["-4"]) as sw, ready_frontend(sw, pairs=1, keep_ra=True) as fe:
        fe.send_frames(0, [rs_frame()])
        status = wait_status(sw, lambda s: sum(drops(s, 0).values()) >= 1, "the solicitation to be dropped")
        assert drops(status, 0) == {"ETHERTYPE_UNHANDLED": 1}
        assert router_advertisements(fe, 1.0) == []
        assert_arp_works(fe)


def test_worker_setup_offers_every_service_by_default() -> None:
    """WorkerSetup's default services are the endpoint's Service.ALL (the message cannot import it)."""
    from shardswitch.ipc import WorkerSetup
    from shardswitch.net.endpoint import Service
    from shardswitch.net.params import GuestParams

    setup = WorkerSetup(pair=0, params=GuestParams(address="10.0.2.15", prefix_len=24, gateway="10.0.2.2"))
    assert setup.services == Service.ALL


def test_dhcpv6_through_the_switch(tmp_path: Path) -> None:
    """A Solicit with Rapid Commit gets its Reply (the IPv6 address given with -a) from a running switch;
    with --no-dhcpv6 it is dropped and counted, and RAs no longer set the Managed flag."""
    from scapy.layers.dhcp6 import DHCP6OptIA_NA, DHCP6OptRapidCommit

    from tests.net.dhcpv6kit import decode, only, solicit, udp6_frame
    from tests.net.ndpkit import rs_frame
    from tests.switchkit import drops, ready_frontend, wait_status

    with Switch(tmp_path, workers=2) as sw, ready_frontend(sw) as fe:
        fe.send_frames(1, [udp6_frame(solicit(DHCP6OptRapidCommit()))])
        (frame,) = fe.recv_frames(1, timeout=3.0)
        message, opts = decode(frame)
        assert message.msgtype == 7  # Reply
        assert only(opts, DHCP6OptIA_NA).ianaopts[0].addr == "2001:db8:2::15"
    with Switch(tmp_path, workers=1, args=["--no-dhcpv6"]) as sw, ready_frontend(sw, pairs=1) as fe:
        fe.send_frames(0, [udp6_frame(solicit(DHCP6OptRapidCommit()))])
        status = wait_status(sw, lambda s: sum(drops(s, 0).values()) >= 1, "the solicit to be dropped")
        assert fe.recv_frames(0, timeout=0.5) == []
        assert sum(drops(status, 0).values()) == 1, drops(status, 0)
        fe.send_frames(0, [rs_frame()])
        (advert,) = fe.recv_frames(0, timeout=3.0)
        assert advert[54] == 134 and advert[59] & 0xC0 == 0, advert.hex()  # an RA, neither M nor O


def test_open_file_limit_raised_to_the_hard_limit(tmp_path: Path) -> None:
    """Started with a low soft limit, the coordinator and its workers run at the hard limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = min(soft, 256, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))
    try:
        with Switch(tmp_path, workers=2) as sw:
            status = sw.status()
            for pid in [status["pid"]] + [w["pid"] for w in status["workers"]]:
                limits = open(f"/proc/{pid}/limits").read()
                line = next(l for l in limits.splitlines() if l.startswith("Max open files"))
                assert line.split()[3:5] == [str(hard), str(hard)], line
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_no_sandbox_keeps_privileges_and_says_so(tmp_path: Path) -> None:
    """--no-sandbox (debugging): the processes keep root and install no filter; the log and status say so.
    Without it the same start is sandboxed."""
    with Switch(tmp_path, workers=2, args=["--no-sandbox"]) as switch:
        status = switch.status()
        assert status["sandbox"] == {"enabled": False, "uid": 0, "gid": 0}
        for pid in [switch.pid] + [w["pid"] for w in status["workers"]]:
            fields = sandbox_status(pid)
            assert fields["Uid"].split()[0] == "0" and (fields["NoNewPrivs"], fields["Seccomp"]) == ("0", "0")
        assert "--no-sandbox: running with every privilege" in switch.log()
        with VhostUserFrontend.connect(switch.socket, queue_pairs=2, ignore=is_periodic_ra) as fe:
            fe.handshake()
            assert_arp_works(fe)
    with Switch(tmp_path, workers=2) as switch:
        assert_sandboxed(switch)
