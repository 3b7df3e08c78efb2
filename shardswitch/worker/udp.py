"""UDP flows of one worker, both ways: the socket side of passt's udp.c / udp_flow.c.

Theory of operation.  A UDP flow is the pair (guest address and port, the
address and port on the other side as the guest sees them).  There are two
kinds:

* guest-initiated: the first datagram from the guest to a new destination
  creates the flow and a host socket *connected* to the destination - or to
  127.0.0.1/::1 when the guest addressed a mapped address
  (``--map-host-loopback``, the gateway by default), or to the host's
  resolver when it addressed the ``--dns-forward`` address on port 53
  (:mod:`shardswitch.worker.dns`).  What the socket receives goes back to
  the guest from the address and port the guest sent to;
* host-initiated (``-u SPEC``): every worker has its own listening socket
  per forwarded port, bound with ``SO_REUSEPORT`` so that the kernel spreads
  clients over the workers (by a hash of the addresses: one client always
  reaches the same worker).  A datagram from a new client creates a flow
  owned by the worker that received it; it reaches the guest's port (the
  ``:TO`` mapping) from the client's address, or from the mapped gateway
  address when the client is on the host's loopback.  The guest's replies
  are sent back with ``sendto`` on the same listening socket, so they come
  from the forwarded port.

Every flow is entered in the shared flow table (type UDP; for guest flows
side 0 is the guest, for forwarded flows side 0 is the host client) and in
this worker's local index, keyed by its guest side.  A guest datagram for a
flow another worker owns is handed, unchanged, to the owner
(:mod:`shardswitch.worker.peers`), as for echo flows.

ICMP errors: guest flows' sockets have ``IP_RECVERR`` / ``IPV6_RECVERR``
set, so an ICMP error about a datagram the guest sent (port unreachable from
the host's loopback, unreachable or too big from a router) is read from the
socket's error queue (:mod:`shardswitch.worker.sockerr`) and relayed to the
guest as the same ICMP or ICMPv6 error about the datagram as the guest sent
it, from the address the guest sent to (or from the router's address): the
guest's client fails at once instead of waiting for a reply, as on a real
network.

Sockets are read in batches of up to :data:`RECV_BATCH` datagrams per
readiness event into one reused buffer; the frame builder copies the
payload once.  Timers run in the worker's deferred handler, over this
worker's own flows only: a flow idle for :data:`UDP_TIMEOUT` seconds is
closed, or after :data:`UDP_TIMEOUT_BOTH` seconds once traffic went both
ways; activity times are published to the table once a second.

Checksum offload: a guest datagram whose virtio-net header had NEEDS_CSUM
(``endpoint.csum_partial``) is not checksum-verified; frames to a guest that
negotiated GUEST_CSUM (``w.rx_data_valid``: their header carries DATA_VALID)
are built without a UDP checksum (0 over IPv4, which means none; a non-zero
placeholder over IPv6, where 0 is refused even then), others with a full one.
IPv6 UDP is parsed and built by :mod:`shardswitch.net.udp` (``parse6``, ``build_frame6``);
IPv4 uses :mod:`shardswitch.net.udp`.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from shardswitch import portspec
from shardswitch.net import eth, icmp, icmpv6, ipv6, udp
from shardswitch.net.drop import DropReason, PacketError
from shardswitch.net.ipv4 import Ipv4Packet
from shardswitch.net.ipv6 import Ipv6Packet, NextHeader
from shardswitch.net.udp import UdpDatagram
from shardswitch.shm.layout import (
    FlowRef,
    FlowSide,
    FlowTableError,
    FlowType,
    Pif,
    ip16,
    pack_key,
)
from shardswitch.worker import sockerr
from shardswitch.worker.activity import sync_table
from shardswitch.worker.dns import DnsForward
from shardswitch.worker.listen import Listener, open_listeners

if TYPE_CHECKING:
    from shardswitch.shm.table import FlowTable
    from shardswitch.worker.main import Worker

log = logging.getLogger("shardswitch.worker")

#: Idle flows expire after this many seconds (as passt)...
UDP_TIMEOUT = 30.0
#: ... or after this many once traffic has gone both ways.
UDP_TIMEOUT_BOTH = 180.0
#: Most datagrams read from one socket per readiness event.
RECV_BATCH = 64
#: Receive buffer: the largest UDP payload.
RECV_SIZE = 0xFFFF

#: Drop reasons of this module (shown in ``shardswitch status``).
UDP_SOCKET_ERROR = "UDP_SOCKET_ERROR"
UDP_SEND_ERROR = "UDP_SEND_ERROR"
UDP_TABLE_FULL = "UDP_TABLE_FULL"
UDP_TOO_BIG = "UDP_TOO_BIG"
UDP_NO_GUEST_ADDRESS = "UDP_NO_GUEST_ADDRESS"
UDP_FLOW_CONFLICT = "UDP_FLOW_CONFLICT"
#: Guest datagrams that drew an ICMP error (port unreachable...) on the host side, relayed to the guest.
UDP_HOST_ICMP_ERROR = "UDP_HOST_ICMP_ERROR"

#: Destination MAC of frames to a guest whose MAC this worker has not learnt yet.
BROADCAST_MAC = b"\xff" * 6


# -- flows ----------------------------------------------------------------------------


def _is_loopback(addr: bytes) -> bool:
    """True for 127.0.0.0/8 and ::1."""
    return addr[0] == 127 if len(addr) == 4 else addr == ipv6.LOOPBACK


@dataclass(slots=True)
class UdpFlow:
    """One UDP flow owned by this worker."""

    ref: FlowRef
    #: Key of the guest side (local index).
    key: bytes
    sock: socket.socket
    #: The guest side is IPv6.
    v6: bool
    #: The guest's address and port.
    guest_addr: bytes
    guest_port: int
    #: The address and port the guest talks to (source of what it receives).
    remote: bytes
    remote_port: int
    #: Where the guest's datagrams go on a shared listening socket; None: ``sock`` is connected.
    peer: tuple[Any, ...] | None
    last: float
    #: The host address ``sock`` is connected to (4 or 16 bytes; empty for forwarded flows).
    target: bytes = b""
    from_guest: bool = False
    from_host: bool = False
    published: float = 0.0

    @property
    def timeout(self) -> float:
        """Idle time after which the flow expires."""
        return UDP_TIMEOUT_BOTH if self.from_guest and self.from_host else UDP_TIMEOUT


class UdpFlows:
    """Every UDP flow and forwarded-port listener of one worker."""

    def __init__(self, w: Worker, table: FlowTable | None, mapped: tuple[str, ...],
                 udp_ports: tuple[str, ...], dns: DnsForward | None) -> None:
        """Serve UDP for worker ``w``.

        ``mapped``: addresses meaning the host's loopback; ``udp_ports``: the
        -u SPECs; ``dns``: where traffic to the DNS-forwarding address's port 53 goes.
        """
        self.w = w
        self.table = table
        self.dns = dns
        addrs = [ipaddress.ip_address(a) for a in mapped]
        self.mapped4 = [a.packed for a in addrs if a.version == 4]
        self.mapped6 = [a.packed for a in addrs if a.version == 6]
        #: Local index: guest-side key -> flow.
        self.flows: dict[bytes, UdpFlow] = {}
        #: Connected sockets of guest-initiated flows: descriptor -> flow.
        self.by_fd: dict[int, UdpFlow] = {}
        #: Forwarded flows: (listener descriptor, client address, client port) -> flow.
        self.inbound: dict[tuple[int, str, int], UdpFlow] = {}
        self.listeners: dict[int, Listener] = {}
        #: The guest's IPv6 address as last seen (the destination of forwarded IPv6 clients).
        self.guest6: bytes | None = w.endpoint.resolved.address6
        self.buf = bytearray(RECV_SIZE)
        self.view = memoryview(self.buf)
        w.endpoint.set_udp_default(self.handle4)
        w.endpoint.register_ip6_protocol(NextHeader.UDP, self.handle6)
        w.tick_handlers.append(self.tick)
        if udp_ports:
            self.listeners = open_listeners(portspec.parse_all(udp_ports, "-u", portspec.read_ephemeral()),
                                            socket.SOCK_DGRAM, "-u", w.pair, w.watch, self.on_listener)

    # -- from the guest ------------------------------------------------------

    def handle4(self, eth_src: bytes, packet: Ipv4Packet, datagram: UdpDatagram, now: float,
                out: list[bytes]) -> None:
        """A UDP datagram over IPv4 from the guest (endpoint default UDP handler)."""
        dst = packet.dst
        if dst >> 28 == 0xE or dst == 0xFFFFFFFF or dst >> 24 in (0, 127) or not datagram.dst_port:
            raise PacketError(DropReason.UDP_PORT_UNHANDLED, "multicast, broadcast or local destination")
        self._from_guest(False, packet.src.to_bytes(4, "big"), datagram.src_port, dst.to_bytes(4, "big"),
                         datagram.dst_port, datagram.payload, now)

    def handle6(self, eth_src: bytes, packet: Ipv6Packet, now: float, out: list[bytes]) -> None:
        """A UDP datagram over IPv6 from the guest (endpoint handler for next header 17)."""
        datagram = udp.parse6(packet, not self.w.endpoint.csum_partial)
        dst = packet.dst
        if ipv6.is_multicast(dst) or ipv6.is_unspecified(dst) or dst == ipv6.LOOPBACK \
                or not datagram.dst_port or ipv6.is_unspecified(packet.src):
            raise PacketError(DropReason.UDP_PORT_UNHANDLED, "multicast or local destination")
        if not ipv6.is_link_local(packet.src) or self.guest6 is None:
            self.guest6 = packet.src
        self._from_guest(True, packet.src, datagram.src_port, dst, datagram.dst_port, datagram.payload, now)

    def _from_guest(self, v6: bool, src: bytes, sport: int, dst: bytes, dport: int, payload: memoryview,
                    now: float) -> None:
        """Send one guest datagram on its flow, creating or finding the flow first."""
        guest_side = FlowSide(Pif.GUEST, ip16(src), sport, ip16(dst), dport)
        key = pack_key(FlowType.UDP, guest_side)
        flow = self.flows.get(key)
        if flow is None:
            flow = self._resolve(key, guest_side, v6, src, sport, dst, dport, now)
            if flow is None:
                return
        try:
            if flow.peer is None:
                flow.sock.send(payload)
            else:
                flow.sock.sendto(payload, flow.peer)
        except OSError as err:
            self.w.counters.drops[UDP_SEND_ERROR] += 1
            log.debug("UDP flow %s: send: %s", flow.ref, err.strerror)
            return
        flow.last = now
        flow.from_guest = True

    def _resolve(self, key: bytes, guest_side: FlowSide, v6: bool, src: bytes, sport: int, dst: bytes,
                 dport: int, now: float) -> UdpFlow | None:
        """A flow this worker does not know: hand the frame to its owner, or create the flow here."""
        if self.w.owned_elsewhere(FlowType.UDP, guest_side):
            return None
        return self._create(key, guest_side, v6, src, sport, dst, dport, now)

    def _target(self, v6: bool, dst: bytes, dport: int) -> tuple[str, int]:
        """Where a guest flow to ``dst``:``dport`` goes on the host: DNS forward, loopback, or ``dst``."""
        redirected = self.dns.target(dst, dport) if self.dns is not None else None
        if redirected is not None:
            return redirected
        if v6:
            return ("::1" if dst in self.mapped6 else ipv6.addr_to_str(dst)), dport
        return ("127.0.0.1" if dst in self.mapped4 else str(ipaddress.IPv4Address(dst))), dport

    def _create(self, key: bytes, guest_side: FlowSide, v6: bool, src: bytes, sport: int, dst: bytes,
                dport: int, now: float) -> UdpFlow | None:
        """Open a connected socket, enter the flow in the table, watch the socket."""
        target, tport = self._target(v6, dst, dport)
        family = socket.AF_INET6 if ":" in target else socket.AF_INET
        try:
            sock = socket.socket(family, socket.SOCK_DGRAM)
        except OSError as err:
            self.w.counters.drops[UDP_SOCKET_ERROR] += 1
            log.warning("UDP socket: %s", err.strerror)
            return None
        try:
            sock.setblocking(False)
            sockerr.enable(sock, family == socket.AF_INET6)
            sock.connect((target, tport))
            local = sock.getsockname()
        except OSError as err:
            sock.close()
            self.w.counters.drops[UDP_SOCKET_ERROR] += 1
            log.debug("UDP flow to %s port %d: %s", target, tport, err.strerror)
            return None
        host_side = FlowSide(Pif.HOST, ip16(target), tport, ip16(local[0]), local[1])
        ref = self._enter(guest_side, host_side, now)
        if ref is None:
            sock.close()
            return None
        flow = UdpFlow(ref, key, sock, v6, src, sport, dst, dport, None, now,
                       target=ipaddress.ip_address(target).packed)
        self.flows[key] = flow
        fd = sock.fileno()
        self.by_fd[fd] = flow
        self.w.watch(fd, lambda: self.on_readable(fd))
        return flow

    def _enter(self, initiator: FlowSide, target: FlowSide, now: float) -> FlowRef | None:
        """Enter a flow in the table (a dummy reference without one); None: not entered (counted)."""
        table = self.table
        if table is None:
            return FlowRef(-1, 0)
        try:
            ref = table.enter(FlowType.UDP, initiator, target, self.w.pair, now)
        except FlowTableError as err:
            self.w.counters.drops[UDP_TABLE_FULL] += 1
            log.warning("UDP flow not created: %s", err)
            return None
        if ref is None:
            # Another worker entered the same flow first: it is the owner.
            hit = table.lookup(FlowType.UDP, initiator)
            if hit is not None and initiator.pif == Pif.GUEST and hit.owner != self.w.pair:
                self.w.hand_over(hit.owner)
            else:
                self.w.counters.drops[UDP_FLOW_CONFLICT] += 1
        return ref

    # -- to the guest ----------------------------------------------------------------

    def _to_guest(self, flow: UdpFlow, payload: memoryview, now: float) -> None:
        """Queue one datagram for the guest on ``flow`` (from its remote side)."""
        w = self.w
        # A worker that has seen no frame of the guest yet does not know its MAC: broadcast, as passt.
        guest_mac = w.endpoint.guest_mac or BROADCAST_MAC
        headers = udp.FRAME6_HEADERS_LEN if flow.v6 else udp.FRAME_HEADERS_LEN
        if len(payload) + headers - eth.ETH_HLEN > w.endpoint.resolved.mtu:
            w.counters.drops[UDP_TOO_BIG] += 1
            return
        our_mac = w.endpoint.resolved.our_mac
        csum = not w.rx_data_valid
        if flow.v6:
            frame = udp.build_frame6(guest_mac, our_mac, flow.remote, flow.guest_addr, flow.remote_port,
                                 flow.guest_port, payload, csum)
        else:
            frame = udp.build_frame(guest_mac, our_mac, int.from_bytes(flow.remote, "big"),
                                    int.from_bytes(flow.guest_addr, "big"), flow.remote_port, flow.guest_port,
                                    payload, csum=csum)
        w.pending.append(frame)
        flow.last = now
        flow.from_host = True

    def on_readable(self, fd: int) -> None:
        """Datagrams on a guest flow's connected socket: queue them for the guest."""
        flow = self.by_fd.get(fd)
        if flow is None:
            return
        now = self._now()
        view = self.view
        errors = False
        received = 0
        for _ in range(RECV_BATCH):
            try:
                n = flow.sock.recv_into(self.buf)
            except BlockingIOError:
                break
            except OSError as err:
                # An ICMP error (port unreachable...): its details wait on the error queue.
                log.debug("UDP flow %s: %s", flow.ref, err.strerror)
                errors = True
                continue
            received += 1
            self._to_guest(flow, view[:n], now)
        if errors or not received:
            # Woken without data: EPOLLERR, an error queued without a pending socket error.
            self._relay_errors(flow, now)
        self.w.deliver_pending()

    def _relay_errors(self, flow: UdpFlow, now: float) -> None:
        """ICMP errors about the flow's datagrams, to the guest as ICMP errors about what it sent."""
        w = self.w
        quote_max = icmpv6.MAX_QUOTE if flow.v6 else icmp.MAX_QUOTE
        for error in sockerr.read_errors(flow.sock, quote_max):
            if error.origin != (sockerr.EeOrigin.ICMP6 if flow.v6 else sockerr.EeOrigin.ICMP):
                continue
            guest_mac = w.endpoint.guest_mac or BROADCAST_MAC
            our_mac = w.endpoint.resolved.our_mac
            # From what the guest addressed when the destination itself answered (or stands for the
            # host's loopback), else from the router that did.
            source = flow.remote
            offender = error.offender
            if offender is not None and offender != flow.target and not _is_loopback(offender):
                source = offender
            payload = error.payload
            if flow.v6:
                quoted = udp.build_frame6(our_mac, guest_mac, flow.guest_addr, flow.remote, flow.guest_port,
                                          flow.remote_port, payload)[eth.ETH_HLEN:]
                frame = icmpv6.build_error_frame(guest_mac, our_mac, source, flow.guest_addr, error.icmp_type,
                                                 error.code, error.info, quoted)
            else:
                quoted = udp.build_frame(our_mac, guest_mac, int.from_bytes(flow.guest_addr, "big"),
                                         int.from_bytes(flow.remote, "big"), flow.guest_port, flow.remote_port,
                                         payload)[eth.ETH_HLEN:]
                frame = icmp.build_error_frame(guest_mac, our_mac, int.from_bytes(source, "big"),
                                               int.from_bytes(flow.guest_addr, "big"), error.icmp_type,
                                               error.code, error.info & 0xFFFF, quoted)
            w.pending.append(frame)
            w.counters.drops[UDP_HOST_ICMP_ERROR] += 1
            flow.last = now

    @staticmethod
    def _now() -> float:
        """The monotonic clock (socket callbacks get no ``now``)."""
        return time.monotonic()

    # -- forwarded ports ------------------------------------------------------------------

    def on_listener(self, fd: int) -> None:
        """Datagrams from host clients on a forwarded port: to the guest, on their flows."""
        listener = self.listeners.get(fd)
        if listener is None:
            return
        now = self._now()
        view = self.view
        for _ in range(RECV_BATCH):
            try:
                n, peer = listener.sock.recvfrom_into(self.buf)
            except BlockingIOError:
                break
            except OSError as err:
                log.debug("-u port %d: %s", listener.port, err.strerror)
                continue
            flow = self.inbound.get((fd, peer[0], peer[1]))
            if flow is None:
                flow = self._create_inbound(fd, listener, peer, now)
                if flow is None:
                    continue
            self._to_guest(flow, view[:n], now)
        self.w.deliver_pending()

    def _create_inbound(self, fd: int, listener: Listener, peer: tuple[Any, ...],
                        now: float) -> UdpFlow | None:
        """A new host client (``peer``, a socket address) of a forwarded port: a flow towards the guest."""
        cport: int = peer[1]
        client = ipaddress.ip_address(peer[0].split("%")[0])
        if isinstance(client, ipaddress.IPv6Address) and client.ipv4_mapped is not None:
            client = client.ipv4_mapped
        v6 = client.version == 6
        if client.is_loopback:
            shown = self.mapped6 if v6 else self.mapped4
            if not shown:
                self.w.counters.drops[UDP_NO_GUEST_ADDRESS] += 1
                return None
            remote = shown[0]
        else:
            remote = client.packed
        guest = self.guest6 if v6 else self.w.endpoint.resolved.address.to_bytes(4, "big")
        if guest is None:
            self.w.counters.drops[UDP_NO_GUEST_ADDRESS] += 1
            return None
        host_side = FlowSide(Pif.HOST, ip16(client.packed), cport, listener.bound, listener.port)
        guest_side = FlowSide(Pif.GUEST, ip16(guest), listener.guest_port, ip16(remote), cport)
        key = pack_key(FlowType.UDP, guest_side)
        existing = self.flows.get(key)
        if existing is not None:
            # The guest side is taken by a flow of ours (the guest already talks to that address and port).
            return existing
        ref = self._enter(host_side, guest_side, now)
        if ref is None:
            return None
        flow = UdpFlow(ref, key, listener.sock, v6, guest, listener.guest_port, remote, cport,
                       peer, now)
        self.flows[key] = flow
        self.inbound[(fd, peer[0], cport)] = flow
        return flow

    # -- timers ------------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Deferred handler: publish activity times, expire idle flows (this worker's only)."""
        expired = [f for f in self.flows.values() if now - f.last > f.timeout]
        for flow in expired:
            self._close(flow)
        sync_table(self.table, self.flows.values(), expired)

    def _close(self, flow: UdpFlow) -> None:
        """Forget a flow locally and close its socket (not a shared listening socket)."""
        self.flows.pop(flow.key, None)
        if flow.peer is not None:
            fd = flow.sock.fileno()
            self.inbound.pop((fd, flow.peer[0], flow.peer[1]), None)
            return
        fd = flow.sock.fileno()
        self.w.unwatch(fd)
        self.by_fd.pop(fd, None)
        flow.sock.close()

    def close(self) -> None:
        """Close every flow and listener (the worker is stopping; the coordinator frees the table entries)."""
        for flow in list(self.flows.values()):
            self._close(flow)
        for fd, listener in list(self.listeners.items()):
            self.w.unwatch(fd)
            listener.sock.close()
        self.listeners.clear()
