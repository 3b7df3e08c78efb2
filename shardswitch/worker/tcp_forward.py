"""Port forwarding (``-t``): host clients' connections spliced to the guest.

Theory of operation (passt's fwd.c / tcp.c inbound path).  Every worker
opens its own listening socket for each forwarded port, bound with
``SO_REUSEPORT``, so the kernel spreads host clients over the workers and
the worker whose socket accepted owns the flow.  An accepted client becomes
a flow whose initiator is the host side (client address and port, our bound
address and port) and whose target is the guest side: the guest's address
and the forwarded guest port, seen from the client's address - or, for a
client on the host's loopback, from the first mapped address (the gateway
by default: the reverse of ``--map-host-loopback``).  The connection itself
is handed to :class:`~shardswitch.worker.tcp.TcpFlows`, which sends the
guest our SYN and, once the guest's SYN-ACK comes, runs it like any other.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import struct
import time
from typing import TYPE_CHECKING, Any

from shardswitch import portspec
from shardswitch.net import ipv6
from shardswitch.net.tcp import Addressing
from shardswitch.shm.layout import (
    FlowRef,
    FlowSide,
    FlowTableError,
    FlowType,
    Pif,
    ip16,
    pack_key,
)
from shardswitch.worker.listen import Listener, open_listeners

if TYPE_CHECKING:
    from shardswitch.worker.tcp import TcpFlows

log = logging.getLogger("shardswitch.worker")

#: Drop reasons of this module (shown in ``shardswitch status``).
TCP_NO_GUEST_ADDRESS = "TCP_NO_GUEST_ADDRESS"
TCP_TABLE_FULL = "TCP_TABLE_FULL"
#: SO_LINGER on, zero seconds: close() sends a RST.
LINGER_RESET = struct.pack("ii", 1, 0)


class TcpForwarder:
    """This worker's listening sockets of ``-t`` ports and the flows their clients start."""

    def __init__(self, flows: TcpFlows, tcp_ports: tuple[str, ...]) -> None:
        """Listen on every port of the ``-t`` SPECs ``tcp_ports`` for ``flows``' worker."""
        self.flows = flows
        #: Loopback clients appear to the guest as coming from these (the mapped addresses, sorted).
        self.shown4 = sorted(flows.mapped4)
        self.shown6 = sorted(flows.mapped6)
        self.listeners = open_listeners(portspec.parse_all(tcp_ports, "-t", portspec.read_ephemeral()),
                                        socket.SOCK_STREAM, "-t", flows.w.pair, flows.w.watch, self.on_listener)

    def on_listener(self, fd: int) -> None:
        """Host clients connected to a forwarded port: each becomes a flow, with our SYN to the guest."""
        listener = self.listeners.get(fd)
        if listener is None:
            return
        now = time.monotonic()
        while True:
            try:
                sock, peer = listener.sock.accept()
            except BlockingIOError:
                break
            except OSError as err:
                log.debug("-t port %d: %s", listener.port, err.strerror)
                break
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            if not self._inbound(listener, sock, peer, now):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
                sock.close()
        self.flows.w.deliver_pending()

    def _guest_address(self, v6: bool) -> bytes | None:
        """The guest's address for a forwarded connection: its IPv4 lease, or its IPv6 (global or link-local)."""
        resolved = self.flows.w.endpoint.resolved
        if not v6:
            return resolved.address.to_bytes(4, "big")
        if resolved.address6 is not None:
            return resolved.address6
        mac = self.flows.w.endpoint.guest_mac
        return ipv6.link_local_from_mac(mac) if mac is not None else None

    def _inbound(self, listener: Listener, sock: socket.socket, peer: tuple[Any, ...], now: float) -> bool:
        """Make the flow of an accepted host client and send the guest our SYN; False to refuse it."""
        client = ipaddress.ip_address(peer[0].split("%")[0])
        if isinstance(client, ipaddress.IPv6Address) and client.ipv4_mapped is not None:
            client = client.ipv4_mapped
        v6 = client.version == 6
        cport: int = peer[1]
        if client.is_loopback:
            shown = self.shown6 if v6 else self.shown4
            if not shown:
                self.flows.w.counters.drops[TCP_NO_GUEST_ADDRESS] += 1
                return False
            remote = shown[0]
        else:
            remote = client.packed
        guest = self._guest_address(v6)
        mac = self.flows.w.endpoint.guest_mac
        if guest is None or mac is None:
            self.flows.w.counters.drops[TCP_NO_GUEST_ADDRESS] += 1
            return False
        guest_side = FlowSide(Pif.GUEST, ip16(guest), listener.guest_port, ip16(remote), cport)
        key = pack_key(FlowType.TCP, guest_side)
        if key in self.flows.flows:
            return False
        ref = FlowRef(-1, 0)
        table = self.flows.table
        if table is not None:
            host_side = FlowSide(Pif.HOST, ip16(client.packed), cport, listener.bound, listener.port)
            try:
                entered = table.enter(FlowType.TCP, host_side, guest_side, self.flows.w.pair, now)
            except FlowTableError as exc:
                self.flows.w.counters.drops[TCP_TABLE_FULL] += 1
                log.warning("TCP flow not created: %s", exc)
                return False
            if entered is None:
                return False
            ref = entered
        addr = Addressing(v6, mac, self.flows.w.endpoint.resolved.our_mac, remote, guest, cport,
                          listener.guest_port)
        self.flows.adopt_client(sock, key, ref, addr, now)
        return True
