"""Checking the kind of every descriptor a front-end sends, before it is kept.

Theory of operation
-------------------
A vhost-user front-end passes descriptors with SCM_RIGHTS: guest memory
(SET_MEM_TABLE, ADD_MEM_REG) and eventfds (SET_VRING_KICK, CALL, ERR).  The
front-end is untrusted: it may send any descriptor at all.  Keeping one of
the wrong kind is harmful, not merely useless:

* a socket kept as "memory" can be the front-end's own connection, whose
  other end then never sees the connection close: the switch would keep
  refusing every later front-end as "already connected";
* a memory descriptor shorter than the region it is said to back makes the
  workers' mappings fault (SIGBUS) when the guest's rings are touched;
* a pipe, a character device or another anonymous inode as a kick or call
  descriptor blocks or misbehaves on the eventfd protocol (8-byte counters).

So every descriptor is checked by kind with ``fstat`` (and, for eventfds,
the ``/proc/self/fd`` link, the only way to tell an eventfd from the other
anonymous inodes): memory must be a regular file (a memfd, a file on
tmpfs or hugetlbfs) at least ``mmap_offset + memory_size`` bytes long; a
vring descriptor must be an eventfd.  A refused descriptor is closed at
once, and the request is refused with
a :class:`~shardswitch.coordinator.device.DeviceError` naming the kind that
came instead.
"""

from __future__ import annotations

import fcntl
import os
import stat

from shardswitch.coordinator.device import DeviceError
from shardswitch.ipc import close_fds
from shardswitch.vhost.wire import MemRegion

#: What ``/proc/self/fd/N`` links to for an eventfd.
EVENTFD_LINK = "anon_inode:[eventfd]"

#: Human names of file types, for the refusal message.
_TYPE_NAMES = ((stat.S_ISSOCK, "a socket"), (stat.S_ISFIFO, "a pipe"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a directory"), (stat.S_ISLNK, "a symbolic link"),
               (stat.S_ISREG, "a regular file"))


def describe(fd: int) -> str:
    """What ``fd`` is, in words ("a socket", "anon_inode:[timerfd]", ...), for messages."""
    try:
        mode = os.fstat(fd).st_mode
    except OSError as err:
        return f"not an open descriptor ({err.strerror})"
    for test, name in _TYPE_NAMES:
        if test(mode):
            return name
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "an anonymous inode"


def check_memory_fd(request: str, fd: int, region: MemRegion) -> None:
    """Refuse ``fd`` as the memory of ``region`` unless it is a regular file long enough to map it."""
    _check_file(request, "memory", fd, region.mmap_offset, region.memory_size, "the region")


def check_log_fd(request: str, fd: int, offset: int, size: int) -> None:
    """Refuse ``fd`` as the dirty-page log unless it is a regular file holding ``offset + size`` bytes."""
    _check_file(request, "log", fd, offset, size, "the log")


def _check_file(request: str, what: str, fd: int, offset: int, size: int, of: str) -> None:
    """``fd`` must be a regular file (memfd, tmpfs, hugetlbfs) at least ``offset + size`` long."""
    try:
        st = os.fstat(fd)
    except OSError as err:
        raise DeviceError(f"{request}: {what} descriptor: {err.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise DeviceError(f"{request}: {what} descriptor is {describe(fd)}, not a memory file")
    if st.st_size < offset + size:
        raise DeviceError(f"{request}: {what} file of {st.st_size} bytes is shorter than {of} "
                          f"(offset {offset:#x} + size {size:#x})")


def check_state_fd(request: str, fd: int, writing: bool) -> None:
    """Refuse ``fd`` as a device-state channel unless it is a pipe or socket open for ``writing`` (or
    reading)."""
    try:
        st = os.fstat(fd)
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    except OSError as err:
        raise DeviceError(f"{request}: descriptor: {err.strerror}") from None
    if not (stat.S_ISFIFO(st.st_mode) or stat.S_ISSOCK(st.st_mode)):
        raise DeviceError(f"{request}: descriptor is {describe(fd)}, not a pipe")
    mode = flags & os.O_ACCMODE
    if mode != os.O_RDWR and mode != (os.O_WRONLY if writing else os.O_RDONLY):
        raise DeviceError(f"{request}: the pipe is not open for {'writing' if writing else 'reading'}")


def check_eventfd(request: str, fd: int) -> None:
    """Refuse ``fd`` as a vring kick/call/err descriptor unless it is an eventfd."""
    try:
        link = os.readlink(f"/proc/self/fd/{fd}")
    except OSError as err:
        raise DeviceError(f"{request}: descriptor: {err.strerror}") from None
    if link != EVENTFD_LINK:
        raise DeviceError(f"{request}: descriptor is {describe(fd)}, not an eventfd")


def check_memory_fds(request: str, regions: list[MemRegion], fds: list[int]) -> None:
    """Check each of ``fds`` against its region (a count mismatch is left to the device); on a refusal
    every one of ``fds`` is closed before the DeviceError propagates."""
    try:
        for region, fd in zip(regions, fds):
            check_memory_fd(request, fd, region)
    except DeviceError:
        close_fds(fds)  # at once: holding one could keep the peer's socket open
        raise
