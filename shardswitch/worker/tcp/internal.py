"""The contract between the TCP core and its frame writers: passt's tcp_internal.h.

:mod:`~shardswitch.worker.tcp.flows` (the core: connections, sequence and
window bookkeeping, the socket side) hands a connection's host data to one of
two frame writers: :mod:`~shardswitch.worker.tcp.vu` writes it in place into
the guest's RX buffers, :mod:`~shardswitch.worker.tcp.buf` into frames of
ours.  The timers (:mod:`~shardswitch.worker.tcp.timers`) call back into the
core too.  Those modules know the core only through what is written here:

* :class:`TcpFlow`, the state of one connection;
* :class:`TcpCore`, the calls a writer or the timers may make on the core,
  and what each promises;
* :class:`TcpAdopter`, what the forwarded ports' acceptor asks of it;
* :data:`Frames`, where frames for the guest go.

Nothing here imports the core, so the writers never do either: the core
imports them, never the other way round.
"""

from __future__ import annotations

import socket
from collections import deque
from dataclasses import dataclass
from typing import Protocol, TypeAlias

from shardswitch.net.tcp import Addressing, TcpConn
from shardswitch.shm.layout import FlowRef
from shardswitch.worker.flow import FlowBase, FlowLayer
from shardswitch.worker.port import WorkerPort

#: Where frames for the guest go: a handler's reply list or the worker's pending queue.
Frames: TypeAlias = "list[bytes] | deque[bytes]"
#: First retransmission timeout, seconds (doubled on each retry by the timers).
RTO_INIT = 1.0


@dataclass(slots=True, eq=False, kw_only=True)
class TcpFlow(FlowBase):
    """One spliced connection owned by this worker."""

    sock: socket.socket
    conn: TcpConn
    addr: Addressing
    isn: int
    our_mss: int
    #: Start of the current retransmission period (last progress), and its length.
    timer: float
    rto: float = RTO_INIT
    #: When the last keepalive ACK went to the guest.
    keepalive: float = 0.0
    retries: int = 0
    #: Host data may wait beyond what the guest's window allowed.
    readable: bool = False
    #: EPOLLOUT is armed: the socket refused guest data.
    out_wait: bool = False
    #: The socket keeps the peek offset (SO_PEEK_OFF).
    peek_off: bool = True
    #: Bytes the guest ACKed that are still in the socket (discarded once per batch).
    unconsumed: int = 0
    created: float = 0.0
    #: A host client opened it (port forwarding): our SYN went to the guest.
    inbound: bool = False
    #: The host side is an address of this host (passt's LOCAL): the window offered is the peer's alone.
    local: bool = False



class TcpCore(Protocol):
    """What the frame writers and the timers may ask of the TCP core."""

    #: The worker the core serves (its queue, its RX writer, its offloads).
    port: WorkerPort
    #: Flows that ran out of RX buffers writing in place, by socket descriptor, until the guest refills.
    rx_blocked: dict[int, TcpFlow]

    def room(self, flow: TcpFlow) -> int:
        """Bytes of host data the guest may be sent now (its window, and our limits)."""

    def framing(self, flow: TcpFlow) -> tuple[int, int]:
        """(gso type, payload bytes per frame) of the flow's data frames to the guest."""

    def peek(self, flow: TcpFlow, views: list[memoryview]) -> int:
        """Peek host data at the flow's send position into ``views``; BlockingIOError when there is none,
        0 at the end of the stream, OSError when the socket failed."""

    def sent(self, flow: TcpFlow, count: int, now: float) -> None:
        """``count`` bytes peeked went to the guest in a frame (with our ACK): advance the sequence."""

    def fin_to_guest(self, flow: TcpFlow, now: float, out: Frames) -> None:
        """The host's end of stream: our FIN (or a RST if the host reset) into ``out``."""

    def reset_guest(self, flow: TcpFlow, out: Frames, syn: bool = False) -> None:
        """RST to the guest into ``out``, and close the flow."""

    def to_guest(self, flow: TcpFlow, now: float, out: Frames) -> None:
        """Host data to the guest as far as its window allows (the timers' retransmission)."""

    def ack(self, flow: TcpFlow) -> bytes:
        """A pure ACK frame with the flow's current sequence numbers and window."""

    def syn(self, flow: TcpFlow) -> bytes:
        """Our SYN to the guest (a host client's connection to a forwarded port)."""

    def syn_ack(self, flow: TcpFlow) -> bytes:
        """Our SYN-ACK to the guest's SYN."""

    def rewind_socket(self, flow: TcpFlow) -> None:
        """After a rewind of the sequence (retransmission): the peek position back to the guest's ACK."""

    def window_update(self, flow: TcpFlow, out: Frames) -> None:
        """The window offered read again from the host socket; an ACK into ``out`` when it opened (or an ACK
        is owed anyway)."""


class TcpAdopter(Protocol):
    """What the forwarded ports' acceptor (:mod:`~shardswitch.worker.tcp.forward`) asks of the core."""

    port: WorkerPort
    layer: FlowLayer

    def adopt_client(self, sock: socket.socket, key: bytes, ref: FlowRef, addr: Addressing, now: float) -> None:
        """Take over an accepted host client's connection and send the guest our SYN."""
