"""Giving up privileges (shardswitch.sandbox.privileges), in forked children of the test process (root)."""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path

import pytest

from shardswitch.sandbox import pidns, privileges
from shardswitch.sandbox.privileges import RunAs, SandboxError, drop_privileges, process_status, resolve_runas
from tests.switchkit import in_child

NOBODY = 65534
PR_SET_DUMPABLE = 4

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root, as systemd and libvirt start us")


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


def become_4242() -> None:
    """Switch this (child) process to uid 4242, gid 4343, as a non-root start would run."""
    privileges.preload()  # this test's Python lives where uid 4242 may not read
    os.setgroups([])
    os.setresgid(4343, 4343, 4343)
    os.setresuid(4242, 4242, 4242)
    # A process that changed user is not dumpable (its /proc files become root's); one exec'd as 4242 is.
    privileges._libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)


def test_non_root_start_keeps_its_user_in_namespaces_of_its_own() -> None:
    """A process that is not root keeps its user (--runas may only name it); in a user namespace mapping only
    that user it gets new IPC and UTS namespaces and the same empty filesystem view as a root start, then
    no capability (not even in its namespace), no_new_privs."""
    host_ipc = os.readlink("/proc/self/ns/ipc")
    keep = tempfile.mkdtemp(prefix="kept-")
    os.chown(keep, 4242, 4343)

    def as_user() -> object:
        become_4242()
        assert resolve_runas(None) is None
        assert resolve_runas("4242") is None
        try:
            resolve_runas("nobody")
        except SandboxError as err:
            refused = str(err)
        drop_privileges(None, keep=[keep])
        return {"status": process_status(), "refused": refused, "root": sorted(os.listdir("/")),
                "ipc": os.readlink("/proc/self/ns/ipc"), "uid": os.getuid(), "pid": os.getpid()}

    try:
        result = in_child(as_user)
    finally:
        shutil.rmtree(keep)
    assert isinstance(result, dict)
    assert "only root can change user" in result["refused"]
    status = result["status"]
    assert result["uid"] == 4242 and status["Uid"].split() == ["4242"] * 4
    assert status["NoNewPrivs"] == "1"
    for key in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(status[key], 16) == 0, key
    assert result["root"] == ["dev", "proc", "tmp"] and result["ipc"] != host_ipc
    assert result["pid"] == 1, "a PID namespace of its own, inside its user namespace"


def test_non_root_start_without_a_user_namespace_still_drops_the_rest() -> None:
    """Where no user namespace can be made (here: a threaded process; elsewhere a host or unit forbidding them),
    the start goes on with no_new_privs and no capability, its view of files unchanged."""
    def threaded_user() -> object:
        become_4242()
        stop = threading.Event()
        thread = threading.Thread(target=stop.wait)
        thread.start()
        try:
            why_not = privileges.own_user_namespace()
        finally:
            stop.set()
            thread.join()
        privileges.clear_capabilities()
        privileges.prctl(privileges.Prctl.SET_NO_NEW_PRIVS, 1)
        return {"why_not": why_not, "status": process_status(), "etc": os.path.exists("/etc/passwd")}

    result = in_child(threaded_user)
    assert isinstance(result, dict)
    assert "unshare" in result["why_not"] and result["etc"]
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


CAP_SYS_ADMIN = 21


def without_capability(cap: int) -> None:
    """Remove ``cap`` from this (child) process's effective and permitted sets, as a container runtime's
    default set lacks CAP_SYS_ADMIN."""
    header = privileges._CapHeader(privileges.LINUX_CAPABILITY_VERSION_3, 0)
    data = (privileges._CapData * 2)()
    assert privileges._libc.capget(ctypes.byref(header), data) == 0
    word, bit = divmod(cap, 32)
    data[word].effective &= ~(1 << bit)
    data[word].permitted &= ~(1 << bit)
    assert privileges._libc.capset(ctypes.byref(header), data) == 0


def test_root_start_without_cap_sys_admin_still_becomes_nobody(caplog: pytest.LogCaptureFixture) -> None:
    """A root start that may not make namespaces (a container without CAP_SYS_ADMIN) still becomes nobody with
    no capability and no_new_privs; it says why its files stay in view."""
    def drop() -> object:
        without_capability(CAP_SYS_ADMIN)
        with caplog.at_level(logging.INFO, logger="shardswitch"):
            drop_privileges(resolve_runas(None), keep=["/tmp"])
        return {"status": process_status(), "etc": os.path.exists("/etc/passwd"),
                "said": [r.getMessage() for r in caplog.records]}

    result = in_child(drop)
    assert isinstance(result, dict)
    status = result["status"]
    assert status["Uid"].split() == [str(NOBODY)] * 4 and status["NoNewPrivs"] == "1"
    assert all(int(status[k], 16) == 0 for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")), status
    assert result["etc"]
    assert any("no namespaces of its own" in line and "Operation not permitted" in line for line in result["said"])


def test_pid_namespace_of_its_own_names_nothing_outside(tmp_path: Path) -> None:
    """A root start goes on as PID 1 of a new PID namespace, in a session of its own: it cannot name (so not
    signal) any process outside, not even its own keeper or the test; its /proc is that namespace's, read-only.
    The keeper is told the PID the host sees."""
    outside = os.getpid()
    told = tmp_path / "told"

    def drop() -> object:
        confinement = drop_privileges(resolve_runas(None), keep=[], on_fork=lambda pid: told.write_text(str(pid)))
        try:
            os.kill(outside, 0)
            reached = True
        except ProcessLookupError:
            reached = False
        with open("/proc/self/mountinfo") as f:
            proc = next(line for line in f if line.split()[4] == "/proc")
        return {"pid": os.getpid(), "sid": os.getsid(0), "reached": reached, "host_pid": confinement.host_pid,
                "pid_namespace": confinement.pid_namespace, "proc": proc,
                "visible": sorted(int(n) for n in os.listdir("/proc") if n.isdigit())}

    result = in_child(drop)
    assert isinstance(result, dict)
    assert result["pid_namespace"] and result["pid"] == 1 and result["sid"] == 1, result
    assert not result["reached"] and result["visible"] == [1], result
    assert result["host_pid"] > 1 and told.read_text() == str(result["host_pid"]), "the keeper's on_fork"
    assert " proc proc ro" in result["proc"] and result["proc"].split()[5].startswith("ro,"), result["proc"]


def refuse_new_pid_namespaces() -> None:
    """Install a filter that fails unshare(CLONE_NEWPID) with EPERM, as a container's seccomp profile may."""
    from shardswitch.sandbox import seccomp as ours

    sc = ours._BINDING
    filt = sc.SyscallFilter(ours.SECCOMP_RET_ALLOW)
    filt.add_rule(ours.SECCOMP_RET_ERRNO | 1, sc.resolve_syscall(sc.Arch.NATIVE, "unshare"),
                  sc.Arg(0, ours.ARG_MASKED_EQ, pidns.CLONE_NEWPID, pidns.CLONE_NEWPID))
    filt.load()


def test_host_refusing_pid_namespaces_is_said_and_the_rest_built(caplog: pytest.LogCaptureFixture) -> None:
    """Where the host refuses a PID namespace, the start says so and goes on: no fork, the host's /proc
    bound read-only in the same empty view, nobody, no capability."""
    def drop() -> object:
        refuse_new_pid_namespaces()
        pid = os.getpid()
        with caplog.at_level(logging.INFO, logger="shardswitch"):
            confinement = drop_privileges(resolve_runas(None), keep=[])
        with open("/proc/self/mountinfo") as f:
            proc = next(line for line in f if line.split()[4] == "/proc")
        return {"same": os.getpid() == pid, "pid_namespace": confinement.pid_namespace, "proc": proc,
                "root": sorted(os.listdir("/")), "status": process_status(),
                "said": [r.getMessage() for r in caplog.records]}

    result = in_child(drop)
    assert isinstance(result, dict)
    assert result["same"] and not result["pid_namespace"], result
    assert any("no PID namespace of its own" in line and "Operation not permitted" in line
               for line in result["said"]), result["said"]
    assert result["root"] == ["dev", "proc"] and result["proc"].split()[5].startswith("ro,"), result
    assert result["status"]["Uid"].split() == [str(NOBODY)] * 4 and int(result["status"]["CapEff"], 16) == 0
