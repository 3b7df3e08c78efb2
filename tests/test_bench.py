"""The benchmark's own arithmetic (bench/cputime.py, bench/guest.py): CPU of a process tree, profiles, bytes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bench import cputime, guest, tcpstream, testpmd

#: What a guest prints for two iperf3 runs in one direction (-f m), as bench/guest.py asks.
OUTPUT = """===BEGIN-DOWN
===END-DOWN
===DOWN
[  5]   0.00-4.00   sec  1.50 GBytes  3221 Mbits/sec    3             sender
[  5]   0.00-4.00   sec  1.50 GBytes  3220 Mbits/sec                  receiver
===DOWN
[  5]   0.00-4.00   sec   512 MBytes  1073 Mbits/sec                  receiver
===UP
[  5]   0.00-4.00   sec   100 KBytes  0.20 Mbits/sec                  receiver
"""


def test_bytes_and_rates_of_each_direction() -> None:
    """Receivers' bytes whatever unit iperf3 chose, summed per direction; rates as before."""
    assert guest.moved_bytes(OUTPUT, "DOWN") == int(1.5 * 2 ** 30 + 512 * 2 ** 20)
    assert guest.moved_bytes(OUTPUT, "UP") == 100 * 2 ** 10
    figures = guest.parse(OUTPUT)
    assert figures.down_mbps == 3220 + 1073
    assert figures.up_mbps == 0.20


def test_tree_cpu_counts_children() -> None:
    """A child that burns CPU is counted in its parent's tree."""
    burn = "import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass\nprint('done', flush=True)\ninput()"
    child = subprocess.Popen([sys.executable, "-c", burn], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline() == "done\n"
        assert child.pid in cputime.tree_pids(child.pid)
        assert cputime.tree_cpu(child.pid) >= 0.25
    finally:
        child.kill()
        child.wait(10)


def test_profile_summary_self_and_total() -> None:
    """Collapsed stacks become self and total shares per function."""
    collapsed = ("process 1;loop (worker.py:10);pop (virtqueue.py:20) 30\n"
                 "process 1;loop (worker.py:10) 10\n"
                 "process 2;loop (worker.py:10);gpa (memory.py:5) 60\n")
    lines = cputime.summarise(collapsed)
    assert lines[0].split() == ["60.0", "%", "self", "60.0", "%", "total", "gpa", "(memory.py)"]
    assert any(line.endswith("pop (virtqueue.py)") and "30.0 % self" in line for line in lines)
    assert any("10.0 % self 100.0 % total  loop (worker.py)" in line for line in lines)


def test_tcp_stream_bench_moves_data_both_ways(tmp_path: Path) -> None:
    """bench/tcpstream.py through a real switch: the drivers' flows carry data and the figures are counted
    (no rate is asserted: figures belong in ``make bench``)."""
    for direction in ("up", "down"):
        result = tcpstream.run_case(tcpstream.StreamCase(1, direction), 1.0, 0.3, tmp_path)
        assert result.gbit_s[0] > 0 and result.worker_cpu[0] > 0, result
        assert result.worker_cpu_gb[0] > 0
        assert "worker(s)" in tcpstream.format_result(result)


@pytest.mark.dpdk
def test_testpmd_bench_counts_frames_into_shardswitch() -> None:
    """bench/testpmd.py: testpmd's txonly frames into a real switch are counted, with the switch's CPU (no
    rate asserted)."""
    result = testpmd.run_case("shardswitch", 1, 1.0, None)
    assert not result.error and result.frames_per_s > 0 and result.backend_cpu > 0, result
    assert "shardswitch" in testpmd.format_result(result)
