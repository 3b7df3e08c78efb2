"""systemd integration: socket activation, readiness and watchdog notifications, journal-friendly logs.

Theory of operation
-------------------
Nothing here links against libsystemd: each protocol is a few lines of
documented environment and a datagram socket.

**Socket activation** (sd_listen_fds(3)).  A service manager that opened our
sockets passes them as descriptors 3, 4, ... and says so in ``LISTEN_FDS``
(how many), ``LISTEN_PID`` (for whom: a variable inherited by some other
process must not be taken) and optionally ``LISTEN_FDNAMES`` (colon-separated
names, ``FileDescriptorName=`` in the unit).  :func:`listen_fds` reads and
unsets them and checks each descriptor: a unix stream socket that listens.  A
descriptor named ``control`` is the control socket; the first other one is the
vhost-user socket.  ``--fd N`` takes one such descriptor by number without a
service manager, as passt's option does (a connected one too: that front-end
is then served and the process exits when it leaves).

**Notifications** (sd_notify(3)).  ``NOTIFY_SOCKET`` names a unix datagram
socket (a path, or ``@`` for the abstract namespace).  :class:`Notifier`
connects to it at start, before the sandbox hides the filesystem and the
seccomp filter forbids new unix sockets; later messages go out on that
connected socket: ``READY=1`` with a ``STATUS=`` line once the sockets listen
and the workers run, ``WATCHDOG=1`` every half of ``WATCHDOG_USEC`` from the
coordinator's loop (a hung loop stops the pings and the manager restarts us),
``STOPPING=1`` when it leaves.  Without the variable every call does nothing.

**Logs**.  When stderr is the journal's stream (``JOURNAL_STREAM`` names its
device and inode), records carry a ``<N>`` syslog priority prefix and no
timestamp, which journald adds itself: ``journalctl -p err`` then works.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
import time
from collections.abc import Mapping, MutableMapping

#: The first descriptor a service manager passes (SD_LISTEN_FDS_START).
LISTEN_FDS_START = 3
#: Most descriptors taken from LISTEN_FDS (we use two at most; more is a mistake in the unit).
MAX_LISTEN_FDS = 16
#: LISTEN_FDNAMES name of the control socket.
CONTROL_NAME = "control"
#: Syslog priorities of logging levels (sd-daemon(3) prefixes).
PRIORITIES = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}


class ActivationError(Exception):
    """The descriptors a service manager (or --fd) passed cannot be used."""


def check_unix_stream(fd: int, what: str) -> bool:
    """Whether ``fd`` is a unix stream socket that listens (True) or is connected (False); ActivationError
    for anything else."""
    try:
        mode = os.fstat(fd).st_mode
    except OSError as err:
        raise ActivationError(f"{what}: descriptor {fd}: {err.strerror}") from None
    if not stat.S_ISSOCK(mode):
        raise ActivationError(f"{what}: descriptor {fd} is not a socket")
    sock = socket.socket(fileno=fd)
    try:
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            raise ActivationError(f"{what}: descriptor {fd} is not a unix stream socket")
        return bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
    finally:
        sock.detach()


def listen_fds(environ: MutableMapping[str, str], pid: int) -> dict[str, int]:
    """The sockets a service manager passed, by role (``vhost-user``, ``control``); {} when none was passed
    to this process.  The variables are removed from ``environ`` either way."""
    count_text = environ.pop("LISTEN_FDS", None)
    pid_text = environ.pop("LISTEN_PID", None)
    names_text = environ.pop("LISTEN_FDNAMES", None)
    if count_text is None or pid_text is None:
        return {}
    try:
        count, for_pid = int(count_text), int(pid_text)
    except ValueError:
        raise ActivationError(f"LISTEN_FDS={count_text!r} LISTEN_PID={pid_text!r} are not numbers") from None
    if for_pid != pid:
        return {}                        # meant for another process (we inherited the variables)
    if not 0 < count <= MAX_LISTEN_FDS:
        raise ActivationError(f"LISTEN_FDS={count}: expected 1 to {MAX_LISTEN_FDS} sockets")
    names = names_text.split(":") if names_text else []
    roles: dict[str, int] = {}
    for index in range(count):
        fd = LISTEN_FDS_START + index
        name = names[index] if index < len(names) else ""
        if not check_unix_stream(fd, f"socket activation ({name or 'unnamed'})"):
            raise ActivationError(f"socket activation: descriptor {fd} does not listen (Accept=no is needed)")
        role = "control" if name == CONTROL_NAME else "vhost-user"
        if role in roles:
            raise ActivationError(f"socket activation: two {role} sockets ({roles[role]} and {fd})")
        roles[role] = fd
        os.set_inheritable(fd, False)
    if "vhost-user" not in roles:
        raise ActivationError("socket activation: no vhost-user socket (only one named 'control')")
    return roles


def _notify_address(value: str) -> str | bytes:
    """NOTIFY_SOCKET's address for connect(): a path, or an abstract name ('@' becomes a NUL byte)."""
    return b"\0" + value[1:].encode() if value.startswith("@") else value


class Notifier:
    """sd_notify over a socket connected at start; every method does nothing without NOTIFY_SOCKET."""

    def __init__(self, environ: MutableMapping[str, str], pid: int) -> None:
        """Connect to ``NOTIFY_SOCKET`` (removed from ``environ``, as are the watchdog variables); a socket
        that cannot be reached is logged and ignored."""
        self.sock: socket.socket | None = None
        self.watchdog_interval = 0.0
        self.next_watchdog = 0.0
        address = environ.pop("NOTIFY_SOCKET", None)
        usec = environ.pop("WATCHDOG_USEC", None)
        watchdog_pid = environ.pop("WATCHDOG_PID", None)
        if address:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            try:
                sock.connect(_notify_address(address))
                sock.setblocking(False)
                self.sock = sock
            except OSError as err:
                sock.close()
                logging.getLogger("shardswitch").warning("NOTIFY_SOCKET=%s: %s: no readiness notification",
                                                         address, err.strerror)
        if self.sock is not None and usec and (watchdog_pid is None or watchdog_pid == str(pid)):
            try:
                self.watchdog_interval = int(usec) / 2e6
            except ValueError:
                pass

    def send(self, **fields: str | int) -> None:
        """One notification: ``ready=1`` becomes ``READY=1``, one line per field."""
        if self.sock is None:
            return
        message = "\n".join(f"{key.upper()}={value}" for key, value in fields.items()).encode()
        try:
            self.sock.send(message)
        except OSError:
            pass                          # the manager went away; nothing to do about it

    def ready(self, status: str) -> None:
        """The service is up."""
        self.send(ready=1, status=status)
        self.next_watchdog = time.monotonic()

    def watchdog_timeout(self, now: float) -> float | None:
        """Seconds until the next watchdog ping is due (None: no watchdog); pings when due."""
        if not self.watchdog_interval:
            return None
        if now >= self.next_watchdog:
            self.send(watchdog=1)
            self.next_watchdog = now + self.watchdog_interval
        return self.next_watchdog - now

    def close(self, status: str = "stopping") -> None:
        """The service is leaving."""
        self.send(stopping=1, status=status)
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def journal_stream(environ: Mapping[str, str], fd: int = 2) -> bool:
    """Whether ``fd`` (stderr) is the journal's stream (JOURNAL_STREAM=DEV:INODE matches it)."""
    value = environ.get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    try:
        info = os.fstat(fd)
        return bool(value) and (info.st_dev, info.st_ino) == (int(dev), int(ino))
    except (OSError, ValueError):
        return False


class JournalFormatter(logging.Formatter):
    """``<N>name[pid]: message``: syslog priority prefix, no timestamp (journald adds one)."""

    def __init__(self) -> None:
        """The format of every record."""
        super().__init__("%(name)s[%(process)d] %(levelname)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        """The record with its priority prefix on every line (a traceback is several)."""
        prefix = f"<{PRIORITIES.get(record.levelno, 6)}>"
        return "\n".join(prefix + line for line in super().format(record).splitlines())
