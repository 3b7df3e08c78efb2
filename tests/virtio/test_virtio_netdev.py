"""virtio-net layer: header length, TX frame extraction, RX writing with and without MRG_RXBUF."""

from __future__ import annotations

import mmap

import pytest
from ringhelper import DriverRing, SharedMemory

from shardswitch.vhost.wire import VirtioFeature
from shardswitch.virtio.fastring import make_virtqueue
from shardswitch.virtio.memory import GuestMemory
from shardswitch.virtio.netdev import (VNET_HDR, GsoFrame, GsoType, RxWriter, VnetHdrFlags,
                                       vnet_hdr_len)
from shardswitch.virtio.virtqueue import GATHER_MAX, Virtqueue, VirtqueueError, first_byte, gather

HDR = bytes(range(0xA0, 0xAC))      # a recognisable 12-byte header
FRAME = bytes(range(256)) * 6       # 1536 bytes


@pytest.mark.parametrize("features, expected", [
    (0, 10),
    (VirtioFeature.MRG_RXBUF, 12),
    (VirtioFeature.VERSION_1, 12),
    (VirtioFeature.VERSION_1 | VirtioFeature.MRG_RXBUF | VirtioFeature.EVENT_IDX, 12),
    (VirtioFeature.EVENT_IDX | VirtioFeature.CSUM, 10),
])
def test_vnet_hdr_len(features: int, expected: int) -> None:
    """12 bytes with VERSION_1 or MRG_RXBUF, else 10."""
    assert vnet_hdr_len(features) == expected


# ---------------------------------------------------------------------- TX


def tx_chain(shm: SharedMemory, mem: GuestMemory, parts: list[bytes]) -> tuple[DriverRing, Virtqueue,
                                                                               list[memoryview]]:
    """Post one readable chain with ``parts`` and pop it on the device side."""
    ring = DriverRing(shm, 8)
    ring.post(ring.data_chain(parts))
    vq = ring.device(mem)
    chain = vq.pop()
    assert chain is not None
    return ring, vq, chain[1]


@pytest.mark.parametrize("parts, zero_copy", [
    ([HDR + FRAME], True),                            # Linux: header + frame in one descriptor
    ([HDR, FRAME], True),                             # header alone, then the frame
    ([HDR[:4], HDR[4:], FRAME], True),                # header split over two buffers
    ([HDR + FRAME[:100], FRAME[100:]], False),        # frame split: joined copy
    ([HDR[:6], HDR[6:] + FRAME[:10], FRAME[10:]], False),
    ([HDR, FRAME, b""], True),                        # trailing empty buffer
])
def test_gather_layouts(shm: SharedMemory, mem: GuestMemory, parts: list[bytes], zero_copy: bool) -> None:
    """The frame is found behind the header in every layout; zero copy where possible."""
    ring, vq, readable = tx_chain(shm, mem, parts)
    scratch = memoryview(bytearray(GATHER_MAX))
    frame = gather(readable, 12, scratch)
    assert bytes(frame) == FRAME
    assert isinstance(frame.obj, mmap.mmap) is zero_copy    # a view of guest memory, or of the scratch
    del frame, readable
    vq.release()


def test_gather_zero_copy_follows_guest_memory(shm: SharedMemory, mem: GuestMemory) -> None:
    """With header + frame in one buffer the returned view aliases the guest buffer."""
    ring, vq, readable = tx_chain(shm, mem, [HDR + FRAME])
    frame = gather(readable, 12, memoryview(bytearray(GATHER_MAX)))
    ring.mm[ring.layout.data + 12] = 0xEE
    assert frame[0] == 0xEE
    del frame, readable
    vq.release()


@pytest.mark.parametrize("compiled", [False, True])
def test_a_chain_longer_than_any_packet_is_cut_at_the_scratch(shm: SharedMemory, mem: GuestMemory,
                                                              compiled: bool) -> None:
    """A guest posting a TX chain of 3 x 40 KB: pop_frame gathers GATHER_MAX bytes into the worker's scratch
    and no more (the old join copied, and allocated, whatever the guest's buffers added up to)."""
    ring = DriverRing(shm, 8)
    parts = [HDR + bytes([1]) * 40_000, bytes([2]) * 40_000, bytes([3]) * 40_000]
    ring.post(ring.data_chain(parts))
    lay = ring.layout
    build = make_virtqueue if compiled else Virtqueue
    vq = build(mem, 8, ring.uva(lay.desc), ring.uva(lay.avail), ring.uva(lay.used), 0, event_idx=False)
    scratch = memoryview(bytearray(GATHER_MAX))
    popped = vq.pop_frame(12, scratch)
    assert popped is not None
    head, frame, flags = popped
    assert len(frame) == GATHER_MAX and frame.obj is scratch.obj
    assert bytes(frame) == b"".join(parts)[12:12 + GATHER_MAX]
    del frame, popped
    vq.release()


@pytest.mark.parametrize("parts, hdr_len, expected", [
    ([HDR[:11]], 12, b""),                 # shorter than the header
    ([HDR[:5], HDR[5:11]], 12, b""),       # shorter, split
    ([HDR], 12, b""),                      # header only: empty frame
    ([HDR[:10] + b"xy"], 10, b"xy"),       # legacy 10-byte header
    ([], 12, b""),
])
def test_gather_short_chains(parts: list[bytes], hdr_len: int, expected: bytes) -> None:
    """Too short for the header yields an empty view, never an exception."""
    readable = [memoryview(bytearray(p)) for p in parts]
    assert bytes(gather(readable, hdr_len, memoryview(bytearray(GATHER_MAX)))) == expected


# ---------------------------------------------------------------------- RX


def rx_ring(shm: SharedMemory, mem: GuestMemory, chains: list[list[int]], num: int = 8,
            start: int = 0) -> tuple[DriverRing, Virtqueue, list[int]]:
    """Post writable chains of the given buffer sizes; return the ring, queue and heads."""
    ring = DriverRing(shm, num, start_idx=start)
    heads = [ring.chain([(size, True) for size in sizes]) for sizes in chains]
    for h in heads:
        ring.post(h)
    return ring, ring.device(mem), heads


def received(ring: DriverRing, used: list[tuple[int, int]]) -> bytes:
    """Concatenate what the device wrote into the used chains, as the guest would."""
    data = b""
    for head, length in used:
        for off, size in ring.buffers(head):
            take = min(size, length)
            data += ring.read(off, take)
            length -= take
    return data


@pytest.mark.parametrize("hdr_len", [10, 12])
def test_rx_single_buffer(shm: SharedMemory, mem: GuestMemory, hdr_len: int) -> None:
    """Header (zeroed, num_buffers 1 when present) + frame into one buffer."""
    ring, vq, heads = rx_ring(shm, mem, [[2048]])
    rx = RxWriter(vq, hdr_len, mrg_rxbuf=False)
    assert rx.put(FRAME) is True
    vq.flush()
    used = ring.collect()
    assert used == [(heads[0], hdr_len + len(FRAME))]
    data = received(ring, used)
    if hdr_len == 12:
        assert VNET_HDR.unpack(data[:12]) == (0, 0, 0, 0, 0, 0, 1)
    else:
        assert data[:10] == bytes(10)
    assert data[hdr_len:] == FRAME
    assert rx.put(FRAME) is False          # no more buffers
    vq.release()


def test_rx_header_and_frame_in_separate_buffers(shm: SharedMemory, mem: GuestMemory) -> None:
    """A chain of [12, 1514] buffers (header alone first) is filled in order."""
    ring, vq, heads = rx_ring(shm, mem, [[12, 1000, 1000]])
    rx = RxWriter(vq, 12, mrg_rxbuf=False)
    assert rx.put(memoryview(FRAME)) is True
    vq.flush()
    used = ring.collect()
    assert used == [(heads[0], 12 + len(FRAME))]
    assert received(ring, used)[12:] == FRAME
    vq.release()


def test_rx_too_big_without_mrg_consumes_nothing(shm: SharedMemory, mem: GuestMemory) -> None:
    """A frame larger than the head chain is refused, counted, and the chain stays available."""
    ring, vq, heads = rx_ring(shm, mem, [[1024], [2048]])
    rx = RxWriter(vq, 12, mrg_rxbuf=False)
    assert rx.put(FRAME) is False
    assert rx.too_big == 1
    assert vq.last_avail == 0 and vq.flush() is False
    assert rx.put(FRAME[:500]) is True      # the same head chain takes a smaller frame
    vq.flush()
    assert ring.collect() == [(heads[0], 512)]
    vq.release()


def test_mrg_rxbuf_frame_spans_three_chains(shm: SharedMemory, mem: GuestMemory) -> None:
    """12 + 1536 bytes over 600-byte chains: num_buffers 3, each chain pushed with its share."""
    ring, vq, heads = rx_ring(shm, mem, [[600], [600], [600], [600]], start=65534)
    rx = RxWriter(vq, 12, mrg_rxbuf=True)
    assert rx.put(FRAME) is True
    assert vq.flush() is True
    used = ring.collect()
    assert used == [(heads[0], 600), (heads[1], 600), (heads[2], 12 + len(FRAME) - 1200)]
    data = received(ring, used)
    assert VNET_HDR.unpack(data[:12]) == (0, 0, 0, 0, 0, 0, 3)
    assert data[12:] == FRAME
    assert vq.last_avail == 1                # crossed the wrap
    vq.release()


def test_mrg_rxbuf_rolls_back_when_buffers_run_out(shm: SharedMemory, mem: GuestMemory) -> None:
    """Two chains are not enough: nothing consumed; once a third is posted the frame goes in."""
    ring, vq, heads = rx_ring(shm, mem, [[600], [600]])
    rx = RxWriter(vq, 12, mrg_rxbuf=True)
    assert rx.put(FRAME) is False
    assert vq.last_avail == 0 and vq.avail_pending() == 2
    assert vq.flush() is False and ring.collect() == []
    third = ring.chain([(600, True)])
    ring.post(third)
    assert rx.put(FRAME) is True
    vq.flush()
    used = ring.collect()
    assert [h for h, _n in used] == heads + [third]
    assert received(ring, used)[12:] == FRAME
    vq.release()


def test_mrg_rxbuf_small_frames_use_one_chain_each(shm: SharedMemory, mem: GuestMemory) -> None:
    """Frames that fit take one chain with num_buffers 1."""
    ring, vq, heads = rx_ring(shm, mem, [[1600], [1600]])
    rx = RxWriter(vq, 12, mrg_rxbuf=True)
    assert rx.put(b"a" * 60) and rx.put(b"b" * 1514)
    vq.flush()
    used = ring.collect()
    assert used == [(heads[0], 72), (heads[1], 1526)]
    assert VNET_HDR.unpack(received(ring, used[:1])[:12])[6] == 1
    vq.release()


@pytest.mark.parametrize("mrg", [False, True])
def test_rx_chain_without_writable_buffer_is_a_driver_error(shm: SharedMemory, mem: GuestMemory,
                                                            mrg: bool) -> None:
    """A readable-only RX chain raises VirtqueueError and nothing stays popped."""
    ring = DriverRing(shm, 8)
    if mrg:
        ring.post(ring.chain([(100, True)]))
    ring.post(ring.chain([(100, False)]))
    vq = ring.device(mem)
    rx = RxWriter(vq, 12, mrg_rxbuf=mrg)
    with pytest.raises(VirtqueueError):
        rx.put(FRAME)
    assert vq.last_avail == 0
    vq.release()


def test_rx_chain_too_small_for_header(shm: SharedMemory, mem: GuestMemory) -> None:
    """A posted chain smaller than the header is a driver error."""
    _ring, vq, _heads = rx_ring(shm, mem, [[8]])
    with pytest.raises(VirtqueueError):
        RxWriter(vq, 12, mrg_rxbuf=True).put(b"x")
    assert vq.last_avail == 0
    vq.release()


def test_rx_writer_rejects_bad_header_config(shm: SharedMemory, mem: GuestMemory) -> None:
    """MRG_RXBUF needs the 12-byte header; only 10 and 12 exist."""
    _ring, vq, _heads = rx_ring(shm, mem, [])
    with pytest.raises(ValueError):
        RxWriter(vq, 10, mrg_rxbuf=True)
    with pytest.raises(ValueError):
        RxWriter(vq, 14, mrg_rxbuf=False)
    vq.release()


def test_mrg_rxbuf_frame_larger_than_whole_ring_is_too_big(shm: SharedMemory, mem: GuestMemory) -> None:
    """With every slot posted and still not enough room, the frame is refused as too big."""
    ring, vq, _heads = rx_ring(shm, mem, [[600]] * 4, num=4)
    rx = RxWriter(vq, 12, mrg_rxbuf=True)
    assert rx.put(bytes(3000)) is False
    assert rx.too_big == 1 and vq.last_avail == 0
    assert rx.put(bytes(2000)) is True                 # 2012 bytes fit in four chains
    assert rx.too_big == 1 and vq.last_avail == 4
    vq.flush()
    assert [n for _h, n in ring.collect()] == [600, 600, 600, 212]
    vq.release()


# ---------------------------------------------------------------------- checksum offload flags


#: A TX header with NEEDS_CSUM (csum_start 34, csum_offset 16: TCP over IPv4).
PARTIAL_HDR = VNET_HDR.pack(VnetHdrFlags.NEEDS_CSUM, 0, 0, 0, 34, 16, 0)


@pytest.mark.parametrize("parts", [
    [PARTIAL_HDR + FRAME],
    [PARTIAL_HDR, FRAME],
    [b"", PARTIAL_HDR[:1], PARTIAL_HDR[1:], FRAME],     # an empty leading buffer: the flags are in the next
])
def test_first_byte_reads_the_first_header_byte(parts: list[bytes]) -> None:
    """first_byte returns the header's flags byte wherever the header starts."""
    readable = [memoryview(p) for p in parts]
    assert first_byte(readable) == VnetHdrFlags.NEEDS_CSUM
    assert bytes(gather(readable, 12, memoryview(bytearray(GATHER_MAX)))) == FRAME


def test_first_byte_without_flags_or_bytes() -> None:
    """A zero header reads 0, and so does a chain without any byte."""
    assert first_byte([memoryview(bytes(12) + FRAME)]) == 0
    assert first_byte([]) == 0 and first_byte([memoryview(b"")]) == 0


@pytest.mark.parametrize("mrg", [False, True])
def test_rx_header_carries_data_valid(shm: SharedMemory, mem: GuestMemory, mrg: bool) -> None:
    """set_flags(DATA_VALID) puts the flag in every header, single-chain and merged alike."""
    ring, vq, heads = rx_ring(shm, mem, [[2048], [600], [600], [600]])
    rx = RxWriter(vq, 12, mrg_rxbuf=mrg, flags=VnetHdrFlags.DATA_VALID)
    assert rx.put(FRAME) is True
    if mrg:
        assert rx.put(FRAME) is True          # spans the three 600-byte chains
    vq.flush()
    used = ring.collect()
    first = received(ring, used[:1])
    assert VNET_HDR.unpack(first[:12]) == (VnetHdrFlags.DATA_VALID, 0, 0, 0, 0, 0, 1)
    if mrg:
        merged = received(ring, used[1:])
        assert VNET_HDR.unpack(merged[:12]) == (VnetHdrFlags.DATA_VALID, 0, 0, 0, 0, 0, 3)
        assert merged[12:] == FRAME
    vq.release()


def test_rx_set_flags_back_to_zero_and_refuses_needs_csum(shm: SharedMemory, mem: GuestMemory) -> None:
    """Flags can be cleared again; NEEDS_CSUM (per-frame csum_start) and unknown bits are refused."""
    ring, vq, heads = rx_ring(shm, mem, [[2048]])
    rx = RxWriter(vq, 10, mrg_rxbuf=False, flags=VnetHdrFlags.DATA_VALID)
    rx.set_flags(0)
    assert rx.put(FRAME) is True
    vq.flush()
    assert received(ring, ring.collect())[:10] == bytes(10)
    for bad in (VnetHdrFlags.NEEDS_CSUM, 4):
        with pytest.raises(ValueError):
            rx.set_flags(bad)
    vq.release()


@pytest.mark.parametrize("mrg", [False, True])
def test_rx_gso_frame_header(shm: SharedMemory, mem: GuestMemory, mrg: bool) -> None:
    """A GsoFrame's gso fields go in its header, beside the writer's flags; one with gso_type NONE gets none."""
    ring, vq, heads = rx_ring(shm, mem, [[2048], [2048], [600], [600], [600]])
    rx = RxWriter(vq, 12, mrg_rxbuf=mrg, flags=VnetHdrFlags.DATA_VALID)
    gso = GsoFrame(len(FRAME), GsoType.TCPV4, 1400, 54)
    gso[:] = FRAME
    plain = GsoFrame(len(FRAME), GsoType.NONE, 1400, 54)
    plain[:] = FRAME
    assert rx.put(gso) is True and rx.put(plain) is True
    if mrg:
        assert rx.put(gso) is True            # spans the three 600-byte chains
    vq.flush()
    used = ring.collect()
    expected = [(VnetHdrFlags.DATA_VALID, GsoType.TCPV4, 54, 1400, 0, 0, 1),
                (VnetHdrFlags.DATA_VALID, 0, 0, 0, 0, 0, 1)]
    if mrg:
        expected.append((VnetHdrFlags.DATA_VALID, GsoType.TCPV4, 54, 1400, 0, 0, 3))
        assert received(ring, used[2:])[12:] == FRAME
    assert [VNET_HDR.unpack(received(ring, [u])[:12]) for u in used[:len(expected)]] == expected
    vq.release()


# ------------------------------------------------------------- in place (take / commit)


def _fill(views: list[memoryview], data: bytes) -> int:
    """Write ``data`` across ``views`` as recvmsg_into would; returns the bytes written."""
    at = 0
    for view in views:
        n = min(len(view), len(data) - at)
        view[:n] = data[at:at + n]
        at += n
    return at


def test_take_spans_chains_and_commit_gives_back_the_unused(shm: SharedMemory, mem: GuestMemory) -> None:
    """A span over four 600-byte chains, filled with 1100 bytes after a 66-byte head room: three chains
    pushed (num_buffers 3, gso fields), the fourth popped again next."""
    ring, vq, heads = rx_ring(shm, mem, [[600], [600], [600], [600], [600]])
    rx = RxWriter(vq, 12, mrg_rxbuf=True, flags=VnetHdrFlags.DATA_VALID)
    span = rx.take(66 + 2000, 66)
    assert span is not None and span.capacity == 2400 and len(span.heads) == 4
    views = span.views(66, 1100)
    assert [len(v) for v in views] == [534, 566]
    assert _fill(views, FRAME[:1100]) == 1100
    span.head()[12:66] = b"h" * 54
    assert span.commit(54 + 1100, GsoType.TCPV4, 1000, 54) == 2
    vq.flush()
    used = ring.collect()
    assert used == [(heads[0], 600), (heads[1], 66 + 1100 - 600)]
    data = received(ring, used)
    assert VNET_HDR.unpack(data[:12]) == (VnetHdrFlags.DATA_VALID, GsoType.TCPV4, 54, 1000, 0, 0, 2)
    assert data[12:66] == b"h" * 54 and data[66:] == FRAME[:1100]
    chain = vq.pop()
    assert chain is not None and chain[0] == heads[2]      # the unused chains went back in order
    vq.release()


def test_take_partial_when_buffers_run_short(shm: SharedMemory, mem: GuestMemory) -> None:
    """Fewer buffers than asked: the span holds what there is; cancel gives everything back."""
    ring, vq, heads = rx_ring(shm, mem, [[600], [600]])
    rx = RxWriter(vq, 12, mrg_rxbuf=True)
    span = rx.take(66 + 5000, 66)
    assert span is not None and span.capacity == 1200
    assert sum(len(v) for v in span.views(66, 5000)) == 1200 - 66
    span.cancel()
    assert vq.last_avail == 0 and vq.avail_pending() == 2
    assert vq.flush() is False
    vq.release()


def test_take_without_mrg_is_one_chain(shm: SharedMemory, mem: GuestMemory) -> None:
    """Without MRG_RXBUF a span is the head chain alone, even a multi-buffer one (big packets)."""
    ring, vq, heads = rx_ring(shm, mem, [[1024, 4096, 4096], [4096]])
    rx = RxWriter(vq, 12, mrg_rxbuf=False)
    span = rx.take(12 + 20000, 66)
    assert span is not None and span.heads == [heads[0]] and span.capacity == 1024 + 8192
    views = span.views(66, 9000)
    assert [len(v) for v in views] == [1024 - 66, 4096, 9000 - 958 - 4096]
    _fill(views, bytes(9000))
    assert span.commit(54 + 9000) == 1
    vq.flush()
    assert ring.collect() == [(heads[0], 66 + 9000)]
    vq.release()


def test_take_on_empty_ring_and_unsuitable_head(shm: SharedMemory, mem: GuestMemory) -> None:
    """No chain: None, ``in_place`` kept.  A first buffer too small for the head room (header alone):
    None, nothing consumed, ``in_place`` cleared so that the caller builds frames instead."""
    ring, vq, _heads = rx_ring(shm, mem, [])
    rx = RxWriter(vq, 12, mrg_rxbuf=True)
    assert rx.take(2000, 66) is None and rx.in_place
    vq.release()
    ring, vq, heads = rx_ring(shm, mem, [[12, 1500]])
    rx = RxWriter(vq, 12, mrg_rxbuf=False)
    assert rx.take(2000, 66) is None and not rx.in_place
    assert vq.last_avail == 0
    assert rx.put(FRAME[:1000]) is True        # put still handles such chains
    vq.release()


def test_take_chain_without_writable_buffer_is_a_driver_error(shm: SharedMemory, mem: GuestMemory) -> None:
    """A later chain of the span with nothing writable: VirtqueueError, every chain given back."""
    ring = DriverRing(shm, 8)
    first = ring.chain([(600, True)])
    bad = ring.chain([(600, False)])
    ring.post(first)
    ring.post(bad)
    vq = ring.device(mem)
    rx = RxWriter(vq, 12, mrg_rxbuf=True)
    with pytest.raises(VirtqueueError):
        rx.take(2000, 66)
    assert vq.last_avail == 0
    vq.release()
