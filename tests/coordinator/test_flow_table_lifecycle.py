"""The instance's shared objects in /dev/shm: created at start, gone after stop, replaced after a crash."""

from __future__ import annotations

import signal
import time
from pathlib import Path

from tests.switch import Switch

SHM = Path("/dev/shm")


def leftovers(instance: str) -> list[str]:
    """Everything in /dev/shm that belongs to ``instance`` (segment and semaphores)."""
    return sorted(p.name for p in SHM.iterdir() if f"shardswitch-{instance}." in p.name)


def test_stop_leaves_nothing(tmp_path: Path) -> None:
    """While running: the segment and three semaphores exist; after SIGTERM: nothing."""
    switch = Switch(tmp_path, workers=2).start()
    instance = switch.status()["flow_table"]["instance"]
    present = leftovers(instance)
    assert len(present) == 4 and any(name.endswith(".flows") for name in present), present
    assert switch.stop() == 0
    assert leftovers(instance) == []


def test_crash_then_restart_replaces_and_cleans(tmp_path: Path) -> None:
    """SIGKILL leaves the segment behind; the next start on the same socket replaces it; stop cleans up."""
    first = Switch(tmp_path, workers=2).start()
    instance = first.status()["flow_table"]["instance"]
    worker_pids = [w["pid"] for w in first.status()["workers"]]
    assert first.proc is not None
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(10)
    deadline = time.monotonic() + 10  # the workers follow their coordinator (PDEATHSIG)
    while any(Path(f"/proc/{pid}").exists() for pid in worker_pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert leftovers(instance), "a SIGKILLed instance cannot clean up after itself"
    second = Switch(tmp_path, workers=2).start()
    try:
        status = second.status()
        assert status["flow_table"]["instance"] == instance and status["flow_table"]["active"] == 0
    finally:
        assert second.stop() == 0
    assert leftovers(instance) == []
