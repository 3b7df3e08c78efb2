"""An empty filesystem view: the coordinator and its workers see only what they still use.

Theory of operation
-------------------
Before becoming ``--runas``, the coordinator calls :func:`empty_root`: in a
new mount namespace (propagation private, so nothing leaks back to the host)
it mounts an empty, read-only tmpfs as its root directory, holding exactly
what it still opens after the drop:

* /dev/shm: a tmpfs of its own, not the host's, for the flow table's
  semaphores (sem_open creates them there; they are unlinked at once, see
  :mod:`shardswitch.shm.segment`);
* /proc, read-only: :mod:`shardswitch.coordinator.fdcheck` reads
  /proc/self/fd, the flow table's recovery /proc/PID/stat of its workers,
  the control socket's access check /proc/self/uid_map.  In a PID namespace
  of the switch's own (:mod:`shardswitch.sandbox.pidns`) it is a new procfs
  of that namespace, which shows the switch's processes only; elsewhere the
  host's /proc, bound read-only;
* /dev/null: a forked worker's standard input;
* the directories the caller keeps: those of its sockets where it can still
  remove them at exit (see :func:`removable_by`), the front-end's in client
  mode (reconnected by path).

Everything else (/etc, /home, /root, the Python installation) is gone:
whatever it needs later was imported before (see privileges.preload).  The
sources are opened (O_PATH) in the new namespace before the tmpfs is
mounted, since the tmpfs may hide them (it is mounted over /tmp), and bound
from /proc/self/fd.  Workers
inherit the view; their seccomp filter also refuses open() altogether.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from enum import IntFlag

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]

#: Where the new root is mounted before pivot_root (in our own mount namespace only).
STAGING = "/tmp"
#: pivot_root(2)'s number (glibc has no wrapper), by machine.
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "ppc64le": 203, "s390x": 217, "riscv64": 41}
MNT_DETACH = 2
CLONE_NEWNS = 0x00020000
#: The private /dev/shm: room for the flow table's three semaphores (the table itself is a memfd).
SHM_OPTIONS = "mode=1777,size=256k,nr_inodes=64"


class MountFlag(IntFlag):
    """mount(2) flags used here."""

    RDONLY = 1
    NOSUID = 2
    NODEV = 4
    NOEXEC = 8
    REMOUNT = 32
    MOVE = 8192
    BIND = 4096
    REC = 16384
    PRIVATE = 1 << 18


class MountError(Exception):
    """The filesystem view could not be built (privileges turns it into its SandboxError)."""


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    """mount(2); MountError naming the target on failure."""
    enc = (lambda v: v.encode() if v is not None else None)
    if _libc.mount(enc(source), target.encode(), enc(fstype), flags, enc(data)) == -1:
        err = ctypes.get_errno()
        raise MountError(f"mount {source or fstype} on {target}: {os.strerror(err)}")


#: Flags of every mount of the view but the binds of kept directories.
_SEALED = MountFlag.NOSUID | MountFlag.NODEV | MountFlag.NOEXEC


def _private_namespace() -> None:
    """Enter a new mount namespace whose mounts do not propagate back to the host."""
    if _libc.unshare(CLONE_NEWNS) == -1:
        raise MountError(f"unshare(CLONE_NEWNS): {os.strerror(ctypes.get_errno())}")
    _mount(None, "/", None, MountFlag.REC | MountFlag.PRIVATE)


def probe_procfs() -> None:
    """Mount a procfs of this process's PID namespace over /proc in a mount namespace of its own
    (:mod:`shardswitch.sandbox.pidns` tries it in a throwaway child); MountError if the kernel refuses."""
    _private_namespace()
    _mount("proc", "/proc", "proc", _SEALED | MountFlag.RDONLY)


def empty_root(keep: list[str], fresh_proc: bool = False, chroot_fallback: bool = False,
               try_pivot: bool = True) -> None:
    """Enter a mount namespace whose root holds only a private /dev/shm, a read-only /proc (a new procfs of
    this process's PID namespace with ``fresh_proc``, else the host's), /dev/null and the directories
    ``keep``.

    pivot_root refuses to move the root of an initramfs (rootfs, the absolute root mount): with
    ``chroot_fallback`` (passt's --chroot-fallback) the new root is then moved over ``/`` and the
    process chroots into it, as passt's move_root() and initramfs's switch_root do; the old root stays
    mounted beneath it, out of reach of a process that can no longer chroot (no capability is left once
    the sandbox is built).  ``try_pivot`` False takes the fallback without trying pivot_root (its test:
    no test host has an initramfs root).

    Raises MountError when it cannot; the view is then unchanged (what was mounted is unmounted), unless
    the old root could not be detached after pivot_root (never seen: the error says so).
    """
    _private_namespace()
    # Opened in the new namespace (a bind mount's source must be in the caller's), before the tmpfs hides them.
    dirs = sorted({*(os.path.realpath(d) for d in keep)} - {"/dev/shm", "/proc"}, key=len)
    handles: dict[str, int] = {}
    staged = pivoted = False
    try:
        for path in dirs:
            handles[path] = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        handles["/dev/null"] = os.open("/dev/null", os.O_PATH | os.O_CLOEXEC)
        host_proc = None if fresh_proc else os.open("/proc", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        if host_proc is not None:
            handles["/proc"] = host_proc
        _mount("shardswitch", STAGING, "tmpfs", _SEALED, "mode=0755")
        staged = True
        for path, fd in handles.items():
            target = STAGING + path
            if path == "/dev/null":
                os.makedirs(os.path.dirname(target), exist_ok=True)
                open(target, "w").close()
            else:
                os.makedirs(target, exist_ok=True)
            _mount(f"/proc/self/fd/{fd}", target, None, MountFlag.BIND | MountFlag.REC)
        if host_proc is not None:
            _mount(None, STAGING + "/proc", None, MountFlag.REMOUNT | MountFlag.BIND | MountFlag.RDONLY | _SEALED)
        else:
            os.makedirs(STAGING + "/proc")
            _mount("proc", STAGING + "/proc", "proc", _SEALED | MountFlag.RDONLY)
        os.makedirs(STAGING + "/dev/shm")
        _mount("shardswitch-shm", STAGING + "/dev/shm", "tmpfs", _SEALED, SHM_OPTIONS)
        os.chdir(STAGING)
        number = SYS_PIVOT_ROOT.get(os.uname().machine)
        if number is None:
            raise MountError(f"pivot_root: unknown on {os.uname().machine}")
        refused = errno.EINVAL if not try_pivot else 0 if _libc.syscall(number, b".", b".") == 0 \
            else ctypes.get_errno()
        if refused:
            if not (chroot_fallback and refused == errno.EINVAL):
                raise MountError(f"pivot_root: {os.strerror(refused)}"
                                 + (" (--chroot-fallback chroots instead)" if refused == errno.EINVAL else ""))
            _mount(STAGING, "/", None, MountFlag.MOVE)
            pivoted = True
            os.chroot(".")
        else:
            pivoted = True
            if _libc.umount2(b".", MNT_DETACH) == -1:
                raise MountError(f"detaching the old root after pivot_root (the view is half built): "
                                 f"{os.strerror(ctypes.get_errno())}")
        os.chdir("/")
        _mount(None, "/", None, MountFlag.REMOUNT | MountFlag.BIND | MountFlag.RDONLY | MountFlag.NOSUID
               | MountFlag.NODEV | MountFlag.NOEXEC)
    except (OSError, MountError) as err:
        if staged and not pivoted:
            os.chdir("/")
            _libc.umount2(STAGING.encode(), MNT_DETACH)
        if isinstance(err, MountError):
            raise
        raise MountError(f"cannot build the empty filesystem view: {err}") from err
    finally:
        for fd in handles.values():
            os.close(fd)


def removable_by(path: str, uid: int, gid: int) -> bool:
    """Whether the user ``uid`` (group ``gid``, no other group) may remove the directory entry ``path``: it
    needs write and search permission on the directory, which must not be sticky unless the user owns the
    entry or the directory (classic permission bits; an ACL is not consulted)."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        st = os.stat(folder)
        owner = os.lstat(path).st_uid
    except OSError:
        return False
    if uid == 0:
        return True
    shift = 6 if st.st_uid == uid else 3 if st.st_gid == gid else 0
    if (st.st_mode >> shift) & 0o3 != 0o3:
        return False
    return not st.st_mode & stat.S_ISVTX or uid in (owner, st.st_uid)
