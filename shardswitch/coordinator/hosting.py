"""What the process that starts shardswitch hands it: sockets, a notification socket, a PID file, a log file.

Theory of operation
-------------------
A switch usually binds its own sockets.  Started by systemd through a
``.socket`` unit, by a parent that opened the socket (``--fd``), or by
libvirt, it is handed them instead (:mod:`shardswitch.systemd` reads and
checks them).  :func:`prepare` turns the settings and the environment into
one :class:`Hosting`: which descriptor is the vhost-user listener, the control
listener or an already connected front-end; the paths shown and derived
(the control and repair sockets of an inherited vhost-user socket sit beside
it, as for one we bind); the readiness notifier; the PID file; the log file.
All of it is done before the sandbox: descriptors and the notification
socket stay usable after it, paths would not.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import msgspec

from shardswitch import systemd
from shardswitch.logfile import LogFile
from shardswitch.pcap import open_pair
from shardswitch.settings import CONTROL_SUFFIX, REPAIR_SUFFIX, default_control_path, default_socket_path

if TYPE_CHECKING:
    from shardswitch.settings import Config

log = logging.getLogger("shardswitch")


@dataclass
class Hosting:
    """Sockets and files handed to the coordinator (all optional)."""

    #: An inherited listening vhost-user socket, an inherited control socket, a connected front-end.
    listener_fd: int | None = None
    control_fd: int | None = None
    frontend_fd: int | None = None
    #: The vhost-user, control and repair socket paths to use or show.
    socket_path: str = ""
    control_path: str = ""
    repair_path: str = ""
    notifier: systemd.Notifier = field(default_factory=lambda: systemd.Notifier({}, 0))
    pid_file: str = ""
    log_file: LogFile | None = None
    #: --metrics ADDR:PORT ("": no HTTP endpoint).
    metrics: str = ""
    #: --pcap: FILE and FILE.1 opened (None: no capture at start), the size limit, the name.
    pcap: tuple[int, int] | None = None
    pcap_size: int = 0
    pcap_name: str = ""
    #: --control-group's ID (None: only root and the switch's own user use the control socket).
    control_group: int | None = None
    #: -1/--one-off: exit once the first front-end has gone (as with a front-end handed over by --fd).
    one_off: bool = False
    #: --migrate-exit: exit once an outgoing migration has completed (CHECK_DEVICE_STATE answered success).
    migrate_exit: bool = False
    #: --stats DELAY in seconds (0: no stats lines).
    stats: int = 0
    #: --freebind: forwarded ports may listen on addresses the host does not have (yet).
    freebind: bool = False
    #: The settings this switch runs with (a msgpack Config), offered to a process taking it over.
    settings: bytes = b""


def _socket_name(fd: int) -> str:
    """The path an inherited unix socket is bound to ('' when unnamed or abstract)."""
    sock = socket.socket(fileno=fd)
    try:
        name = sock.getsockname()
    finally:
        sock.detach()
    return name if isinstance(name, str) and name.startswith("/") else ""


def prepare(cfg: Config, log_file: LogFile | None = None) -> Hosting:
    """The Hosting of this start (see the module's docstring); systemd.ActivationError when what was handed
    over cannot be used."""
    roles = systemd.listen_fds(os.environ, os.getpid())
    if cfg.fd is not None:
        if roles:
            raise systemd.ActivationError("--fd and socket activation (LISTEN_FDS) exclude each other")
        listening = systemd.check_unix_stream(cfg.fd, "--fd")
        roles = {"vhost-user" if listening else "frontend": cfg.fd}
        os.set_inheritable(cfg.fd, False)
    path = cfg.connect if cfg.connect is not None else cfg.socket
    assert path is not None and cfg.control is not None and cfg.repair_path is not None
    hosting = Hosting(listener_fd=roles.get("vhost-user"), control_fd=roles.get("control"),
                      frontend_fd=roles.get("frontend"), socket_path=path, control_path=cfg.control,
                      repair_path=cfg.repair_path, notifier=systemd.Notifier(os.environ, os.getpid()),
                      pid_file=cfg.pid_file or "", log_file=log_file, metrics=cfg.metrics or "",
                      one_off=cfg.one_off, migrate_exit=cfg.migrate_exit, stats=cfg.stats or 0, freebind=cfg.freebind,
                      settings=msgspec.msgpack.encode(cfg))
    if hosting.listener_fd is not None:
        name = _socket_name(hosting.listener_fd)
        hosting.socket_path = name or f"descriptor {hosting.listener_fd}"
        # Paths derived from the default socket path follow the inherited socket instead.
        if name and cfg.socket == default_socket_path():
            if cfg.control == default_control_path(cfg.socket):
                hosting.control_path = name + CONTROL_SUFFIX
            if cfg.repair_path == cfg.socket + REPAIR_SUFFIX:
                hosting.repair_path = name + REPAIR_SUFFIX
    elif hosting.frontend_fd is not None:
        hosting.socket_path = f"descriptor {hosting.frontend_fd}"
    if cfg.pcap is not None:
        try:
            hosting.pcap = open_pair(cfg.pcap)
        except OSError as err:
            raise systemd.ActivationError(f"--pcap {cfg.pcap}: {err.strerror or err}") from None
        hosting.pcap_size, hosting.pcap_name = cfg.pcap_size, cfg.pcap
    return hosting


def adopt(fd: int) -> socket.socket:
    """The socket object of an inherited descriptor, non-blocking."""
    sock = socket.socket(fileno=fd)
    sock.setblocking(False)
    return sock


def write_pid_file(path: str, pid: int | None = None) -> None:
    """Write ``pid`` (default: ours) into ``path`` (replaced atomically; mode 0644)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, f"{os.getpid() if pid is None else pid}\n".encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)
