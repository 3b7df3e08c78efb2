"""A real guest on a socket-activated shardswitch (issue 12, acceptance 3).

systemd's ``systemd-socket-activate`` plays the ``shardswitch.socket`` unit:
it listens on the vhost-user socket and starts ``shardswitch start`` when
QEMU connects, passing the socket as systemd does (LISTEN_FDS, LISTEN_PID,
LISTEN_FDNAMES=vhost-user).  QEMU's first messages wait in the socket's queue
while the switch starts; the guest then gets its lease and pings its gateway.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from shardswitch.coordinator.control import query
from tests.coordinator.hostingkit import activate_argv
from tests.guest.image import GuestImage
from tests.guest.netns import TestNetns, stop_process
from tests.guest.vm import GuestVM
from tests.switchkit import wait_until

pytestmark = pytest.mark.guest


def test_guest_on_a_socket_activated_switch(tmp_path: Path, netns: TestNetns, guest_image: GuestImage) -> None:
    """Nothing runs before QEMU connects; then the guest gets its lease and its pings are answered, and
    the switch's status (on the control socket beside the activated one) counts its frames."""
    path = tmp_path / "vm.sock"
    with open(tmp_path / "switch.log", "wb") as log:
        activator = netns.popen(activate_argv(netns, path, ["--workers", "2"]), stdout=log,
                                stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: path.exists() or None, "the activator's socket", timeout=10)
        script = """
dhcp || exit 1
gw=$(ip route | awk '/default/ {print $3}')
ping -c 3 -W 3 $gw > /dev/null && echo PING-OK
"""
        with GuestVM(guest_image, script, socket=path, queues=2, smp=2, netns=netns) as vm:
            lease = vm.lease(timeout=240)
            assert lease.ip == netns.host_addr
            assert vm.wait_exit(timeout=240) == 0, vm.output()
            assert "PING-OK" in vm.output(), vm.output()
            status = query(f"{path}.ctl", "status")
            assert sum(w["tx_frames"] for w in status["workers"]) > 0, status
        assert f"listening on {path}" in (tmp_path / "switch.log").read_text(errors="replace")
    finally:
        stop_process(activator)
