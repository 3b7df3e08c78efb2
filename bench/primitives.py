"""In-process reference rates: the ring primitives and the worker's packet path without processes.

Theory of operation
-------------------
Everything here runs in the benchmark process itself, on one
:class:`~shardswitch.frontend.memory.GuestRam` that is also mapped a second
time through the worker's :class:`~shardswitch.virtio.memory.GuestMemory`
(exactly what a worker does with the memfd), so the device code addresses
the rings by front-end virtual address just as in production.  There are no
eventfds, no epoll and no second process: the figures are the per-frame cost
of the Python code alone, the ceiling for what one worker-CPU-second can do.

* ``virtqueue pop+push``: a TX ring kept full by a
  :class:`~bench.driver.RecyclingRing`; timed are only the device calls, one
  :meth:`~shardswitch.virtio.virtqueue.Virtqueue.pop` and
  :meth:`~shardswitch.virtio.virtqueue.Virtqueue.push` per chain and one
  :meth:`~shardswitch.virtio.virtqueue.Virtqueue.flush` per ring-full.
* ``worker service_tx``: a real :class:`~shardswitch.worker.worker.Worker`
  whose two ring slots are started with the same ``RingStart`` messages the
  coordinator would send (without kick/call descriptors); timed are only
  the :meth:`~shardswitch.worker.datapath.Datapath.service_tx` calls, i.e. the whole
  per-frame work of the worker (TX pop, frame view, reflect or endpoint,
  RX write, pushes, flushes) minus the event loop.  Reflect with 64- and
  1500-byte frames, and the ARP path.
* ``DriverRing add_out/get_used``: the general test driver
  (:class:`~shardswitch.frontend.vring.DriverRing`) against the device
  side; timed are only the driver calls.  This is why the frame benchmark
  uses the lean :mod:`bench.driver` instead.

Each reference runs for a given wall-clock duration and reports frames per
second of timed code (``time.perf_counter``).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

from shardswitch.frontend.memory import GuestRam
from shardswitch.frontend.vring import DriverRing
from shardswitch.ipc import Channel, RingStart, ToWorker, WorkerSetup
from shardswitch.net.params import GuestParams
from shardswitch.vhost.wire import VirtioFeature
from shardswitch.virtio.memory import GuestMemory
from shardswitch.virtio.virtqueue import Virtqueue
from shardswitch.worker.worker import Worker

from bench.driver import RecyclingRing
from bench.frames import (GATEWAY_IP, GUEST_IP, RX_BUF_LEN, Workload, arp_workload,
                          reflect_workload)

#: Features of the in-process rings (what QEMU negotiates with shardswitch).
FEATURES = int(VirtioFeature.VERSION_1 | VirtioFeature.EVENT_IDX | VirtioFeature.MRG_RXBUF
               | VirtioFeature.INDIRECT_DESC)
#: Ring size of the in-process references.
RING_SIZE = 256
#: Guest RAM of the in-process references.
RAM_SIZE = 16 << 20


@dataclass(slots=True)
class Reference:
    """One in-process rate."""

    name: str
    frame_size: int
    frames: int
    #: Seconds spent in the timed code.
    seconds: float

    @property
    def fps(self) -> float:
        """Frames per second of timed code."""
        return self.frames / self.seconds if self.seconds > 0 else 0.0

    @property
    def ns_per_frame(self) -> float:
        """Nanoseconds of timed code per frame."""
        return 1e9 * self.seconds / self.frames if self.frames else 0.0

    def as_dict(self) -> dict[str, object]:
        """Plain dict (for JSON), with the derived rates."""
        return dict(asdict(self), fps=self.fps, ns_per_frame=self.ns_per_frame)


@contextmanager
def _guest() -> Iterator[tuple[GuestRam, GuestMemory]]:
    """Guest RAM, and the same memory mapped again as a worker maps it."""
    ram = GuestRam(RAM_SIZE)
    mem = GuestMemory()
    try:
        for region in ram.regions:
            mem.add_region(region, os.dup(ram.fd))
        yield ram, mem
    finally:
        mem.clear()
        ram.close()


def _device_queue(mem: GuestMemory, ring: DriverRing) -> Virtqueue:
    """The device side of ``ring``, addressed by front-end virtual address."""
    return Virtqueue(mem, ring.num, ring.desc_vva, ring.avail_vva, ring.used_vva, 0,
                     event_idx=ring.event_idx, indirect=ring.indirect)


def _run_for(seconds: float, step: Callable[[], tuple[int, float]]) -> tuple[int, float]:
    """Call ``step`` until ``seconds`` of wall time passed; sum what it returns.

    ``step`` returns (frames done, seconds of timed code); set-up work it does
    outside its timed part is not counted.
    """
    deadline = time.perf_counter() + seconds
    frames = 0
    spent = 0.0
    while time.perf_counter() < deadline:
        done, timed = step()
        frames += done
        spent += timed
    return frames, spent


def virtqueue_pop_push(seconds: float, frame_size: int = 64) -> Reference:
    """Rate of Virtqueue pop + push (+ one flush per ring-full) on a full TX ring."""
    payload = reflect_workload(frame_size).tx_payload
    with _guest() as (ram, mem):
        ring = DriverRing(ram, RING_SIZE, event_idx=True, indirect=True)
        tx = RecyclingRing(ram, ring, len(payload), writable=False, payload=payload)
        vq = _device_queue(mem, ring)
        tx.fill()
        pop, push, flush = vq.pop, vq.push, vq.flush

        def step() -> tuple[int, float]:
            """Pop and push a ring-full, flush (timed); re-post it (not timed)."""
            done = 0
            start = time.perf_counter()
            chain = pop()
            while chain is not None:
                push(chain[0], 0)
                done += 1
                chain = pop()
            flush()
            elapsed = time.perf_counter() - start
            tx.post(tx.reap())
            return done, elapsed

        frames, spent = _run_for(seconds, step)
        tx.release()
        vq.release()
        ring.release()
    return Reference("virtqueue pop+push", frame_size, frames, spent)


def _start_slot(worker: Worker, mem: GuestMemory, ring: DriverRing, index: int) -> None:
    """Start one of ``worker``'s ring slots on ``ring`` like the coordinator would (no fds)."""
    slot = worker.rx if index % 2 == 0 else worker.tx
    slot.start(mem, RingStart(seq=0, index=index, num=ring.num, desc=ring.desc_vva, avail=ring.avail_vva,
                              used=ring.used_vva, last_avail=0, features=FEATURES, has_kick=False,
                              has_call=False), [])


def worker_service_tx(seconds: float, name: str, workload: Workload, frame_size: int,
                      reflect: bool) -> Reference:
    """Rate of the real worker packet path (service_tx) with a lean driver keeping it fed."""
    ours, theirs = socket.socketpair()
    params = GuestParams(address=GUEST_IP, prefix_len=24, gateway=GATEWAY_IP)
    worker = Worker(WorkerSetup(pair=0, params=params, reflect=reflect), Channel(ours, ToWorker))
    try:
        with _guest() as (ram, mem):
            worker.mem = mem                     # before any ring starts: the worker's only mapping
            rx_ring = DriverRing(ram, RING_SIZE, event_idx=True, indirect=True)
            tx_ring = DriverRing(ram, RING_SIZE, event_idx=True, indirect=True)
            rx = RecyclingRing(ram, rx_ring, RX_BUF_LEN, writable=True, expect_len=workload.rx_len)
            tx = RecyclingRing(ram, tx_ring, len(workload.tx_payload), writable=False,
                               payload=workload.tx_payload)
            _start_slot(worker, mem, rx_ring, 0)
            _start_slot(worker, mem, tx_ring, 1)
            rx.fill()
            tx.fill()

            def step() -> tuple[int, float]:
                """One service_tx call (timed), then the driver's refill (not timed)."""
                before = worker.counters.rx_frames
                start = time.perf_counter()
                worker.datapath.service_tx()
                elapsed = time.perf_counter() - start
                rx.post(rx.reap())
                tx.reap()
                tx.post(rx.posted - tx.posted)
                return worker.counters.rx_frames - before, elapsed

            frames, spent = _run_for(seconds, step)
            worker.rx.stop()
            worker.tx.stop()
            rx.release()
            tx.release()
            rx_ring.release()
            tx_ring.release()
    finally:
        worker.epoll.close()
        ours.close()
        theirs.close()
    return Reference(name, frame_size, frames, spent)


def driver_ring_api(seconds: float, frame_size: int = 64) -> Reference:
    """Rate of the general test driver: DriverRing.add_out + publish + get_used per frame."""
    frame = reflect_workload(frame_size).tx_payload
    with _guest() as (ram, mem):
        ring = DriverRing(ram, RING_SIZE, event_idx=True, indirect=True)
        vq = _device_queue(mem, ring)

        def step() -> tuple[int, float]:
            """Fill the ring through the driver API (timed), let the device use it, collect (timed)."""
            start = time.perf_counter()
            for _ in range(ring.free_count):
                ring.add_out(frame)
            ring.publish()
            elapsed = time.perf_counter() - start
            chain = vq.pop()
            while chain is not None:
                vq.push(chain[0], 0)
                chain = vq.pop()
            vq.flush()
            start = time.perf_counter()
            done = len(ring.get_used())
            return done, elapsed + time.perf_counter() - start

        frames, spent = _run_for(seconds, step)
        vq.release()
        ring.release()
    return Reference("DriverRing add_out/get_used", frame_size, frames, spent)


def run_references(seconds: float) -> list[Reference]:
    """Every in-process reference, ``seconds`` of wall time each."""
    return [
        virtqueue_pop_push(seconds),
        worker_service_tx(seconds, "worker service_tx, reflect", reflect_workload(64), 64, True),
        worker_service_tx(seconds, "worker service_tx, reflect", reflect_workload(1500), 1500, True),
        worker_service_tx(seconds, "worker service_tx, ARP", arp_workload(64), 64, False),
        driver_ring_api(seconds),
    ]
