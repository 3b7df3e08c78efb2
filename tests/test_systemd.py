"""systemd's protocols without systemd (shardswitch/systemd.py): LISTEN_FDS, NOTIFY_SOCKET, the journal."""

from __future__ import annotations

import logging
import os
import socket
import tempfile
from pathlib import Path

import pytest

from shardswitch import systemd


def test_listen_fds_for_another_process_are_ignored_and_unset() -> None:
    """Variables meant for another PID (inherited) are not taken, and are removed either way."""
    env = {"LISTEN_FDS": "1", "LISTEN_PID": "1", "LISTEN_FDNAMES": "vhost-user", "OTHER": "x"}
    assert systemd.listen_fds(env, os.getpid()) == {}
    assert env == {"OTHER": "x"}
    assert systemd.listen_fds({}, os.getpid()) == {}


@pytest.mark.parametrize(("count", "pid", "match"), [("x", "1", "not numbers"), ("0", None, "1 to 16"),
                                                     ("17", None, "1 to 16")])
def test_listen_fds_malformed(count: str, pid: str | None, match: str) -> None:
    """Malformed or out-of-range values are refused with a message naming them."""
    env = {"LISTEN_FDS": count, "LISTEN_PID": pid or str(os.getpid())}
    with pytest.raises(systemd.ActivationError, match=match):
        systemd.listen_fds(env, os.getpid())


def test_check_unix_stream() -> None:
    """A listening unix stream socket: True; a connected one: False; anything else refused."""
    with tempfile.TemporaryDirectory() as tmp:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(Path(tmp) / "s"))
        listener.listen(1)
        assert systemd.check_unix_stream(listener.fileno(), "t") is True
        listener.close()
    a, b = socket.socketpair()
    assert systemd.check_unix_stream(a.fileno(), "t") is False
    a.close()
    b.close()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as dgram:
        with pytest.raises(systemd.ActivationError, match="not a unix stream socket"):
            systemd.check_unix_stream(dgram.fileno(), "t")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as inet:
        with pytest.raises(systemd.ActivationError, match="not a unix stream socket"):
            systemd.check_unix_stream(inet.fileno(), "t")
    read_end, write_end = os.pipe()
    with pytest.raises(systemd.ActivationError, match="not a socket"):
        systemd.check_unix_stream(read_end, "t")
    os.close(read_end)
    os.close(write_end)
    with pytest.raises(systemd.ActivationError, match="Bad file descriptor"):
        systemd.check_unix_stream(999, "t")


@pytest.mark.parametrize("abstract", [False, True])
def test_notifier(tmp_path: Path, abstract: bool) -> None:
    """READY with STATUS, WATCHDOG at half of WATCHDOG_USEC when due, STOPPING; a path or an abstract name."""
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"@shardswitch-test-{os.getpid()}" if abstract else str(tmp_path / "notify")
    receiver.bind(b"\0" + name[1:].encode() if abstract else name)
    receiver.settimeout(2)
    env = {"NOTIFY_SOCKET": name, "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}
    notifier = systemd.Notifier(env, os.getpid())
    assert env == {} and notifier.watchdog_interval == 1.0
    notifier.ready("serving")
    assert receiver.recv(100) == b"READY=1\nSTATUS=serving"
    assert notifier.watchdog_timeout(notifier.next_watchdog) == 1.0
    assert receiver.recv(100) == b"WATCHDOG=1"
    assert notifier.watchdog_timeout(notifier.next_watchdog - 0.25) == pytest.approx(0.25)
    notifier.close()
    assert receiver.recv(100) == b"STOPPING=1\nSTATUS=stopping"
    receiver.close()


def test_notifier_without_socket_or_unreachable(tmp_path: Path) -> None:
    """No NOTIFY_SOCKET: nothing happens; an unreachable one is logged and ignored; a watchdog meant for
    another PID is not ours."""
    quiet = systemd.Notifier({"WATCHDOG_USEC": "100"}, os.getpid())
    quiet.ready("x")
    assert quiet.watchdog_timeout(0.0) is None
    gone = systemd.Notifier({"NOTIFY_SOCKET": str(tmp_path / "none")}, os.getpid())
    assert gone.sock is None
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(tmp_path / "n"))
    other = systemd.Notifier({"NOTIFY_SOCKET": str(tmp_path / "n"), "WATCHDOG_USEC": "100",
                              "WATCHDOG_PID": "1"}, os.getpid())
    assert other.sock is not None and other.watchdog_interval == 0.0
    other.close()
    receiver.close()


def test_journal_stream_and_formatter(tmp_path: Path) -> None:
    """JOURNAL_STREAM matching the descriptor: the journal; records get a priority prefix per line."""
    with open(tmp_path / "f", "w") as stream:
        info = os.fstat(stream.fileno())
        env = {"JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}"}
        assert systemd.journal_stream(env, stream.fileno())
        assert not systemd.journal_stream({"JOURNAL_STREAM": "1:2"}, stream.fileno())
        assert not systemd.journal_stream({}, stream.fileno())
        assert not systemd.journal_stream({"JOURNAL_STREAM": "x"}, stream.fileno())
    formatter = systemd.JournalFormatter()
    record = logging.LogRecord("shardswitch", logging.ERROR, __file__, 1, "bad\nsecond", None, None)
    lines = formatter.format(record).splitlines()
    assert lines[0].startswith("<3>shardswitch[") and lines[0].endswith("ERROR: bad") and lines[1] == "<3>second"
    warning = logging.LogRecord("x", logging.WARNING, __file__, 1, "w", None, None)
    assert formatter.format(warning).startswith("<4>")
