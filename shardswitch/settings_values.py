"""Value parsers and bounds of the settings, shared by the TOML file and the command line.

Each parser takes the text a user wrote and returns the normalised value, or
raises ValueError with a message fit for the user; :mod:`shardswitch.settings`
names the key or option in front of it.  Nothing here does I/O.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Iterable
from enum import IntEnum
from typing import Final

#: The word that turns a list setting off (passt's ``-D none``, ``-S none``, ``--map-host-loopback none``).
NONE_WORD: Final = "none"
#: A host name (DHCP option 12): letters, digits, '-' and '_' in dot-separated labels of 1..63.
HOSTNAME_PATTERN: Final = re.compile(r"^(?!-)[A-Za-z0-9_-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9_-]{1,63}(?<!-))*\.?$")


class Limit(IntEnum):
    """Bounds of the numeric settings."""

    MIN_WORKERS = 1
    MAX_WORKERS = 16
    MIN_MTU = 68
    MAX_MTU = 65520
    MAX_PREFIX_LEN = 32
    MAX_PREFIX6_LEN = 128
    #: The IPv6 prefix length used when an IPv6 address is given without one (SLAAC's).
    DEFAULT_PREFIX6_LEN = 64
    #: sun_path is 108 bytes including the terminating NUL.
    MAX_UNIX_PATH = 107
    #: IFNAMSIZ is 16 including the terminating NUL.
    MAX_IFNAME = 15
    MAX_DOMAIN = 253
    MIN_FLOWS = 16
    #: As passt: 131071 flows of 128 bytes, about 16 MiB of shared memory.
    DEFAULT_FLOWS = 131071
    MAX_FLOWS = 1048575



def parse_prefix(text: str) -> int:
    """Parse ``-n``: a prefix length ("24") or a contiguous dotted netmask ("255.255.255.0").

    Raises ValueError with a message fit for the user.
    """
    value = text.strip()
    if value.isdigit():
        length = int(value)
        if length <= Limit.MAX_PREFIX_LEN:
            return length
    else:
        try:
            mask = int(ipaddress.IPv4Address(value))
        except ValueError:
            mask = -1
        length = bin(mask).count("1") if mask >= 0 else 0
        full = (1 << Limit.MAX_PREFIX_LEN) - 1
        if mask >= 0 and mask == full ^ ((1 << (Limit.MAX_PREFIX_LEN - length)) - 1):
            return length
    raise ValueError(f"{text!r} is not a prefix length (0..32) or a contiguous netmask")


def check_ip(value: str, what: str, family: str = "IP", loopback_ok: bool = False) -> str:
    """Return ``value`` normalised if it is a usable unicast address of ``family`` ("IP" for either
    version, "IPv4", "IPv6"; a loopback address only with ``loopback_ok``), else raise ValueError."""
    try:
        addr = ipaddress.ip_address(value)
    except ValueError:
        addr = None
    if addr is None or (family == "IPv4" and addr.version != 4) or (family == "IPv6" and addr.version != 6):
        raise ValueError(f"{value!r} is not an {family} address")
    if addr.is_loopback and not loopback_ok:
        raise ValueError(f"{value} is a loopback address, unusable as {what}")
    if addr.is_unspecified or addr.is_multicast or (addr.is_reserved and not addr.is_loopback):
        raise ValueError(f"{value} is not a unicast address, unusable as {what}")
    return str(addr)


def check_mac(value: str) -> str:
    """Return the lower-cased MAC if it is a usable unicast address, else raise ValueError."""
    octets = bytes(int(part, 16) for part in value.split(":"))
    if octets[0] & 0x01:
        raise ValueError(f"{value} is a multicast MAC address")
    if not any(octets):
        raise ValueError(f"{value} is the all-zero MAC address")
    return value.lower()


def parse_listen(text: str) -> tuple[str, int]:
    """``ADDR:PORT`` or ``[ADDR6]:PORT`` (an IP address and a port 1..65535) as (address, port); ValueError
    with a message fit for the user when malformed."""
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r} is not ADDR:PORT")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{text!r}: {host!r} is not an IP address") from None
    return host, int(port)


def check_unix_path(value: str) -> str:
    """Return ``value`` if it fits a unix socket address, else raise ValueError."""
    if "\0" in value:
        raise ValueError("path contains a NUL character")
    size = len(os.fsencode(value))
    if size > Limit.MAX_UNIX_PATH:
        raise ValueError(
            f"{value} is {size} bytes long, more than the {int(Limit.MAX_UNIX_PATH)} "
            "a unix socket address can hold"
        )
    return value


def none_list(values: Iterable[str], split: bool = False) -> list[str]:
    """A repeatable list option's values with passt's ``none``: the list as given after the last ``none``
    (an empty list: none at all).  ``split``: each value may hold several words (``-S "a.example b.example"``,
    passt's space-separated list)."""
    out: list[str] = []
    for value in values:
        for word in value.split() if split else [value]:
            if word == NONE_WORD:
                out = []
            else:
                out.append(word)
    return out


def check_hostname(value: str) -> str:
    """Return ``value`` if it is a host name fit for DHCP option 12 (at most 255 bytes), else raise
    ValueError."""
    if len(value) > 255 or not HOSTNAME_PATTERN.match(value):
        raise ValueError(f"{value!r} is not a host name (letters, digits, '-' and '_' in labels of 1..63, "
                         "at most 255 characters)")
    return value
