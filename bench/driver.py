"""A lean, allocation-free driver loop for one queue pair, for the benchmarks.

Theory of operation
-------------------
:class:`~shardswitch.frontend.vring.DriverRing` is the test front-end's
general driver: every ``add_out`` copies the frame into a pooled buffer and
creates a chain record, every ``get_used`` validates, copies the written
bytes out and recycles.  That is right for tests, but it costs about as much
per frame as the worker's whole packet path (the ``DriverRing
add_out/get_used`` reference of :mod:`bench.primitives`: ~1.7 us per frame
against ~1.9 us for the worker), so the driver would be what the benchmark
measures.  The loop below needs a few percent of a CPU at 500,000 frames/s.

:class:`RecyclingRing` therefore takes over a ring that
:class:`~shardswitch.frontend.client.VhostUserFrontend` has negotiated and
started (same guest memory, same ring areas, same eventfds), sets up every
descriptor once and then only moves indices:

* descriptor ``i`` always points to buffer ``i`` (TX: header + frame written
  once at set-up; RX: a writable buffer), and avail slot ``i`` always holds
  head ``i``;
* the rings are kept full: when the device has used ``n`` chains, the driver
  publishes ``avail.idx += n`` (one store).  The worker completes chains in
  order, so the chain at avail index ``k`` comes back at used index ``k`` and
  is the one re-posted at avail index ``k + num``, whose slot already names
  it;
* every TX frame comes back as one RX frame (reflected, or answered), so the
  driver never makes more TX chains available in total than RX buffers
  (``tx.posted <= rx.posted``).  As the worker takes one TX chain and then
  one RX buffer per frame, it then always finds a buffer for the frame it
  took, and no frame is dropped for lack of buffers just because this
  driver was scheduled later than the worker;
* that in-order assumption, and the written length, are checked on the last
  element of every reaped batch (:class:`DriverError` otherwise), so a device
  that completed out of order or wrote the wrong size stops the benchmark
  instead of silently corrupting it.

Per reaped batch the driver does a handful of ring loads/stores; nothing is
allocated per frame and nothing is copied (the device writes RX frames into
the buffers, the driver never reads them except once, in :meth:`PairDriver.verify`).

Notifications follow virtio 1.x like the general driver (EVENT_IDX or the
flags), with :func:`shardswitch.virtio.barrier.fence` between a store and the
dependent load.  While the driver is busy it asks for no interrupts; when a
pass finds nothing to do it arms interrupts on both rings, re-checks, and
sleeps in ``poll`` on the two call eventfds (a NAPI-style driver: it neither
spins, which would steal the worker's CPU on a small machine, nor takes an
interrupt per frame).  The wait is bounded, so a late or lost notification
shows up as a counted time-out, not a hang; a time-out after which used
chains are found (the device published without interrupting) is counted
apart as ``unsignalled``.  Time-outs without it mean the worker did nothing
for a whole slice: on a busy machine, usually that it did not get a CPU.

:meth:`PairDriver.run` drives the pair until the last of a list of
monotonic-clock marks and takes a :class:`Sample` of its counters and CPU
time at each mark; the benchmark forks one process per pair and runs this
in each.
"""

from __future__ import annotations

import os
import select
import time
from dataclasses import asdict, dataclass

from shardswitch.frontend.client import VhostUserFrontend
from shardswitch.frontend.memory import GuestRam, GuestRamError
from shardswitch.frontend.vring import DESC, DriverRing
from shardswitch.virtio.barrier import fence
from shardswitch.virtio.virtqueue import AvailFlags, DescFlags, UsedFlags, vring_need_event

#: Longest single sleep waiting for an interrupt (seconds); passing it is counted as a time-out.
WAIT_SLICE = 0.02
#: Alignment of the driver's buffers (a cache line).
BUF_ALIGN = 64

_F_WRITE = int(DescFlags.WRITE)
_F_NO_INTERRUPT = int(AvailFlags.NO_INTERRUPT)
_F_NO_NOTIFY = int(UsedFlags.NO_NOTIFY)


class DriverError(Exception):
    """The benchmark driver could not be set up, or the device broke the ring protocol."""


def _align_up(value: int, align: int) -> int:
    """Round ``value`` up to a multiple of the power of two ``align``."""
    return (value + align - 1) & ~(align - 1)


class RecyclingRing:
    """One started vring whose fixed descriptors are re-posted in order as the device uses them."""

    __slots__ = ("num", "_mask", "_event_idx", "_avail", "_used16", "_used32", "_used_event_at",
                 "_avail_event_at", "_avail_idx", "_kick_old", "_last_used", "_expect_len",
                 "_buf_gpa", "_stride", "_ram", "_buf_len", "reclaimed", "posted")

    def __init__(self, ram: GuestRam, ring: DriverRing, buf_len: int, *, writable: bool,
                 payload: bytes = b"", expect_len: int = 0) -> None:
        """Take over ``ring`` (started, nothing in flight) with ``num`` buffers of ``buf_len`` bytes.

        TX rings (``writable`` False) get ``payload`` (header + frame,
        ``buf_len`` bytes) copied into every buffer once.  ``expect_len`` is
        the length the device must report in used elements (0 for TX).
        Nothing is published yet: call :meth:`fill`.
        """
        if ring.in_flight or ring.avail_idx != ring.last_used:
            raise DriverError("the ring must be idle before the benchmark driver takes it over")
        if not writable and len(payload) != buf_len:
            raise DriverError(f"TX payload of {len(payload)} bytes for {buf_len}-byte buffers")
        num = ring.num
        self.num = num
        self._mask = num - 1
        self._event_idx = ring.event_idx
        self._ram = ram
        self._buf_len = buf_len
        try:
            self._avail = ram.view(ring.avail_gpa, 6 + 2 * num).cast("H")
            used = ram.view(ring.used_gpa, 6 + 8 * num)
            desc = ram.view(ring.desc_gpa, 16 * num)
            self._stride = _align_up(buf_len, BUF_ALIGN)
            self._buf_gpa = ram.alloc(self._stride * num, BUF_ALIGN)
        except GuestRamError as exc:
            raise DriverError(f"cannot set up a ring of {num} buffers of {buf_len} bytes: {exc}") from exc
        self._used16 = used.cast("H")
        self._used32 = used[4:4 + 8 * num].cast("I")
        self._used_event_at = 2 + num       # in avail, u16 units
        self._avail_event_at = 2 + 4 * num  # in used, u16 units
        flags = _F_WRITE if writable else 0
        for i in range(num):
            gpa = self._buf_gpa + i * self._stride
            DESC.pack_into(desc, 16 * i, gpa, buf_len, flags, 0)
            if payload:
                ram.write(gpa, payload)
            self._avail[2 + i] = i
        desc.release()
        base = ring.avail_idx
        if base & self._mask:
            raise DriverError(f"ring base {base} is not a multiple of the ring size {num}")
        self._avail_idx = base
        self._kick_old = base
        self._last_used = base
        self._expect_len = expect_len
        #: Chains back from the device and not re-posted yet (all of them before fill()).
        self.reclaimed = num
        #: Chains made available so far (free-running count).
        self.posted = 0
        self.suppress()

    def fill(self) -> None:
        """Make every descriptor available."""
        self.post(self.num)

    def reap(self) -> int:
        """Take back the chains the device used since the last call; return how many.

        They become :attr:`reclaimed`, to be re-posted with :meth:`post`.
        """
        used_idx = self._used16[1]
        count = (used_idx - self._last_used) & 0xFFFF
        if not count:
            return 0
        if count > self.num - self.reclaimed:
            raise DriverError(f"device advanced used.idx by {count} with "
                              f"{self.num - self.reclaimed} chains in flight")
        slot = 2 * ((used_idx - 1) & self._mask)
        head, length = self._used32[slot], self._used32[slot + 1]
        if head != (used_idx - 1) & self._mask:
            raise DriverError(f"used element {(used_idx - 1) & 0xFFFF} names head {head}: "
                              "the device completed chains out of order")
        if length != self._expect_len:
            raise DriverError(f"used element for head {head} reports {length} bytes, "
                              f"expected {self._expect_len}")
        self._last_used = used_idx
        if self._event_idx:
            self._avail[self._used_event_at] = (used_idx - 1) & 0xFFFF   # keep interrupts off
        self.reclaimed += count
        return count

    def post(self, limit: int) -> int:
        """Re-post up to ``limit`` reclaimed chains (oldest first, one avail.idx store); return how many."""
        count = min(limit, self.reclaimed)
        if count > 0:
            new = (self._avail_idx + count) & 0xFFFF
            self._avail[1] = new
            self._avail_idx = new
            self.reclaimed -= count
            self.posted += count
        return count

    def has_used(self) -> bool:
        """Whether the device used chains not reaped yet."""
        return self._used16[1] != self._last_used

    def kick_needed(self) -> bool:
        """Whether the device asked to be kicked for what was published since the last call."""
        fence()
        new, old = self._avail_idx, self._kick_old
        self._kick_old = new
        if new == old:
            return False
        if self._event_idx:
            return vring_need_event(self._used16[self._avail_event_at], new, old)
        return not self._used16[0] & _F_NO_NOTIFY

    def arm(self) -> bool:
        """Ask for an interrupt at the next used chain; True when one is already there."""
        if self._event_idx:
            self._avail[self._used_event_at] = self._last_used
        else:
            self._avail[0] = 0
        fence()
        return self.has_used()

    def suppress(self) -> None:
        """Ask the device for no interrupts."""
        if self._event_idx:
            self._avail[self._used_event_at] = (self._last_used - 1) & 0xFFFF
        else:
            self._avail[0] = _F_NO_INTERRUPT

    def last_buffer(self, length: int) -> bytes:
        """A copy of the first ``length`` bytes of the buffer of the last used chain."""
        head = (self._last_used - 1) & self._mask
        return self._ram.read(self._buf_gpa + head * self._stride, min(length, self._buf_len))

    def release(self) -> None:
        """Drop the views of guest memory."""
        for view in (self._avail, self._used16, self._used32):
            view.release()


@dataclass(slots=True)
class Sample:
    """A driver's counters at one mark."""

    #: time.monotonic() when taken.
    time: float
    #: CPU seconds (user + system) the driver process used so far.
    cpu: float
    #: Frames received on the RX ring.
    rx_frames: int
    #: TX chains the device completed.
    tx_frames: int
    #: Kicks written to the TX and RX kick eventfds.
    kicks: int
    #: Times the driver went to sleep waiting for an interrupt.
    waits: int
    #: Sleeps that ended without an interrupt (WAIT_SLICE passed).
    timeouts: int
    #: Time-outs after which used chains were found: the device published without interrupting.
    unsignalled: int

    def as_dict(self) -> dict[str, float]:
        """Plain dict (for JSON)."""
        return asdict(self)


def _process_cpu() -> float:
    """CPU seconds (user + system) of this process."""
    times = os.times()
    return times.user + times.system


def _drain(fd: int) -> None:
    """Reset an eventfd counter without blocking."""
    try:
        os.eventfd_read(fd)
    except BlockingIOError:
        pass


class PairDriver:
    """Drives one queue pair: TX ring kept full of one frame, RX ring kept full of empty buffers."""

    def __init__(self, fe: VhostUserFrontend, pair: int, tx_payload: bytes, rx_buf_len: int,
                 rx_expect_len: int) -> None:
        """Take over both rings of ``pair`` of a front-end after its handshake.

        ``tx_payload`` is virtio-net header + frame; every RX used element
        must report ``rx_expect_len`` bytes.  All guest memory is allocated
        here, so the object can be used in a forked child.
        """
        self.pair = pair
        self.rx = RecyclingRing(fe.ram, fe.ring(2 * pair), rx_buf_len, writable=True,
                                expect_len=rx_expect_len)
        self.tx = RecyclingRing(fe.ram, fe.ring(2 * pair + 1), len(tx_payload), writable=False,
                                payload=tx_payload)
        self.rx_kick, self.rx_call = fe.kick_fd(2 * pair), fe.call_fd(2 * pair)
        self.tx_kick, self.tx_call = fe.kick_fd(2 * pair + 1), fe.call_fd(2 * pair + 1)
        self.rx_frames = 0
        self.tx_frames = 0
        self.kicks = 0
        self.waits = 0
        self.timeouts = 0
        self.unsignalled = 0

    def _sample(self) -> Sample:
        """The counters now."""
        return Sample(time.monotonic(), _process_cpu(), self.rx_frames, self.tx_frames, self.kicks,
                      self.waits, self.timeouts, self.unsignalled)

    def _kick(self, ring: RecyclingRing, fd: int) -> None:
        """Kick ``ring`` if the device asked for it."""
        if ring.kick_needed():
            os.eventfd_write(fd, 1)
            self.kicks += 1

    def run(self, marks: list[float]) -> list[Sample]:
        """Fill both rings and drive them until ``marks[-1]``; one sample at (just after) each mark."""
        rx, tx = self.rx, self.tx
        rx.fill()
        self._kick(rx, self.rx_kick)
        tx.fill()
        self._kick(tx, self.tx_kick)
        poller = select.poll()
        poller.register(self.rx_call, select.POLLIN)
        poller.register(self.tx_call, select.POLLIN)
        monotonic = time.monotonic
        samples: list[Sample] = []
        pending = list(marks)
        while pending:
            got_rx = rx.reap()
            if got_rx:
                self.rx_frames += got_rx
                rx.post(got_rx)
                self._kick(rx, self.rx_kick)
            got_tx = tx.reap()
            if got_tx:
                self.tx_frames += got_tx
            # Never offer more TX chains than RX buffers: each one comes back as an RX frame.
            if tx.reclaimed and tx.post(rx.posted - tx.posted):
                self._kick(tx, self.tx_kick)
            now = monotonic()
            if now >= pending[0]:
                samples.append(self._sample())
                del pending[0]
                continue
            if got_rx or got_tx:
                continue
            self._wait(poller, min(WAIT_SLICE, pending[0] - now))
        rx.suppress()
        tx.suppress()
        return samples

    def _wait(self, poller: select.poll, timeout: float) -> None:
        """Arm interrupts, re-check, and sleep up to ``timeout`` seconds for one."""
        self.waits += 1
        if not (self.rx.arm() | self.tx.arm()):
            if poller.poll(max(timeout, 0.0) * 1000):
                _drain(self.rx_call)
                _drain(self.tx_call)
            elif timeout >= WAIT_SLICE:
                self.timeouts += 1
                if self.rx.has_used() or self.tx.has_used():
                    self.unsignalled += 1     # the device used chains but did not interrupt
        self.rx.suppress()
        self.tx.suppress()

    def verify(self, expected: bytes) -> bool:
        """Whether the last RX buffer the device used starts with ``expected``."""
        return self.rx.last_buffer(len(expected)) == expected

    def release(self) -> None:
        """Drop the rings' views of guest memory."""
        self.rx.release()
        self.tx.release()
