"""UDP flows of one worker, both ways: the socket side of passt's udp.c / udp_flow.c.

Theory of operation.  A UDP flow is the pair (guest address and port, the
address and port on the other side as the guest sees them).  There are two
kinds:

* guest-initiated: the first datagram from the guest to a new destination
  creates the flow and a host socket *connected* to the destination - or to
  127.0.0.1/::1 when the guest addressed a mapped address
  (``--map-host-loopback``, the gateway by default), or to the host's
  resolver when it addressed the ``--dns-forward`` address on port 53.  What the socket receives goes back to
  the guest from the address and port the guest sent to;
* host-initiated (``-u SPEC``): every worker has its own listening socket
  per forwarded port, bound with ``SO_REUSEPORT`` so that the kernel spreads
  clients over the workers (by a hash of the addresses: one client always
  reaches the same worker).  A datagram from a new client creates a flow
  owned by the worker that received it; it reaches the guest's port (the
  ``:TO`` mapping) from the client's address, or from the mapped gateway
  address when the client is on the host's loopback.  The guest's replies
  are sent back with ``sendto`` on the same listening socket, so they come
  from the forwarded port.  A rule naming a target address inside the guest
  (``-u 0.0.0.0/5000:192.0.2.5/6000``) sends them there instead of the
  guest's own address, as the flow policy allows.

Forwarding rules change at run time (``shardswitch forward``): :meth:`UdpFlows.add_listeners` adopts the
sockets of a new rule; :meth:`UdpFlows.remove_listeners` closes those of a removed one, except one that
still carries flows: that one *drains*, its flows going on both ways while datagrams from new clients are
dropped (UDP_FORWARD_REMOVED), and closes with its last flow.  A rule added again for the same port and
address takes the draining socket's flows over, and the draining socket closes at once.

The life of a flow - the shared table (type UDP; for guest flows side 0 is
the guest, for forwarded flows side 0 is the host client), the local index
keyed by its guest side, hand-over of a datagram for a flow another worker
owns, the once-a-second timers - is the flow layer's
(:mod:`shardswitch.worker.flow`); where a flow goes on the host and whom a
forwarded client appears as in the guest is
:class:`~shardswitch.worker.fwd.Forwarding`'s.  This module plugs in its
hooks (:class:`UdpFlows`).

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
worker's own flows only: as in passt, each flow counts the datagrams of its
initiating and of its target side, and is closed once idle for the host's
conntrack UDP timeout (30 s by default), or for its stream timeout (120 s)
once the target side answered and either side sent more than one datagram
(:mod:`shardswitch.worker.udptimeout`: the rule, and the values the
coordinator read).  Activity times and the timeout each flow is under are
published to the table once a second (``shardswitch flows`` shows them).

Checksum offload: a guest datagram whose virtio-net header had NEEDS_CSUM
(``csum_partial`` of its IP packet) is not checksum-verified; frames to a
guest that negotiated GUEST_CSUM (``offloads.data_valid``: their header
carries DATA_VALID) are built without a UDP checksum (0 over IPv4, which
means none; a non-zero placeholder over IPv6, where 0 is refused even then),
others with a full one.  Addresses are 16-byte inany values; the frames are
built by :mod:`shardswitch.net.flowframes`, which picks the family.
"""


from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

from shardswitch.ipc import PortFd
from shardswitch.net import eth, flowframes, inany
from shardswitch.net.drop import DropReason, PacketError
from shardswitch.net.endpoint import GuestEndpoint
from shardswitch.net.inany import InAny
from shardswitch.net.ipv4 import Ipv4Packet
from shardswitch.net.ipv6 import Ipv6Packet
from shardswitch.net.udp import UdpDatagram
from shardswitch.shm.layout import FlowSide, FlowType, Pif, pack_key
from shardswitch.worker import sockerr
from shardswitch.worker.counters import Event
from shardswitch.worker.flow import FlowBase, FlowLayer, NewFlow
from shardswitch.worker.listen import Listener, adopt_listeners
from shardswitch.worker.port import WorkerPort
from shardswitch.worker.udptimeout import ACTIVITY_MAX, UdpTimeouts, choose

log = logging.getLogger("shardswitch.worker")

#: Most datagrams read from one socket per readiness event.
RECV_BATCH = 64
#: Receive buffer: the largest UDP payload.
RECV_SIZE = 0xFFFF
#: Destination MAC of frames to a guest whose MAC this worker has not learnt yet.
BROADCAST_MAC = b"\xff" * 6


@dataclass(slots=True, eq=False, kw_only=True)
class UdpFlow(FlowBase):
    """One UDP flow owned by this worker."""

    sock: socket.socket
    #: The guest's address and port.
    guest_addr: InAny
    guest_port: int
    #: The address and port the guest talks to (source of what it receives).
    remote: InAny
    remote_port: int
    #: Where the guest's datagrams go on a shared listening socket; None: ``sock`` is connected.
    peer: tuple[Any, ...] | None = None
    #: The host address ``sock`` is connected to (unspecified for forwarded flows).
    target: InAny = inany.ANY6
    #: Datagrams from the guest and from the host, each saturating at ACTIVITY_MAX (passt's activity[]).
    from_guest: int = 0
    from_host: int = 0

    def timeout(self, timeouts: UdpTimeouts) -> int:
        """The idle timeout the flow is under (passt's rule over its sides' datagram counts)."""
        if self.peer is None:               # the guest initiated it
            return choose(timeouts, self.from_guest, self.from_host)
        return choose(timeouts, self.from_host, self.from_guest)


class UdpFlows:
    """Every UDP flow and forwarded-port listener of one worker: the flow layer's hooks for UDP."""

    table_full = DropReason.UDP_TABLE_FULL
    conflict = DropReason.UDP_FLOW_CONFLICT

    def __init__(self, port: WorkerPort, layer: FlowLayer, listeners: tuple[PortFd, ...] = (),
                 timeouts: UdpTimeouts = UdpTimeouts()) -> None:
        """Serve UDP for ``port``'s worker through ``layer``; ``listeners``: its sockets of -u ports;
        ``timeouts``: the idle timeouts of its flows."""
        self.port = port
        self.timeouts = timeouts
        self.layer = layer
        self.fwd = layer.fwd
        #: Forwarded flows: (listener descriptor, client address, client port) -> flow.
        self.inbound: dict[tuple[int, str, int], UdpFlow] = {}
        self.buf = bytearray(RECV_SIZE)
        self.view = memoryview(self.buf)
        layer.register((FlowType.UDP,), self)
        self.listeners: dict[int, Listener] = adopt_listeners(listeners, port.watch, self.on_listener)
        #: Listeners of removed rules kept open for the flows they still carry, by descriptor.
        self.draining: dict[int, Listener] = {}

    def plug_into(self, endpoint: GuestEndpoint) -> None:
        """Route the guest's UDP here: every port without a handler of its own (i.e. not DHCP, DHCPv6)."""
        endpoint.set_udp_default(self.handle4)
        endpoint.set_udp6_default(self.handle6)

    # -- from the guest ------------------------------------------------------

    def handle4(self, eth_src: bytes, packet: Ipv4Packet, datagram: UdpDatagram, now: float,
                out: list[bytes]) -> None:
        """A UDP datagram over IPv4 from the guest (endpoint default UDP handler)."""
        self._from_guest(inany.from_v4(packet.src), datagram.src_port, inany.from_v4(packet.dst),
                         datagram.dst_port, datagram.payload, now)

    def handle6(self, eth_src: bytes, packet: Ipv6Packet, datagram: UdpDatagram, now: float,
                out: list[bytes]) -> None:
        """A UDP datagram over IPv6 from the guest (endpoint default IPv6 UDP handler)."""
        self._from_guest(packet.src, datagram.src_port, packet.dst, datagram.dst_port, datagram.payload, now)

    def _from_guest(self, src: InAny, sport: int, dst: InAny, dport: int, payload: memoryview, now: float) -> None:
        """Send one guest datagram on its flow, creating the flow first if needed (datagrams to broadcast,
        multicast and other addresses the flow policy refuses are dropped under its reason, with no socket
        and no log line)."""
        found = self.layer.find(FlowType.UDP, FlowSide(Pif.GUEST, src, sport, dst, dport))
        flow = self._create(found, now) if isinstance(found, NewFlow) else found
        assert isinstance(flow, UdpFlow)
        flow.last = now
        if flow.from_guest < ACTIVITY_MAX:
            flow.from_guest += 1
        try:
            if flow.peer is None:
                flow.sock.send(payload)
            else:
                flow.sock.sendto(payload, flow.peer)
        except OSError as err:
            log.debug("UDP flow %s: send: %s", flow.ref, err.strerror)
            raise PacketError(DropReason.UDP_SEND_ERROR, err.strerror or "") from None

    def _create(self, new: NewFlow, now: float, local_port: int = 0) -> UdpFlow:
        """Open a socket connected to the policy's target (from ``local_port`` when not 0), enter and index
        the flow."""
        guest_side = new.guest_side
        target, tport = new.target, new.port
        family = inany.family(target)
        try:
            sock = socket.socket(family, socket.SOCK_DGRAM)
        except OSError as err:
            self.port.loglimit.warning("udp socket", "UDP socket: %s", err.strerror)
            raise PacketError(DropReason.UDP_SOCKET_ERROR, err.strerror or "") from None
        try:
            sock.setblocking(False)
            sockerr.enable(sock, family == socket.AF_INET6)
            failed = self.fwd.connect(sock, target, tport, local_port)
            if failed:
                raise OSError(failed, os.strerror(failed))
            local = sock.getsockname()
            host_side = FlowSide(Pif.HOST, target, tport, inany.from_str(local[0]), local[1])
            ref = self.layer.enter(FlowType.UDP, guest_side, host_side, now)
        except OSError as err:
            sock.close()
            log.debug("UDP flow to %s port %d: %s", inany.to_str(target), tport, err.strerror)
            raise PacketError(DropReason.UDP_SOCKET_ERROR, err.strerror or "") from None
        except BaseException:
            sock.close()
            raise
        flow = UdpFlow(ref=ref, ftype=FlowType.UDP, key=new.key, last=now, sock=sock, guest_addr=guest_side.ep_addr,
                       guest_port=guest_side.ep_port, remote=guest_side.our_addr, remote_port=guest_side.our_port,
                       target=target, idle_timeout=self.timeouts.timeout)
        self.layer.add(flow, sock.fileno())
        return flow

    def recreate(self, guest_side: FlowSide, local_port: int, now: float) -> UdpFlow:
        """A flow the guest started, re-created by a migration: where the flow policy says it goes (as a
        new flow would), from the same local port when it is free.

        Raises PacketError when the policy refuses it or no socket can be made.
        """
        new = self.layer.new_flow(FlowType.UDP, guest_side)
        try:
            return self._create(new, now, local_port)
        except PacketError:
            if not local_port:
                raise
        return self._create(new, now)

    # -- to the guest ----------------------------------------------------------------

    def _to_guest(self, flow: UdpFlow, payload: memoryview, now: float) -> None:
        """Queue one datagram for the guest on ``flow`` (from its remote side)."""
        flow.last = now
        if flow.from_host < ACTIVITY_MAX:
            flow.from_host += 1
        port = self.port
        params = port.params
        if len(payload) + flowframes.udp_headers_len(flow.remote) - eth.ETH_HLEN > params.mtu:
            port.drop(DropReason.UDP_TOO_BIG)
            return
        # A worker that has seen no frame of the guest yet does not know its MAC: broadcast, as passt.
        port.queue.append(flowframes.udp_frame(port.guest_mac or BROADCAST_MAC, params.our_mac, flow.remote,
                                               flow.guest_addr, flow.remote_port, flow.guest_port, payload,
                                               not port.offloads.data_valid))

    def on_socket(self, flow: UdpFlow) -> None:
        """Datagrams on a guest flow's connected socket: queue them for the guest."""
        now = time.monotonic()
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
        self.port.flush()

    def _relay_errors(self, flow: UdpFlow, now: float) -> None:
        """ICMP errors about the flow's datagrams, to the guest as ICMP errors about what it sent."""
        port = self.port
        v4 = inany.is_v4(flow.remote)
        origin = sockerr.EeOrigin.ICMP if v4 else sockerr.EeOrigin.ICMP6
        for error in sockerr.read_errors(flow.sock, flowframes.icmp_max_quote(flow.remote)):
            if error.origin != origin:
                continue
            guest_mac = port.guest_mac or BROADCAST_MAC
            our_mac = port.params.our_mac
            # From what the guest addressed when the destination itself answered (or stands for the
            # host's loopback), else from the router that did.
            source = flow.remote
            if error.offender is not None:
                offender = inany.from_packed(error.offender)
                if offender != flow.target and not inany.is_loopback(offender):
                    source = offender
            quoted = flowframes.quoted_udp(our_mac, guest_mac, flow.guest_addr, flow.remote, flow.guest_port,
                                           flow.remote_port, error.payload)
            port.queue.append(flowframes.icmp_error_frame(guest_mac, our_mac, source, flow.guest_addr,
                                                          error.icmp_type, error.code, error.info, quoted))
            port.count(Event.UDP_HOST_ICMP_ERROR)
            flow.last = now

    # -- forwarded ports ------------------------------------------------------------------

    def on_listener(self, fd: int) -> None:
        """Datagrams from host clients on a forwarded port: to the guest, on their flows."""
        listener = self.listeners.get(fd) or self.draining.get(fd)
        if listener is None:
            return
        now = time.monotonic()
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
            if flow is None and fd in self.draining:
                self.port.drop(DropReason.UDP_FORWARD_REMOVED)
                continue
            if flow is None:
                try:
                    flow = self._create_inbound(fd, listener, peer, now)
                except PacketError as err:
                    self.port.drop(err.reason)
                    continue
            self._to_guest(flow, view[:n], now)
        self.port.flush()

    def _create_inbound(self, fd: int, listener: Listener, peer: tuple[Any, ...], now: float) -> UdpFlow:
        """A new host client (``peer``, a socket address) of a forwarded port: a flow towards the guest."""
        cport: int = peer[1]
        client = inany.from_str(peer[0])
        sides = self.fwd.inbound(client, listener.target)
        if sides is None:
            raise PacketError(DropReason.UDP_NO_GUEST_ADDRESS)
        remote, guest = sides
        host_side = FlowSide(Pif.HOST, client, cport, listener.bound, listener.port)
        guest_side = FlowSide(Pif.GUEST, guest, listener.guest_port, remote, cport)
        key = pack_key(FlowType.UDP, guest_side)
        existing = self.layer.flows.get(key)
        if isinstance(existing, UdpFlow):
            # The guest side is taken by a flow of ours (the guest already talks to that address and port).
            return existing
        ref = self.layer.enter(FlowType.UDP, host_side, guest_side, now)
        flow = UdpFlow(ref=ref, ftype=FlowType.UDP, key=key, last=now, sock=listener.sock, guest_addr=guest,
                       guest_port=listener.guest_port, remote=remote, remote_port=cport, peer=peer,
                       idle_timeout=self.timeouts.timeout)
        self.layer.add(flow)
        self.inbound[(fd, peer[0], cport)] = flow
        return flow

    # -- flow layer hooks ---------------------------------------------------------------------

    def timer(self, flow: UdpFlow, now: float) -> bool:
        """Idle for longer than the flow's timeout (kept in ``idle_timeout`` for the table): over."""
        flow.idle_timeout = timeout = flow.timeout(self.timeouts)
        return now - flow.last > timeout

    def release(self, flow: UdpFlow) -> None:
        """Close the flow's own socket; a forwarded flow only leaves the client map (the listener stays)."""
        if flow.peer is not None:
            fd = flow.sock.fileno()
            self.inbound.pop((fd, flow.peer[0], flow.peer[1]), None)
            if fd in self.draining and not any(key[0] == fd for key in self.inbound):
                self.port.unwatch(fd)
                self.draining.pop(fd).sock.close()
        else:
            flow.sock.close()

    def deferred(self, now: float) -> None:
        """Nothing beyond the flows' own timers."""

    def abort(self, flow: UdpFlow) -> None:
        """A handler of the flow raised: nothing to tell anyone (the layer closes it)."""

    def close(self) -> None:
        """Close the listeners (the worker is stopping; its flow layer closes the flows first)."""
        for fd, listener in [*self.listeners.items(), *self.draining.items()]:
            self.port.unwatch(fd)
            listener.sock.close()
        self.listeners.clear()
        self.draining.clear()

    # -- forwarding rules changed at run time ----------------------------------------------------------

    def add_listeners(self, ports: tuple[PortFd, ...]) -> None:
        """Listen on more forwarded ports (``ports`` describe sockets this worker holds); a draining socket
        of the same port and address hands its flows to the new one and closes."""
        added = adopt_listeners(ports, self.port.watch, self.on_listener)
        self.listeners.update(added)
        for new_fd, new in added.items():
            for old_fd, old in list(self.draining.items()):
                if (old.port, old.bound) != (new.port, new.bound):
                    continue
                for key in [key for key in self.inbound if key[0] == old_fd]:
                    flow = self.inbound.pop(key)
                    flow.sock = new.sock
                    self.inbound[(new_fd, key[1], key[2])] = flow
                self.port.unwatch(old_fd)
                self.draining.pop(old_fd).sock.close()

    def remove_listeners(self, rules: set[int]) -> int:
        """Stop listening for forwarding ``rules``: their sockets close, or drain while they carry flows
        (established flows are never cut); how many stopped listening."""
        removed = [fd for fd, listener in self.listeners.items() if listener.rule in rules]
        carrying = {key[0] for key in self.inbound}
        for fd in removed:
            listener = self.listeners.pop(fd)
            if fd in carrying:
                self.draining[fd] = listener
            else:
                self.port.unwatch(fd)
                listener.sock.close()
        return len(removed)
