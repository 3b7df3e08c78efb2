"""Socket activation of the switch, for the hosting tests and the guests started through it.

Socket activation runs systemd's own ``systemd-socket-activate``, which
listens, starts the switch at the first connection and passes the socket as
systemd does (LISTEN_FDS, LISTEN_PID, LISTEN_FDNAMES).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from tests.conftest import in_ci
from tests.guest.netns import TestNetns

REPO_ROOT = Path(__file__).resolve().parents[2]


def activate_argv(netns: TestNetns, path: Path, options: list[str] | None = None) -> list[str]:
    """systemd-socket-activate listening on ``path`` in ``netns`` and starting the switch (with ``options``)
    on first use, as shardswitch.socket does."""
    activate = shutil.which("systemd-socket-activate")
    if activate is None:
        if in_ci():
            pytest.fail("systemd-socket-activate missing (package systemd)", pytrace=False)
        pytest.skip("systemd-socket-activate missing (package systemd)")
    return netns.exec_argv([activate, "-l", str(path), "--fdname=vhost-user",
                            "-E", f"PYTHONPATH={REPO_ROOT}", sys.executable, "-m", "shardswitch", "start", "-d",
                            *(options or [])])
