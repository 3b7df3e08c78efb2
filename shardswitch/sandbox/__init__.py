"""The sandbox: what each shardswitch process may do once it runs.

A guest's frames and a front-end's messages are parsed by these processes,
so each holds only what it needs once serving starts, as passt does:

* started as root (systemd, libvirt), the coordinator binds its sockets and
  forwarded ports, then becomes ``--runas USER[:GROUP]`` (default
  ``nobody``) with new IPC, UTS, PID and mount namespaces, an empty
  filesystem view (:mod:`.mounts`), no capability in any set (bounding
  included), no_new_privs and not dumpable (:mod:`.privileges`); started as
  another user it keeps that user and makes the same inside a user namespace
  of its own, where the host allows one.  For the PID namespace it forks
  itself: its parent stays behind as the keeper (:mod:`.pidns`), and
  ``shardswitch status`` translates the namespace's PIDs for the host
  (:mod:`.hostpids`);
* the coordinator then creates the flow table, forks the workers and
  installs its seccomp allow-list; each worker installs its own, narrower
  one once its rings, table and sockets are set up (:mod:`.seccomp`).  A
  process that makes a call outside its list dies of SIGSYS; a dead worker
  is replaced and restored like any other.

``--no-sandbox`` skips all of it (debugging).
"""

from __future__ import annotations

from dataclasses import dataclass

from shardswitch.sandbox.privileges import RunAs


@dataclass(frozen=True, slots=True)
class SandboxSetup:
    """How the coordinator sandboxes itself and its workers (None instead of one: --no-sandbox)."""

    #: The user to become (a root start), or None to keep the current one.
    runas: RunAs | None = None
    #: Obey test-only requests (SHARDSWITCH_TEST_HOOKS=1): a worker's forbidden system call on demand.
    test_hooks: bool = False
    #: --chroot-fallback: chroot into the empty root when pivot_root cannot switch to it (see :mod:`.mounts`).
    chroot_fallback: bool = False
