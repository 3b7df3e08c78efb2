"""Real guests behind forwarded ports: a rule that names a target address inside the guest, and rules added
and removed while the switch runs.

The host clients run in the test's namespace (tests/guest/forwardkit.py) and connect to its loopback; the
switch forwards them to the guest.  The second address the guest takes, 192.0.2.5 (TEST-NET-1), exists
only inside the guest: frames to it go from the switch to the guest over the vhost-user rings, and the
guest's answers to the client (which appears as the gateway) come back the same way; nothing leaves the
test's namespaces.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.guest.forwardkit import HostClient
from tests.guest.image import GuestImage
from tests.guest.netns import TestNetns
from tests.guest.vm import GuestVM
from tests.switch import Switch

pytestmark = pytest.mark.guest

#: The guest's second address, the target of the rule.
TARGET = "192.0.2.5"
#: Host port -> the target's port 6000; host port -> the guest's own address, port 6000.
TO_TARGET, TO_OWN = 5000, 5001
GUEST_PORT = 6000
#: The guest's echo server, and the host port forwarded to it at run time.
ECHO_PORT = 7000


def forward_cli(switch: Switch, *args: str) -> subprocess.CompletedProcess[str]:
    """``shardswitch forward ARGS --control ...`` as an operator types it."""
    return subprocess.run([sys.executable, "-m", "shardswitch", "forward", *args, "--control", switch.control],
                          capture_output=True, text=True, timeout=30, check=False)


def test_forward_to_a_target_address_inside_the_guest(tmp_path: Path, netns: TestNetns,
                                                      guest_image: GuestImage) -> None:
    """-t 0.0.0.0/5000:192.0.2.5/6000 reaches a server the guest binds to its second address only; the same
    port at the guest's own address (-t 0.0.0.0/5001:6000) finds nothing there."""
    script = f"""
dhcp || exit 1
ip addr add {TARGET}/32 dev eth0 || exit 2
mkdir -p /www && echo served-by-{TARGET} > /www/id
httpd -f -p {TARGET}:{GUEST_PORT} -h /www &
sleep 1
echo FWD-READY
sleep 600
"""
    args = ["-t", f"0.0.0.0/{TO_TARGET}:{TARGET}/{GUEST_PORT}", "-t", f"0.0.0.0/{TO_OWN}:{GUEST_PORT}"]
    with Switch(tmp_path, workers=1, prefix=netns.exec_argv([]), addressing=[], args=args) as switch, \
            GuestVM(guest_image, script, socket=Path(switch.socket), netns=netns) as vm:
        vm.wait_for("FWD-READY", timeout=240)
        client = HostClient(netns)
        assert client.http(TO_TARGET, "/id") == f"served-by-{TARGET}", vm.output()
        assert "served-by" not in client.http(TO_OWN, "/id")
        listed = forward_cli(switch, "list")
        assert listed.stdout.splitlines() == [f"-t 0.0.0.0/{TO_TARGET}:{TARGET}/{GUEST_PORT}",
                                              f"-t 0.0.0.0/{TO_OWN}:{GUEST_PORT}"], listed


def test_forward_added_and_removed_at_run_time(tmp_path: Path, netns: TestNetns, guest_image: GuestImage) -> None:
    """Two queue pairs: `forward add -t 7000` reaches the guest's echo server at once, through both workers;
    `forward remove` refuses new connections while an established one carries on, both ways."""
    script = f"""
dhcp || exit 1
nc -ll -p {ECHO_PORT} -e cat &
sleep 1
echo ECHO-READY
sleep 600
"""
    with Switch(tmp_path, workers=2, prefix=netns.exec_argv([]), addressing=[]) as switch, \
            GuestVM(guest_image, script, socket=Path(switch.socket), queues=2, smp=2, netns=netns) as vm:
        vm.wait_for("ECHO-READY", timeout=240)
        client = HostClient(netns)
        assert client.connect(ECHO_PORT) == "ConnectionRefusedError"
        added = forward_cli(switch, "add", "-t", str(ECHO_PORT))
        assert added.returncode == 0 and added.stdout.strip() == f"added: -t {ECHO_PORT}", added
        # At once: the first connection after the command returned is taken (no retry).
        first = client.connect(ECHO_PORT)
        assert isinstance(first, int), first
        assert client.echo(first, "hello") == "hello", vm.output()
        status = switch.status()
        assert [w["listeners"]["tcp"] for w in status["workers"]] == [1, 1], status["workers"]
        # Both queue pairs' workers take clients: connect until each owned one (the kernel spreads them
        # by a hash of the addresses; 64 tries leave a chance of 2**-63 to miss one).
        owners: set[int] = set()
        for attempt in range(64):
            local = client.connect(ECHO_PORT)
            assert isinstance(local, int), local
            assert client.echo(local, f"try-{attempt}") == f"try-{attempt}"
            flows = switch.query("flows")["flows"]
            owners |= {flow["owner"] for flow in flows if flow["type"] == "tcp"
                       and flow["sides"][0]["ep_port"] == local}
            client.close(local)
            if owners == {0, 1}:
                break
        assert owners == {0, 1}, owners
        removed = forward_cli(switch, "remove", "-t", str(ECHO_PORT))
        assert removed.returncode == 0 and removed.stdout.strip() == f"removed: -t {ECHO_PORT}", removed
        assert client.connect(ECHO_PORT) == "ConnectionRefusedError"
        assert client.echo(first, "after-removal") == "after-removal", vm.output()
        assert forward_cli(switch, "list").stdout.strip() == "no forwarding rules"
        status = switch.status()          # the workers confirmed before the command returned
        assert [w["listeners"]["tcp"] for w in status["workers"]] == [0, 0], status["workers"]
        assert status["forwarding"]["changes"] == {"added": 1, "removed": 1, "refused": 0}
        client.close(first)
