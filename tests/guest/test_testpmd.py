"""DPDK testpmd as a second real vhost-user front-end (issue 2, item 4).

Theory of operation
-------------------
testpmd's virtio-user port (DPDK 22.11, ``queues=2``) drives shardswitch the
way a poll-mode guest driver would: it sends SET_OWNER first, never asks
GET_QUEUE_NUM, does not negotiate EVENT_IDX (so notifications go through
``used.flags`` / ``avail.flags``), polls instead of waiting for interrupts and
fills whole rings at line rate.  The switch runs with two workers inside the
test's namespace (:class:`tests.guest.netns.TestNetns`), like the QEMU tests;
testpmd runs in the same namespace and its txonly frames carry the
namespace's own addresses, so nothing leaves the test.

What the tests hold the switch to:

* nobody crashes: testpmd answers its prompt after every phase and quits with
  status 0; the coordinator keeps its PID and no worker is replaced (same
  worker PIDs, no restarts, no broken ring);
* status counts every frame: once testpmd has stopped, the ring is drained
  and each worker's ``tx_frames`` / ``tx_bytes`` equal what testpmd sent on
  its queue (queue i is worker pair i) - exactly, since a frame left in a
  ring is still drained after the last kick; ``rx_frames`` equals what
  testpmd received; every frame taken is accounted for as delivered or as a
  counted drop.

:func:`test_txonly_rxonly_io` is the acceptance run (txonly, rxonly, idle io,
quit).  :func:`test_io_loop_through_reflecting_switch` closes the loop with
the switch's hidden ``--reflect`` mode (every TX frame written back into an
RX buffer): ``start tx_first`` in io mode then ping-pongs 3072-byte frames in
three segments, exercising chained/indirect TX descriptors and MRG_RXBUF RX
frames that span two of testpmd's 2048-byte buffers; a second testpmd then
connects to the same switch without MRG_RXBUF (device reset, new features),
where every reflected frame is too big for one RX buffer and must be counted
as such.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from tests.guest.netns import TestNetns
from tests.guest.testpmd import FwdMode, PortStats, Testpmd
from tests.switch import Switch

QUEUES = 2
PHASE_S = 3.0
#: How long the switch may take to drain what testpmd left in its rings.
SETTLE_TIMEOUT_S = 10.0
#: testpmd's txonly frames (64 bytes, the default ``set txpkts``).
TXONLY_FRAME_LEN = 64
#: Segments of the looped frames in the reflect test: three mbufs, 3072 bytes.
LOOP_SEGMENTS = (1024, 1024, 1024)

Status = dict[str, Any]

_STREAM = re.compile(r"Forward Stats for RX Port=\s*\d+/Queue=\s*(\d+) -> TX Port=\s*\d+/Queue=\s*(\d+)"
                     r"\s*-+\s*RX-packets:\s*(\d+)\s+TX-packets:\s*(\d+)")


def stream_counts(stop_output: str) -> dict[int, tuple[int, int]]:
    """(RX, TX) packets per queue from ``stop`` output; testpmd omits idle streams.

    With one port each stream reads and writes the same queue number; the key
    is the TX queue.
    """
    return {int(m[2]): (int(m[3]), int(m[4])) for m in _STREAM.finditer(stop_output)}


def per_worker(status: Status, key: str) -> list[int]:
    """One counter of every worker, by pair."""
    return [int(w[key]) for w in sorted(status["workers"], key=lambda w: int(w["pair"]))]


def total(status: Status, key: str) -> int:
    """One counter summed over the workers."""
    return sum(per_worker(status, key))


def worker_pids(status: Status) -> list[int]:
    """The worker PIDs, by pair."""
    return per_worker(status, "pid")


def ring_states(status: Status) -> list[str]:
    """The state of every vring, by index."""
    return [r["state"] for w in sorted(status["workers"], key=lambda w: int(w["pair"])) for r in w["rings"]]


def settle(switch: Switch, done: Callable[[Status], bool], timeout: float = SETTLE_TIMEOUT_S) -> Status:
    """Poll the switch's status until ``done`` holds or ``timeout`` passes; return the last one."""
    deadline = time.monotonic() + timeout
    status = switch.status()
    while not done(status) and time.monotonic() < deadline:
        time.sleep(0.1)
        status = switch.status()
    return status


def check_healthy(switch: Switch, pids: list[int], status: Status) -> None:
    """Coordinator alive with its PID, the same workers, no restart, no broken ring."""
    assert switch.alive(), switch.log()
    assert status["pid"] == switch.pid
    assert worker_pids(status) == pids, status
    for worker in status["workers"]:
        assert worker["restarts"] == 0 and not worker["last_exit"], worker
        assert "BROKEN_RING" not in worker["events"], worker
        for ring in worker["rings"]:
            assert ring["state"] != "broken" and not ring["error"], worker


def run_phase(pmd: Testpmd, mode: FwdMode, seconds: float, *, tx_first: bool = False) -> str:
    """Forward in ``mode`` for ``seconds`` and stop; return the ``stop`` output."""
    pmd.set_fwd(mode)
    if tx_first:
        pmd.command("start tx_first")
    else:
        pmd.start()
    time.sleep(seconds)
    return pmd.stop()


def drained(port: PortStats) -> Callable[[Status], bool]:
    """Predicate: the switch took (and counted) every frame testpmd sent and delivered what it received."""
    return lambda s: total(s, "tx_frames") == port.tx_packets and total(s, "rx_frames") == port.rx_packets


def switch_in(tmp_path: Path, netns: TestNetns, *args: str) -> Switch:
    """A two-worker switch inside the test namespace, mirroring its addressing."""
    return Switch(tmp_path, workers=QUEUES, prefix=netns.exec_argv([]), addressing=[], args=list(args))


def wait_disconnected(switch: Switch) -> Status:
    """Wait until the switch has noticed the front-end left and reset the device."""
    status = settle(switch, lambda s: not s["frontend"]["connected"])
    assert not status["frontend"]["connected"], status
    return status


# -- without testpmd -----------------------------------------------------------------


def test_stream_counts_parses_stop_output() -> None:
    """Per-queue counts come from the ``Forward Stats`` blocks; port totals are not streams."""
    text = """
  ------- Forward Stats for RX Port= 0/Queue= 0 -> TX Port= 0/Queue= 0 -------
  RX-packets: 7              TX-packets: 335104         TX-dropped: 85403264

  ------- Forward Stats for RX Port= 0/Queue= 1 -> TX Port= 0/Queue= 1 -------
  RX-packets: 0              TX-packets: 363872         TX-dropped: 85374496

  ---------------------- Forward statistics for port 0  ----------------------
  RX-packets: 7              RX-dropped: 0             RX-total: 7
  TX-packets: 698976         TX-dropped: 170777760     TX-total: 171476736
"""
    assert stream_counts(text) == {0: (7, 335104), 1: (0, 363872)}
    assert stream_counts("Done.\n") == {}


# -- with testpmd ----------------------------------------------------------------------


@pytest.mark.dpdk
def test_txonly_rxonly_io(tmp_path: Path, netns: TestNetns) -> None:
    """txonly ~3 s, rxonly ~3 s, idle io, quit: nobody crashes and status counts every frame."""
    with switch_in(tmp_path, netns) as switch:
        pids = worker_pids(switch.status())
        with Testpmd(Path(switch.socket), netns, queues=QUEUES) as pmd:
            # testpmd sets up all four vrings (it never asks GET_QUEUE_NUM); it does not wait for
            # the switch to act on its messages, so the last ones may still be in flight.
            status = settle(switch, lambda s: ring_states(s) == ["running"] * 2 * QUEUES)
            assert status["frontend"]["connected"] and ring_states(status) == ["running"] * 2 * QUEUES, status

            streams = stream_counts(run_phase(pmd, FwdMode.TXONLY, PHASE_S))
            port = pmd.port_stats()[0]          # testpmd is alive and answering
            assert port.tx_packets > 0 and port.tx_errors == 0, pmd.log
            assert sum(tx for _rx, tx in streams.values()) == port.tx_packets, (streams, port)
            status = settle(switch, drained(port))
            check_healthy(switch, pids, status)
            assert per_worker(status, "tx_frames") == [streams.get(q, (0, 0))[1] for q in range(QUEUES)], \
                (streams, status)
            assert total(status, "tx_bytes") == port.tx_bytes == TXONLY_FRAME_LEN * port.tx_packets, status

            sent = port.tx_packets
            run_phase(pmd, FwdMode.RXONLY, PHASE_S)
            port = pmd.port_stats()[0]
            assert port.tx_packets == sent and port.rx_errors == 0, port
            status = settle(switch, drained(port))
            check_healthy(switch, pids, status)
            assert total(status, "rx_frames") == port.rx_packets, (status, port)
            assert total(status, "tx_frames") == sent, status

            run_phase(pmd, FwdMode.IO, 1.0)
            port = pmd.port_stats()[0]
            assert port.tx_packets == sent, port
            check_healthy(switch, pids, settle(switch, drained(port)))

            assert pmd.quit() == 0, pmd.log
        status = wait_disconnected(switch)
        check_healthy(switch, pids, status)
        assert total(status, "tx_frames") == sent, status


@pytest.mark.dpdk
def test_io_loop_through_reflecting_switch(tmp_path: Path, netns: TestNetns) -> None:
    """io + tx_first against ``--reflect``: multi-segment frames loop; RX and TX counts agree; reconnect."""
    frame_len = sum(LOOP_SEGMENTS)
    with switch_in(tmp_path, netns, "--reflect") as switch:
        pids = worker_pids(switch.status())
        with Testpmd(Path(switch.socket), netns, queues=QUEUES) as pmd:
            pmd.command("set txpkts " + ",".join(str(n) for n in LOOP_SEGMENTS))
            streams = stream_counts(run_phase(pmd, FwdMode.IO, PHASE_S, tx_first=True))
            assert sorted(streams) == list(range(QUEUES)), streams
            # Let the switch reflect what is left in the TX rings, then have testpmd read the
            # frames still in its RX rings.
            sent = pmd.port_stats()[0].tx_packets
            settle(switch, lambda s: total(s, "tx_frames") == sent)
            run_phase(pmd, FwdMode.RXONLY, 1.0)
            port = pmd.port_stats()[0]
            assert port.rx_packets > 0 and port.rx_errors == 0 and port.tx_errors == 0, port
            status = settle(switch, drained(port))
            check_healthy(switch, pids, status)
            assert total(status, "tx_frames") == port.tx_packets, (status, port)
            assert total(status, "rx_frames") == port.rx_packets, (status, port)
            assert total(status, "rx_bytes") == port.rx_bytes == frame_len * port.rx_packets, (status, port)
            assert total(status, "tx_bytes") == port.tx_bytes == frame_len * port.tx_packets, (status, port)
            for worker in status["workers"]:     # reflected or dropped with a reason, nothing lost
                assert worker["rx_frames"] + sum(worker["drops"].values()) == worker["tx_frames"], worker
            assert pmd.quit() == 0, pmd.log
        before = wait_disconnected(switch)
        check_healthy(switch, pids, before)

        # A new front-end on the same switch, now without MRG_RXBUF: the device is set up
        # afresh with the new features, and a reflected 3072-byte frame can never fit one of
        # testpmd's 2048-byte RX buffers: each is a counted RX_TOO_BIG drop.
        vdev = f"net_virtio_user0,path={switch.socket},queues={QUEUES},queue_size=256,mrg_rxbuf=0"
        with Testpmd(Path(switch.socket), netns, queues=QUEUES, vdev=vdev) as pmd:
            pmd.command("set txpkts " + ",".join(str(n) for n in LOOP_SEGMENTS))
            streams = stream_counts(run_phase(pmd, FwdMode.TXONLY, 2.0))
            port = pmd.port_stats()[0]
            assert port.tx_packets > 0, pmd.log
            status = settle(switch, lambda s: total(s, "tx_frames") - total(before, "tx_frames")
                            == port.tx_packets)
            check_healthy(switch, pids, status)
            assert "MRG_RXBUF" not in status["frontend"]["feature_names"], status["frontend"]
            grown = [a - b for a, b in zip(per_worker(status, "tx_frames"), per_worker(before, "tx_frames"))]
            assert grown == [streams.get(q, (0, 0))[1] for q in range(QUEUES)], (streams, status)
            too_big = [a["drops"].get("RX_TOO_BIG", 0) - b["drops"].get("RX_TOO_BIG", 0)
                       for a, b in zip(status["workers"], before["workers"])]
            assert too_big == grown, status
            assert per_worker(status, "rx_frames") == per_worker(before, "rx_frames"), status
            assert pmd.quit() == 0, pmd.log
        check_healthy(switch, pids, wait_disconnected(switch))
