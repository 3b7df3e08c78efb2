"""A status answer's PIDs translated for the host (shardswitch.sandbox.hostpids), over a made-up /proc."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shardswitch.sandbox.hostpids import host_view


def fake_proc(root: Path, processes: dict[int, list[int]], children: dict[int, list[int]]) -> str:
    """A /proc holding ``status`` (NSpid: the given PIDs) and the main thread's ``children`` of each process."""
    for pid, nspid in processes.items():
        (root / str(pid) / "task" / str(pid)).mkdir(parents=True)
        (root / str(pid) / "status").write_text("Name:\tx\nNSpid:\t" + "\t".join(map(str, nspid)) + "\nUid:\t0\n")
        (root / str(pid) / "task" / str(pid) / "children").write_text(" ".join(map(str, children.get(pid, []))))
    return str(root)


def answer(host_pid: int, pid_namespace: bool = True) -> dict[str, Any]:
    """What a coordinator in its PID namespace answers: its own PID 1, workers 2 and 3."""
    return {"pid": 1, "sandbox": {"enabled": True, "pid_namespace": pid_namespace, "host_pid": host_pid},
            "workers": [{"pair": 0, "pid": 2}, {"pair": 1, "pid": 3}]}


def test_pids_translated_with_the_namespace_beside(tmp_path: Path) -> None:
    """The coordinator's and each worker's host PID in ``pid``, the namespace's in ``ns_pid``."""
    proc = fake_proc(tmp_path, {500: [500, 1], 501: [501, 2], 502: [502, 3]}, {500: [502, 501]})
    view = host_view(answer(500), proc)
    assert (view["pid"], view["ns_pid"]) == (500, 1)
    assert [(w["pid"], w["ns_pid"]) for w in view["workers"]] == [(501, 2), (502, 3)]


def test_no_namespace_pid_where_the_lookup_fails(tmp_path: Path) -> None:
    """A host PID whose innermost PID is not the answer's (another process, a client in another namespace):
    the coordinator keeps the host PID its keeper gave, the workers have none (never a namespace's PID in
    ``pid``); without a PID namespace the answer is returned as it came."""
    proc = fake_proc(tmp_path, {500: [500, 7], 600: [600]}, {})
    for host_pid in (500, 600, 999):
        view = host_view(answer(host_pid), proc)
        assert (view["pid"], view["ns_pid"]) == (host_pid, 1)
        assert [(w["pid"], w["ns_pid"]) for w in view["workers"]] == [(None, 2), (None, 3)]
    plain = answer(500, pid_namespace=False)
    assert host_view(plain, proc) is plain
    assert host_view({"pid": 1, "workers": []}, proc) == {"pid": 1, "workers": []}


def test_a_worker_not_found_has_no_host_pid(tmp_path: Path) -> None:
    """A worker that is not (or no longer) a child gets no host PID, its namespace's beside."""
    proc = fake_proc(tmp_path, {500: [500, 1], 501: [501, 2]}, {500: [501]})
    view = host_view(answer(500), proc)
    assert view["workers"] == [{"pair": 0, "pid": 501, "ns_pid": 2}, {"pair": 1, "pid": None, "ns_pid": 3}]
