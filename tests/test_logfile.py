"""--log-file (shardswitch/logfile.py): lines appended, the size kept under the limit, the newest kept."""

from __future__ import annotations

import logging
from pathlib import Path

from shardswitch.logfile import KEEP_FRACTION, TRIM_INTERVAL, LogFile


def test_lines_are_appended_and_the_file_is_trimmed(tmp_path: Path) -> None:
    """Records go in as whole lines; above the limit the next look keeps the newest quarter from a line
    start, behind a line saying so; looks happen once per interval."""
    path = tmp_path / "log"
    path.write_text("an older line\n")
    log_file = LogFile(str(path), 64 << 10)
    logger = logging.getLogger("shardswitch.test.logfile")
    logger.propagate = False
    logger.addHandler(log_file.handler(logging.Formatter("%(message)s")))
    logger.setLevel(logging.INFO)
    try:
        for number in range(3000):
            logger.info("line %05d %s", number, "x" * 40)
        assert path.read_text().startswith("an older line\nline 00000 ")
        assert log_file.trim(now=100.0) == TRIM_INTERVAL
        text = path.read_text()
        lines = text.splitlines()
        assert lines[0].startswith("--- log file over 65536 bytes:") and "(trim 1)" in lines[0]
        assert lines[1].startswith("line ") and lines[-1].startswith("line 02999 ")
        assert len(text.encode()) <= (64 << 10) // KEEP_FRACTION + 200
        logger.info("after the trim")
        assert path.read_text().endswith("after the trim\n")
        assert log_file.trim(now=100.5) == 0.5                 # not yet: no look
    finally:
        logger.handlers.clear()
        log_file.close()


def test_a_small_file_is_left_alone(tmp_path: Path) -> None:
    """Under the limit nothing changes."""
    path = tmp_path / "log"
    log_file = LogFile(str(path), 64 << 10)
    log_file.stream.write("one line\n")
    log_file.trim(now=1.0)
    assert path.read_text() == "one line\n"
    log_file.close()
