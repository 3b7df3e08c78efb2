"""QEMU 10 (bookworm-backports, unpacked by scripts/install-qemu10.sh beside Debian's 7.2) on shardswitch.

Device-state migration needs QEMU 10; everything else is tested on 7.2, what
Debian 12 users run.  This test checks that a QEMU 10 guest gets its network
from shardswitch as a 7.2 guest does: two queue pairs, the lease, ping, a TCP
download whose checksum matches.
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest

from tests.conftest import in_ci
from tests.guest.image import GuestImage
from tests.guest.netns import TestNetns
from tests.guest.servers import HTTP_PORT, serve_blob
from tests.guest.vm import GuestVM, qemu10
from tests.switch import Switch
from tests.guest.scripts import GATEWAY

pytestmark = pytest.mark.guest

BLOB_MB = 4


def test_qemu10_guest_gets_its_network(tmp_path: Path, netns: TestNetns, guest_image: GuestImage) -> None:
    """QEMU 10.0, queues=2: lease, ping, and a TCP download with a matching sha256."""
    binary = qemu10()[0]
    if not Path(binary).exists():
        missing = f"{binary} missing: scripts/install-qemu10.sh unpacks it (make test runs it)"
        if in_ci():
            pytest.fail(missing + " (CI=true: real-guest tests must not skip)", pytrace=False)
        pytest.skip(missing)
    version = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30).stdout
    assert "version 10." in version, version
    blob = serve_blob(netns, tmp_path, BLOB_MB)
    script = f"""
dhcp || exit 1
{GATEWAY}
ping -c 2 -W 3 $gw > /dev/null && echo PING-OK
echo DOWN=$(wget -q -O - http://$gw:{HTTP_PORT}/blob | sha256sum | cut -d' ' -f1)
"""
    with Switch(tmp_path, workers=2, prefix=netns.exec_argv([]), addressing=[]) as switch, \
            GuestVM(guest_image, script, socket=Path(switch.socket), queues=2, smp=2, netns=netns,
                    qemu=qemu10()) as vm:
        lease = vm.lease(timeout=240)
        assert lease.ip == netns.host_addr
        assert vm.wait_exit(timeout=240) == 0, vm.output()
        output = vm.output()
        assert "PING-OK" in output, output
        assert f"DOWN={hashlib.sha256(blob).hexdigest()}" in output, output
        status = switch.status()
        assert sum(w["tx_frames"] for w in status["workers"]) > 0, status
        assert not any(w["restarts"] for w in status["workers"]), status
