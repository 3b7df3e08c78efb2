"""The coordinator's side of the sandbox: what it keeps in view, what its keeper does, what it tells.

Theory of operation
-------------------
:mod:`shardswitch.sandbox` builds the sandbox; the coordinator decides what
goes in it and reports on it:

* which directories stay in its filesystem view (:func:`kept_dirs`): only
  those it still uses after the drop, i.e. the front-end's socket directory
  in client mode (it reconnects by path; the directory must exist at start),
  and the directory of each file it created (sockets, PID file) where the
  user it becomes may remove that file at exit.  A file it could not remove anyway (a directory only root may
  write, a sticky one whose file root owns) leaves its directory out of view
  and is listed in :attr:`Kept.left`, for one log line at exit; the next
  start replaces a stale socket;
* what the keeper does at the fork into a PID namespace (:func:`keeper_duties`,
  see :mod:`shardswitch.sandbox.pidns`): the ``--pid`` file gets the
  coordinator's PID as the host sees it, and a service manager is told
  ``MAINPID=`` that PID, so that the coordinator's ``READY=1`` and watchdog
  pings are accepted under ``NotifyAccess=main``;
* what the status and the start-up log say (:func:`status`, :func:`describe`),
  including the debugging mode of ``SHARDSWITCH_SECCOMP_LOG=1``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from shardswitch.coordinator.hosting import Hosting, write_pid_file
from shardswitch.sandbox import SandboxSetup, seccomp
from shardswitch.sandbox.mounts import removable_by
from shardswitch.sandbox.privileges import Confinement

log = logging.getLogger("shardswitch")


@dataclass
class Kept:
    """The directories kept in view, and the files created before the drop that stay after exit."""

    dirs: list[str] = field(default_factory=list)
    left: list[str] = field(default_factory=list)


def kept_dirs(owned: list[str], sandbox: SandboxSetup, connect_path: str = "") -> Kept:
    """What :func:`shardswitch.sandbox.privileges.drop_privileges` keeps in view for ``owned`` files (see the
    module's theory of operation); ``connect_path``: the front-end's socket in client mode."""
    runas = sandbox.runas
    uid, gid = (runas.uid, runas.gid) if runas is not None else (os.getuid(), os.getgid())
    kept = Kept()
    front_end_dir = os.path.dirname(os.path.abspath(connect_path)) if connect_path else ""
    if front_end_dir and os.path.isdir(front_end_dir):       # one made later could never be seen anyway
        kept.dirs.append(front_end_dir)
    for path in owned:
        if removable_by(path, uid, gid):
            kept.dirs.append(os.path.dirname(os.path.abspath(path)))
        else:
            kept.left.append(path)
    kept.dirs = sorted(set(kept.dirs))
    return kept


def keeper_duties(hosting: Hosting) -> Callable[[int], None]:
    """What the keeper does with the coordinator's PID (as the host sees it) before it gives up root."""
    def duties(child: int) -> None:
        """Rewrite the PID file; tell a service manager the main PID."""
        if hosting.pid_file:
            write_pid_file(hosting.pid_file, child)
        hosting.notifier.send(mainpid=child)
    return duties


def status(sandbox: SandboxSetup | None, confinement: Confinement | None) -> dict[str, Any]:
    """The status answer's ``sandbox`` entry."""
    answer: dict[str, Any] = {"enabled": sandbox is not None, "uid": os.getuid(), "gid": os.getgid()}
    if sandbox is not None and confinement is not None:
        answer.update(seccomp=seccomp.mode(), namespaces=confinement.namespaces,
                      pid_namespace=confinement.pid_namespace, host_pid=confinement.host_pid)
    return answer


def describe(sandbox: SandboxSetup, confinement: Confinement) -> str:
    """The start-up log line of the sandbox in place."""
    runas = sandbox.runas
    who = f"running as {runas.name} (uid {runas.uid}, gid {runas.gid})" if runas else f"running as uid {os.getuid()}"
    where = (f"in a PID namespace of its own (pid {confinement.host_pid} on the host)" if confinement.pid_namespace
             else "in the host's PID namespace")
    mode = seccomp.mode()
    return (f"sandbox: {who} {where}, no capabilities, no_new_privs, seccomp allow-lists"
            + ("" if mode == "kill" else f" ({mode})"))


def warn_if_log_only() -> None:
    """A warning in the start-up log when SHARDSWITCH_SECCOMP_LOG=1 made every filter log-only."""
    if seccomp.mode() != "kill":
        log.warning("SHARDSWITCH_SECCOMP_LOG=1: seccomp filters only log calls off their lists (to the kernel "
                    "log) instead of killing: a debugging aid, not a sandbox")
