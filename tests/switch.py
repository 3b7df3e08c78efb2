"""Run a real shardswitch process for tests and benchmarks.

By default the switch runs under ``unshare --net``: a fresh network namespace
holding only a loopback interface, so nothing it could ever send leaves this
test (``sh`` brings loopback up and allows ICMP echo sockets, then execs the
switch, so the PID is the switch's).  Guest tests pass ``prefix`` (the ``ip netns exec NAME`` words of a
namespace the test created) instead.  Only the process started here is ever
signalled, by its PID.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from shardswitch.coordinator.control import ControlError, query
from shardswitch.sandbox.privileges import process_status

#: The default prefix: a fresh network namespace with only loopback, up, and unprivileged ICMP
#: echo sockets allowed (what the switch maps the gateway to is this namespace's 127.0.0.1).
ISOLATED = ["unshare", "--net", "sh", "-c",
            'ip link set lo up && sysctl -qw net.ipv4.ping_group_range="0 2147483647" && exec "$@"', "sh"]

#: Addressing used when the test gives none (both families pinned, whatever the namespace has to mirror;
#: the IPv6 gateway is global, so the guest's IPv6 router is our link-local address).
DEFAULT_ADDRESSING = ["-a", "10.0.2.15", "-n", "24", "-g", "10.0.2.2", "--dns", "10.0.2.3",
                      "-a", "2001:db8:2::15", "-g", "2001:db8:2::2"]


class Switch:
    """A shardswitch process under test."""

    def __init__(self, tmp: Path, *, workers: int = 1, args: list[str] | None = None,
                 prefix: list[str] | None = None, addressing: list[str] | None = None,
                 socket_path: str | None = None, connect: bool = False, test_hooks: bool = False,
                 where: list[str] | None = None, pass_fds: tuple[int, ...] = (),
                 env: dict[str, str] | None = None, debug: bool = True) -> None:
        """Prepare (call :meth:`start`); ``connect``: client mode, connect to ``socket_path``; ``test_hooks``:
        obey test-only control commands (SHARDSWITCH_TEST_HOOKS=1); ``where``: these options instead of
        --socket/--connect (``--fd N``, with N in ``pass_fds``); ``env``: more environment variables;
        ``debug``: start it with -d (off: the log level is the options' own)."""
        self.socket = socket_path or str(tmp / "ss.sock")
        self.control = self.socket + ".ctl"
        self.log_path = tmp / f"switch-{int(time.monotonic() * 1000)}.log"
        self.workers = workers
        self.args = args or []
        self.prefix = prefix if prefix is not None else ISOLATED
        self.addressing = DEFAULT_ADDRESSING if addressing is None else addressing
        self.connect = connect
        self.test_hooks = test_hooks
        self.where = where
        self.pass_fds = pass_fds
        self.extra_env = env or {}
        self.debug = debug
        self.proc: subprocess.Popen[bytes] | None = None
        #: The coordinator's PID on this host, once it answered (see :attr:`pid`).
        self.coordinator_pid = 0

    def start(self, timeout: float = 15.0) -> "Switch":
        """Start the switch and wait until its control socket answers."""
        where = ["--connect", self.socket, "--control", self.control] if self.connect else ["--socket", self.socket]
        if self.where is not None:
            where = [*self.where, "--control", self.control]
        argv = [*self.prefix, sys.executable, "-m", "shardswitch", "start", *(["-d"] if self.debug else []),
                "--workers", str(self.workers),
                *where, *self.addressing, *self.args]
        log = open(self.log_path, "ab")
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
        if self.test_hooks:
            env["SHARDSWITCH_TEST_HOOKS"] = "1"
        env.update(self.extra_env)
        self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, pass_fds=self.pass_fds)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"shardswitch exited with {self.proc.returncode}:\n{self.log()}")
            try:
                pid = query(self.control, "status", timeout=2.0)["pid"]
                # Never a PID of the switch's own namespace (1 is the host's init): signals go by this one.
                assert isinstance(pid, int) and pid > 1, f"the coordinator's PID on this host is unknown: {pid}"
                self.coordinator_pid = pid
                return self
            except ControlError:
                time.sleep(0.05)
        raise RuntimeError(f"shardswitch did not come up:\n{self.log()}")

    def status(self) -> dict[str, Any]:
        """The switch's status answer."""
        return query(self.control, "status")

    def query(self, command: str) -> dict[str, Any]:
        """Any control command's answer (``flows``...)."""
        return query(self.control, command)

    def log(self) -> str:
        """Everything the switch printed so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    @property
    def pid(self) -> int:
        """The coordinator's PID on this host: in a PID namespace of its own, the child of the process
        started here (its keeper, see shardswitch.sandbox.pidns), else that process itself."""
        assert self.proc is not None
        return self.coordinator_pid or self.proc.pid

    def alive(self) -> bool:
        """True while the process runs."""
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the switch (its workers follow through PDEATHSIG)."""
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> int:
        """SIGTERM, wait, return the exit code (SIGKILL after a grace period)."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode

    def __enter__(self) -> "Switch":
        """Start on entry."""
        return self.start()

    def __exit__(self, *exc: object) -> None:
        """Stop on exit."""
        self.stop()


def sandbox_status(pid: int) -> dict[str, str]:
    """What /proc/PID/status says a process may do (Uid, Cap*, NoNewPrivs, Seccomp...)."""
    return process_status(pid)


def assert_sandboxed(switch: Switch) -> None:
    """The coordinator and every worker: no root user ID, no capability, no_new_privs, a seccomp filter."""
    answer = switch.status()
    assert answer["sandbox"]["enabled"] and answer["sandbox"]["uid"] != 0, answer["sandbox"]
    pids = [switch.pid] + [w["pid"] for w in answer["workers"]]
    for pid in pids:
        status = sandbox_status(pid)
        assert "0" not in status["Uid"].split(), (pid, status)
        assert all(int(status[k], 16) == 0 for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")), (pid, status)
        assert (status["NoNewPrivs"], status["Seccomp"]) == ("1", "2"), (pid, status)
        view = set(os.listdir(f"/proc/{pid}/root"))
        assert view <= {"dev", "proc", "tmp", "run"} and os.path.isdir(f"/proc/{pid}/root/dev/shm"), (pid, view)


def worker_counters(status: dict[str, Any]) -> list[dict[str, Any]]:
    """Per-worker entries of a status answer."""
    return list(status["workers"])
