"""UDP flow timeouts: passt's rule over the sides' datagram counts, and reading the host's conntrack settings
(parsing, passt's defaults, clamping), from files the tests write."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from shardswitch.ipc import WorkerSetup
from shardswitch.net.params import GuestParams
from shardswitch.worker.udptimeout import (NETFILTER_SYSCTLS, STREAM_FILE, TIMEOUT_FILE, Bound, Default, UdpTimeouts,
                                           choose, clamp, parse_seconds, read_setting, read_timeouts)

TIMEOUTS = UdpTimeouts(30, 120)


@pytest.mark.parametrize(("initiator", "target", "expected"), [
    (0, 0, 30),          # a flow re-created by a migration, nothing sent yet
    (1, 0, 30),          # one datagram, no answer
    (255, 0, 30),        # one way only, however many
    (1, 1, 30),          # one query, one reply: a DNS lookup
    (2, 1, 120),         # the initiator sent more than one and was answered
    (1, 2, 120),         # the target sent more than one
    (0, 2, 120),         # (migrated flow, then two datagrams from the target)
    (0, 1, 30),
    (255, 255, 120),
])
def test_rule_is_passts(initiator: int, target: int, expected: int) -> None:
    """The stream timeout once the target side sent something and either side more than one datagram."""
    assert choose(TIMEOUTS, initiator, target) == expected


def test_rule_uses_the_given_timeouts() -> None:
    """Whatever the host's settings are, the rule picks between them."""
    assert choose(UdpTimeouts(5, 7), 1, 1) == 5 and choose(UdpTimeouts(5, 7), 2, 1) == 7


def test_defaults_are_passts() -> None:
    """30 s and 120 s, the sysctls' paths as passt's udp.c has them; the worker's setup defaults to them."""
    assert (Default.TIMEOUT, Default.STREAM) == (30, 120) and UdpTimeouts() == TIMEOUTS
    assert f"{NETFILTER_SYSCTLS}/{TIMEOUT_FILE}" == "/proc/sys/net/netfilter/nf_conntrack_udp_timeout"
    assert f"{NETFILTER_SYSCTLS}/{STREAM_FILE}" == "/proc/sys/net/netfilter/nf_conntrack_udp_timeout_stream"
    assert WorkerSetup(pair=0, params=GuestParams(address="10.0.2.15", prefix_len=24,
                                                  gateway="10.0.2.2")).udp_timeouts == TIMEOUTS


@pytest.mark.parametrize(("text", "expected"), [
    (b"30\n", 30), (b"120", 120), (b"  45\n", 45), (b"+7\n", 7), (b"-3\n", -3), (b"0\n", 0),
    (b"", None), (b"\n", None), (b"abc\n", None), (b"30s\n", None), (b"30 \n", None), (b"3_0\n", None),
    (b"30\n\n", None), (b"0x1e\n", None), (b"\xff\n", None), (b"1.5\n", None),
])
def test_parse_seconds(text: bytes, expected: int | None) -> None:
    """A decimal integer with optional leading blanks and sign and one trailing newline, as passt's strtoimax
    check; anything else is no value."""
    assert parse_seconds(text) == expected


def test_clamp() -> None:
    """Into 1 .. 86400 s."""
    assert (clamp(-5), clamp(0), clamp(1), clamp(600), clamp(86400), clamp(10**30)) == (1, 1, 1, 600, 86400, 86400)
    assert (Bound.MIN, Bound.MAX) == (1, 86400)


def write(folder: Path, timeout: bytes | None, stream: bytes | None) -> str:
    """A stand-in for /proc/sys/net/netfilter holding the given contents (None: no such file)."""
    for name, text in ((TIMEOUT_FILE, timeout), (STREAM_FILE, stream)):
        if text is not None:
            (folder / name).write_bytes(text)
    return str(folder)


def test_read_timeouts_from_the_settings(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Both values read as the host has them, and what is used logged at debug level."""
    caplog.set_level(logging.DEBUG, logger="shardswitch")
    assert read_timeouts(write(tmp_path, b"17\n", b"95\n")) == UdpTimeouts(17, 95)
    assert "UDP flow timeouts: 17 s, 95 s for streams" in caplog.text


@pytest.mark.parametrize(("timeout", "stream", "expected", "logged"), [
    (None, None, (30, 120), "cannot read"),                 # no conntrack module: passt's defaults
    (b"", b"", (30, 120), "no integer"),                    # empty
    (b"thirty\n", b"60\n", (30, 60), "no integer"),         # malformed: that one's default only
    (b"45\n", b"2 minutes\n", (45, 120), "no integer"),
    (b"0\n", b"-1\n", (1, 1), "outside 1..86400"),          # clamped, not passt's 0 or negative
    (b"99999999999999999999999\n", b"86401\n", (86400, 86400), "outside 1..86400"),
    (b"9" * 100, b"60\n", (30, 60), "no integer"),          # longer than any setting: not read as a number
])
def test_read_timeouts_defaults_and_clamping(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                             timeout: bytes | None, stream: bytes | None,
                                             expected: tuple[int, int], logged: str) -> None:
    """Unreadable, empty or malformed: passt's default for that value; out of range: clamped; each logged."""
    caplog.set_level(logging.DEBUG, logger="shardswitch")
    assert read_timeouts(write(tmp_path, timeout, stream)) == UdpTimeouts(*expected)
    assert logged in caplog.text
    assert f"UDP flow timeouts: {expected[0]} s, {expected[1]} s for streams" in caplog.text


def test_read_setting_of_a_directory(tmp_path: Path) -> None:
    """A path that is not a readable file gives the default."""
    assert read_setting(str(tmp_path), 42) == 42


def test_read_timeouts_of_this_host() -> None:
    """On this machine: the values its /proc has (clamped), or passt's defaults where there are none."""
    expected = []
    for name, default in ((TIMEOUT_FILE, 30), (STREAM_FILE, 120)):
        try:
            value = parse_seconds(Path(NETFILTER_SYSCTLS, name).read_bytes())
        except OSError:
            value = None
        expected.append(default if value is None else clamp(value))
    assert read_timeouts() == UdpTimeouts(*expected)
