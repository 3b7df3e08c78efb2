"""Neighbor Discovery frames a guest sends (Neighbor and Router Solicitations), for the net and switch tests.

Built with the independent reference helpers of tests/net/ipv6kit.py.
"""

from __future__ import annotations

from shardswitch.net import ipv6
from tests.net.ipv6kit import GUEST_LL, icmpv6_frame, ip6
from tests.net.net_testlib import GUEST_MAC, OUR_MAC

#: Option bytes: source link-layer address of the guest.
GUEST_SLLA = bytes((1, 1)) + GUEST_MAC


def ns_frame(target: bytes, *, src: bytes = GUEST_LL, dst: bytes | None = None,
             options: bytes = GUEST_SLLA, **kwargs: object) -> bytes:
    """A Neighbor Solicitation from the guest (to the target's solicited-node group)."""
    dst = ipv6.solicited_node(target) if dst is None else dst
    eth_dst = b"\x33\x33" + dst[12:] if dst[0] == 0xFF else OUR_MAC
    return icmpv6_frame(src, dst, 135, 0, bytes(4) + target + options, eth_dst=eth_dst,
                        **kwargs)  # type: ignore[arg-type]


def rs_frame(*, src: bytes = GUEST_LL, options: bytes = GUEST_SLLA, **kwargs: object) -> bytes:
    """A Router Solicitation from the guest to all-routers."""
    return icmpv6_frame(src, ip6("ff02::2"), 133, 0, bytes(4) + options,
                        eth_dst=bytes.fromhex("333300000002"), **kwargs)  # type: ignore[arg-type]
