"""Parser of passt's port-forwarding specifications (``-t SPEC``, ``-u SPEC``).

Theory of operation.  A SPEC is one of:

* ``none``: forward nothing;
* ``all``: forward every port from 1 to 65535 except the host's ephemeral
  range (``net.ipv4.ip_local_port_range``), as passt does in passt mode;
* ``[ADDR[%IF]/]`` followed by a comma list of chunks (passt's fwd_rule.c):

  - ``FIRST[-LAST][:[TOADDR/]TOFIRST[-TOLAST]]`` and ``FIRST[-LAST]:TOADDR``:
    host ports FIRST..LAST go to guest ports TOFIRST.. (a range of the same
    length; the same ports when omitted), at the guest's own address or, with
    TOADDR, at that address inside the guest (one the guest holds besides the
    one it was given; brackets allowed, and needed for an IPv6 TOADDR right
    after the colon, ``22:[2001:db8::5]/2222``, as in passt, where an IPv6
    address followed by ``/`` reads as the listening address);
  - ``~FIRST[-LAST]``: an exclusion, applied to every chunk of the SPEC,
    wherever it is written; a SPEC of exclusions only means "all, except
    these" (the ephemeral range is skipped too);
  - ``all[:TOADDR]``: every port (as ``all``, exclusions cut out), to TOADDR
    when given (``127.0.0.6/all:192.0.2.6``); it does not mix with ranges.

  The optional ``ADDR[%IF]/`` prefix, written once in front, binds every
  chunk to ADDR (brackets allowed, ``[::1]``) and/or interface IF; ``*`` (or
  nothing) before ``%IF/`` or ``/`` means any address: ``*/22``,
  ``*%eth0/22``, ``%eth0/22``.

A target address (TOADDR) follows passt's rules: it must be a unicast
address (not unspecified, loopback, multicast or broadcast; an IPv4-mapped
IPv6 address counts as IPv4), of the listening address's family.  A forward
from any address listens on both families at once, so it cannot go to one
target: it is refused, pointing to ``0.0.0.0/...`` or ``[::]/...``, as passt
does on a host with both.  What the guest side may be addressed at all is
decided again, per flow, by the flow policy (shardswitch.worker.policy).

This is passt's ``conf_ports()`` (conf.c, fwd_rule.c) without the socket
side: nothing here does I/O.  :func:`parse` turns one SPEC into a list of
:class:`Forward` (host port ranges with their guest ports and target,
exclusions already cut out); :func:`parse_all` combines the SPECs of
repeated options with passt's rules (``none``/``all`` exclude any other
SPEC); :func:`format_forward` writes a Forward back in the SPEC syntax and
:func:`conflicts` is passt's test of two rules that cannot live together.
Errors are :class:`PortSpecError` naming the SPEC and the bad part.
"""

from __future__ import annotations

import ipaddress
import re
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
    #: Address inside the guest the ports go to (None: the guest's own address of the client's family).
    to_addr: str | None = None

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


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """``text`` (brackets allowed) as an address, or None when it is not one."""
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _is_v4(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether ``addr`` is IPv4 (an IPv4-mapped IPv6 address counts as IPv4, as in passt's inany)."""
    return addr.version == 4 or (isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None)


def _split_prefix(spec: str) -> tuple[str | None, str]:
    """The ``ADDR[%IF]`` / ``*[%IF]`` prefix of ``spec`` (None: there is none) and the chunks after it.

    As passt's parse_addrifname: the text before the first ``/`` is a prefix
    when it is an address, ``*`` or empty (with ``%IF`` or not); a chunk with
    a target address (``5000:192.0.2.5/6000``) is not one.  Anything else is
    taken as a prefix, so that its error names the bad address.
    """
    if "/" not in spec:
        return None, spec
    head, _, body = spec.partition("/")
    addr_text = head.partition("%")[0]
    if addr_text in ("", "*") or _address(addr_text) is not None:
        return head, body
    first = head.partition(":")
    if "," in head or (first[1] and (first[0] == "all" or re.fullmatch(r"[0-9][0-9-]*", first[0]))):
        return None, spec                    # chunks (an address holds no comma), the last with a target
    return head, body


def _bind_prefix(prefix: str, spec: str) -> tuple[str | None, str | None]:
    """Parse ``ADDR[%IF]``, ``*[%IF]`` or ``%IF`` into (address, interface); None: any."""
    addr_text, sep, ifname = prefix.partition("%")
    if sep:
        if not ifname or len(ifname) > MAX_IFNAME or ifname in (".", "..") or any(c.isspace() for c in ifname):
            raise PortSpecError(f"invalid port specifier {spec!r}: bad interface name {ifname!r}")
    if addr_text in ("", "*"):
        return None, (ifname if sep else None)
    addr = _address(addr_text)
    if addr is None:
        raise PortSpecError(f"invalid port specifier {spec!r}: bad address {addr_text.strip('[]')!r}")
    return str(addr), (ifname if sep else None)


def _target(text: str, spec: str) -> str:
    """A target address ``TOADDR`` (brackets allowed): a unicast address, IPv4-mapped ones as IPv4."""
    addr = _address(text)
    if addr is None:
        raise PortSpecError(f"invalid port specifier {spec!r}: bad target address {text!r}")
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    why = ("unspecified" if addr.is_unspecified else "loopback" if addr.is_loopback
           else "multicast" if addr.is_multicast else "broadcast" if addr == ipaddress.IPv4Address(0xFFFFFFFF)
           else "")
    if why:
        raise PortSpecError(f"invalid port specifier {spec!r}: target address {text!r} is {why}, "
                            "not a unicast address of the guest")
    return str(addr)


def _check_family(addr: str | None, ifname: str | None, to_addr: str, spec: str) -> None:
    """passt's rules for a target address: the listening address's family, and never any address."""
    target = ipaddress.ip_address(to_addr)
    family = "IPv4" if target.version == 4 else "IPv6"
    if addr is None:
        wildcard = "0.0.0.0" if target.version == 4 else "[::]"
        raise PortSpecError(f"invalid port specifier {spec!r}: a forward from any address (IPv4 and IPv6) "
                            f"cannot go to the {family} address {to_addr}; did you mean "
                            f"{wildcard}{'%' + ifname if ifname else ''}/... instead?")
    listening = ipaddress.ip_address(addr)
    if _is_v4(listening) != (target.version == 4):
        raise PortSpecError(f"invalid port specifier {spec!r}: forward from "
                            f"{'IPv4' if _is_v4(listening) else 'IPv6'} ({addr}) to {family} ({to_addr}) "
                            "unsupported")


def _chunk_target(item: str, to: str, first: int, last: int, spec: str) -> tuple[int, str | None]:
    """The part after ``:`` of an include chunk: (guest port of ``first``, target address or None)."""
    if re.fullmatch(r"[0-9]+(-[0-9]+)?", to):
        to_first, to_last = _port_range(to, spec)
        to_addr = None
    elif "/" in to:
        addr_text, _, ports = to.rpartition("/")
        to_addr = _target(addr_text, spec)
        to_first, to_last = _port_range(ports, spec)
    else:
        return first, _target(to, spec)
    if to_last - to_first != last - first:
        raise PortSpecError(f"invalid port specifier {spec!r}: {item!r} maps "
                            f"{last - first + 1} ports onto {to_last - to_first + 1}")
    if to_first == 0:
        raise PortSpecError(f"invalid port specifier {spec!r}: {item!r} maps to port 0")
    return to_first, to_addr


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
    if spec == "auto" or spec.endswith("/auto") or ",auto" in spec or spec.startswith("auto,"):
        raise PortSpecError("'auto' port forwarding is only allowed for pasta")
    addr: str | None = None
    ifname: str | None = None
    prefix, body = _split_prefix(spec)
    if prefix is not None:
        addr, ifname = _bind_prefix(prefix, spec)
    excluded: set[int] = set()
    mapped: list[tuple[int, int, int, str | None]] = []
    everything: tuple[str | None] | None = None
    for item in body.split(","):
        if not item:
            raise PortSpecError(f"invalid port specifier {spec!r}: empty item")
        if item.startswith("~"):
            first, last = _port_range(item[1:], spec)
            span = set(range(first, last + 1))
            if span & excluded:
                raise PortSpecError(f"overlapping excluded ranges in {spec!r}")
            excluded |= span
            continue
        if item == "all" or item.startswith("all:"):
            if everything is not None:
                raise PortSpecError(f"invalid port specifier {spec!r}: 'all' given twice")
            everything = (_target(item[4:], spec) if item != "all" else None,)
            continue
        orig, colon, to = item.partition(":")
        first, last = _port_range(orig, spec)
        if first == 0:
            raise PortSpecError(f"invalid port specifier {spec!r}: {item!r} forwards port 0")
        to_first, to_addr = _chunk_target(item, to, first, last, spec) if colon else (first, None)
        mapped.append((first, last, to_first, to_addr))
    if everything is not None and mapped:
        raise PortSpecError(f"invalid port specifier {spec!r}: 'all' does not mix with port ranges")
    for to_addr in [m[3] for m in mapped] + [everything[0] if everything else None]:
        if to_addr is not None:
            _check_family(addr, ifname, to_addr, spec)
    if not mapped:
        to_all = everything[0] if everything else None
        return [Forward(addr, ifname, a, b, a, to_all) for a, b in _all_ports(excluded, ephemeral)]
    forwards: list[Forward] = []
    for first, last, to_first, to_addr in mapped:
        for a, b in _outside([(first, last)], excluded):
            forwards.append(Forward(addr, ifname, a, b, to_first + a - first, to_addr))
    return forwards


def _bracket(addr: str) -> str:
    """An address as written in a SPEC (IPv6 in brackets)."""
    return f"[{addr}]" if ":" in addr else addr


def _span(first: int, last: int) -> str:
    """``FIRST`` or ``FIRST-LAST``."""
    return str(first) if first == last else f"{first}-{last}"


def format_forward(fwd: Forward) -> str:
    """``fwd`` in the SPEC syntax (what :func:`parse` reads back into it)."""
    prefix = ""
    if fwd.addr is not None or fwd.ifname is not None:
        prefix = (_bracket(fwd.addr) if fwd.addr is not None else "*") + (f"%{fwd.ifname}" if fwd.ifname else "")
        prefix += "/"
    text = prefix + _span(fwd.first, fwd.last)
    if fwd.to_addr is not None:
        text += f":{_bracket(fwd.to_addr)}/{_span(fwd.to_first, fwd.to_last)}"
    elif fwd.to_first != fwd.first:
        text += f":{_span(fwd.to_first, fwd.to_last)}"
    return text


def _addresses_match(a: str | None, b: str | None) -> bool:
    """passt's inany_matches: any address (None) matches all; an unspecified one its whole family."""
    if a is None or b is None:
        return True
    left, right = ipaddress.ip_address(a), ipaddress.ip_address(b)
    if left.is_unspecified or right.is_unspecified:
        return _is_v4(left) == _is_v4(right)
    return left == right


def conflicts(a: Forward, b: Forward) -> bool:
    """Whether two forwards of one protocol cannot live together (passt's fwd_rule_conflicts): their
    listening addresses match and their port ranges overlap (interfaces do not matter)."""
    return _addresses_match(a.addr, b.addr) and not (a.last < b.first or b.last < a.first)


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
