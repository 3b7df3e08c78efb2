"""Real-guest test harness: QEMU guests, DPDK testpmd, private network namespaces.

Modules:

* :mod:`.image`   - builds and caches the guest initramfs (busybox, virtio-net
  modules, iperf3) for the host's cloud kernel;
* :mod:`.vm`      - :class:`~.vm.GuestVM` boots it with a vhost-user NIC (or
  none), runs one shell script and reports its output and exit code;
* :mod:`.netns`   - :class:`~.netns.TestNetns`, the host + upstream namespace
  pair every packet-moving test runs in;
* :mod:`.testpmd` - :class:`~.testpmd.Testpmd`, DPDK testpmd as a second
  front-end, driven interactively.

Test modules import it as ``tests.guest`` (e.g. ``from tests.guest.vm import
GuestVM``); the
fixtures ``guest_image`` and ``netns`` live in tests/conftest.py.  Tests that
need it are marked ``@pytest.mark.guest`` (or ``dpdk``); the functions below
say what such a test is missing on this machine.
"""

from __future__ import annotations

import os
import shutil

from .image import GuestImageError, find_cloud_kernel

_GUEST_TOOLS = ("qemu-system-x86_64", "busybox", "iperf3", "modinfo", "ldd", "ip", "sysctl")
_DPDK_TOOLS = ("dpdk-testpmd", "stdbuf", "ip", "sysctl")


def _missing_tools(names: tuple[str, ...]) -> list[str]:
    """One message per program of ``names`` not found in PATH."""
    return [f"{name} not found in PATH" for name in names if shutil.which(name) is None]


def _missing_root() -> list[str]:
    """A message when we cannot create network namespaces (not root)."""
    return [] if os.geteuid() == 0 else ["not running as root (network namespaces need it)"]


def missing_guest_prerequisites() -> list[str]:
    """What a ``guest`` test lacks here (root, QEMU, cloud kernel, tools); empty if nothing."""
    missing = _missing_root() + _missing_tools(_GUEST_TOOLS)
    try:
        find_cloud_kernel()
    except GuestImageError as exc:
        missing.append(str(exc))
    return missing


def missing_dpdk_prerequisites() -> list[str]:
    """What a ``dpdk`` test lacks here (root, dpdk-testpmd, tools); empty if nothing."""
    return _missing_root() + _missing_tools(_DPDK_TOOLS)
