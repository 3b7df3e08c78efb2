"""The seccomp allow-lists (shardswitch.sandbox.seccomp), each installed in a forked child of the test process.

A child installs a filter, then makes one call: allowed calls work, refused
ones fail with their errno, anything else kills the child with SIGSYS.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
from typing import Callable

import pytest

from shardswitch.sandbox import privileges, seccomp
from shardswitch.sandbox.seccomp import COORDINATOR, WORKER, Role

#: A user that runs no process here.
UNUSED_UID = 4242
#: Exit statuses a child reports its result with.
WORKED, FAILED_EACCES, FAILED_OTHER = 10, 11, 12


def outcome(role: Role, call: Callable[[], object], *, also_worker: bool = False,
            kill_pids: Callable[[], tuple[int, ...]] = tuple, uid: int | None = None) -> int:
    """Fork, (become ``uid``,) install ``role``'s filter (and the worker's on top with ``also_worker``;
    ``kill_pids()`` as the processes it may signal), make ``call``; the child's exit code (WORKED...) or minus
    the signal that killed it."""
    pid = os.fork()
    if pid == 0:
        code = FAILED_OTHER
        try:
            if uid is not None:
                os.setresuid(uid, uid, uid)
            privileges.prctl(privileges.Prctl.SET_NO_NEW_PRIVS, 1)
            seccomp.install(role, kill_pids())
            if also_worker:
                seccomp.install(Role.WORKER)
            call()
            code = WORKED
        except PermissionError:
            code = FAILED_EACCES
        except BaseException:  # noqa: BLE001 - the exit code says it
            code = FAILED_OTHER
        os._exit(code)
    _pid, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_lists_nest() -> None:
    """A worker inherits the coordinator's filter: its list lies within the coordinator's; neither may exec,
    ptrace, mount or change user."""
    assert WORKER <= COORDINATOR
    for name in ("execve", "execveat", "ptrace", "mount", "setuid", "setresuid", "init_module", "unshare",
                 "setns", "bpf", "perf_event_open", "keyctl", "process_vm_writev"):
        assert name not in COORDINATOR, name
    for name in ("clone", "kill", "openat", "unlink", "pidfd_open"):
        assert name not in WORKER, name
    assert "clone" not in COORDINATOR and seccomp.POLICIES[Role.COORDINATOR].fork  # only without namespace flags


def socket_of(family: int) -> Callable[[], object]:
    """A call that makes a socket of ``family`` and closes it."""
    return lambda: socket.socket(family, socket.SOCK_DGRAM if family != socket.AF_NETLINK else socket.SOCK_RAW).close()


def test_worker_filter() -> None:
    """A worker: inet sockets, epoll and eventfds work; a file open fails with EACCES; a unix socket, a fork,
    a signal to another process or a call off every list (sync) kills it."""
    assert outcome(Role.WORKER, lambda: os.eventfd_write(os.eventfd(0), 1)) == WORKED
    assert outcome(Role.WORKER, socket_of(socket.AF_INET)) == WORKED
    assert outcome(Role.WORKER, socket_of(socket.AF_INET6)) == WORKED
    assert outcome(Role.WORKER, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM,
                                                       socket.IPPROTO_ICMP)) in (WORKED, FAILED_EACCES)
    assert outcome(Role.WORKER, lambda: __import__("select").epoll().close()) == WORKED
    assert outcome(Role.WORKER, lambda: open("/etc/hostname").close()) == FAILED_EACCES
    for forbidden in (socket_of(socket.AF_UNIX), os.fork, os.sync, lambda: os.kill(os.getppid(), 0),
                      lambda: os.setuid(0)):
        assert outcome(Role.WORKER, forbidden) == -signal.SIGSYS


def test_coordinator_filter() -> None:
    """The coordinator: forks (the child exits normally), unix sockets, files; no netlink socket, no exec;
    a worker forked from it gets both filters."""
    def fork_and_reap() -> None:
        child = os.fork()
        if child == 0:
            os._exit(0)
        os.waitpid(child, 0)

    assert outcome(Role.COORDINATOR, fork_and_reap) == WORKED
    assert outcome(Role.COORDINATOR, socket_of(socket.AF_UNIX)) == WORKED
    assert outcome(Role.COORDINATOR, lambda: open("/etc/hostname").close()) == WORKED
    assert outcome(Role.COORDINATOR, socket_of(socket.AF_NETLINK)) == -signal.SIGSYS
    assert outcome(Role.COORDINATOR, lambda: os.execv("/bin/true", ["true"])) == -signal.SIGSYS
    assert outcome(Role.COORDINATOR, lambda: open("/etc/hostname").close(), also_worker=True) == FAILED_EACCES
    assert outcome(Role.COORDINATOR, fork_and_reap, also_worker=True) == -signal.SIGSYS


def sleeper() -> int:
    """A child of the calling process that waits to be signalled (it exits on its own after a minute, or when
    its parent dies)."""
    pid = os.fork()
    if pid == 0:
        privileges.die_with_parent(signal.SIGKILL)
        signal.sigtimedwait([signal.SIGUSR2], 60)
        os._exit(0)
    return pid


def signal_and_reap(signum: int, target: Callable[[int], int] = lambda pid: pid) -> Callable[[], None]:
    """A call that forks a sleeper, sends ``signum`` to ``target(its PID)`` and reaps it (SIGKILL it first if
    the signal went elsewhere)."""
    def call() -> None:
        child = sleeper()
        try:
            os.kill(target(child), signum)
        finally:
            try:
                os.kill(child, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(child, 0)
    return call


def test_coordinator_signals_only_to_stop_its_workers() -> None:
    """The coordinator may SIGKILL or SIGTERM a process by its PID and raise() in itself; any other signal,
    and any kill of -1 (every process it may signal) or of a group by -PGID, kills it.  (The kills of -1
    and of a group are made as a user without processes, at a group that does not exist: harmless even if
    the filter failed.)"""
    assert outcome(Role.COORDINATOR, signal_and_reap(signal.SIGKILL)) == WORKED
    assert outcome(Role.COORDINATOR, signal_and_reap(signal.SIGTERM)) == WORKED
    assert outcome(Role.COORDINATOR, lambda: signal.raise_signal(signal.SIGWINCH)) == WORKED    # tgkill, ignored
    for forbidden in (signal_and_reap(signal.SIGUSR1), signal_and_reap(signal.SIGSTOP),
                      signal_and_reap(signal.SIGTERM, lambda _pid: -1),
                      signal_and_reap(signal.SIGKILL, lambda pid: -pid)):
        assert outcome(Role.COORDINATOR, forbidden, uid=UNUSED_UID) == -signal.SIGSYS
    assert outcome(Role.COORDINATOR, signal_and_reap(signal.SIGKILL), also_worker=True) == -signal.SIGSYS


def test_keeper_filter() -> None:
    """The keeper may signal the PIDs it was given (its coordinator, itself) and wait; it can open no file,
    make no socket, fork nor signal any other process."""
    child: list[int] = []

    def spawn() -> tuple[int, ...]:
        child.append(sleeper())
        return (child[0],)

    def relay_and_wait() -> None:
        os.kill(child[0], signal.SIGUSR2)
        os.waitpid(child[0], 0)

    assert outcome(Role.KEEPER, relay_and_wait, kill_pids=spawn) == WORKED
    assert outcome(Role.KEEPER, lambda: open("/etc/hostname").close()) == FAILED_EACCES
    for forbidden in (socket_of(socket.AF_UNIX), os.fork, lambda: os.kill(os.getppid(), 0)):
        assert outcome(Role.KEEPER, forbidden) == -signal.SIGSYS


def test_clone_with_namespace_flags_killed() -> None:
    """clone() is the coordinator's for forking workers only: with a namespace flag it kills."""
    libc = privileges._libc  # the module's libc handle

    def clone_newuser() -> None:
        # syscall(SYS_clone, CLONE_NEWUSER | SIGCHLD, 0, ...): never returns in a child here (killed first).
        libc.syscall(56, 0x10000000 | signal.SIGCHLD, 0, 0, 0, 0)

    assert outcome(Role.COORDINATOR, clone_newuser) == -signal.SIGSYS


def test_missing_binding_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without libseccomp the error says what to install, or --no-sandbox."""
    monkeypatch.setattr(seccomp, "_BINDING", None)
    monkeypatch.setattr(seccomp, "_BINDING_ERROR", "libseccomp.so.2: cannot open shared object file")
    with pytest.raises(seccomp.SeccompError, match="install libseccomp2 and pyseccomp, or start with --no-sandbox"):
        seccomp.install(Role.WORKER)


def test_log_mode_only_by_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Killing is the default; SHARDSWITCH_SECCOMP_LOG=1 (developers) logs instead."""
    monkeypatch.delenv("SHARDSWITCH_SECCOMP_LOG", raising=False)
    assert seccomp.default_action() == seccomp.SECCOMP_RET_KILL_PROCESS
    monkeypatch.setenv("SHARDSWITCH_SECCOMP_LOG", "1")
    assert seccomp.default_action() == seccomp.SECCOMP_RET_LOG
    assert errno.EACCES == seccomp.POLICIES[Role.WORKER].refused["openat"]
