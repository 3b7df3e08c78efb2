"""The virtio-net device as the coordinator models it.

Third of the three vhost-user layers (wire format in
``shardswitch.vhost.wire``, request dispatch in ``handler``): this module
keeps the device state the front-end sets up - features, memory regions and
the 2N vrings - validates it, and turns it into work for the worker
processes.

Ring life cycle: a vring collects its size (SET_VRING_NUM), base
(SET_VRING_BASE), addresses (SET_VRING_ADDR) and kick descriptor
(SET_VRING_KICK) in any order; it *starts* once all of these are known, guest
memory is mapped and the ring is enabled (SET_VRING_ENABLE 1, or implicitly
when VHOST_USER_F_PROTOCOL_FEATURES is not negotiated).  Starting sends a
``RingStart`` with the kick/call eventfds to the worker that owns the ring's
queue pair (pair ``index // 2``).  GET_VRING_BASE, SET_VRING_ENABLE 0, a new
call descriptor and a new memory table stop the ring (``RingStop``; the
worker answers with its next avail index) and, where the ring stays
configured, start it again.  Addresses are checked against the memory table
only when the ring starts, because front-ends send rings before memory.

The coordinator keeps its own copy of every region and eventfd descriptor so
that a worker that dies can be replaced and handed the same state
(:meth:`Device.restore_pair`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Protocol

from shardswitch.ipc import (LogBase, MemAdd, MemClear, MemRemove, RingStart, RingStarted, RingStop,
                             RingStopped, close_fds)
from shardswitch.vhost.wire import (MAX_MEM_SLOTS, VRING_F_LOG, MemRegion, ProtocolFeature, VhostProtocolError,
                                    VirtioFeature, VringAddr)

log = logging.getLogger("shardswitch.device")

#: Features offered in GET_FEATURES.  Offloads: CSUM (the guest may send partial checksums, which
#: the workers do not verify) with HOST_TSO4/6 (TCP segments up to 64 KiB, each sent to its socket
#: whole), GUEST_CSUM (our frames carry DATA_VALID and unsummed TCP/UDP data) with GUEST_TSO4/6
#: (TCP data in 64 KiB GSO frames whatever the guest's MTU).
OFFERED_FEATURES = (VirtioFeature.VERSION_1 | VirtioFeature.MRG_RXBUF | VirtioFeature.EVENT_IDX
                    | VirtioFeature.INDIRECT_DESC | VirtioFeature.MQ | VirtioFeature.PROTOCOL_FEATURES
                    | VirtioFeature.CSUM | VirtioFeature.HOST_TSO4 | VirtioFeature.HOST_TSO6
                    | VirtioFeature.GUEST_CSUM | VirtioFeature.GUEST_TSO4 | VirtioFeature.GUEST_TSO6
                    | VirtioFeature.LOG_ALL)
#: Protocol features offered in GET_PROTOCOL_FEATURES (LOG_SHMFD: the dirty-page log of live migration;
#: DEVICE_STATE: the flows move with it).
OFFERED_PROTOCOL_FEATURES = (ProtocolFeature.MQ | ProtocolFeature.REPLY_ACK
                             | ProtocolFeature.CONFIGURE_MEM_SLOTS | ProtocolFeature.LOG_SHMFD
                             | ProtocolFeature.DEVICE_STATE)
#: Largest ring size accepted (the split-ring maximum).
MAX_RING_SIZE = 32768
NO_FD = -1


class DeviceError(VhostProtocolError):
    """The front-end asked for something this device state does not allow."""


class WorkerLink(Protocol):
    """What the device needs from the worker pool."""

    def send(self, pair: int, message: object, fds: list[int] | tuple[int, ...] = ()) -> bool:
        """Send without waiting; False when the worker is not there."""

    def call(self, pair: int, message: object, fds: list[int] | tuple[int, ...] = ()) -> object | None:
        """Send and wait for the answer; None when the worker died or timed out."""


@dataclass
class Vring:
    """One vring's configuration as received from the front-end."""

    index: int
    num: int = 0
    base: int = 0
    addr: VringAddr | None = None
    kick_fd: int = NO_FD
    kick_set: bool = False
    call_fd: int = NO_FD
    err_fd: int = NO_FD
    enabled: bool = False
    started: bool = False
    error: str = ""

    def close_fds(self) -> None:
        """Close the eventfds this ring holds."""
        close_fds([fd for fd in (self.kick_fd, self.call_fd, self.err_fd) if fd != NO_FD])
        self.kick_fd = self.call_fd = self.err_fd = NO_FD
        self.kick_set = False


def _ring_areas(num: int, addr: VringAddr) -> list[tuple[str, int, int, int]]:
    """(name, address, size, alignment) of a split ring's three areas."""
    return [("descriptor table", addr.desc, 16 * num, 16),
            ("avail ring", addr.avail, 6 + 2 * num, 2),
            ("used ring", addr.used, 6 + 8 * num, 4)]


class Device:
    """State of one front-end's virtio-net device."""

    def __init__(self, num_pairs: int, workers: WorkerLink) -> None:
        """A device with ``num_pairs`` queue pairs served by ``workers``."""
        self.num_pairs = num_pairs
        self.workers = workers
        self.owner = False
        self.acked_features = 0
        self.acked_protocol_features = 0
        self.status = 0
        self.regions: list[tuple[MemRegion, int]] = []
        self.vrings = [Vring(i) for i in range(2 * num_pairs)]
        self._seq = 0
        #: The dirty-page log (SET_LOG_BASE): its memfd, bitmap size and offset; kept for replacement workers.
        self.log: tuple[int, int, int] | None = None
        #: SET_LOG_FD's eventfd (QEMU's notification of log changes; held, never signalled: we log in place).
        self.log_fd = NO_FD

    # -- dirty-page log ---------------------------------------------------

    def set_log_base(self, size: int, offset: int, fd: int) -> None:
        """SET_LOG_BASE: every worker maps the bitmap (takes ownership of ``fd``)."""
        if not self.acked_protocol_features & ProtocolFeature.LOG_SHMFD:
            os.close(fd)
            raise DeviceError("SET_LOG_BASE: LOG_SHMFD was not negotiated")
        self._close_log()
        self.log = (fd, size, offset)
        log.info("dirty-page log of %d bytes (a live migration): every worker marks the pages it writes", size)
        self._broadcast(LogBase(size=size, offset=offset), [fd])

    def set_log_fd(self, fd: int) -> None:
        """SET_LOG_FD: keep the eventfd (takes ownership)."""
        if self.log_fd != NO_FD:
            os.close(self.log_fd)
        self.log_fd = fd

    def _close_log(self) -> None:
        """Forget the log and its descriptors."""
        if self.log is not None:
            os.close(self.log[0])
            self.log = None

    # -- features ---------------------------------------------------------

    def set_features(self, features: int) -> None:
        """SET_FEATURES: accept a subset of what we offered."""
        unknown = features & ~int(OFFERED_FEATURES)
        if unknown:
            raise DeviceError(f"SET_FEATURES: bits {unknown:#x} were not offered")
        changed = self.acked_features != features
        self.acked_features = features
        if changed:
            # Rings started under other features (header size, EVENT_IDX) restart with the new ones.
            for ring in self.vrings:
                if ring.started:
                    self._stop(ring)
                    self._maybe_start(ring)

    def set_protocol_features(self, features: int) -> None:
        """SET_PROTOCOL_FEATURES: accept a subset of what we offered."""
        unknown = features & ~int(OFFERED_PROTOCOL_FEATURES)
        if unknown:
            raise DeviceError(f"SET_PROTOCOL_FEATURES: bits {unknown:#x} were not offered")
        self.acked_protocol_features = features

    @property
    def reply_ack(self) -> bool:
        """True when REPLY_ACK was negotiated."""
        return bool(self.acked_protocol_features & ProtocolFeature.REPLY_ACK)

    # -- memory -------------------------------------------------------------

    def set_mem_table(self, regions: list[MemRegion], fds: list[int]) -> None:
        """SET_MEM_TABLE: replace all regions (takes ownership of ``fds``)."""
        if len(fds) != len(regions):
            close_fds(fds)
            raise DeviceError(f"SET_MEM_TABLE: {len(regions)} regions but {len(fds)} descriptors")
        try:
            self._check_no_overlap(regions)
        except DeviceError:
            close_fds(fds)
            raise
        running = self._stop_all()
        self._drop_memory()
        for region, fd in zip(regions, fds):
            self._add_region(region, fd)
        for ring in running:
            self._maybe_start(ring)

    def add_mem_region(self, region: MemRegion, fds: list[int]) -> None:
        """ADD_MEM_REG: add one region; an identical one already there is a repeat (QEMU sends one per pair)."""
        if len(fds) != 1:
            close_fds(fds)
            raise DeviceError(f"ADD_MEM_REG: expected 1 descriptor, got {len(fds)}")
        if any(r == region for r, _fd in self.regions):
            close_fds(fds)
            return
        if len(self.regions) >= MAX_MEM_SLOTS:
            close_fds(fds)
            raise DeviceError(f"ADD_MEM_REG: all {MAX_MEM_SLOTS} memory slots are in use")
        try:
            self._check_no_overlap([r for r, _fd in self.regions] + [region])
        except DeviceError:
            close_fds(fds)
            raise
        self._add_region(region, fds[0])
        for ring in self.vrings:
            self._maybe_start(ring)

    def remove_mem_region(self, region: MemRegion, fds: list[int]) -> None:
        """REM_MEM_REG: remove a region (rings using it must be restarted by the front-end)."""
        close_fds(fds)
        for i, (known, fd) in enumerate(self.regions):
            if (known.guest_phys_addr, known.memory_size, known.userspace_addr) == \
                    (region.guest_phys_addr, region.memory_size, region.userspace_addr):
                break
        else:
            return  # repeated removal (one per pair): nothing left to do
        running = self._stop_all()
        del self.regions[i]
        os.close(fd)
        self._broadcast(MemRemove(known))
        for ring in running:
            self._maybe_start(ring)

    @staticmethod
    def _check_no_overlap(regions: list[MemRegion]) -> None:
        """Refuse region sets whose guest or user ranges overlap."""
        for key in ("guest_phys_addr", "userspace_addr"):
            spans = sorted((getattr(r, key), getattr(r, key) + r.memory_size) for r in regions)
            for (_s1, e1), (s2, _e2) in zip(spans, spans[1:]):
                if s2 < e1:
                    raise DeviceError(f"memory regions overlap ({key} {s2:#x})")

    def _add_region(self, region: MemRegion, fd: int) -> None:
        """Record a region and hand it to every worker."""
        self.regions.append((region, fd))
        self._broadcast(MemAdd(region), [fd])

    def _drop_memory(self) -> None:
        """Forget every region (workers unmap theirs)."""
        if self.regions:
            close_fds([fd for _r, fd in self.regions])
            self.regions = []
            self._broadcast(MemClear())

    def _broadcast(self, message: object, fds: list[int] | tuple[int, ...] = ()) -> None:
        """Send a message to every worker."""
        for pair in range(self.num_pairs):
            self.workers.send(pair, message, fds)

    def _translate(self, addr: int, size: int) -> bool:
        """True when [addr, addr+size) lies inside one region's front-end virtual range."""
        return any(r.userspace_addr <= addr and addr + size <= r.userspace_addr + r.memory_size
                   for r, _fd in self.regions)

    # -- vrings -------------------------------------------------------------

    def vring(self, index: int, request: str) -> Vring:
        """The vring ``index`` (validated against 2N)."""
        if not 0 <= index < len(self.vrings):
            raise DeviceError(f"{request}: vring index {index} out of range (0..{len(self.vrings) - 1})")
        return self.vrings[index]

    def set_vring_num(self, index: int, num: int) -> None:
        """SET_VRING_NUM."""
        ring = self.vring(index, "SET_VRING_NUM")
        if not 1 <= num <= MAX_RING_SIZE or num & (num - 1):
            raise DeviceError(f"SET_VRING_NUM: size {num} is not a power of two in 1..{MAX_RING_SIZE}")
        self._stop(ring)
        ring.num = num

    def set_vring_base(self, index: int, base: int) -> None:
        """SET_VRING_BASE."""
        ring = self.vring(index, "SET_VRING_BASE")
        if base > 0xFFFF:
            raise DeviceError(f"SET_VRING_BASE: base {base} does not fit a split ring index")
        self._stop(ring)
        ring.base = base

    def set_vring_addr(self, addr: VringAddr) -> None:
        """SET_VRING_ADDR (checked against memory when the ring starts)."""
        ring = self.vring(addr.index, "SET_VRING_ADDR")
        if addr.flags & ~VRING_F_LOG:
            raise DeviceError(f"SET_VRING_ADDR: unknown flags {addr.flags:#x}")
        self._stop(ring)
        ring.addr = addr
        ring.error = ""
        self._maybe_start(ring)

    def set_vring_kick(self, index: int, fd: int) -> None:
        """SET_VRING_KICK (``fd`` NO_FD: the front-end will not kick, the worker polls)."""
        ring = self.vring(index, "SET_VRING_KICK")
        self._stop(ring)
        if ring.kick_fd != NO_FD:
            os.close(ring.kick_fd)
        ring.kick_fd = fd
        ring.kick_set = True
        if not self.acked_features & VirtioFeature.PROTOCOL_FEATURES:
            ring.enabled = True
        self._maybe_start(ring)

    def set_vring_call(self, index: int, fd: int) -> None:
        """SET_VRING_CALL; a running ring restarts with the new descriptor."""
        ring = self.vring(index, "SET_VRING_CALL")
        was_started = self._stop(ring)
        if ring.call_fd != NO_FD:
            os.close(ring.call_fd)
        ring.call_fd = fd
        if was_started:
            self._maybe_start(ring)

    def set_vring_err(self, index: int, fd: int) -> None:
        """SET_VRING_ERR: kept, closed with the ring."""
        ring = self.vring(index, "SET_VRING_ERR")
        if ring.err_fd != NO_FD:
            os.close(ring.err_fd)
        ring.err_fd = fd

    def set_vring_enable(self, index: int, enable: int) -> None:
        """SET_VRING_ENABLE."""
        ring = self.vring(index, "SET_VRING_ENABLE")
        if enable not in (0, 1):
            raise DeviceError(f"SET_VRING_ENABLE: value {enable} is neither 0 nor 1")
        ring.enabled = bool(enable)
        if ring.enabled:
            self._maybe_start(ring)
        else:
            self._stop(ring)

    def get_vring_base(self, index: int) -> int:
        """GET_VRING_BASE: stop the ring and return its next avail index."""
        ring = self.vring(index, "GET_VRING_BASE")
        self._stop(ring)
        base = ring.base
        # The ring stays stopped until the front-end sends a kick descriptor anew.
        if ring.kick_fd != NO_FD:
            os.close(ring.kick_fd)
        ring.kick_fd = NO_FD
        ring.kick_set = False
        return base

    def next_seq(self) -> int:
        """A fresh request number for the worker channel."""
        self._seq += 1
        return self._seq

    def _ready(self, ring: Vring) -> bool:
        """True when the ring has all it needs to start."""
        return (not ring.started and ring.enabled and ring.kick_set and ring.num > 0
                and ring.addr is not None and bool(self.regions))

    def _ring_error(self, ring: Vring) -> str:
        """Why the ring's addresses are unusable, or ''."""
        assert ring.addr is not None
        for name, addr, size, align in _ring_areas(ring.num, ring.addr):
            if addr % align:
                return f"vring {ring.index}: {name} address {addr:#x} is not {align}-byte aligned"
            if not self._translate(addr, size):
                return f"vring {ring.index}: {name} at {addr:#x} (+{size}) is outside guest memory"
        return ""

    def _maybe_start(self, ring: Vring, *, resume_from_used: bool = False) -> None:
        """Start the ring in its worker if it is ready."""
        if not self._ready(ring):
            return
        assert ring.addr is not None
        ring.error = self._ring_error(ring)
        if ring.error:
            log.error("not starting: %s", ring.error)
            return
        fds = [fd for fd in (ring.kick_fd, ring.call_fd) if fd != NO_FD]
        message = RingStart(seq=self.next_seq(), index=ring.index, num=ring.num, desc=ring.addr.desc,
                            avail=ring.addr.avail, used=ring.addr.used, last_avail=ring.base,
                            features=self.acked_features, has_kick=ring.kick_fd != NO_FD,
                            has_call=ring.call_fd != NO_FD, resume_from_used=resume_from_used,
                            log_addr=ring.addr.log if self._logging(ring) else -1)
        answer = self.workers.call(ring.index // 2, message, fds)
        if isinstance(answer, RingStarted) and not answer.error:
            ring.started = True
            log.debug("vring %d started (num %d, base %d)", ring.index, ring.num, ring.base)
        else:
            ring.error = answer.error if isinstance(answer, RingStarted) else "worker did not answer"
            log.error("vring %d did not start: %s", ring.index, ring.error)

    def _logging(self, ring: Vring) -> bool:
        """Whether ``ring`` logs the pages it writes: LOG_ALL acked, its log flag set, a log mapped."""
        return bool(self.acked_features & VirtioFeature.LOG_ALL and ring.addr is not None
                    and ring.addr.flags & VRING_F_LOG and self.log is not None)

    def start_failure(self, index: int) -> str:
        """Why vring ``index`` has everything it needs to run but is not running; '' otherwise.

        Non-empty right after a request completed the ring's set-up and the
        start failed (addresses outside guest memory or misaligned, the worker
        refused it): the request handler turns that into a refusal of the
        request.
        """
        ring = self.vring(index, "start check")
        return (ring.error or "the ring did not start") if self._ready(ring) else ""

    def _stop(self, ring: Vring) -> bool:
        """Stop the ring if started, keeping its position; True when it was running."""
        if not ring.started:
            return False
        ring.started = False
        answer = self.workers.call(ring.index // 2, RingStop(seq=self.next_seq(), index=ring.index))
        if isinstance(answer, RingStopped):
            ring.base = answer.last_avail
        else:
            log.warning("vring %d: worker did not report its position; keeping base %d", ring.index, ring.base)
        return True

    def _stop_all(self) -> list[Vring]:
        """Stop every running ring; return the ones that were running."""
        return [ring for ring in self.vrings if self._stop(ring)]

    # -- whole device -----------------------------------------------------------

    def restore_pair(self, pair: int) -> None:
        """Give a replacement worker the memory and the running rings of ``pair``."""
        for region, fd in self.regions:
            self.workers.send(pair, MemAdd(region), [fd])
        if self.log is not None:
            fd, size, offset = self.log
            self.workers.send(pair, LogBase(size=size, offset=offset), [fd])
        for ring in self.vrings[2 * pair: 2 * pair + 2]:
            # Every ring that is ready, not only those marked started: a ring whose start
            # raced with the death was never marked started but must run all the same.
            ring.started = False
            self._maybe_start(ring, resume_from_used=True)

    def reset(self) -> None:
        """Stop every ring, unmap memory, forget all state (RESET_DEVICE, disconnect)."""
        self._stop_all()
        self._drop_memory()
        for ring in self.vrings:
            ring.close_fds()
        self.vrings = [Vring(i) for i in range(2 * self.num_pairs)]
        self._close_log()
        if self.log_fd != NO_FD:
            os.close(self.log_fd)
            self.log_fd = NO_FD
        self.acked_features = 0
        self.acked_protocol_features = 0
        self.status = 0
        self.owner = False
