"""Port forwarding (``-t``): host clients' connections spliced to the guest.

Theory of operation (passt's fwd.c / tcp.c inbound path).  Every worker
opens its own listening socket for each forwarded port, bound with
``SO_REUSEPORT``, so the kernel spreads host clients over the workers and
the worker whose socket accepted owns the flow.  An accepted client becomes
a flow whose initiator is the host side (client address and port, our bound
address and port) and whose target is the guest side: the guest's address
and the forwarded guest port, seen from where
:meth:`~shardswitch.worker.fwd.Forwarding.seen_from` says the client
appears (itself, or for a client on the host's loopback the first mapped
address: the gateway by default), towards the rule's target address inside
the guest when it names one (screened by the flow policy).  The connection itself
is handed to :class:`~shardswitch.worker.tcp.TcpFlows` (through the :class:`~shardswitch.worker.tcp.internal.TcpAdopter` contract), which sends the
guest our SYN and, once the guest's SYN-ACK comes, runs it like any other.

Rules change at run time (``shardswitch forward add/remove``): :meth:`TcpForwarder.add` adopts the
listening sockets the coordinator sent, :meth:`TcpForwarder.remove` closes a rule's.  A closed listener
refuses new clients (the kernel answers them with a RST once no socket of the port is left); the
connections it accepted have sockets of their own and carry on.
"""

from __future__ import annotations

import logging
import socket
import struct
import time
from typing import Any

from shardswitch.ipc import PortFd
from shardswitch.net import inany
from shardswitch.net.drop import DropReason, PacketError
from shardswitch.net.tcp import Addressing
from shardswitch.shm.layout import FlowSide, FlowType, Pif, pack_key
from shardswitch.worker.listen import Listener, adopt_listeners

from shardswitch.worker.tcp.internal import TcpAdopter

log = logging.getLogger("shardswitch.worker")

#: SO_LINGER on, zero seconds: close() sends a RST.
LINGER_RESET = struct.pack("ii", 1, 0)


class TcpForwarder:
    """This worker's listening sockets of ``-t`` ports and the flows their clients start."""

    def __init__(self, flows: TcpAdopter, ports: tuple[PortFd, ...]) -> None:
        """Watch ``flows``' worker's listening sockets of ``-t`` ports (bound by the coordinator)."""
        self.flows = flows
        self.port = flows.port
        self.listeners = adopt_listeners(ports, self.port.watch, self.on_listener)

    def listening_on(self, port: int, bound: bytes | None = None) -> Listener | None:
        """This worker's listener of forwarded host ``port`` (bound to ``bound`` when given; None: the port
        is not forwarded)."""
        return next((listener for listener in self.listeners.values()
                     if listener.port == port and bound in (None, listener.bound)), None)

    def add(self, ports: tuple[PortFd, ...]) -> None:
        """Listen on more forwarded ports: ``ports`` describe sockets this worker holds (their ``fd``)."""
        self.listeners.update(adopt_listeners(ports, self.port.watch, self.on_listener))

    def remove(self, rules: set[int]) -> int:
        """Close the listeners of forwarding ``rules`` (their connections carry on); how many closed."""
        closing = [fd for fd, listener in self.listeners.items() if listener.rule in rules]
        for fd in closing:
            self.port.unwatch(fd)
            self.listeners.pop(fd).sock.close()
        return len(closing)

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
            try:
                self._inbound(listener, sock, peer, now)
            except PacketError as err:
                self.port.drop(err.reason)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
                sock.close()
        self.port.flush()

    def _inbound(self, listener: Listener, sock: socket.socket, peer: tuple[Any, ...], now: float) -> None:
        """Make the flow of an accepted host client and send the guest our SYN; PacketError refuses it."""
        client = inany.from_str(peer[0])
        cport: int = peer[1]
        sides = self.flows.layer.fwd.inbound(client, listener.target)
        mac = self.port.guest_mac
        if sides is None or mac is None:
            raise PacketError(DropReason.TCP_NO_GUEST_ADDRESS)
        remote, guest = sides
        guest_side = FlowSide(Pif.GUEST, guest, listener.guest_port, remote, cport)
        key = pack_key(FlowType.TCP, guest_side)
        if key in self.flows.layer.flows:
            raise PacketError(DropReason.TCP_IGNORED, "the guest side is taken")
        host_side = FlowSide(Pif.HOST, client, cport, listener.bound, listener.port)
        ref = self.flows.layer.enter(FlowType.TCP, host_side, guest_side, now)
        addr = Addressing.between(mac, self.port.params.our_mac, remote, guest, cport, listener.guest_port)
        self.flows.adopt_client(sock, key, ref, addr, now)
