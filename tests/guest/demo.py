"""`make demo`: boot the small test guest through a 2-worker shardswitch and show what it got.

Everything runs inside network namespaces this script creates and removes:
shardswitch mirrors the namespace's addressing to the guest, the guest takes
its DHCP lease, arpings the gateway from each vCPU, and the script prints the
lease, the guest's view of its network, and ``shardswitch status``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from shardswitch.coordinator.control import format_status
from tests.guest.image import build_initramfs
from tests.guest.netns import TestNetns
from tests.guest.vm import GuestVM
from tests.switch import Switch

REPO = Path(__file__).resolve().parents[2]

GUEST_SCRIPT = """
dhcp || exit 1
echo '--- guest: ip addr / ip route / resolv.conf'
ip -4 addr show dev eth0
ip route
cat /etc/resolv.conf
gw=$(ip route | awk '/default/ {print $3}')
echo "--- guest: arping the gateway $gw from each vCPU"
cpu=1
n=0
while [ $n -lt $(grep -c processor /proc/cpuinfo) ]; do
    taskset $cpu arping -c 3 -w 10 -I eth0 $gw | tail -1
    cpu=$((cpu * 2))
    n=$((n + 1))
done
echo DEMO-DONE
sleep 2
"""


def main(argv: list[str] | None = None) -> int:
    """Run the demo; the guest script's exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2, help="queue pairs / worker processes (default 2)")
    args = parser.parse_args(argv)
    print("building the guest image (cached after the first time)...", flush=True)
    image = build_initramfs(REPO / ".cache" / "guest")
    with tempfile.TemporaryDirectory(prefix="shardswitch-demo-") as tmp, TestNetns() as netns:
        print(f"namespace {netns.name}: host address {netns.host_addr}/{netns.prefixlen}, "
              f"gateway {netns.upstream_addr}", flush=True)
        with Switch(Path(tmp), workers=args.workers, prefix=netns.exec_argv([]), addressing=[]) as switch:
            print(f"shardswitch pid {switch.pid} on {switch.socket}; booting the guest "
                  f"(-smp {args.workers}, queues={args.workers}, TCG: a few seconds)...", flush=True)
            with GuestVM(image, GUEST_SCRIPT, socket=Path(switch.socket), queues=args.workers,
                         smp=args.workers, netns=netns) as vm:
                lease = vm.lease(timeout=300)
                print(f"--- the guest's DHCP lease: {lease.ip}/{lease.prefixlen} router {lease.router} "
                      f"mtu {lease.mtu} dns {', '.join(lease.dns) or '-'}", flush=True)
                vm.wait_for("DEMO-DONE", timeout=300)
                body = vm.output().split("SS-LEASE", 1)[-1].split("\n", 1)[-1]
                print(body.split("DEMO-DONE")[0].rstrip())
                print("--- shardswitch status (guest still connected)")
                print(format_status(switch.status()))
                rc = vm.wait_exit(timeout=300)
    print(f"demo finished: guest script exit code {rc}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
