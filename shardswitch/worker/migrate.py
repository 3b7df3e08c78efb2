"""One worker's part of a live migration: its flows out of the source, into the target.

Theory of operation
-------------------
The coordinator asks each worker in turn, while the guest is stopped
(:mod:`shardswitch.migration`).

**Source** (:meth:`FlowMigration.save`).  Bytes the guest ACKed are first
discarded from every TCP socket, so that each receive queue starts at the
guest's ACK.  Established connections then go into repair mode, all in one
request to the TCP_REPAIR helper, and are dumped
(:func:`~shardswitch.worker.tcp.migrate.dump`).  Every flow becomes a record
of :mod:`~shardswitch.migration.format`: TCP with its sequence state towards
the guest and, when dumped, its socket's; UDP flows the guest started and echo
flows by their addresses.  Then every flow is closed: a dumped socket closes
silently (repair mode), behind a guard that drops what the peer sends until
the target holds the connection (:func:`~shardswitch.worker.tcp.migrate.guard`,
kept :data:`GUARD_TIME` seconds), the others with a reset, so the host peer of
a connection that cannot move learns at once.  Should the guest resume here
after all (the migration failed later, and the front-end starts the rings
again), the coordinator has this worker load its own record back.

**Target** (:meth:`FlowMigration.load`).  Each TCP connection with a socket
state gets a new socket in repair mode (one helper request for all), restored
(:func:`~shardswitch.worker.tcp.migrate.restore`), out of repair mode (one
more request), entered in the flow table and watched.  Its sequence towards
the guest is rewound to the guest's last ACK: what was in flight is sent
again, which the guest's TCP takes as a retransmission.  A connection that
cannot be restored, or came without a socket state, is reset: the guest gets
a RST as soon as its RX ring runs, and the host peer got one from the source.
UDP and echo flows are re-created, UDP from the same local port when free.
"""

from __future__ import annotations

import logging
import socket
import time

from shardswitch.migration import format as fmt
from shardswitch.migration import repair
from shardswitch.migration.repair import RepairCommand, RepairError, RepairLink
from shardswitch.net import inany, tcp
from shardswitch.net.drop import DropReason, PacketError
from shardswitch.net.tcp import (ACK, CONNECTING, ESTABLISHED, FIN_SENT, RST, SOCK_FIN_RCVD,
                                 Addressing, TcpConn)
from shardswitch.shm.layout import FlowSide, FlowType, Pif, pack_key
from shardswitch.worker.tcp import migrate as tcp_migrate
from shardswitch.worker.counters import Event
from shardswitch.worker.flow import FlowLayer, HandOver
from shardswitch.worker.ping import PingFlow, PingFlows
from shardswitch.worker.policy import REFUSALS
from shardswitch.worker.port import WorkerPort
from shardswitch.worker.tcp import EDGE, TcpFlow, TcpFlows
from shardswitch.worker.tcp.forward import LINGER_RESET
from shardswitch.worker.udp import UdpFlow, UdpFlows

log = logging.getLogger("shardswitch.worker")

#: Connection flags that keep a connection from moving (the peer's FIN, a connect in progress); the guest's
#: FIN does not (tcp_migrate sends ours again).
_NOT_MOVABLE = CONNECTING | SOCK_FIN_RCVD | FIN_SENT
#: How long a moved connection's guard stays (the target restores it within the migration's downtime).
GUARD_TIME = 30.0


class Moved:
    """What one save or load did, for the answer and the log."""

    def __init__(self) -> None:
        """Nothing yet."""
        self.tcp_moved = 0
        self.tcp_reset = 0
        self.other = 0


def _side(side: FlowSide) -> fmt.Side:
    """A flow side as a document side."""
    return fmt.Side(side.pif, side.ep_addr, side.ep_port, side.our_addr, side.our_port)


def _flow_side(side: fmt.Side) -> FlowSide:
    """A document side as a flow side."""
    return FlowSide(side.pif, side.ep_addr, side.ep_port, side.our_addr, side.our_port)


def _sock_side(sock: socket.socket) -> FlowSide:
    """The host side of a connected socket: the peer, then our address."""
    ours, peer = sock.getsockname(), sock.getpeername()
    return FlowSide(Pif.HOST, inany.from_str(peer[0]), peer[1], inany.from_str(ours[0]), ours[1])


class FlowMigration:
    """Saving and restoring the flows of one worker."""

    def __init__(self, port: WorkerPort, layer: FlowLayer, tcp_flows: TcpFlows, udp: UdpFlows,
                 ping: PingFlows) -> None:
        """For the worker behind ``port`` and its protocol modules."""
        self.port = port
        self.layer = layer
        self.tcp = tcp_flows
        self.udp = udp
        self.ping = ping
        #: Guards of moved connections, with the time each may go.
        self.guards: list[tuple[float, socket.socket]] = []
        #: Guard the local ports of moved connections (off: --migrate-no-linger, as passt's closing them at
        #: once: a segment reaching the port before the target holds the connection meets a reset).
        self.linger = True

    # -- source ------------------------------------------------------------------

    def save(self, link: RepairLink | None) -> tuple[fmt.PairState, Moved]:
        """Every flow as a record, then closed (see the module's docstring)."""
        moved = Moved()
        flows = list(self.layer.flows.values())
        tcp_flows = [f for f in flows if isinstance(f, TcpFlow) and not f.closed]
        movable = [f for f in tcp_flows if f.conn.flags & ESTABLISHED and not f.conn.flags & _NOT_MOVABLE]
        for flow in movable:
            if flow.unconsumed:
                self.tcp.consume(flow)
        dumped: dict[int, fmt.TcpSocketState] = {}
        if link is not None and movable:
            self._freeze(link, [f.sock for f in movable], "connection")
            dumped = self._dump_all(link, movable)
        records = []
        guarded = []
        for flow in tcp_flows:
            state = dumped.get(flow.fd)
            records.append(self._tcp_record(flow, state))
            if state is None:
                moved.tcp_reset += 1
                self.port.count(Event.TCP_MIGRATION_RESET)
                try:
                    flow.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
                except OSError:
                    pass
            else:
                moved.tcp_moved += 1
                self.port.count(Event.TCP_MIGRATED)
                if not flow.inbound:
                    guarded.append(flow)
        if link is not None and guarded and self.linger:
            self._guard(link, guarded)
        for flow in tcp_flows:
            self.layer.close(flow)
        udp = [fmt.UdpState(_side(self._guest_side_udp(f)), _side(_sock_side(f.sock)))
               for f in flows if isinstance(f, UdpFlow) and f.peer is None and not f.closed]
        ping = [fmt.PingState(f.ftype == FlowType.PING6, _side(self._guest_side_ping(f)),
                              _side(self._ping_host_side(f)))
                for f in flows if isinstance(f, PingFlow) and not f.closed]
        for other in flows:
            if isinstance(other, (UdpFlow, PingFlow)) and not other.closed:
                self.layer.close(other)
                if isinstance(other, PingFlow) or other.peer is None:
                    moved.other += 1
                    self.port.count(Event.FLOW_MIGRATED)
        return fmt.PairState(pair=self.port.pair, tcp=records, udp=udp, ping=ping), moved

    def _freeze(self, link: RepairLink, socks: list[socket.socket], what: str) -> bool:
        """Attach the drop-all filter to ``socks`` (through the helper when it is ours, else ourselves);
        whether it worked (a warning when not: the handover is then exposed to what the peer sends)."""
        try:
            if link.freezes:
                link.set(RepairCommand.FREEZE, [s.fileno() for s in socks])
            else:
                for sock in socks:
                    repair.freeze(sock)
            return True
        except (RepairError, OSError) as err:
            self.port.count(Event.TCP_MIGRATION_UNFROZEN)
            log.warning("worker %d: cannot freeze %d %s socket(s) (%s): what the peer sends while they move may "
                        "be reset; shardswitch repair-helper freezes them", self.port.pair, len(socks), what,
                        err.strerror if isinstance(err, OSError) and err.strerror else err)
            return False

    def _guard(self, link: RepairLink, flows: list[TcpFlow]) -> None:
        """Frozen guards for moved connections' local ports, until :meth:`expire` closes them."""
        made = []
        for flow in flows:
            try:
                made.append(tcp_migrate.guard(flow.sock))
            except OSError as err:
                log.warning("worker %d: no guard for the moved connection from guest port %d: %s",
                            self.port.pair, flow.addr.src_port, err.strerror or err)
        if made and self._freeze(link, made, "guard"):
            until = time.monotonic() + GUARD_TIME
            self.guards.extend((until, guarding) for guarding in made)
        else:
            for guarding in made:
                guarding.close()

    def expire(self, now: float) -> None:
        """Close the guards whose time is over (the worker's once-a-second handler)."""
        if self.guards and self.guards[0][0] <= now:
            keep = []
            for until, guarding in self.guards:
                if until <= now:
                    guarding.close()
                else:
                    keep.append((until, guarding))
            self.guards = keep

    def _dump_all(self, link: RepairLink, movable: list[TcpFlow]) -> dict[int, fmt.TcpSocketState]:
        """Repair mode on for ``movable``, each dumped; those that fail are put back (to be reset)."""
        try:
            link.set(RepairCommand.ON, [f.fd for f in movable])
        except RepairError as err:
            log.error("worker %d: %s: %d TCP connection(s) will be reset", self.port.pair, err, len(movable))
            return {}
        dumped: dict[int, fmt.TcpSocketState] = {}
        failed = []
        for flow in movable:
            try:
                dumped[flow.fd] = tcp_migrate.dump(flow.sock)
            except tcp_migrate.MigrateError as err:
                log.warning("worker %d: TCP connection to port %d does not move: %s", self.port.pair,
                            flow.addr.src_port, err)
                failed.append(flow.fd)
        if failed:
            try:
                link.set(RepairCommand.OFF, failed)      # out of repair mode, so that closing resets
            except RepairError as err:
                log.error("worker %d: %s", self.port.pair, err)
        return dumped

    @staticmethod
    def _tcp_record(flow: TcpFlow, sock_state: fmt.TcpSocketState | None) -> fmt.TcpState:
        """The record of one connection."""
        conn, addr = flow.conn, flow.addr
        guest = FlowSide(Pif.GUEST, inany.from_packed(addr.dst), addr.dst_port, inany.from_packed(addr.src),
                         addr.src_port)
        try:
            host = _sock_side(flow.sock)
        except OSError:
            host = FlowSide(Pif.HOST, inany.ANY6, 0, inany.ANY6, 0)
        return fmt.TcpState(
            guest=_side(guest), host=_side(host), inbound=flow.inbound, isn=flow.isn, our_mss=flow.our_mss,
            seq_to_guest=conn.seq_to_guest, seq_ack_from_guest=conn.seq_ack_from_guest,
            seq_from_guest=conn.seq_from_guest, seq_ack_to_guest=conn.seq_ack_to_guest, mss=conn.mss,
            ws_from_guest=conn.ws_from_guest, ws_to_guest=conn.ws_to_guest,
            wnd_from_guest=min(conn.wnd_from_guest, 0xFFFFFFFF), wnd_to_guest=min(conn.wnd_to_guest, 0xFFFFFFFF),
            flags=conn.flags & 0xFF, socket=sock_state)

    @staticmethod
    def _guest_side_udp(flow: UdpFlow) -> FlowSide:
        """The guest side of a UDP flow the guest started."""
        return FlowSide(Pif.GUEST, flow.guest_addr, flow.guest_port, flow.remote, flow.remote_port)

    @staticmethod
    def _guest_side_ping(flow: PingFlow) -> FlowSide:
        """The guest side of an echo flow."""
        return FlowSide(Pif.GUEST, flow.guest_addr, flow.guest_ident, flow.remote, 0)

    @staticmethod
    def _ping_host_side(flow: PingFlow) -> FlowSide:
        """The host side of an echo flow (its socket's identifier as our port)."""
        try:
            ours = flow.sock.getsockname()
            peer = flow.sock.getpeername()
            return FlowSide(Pif.HOST, inany.from_str(peer[0]), 0, inany.ANY6, ours[1])
        except OSError:
            return FlowSide(Pif.HOST, flow.remote, 0, inany.ANY6, 0)

    # -- target ------------------------------------------------------------------

    def load(self, state: fmt.PairState, link: RepairLink | None) -> Moved:
        """Restore ``state``'s flows here (see the module's docstring)."""
        moved = Moved()
        now = time.monotonic()
        with_socket = [t for t in state.tcp if t.socket is not None and self._admitted(t)]
        restored = self._restore_all(with_socket, link, now) if link is not None and with_socket else {}
        for record in state.tcp:
            flow = restored.get(id(record))
            if flow is None:
                self._reset_guest(record)
                moved.tcp_reset += 1
                self.port.count(Event.TCP_MIGRATION_RESET)
            else:
                moved.tcp_moved += 1
                self.port.count(Event.TCP_MIGRATED)
        failed_udp = failed_ping = 0
        for udp in state.udp:
            try:
                self.udp.recreate(_flow_side(udp.guest), udp.host.our_port, now)
            except (PacketError, HandOver) as err:      # HandOver: the document gave another worker the flow
                if isinstance(err, PacketError) and err.reason in REFUSALS:
                    self.port.count(Event.MIGRATED_FLOW_REFUSED)
                self.port.loglimit.warning("migrated UDP flow", "worker %d: UDP flow not re-created: %s",
                                           self.port.pair, err)
                failed_udp += 1
                continue
            moved.other += 1
            self.port.count(Event.FLOW_MIGRATED)
        for ping in state.ping:
            try:
                self.ping.recreate(FlowType.PING6 if ping.v6 else FlowType.PING4, _flow_side(ping.guest), now)
            except (PacketError, HandOver) as err:
                if isinstance(err, PacketError) and err.reason in REFUSALS:
                    self.port.count(Event.MIGRATED_FLOW_REFUSED)
                self.port.loglimit.warning("migrated echo flow", "worker %d: echo flow not re-created: %s",
                                           self.port.pair, err)
                failed_ping += 1
                continue
            moved.other += 1
            self.port.count(Event.FLOW_MIGRATED)
        for failed, kind in ((failed_udp, "UDP"), (failed_ping, "echo")):
            if failed:
                log.warning("worker %d: %d %s flow(s) of the migration not re-created", self.port.pair, failed, kind)
        if self.port.queue:
            self.port.flush()
        return moved

    def _admitted(self, record: fmt.TcpState) -> bool:
        """Whether the flow policy lets a connection of the document be restored as it names it (else it is
        reset, counted and logged): a connection the guest started must go where the same guest side would
        go now (:meth:`FlowLayer.new_flow`), from a local address of the same kind; one a host client
        started must come to a port this switch forwards (on the same address), to the guest port and the
        target address (screened by the flow policy) it forwards to, and appear in the guest from where such a
        client would."""
        guest, host = _flow_side(record.guest), _flow_side(record.host)
        try:
            if record.inbound:
                forwarder = self.tcp.forwarder
                listener = forwarder.listening_on(host.our_port, host.our_addr) if forwarder is not None else None
                sides = self.layer.fwd.inbound(host.ep_addr, listener.target) if listener is not None else None
                if (listener is None or listener.guest_port != guest.ep_port or sides is None
                        or sides[0] != guest.our_addr
                        or (listener.target is not None and guest.ep_addr != listener.target)):
                    raise PacketError(DropReason.FLOW_DST_DENIED, "not a client of a forwarded port")
                # The guest side as the guest sees it (its address, the client as it appears there): the
                # host client itself is often on the host's loopback, which is no address of the guest's.
                self.layer.fwd.policy.screen(guest.ep_addr, guest.our_addr, guest.our_port)
            else:
                new = self.layer.new_flow(FlowType.TCP, guest)
                if (new.target, new.port) != (host.ep_addr, host.ep_port):
                    raise PacketError(DropReason.FLOW_DST_DENIED, f"the guest side leads to "
                                      f"{inany.to_str(new.target)} port {new.port}, not where the document says")
                if inany.is_loopback(host.our_addr) != inany.is_loopback(new.target):
                    raise PacketError(DropReason.FLOW_DST_DENIED, "local address of another kind")
        except PacketError as err:
            self.port.count(Event.MIGRATED_FLOW_REFUSED)
            self.port.loglimit.warning("migrated flow refused", "worker %d: migrated TCP connection %s port %d "
                                       "-> %s port %d refused: %s", self.port.pair, inany.to_str(guest.ep_addr),
                                       guest.ep_port, inany.to_str(host.ep_addr), host.ep_port, err)
            return False
        return True

    def _restore_all(self, records: list[fmt.TcpState], link: RepairLink,
                     now: float) -> dict[int, TcpFlow]:
        """New sockets in repair mode for ``records``, restored, out of repair mode, entered: by id(record)."""
        socks: dict[int, socket.socket] = {}
        for record in records:
            try:
                socks[id(record)] = tcp_migrate.new_socket(record.host)
            except OSError as err:
                self.port.loglimit.warning("migrated TCP socket", "worker %d: no socket for a migrated TCP "
                                           "connection: %s", self.port.pair, err)
        try:
            link.set(RepairCommand.ON, [s.fileno() for s in socks.values()])
        except RepairError as err:
            log.error("worker %d: %s: %d TCP connection(s) will be reset", self.port.pair, err, len(socks))
            for opened in socks.values():
                opened.close()
            return {}
        ok: set[int] = set()
        for record in records:
            repairing = socks.get(id(record))
            if repairing is None:
                continue
            assert record.socket is not None
            try:
                tcp_migrate.restore(repairing, record.host, record.socket)
                ok.add(id(record))
            except tcp_migrate.MigrateError as err:
                self.port.loglimit.warning("migrated TCP restore", "worker %d: TCP connection to port %d not "
                                           "restored: %s", self.port.pair, record.guest.our_port, err)
        try:
            link.set(RepairCommand.OFF, [socks[key].fileno() for key in ok])
        except RepairError as err:
            log.error("worker %d: %s", self.port.pair, err)
            ok = set()
        restored: dict[int, TcpFlow] = {}
        for record in records:
            sock = socks.get(id(record))
            if sock is None:
                continue
            flow = None
            if id(record) in ok:
                flow = self._adopt(record, sock, now)
            if flow is None:
                sock.close()
            else:
                restored[id(record)] = flow
        return restored

    def _adopt(self, record: fmt.TcpState, sock: socket.socket, now: float) -> TcpFlow | None:
        """A restored socket becomes a flow of this worker (None: it could not, the caller resets)."""
        assert record.socket is not None
        guest, host = _flow_side(record.guest), _flow_side(record.host)
        try:
            tcp_migrate.finish(sock, record.socket)
            ref = self.layer.enter(FlowType.TCP, host if record.inbound else guest,
                                   guest if record.inbound else host, now)
        except (tcp_migrate.MigrateError, PacketError, HandOver) as err:
            self.port.loglimit.warning("migrated TCP adopt", "worker %d: TCP connection to port %d not taken "
                                       "over: %s", self.port.pair, record.guest.our_port, err)
            return None
        # What was in flight to the guest is sent again: the receive queue starts at the guest's ACK.
        conn = TcpConn(record.seq_ack_from_guest, record.seq_ack_from_guest, record.seq_from_guest,
                       record.seq_ack_to_guest, record.mss, record.ws_from_guest, record.ws_to_guest,
                       wnd_from_guest=record.wnd_from_guest, wnd_to_guest=record.wnd_to_guest, flags=record.flags)
        flow = TcpFlow(ref=ref, ftype=FlowType.TCP, key=pack_key(FlowType.TCP, guest), last=now, sock=sock,
                       conn=conn, addr=self._addressing(record), isn=record.isn, our_mss=record.our_mss,
                       timer=now, created=now, inbound=record.inbound, readable=True)
        self.layer.add(flow, sock.fileno(), EDGE)
        return flow

    def _addressing(self, record: fmt.TcpState) -> Addressing:
        """Frame addressing to the guest for a connection's record."""
        guest = record.guest
        return Addressing.between(self.port.guest_mac or b"\xff" * 6, self.port.params.our_mac, guest.our_addr,
                                  guest.ep_addr, guest.our_port, guest.ep_port)

    def _reset_guest(self, record: fmt.TcpState) -> None:
        """A RST to the guest for a connection that did not move (queued: it goes out once RX runs)."""
        self.port.queue.append(tcp.build(self._addressing(record), record.seq_to_guest, record.seq_from_guest,
                                         RST | ACK, 0))
