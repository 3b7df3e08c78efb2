"""A root-started switch gives up its privileges, and its guest still gets all of its network.

As systemd and libvirt do, the test starts ``shardswitch start`` as root
(inside the test's namespace).  Every process of the switch must then show,
in /proc/PID/status, a non-root user, no capability, NoNewPrivs 1 and
Seccomp 2 (filter mode), while a real guest gets its DHCP lease, pings
its gateway, resolves a name (UDP, through the host's stub resolver),
downloads a file (TCP) and serves a forwarded port (-t) to a host client.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import pytest

from tests.guest.dnskit import ANSWER, NAME, start_dnsmasq
from tests.guest.image import GuestImage
from tests.guest.netns import TestNetns
from tests.guest.servers import HTTP_PORT, NC_CLIENT, serve_blob
from tests.guest.vm import GuestVM
from tests.switch import Switch, assert_sandboxed, sandbox_status
from tests.guest.scripts import GATEWAY

pytestmark = pytest.mark.guest

#: A forwarded port below 1024: binding it needs root, which the switch gives up right after.
FORWARDED = 80
BLOB_MB = 8


def test_root_start_drops_privileges_and_serves_the_guest(tmp_path: Path, netns: TestNetns,
                                                          guest_image: GuestImage) -> None:
    """Started as root with -t 80: every process runs as nobody with no capability, no_new_privs and a
    seccomp filter; the guest gets its lease, ping, DNS over UDP, a TCP download and the forwarded port."""
    start_dnsmasq(netns, tmp_path)
    blob = serve_blob(netns, tmp_path, BLOB_MB)
    script = f"""
dhcp || exit 1
{GATEWAY}
ping -c 2 -W 3 $gw > /dev/null && echo PING-OK
nslookup {NAME} > /tmp/ns 2>&1
echo ==ns==; cat /tmp/ns; echo ==end==
echo DOWN=$(wget -q -O - http://$gw:{HTTP_PORT}/blob | sha256sum | cut -d' ' -f1)
echo from-guest | nc -l -p {FORWARDED} > /tmp/nc &
sleep 1
echo NC-READY
wait
echo NC-GOT=$(cat /tmp/nc)
"""
    assert os.geteuid() == 0, "started as root, as systemd and libvirt start it"
    with Switch(tmp_path, workers=2, prefix=netns.exec_argv([]), addressing=[],
                args=["-t", str(FORWARDED)]) as switch, \
            GuestVM(guest_image, script, socket=Path(switch.socket), queues=2, smp=2, netns=netns) as vm:
        assert_sandboxed(switch)
        assert sandbox_status(switch.pid)["Uid"].split()[0] == "65534"
        vm.wait_for("NC-READY", timeout=240)
        nc = netns.run([sys.executable, "-c", NC_CLIENT, str(FORWARDED)], timeout=30)
        assert nc.stdout.strip() == "from-guest", (nc.stdout, nc.stderr, vm.output())
        assert vm.wait_exit(timeout=240) == 0, vm.output()
        output = vm.output()
        assert "PING-OK" in output, output
        assert ANSWER in output.split("==ns==", 1)[1].split("==end==", 1)[0], output
        assert f"DOWN={hashlib.sha256(blob).hexdigest()}" in output, output
        assert "NC-GOT=from-host" in output, output
        assert_sandboxed(switch)
        status = switch.status()
        assert all(w["restarts"] == 0 for w in status["workers"]), status
        assert not any(w["drops"].get("INTERNAL_ERROR") for w in status["workers"]), status
