"""passt's options, end to end: a real switch started with each, driven by the Python front-end.

Each test starts ``shardswitch start`` with the option (tests.switch.Switch, in a network namespace of its
own) and checks what a guest would see: the frames it gets back, the drops counted, the log, the process's
exit.  Frames come from scapy or the independent helpers of tests.net.net_testlib, never from the code
under test.
"""

from __future__ import annotations

import logging
from pathlib import Path

logging.getLogger("scapy.runtime").setLevel(logging.ERROR)

from scapy.layers.inet import IP, TCP, UDP  # noqa: E402
from scapy.layers.l2 import Ether  # noqa: E402

from shardswitch.frontend.client import VhostUserFrontend  # noqa: E402
from tests.net.ndpkit import ns_frame  # noqa: E402
from tests.net.net_testlib import (GUEST_MAC, OUR_MAC, DhcpTestClient, decode_dhcp_reply,  # noqa: E402
                                   decode_dns_names)
from tests.switch import Switch  # noqa: E402
from tests.switchkit import (GATEWAY_IP, GUEST_IP, STATE_FEATURES, arp_request, arp_roundtrip, drops,  # noqa: E402
                             is_periodic_ra, ready_frontend, save_state, wait_status, wait_until)


def _to_gateway(layer: object) -> bytes:
    """An IPv4 frame from the guest to the gateway carrying ``layer`` (scapy builds the checksums)."""
    return bytes(Ether(dst=OUR_MAC, src=GUEST_MAC) / IP(src=GUEST_IP, dst=GATEWAY_IP) / layer)


def test_no_tcp_and_no_udp_drop_and_count(tmp_path: Path) -> None:
    """--no-tcp / --no-udp: a SYN and a datagram are dropped (counted), nothing goes back; DHCP still
    answers, as in passt."""
    syn = _to_gateway(TCP(sport=40000, dport=80, flags="S"))
    datagram = _to_gateway(UDP(sport=40000, dport=9) / b"x")
    with Switch(tmp_path, args=["--no-tcp", "--no-udp"]) as sw, ready_frontend(sw, pairs=1) as fe:
        fe.send_frames(0, [syn, datagram])
        status = wait_status(sw, lambda s: sum(drops(s, 0).values()) >= 2, "both frames to be dropped")
        assert drops(status, 0) == {"IP_PROTO_UNHANDLED": 1, "UDP_PORT_UNHANDLED": 1}
        assert fe.recv_frames(0, timeout=0.5) == []
        fe.send_frames(0, [DhcpTestClient().discover()])
        (offer,) = fe.recv_frames(0, timeout=3.0)
        assert decode_dhcp_reply(offer).message_type == 2


def test_dhcp_offers_what_the_options_say(tmp_path: Path) -> None:
    """-H, --fqdn, --no-dhcp-dns, --no-dhcp-search, -m 0: the offer carries the host name (12) and the FQDN
    (81), and no DNS servers (6), search list (119) or MTU (26); without them it carries DNS and MTU."""
    args = ["-H", "vm1", "--fqdn", "vm1.example.org", "--no-dhcp-dns", "-S", "a.example", "--no-dhcp-search",
            "-m", "0"]
    with Switch(tmp_path, args=args) as sw, ready_frontend(sw, pairs=1) as fe:
        fe.send_frames(0, [DhcpTestClient().discover()])
        (frame,) = fe.recv_frames(0, timeout=3.0)
        offer = decode_dhcp_reply(frame)
        assert offer.options[12] == b"vm1"
        assert decode_dns_names(offer.options[81][3:]) == ["vm1.example.org"]
        assert not {6, 26, 119} & set(offer.options), offer.option_order
    with Switch(tmp_path, args=["-S", "a.example"]) as sw, ready_frontend(sw, pairs=1) as fe:
        fe.send_frames(0, [DhcpTestClient().discover()])
        (frame,) = fe.recv_frames(0, timeout=3.0)
        assert {6, 26, 119} <= set(decode_dhcp_reply(frame).options)


def test_no_icmp_implies_no_ndp(tmp_path: Path) -> None:
    """--no-icmp takes NDP with it, as passt's: a neighbour solicitation for our address goes unanswered
    (counted)."""
    from shardswitch.net import ipv6

    our_ll = ipv6.link_local_from_mac(OUR_MAC)
    with Switch(tmp_path, args=["--no-icmp"]) as sw, ready_frontend(sw, pairs=1) as fe:
        fe.send_frames(0, [ns_frame(our_ll)])
        status = wait_status(sw, lambda s: sum(drops(s, 0).values()) >= 1, "the solicitation to be dropped")
        assert drops(status, 0) == {"ICMPV6_IGNORED": 1}
        assert fe.recv_frames(0, timeout=0.5) == []


def test_trace_logs_every_frame(tmp_path: Path) -> None:
    """--trace: one line for the guest's ARP request and one for our reply, each with its direction."""
    with Switch(tmp_path, args=["--trace"]) as sw, ready_frontend(sw, pairs=1) as fe:
        arp_roundtrip(fe, 0)
        wait_until(lambda: "> guest ARP reply" in sw.log() or None, "the reply's trace line")
        assert f"guest > ARP request {GATEWAY_IP} tell {GUEST_IP}" in sw.log()


def test_one_off_exits_when_the_front_end_leaves(tmp_path: Path) -> None:
    """-1/--one-off: the switch serves the first front-end, then exits 0 once it has gone."""
    sw = Switch(tmp_path, args=["-1"]).start()
    try:
        with VhostUserFrontend.connect(sw.socket, queue_pairs=1) as fe:
            fe.handshake()
            fe.post_rx(0, 8)
            fe.send_frame(0, arp_request())
            assert fe.recv_frames(0, timeout=3.0)
        assert sw.proc is not None
        assert sw.proc.wait(10) == 0
        assert "exiting" in sw.log() or "stopping" in sw.log()
    finally:
        sw.stop()


def _state_frontend(sw: Switch) -> VhostUserFrontend:
    """A front-end that negotiated DEVICE_STATE (QEMU 10's migration) and completed the handshake."""
    fe = VhostUserFrontend.connect(sw.socket, queue_pairs=1, ignore=is_periodic_ra, protocol_features=STATE_FEATURES)
    fe.handshake()
    return fe


def test_migrate_exit(tmp_path: Path) -> None:
    """--migrate-exit: once QEMU is told the save succeeded, the source exits 0; without it, it serves on."""
    sw = Switch(tmp_path, args=["--migrate-exit"]).start()
    try:
        with _state_frontend(sw) as fe:
            save_state(fe)
            assert sw.proc is not None
            assert sw.proc.wait(10) == 0
        assert "migration complete: exiting" in sw.log()
    finally:
        sw.stop()
    with Switch(tmp_path) as sw, _state_frontend(sw) as fe:
        save_state(fe)
        wait_until(lambda: "migration complete" in sw.log() or None, "the completion to be logged")
        assert sw.alive() and sw.status()["pid"] == sw.pid


def test_passt_compatibility_flags_are_accepted(tmp_path: Path) -> None:
    """A passt command line's -f, -e and --vhost-user, and -s for the socket, start the switch as usual."""
    sock = str(tmp_path / "p.sock")
    with Switch(tmp_path, where=["-s", sock, "-f", "-e", "--vhost-user"], socket_path=sock) as sw, \
            ready_frontend(sw, pairs=1) as fe:
        arp_roundtrip(fe, 0)


def test_freebind_forwards_an_address_the_host_lacks(tmp_path: Path) -> None:
    """--freebind: -t on an address no interface has yet is bound (passt's IP_FREEBIND); without it the port
    is refused and logged, and the switch serves on."""
    spec = "192.0.2.77/8022"
    with Switch(tmp_path, args=["--freebind", "-t", spec]) as sw:
        status = sw.status()
        assert status["forwarding"]["ports"]["tcp"] == 1, status["forwarding"]
        assert status["workers"][0]["listeners"]["tcp"] == 1, status["workers"][0]
    with Switch(tmp_path, args=["-t", spec]) as sw:
        assert sw.status()["forwarding"]["ports"]["tcp"] == 0
        assert "-t port 8022: Cannot assign requested address" in sw.log()


def test_mac_and_netmask_reach_the_guest(tmp_path: Path) -> None:
    """-M: ARP replies come from that MAC; -a ADDR -n 16: the DHCP offer's netmask is 255.255.0.0; -a ADDR/LEN
    (passt's CIDR form) gives the same."""
    mac = "02:00:00:00:00:09"
    addressing = ["-a", GUEST_IP, "-n", "16", "-g", GATEWAY_IP]
    with Switch(tmp_path, addressing=addressing, args=["-M", mac]) as sw, ready_frontend(sw, pairs=1) as fe:
        fe.send_frames(0, [arp_request()])
        (reply,) = fe.recv_frames(0, timeout=3.0)
        assert reply[6:12] == bytes.fromhex(mac.replace(":", "")) and reply[22:28] == reply[6:12]
    with Switch(tmp_path, addressing=["-a", f"{GUEST_IP}/16", "-g", GATEWAY_IP]) as sw, \
            ready_frontend(sw, pairs=1) as fe:
        fe.send_frames(0, [DhcpTestClient().discover()])
        (frame,) = fe.recv_frames(0, timeout=3.0)
        offer = decode_dhcp_reply(frame)
        assert offer.options[1] == bytes((255, 255, 0, 0)) and offer.yiaddr == bytes((10, 0, 2, 15))


def test_no_ra_and_no_ndp(tmp_path: Path) -> None:
    """--no-ra: a router solicitation goes unanswered (counted) while neighbour solicitations are answered;
    --no-ndp: neither is."""
    from shardswitch.net import ipv6
    from tests.net.ndpkit import rs_frame

    our_ll = ipv6.link_local_from_mac(OUR_MAC)
    with Switch(tmp_path, args=["--no-ra"]) as sw, ready_frontend(sw, pairs=1) as fe:
        fe.send_frames(0, [rs_frame()])
        status = wait_status(sw, lambda s: sum(drops(s, 0).values()) >= 1, "the solicitation to be dropped")
        assert drops(status, 0) == {"NDP_IGNORED": 1}
        fe.send_frames(0, [ns_frame(our_ll)])
        (advert,) = fe.recv_frames(0, timeout=3.0)
        assert advert[54] == 136                       # a neighbour advertisement
    with Switch(tmp_path, args=["--no-ndp"]) as sw, ready_frontend(sw, pairs=1) as fe:
        fe.send_frames(0, [rs_frame(), ns_frame(our_ll)])
        status = wait_status(sw, lambda s: sum(drops(s, 0).values()) >= 2, "both solicitations to be dropped")
        assert drops(status, 0) == {"ICMPV6_IGNORED": 2}
        assert fe.recv_frames(0, timeout=0.5) == []


def test_quiet_logs_errors_only(tmp_path: Path) -> None:
    """-q: the start-up and a front-end's life leave no info or debug line in the log."""
    with Switch(tmp_path, args=["-q"], debug=False) as sw, ready_frontend(sw, pairs=1) as fe:
        arp_roundtrip(fe, 0)
    log = sw.log()
    assert " INFO: " not in log and " DEBUG: " not in log, log[-2000:]
    assert "QEMU options for this back-end" not in log
