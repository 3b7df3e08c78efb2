"""ICMP and ICMPv6 echo flows of one worker: the socket side of passt's icmp.c.

Theory of operation.  An echo request from the guest is one flow per
(guest address, destination, echo identifier): the first request creates it,
later ones reuse it.  Each flow has an unprivileged ping socket
(``SOCK_DGRAM``/``IPPROTO_ICMP[V6]``, allowed by ``net.ipv4.ping_group_range``),
connected to the destination - or to the host's loopback when the guest
addressed the mapped address (``--map-host-loopback``, the gateway by
default).  The kernel stamps its own identifier on what we send; replies
come back on the socket and are re-stamped with the guest's identifier and
sent to the guest from the address it pinged.

Flows live in the shared flow table (:mod:`shardswitch.shm`) so that every
worker can find them, and in this worker's local index, so that the
per-packet path of a flow this worker owns takes no lock.  A request for a
flow another worker owns - the guest's sender moved to another CPU, so to
another TX queue - is handed, unchanged, to the owner's inbox
(:mod:`shardswitch.worker.peers`); two workers creating the same flow at
once end with one flow, because the table refuses the second activation.

Timers run in the worker's deferred handler, once a second, over this
worker's own flows only: activity times are published to the table (no
shared write per packet), and flows idle for :data:`PING_TIMEOUT` seconds
are closed and removed in one batch.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING

from shardswitch.net import icmp, icmpv6
from shardswitch.net.drop import DropReason, PacketError
from shardswitch.net.icmpv6 import Icmpv6Message, Icmpv6Type
from shardswitch.net.ipv4 import IpProto, Ipv4Packet
from shardswitch.net.ipv6 import Ipv6Packet
from shardswitch.shm.layout import (
    FlowRef,
    FlowSide,
    FlowTableError,
    FlowType,
    Pif,
    ip16,
    pack_key,
)
from shardswitch.worker.activity import sync_table

if TYPE_CHECKING:
    from shardswitch.shm.table import FlowTable
    from shardswitch.worker.main import Worker

log = logging.getLogger("shardswitch.worker")

#: Idle echo flows expire after this many seconds (as passt).
PING_TIMEOUT = 60.0
ECHO_REPLY4 = icmp.IcmpType.ECHO_REPLY
ECHO_REPLY6 = Icmpv6Type.ECHO_REPLY
#: Our end of a host-side socket: chosen by the kernel.
ANY16 = bytes(16)

#: Drop reasons of this module (shown in ``shardswitch status``).
PING_SOCKET_ERROR = "PING_SOCKET_ERROR"
PING_SEND_ERROR = "PING_SEND_ERROR"
PING_TABLE_FULL = "PING_TABLE_FULL"


@dataclass(slots=True)
class PingFlow:
    """One echo flow owned by this worker."""

    ref: FlowRef
    key: bytes
    sock: socket.socket
    v6: bool
    #: The guest's echo identifier (the kernel uses its own on the host side).
    guest_ident: int
    #: The guest's address and the address it pinged (source of the replies).
    guest_addr: bytes
    remote: bytes
    last: float
    published: float = 0.0


class PingFlows:
    """Every echo flow of one worker."""

    def __init__(self, w: Worker, table: FlowTable | None, mapped: tuple[str, ...]) -> None:
        """Serve echo for worker ``w``; ``mapped``: addresses that mean the host's loopback."""
        self.w = w
        self.table = table
        self.mapped4 = {ipaddress.ip_address(a).packed for a in mapped if ":" not in a}
        self.mapped6 = {ipaddress.ip_address(a).packed for a in mapped if ":" in a}
        self.flows: dict[bytes, PingFlow] = {}
        self.by_fd: dict[int, PingFlow] = {}
        w.endpoint.register_ip_protocol(IpProto.ICMP, self.handle4)
        w.endpoint.register_icmpv6_type(Icmpv6Type.ECHO_REQUEST, self.handle6)
        w.tick_handlers.append(self.tick)

    # -- from the guest ------------------------------------------------------

    def handle4(self, eth_src: bytes, packet: Ipv4Packet, now: float, out: list[bytes]) -> None:
        """An ICMP packet from the guest (endpoint handler)."""
        echo = icmp.parse_echo(packet)
        if echo is None:
            raise PacketError(DropReason.ICMP_IGNORED)
        src = packet.src.to_bytes(4, "big")
        dst = packet.dst.to_bytes(4, "big")
        self._request(False, src, dst, echo.ident, echo.seq, echo.payload, now)

    def handle6(self, eth_src: bytes, packet: Ipv6Packet, message: Icmpv6Message, now: float,
                out: list[bytes]) -> None:
        """An ICMPv6 echo request from the guest (endpoint handler)."""
        echo = icmpv6.echo_of(message)
        if echo is None:
            raise PacketError(DropReason.ICMPV6_IGNORED)
        self._request(True, packet.src, packet.dst, echo.ident, echo.seq, echo.payload, now)

    def _request(self, v6: bool, src: bytes, dst: bytes, ident: int, seq: int, payload: memoryview,
                 now: float) -> None:
        """Send one echo request on its flow's socket, creating or finding the flow first."""
        ftype = FlowType.PING6 if v6 else FlowType.PING4
        guest_side = FlowSide(Pif.GUEST, ip16(src), ident, ip16(dst), 0)
        key = pack_key(ftype, guest_side)
        flow = self.flows.get(key)
        if flow is None:
            flow = self._resolve(ftype, key, guest_side, v6, src, dst, ident, now)
            if flow is None:
                return
        build = icmpv6.build_ping_request if v6 else icmp.build_ping_request
        try:
            flow.sock.send(build(0, seq, payload))
        except OSError as err:
            self.w.counters.drops[PING_SEND_ERROR] += 1
            log.debug("echo to %s: %s", ipaddress.ip_address(dst), err.strerror)
            return
        flow.last = now

    def _resolve(self, ftype: FlowType, key: bytes, guest_side: FlowSide, v6: bool, src: bytes, dst: bytes,
                 ident: int, now: float) -> PingFlow | None:
        """A flow this worker does not know: hand the frame to its owner, or create the flow here."""
        if self.w.owned_elsewhere(ftype, guest_side):
            return None
        return self._create(ftype, key, guest_side, v6, src, dst, ident, now)

    def _open_socket(self, v6: bool, dst: bytes) -> tuple[socket.socket, str]:
        """A ping socket connected to ``dst`` (the loopback when ``dst`` is mapped), and where it points."""
        if v6:
            sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM, socket.IPPROTO_ICMPV6)
            target = "::1" if dst in self.mapped6 else str(ipaddress.IPv6Address(dst))
        else:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP)
            target = "127.0.0.1" if dst in self.mapped4 else str(ipaddress.IPv4Address(dst))
        try:
            sock.setblocking(False)
            sock.connect((target, 0))
        except OSError:
            sock.close()
            raise
        return sock, target

    def _create(self, ftype: FlowType, key: bytes, guest_side: FlowSide, v6: bool, src: bytes, dst: bytes,
                ident: int, now: float) -> PingFlow | None:
        """Open the socket, enter the flow in the table (one flow even if two workers race), watch it."""
        try:
            sock, target = self._open_socket(v6, dst)
        except OSError as err:
            self.w.counters.drops[PING_SOCKET_ERROR] += 1
            if err.errno in (errno.EACCES, errno.EPERM):
                log.error("ICMP echo sockets are not allowed for this group: "
                          "see sysctl net.ipv4.ping_group_range")
            return None
        # A ping socket's local "port" is the echo identifier the kernel puts on the host side.
        host_side = FlowSide(Pif.HOST, ip16(target), 0, ANY16, sock.getsockname()[1])
        ref = FlowRef(-1, 0)
        table = self.table
        if table is not None:
            try:
                entered = table.enter(ftype, guest_side, host_side, self.w.pair, now)
            except FlowTableError as err:
                sock.close()
                self.w.counters.drops[PING_TABLE_FULL] += 1
                log.warning("echo flow not created: %s", err)
                return None
            if entered is None:
                # Another worker entered the same flow first: it is the owner.
                sock.close()
                hit = table.lookup(ftype, guest_side)
                if hit is not None:
                    self.w.hand_over(hit.owner)
                return None
            ref = entered
        flow = PingFlow(ref, key, sock, v6, ident, src, dst, now)
        self.flows[key] = flow
        self.by_fd[sock.fileno()] = flow
        fd = sock.fileno()
        self.w.watch(fd, lambda: self.on_readable(fd))
        return flow

    # -- from the host ---------------------------------------------------------

    def on_readable(self, fd: int) -> None:
        """Replies on a flow's socket: re-stamp and queue them for the guest."""
        flow = self.by_fd.get(fd)
        if flow is None:
            return
        w = self.w
        guest_mac = w.endpoint.guest_mac
        our_mac = w.endpoint.resolved.our_mac
        pending = w.pending
        while True:
            try:
                data = flow.sock.recv(65536)
            except BlockingIOError:
                break
            except OSError as err:
                # ICMP errors (unreachable...) surface as socket errors: nothing to relay yet.
                log.debug("echo flow %s: %s", flow.ref, err.strerror)
                continue
            parse = icmpv6.parse_ping_reply if flow.v6 else icmp.parse_ping_reply
            reply = parse(data)
            if reply is None or guest_mac is None or reply.type != (ECHO_REPLY6 if flow.v6 else ECHO_REPLY4):
                continue
            if flow.v6:
                frame = icmpv6.build_echo_reply_frame(guest_mac, our_mac, flow.remote, flow.guest_addr,
                                                      flow.guest_ident, reply.seq, reply.payload)
            else:
                frame = icmp.build_echo_reply_frame(guest_mac, our_mac, int.from_bytes(flow.remote, "big"),
                                                    int.from_bytes(flow.guest_addr, "big"), flow.guest_ident,
                                                    reply.seq, reply.payload)
            pending.append(frame)
        if pending:
            w.deliver_pending()

    # -- timers ---------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Deferred handler: publish activity times, expire idle flows (this worker's only)."""
        expired = [f for f in self.flows.values() if now - f.last > PING_TIMEOUT]
        for flow in expired:
            self._close(flow)
        sync_table(self.table, self.flows.values(), expired)

    def _close(self, flow: PingFlow) -> None:
        """Forget a flow locally and close its socket."""
        fd = flow.sock.fileno()
        self.w.unwatch(fd)
        self.by_fd.pop(fd, None)
        self.flows.pop(flow.key, None)
        flow.sock.close()

    def close(self) -> None:
        """Close every flow (the worker is stopping; the coordinator frees the table entries)."""
        for flow in list(self.flows.values()):
            self._close(flow)
