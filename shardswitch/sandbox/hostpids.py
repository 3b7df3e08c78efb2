"""A status answer's PIDs as the host sees them, for a switch in a PID namespace of its own.

Theory of operation
-------------------
In its PID namespace (:mod:`shardswitch.sandbox.pidns`) the coordinator is
PID 1 and its workers small numbers: that is what it knows and answers, with
its own PID on the host beside them (``sandbox.host_pid``, passed by its
keeper).  The client that asks (``shardswitch status``, the tests) usually
runs on the host, where ``kill`` and ``/proc`` want the host's numbers: it
looks them up in the host's /proc, readable by any user:

* ``/proc/HOST_PID/status``: its ``NSpid`` line lists the PID in each
  namespace from the host's down; the last must be the coordinator's answer
  (else HOST_PID is not that switch, or the client is elsewhere);
* ``/proc/HOST_PID/task/HOST_PID/children``: the coordinator's children, the
  workers, by host PID; the last ``NSpid`` of each is its PID in the
  namespace.

The translated answer carries the host PIDs in ``pid`` and the namespace's in
``ns_pid``.  ``pid`` never holds a namespace's PID (``kill 1`` on the host
would aim at its init): when the lookup fails (a client in another PID
namespace, a switch gone meanwhile) the coordinator's ``pid`` is still the one
its keeper gave, and a worker's is None, its ``ns_pid`` kept.
"""

from __future__ import annotations

import copy
from typing import Any


def ns_pids(host_pid: int, proc: str = "/proc") -> list[int]:
    """The ``NSpid`` line of ``host_pid``: its PID in each namespace, the host's first; [] if unreadable."""
    try:
        with open(f"{proc}/{host_pid}/status") as f:
            for line in f:
                if line.startswith("NSpid:"):
                    return [int(field) for field in line.split()[1:]]
    except (OSError, ValueError):
        pass
    return []


def children(host_pid: int, proc: str = "/proc") -> list[int]:
    """The host PIDs of the children of ``host_pid``'s main thread ([] if unreadable)."""
    try:
        with open(f"{proc}/{host_pid}/task/{host_pid}/children") as f:
            return [int(field) for field in f.read().split()]
    except (OSError, ValueError):
        return []


def host_view(status: dict[str, Any], proc: str = "/proc") -> dict[str, Any]:
    """``status`` with host PIDs in ``pid`` and namespace PIDs in ``ns_pid`` (see the theory of operation)."""
    sandbox = status.get("sandbox")
    if not isinstance(sandbox, dict) or not sandbox.get("pid_namespace"):
        return status
    host_pid = sandbox.get("host_pid")
    by_ns: dict[int, int] = {}
    if isinstance(host_pid, int) and host_pid > 0 and ns_pids(host_pid, proc)[-1:] == [status.get("pid")]:
        for child in children(host_pid, proc):
            levels = ns_pids(child, proc)
            if levels:
                by_ns[levels[-1]] = child
    view = copy.deepcopy(status)
    view["ns_pid"], view["pid"] = status.get("pid"), host_pid if isinstance(host_pid, int) else None
    for worker in view.get("workers", []):
        if isinstance(worker, dict):
            worker["ns_pid"] = worker.get("pid")
            worker["pid"] = by_ns.get(worker["ns_pid"])
    return view
