"""ARP for Ethernet/IPv4: codec and the proxy-ARP responder.

Theory of operation (as passt's arp.c): the guest sees a point-to-point link
where every address except its own lives behind our MAC.  So
:class:`ArpResponder` answers every ARP request with ``our_mac``, whatever
address is asked for (the gateway, or any other address in the subnet the
guest wants to reach directly), except:

* announcements (gratuitous ARP: sender IP equal to target IP, sender not
  0.0.0.0) are consumed without an answer; address probes (sender 0.0.0.0)
  are answered like any request;
* requests for the guest's own address are consumed without an answer, so
  duplicate address detection in the guest succeeds.

Anything that is not a request (replies, RARP, other operations) is dropped
as ``ARP_IGNORED``; packets that are not 28-byte Ethernet/IPv4 ARP are
``ARP_MALFORMED``.  Replies are 42-byte frames, not padded to 60 bytes (see
:mod:`shardswitch.net.eth`), sent to the Ethernet source of the request.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

from . import eth
from .checksum import BytesLike
from .drop import DropReason, PacketError
from .params import ResolvedParams

#: Hardware type, protocol type, hardware length, protocol length, operation,
#: sender MAC, sender IP, target MAC, target IP.
BODY = struct.Struct("!HHBBH6sI6sI")
#: Length of an Ethernet/IPv4 ARP body.
ARP_LEN = BODY.size
assert ARP_LEN == 28
#: A whole ARP frame: Ethernet header then the body, packed in one call on the reply path.
FRAME = struct.Struct("!6s6sH" + BODY.format[1:])
assert FRAME.size == 14 + ARP_LEN
#: Hardware type of Ethernet.
HRD_ETHER = 1
#: Length of an IPv4 address.
IPV4_ALEN = 4


class ArpOp(IntEnum):
    """ARP operation codes."""

    REQUEST = 1
    REPLY = 2
    RARP_REQUEST = 3
    RARP_REPLY = 4


@dataclass(slots=True)
class ArpPacket:
    """A decoded Ethernet/IPv4 ARP packet (not frozen: construction is on the per-frame path)."""

    #: Operation (see :class:`ArpOp`).
    op: int
    #: Sender hardware address.
    sha: bytes
    #: Sender protocol address.
    spa: int
    #: Target hardware address.
    tha: bytes
    #: Target protocol address.
    tpa: int


def parse(payload: BytesLike) -> ArpPacket:
    """Decode an ARP packet (trailing padding allowed).

    Raises :class:`PacketError` (``ARP_MALFORMED``) unless it is a complete
    Ethernet/IPv4 ARP packet.
    """
    if len(payload) < ARP_LEN:
        raise PacketError(DropReason.ARP_MALFORMED, f"{len(payload)} bytes")
    hrd, pro, hln, pln, op, sha, spa, tha, tpa = BODY.unpack_from(payload)
    if hrd != HRD_ETHER or pro != eth.EtherType.IPV4 or hln != eth.ETH_ALEN or pln != IPV4_ALEN:
        raise PacketError(DropReason.ARP_MALFORMED,
                          f"hardware {hrd}/{hln}, protocol {pro:#06x}/{pln}")
    return ArpPacket(op, sha, spa, tha, tpa)


def build_frame(eth_dst: bytes, eth_src: bytes, packet: ArpPacket) -> bytes:
    """Build a complete (unpadded, 42-byte) Ethernet frame carrying ``packet``."""
    return FRAME.pack(eth_dst, eth_src, eth.EtherType.ARP, HRD_ETHER, eth.EtherType.IPV4, eth.ETH_ALEN,
                      IPV4_ALEN, packet.op, packet.sha, packet.spa, packet.tha, packet.tpa)


class ArpResponder:
    """Proxy-ARP policy for one guest: answers for every address but the guest's."""

    def __init__(self, params: ResolvedParams) -> None:
        """Keep what the replies need from the resolved parameters."""
        self._our_mac = params.our_mac
        self._guest_address = params.address

    def reply(self, eth_src: bytes, payload: BytesLike) -> bytes | None:
        """The reply frame for an ARP packet from ``eth_src``, or None to stay silent.

        Raises :class:`PacketError` (``ARP_MALFORMED``, ``ARP_IGNORED``).
        """
        request = parse(payload)
        if request.op != ArpOp.REQUEST:
            raise PacketError(DropReason.ARP_IGNORED, f"operation {request.op}")
        if request.spa and request.spa == request.tpa:
            return None  # announcement
        if request.tpa == self._guest_address:
            return None  # the guest's own address: let its duplicate detection succeed
        return FRAME.pack(eth_src, self._our_mac, eth.EtherType.ARP, HRD_ETHER, eth.EtherType.IPV4,
                          eth.ETH_ALEN, IPV4_ALEN, ArpOp.REPLY, self._our_mac, request.tpa, request.sha,
                          request.spa)

    def handle(self, eth_src: bytes, payload: memoryview, now: float, out: list[bytes]) -> None:
        """Ethernet handler entry point: append the reply, if any, to ``out``."""
        frame = self.reply(eth_src, payload)
        if frame is not None:
            out.append(frame)
