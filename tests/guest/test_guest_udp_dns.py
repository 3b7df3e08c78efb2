"""A real guest resolves names through --dns-forward and echoes on a -u forwarded port.

dnsmasq serves ``test.example`` on 127.0.0.1:53 of the test namespace, which is
also what the namespace's resolv.conf names, so it is the resolver the switch
forwards the guest's queries to.  The host-side client of the forwarded port
runs in the same namespace and talks to 127.0.0.1 only.
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

#: The name dnsmasq answers, and its address.
NAME, ANSWER = "test.example", "10.9.8.7"
#: shardswitch's default MAC towards the guest.
OUR_MAC = "9a:55:9a:55:9a:55"
#: Host port forwarded with -u onto the guest's DHCP server port, and the host client's port (the DHCP client port).
HOST_PORT, GUEST_PORT, CLIENT_PORT = 16700, 67, 68

#: Busybox has no UDP nc: the guest's UDP service is udhcpd.  The host client sends a DHCPINFORM
#: whose ciaddr is the guest's gateway (where host-loopback clients appear to come from) and whose
#: chaddr is our MAC: udhcpd answers with a DHCPACK unicast to ciaddr port 68, which is the flow
#: of the forwarded port, back to this client.
CLIENT = r"""
import socket, struct, sys, time
gateway, our_mac, port = socket.inet_aton(sys.argv[1]), bytes.fromhex(sys.argv[2].replace(":", "")), int(sys.argv[3])
inform = (struct.pack("!BBBBIHH4s4s4s4s16s64s128sI", 1, 1, 6, 0, 0x5ca1ab1e, 0, 0, gateway, bytes(4), bytes(4),
                      bytes(4), our_mac + bytes(10), b"", b"", 0x63825363) + bytes((53, 1, 8, 255)))
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", int(sys.argv[4])))
s.settimeout(0.5)
deadline = time.monotonic() + float(sys.argv[5])
while time.monotonic() < deadline:
    s.sendto(inform, ("127.0.0.1", port))
    try:
        data, peer = s.recvfrom(1500)
    except socket.timeout:
        continue
    op, xid = data[0], struct.unpack_from("!I", data, 4)[0]
    options = data[240:]
    kind = options[options.index(bytes((53, 1))) + 2] if bytes((53, 1)) in options else 0
    print(f"REPLY op={op} xid={xid:#x} type={kind} from={peer[0]}:{peer[1]}")
    break
"""

#: The guest's udhcpd configuration (a pool in no particular subnet: INFORM leases nothing).
UDHCPD_CONF = """start 192.168.77.10
end 192.168.77.20
interface eth0
lease_file /tmp/udhcpd.leases
pidfile /tmp/udhcpd.pid
"""


def start_dnsmasq(netns: TestNetns, tmp_path: Path) -> None:
    """dnsmasq on 127.0.0.1:53 of ``netns`` answering NAME; returns once it listens."""
    netns.popen(["dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--port=53", "--listen-address=127.0.0.1",
                 "--bind-interfaces", "--no-resolv", "--no-hosts", f"--address=/{NAME}/{ANSWER}",
                 f"--pid-file={tmp_path / 'dnsmasq.pid'}", f"--dhcp-leasefile={tmp_path / 'dnsmasq.leases'}",
                 "--user=root"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while netns.run(["sh", "-c", "ss -Huln | grep -q '127.0.0.1:53 '"], check=False).returncode:
        assert time.monotonic() < deadline, "dnsmasq did not start"
        time.sleep(0.1)


def test_nslookup_through_dns_forward_and_udp_forwarded_port(tmp_path: Path, netns: TestNetns,
                                                             guest_image: GuestImage) -> None:
    """nslookup NAME DNSFWD answers ANSWER (DHCP offered DNSFWD); a -u port's guest service answers the host."""
    start_dnsmasq(netns, tmp_path)
    dnsfwd = netns.host_addr.rsplit(".", 1)[0] + ".53"
    script = f"""
dhcp || exit 1
echo RESOLV: $(grep nameserver /etc/resolv.conf)
nslookup {NAME} {dnsfwd} > /tmp/ns 2>&1
echo ==ns==; cat /tmp/ns; echo ==end==
printf '{UDHCPD_CONF}' > /tmp/udhcpd.conf
touch /tmp/udhcpd.leases
udhcpd -f /tmp/udhcpd.conf &
sleep 1
echo UDHCPD-READY
sleep 60
"""
    args = ["--dns-forward", dnsfwd, "-u", f"{HOST_PORT}:{GUEST_PORT}"]
    with Switch(tmp_path, workers=1, prefix=netns.exec_argv([]), addressing=[], args=args) as switch, \
            GuestVM(guest_image, script, socket=Path(switch.socket), netns=netns) as vm:
        vm.wait_for("UDHCPD-READY", timeout=240)
        output = vm.output()
        assert f"RESOLV: nameserver {dnsfwd}" in output, output
        answer = output.split("==ns==", 1)[1].split("==end==", 1)[0]
        assert ANSWER in answer, output
        done = netns.run([sys.executable, "-c", CLIENT, netns.upstream_addr, OUR_MAC, str(HOST_PORT),
                          str(CLIENT_PORT), "20"], timeout=40)
        reply = f"REPLY op=2 xid=0x5ca1ab1e type=5 from=127.0.0.1:{HOST_PORT}"
        assert done.stdout.strip() == reply, (done.stdout, done.stderr, vm.output())
        flows = switch.query("flows")["flows"]
        assert any(f["type"] == "udp" and f["sides"][0]["pif"] == "host" for f in flows), flows
