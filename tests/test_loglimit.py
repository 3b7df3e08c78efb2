"""Tests of shardswitch.loglimit: a peer cannot flood the log; what was left out is counted and reported."""

from __future__ import annotations

import logging

import pytest

from shardswitch.loglimit import MAX_KEYS, LogLimiter


class Clock:
    """A settable clock."""

    def __init__(self) -> None:
        """Start at 100 s."""
        self.now = 100.0

    def __call__(self) -> float:
        """The current time."""
        return self.now


def test_burst_then_suppressed_then_counted(caplog: pytest.LogCaptureFixture) -> None:
    """5 lines per key and window; the rest counted; the next window's first line carries the count; keys
    are limited apart; flush reports a count no later line would carry."""
    clock = Clock()
    limiter = LogLimiter(logging.getLogger("test.loglimit"), burst=5, interval=10.0, clock=clock)
    with caplog.at_level(logging.WARNING, "test.loglimit"):
        logged = [limiter.warning("full", "table full %d", n) for n in range(10_000)]
        assert logged.count(True) == 5 and limiter.suppressed_total == 9_995
        assert limiter.error("other", "another cause")
        clock.now += 10.0
        assert limiter.warning("full", "table full %d", 10_000)
        assert len(caplog.records) == 7
        assert caplog.records[-1].getMessage() == "table full 10000 (9995 similar lines suppressed in 10 s)"
        for _ in range(7):
            limiter.warning("full", "table full again")
        clock.now += 10.0
        limiter.flush()
        assert caplog.records[-1].getMessage() == "full: 3 similar lines suppressed in 10 s"
        count = len(caplog.records)
        limiter.flush()
        assert len(caplog.records) == count


def test_keys_are_bounded() -> None:
    """Beyond MAX_KEYS distinct keys, the rest share one limited key."""
    clock = Clock()
    limiter = LogLimiter(logging.getLogger("test.loglimit.keys"), burst=1, clock=clock)
    results = [limiter.warning(f"key {n}", "line") for n in range(MAX_KEYS + 10)]
    assert results.count(True) == MAX_KEYS + 1
