"""A running sandboxed switch as another local process sees it: what it can reach of the switch, and what the
switch's processes can reach of the host (their mount view, their PID namespace, their keeper)."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest

from shardswitch.coordinator.control import format_status
from shardswitch.sandbox.privileges import process_status
from tests.switch import Switch
from tests.switchkit import NOBODY, in_child, wait_until

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root, as systemd and libvirt start us")


def switch_pids(switch: Switch) -> dict[str, int]:
    """The coordinator's and the workers' PIDs on this host, by role."""
    status = switch.status()
    return {"coordinator": switch.pid, **{f"worker {w['pair']}": w["pid"] for w in status["workers"]}}


def mounts_of(pid: int) -> dict[str, tuple[str, str, str]]:
    """Process ``pid``'s mounts: mount point -> (per-mount options, filesystem type, source)."""
    found = {}
    with open(f"/proc/{pid}/mountinfo") as f:
        for line in f:
            head, _, tail = line.partition(" - ")
            fields, fs = head.split(), tail.split()
            found[fields[4]] = (fields[5], fs[0], fs[1])
    return found


def test_another_process_of_the_same_user_cannot_reach_the_flow_table(tmp_path: Path) -> None:
    """A process running as nobody, the user the switch runs as, finds nothing of the switch in /dev/shm and
    cannot open the coordinator's or a worker's descriptors (the table's memfd among them), mappings, memory
    or view of files."""
    before = {name for name in os.listdir("/dev/shm") if "shardswitch" in name}
    with Switch(tmp_path, workers=2) as switch:
        pids = switch_pids(switch)
        instance = switch.status()["flow_table"]["instance"]
        links = [os.readlink(f"/proc/{switch.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{switch.pid}/fd")]
        assert any(f"shardswitch-flows-{instance}" in link for link in links), links   # root sees the memfd

        def attack() -> object:
            """Everything a local user could try; what worked."""
            reached = [f"/dev/shm/{name}" for name in os.listdir("/dev/shm") if "shardswitch" in name
                       and name not in before]
            for role, pid in pids.items():
                for what in ("fd", "map_files", "root/dev/shm", "root/proc"):
                    try:
                        os.listdir(f"/proc/{pid}/{what}")
                        reached.append(f"{role}: /proc/{pid}/{what}")
                    except PermissionError:
                        pass
                for what in ("mem", "fd/3", "environ"):
                    try:
                        open(f"/proc/{pid}/{what}", "rb").close()
                        reached.append(f"{role}: /proc/{pid}/{what}")
                    except PermissionError:
                        pass
            return reached

        assert in_child(attack, uid=NOBODY) == []


def test_views_hold_no_host_proc_and_no_host_dev_shm(tmp_path: Path) -> None:
    """Each process's /proc is a read-only procfs of the switch's own PID namespace, holding only the switch's
    processes; its /dev/shm is a tmpfs of its own, not the host's."""
    marker = Path("/dev/shm") / f"shardswitch-test-marker-{os.getpid()}"
    marker.write_text("host")
    try:
        with Switch(tmp_path, workers=2) as switch:
            status = switch.status()
            inside = {1} | {w["ns_pid"] for w in status["workers"]}
            for role, pid in switch_pids(switch).items():
                mounts = mounts_of(pid)
                options, fstype, _source = mounts["/proc"]
                assert fstype == "proc" and options.split(",")[0] == "ro", (role, mounts["/proc"])
                assert {int(n) for n in os.listdir(f"/proc/{pid}/root/proc") if n.isdigit()} == inside, role
                with pytest.raises(OSError, match="Read-only file system"):
                    open(f"/proc/{pid}/root/proc/1/comm", "w").close()
                assert mounts["/dev/shm"][1:] == ("tmpfs", "shardswitch-shm"), (role, mounts["/dev/shm"])
                shm = f"/proc/{pid}/root/dev/shm"
                assert os.stat(shm).st_dev != os.stat("/dev/shm").st_dev and not os.listdir(shm), role
                assert set(mounts) == {"/", "/proc", "/dev/shm", "/dev/null"}, (role, sorted(mounts))
    finally:
        marker.unlink()


def test_pid_namespace_of_its_own(tmp_path: Path) -> None:
    """The coordinator is PID 1 of a namespace holding the switch's processes only; the process started here is
    its keeper, sandboxed too, holding no descriptor of the switch; status shows host PIDs, the namespace's
    beside them."""
    with Switch(tmp_path, workers=2) as switch:
        status = switch.status()
        assert status["sandbox"]["pid_namespace"] and status["ns_pid"] == 1, status["sandbox"]
        assert switch.proc is not None and switch.pid != switch.proc.pid
        assert "PID namespace" in format_status(status).splitlines()[3]
        namespace = os.readlink(f"/proc/{switch.pid}/ns/pid")
        assert namespace != os.readlink("/proc/self/ns/pid")
        for role, pid in switch_pids(switch).items():
            assert os.readlink(f"/proc/{pid}/ns/pid") == namespace, role
            nspid = [line.split()[1:] for line in open(f"/proc/{pid}/status") if line.startswith("NSpid")][0]
            assert nspid[0] == str(pid) and len(nspid) == 2, (role, nspid)
        assert [int(w["ns_pid"]) for w in status["workers"]] == [2, 3]
        keeper = switch.proc.pid
        assert open(f"/proc/{keeper}/task/{keeper}/children").read().split() == [str(switch.pid)]
        fields = process_status(keeper)
        assert fields["Uid"].split() == [str(NOBODY)] * 4 and (fields["NoNewPrivs"], fields["Seccomp"]) == ("1", "2")
        assert all(int(fields[k], 16) == 0 for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")), fields
        held = {os.readlink(f"/proc/{keeper}/fd/{fd}") for fd in os.listdir(f"/proc/{keeper}/fd") if int(fd) > 2}
        assert len(held) == 1 and next(iter(held)).startswith("pipe:"), held


@pytest.mark.parametrize(("victim", "signum", "outcome"), [
    ("coordinator", signal.SIGKILL, -signal.SIGKILL),   # the keeper dies the same death
    ("keeper", signal.SIGHUP, 128 + signal.SIGHUP),     # relayed; the coordinator exits as SIGHUP did before
    ("keeper", signal.SIGKILL, -signal.SIGKILL),        # the coordinator and its workers follow
])
def test_keeper_and_coordinator_die_together(tmp_path: Path, victim: str, signum: int, outcome: int) -> None:
    """Whichever of the two is signalled, both end, and the workers with them."""
    switch = Switch(tmp_path, workers=2).start()
    assert switch.proc is not None
    pids = list(switch_pids(switch).values())
    os.kill(switch.pid if victim == "coordinator" else switch.proc.pid, signum)
    assert switch.proc.wait(10) == outcome
    wait_until(lambda: not any(Path(f"/proc/{pid}").exists() for pid in pids) or None,
               "every process of the switch to end", timeout=10)


def test_seccomp_log_only_is_reported(tmp_path: Path) -> None:
    """SHARDSWITCH_SECCOMP_LOG=1 (a debugging aid) shows in the status and as a warning in the start-up log."""
    with Switch(tmp_path, env={"SHARDSWITCH_SECCOMP_LOG": "1"}) as switch:
        status: dict[str, Any] = switch.status()
        assert status["sandbox"]["seccomp"] == "log only"
        assert "seccomp (log only)" in format_status(status).splitlines()[3]
        assert "WARNING: SHARDSWITCH_SECCOMP_LOG=1: seccomp filters only log calls" in switch.log()
    with Switch(tmp_path) as switch:
        status = switch.status()
        assert status["sandbox"]["seccomp"] == "kill" and "SHARDSWITCH_SECCOMP_LOG" not in switch.log()
