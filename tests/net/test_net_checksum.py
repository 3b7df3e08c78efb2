"""Internet checksum against the word-by-word RFC 1071 reference."""

from __future__ import annotations

import random

import pytest
from tests.net.net_testlib import rfc1071

from shardswitch.net import checksum


def test_matches_reference_on_random_data() -> None:
    """Every length 0..300 (odd ones too), random contents, bytes and views."""
    rng = random.Random(1071)
    for length in list(range(301)) + [1499, 1500, 9000, 65535]:
        data = rng.randbytes(length)
        assert checksum.checksum(data) == rfc1071(data), length
        assert checksum.checksum(memoryview(bytearray(data))) == rfc1071(data)


@pytest.mark.parametrize("data", [b"", b"\0", bytes(20), b"\xff\xff", b"\xff" * 7,
                                  b"\xff\xfe\x00\x01", b"\x01"])
def test_edge_values(data: bytes) -> None:
    """Zeros, all ones and sums that are multiples of 0xFFFF."""
    assert checksum.checksum(data) == rfc1071(data)


def test_known_ipv4_header() -> None:
    """The classic example header checksums to 0xB861 and then verifies."""
    header = bytearray.fromhex("450000730000400040110000c0a80001c0a800c7")
    assert checksum.checksum(header) == 0xB861
    header[10:12] = b"\xb8\x61"
    assert checksum.is_valid(header)
    header[0] ^= 1
    assert not checksum.is_valid(header)


def test_pseudo_header_start_equals_concatenation() -> None:
    """Passing the pseudo-header as ints equals summing its bytes."""
    rng = random.Random(7)
    for _ in range(200):
        src, dst = rng.getrandbits(32), rng.getrandbits(32)
        payload = rng.randbytes(rng.randrange(0, 64))
        pseudo = (src.to_bytes(4, "big") + dst.to_bytes(4, "big") + b"\0\x11"
                  + len(payload).to_bytes(2, "big"))
        start = checksum.pseudo_header_v4(src, dst, 17, len(payload))
        assert checksum.checksum(payload, start) == rfc1071(pseudo + payload)


def test_combine_and_finish() -> None:
    """Sums of even-length pieces combine to the sum of the whole."""
    rng = random.Random(3)
    for _ in range(200):
        a, b = rng.randbytes(rng.randrange(0, 40) * 2), rng.randbytes(rng.randrange(0, 40))
        total = checksum.combine(checksum.ones_sum(a), checksum.ones_sum(b))
        assert checksum.finish(total) == rfc1071(a + b)
