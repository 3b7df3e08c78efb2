"""Real guest: what the host's loopback is reachable through.  With the default mapping the guest reaches a
service bound to the host's loopback only through its gateway, over TCP and UDP; with --no-map-gw it cannot
reach it at all (its gateway is then the real router: the test's upstream namespace).

A server in the host namespace listens on 127.0.0.1 only: TCP answers "loopback-tcp", UDP records every
datagram it gets (on a few ports: busybox's traceroute, the guest's UDP client, numbers its probes from its
base port).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from tests.guest.image import GuestImage
from tests.guest.netns import TestNetns
from tests.guest.vm import GuestVM
from tests.switch import Switch

pytestmark = pytest.mark.guest

TCP_PORT = 7301
UDP_PORT = 7310
UDP_PORTS = 4

#: The loopback-only service: argv TCP_PORT UDP_PORT COUNT RECORD-FILE; prints "ready".
LOOPBACK_SERVICE = r"""
import socket, sys, threading
tcp_port, udp_port, count, record = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
def tcp():
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", tcp_port)); s.listen(8)
    while True:
        c, _ = s.accept(); c.sendall(b"loopback-tcp\n"); c.close()
def udp(port):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1", port))
    while True:
        s.recvfrom(65535)
        with open(record, "a") as f:
            f.write(f"udp {port}\n")
threading.Thread(target=tcp, daemon=True).start()
for p in range(udp_port, udp_port + count):
    threading.Thread(target=udp, args=(p,), daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"""


@pytest.mark.parametrize("mapped", [True, False], ids=["default", "no-map-gw"])
def test_the_hosts_loopback_only_through_a_mapped_gateway(tmp_path: Path, netns: TestNetns,
                                                          guest_image: GuestImage, mapped: bool) -> None:
    """Default: the gateway leads to the loopback service (TCP answer, UDP datagrams arrive).  --no-map-gw: the
    same requests reach nothing on the host's loopback."""
    record = tmp_path / "udp.record"
    server = netns.popen([sys.executable, "-c", LOOPBACK_SERVICE, str(TCP_PORT), str(UDP_PORT), str(UDP_PORTS),
                          str(record)], stdout=-1)
    assert server.stdout is not None and server.stdout.readline().strip() == b"ready"
    gateway = netns.upstream_addr
    script = f"""
dhcp || exit 1
echo TCP=$(nc -w 3 {gateway} {TCP_PORT} < /dev/null)
traceroute -n -m 1 -q 1 -w 1 -p {UDP_PORT} {gateway} > /dev/null 2>&1
traceroute -n -m 1 -q 1 -w 1 -p {UDP_PORT - 1} {gateway} > /dev/null 2>&1
echo PROBED
"""
    args = [] if mapped else ["--no-map-gw"]
    with Switch(tmp_path, workers=1, prefix=netns.exec_argv([]), addressing=[], args=args) as switch, \
            GuestVM(guest_image, script, socket=Path(switch.socket), netns=netns) as vm:
        assert vm.wait_exit(timeout=240) == 0, vm.output()
        output = vm.output()
        assert "PROBED" in output, output
        if mapped:
            assert "TCP=loopback-tcp" in output, output
            deadline = time.monotonic() + 5
            while not record.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert record.exists(), output
        else:
            assert "TCP=\n" in output.replace("\r", ""), output
            assert not record.exists(), record.read_text()
            assert all(side["ep_addr"] != "127.0.0.1" for flow in switch.query("flows")["flows"]
                       for side in flow["sides"])
