"""Guest addressing parameters: the configuration record and its resolved form.

Theory of operation: :class:`GuestParams` is the plain configuration record
(text addresses, lists) as it arrives from the command line or the
coordinator; it is a frozen msgspec Struct so it can cross process
boundaries cheaply.  :func:`resolve` validates it once and turns it into
:class:`ResolvedParams`, the form the packet code uses: IPv4 addresses as
32-bit ints, IPv6 addresses as 16-byte ``bytes``, MAC as 6 bytes, the
netmask computed, search domains normalised, and our IPv6 link-local address
derived from our MAC (modified EUI-64) once.  IPv6 is optional: without
``address6`` the guest gets no prefix, but NDP still resolves our link-local
address so link-local traffic works.
Every check on configuration happens here, raising :class:`ParamsError`;
the data path then never re-validates or re-converts anything per packet.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import msgspec

from . import eth, ipv6

#: Longest encoded domain name (RFC 1035 section 3.1).
MAX_NAME_LEN = 255
#: Longest DNS label.
MAX_LABEL_LEN = 63
#: Smallest IPv4 MTU (RFC 791) and largest virtio-net MTU.
MIN_MTU = 68
MAX_MTU = 65535
#: Smallest MTU of a link carrying IPv6 (RFC 8200 section 5).
MIN_MTU6 = ipv6.MIN_MTU


class ParamsError(ValueError):
    """The guest parameters are invalid (a configuration error, not guest input)."""


class GuestParams(msgspec.Struct, frozen=True):
    """What the guest is told over ARP and DHCP."""

    #: Guest IPv4 address, e.g. "10.0.2.15".
    address: str
    #: Prefix length of the guest's subnet, e.g. 24.
    prefix_len: int
    #: Router address handed out by DHCP (also our DHCP server identifier).
    gateway: str
    #: Interface MTU handed out by DHCP (option 26).
    mtu: int = 65520
    #: IPv4 DNS servers (DHCP option 6).
    dns: list[str] = []
    #: Search domains (DHCP option 119).
    search: list[str] = []
    #: The MAC address shardswitch answers with (passt's default).
    our_mac: str = "9a:55:9a:55:9a:55"
    #: DHCP lease time in seconds (0xFFFFFFFF = infinite).
    lease_time: int = 3600
    #: Guest's global IPv6 address; its /64 is advertised for SLAAC ("" = no IPv6 prefix).
    address6: str = ""
    #: Prefix length of the guest's IPv6 subnet (on the host side), 1..128.
    prefix6_len: int = 64
    #: IPv6 router address ("" = our link-local address, derived from ``our_mac``).
    gateway6: str = ""
    #: IPv6 DNS servers (NDP RDNSS option).
    dns6: list[str] = []
    #: Offer the MTU (DHCP option 26, the RA's MTU option); False: the guest keeps its own (passt's -m 0).
    offer_mtu: bool = True
    #: The guest's host name (DHCP option 12) and FQDN (DHCP option 81, DHCPv6 option 39); "": none.
    hostname: str = ""
    fqdn: str = ""


@dataclass(frozen=True, slots=True)
class ResolvedParams:
    """Validated parameters in wire-ready form (built by :func:`resolve`)."""

    #: Guest address.
    address: int
    #: Prefix length, 1..32.
    prefix_len: int
    #: Netmask derived from the prefix length.
    netmask: int
    #: Router and DHCP server identifier.
    gateway: int
    #: Interface MTU.
    mtu: int
    #: DNS server addresses.
    dns: tuple[int, ...]
    #: Search domains, without trailing dots.
    search: tuple[str, ...]
    #: Our MAC address.
    our_mac: bytes
    #: Lease time in seconds.
    lease_time: int
    #: Guest's global IPv6 address, or None without IPv6 addressing.
    address6: bytes | None
    #: Prefix length of the guest's IPv6 subnet, 1..128.
    prefix6_len: int
    #: IPv6 router address: as configured, else :attr:`our_ll6`.
    gateway6: bytes
    #: Our link-local address: fe80::/64 with the modified EUI-64 of :attr:`our_mac`.
    our_ll6: bytes
    #: IPv6 DNS server addresses.
    dns6: tuple[bytes, ...]
    #: Offer :attr:`mtu` to the guest (DHCP, router advertisements).
    offer_mtu: bool = True
    #: The guest's host name (ASCII bytes) and FQDN (without a trailing dot); empty: none.
    hostname: bytes = b""
    fqdn: str = ""

    @property
    def gateway_on_link(self) -> bool:
        """True when the gateway is inside the guest's subnet."""
        return (self.address ^ self.gateway) & self.netmask == 0

    @property
    def router_ll6(self) -> bytes:
        """Our link-local source for NDP and DHCPv6: :attr:`gateway6` when link-local, else :attr:`our_ll6`."""
        return self.gateway6 if ipv6.is_link_local(self.gateway6) else self.our_ll6


def _unicast_address(what: str, text: str, loopback_ok: bool = False) -> int:
    """Parse ``text`` as an IPv4 address usable as a host or server address (a loopback one only with
    ``loopback_ok``: a DNS server the guest runs itself, passt's ``-D 127.0.0.1``)."""
    try:
        addr = ipaddress.IPv4Address(text)
    except ValueError as exc:
        raise ParamsError(f"{what}: {exc}") from None
    if addr.is_unspecified or addr.is_multicast or addr.is_reserved or (addr.is_loopback and not loopback_ok):
        raise ParamsError(f"{what}: {text} is not a unicast host address")
    return int(addr)


def _unicast_address6(what: str, text: str, loopback_ok: bool = False) -> bytes:
    """Parse ``text`` as an IPv6 unicast address (link-local allowed; ::1 only with ``loopback_ok``) into 16
    bytes."""
    try:
        addr = ipv6.addr_from_str(text)
    except ValueError as exc:
        raise ParamsError(f"{what}: {exc}") from None
    parsed = ipaddress.IPv6Address(addr)
    if parsed.is_loopback:
        if not loopback_ok:
            raise ParamsError(f"{what}: {text} is not a unicast host address")
    elif parsed.is_unspecified or parsed.is_multicast or parsed.is_reserved:
        raise ParamsError(f"{what}: {text} is not a unicast host address")
    return addr


def normalize_domain(name: str, what: str = "search domain") -> str:
    """Check a DNS name (a ``what``) for RFC 1035 encoding limits; return it without a trailing dot."""
    stripped = name[:-1] if name.endswith(".") else name
    if not stripped or not stripped.isascii():
        raise ParamsError(f"{what} {name!r}: empty or not ASCII")
    labels = stripped.split(".")
    if any(not 1 <= len(label) <= MAX_LABEL_LEN or not label.isprintable() or " " in label
           for label in labels):
        raise ParamsError(f"{what} {name!r}: bad label")
    if sum(len(label) + 1 for label in labels) + 1 > MAX_NAME_LEN:
        raise ParamsError(f"{what} {name!r}: longer than {MAX_NAME_LEN} bytes encoded")
    return stripped


def resolve(params: GuestParams) -> ResolvedParams:
    """Validate ``params`` and convert them; raises :class:`ParamsError`."""
    address = _unicast_address("address", params.address)
    gateway = _unicast_address("gateway", params.gateway)
    if address == gateway:
        raise ParamsError("gateway and guest address are the same")
    if not 1 <= params.prefix_len <= 32:
        raise ParamsError(f"prefix length {params.prefix_len} not in 1..32")
    netmask = (0xFFFFFFFF << (32 - params.prefix_len)) & 0xFFFFFFFF
    host = address & ~netmask & 0xFFFFFFFF
    if params.prefix_len <= 30 and host in (0, ~netmask & 0xFFFFFFFF):
        raise ParamsError(f"address {params.address}/{params.prefix_len} is not a host address")
    if not MIN_MTU <= params.mtu <= MAX_MTU:
        raise ParamsError(f"MTU {params.mtu} not in {MIN_MTU}..{MAX_MTU}")
    if not 1 <= params.lease_time <= 0xFFFFFFFF:
        raise ParamsError(f"lease time {params.lease_time} not in 1..{0xFFFFFFFF}")
    try:
        our_mac = eth.mac_from_str(params.our_mac)
    except ValueError as exc:
        raise ParamsError(str(exc)) from None
    if not eth.is_valid_source(our_mac):
        raise ParamsError(f"our MAC {params.our_mac} is not a unicast address")
    dns = tuple(_unicast_address("DNS server", text, loopback_ok=True) for text in params.dns)
    search = tuple(normalize_domain(name) for name in params.search)
    address6, gateway6, our_ll6, dns6 = _resolve_ipv6(params, our_mac)
    if len(params.hostname) > MAX_NAME_LEN or not params.hostname.isascii() or not params.hostname.isprintable():
        raise ParamsError(f"host name {params.hostname!r}: longer than {MAX_NAME_LEN} bytes or not printable ASCII")
    fqdn = normalize_domain(params.fqdn, "FQDN") if params.fqdn else ""
    return ResolvedParams(address=address, prefix_len=params.prefix_len, netmask=netmask,
                          gateway=gateway, mtu=params.mtu, dns=dns, search=search,
                          our_mac=our_mac, lease_time=params.lease_time, address6=address6,
                          prefix6_len=params.prefix6_len, gateway6=gateway6, our_ll6=our_ll6,
                          dns6=dns6, offer_mtu=params.offer_mtu, hostname=params.hostname.encode("ascii"),
                          fqdn=fqdn)


def _resolve_ipv6(params: GuestParams, our_mac: bytes
                  ) -> tuple[bytes | None, bytes, bytes, tuple[bytes, ...]]:
    """Validate the IPv6 fields: ``(address6, gateway6, our link-local, dns6)``."""
    if not 1 <= params.prefix6_len <= 128:
        raise ParamsError(f"IPv6 prefix length {params.prefix6_len} not in 1..128")
    our_ll6 = ipv6.link_local_from_mac(our_mac)
    address6 = None
    if params.address6:
        address6 = _unicast_address6("address6", params.address6)
        if ipv6.is_link_local(address6):
            raise ParamsError(f"address6: {params.address6} is link-local, not global")
        if params.prefix6_len < 128 and address6 == ipv6.prefix_of(address6, params.prefix6_len):
            raise ParamsError(f"address6: {params.address6}/{params.prefix6_len} is the "
                              "subnet-router anycast address")
        if params.mtu < MIN_MTU6:
            raise ParamsError(f"MTU {params.mtu} is below the IPv6 minimum of {MIN_MTU6}")
    gateway6 = _unicast_address6("gateway6", params.gateway6) if params.gateway6 else our_ll6
    if gateway6 == address6:
        raise ParamsError("gateway6 and the guest's IPv6 address are the same")
    dns6 = tuple(_unicast_address6("IPv6 DNS server", text, loopback_ok=True) for text in params.dns6)
    return address6, gateway6, our_ll6, dns6
