"""The error-queue reader: sock_extended_err control messages, and a real ICMP error on the loopback."""

from __future__ import annotations

import socket
import struct
import subprocess
import sys
from pathlib import Path

from shardswitch.worker import sockerr
from tests.guest.netns import TestNetns

V4 = (socket.IPPROTO_IP, sockerr.IP_RECVERR)
V6 = (socket.IPPROTO_IPV6, sockerr.IPV6_RECVERR)


def ee(origin: int, icmp_type: int, code: int, info: int = 0) -> bytes:
    """A sock_extended_err without offender."""
    return sockerr.EXTENDED_ERR.pack(111, origin, icmp_type, code, 0, info, 0)


def test_parse_ipv4_error_with_offender() -> None:
    """Origin, type, code, info and the offender's address (a sockaddr_in after the structure)."""
    offender = struct.pack("=HH", socket.AF_INET, 0) + socket.inet_aton("192.0.2.1") + bytes(8)
    error = sockerr.parse(*V4, ee(sockerr.EeOrigin.ICMP, 3, 4, 1400) + offender, b"data")
    assert error == sockerr.SockError(sockerr.EeOrigin.ICMP, 3, 4, 1400, socket.inet_aton("192.0.2.1"), b"data")


def test_parse_ipv6_error_with_offender() -> None:
    """A sockaddr_in6 offender: family, port, flow info, then the address."""
    addr = socket.inet_pton(socket.AF_INET6, "2001:db8::1")
    offender = struct.pack("=HHI", socket.AF_INET6, 0, 0) + addr + bytes(4)
    error = sockerr.parse(*V6, ee(sockerr.EeOrigin.ICMP6, 1, 4) + offender, b"")
    assert error is not None and error.offender == addr and (error.icmp_type, error.code) == (1, 4)


def test_parse_ignores_other_and_short_messages() -> None:
    """Another control message, a truncated structure, and a structure without offender address."""
    assert sockerr.parse(socket.SOL_SOCKET, 1, ee(2, 3, 3), b"") is None
    assert sockerr.parse(*V4, ee(2, 3, 3)[:10], b"") is None
    error = sockerr.parse(*V4, ee(2, 3, 3), b"x")
    assert error is not None and error.offender is None


def test_read_errors_of_a_closed_loopback_port(netns: TestNetns) -> None:
    """A connected UDP socket with IP_RECVERR, a datagram to a closed port: the queue says ICMP 3/3 from
    127.0.0.1 about our payload; then it is empty."""
    script = r"""
import socket, sys, time
sys.path.insert(0, sys.argv[1])
from shardswitch.worker import sockerr
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setblocking(False)
sockerr.enable(s, False)
s.connect(("127.0.0.1", 9))
s.send(b"payload")
time.sleep(0.2)
try:
    s.recv(100)
except ConnectionRefusedError:
    pass
errors = sockerr.read_errors(s, 100)
print(len(errors), errors[0].origin, errors[0].icmp_type, errors[0].code, errors[0].offender == bytes([127, 0, 0, 1]),
      errors[0].payload == b"payload", len(sockerr.read_errors(s, 100)))
"""
    root = str(Path(__file__).resolve().parents[2])
    out = subprocess.run(netns.exec_argv([sys.executable, "-c", script, root]), capture_output=True, text=True,
                         timeout=30)
    assert out.stdout.split() == ["1", "2", "3", "3", "True", "True", "0"], out.stderr
