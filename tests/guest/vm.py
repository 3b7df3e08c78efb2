"""Run a test script in a real QEMU guest and watch its serial console.

Theory of operation
-------------------
:class:`GuestVM` boots the cloud kernel + our initramfs (:mod:`.image`) with
the command-line shape known to work on the test machines (see
docs/test-guest.md): TCG (``SHARDSWITCH_ACCEL=kvm`` overrides),
q35 with all guest RAM in a shared memfd (vhost-user needs to map it), no
default devices, no reboot, the serial port written to a log file.  With a
``socket`` it adds one virtio-net-pci device backed by vhost-user over that
unix socket (``vectors=0``: QEMU 7.2 under TCG crashes with MSI-X there);
without one the guest has no network card at all.

The guest's ``/init`` (init.sh) runs exactly one shell script and powers off.
The script travels base64-encoded on the kernel command line as
``ss_script=...``; when that would overflow the kernel's 2048-byte command line
it is handed over as the fw_cfg blob ``opt/shardswitch/script`` instead.  The
serial log then carries ``SS-BEGIN``, the script's output, ``SS-EXIT <rc>``;
``dhcp`` in the guest prints ``SS-LEASE ...`` (:func:`parse_lease`).

Waiting is polling of the log file (every 0.1 s) for a regular expression,
bounded by a timeout and cut short when QEMU exits.  Every failure raises
:class:`GuestError`, an AssertionError whose message holds the whole serial
log and QEMU's own output, so a failing test shows what the guest saw.
Timeouts default to minutes: TCG boots take ~3 s alone but much longer on a
loaded 2-core machine.  QEMU is stopped by PID (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Sequence

from .image import GuestImage
from .netns import TestNetns, stop_process

ACCEL_ENV = "SHARDSWITCH_ACCEL"
QEMU_BINARY = "qemu-system-x86_64"
#: Where scripts/install-qemu10.sh puts QEMU 10 from bookworm-backports (Debian's 7.2 stays the default).
QEMU10_PREFIX = Path(__file__).resolve().parents[2] / ".cache" / "qemu10"
#: x86 COMMAND_LINE_SIZE is 2048 including the terminating NUL.
KERNEL_CMDLINE_MAX = 2047
FW_CFG_SCRIPT = "opt/shardswitch/script"
BASE_APPEND = "console=ttyS0 quiet panic=-1"
DEFAULT_TIMEOUT_S = 300.0
_POLL_S = 0.1
_EXIT_MARKER = re.compile(r"^SS-EXIT (\d+)\s*$", re.MULTILINE)
_LEASE_LINE = re.compile(r"^SS-LEASE (?P<fields>.*?)\s*$", re.MULTILINE)
_LEASE_DONE = re.compile(r"^SS-LEASE(?: |-FAIL leasefail)", re.MULTILINE)


class GuestError(AssertionError):
    """The guest or QEMU did not do what the test expected (message has the logs)."""


@dataclass(frozen=True)
class Lease:
    """What the guest's DHCP client applied, from an ``SS-LEASE`` line."""

    ip: str
    prefixlen: int
    routers: tuple[str, ...]
    mtu: int | None
    dns: tuple[str, ...]
    domain: str
    #: DHCP option 12 ("" when the server sent none).
    hostname: str = ""

    @property
    def router(self) -> str | None:
        """The router the guest uses as default gateway (the first one), if any."""
        return self.routers[0] if self.routers else None


def parse_lease(text: str) -> Lease | None:
    """Parse the last ``SS-LEASE k=v ...`` line in ``text``; None when there is none."""
    found = list(_LEASE_LINE.finditer(text))
    if not found:
        return None
    fields = dict(word.partition("=")[::2] for word in found[-1]["fields"].split())

    def items(key: str) -> tuple[str, ...]:
        """A comma-separated field as a tuple (empty when absent)."""
        return tuple(v for v in fields.get(key, "").split(",") if v)

    try:
        mtu = fields.get("mtu", "")
        return Lease(ip=fields["ip"], prefixlen=int(fields.get("mask") or 32),
                     routers=items("router"), mtu=int(mtu) if mtu else None,
                     dns=items("dns"), domain=fields.get("domain", ""), hostname=fields.get("hostname", ""))
    except (KeyError, ValueError) as exc:
        raise GuestError(f"malformed lease line {found[-1][0]!r}") from exc


def qemu_escape(value: str) -> str:
    """Escape a value for QEMU's comma-separated option syntax."""
    return value.replace(",", ",,")


def qemu10(prefix: Path = QEMU10_PREFIX) -> tuple[str, ...]:
    """The QEMU 10 that scripts/install-qemu10.sh unpacked into ``prefix``, with its firmware directories."""
    root = prefix / "root" / "usr"
    return (str(root / "bin" / QEMU_BINARY), "-L", str(root / "share" / "qemu"), "-L", str(root / "share" / "seabios"))


class GuestVM:
    """One QEMU guest running one script; a context manager that starts and kills it."""

    def __init__(self, image: GuestImage, script: str, *, socket: Path | None = None,
                 queues: int = 1, smp: int = 1, memory_mb: int = 512,
                 reconnect: bool = False, mac: str | None = None, append: str = "",
                 netns: TestNetns | None = None, workdir: Path | None = None,
                 extra_args: Sequence[str] = (), qemu: Sequence[str] = (QEMU_BINARY,)) -> None:
        """Describe the guest; nothing runs before :meth:`start`.

        ``socket``: the back-end's vhost-user unix socket (None = no network card);
        ``queues``: queue pairs (``mq=on`` when > 1); ``reconnect``: let QEMU
        reconnect to a restarted back-end; ``append``: extra kernel words;
        ``netns``: run QEMU inside this namespace; ``workdir``: where the serial
        log lives (default: a temporary directory removed by :meth:`close`);
        ``extra_args``: appended to the QEMU command line as they are; ``qemu``: the
        binary and its first options (default Debian's QEMU; see :func:`qemu10`).
        """
        if queues < 1 or smp < 1 or memory_mb < 64:
            raise ValueError(f"bad guest shape queues={queues} smp={smp} memory_mb={memory_mb}")
        self.image = image
        self.script = script
        self.socket = socket
        self.queues = queues
        self.smp = smp
        self.memory_mb = memory_mb
        self.reconnect = reconnect
        self.mac = mac
        self.append = append
        self.netns = netns
        self.extra_args = tuple(extra_args)
        self.qemu = tuple(qemu)
        self.accel = os.environ.get(ACCEL_ENV, "tcg")
        self._own_workdir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="ss-guest-")) if workdir is None else workdir
        self.serial_log = self.workdir / "serial.log"
        self.qemu_log = self.workdir / "qemu.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._argv: list[str] = []
        self._final_output: str | None = None
        self._final_qemu_output: str | None = None

    # -- command line ---------------------------------------------------------

    def kernel_cmdline(self) -> str:
        """The kernel command line, with the script inline when it fits."""
        words = f"{BASE_APPEND} {self.append}".strip()
        inline = f"{words} ss_script={base64.b64encode(self.script.encode()).decode()}"
        return inline if len(inline) <= KERNEL_CMDLINE_MAX else words

    def command(self) -> list[str]:
        """The QEMU argv (without any namespace prefix)."""
        mem = f"{self.memory_mb}M"
        argv = [*self.qemu, "-accel", self.accel,
                "-M", "q35,memory-backend=mem",
                "-object", f"memory-backend-memfd,id=mem,size={mem},share=on",
                "-m", mem, "-smp", str(self.smp),
                "-nographic", "-nodefaults", "-no-user-config", "-no-reboot",
                "-chardev", f"file,id=serial0,path={qemu_escape(str(self.serial_log))}",
                "-serial", "chardev:serial0",
                "-kernel", str(self.image.kernel), "-initrd", str(self.image.initrd)]
        if self.accel == "kvm":
            argv += ["-cpu", "host"]
        cmdline = self.kernel_cmdline()
        argv += ["-append", cmdline]
        if "ss_script=" not in cmdline:
            script_file = self.workdir / "script.sh"
            script_file.write_text(self.script)
            argv += ["-fw_cfg", f"name={FW_CFG_SCRIPT},file={qemu_escape(str(script_file))}"]
        if self.socket is not None:
            chardev = f"socket,id=c0,path={qemu_escape(str(self.socket))}"
            device = "virtio-net-pci,netdev=n0,vectors=0,romfile="
            if self.reconnect:
                chardev += ",reconnect=1"
            if self.queues > 1:
                device += ",mq=on"
            if self.mac is not None:
                device += f",mac={self.mac}"
            argv += ["-chardev", chardev,
                     "-netdev", f"vhost-user,id=n0,chardev=c0,queues={self.queues}",
                     "-device", device]
        return argv + list(self.extra_args)

    # -- life cycle -----------------------------------------------------------

    def start(self) -> None:
        """Launch QEMU (inside ``netns`` when given); returns at once."""
        if self._proc is not None:
            raise GuestError("guest already started")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.serial_log.write_bytes(b"")
        argv = self._argv = self.command()
        kw: dict[str, Any] = {"stdin": subprocess.DEVNULL, "stderr": subprocess.STDOUT}
        with open(self.qemu_log, "wb") as log:
            kw["stdout"] = log
            if self.netns is not None:
                self._proc = self.netns.popen(argv, **kw)
            else:
                self._proc = subprocess.Popen(argv, **kw)

    @property
    def returncode(self) -> int | None:
        """QEMU's exit status, or None while it runs (or before start)."""
        return None if self._proc is None else self._proc.poll()

    def output(self) -> str:
        """The serial log so far, with carriage returns removed."""
        if self._final_output is not None:
            return self._final_output
        try:
            raw = self.serial_log.read_bytes()
        except FileNotFoundError:
            return ""
        return raw.decode("utf-8", "replace").replace("\r", "")

    def qemu_output(self) -> str:
        """What QEMU itself printed (errors, warnings)."""
        if self._final_qemu_output is not None:
            return self._final_qemu_output
        try:
            return self.qemu_log.read_text("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def fail(self, message: str) -> GuestError:
        """A GuestError for ``message`` carrying the full serial log and QEMU's output."""
        return GuestError(
            f"{message}\n--- QEMU status: {self.returncode}; command: {' '.join(self._argv)}"
            f"\n--- serial log ---\n{self.output()}\n--- QEMU output ---\n{self.qemu_output()}"
            "\n--- end ---")

    def wait_for(self, pattern: str | re.Pattern[str],
                 timeout: float = DEFAULT_TIMEOUT_S) -> re.Match[str]:
        """Wait until ``pattern`` (multiline regex) matches the serial log; return the match.

        Raises GuestError when QEMU exits first or ``timeout`` seconds pass.
        """
        if self._proc is None:
            raise GuestError("guest not started")
        regex = re.compile(pattern, re.MULTILINE) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while True:
            exited = self._proc.poll() is not None
            m = regex.search(self.output())
            if m is not None:
                return m
            if exited:
                raise self.fail(f"QEMU exited before {regex.pattern!r} appeared")
            if time.monotonic() >= deadline:
                raise self.fail(f"timed out after {timeout:.0f} s waiting for {regex.pattern!r}")
            time.sleep(_POLL_S)

    def lease(self, timeout: float = DEFAULT_TIMEOUT_S) -> Lease:
        """Wait for the guest's ``dhcp`` outcome and return the lease (GuestError if none)."""
        self.wait_for(_LEASE_DONE, timeout)
        lease = parse_lease(self.output())
        if lease is None:
            raise self.fail("the guest's DHCP client got no lease")
        return lease

    def wait_exit(self, timeout: float = DEFAULT_TIMEOUT_S) -> int:
        """Wait for ``SS-EXIT <rc>`` and for QEMU to exit; return the script's rc."""
        rc = int(self.wait_for(_EXIT_MARKER, timeout)[1])
        assert self._proc is not None
        try:
            self._proc.wait(timeout=60.0)
        except subprocess.TimeoutExpired:
            raise self.fail("the guest printed SS-EXIT but QEMU did not exit") from None
        return rc

    def kill(self) -> None:
        """Stop QEMU by PID (SIGTERM, then SIGKILL); harmless when it already exited."""
        if self._proc is not None:
            stop_process(self._proc, grace=3.0)

    def close(self) -> None:
        """Kill QEMU, keep the logs in memory and remove a temporary workdir."""
        self.kill()
        if self._own_workdir and self._final_output is None:
            self._final_output = self.output()
            self._final_qemu_output = self.qemu_output()
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> GuestVM:
        """Start the guest."""
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        """Kill the guest and clean up, whatever happened in the block."""
        self.close()
