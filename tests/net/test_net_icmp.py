"""ICMP and ICMPv6 echo: guest request parsing, reply frames, ping-socket helpers.

Requests are built and replies checked with the independent helpers of
net_testlib.py and ipv6kit.py (word-by-word RFC 1071 checksums).  One
test drives a real Linux ping socket, inside a private network namespace
(``unshare --net``, loopback only), to confirm that the kernel fills in the
identifier and checksum of what :func:`icmp.build_ping_request` makes.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

from shardswitch.net import icmp, icmpv6, ipv4, ipv6
from shardswitch.net.drop import DropReason, PacketError
from tests.net.ipv6kit import (GUEST_LL, OUR_LL, decode_icmpv6_frame, icmpv6_checksum, icmpv6_message, ip6,
                               ipv6_packet)
from tests.net.net_testlib import GUEST_MAC, OUR_MAC, ip, ipv4_packet, rfc1071

GUEST_IP, REMOTE_IP = ip("10.0.2.15"), ip("192.0.2.7")
GUEST6, REMOTE6 = ip6("2001:db8::15"), ip6("2001:db8:ffff::7")
REPO = Path(__file__).resolve().parents[2]


def icmp_message(kind: int, code: int, rest: bytes, *, good_checksum: bool = True) -> bytes:
    """An ICMPv4 message with a right (or wrong) checksum; ``rest`` follows the checksum."""
    message = bytes((kind, code, 0, 0)) + rest
    csum = rfc1071(message)
    if not good_checksum:
        csum ^= 0x0101
    return message[:2] + struct.pack("!H", csum) + message[4:]


def echo_rest(ident: int, seq: int, data: bytes) -> bytes:
    """Identifier, sequence and data of an echo message."""
    return struct.pack("!HH", ident, seq) + data


def v4_packet(message: bytes) -> ipv4.Ipv4Packet:
    """The guest's IPv4 packet carrying ``message``, parsed as the endpoint does."""
    return ipv4.parse(memoryview(ipv4_packet(GUEST_IP, REMOTE_IP, 1, message)))


def v6_packet(message: bytes, *, src: bytes = GUEST6, dst: bytes = REMOTE6,
              extensions: bytes = b"") -> ipv6.Ipv6Packet:
    """The guest's IPv6 packet carrying ``message``, parsed as the endpoint would."""
    return ipv6.parse(memoryview(ipv6_packet(src, dst, 0 if extensions else 58,
                                             extensions + message)))


def reason_of(call: Callable[[], object]) -> DropReason:
    """Run ``call``, which must raise PacketError; return its reason."""
    with pytest.raises(PacketError) as exc:
        call()
    return exc.value.reason


def decode_icmp4_frame(frame: bytes) -> tuple[bytes, bytes, bytes, bytes, int, int, bytes]:
    """Check an Ethernet/IPv4/ICMP frame independently.

    Returns (eth dst, eth src, IP source, IP destination, type, code, rest).
    """
    dst_mac, src_mac, ethertype = struct.unpack_from("!6s6sH", frame)
    assert ethertype == 0x0800
    packet = frame[14:]
    ver_ihl, _tos, total, _ident, frag, ttl, proto, _csum, src, dst = struct.unpack_from(
        "!BBHHHBBH4s4s", packet)
    assert ver_ihl == 0x45 and total == len(packet) and frag & 0x3FFF == 0 and ttl > 0
    assert proto == 1 and rfc1071(packet[:20]) == 0, "IPv4 header checksum"
    message = packet[20:]
    assert rfc1071(message) == 0, "ICMP checksum"
    return dst_mac, src_mac, src, dst, message[0], message[1], message[4:]


# --- IPv4 --------------------------------------------------------------------------------------

@pytest.mark.parametrize("data", [b"", b"x", b"0123456789abcdef" * 3, bytes(range(256)) * 5 + b"o"])
def test_v4_echo_request_parsed(data: bytes) -> None:
    """Identifier, sequence and data (a view, odd lengths too) come out of a request."""
    echo = icmp.parse_echo(v4_packet(icmp_message(8, 0, echo_rest(0x1234, 0xFFFE, data))))
    assert echo is not None
    ident, seq, payload = echo
    assert (ident, seq, bytes(payload)) == (0x1234, 0xFFFE, data)
    assert isinstance(payload, memoryview)


@pytest.mark.parametrize("kind", [0, 3, 5, 11, 13, 42])
def test_v4_other_types_are_none(kind: int) -> None:
    """Well-formed non-request messages give None (the caller counts ICMP_IGNORED)."""
    assert icmp.parse_echo(v4_packet(icmp_message(kind, 1, bytes(12)))) is None


@pytest.mark.parametrize("message, reason", [
    (b"", DropReason.ICMP_MALFORMED),
    (icmp_message(8, 0, echo_rest(1, 1, b""))[:7], DropReason.ICMP_MALFORMED),
    (icmp_message(8, 1, echo_rest(1, 1, b"data")), DropReason.ICMP_MALFORMED),
    (icmp_message(8, 0, echo_rest(1, 1, b"data"), good_checksum=False),
     DropReason.ICMP_BAD_CHECKSUM),
    (icmp_message(0, 0, echo_rest(1, 1, b"data"), good_checksum=False),
     DropReason.ICMP_BAD_CHECKSUM),
])
def test_v4_malformed(message: bytes, reason: DropReason) -> None:
    """Short messages, non-zero echo codes and bad checksums are dropped with a reason."""
    assert reason_of(lambda: icmp.parse_echo(v4_packet(message))) is reason


@pytest.mark.parametrize("data", [b"", b"abc", bytes(range(256)) * 4])
def test_v4_reply_frame_checks_independently(data: bytes) -> None:
    """The reply frame has right lengths and checksums, type 0, our identifiers."""
    frame = icmp.build_echo_reply_frame(GUEST_MAC, OUR_MAC, int.from_bytes(REMOTE_IP, "big"),
                                        int.from_bytes(GUEST_IP, "big"), 0xBEEF, 9, data)
    dst_mac, src_mac, src, dst, kind, code, rest = decode_icmp4_frame(frame)
    assert (dst_mac, src_mac, src, dst, kind, code) == (GUEST_MAC, OUR_MAC, REMOTE_IP, GUEST_IP,
                                                        0, 0)
    assert rest == echo_rest(0xBEEF, 9, data)


def fake_kernel_reply(request: bytes, kernel_ident: int, reply_type: int) -> bytes:
    """What Linux returns from recv() on a ping socket for ``request`` (ident replaced)."""
    kind, code, _csum, _ident, seq = struct.unpack_from("!BBHHH", request)
    assert kind in (8, 128) and code == 0
    header = struct.pack("!BBHHH", reply_type, 0, 0, kernel_ident, seq)
    return header + request[8:]


def test_v4_round_trip_through_ping_socket_helpers() -> None:
    """Guest request -> ping socket bytes -> kernel reply -> frame with the guest's identifier."""
    data = b"ping data \x00\xff" * 7
    request = icmp_message(8, 0, echo_rest(0x4242, 17, data))
    echo = icmp.parse_echo(v4_packet(request))
    assert echo is not None
    to_socket = icmp.build_ping_request(echo.ident, echo.seq, echo.payload)
    assert to_socket == struct.pack("!BBHHH", 8, 0, 0, 0x4242, 17) + data
    received = bytearray(fake_kernel_reply(to_socket, 0x9999, 0))
    reply = icmp.parse_ping_reply(received)
    assert reply is not None and (reply.type, reply.code, reply.seq) == (0, 0, 17)
    frame = icmp.build_echo_reply_frame(GUEST_MAC, OUR_MAC, int.from_bytes(REMOTE_IP, "big"),
                                        int.from_bytes(GUEST_IP, "big"), echo.ident, reply.seq,
                                        reply.payload)
    *_, kind, _code, rest = decode_icmp4_frame(frame)
    assert kind == 0 and rest == echo_rest(0x4242, 17, data)


def test_ping_reply_helpers_edge_cases() -> None:
    """Short recv() data is None; a bare header has empty data; payload is a view."""
    assert icmp.parse_ping_reply(b"\0" * 7) is None
    assert icmpv6.parse_ping_reply(b"") is None
    bare = icmp.parse_ping_reply(memoryview(struct.pack("!BBHHH", 0, 0, 0, 5, 6)))
    assert bare is not None and bare.seq == 6 and bytes(bare.payload) == b""
    assert icmpv6.build_ping_request(1, 2, b"z") == struct.pack("!BBHHH", 128, 0, 0, 1, 2) + b"z"


def test_too_long_echo_data_is_a_caller_error() -> None:
    """Replies that cannot fit a datagram raise ValueError, not PacketError."""
    with pytest.raises(ValueError):
        icmp.build_echo_reply_frame(GUEST_MAC, OUR_MAC, 1, 2, 0, 0, bytes(icmp.MAX_ECHO_DATA + 1))
    assert len(icmp.build_echo_reply_frame(GUEST_MAC, OUR_MAC, 1, 2, 0, 0,
                                           bytes(icmp.MAX_ECHO_DATA))) == 14 + 0xFFFF
    with pytest.raises(ValueError):
        icmpv6.build_echo_reply_frame(GUEST_MAC, OUR_MAC, REMOTE6, GUEST6, 0, 0, bytes(65528))
    with pytest.raises(ValueError):
        icmpv6.build_frame(GUEST_MAC, OUR_MAC, REMOTE6, GUEST6, b"\x80\0\0\0\0")


# --- IPv6 --------------------------------------------------------------------------------------

@pytest.mark.parametrize("data", [b"", b"x", bytes(range(256)) * 3 + b"odd"])
def test_v6_echo_request_parsed(data: bytes) -> None:
    """ICMPv6 echo requests decode, the checksum covering the pseudo-header."""
    message = icmpv6_message(GUEST6, REMOTE6, 128, 0, echo_rest(0xABCD, 3, data))
    echo = icmpv6.parse_echo(v6_packet(message))
    assert echo is not None and (echo.ident, echo.seq, bytes(echo.payload)) == (0xABCD, 3, data)


def test_v6_echo_after_extension_headers() -> None:
    """The checksum uses the upper-layer length, not the payload length field."""
    message = icmpv6_message(GUEST_LL, OUR_LL, 128, 0, echo_rest(7, 8, b"ll ping"))
    hop_by_hop = bytes((60, 0)) + bytes(6)
    dest_opts = bytes((58, 1)) + bytes(14)
    packet = v6_packet(message, src=GUEST_LL, dst=OUR_LL, extensions=hop_by_hop + dest_opts)
    echo = icmpv6.parse_echo(packet)
    assert echo is not None and bytes(echo.payload) == b"ll ping"


@pytest.mark.parametrize("kind", [129, 1, 2, 133, 135, 143])
def test_v6_other_types_are_none(kind: int) -> None:
    """Other well-formed ICMPv6 types are not echo requests."""
    assert icmpv6.parse_echo(v6_packet(icmpv6_message(GUEST6, REMOTE6, kind, 0, bytes(20)))) is None
    parsed = icmpv6.parse(v6_packet(icmpv6_message(GUEST6, REMOTE6, kind, 5, bytes(4))))
    assert (parsed.type, parsed.code, len(parsed.message)) == (kind, 5, 8)


def test_v6_checksum_binds_addresses() -> None:
    """A message checksummed for other addresses (or corrupted) is ICMPV6_BAD_CHECKSUM."""
    other_dst = icmpv6_message(GUEST6, GUEST6, 128, 0, echo_rest(1, 1, b"abc"))
    assert reason_of(lambda: icmpv6.parse_echo(v6_packet(other_dst))) is (
        DropReason.ICMPV6_BAD_CHECKSUM)
    corrupt = icmpv6_message(GUEST6, REMOTE6, 128, 0, echo_rest(1, 1, b"abc"), good_checksum=False)
    assert reason_of(lambda: icmpv6.parse(v6_packet(corrupt))) is DropReason.ICMPV6_BAD_CHECKSUM


@pytest.mark.parametrize("message", [
    b"",
    icmpv6_message(GUEST6, REMOTE6, 128, 0, b"\0\1")[:6],
    icmpv6_message(GUEST6, REMOTE6, 128, 0, b"\0\1\0\1"[:3]),
    icmpv6_message(GUEST6, REMOTE6, 128, 2, echo_rest(1, 1, b"x")),
])
def test_v6_malformed(message: bytes) -> None:
    """Short messages and echo requests with a code are ICMPV6_MALFORMED."""
    assert reason_of(lambda: icmpv6.parse_echo(v6_packet(message))) is DropReason.ICMPV6_MALFORMED


@pytest.mark.parametrize("data", [b"", b"q", bytes(range(256)) * 2])
def test_v6_reply_frame_checks_independently(data: bytes) -> None:
    """The v6 reply decodes with the reference decoder: lengths, checksum, fields."""
    frame = icmpv6.build_echo_reply_frame(GUEST_MAC, OUR_MAC, REMOTE6, GUEST6, 0x77, 0x88, data)
    got = decode_icmpv6_frame(frame)
    assert (got.eth_dst, got.eth_src, got.src, got.dst, got.hop_limit) == (
        GUEST_MAC, OUR_MAC, REMOTE6, GUEST6, 64)
    assert (got.type, got.code, got.body) == (129, 0, echo_rest(0x77, 0x88, data))


def test_v6_round_trip_through_ping_socket_helpers() -> None:
    """Guest v6 request -> socket bytes -> kernel reply -> frame re-stamped for the guest."""
    request = icmpv6_message(GUEST6, REMOTE6, 128, 0, echo_rest(0x0102, 0xFFFF, b"six"))
    echo = icmpv6.parse_echo(v6_packet(request))
    assert echo is not None
    to_socket = icmpv6.build_ping_request(echo.ident, echo.seq, echo.payload)
    reply = icmpv6.parse_ping_reply(fake_kernel_reply(to_socket, 0x1111, 129))
    assert reply is not None and reply.type == icmpv6.Icmpv6Type.ECHO_REPLY
    frame = icmpv6.build_echo_reply_frame(GUEST_MAC, OUR_MAC, REMOTE6, GUEST6, echo.ident,
                                          reply.seq, reply.payload)
    assert decode_icmpv6_frame(frame).body == echo_rest(0x0102, 0xFFFF, b"six")


# --- A real ping socket ---------------------------------------------------------------------------

#: Identifier the ping sockets are bound to (the guest's, 0xBEEF, is what we put in requests).
SOCKET_IDENT = 0x1234

#: Run inside the namespace: one ping per family through the helpers, capturing loopback.
PING_SCRIPT = """
import json, socket, sys
from shardswitch.net import icmp, icmpv6
sniffer = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
sniffer.bind(("lo", 0))
replies = []
for family, proto, dst, build in ((socket.AF_INET, socket.IPPROTO_ICMP, "127.0.0.1",
                                   icmp.build_ping_request),
                                  (socket.AF_INET6, socket.IPPROTO_ICMPV6, "::1",
                                   icmpv6.build_ping_request)):
    sock = socket.socket(family, socket.SOCK_DGRAM, proto)
    sock.settimeout(5)
    sock.bind((dst, int(sys.argv[1])))
    sock.sendto(build(0xBEEF, 4242, b"odd-length data"), (dst, 0))
    reply = icmp.parse_ping_reply(sock.recv(65535))
    replies.append([reply.type, reply.code, reply.seq, bytes(reply.payload).hex()])
    sock.close()
frames = []
sniffer.settimeout(0.5)
try:
    while True:
        frames.append(sniffer.recv(65535).hex())
except TimeoutError:
    pass
print(json.dumps({"replies": replies, "frames": frames}))
"""


def wire_requests(frames: list[bytes]) -> list[tuple[int, bytes]]:
    """The echo requests among captured loopback frames: (IP version, ICMP message), checked."""
    found = []
    for frame in frames:
        ethertype = struct.unpack_from("!H", frame, 12)[0]
        if ethertype == 0x0800 and frame[23] == 1 and frame[34] == 8:
            message = frame[14 + (frame[14] & 0x0F) * 4:]
            assert rfc1071(message) == 0, "kernel-computed ICMP checksum"
            found.append((4, message))
        elif ethertype == 0x86DD and frame[20] == 58 and frame[54] == 128:
            message = frame[54:]
            assert icmpv6_checksum(frame[22:38], frame[38:54], message) == 0, "ICMPv6 checksum"
            found.append((6, message))
    return found


def test_real_ping_socket_fills_identifier_and_checksum() -> None:
    """Linux sends our checksum-0 requests with its identifier and a right checksum.

    Runs in a fresh network namespace (loopback only, ping sockets allowed
    there), capturing the requests on ``lo`` to check them independently.
    """
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.skip("unshare or ip not available")
    shell = ('ip link set lo up && echo "0 2147483647" > /proc/sys/net/ipv4/ping_group_range '
             '&& exec "$0" -c "$1" "$2"')
    env = dict(os.environ, PYTHONPATH=str(REPO))
    run = subprocess.run(["unshare", "--net", "sh", "-c", shell, sys.executable, PING_SCRIPT,
                          str(SOCKET_IDENT)], capture_output=True, text=True, timeout=30, env=env)
    if run.returncode and ("Operation not permitted" in run.stderr
                           or "Permission denied" in run.stderr):
        pytest.skip(f"no private network namespace: {run.stderr.strip()}")
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    for (kind, code, seq, payload), reply_type in zip(result["replies"], (0, 129), strict=True):
        assert (kind, code, seq) == (reply_type, 0, 4242)
        assert bytes.fromhex(payload) == b"odd-length data"
    requests = wire_requests([bytes.fromhex(frame) for frame in result["frames"]])
    assert {version for version, _message in requests} == {4, 6}
    for _version, message in requests:
        assert message[4:] == struct.pack("!HH", SOCKET_IDENT, 4242) + b"odd-length data"


# --- Fuzz ----------------------------------------------------------------------------------------

def test_fuzz_echo_parsers_never_raise_anything_else() -> None:
    """Random ICMP/ICMPv6 messages: an Echo, None, or a PacketError - nothing else."""
    rng = random.Random(0x1C4)
    outcomes: dict[object, int] = {}
    for i in range(3000):
        body = rng.randbytes(rng.randrange(0, 40))
        kind = rng.choice((0, 8, 128, 129, 135, rng.randrange(256)))
        code = rng.choice((0, 0, 1))
        good = rng.random() < 0.7
        if i % 2:
            message = icmp_message(kind, code, body, good_checksum=good)
        else:
            message = icmpv6_message(GUEST6, REMOTE6, kind, code, body, good_checksum=good)
        if rng.random() < 0.2:
            message = message[:rng.randrange(len(message) + 1)]
        try:
            if i % 2:
                result = icmp.parse_echo(v4_packet(message))
            else:
                result = icmpv6.parse_echo(v6_packet(message))
        except PacketError as exc:
            outcomes[exc.reason] = outcomes.get(exc.reason, 0) + 1
            continue
        outcomes["echo" if result else "none"] = outcomes.get("echo" if result else "none", 0) + 1
        if result is not None:
            assert bytes(result.payload) == message[8:]
    for key in ("echo", "none", DropReason.ICMP_MALFORMED, DropReason.ICMP_BAD_CHECKSUM,
                DropReason.ICMPV6_MALFORMED, DropReason.ICMPV6_BAD_CHECKSUM):
        assert outcomes.get(key, 0) > 0, key
