"""The compiled ring helper behind :class:`~shardswitch.virtio.virtqueue.Virtqueue`'s interface.

Theory of operation
-------------------
:class:`FastVirtqueue` is a :class:`Virtqueue` whose hot calls (``pop``,
``pop_frame``, ``pop_writable``, ``unpop``, ``push``, ``push_run``, ``flush``,
``enable_kicks``, ``disable_kicks``, ``avail_pending``) run in
:mod:`shardswitch.virtio._vring`: the descriptor walk, the address
translation (through :attr:`GuestMemory.fast`, the compiled copy of the
region table) and the index arithmetic of each call happen in C, where the
reference spends a few interpreter lines per buffer.  Python code sees the
same results, the same memoryviews of guest memory and the same errors.

The indices live in the compiled object while it runs.  Dirty logging (a
live migration) is the reference's alone: :meth:`start_logging` copies the
indices into the Python attributes and every call runs the reference until
:meth:`stop_logging` copies them back.  Logging is on for the seconds of a
migration; it is not worth a second implementation.

:func:`make_virtqueue` picks the class: :class:`FastVirtqueue` when the
guest memory has a compiled table (see :mod:`~shardswitch.virtio.ringimpl`),
else the reference.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from shardswitch.virtio import ringimpl
from shardswitch.virtio.memory import GuestMemory
from shardswitch.virtio.virtqueue import Chain, Virtqueue, VirtqueueError

if TYPE_CHECKING:
    from shardswitch.virtio.dirtylog import DirtyLog


class FastVirtqueue(Virtqueue):
    """A :class:`Virtqueue` whose hot calls are compiled (the reference while dirty logging is on)."""

    __slots__ = ("_c",)

    def __init__(self, mem: GuestMemory, num: int, desc_vva: int, avail_vva: int, used_vva: int,
                 last_avail: int, *, event_idx: bool, indirect: bool = True) -> None:
        """As :class:`Virtqueue`; ``mem`` must have a compiled table (:attr:`GuestMemory.fast`)."""
        super().__init__(mem, num, desc_vva, avail_vva, used_vva, last_avail, event_idx=event_idx,
                         indirect=indirect)
        helper = ringimpl.compiled()
        if helper is None or mem.fast is None:
            raise VirtqueueError("the compiled ring helper is not in use")
        self._c = helper.Ring(mem.fast, self._dq, self._avail, self._used_h, num, last_avail, self._used,
                              event_idx, indirect, VirtqueueError)

    # -- logging: the reference takes over ------------------------------------------------

    def start_logging(self, log: DirtyLog, used_gpa: int) -> None:
        """Hand the indices to the reference, which logs (see :meth:`Virtqueue.start_logging`)."""
        if self._log is None:
            (self._last, self._shadow_avail, self._used, self._pending, self._inflight,
             self._signalled_valid) = self._c.position()
        super().start_logging(log, used_gpa)

    def stop_logging(self) -> None:
        """Take the indices back from the reference."""
        if self._log is not None:
            super().stop_logging()
            self._c.set_position(self._last, self._shadow_avail, self._used, self._pending, self._inflight,
                                 self._signalled_valid)

    # -- indices ------------------------------------------------------------------------

    @property
    def last_avail(self) -> int:
        """Next avail index to read (free-running u16): GET_VRING_BASE's answer."""
        if self._log is not None:
            return self._last
        return self._c.position()[0]

    @last_avail.setter
    def last_avail(self, value: int) -> None:
        """Reposition (see :attr:`Virtqueue.last_avail`)."""
        if not 0 <= value <= 0xFFFF:
            raise ValueError(f"avail index {value} is not a 16-bit value")
        if self._log is not None:
            Virtqueue.last_avail.fset(self, value)   # type: ignore[attr-defined]
            return
        _last, _shadow, used, pending, _inflight, signalled = self._c.position()
        self._c.set_position(value, value, used, pending, 0, signalled)

    def used_idx(self) -> int:
        """The used index we last published."""
        return self._used if self._log is not None else self._c.position()[2]

    def avail_pending(self) -> int:
        """Chains available and not popped."""
        return self._c.avail_pending() if self._log is None else super().avail_pending()

    # -- the hot calls ------------------------------------------------------------------

    def pop(self) -> Chain | None:
        """Take the next available chain, or None."""
        return self._c.pop() if self._log is None else super().pop()

    def pop_frame(self, skip: int, scratch: memoryview) -> tuple[int, memoryview, int] | None:
        """A chain's readable bytes after ``skip`` (see :meth:`Virtqueue.pop_frame`)."""
        if self._log is None:
            return self._c.pop_frame(skip, scratch)
        return super().pop_frame(skip, scratch)

    def pop_writable(self, need: int, limit: int, heads: list[int], bufs: list[list[memoryview]],
                     sizes: list[int]) -> int:
        """Pop chains for ``need`` writable bytes (see :meth:`Virtqueue.pop_writable`)."""
        if self._log is None:
            return self._c.pop_writable(need, limit, heads, bufs, sizes)
        return super().pop_writable(need, limit, heads, bufs, sizes)

    def unpop(self, count: int) -> None:
        """Give back the last ``count`` popped chains."""
        if self._log is None:
            self._c.unpop(count)
        else:
            super().unpop(count)

    def push(self, head: int, written: int) -> None:
        """Stage a used element."""
        if self._log is None:
            self._c.push(head, written)
        else:
            super().push(head, written)

    def push_run(self, heads: list[int], sizes: list[int], total: int) -> int:
        """Push a run of chains (see :meth:`Virtqueue.push_run`)."""
        if self._log is None:
            return self._c.push_run(heads, sizes, total)
        return super().push_run(heads, sizes, total)

    def flush(self) -> bool:
        """Publish staged used elements; True when the driver must be signalled."""
        return self._c.flush() if self._log is None else super().flush()

    def enable_kicks(self) -> bool:
        """Ask the guest for kicks; True when chains are already pending."""
        return self._c.enable_kicks() if self._log is None else super().enable_kicks()

    def disable_kicks(self) -> None:
        """Tell the guest kicks are not needed."""
        if self._log is None:
            self._c.disable_kicks()
        else:
            super().disable_kicks()

    def release(self) -> None:
        """Drop the compiled ring's exports, then the views."""
        self._c.release()
        super().release()


def make_virtqueue(mem: GuestMemory, num: int, desc_vva: int, avail_vva: int, used_vva: int, last_avail: int,
                   *, event_idx: bool, indirect: bool = True) -> Virtqueue:
    """A :class:`FastVirtqueue` when the compiled helper is in use, else the reference :class:`Virtqueue`."""
    cls = FastVirtqueue if mem.fast is not None else Virtqueue
    return cls(mem, num, desc_vva, avail_vva, used_vva, last_avail, event_idx=event_idx, indirect=indirect)
