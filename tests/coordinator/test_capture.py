"""Packet capture at run time (coordinator/capture.py, ``shardswitch capture``): started and stopped from the
command line, which opens the files itself; rotation to FILE.1 at the size limit; bad requests refused."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shardswitch.coordinator.control import ControlError, query
from shardswitch.frontend.client import VhostUserFrontend
from shardswitch.pcap import MIN_SIZE
from tests.guest.netns import TestNetns
from tests.switch import Switch
from tests.switchkit import arp_roundtrip, is_periodic_ra, wait_until

REPO_ROOT = Path(__file__).resolve().parents[2]
#: A frame the switch drops (an unknown EtherType), large enough to fill a capture file quickly.
FILLER = bytes.fromhex("9a559a559a55" "525400123456" "88b5") + b"f" * 1486


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``shardswitch ARGS`` as a user runs it."""
    return subprocess.run([sys.executable, "-m", "shardswitch", *args], capture_output=True, text=True,
                          timeout=30, env={"PYTHONPATH": str(REPO_ROOT)})


def frames_in(path: Path) -> int:
    """How many frames tcpdump reads in a capture file."""
    done = subprocess.run([shutil.which("tcpdump") or "tcpdump", "-r", str(path), "-nn"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return sum(1 for line in done.stdout.splitlines() if line[:1].isdigit())   # not hex-dump lines


def test_capture_started_rotated_and_stopped_at_run_time(tmp_path: Path, netns: TestNetns) -> None:
    """`capture start` (files opened by the client), frames of both pairs in the file, rotation to FILE.1
    past the limit without a frame lost, `capture stop`; frames after it are not captured."""
    capture = tmp_path / "run.pcap"
    with Switch(tmp_path, workers=2, prefix=netns.exec_argv([])) as switch, \
            VhostUserFrontend.connect(switch.socket, queue_pairs=2, ignore=is_periodic_ra) as fe:
        fe.handshake()
        before = switch.status()["workers"]
        started = cli("capture", "start", str(capture), "--size", str(MIN_SIZE), "--control", switch.control)
        assert started.returncode == 0 and f"capturing into {capture}" in started.stdout, started.stderr
        for pair in range(2):
            arp_roundtrip(fe, pair)
        sent = 0
        while sent < MIN_SIZE * 6 // 5 // len(FILLER):
            sent += fe.send_frames(sent % 2, [FILLER] * 32)
            time.sleep(0.01)
        status = wait_until(lambda: (s := switch.status())["capture"]["rotations"] >= 1 and s or None,
                            "a rotation", timeout=5)
        assert status["capture"]["file"] == f"{capture}.1"
        arp_roundtrip(fe, 1)                          # into FILE.1
        low = switch.status()["workers"]
        assert cli("capture", "stop", "--control", switch.control).stdout.strip() == "capture stopped"
        high = switch.status()["workers"]
        arp_roundtrip(fe, 0)                          # not captured
    moved = [sum(w[f"{d}_frames"] for w in status) - sum(w[f"{d}_frames"] for w in before)
             for status in (low, high) for d in ("tx", "rx")]
    captured = frames_in(capture) + frames_in(Path(f"{capture}.1"))
    assert moved[0] + moved[1] <= captured <= moved[2] + moved[3], (moved, captured)
    assert moved[0] == 3 + sent
    assert frames_in(Path(f"{capture}.1")) > 0 and frames_in(capture) > 0
    assert "capture file full: going on in" in switch.log()


def test_bad_capture_requests(tmp_path: Path, netns: TestNetns) -> None:
    """No file, an unwritable place, a pipe instead of files, a size too small: clear errors; the switch
    serves on."""
    with Switch(tmp_path, prefix=netns.exec_argv([])) as switch:
        assert cli("capture", "start", "--control", switch.control).returncode == 2
        missing = cli("capture", "start", str(tmp_path / "no" / "such.pcap"), "--control", switch.control)
        assert missing.returncode == 1 and "No such file or directory" in missing.stderr
        small = cli("capture", "start", str(tmp_path / "s.pcap"), "--size", "1000", "--control", switch.control)
        assert small.returncode == 1 and "below" in small.stderr
        read_end, write_end = os.pipe()
        with pytest.raises(ControlError, match="not a regular file"):
            query(switch.control, "capture-start", args={"size": 0, "file": "pipe"}, fds=[read_end, write_end])
        os.close(read_end)
        os.close(write_end)
        assert cli("capture", "stop", "--control", switch.control).stdout.strip() == "no capture was running"
        assert switch.status()["capture"] == {"active": False}
