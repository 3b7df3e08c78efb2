"""The worker's reflect mode (TX frames written straight back to RX): drop reasons and byte counts.

A real :class:`~shardswitch.worker.worker.Worker` (its control channel is one end
of a socketpair nobody writes to) gets an RX and a TX ring laid out by the
driver-side helper of tests/virtio in one memfd, as a worker receives guest
memory; :meth:`~shardswitch.worker.datapath.Datapath.service_tx` then runs on frames
the test posts.  DPDK testpmd with ``mrg_rxbuf=0`` and 3072-byte frames found
that reflect mode blamed every too-big frame on missing RX buffers and
counted the bytes of dropped frames as received.
"""

from __future__ import annotations

import socket
from typing import Iterator

import pytest

from shardswitch.ipc import Channel, RingStart, ToWorker, WorkerSetup
from shardswitch.net.params import GuestParams
from shardswitch.vhost.wire import VirtioFeature
from shardswitch.worker.datapath import RX_NO_BUFFERS, RX_TOO_BIG
from shardswitch.worker.worker import Worker
from shardswitch.worker.rings import RingSlot
from tests.virtio.ringhelper import DriverRing, SharedMemory

HDR_LEN = 12                      # VERSION_1: virtio_net_hdr_v1
RX_BUFFER = 64                    # one small RX buffer: room for a 52-byte frame


class Rig:
    """A reflecting worker with a driver-side RX and TX ring."""

    def __init__(self, features: int) -> None:
        """Map the memfd into a new worker and start both rings with ``features``."""
        self.shm = SharedMemory()
        self._peer, ours = socket.socketpair()
        params = GuestParams(address="10.0.2.15", prefix_len=24, gateway="10.0.2.2")
        self.worker = Worker(WorkerSetup(pair=0, params=params, reflect=True), Channel(ours, ToWorker))
        self.shm.attach(self.worker.mem)
        self.rx = DriverRing(self.shm, 8, base=0x1000)
        self.tx = DriverRing(self.shm, 8, base=0x80000)
        for slot, ring in ((self.worker.rx, self.rx), (self.worker.tx, self.tx)):
            self._start(slot, ring, features)

    def _start(self, slot: RingSlot, ring: DriverRing, features: int) -> None:
        """Start one worker slot on a driver ring (no kick or call descriptor)."""
        lay = ring.layout
        slot.start(self.worker.mem, RingStart(seq=0, index=slot.index, num=ring.num, desc=ring.uva(lay.desc),
                                              avail=ring.uva(lay.avail), used=ring.uva(lay.used), last_avail=0,
                                              features=features, has_kick=False, has_call=False), [])

    def send(self, frame: bytes) -> None:
        """Post a TX chain of header + ``frame``."""
        self.tx.post(self.tx.data_chain([bytes(HDR_LEN) + frame]))

    def close(self) -> None:
        """Stop the rings and release memory, sockets and the epoll."""
        w = self.worker
        w.rx.stop()
        w.tx.stop()
        w.mem.clear()
        w.epoll.close()
        w.channel.sock.close()
        self._peer.close()
        self.shm.close()


@pytest.fixture
def rig() -> Iterator[Rig]:
    """A reflecting worker without MRG_RXBUF (one RX chain per frame)."""
    r = Rig(int(VirtioFeature.VERSION_1))
    yield r
    r.close()


def test_too_big_and_no_buffers_are_told_apart(rig: Rig) -> None:
    """Too big for the posted buffer -> RX_TOO_BIG; buffers used up -> RX_NO_BUFFERS; bytes of delivered only."""
    rig.rx.post(rig.rx.chain([(RX_BUFFER, True)]))
    big, fits, late = b"B" * 200, b"F" * 40, b"L" * 40
    for frame in (big, fits, late):
        rig.send(frame)

    assert rig.worker.datapath.service_tx() is False
    counters = rig.worker.counters
    assert counters.tx_frames == 3 and counters.tx_bytes == len(big) + len(fits) + len(late)
    assert dict(counters.drops) == {RX_TOO_BIG: 1, RX_NO_BUFFERS: 1}
    assert counters.rx_frames == 1 and counters.rx_bytes == len(fits)
    # The one RX buffer holds the frame that fitted, after a zeroed header with num_buffers 1.
    (head, written), = rig.rx.collect()
    offset, _length = rig.rx.buffers(head)[0]
    assert written == HDR_LEN + len(fits)
    assert rig.rx.read(offset, written) == bytes(10) + b"\x01\x00" + fits
    assert [used_len for _id, used_len in rig.tx.collect()] == [0, 0, 0]


def test_each_too_big_frame_counts_once(rig: Rig) -> None:
    """Several too-big frames in one batch are each one RX_TOO_BIG drop; the buffer stays posted."""
    rig.rx.post(rig.rx.chain([(RX_BUFFER, True)]))
    for _ in range(3):
        rig.send(b"B" * 100)

    rig.worker.datapath.service_tx()
    assert dict(rig.worker.counters.drops) == {RX_TOO_BIG: 3}
    assert rig.worker.counters.rx_frames == 0 and rig.worker.counters.rx_bytes == 0
    assert rig.rx.collect() == [] and rig.worker.rx.vq is not None and rig.worker.rx.vq.avail_pending() == 1
