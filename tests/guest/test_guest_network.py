"""Real QEMU guests on a real vhost-user socket: DHCP, ARP, every queue pair, reconnect.

The switch and QEMU run inside a network namespace the test creates
(:class:`tests.guest.netns.TestNetns`); the switch mirrors that namespace's
addressing to the guest, as it mirrors a host's.  The guest talks only to the
gateway, which shardswitch itself answers.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.guest.image import GuestImage
from tests.guest.netns import TestNetns
from tests.guest.vm import GuestVM
from tests.switch import Switch

pytestmark = pytest.mark.guest

GATEWAY = "$(ip route | awk '/default/ {print $3}')"


def guest_switch(tmp_path: Path, netns: TestNetns, workers: int, *, socket_path: str | None = None,
                 args: list[str] | None = None) -> Switch:
    """A switch inside the test namespace, mirroring its addressing."""
    return Switch(tmp_path, workers=workers, prefix=netns.exec_argv([]), addressing=[],
                  socket_path=socket_path, args=args)


def tx_frames(status: dict) -> list[int]:  # type: ignore[type-arg]
    """Frames each worker took from the guest."""
    return [w.get("tx_frames", 0) for w in status["workers"]]


def test_dhcp_arp_and_both_queue_pairs(tmp_path: Path, netns: TestNetns, guest_image: GuestImage) -> None:
    """queues=2, -smp 2: the lease is the mirrored addressing; ARP works; senders on each vCPU use each pair."""
    script = f"""
dhcp || exit 1
gw={GATEWAY}
arping -c 2 -w 10 -I eth0 $gw || exit 2
echo ARP-GW-OK
sleep 3
taskset 1 arping -c 15 -w 30 -I eth0 $gw > /tmp/a0 2>&1 &
taskset 2 arping -c 15 -w 30 -I eth0 $gw > /tmp/a1 2>&1 &
wait
grep -h -i received /tmp/a0 /tmp/a1
"""
    with guest_switch(tmp_path, netns, 2) as switch, \
            GuestVM(guest_image, script, socket=Path(switch.socket), queues=2, smp=2, netns=netns) as vm:
        lease = vm.lease(timeout=240)
        assert lease.ip == netns.host_addr
        assert lease.prefixlen == netns.prefixlen
        assert lease.router == netns.upstream_addr
        assert lease.mtu == 65520
        vm.wait_for("ARP-GW-OK", timeout=120)
        before = tx_frames(switch.status())
        assert vm.wait_exit(timeout=240) == 0, vm.output()
        after = switch.status()
        grown = [b - a for a, b in zip(before, tx_frames(after))]
        assert all(g >= 10 for g in grown), (grown, after, vm.output())
        # Each arping also sees the other's replies: at least its own 15 each.
        received = [int(n) for n in re.findall(r"Received (\d+) response", vm.output())[-2:]]
        assert len(received) == 2 and min(received) >= 15, vm.output()


def test_no_dhcp_gives_no_lease(tmp_path: Path, netns: TestNetns, guest_image: GuestImage) -> None:
    """--no-dhcp: the guest's DHCP client gets no lease (its discovers are dropped and counted); ARP still works
    once it configures itself."""
    script = f"""
dhcp -t 2 -T 1 && echo GOT-LEASE || echo NO-LEASE
ip addr add {netns.host_addr}/{netns.prefixlen} dev eth0
arping -c 2 -w 10 -I eth0 {netns.upstream_addr} > /dev/null && echo ARP-GW-OK
"""
    with guest_switch(tmp_path, netns, 1, args=["--no-dhcp"]) as switch, \
            GuestVM(guest_image, script, socket=Path(switch.socket), netns=netns) as vm:
        assert vm.wait_exit(timeout=240) == 0, vm.output()
        output = vm.output()
        assert "NO-LEASE" in output and "GOT-LEASE" not in output and "SS-LEASE " not in output, output
        assert "ARP-GW-OK" in output, output
        # Discovers come from 0.0.0.0: with no DHCP server to take them, the flow policy refuses them.
        assert switch.status()["workers"][0]["drops"].get("FLOW_BAD_SOURCE", 0) >= 2


def test_guest_survives_switch_restart(tmp_path: Path, netns: TestNetns, guest_image: GuestImage) -> None:
    """SIGKILL shardswitch and start it again on the same socket: QEMU reconnects, ARP works again."""
    script = f"""
dhcp || exit 1
gw={GATEWAY}
seen_fail=0
i=0
while [ $i -lt 240 ]; do
    i=$((i + 1))
    if arping -c 1 -w 1 -I eth0 $gw >/dev/null 2>&1; then
        echo ARP-OK $i
        [ $seen_fail = 1 ] && exit 0
    else
        echo ARP-FAIL $i
        seen_fail=1
    fi
    sleep 0.5
done
exit 3
"""
    sock = str(tmp_path / "restart.sock")
    first = guest_switch(tmp_path, netns, 1, socket_path=sock).start()
    try:
        with GuestVM(guest_image, script, socket=Path(sock), reconnect=True, netns=netns) as vm:
            vm.wait_for(r"ARP-OK", timeout=240)
            first.kill()
            vm.wait_for(r"ARP-FAIL", timeout=60)
            with guest_switch(tmp_path, netns, 1, socket_path=sock):
                assert vm.wait_exit(timeout=120) == 0, vm.output()
    finally:
        first.stop()
