"""An instance's objects: shared with forked children only; nothing in /dev/shm to open, hold or pre-create."""

from __future__ import annotations

import errno
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import multiprocess
import posix_ipc
import pytest

from shardswitch.shm import FlowSide, FlowTable, FlowTableError, FlowType, Pif, ip16
from shardswitch.shm import segment

DEV_SHM = Path("/dev/shm")

SIDES = (FlowSide(Pif.GUEST, ip16("10.0.0.2"), 5000, ip16("10.0.0.1"), 53),
         FlowSide(Pif.HOST, ip16("10.0.0.1"), 53, ip16("127.0.0.1"), 45000))


def ours_in_dev_shm() -> set[str]:
    """The /dev/shm entries that could be a switch's (segments and semaphores named shardswitch-...)."""
    return {p.name for p in DEV_SHM.iterdir() if "shardswitch" in p.name}


def open_fds() -> int:
    """How many descriptors this process holds."""
    return len(os.listdir("/proc/self/fd"))


def _attach_and_add(instance: str, done: Any) -> None:
    """Child (forked after the creation): attach the inherited table, create one flow, close."""
    table = FlowTable.attach(instance)
    ref = table.alloc()
    table.set_initiator(ref, SIDES[0])
    table.set_target(ref, SIDES[1])
    table.set_type(ref, FlowType.UDP, 1)
    table.activate(ref)
    table.close()
    done.set()


def _create_and_wait(ready: Any) -> None:
    """Child: create an instance, say so, and wait to be killed."""
    FlowTable.create(capacity=16)
    ready.set()
    time.sleep(60)


def test_forked_child_shares_the_table_and_dev_shm_holds_nothing(children: list[Any]) -> None:
    """A child forked after the creation attaches what it inherited and sees the same table; at no point
    does /dev/shm hold anything of the instance."""
    before = ours_in_dev_shm()
    done = multiprocess.Event()
    fds = open_fds()
    table = FlowTable.create(capacity=16)
    assert ours_in_dev_shm() <= before
    child = multiprocess.Process(target=_attach_and_add, args=(table.instance, done))
    children.append(child)
    child.start()
    child.join(20)
    assert child.exitcode == 0 and done.is_set()
    children.remove(child)
    child.close()                       # its sentinel descriptor

    hit = table.lookup(FlowType.UDP, SIDES[1])
    assert hit is not None and hit.owner == 1
    assert table.lock_state()["participants"] == {os.getpid(): "IDLE"}    # the child unregistered
    assert table.check() == []
    table.close()
    assert ours_in_dev_shm() <= before
    assert open_fds() == fds, "closing the last handle closes the memfd and the semaphores"


def test_semaphores_are_random_exclusive_private_and_unlinked(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each semaphore is created O_CREAT|O_EXCL, mode 0600, under a name of 128 random bits that is gone
    from /dev/shm once create() returns; two instances share no name."""
    made: list[tuple[str, int, int]] = []
    real = posix_ipc.Semaphore

    def recording(name: str, flags: int = 0, mode: int = 0o600, initial_value: int = 0) -> Any:
        sem = real(name, flags, mode=mode, initial_value=initial_value)
        made.append((name, flags, stat.S_IMODE(os.stat(DEV_SHM / f"sem.{name[1:]}").st_mode)))
        return sem

    monkeypatch.setattr(segment.posix_ipc, "Semaphore", recording)
    first, second = FlowTable.create(capacity=4), FlowTable.create(capacity=4)
    try:
        assert len(made) == 6 and len({name for name, _f, _m in made}) == 6
        for name, flags, mode in made:
            assert flags == posix_ipc.O_CREX and mode == 0o600, (name, flags, oct(mode))
            assert len(name.rpartition("-")[2]) == 2 * segment.NAME_BYTES
            assert not (DEV_SHM / f"sem.{name[1:]}").exists(), name
        assert first.instance != second.instance
        assert first.lock_state()["semaphores"] == (1, 1, 1)
    finally:
        first.close()
        second.close()


def test_a_name_taken_before_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever someone created under a name the switch draws (were it guessable) cannot stop it or share
    its lock: the name is skipped for another, and the stranger's semaphore is left as it was."""
    taken = "ab" * segment.NAME_BYTES
    stranger = posix_ipc.Semaphore(f"/shardswitch-{taken}", posix_ipc.O_CREX, initial_value=0)
    names = iter([taken] + [f"{n:02x}" * segment.NAME_BYTES for n in range(3)])
    real = segment.secrets.token_hex
    monkeypatch.setattr(segment.secrets, "token_hex",
                        lambda size: next(names) if size == segment.NAME_BYTES else real(size))
    try:
        with FlowTable.create(capacity=4) as table:
            assert table.lock_state()["semaphores"] == (1, 1, 1)
            assert table.list_flows() == []
        assert stranger.value == 0
    finally:
        stranger.unlink()
        stranger.close()


@pytest.mark.parametrize("failure", ["semaphore", "memfd"])
def test_creation_failure_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, failure: str) -> None:
    """A semaphore or a memfd that cannot be made is a FlowTableError saying what, and nothing is left
    open (no descriptor, no semaphore)."""
    if failure == "semaphore":
        calls: list[int] = []
        real = posix_ipc.Semaphore

        def second_fails(name: str, flags: int = 0, mode: int = 0o600, initial_value: int = 0) -> Any:
            calls.append(1)
            if len(calls) == 2:
                raise posix_ipc.PermissionsError("Permission denied")
            return real(name, flags, mode=mode, initial_value=initial_value)

        monkeypatch.setattr(segment.posix_ipc, "Semaphore", second_fails)
        match = "cannot create the flow table's semaphores in /dev/shm: Permission denied"
    else:
        def no_memfd(name: str, flags: int = 0) -> int:
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

        monkeypatch.setattr(segment.os, "memfd_create", no_memfd)
        match = "cannot create the flow table's memory: Too many open files"
    fds = open_fds()
    with pytest.raises(FlowTableError, match=match):
        FlowTable.create(capacity=4)
    assert open_fds() == fds


def test_memory_is_sealed() -> None:
    """No holder of the memfd can shrink it under the others' mappings (a worker cannot, say)."""
    with FlowTable.create(capacity=4) as table:
        (fd,) = FlowTable.inherited_fds(table.instance)
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 0)


def test_an_unrelated_process_cannot_attach() -> None:
    """A process not forked from the creator has nothing to attach: an instance id is no name to open."""
    with FlowTable.create(capacity=4) as table:
        code = f"from shardswitch.shm import FlowTable; FlowTable.attach({table.instance!r})"
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                              cwd=Path(__file__).resolve().parents[2])
    assert done.returncode != 0 and "never opened by name" in done.stderr, done.stderr


def test_killed_creator_leaves_nothing(children: list[Any]) -> None:
    """A creator SIGKILLed with its table leaves nothing in /dev/shm: no stale instance to replace."""
    before = ours_in_dev_shm()
    ready = multiprocess.Event()
    child = multiprocess.Process(target=_create_and_wait, args=(ready,))
    children.append(child)
    child.start()
    assert ready.wait(20)
    os.kill(child.pid, signal.SIGKILL)
    child.join(5)
    assert ours_in_dev_shm() <= before
