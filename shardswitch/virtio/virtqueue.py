"""Device side of a virtio split virtqueue, over guest memory mapped in this process.

Theory of operation
-------------------
A split virtqueue of ``num`` entries (a power of two) is three areas in guest
memory, located by the front-end's virtual addresses from SET_VRING_ADDR::

    descriptor table  num x {u64 addr, u32 len, u16 flags, u16 next}   (align 16)
    avail ring        u16 flags, u16 idx, u16 ring[num], u16 used_event (align 2)
    used ring         u16 flags, u16 idx, {u32 id, u32 len}[num],
                      u16 avail_event                                   (align 4)

The driver (guest) writes descriptors, puts the head index of each chain in
``avail.ring[idx % num]`` and then increments ``avail.idx``.  The device (us)
remembers ``last_avail``, the next avail index it will read; every index is a
free-running u16 and slots are taken modulo ``num``.  A chain is a list of
descriptors linked by ``next`` while ``flags & NEXT``; device-readable buffers
come first, device-writable ones (``flags & WRITE``) after.  With
VIRTIO_RING_F_INDIRECT_DESC, a descriptor with ``flags & INDIRECT`` points to a
table of ``len / 16`` descriptors holding (the rest of) the chain; such a
descriptor ends the main chain and an indirect table must not contain another
INDIRECT descriptor.  When the device is done with a chain it writes ``{head,
bytes written}`` into ``used.ring[used_idx % num]`` and then increments
``used.idx``.

How this class maps to that:

* :meth:`Virtqueue.pop` returns the next chain as ``(head, readable, writable)``
  where the buffers are ``memoryview`` slices of guest memory (zero copy).
  A single descriptor without NEXT/INDIRECT takes a short fast path.
* :meth:`Virtqueue.push` stages a used element (not yet visible to the
  guest); :meth:`Virtqueue.flush` publishes the batch with one ``used.idx``
  store and says whether the guest wants an interrupt.
* Batches for receive buffers: :meth:`Virtqueue.pop_writable` pops as many
  chains as a frame needs in one call (a Linux guest posts page-sized RX
  buffers, so a 64 KiB frame takes about sixteen), and
  :meth:`Virtqueue.push_run` pushes a run of them with the bytes each
  received.  Same checks and results as the one-chain calls, which they
  equal element for element (the tests compare them).
* :meth:`Virtqueue.enable_kicks` / :meth:`Virtqueue.disable_kicks` control
  guest->device notifications.  The worker loop is: disable, drain with
  ``pop``, then ``enable_kicks()`` and drain again if it returns True: that
  re-check closes the race with buffers added between the drain and the
  enable.

Notifications.  Without EVENT_IDX the guest suppresses interrupts with
``avail.flags & 1`` and we suppress kicks with ``used.flags = 1``.  With
EVENT_IDX the flags are ignored: the guest wants an interrupt when ``used.idx``
moves past ``used_event``, i.e. ``vring_need_event(used_event, new, old)`` =
``(u16)(new - used_event - 1) < (u16)(new - old)``, and we ask for a kick when
``avail.idx`` passes ``avail_event`` by writing ``avail_event = last_avail``.
The first flush after the queue starts always asks for an interrupt (as
Linux vhost and libvhost-user do): whatever a previous back-end published
without signalling is then delivered too.

Memory ordering (x86-64).  Loads are not reordered with loads, nor stores with
stores, so "read avail.idx, then the ring and descriptors" and "write used
elements, then used.idx" are safe as written.  A store followed by a load of
another location is not ordered: :func:`~shardswitch.virtio.barrier.fence`
separates "publish used.idx" from "read used_event / avail.flags" and "write
avail_event / used.flags" from "re-read avail.idx".

Validation.  Everything read from the guest is checked before use: ``avail.idx``
may not run more than ``num`` ahead of ``last_avail``, heads and ``next``
indices must be below the table size, a chain may visit at most ``num``
descriptors of the main table (and at most the table's length inside an
indirect table), so a loop ends in an error instead of a hang; every buffer
must lie inside one guest memory region.  Any violation raises
:class:`VirtqueueError` without advancing ``last_avail``; the queue is then
broken and the caller should stop it (the guest driver resets the device).

Dirty logging (live migration).  Between :meth:`Virtqueue.start_logging` and
:meth:`Virtqueue.stop_logging` every page the queue writes is marked in a
:class:`~shardswitch.virtio.dirtylog.DirtyLog`: :meth:`pop` also records the
guest-physical address of each writable descriptor (every chain then takes
the walking path), :meth:`push` stages ``(head, written)``, and
:meth:`flush` marks the first ``written`` bytes of that chain's buffers and
the used ring; kick requests mark the used ring too.  With logging off the
cost is one attribute test per pop, push and flush.

Lifetime.  The ring areas are ``memoryview.cast`` views built once in the
constructor.  :meth:`Virtqueue.release` drops them: call it (and drop any
popped chains) before the guest memory is unmapped.
"""

from __future__ import annotations

from enum import IntFlag
from typing import TYPE_CHECKING

from shardswitch.virtio.barrier import fence
from shardswitch.virtio.memory import GuestMemory, GuestMemoryError

if TYPE_CHECKING:
    from shardswitch.virtio.dirtylog import DirtyLog


class VirtqueueError(Exception):
    """The driver broke the queue (bad index, loop, buffer outside memory, ...)."""


class DescFlags(IntFlag):
    """Split-ring descriptor flags."""

    NEXT = 1
    WRITE = 2
    INDIRECT = 4


class AvailFlags(IntFlag):
    """``avail.flags`` bits (ignored once EVENT_IDX is negotiated)."""

    NO_INTERRUPT = 1         # the driver does not want interrupts


class UsedFlags(IntFlag):
    """``used.flags`` bits (ignored once EVENT_IDX is negotiated)."""

    NO_NOTIFY = 1            # the device does not want kicks


#: (head id, device-readable buffers, device-writable buffers)
Chain = tuple[int, list[memoryview], list[memoryview]]

MAX_QUEUE_SIZE = 32768
DESC_SIZE = 16
#: Largest indirect table accepted, in descriptors.
MAX_INDIRECT = MAX_QUEUE_SIZE

_NEXT = int(DescFlags.NEXT)
_WRITE = int(DescFlags.WRITE)
_INDIRECT = int(DescFlags.INDIRECT)
_NEXT_OR_INDIRECT = _NEXT | _INDIRECT
_AVAIL_NO_INTERRUPT = int(AvailFlags.NO_INTERRUPT)
_EMPTY = memoryview(b"")
_USED_NO_NOTIFY = int(UsedFlags.NO_NOTIFY)


def vring_need_event(event: int, new: int, old: int) -> bool:
    """True when moving an index from ``old`` to ``new`` crosses ``event`` (u16 arithmetic)."""
    return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)


#: Size of the scratch buffer :func:`gather` copies a chain of several buffers into: the largest IP
#: packet (IPv6: 40 + 65535 bytes) behind an Ethernet header with a VLAN tag.  Bytes past it are cut; no
#: packet reaches them, and a guest cannot make us copy more per chain.
GATHER_MAX = 14 + 4 + 40 + 0xFFFF


def gather(readable: list[memoryview], skip: int, scratch: memoryview) -> memoryview:
    """The readable bytes of a chain after its first ``skip`` bytes (a virtio-net header).

    Zero copy when they lie in one buffer (after the skipped bytes in the
    same buffer, or alone in a later one); otherwise copied into ``scratch``
    (the caller's, :data:`GATHER_MAX` bytes), at most its size, and a view of
    its start returned.  A chain shorter than ``skip`` yields an empty view.
    """
    if len(readable) == 1:
        buf = readable[0]
        return buf[skip:] if len(buf) >= skip else _EMPTY
    pieces: list[memoryview] = []
    for buf in readable:
        size = len(buf)
        if skip >= size:
            skip -= size
        elif skip:
            pieces.append(buf[skip:])
            skip = 0
        else:
            pieces.append(buf)
    if skip or not pieces:
        return _EMPTY
    if len(pieces) == 1:
        return pieces[0]
    used = 0
    for piece in pieces:
        count = min(len(piece), len(scratch) - used)
        scratch[used:used + count] = piece[:count]
        used += count
    return scratch[:used]


def first_byte(readable: list[memoryview]) -> int:
    """The first byte of a chain's readable bytes (a virtio-net header's flags), 0 when it has none."""
    for buf in readable:
        if len(buf):
            return int(buf[0])
    return 0


def _area(mem: GuestMemory, what: str, addr: int, size: int, align: int) -> memoryview:
    """Translate one ring area, checking alignment and that it lies in guest memory."""
    if addr % align:
        raise VirtqueueError(f"{what} address {addr:#x} is not {align}-byte aligned")
    try:
        return mem.vva(addr, size)
    except GuestMemoryError as exc:
        raise VirtqueueError(f"{what} area {addr:#x}+{size:#x} is outside guest memory") from exc


class Virtqueue:
    """One split virtqueue, driven from the device side."""

    __slots__ = ("_gpa", "num", "_mask", "event_idx", "indirect", "_dq", "_di", "_dh", "_avail",
                 "_used_h", "_used_i", "_used_event_at", "_avail_event_at", "_last", "_shadow_avail",
                 "_used", "_pending", "_inflight", "_signalled_valid", "_log", "_used_gpa", "_log_chains",
                 "_log_pushed")

    def __init__(self, mem: GuestMemory, num: int, desc_vva: int, avail_vva: int, used_vva: int,
                 last_avail: int, *, event_idx: bool, indirect: bool = True) -> None:
        """Check the ring geometry and build the cast views over its three areas.

        ``last_avail`` is the SET_VRING_BASE value; the used index is read back
        from the used ring (the guest zeroes it at start; after a reconnect it
        holds what the previous back-end published).
        """
        if not 1 <= num <= MAX_QUEUE_SIZE or num & (num - 1):
            raise VirtqueueError(f"queue size {num} is not a power of two in 1..{MAX_QUEUE_SIZE}")
        if not 0 <= last_avail <= 0xFFFF:
            raise VirtqueueError(f"ring base {last_avail} is not a 16-bit index")
        self._gpa = mem.gpa
        self.num = num
        self._mask = num - 1
        self.event_idx = event_idx
        self.indirect = indirect
        desc = _area(mem, "descriptor table", desc_vva, DESC_SIZE * num, 16)
        avail = _area(mem, "avail ring", avail_vva, 6 + 2 * num, 2)
        used = _area(mem, "used ring", used_vva, 6 + 8 * num, 4)
        # Descriptor i: addr = _dq[2i], len = _di[4i+2], flags = _dh[8i+6], next = _dh[8i+7].
        self._dq = desc.cast("Q")
        self._di = desc.cast("I")
        self._dh = desc.cast("H")
        # avail: flags [0], idx [1], ring [2 + slot], used_event [2 + num].
        self._avail = avail.cast("H")
        # used: flags [0], idx [1], avail_event [2 + 4 num] as u16; element slot s
        # is id = _used_i[1 + 2s], len = _used_i[2 + 2s] as u32.
        self._used_h = used.cast("H")
        self._used_i = used[:4 + 8 * num].cast("I")
        self._used_event_at = 2 + num
        self._avail_event_at = 2 + 4 * num
        self._last = last_avail             # next avail index to read (free-running u16)
        self._shadow_avail = last_avail     # last avail.idx read from the guest
        self._used = int(self._used_h[1])   # used.idx as last published by us
        self._pending = 0                   # elements pushed but not yet published
        self._inflight = 0                  # chains popped and neither pushed nor unpopped
        self._signalled_valid = False       # first flush always asks for an interrupt
        self._log: DirtyLog | None = None   # the dirty-page log while migration logging is on
        self._used_gpa = 0                  # the used ring's guest-physical address (log_guest_addr)
        self._log_chains: dict[int, list[tuple[int, int]]] = {}   # head -> writable (gpa, len), in flight
        self._log_pushed: list[tuple[int, int]] = []              # (head, written) staged for the log

    # ------------------------------------------------------------------ logging

    def start_logging(self, log: DirtyLog, used_gpa: int) -> None:
        """Mark in ``log`` every page this queue writes from now on (buffers of chains popped from now on,
        and the used ring at guest-physical ``used_gpa``), until :meth:`stop_logging`."""
        self._log = log
        self._used_gpa = used_gpa
        self._log_chains.clear()
        self._log_pushed.clear()
        log.mark(used_gpa, 6 + 8 * self.num)

    def stop_logging(self) -> None:
        """Stop marking pages."""
        self._log = None
        self._log_chains.clear()
        self._log_pushed.clear()

    def _log_flush(self, log: DirtyLog) -> None:
        """Mark the buffer bytes written to each staged chain, and the used ring."""
        chains = self._log_chains
        for head, written in self._log_pushed:
            for addr, length in chains.pop(head, ()):
                if written <= 0:
                    break
                log.mark(addr, min(length, written))
                written -= length
        self._log_pushed.clear()
        log.mark(self._used_gpa, 6 + 8 * self.num)

    # ------------------------------------------------------------------ indices

    @property
    def last_avail(self) -> int:
        """Next avail index to read (free-running u16): GET_VRING_BASE's answer."""
        return self._last

    @last_avail.setter
    def last_avail(self, value: int) -> None:
        """Reposition (e.g. to the used index on resume); avail.idx is re-read on the next pop."""
        if not 0 <= value <= 0xFFFF:
            raise ValueError(f"avail index {value} is not a 16-bit value")
        self._last = value
        self._shadow_avail = value
        self._inflight = 0

    def used_idx(self) -> int:
        """The used index we last published."""
        return self._used

    def avail_pending(self) -> int:
        """Number of chains the guest has made available and we have not popped."""
        idx = self._avail[1]
        pending = (idx - self._last) & 0xFFFF
        if pending > self.num:
            raise VirtqueueError(f"avail idx {idx} is more than {self.num} ahead of {self._last}")
        self._shadow_avail = idx
        return pending

    # ---------------------------------------------------------------- consuming

    def pop(self) -> Chain | None:
        """Take the next available chain, or return None when there is none."""
        last = self._last
        if last == self._shadow_avail and self.avail_pending() == 0:
            return None
        head = self._avail[2 + (last & self._mask)]
        if head >= self.num:
            raise VirtqueueError(f"avail ring slot {last & self._mask} holds head {head} >= {self.num}")
        flags = self._dh[8 * head + 6]
        if self._log is not None:
            gpas: list[tuple[int, int]] = []
            chain = self._walk(head, gpas)
            self._log_chains[head] = gpas
        elif flags & _NEXT_OR_INDIRECT:
            chain = self._walk(head)
        else:
            try:
                buf = self._gpa(self._dq[2 * head], self._di[4 * head + 2])
            except GuestMemoryError as exc:
                raise VirtqueueError(f"descriptor {head}: {exc}") from exc
            chain = (head, [], [buf]) if flags & _WRITE else (head, [buf], [])
        self._last = (last + 1) & 0xFFFF
        self._inflight += 1
        return chain

    def pop_frame(self, skip: int, scratch: memoryview) -> tuple[int, memoryview, int] | None:
        """Take the next chain as ``(head, bytes, first)``: its readable bytes after ``skip`` (see
        :func:`gather`, into ``scratch`` when they are in several buffers) and their first byte (see
        :func:`first_byte`); None when there is none.  A TX ring's frames, in one call.

        The bytes are a view of guest memory or of ``scratch``: valid until the
        chain is pushed or the next call, whichever comes first.
        """
        chain = self.pop()
        if chain is None:
            return None
        head, readable, _writable = chain
        return head, gather(readable, skip, scratch), first_byte(readable)

    def pop_writable(self, need: int, limit: int, heads: list[int], bufs: list[list[memoryview]],
                     sizes: list[int]) -> int:
        """Pop chains until their device-writable bytes reach ``need``, ``limit`` chains are taken or the
        ring is empty, appending each chain's head, writable buffers and their total size; returns the
        bytes taken.

        What repeated :meth:`pop` calls would take, with the same checks.  A
        chain without a writable buffer, or any error of :meth:`pop`, raises
        :class:`VirtqueueError` having taken nothing in this call (the lists
        are as they were).
        """
        start = len(heads)
        last = self._last
        pending = (self._shadow_avail - last) & 0xFFFF
        got = 0
        taken = 0
        avail, mask, num = self._avail, self._mask, self.num
        dq, di, dh = self._dq, self._di, self._dh
        gpa = self._gpa
        logging = self._log is not None
        try:
            while got < need and taken < limit:
                if not pending:
                    idx = avail[1]
                    pending = (idx - last) & 0xFFFF
                    if pending > num:
                        raise VirtqueueError(f"avail idx {idx} is more than {num} ahead of {last}")
                    self._shadow_avail = idx
                    if not pending:
                        break
                head = avail[2 + (last & mask)]
                if head >= num:
                    raise VirtqueueError(f"avail ring slot {last & mask} holds head {head} >= {num}")
                flags = dh[8 * head + 6]
                if logging or flags & _NEXT_OR_INDIRECT:
                    gpas: list[tuple[int, int]] | None = [] if logging else None
                    writable = self._walk(head, gpas)[2]
                    if not writable:
                        raise VirtqueueError(f"RX chain {head} has no device-writable buffer")
                    if gpas is not None:
                        self._log_chains[head] = gpas
                    size = 0
                    for buf in writable:
                        size += len(buf)
                else:
                    if not flags & _WRITE:
                        raise VirtqueueError(f"RX chain {head} has no device-writable buffer")
                    try:
                        buf = gpa(dq[2 * head], di[4 * head + 2])
                    except GuestMemoryError as exc:
                        raise VirtqueueError(f"descriptor {head}: {exc}") from exc
                    writable = [buf]
                    size = len(buf)
                heads.append(head)
                bufs.append(writable)
                sizes.append(size)
                got += size
                taken += 1
                pending -= 1
                last = (last + 1) & 0xFFFF
        except VirtqueueError:
            del heads[start:], bufs[start:], sizes[start:]
            raise
        self._last = last
        self._inflight += taken
        return got

    def _walk(self, head: int, gpas: list[tuple[int, int]] | None = None) -> Chain:
        """Follow a chain with NEXT and/or INDIRECT descriptors from ``head``; with ``gpas``, also collect
        the guest-physical address and length of each writable descriptor (for the dirty log)."""
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        gpa = self._gpa
        dq, di, dh = self._dq, self._di, self._dh
        size = self.num            # entries in the table being walked
        in_indirect = False
        i = head
        visited = 0
        while True:
            flags = dh[8 * i + 6]
            if flags & _INDIRECT:
                if in_indirect:
                    raise VirtqueueError(f"chain {head}: indirect descriptor inside an indirect table")
                if not self.indirect:
                    raise VirtqueueError(f"chain {head}: indirect descriptor without INDIRECT_DESC")
                if flags & _NEXT:
                    raise VirtqueueError(f"chain {head}: indirect descriptor {i} also has NEXT")
                dq, di, dh, size = self._indirect_table(head, dq[2 * i], di[4 * i + 2])
                in_indirect = True
                i = 0
                visited = 0
                continue
            try:
                buf = gpa(dq[2 * i], di[4 * i + 2])
            except GuestMemoryError as exc:
                raise VirtqueueError(f"chain {head}, descriptor {i}: {exc}") from exc
            if flags & _WRITE:
                writable.append(buf)
                if gpas is not None:
                    gpas.append((dq[2 * i], di[4 * i + 2]))
            elif writable:
                raise VirtqueueError(f"chain {head}: readable descriptor {i} after a writable one")
            else:
                readable.append(buf)
            if not flags & _NEXT:
                return head, readable, writable
            i = dh[8 * i + 7]
            visited += 1
            if i >= size:
                raise VirtqueueError(f"chain {head}: next index {i} >= table size {size}")
            if visited >= size:
                raise VirtqueueError(f"chain {head}: more than {size} descriptors (loop?)")

    def _indirect_table(self, head: int, addr: int, length: int) -> tuple[memoryview, memoryview,
                                                                          memoryview, int]:
        """Validate and map an indirect descriptor table; return its cast views and size."""
        if length == 0 or length % DESC_SIZE or length > MAX_INDIRECT * DESC_SIZE:
            raise VirtqueueError(f"chain {head}: indirect table length {length} is invalid")
        try:
            table = self._gpa(addr, length)
        except GuestMemoryError as exc:
            raise VirtqueueError(f"chain {head}: indirect table: {exc}") from exc
        return table.cast("Q"), table.cast("I"), table.cast("H"), length // DESC_SIZE

    def unpop(self, count: int) -> None:
        """Give back the last ``count`` popped chains (not pushed) to be popped again."""
        if not 0 <= count <= self._inflight:
            raise ValueError(f"cannot unpop {count} chains, {self._inflight} in flight")
        self._last = (self._last - count) & 0xFFFF
        self._inflight -= count

    # ---------------------------------------------------------------- returning

    def push(self, head: int, written: int) -> None:
        """Stage a used element for chain ``head`` with ``written`` bytes (visible at flush)."""
        pending = self._pending
        if pending >= self.num or not 0 <= head < self.num:
            raise ValueError(f"push of head {head} with {pending} pending on a queue of {self.num}")
        slot = 2 * ((self._used + pending) & self._mask)
        used_i = self._used_i
        used_i[slot + 1] = head
        used_i[slot + 2] = written
        self._pending = pending + 1
        if self._inflight:
            self._inflight -= 1
        if self._log is not None:
            self._log_pushed.append((head, written))

    def push_run(self, heads: list[int], sizes: list[int], total: int) -> int:
        """Push chains ``heads`` in order, each with its size in ``sizes`` or what is left of ``total``
        bytes, until ``total`` is used up; returns how many were pushed (the rest are the caller's to
        give back).  What repeated :meth:`push` calls would stage."""
        num, mask, used_i = self.num, self._mask, self._used_i
        base = self._used
        pending = self._pending
        log = self._log_pushed if self._log is not None else None
        used = 0
        try:
            for head, size in zip(heads, sizes):
                if total <= 0:
                    break
                if pending >= num or not 0 <= head < num:
                    raise ValueError(f"push of head {head} with {pending} pending on a queue of {num}")
                count = size if size < total else total
                slot = 2 * ((base + pending) & mask)
                used_i[slot + 1] = head
                used_i[slot + 2] = count
                pending += 1
                if log is not None:
                    log.append((head, count))
                total -= count
                used += 1
        finally:
            self._pending = pending
            self._inflight = self._inflight - used if self._inflight > used else 0
        return used

    def flush(self) -> bool:
        """Publish staged used elements; True when the caller must signal the call eventfd."""
        pending = self._pending
        if not pending:
            return False
        old = self._used
        new = (old + pending) & 0xFFFF
        self._used_h[1] = new          # after the elements: stores are ordered on x86-64
        self._used = new
        self._pending = 0
        if self._log is not None:
            self._log_flush(self._log)
        fence()                        # publish used.idx before reading used_event / flags
        if not self._signalled_valid:
            self._signalled_valid = True
            return True
        if self.event_idx:
            return vring_need_event(self._avail[self._used_event_at], new, old)
        return not self._avail[0] & _AVAIL_NO_INTERRUPT

    # ------------------------------------------------------------ notifications

    def enable_kicks(self) -> bool:
        """Ask the guest for kicks; True when chains are already pending (drain again)."""
        if self.event_idx:
            # The guest's last published index, not our position: when chains were handed back
            # (RX buffers too few for a frame), the guest has already published past _last and
            # would never cross an avail_event set there, so it would never kick again (Linux
            # vhost writes vq->avail_idx for the same reason).
            self._used_h[self._avail_event_at] = self._shadow_avail
        else:
            self._used_h[0] = 0
        if self._log is not None:
            self._log.mark(self._used_gpa, 6 + 8 * self.num)
        fence()                        # the request must be visible before re-reading avail.idx
        return self.avail_pending() != 0

    def disable_kicks(self) -> None:
        """Tell the guest kicks are not needed (a hint; EVENT_IDX needs nothing)."""
        if not self.event_idx:
            self._used_h[0] = _USED_NO_NOTIFY
            if self._log is not None:
                self._log.mark(self._used_gpa, 6)

    def release(self) -> None:
        """Drop every view of guest memory so that it can be unmapped; the queue is unusable after."""
        for view in (self._dq, self._di, self._dh, self._avail, self._used_h, self._used_i):
            view.release()
