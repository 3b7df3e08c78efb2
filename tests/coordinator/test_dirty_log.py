"""The dirty-page log through a running switch, driven as QEMU drives it when a migration starts.

The Python front-end negotiates LOG_SHMFD, sends SET_LOG_BASE with a memfd
bitmap (and waits for the reply), acks LOG_ALL and re-sends every ring's
address with the log flag.  Frames then written into RX buffers mark their
pages and the used rings' pages; nothing is marked before.  The real QEMU 10
migration is tests/guest/test_guest_migration.py.
"""

from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path

from shardswitch.frontend.client import BASE_PROTOCOL_FEATURES, VhostUserFrontend
from shardswitch.vhost.wire import ProtocolFeature
from shardswitch.virtio.dirtylog import LOG_PAGE
from tests.switch import Switch
from tests.switchkit import arp_roundtrip, is_periodic_ra

PAIRS = 2


def set_pages(fd: int, size: int) -> set[int]:
    """Page numbers whose bit is set in the bitmap."""
    with mmap.mmap(fd, size) as view:
        words = struct.unpack_from(f"<{size // 8}Q", view)
    return {64 * i + bit for i, word in enumerate(words) for bit in range(64) if word >> bit & 1}


def test_pages_written_while_logging_are_marked(tmp_path: Path) -> None:
    """Before logging: no bit.  After: the used rings of the RX queues and pages of their buffers; the
    status counts each ring that started logging; the same connection keeps working."""
    with Switch(tmp_path, workers=PAIRS) as switch, \
            VhostUserFrontend.connect(switch.socket, queue_pairs=PAIRS, ignore=is_periodic_ra,
                                      protocol_features=int(BASE_PROTOCOL_FEATURES | ProtocolFeature.LOG_SHMFD)) as fe:
        fe.handshake()
        assert fe.protocol_features & ProtocolFeature.LOG_SHMFD
        end = max(r.guest_phys_addr + r.memory_size for r in fe.ram.regions)
        size = (end // LOG_PAGE + 63) // 64 * 8
        fd = os.memfd_create("dirty-log")
        try:
            os.ftruncate(fd, size)
            for pair in range(PAIRS):
                arp_roundtrip(fe, pair)
            assert set_pages(fd, size) == set()
            fe.start_dirty_log(size, fd)
            for pair in range(PAIRS):
                arp_roundtrip(fe, pair)
            marked = set_pages(fd, size)
            for pair in range(PAIRS):
                used = fe.ram.gpa_of(fe.ring(2 * pair).used_vva) // LOG_PAGE
                assert used in marked, (pair, used, sorted(marked)[:20])
            rings = {fe.ram.gpa_of(fe.ring(i).used_vva) // LOG_PAGE for i in range(2 * PAIRS)}
            assert marked - rings, "no RX buffer page was marked"
            status = switch.status()
            assert all(w["events"].get("DIRTY_LOG_RING", 0) >= 2 for w in status["workers"]), status
            assert "dirty-page log of" in switch.log()
            assert switch.status()["frontend"]["connected"]
        finally:
            os.close(fd)
