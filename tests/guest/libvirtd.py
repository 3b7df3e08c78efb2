"""A private libvirtd for a test: Debian's libvirt in system mode, isolated from the host's.

Theory of operation
-------------------
The daemon runs as root (as libvirtd runs on users' hosts) inside the test's
network namespace and in a mount namespace of its own, where a tmpfs covers
/run and the test's directories are bound over /run/libvirt, /var/lib/libvirt,
/var/log/libvirt, /var/cache/libvirt and /etc/libvirt (a copy of the host's
configuration, with the QEMU driver told to log to files, use no cgroups,
no private /dev and no security driver, which a container without systemd
and AppArmor cannot give it).  Nothing it does outlives the test or touches
the host's libvirt, and the QEMU it starts runs in the test's namespace.
virsh reaches it through the socket bound out: ``qemu:///system?socket=...``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

from tests.guest.netns import TestNetns, stop_process

LIBVIRTD = "/usr/sbin/libvirtd"
QEMU_CONF = """
stdio_handler = "file"
cgroup_controllers = [ ]
namespaces = [ ]
security_driver = "none"
user = "root"
group = "root"
"""
START = """set -e
mount -t tmpfs tmpfs /run
mkdir -p /run/libvirt
mount --bind "$1/run" /run/libvirt
for d in lib log cache; do mount --bind "$1/$d" "/var/$d/libvirt"; done
mount --bind "$1/etc" /etc/libvirt
exec {libvirtd} --verbose
"""


class Libvirtd:
    """One private libvirtd; a context manager."""

    def __init__(self, root: Path, netns: TestNetns) -> None:
        """Prepare its directories under ``root``; nothing runs before :meth:`start`."""
        self.root = root
        self.netns = netns
        self.uri = f"qemu:///system?socket={root / 'run' / 'libvirt-sock'}"
        self.log = root / "libvirtd.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> Libvirtd:
        """Start the daemon and wait until virsh answers."""
        for name in ("run", "lib", "log", "cache"):
            (self.root / name).mkdir(parents=True, exist_ok=True)
        shutil.copytree("/etc/libvirt", self.root / "etc", symlinks=True)
        with open(self.root / "etc" / "qemu.conf", "a") as conf:
            conf.write(QEMU_CONF)
        with open(self.log, "wb") as log:
            self.proc = self.netns.popen(["unshare", "-m", "--propagation", "private", "sh", "-c",
                                          START.format(libvirtd=LIBVIRTD), "start", str(self.root)],
                                         stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while self.virsh("version", check=False).returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"libvirtd did not come up:\n{self.log.read_text(errors='replace')}")
            time.sleep(0.2)
        return self

    def virsh(self, *args: str, check: bool = True, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """``virsh -c URI ARGS``."""
        done = subprocess.run(["virsh", "-c", self.uri, *args], capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise RuntimeError(f"virsh {' '.join(args)}: {done.stderr.strip()}")
        return done

    def domifstat(self, domain: str, interface: str) -> dict[str, int]:
        """``virsh domifstat``'s counters (rx_bytes, rx_packets, tx_bytes, tx_packets...)."""
        text = self.virsh("domifstat", domain, interface).stdout
        return {m[1]: int(m[2]) for m in re.finditer(r"^\S+ (\w+) (-?\d+)$", text, re.MULTILINE)}

    def stop(self) -> None:
        """Destroy every domain, stop the daemon (by PID)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            listed = self.virsh("list", "--name", check=False).stdout.split()
            for name in listed:
                self.virsh("destroy", name, check=False)
        stop_process(self.proc)
        self.proc = None

    def __enter__(self) -> Libvirtd:
        """Start on entry."""
        return self.start()

    def __exit__(self, *exc: object) -> None:
        """Stop on exit."""
        self.stop()
