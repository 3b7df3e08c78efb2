"""Malformed vhost-user traffic and malformed rings against a real shardswitch process.

All tests share one real two-worker switch (:class:`tests.switch.Switch`):
each connects the Python front-end, does a full handshake and then
misbehaves in one way.  Each misbehaviour must be refused or contained, visibly:

* a refused request answers a REPLY_ACK failure (non-zero u64) and the same
  connection keeps working;
* a message that breaks the framing (bad version, oversized payload, a
  stall, too many descriptors...) disconnects that front-end, logged and
  counted in the status' ``refused`` map;
* a ring the guest broke (looping chain, nested indirect table, buffer
  outside memory...) shows ``broken`` with an error in the status and a
  ``BROKEN_RING`` event, while every other ring keeps working;
* a malformed guest frame on a healthy ring is dropped and counted.

Afterwards :func:`tests.switchkit.assert_recovered` checks that the same
coordinator, with the same worker processes, serves a new well-behaved
front-end on every pair and holds no leaked descriptor or mapping - so the
last case is served by a switch that has survived all the others.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from shardswitch.coordinator.server import HANDSHAKE_TIMEOUT
from shardswitch.frontend.client import VhostUserFrontend
from shardswitch.vhost.wire import (HEADER, LOG, U64, VRING_ADDR, VRING_NOFD_MASK, VRING_STATE,
                                    MemRegion, ProtocolFeature, Request, VirtioFeature, encode_mem_table,
                                    encode_message, encode_single_region)
from shardswitch.virtio.virtqueue import DescFlags
from tests.net.net_testlib import (BROADCAST_MAC, GUEST_MAC, OUR_MAC, eth_frame, ip, ipv4_packet,
                                   udp_datagram)
from tests.switch import Switch
from tests.switchkit import (GATEWAY_IP, GUEST_IP, Baseline, is_periodic_ra, arp_request, arp_roundtrip, assert_recovered,
                             baseline, drops, events, ring_status, wait_idle, wait_status)

PAIRS = 2
NEXT, WRITE, INDIRECT = int(DescFlags.NEXT), int(DescFlags.WRITE), int(DescFlags.INDIRECT)
#: A guest-physical address far outside the front-end's 64 MiB of guest RAM.
FAR = 1 << 40


@pytest.fixture(scope="module")
def switch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Switch]:
    """One real two-worker switch for the whole module: every case must leave it serving."""
    with Switch(tmp_path_factory.mktemp("malformed"), workers=PAIRS) as sw:
        yield sw


@pytest.fixture
def before(switch: Switch) -> Baseline:
    """The idle switch before the test misbehaves."""
    return baseline(switch)


@pytest.fixture
def fe(switch: Switch, before: Baseline) -> Iterator[VhostUserFrontend]:
    """A front-end that completed a normal handshake on every pair."""
    with VhostUserFrontend.connect(switch.socket, queue_pairs=PAIRS, ignore=is_periodic_ra) as frontend:
        frontend.handshake()
        yield frontend


def eventfds(count: int) -> list[int]:
    """``count`` fresh eventfds (the test closes them; the switch must close its copies)."""
    return [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(count)]


def close_all(fds: list[int]) -> None:
    """Close the test's descriptors."""
    for fd in fds:
        os.close(fd)


def refused(switch: Switch) -> Counter[str]:
    """The coordinator's refused-request counters."""
    return Counter(switch.status()["frontend"]["refused"])


class LogWatch:
    """Counts lines the shared switch logs from now on."""

    def __init__(self, switch: Switch) -> None:
        """Start watching ``switch``'s log."""
        self.switch = switch
        self.start = len(switch.log())

    def count(self, text: str) -> int:
        """How often ``text`` was logged since the watch started."""
        return self.switch.log()[self.start:].count(text)


def all_pairs_answer(fe: VhostUserFrontend) -> None:
    """An ARP round trip on every pair of ``fe`` (the connection still works)."""
    for pair in range(PAIRS):
        arp_roundtrip(fe, pair)


# -- requests refused with a REPLY_ACK failure; the connection goes on --------------------------------


@dataclass(frozen=True)
class Refusal:
    """A request the switch must refuse with a non-zero REPLY_ACK status."""

    request: int
    payload: Callable[[VhostUserFrontend], bytes]
    #: How many eventfds travel with it.
    fds: int = 0
    #: The key the refusal is counted under in the status.
    counted_as: str = ""


def _overlapping_table(fe: VhostUserFrontend) -> bytes:
    """A memory table whose two regions overlap in guest-physical space."""
    region = fe.ram.regions[0]
    other = MemRegion(region.guest_phys_addr + 4096, 4096, region.userspace_addr + (1 << 32), 0)
    return encode_mem_table([region, other])


def _nine_regions(fe: VhostUserFrontend) -> bytes:
    """A memory table announcing 9 regions (8 is the maximum)."""
    regions = [MemRegion(i << 30, 4096, (1 << 40) + (i << 30), 0) for i in range(9)]
    return struct.pack("<II", 9, 0) + b"".join(r.pack() for r in regions)


REFUSALS: dict[str, Refusal] = {
    "unknown request 99": Refusal(99, lambda fe: b"", counted_as="request 99"),
    "unsupported request IOTLB_MSG": Refusal(Request.IOTLB_MSG, lambda fe: bytes(8)),
    "wrong size: SET_VRING_NUM of 4 bytes": Refusal(Request.SET_VRING_NUM, lambda fe: bytes(4)),
    "wrong size: SET_FEATURES of 12 bytes": Refusal(Request.SET_FEATURES, lambda fe: bytes(12)),
    "wrong size: SET_VRING_ADDR of 32 bytes": Refusal(Request.SET_VRING_ADDR, lambda fe: bytes(32)),
    "bad vring index: SET_VRING_NUM 4": Refusal(Request.SET_VRING_NUM, lambda fe: VRING_STATE.pack(4, 256)),
    "bad vring index: SET_VRING_ENABLE 255": Refusal(Request.SET_VRING_ENABLE,
                                                     lambda fe: VRING_STATE.pack(255, 1)),
    "bad vring index: SET_VRING_ADDR 7": Refusal(Request.SET_VRING_ADDR,
                                                 lambda fe: VRING_ADDR.pack(7, 0, 0, 0, 0, 0)),
    "bad vring index: SET_VRING_CALL 9 with an fd": Refusal(Request.SET_VRING_CALL, lambda fe: U64.pack(9),
                                                            fds=1),
    "ring size not a power of two": Refusal(Request.SET_VRING_NUM, lambda fe: VRING_STATE.pack(0, 100)),
    "ring base over 16 bits": Refusal(Request.SET_VRING_BASE, lambda fe: VRING_STATE.pack(1, 0x10000)),
    "SET_VRING_ENABLE 2": Refusal(Request.SET_VRING_ENABLE, lambda fe: VRING_STATE.pack(0, 2)),
    "unknown vring address flags": Refusal(Request.SET_VRING_ADDR, lambda fe: VRING_ADDR.pack(1, 2, 0, 0, 0, 0)),
    "missing fds: SET_MEM_TABLE without descriptors": Refusal(
        Request.SET_MEM_TABLE, lambda fe: encode_mem_table(fe.ram.regions)),
    "missing fds: ADD_MEM_REG without descriptor": Refusal(
        Request.ADD_MEM_REG, lambda fe: encode_single_region(fe.ram.regions[0])),
    "missing fds: SET_VRING_KICK without fd or NOFD": Refusal(Request.SET_VRING_KICK, lambda fe: U64.pack(1)),
    "SET_VRING_KICK with an fd and the NOFD bit": Refusal(
        Request.SET_VRING_KICK, lambda fe: U64.pack(1 | VRING_NOFD_MASK), fds=1),
    "SET_VRING_CALL with unknown bits": Refusal(Request.SET_VRING_CALL, lambda fe: U64.pack(0x200), fds=1),
    "descriptor on SET_VRING_NUM": Refusal(Request.SET_VRING_NUM, lambda fe: VRING_STATE.pack(0, 256), fds=1),
    "SET_MEM_TABLE with 9 regions": Refusal(Request.SET_MEM_TABLE, _nine_regions, fds=1),
    "SET_MEM_TABLE with overlapping regions": Refusal(Request.SET_MEM_TABLE, _overlapping_table, fds=2),
    "SET_FEATURES not offered": Refusal(
        Request.SET_FEATURES, lambda fe: U64.pack(fe.negotiated_features | VirtioFeature.GUEST_UFO)),
    "SET_FEATURES with an announce we do not offer": Refusal(
        Request.SET_FEATURES, lambda fe: U64.pack(fe.negotiated_features | VirtioFeature.GUEST_ANNOUNCE)),
    "SET_PROTOCOL_FEATURES not offered": Refusal(
        Request.SET_PROTOCOL_FEATURES, lambda fe: U64.pack(fe.protocol_features | ProtocolFeature.BACKEND_REQ)),
    "SET_LOG_FD without a descriptor": Refusal(Request.SET_LOG_FD, lambda fe: b""),
    "SET_LOG_FD with an eventfd and a second one": Refusal(Request.SET_LOG_FD, lambda fe: b"", fds=2),
    "SET_STATUS not a byte": Refusal(Request.SET_STATUS, lambda fe: U64.pack(0x100)),
}


@pytest.mark.parametrize("case", REFUSALS.values(), ids=REFUSALS.keys())
def test_refused_with_reply_ack(switch: Switch, before: Baseline, fe: VhostUserFrontend, case: Refusal) -> None:
    """A bad request gets a failure status; nothing changes; the same connection keeps working."""
    name = case.counted_as or Request(case.request).name
    counted = refused(switch)[name]
    fds = eventfds(case.fds)
    try:
        status = fe.request_status(case.request, case.payload(fe), fds)
    finally:
        close_all(fds)
    assert status != 0
    assert refused(switch)[name] == counted + 1
    assert not fe.peer_closed(0.0)
    all_pairs_answer(fe)
    assert switch.status()["frontend"]["connected"]
    fe.close()
    assert_recovered(switch, before)


def test_unknown_request_without_need_reply_is_logged(switch: Switch, before: Baseline,
                                                      fe: VhostUserFrontend) -> None:
    """Without need-reply an unknown request is only logged and counted; the stream stays in sync."""
    watch = LogWatch(switch)
    counted = refused(switch)["request 77"]
    fe.send_raw(encode_message(77, bytes(16)))
    assert fe.request(Request.GET_FEATURES) is not None       # the next request is framed correctly
    assert refused(switch)["request 77"] == counted + 1
    assert watch.count("refused request 77") == 1
    all_pairs_answer(fe)
    fe.close()
    assert_recovered(switch, before)


# -- messages that break the framing: that front-end is disconnected -----------------------------------


@dataclass(frozen=True)
class Breach:
    """Bytes (with descriptors) after which the switch must hang up on the front-end."""

    chunks: list[tuple[bytes, int]]
    #: The key the disconnect is counted under in the status.
    counted_as: str
    #: Seconds the switch may take to notice (a stall is noticed after its 2 s deadline).
    within: float = 1.0


BREACHES: dict[str, Breach] = {
    "header with bad version": Breach([(HEADER.pack(Request.GET_FEATURES, 0x2, 0), 0)], "MALFORMED"),
    "header with version 0": Breach([(HEADER.pack(Request.GET_FEATURES, 0x0, 0), 0)], "MALFORMED"),
    "payload size over 4096": Breach([(HEADER.pack(Request.SET_FEATURES, 0x1, 4097), 0)], "MALFORMED"),
    "stall mid-header": Breach([(HEADER.pack(Request.SET_FEATURES, 0x1, 8)[:5], 0)], "MALFORMED", 4.0),
    "stall mid-payload": Breach([(encode_message(Request.SET_FEATURES, bytes(8))[:15], 0)], "MALFORMED", 4.0),
    "too many fds in one sendmsg": Breach([(encode_message(Request.SET_VRING_CALL, U64.pack(0)), 9)],
                                          "MALFORMED"),
    "too many fds across one message": Breach(
        [(HEADER.pack(Request.SET_VRING_CALL, 0x1, 8), 8), (U64.pack(0), 1)], "MALFORMED"),
    "GET_VRING_BASE of wrong size": Breach([(encode_message(Request.GET_VRING_BASE, bytes(4)), 0)],
                                           "GET_VRING_BASE"),
    "GET_VRING_BASE of a bad index": Breach([(encode_message(Request.GET_VRING_BASE, VRING_STATE.pack(9, 0)), 0)],
                                            "GET_VRING_BASE"),
    "SET_LOG_BASE with an eventfd as its log": Breach([(encode_message(Request.SET_LOG_BASE, LOG.pack(4096, 0)), 1)],
                                             "SET_LOG_BASE"),
    "SET_LOG_BASE of a size not in words": Breach([(encode_message(Request.SET_LOG_BASE, LOG.pack(4100, 0)), 1)],
                                                  "SET_LOG_BASE"),
    "unsupported request that needs a reply": Breach([(encode_message(Request.GET_CONFIG, bytes(12)), 0)],
                                                     "GET_CONFIG"),
}


@pytest.mark.parametrize("case", BREACHES.values(), ids=BREACHES.keys())
def test_disconnected(switch: Switch, before: Baseline, fe: VhostUserFrontend, case: Breach) -> None:
    """The switch hangs up on that front-end, logs and counts why, and resets the device."""
    counted = refused(switch)[case.counted_as]
    watch = LogWatch(switch)
    for data, count in case.chunks:
        fds = eventfds(count)
        try:
            fe.send_raw(data, fds)
        finally:
            close_all(fds)
        time.sleep(0.01)      # one chunk per read on the switch's side
    assert fe.peer_closed(case.within), "the switch did not hang up"
    assert refused(switch)[case.counted_as] == counted + 1
    assert watch.count("protocol error") == 1
    fe.close()
    assert_recovered(switch, before)


#: Descriptors of the wrong kind: what each case sends, and with which request.
WRONG_KINDS = ("own socket as memory", "eventfd as memory", "pipe as memory", "/dev/null as memory",
               "short memfd as memory", "memfd as kick", "socket as call")


def _wrong_descriptor(fe: VhostUserFrontend, case: str) -> tuple[int, bytes, list[int], list[int]]:
    """(request, payload, descriptors to send, descriptors the test must close) for one WRONG_KINDS case."""
    table = encode_mem_table(fe.ram.regions)
    if case == "own socket as memory":
        return Request.SET_MEM_TABLE, table, [fe.sock.fileno()], []
    if case == "eventfd as memory":
        fd = os.eventfd(0, os.EFD_CLOEXEC)
        return Request.SET_MEM_TABLE, table, [fd], [fd]
    if case == "pipe as memory":
        r, w = os.pipe()
        return Request.SET_MEM_TABLE, table, [r], [r, w]
    if case == "/dev/null as memory":
        fd = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
        return Request.SET_MEM_TABLE, table, [fd], [fd]
    if case == "short memfd as memory":
        fd = os.memfd_create("short", os.MFD_CLOEXEC)
        os.ftruncate(fd, 4096)
        return Request.SET_MEM_TABLE, table, [fd], [fd]
    if case == "memfd as kick":
        fd = os.memfd_create("kick", os.MFD_CLOEXEC)
        return Request.SET_VRING_KICK, U64.pack(1), [fd], [fd]
    return Request.SET_VRING_CALL, U64.pack(0), [fe.sock.fileno()], []


@pytest.mark.parametrize("case", WRONG_KINDS)
def test_wrong_descriptor_kind_refused_and_next_frontend_served(switch: Switch, before: Baseline,
                                                                fe: VhostUserFrontend, case: str) -> None:
    """A descriptor of the wrong kind (even the front-end's own connection) is refused and closed at once:
    after that front-end disconnects, the next one is served at once."""
    request, payload, fds, ours = _wrong_descriptor(fe, case)
    watch = LogWatch(switch)
    counted = refused(switch)[Request(request).name]
    try:
        assert fe.request_status(request, payload, fds) != 0
    finally:
        close_all(ours)
    assert refused(switch)[Request(request).name] == counted + 1
    assert watch.count("not a memory file" if "memory" in case and "short" not in case
                       else "shorter than the region" if "short" in case else "not an eventfd") == 1
    fe.close()
    wait_idle(switch, timeout=2.0)
    with VhostUserFrontend.connect(switch.socket, queue_pairs=PAIRS, ignore=is_periodic_ra) as nxt:
        nxt.handshake()
        all_pairs_answer(nxt)
    assert watch.count("refused a second front-end") == 0
    assert_recovered(switch, before)


def test_second_frontend_refused_while_first_works(switch: Switch, before: Baseline,
                                                   fe: VhostUserFrontend) -> None:
    """A concurrent second front-end is hung up on; the first one is not disturbed."""
    watch = LogWatch(switch)
    with VhostUserFrontend.connect(switch.socket, queue_pairs=PAIRS, ignore=is_periodic_ra) as second:
        assert second.peer_closed(2.0)
    assert watch.count("refused a second front-end") == 1
    assert not fe.peer_closed(0.0)
    all_pairs_answer(fe)
    fe.close()
    assert_recovered(switch, before)


@pytest.mark.parametrize("says", [b"", HEADER.pack(Request.GET_FEATURES, 1, 0)], ids=["nothing", "get-features"])
def test_stalled_handshake_times_out(switch: Switch, before: Baseline, says: bytes) -> None:
    """A front-end that connects and never sends SET_OWNER (nothing at all, or one request) holds the one
    front-end slot for HANDSHAKE_TIMEOUT at most: it is then dropped (counted, logged) and the next served."""
    watch = LogWatch(switch)
    counted = refused(switch)["HANDSHAKE_TIMEOUT"]
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        silent.connect(switch.socket)
        silent.sendall(says)
        connected = time.monotonic()
        silent.settimeout(HANDSHAKE_TIMEOUT + 5.0)
        while silent.recv(4096):                   # the GET_FEATURES reply, then the hang-up
            pass
        waited = time.monotonic() - connected
    finally:
        silent.close()
    assert HANDSHAKE_TIMEOUT - 0.5 <= waited <= HANDSHAKE_TIMEOUT + 3.0, waited
    assert watch.count("handshake stalled: no SET_OWNER") == 1
    assert refused(switch)["HANDSHAKE_TIMEOUT"] == counted + 1
    with VhostUserFrontend.connect(switch.socket, queue_pairs=PAIRS, ignore=is_periodic_ra) as nxt:
        nxt.handshake()
        all_pairs_answer(nxt)
    assert watch.count("refused a second front-end") == 0
    assert_recovered(switch, before)


def test_quick_reconnect_is_served(switch: Switch, before: Baseline) -> None:
    """A front-end that reconnects the instant its previous connection closed is not refused.

    The previous connection's hang-up may still be unprocessed when the new
    one is accepted; the switch must not take the dead one for a live
    concurrent front-end.
    """
    watch = LogWatch(switch)
    for _ in range(10):
        with VhostUserFrontend.connect(switch.socket, queue_pairs=PAIRS, ignore=is_periodic_ra) as quick:
            quick.handshake()
    assert watch.count("refused a second front-end") == 0
    assert_recovered(switch, before)


# -- rings whose addresses are unusable never start -------------------------------------------------------


def _outside(fe: VhostUserFrontend, index: int) -> bytes:
    """SET_VRING_ADDR with the descriptor table outside guest memory."""
    ring = fe.ring(index)
    return VRING_ADDR.pack(index, 0, fe.ram.userspace_addr + (1 << 36), ring.used_vva, ring.avail_vva, 0)


def _straddling(fe: VhostUserFrontend, index: int) -> bytes:
    """SET_VRING_ADDR with the used ring running past the end of guest memory."""
    ring = fe.ring(index)
    end = fe.ram.userspace_addr + fe.ram.size
    return VRING_ADDR.pack(index, 0, ring.desc_vva, end - 64, ring.avail_vva, 0)


def _misaligned(fe: VhostUserFrontend, index: int) -> bytes:
    """SET_VRING_ADDR with a descriptor table that is not 16-byte aligned."""
    ring = fe.ring(index)
    return VRING_ADDR.pack(index, 0, ring.desc_vva + 8, ring.used_vva, ring.avail_vva, 0)


BAD_ADDRESSES: dict[str, Callable[[VhostUserFrontend, int], bytes]] = {
    "descriptor table outside memory": _outside,
    "used ring straddling the end of memory": _straddling,
    "misaligned descriptor table": _misaligned,
}


@pytest.mark.parametrize("address", BAD_ADDRESSES.values(), ids=BAD_ADDRESSES.keys())
def test_ring_outside_memory_refused(switch: Switch, before: Baseline, fe: VhostUserFrontend,
                                     address: Callable[[VhostUserFrontend, int], bytes]) -> None:
    """A ring set up outside guest memory does not start; the request that would start it fails."""
    index = 1                                    # pair 0's TX ring
    watch = LogWatch(switch)
    fe.get_vring_base(index)                     # stops the ring, as QEMU does before reconfiguring it
    assert fe.request_status(Request.SET_VRING_ADDR, address(fe, index)) == 0   # checked at start
    assert fe.request_status(Request.SET_VRING_KICK, U64.pack(index), [fe.kick_fd(index)]) != 0
    assert ring_status(switch.status(), index)["state"] == "stopped"
    assert watch.count("not starting: vring 1") == 1
    arp_roundtrip(fe, 1)                         # the other pair is untouched
    fe.close()
    assert_recovered(switch, before)


def test_region_larger_than_its_fd_contained(switch: Switch, before: Baseline, fe: VhostUserFrontend) -> None:
    """A memory region running past the end of its memfd is refused, or contained: no ring runs on it.

    The coordinator does not check file sizes (yet); the workers' mmap
    refuses the region, and every ring restarted on the new table then fails
    to start and shows why in the status.
    """
    region = fe.ram.regions[0]
    too_big = MemRegion(region.guest_phys_addr, region.memory_size * 2, region.userspace_addr,
                        region.mmap_offset)
    watch = LogWatch(switch)
    if fe.request_status(Request.SET_MEM_TABLE, encode_mem_table([too_big]), [fe.ram.fd]) == 0:
        status = wait_status(switch, lambda s: all(ring_status(s, i)["state"] == "stopped"
                                                   for i in range(2 * PAIRS)), "every ring to stop")
        assert all("outside guest memory" in ring_status(status, i)["error"] for i in range(2 * PAIRS)), status
        assert watch.count("cannot map region") == PAIRS     # each worker tried
    assert not fe.peer_closed(0.0)
    fe.close()
    assert_recovered(switch, before)


# -- rings the guest breaks: that ring only is broken ------------------------------------------------------


def _buffer(fe: VhostUserFrontend, size: int = 64) -> int:
    """A fresh buffer in guest RAM."""
    return fe.ram.alloc(size, 16)


def _indirect_table(fe: VhostUserFrontend, entries: list[tuple[int, int, int, int]]) -> int:
    """An indirect descriptor table in guest RAM holding ``entries``."""
    table = fe.ram.alloc(16 * len(entries), 16)
    fe.ram.write(table, b"".join(struct.pack("<QIHH", *entry) for entry in entries))
    return table


Descriptors = list[tuple[int, int, int, int]]
#: The descriptor-table slot the raw chains start at (free in a fresh ring).
HEAD = 200


def _nested_indirect(fe: VhostUserFrontend) -> Descriptors:
    """An indirect descriptor whose table holds another indirect descriptor."""
    inner = _indirect_table(fe, [(_buffer(fe), 64, 0, 0)])
    outer = _indirect_table(fe, [(inner, 16, INDIRECT, 0)])
    return [(outer, 16, INDIRECT, 0)]


def _indirect_with_next(fe: VhostUserFrontend) -> Descriptors:
    """An indirect descriptor that also claims a NEXT descriptor."""
    table = _indirect_table(fe, [(_buffer(fe), 64, 0, 0)])
    return [(table, 16, INDIRECT | NEXT, HEAD + 1), (_buffer(fe), 64, 0, 0)]


@dataclass(frozen=True)
class BadChain:
    """A raw chain written at slot HEAD of vring ``index``, and the error it must break that ring with."""

    index: int
    descs: Callable[[VhostUserFrontend], Descriptors]
    error: str


BAD_CHAINS: dict[str, BadChain] = {
    "looping chain": BadChain(3, lambda fe: [(_buffer(fe), 64, NEXT, HEAD)], "loop"),
    "two-descriptor loop": BadChain(
        3, lambda fe: [(_buffer(fe), 64, NEXT, HEAD + 1), (_buffer(fe), 64, NEXT, HEAD)], "loop"),
    "next index out of range": BadChain(3, lambda fe: [(_buffer(fe), 64, NEXT, 300)], "next index 300"),
    "descriptor outside memory": BadChain(3, lambda fe: [(FAR, 64, 0, 0)], "not inside one memory region"),
    "descriptor straddling the end of memory": BadChain(
        3, lambda fe: [(fe.ram.size - 32, 64, 0, 0)], "not inside one memory region"),
    "indirect inside indirect": BadChain(3, _nested_indirect, "inside an indirect table"),
    "indirect table outside memory": BadChain(3, lambda fe: [(FAR, 32, INDIRECT, 0)], "indirect table"),
    "indirect table of odd length": BadChain(
        3, lambda fe: [(_indirect_table(fe, [(_buffer(fe), 64, 0, 0)]), 15, INDIRECT, 0)],
        "indirect table length"),
    "indirect descriptor with NEXT": BadChain(3, _indirect_with_next, "also has NEXT"),
    "readable after writable": BadChain(
        3, lambda fe: [(_buffer(fe), 64, WRITE | NEXT, HEAD + 1), (_buffer(fe), 64, 0, 0)], "readable descriptor"),
    "RX chain without a writable buffer": BadChain(
        2, lambda fe: [(_buffer(fe, 2048), 2048, 0, 0)], "no device-writable buffer"),
    "RX buffer outside memory": BadChain(2, lambda fe: [(FAR, 2048, WRITE, 0)], "not inside one memory region"),
}


def _make_available(fe: VhostUserFrontend, index: int, descs: Descriptors, head: int) -> None:
    """Make a raw chain available on vring ``index`` and make the switch look at it."""
    ring = fe.ring(index)
    ring.add_raw_descriptors(descs, head)
    ring.publish()
    if index % 2:
        fe.kick(index)
    else:
        fe.send_frame(index // 2, arp_request())   # a reply to deliver makes the worker pop the RX chain


def _only_ring_broken(switch: Switch, fe: VhostUserFrontend, index: int, error: str,
                      misbehave: Callable[[], None]) -> None:
    """After ``misbehave``, ring ``index`` is broken with ``error``; its partner and the other pair work."""
    pair = index // 2
    broken_before = events(switch.status(), pair)["BROKEN_RING"]
    misbehave()
    status = wait_status(switch, lambda s: ring_status(s, index)["state"] == "broken", f"vring {index} to break")
    assert error in ring_status(status, index)["error"]
    assert events(status, pair)["BROKEN_RING"] == broken_before + 1
    assert ring_status(status, index ^ 1)["state"] == "running"
    assert not fe.peer_closed(0.0)
    arp_roundtrip(fe, 1 - pair)


@pytest.mark.parametrize("case", BAD_CHAINS.values(), ids=BAD_CHAINS.keys())
def test_broken_chain_contained(switch: Switch, before: Baseline, fe: VhostUserFrontend, case: BadChain) -> None:
    """A malformed chain breaks its own ring only; the worker and every other ring go on."""
    _only_ring_broken(switch, fe, case.index, case.error,
                      lambda: _make_available(fe, case.index, case.descs(fe), HEAD))
    fe.close()
    assert_recovered(switch, before)


def test_head_out_of_range_contained(switch: Switch, before: Baseline, fe: VhostUserFrontend) -> None:
    """An avail entry naming a descriptor beyond the table breaks that ring."""
    _only_ring_broken(switch, fe, 3, "head 4000", lambda: _make_available(fe, 3, [], 4000))
    fe.close()
    assert_recovered(switch, before)


def test_avail_index_running_ahead_contained(switch: Switch, before: Baseline, fe: VhostUserFrontend) -> None:
    """avail.idx more than a ring ahead of the device breaks that ring."""
    ring = fe.ring(3)

    def run_ahead() -> None:
        """Publish an avail.idx 1000 entries ahead and kick."""
        fe.ram.write(ring.avail_gpa + 2, struct.pack("<H", ring.published_idx + 1000))
        fe.kick(3)

    _only_ring_broken(switch, fe, 3, "ahead", run_ahead)
    fe.close()
    assert_recovered(switch, before)


# -- malformed guest frames on a healthy ring ----------------------------------------------------------------


def _ipv4_frame(packet: bytes, *, dst: bytes = OUR_MAC, src: bytes = GUEST_MAC) -> bytes:
    """An Ethernet frame carrying ``packet`` as IPv4."""
    return eth_frame(dst, src, 0x0800, packet)


GUEST, GATEWAY = ip(GUEST_IP), ip(GATEWAY_IP)
BAD_FRAMES: list[tuple[bytes, str]] = [
    (b"", "TX_EMPTY_FRAME"),
    (bytes(10), "TRUNCATED"),
    (_ipv4_frame(ipv4_packet(GUEST, GATEWAY, 17, bytes(8), good_checksum=False)), "IPV4_BAD_CHECKSUM"),
    (_ipv4_frame(ipv4_packet(GUEST, GATEWAY, 17, bytes(8))[:12]), "IPV4_MALFORMED"),
    (_ipv4_frame(ipv4_packet(GUEST, GATEWAY, 17, bytes(8), frag=0x2000)), "IPV4_FRAGMENT"),
    (_ipv4_frame(ipv4_packet(GUEST, GATEWAY, 253, bytes(20))), "IP_PROTO_UNHANDLED"),   # experimental protocol
    (_ipv4_frame(ipv4_packet(GUEST, GATEWAY, 17, udp_datagram(GUEST, GATEWAY, 1000, 67, bytes(8))[:6]
                             + b"\x12\x34" + bytes(8))), "UDP_BAD_CHECKSUM"),
    (eth_frame(BROADCAST_MAC, GUEST_MAC, 0x88CC, bytes(40)), "ETHERTYPE_UNHANDLED"),
    (eth_frame(BROADCAST_MAC, BROADCAST_MAC, 0x0806, bytes(28)), "ETH_BAD_SOURCE"),
    (eth_frame(bytes.fromhex("020000000001"), GUEST_MAC, 0x0806, bytes(28)), "NOT_FOR_US"),
    (eth_frame(BROADCAST_MAC, GUEST_MAC, 0x0806, bytes(10)), "ARP_MALFORMED"),
]


def test_malformed_guest_frames_dropped_and_counted(switch: Switch, before: Baseline,
                                                    fe: VhostUserFrontend) -> None:
    """Bad frames are dropped, each counted under its reason; the ring keeps running."""
    fe.post_rx(0, 8)
    start = switch.status()["workers"][0]
    frames = [frame for frame, _reason in BAD_FRAMES]
    assert fe.send_frames(0, frames) == len(frames)
    fe.ring(1).add_out(bytes(5))                 # a chain shorter than the virtio-net header
    fe.ring(1).publish()
    fe.kick(1)
    expected = Counter(reason for _frame, reason in BAD_FRAMES) + Counter(TX_EMPTY_FRAME=1)
    status = wait_status(switch, lambda s: s["workers"][0]["tx_frames"] == start["tx_frames"] + len(frames) + 1,
                         "the bad frames to be taken")
    assert drops(status, 0) - Counter(start["drops"]) == expected
    assert status["workers"][0]["rx_frames"] == start["rx_frames"]
    assert [ring_status(status, i)["state"] for i in (0, 1)] == ["running", "running"]
    assert not fe.recv_frames(0, 0.05)
    all_pairs_answer(fe)
    fe.close()
    assert_recovered(switch, before)


def test_accepted_requests_ack_success(switch: Switch, before: Baseline, fe: VhostUserFrontend) -> None:
    """need-reply on accepted requests answers 0: the REPLY_ACK path reports success too."""
    assert fe.request_status(Request.SET_OWNER) == 0
    assert fe.request_status(Request.SET_VRING_ENABLE, VRING_STATE.pack(0, 1)) == 0
    assert fe.request_status(Request.SET_STATUS, U64.pack(0x0F)) == 0
    all_pairs_answer(fe)
    fe.close()
    assert_recovered(switch, before)
