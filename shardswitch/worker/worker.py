"""A worker process: one virtio queue pair, event-driven on its kick eventfds.

The coordinator forks one worker per queue pair.  A worker owns everything
on its packet path - its mapping of guest memory, its RX and TX virtqueues,
its protocol endpoint, its flow layer and protocol modules, its queue of
frames for the guest and its counters - in one :class:`Worker` object;
nothing per-packet is shared with another process.

The worker is the :class:`~shardswitch.worker.port.WorkerPort` of its
protocol modules: they reach it through that written interface only, and
it wires them up (endpoint handlers, the flow layer's hooks).

Its loop waits (epoll, no busy polling) on:

* the control channel to the coordinator (:mod:`shardswitch.ipc`): memory
  regions, ring start/stop, status queries, forwarding rules added or
  removed at run time (listening sockets attached or closed), shutdown;
* the TX ring's kick eventfd: the guest posted frames;
* the RX ring's kick eventfd, enabled only while frames wait for buffers;
* its hand-over inbox: frames of its flows that arrived on other queue pairs;
* every host socket of its flows and forwarded ports, each with its callback.

After the events of each wake-up, the callbacks protocol modules deferred
while handling them run (``defer``: TCP's end-of-batch work), without a
system call; once a second, the deferred handler runs the flow layer's
timers.  A ring the front-end gave no kick descriptor (the NOFD
bit) is polled every :data:`POLL_INTERVAL` seconds instead.  Errors in a
ring (the guest broke the virtqueue) break that ring only; a control channel
that closes means the coordinator is gone, and the worker exits.

Errors meet one boundary, :meth:`Worker.handle_frame`: a guest frame the
packet layer refuses (PacketError) is a counted drop, a frame of a flow
another worker owns (:class:`~shardswitch.worker.flow.HandOver`) goes to
that worker's inbox, and anything else is a bug contained to that frame.
Handlers that run for no frame are guarded the same way: a flow's socket
and timer handlers by the flow layer (the fault costs that flow), every
other handler of the loop (listeners, the inbox, batch flushes, control
messages, the deferred handler) here (:meth:`Worker.handler_fault`): an
exception is counted and logged, rate-limited, and the worker serves on.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import socket
import time
from collections import deque
from typing import Callable

import msgspec

from shardswitch.pcap import PcapWriter
from shardswitch.ipc import (
    Capture,
    Channel,
    ForwardAdd,
    ForwardDone,
    ForwardRemove,
    IpcError,
    LogBase,
    MemAdd,
    MigrateDone,
    MigrateLoad,
    MigrateSave,
    MemClear,
    MemRemove,
    RingStart,
    RingStarted,
    RingStop,
    RingStopped,
    SandboxProbe,
    Shutdown,
    StatusQuery,
    ToWorker,
    WorkerSetup,
    WorkerStatus,
    close_fds,
)
from shardswitch.loglimit import LogLimiter
from shardswitch.migration import format as state_format
from shardswitch.migration.repair import RepairLink
from shardswitch.net.drop import DropReason
from shardswitch.net.endpoint import GuestEndpoint, Service
from shardswitch.net.params import ResolvedParams
from shardswitch.sandbox import privileges, seccomp
from shardswitch.shm.table import FlowTable
from shardswitch.virtio.dirtylog import DirtyLog, DirtyLogError
from shardswitch.virtio.memory import GuestMemory, GuestMemoryError
from shardswitch.virtio.netdev import RxWriter
from shardswitch.worker.counters import Counters, Event
from shardswitch.worker.datapath import Datapath
from shardswitch.worker.flow import FlowLayer, HandOver
from shardswitch.worker.fwd import Forwarding
from shardswitch.worker.migrate import FlowMigration
from shardswitch.worker.peers import Peers
from shardswitch.worker.ping import PingFlows
from shardswitch.worker.port import CountingPort, EpollWatches, RxOffloads
from shardswitch.worker.rings import RingSlot, SlotState
from shardswitch.worker.tcp import TcpFlows
from shardswitch.worker.trace import TRACE_LINES, FrameTrace
from shardswitch.worker.udp import UdpFlows

log = logging.getLogger("shardswitch.worker")

#: Polling period for rings without a kick descriptor.
POLL_INTERVAL = 0.001
#: Period of the deferred handler (flow timers).
TICK = 1.0


class Worker(EpollWatches, CountingPort):
    """All state of one worker process; the WorkerPort of its protocol modules."""

    def __init__(self, setup: WorkerSetup, channel: Channel) -> None:
        """A worker for the queue pair of ``setup``, talking to the coordinator over ``channel``."""
        pair = setup.pair
        params = setup.params
        self.pair = pair
        self.channel = channel
        self.test_hooks = setup.test_hooks
        self.mem = GuestMemory()
        #: The dirty-page log of a live migration (LogBase), once the front-end gave one.
        self.dirty: DirtyLog | None = None
        self.endpoint = GuestEndpoint(params, Service(setup.services & Service.ALL))
        self.params: ResolvedParams = self.endpoint.resolved
        self.counters = Counters()
        self.loglimit = LogLimiter(log)
        self.epoll = select.epoll()
        self.epoll.register(channel.fileno(), select.EPOLLIN)
        #: The packet path: rings, the queue of frames for the guest, capture.
        self.datapath = Datapath(pair, self.counters, self.epoll, self.handle_frame, reflect=setup.reflect)
        #: The WorkerPort's views of the datapath (the same objects, never replaced).
        self.queue: deque[bytes] = self.datapath.queue
        self.offloads: RxOffloads = self.datapath.offloads
        self.rx = self.datapath.rx
        self.tx = self.datapath.tx
        self.peers = Peers(pair, setup.inbox_fd, setup.peer_fds) if setup.inbox_fd >= 0 else None
        self.table = FlowTable.attach(setup.flow_table) if setup.flow_table else None
        if self.peers is not None:
            self.epoll.register(self.peers.fileno(), select.EPOLLIN)
        self.running = True
        #: Host descriptors watched for this worker's flows and listeners: descriptor -> callback.
        self.sockets: dict[int, Callable[[], None]] = {}
        self.deferred: list[Callable[[], None]] = []
        self.next_tick = time.monotonic() + TICK
        #: The guest MAC this worker last published in the flow table's header.
        self.published_mac: bytes | None = None
        fwd = Forwarding(self, setup.forward, self.table)
        self.flows = FlowLayer(self, self.table, fwd)
        self.ping = PingFlows(self, self.flows)
        self.tcp = TcpFlows(self, self.flows, setup.tcp_listeners)
        self.udp = UdpFlows(self, self.flows, setup.udp_listeners, setup.udp_timeouts)
        if setup.services & Service.TCP:
            self.tcp.plug_into(self.endpoint)
        if setup.services & Service.UDP:
            self.udp.plug_into(self.endpoint)
        if setup.icmp:
            self.ping.plug_into(self.endpoint)
        self.migration = FlowMigration(self, self.flows, self.tcp, self.udp, self.ping)
        self.migration.linger = setup.migrate_linger
        if setup.trace:
            self.datapath.trace = FrameTrace(LogLimiter(log, TRACE_LINES, 1.0))
            self.datapath.set_capture(None)
        self.datapath.on_rx_buffers = self._rx_refilled

    # -- control channel ---------------------------------------------------

    def on_control(self) -> None:
        """Handle one message from the coordinator."""
        try:
            message, fds = self.channel.recv()
        except IpcError as err:
            log.info("worker %d: coordinator gone (%s); exiting", self.pair, err)
            self.running = False
            return
        if isinstance(message, MemAdd):
            self._mem_add(message, fds)
        elif isinstance(message, RingStart):
            self._ring_start(message, fds)
        elif isinstance(message, LogBase):
            self._log_base(message, fds)
        elif isinstance(message, (MigrateSave, MigrateLoad)):
            self._migrate(message, fds)
        elif isinstance(message, Capture):
            self._capture(fds)
        elif isinstance(message, (ForwardAdd, ForwardRemove)):
            self._forward(message, fds)
        else:
            close_fds(fds)
            self._handle(message)

    def _handle(self, message: object) -> None:
        """Messages that carry no descriptors."""
        if isinstance(message, RingStop):
            slot = self._slot(message.index)
            last_avail = self._stop_slot(slot) if slot else 0
            self.channel.send(RingStopped(seq=message.seq, index=message.index, last_avail=last_avail))
        elif isinstance(message, MemRemove):
            self._stop_all()
            self._guard_memory(lambda: self.mem.remove_region(message.region))
        elif isinstance(message, MemClear):
            self._stop_all()
            self._guard_memory(self.mem.clear)
            if self.dirty is not None:          # the device was reset: its log goes with it
                self.dirty.close()
                self.dirty = None
        elif isinstance(message, StatusQuery):
            self.channel.send(self.status(message.seq))
        elif isinstance(message, Shutdown):
            self._stop_all()
            self.running = False
        elif isinstance(message, SandboxProbe) and self.test_hooks:
            log.warning("worker %d: making a system call outside the seccomp allow-list, as a test asked", self.pair)
            os.sync()
        else:
            log.error("worker %d: unexpected control message %r", self.pair, message)

    def _forward(self, message: ForwardAdd | ForwardRemove, fds: list[int]) -> None:
        """Forwarding rules changed at run time: adopt the listening sockets attached (one per entry of
        ``ports``, in order), or close a removed rule's; answer with the listeners this worker has now."""
        error = ""
        if isinstance(message, ForwardAdd):
            if len(fds) != len(message.ports):
                close_fds(fds)
                error = f"{len(fds)} descriptor(s) for {len(message.ports)} port(s)"
            else:
                ports = tuple(msgspec.structs.replace(desc, fd=fd) for desc, fd in zip(message.ports, fds))
                (self.tcp.forwarder.add if message.tcp else self.udp.add_listeners)(ports)
        else:
            close_fds(fds)
            rules = set(message.rules)
            removed = self.tcp.forwarder.remove(rules) if message.tcp else self.udp.remove_listeners(rules)
            log.debug("worker %d: %d listener(s) of rule(s) %s closed", self.pair, removed, sorted(rules))
        self.channel.send(ForwardDone(seq=message.seq, listeners=self.listening(), error=error))

    def listening(self) -> dict[str, int]:
        """This worker's listening sockets of forwarded ports, by kind."""
        return {"tcp": len(self.tcp.forwarder.listeners), "udp": len(self.udp.listeners),
                "udp_draining": len(self.udp.draining)}

    def _guard_memory(self, action: Callable[[], object]) -> None:
        """Run a memory operation, logging instead of dying when it fails."""
        try:
            action()
        except GuestMemoryError as err:
            log.error("worker %d: %s", self.pair, err)

    def _mem_add(self, message: MemAdd, fds: list[int]) -> None:
        """Map a region (its fd is consumed by GuestMemory)."""
        if len(fds) != 1:
            close_fds(fds)
            log.error("worker %d: MemAdd with %d descriptors", self.pair, len(fds))
            return
        self._guard_memory(lambda: self.mem.add_region(message.region, fds[0]))

    def _capture(self, fds: list[int]) -> None:
        """Start capturing into the attached file, or stop (no descriptor); the previous file is flushed."""
        if self.datapath.pcap is not None:
            self.datapath.pcap.close()
            self.datapath.set_capture(None)
        if len(fds) > 1:
            close_fds(fds)
            log.error("worker %d: Capture with %d descriptors", self.pair, len(fds))
        elif fds:
            self.datapath.set_capture(PcapWriter(fds[0]))

    def _log_base(self, message: LogBase, fds: list[int]) -> None:
        """Map the dirty-page log (the descriptor is closed here); rings logging now log into it."""
        try:
            if len(fds) != 1:
                log.error("worker %d: LogBase with %d descriptors", self.pair, len(fds))
                return
            dirty = DirtyLog(fds[0], message.size, message.offset)
        except DirtyLogError as err:
            log.error("worker %d: dirty-page log refused: %s", self.pair, err)
            return
        finally:
            close_fds(fds)
        old, self.dirty = self.dirty, dirty
        for slot in (self.rx, self.tx):
            if slot.vq is not None and slot.log_addr >= 0:
                slot.vq.start_logging(dirty, slot.log_addr)
                self.counters.events[Event.DIRTY_LOG_RING] += 1
        if old is not None:
            old.close()

    def _migrate(self, message: MigrateSave | MigrateLoad, fds: list[int]) -> None:
        """A live migration's request: flows saved into, or loaded from, the attached memfd (closed here)."""
        want = 2 if message.has_repair else 1
        helper = None
        try:
            if len(fds) != want:
                raise state_format.StateError(f"{type(message).__name__} with {len(fds)} descriptors, not {want}")
            if message.has_repair:
                helper = socket.socket(fileno=os.dup(fds[1]))
            freezes = isinstance(message, MigrateSave) and message.helper_freezes
            link = RepairLink(helper, freezes) if helper is not None else None
            if isinstance(message, MigrateSave):
                state, moved = self.migration.save(link)
                data = state_format.encode_pair(state)
                view = memoryview(data)
                while view:
                    view = view[os.write(fds[0], view):]
                size = len(data)
            else:
                if message.guest_mac is not None and self.endpoint.guest_mac is None:
                    self.endpoint.guest_mac = message.guest_mac
                pair_state = state_format.decode_pair(os.pread(fds[0], message.size, 0))
                moved = self.migration.load(pair_state, link)
                size = message.size
        except (state_format.StateError, OSError) as err:
            log.error("worker %d: migration: %s", self.pair, err)
            self.channel.send(MigrateDone(seq=message.seq, error=str(err)))
            return
        finally:
            if helper is not None:
                helper.close()
            close_fds(fds)
        log.info("worker %d: migration %s: %d TCP connection(s) moved, %d reset, %d other flow(s)", self.pair,
                 "saved" if isinstance(message, MigrateSave) else "loaded", moved.tcp_moved, moved.tcp_reset,
                 moved.other)
        self.channel.send(MigrateDone(seq=message.seq, size=size, tcp_moved=moved.tcp_moved,
                                      tcp_reset=moved.tcp_reset, other=moved.other))

    def _slot(self, index: int) -> RingSlot | None:
        """The slot of vring ``index`` if it belongs to this worker."""
        slot = self.datapath.slot(index)
        if slot is None:
            log.error("worker %d: vring %d is not mine", self.pair, index)
        return slot

    def _ring_start(self, message: RingStart, fds: list[int]) -> None:
        """Start a ring and answer the coordinator."""
        slot = self._slot(message.index)
        if slot is None:
            close_fds(fds)
            self.channel.send(RingStarted(seq=message.seq, index=message.index, error="not this worker's ring"))
            return
        error = self.datapath.start_ring(slot, self.mem, message, fds, self.dirty)
        self.channel.send(RingStarted(seq=message.seq, index=message.index, error=error))
        if not error:
            self.datapath.after_start(slot)

    def _stop_slot(self, slot: RingSlot) -> int:
        """Stop a slot (see :meth:`Datapath.stop_slot`)."""
        return self.datapath.stop_slot(slot)

    def _stop_all(self) -> None:
        """Stop both rings (before memory goes away)."""
        self.datapath.stop_all()

    def status(self, seq: int) -> WorkerStatus:
        """Counters and ring states."""
        c = self.counters
        return WorkerStatus(seq=seq, pair=self.pair, pid=os.getpid(),
                            rings=[self.rx.snapshot(), self.tx.snapshot()],
                            tx_frames=c.tx_frames, tx_bytes=c.tx_bytes, rx_frames=c.rx_frames,
                            rx_bytes=c.rx_bytes, drops=Counters.by_name(c.drops), events=Counters.by_name(c.events),
                            handed_out=self.peers.handed_out if self.peers else 0,
                            handed_in=self.peers.handed_in if self.peers else 0,
                            flows=self.flows.count(), listeners=self.listening())

    # -- the WorkerPort of the protocol modules -------------------------------------

    def flush(self) -> None:
        """Write queued frames into the RX ring (under the RX ring's guard)."""
        self.datapath.flush()

    @property
    def guest_mac(self) -> bytes | None:
        """The guest's MAC address, once learnt."""
        return self.endpoint.guest_mac

    @property
    def rx_writer(self) -> RxWriter | None:
        """The running RX ring's writer (None: no RX ring)."""
        return self.datapath.rx_writer

    def rx_wait(self) -> bool:
        """Ask for a kick when the guest posts RX buffers; True if some were posted meanwhile."""
        return self.datapath.rx_wait()

    def rx_written(self, frames: int, nbytes: int) -> None:
        """Frames written in place into the RX ring: count, publish, signal the guest."""
        self.datapath.publish_rx(frames, nbytes)

    def rx_broken(self, err: Exception) -> None:
        """The guest broke the RX ring while we wrote in place."""
        self.datapath.rx_broken(err)

    def on_kick(self, slot: RingSlot) -> None:
        """A kick eventfd fired."""
        try:
            os.eventfd_read(slot.kick_fd)
        except BlockingIOError:
            pass
        self.datapath.on_kick(slot)

    def _rx_refilled(self) -> None:
        """The guest posted RX buffers and no frame waits: flows that ran out of them writing in place go on."""
        if self.tcp.rx_blocked:
            self.tcp.on_rx_buffers()

    # -- frames -------------------------------------------------------------------

    def handle_frame(self, frame: memoryview, now: float, replies: list[bytes], csum_partial: bool = False) -> None:
        """One guest frame through the endpoint: the one boundary where its errors are translated.

        ``csum_partial``: its header had NEEDS_CSUM (L4 checksum not to be
        verified).  A refused frame is counted under its drop reason; a frame
        of a flow another worker owns is handed to it, unchanged (counted if
        its inbox is full); a fault in our own protocol code (a bug, an
        unexpected OSError) drops the frame, counted, with the traceback
        logged, and the worker goes on.
        """
        try:
            reason = self.endpoint.handle_frame(frame, now, replies, csum_partial)
        except HandOver as handed:
            peers = self.peers
            if peers is None or not peers.hand_over(handed.owner, frame, csum_partial):
                self.counters.drops[DropReason.HAND_OVER_FAILED] += 1
            return
        except Exception:
            self.counters.drops[DropReason.INTERNAL_ERROR] += 1
            self.loglimit.error("internal error", "worker %d: frame dropped after an internal error", self.pair,
                                exc_info=True)
            return
        if reason is not None:
            self.counters.drops[reason] += 1
        mac = self.endpoint.guest_mac
        if mac is not None and mac != self.published_mac and self.table is not None:
            # Other workers need it for host-initiated flows before the guest has used their queue.
            self.table.publish_guest_mac(mac)
            self.published_mac = mac

    def _inbox(self) -> None:
        """Frames other workers handed over (flows this worker owns)."""
        if self.peers is not None:
            frames = self.peers.receive()
            if frames:
                self.datapath.handle_frames(frames)

    def handler_fault(self) -> None:
        """A handler outside any one flow raised (called from an ``except`` block; flows' own handlers are
        guarded by the flow layer): counted, logged rate-limited with the traceback, and the worker goes on."""
        self.counters.events[Event.HANDLER_FAULT] += 1
        self.loglimit.error("handler fault", "worker %d: internal error in a handler; serving on", self.pair,
                            exc_info=True)

    # -- timers ----------------------------------------------------------------------

    def _timeout(self, now: float) -> float:
        """How long the loop may sleep."""
        if self.datapath.tx_again or self.deferred:
            return 0.0
        timeout = max(0.0, self.next_tick - now)
        return min(timeout, POLL_INTERVAL) if self.datapath.polled() else timeout

    def _tick(self, now: float) -> None:
        """The deferred handler, once a second: timers of this worker's own flows, and (worker 0, its RX
        ring running) the periodic router advertisement when one is due."""
        self.next_tick = now + TICK
        if self.endpoint.guest_mac is None and self.table is not None:
            self.endpoint.guest_mac = self.published_mac = self.table.guest_mac()
        self.flows.tick(now)
        self.migration.expire(now)
        self.loglimit.flush()
        if self.pair == 0 and self.rx.state is SlotState.RUNNING:
            # Unsolicited router advertisements (RFC 4861 6.2.4): one worker sends them for the guest.
            advert = self.endpoint.ndp.periodic_ra(now)
            if advert is not None:
                self.queue.append(advert)
        if self.queue:
            self.flush()

    # -- loop -------------------------------------------------------------------

    def run(self) -> None:
        """Serve until shutdown or until the coordinator goes away."""
        channel_fd = self.channel.fileno()
        inbox_fd = self.peers.fileno() if self.peers is not None else -1
        sockets = self.sockets
        datapath = self.datapath
        while self.running:
            try:
                events = self.epoll.poll(self._timeout(time.monotonic()))
            except InterruptedError:
                continue
            datapath.poll()
            for fd, _mask in events:
                try:
                    if fd == channel_fd:
                        self.on_control()
                    elif fd == self.tx.kick_fd:
                        self.on_kick(self.tx)
                    elif fd == self.rx.kick_fd:
                        self.on_kick(self.rx)
                    elif fd == inbox_fd:
                        self._inbox()
                    else:
                        callback = sockets.get(fd)
                        if callback is not None:
                            callback()
                except Exception:
                    self.handler_fault()
            if self.deferred:
                self.run_deferred(self.handler_fault)
            if datapath.pcap is not None:
                datapath.pcap.flush()
            now = time.monotonic()
            if now >= self.next_tick:
                try:
                    self._tick(now)
                except Exception:
                    self.handler_fault()
        if self.datapath.pcap is not None:
            self.datapath.pcap.close()
        self._stop_all()
        self._guard_memory(self.mem.clear)
        self.tcp.close()
        self.flows.close_all()
        self.udp.close()
        if self.table is not None:
            self.table.close()


def _isolate(keep: set[int], pair: int) -> None:
    """Close every inherited descriptor but stdio and ``keep``; name the process; die with the coordinator."""
    max_fd = os.sysconf("SC_OPEN_MAX")
    low = 3
    for fd in sorted(keep):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, max_fd if max_fd > 0 else 65536)
    privileges.set_name(f"shardswitch-w{pair}")
    privileges.die_with_parent(signal.SIGTERM)
    # Ctrl-C in a terminal reaches the whole process group: the coordinator decides.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def worker_main(setup: WorkerSetup, sock: socket.socket) -> None:
    """Entry point of a forked worker process."""
    keep = {sock.fileno(), *setup.peer_fds, *(p.fd for p in setup.tcp_listeners + setup.udp_listeners),
            *FlowTable.inherited_fds(setup.flow_table)}
    if setup.inbox_fd >= 0:
        keep.add(setup.inbox_fd)
    pair = setup.pair
    _isolate(keep, pair)
    worker = Worker(setup, Channel(sock, ToWorker))
    if setup.sandbox:
        try:
            seccomp.install(seccomp.Role.WORKER)
        except seccomp.SeccompError as err:
            log.error("worker %d: %s; exiting", pair, err)
            return
    log.debug("worker %d started (pid %d)", pair, os.getpid())
    started = time.monotonic()
    try:
        worker.run()
    finally:
        log.debug("worker %d exits after %.1f s", pair, time.monotonic() - started)
