"""Giving up privileges: the user to run as, capabilities, no_new_privs, namespaces.

Theory of operation
-------------------
shardswitch needs root for nothing but what it does at start (a socket in
/run, a forwarded port below 1024).  The coordinator therefore, once its
sockets and forwarded ports are bound and before it creates shared memory
or forks a worker, calls :func:`drop_privileges` with the :class:`RunAs`
that :func:`resolve_runas` looked up earlier (while /etc/passwd could still
be read):

1. :func:`unshare` new IPC and UTS namespaces (SysV IPC and the host name
   are then out of reach).  A start that is not root makes them inside a
   user namespace of its own that maps only its user
   (:func:`own_user_namespace`), where the host allows one;
2. a PID namespace of its own (:mod:`shardswitch.sandbox.pidns`): the
   process forks; the child goes on as the coordinator, PID 1 of the new
   namespace, and its parent stays behind as the keeper, which relays
   signals and exit status and gives up its privileges too;
3. a mount namespace whose root is empty but for what the processes still
   use, a private /dev/shm and a read-only /proc among them
   (:mod:`shardswitch.sandbox.mounts`);
4. every capability leaves the bounding set (PR_CAPBSET_DROP) and the
   ambient set, so nothing executed later can get one back;
5. setgroups, setresgid, setresuid to the target user: with all three user
   IDs non-zero the kernel clears the permitted and effective sets;
6. :func:`clear_capabilities` empties the sets explicitly (the inheritable
   set survives setuid, and a non-root start may hold file capabilities);
7. PR_SET_NO_NEW_PRIVS: no execve can gain privileges, and seccomp filters
   may be installed without CAP_SYS_ADMIN; PR_SET_DUMPABLE 0: no other
   process of the same user may ptrace it or open its /proc/PID/fd,
   /proc/PID/root or /proc/PID/mem (a change of user does that already; a
   start that is not root needs it said).

Workers are forked afterwards and inherit all of it.  Each step is a
syscall through libc (ctypes, loaded here once: after the seccomp filter
no library can be opened); a failure raises :class:`SandboxError`, which
stops the start with a clear message rather than running with more rights
than the operator was told.
"""

from __future__ import annotations

import ctypes
import grp
import importlib
import os
import logging
import pwd
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum, IntFlag

from shardswitch.sandbox import pidns
from shardswitch.sandbox.mounts import MountError, empty_root

log = logging.getLogger("shardswitch")

#: The user a root start becomes by default (passt's choice too).
DEFAULT_RUNAS = "nobody"


class SandboxError(Exception):
    """A privilege could not be given up, or the sandbox cannot be built."""


class Prctl(IntEnum):
    """prctl(2) options used here."""

    SET_PDEATHSIG = 1
    SET_DUMPABLE = 4
    SET_NAME = 15
    CAPBSET_DROP = 24
    SET_NO_NEW_PRIVS = 38
    CAP_AMBIENT = 47


#: PR_CAP_AMBIENT's sub-command that clears the ambient set.
PR_CAP_AMBIENT_CLEAR_ALL = 4
#: capset(2)'s header version with two 32-bit words per set.
LINUX_CAPABILITY_VERSION_3 = 0x20080522


class CloneFlag(IntFlag):
    """unshare(2) flags used here."""

    NEWNS = 0x00020000
    NEWUTS = 0x04000000
    NEWIPC = 0x08000000
    NEWUSER = 0x10000000


class _CapHeader(ctypes.Structure):
    """struct __user_cap_header_struct."""

    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    """struct __user_cap_data_struct (one of two for version 3)."""

    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.capset.argtypes = [ctypes.POINTER(_CapHeader), ctypes.POINTER(_CapData)]


@dataclass(frozen=True, slots=True)
class RunAs:
    """The user and group to become."""

    name: str
    uid: int
    gid: int


@dataclass(frozen=True, slots=True)
class Confinement:
    """What the sandbox could build (for the status and the log)."""

    #: New IPC and UTS (and user) namespaces and the empty filesystem view.
    namespaces: bool = False
    #: A PID namespace of its own (this process is its init).
    pid_namespace: bool = False
    #: This process's PID as its starter sees it (differs from getpid() in a PID namespace).
    host_pid: int = 0


def _check(result: int, what: str) -> None:
    """Raise SandboxError naming ``what`` when a libc call returned -1."""
    if result == -1:
        err = ctypes.get_errno()
        raise SandboxError(f"{what}: {os.strerror(err)}")


def prctl(option: Prctl, arg2: int = 0) -> None:
    """prctl(option, arg2, 0, 0, 0), raising SandboxError on failure."""
    _check(_libc.prctl(int(option), arg2, 0, 0, 0), f"prctl({option.name})")


def set_name(name: str) -> None:
    """This process's name as ps, top and the kernel's audit lines show it (15 bytes at most)."""
    buf = ctypes.create_string_buffer(name.encode()[:15])
    _libc.prctl(int(Prctl.SET_NAME), ctypes.cast(buf, ctypes.c_void_p).value or 0, 0, 0, 0)


def die_with_parent(signum: int) -> None:
    """Receive ``signum`` when the parent process dies (PR_SET_PDEATHSIG); best effort."""
    _libc.prctl(int(Prctl.SET_PDEATHSIG), signum, 0, 0, 0)


def resolve_runas(spec: str | None) -> RunAs | None:
    """The user of ``--runas USER[:GROUP]`` (names or numbers), or None when nothing is to change.

    Started as root, no ``spec`` means :data:`DEFAULT_RUNAS`.  Started as
    another user, ``spec`` may only name that same user (there is nothing
    else to become).  Raises SandboxError for an unknown user or group, and
    for root as target (that would keep every privilege).
    """
    euid = os.geteuid()
    if spec is None:
        if euid != 0:
            return None
        spec = DEFAULT_RUNAS
    user, _, group = spec.partition(":")
    try:
        entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
        uid, gid, name = entry.pw_uid, entry.pw_gid, entry.pw_name
    except KeyError:
        if not user.isdigit():
            raise SandboxError(f"--runas: no user named {user!r}") from None
        uid, gid, name = int(user), int(user), user
    if group:
        try:
            gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
        except KeyError:
            raise SandboxError(f"--runas: no group named {group!r}") from None
    if uid == 0 or gid == 0:
        raise SandboxError(f"--runas {spec}: running as root is what --runas is there to avoid")
    if euid != 0:
        if uid != euid:
            raise SandboxError(f"--runas {spec}: only root can change user (running as uid {euid})")
        return None
    return RunAs(name, uid, gid)


def last_capability() -> int:
    """The highest capability number this kernel knows."""
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 40


def unshare(flags: CloneFlag) -> None:
    """unshare(2) ``flags``; SandboxError on failure."""
    _check(_libc.unshare(int(flags)), f"unshare({flags!r})")


def clear_capabilities() -> None:
    """Empty this process's effective, permitted and inheritable capability sets (capset); nothing to do,
    and no call made, when they are empty already (systemd's SystemCallFilter=~@privileged refuses capset)."""
    status = process_status()
    if all(int(status.get(key, "0"), 16) == 0 for key in ("CapInh", "CapPrm", "CapEff")):
        return
    header = _CapHeader(LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    _check(_libc.capset(ctypes.byref(header), data), "capset")


def keep_only_capability(cap: int) -> None:
    """Hold ``cap`` alone (effective and permitted), nothing inheritable, and no other in the bounding set
    (the TCP_REPAIR helper keeps CAP_NET_ADMIN only)."""
    for other in range(last_capability() + 1):
        if other != cap:
            prctl(Prctl.CAPBSET_DROP, other)
    header = _CapHeader(LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    data[cap // 32].effective = data[cap // 32].permitted = 1 << (cap % 32)
    _check(_libc.capset(ctypes.byref(header), data), "capset")


def drop_bounding_set(last_cap: int) -> None:
    """Remove every capability up to ``last_cap`` from the bounding set (needs CAP_SETPCAP)."""
    for cap in range(last_cap + 1):
        prctl(Prctl.CAPBSET_DROP, cap)


#: Modules the coordinator and workers import only when first used: loaded before privileges go, since
#: the interpreter's files may not be readable by the new user (a Python under /root) and a worker's
#: seccomp filter refuses open().
LAZY_IMPORTS = ("multiprocess.connection", "multiprocess.popen_fork", "encodings.idna")


def preload() -> None:
    """Import :data:`LAZY_IMPORTS` now."""
    for name in LAZY_IMPORTS:
        importlib.import_module(name)


def drop_privileges(runas: RunAs | None, keep: list[str] | None = None,
                    on_fork: Callable[[int], None] | None = None, chroot_fallback: bool = False) -> Confinement:
    """Become ``runas`` (if given: a root start) with no capability, no_new_privs set and not dumpable, in
    namespaces of its own and an empty filesystem view holding the directories ``keep`` (see
    shardswitch.sandbox.mounts), where the host allows them.

    In a PID namespace, this returns in a child of the caller (see shardswitch.sandbox.pidns): the caller
    itself stays behind as the keeper, runs ``on_fork`` with the child's PID and never returns.  See the
    module's theory of operation for the order and why.  ``chroot_fallback``: see
    :func:`shardswitch.sandbox.mounts.empty_root`.  Raises SandboxError when a step fails.
    """
    preload()
    last_cap = last_capability()
    _libc.prctl(int(Prctl.CAP_AMBIENT), PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    if runas is None:
        why_not = own_user_namespace()
    else:
        why_not = _unshare_quietly(CloneFlag.NEWIPC | CloneFlag.NEWUTS)
    drop_bounding = runas is not None or not why_not     # a user namespace of its own gives the right to
    inside: pidns.Inside | None = None
    if not why_not:
        entered = pidns.enter(on_fork or (lambda _pid: None), lambda: _give_up(runas, last_cap, drop_bounding))
        if isinstance(entered, str):
            log.info("sandbox: no PID namespace of its own (%s): it could signal any process of its user",
                     entered)
        else:
            inside = entered
        why_not = _empty_root(keep, inside is not None, chroot_fallback)
    if why_not:
        log.info("sandbox: no namespaces of its own (%s): IPC, host name and files stay as they are", why_not)
    _give_up(runas, last_cap, drop_bounding)
    if inside is not None:
        pidns.arm(inside)
    return Confinement(not why_not, inside is not None, inside.host_pid if inside is not None else os.getpid())


def _give_up(runas: RunAs | None, last_cap: int, drop_bounding: bool) -> None:
    """Steps 4 to 7 of the theory of operation (the keeper takes them too)."""
    if drop_bounding:
        drop_bounding_set(last_cap)
    if runas is not None:
        try:
            os.setgroups([])
            os.setresgid(runas.gid, runas.gid, runas.gid)
            os.setresuid(runas.uid, runas.uid, runas.uid)
        except OSError as err:
            raise SandboxError(f"cannot become {runas.name} (uid {runas.uid}, gid {runas.gid}): "
                               f"{err.strerror}") from err
    clear_capabilities()
    prctl(Prctl.SET_NO_NEW_PRIVS, 1)
    prctl(Prctl.SET_DUMPABLE, 0)


def _unshare_quietly(flags: CloneFlag) -> str:
    """unshare(2) ``flags``: "" or why not (a container without CAP_SYS_ADMIN, or whose seccomp profile
    refuses unshare)."""
    try:
        unshare(flags)
    except SandboxError as err:
        return str(err)
    return ""


def _empty_root(keep: list[str] | None, fresh_proc: bool, chroot_fallback: bool = False) -> str:
    """mounts.empty_root: "" or why it could not be built (nothing changed then)."""
    try:
        empty_root(keep or [], fresh_proc, chroot_fallback)
    except MountError as err:
        return str(err)
    return ""


def own_user_namespace() -> str:
    """A start that is not root: enter new user, IPC and UTS namespaces mapping only this user and group
    (so that a mount namespace can be made, as passt does).  "" on success, else why not: the host or a
    unit may forbid user namespaces (systemd's RestrictNamespaces=, which brings its own instead)."""
    uid, gid = os.getuid(), os.getgid()
    try:
        unshare(CloneFlag.NEWUSER | CloneFlag.NEWIPC | CloneFlag.NEWUTS)
    except SandboxError as err:
        return str(err)
    try:
        for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    except OSError as err:
        raise SandboxError(f"mapping this user in its namespace: {err}") from err
    return ""


def process_status(pid: int | str = "self") -> dict[str, str]:
    """The fields of /proc/PID/status that say what a process may do (Uid, Gid, Cap*, NoNewPrivs, Seccomp)."""
    wanted = ("Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs", "Seccomp")
    fields: dict[str, str] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in wanted:
                fields[key] = value.strip()
    return fields
