"""The flow table's objects as a local user sees them: nothing in the host's /dev/shm before, during or after a
run, a crash leaves nothing, names made in advance stop nothing, a table that cannot be made is a clear error."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import posix_ipc
import pytest

from tests.switch import Switch
from tests.switchkit import wait_until

SHM = Path("/dev/shm")
NOBODY = 65534


def ours() -> set[str]:
    """Everything in the host's /dev/shm that could be a switch's (segments, semaphores: shardswitch-...)."""
    return {p.name for p in SHM.iterdir() if "shardswitch" in p.name}


@pytest.mark.parametrize("args", [[], ["--no-sandbox"]], ids=["sandboxed", "no-sandbox"])
def test_host_dev_shm_holds_nothing_of_the_switch(tmp_path: Path, args: list[str]) -> None:
    """Listed before, while two workers serve, and after the stop: the host's /dev/shm gains nothing."""
    before = ours()
    with Switch(tmp_path, workers=2, args=args) as switch:
        status = switch.status()
        assert status["flow_table"]["instance"] and status["flow_table"]["capacity"] > 0
        assert ours() <= before, ours() - before
    assert ours() <= before, ours() - before


def test_crash_leaves_nothing_and_the_next_start_serves(tmp_path: Path) -> None:
    """SIGKILL (the process started, and with it the coordinator and its workers) leaves nothing behind; the
    next start on the same socket serves with an empty table of its own."""
    before = ours()
    first = Switch(tmp_path, workers=2).start()
    status = first.status()
    pids = [first.pid] + [w["pid"] for w in status["workers"]]
    first.kill()
    wait_until(lambda: not any(Path(f"/proc/{pid}").exists() for pid in pids) or None,
               "the coordinator and the workers to follow the SIGKILLed process", timeout=10)
    assert ours() <= before
    with Switch(tmp_path, workers=2) as second:
        again = second.status()["flow_table"]
        assert again["instance"] != status["flow_table"]["instance"] and again["active"] == 0


def _old_names(socket_path: str) -> list[str]:
    """The names an earlier shardswitch used: a hash of the socket path, anyone could compute them."""
    base = "/shardswitch-i" + hashlib.sha256(os.path.abspath(socket_path).encode()).hexdigest()[:16]
    return [base + suffix for suffix in (".flows", ".turnstile", ".room", ".mutex")]


@pytest.fixture
def squatted(tmp_path: Path) -> Iterator[list[str]]:
    """The predictable names of a switch at ``tmp_path/ss.sock``, created first by nobody (mode 0600, the
    semaphores at 0: whoever waited on them would stall)."""
    names = _old_names(str(tmp_path / "ss.sock"))
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setgroups([])
            os.setresgid(NOBODY, NOBODY, NOBODY)
            os.setresuid(NOBODY, NOBODY, NOBODY)
            posix_ipc.SharedMemory(names[0], posix_ipc.O_CREX, mode=0o600, size=4096).close_fd()
            for name in names[1:]:
                posix_ipc.Semaphore(name, posix_ipc.O_CREX, mode=0o600, initial_value=0).close()
            code = 0
        finally:
            os._exit(code)
    _pid, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    yield names
    posix_ipc.unlink_shared_memory(names[0])
    for name in names[1:]:
        posix_ipc.unlink_semaphore(name)


@pytest.mark.parametrize("args", [[], ["--no-sandbox"]], ids=["sandboxed", "no-sandbox"])
def test_names_made_in_advance_cannot_stop_a_start(tmp_path: Path, squatted: list[str], args: list[str]) -> None:
    """A local user who created every name it could guess before the start stops nothing: the switch starts,
    serves its flow table, and leaves the user's objects alone."""
    with Switch(tmp_path, workers=2, args=args) as switch:
        assert switch.query("flows")["flows"] == []
        assert switch.status()["flow_table"]["free"] > 0
    assert {name[1:] for name in squatted[:1]} | {f"sem.{name[1:]}" for name in squatted[1:]} <= ours()


def test_a_table_that_cannot_be_made_is_a_clear_error(tmp_path: Path) -> None:
    """Where /dev/shm cannot take the semaphores (read-only here, --no-sandbox: a sandboxed switch has a
    /dev/shm of its own), the start fails with one line saying why, exit status 1 and no traceback."""
    prefix = ["unshare", "--mount", "--net", "sh", "-c",
              'mount -t tmpfs -o ro,size=4k shardswitch-test /dev/shm && ip link set lo up && exec "$@"', "sh"]
    switch = Switch(tmp_path, prefix=prefix, args=["--no-sandbox"])
    with pytest.raises(RuntimeError, match="exited with 1") as failed:
        switch.start()
    text = str(failed.value)
    assert "flow table: cannot create the flow table's semaphores in /dev/shm" in text, text
    assert "Traceback" not in text, text
    assert switch.proc is not None and switch.proc.returncode == 1
