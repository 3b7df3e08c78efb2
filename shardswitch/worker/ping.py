"""ICMP and ICMPv6 echo flows of one worker: the socket side of passt's icmp.c.

Theory of operation.  An echo request from the guest is one flow per
(guest address, destination, echo identifier): the first request creates it,
later ones reuse it.  Each flow has an unprivileged ping socket
(``SOCK_DGRAM``/``IPPROTO_ICMP[V6]``, allowed by ``net.ipv4.ping_group_range``),
connected to where :class:`~shardswitch.worker.fwd.Forwarding` maps the
destination (the host's loopback for a mapped address, the gateway by
default).  The kernel stamps its own identifier on what we send; replies
come back on the socket and are re-stamped with the guest's identifier and
sent to the guest from the address it pinged.

The life of a flow - the local index, the shared table, hand-over of a
request for a flow another worker owns, the once-a-second timers - is the
flow layer's (:mod:`shardswitch.worker.flow`); this module plugs in its hooks
(:class:`PingFlows`): what a request and a reply do, and the idle timeout,
:data:`PING_TIMEOUT`.  Addresses are 16-byte inany values; the family shows
only in the flow type (PING4 / PING6) and the wire format.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from dataclasses import dataclass

from shardswitch.net import flowframes, icmp, icmpv6, inany
from shardswitch.net.drop import DropReason, PacketError
from shardswitch.net.endpoint import GuestEndpoint
from shardswitch.net.icmpv6 import Icmpv6Message, Icmpv6Type
from shardswitch.net.inany import InAny
from shardswitch.net.ipv4 import IpProto, Ipv4Packet
from shardswitch.net.ipv6 import Ipv6Packet
from shardswitch.shm.layout import FlowSide, FlowType, Pif
from shardswitch.worker.flow import FlowBase, FlowLayer, NewFlow
from shardswitch.worker.port import WorkerPort

log = logging.getLogger("shardswitch.worker")

#: Idle echo flows expire after this many seconds (as passt).
PING_TIMEOUT = 60.0
_ECHO_REPLIES = (int(icmp.IcmpType.ECHO_REPLY), int(Icmpv6Type.ECHO_REPLY))


@dataclass(slots=True, eq=False, kw_only=True)
class PingFlow(FlowBase):
    """One echo flow owned by this worker."""

    sock: socket.socket
    #: The guest's echo identifier (the kernel uses its own on the host side).
    guest_ident: int
    #: The guest's address and the address it pinged (source of the replies).
    guest_addr: InAny
    remote: InAny


class PingFlows:
    """Every echo flow of one worker: the flow layer's hooks for PING4 and PING6."""

    table_full = DropReason.PING_TABLE_FULL
    conflict = DropReason.ICMP_IGNORED

    def __init__(self, port: WorkerPort, layer: FlowLayer) -> None:
        """Serve echo for ``port``'s worker through ``layer``."""
        self.port = port
        self.layer = layer
        layer.register((FlowType.PING4, FlowType.PING6), self)

    def plug_into(self, endpoint: GuestEndpoint) -> None:
        """Route the guest's echo requests (ICMP and ICMPv6) here."""
        endpoint.register_ip_protocol(IpProto.ICMP, self.handle4)
        endpoint.register_icmpv6_type(Icmpv6Type.ECHO_REQUEST, self.handle6)

    # -- from the guest ------------------------------------------------------

    def handle4(self, eth_src: bytes, packet: Ipv4Packet, now: float, out: list[bytes]) -> None:
        """An ICMP packet from the guest (endpoint handler)."""
        echo = icmp.parse_echo(packet)
        if echo is None:
            raise PacketError(DropReason.ICMP_IGNORED)
        self._request(FlowType.PING4, inany.from_v4(packet.src), inany.from_v4(packet.dst), echo.ident, echo.seq,
                      icmp.build_ping_request(0, echo.seq, echo.payload), now)

    def handle6(self, eth_src: bytes, packet: Ipv6Packet, message: Icmpv6Message, now: float,
                out: list[bytes]) -> None:
        """An ICMPv6 echo request from the guest (endpoint handler)."""
        echo = icmpv6.echo_of(message)
        if echo is None:
            raise PacketError(DropReason.ICMPV6_IGNORED)
        self._request(FlowType.PING6, packet.src, packet.dst, echo.ident, echo.seq,
                      icmpv6.build_ping_request(0, echo.seq, echo.payload), now)

    def _request(self, ftype: FlowType, src: InAny, dst: InAny, ident: int, seq: int, request: bytes,
                 now: float) -> None:
        """Send one echo request on its flow's socket, creating the flow first if needed.

        Requests to broadcast, multicast or other addresses the flow policy refuses are dropped under its
        reason: no host socket may send them, and a guest must not make the host ping a whole network.
        """
        found = self.layer.find(ftype, FlowSide(Pif.GUEST, src, ident, dst, 0))
        flow = self._create(ftype, found, now) if isinstance(found, NewFlow) else found
        assert isinstance(flow, PingFlow)
        try:
            flow.sock.send(request)
        except OSError as err:
            log.debug("echo to %s: %s", inany.to_str(dst), err.strerror)
            raise PacketError(DropReason.PING_SEND_ERROR, err.strerror or "") from None
        flow.last = now

    def _create(self, ftype: FlowType, new: NewFlow, now: float) -> PingFlow:
        """Open a ping socket to the policy's target, enter and index the flow."""
        target, guest_side = new.target, new.guest_side
        proto = socket.IPPROTO_ICMP if ftype == FlowType.PING4 else socket.IPPROTO_ICMPV6
        try:
            sock = socket.socket(inany.family(target), socket.SOCK_DGRAM, proto)
        except OSError as err:
            if err.errno in (errno.EACCES, errno.EPERM):
                self.port.loglimit.error("ping socket", "ICMP echo sockets are not allowed for this group: "
                                         "see sysctl net.ipv4.ping_group_range")
            raise PacketError(DropReason.PING_SOCKET_ERROR, err.strerror or "") from None
        try:
            sock.setblocking(False)
            failed = self.layer.fwd.connect(sock, target, 0)
            if failed:
                raise OSError(failed, os.strerror(failed))
            # A ping socket's local "port" is the echo identifier the kernel puts on the host side.
            host_side = FlowSide(Pif.HOST, target, 0, inany.ANY6, sock.getsockname()[1])
            ref = self.layer.enter(ftype, guest_side, host_side, now)
        except OSError as err:
            sock.close()
            raise PacketError(DropReason.PING_SOCKET_ERROR, err.strerror or "") from None
        except BaseException:
            sock.close()
            raise
        flow = PingFlow(ref=ref, ftype=ftype, key=new.key, last=now, sock=sock, guest_ident=guest_side.ep_port,
                        guest_addr=guest_side.ep_addr, remote=guest_side.our_addr)
        self.layer.add(flow, sock.fileno())
        return flow

    def recreate(self, ftype: FlowType, guest_side: FlowSide, now: float) -> PingFlow:
        """An echo flow re-created by a migration, where the flow policy says it goes (PacketError when the
        policy refuses it or no socket can be made)."""
        return self._create(ftype, self.layer.new_flow(ftype, guest_side), now)

    # -- flow layer hooks ----------------------------------------------------------

    def on_socket(self, flow: PingFlow) -> None:
        """Replies on a flow's socket: re-stamp and queue them for the guest."""
        port = self.port
        guest_mac = port.guest_mac
        our_mac = port.params.our_mac
        queue = port.queue
        sock = flow.sock
        while True:
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                break
            except OSError as err:
                # ICMP errors (unreachable...) surface as socket errors: nothing to relay yet.
                log.debug("echo flow %s: %s", flow.ref, err.strerror)
                continue
            reply = icmp.parse_ping_reply(data)
            if reply is None or guest_mac is None or reply.type not in _ECHO_REPLIES:
                continue
            queue.append(flowframes.echo_reply_frame(guest_mac, our_mac, flow.remote, flow.guest_addr,
                                                     flow.guest_ident, reply.seq, reply.payload))
        if queue:
            port.flush()

    def timer(self, flow: PingFlow, now: float) -> bool:
        """Idle for :data:`PING_TIMEOUT`: over."""
        return now - flow.last > PING_TIMEOUT

    def release(self, flow: PingFlow) -> None:
        """Close the flow's socket."""
        flow.sock.close()

    def deferred(self, now: float) -> None:
        """Nothing beyond the flows' own timers."""

    def abort(self, flow: PingFlow) -> None:
        """A handler of the flow raised: nothing to tell anyone (the layer closes it)."""
