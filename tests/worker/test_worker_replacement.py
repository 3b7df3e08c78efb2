"""A dead worker is replaced: SIGKILL a worker process of a real shardswitch, or make it call outside its
seccomp allow-list (a test-only control command), which kills it with SIGSYS.

The coordinator watches a pidfd per worker; when one dies it forks a
replacement for the same queue pair and hands it guest memory and the
pair's running rings again (resuming each ring from the used index in guest
memory).  The front-end sees nothing but a short pause on that pair: no new
handshake, no message at all.  These tests check, against a real switch in
its own network namespace, that

* the coordinator stays up (same PID) and reports the replacement (new PID,
  ``restarts`` 1, how the old one died) within about 2 s;
* the restarted pair answers ARP again on the SAME connection, including a
  request the front-end queued while the worker was dead;
* the other pair keeps answering all the while;
* a worker killed while no front-end is connected is replaced too, and the
  next front-end is served on every pair.

Only worker processes of the switch the test started are signalled, by the
PID its status reports.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest

from shardswitch.frontend.client import VhostUserFrontend
from tests.switch import Switch, assert_sandboxed
from tests.switchkit import (Baseline, is_periodic_ra, arp_request, arp_roundtrip, assert_recovered, baseline, check_arp_reply,
                             ring_status, wait_status, worker_pids)

PAIRS = 2
#: How long a replacement may take to show up in the status.
REPLACED_WITHIN = 2.0


@pytest.fixture
def switch(tmp_path: Path) -> Iterator[Switch]:
    """A real two-worker switch (test hooks on: a worker's forbidden system call on demand)."""
    with Switch(tmp_path, workers=PAIRS, test_hooks=True) as sw:
        yield sw


@pytest.fixture
def before(switch: Switch) -> Baseline:
    """The idle switch before a worker is killed."""
    return baseline(switch)


def kill_worker(switch: Switch, pair: int) -> int:
    """SIGKILL the worker of ``pair`` (its PID taken from the status); return that PID."""
    pid = worker_pids(switch.status())[pair]
    assert pid not in (switch.pid, os.getpid())
    os.kill(pid, signal.SIGKILL)
    return pid


def replaced(status: dict[str, Any], pair: int, old_pid: int, restarts: int) -> bool:
    """True once ``pair`` runs a new, answering worker, restarted ``restarts`` times, both rings running."""
    worker = status["workers"][pair]
    return (worker["pid"] != old_pid and worker["restarts"] == restarts and worker.get("answered", False)
            and all(ring_status(status, 2 * pair + i)["state"] == "running" for i in range(2)))


def forbidden_syscall(switch: Switch, pair: int) -> int:
    """Make the worker of ``pair`` call outside its seccomp allow-list (test hook); return its PID."""
    pid = worker_pids(switch.status())[pair]
    assert switch.query(f"test-forbidden-syscall-{pair}") == {"sent": True}
    return pid


@pytest.mark.parametrize("kill, how", [(kill_worker, "killed by SIGKILL"),
                                       (forbidden_syscall, "killed by SIGSYS (a system call outside its seccomp "
                                                           "allow-list)")],
                         ids=["sigkill", "seccomp"])
def test_killed_worker_replaced_on_same_connection(switch: Switch, before: Baseline,
                                                   kill: Callable[[Switch, int], int], how: str) -> None:
    """Pair 1's worker dies mid-connection (SIGKILL, or killed by its seccomp filter for a forbidden call):
    it is replaced and served again with no new handshake; pair 0 answers every request all the while."""
    assert_sandboxed(switch)
    with VhostUserFrontend.connect(switch.socket, queue_pairs=PAIRS, ignore=is_periodic_ra) as fe:
        fe.handshake()
        for pair in range(PAIRS):
            arp_roundtrip(fe, pair)
        victim = kill(switch, 1)
        killed_at = time.monotonic()
        fe.post_rx(1, 1)
        fe.send_frame(1, arp_request())         # queued while the worker is dead (or dying)
        answered = 0
        while True:                              # pair 0 keeps answering throughout
            arp_roundtrip(fe, 0)
            answered += 1
            status = switch.status()
            if replaced(status, 1, victim, 1):
                break
            assert time.monotonic() - killed_at < REPLACED_WITHIN, f"no replacement yet: {status['workers'][1]}"
        assert answered >= 1
        assert status["pid"] == before.pid
        survivor, newcomer = status["workers"]
        assert (survivor["pid"], survivor["restarts"]) == (before.worker_pids[0], 0)
        assert newcomer["last_exit"] == how
        (frame,) = fe.recv_frames(1, 2.0)        # the request queued during the outage is answered
        check_arp_reply(frame)
        for _ in range(3):
            for pair in range(PAIRS):
                arp_roundtrip(fe, pair)
        assert not fe.peer_closed(0.0)
        assert switch.status()["frontend"]["connected"]
    assert_recovered(switch, before, replaced=frozenset({1}))
    assert_sandboxed(switch)


def test_worker_killed_twice(switch: Switch, before: Baseline) -> None:
    """A second death of the same pair is handled the same way (restarts counts 2)."""
    with VhostUserFrontend.connect(switch.socket, queue_pairs=PAIRS, ignore=is_periodic_ra) as fe:
        fe.handshake()
        for restarts in (1, 2):
            victim = kill_worker(switch, 0)
            wait_status(switch, lambda s: replaced(s, 0, victim, restarts), f"restart {restarts} of pair 0",
                        timeout=REPLACED_WITHIN + 0.5)    # the second respawn may wait out the crash-loop delay
            for pair in range(PAIRS):
                arp_roundtrip(fe, pair)
    assert_recovered(switch, before, replaced=frozenset({0}))


def test_worker_killed_while_idle(switch: Switch, before: Baseline) -> None:
    """A worker that dies with no front-end connected is replaced; the next front-end is served."""
    victim = kill_worker(switch, 0)
    status = wait_status(switch, lambda s: s["workers"][0]["pid"] != victim and s["workers"][0]["answered"],
                         "pair 0's replacement", timeout=REPLACED_WITHIN)
    assert status["workers"][0]["restarts"] == 1
    assert status["workers"][1]["pid"] == before.worker_pids[1]
    assert_recovered(switch, before, replaced=frozenset({0}))
