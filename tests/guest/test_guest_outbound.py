"""Real guest: --outbound-if4 and -o choose the interface and source address of the host's sockets.

The test adds a second link to the test namespaces, so the host has two ways
upstream::

    [host ns]  uplink0 10.200.Y.2, 2001:db8:Y::2 (+ ::3)  --veth--  downlink0 (+ 10.200.Y.3)  [upstream ns]
               uplink1 10.201.Y.2                       --veth--  downlink1 10.201.Y.1
               default via 10.200.Y.1 (metric 0), default via 10.201.Y.1 dev uplink1 (metric 200)

A server in the upstream namespace answers each TCP connection with the
address it came from.  With ``--outbound-if4 uplink1`` the guest mirrors
uplink1's addressing (10.201.Y.2 via 10.201.Y.1, as passt), and its IPv4
connection to 10.200.Y.3 must leave through uplink1 (source 10.201.Y.2,
though that address is on uplink0's link); with ``-o 2001:db8:Y::3`` its IPv6 connection
must come from that address.  Traffic to the gateway (the host's loopback)
is never bound, so it still works.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.guest.image import GuestImage
from tests.guest.netns import TestNetns
from tests.guest.vm import GuestVM
from tests.switch import Switch

pytestmark = pytest.mark.guest

PEER_PORT = 7007
LOOPBACK_PORT = 7008

#: Answers every TCP connection with "peer=<address it came from>" (IPv4 and IPv6, on every address).
PEER_SERVER = r"""
import socket, sys, threading
def serve(family, addr, port):
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind((addr, port)); s.listen(8)
    while True:
        c, peer = s.accept()
        c.sendall(f"peer={peer[0]}\n".encode()); c.close()
port = int(sys.argv[1])
threading.Thread(target=serve, args=(socket.AF_INET6, "::", port), daemon=True).start()
serve(socket.AF_INET, sys.argv[2], port)
"""


def server4(netns: TestNetns) -> str:
    """The upstream server's extra IPv4 address, on uplink0's link."""
    return netns.upstream_addr.rsplit(".", 1)[0] + ".3"


def add_second_uplink(netns: TestNetns, subnet: str) -> None:
    """uplink1 <-> downlink1 with ``subnet``.2/.1 and a second, worse default route through it; an extra
    IPv6 address (::3) on uplink0 and an extra IPv4 address (.3) on downlink0."""
    h, u = netns.name, netns.upstream_name
    for argv in (["-n", h, "link", "add", "uplink1", "type", "veth", "peer", "name", "downlink1", "netns", u],
                 ["-n", h, "addr", "add", f"{subnet}.2/24", "dev", "uplink1"],
                 ["-n", u, "addr", "add", f"{subnet}.1/24", "dev", "downlink1"],
                 ["-n", h, "link", "set", "uplink1", "up"],
                 ["-n", u, "link", "set", "downlink1", "up"],
                 ["-n", h, "route", "add", "default", "via", f"{subnet}.1", "dev", "uplink1", "metric", "200"],
                 ["-n", h, "addr", "add", f"{netns.prefix6}3/64", "dev", netns.host_if, "nodad"],
                 ["-n", u, "addr", "add", f"{server4(netns)}/24", "dev", netns.upstream_if]):
        subprocess.run(["ip", *argv], check=True, capture_output=True, timeout=20)


def test_outbound_interface_and_source_address(tmp_path: Path, netns: TestNetns, guest_image: GuestImage) -> None:
    """--outbound-if4 uplink1: the guest's IPv4 addressing is uplink1's, as passt's, and its IPv4 connections
    leave through uplink1; -o ADDR6: IPv6 ones come from ADDR6 (IPv6 is still mirrored from the default
    route's interface); the gateway (the host's loopback) is still reached."""
    subnet = "10.201." + netns.host_addr.split(".")[2]
    add_second_uplink(netns, subnet)
    source6 = f"{netns.prefix6}3"
    netns.popen([sys.executable, "-c", PEER_SERVER, str(PEER_PORT), "0.0.0.0"], upstream=True)
    netns.popen([sys.executable, "-c", PEER_SERVER, str(LOOPBACK_PORT), "127.0.0.1"])
    deadline = time.monotonic() + 10
    while netns.run(["sh", "-c", f"ss -Htln | grep -q ':{PEER_PORT} '"], upstream=True, check=False).returncode:
        assert time.monotonic() < deadline, "peer server did not start"
        time.sleep(0.1)
    script = f"""
dhcp || exit 1
n=0
while [ $n -lt 150 ] && ! ip -6 route show default | grep -q default; do sleep 0.1; n=$((n + 1)); done
sleep 2
echo V4 $(nc {server4(netns)} {PEER_PORT} < /dev/null)
echo V6 $(nc {netns.upstream_addr6} {PEER_PORT} < /dev/null)
gw=$(ip route | awk '/default/ {{print $3}}')
echo GW $(nc $gw {LOOPBACK_PORT} < /dev/null)
"""
    args = ["--outbound-if4", "uplink1", "-o", source6]
    with Switch(tmp_path, workers=1, prefix=netns.exec_argv([]), addressing=[], args=args) as switch, \
            GuestVM(guest_image, script, socket=Path(switch.socket), netns=netns) as vm:
        lease = vm.lease(timeout=240)
        assert (lease.ip, lease.router) == (f"{subnet}.2", f"{subnet}.1")
        assert vm.wait_exit(timeout=240) == 0, vm.output()
        output = vm.output()
        assert f"V4 peer={subnet}.2" in output, output
        assert f"V6 peer={source6}" in output, output
        assert "GW peer=127.0.0.1" in output, output
