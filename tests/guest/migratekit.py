"""Two QEMU 10 guests for a live migration: A runs the guest, B waits for it (``-incoming``).

Shared by the migration tests (tests/guest/test_guest_migration.py) and the
migration benchmark (bench/migration.py), whatever back-ends A and B use:
each QEMU connects its virtio-net device to a vhost-user socket given here.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Any, NamedTuple

from tests.guest.image import GuestImage
from tests.guest.netns import TestNetns
from tests.guest.qmp import Qmp
from tests.guest.vm import GuestVM, qemu10


class Migrating(NamedTuple):
    """QEMU A with the running guest, QEMU B waiting for it, and the sockets that join them."""

    vm_a: GuestVM
    vm_b: GuestVM
    qmp_a: Path
    migration: Path


def two_guests(stack: ExitStack, tmp_path: Path, netns: TestNetns, image: GuestImage, script: str,
               sockets: tuple[Path, Path], queues: int) -> Migrating:
    """QEMU A (on ``sockets[0]``, running ``script``) and QEMU B (on ``sockets[1]``, incoming), ``queues``
    queue pairs and as many vCPUs (at least 2), both stopped by ``stack``."""
    qmp_a, migration = tmp_path / "qmp-a.sock", tmp_path / "migration.sock"
    smp = max(2, queues)
    vm_a = stack.enter_context(GuestVM(image, script, socket=sockets[0], queues=queues, smp=smp, netns=netns,
                                       qemu=qemu10(), extra_args=["-qmp", f"unix:{qmp_a},server=on,wait=off"]))
    vm_b = stack.enter_context(GuestVM(image, script, socket=sockets[1], queues=queues, smp=smp, netns=netns,
                                       qemu=qemu10(), extra_args=["-incoming", f"unix:{migration}"]))
    return Migrating(vm_a, vm_b, qmp_a, migration)


def migrate(guests: Migrating, timeout: float = 120.0) -> dict[str, Any]:
    """Migrate QEMU A's guest to QEMU B; query-migrate's last answer (total-time, downtime in ms)."""
    qmp = Qmp(guests.qmp_a)
    try:
        qmp.execute("migrate", uri=f"unix:{guests.migration}")
        info: dict[str, Any] = qmp.wait_migration(timeout)
    finally:
        qmp.close()
    return info
