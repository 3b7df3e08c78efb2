"""Coordinator <-> worker control channel.

Each worker has one ``AF_UNIX``/``SOCK_SEQPACKET`` socketpair with the
coordinator.  A message is one datagram: a msgpack-encoded tagged
:mod:`msgspec` struct, with file descriptors (memory-region memfds, kick,
call and err eventfds) attached with ``SCM_RIGHTS``.  SEQPACKET keeps message
boundaries and delivers the descriptors with the bytes they belong to, so no
framing or descriptor bookkeeping across reads is needed.

The coordinator drives; the worker only answers.  Requests that expect an
answer carry a ``seq`` that the answer repeats, so a late answer to a request
that timed out is recognised and dropped instead of being taken for the
answer to the next one.

Descriptor ownership: ``send`` never closes what it sends (the kernel
duplicates them into the peer); ``recv`` returns new descriptors that the
caller owns and must close.
"""

from __future__ import annotations

import array
import socket
from typing import Any, Union

import msgspec

from shardswitch.net.params import GuestParams
from shardswitch.vhost.wire import MemRegion
from shardswitch.worker.udptimeout import UdpTimeouts

#: Largest control message; a status answer with many drop reasons is the largest.
MAX_MESSAGE = 64 * 1024
MAX_FDS = 8


class IpcError(Exception):
    """The control channel broke: EOF, a malformed message, or a timeout."""


class ForwardSetup(msgspec.Struct, frozen=True, kw_only=True):
    """How the guest's addresses map to the host's (shardswitch.worker.fwd; passt's fwd.c settings)."""

    #: Guest traffic to these addresses (IPv4 and/or IPv6) goes to the host's loopback.
    map_host_loopback: tuple[str, ...] = ()
    #: DNS forwarding: (guest-side address, the host resolver its port 53 goes to), any family each.
    dns_forward: tuple[tuple[str, str], ...] = ()
    #: Guest traffic to this address goes to the host's own address the guest's shadows ("" = none).
    map_guest_addr: str = ""
    #: Source addresses (at most one per family) and interfaces host sockets of guest flows are bound to.
    outbound: tuple[str, ...] = ()
    outbound_if4: str = ""
    outbound_if6: str = ""
    #: Destinations (ADDR[/LEN]) the guest's flows may not reach (shardswitch.worker.policy).
    deny: tuple[str, ...] = ()
    #: Let the guest reach link-local and cloud metadata addresses (refused by default).
    allow_link_local: bool = False


class PortFd(msgspec.Struct, frozen=True):
    """One listening socket of a forwarded port, bound by the coordinator, inherited by a worker's fork."""

    fd: int
    port: int
    guest_port: int
    #: The address it is bound to, 16 bytes (IPv4-mapped for IPv4).
    bound: bytes
    #: The address inside the guest its flows go to, 16 bytes (b"": the guest's own address).
    target: bytes = b""
    #: The forwarding rule it belongs to (shardswitch.coordinator.forwarding), for ForwardRemove.
    rule: int = 0


class WorkerSetup(msgspec.Struct, frozen=True, kw_only=True):
    """Everything a worker is forked with (handed over by fork, not sent)."""

    pair: int
    params: GuestParams
    reflect: bool = False
    #: Id of the flow table the worker inherits from the coordinator with the fork ("" = none).
    flow_table: str = ""
    #: This worker's inbox (frames other workers hand it), a SOCK_DGRAM descriptor.
    inbox_fd: int = -1
    #: The write ends of every worker's inbox, indexed by queue pair.
    peer_fds: tuple[int, ...] = ()
    #: Address translation between the guest and the host.
    forward: ForwardSetup = ForwardSetup()
    #: This worker's listening sockets of forwarded ports (-t / -u), bound by the coordinator.
    tcp_listeners: tuple[PortFd, ...] = ()
    udp_listeners: tuple[PortFd, ...] = ()
    #: Idle timeouts of UDP flows, read from the host's conntrack settings by the coordinator before its sandbox.
    udp_timeouts: UdpTimeouts = UdpTimeouts()
    #: Guest services offered (shardswitch.net.endpoint.Service bits: DHCP 1, NDP 2, RA 4, DHCPV6 8, IPV4 16,
    #: IPV6 32, TCP 64, UDP 128).
    services: int = 255
    #: ICMP/ICMPv6 echo through ping sockets (off: --no-icmp; requests dropped as IP_PROTO_UNHANDLED or ICMPV6_IGNORED).
    icmp: bool = True
    #: Install the worker's seccomp filter once set up (off: --no-sandbox).
    sandbox: bool = False
    #: Obey test-only control messages (SandboxProbe); set by SHARDSWITCH_TEST_HOOKS=1 only.
    test_hooks: bool = False
    #: --trace: log a line for every frame to and from the guest.
    trace: bool = False
    #: Keep a guard on the local port of each TCP connection a migration moved away (off: --migrate-no-linger).
    migrate_linger: bool = True


class MemAdd(msgspec.Struct, tag=True):
    """Map one guest memory region (its memfd is attached)."""

    region: MemRegion


class MemRemove(msgspec.Struct, tag=True):
    """Unmap one guest memory region."""

    region: MemRegion


class MemClear(msgspec.Struct, tag=True):
    """Unmap every region (rings are stopped first)."""


class RingStart(msgspec.Struct, tag=True):
    """Start a vring.

    Attached descriptors, in order: the kick eventfd when ``has_kick``, then
    the call eventfd when ``has_call``.  Addresses are front-end virtual
    addresses, translated by the worker.  With ``resume_from_used`` the worker
    starts at the used index it finds in guest memory instead of
    ``last_avail`` (a replacement worker whose predecessor's position died
    with it).
    """

    seq: int
    index: int
    num: int
    desc: int
    avail: int
    used: int
    last_avail: int
    features: int
    has_kick: bool
    has_call: bool
    resume_from_used: bool = False
    #: Guest-physical address of the used ring while pages are logged (LOG_ALL and the ring's log flag), or -1.
    log_addr: int = -1


class RingStop(msgspec.Struct, tag=True):
    """Stop a vring and report where it stopped."""

    seq: int
    index: int


class StatusQuery(msgspec.Struct, tag=True):
    """Ask for counters and ring states."""

    seq: int


class LogBase(msgspec.Struct, tag=True):
    """The dirty-page log (SET_LOG_BASE): ``size`` bytes of bitmap at ``offset`` in the attached memfd."""

    size: int
    offset: int


class Capture(msgspec.Struct, tag=True):
    """Packet capture: append every frame to the attached pcap file from now on (it replaces the one before,
    flushed and closed); without a descriptor, stop capturing."""


class MigrateSave(msgspec.Struct, tag=True):
    """Live migration, source: write this worker's flows into the attached memfd, then close them.

    Attached: the memfd, then the TCP_REPAIR helper's connection when ``has_repair`` (lent for this
    request only: the worker closes its copy).  Answered with :class:`MigrateDone`.
    """

    seq: int
    has_repair: bool
    #: The helper is shardswitch's own and takes RepairCommand.FREEZE.
    helper_freezes: bool = False


class MigrateLoad(msgspec.Struct, tag=True):
    """Live migration, target: restore the flows in the attached memfd (``size`` bytes, one pair's part).

    Attached as for :class:`MigrateSave`.  ``guest_mac``: the guest's MAC as the source knew it.
    """

    seq: int
    size: int
    has_repair: bool
    guest_mac: bytes | None = None


class MigrateDone(msgspec.Struct, tag=True):
    """Answer to MigrateSave and MigrateLoad: what moved; ``error`` is empty on success."""

    seq: int
    #: Bytes written to the memfd (MigrateSave).
    size: int = 0
    #: TCP connections moved with their sockets, and reset.
    tcp_moved: int = 0
    tcp_reset: int = 0
    #: UDP and echo flows handed over.
    other: int = 0
    error: str = ""


class ForwardAdd(msgspec.Struct, tag=True):
    """Listen on more forwarded ports (``shardswitch forward add``): one listening socket per entry of
    ``ports`` is attached, in order (their ``fd`` fields are the coordinator's numbers, not the worker's).
    Answered with :class:`ForwardDone`."""

    seq: int
    #: True: -t (TCP) listeners, False: -u (UDP).
    tcp: bool
    ports: list[PortFd]


class ForwardRemove(msgspec.Struct, tag=True):
    """Stop listening for the forwarding rules ``rules`` (``shardswitch forward remove``): their listeners
    close, established connections carry on.  Answered with :class:`ForwardDone`."""

    seq: int
    tcp: bool
    rules: list[int]


class ForwardDone(msgspec.Struct, tag=True):
    """Answer to ForwardAdd and ForwardRemove: the worker's listeners now, by kind; ``error`` empty on
    success."""

    seq: int
    listeners: dict[str, int] = {}
    error: str = ""


class SandboxProbe(msgspec.Struct, tag=True):
    """Test only (WorkerSetup.test_hooks): make a system call outside the worker's seccomp list."""


class Shutdown(msgspec.Struct, tag=True):
    """Stop every ring and exit."""


class RingStarted(msgspec.Struct, tag=True):
    """Answer to RingStart: ``error`` is empty on success."""

    seq: int
    index: int
    error: str = ""


class RingStopped(msgspec.Struct, tag=True):
    """Answer to RingStop: the next avail index the worker would have read."""

    seq: int
    index: int
    last_avail: int


class RingState(msgspec.Struct):
    """One ring as a worker sees it, for ``shardswitch status``."""

    index: int
    state: str
    num: int = 0
    last_avail: int = 0
    used_idx: int = 0
    kicks: int = 0
    calls: int = 0
    error: str = ""


class WorkerStatus(msgspec.Struct, tag=True):
    """Answer to StatusQuery."""

    seq: int
    pair: int
    pid: int
    rings: list[RingState]
    tx_frames: int
    tx_bytes: int
    rx_frames: int
    rx_bytes: int
    #: Frames lost, by drop reason (DropReason names).
    drops: dict[str, int]
    #: Events that lost no frame (a broken ring, an ICMP error relayed), by Event name.
    events: dict[str, int] = {}
    #: Frames handed to the worker owning their flow, and frames handed to this one.
    handed_out: int = 0
    handed_in: int = 0
    #: Flows this worker owns.
    flows: int = 0
    #: Its listening sockets of forwarded ports, by kind (tcp, udp; udp_draining: those of removed rules
    #: kept open for the flows they still carry).
    listeners: dict[str, int] = {}


ToWorker = Union[MemAdd, MemRemove, MemClear, RingStart, RingStop, StatusQuery, Shutdown, SandboxProbe, LogBase,
                 MigrateSave, MigrateLoad, Capture, ForwardAdd, ForwardRemove]
FromWorker = Union[RingStarted, RingStopped, WorkerStatus, MigrateDone, ForwardDone]


class Channel:
    """One end of a coordinator-worker control socket."""

    def __init__(self, sock: socket.socket, incoming: Any, max_message: int = MAX_MESSAGE,
                 max_fds: int = MAX_FDS) -> None:
        """Wrap ``sock``; ``incoming`` is the union of message types this end receives; a message holds at
        most ``max_message`` bytes and ``max_fds`` descriptors."""
        self.sock = sock
        self.max_message = max_message
        self.max_fds = max_fds
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder: msgspec.msgpack.Decoder[object] = msgspec.msgpack.Decoder(incoming)

    def fileno(self) -> int:
        """The socket's descriptor, for selectors."""
        return self.sock.fileno()

    def send(self, message: msgspec.Struct, fds: list[int] | tuple[int, ...] = ()) -> None:
        """Send one message with optional descriptors (not closed here)."""
        data = self._encoder.encode(message)
        try:
            if fds:
                socket.send_fds(self.sock, [data], list(fds))
            else:
                self.sock.send(data)
        except OSError as err:
            raise IpcError(f"control channel send failed: {err}") from err

    def recv(self, flags: int = 0) -> tuple[object, list[int]]:
        """Receive one message and the descriptors that came with it (``flags``: MSG_DONTWAIT, when
        BlockingIOError says none is waiting).

        Raises :class:`IpcError` on EOF, on a message or its descriptors cut
        short (longer than the limits), or on a message that does not decode;
        descriptors received with a bad message are closed.
        """
        try:
            data, fds, got, _addr = socket.recv_fds(self.sock, self.max_message, self.max_fds, flags)
        except BlockingIOError:
            raise
        except OSError as err:
            raise IpcError(f"control channel receive failed: {err}") from err
        if not data:
            close_fds(fds)
            raise IpcError("control channel closed")
        if got & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            close_fds(fds)
            raise IpcError(f"control message over {self.max_message} bytes or {self.max_fds} descriptors")
        try:
            return self._decoder.decode(data), fds
        except msgspec.DecodeError as err:
            close_fds(fds)
            raise IpcError(f"malformed control message: {err}") from err

    def close(self) -> None:
        """Close the socket."""
        self.sock.close()


def channel_pair() -> tuple[socket.socket, socket.socket]:
    """A connected SEQPACKET socketpair (coordinator end, worker end)."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    return a, b


def close_fds(fds: list[int] | array.array[int] | tuple[int, ...]) -> None:
    """Close descriptors, ignoring ones already closed."""
    import os

    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
