"""A PID namespace of the switch's own: the coordinator forks itself into one, as passt does.

Theory of operation
-------------------
A process can signal every process of its user that it can name, and without
a PID namespace it can name them all: a compromised coordinator running as
``nobody`` could signal every other ``nobody`` process of the host.  In a PID
namespace of its own it can name only the processes of that namespace: itself
and its workers.  ``unshare(CLONE_NEWPID)`` moves only the children made
afterwards, and the first of them is the namespace's init: when it exits,
every process of the namespace is killed and no process can enter it any more.
So, during the privilege drop (:func:`shardswitch.sandbox.privileges.drop_privileges`),
once the IPC and UTS (and, started by another user than root, user) namespaces
exist, :func:`enter`:

1. checks in throwaway children (:func:`probe`) that a process in a new PID
   namespace may mount a procfs of it (the flow table's recovery reads
   /proc/PID/stat by the PIDs its processes see: a /proc of another namespace
   would name other processes).  Where it may not (a container that masks
   parts of /proc, a seccomp profile refusing CLONE_NEWPID), the start says
   why and goes on without a PID namespace, as with the other namespaces;
2. unshares the PID namespace and forks: the child goes on as the coordinator,
   PID 1 of the new namespace, in a session of its own (so that a kill of
   process group 0 reaches nothing outside); it forks the workers later, into
   the same namespace, and mounts the namespace's procfs in its view
   (:mod:`shardswitch.sandbox.mounts`);
3. the parent stays in the starter's namespace as the *keeper*
   (:func:`_keep`): what the starter started and waits for (a terminal,
   systemd, libvirt, a test).  It first runs the caller's ``on_fork`` with the
   coordinator's PID as the starter sees it (``--pid`` files get that PID;
   ``MAINPID=`` tells systemd which process to supervise, so the
   coordinator's notifications are accepted with ``NotifyAccess=main``),
   passes that PID to the coordinator (its ``shardswitch status`` shows it),
   closes every descriptor but stdio, gives up its privileges as the
   coordinator does (``give_up``), installs the narrowest seccomp filter of all
   (wait4, and kill of the coordinator and itself only), and then relays
   SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 to the coordinator
   until it exits.  It exits with the coordinator's status, or kills itself
   with the signal that killed the coordinator.

Dying together: the coordinator arms PR_SET_PDEATHSIG (SIGKILL) once its
credentials are final (a change of user clears it), then checks that the
keeper still holds the pipe it passed the PID through: if the keeper died
before, the coordinator exits.  When the coordinator dies, the kernel kills
the rest of the namespace, the workers.  Signals: the namespace's init only
receives the signals it handles, so the coordinator handles the terminating
ones it does not otherwise use (:data:`RELAYED`) by exiting at once, as their
default action did before; SIGKILL from the starter's namespace always works.

PIDs: inside, the coordinator is 1 and its workers small numbers; the
coordinator's log lines and status answer show those.  ``shardswitch status``
translates them for the host (:mod:`shardswitch.sandbox.hostpids`).
"""

from __future__ import annotations

import ctypes
import gc
import os
import select
import signal
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn

from shardswitch.sandbox import mounts, seccomp

#: unshare(2)'s flag of a new PID namespace.
CLONE_NEWPID = 0x20000000
#: prctl(2) options.
PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
#: The signals the keeper relays, and which the coordinator (init of its namespace) then handles.
RELAYED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
#: A PID passed from the keeper to the coordinator.
_PID = struct.Struct("=q")
#: Longest reason a probe reports.
_REASON_MAX = 512

_libc = ctypes.CDLL(None, use_errno=True)
_libc.unshare.argtypes = [ctypes.c_int]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]


@dataclass(frozen=True, slots=True)
class Inside:
    """The coordinator's side of the namespace, once forked into it."""

    #: The coordinator's PID as the starter (and the host) sees it.
    host_pid: int
    #: The read end of the keeper's pipe: hung up once the keeper is gone (see :func:`arm`).
    keeper_fd: int


def _unshare_pid() -> None:
    """unshare(CLONE_NEWPID); OSError on failure."""
    if _libc.unshare(CLONE_NEWPID) == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare(CLONE_NEWPID): {os.strerror(err)}")


def _report(fd: int, err: BaseException) -> None:
    """Write why a probe failed to ``fd`` (best effort)."""
    try:
        os.write(fd, str(err).encode(errors="replace")[:_REASON_MAX])
    except OSError:
        pass


def probe() -> str:
    """Whether a process of a new PID namespace may mount a procfs of it: "" if so, else why not.  Tried in
    throwaway children, since the namespace made for the coordinator cannot be replaced once made."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                            # a throwaway child: it always leaves through os._exit
        code = 1
        try:
            os.close(r)
            _unshare_pid()
            inner = os.fork()
            if inner == 0:
                try:
                    mounts.probe_procfs()
                    os._exit(0)
                except BaseException as err:  # noqa: BLE001 - reported to the parent
                    _report(w, err)
                    os._exit(1)
            _done, status = os.waitpid(inner, 0)
            code = 0 if status == 0 else 1
        except BaseException as err:  # noqa: BLE001 - reported to the parent
            _report(w, err)
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as reader:
        reason = reader.read(_REASON_MAX).decode(errors="replace")
    _done, status = os.waitpid(pid, 0)
    if status == 0:
        return ""
    return reason or f"the probe {describe_status(status)}"


def describe_status(status: int) -> str:
    """A wait status in words."""
    code = os.waitstatus_to_exitcode(status)
    return f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"


def enter(on_fork: Callable[[int], None], give_up: Callable[[], None]) -> Inside | str:
    """Fork into a new PID namespace (see the module's theory of operation): in the coordinator, the
    :class:`Inside` of it; where the host refuses, why not (nothing changed then).  The keeper never returns:
    it runs ``on_fork(coordinator's PID)`` and ``give_up()`` (its own privilege drop), then waits."""
    why_not = probe()
    if why_not:
        return why_not
    try:
        _unshare_pid()
    except OSError as err:
        return str(err.strerror)
    r, w = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(w)
        return _inside(r)
    os.close(r)
    _keep(child, w, on_fork, give_up)


def _inside(r: int) -> Inside:
    """The coordinator, just forked: handle the relayed signals, take a session of its own, learn its host
    PID from the keeper."""
    for signum in RELAYED:
        signal.signal(signum, _exit_on_signal)
    os.setsid()
    data = b""
    while len(data) < _PID.size:
        chunk = os.read(r, _PID.size - len(data))
        if not chunk:
            os._exit(1)                     # the keeper died before telling: nothing to serve for
        data += chunk
    (host_pid,) = _PID.unpack(data)
    return Inside(host_pid, r)


def _exit_on_signal(signum: int, _frame: object) -> None:
    """A relayed signal before the coordinator handles it otherwise: exit at once, as its default did."""
    os._exit(128 + signum)


def arm(inside: Inside) -> None:
    """In the coordinator, with its final credentials: die with the keeper (SIGKILL), and exit now if it is
    already gone."""
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    poller = select.poll()
    poller.register(inside.keeper_fd, select.POLLIN)
    gone = bool(poller.poll(0))             # the keeper writes nothing more: readable means hung up
    os.close(inside.keeper_fd)
    if gone:
        os._exit(1)


def _keep(child: int, w: int, on_fork: Callable[[int], None], give_up: Callable[[], None]) -> NoReturn:
    """The keeper (see the module's theory of operation); never returns."""
    # No collection: a socket object of the coordinator's collected here would warn about its (closed)
    # descriptor, and naming it in the warning takes calls the keeper's filter refuses.
    gc.disable()
    for signum in RELAYED:
        signal.signal(signum, lambda sig, _frame: _relay(child, sig))
    try:
        on_fork(child)
    except BaseException as err:  # noqa: BLE001 - a PID file or a notification is not worth the switch
        _say(f"shardswitch keeper: {err}\n")
    try:
        os.write(w, _PID.pack(child))
        _close_all_but(w)
        name = ctypes.create_string_buffer(b"shardswitch-kp")
        _libc.prctl(PR_SET_NAME, ctypes.cast(name, ctypes.c_void_p).value or 0, 0, 0, 0)
        give_up()
        seccomp.install(seccomp.Role.KEEPER, kill_pids=(child, os.getpid()))
    except BaseException as err:  # noqa: BLE001 - the keeper must not return into the coordinator's code
        _say(f"shardswitch keeper: {err}; stopping the coordinator\n")
        os.kill(child, signal.SIGKILL)
    code = 1
    try:
        code = _wait(child)
    finally:
        os._exit(code)          # whatever happened: never back into the coordinator's code


def _wait(child: int) -> int:
    """Wait for the coordinator; its exit status, after killing this process with the signal that killed it."""
    try:
        _done, status = os.waitpid(child, 0)
    except ChildProcessError:
        return 1
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        try:
            signal.signal(-code, signal.SIG_DFL)       # SIGKILL and SIGSTOP have no handler to reset
        except (OSError, ValueError):
            pass
        os.kill(os.getpid(), -code)
        code = 128 - code                               # a signal ignored (SIGCHLD, SIGURG...)
    return code


def _relay(child: int, signum: int) -> None:
    """Pass a signal on to the coordinator."""
    try:
        os.kill(child, signum)
    except ProcessLookupError:
        pass


def _close_all_but(keep: int) -> None:
    """Close every descriptor but stdio and ``keep``: the keeper holds none of the coordinator's sockets
    (a front-end it held would never see its connection close)."""
    os.closerange(3, keep)
    os.closerange(keep + 1, max(os.sysconf("SC_OPEN_MAX"), keep + 1))


def _say(text: str) -> None:
    """A line on stderr (the keeper has no logging: its handlers' files are closed)."""
    try:
        os.write(2, text.encode(errors="replace"))
    except OSError:
        pass
