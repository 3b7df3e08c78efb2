"""flowframes: frames of flows built from 16-byte addresses, one builder for both families.

Each builder must give exactly the bytes of the family's own builder, and the
result must parse back with every checksum right.
"""

from __future__ import annotations

import pytest

from shardswitch.net import checksum, eth, flowframes, icmp, icmpv6, inany, ipv4, ipv6, udp
from shardswitch.net.icmp import IcmpType
from shardswitch.net.icmpv6 import Icmpv6Type
from tests.net.net_testlib import GUEST_MAC, OUR_MAC

PAIRS = {4: ("10.0.2.2", "10.0.2.15"), 6: ("2001:db8::1", "2001:db8::15")}
PAYLOAD = bytes(range(200))


def ends(version: int) -> tuple[bytes, bytes]:
    """(source, destination) of ``version`` as inany values."""
    src, dst = PAIRS[version]
    return inany.from_str(src), inany.from_str(dst)


@pytest.mark.parametrize("version", [4, 6])
@pytest.mark.parametrize("csum", [True, False])
def test_udp_frame(version: int, csum: bool) -> None:
    """The family's UDP builder's bytes; parses back (checksum verified when computed)."""
    src, dst = ends(version)
    frame = flowframes.udp_frame(GUEST_MAC, OUR_MAC, src, dst, 53, 40000, PAYLOAD, csum)
    if version == 4:
        assert frame == udp.build_frame(GUEST_MAC, OUR_MAC, inany.v4_int(src), inany.v4_int(dst), 53, 40000,
                                        PAYLOAD, csum=csum)
        datagram = udp.parse(ipv4.parse(memoryview(frame)[eth.ETH_HLEN:]), verify=csum)
    else:
        assert frame == udp.build_frame6(GUEST_MAC, OUR_MAC, src, dst, 53, 40000, PAYLOAD, csum)
        datagram = udp.parse6(ipv6.parse(memoryview(frame)[eth.ETH_HLEN:]), verify=csum)
    assert (datagram.src_port, datagram.dst_port, bytes(datagram.payload)) == (53, 40000, PAYLOAD)
    assert len(frame) - len(PAYLOAD) == flowframes.udp_headers_len(src)


@pytest.mark.parametrize("version", [4, 6])
def test_echo_reply_frame(version: int) -> None:
    """The family's echo reply builder's bytes, with a right ICMP / ICMPv6 checksum."""
    src, dst = ends(version)
    frame = flowframes.echo_reply_frame(GUEST_MAC, OUR_MAC, src, dst, 7, 9, PAYLOAD)
    view = memoryview(frame)[eth.ETH_HLEN:]
    if version == 4:
        assert frame == icmp.build_echo_reply_frame(GUEST_MAC, OUR_MAC, inany.v4_int(src), inany.v4_int(dst),
                                                    7, 9, PAYLOAD)
        message = ipv4.parse(view).payload
        assert message[0] == IcmpType.ECHO_REPLY and checksum.checksum(message) == 0
    else:
        assert frame == icmpv6.build_echo_reply_frame(GUEST_MAC, OUR_MAC, src, dst, 7, 9, PAYLOAD)
        assert icmpv6.parse(ipv6.parse(view)).type == Icmpv6Type.ECHO_REPLY       # checksum verified


@pytest.mark.parametrize("version", [4, 6])
def test_icmp_error_frame_quotes_the_datagram(version: int) -> None:
    """Port unreachable about a UDP datagram: the family's error builder's bytes, quoting it whole."""
    src, dst = ends(version)
    quoted = flowframes.quoted_udp(OUR_MAC, GUEST_MAC, dst, src, 40000, 53, PAYLOAD)
    assert quoted == flowframes.udp_frame(OUR_MAC, GUEST_MAC, dst, src, 40000, 53, PAYLOAD)[eth.ETH_HLEN:]
    kind, code = (3, 3) if version == 4 else (1, 4)
    frame = flowframes.icmp_error_frame(GUEST_MAC, OUR_MAC, src, dst, kind, code, 0x12345678, quoted)
    view = memoryview(frame)[eth.ETH_HLEN:]
    if version == 4:
        assert frame == icmp.build_error_frame(GUEST_MAC, OUR_MAC, inany.v4_int(src), inany.v4_int(dst), kind,
                                               code, 0x5678, quoted)
        message = ipv4.parse(view).payload
        assert checksum.checksum(message) == 0 and bytes(message[8:]) == quoted
    else:
        assert frame == icmpv6.build_error_frame(GUEST_MAC, OUR_MAC, src, dst, kind, code, 0x12345678, quoted)
        message6 = icmpv6.parse(ipv6.parse(view))
        assert (message6.type, message6.code) == (kind, code)
    assert flowframes.icmp_max_quote(src) == (icmp.MAX_QUOTE if version == 4 else icmpv6.MAX_QUOTE)
