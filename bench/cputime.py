"""CPU time of a back-end: every process of a tree, read from /proc, and an optional sampling profile.

Theory of operation
-------------------
A back-end is a tree of processes (shardswitch: the launcher, its keeper, the
coordinator and one worker per queue pair, in a PID namespace of their own;
passt: one process).  :func:`tree_cpu` walks ``/proc`` from the host's side,
where every process shows with its host PID and parent, and adds ``utime +
stime`` (fields 14 and 15 of ``/proc/PID/stat``, all threads included) of
the root and its descendants.  A benchmark reads it at the start and at the
end of a phase; the difference over the bytes the phase moved is the
back-end's CPU per byte.  A process that exited during the phase is missing
from the second reading: the back-ends here keep their processes for the
whole run.

:class:`Profiler` runs ``py-spy record`` (from PyPI, ``BENCH_PROFILE=1``)
over the tree for the length of a phase and sums the collapsed stacks into
the functions where the samples were (self) and the functions on the stack
(total), which is what a closing note quotes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

from shardswitch.shm.segment import stat_fields

_TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> tuple[int, float] | None:
    """(parent PID, CPU seconds: utime + stime) of ``pid``, None when it is gone."""
    fields = stat_fields(pid)
    if fields is None or len(fields) < 13:
        return None
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / _TICK


def tree_pids(root: int) -> list[int]:
    """``root`` and its descendants that exist now."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            info = _stat(int(entry))
            if info is not None:
                parents.setdefault(info[0], []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(parents.get(pid, ()))
    return found


def tree_cpu(root: int) -> float:
    """CPU seconds (user + system) used so far by ``root`` and its descendants."""
    total = 0.0
    for pid in tree_pids(root):
        info = _stat(pid)
        if info is not None:
            total += info[1]
    return total


def profiling() -> bool:
    """Whether this run asked for a sampling profile (``BENCH_PROFILE=1``)."""
    return os.environ.get("BENCH_PROFILE", "0") not in ("", "0")


class Profiler:
    """``py-spy record`` over a process tree for one phase, summarised when it ends."""

    def __init__(self, root: int, out: Path, seconds: float) -> None:
        """Sample ``root`` and its subprocesses for ``seconds``, collapsed stacks into ``out``."""
        self.out = out
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        self.proc = subprocess.Popen([spy, "record", "--pid", str(root), "--subprocesses", "--nonblocking",
                                      "--rate", "250", "--duration", str(max(1, int(seconds))),
                                      "--format", "raw", "--output", str(out)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def summary(self, top: int = 15) -> list[str]:
        """Wait for py-spy; the ``top`` functions by self samples, with their share and total share."""
        try:
            _out, err = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            return ["py-spy did not finish"]
        if self.proc.returncode != 0 or not self.out.exists():
            return [f"py-spy failed: {err.decode(errors='replace').strip()[:300]}"]
        return summarise(self.out.read_text(), top)


def summarise(collapsed: str, top: int = 15) -> list[str]:
    """Self and total shares of the functions in collapsed stacks (``frame;frame;... count`` lines)."""
    self_samples: Counter[str] = Counter()
    total_samples: Counter[str] = Counter()
    samples = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_short(frame) for frame in stack.split(";") if not frame.startswith("process ")]
        if not frames:
            continue
        samples += count
        self_samples[frames[-1]] += count
        for frame in set(frames):
            total_samples[frame] += count
    if not samples:
        return ["no samples"]
    return [f"{100 * n / samples:5.1f} % self {100 * total_samples[name] / samples:5.1f} % total  {name}"
            for name, n in self_samples.most_common(top)]


def _short(frame: str) -> str:
    """``function (path/to/module.py:line)`` as ``function (module.py)``."""
    name, _, where = frame.partition(" (")
    return f"{name} ({Path(where.split(':')[0]).name})" if where else name
