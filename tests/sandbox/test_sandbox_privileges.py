"""Giving up privileges (shardswitch.sandbox.privileges), in forked children of the test process (root)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Callable

import pytest

from shardswitch.sandbox import privileges
from shardswitch.sandbox.privileges import RunAs, SandboxError, drop_privileges, process_status, resolve_runas

NOBODY = 65534

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root, as systemd and libvirt start us")


def in_child(action: Callable[[], object]) -> object:
    """Run ``action`` in a forked child and return what it returned (JSON through a pipe)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            result: object = {"ok": action()}
        except Exception as err:  # noqa: BLE001 - reported to the parent
            result = {"error": f"{type(err).__name__}: {err}"}
        os.write(w, json.dumps(result).encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    _pid, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    answer = json.loads(data)
    if "error" in answer:
        raise AssertionError(answer["error"])
    return answer["ok"]


def test_root_start_becomes_nobody_with_nothing_left() -> None:
    """Root -> nobody: every user and group ID, no supplementary group, every capability set empty (bounding
    and ambient included), no_new_privs, new IPC and UTS namespaces, and a filesystem holding only /dev/shm,
    /dev/null, /proc and the directory kept (writable by nobody as before)."""
    host_ipc = os.readlink("/proc/self/ns/ipc")

    keep = tempfile.mkdtemp(prefix="kept-")
    os.chown(keep, NOBODY, NOBODY)

    def drop() -> object:
        drop_privileges(resolve_runas(None), keep=[keep])
        with open(os.path.join(keep, "written"), "w") as f:
            f.write("by nobody")
        return {"status": process_status(), "ipc": os.readlink("/proc/self/ns/ipc"), "root": sorted(os.listdir("/")),
                "shm": os.path.isdir("/dev/shm"), "null": os.path.exists("/dev/null"),
                "fd": os.path.isdir("/proc/self/fd"), "etc": os.path.exists("/etc/passwd")}

    try:
        result = in_child(drop)
        assert open(os.path.join(keep, "written")).read() == "by nobody"
    finally:
        shutil.rmtree(keep)
    assert isinstance(result, dict)
    status = result["status"]
    assert status["Uid"].split() == [str(NOBODY)] * 4
    assert status["Gid"].split() == [str(NOBODY)] * 4
    assert status["Groups"] == ""
    for key in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(status[key], 16) == 0, key
    assert status["NoNewPrivs"] == "1"
    assert result["ipc"] != host_ipc
    # The filesystem: only what the switch still uses.
    assert result["root"] == ["dev", "proc", "tmp"], result["root"]
    assert result["shm"] and result["null"] and result["fd"] and not result["etc"]


def test_runas_user_and_group() -> None:
    """--runas USER:GROUP by names and by numbers."""
    assert resolve_runas("nobody") == RunAs("nobody", NOBODY, NOBODY)
    assert resolve_runas("nobody:nogroup") == RunAs("nobody", NOBODY, NOBODY)
    assert resolve_runas("65534:65533") == RunAs("nobody", NOBODY, 65533)
    assert resolve_runas("4242") == RunAs("4242", 4242, 4242)

    def drop() -> object:
        drop_privileges(resolve_runas("4242:4343"))
        return process_status()

    status = in_child(drop)
    assert isinstance(status, dict)
    assert status["Uid"].split()[0] == "4242" and status["Gid"].split()[0] == "4343"


@pytest.mark.parametrize("spec, message", [
    ("no-such-user-here", "no user named"),
    ("nobody:no-such-group", "no group named"),
    ("root", "running as root"),
    ("0", "running as root"),
    ("nobody:root", "running as root"),
])
def test_runas_refused(spec: str, message: str) -> None:
    """Unknown users and groups, and root itself, are refused with the reason."""
    with pytest.raises(SandboxError, match=message):
        resolve_runas(spec)


def test_non_root_start_keeps_its_user_and_drops_the_rest() -> None:
    """A process that is not root keeps its user (--runas may only name it) and still gets no_new_privs and
    empty capability sets."""
    def as_user() -> object:
        privileges.preload()  # this test's Python lives where uid 4242 may not read
        os.setresgid(4343, 4343, 4343)
        os.setresuid(4242, 4242, 4242)
        assert resolve_runas(None) is None
        assert resolve_runas("4242") is None
        try:
            resolve_runas("nobody")
        except SandboxError as err:
            refused = str(err)
        drop_privileges(None)
        return {"status": process_status(), "refused": refused}

    result = in_child(as_user)
    assert isinstance(result, dict)
    assert "only root can change user" in result["refused"]
    assert result["status"]["NoNewPrivs"] == "1" and int(result["status"]["CapEff"], 16) == 0


def test_process_name() -> None:
    """set_name renames the process as ps and the kernel's audit lines show it."""
    def rename() -> object:
        privileges.set_name("shardswitch-w7")
        with open("/proc/self/comm") as f:
            return f.read().strip()

    assert in_child(rename) == "shardswitch-w7"


def test_clear_capabilities_empties_every_set() -> None:
    """capset empties the effective, permitted and inheritable sets of a process that holds capabilities."""
    def clear() -> object:
        before = process_status()
        privileges.clear_capabilities()
        return {"before": before, "after": process_status()}

    result = in_child(clear)
    assert isinstance(result, dict)
    assert int(result["before"]["CapEff"], 16) != 0
    for key in ("CapInh", "CapPrm", "CapEff"):
        assert int(result["after"][key], 16) == 0, key
