"""The kernel objects of one flow table, which no process outside the switch can open.

Theory of operation
-------------------
An instance is a shared-memory segment and three POSIX semaphores (the
readers-writer lock of :mod:`shardswitch.shm.rwlock`).  They are shared by
inheritance only, never opened by name:

* the segment is a memfd (:func:`os.memfd_create`): it has no name in
  /dev/shm or anywhere else, and its size is sealed (F_SEAL_SHRINK,
  F_SEAL_GROW), so no process holding it can truncate it under the others'
  mappings;
* the semaphores are POSIX named semaphores, the only kind posix_ipc offers,
  each under a random name of 128 bits (:func:`secrets.token_hex`), created
  exclusively (O_CREAT|O_EXCL) with mode 0600 and unlinked at once, before
  :meth:`Segment.create` returns.  A name that exists already (which nobody
  can arrange: they are not predictable) is skipped for another; any other
  failure to create one (a /dev/shm that is missing, full or not writable) is
  a :class:`~shardswitch.shm.layout.FlowTableError` saying so.

So nothing of an instance is left in /dev/shm for another process to open,
hold or pre-create, and nothing is left behind by a coordinator that is
SIGKILLed.  Every process that uses the table is forked from its creator
after :meth:`Segment.create` (the workers and their replacements by the
coordinator; the children of the tests and of bench/flowtable.py by the test):
it inherits the mapping, the memfd and the semaphores' own mappings with
the fork.  The creator records each segment in :data:`_INSTANCES` under its
instance id (random too, shown by ``shardswitch status``), a table of this
process's inherited resources much as the descriptor table is: a forked
child finds it there (:meth:`Segment.inherited`).  Only the process that
created a segment object unmaps it (:meth:`Segment.release`, once its last
:class:`~shardswitch.shm.table.FlowTable` handle is closed); a forked child
keeps its copy until it exits, so that it never closes a descriptor number
its parent owned (Python's mmap keeps a duplicate of the memfd, which a
worker's descriptor clean-up closes).

Registry lock: a classic POSIX record lock (``fcntl.lockf``) on byte 0 of
the memfd serialises participant registration and recovery.  The kernel drops
such a lock when its process dies, so it never needs recovering.  It is per
process (a forked child takes its own on the inherited descriptor), and it is
dropped when the process closes ANY descriptor of the file: the memfd stays
open for the life of the process (a worker keeps it among the descriptors it
does not close, see :meth:`Segment.descriptors`).

Liveness: a process is alive when /proc/PID/stat exists, is not a zombie
(a SIGKILLed child that has not been reaped yet is dead for our purposes) and
shows the recorded start time (field 22, clock ticks since boot).  Every
process of one table shares one PID namespace and one /proc (the switch's
own, see :mod:`shardswitch.sandbox.mounts`), so the PIDs recorded in the
segment are those of that /proc.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager

import posix_ipc

from shardswitch.shm.layout import ENTRY_SIZE, HEADER, MAGIC, VERSION, FlowTableError, Geometry

#: Permissions of the semaphores (the memfd has no path to apply them to).
MODE = 0o600
#: Random bytes in a semaphore's name, and in an instance id.
NAME_BYTES = 16
INSTANCE_BYTES = 8
#: Names tried per semaphore before giving up (one collision is already beyond belief).
NAME_TRIES = 4
#: Seals of the memfd: its size never changes once mapped.
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL

Semaphores = tuple[posix_ipc.Semaphore, posix_ipc.Semaphore, posix_ipc.Semaphore]


def stat_fields(pid: int) -> list[bytes] | None:
    """The fields of ``/proc/PID/stat`` from the third on (state, ppid, ...; index = field number - 3), or
    None when the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            text = stat.read()
    except OSError:
        return None
    # The command name is in parentheses and may contain anything: split after the last ')'.
    return text[text.rfind(b")") + 2:].split()


def process_start_time(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot, or None if it is gone or a zombie."""
    if pid <= 0:
        return None
    fields = stat_fields(pid)
    if fields is None or len(fields) < 20 or fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])


def process_alive(pid: int, start_time: int) -> bool:
    """Whether ``pid`` runs and (if ``start_time`` is not 0) is the process that started then."""
    now = process_start_time(pid)
    return now is not None and (start_time == 0 or now == start_time)


def _semaphore() -> posix_ipc.Semaphore:
    """A new semaphore (value 1) under a random name, created exclusively with mode 0600 and already unlinked."""
    for _attempt in range(NAME_TRIES):
        name = f"/shardswitch-{secrets.token_hex(NAME_BYTES)}"
        try:
            sem = posix_ipc.Semaphore(name, posix_ipc.O_CREX, mode=MODE, initial_value=1)
        except posix_ipc.ExistentialError:
            continue                                # taken: draw another name
        except (posix_ipc.Error, OSError, ValueError) as err:
            raise FlowTableError(f"cannot create the flow table's semaphores in /dev/shm: {err}") from None
        try:
            sem.unlink()
        except (posix_ipc.Error, OSError) as err:
            sem.close()
            raise FlowTableError(f"cannot remove the name of a new semaphore from /dev/shm: {err}") from None
        return sem
    raise FlowTableError(f"cannot create the flow table's semaphores: {NAME_TRIES} random names all existed")


def _memory(instance: str, size: int) -> tuple[int, mmap.mmap]:
    """A sealed memfd of ``size`` bytes and its shared mapping."""
    try:
        fd = os.memfd_create(f"shardswitch-flows-{instance}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    except OSError as err:
        raise FlowTableError(f"cannot create the flow table's memory: {err.strerror or err}") from None
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
        return fd, mmap.mmap(fd, size)
    except OSError as err:
        os.close(fd)
        raise FlowTableError(f"cannot map {size} bytes of flow table: {err.strerror or err}") from None


class Segment:
    """An instance's objects as this process holds them: memfd, mapping and semaphores."""

    __slots__ = ("instance", "geometry", "fd", "mm", "turnstile", "room", "mutex", "owner", "users")

    def __init__(self, instance: str, geometry: Geometry, fd: int, mm: mmap.mmap, sems: Semaphores) -> None:
        """Wrap created objects (use :meth:`create`)."""
        self.instance = instance
        self.geometry = geometry
        self.fd = fd
        self.mm = mm
        self.turnstile, self.room, self.mutex = sems
        #: The process that created this object: the only one that unmaps and closes.
        self.owner = os.getpid()
        #: Open FlowTable handles on this object in its owner process.
        self.users = 0

    @classmethod
    def create(cls, geometry: Geometry, secret: bytes) -> Segment:
        """New objects under a random instance id, with an initial header; recorded for forked children."""
        instance = secrets.token_hex(INSTANCE_BYTES)
        fd, mm = _memory(instance, geometry.total_size)
        sems: list[posix_ipc.Semaphore] = []
        try:
            for _ in range(3):
                sems.append(_semaphore())
        except BaseException:
            for sem in sems:
                sem.close()
            mm.close()
            os.close(fd)
            raise
        pid = os.getpid()
        HEADER.pack_into(mm, 0, MAGIC, VERSION, geometry.capacity, geometry.index_size,
                         geometry.max_participants, ENTRY_SIZE, pid, process_start_time(pid) or 0, secret,
                         *([0] * 12), *([0] * 6))
        segment = cls(instance, geometry, fd, mm, (sems[0], sems[1], sems[2]))
        _INSTANCES[instance] = segment
        return segment

    @staticmethod
    def inherited(instance: str) -> Segment:
        """The segment of ``instance`` that this process created or inherited by fork from its creator."""
        segment = _INSTANCES.get(instance)
        if segment is None:
            raise FlowTableError(f"no flow table {instance!r} in this process: a table is shared with the "
                                 "processes its creator forks, never opened by name")
        return segment

    @staticmethod
    def descriptors(instance: str) -> tuple[int, ...]:
        """The descriptors a forked user of ``instance`` must keep open (the memfd, for the registry lock);
        () for an instance this process does not hold."""
        segment = _INSTANCES.get(instance)
        return (segment.fd,) if segment is not None else ()

    def secret(self) -> bytes:
        """The per-instance hash key stored in the header."""
        return bytes(HEADER.unpack_from(self.mm, 0)[8])

    @contextmanager
    def registry_lock(self) -> Iterator[None]:
        """Hold the registry lock (released by the kernel if this process dies)."""
        fcntl.lockf(self.fd, fcntl.LOCK_EX, 1, 0, os.SEEK_SET)
        try:
            yield
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, 0, os.SEEK_SET)

    def release(self) -> None:
        """One handle of this process is closed: the owner unmaps and closes everything after the last one
        (every view on the map must be released by then); a forked child keeps its copies until it exits."""
        if os.getpid() != self.owner:
            return
        self.users -= 1
        if self.users > 0:
            return
        _INSTANCES.pop(self.instance, None)
        self.mm.close()
        os.close(self.fd)
        for sem in (self.turnstile, self.room, self.mutex):
            sem.close()


#: The instances this process created, by id; a forked child inherits the dictionary with the objects.
_INSTANCES: dict[str, Segment] = {}
