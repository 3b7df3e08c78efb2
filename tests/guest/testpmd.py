"""Drive DPDK testpmd (a second real vhost-user front-end) interactively.

Theory of operation
-------------------
:class:`Testpmd` runs ``dpdk-testpmd`` (Debian's dpdk-dev, DPDK 22.11) inside a
:class:`~.netns.TestNetns` with a virtio-user port connected to the back-end's
vhost-user socket, in the shape known to work (docs/vhost-user.md):
no PCI, no hugepages (memory from a memfd), two lcores, ``-i`` (interactive).

Its stdin and stdout are pipes.  testpmd's command-line library writes the
``testpmd> `` prompt and the echo of each typed line with write(2), but the
command output goes through stdio, which is block-buffered on a pipe; running
it under ``stdbuf -o0 -e0`` makes stdout unbuffered so the output always
precedes the next prompt.  :meth:`Testpmd.command` writes one line and reads
(select + non-blocking read, bounded by a timeout) until the next prompt, then
returns what came in between minus the echo.  Everything read is also kept in
:attr:`Testpmd.log`, which every :class:`TestpmdError` message includes.

Traffic safety: txonly mode builds UDP frames to 198.18.0.2 by default.  They
only ever reach our back-end's socket, and the back-end runs in the test's
namespace; even so ``--tx-ip`` is set (by default to the namespace's host
address as source and its upstream/gateway address as destination, the
address the back-end maps to the host's loopback), so nothing names an outside
host.  ``--file-prefix`` is unique per instance and its runtime directory
(/var/run/dpdk/<prefix>) is removed at close.  The process is stopped by PID.
"""

from __future__ import annotations

import os
import re
import secrets
import select
import shutil
import subprocess
import time
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from types import TracebackType
from typing import Sequence

from .netns import TestNetns, stop_process

TESTPMD_BINARY = "dpdk-testpmd"
PROMPT = "testpmd> "
DPDK_RUNTIME_DIR = Path("/var/run/dpdk")
LAUNCH_TIMEOUT_S = 120.0
COMMAND_TIMEOUT_S = 60.0
_ERROR_REPLIES = ("Bad arguments", "Command not found", "Invalid", "Unknown")
_PORT_HEADER = re.compile(r"#+ NIC statistics for port (\d+)\s+#+")
_STAT_FIELD = re.compile(r"([A-Za-z][A-Za-z-]*):\s+(\d+)")
_PORT_COUNT = re.compile(r"^Port (\d+): [0-9A-F]{2}(?::[0-9A-F]{2}){5}$", re.MULTILINE)


class TestpmdError(AssertionError):
    """testpmd failed, exited or did not answer in time (message has its whole log)."""

    __test__ = False


class FwdMode(StrEnum):
    """Forwarding engines this project uses (``set fwd <mode>``)."""

    IO = "io"
    MAC = "mac"
    RXONLY = "rxonly"
    TXONLY = "txonly"
    FLOWGEN = "flowgen"


@dataclass(frozen=True)
class PortStats:
    """One port's counters from ``show port stats``."""

    rx_packets: int
    rx_missed: int
    rx_bytes: int
    rx_errors: int
    rx_nombuf: int
    tx_packets: int
    tx_errors: int
    tx_bytes: int
    rx_pps: int
    rx_bps: int
    tx_pps: int
    tx_bps: int


def parse_port_stats(text: str) -> dict[int, PortStats]:
    """Parse ``show port stats all`` output into counters per port id."""
    headers = list(_PORT_HEADER.finditer(text))
    result: dict[int, PortStats] = {}
    for i, header in enumerate(headers):
        end = headers[i + 1].start() if i + 1 < len(headers) else len(text)
        fields = {k.lower().replace("-", "_"): int(v)
                  for k, v in _STAT_FIELD.findall(text[header.end():end])}
        try:
            result[int(header[1])] = PortStats(**{name: fields[name]
                                                  for name in PortStats.__dataclass_fields__})
        except KeyError as exc:
            raise TestpmdError(f"port stats without {exc}:\n{text}") from exc
    return result


class Testpmd:
    """An interactive testpmd process inside a test namespace; a context manager.

    ``launch()`` starts it and waits for the first prompt; ``command()`` runs one
    line; ``quit()`` ends it politely, ``kill()`` by PID; ``close()`` does
    whichever is needed and removes DPDK's runtime directory.
    """

    __test__ = False

    def __init__(self, socket: Path, netns: TestNetns, *, queues: int = 2,
                 queue_size: int = 256, lcores: str = "0-1", memory_mb: int = 1024,
                 mbufs: int = 16384, tx_ip: tuple[str, str] | None = None,
                 vdev: str | None = None, extra_args: Sequence[str] = ()) -> None:
        """Describe the run; nothing starts before :meth:`launch`.

        ``tx_ip`` is (source, destination) for txonly frames, default
        (netns.host_addr, netns.upstream_addr).  ``vdev`` replaces the virtio-user
        port (e.g. ``net_null0`` to exercise this class without a back-end);
        ``extra_args`` are appended after the application's own options.
        """
        if queues < 1 or queue_size < 1:
            raise ValueError(f"bad queues={queues} queue_size={queue_size}")
        self.socket = socket
        self.netns = netns
        self.queues = queues
        self.queue_size = queue_size
        self.lcores = lcores
        self.memory_mb = memory_mb
        self.mbufs = mbufs
        self.tx_ip = tx_ip or (netns.host_addr, netns.upstream_addr)
        self.vdev = vdev or (f"net_virtio_user0,path={socket},queues={queues},"
                             f"queue_size={queue_size}")
        self.extra_args = tuple(extra_args)
        self.file_prefix = f"ss{os.getpid()}{secrets.token_hex(3)}"
        self.log = ""
        self._proc: subprocess.Popen[bytes] | None = None
        self._pending = ""

    def argv(self) -> list[str]:
        """The testpmd argv (unbuffered stdout, without the namespace prefix)."""
        return ["stdbuf", "-o0", "-e0", TESTPMD_BINARY,
                "-l", self.lcores, "--no-pci", "--no-huge", "-m", str(self.memory_mb),
                f"--file-prefix={self.file_prefix}", f"--vdev={self.vdev}",
                "--", "-i", f"--txq={self.queues}", f"--rxq={self.queues}",
                f"--total-num-mbufs={self.mbufs}", f"--tx-ip={self.tx_ip[0]},{self.tx_ip[1]}",
                *self.extra_args]

    def fail(self, message: str) -> TestpmdError:
        """A TestpmdError for ``message`` with the full testpmd log."""
        status = None if self._proc is None else self._proc.poll()
        return TestpmdError(f"{message}\n--- testpmd status: {status}; command: "
                            f"{' '.join(self.argv())}\n--- testpmd log ---\n{self.log}"
                            f"{self._pending}\n--- end ---")

    def launch(self, timeout: float = LAUNCH_TIMEOUT_S) -> str:
        """Start testpmd and wait for its first prompt; return the start-up output.

        Raises TestpmdError if it exits first (e.g. no back-end listening on the
        socket), times out, or comes up without any port.
        """
        if self._proc is not None:
            raise self.fail("testpmd already launched")
        self._proc = self.netns.popen(self.argv(), stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert self._proc.stdout is not None
        os.set_blocking(self._proc.stdout.fileno(), False)
        startup = self._read_until_prompt(timeout, "start-up")
        if _PORT_COUNT.search(startup) is None:
            raise self.fail("testpmd came up without any port")
        return startup

    def _read_until_prompt(self, timeout: float, what: str) -> str:
        """Read output until the prompt; return the text before it (CRs removed)."""
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while PROMPT not in self._pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self.fail(f"timed out after {timeout:.0f} s waiting for the prompt ({what})")
            ready, _, _ = select.select([fd], [], [], min(remaining, 1.0))
            if not ready:
                continue
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                continue
            if not chunk:
                self._proc.wait(timeout=10.0)
                raise self.fail(f"testpmd exited ({self._proc.returncode}) during {what}")
            self._pending += chunk.decode("utf-8", "replace").replace("\r", "")
        text, _, self._pending = self._pending.partition(PROMPT)
        self.log += text + PROMPT
        return text

    def command(self, text: str, timeout: float = COMMAND_TIMEOUT_S) -> str:
        """Run one command line; return its output up to the next prompt (echo removed).

        Raises TestpmdError if testpmd rejects the command, exits or times out.
        """
        if self._proc is None or self._proc.stdin is None:
            raise self.fail("testpmd not launched")
        if "\n" in text or "\r" in text:
            raise ValueError("one command line at a time")
        try:
            self._proc.stdin.write(text.encode() + b"\n")
            self._proc.stdin.flush()
        except BrokenPipeError:
            raise self.fail(f"testpmd is gone (sending {text!r})") from None
        out = self._read_until_prompt(timeout, repr(text))
        first, sep, rest = out.partition("\n")
        if first.strip() == text.strip():
            out = rest
        if any(out.lstrip().startswith(e) for e in _ERROR_REPLIES):
            raise self.fail(f"testpmd rejected {text!r}: {out.strip()}")
        return out

    def set_fwd(self, mode: FwdMode | str) -> str:
        """Select the forwarding engine (``set fwd MODE``)."""
        out = self.command(f"set fwd {FwdMode(mode).value}")
        if "packet forwarding mode" not in out:
            raise self.fail(f"unexpected reply to set fwd {mode}: {out.strip()}")
        return out

    def start(self) -> str:
        """Start forwarding (``start``)."""
        return self.command("start")

    def stop(self) -> str:
        """Stop forwarding (``stop``); the output has the forward statistics."""
        return self.command("stop")

    def port_stats(self) -> dict[int, PortStats]:
        """Current counters of every port (``show port stats all``)."""
        return parse_port_stats(self.command("show port stats all"))

    def quit(self, timeout: float = 60.0) -> int:
        """Send ``quit`` and wait for the exit status (TestpmdError if it does not exit)."""
        if self._proc is None or self._proc.stdin is None:
            raise self.fail("testpmd not launched")
        if self._proc.poll() is None:
            try:
                self._proc.stdin.write(b"quit\n")
                self._proc.stdin.close()
            except BrokenPipeError:
                pass
        try:
            rc = self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise self.fail(f"testpmd did not exit within {timeout:.0f} s of quit") from None
        self._drain()
        return rc

    def _drain(self) -> None:
        """Append whatever output is left in the pipe to the log (process has exited)."""
        assert self._proc is not None and self._proc.stdout is not None
        try:
            rest = self._proc.stdout.read() or b""
        except (OSError, ValueError):
            rest = b""
        self.log += self._pending + rest.decode("utf-8", "replace").replace("\r", "")
        self._pending = ""

    def kill(self) -> None:
        """Stop testpmd by PID (SIGTERM, then SIGKILL)."""
        if self._proc is not None:
            stop_process(self._proc, grace=5.0)

    def close(self) -> None:
        """Quit (or kill) testpmd, close the pipes and remove its DPDK runtime directory."""
        if self._proc is not None:
            if self._proc.poll() is None:
                try:
                    self.quit(timeout=20.0)
                except TestpmdError:
                    self.kill()
            for pipe in (self._proc.stdin, self._proc.stdout):
                if pipe is not None:
                    try:
                        pipe.close()
                    except OSError:
                        pass
        shutil.rmtree(DPDK_RUNTIME_DIR / self.file_prefix, ignore_errors=True)

    def __enter__(self) -> Testpmd:
        """Launch testpmd and wait for its prompt (cleaning up if that fails)."""
        try:
            self.launch()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        """Stop testpmd and clean up, whatever happened in the block."""
        self.close()
