"""Real guests on a dual-stack host with a stub resolver, with default options: IPv6 and DNS just work.

The test namespace (tests.guest.netns) is what users' hosts look like: IPv4 and
IPv6 on its uplink, an IPv6 default route via a link-local router, and a
resolv.conf naming 127.0.0.53, where dnsmasq answers.  shardswitch starts with
no addressing option at all and mirrors that host.  The guest (busybox, no
DHCPv6 client) takes its IPv4 lease from DHCP and its IPv6 address from the
router advertisement alone (SLAAC on the host's /64), as guests without a
DHCPv6 client do with passt.

Servers run in the upstream namespace on its own addresses (2001:db8:Y::1),
or on the host namespace's loopback for forwarded ports; nothing leaves the
test's namespaces.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.guest.dnskit import ANSWER, NAME, start_dnsmasq
from tests.guest.image import GuestImage
from tests.guest.netns import TestNetns
from tests.guest.servers import iperf_rate
from tests.guest.vm import GuestVM
from tests.switch import Switch

pytestmark = pytest.mark.guest

HTTP_PORT = 8006
DOWNLOAD_MB = 8
IPERF_PORT = 5206
#: Host port forwarded (-t) to the guest's iperf3 server.
FORWARDED = 5306

#: Guest shell: wait (up to 15 s) until eth0 has a global IPv6 address that finished DAD and an IPv6
#: default route, then print both.
WAIT_IPV6 = """
n=0
while [ $n -lt 150 ]; do
    if ip -6 addr show dev eth0 scope global | grep -q inet6 \\
            && ! ip -6 addr show dev eth0 scope global | grep -q tentative \\
            && ip -6 route show default | grep -q default; then
        break
    fi
    sleep 0.1; n=$((n + 1))
done
echo ADDR6: $(ip -6 addr show dev eth0 scope global | awk '/inet6/ {print $2}')
echo ROUTE6: $(ip -6 route show default)
"""


def switch_in(tmp_path: Path, netns: TestNetns, args: list[str] | None = None, workers: int = 2) -> Switch:
    """A switch in the host namespace with no addressing option: it mirrors the namespace."""
    return Switch(tmp_path, workers=workers, prefix=netns.exec_argv([]), addressing=[], args=args)


def wait_listening(netns: TestNetns, port: int, upstream: bool) -> None:
    """Wait until something listens on TCP ``port`` in the (upstream) namespace."""
    deadline = time.monotonic() + 10
    while netns.run(["sh", "-c", f"ss -Htln | grep -q ':{port} '"], upstream=upstream,
                    check=False).returncode:
        assert time.monotonic() < deadline, f"nothing listens on port {port}"
        time.sleep(0.1)


def serve_blob(netns: TestNetns, tmp_path: Path, size: int, *, upstream: bool = True) -> bytes:
    """An HTTP server serving ``/blob``, ``size`` random bytes (returned): on the upstream router's IPv6
    address, or (``upstream=False``) on the host namespace's 127.0.0.1."""
    root = tmp_path / "www"
    root.mkdir()
    blob = os.urandom(size)
    (root / "blob").write_bytes(blob)
    bind = netns.upstream_addr6 if upstream else "127.0.0.1"
    netns.popen([sys.executable, "-m", "http.server", "--bind", bind, "--directory", str(root), str(HTTP_PORT)],
                upstream=upstream, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_listening(netns, HTTP_PORT, upstream=upstream)
    return blob


def check_ipv6_config(output: str, netns: TestNetns) -> None:
    """The guest has a global address on the host's /64 and a default route via the host's router."""
    addr6 = output.split("ADDR6:", 1)[1].splitlines()[0].split()
    assert addr6, output
    assert ipaddress.IPv6Interface(addr6[0]).network == ipaddress.IPv6Network(f"{netns.prefix6}/64"), output
    assert f"ROUTE6: default via {netns.router6} dev eth0" in output, output


def test_default_options_on_a_dual_stack_host(tmp_path: Path, netns: TestNetns, guest_image: GuestImage) -> None:
    """No option: IPv4 lease, a global IPv6 address and default route, a name resolved with the server DHCP
    handed out, the upstream router pinged over IPv6, and an HTTP download over IPv6 with its checksum."""
    start_dnsmasq(netns, tmp_path)
    blob = serve_blob(netns, tmp_path, DOWNLOAD_MB << 20)
    script = f"""
dhcp || exit 1
{WAIT_IPV6}
echo RESOLV: $(grep nameserver /etc/resolv.conf)
nslookup {NAME} > /tmp/ns 2>&1
echo ==ns==; cat /tmp/ns; echo ==end==
ping6 -c 3 -W 5 {netns.upstream_addr6} > /tmp/ping 2>&1 && echo PING6-OK
cat /tmp/ping
echo DOWN=$(wget -q -O - http://[{netns.upstream_addr6}]:{HTTP_PORT}/blob | sha256sum | cut -d' ' -f1)
"""
    with switch_in(tmp_path, netns) as switch, \
            GuestVM(guest_image, script, socket=Path(switch.socket), queues=2, smp=2, netns=netns) as vm:
        assert vm.wait_exit(timeout=300) == 0, vm.output()
        output = vm.output()
        lease = vm.lease(timeout=1)
        assert lease.ip == netns.host_addr and lease.dns == (netns.upstream_addr,), output
        check_ipv6_config(output, netns)
        assert f"RESOLV: nameserver {netns.upstream_addr}" in output, output
        assert ANSWER in output.split("==ns==", 1)[1].split("==end==", 1)[0], output
        assert "PING6-OK" in output, output
        assert f"DOWN={hashlib.sha256(blob).hexdigest()}" in output, output
        status = switch.status()
        assert not any(w["drops"].get("INTERNAL_ERROR") for w in status["workers"]), status


def test_iperf3_over_ipv6_both_ways_and_a_forwarded_port(tmp_path: Path, netns: TestNetns,
                                                         guest_image: GuestImage) -> None:
    """iperf3 to and from a server on the upstream router's IPv6 address; then a host client on ::1 reaches
    the guest's iperf3 server through -t, over IPv6."""
    netns.popen(["iperf3", "-s", "-B", netns.upstream_addr6, "-p", str(IPERF_PORT)], upstream=True,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_listening(netns, IPERF_PORT, upstream=True)
    script = f"""
dhcp || exit 1
{WAIT_IPV6}
echo ==up==; iperf3 -6 -c {netns.upstream_addr6} -p {IPERF_PORT} -t 3 || exit 2
echo ==down==; iperf3 -6 -c {netns.upstream_addr6} -p {IPERF_PORT} -t 3 -R || exit 3
iperf3 -s -1 -p {FORWARDED} > /tmp/fwd 2>&1 &
sleep 1
echo FWD-READY
wait
echo ==fwd==; cat /tmp/fwd
"""
    with switch_in(tmp_path, netns, args=["-t", str(FORWARDED)]) as switch, \
            GuestVM(guest_image, script, socket=Path(switch.socket), queues=2, smp=2, netns=netns) as vm:
        vm.wait_for("FWD-READY", timeout=240)
        client = netns.run(["iperf3", "-6", "-c", "::1", "-p", str(FORWARDED), "-t", "3"], check=False)
        assert client.returncode == 0, (client.stdout, client.stderr, vm.output())
        assert vm.wait_exit(timeout=120) == 0, vm.output()
        output = vm.output()
        check_ipv6_config(output, netns)
        rates = {tag: iperf_rate(output, tag) for tag in ("up", "down")}
        rates["fwd"] = iperf_rate("==fwd==" + client.stdout, "fwd")
        print("iperf3 over IPv6, Mbit/s:", rates)
        assert all(rate > 0 for rate in rates.values()), output
        status = switch.status()
        assert not any(w["drops"].get("INTERNAL_ERROR") for w in status["workers"]), status


def test_ipv6_only(tmp_path: Path, netns: TestNetns, guest_image: GuestImage) -> None:
    """-6: no DHCPv4 lease; SLAAC address and route; a name resolved over IPv6 through the router's
    link-local address (forwarded to the stub resolver); ping6 and an HTTP download over IPv6."""
    start_dnsmasq(netns, tmp_path)
    blob = serve_blob(netns, tmp_path, 1 << 20)
    script = f"""
dhcp && echo GOT-LEASE
{WAIT_IPV6}
nslookup {NAME} {netns.router6}%eth0 > /tmp/ns 2>&1
echo ==ns==; cat /tmp/ns; echo ==end==
ping6 -c 2 -W 5 {netns.upstream_addr6} > /dev/null 2>&1 && echo PING6-OK
echo DOWN=$(wget -q -O - http://[{netns.upstream_addr6}]:{HTTP_PORT}/blob | sha256sum | cut -d' ' -f1)
"""
    with switch_in(tmp_path, netns, args=["-6"], workers=1) as switch, \
            GuestVM(guest_image, script, socket=Path(switch.socket), netns=netns) as vm:
        assert vm.wait_exit(timeout=300) == 0, vm.output()
        output = vm.output()
        assert "GOT-LEASE" not in output and "SS-LEASE-FAIL" in output, output
        check_ipv6_config(output, netns)
        assert ANSWER in output.split("==ns==", 1)[1].split("==end==", 1)[0], output
        assert "PING6-OK" in output, output
        assert f"DOWN={hashlib.sha256(blob).hexdigest()}" in output, output
        status = switch.status()
        assert status["workers"][0]["drops"].get("ETHERTYPE_UNHANDLED", 0) > 0, status


def test_ipv4_only(tmp_path: Path, netns: TestNetns, guest_image: GuestImage) -> None:
    """-4: the IPv4 lease and a download over IPv4 (from the host, through the gateway) as always; no router
    advertisement, so no global IPv6 address and no IPv6 route; IPv6 frames dropped and counted."""
    blob = serve_blob(netns, tmp_path, 1 << 20, upstream=False)
    script = f"""
dhcp || exit 1
sleep 4
echo ADDR6: $(ip -6 addr show dev eth0 scope global | awk '/inet6/ {{print $2}}')
echo ROUTE6: $(ip -6 route show default)
ping6 -c 1 -W 2 {netns.upstream_addr6} > /dev/null 2>&1 && echo PING6-OK
echo DOWN=$(wget -q -O - http://{netns.upstream_addr}:{HTTP_PORT}/blob | sha256sum | cut -d' ' -f1)
"""
    with switch_in(tmp_path, netns, args=["-4"], workers=1) as switch, \
            GuestVM(guest_image, script, socket=Path(switch.socket), netns=netns) as vm:
        assert vm.wait_exit(timeout=300) == 0, vm.output()
        output = vm.output()
        assert vm.lease(timeout=1).ip == netns.host_addr, output
        lines = [line.strip() for line in output.splitlines()]
        assert "ADDR6:" in lines and "ROUTE6:" in lines, output
        assert "PING6-OK" not in output, output
        assert f"DOWN={hashlib.sha256(blob).hexdigest()}" in output, output
        status = switch.status()
        assert status["workers"][0]["drops"].get("ETHERTYPE_UNHANDLED", 0) > 0, status
