"""A real guest resolves names through --dns-forward, and with default options behind a stub resolver on
127.0.0.53 (as systemd-resolved hosts have); it echoes on a -u forwarded port.

dnsmasq (tests/guest/dnskit.py) serves ``test.example`` on 127.0.0.53:53 of the
test namespace, the stub resolver the namespace's resolv.conf names, so it is
the resolver the switch forwards the guest's queries to.  The host-side client of the forwarded port
runs in the same namespace and talks to 127.0.0.1 only.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.guest.dnskit import ANSWER, NAME, start_dnsmasq
from tests.guest.image import GuestImage
from tests.guest.netns import TestNetns
from tests.guest.vm import GuestVM
from tests.switch import Switch

pytestmark = pytest.mark.guest

#: Host port forwarded with -u onto the guest's UDP echo server (tests/guest/udpecho.c).
HOST_PORT, GUEST_PORT = 16700, 7000

#: The host-side client: sends numbered datagrams to the forwarded port until one comes back.
CLIENT = r"""
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(0.5)
deadline = time.monotonic() + float(sys.argv[2])
n = 0
while time.monotonic() < deadline:
    n += 1
    s.sendto(b"echo-%d" % n, ("127.0.0.1", int(sys.argv[1])))
    try:
        data, peer = s.recvfrom(1500)
    except socket.timeout:
        continue
    print(f"ECHO {data.decode()} from={peer[0]}:{peer[1]}")
    break
"""


def test_nslookup_through_dns_forward_and_udp_forwarded_port(tmp_path: Path, netns: TestNetns,
                                                             guest_image: GuestImage) -> None:
    """nslookup NAME DNSFWD answers ANSWER (DHCP offered DNSFWD); a -u forwarded port echoes."""
    start_dnsmasq(netns, tmp_path)
    dnsfwd = netns.host_addr.rsplit(".", 1)[0] + ".53"
    script = f"""
dhcp || exit 1
echo RESOLV: $(grep nameserver /etc/resolv.conf)
nslookup {NAME} {dnsfwd} > /tmp/ns 2>&1
echo ==ns==; cat /tmp/ns; echo ==end==
udpecho {GUEST_PORT} &
sleep 1
echo ECHO-READY
sleep 60
"""
    args = ["--dns-forward", dnsfwd, "-u", f"{HOST_PORT}:{GUEST_PORT}"]
    with Switch(tmp_path, workers=1, prefix=netns.exec_argv([]), addressing=[], args=args) as switch, \
            GuestVM(guest_image, script, socket=Path(switch.socket), netns=netns) as vm:
        vm.wait_for("ECHO-READY", timeout=240)
        output = vm.output()
        assert f"RESOLV: nameserver {dnsfwd}" in output, output
        answer = output.split("==ns==", 1)[1].split("==end==", 1)[0]
        assert ANSWER in answer, output
        done = netns.run([sys.executable, "-c", CLIENT, str(HOST_PORT), "20"], timeout=40)
        assert done.stdout.startswith("ECHO echo-") and done.stdout.strip().endswith(f"from=127.0.0.1:{HOST_PORT}"), \
            (done.stdout, done.stderr, vm.output())
        flows = switch.query("flows")["flows"]
        assert any(f["type"] == "udp" and f["sides"][0]["pif"] == "host" for f in flows), flows


def test_nslookup_with_default_options_behind_a_stub_resolver(tmp_path: Path, netns: TestNetns,
                                                             guest_image: GuestImage) -> None:
    """The host's resolv.conf names only 127.0.0.53 (dnsmasq there): with no option at all the guest is offered
    the gateway as DNS server by DHCP, and a plain nslookup through it answers."""
    start_dnsmasq(netns, tmp_path)
    script = f"""
dhcp || exit 1
echo RESOLV: $(grep nameserver /etc/resolv.conf)
nslookup {NAME} > /tmp/ns 2>&1
echo ==ns==; cat /tmp/ns; echo ==end==
"""
    with Switch(tmp_path, workers=1, prefix=netns.exec_argv([]), addressing=[]) as switch, \
            GuestVM(guest_image, script, socket=Path(switch.socket), netns=netns) as vm:
        vm.wait_for("==end==", timeout=240)
        output = vm.output()
        assert f"RESOLV: nameserver {netns.upstream_addr}" in output, output
        assert ANSWER in output.split("==ns==", 1)[1].split("==end==", 1)[0], output
