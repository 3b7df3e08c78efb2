"""Seccomp allow-lists: the system calls each kind of process may make.

Theory of operation
-------------------
Once started, a process installs a filter (libseccomp, through its Python
binding) that allows the calls on its list and kills the whole process on
any other (SECCOMP_RET_KILL_PROCESS: it dies of SIGSYS, its supervisor
sees that and, for a worker, forks a replacement).

Filters stack and a child inherits its parent's: the coordinator installs
:data:`COORDINATOR` after forking the first workers; a worker forked later
(a replacement) inherits it and adds :data:`WORKER` on top, so the
coordinator's list must contain the worker's (asserted at import).  Where
both filters match, the kernel applies the stricter action.

What each list holds, beyond :data:`RUNTIME` (what the Python interpreter
needs to run at all: memory, signals, futexes, time, reading and writing
descriptors it already has):

* a worker moves frames between rings and host sockets: epoll, eventfd
  reads and writes, and TCP/UDP/ICMP sockets of the inet families only
  (``socket`` is matched on its domain).  It opens no file: ``openat`` fails
  with EACCES (so that a traceback printed by the logging module loses its
  source lines instead of killing the worker), and it cannot fork, exec,
  signal another process or make a unix socket;
* the coordinator also accepts front-ends and control clients (unix
  sockets), forks and reaps workers (``clone`` without any namespace flag;
  ``clone3`` fails with ENOSYS so that a thread library falls back to
  ``clone``), checks descriptors a front-end sends (fstat, readlink of
  /proc/self/fd), and removes its socket files at exit.  It signals only
  as it stops a worker: ``kill`` with SIGKILL or SIGTERM to a process ID
  >= 0 (never -1, every process it may signal, nor a group by -PGID; 0 is
  its own process group, a session of its own in a PID namespace of its own),
  and ``tgkill`` to its own threads (raise(), abort()).  In its PID
  namespace (:mod:`shardswitch.sandbox.pidns`) the only processes it can
  name are its workers;
* the keeper, the coordinator's parent left in the starter's PID namespace
  (:mod:`shardswitch.sandbox.pidns`), waits for the coordinator and relays
  signals to it: ``wait4`` and ``kill`` of the coordinator's and its own
  process ID only, nothing else beyond :data:`RUNTIME`, no file, no socket.

Neither may execve, ptrace, mount, change user, load modules, or use any
other call not listed.  ``SHARDSWITCH_SECCOMP_LOG=1`` in the environment
replaces killing with logging to the kernel log (audit type 1326 lines
naming the call), a developer's aid to extend a list: ``shardswitch status``
then says ``seccomp (log only)`` and the start-up log warns (:func:`mode`).
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
from dataclasses import dataclass, field
from enum import Enum, IntEnum
from typing import Any

log = logging.getLogger("shardswitch")

#: What the interpreter needs whatever the process does.
RUNTIME: frozenset[str] = frozenset({
    "read", "write", "readv", "writev", "pread64", "pwrite64", "close", "lseek",
    "fstat", "newfstatat", "statx", "fcntl", "dup", "dup3",
    "mmap", "munmap", "mremap", "mprotect", "madvise", "brk",
    "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "sigaltstack",
    "futex", "set_robust_list", "rseq", "sched_yield", "sched_getaffinity",
    "getpid", "gettid", "getppid", "getuid", "geteuid", "getgid", "getegid", "getresuid", "getresgid",
    "getrandom", "clock_gettime", "clock_getres", "clock_nanosleep", "nanosleep", "gettimeofday",
    "getrlimit", "prlimit64", "getcwd", "uname", "close_range",
    "exit", "exit_group",
})

#: Descriptor multiplexing and eventfds (both processes).
EVENTS: frozenset[str] = frozenset({
    "epoll_create1", "epoll_ctl", "epoll_wait", "epoll_pwait", "poll", "ppoll", "select", "pselect6",
    "eventfd2", "pipe2",
})

#: Socket I/O on descriptors either process already has or makes (socket() itself is matched apart).
SOCKETS: frozenset[str] = frozenset({
    "connect", "bind", "listen", "accept", "accept4", "sendto", "recvfrom", "sendmsg", "recvmsg",
    "sendmmsg", "recvmmsg", "shutdown", "getsockname", "getpeername", "setsockopt", "getsockopt",
})


class Ioctl(IntEnum):
    """The ioctl requests either process makes (any other kills): blocking mode, close-on-exec, whether
    stdio is a terminal, and a TCP socket's queued, unsent and unread byte counts (SIOCOUTQ, SIOCOUTQNSD,
    SIOCINQ: a migration dumps its queues)."""

    TCGETS = 0x5401
    TIOCOUTQ = 0x5411
    FIONREAD = 0x541B
    FIONBIO = 0x5421
    FIONCLEX = 0x5450
    FIOCLEX = 0x5451
    SIOCOUTQNSD = 0x894B

WORKER: frozenset[str] = RUNTIME | EVENTS | SOCKETS

COORDINATOR: frozenset[str] = WORKER | frozenset({
    # Forking and reaping workers (kill and tgkill: see Policy.kill_signals and own_tgkill).
    "set_tid_address", "wait4", "waitid", "pidfd_open", "prctl", "seccomp",
    "arch_prctl", "socketpair",
    # Descriptors a front-end sends (fdcheck), the control socket, files at exit.
    "openat", "readlink", "readlinkat", "getdents64", "unlink", "unlinkat", "ftruncate", "memfd_create",
    "flock", "fchmod", "fchown", "access", "faccessat2",
})

assert WORKER <= COORDINATOR, "a worker inherits the coordinator's filter: its list must be within it"

#: The keeper: wait for the coordinator, relay signals to it (kill: see install's kill_pids).
KEEPER: frozenset[str] = RUNTIME | frozenset({"wait4"})

#: The TCP_REPAIR helper: receive sockets, set one option on each, answer.
REPAIR: frozenset[str] = RUNTIME | frozenset({"recvmsg", "sendto", "sendmsg", "setsockopt", "getsockopt",
                                                "getsockname", "poll"})

#: clone() flags that would create namespaces or share a parent's address space across processes.
CLONE_REFUSED = 0x7E020000 | 0x00000100  # CLONE_NEW{NS,CGROUP,UTS,IPC,USER,PID,NET} | CLONE_VM
SECCOMP_RET_KILL_PROCESS = 0x80000000
SECCOMP_RET_LOG = 0x7FFC0000
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000
#: libseccomp's SCMP_FLTATR_CTL_OPTIMIZE.
ATTR_OPTIMIZE = 8
ARG_EQ = 4
ARG_MASKED_EQ = 7
#: The sign bit of a 32-bit pid_t, whatever the upper half of the 64-bit register holds.
PID_SIGN = 0x80000000


class Role(Enum):
    """Which list a process installs."""

    COORDINATOR = "coordinator"
    WORKER = "worker"
    KEEPER = "keeper"
    REPAIR = "repair-helper"


@dataclass(frozen=True, slots=True)
class Policy:
    """One process's filter: allowed calls, calls that fail with an errno, socket domains."""

    allowed: frozenset[str]
    #: Calls that fail with this errno instead of killing.
    refused: dict[str, int] = field(default_factory=dict)
    #: Domains socket() may create.
    socket_domains: tuple[int, ...] = ()
    #: clone() allowed (without CLONE_REFUSED flags).
    fork: bool = False
    #: Signals kill() may send to a process ID >= 0 (not to -1 nor to a group by -PGID); () = none.
    kill_signals: tuple[int, ...] = ()
    #: tgkill() to this process's own threads (raise(), abort()).
    own_tgkill: bool = False


POLICIES: dict[Role, Policy] = {
    Role.COORDINATOR: Policy(COORDINATOR, {"clone3": errno.ENOSYS},
                             (socket.AF_UNIX, socket.AF_INET, socket.AF_INET6), fork=True,
                             kill_signals=(signal.SIGKILL, signal.SIGTERM), own_tgkill=True),
    Role.WORKER: Policy(WORKER, {"openat": errno.EACCES, "open": errno.EACCES, "clone3": errno.ENOSYS},
                        (socket.AF_INET, socket.AF_INET6)),
    Role.KEEPER: Policy(KEEPER, {"openat": errno.EACCES, "open": errno.EACCES}),
    Role.REPAIR: Policy(REPAIR, {"openat": errno.EACCES, "open": errno.EACCES}),
}


class SeccompError(Exception):
    """The filter could not be built or installed."""


def default_action() -> int:
    """Kill the process; log only when SHARDSWITCH_SECCOMP_LOG=1 (developers extending a list)."""
    return SECCOMP_RET_LOG if os.environ.get("SHARDSWITCH_SECCOMP_LOG") == "1" else SECCOMP_RET_KILL_PROCESS


def mode() -> str:
    """What a call off a list does, in words for the status and the log: "kill" or "log only"."""
    return "log only" if default_action() == SECCOMP_RET_LOG else "kill"


def _import_binding() -> tuple[Any, str]:
    """libseccomp's Python binding (Debian's python3-seccomp when importable, else pyseccomp), or None and
    why not.  Imported with this module: a filtered process can no longer load a library."""
    try:
        import seccomp
        return seccomp, ""
    except ImportError:
        pass
    try:
        import pyseccomp
        return pyseccomp, ""
    except (ImportError, OSError, AttributeError) as err:
        return None, str(err)


_BINDING, _BINDING_ERROR = _import_binding()


def install(role: Role, kill_pids: tuple[int, ...] = ()) -> None:
    """Install ``role``'s filter in this process (no_new_privs must be set, or CAP_SYS_ADMIN held); ``kill_pids``:
    processes kill() may send any signal to (the keeper's coordinator and itself).

    Raises SeccompError when libseccomp is missing or refuses the filter.
    """
    policy = POLICIES[role]
    sc: Any = _BINDING
    if sc is None:
        raise SeccompError(f"libseccomp is not available ({_BINDING_ERROR}); install libseccomp2 and pyseccomp, "
                           "or start with --no-sandbox")
    try:
        filt = sc.SyscallFilter(default_action())
        try:
            filt.set_attr(ATTR_OPTIMIZE, 2)     # a binary tree of the calls instead of a linear list
        except OSError:
            pass
        for name in sorted(policy.allowed):
            _add(sc, filt, SECCOMP_RET_ALLOW, name)
        for name, err in policy.refused.items():
            _add(sc, filt, SECCOMP_RET_ERRNO | err, name)
        for domain in policy.socket_domains:
            _add(sc, filt, SECCOMP_RET_ALLOW, "socket", sc.Arg(0, ARG_EQ, domain))
        for request in Ioctl:
            _add(sc, filt, SECCOMP_RET_ALLOW, "ioctl", sc.Arg(1, ARG_EQ, request))
        if policy.fork:
            _add(sc, filt, SECCOMP_RET_ALLOW, "clone", sc.Arg(0, ARG_MASKED_EQ, CLONE_REFUSED, 0))
        for signum in policy.kill_signals:
            _add(sc, filt, SECCOMP_RET_ALLOW, "kill", sc.Arg(0, ARG_MASKED_EQ, PID_SIGN, 0), sc.Arg(1, ARG_EQ, signum))
        for pid in kill_pids:
            _add(sc, filt, SECCOMP_RET_ALLOW, "kill", sc.Arg(0, ARG_EQ, pid))
        if policy.own_tgkill:
            _add(sc, filt, SECCOMP_RET_ALLOW, "tgkill", sc.Arg(0, ARG_EQ, os.getpid()))
        filt.load()
    except OSError as err:
        raise SeccompError(f"cannot install the {role.value}'s seccomp filter: {err}") from err


def _add(sc: Any, filt: Any, action: int, name: str, *args: Any) -> None:
    """One rule; a call this libseccomp does not know on this architecture is skipped."""
    number = sc.resolve_syscall(sc.Arch.NATIVE, name)
    if number < 0:
        log.debug("seccomp: %s is not a system call here", name)
        return
    filt.add_rule(action, number, *args)
