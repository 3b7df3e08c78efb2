"""passt's behaviours a real guest sees: local mode on a host without a default route, the host name by DHCP.

The switch and QEMU run in the test's own namespaces; the guest talks only to
its gateway, which the switch maps to that namespace's loopback.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.guest.image import GuestImage
from tests.guest.netns import TestNetns
from tests.guest.scripts import GATEWAY
from tests.guest.servers import HTTP_PORT, start_http
from tests.guest.vm import GuestVM
from tests.switch import Switch

pytestmark = pytest.mark.guest


def test_local_mode_without_a_default_route(tmp_path: Path, netns: TestNetns, guest_image: GuestImage) -> None:
    """A host with no default route at all (an offline laptop, a CI job without a network): `shardswitch start`
    with no addressing option runs, as passt does, and the guest gets 169.254.2.1/16 via 169.254.2.2 by DHCP,
    pings its gateway and reaches a server on the host's loopback through it."""
    for family in ("-4", "-6"):
        netns.run(["ip", family, "route", "del", "default"])
    assert "default" not in netns.run(["ip", "route", "show"]).stdout + netns.run(["ip", "-6", "route"]).stdout
    root = tmp_path / "www"
    root.mkdir()
    (root / "hello").write_text("local-mode-ok\n")
    start_http(netns, root)
    script = f"""
dhcp || exit 1
{GATEWAY}
ping -c 2 -W 5 $gw > /dev/null && echo PING-OK
echo BODY=$(wget -q -O - http://$gw:{HTTP_PORT}/hello)
"""
    with Switch(tmp_path, prefix=netns.exec_argv([]), addressing=[]) as switch, \
            GuestVM(guest_image, script, socket=Path(switch.socket), netns=netns) as vm:
        lease = vm.lease(timeout=240)
        assert (lease.ip, lease.prefixlen, lease.router) == ("169.254.2.1", 16, "169.254.2.2")
        assert vm.wait_exit(timeout=240) == 0, vm.output()
        output = vm.output()
        assert "PING-OK" in output and "BODY=local-mode-ok" in output, output
        assert "local mode" in switch.log()


def test_hostname_reaches_the_guest(tmp_path: Path, netns: TestNetns, guest_image: GuestImage) -> None:
    """-H: the guest's DHCP client gets the host name (option 12) with its lease."""
    with Switch(tmp_path, prefix=netns.exec_argv([]), addressing=[], args=["-H", "vm-under-test"]) as switch, \
            GuestVM(guest_image, "dhcp || exit 1\n", socket=Path(switch.socket), netns=netns) as vm:
        lease = vm.lease(timeout=240)
        assert lease.hostname == "vm-under-test"
        assert lease.ip == netns.host_addr
        assert vm.wait_exit(timeout=240) == 0, vm.output()
