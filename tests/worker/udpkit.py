"""Helpers of the UDP tests that drive a switch as a scripted guest: addresses, frames to and from the guest, and
the UDP echo server of the test namespace (127.0.0.1 and ::1, and the stub resolver's 127.0.0.53 port 53)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from shardswitch.frontend.client import VhostUserFrontend
from shardswitch.net import ipv4, ipv6, udp
from shardswitch.net.udp import build_frame6, parse6
from shardswitch.worker.udptimeout import (NETFILTER_SYSCTLS, STREAM_FILE, TIMEOUT_FILE, Default, UdpTimeouts, clamp,
                                           parse_seconds)
from tests.guest.netns import TestNetns

GUEST_MAC = bytes.fromhex("525400123456")
OUR_MAC = bytes.fromhex("9a559a559a55")
GUEST4, GATEWAY4 = "10.0.2.15", "10.0.2.2"
GUEST6 = "fe80::5054:ff:fe12:3456"
ROUTER6 = "fe80::9855:9aff:fe55:9a55"
ECHO_PORT = 7007
A4 = ipv4.addr_from_str

ECHO_SERVER = r"""
import socket, select, sys
socks = []
for fam, addr, port in ((socket.AF_INET, "127.0.0.1", int(sys.argv[1])), (socket.AF_INET6, "::1", int(sys.argv[1])),
                        (socket.AF_INET, "127.0.0.53", 53)):
    s = socket.socket(fam, socket.SOCK_DGRAM)
    s.bind((addr, port))
    socks.append(s)
open(sys.argv[2], "w").close()
while True:
    for s in select.select(socks, [], [])[0]:
        data, peer = s.recvfrom(65535)
        s.sendto(b"echo:" + data, peer)
"""


def frame4(sport: int, dport: int, payload: bytes, dst: str = GATEWAY4) -> bytes:
    """An Ethernet/IPv4/UDP frame from the guest."""
    return udp.build_frame(OUR_MAC, GUEST_MAC, A4(GUEST4), A4(dst), sport, dport, payload)


def frame6(sport: int, dport: int, payload: bytes, dst: str = ROUTER6) -> bytes:
    """An Ethernet/IPv6/UDP frame from the guest."""
    return build_frame6(OUR_MAC, GUEST_MAC, ipv6.addr_from_str(GUEST6), ipv6.addr_from_str(dst), sport, dport,
                        payload)


def decode(frame: bytes) -> tuple[str, int, str, int, bytes]:
    """(source, source port, destination, destination port, payload) of a frame to the guest, checksums verified."""
    assert frame[:6] == GUEST_MAC and frame[6:12] == OUR_MAC
    view = memoryview(frame)[14:]
    if frame[12:14] == b"\x08\x00":
        p4 = ipv4.parse(view)
        d = udp.parse(p4)
        return ipv4.addr_to_str(p4.src), d.src_port, ipv4.addr_to_str(p4.dst), d.dst_port, bytes(d.payload)
    p6 = ipv6.parse(view)
    d = parse6(p6)
    return ipv6.addr_to_str(p6.src), d.src_port, ipv6.addr_to_str(p6.dst), d.dst_port, bytes(d.payload)


def start_echo_server(netns: TestNetns, tmp_path: Path) -> TestNetns:
    """Run the UDP echo server in ``netns`` (127.0.0.1 and ::1 port ECHO_PORT, and the stub resolver's
    127.0.0.53 port 53); returns ``netns`` once it listens."""
    ready = tmp_path / "echo.ready"
    netns.popen([sys.executable, "-c", ECHO_SERVER, str(ECHO_PORT), str(ready)])
    deadline = time.monotonic() + 10
    while not ready.exists():
        assert time.monotonic() < deadline, "echo server did not start"
        time.sleep(0.05)
    return netns


def received(fe: VhostUserFrontend, pair: int, expect: int, timeout: float = 5.0) -> list[tuple[str, int, str, int,
                                                                                             bytes]]:
    """The UDP frames to the guest on ``pair``, decoded; waits for ``expect`` of them."""
    got: list[tuple[str, int, str, int, bytes]] = []
    deadline = time.monotonic() + timeout
    while len(got) < expect and time.monotonic() < deadline:
        for frame in fe.recv_frames(pair, timeout=max(0.05, deadline - time.monotonic())):
            if frame[12:14] == b"\x08\x00" and frame[23] == 17 or frame[12:14] == b"\x86\xdd" and frame[20] == 17:
                got.append(decode(frame))
    return got


def conntrack_udp_timeouts(netns: TestNetns, timeout: int | None = None,
                           stream: int | None = None) -> UdpTimeouts:
    """The UDP flow timeouts a switch started in ``netns`` uses: the namespace's conntrack settings (set first to
    ``timeout`` / ``stream`` seconds when given, where the namespace has them: they are per network namespace),
    read as the switch reads them (passt's defaults when absent, clamped)."""
    folder = Path(NETFILTER_SYSCTLS)
    for name, value in ((TIMEOUT_FILE, timeout), (STREAM_FILE, stream)):
        if value is not None:
            netns.run(["sh", "-c", f"echo {int(value)} > {folder / name}"], check=False)
    used = []
    for name, default in ((TIMEOUT_FILE, Default.TIMEOUT), (STREAM_FILE, Default.STREAM)):
        done = netns.run(["cat", str(folder / name)], check=False)
        value = parse_seconds(done.stdout.encode()) if done.returncode == 0 else None
        used.append(int(default) if value is None else clamp(value))
    return UdpTimeouts(*used)
