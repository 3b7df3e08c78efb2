"""Parser of passt's port-forwarding specifications (``-t SPEC``, ``-u SPEC``).

Theory of operation.  A SPEC is one of:

* ``none``: forward nothing;
* ``all``: forward every port from 1 to 65535 except the host's ephemeral
  range (``net.ipv4.ip_local_port_range``), as passt does in passt mode;
* a comma list of items ``[ADDR[%IF]/]PORT[-PORT][:TO[-TO]]`` and exclusions
  ``~PORT[-PORT]``.  The optional ``ADDR[%IF]/`` prefix is written once, in
  front of the first item, and binds every item of the SPEC to ADDR
  (brackets allowed, ``[::1]``) and/or interface IF (``%eth0/`` alone means
  any address on eth0).  ``PORT-PORT:TO-TO`` maps host ports onto guest
  ports of a range of the same length.  Exclusions apply to every range of
  the SPEC, wherever they are written; a SPEC made of exclusions only means
  "all, except these" (the ephemeral range is skipped too).

This is passt's ``conf_ports()`` (conf.c) without the socket side: nothing
here does I/O.  :func:`parse` turns one SPEC into a list of
:class:`Forward` (host port ranges with their guest ports, exclusions
already cut out); :func:`parse_all` combines the SPECs of repeated options
with passt's rules (``none``/``all`` exclude any other SPEC).  Errors are
:class:`PortSpecError` naming the SPEC and the bad part.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

#: Number of port numbers.
NUM_PORTS = 1 << 16
#: Linux's default net.ipv4.ip_local_port_range.
DEFAULT_EPHEMERAL = (32768, 60999)
#: Longest interface name (IFNAMSIZ - 1).
MAX_IFNAME = 15


class PortSpecError(ValueError):
    """A SPEC that cannot be parsed (the one exception type of this module)."""


@dataclass(frozen=True, slots=True)
class Forward:
    """Host ports ``first``..``last`` (inclusive) go to guest ports ``to_first``.. of the same count."""

    #: Address to bind on the host (None: any address).
    addr: str | None
    #: Interface to bind to on the host (None: any).
    ifname: str | None
    first: int
    last: int
    to_first: int

    @property
    def to_last(self) -> int:
        """The guest port of :attr:`last`."""
        return self.to_first + self.last - self.first

    def guest_port(self, port: int) -> int:
        """The guest port that host port ``port`` (inside this range) is forwarded to."""
        return self.to_first + port - self.first

    def ports(self) -> range:
        """The host ports of this forward."""
        return range(self.first, self.last + 1)


def read_ephemeral(path: str = "/proc/sys/net/ipv4/ip_local_port_range") -> tuple[int, int]:
    """The host's ephemeral port range (the default when it cannot be read)."""
    try:
        with open(path, encoding="ascii") as f:
            low, high = (int(x) for x in f.read().split())
    except (OSError, ValueError):
        return DEFAULT_EPHEMERAL
    return (low, high) if 0 < low <= high < NUM_PORTS else DEFAULT_EPHEMERAL


def _port_range(text: str, spec: str) -> tuple[int, int]:
    """Parse ``PORT[-PORT]`` (passt's parse_port_range), inclusive."""
    parts = text.split("-")
    if len(parts) > 2 or not all(p.isdigit() and p.isascii() for p in parts):
        raise PortSpecError(f"invalid port specifier {spec!r}: bad port range {text!r}")
    first, last = int(parts[0]), int(parts[-1])
    if last >= NUM_PORTS or first >= NUM_PORTS:
        raise PortSpecError(f"invalid port specifier {spec!r}: port out of range in {text!r}")
    if last < first:
        raise PortSpecError(f"invalid port specifier {spec!r}: range {text!r} ends before it starts")
    return first, last


def _bind_prefix(prefix: str, spec: str) -> tuple[str | None, str | None]:
    """Parse ``ADDR[%IF]`` or ``%IF`` into (address, interface)."""
    addr_text, sep, ifname = prefix.partition("%")
    if sep:
        if not ifname or len(ifname) > MAX_IFNAME or "/" in ifname or any(c.isspace() for c in ifname):
            raise PortSpecError(f"invalid port specifier {spec!r}: bad interface name {ifname!r}")
    if sep and not addr_text:
        return None, ifname
    if addr_text.startswith("[") and addr_text.endswith("]"):
        addr_text = addr_text[1:-1]
    try:
        addr = str(ipaddress.ip_address(addr_text))
    except ValueError:
        raise PortSpecError(f"invalid port specifier {spec!r}: bad address {addr_text!r}") from None
    return addr, (ifname if sep else None)


def _outside(ranges: Iterable[tuple[int, int]], excluded: set[int]) -> list[tuple[int, int]]:
    """Cut ``excluded`` ports out of the inclusive ``ranges``: the remaining sub-ranges."""
    out: list[tuple[int, int]] = []
    for first, last in ranges:
        start = None
        for port in range(first, last + 1):
            if port in excluded:
                if start is not None:
                    out.append((start, port - 1))
                    start = None
            elif start is None:
                start = port
        if start is not None:
            out.append((start, last))
    return out


def _all_ports(excluded: set[int], ephemeral: tuple[int, int]) -> list[tuple[int, int]]:
    """Ports 1..65535 outside the ephemeral range and ``excluded``."""
    low, high = ephemeral
    base = [r for r in ((1, low - 1), (high + 1, NUM_PORTS - 1)) if r[0] <= r[1]]
    return _outside(base, excluded)


def parse(spec: str, ephemeral: tuple[int, int] = DEFAULT_EPHEMERAL) -> list[Forward]:
    """Parse one SPEC into forwards (empty for ``none``); PortSpecError if it is invalid."""
    spec = spec.strip()
    if not spec:
        raise PortSpecError("empty port specifier")
    if spec == "none":
        return []
    if spec == "all":
        return [Forward(None, None, a, b, a) for a, b in _all_ports(set(), ephemeral)]
    if spec == "auto":
        raise PortSpecError("'auto' port forwarding is only allowed for pasta")
    addr: str | None = None
    ifname: str | None = None
    body = spec
    if "/" in spec:
        prefix, _, body = spec.partition("/")
        addr, ifname = _bind_prefix(prefix, spec)
    items = body.split(",")
    excluded: set[int] = set()
    mapped: list[tuple[int, int, int]] = []
    for item in items:
        if not item:
            raise PortSpecError(f"invalid port specifier {spec!r}: empty item")
        if item.startswith("~"):
            first, last = _port_range(item[1:], spec)
            span = set(range(first, last + 1))
            if span & excluded:
                raise PortSpecError(f"overlapping excluded ranges in {spec!r}")
            excluded |= span
            continue
        orig, colon, to = item.partition(":")
        first, last = _port_range(orig, spec)
        to_first = first
        if colon:
            to_first, to_last = _port_range(to, spec)
            if to_last - to_first != last - first:
                raise PortSpecError(f"invalid port specifier {spec!r}: {item!r} maps "
                                    f"{last - first + 1} ports onto {to_last - to_first + 1}")
        mapped.append((first, last, to_first))
    if not mapped:
        return [Forward(addr, ifname, a, b, a) for a, b in _all_ports(excluded, ephemeral)]
    forwards: list[Forward] = []
    for first, last, to_first in mapped:
        for a, b in _outside([(first, last)], excluded):
            forwards.append(Forward(addr, ifname, a, b, to_first + a - first))
    return forwards


def parse_all(specs: Iterable[str], option: str = "-u",
              ephemeral: tuple[int, int] = DEFAULT_EPHEMERAL) -> list[Forward]:
    """Parse the SPECs of repeated ``option`` options together, with passt's mode rules.

    ``none`` and ``all`` may each only be given alone; a host port forwarded
    twice (on the same bind address and interface) is an error.  Error
    messages start with ``option``.
    """
    specs = list(specs)
    forwards: list[Forward] = []
    for spec in specs:
        if spec.strip() in ("none", "all") and len(specs) > 1:
            raise PortSpecError(f"{option}: port forwarding mode {spec.strip()!r} conflicts with "
                                "the other specifiers")
        try:
            forwards += parse(spec, ephemeral)
        except PortSpecError as exc:
            raise PortSpecError(f"{option}: {exc}") from None
    seen: dict[tuple[str | None, str | None], set[int]] = {}
    for fwd in forwards:
        ports = seen.setdefault((fwd.addr, fwd.ifname), set())
        span = set(fwd.ports())
        if span & ports:
            raise PortSpecError(f"{option}: port {min(span & ports)} is forwarded twice")
        ports |= span
    return forwards
