"""virtio-net specifics on top of :class:`~shardswitch.virtio.virtqueue.Virtqueue`.

Theory of operation
-------------------
Every frame on a virtio-net queue is preceded by a ``virtio_net_hdr``: 12
bytes (``virtio_net_hdr_v1``, with the trailing ``num_buffers``) when
VERSION_1 or MRG_RXBUF is negotiated, otherwise the 10-byte legacy header.

TX (guest -> us): a chain's device-readable buffers hold the header followed
by the Ethernet frame.  :meth:`Virtqueue.pop_frame <shardswitch.virtio.virtqueue.Virtqueue.pop_frame>`
skips the header and returns the frame as a zero-copy ``memoryview`` of
guest memory when it sits in one buffer (Linux puts header and frame in one
descriptor; others put the header alone in the first one); other layouts (a
Linux TSO frame: headers, then page fragments) are gathered into a scratch
buffer of the caller's, reused frame after frame, so a chain's bytes are
copied once and never allocated.  The view
points into memory the guest still owns until the chain is pushed back, and
the guest can change it under us: parsers must re-validate whatever they
read and must not keep the view after the push.

The header's ``flags`` byte of a TX chain comes with the frame (``pop_frame``'s
third item): with VIRTIO_NET_F_CSUM negotiated the guest may set
NEEDS_CSUM, meaning the L4 checksum field holds only the pseudo-header sum
(the "device" - us - would complete it).  We never forward the frame as
such, only its payload, so the caller just has to skip verifying that
checksum.  The other TX header fields (gso_type, gso_size, csum_start...)
need nothing from us: a TSO segment (HOST_TSO4/6) is one large TCP segment
whose payload goes to the host socket whole.

RX (us -> guest): :class:`RxWriter` writes a header and the frame into
the device-writable buffers of chains the guest posted, then stages them with
``push`` (the caller flushes and signals once per batch).  The header is zero
but for ``num_buffers`` and its ``flags``, fixed per writer
(:meth:`RxWriter.set_flags`): DATA_VALID when the guest negotiated
VIRTIO_NET_F_GUEST_CSUM, so frames may leave their TCP/UDP checksums
uncomputed (the guest takes them as verified).  A :class:`GsoFrame` (for a
guest with GUEST_TSO4/6) also fills the header's gso fields: the guest takes
the frame, larger than its MTU, as a train of ``gso_size``-byte TCP segments.

* Without MRG_RXBUF one chain must hold header + frame.  If the chain at the
  head of the ring is too small the frame is refused: ``put`` returns False,
  nothing is consumed and :attr:`RxWriter.too_big` is incremented.  Because
  the next attempt would meet the same chain, a caller seeing ``too_big``
  rise must drop that frame rather than wait for more buffers.
* With MRG_RXBUF a frame may span several chains; the header's
  ``num_buffers`` says how many, and each chain is pushed with the bytes it
  received.  If the guest has not posted enough buffers, every chain taken so
  far is given back with ``unpop`` and ``put`` returns False: nothing is
  consumed and the caller retries after the guest's next kick.  A frame that
  would not fit even in ``num`` chains is refused the same way but also
  counted in ``too_big``.
* With a 12-byte header and no MRG_RXBUF, ``num_buffers`` is 1 as the
  specification requires.

A posted RX chain without any device-writable buffer, or whose first chain is
too small for the header, is a driver bug: :class:`VirtqueueError`.

Writing in place (zero copy).  :meth:`RxWriter.take` pops chains for one
frame whose headers the caller will write after its payload: it returns an
:class:`RxSpan` whose :meth:`~RxSpan.views` are the guest's own buffers past
a head room (virtio-net header plus the frame's headers, which must fit in
the first buffer).  TCP peeks host data straight into them; then
:meth:`RxSpan.commit` writes the virtio-net header, pushes the chains that
received bytes and gives back (``unpop``) those that did not - a span holds
the chains popped last, so giving back its tail is always possible - or
:meth:`RxSpan.cancel` gives them all back.  A span may cover less than was
asked when the guest has not posted enough buffers: the frame is then
shorter.  A ring whose first buffers cannot hold the head room (a driver
posting the virtio-net header alone) clears :attr:`RxWriter.in_place` and the
caller goes back to building frames and :meth:`RxWriter.put`.
"""

from __future__ import annotations

import struct
from enum import IntEnum, IntFlag
from typing import TYPE_CHECKING, TypeAlias

from shardswitch.vhost.wire import VirtioFeature
from shardswitch.virtio.virtqueue import Virtqueue, VirtqueueError

if TYPE_CHECKING:
    from shardswitch.pcap import FrameSink


class VnetHdrFlags(IntFlag):
    """``virtio_net_hdr.flags``."""

    NEEDS_CSUM = 1
    DATA_VALID = 2


class GsoType(IntEnum):
    """``virtio_net_hdr.gso_type`` (ECN is a flag or-ed into the others)."""

    NONE = 0
    TCPV4 = 1
    UDP = 3
    TCPV6 = 4
    UDP_L4 = 5
    ECN = 0x80


#: virtio_net_hdr_v1: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers.
VNET_HDR = struct.Struct("<BBHHHHH")
VNET_HDR_LEN = VNET_HDR.size          # 12
VNET_HDR_LEGACY_LEN = 10
#: Offset of num_buffers inside the 12-byte header.
NUM_BUFFERS_OFFSET = 10

#: A frame to the guest: bytes, a frame buffer (bytearray, GsoFrame) or a 1-D byte view.
Frame: TypeAlias = "bytes | bytearray | memoryview"


class GsoFrame(bytearray):
    """A TCP frame to the guest larger than one segment (GUEST_TSO4/6), with its gso header fields.

    A plain ``bytearray`` otherwise: the TCP builder makes one in place of its
    frame buffer, and :class:`RxWriter` writes these fields in the frame's
    virtio-net header.  ``gso_type`` stays :attr:`GsoType.NONE` for a frame
    that turned out to hold no more than one segment.
    """

    __slots__ = ("gso_type", "gso_size", "hdr_len")

    def __init__(self, size: int, gso_type: int = GsoType.NONE, gso_size: int = 0, hdr_len: int = 0) -> None:
        """``size`` zero bytes; headers of ``hdr_len`` bytes, segments of ``gso_size`` bytes of payload."""
        super().__init__(size)
        self.gso_type = gso_type
        self.gso_size = gso_size
        self.hdr_len = hdr_len


def vnet_hdr_len(features: int) -> int:
    """Header length for the negotiated ``features``: 12 with VERSION_1 or MRG_RXBUF, else 10."""
    if features & (VirtioFeature.VERSION_1 | VirtioFeature.MRG_RXBUF):
        return VNET_HDR_LEN
    return VNET_HDR_LEGACY_LEN


def _scatter(targets: list[list[memoryview]], sources: tuple[memoryview, memoryview]) -> list[int]:
    """Copy ``sources`` back to back into the buffers of each target chain.

    Returns the bytes written into each chain.  The callers guarantee the
    targets can hold everything.
    """
    written: list[int] = []
    src_index = 0
    src = sources[0]
    pos = 0
    for bufs in targets:
        chain_written = 0
        for buf in bufs:
            room = len(buf)
            at = 0
            while room and src_index < len(sources):
                n = min(room, len(src) - pos)
                buf[at:at + n] = src[pos:pos + n]
                at += n
                pos += n
                room -= n
                chain_written += n
                if pos == len(src):
                    src_index += 1
                    pos = 0
                    if src_index < len(sources):
                        src = sources[src_index]
        written.append(chain_written)
    return written


def _capacity(head: int, writable: list[memoryview]) -> int:
    """Total device-writable bytes of an RX chain; a chain with none is a driver bug."""
    if not writable:
        raise VirtqueueError(f"RX chain {head} has no device-writable buffer")
    return sum(len(b) for b in writable)


class RxWriter:
    """Writes frames into a receive queue's posted buffers."""

    def __init__(self, vq: Virtqueue, hdr_len: int, mrg_rxbuf: bool, flags: int = 0) -> None:
        """Write to ``vq`` with a ``hdr_len``-byte header, merging chains if ``mrg_rxbuf``.

        ``flags`` is the header's flags byte for every frame (see :meth:`set_flags`).
        """
        if hdr_len not in (VNET_HDR_LEN, VNET_HDR_LEGACY_LEN):
            raise ValueError(f"virtio-net header length {hdr_len} is neither 10 nor 12")
        if mrg_rxbuf and hdr_len != VNET_HDR_LEN:
            raise ValueError("MRG_RXBUF needs the 12-byte header")
        self._vq = vq
        self._hdr_len = hdr_len
        self._mrg = mrg_rxbuf
        self._flags = 0
        self._hdr_one = b""
        self.set_flags(flags)
        #: Chains come with a first buffer large enough for :meth:`take` (cleared when one does not).
        self.in_place = True
        #: Frames refused because they can never fit (head chain too small without
        #: MRG_RXBUF, or more than a whole ring of chains with it): drop, do not retry.
        self.too_big = 0
        #: Packet capture: every frame written is also recorded here (None: no capture).
        self.capture: FrameSink | None = None

    @property
    def hdr_len(self) -> int:
        """Length of the virtio-net header in front of every frame (10 or 12)."""
        return self._hdr_len

    def set_flags(self, flags: int) -> None:
        """Write ``flags`` (e.g. :attr:`VnetHdrFlags.DATA_VALID`) in the header of every frame from now on.

        DATA_VALID is only allowed when the guest negotiated GUEST_CSUM (the
        caller checks); NEEDS_CSUM would need per-frame csum_start/offset and
        is refused.
        """
        if flags & ~int(VnetHdrFlags.DATA_VALID):
            raise ValueError(f"unsupported RX header flags {flags:#x}")
        self._flags = flags
        # num_buffers = 1 whenever the field exists.
        self._hdr_one = VNET_HDR.pack(flags, 0, 0, 0, 0, 0, 1)[:self._hdr_len]

    def put(self, frame: Frame) -> bool:
        """Write one frame to the guest; False (nothing consumed) when it does not fit now.

        ``frame`` is bytes, a bytearray (a :class:`GsoFrame` brings its gso fields)
        or a one-dimensional byte-format memoryview.  Raises
        :class:`VirtqueueError` (after giving back what it took) when the
        guest posted an unusable RX chain.
        """
        vq = self._vq
        hdr_len = self._hdr_len
        need = hdr_len + len(frame)
        chain = vq.pop()
        if chain is None:
            return False
        head, _readable, writable = chain
        hdr = self._header(frame, 1) if type(frame) is GsoFrame else self._hdr_one
        if len(writable) == 1 and len(writable[0]) >= need:
            buf = writable[0]
            buf[:hdr_len] = hdr
            buf[hdr_len:need] = frame
            vq.push(head, need)
            if self.capture is not None:
                self.capture.add(frame)
            return True
        try:
            capacity = _capacity(head, writable)
            if capacity < hdr_len:
                raise VirtqueueError(f"RX chain {head} of {capacity} bytes cannot hold the header")
        except VirtqueueError:
            vq.unpop(1)
            raise
        if capacity >= need:
            self._write([(head, writable)], hdr, frame)
            if self.capture is not None:
                self.capture.add(frame)
            return True
        if not self._mrg:
            vq.unpop(1)
            self.too_big += 1
            return False
        return self._put_merged(head, writable, capacity, need, frame)

    def _put_merged(self, head: int, writable: list[memoryview], capacity: int, need: int,
                    frame: Frame) -> bool:
        """MRG_RXBUF: take more chains until ``need`` bytes fit, then write and push them all."""
        vq = self._vq
        chains = [(head, writable)]
        try:
            while capacity < need:
                if len(chains) == vq.num:          # the whole ring cannot hold it, ever
                    vq.unpop(len(chains))
                    self.too_big += 1
                    return False
                chain = vq.pop()
                if chain is None:
                    vq.unpop(len(chains))
                    return False
                chains.append((chain[0], chain[2]))
                capacity += _capacity(chain[0], chain[2])
        except VirtqueueError:
            vq.unpop(len(chains))
            raise
        self._write(chains, self._header(frame, len(chains)), frame)
        if self.capture is not None:
            self.capture.add(frame)
        return True

    def _header(self, frame: Frame, num_buffers: int) -> bytes:
        """The header of ``frame`` spread over ``num_buffers`` chains (gso fields from a GsoFrame)."""
        if isinstance(frame, GsoFrame) and frame.gso_type != GsoType.NONE:
            return VNET_HDR.pack(self._flags, frame.gso_type, frame.hdr_len, frame.gso_size, 0, 0,
                                 num_buffers)[:self._hdr_len]
        return VNET_HDR.pack(self._flags, 0, 0, 0, 0, 0, num_buffers)[:self._hdr_len]

    def _write(self, chains: list[tuple[int, list[memoryview]]], hdr: bytes,
               frame: Frame) -> None:
        """Scatter header + frame over ``chains`` and push each with its byte count."""
        written = _scatter([bufs for _head, bufs in chains], (memoryview(hdr), memoryview(frame)))
        push = self._vq.push
        for (head, _bufs), count in zip(chains, written):
            push(head, count)

    def take(self, need: int, head_room: int) -> RxSpan | None:
        """Chains for a frame of up to ``need`` bytes (virtio-net header included) written in place.

        The first buffer must hold ``head_room`` bytes and more; without
        MRG_RXBUF the span is one chain.  Returns None when the ring has no
        chain, or when its head chain is unsuitable (then :attr:`in_place`
        is cleared and nothing is consumed).  Raises :class:`VirtqueueError`
        (after giving back what it took) for a chain without writable buffers.
        """
        vq = self._vq
        chain = vq.pop()
        if chain is None:
            return None
        writable = chain[2]
        if not writable or len(writable[0]) <= head_room:
            vq.unpop(1)
            if not writable:
                raise VirtqueueError(f"RX chain {chain[0]} has no device-writable buffer")
            self.in_place = False
            return None
        heads = [chain[0]]
        bufs = [writable]
        sizes = [len(writable[0]) if len(writable) == 1 else _capacity(chain[0], writable)]
        if self._mrg and sizes[0] < need:
            try:
                vq.pop_writable(need - sizes[0], vq.num - 1, heads, bufs, sizes)
            except VirtqueueError:
                vq.unpop(1)
                raise
        return RxSpan(self, heads, bufs, sizes)

    def _commit(self, span: RxSpan, length: int, gso_type: int, gso_size: int, hdr_len: int) -> int:
        """Header, pushes and give-backs of :meth:`RxSpan.commit`; returns the chains used."""
        vq = self._vq
        hdr_size = self._hdr_len
        used = vq.push_run(span.heads, span.sizes, hdr_size + length)
        unused = len(span.heads) - used
        if unused:
            vq.unpop(unused)
        if self.capture is not None:
            self.capture.add_views(span.views(hdr_size, length), length)
        if hdr_size == VNET_HDR_LEN:
            VNET_HDR.pack_into(span.bufs[0][0], 0, self._flags, gso_type, hdr_len, gso_size, 0, 0, used)
        else:
            span.bufs[0][0][:hdr_size] = VNET_HDR.pack(self._flags, gso_type, hdr_len, gso_size, 0, 0,
                                                       1)[:hdr_size]
        return used


class RxSpan:
    """RX chains taken by :meth:`RxWriter.take` for one frame written in place."""

    __slots__ = ("_writer", "heads", "bufs", "sizes")

    def __init__(self, writer: RxWriter, heads: list[int], bufs: list[list[memoryview]], sizes: list[int]) -> None:
        """Chains ``heads`` with their writable buffers ``bufs``, of ``sizes`` bytes each."""
        self._writer = writer
        self.heads = heads
        self.bufs = bufs
        self.sizes = sizes

    @property
    def capacity(self) -> int:
        """Bytes the span can hold, virtio-net header included."""
        return sum(self.sizes)

    def head(self) -> memoryview:
        """The first buffer: virtio-net header, then the frame's headers."""
        return self.bufs[0][0]

    def views(self, skip: int, limit: int) -> list[memoryview]:
        """The span's buffers from byte ``skip`` of the first one, ``limit`` bytes at most in all."""
        views: list[memoryview] = []
        for bufs in self.bufs:
            for buf in bufs:
                if skip:
                    buf = buf[skip:]
                    skip = 0
                size = len(buf)
                if size >= limit:
                    views.append(buf[:limit] if size > limit else buf)
                    return views
                views.append(buf)
                limit -= size
        return views

    def commit(self, length: int, gso_type: int = GsoType.NONE, gso_size: int = 0, hdr_len: int = 0) -> int:
        """The frame is written: ``length`` bytes after the virtio-net header, which is filled in here
        (gso fields for a GSO frame).  Pushes the chains that hold bytes, gives back the others;
        returns the number pushed.  The caller flushes the ring."""
        return self._writer._commit(self, length, gso_type, gso_size, hdr_len)

    def cancel(self) -> None:
        """Nothing was written: give every chain back."""
        self._writer._vq.unpop(len(self.heads))
