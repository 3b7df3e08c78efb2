"""Corpus fuzzing of a running switch: random vhost-user messages and random guest frames, then a well-behaved
front-end must be served by the same processes.

Theory of operation
-------------------
The codec-level properties (tests/net/test_net_fuzz.py) show that parsers
return or raise their layer's error; this module shows that the processes
hold up.  A real two-worker switch runs in its own network namespace with
nothing but a loopback (tests.switch: no route leads anywhere, so no frame
fuzzed here can leave the namespace).  One front-end completes a normal
handshake, then:

* messages: ``SHARDSWITCH_FUZZ_EXAMPLES`` (default 10,000) requests drawn
  from every request code (and unknown ones), with payloads of the right
  size, a wrong size or random bytes, and now and then a descriptor of a
  random kind (eventfd, memfd, pipe, the connection's own socket), sent
  with NEED_REPLY; a hang-up (the switch drops a front-end whose framing
  broke) is answered by connecting again;
* frames: as many random or mutated guest frames behind random virtio-net
  headers (every field: flags, GSO type, header length, GSO size, checksum
  start and offset, buffer count), on both queue pairs.

Afterwards the coordinator and both workers must be the same processes, and
a new well-behaved front-end must get its ARP replies on every pair, with no
descriptor or mapping leaked (tests.switchkit.assert_recovered).  The inputs
come from a seeded random generator: every run sends the same ones.
"""

from __future__ import annotations

import os
import random
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from shardswitch.frontend.client import FrontendError, VhostUserFrontend
from shardswitch.vhost.wire import VRING_ADDR, VRING_STATE, MemRegion, Request
from tests.net.fuzzkit import TEMPLATES
from tests.switch import Switch
from tests.switchkit import assert_recovered, baseline, is_periodic_ra

EXAMPLES = int(os.environ.get("SHARDSWITCH_FUZZ_EXAMPLES", "10000"))
PAIRS = 2
#: Bytes of one memory region on the wire.
REGION_SIZE = len(MemRegion(0, 1, 0, 0).pack())
#: The payload sizes requests take, to make well-sized random payloads likely.
SIZES = (0, 8, VRING_STATE.size, VRING_ADDR.size, REGION_SIZE, 8 + REGION_SIZE, 8 + 2 * REGION_SIZE)


@pytest.fixture
def switch(tmp_path: Path) -> Iterator[Switch]:
    """A two-worker switch of this test's own."""
    with Switch(tmp_path, workers=PAIRS) as sw:
        yield sw


def _connect(switch: Switch) -> VhostUserFrontend:
    """A front-end with a completed handshake."""
    fe = VhostUserFrontend.connect(switch.socket, queue_pairs=PAIRS, ignore=is_periodic_ra, timeout=5.0)
    fe.handshake()
    return fe


def _descriptor(rng: random.Random, fe: VhostUserFrontend) -> tuple[list[int], list[int]]:
    """(descriptors to send, descriptors to close afterwards): usually none, else one of a random kind."""
    kind = rng.randrange(12)
    if kind == 0:
        fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        return [fd], [fd]
    if kind == 1:
        fd = os.memfd_create("fuzz", os.MFD_CLOEXEC)
        os.ftruncate(fd, rng.choice((0, 4096, 1 << 20)))
        return [fd], [fd]
    if kind == 2:
        r, w = os.pipe()
        return [r], [r, w]
    if kind == 3:
        return [fe.sock.fileno()], []
    return [], []


def _message(rng: random.Random) -> tuple[int, bytes]:
    """A request code (known or not) and a payload of a plausible or random size."""
    request = rng.choice(list(Request)) if rng.random() < 0.9 else rng.randrange(60, 256)
    size = rng.choice(SIZES) if rng.random() < 0.8 else rng.randrange(0, 300)
    payload = bytes(rng.getrandbits(8) for _ in range(size))
    if size >= 8 and rng.random() < 0.5:   # a small index or value first, as real requests have
        payload = struct.pack("<Q", rng.choice((0, 1, 2, 3, 4, 0x100, 1 << 32))) + payload[8:]
    return int(request), payload


def test_random_messages_then_served(switch: Switch) -> None:
    """EXAMPLES random requests (reconnecting when hung up on): no process dies, a new front-end is served."""
    rng = random.Random(20261206)
    before = baseline(switch)
    fe = _connect(switch)
    reconnects = 0
    try:
        for _ in range(EXAMPLES):
            request, payload = _message(rng)
            fds, ours = _descriptor(rng, fe)
            try:
                fe.request(request, payload, fds, need_reply=True)
            except (FrontendError, OSError, AssertionError, struct.error):
                fe.close()
                fe = _connect(switch)
                reconnects += 1
            finally:
                for fd in ours:
                    os.close(fd)
    finally:
        fe.close()
    assert switch.alive(), switch.log()[-3000:]
    print(f"{EXAMPLES} messages, {reconnects} reconnections")
    assert_recovered(switch, before)


def _vnet_header(rng: random.Random) -> bytes:
    """A random virtio-net header (12 bytes: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset,
    num_buffers), each field now plausible, now random."""
    flags = rng.choice((0, 1, 2, 3, rng.getrandbits(8)))
    gso_type = rng.choice((0, 1, 3, 4, 0x80, rng.getrandbits(8)))
    fields = [rng.choice((0, 14, 34, 54, 1500, rng.getrandbits(16))) for _ in range(5)]
    return struct.pack("<BBHHHHH", flags, gso_type, *fields)


def _frame(rng: random.Random) -> bytes:
    """A random frame, or a template with bytes overwritten and its length changed."""
    if rng.random() < 0.3:
        return bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 200)))
    data = bytearray(rng.choice(TEMPLATES))
    for _ in range(rng.randrange(0, 6)):
        data[rng.randrange(len(data))] = rng.getrandbits(8)
    return bytes(data[:rng.randrange(0, len(data) + 1)]) + bytes(rng.getrandbits(8) for _ in range(rng.randrange(8)))


def test_random_frames_then_served(switch: Switch) -> None:
    """EXAMPLES random frames behind random virtio-net headers on both pairs: the workers live on and a new
    front-end is served."""
    rng = random.Random(6122026)
    before = baseline(switch)
    with _connect(switch) as fe:
        for pair in range(PAIRS):
            fe.post_rx(pair, 128)
        sent = 0
        while sent < EXAMPLES:
            pair = sent % PAIRS
            batch = [_frame(rng) for _ in range(32)]
            hdr = _vnet_header(rng)
            sent += max(1, fe.send_frames(pair, batch, hdr=hdr))
            fe.recv_frames(pair, timeout=0.0)
            fe.post_rx(pair, 32)
    status = switch.status()
    assert sum(w["tx_frames"] for w in status["workers"]) >= EXAMPLES * 0.9, status
    drops: dict[str, int] = {}
    for worker in status["workers"]:
        for name, count in worker["drops"].items():
            drops[name] = drops.get(name, 0) + count
    print("drops:", dict(sorted(drops.items())))
    assert "INTERNAL_ERROR" not in drops, (drops, switch.log()[-3000:])
    assert_recovered(switch, before)
