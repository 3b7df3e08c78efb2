"""The named POSIX objects of one instance: its shared-memory segment and semaphores.

Theory of operation
-------------------
An instance name ``NAME`` owns four POSIX objects (Linux shows them in
/dev/shm): the segment ``/shardswitch-NAME.flows`` and the semaphores
``/shardswitch-NAME.turnstile``, ``.room`` and ``.mutex`` (files
``sem.shardswitch-NAME.*``).  The coordinator creates them
(:meth:`Segment.create`) and finally unlinks them (:meth:`Segment.unlink`);
workers open them by name (:meth:`Segment.open`).

Stale instances: ``create`` uses ``O_CREAT|O_EXCL``.  If the segment already
exists, its header names the creating process (pid and start time, so a
recycled pid is not mistaken for it); if that process is still alive the
name is refused (:class:`InstanceInUseError`), otherwise the segment and the
semaphores are unlinked and the creation retried.  Semaphores found without a
segment are leftovers of an interrupted start and are replaced too.  The
creator writes its identity first and the magic last, so a segment whose
creator field is still 0 is treated as stale; two coordinators racing to
create the same name are outside the contract (one coordinator per name).

Liveness: a process is alive when /proc/PID/stat exists, is not a zombie
(a SIGKILLed child that has not been reaped yet is dead for our purposes) and
shows the recorded start time (field 22, clock ticks since boot).

Registry lock: a classic POSIX record lock (``fcntl.lockf``) on byte 0 of the
segment's file descriptor serialises participant registration and recovery.
The kernel drops such a lock when its process dies, so it never needs
recovering.  It is per process (not inherited across fork) and is dropped
when the process closes ANY descriptor of the segment, so the descriptor is
kept open for the life of the mapping and nothing else opens the segment
while the lock is held.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

import posix_ipc

from shardswitch.shm.layout import (ENTRY_SIZE, HEADER, HEADER_SIZE, MAGIC, VERSION, FlowTableError,
                                    Geometry, InstanceInUseError)

#: Instance names: what fits a POSIX IPC name without surprises.
_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
#: Permissions of the segment and the semaphores.
MODE = 0o600


class Names(NamedTuple):
    """The POSIX names of an instance's objects (with the leading slash)."""

    segment: str
    turnstile: str
    room: str
    mutex: str

    @property
    def semaphores(self) -> tuple[str, str, str]:
        """The three semaphore names."""
        return (self.turnstile, self.room, self.mutex)


def names_for(instance: str) -> Names:
    """The object names of ``instance``, which must match ``[A-Za-z0-9_.-]{1,64}``."""
    if not isinstance(instance, str) or _NAME_RE.fullmatch(instance) is None:
        raise FlowTableError(f"bad instance name {instance!r}")
    base = f"/shardswitch-{instance}"
    return Names(base + ".flows", base + ".turnstile", base + ".room", base + ".mutex")


def process_start_time(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot, or None if it is gone or a zombie."""
    if pid <= 0:
        return None
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            text = stat.read()
    except OSError:
        return None
    # The command name is in parentheses and may contain anything: split after the last ')'.
    fields = text[text.rfind(b")") + 2:].split()
    if len(fields) < 20 or fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])


def process_alive(pid: int, start_time: int) -> bool:
    """Whether ``pid`` runs and (if ``start_time`` is not 0) is the process that started then."""
    now = process_start_time(pid)
    return now is not None and (start_time == 0 or now == start_time)


def _unlink_quietly(names: Names) -> None:
    """Unlink the segment and semaphores of ``names``, ignoring those that do not exist."""
    try:
        posix_ipc.unlink_shared_memory(names.segment)
    except posix_ipc.ExistentialError:
        pass
    for name in names.semaphores:
        try:
            posix_ipc.unlink_semaphore(name)
        except posix_ipc.ExistentialError:
            pass


def _remove_stale(names: Names) -> None:
    """Unlink an existing segment of ``names`` unless its creator still runs."""
    try:
        shm = posix_ipc.SharedMemory(names.segment)
    except posix_ipc.ExistentialError:
        return                                  # vanished meanwhile: retry the creation
    try:
        if shm.size >= HEADER_SIZE:
            with mmap.mmap(shm.fd, HEADER_SIZE) as mm:
                pid, start = HEADER.unpack_from(mm, 0)[6:8]
            if pid and process_alive(pid, start):
                raise InstanceInUseError(f"{names.segment} is in use by live pid {pid}")
    finally:
        shm.close_fd()
    _unlink_quietly(names)


class Segment:
    """This process's handles on an instance: mapping, descriptor and semaphores."""

    __slots__ = ("names", "geometry", "shm", "mm", "turnstile", "room", "mutex")

    def __init__(self, names: Names, geometry: Geometry, shm: posix_ipc.SharedMemory, mm: mmap.mmap,
                 sems: tuple[posix_ipc.Semaphore, posix_ipc.Semaphore, posix_ipc.Semaphore]) -> None:
        """Wrap opened objects (use :meth:`create` or :meth:`open`)."""
        self.names = names
        self.geometry = geometry
        self.shm = shm
        self.mm = mm
        self.turnstile, self.room, self.mutex = sems

    @classmethod
    def create(cls, instance: str, geometry: Geometry, secret: bytes) -> Segment:
        """Create the objects of ``instance`` (replacing a stale instance) with an initial header."""
        names = names_for(instance)
        for _attempt in range(3):
            try:
                shm = posix_ipc.SharedMemory(names.segment, posix_ipc.O_CREX, mode=MODE,
                                             size=geometry.total_size)
                break
            except posix_ipc.ExistentialError:
                _remove_stale(names)
        else:
            raise FlowTableError(f"cannot create {names.segment}: it keeps reappearing")
        try:
            mm = mmap.mmap(shm.fd, geometry.total_size)
            pid = os.getpid()
            start = process_start_time(pid) or 0
            # Identity first (a racing create() sees a live creator), magic last.
            HEADER.pack_into(mm, 0, b"\0" * 8, VERSION, geometry.capacity, geometry.index_size,
                             geometry.max_participants, ENTRY_SIZE, pid, start, secret,
                             *([0] * 12), *([0] * 6))
            sems = []
            for name in names.semaphores:
                try:
                    posix_ipc.unlink_semaphore(name)    # leftover of an interrupted start
                except posix_ipc.ExistentialError:
                    pass
                sems.append(posix_ipc.Semaphore(name, posix_ipc.O_CREX, mode=MODE, initial_value=1))
        except BaseException:
            shm.close_fd()
            _unlink_quietly(names)
            raise
        return cls(names, geometry, shm, mm, (sems[0], sems[1], sems[2]))

    def publish(self) -> None:
        """Write the magic: the segment is fully initialised and may be attached."""
        self.mm[0:len(MAGIC)] = MAGIC

    @classmethod
    def open(cls, instance: str) -> Segment:
        """Open the existing objects of ``instance`` and check the header."""
        names = names_for(instance)
        try:
            shm = posix_ipc.SharedMemory(names.segment)
        except posix_ipc.ExistentialError:
            raise FlowTableError(f"no flow table {names.segment}") from None
        try:
            if shm.size < HEADER_SIZE:
                raise FlowTableError(f"{names.segment} is too small ({shm.size} bytes)")
            with mmap.mmap(shm.fd, HEADER_SIZE) as head:
                fields = HEADER.unpack_from(head, 0)
            magic, version, capacity, index_size, max_participants, entry_size = fields[:6]
            if magic != MAGIC or version != VERSION or entry_size != ENTRY_SIZE:
                raise FlowTableError(f"{names.segment} is not a version {VERSION} flow table")
            geometry = Geometry.for_capacity(capacity, max_participants)
            if geometry.index_size != index_size or geometry.total_size > shm.size:
                raise FlowTableError(f"{names.segment} has an inconsistent geometry")
            mm = mmap.mmap(shm.fd, geometry.total_size)
            try:
                sems = tuple(posix_ipc.Semaphore(name) for name in names.semaphores)
            except posix_ipc.ExistentialError:
                mm.close()
                raise FlowTableError(f"semaphores of {names.segment} are missing") from None
        except BaseException:
            shm.close_fd()
            raise
        return cls(names, geometry, shm, mm, (sems[0], sems[1], sems[2]))

    def secret(self) -> bytes:
        """The per-instance hash key stored in the header."""
        return bytes(HEADER.unpack_from(self.mm, 0)[8])

    @contextmanager
    def registry_lock(self) -> Iterator[None]:
        """Hold the registry lock (released by the kernel if this process dies)."""
        fcntl.lockf(self.shm.fd, fcntl.LOCK_EX, 1, 0, os.SEEK_SET)
        try:
            yield
        finally:
            fcntl.lockf(self.shm.fd, fcntl.LOCK_UN, 1, 0, os.SEEK_SET)

    def close(self) -> None:
        """Unmap and close this process's handles (all views on the map must be released)."""
        self.mm.close()
        self.shm.close_fd()
        for sem in (self.turnstile, self.room, self.mutex):
            sem.close()

    def unlink(self) -> None:
        """Remove the instance's names (mappings of other processes stay valid until closed)."""
        _unlink_quietly(self.names)
