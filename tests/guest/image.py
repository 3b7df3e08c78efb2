"""Build (and cache) the test guest's kernel + initramfs pair.

Theory of operation
-------------------
The guest is the host's Debian cloud kernel (``/boot/vmlinuz-<ver>-cloud-amd64``)
booted straight into an initramfs that we assemble here, in memory, as a
``newc`` cpio archive compressed with gzip.  It holds:

* ``/bin/busybox`` (the static build) and one symlink per applet, at the paths
  ``busybox --list-full`` reports;
* the virtio / virtio-net modules of that kernel (and ``qemu_fw_cfg``, which
  carries scripts too long for the kernel command line), flat under
  ``/lib/modules/<name>.ko``, with their load order in ``/etc/ss-modules``;
* ``/usr/bin/iperf3`` and every library ``ldd`` lists, each at the same
  absolute path as on the host (so the ELF interpreter and rpath lookups work);
* ``/init`` (``init.sh`` next to this file), the udhcpc event script
  (``udhcpc.script``) at ``/usr/share/udhcpc/default.script`` and the ``dhcp``
  helper command;
* the directories ``/init`` mounts on, and ``/dev/console`` (the kernel opens it
  for ``/init``'s stdio before devtmpfs is mounted).  Writing the archive
  ourselves (instead of running ``cpio`` on a staging tree) lets us create that
  device node without privileges and makes the output byte-for-byte
  deterministic (every mtime is 0).

Caching: the archive is described first as a list of entries with their
contents, and the cache key is the SHA-256 of that description (every path,
mode, link target and content) plus this file's own source and the kernel
version.  So any change to an input (kernel update, busybox/iperf3/library
upgrade, ``init.sh``, ``udhcpc.script`` or this builder) gives a new key and a
rebuild; an unchanged input set reuses ``<cache_dir>/initrd-<key>.cpio.gz``.
The file is written to a unique temporary name in the same directory and
renamed into place, so test processes running in parallel never see a partial
archive (two racing builders produce identical files; the last rename wins).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import lzma
import os
import re
import secrets
import shutil
import stat
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

#: Modules to load, in this order (dependencies first).  ``qemu_fw_cfg`` is
#: last and independent: it exposes ``-fw_cfg`` blobs under /sys/firmware.
MODULES: tuple[str, ...] = (
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "failover",
    "net_failover",
    "virtio_net",
    "qemu_fw_cfg",
)

#: Where the files shipped into the guest live in the source tree.
HERE = Path(__file__).resolve().parent
INIT_SCRIPT = HERE / "init.sh"
UDHCPC_SCRIPT = HERE / "udhcpc.script"
UDPECHO_SOURCE = HERE / "udpecho.c"

#: Guest paths of things other modules need to agree on.
GUEST_UDHCPC_SCRIPT = "/usr/share/udhcpc/default.script"
GUEST_MODULE_LIST = "/etc/ss-modules"

#: ``dhcp`` command for test scripts: one DHCP exchange on eth0, applied and
#: reported (``SS-LEASE ...``) by our udhcpc script; extra arguments pass through.
DHCP_HELPER = (
    "#!/bin/sh\n"
    "# Acquire a DHCP lease on eth0 once; the event script prints SS-LEASE.\n"
    f'exec udhcpc -i eth0 -n -q -t 5 -O mtu -s {GUEST_UDHCPC_SCRIPT} "$@"\n'
)

_CPIO_MAGIC = b"070701"
_CPIO_TRAILER = "TRAILER!!!"
_LDD_PATH = re.compile(r"(?:=>\s*)?(/\S+)\s+\(0x[0-9a-f]+\)")
_KERNEL_NAME = re.compile(r"vmlinuz-(?P<ver>.+-cloud-amd64)$")
_STALE_AFTER_S = 3600.0


class GuestImageError(Exception):
    """The guest image cannot be built (missing kernel, module, tool...)."""


@dataclass(frozen=True)
class GuestImage:
    """A bootable kernel + initramfs pair."""

    kernel: Path
    initrd: Path
    kernel_version: str
    key: str


@dataclass(frozen=True)
class _Entry:
    """One archive member: a directory, regular file, symlink or char device."""

    path: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


class _Layout:
    """The ordered set of archive members, creating parent directories on demand."""

    def __init__(self) -> None:
        """Start with an empty tree (the root directory is implicit)."""
        self.entries: list[_Entry] = []
        self._dirs: set[str] = {""}
        self._paths: set[str] = set()

    def directory(self, path: str, perm: int = 0o755) -> None:
        """Add directory ``path`` (absolute) and its parents, once each."""
        rel = path.strip("/")
        if rel in self._dirs:
            return
        self.directory("/" + rel.rpartition("/")[0])
        self._dirs.add(rel)
        self.entries.append(_Entry(rel, stat.S_IFDIR | perm))

    def _add(self, entry: _Entry) -> None:
        """Append a non-directory member after creating its parent directory."""
        if entry.path in self._paths or entry.path in self._dirs:
            raise GuestImageError(f"duplicate initramfs path /{entry.path}")
        self.directory("/" + entry.path.rpartition("/")[0])
        self._paths.add(entry.path)
        self.entries.append(entry)

    def file(self, path: str, data: bytes, perm: int = 0o644) -> None:
        """Add regular file ``path`` with contents ``data``."""
        self._add(_Entry(path.strip("/"), stat.S_IFREG | perm, data))

    def symlink(self, path: str, target: str) -> None:
        """Add symlink ``path`` pointing at ``target``."""
        self._add(_Entry(path.strip("/"), stat.S_IFLNK | 0o777, target.encode()))

    def chardev(self, path: str, major: int, minor: int, perm: int = 0o600) -> None:
        """Add character device node ``path`` (major, minor)."""
        self._add(_Entry(path.strip("/"), stat.S_IFCHR | perm, b"", (major, minor)))

    def has(self, path: str) -> bool:
        """Whether a non-directory member already exists at ``path``."""
        return path.strip("/") in self._paths

    def digest(self) -> str:
        """SHA-256 over every member's path, mode, device numbers and contents."""
        h = hashlib.sha256()
        for e in self.entries:
            h.update(f"{e.path}\0{e.mode:o}\0{e.rdev}\0{len(e.data)}\0".encode())
            h.update(hashlib.sha256(e.data).digest())
        return h.hexdigest()


def _write_cpio(entries: list[_Entry], out: BinaryIO) -> None:
    """Serialise ``entries`` as a ``newc`` cpio archive (mtime 0) into ``out``."""

    def member(ino: int, name: str, mode: int, data: bytes, rdev: tuple[int, int]) -> None:
        """Write one header + name + data, each padded to 4 bytes."""
        raw_name = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, 2 if stat.S_ISDIR(mode) else 1, 0, len(data),
                  0, 0, rdev[0], rdev[1], len(raw_name), 0)
        header = _CPIO_MAGIC + b"".join(b"%08x" % f for f in fields)
        out.write(header + raw_name)
        out.write(b"\0" * (-(len(header) + len(raw_name)) % 4))
        out.write(data)
        out.write(b"\0" * (-len(data) % 4))

    for ino, e in enumerate(entries, start=1):
        member(ino, e.path, e.mode, e.data, e.rdev)
    member(0, _CPIO_TRAILER, 0, b"", (0, 0))


def _version_key(version: str) -> list[int | str]:
    """Sort key that orders ``6.1.0-9`` before ``6.1.0-10``."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", version)]


def find_cloud_kernel(boot: Path = Path("/boot"), modules: Path = Path("/lib/modules")) -> tuple[str, Path]:
    """Return (version, vmlinuz path) of the newest installed cloud kernel with modules."""
    found: list[tuple[str, Path]] = []
    for path in boot.glob("vmlinuz-*-cloud-amd64"):
        m = _KERNEL_NAME.search(path.name)
        if m and (modules / m["ver"]).is_dir():
            found.append((m["ver"], path))
    if not found:
        raise GuestImageError(
            f"no cloud kernel with modules in {boot} (install linux-image-cloud-amd64)")
    return max(found, key=lambda vp: _version_key(vp[0]))


def _run(argv: list[str]) -> str:
    """Run a host tool and return its stdout; failures become GuestImageError."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise GuestImageError(f"{argv[0]}: {exc}") from exc
    if done.returncode != 0:
        raise GuestImageError(f"{' '.join(argv)} failed: {done.stderr.strip()}")
    return done.stdout


def _which(name: str) -> Path:
    """Absolute, symlink-resolved path of a host program, or GuestImageError."""
    found = shutil.which(name)
    if found is None:
        raise GuestImageError(f"{name} not found in PATH")
    return Path(found).resolve()


def _module_bytes(version: str, name: str) -> bytes:
    """Contents of kernel module ``name`` for ``version``, decompressed if needed."""
    filename = _run(["modinfo", "-k", version, "-F", "filename", name]).strip()
    if not filename.startswith("/"):
        raise GuestImageError(f"module {name} of kernel {version} not found ({filename!r})")
    data = Path(filename).read_bytes()
    if filename.endswith(".ko"):
        return data
    if filename.endswith(".ko.xz"):
        return lzma.decompress(data)
    if filename.endswith(".ko.gz"):
        return gzip.decompress(data)
    raise GuestImageError(f"module {filename}: compression not supported")


def _add_busybox(layout: _Layout) -> None:
    """Add the static busybox as /bin/busybox and a symlink per applet."""
    busybox = _which("busybox")
    data = busybox.read_bytes()
    layout.file("/bin/busybox", data, 0o755)
    for applet in _run([str(busybox), "--list-full"]).split():
        if applet.rpartition("/")[2] != "busybox" and not layout.has(applet):
            layout.symlink("/" + applet, "/bin/busybox")


def _add_program_with_libs(layout: _Layout, name: str) -> None:
    """Add a dynamically linked host program and the libraries ldd lists, at their host paths."""
    program = Path(shutil.which(name) or name)
    if not program.is_absolute():
        raise GuestImageError(f"{name} not found in PATH")
    layout.file(str(program), program.read_bytes(), 0o755)
    for m in _LDD_PATH.finditer(_run(["ldd", str(program)])):
        lib = m[1]
        if not layout.has(lib):
            layout.file(lib, Path(lib).read_bytes(), 0o755)


def _udpecho(cache_dir: Path) -> bytes:
    """The static UDP echo server built from tests/guest/udpecho.c (cached by its source hash)."""
    source = UDPECHO_SOURCE.read_bytes()
    binary = cache_dir / f"udpecho-{hashlib.sha256(source).hexdigest()[:16]}"
    if not binary.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = binary.with_suffix(f".{os.getpid()}.{secrets.token_hex(4)}.tmp")
        _run(["gcc", "-static", "-O2", "-o", str(tmp), str(UDPECHO_SOURCE)])
        os.replace(tmp, binary)
    return binary.read_bytes()


def _describe_initramfs(version: str, cache_dir: Path) -> _Layout:
    """Collect every member of the initramfs for kernel ``version`` (only udpecho is built in the cache)."""
    layout = _Layout()
    for d in ("/proc", "/sys", "/dev", "/etc", "/root", "/run", "/usr/share/udhcpc"):
        layout.directory(d)
    layout.directory("/tmp", 0o1777)
    layout.chardev("/dev/console", 5, 1)
    _add_busybox(layout)
    for name in MODULES:
        layout.file(f"/lib/modules/{name}.ko", _module_bytes(version, name))
    layout.file(GUEST_MODULE_LIST, "".join(f"{n}\n" for n in MODULES).encode())
    _add_program_with_libs(layout, "iperf3")
    layout.file("/usr/bin/udpecho", _udpecho(cache_dir), 0o755)
    layout.file("/init", INIT_SCRIPT.read_bytes(), 0o755)
    layout.file(GUEST_UDHCPC_SCRIPT, UDHCPC_SCRIPT.read_bytes(), 0o755)
    layout.file("/usr/bin/dhcp", DHCP_HELPER.encode(), 0o755)
    return layout


def _prune(cache_dir: Path, keep: Path) -> None:
    """Delete other cached archives (and abandoned temp files) older than an hour."""
    cutoff = time.time() - _STALE_AFTER_S
    for old in list(cache_dir.glob("initrd-*.cpio.gz")) + list(cache_dir.glob(".initrd-*.tmp")):
        try:
            if old != keep and old.stat().st_mtime < cutoff:
                old.unlink()
        except FileNotFoundError:
            pass


def build_initramfs(cache_dir: Path) -> GuestImage:
    """Return the guest image, building the initramfs into ``cache_dir`` unless cached.

    Raises GuestImageError when an input (kernel, module, busybox, iperf3) is missing.
    """
    version, kernel = find_cloud_kernel()
    layout = _describe_initramfs(version, cache_dir)
    h = hashlib.sha256()
    h.update(version.encode() + b"\0")
    h.update(Path(__file__).read_bytes())
    h.update(layout.digest().encode())
    key = h.hexdigest()[:20]
    cache_dir.mkdir(parents=True, exist_ok=True)
    final = cache_dir / f"initrd-{key}.cpio.gz"
    if not final.exists():
        raw = io.BytesIO()
        _write_cpio(layout.entries, raw)
        tmp = cache_dir / f".initrd-{key}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(gzip.compress(raw.getbuffer(), compresslevel=6, mtime=0))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        _prune(cache_dir, final)
    return GuestImage(kernel=kernel, initrd=final, kernel_version=version, key=key)
