"""The systemd units in deploy/: hardened as the README says, rated by systemd's own analysis."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
UNITS = sorted((REPO / "deploy").glob("*.service"))
#: The worst overall exposure systemd-analyze may rate a unit (0 = locked down, 10 = fully exposed; <= 2 is
#: what it calls "OK").
MAX_EXPOSURE = 2.0


def settings(unit: Path) -> dict[str, list[str]]:
    """Every Key=value of ``unit``, values in order."""
    found: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";")):
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_exposure_rated_ok(unit: Path) -> None:
    """`systemd-analyze security --offline=true` rates the unit at most MAX_EXPOSURE."""
    tool = shutil.which("systemd-analyze")
    assert tool, "systemd-analyze (Debian's systemd package) is needed"
    done = subprocess.run([tool, "security", "--offline=true", "--no-pager", str(unit)],
                          capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for \S+: ([\d.]+)", done.stdout)
    assert match, (done.stdout, done.stderr)
    assert float(match[1]) <= MAX_EXPOSURE, done.stdout


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_unprivileged_and_filtered(unit: Path) -> None:
    """Not root, no capability, no_new_privs, a system-call filter without @privileged, only the socket
    families shardswitch uses."""
    keys = settings(unit)
    assert keys["DynamicUser"] == ["yes"] and keys["User"][0].startswith("shardswitch-")
    # systemd refuses a dynamic user whose name a static group holds (the QEMU group "shardswitch").
    assert keys["Group"] == ["shardswitch"] and keys["User"] != keys["Group"]
    assert keys["CapabilityBoundingSet"] == [""] and keys["AmbientCapabilities"] == [""]
    assert keys["NoNewPrivileges"] == ["yes"]
    assert keys["SystemCallFilter"][0] == "@system-service"
    assert "@privileged" in keys["SystemCallFilter"][1] and keys["SystemCallFilter"][1].startswith("~")
    assert keys["RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6 AF_NETLINK"]
    assert keys["ExecStart"][0].split()[1] == "start"


def test_socket_unit_matches_the_service() -> None:
    """shardswitch.socket listens where shardswitch.service serves, passes the socket by the name the
    switch looks for (not one connection per service: Accept=no), and the service notifies readiness."""
    socket_keys = settings(REPO / "deploy" / "shardswitch.socket")
    service_keys = settings(REPO / "deploy" / "shardswitch.service")
    assert socket_keys["Service"] == ["shardswitch.service"] and socket_keys["Accept"] == ["no"]
    assert socket_keys["FileDescriptorName"] == ["vhost-user"]
    exec_start = service_keys["ExecStart"][0].split()
    assert exec_start[exec_start.index("--socket") + 1] == socket_keys["ListenStream"][0]
    assert service_keys["Type"] == ["notify"] and service_keys["WatchdogSec"]
    assert service_keys["RuntimeDirectoryPreserve"] == ["yes"]
    tool = shutil.which("systemd-analyze")
    assert tool, "systemd-analyze (Debian's systemd package) is needed"
    done = subprocess.run([tool, "verify", "--man=no", str(REPO / "deploy" / "shardswitch.socket")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr


def test_each_instance_has_its_own_user() -> None:
    """shardswitch@NAME runs as a user of its own (shardswitch-NAME): another instance, or another VM's
    QEMU (in the group of the vhost-user sockets), cannot use its control socket, which the switch makes
    mode 0600 for root and its own user; the units do not widen that."""
    keys = settings(REPO / "deploy" / "shardswitch@.service")
    assert keys["User"] == ["shardswitch-%i"] and keys["RuntimeDirectory"] == ["shardswitch/%i"]
    for unit in UNITS:
        assert "--control-group" not in settings(unit)["ExecStart"][0]
