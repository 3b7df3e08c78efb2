"""Real guests ping through the shared flow table: both queue pairs, a moving sender, a killed worker.

The guest pings only its gateway, which shardswitch maps to the host's loopback
(the loopback of the test's own namespace).
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from tests.guest.image import GuestImage
from tests.guest.netns import TestNetns
from tests.guest.vm import GuestVM
from tests.switch import Switch
from tests.guest.scripts import GATEWAY, WARM_UP

pytestmark = pytest.mark.guest



def switch_in(tmp_path: Path, netns: TestNetns, workers: int = 2) -> Switch:
    """A switch inside the test namespace, mirroring its addressing."""
    return Switch(tmp_path, workers=workers, prefix=netns.exec_argv([]), addressing=[])


def ping_summary(output: str, tag: str) -> tuple[int, int]:
    """(transmitted, received) of the ping whose output the guest printed after ``tag``."""
    section = output.split(f"=={tag}==", 1)[1]
    match = re.search(r"(\d+) packets transmitted, (\d+) (?:packets )?received", section)
    assert match, output
    return int(match[1]), int(match[2])


def owner_of_ident(switch: Switch, ident: int) -> int | None:
    """The worker owning the ping4 flow with the guest's echo identifier ``ident``."""
    for flow in switch.query("flows")["flows"]:
        if flow["type"] == "ping4" and flow["sides"][0]["ep_port"] == ident & 0xFFFF:
            return int(flow["owner"])
    return None




def workers(status: dict[str, Any]) -> list[dict[str, Any]]:
    """The per-worker entries of a status answer."""
    return list(status["workers"])


def test_pings_on_both_pairs_owned_by_each_worker(tmp_path: Path, netns: TestNetns,
                                                  guest_image: GuestImage) -> None:
    """queues=2, -smp 2: a ping pinned to each vCPU, no loss, one flow owned by each worker."""
    script = f"""
dhcp || exit 1
{GATEWAY}
{WARM_UP}
taskset 1 ping -c 20 -i 0.3 $gw > /tmp/p0 2>&1 &
echo PID0=$!
taskset 2 ping -c 20 -i 0.3 $gw > /tmp/p1 2>&1 &
echo PID1=$!
sleep 3
echo FLOWS-NOW
wait
echo ==p0==; cat /tmp/p0; echo ==p1==; cat /tmp/p1
"""
    with switch_in(tmp_path, netns) as switch, \
            GuestVM(guest_image, script, socket=Path(switch.socket), queues=2, smp=2, netns=netns) as vm:
        vm.wait_for("FLOWS-NOW", timeout=240)
        pids = [int(vm.wait_for(rf"PID{i}=(\d+)", timeout=5)[1]) for i in (0, 1)]
        owners = [owner_of_ident(switch, pid) for pid in pids]
        assert vm.wait_exit(timeout=240) == 0, vm.output()
        output = vm.output()
        for tag in ("p0", "p1"):
            sent, received = ping_summary(output, tag)
            assert sent == received == 20, output
        assert owners == [0, 1], (owners, switch.query("flows"), output)


def test_sender_moving_between_vcpus_loses_nothing(tmp_path: Path, netns: TestNetns,
                                                  guest_image: GuestImage) -> None:
    """A ping whose CPU changes every half second mid-flow: every request answered, frames handed over."""
    script = f"""
dhcp || exit 1
{GATEWAY}
{WARM_UP}
ping -c 30 -i 0.2 $gw > /tmp/p 2>&1 &
pid=$!
i=0
while [ $i -lt 6 ]; do
    taskset -p 1 $pid > /dev/null; sleep 0.5
    taskset -p 2 $pid > /dev/null; sleep 0.5
    i=$((i + 1))
done
wait
echo ==p==; cat /tmp/p
"""
    with switch_in(tmp_path, netns) as switch, \
            GuestVM(guest_image, script, socket=Path(switch.socket), queues=2, smp=2, netns=netns) as vm:
        assert vm.wait_exit(timeout=240) == 0, vm.output()
        sent, received = ping_summary(vm.output(), "p")
        assert sent == received == 30, vm.output()
        status = switch.status()
        handed = sum(w.get("handed_out", 0) for w in workers(status))
        taken = [w.get("tx_frames", 0) for w in workers(status)]
        # The flow's requests left the guest on both queues; those on the non-owner were handed over.
        assert min(taken) > 0 and handed > 0, status


def test_killed_worker_is_replaced_while_pings_go_on(tmp_path: Path, netns: TestNetns,
                                                     guest_image: GuestImage) -> None:
    """SIGKILL worker 1 mid-run: pings on pair 0 never stop, pings on pair 1 resume, coordinator stays."""
    script = f"""
dhcp || exit 1
{GATEWAY}
{WARM_UP}
taskset 1 ping -c 40 -i 0.25 $gw > /tmp/p0 2>&1 &
taskset 2 ping -c 40 -i 0.25 $gw > /tmp/p1 2>&1 &
sleep 3
echo KILL-NOW
wait
echo ==p0==; cat /tmp/p0; echo ==p1==; cat /tmp/p1
"""
    with switch_in(tmp_path, netns) as switch, \
            GuestVM(guest_image, script, socket=Path(switch.socket), queues=2, smp=2, netns=netns) as vm:
        vm.wait_for("KILL-NOW", timeout=240)
        before = switch.status()
        victim = workers(before)[1]["pid"]
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            after = switch.status()
            if workers(after)[1]["pid"] != victim and workers(after)[1].get("answered"):
                break
            time.sleep(0.1)
        assert workers(after)[1]["pid"] != victim and workers(after)[1]["restarts"] == 1, after
        assert after["pid"] == before["pid"] and switch.alive()
        assert vm.wait_exit(timeout=240) == 0, vm.output()
        output = vm.output()
        sent0, received0 = ping_summary(output, "p0")
        assert sent0 == received0 == 40, output
        sent1, received1 = ping_summary(output, "p1")
        # Pair 1 lost what was in flight while its worker was dead, and nothing after.
        assert sent1 == 40 and received1 >= 30, output
        last_seq = max(int(m) for m in re.findall(r"seq=(\d+)", output.split("==p1==", 1)[1]))
        assert last_seq == 39, output
