"""--stats DELAY: the line's schedule and content (sans-IO), and a running switch that logs it."""

from __future__ import annotations

from pathlib import Path

from shardswitch.coordinator.stats import StatsLog
from tests.switch import Switch
from tests.switchkit import arp_roundtrip, ready_frontend, wait_until


def status(tx: int, rx: int, drops: int = 0, flows: int = 0) -> dict[str, object]:
    """A status answer with two workers sharing the figures."""
    worker = {"tx_frames": tx, "rx_frames": rx, "tx_bytes": 60 * tx, "rx_bytes": 60 * rx, "flows": flows,
              "drops": {"ETHERTYPE_UNHANDLED": drops}}
    return {"workers": [worker, dict(worker)]}


def test_schedule_and_line() -> None:
    """Due DELAY after start and after each line; a line only when a figure changed, with totals and changes."""
    stats = StatsLog(5, now=100.0)
    assert stats.wait(101.0) == 4.0 and stats.wait(106.0) == 0.0
    line = stats.line(status(3, 2, drops=1, flows=1), now=105.0)
    assert line == ("stats: frames from the guest 6 (+6), to the guest 4 (+4), bytes from 360 (+360), to 240 (+240), "
                    "flows 2 (+2), dropped 2 (+2)")
    assert stats.wait(105.0) == 5.0
    assert stats.line(status(3, 2, drops=1, flows=1), now=110.0) is None
    assert "flows 0 (-2)" in (stats.line(status(4, 2, drops=1), now=115.0) or "")


def test_running_switch_logs_stats(tmp_path: Path) -> None:
    """--stats 1: once frames moved, a stats line reaches the log within a few seconds."""
    with Switch(tmp_path, args=["--stats", "1"]) as sw, ready_frontend(sw, pairs=1) as fe:
        arp_roundtrip(fe, 0)
        wait_until(lambda: "stats: frames from the guest" in sw.log() or None, "a stats line", timeout=10.0)
