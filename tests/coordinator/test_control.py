"""The control socket's rendering for people: drops and events apart."""

from __future__ import annotations

from shardswitch.coordinator.control import format_status


def test_status_shows_drops_and_events_apart() -> None:
    """A worker's drops (frames lost, by reason) and events (nothing lost) are listed on lines of their own."""
    worker = {"pair": 0, "pid": 42, "rings": [], "drops": {"RX_NO_BUFFERS": 2, "NOT_FOR_US": 1},
              "events": {"UDP_HOST_ICMP_ERROR": 3}}
    lines = format_status({"pid": 1, "workers": [worker, {"pair": 1, "pid": 43, "rings": []}]}).splitlines()
    assert "  dropped: NOT_FOR_US 1, RX_NO_BUFFERS 2" in lines
    assert "  events: UDP_HOST_ICMP_ERROR 3" in lines
    assert sum(1 for line in lines if line.startswith(("  dropped", "  events"))) == 2
