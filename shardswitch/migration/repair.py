"""TCP_REPAIR through a privileged helper: passt-repair's protocol, both ends.

Putting a TCP socket into repair mode (``setsockopt(TCP_REPAIR)``) needs
CAP_NET_ADMIN, which the switch gives up at start.  passt solves this with
``passt-repair``, a tiny program run with that capability: it connects to a
unix socket of passt's (``--repair-path``, by default the vhost-user socket's
path with ``.repair`` appended) and serves requests until the connection
closes.  We speak the same protocol, so either helper works:

* a request is one byte, the command (:class:`RepairCommand`: 1 on, 0 off,
  -1 off without window probe), with up to :data:`SCM_MAX_FD` socket
  descriptors attached (SCM_RIGHTS);
* the helper sets the mode on each and answers the same byte; on any failure
  it closes the connection instead.

Our helper knows one command more, :attr:`RepairCommand.FREEZE`: attach a
socket filter that drops every incoming segment (:func:`freeze`).  A frozen
connection takes no more data and answers nothing (no ACK, no RST) while the
source dumps and closes it, and a frozen listener (a *guard*, see
:mod:`~shardswitch.worker.tcp.migrate`) silently swallows what reaches a
closed connection's port.  The kernel may refuse that filter to a process
without CAP_NET_ADMIN, which is why the helper does it.  So that the switch
never sends FREEZE to passt-repair (which exits on a command it does not
know), our helper says :data:`HELLO` as soon as it is connected; passt-repair
says nothing.

:class:`RepairLink` is the switch's end, used by a worker during a migration
(the coordinator accepts the helper and lends its connection to one worker at
a time).  :func:`serve` is the helper's loop, which ``shardswitch
repair-helper PATH`` runs after connecting: it accepts TCP sockets only.
"""

from __future__ import annotations

import array
import ctypes
import logging
import os
import socket
import struct
import time
from enum import IntEnum

log = logging.getLogger("shardswitch.repair")

#: Most descriptors in one SCM_RIGHTS message (the kernel's limit, not in its UAPI).
SCM_MAX_FD = 253
#: TCP socket options (linux/tcp.h) not in Python's socket module.
TCP_REPAIR = 19
#: How long the switch waits for the helper's answer.
REPLY_TIMEOUT = 5.0
#: The capability TCP_REPAIR needs (linux/capability.h).
CAP_NET_ADMIN = 12
_CMD = struct.Struct("b")
#: What our helper sends once connected (passt-repair sends nothing unasked).
HELLO = b"S"
SO_ATTACH_FILTER = 26
#: A classic BPF program of one instruction, "ret #0": drop the packet (struct sock_filter).
DROP_ALL = struct.pack("HBBI", 0x06, 0, 0, 0)


class RepairCommand(IntEnum):
    """What a request asks of each socket."""

    OFF_NO_WINDOW_PROBE = -1
    OFF = 0
    ON = 1
    #: Ours, not passt-repair's: attach the drop-all filter (:func:`freeze`).
    FREEZE = 2


class RepairError(Exception):
    """The helper is gone, refused, or answered something else."""


class RepairLink:
    """The switch's end of a helper connection (blocking, with a timeout per answer)."""

    def __init__(self, sock: socket.socket, freezes: bool = False) -> None:
        """Use the connected ``sock`` (not closed here); ``freezes``: the helper said :data:`HELLO`."""
        self.sock = sock
        self.freezes = freezes

    def set(self, command: RepairCommand, fds: list[int]) -> None:
        """Set ``command``'s mode on every socket of ``fds``, in messages of at most SCM_MAX_FD."""
        for start in range(0, len(fds), SCM_MAX_FD):
            self._request(command, fds[start:start + SCM_MAX_FD])

    def _request(self, command: RepairCommand, fds: list[int]) -> None:
        """One request and its answer."""
        request = _CMD.pack(command)
        self.sock.settimeout(REPLY_TIMEOUT)
        try:
            self.sock.sendmsg([request], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
            reply = self.sock.recv(1)
            if reply == HELLO:               # our helper's greeting, not yet read by the coordinator
                self.freezes = True
                reply = self.sock.recv(1)
        except OSError as err:
            raise RepairError(f"TCP_REPAIR helper: {err}") from None
        finally:
            self.sock.settimeout(None)
        if not reply:
            raise RepairError("TCP_REPAIR helper closed the connection (it could not set the mode)")
        if reply != request:
            raise RepairError(f"TCP_REPAIR helper answered {reply!r} to {request!r}")


def freeze(sock: socket.socket) -> None:
    """Attach the drop-all filter to ``sock``: from now on it takes no incoming segment (OSError when the
    kernel refuses, e.g. EPERM without CAP_NET_ADMIN on some kernels)."""
    program = ctypes.create_string_buffer(DROP_ALL, len(DROP_ALL))
    # struct sock_fprog: the instruction count, then a pointer to the program (copied by the kernel).
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, struct.pack("HL", 1, ctypes.addressof(program)))


def _is_tcp(fd: int) -> bool:
    """Whether ``fd`` is a TCP socket."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        return False
    try:
        return sock.type == socket.SOCK_STREAM and sock.family in (socket.AF_INET, socket.AF_INET6) \
            and sock.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL) == socket.IPPROTO_TCP
    except OSError:
        return False
    finally:
        sock.detach()


def handle_request(data: bytes, fds: list[int]) -> bytes | None:
    """The helper's work for one request: the answer, or None to close (descriptors are closed here)."""
    try:
        if len(data) != 1:
            log.error("request of %d bytes, expected 1", len(data))
            return None
        (value,) = _CMD.unpack(data)
        try:
            command = RepairCommand(value)
        except ValueError:
            log.error("unknown command %d", value)
            return None
        for fd in fds:
            if not _is_tcp(fd):
                log.error("descriptor %d is not a TCP socket", fd)
                return None
            try:
                sock = socket.socket(fileno=fd)
                try:
                    if command == RepairCommand.FREEZE:
                        freeze(sock)
                    else:
                        sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, int(command))
                finally:
                    sock.detach()
            except OSError as err:
                log.error("%s: %s", command.name, err.strerror)
                return None
        return data
    finally:
        for fd in fds:
            os.close(fd)


def serve(sock: socket.socket) -> int:
    """Say :data:`HELLO`, then answer the switch's requests on ``sock`` until it closes; the exit status
    (0: closed by the switch)."""
    try:
        sock.send(HELLO)
    except OSError as err:
        log.error("send: %s", err.strerror)
        return 1
    while True:
        try:
            data, fds, _flags, _addr = socket.recv_fds(sock, 1, SCM_MAX_FD)
        except OSError as err:
            log.error("receive: %s", err.strerror)
            return 1
        if not data and not fds:
            return 0
        answer = handle_request(data, list(fds))
        if answer is None:
            return 1
        try:
            sock.send(answer)
        except OSError as err:
            log.error("send: %s", err.strerror)
            return 1


def connect(path: str) -> socket.socket:
    """Connect to the switch's repair socket at ``path``."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        raise
    return sock


def helper_main(path: str, wait: float) -> int:
    """``shardswitch repair-helper PATH``: connect (retrying up to ``wait`` seconds while the switch is not
    listening yet), keep CAP_NET_ADMIN alone, install the helper's seccomp filter, and serve.

    Returns the exit status: 0 when the switch closed the connection.
    """
    from shardswitch.sandbox import privileges, seccomp

    deadline = time.monotonic() + wait
    while True:
        try:
            sock = connect(path)
            break
        except (FileNotFoundError, ConnectionRefusedError) as err:
            if time.monotonic() >= deadline:
                log.error("cannot connect to %s: %s", path, err.strerror)
                return 1
            time.sleep(0.1)
        except OSError as err:
            log.error("cannot connect to %s: %s", path, err.strerror)
            return 1
    try:
        if os.geteuid() == 0:
            privileges.keep_only_capability(CAP_NET_ADMIN)
        privileges.prctl(privileges.Prctl.SET_NO_NEW_PRIVS, 1)
        seccomp.install(seccomp.Role.REPAIR)
    except (OSError, seccomp.SeccompError, privileges.SandboxError) as err:
        log.error("cannot sandbox the helper: %s", err)
        sock.close()
        return 1
    log.info("connected to %s: setting TCP_REPAIR on the sockets the switch sends", path)
    status = serve(sock)
    sock.close()
    return status
