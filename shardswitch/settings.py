"""Settings of one shardswitch instance: the defaults, the TOML file and the command line, validated.

Theory of operation
-------------------
Settings come from three layers, later ones winning key by key::

    built-in defaults  <  TOML file given by --config  <  command-line options

:func:`load_config` validates each layer on its own before merging, so that
every error names where the bad value came from and which key it is::

    config file /etc/shardswitch.toml: workers: Expected `int` >= 1, got 0
    command line: -M/--mac-addr: 01:00:5e:00:00:01 is a multicast MAC address

Type and range checks are msgspec's (``msgspec.convert`` into :class:`Config`
with ``msgspec.Meta`` constraints); the checks msgspec cannot express (IPv4
addresses, MAC bits, unix socket path lengths, options that exclude each
other) are explicit and run after it.  Mutually exclusive pairs (``socket`` /
``connect``, ``debug`` / ``quiet``) are resolved across layers: setting one
in a later layer drops the other from earlier layers, so ``--connect`` on the
command line overrides ``socket = ...`` in the file.

Relative paths are made absolute at load time: relative to the directory of
the TOML file for file values, to the working directory for command-line
values.  After loading, exactly one of ``socket`` and ``connect`` is set and
``control`` is always set (see :func:`default_socket_path`).

What the guest is offered (its addresses, mirrored from the host) is a
second, separate step: :mod:`shardswitch.guest_addressing`.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from typing import Annotated, Any, Final

import msgspec

from shardswitch import portspec
from shardswitch.settings_values import (NONE_WORD, Limit, check_hostname, check_ip, check_mac, check_unix_path,
                                         none_list, parse_listen, parse_prefix)
from shardswitch.worker import policy

log = logging.getLogger(__name__)

DEFAULT_MAC: Final = "9a:55:9a:55:9a:55"
DEFAULT_MTU: Final = 65520
CONTROL_SUFFIX: Final = ".ctl"
#: The TCP_REPAIR helper's socket: the vhost-user socket path plus this, as passt's.
REPAIR_SUFFIX: Final = ".repair"
SOCKET_DIR_NAME: Final = "shardswitch"
SOCKET_FILE_NAME: Final = "shardswitch.sock"


class ConfigError(Exception):
    """A setting is missing, malformed or inconsistent; the message says which."""


MAC_PATTERN: Final = r"^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}$"
IFNAME_PATTERN: Final = r"^(?!\.\.?$)[^\s/:]+$"
DOMAIN_PATTERN: Final = (
    r"^([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\.)*"
    r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\.?$"
)

#: Human wording for msgspec's "matching regex '...'" messages.
_PATTERN_TEXT: Final = {
    MAC_PATTERN: "a MAC address like 9a:55:9a:55:9a:55",
    IFNAME_PATTERN: "an interface name (no whitespace, '/' or ':')",
    DOMAIN_PATTERN: "a domain name like example.org",
}

Workers = Annotated[int, msgspec.Meta(ge=int(Limit.MIN_WORKERS), le=int(Limit.MAX_WORKERS))]
#: A descriptor number passed in (0, 1 and 2 are the standard streams).
FdNumber = Annotated[int, msgspec.Meta(ge=3, le=1 << 20)]
#: The log file's size limit: at least 64 KiB (passt's minimum is similar), at most 1 GiB.
DEFAULT_LOG_SIZE: Final = 1 << 20
LogSize = Annotated[int, msgspec.Meta(ge=64 << 10, le=1 << 30)]
#: Each capture file's size limit (0: none): at least 1 MiB.
DEFAULT_PCAP_SIZE: Final = 256 << 20
PCAP_MIN_SIZE: Final = 1 << 20
PcapSize = Annotated[int, msgspec.Meta(ge=0, le=1 << 40)]
#: 0: no MTU is offered to the guest (passt's -m 0); else MIN_MTU..MAX_MTU (checked in _check).
Mtu = Annotated[int, msgspec.Meta(ge=0, le=int(Limit.MAX_MTU))]
PrefixLen = Annotated[int, msgspec.Meta(ge=0, le=int(Limit.MAX_PREFIX_LEN))]
Prefix6Len = Annotated[int, msgspec.Meta(ge=1, le=int(Limit.MAX_PREFIX6_LEN))]
MacAddress = Annotated[str, msgspec.Meta(pattern=MAC_PATTERN)]
IfName = Annotated[str, msgspec.Meta(pattern=IFNAME_PATTERN, max_length=int(Limit.MAX_IFNAME))]
DomainName = Annotated[str, msgspec.Meta(pattern=DOMAIN_PATTERN, max_length=int(Limit.MAX_DOMAIN))]
NonEmpty = Annotated[str, msgspec.Meta(min_length=1)]
MaxFlows = Annotated[int, msgspec.Meta(ge=int(Limit.MIN_FLOWS), le=int(Limit.MAX_FLOWS))]
StatsDelay = Annotated[int, msgspec.Meta(ge=1, le=86400)]


class Config(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """All settings of one instance; TOML keys are these field names.

    ``None`` means "not set": for ``socket``/``control`` a default path is
    filled in by :func:`load_config`; for ``address``, ``prefix_len``,
    ``gateway``, their IPv6 counterparts, ``interface``, ``dns`` and
    ``search`` the value is mirrored from the host by
    :func:`resolve_addressing`.  An empty ``dns`` or ``search`` list means
    "none", not "from the host".

    ``address``, ``gateway``, ``outbound`` and ``dns_forward`` take an
    address of either family, as passt's options do: an IPv6 one (in a file
    or on the command line, where the option may be given once per family)
    lands in the ``...6`` field (:func:`_split_families`).
    """

    workers: Workers = 1
    socket: NonEmpty | None = None
    connect: NonEmpty | None = None
    control: NonEmpty | None = None
    address: str | None = None
    prefix_len: PrefixLen | None = None
    gateway: str | None = None
    mac: MacAddress = DEFAULT_MAC
    mtu: Mtu = DEFAULT_MTU
    interface: IfName | None = None
    dns: list[str] | None = None
    search: list[DomainName] | None = None
    debug: bool = False
    quiet: bool = False
    reflect: bool = False
    max_flows: MaxFlows = int(Limit.DEFAULT_FLOWS)
    #: Guest traffic to this address goes to the host's loopback (None: the gateway).
    map_host_loopback: str | None = None
    #: Do not map any address to the host's loopback.
    no_map_gw: bool = False
    #: Inbound port forwarding specs, as passt's -t / -u (validated by shardswitch.portspec).
    tcp_ports: list[NonEmpty] = []
    udp_ports: list[NonEmpty] = []
    #: An address the guest may use as DNS server; its queries go to the host's resolvers.
    dns_forward: str | None = None
    #: The host resolver forwarded DNS queries go to (default: the first of resolv.conf's).
    dns_host: str | None = None
    #: Guest services turned off: DHCPv4, NDP (with router advertisements), router advertisements alone,
    #: ICMP/ICMPv6 echo.
    no_dhcp: bool = False
    no_ndp: bool = False
    no_ra: bool = False
    no_icmp: bool = False
    no_dhcpv6: bool = False
    #: The guest's IPv6 address and prefix length (None: the host's), and its IPv6 router (None: the host's).
    address6: str | None = None
    prefix6_len: Prefix6Len | None = None
    gateway6: str | None = None
    #: One family only (-4 / -6): the other is neither offered nor forwarded.
    ipv4_only: bool = False
    ipv6_only: bool = False
    #: The guest-side IPv6 address whose port 53 is forwarded to the host's resolvers.
    dns_forward6: str | None = None
    #: Source address and interface host sockets of guest-started flows are bound to, per family.
    outbound: str | None = None
    outbound6: str | None = None
    outbound_if4: IfName | None = None
    outbound_if6: IfName | None = None
    #: Guest traffic to this address goes to the host's own address that the guest's address shadows.
    map_guest_addr: str | None = None
    #: Destinations (ADDR[/LEN], either family) the guest's flows may not reach (shardswitch.worker.policy).
    deny: list[NonEmpty] = []
    #: Let the guest's flows reach link-local and cloud metadata addresses (refused by default).
    allow_link_local: bool = False
    #: Started as root: the user (and group) to become once sockets are bound (None: nobody).
    runas: NonEmpty | None = None
    #: No privilege drop, no seccomp filters (debugging).
    no_sandbox: bool = False
    #: A group (name or number) whose members (by their primary group) may use the control socket too.
    control_group: NonEmpty | None = None
    #: Where the TCP_REPAIR helper connects (live migration of TCP connections); "none": nowhere.  None:
    #: the vhost-user socket path plus ``.repair``, as passt's.
    repair_path: NonEmpty | None = None
    #: An already open unix stream socket to serve: listening (the vhost-user socket) or connected (one
    #: front-end, then exit), as passt's --fd.
    fd: FdNumber | None = None
    #: Write the coordinator's PID into this file.
    pid_file: NonEmpty | None = None
    #: Log into this file instead of stderr, kept under ``log_size`` bytes.
    log_file: NonEmpty | None = None
    log_size: LogSize = DEFAULT_LOG_SIZE
    #: Serve Prometheus metrics over HTTP on this ADDR:PORT.
    metrics: NonEmpty | None = None
    #: Capture every frame into this pcap file (and FILE.1 once it holds ``pcap_size`` bytes; 0: no limit).
    pcap: NonEmpty | None = None
    pcap_size: PcapSize = DEFAULT_PCAP_SIZE
    #: Protocol handlers turned off (passt's --no-tcp / --no-udp): the guest's frames of that protocol are
    #: dropped (counted) and no host port of it may be forwarded.
    no_tcp: bool = False
    no_udp: bool = False
    #: Given to the guest by DHCP: its host name (option 12) and FQDN (option 81; DHCPv6 option 39).
    hostname: str | None = None
    fqdn: DomainName | None = None
    #: Leave the DNS servers / the search list out of DHCP, DHCPv6 and router advertisements.
    no_dhcp_dns: bool = False
    no_dhcp_search: bool = False
    #: Forwarded ports may listen on addresses the host does not have (yet): IP_FREEBIND / IPV6_FREEBIND.
    freebind: bool = False
    #: Log every frame to and from the guest, one line each (implies debug; rate-limited like every log).
    trace: bool = False
    #: Exit once the first front-end has gone (passt's -1/--one-off).
    one_off: bool = False
    #: Once an outgoing migration completes: exit (passt's --migrate-exit) / keep no guard on the local ports of
    #: the TCP connections that moved (passt's --migrate-no-linger closes their sockets at once; ours are
    #: closed either way, silently, and the guard is what keeps the peer from a reset meanwhile).
    migrate_exit: bool = False
    migrate_no_linger: bool = False
    #: The host resolver forwarded IPv6 DNS queries go to (--dns-host once per family).
    dns_host6: str | None = None
    #: Log a line of the workers' counters at most every this many seconds, when they changed (passt's --stats).
    stats: StatsDelay | None = None
    #: Sandbox: when pivot_root cannot switch to the empty root (an initramfs or tmpfs root), chroot instead.
    chroot_fallback: bool = False


#: Option spelling per field, for error messages about command-line values.
OPTION_NAMES: Final = {
    "workers": "--workers",
    "socket": "-s/--socket",
    "connect": "--connect",
    "control": "-c/--control",
    "address": "-a/--address",
    "prefix_len": "-n/--netmask",
    "gateway": "-g/--gateway",
    "mac": "-M/--mac-addr",
    "mtu": "-m/--mtu",
    "interface": "-i/--interface",
    "dns": "-D/--dns",
    "search": "-S/--search",
    "debug": "-d/--debug",
    "quiet": "-q/--quiet",
    "reflect": "--reflect",
    "max_flows": "--max-flows",
    "map_host_loopback": "--map-host-loopback",
    "no_map_gw": "--no-map-gw",
    "tcp_ports": "-t/--tcp-ports",
    "udp_ports": "-u/--udp-ports",
    "dns_forward": "--dns-forward",
    "dns_host": "--dns-host",
    "no_dhcp": "--no-dhcp",
    "no_ndp": "--no-ndp",
    "no_ra": "--no-ra",
    "no_icmp": "--no-icmp",
    "no_dhcpv6": "--no-dhcpv6",
    "address6": "-a/--address",
    "prefix6_len": "-n/--netmask or -a ADDR/LEN",
    "gateway6": "-g/--gateway",
    "ipv4_only": "-4/--ipv4-only",
    "ipv6_only": "-6/--ipv6-only",
    "dns_forward6": "--dns-forward",
    "outbound": "-o/--outbound",
    "outbound6": "-o/--outbound",
    "outbound_if4": "--outbound-if4",
    "outbound_if6": "--outbound-if6",
    "map_guest_addr": "--map-guest-addr",
    "deny": "--deny",
    "allow_link_local": "--allow-link-local",
    "runas": "--runas",
    "no_sandbox": "--no-sandbox",
    "control_group": "--control-group",
    "repair_path": "--repair-path",
    "fd": "-F/--fd",
    "pid_file": "-P/--pid",
    "log_file": "-l/--log-file",
    "log_size": "--log-size",
    "metrics": "--metrics",
    "pcap": "-p/--pcap",
    "pcap_size": "--pcap-size",
    "no_tcp": "--no-tcp",
    "no_udp": "--no-udp",
    "hostname": "-H/--hostname",
    "fqdn": "--fqdn",
    "no_dhcp_dns": "--no-dhcp-dns",
    "no_dhcp_search": "--no-dhcp-search",
    "freebind": "--freebind",
    "trace": "--trace",
    "one_off": "-1/--one-off",
    "migrate_exit": "--migrate-exit",
    "migrate_no_linger": "--migrate-no-linger",
    "dns_host6": "--dns-host",
    "stats": "--stats",
    "chroot_fallback": "--chroot-fallback",
}

#: Settings that take an address of either family: the IPv4 field and where an IPv6 value goes.
FAMILY_FIELDS: Final = (("address", "address6"), ("gateway", "gateway6"), ("outbound", "outbound6"),
                        ("dns_forward", "dns_forward6"), ("dns_host", "dns_host6"))

_FIELDS: Final = frozenset(Config.__struct_fields__)
_PATH_FIELDS: Final = ("socket", "connect", "control", "repair_path")
#: Paths of files (not sockets): made absolute as the sockets', no length limit.
_FILE_FIELDS: Final = ("pid_file", "log_file", "pcap")
#: The value of repair_path that turns the repair socket off.
NO_REPAIR: Final = "none"
_EXCLUSIVE: Final = (("socket", "connect"), ("debug", "quiet"), ("map_host_loopback", "no_map_gw"),
                     ("ipv4_only", "ipv6_only"), ("fd", "connect"), ("trace", "quiet"))
_CONFIG_KEY: Final = "config"
_CLI_LABEL: Final = "command line"
_ERROR_AT = re.compile(r"^(?P<problem>.*) - at `\$(?P<path>[^`]*)`$", re.DOTALL)
_PATH_STEP = re.compile(r"\.(?P<key>\w+)|\[(?P<index>\d+)\]")


# --------------------------------------------------------------------------
# default paths


def default_socket_path(environ: Mapping[str, str] | None = None, uid: int | None = None) -> str:
    """Return the vhost-user socket path used when neither --socket nor --connect is given.

    In order of preference:

    1. ``$XDG_RUNTIME_DIR/shardswitch/shardswitch.sock`` when XDG_RUNTIME_DIR
       is set to an absolute path (a per-user, 0700 directory under /run/user);
    2. ``/run/shardswitch/shardswitch.sock`` when running as root (uid 0)
       without XDG_RUNTIME_DIR (the systemd unit's RuntimeDirectory);
    3. ``/tmp/shardswitch-$UID/shardswitch.sock`` otherwise.

    ``environ`` and ``uid`` default to the process's own; they are
    parameters so that the choice can be tested.  The directory is not
    created here (see ``shardswitch.cli.prepare_socket_dir``).
    """
    env = os.environ if environ is None else environ
    user = os.getuid() if uid is None else uid
    runtime_dir = env.get("XDG_RUNTIME_DIR", "")
    if os.path.isabs(runtime_dir):
        base = os.path.join(runtime_dir, SOCKET_DIR_NAME)
    elif user == 0:
        base = os.path.join("/run", SOCKET_DIR_NAME)
    else:
        base = f"/tmp/{SOCKET_DIR_NAME}-{user}"
    return os.path.join(base, SOCKET_FILE_NAME)


def default_control_path(socket_path: str | None = None) -> str:
    """Return the control socket path that goes with ``socket_path``.

    It is the vhost-user socket path plus ``.ctl``; without a listening
    socket (``--connect`` mode, or ``shardswitch status`` with no options) it
    is derived from :func:`default_socket_path`.
    """
    return (socket_path or default_socket_path()) + CONTROL_SUFFIX


# --------------------------------------------------------------------------
# value parsers shared by the file and the command line


def _check_dns_host(label: str, field: str, value: str, family: str) -> str:
    """--dns-host: any unicast address of ``family``, the host's loopback included (a stub resolver's
    127.0.0.53)."""
    return _checked(label, field, check_ip, value, "the host's DNS resolver", family, True)


def _split_prefix(values: dict[str, Any], label: str) -> dict[str, Any]:
    """``-n`` once per family: a prefix length above 32 is IPv6's (``prefix6_len``); anything else,
    a length 0..32 or a dotted netmask, is IPv4's (an IPv6 prefix of 32 or less: ``-a ADDR/LEN``)."""
    given = values.pop("prefix_len", None)
    if given is None:
        return values
    for item in given if isinstance(given, list) else [given]:
        text = str(item).strip()
        field = "prefix6_len" if text.isdigit() and int(text) > Limit.MAX_PREFIX_LEN else "prefix_len"
        if field in values:
            raise _fail(label, field, f"given twice ({values[field]} and {item}): once per IP family")
        values[field] = int(text) if field == "prefix6_len" else item
    return values


def _resolve_none(values: Mapping[str, Any]) -> dict[str, Any]:
    """passt's ``none`` in one layer: ``-D none`` / ``-S none`` empty their lists (what follows a ``none``
    counts; ``-S`` also takes space-separated domains, as passt's), ``--map-host-loopback none`` is
    ``--no-map-gw``.  (``--map-guest-addr none`` stays, to override a lower layer: :func:`_check`.)"""
    out = dict(values)
    for field, split in (("dns", False), ("search", True)):
        given = out.get(field)
        if given == NONE_WORD:
            out[field] = []
        elif isinstance(given, list) and all(isinstance(item, str) for item in given):
            out[field] = none_list(given, split)
    if out.get("map_host_loopback") == NONE_WORD:
        del out["map_host_loopback"]
        out["no_map_gw"] = True
    return out


def _split_families(values: Mapping[str, Any], label: str) -> dict[str, Any]:
    """Move IPv6 values of the either-family settings (:data:`FAMILY_FIELDS`) to their IPv6 fields.

    A value may be a string or, from a repeatable command-line option, a list
    of strings; each family may be given once.  ``-a ADDR/LEN`` also sets
    ``prefix_len`` or ``prefix6_len`` (with ``-n`` for the same family: an error, as passt's).  Values of neither family are left in the
    IPv4 field, whose check then names them.  Raises ConfigError.
    """
    out = _split_prefix(_resolve_none(values), label)
    for v4_field, v6_field in FAMILY_FIELDS:
        given = out.pop(v4_field, None)
        if given is None:
            continue
        items = given if isinstance(given, list) else [given]
        for item in items:
            if not isinstance(item, str):
                out[v4_field] = item  # msgspec names the wrong type
                continue
            text, slash, length = item.partition("/")
            field = v6_field if ":" in text else v4_field
            if field in out:
                raise _fail(label, field, f"given twice ({out[field]} and {item}): once per IP family")
            if slash and field in ("address", "address6"):
                prefix = "prefix6_len" if field == "address6" else "prefix_len"
                if prefix in out:       # passt: mixing -a ADDR/LEN with -n is an error
                    raise _fail(label, prefix, f"given twice ({out[prefix]} and {item})")
                if not length.isdigit():
                    raise _fail(label, prefix, f"{length!r} is not a prefix length")
                out[prefix] = int(length)
                item = text
            out[field] = item
    return out


# --------------------------------------------------------------------------
# loading


def _given_options(cli_args: argparse.Namespace | Mapping[str, Any]) -> dict[str, Any]:
    """Return the options that were actually given (not None), keyed by field name.

    A Namespace may carry unrelated attributes (the sub-command, ...): only
    Config fields and ``config`` are taken from it.  A mapping is taken as
    is, so an unknown key in it is reported as an error.
    """
    if isinstance(cli_args, argparse.Namespace):
        items = {k: v for k, v in vars(cli_args).items() if k in _FIELDS or k == _CONFIG_KEY}
    else:
        items = dict(cli_args)
    return {key: value for key, value in items.items() if value is not None}


def read_config_file(path: str) -> dict[str, Any]:
    """Read a TOML settings file into a dict (not validated yet); raise ConfigError on failure."""
    try:
        with open(path, "rb") as stream:
            return tomllib.load(stream)
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path}: {exc}") from None


def _absolutise(values: dict[str, Any], base_dir: str) -> dict[str, Any]:
    """Return ``values`` with relative socket paths made absolute against ``base_dir``."""
    out = dict(values)
    for key in _PATH_FIELDS + _FILE_FIELDS:
        path = out.get(key)
        if isinstance(path, str) and path and path != NO_REPAIR and not os.path.isabs(path):
            out[key] = os.path.normpath(os.path.join(base_dir, path))
    return out


def _key_name(path: str, label: str) -> str:
    """Turn a msgspec path (".dns[1]") into the name the user knows (TOML key or option)."""
    steps = list(_PATH_STEP.finditer(path))
    if not steps or steps[0].group("key") is None:
        return path
    field = steps[0].group("key")
    if label == _CLI_LABEL:  # list indexes mean nothing on a command line: the value is shown
        return OPTION_NAMES.get(field, field)
    return field + path[steps[0].end():]


def _value_at(values: Mapping[str, Any], path: str) -> tuple[bool, Any]:
    """Look up a msgspec path in the raw input; return (found, value)."""
    node: Any = values
    for step in _PATH_STEP.finditer(path):
        key, index = step.group("key"), step.group("index")
        if key is not None and isinstance(node, Mapping) and key in node:
            node = node[key]
        elif index is not None and isinstance(node, list) and int(index) < len(node):
            node = node[int(index)]
        else:
            return False, None
    return True, node


def _describe(exc: msgspec.ValidationError, values: Mapping[str, Any], label: str) -> str:
    """Build "<label>: <key>: <problem>, got <value>" from a msgspec validation error."""
    text = str(exc)
    for pattern, wording in _PATTERN_TEXT.items():
        text = text.replace(f"`str` matching regex {pattern!r}", wording)
    match = _ERROR_AT.match(text)
    if match is None:
        return f"{label}: {text}"
    problem, path = match.group("problem"), match.group("path")
    found, value = _value_at(values, path)
    if found and "got" not in problem:
        problem += f", got {value!r}"
    return f"{label}: {_key_name(path, label)}: {problem}"


def _fail(label: str, field: str, problem: str) -> ConfigError:
    """Build the ConfigError for an explicit check of ``field``."""
    return ConfigError(f"{label}: {_key_name('.' + field, label)}: {problem}")


def _checked(label: str, field: str, check: Callable[..., str], *args: object) -> str:
    """Run one explicit value check, turning its ValueError into a ConfigError about ``field``."""
    try:
        return check(*args)
    except ValueError as exc:
        raise _fail(label, field, str(exc)) from None


def _check(cfg: Config, label: str) -> Config:
    """Run the checks msgspec cannot express; return ``cfg`` with values normalised."""
    for a, b in _EXCLUSIVE:
        if getattr(cfg, a) and getattr(cfg, b):
            raise ConfigError(f"{label}: {_key_name('.' + a, label)} and "
                              f"{_key_name('.' + b, label)} exclude each other")
    changes: dict[str, Any] = {"mac": _checked(label, "mac", check_mac, cfg.mac)}
    for field, family, what in (("address", "IPv4", "the guest's address"),
                                ("gateway", "IPv4", "the guest's gateway"),
                                ("address6", "IPv6", "the guest's address"),
                                ("gateway6", "IPv6", "the guest's gateway"),
                                ("dns_forward", "IPv4", "the DNS forwarding address"),
                                ("dns_forward6", "IPv6", "the DNS forwarding address"),
                                ("outbound", "IPv4", "the outbound source address"),
                                ("outbound6", "IPv6", "the outbound source address"),
                                ("map_guest_addr", "IP", "the address mapped to the guest's")):
        value = getattr(cfg, field)
        if value == NONE_WORD and field == "map_guest_addr":
            changes[field] = None
        elif value is not None:
            changes[field] = _checked(label, field, check_ip, value, what, family)
    for field, family in (("dns_host", "IPv4"), ("dns_host6", "IPv6")):
        value = getattr(cfg, field)
        if value is not None:
            changes[field] = _check_dns_host(label, field, value, family)
    if cfg.mtu and cfg.mtu < Limit.MIN_MTU:
        raise _fail(label, "mtu", f"{cfg.mtu} is below {int(Limit.MIN_MTU)} (0: offer no MTU)")
    if cfg.hostname is not None:
        _checked(label, "hostname", check_hostname, cfg.hostname)
    if cfg.map_host_loopback is not None:
        changes["map_host_loopback"] = _checked(label, "map_host_loopback", check_ip, cfg.map_host_loopback,
                                                "the address mapped to the host's loopback")
    for field in _PATH_FIELDS:
        value = getattr(cfg, field)
        if value is not None and value != NO_REPAIR:
            _checked(label, field, check_unix_path, value)
    for field, option, off, proto in (("tcp_ports", "-t", "no_tcp", "TCP"), ("udp_ports", "-u", "no_udp", "UDP")):
        specs = getattr(cfg, field)
        if specs:
            try:
                forwards = portspec.parse_all(specs, option)
            except portspec.PortSpecError as exc:
                raise _fail(label, field, str(exc)) from None
            if forwards and getattr(cfg, off):
                raise _fail(label, off, f"no {proto} handler, yet {proto} ports are forwarded "
                                        f"({option} {' '.join(specs)})")
    if 0 < cfg.pcap_size < PCAP_MIN_SIZE:
        raise _fail(label, "pcap_size", f"{cfg.pcap_size} is below {PCAP_MIN_SIZE} bytes (0: no limit)")
    if cfg.metrics is not None:
        try:
            parse_listen(cfg.metrics)
        except ValueError as exc:
            raise _fail(label, "metrics", str(exc)) from None
    for i, entry in enumerate(cfg.deny):
        try:
            policy.parse_prefix(entry)
        except policy.PolicyError as exc:
            raise _fail(label, f"deny[{i}]", str(exc)) from None
    if cfg.dns is not None:
        # A loopback address is given as is, as passt's: -D 127.0.0.1 makes the guest its own resolver.
        changes["dns"] = [_checked(label, f"dns[{i}]", check_ip, server, "a DNS server for the guest", "IP", True)
                          for i, server in enumerate(cfg.dns)]
    if cfg.control is not None and cfg.control in (cfg.socket, cfg.connect):
        raise _fail(label, "control", "must differ from the vhost-user socket path")
    return msgspec.structs.replace(cfg, **changes)


def _validate(values: dict[str, Any], label: str) -> Config:
    """Convert one layer (or the merged layers) into a checked Config."""
    raw = dict(values)
    prefix = raw.get("prefix_len")
    if isinstance(prefix, str):
        try:
            raw["prefix_len"] = parse_prefix(prefix)
        except ValueError as exc:
            raise _fail(label, "prefix_len", str(exc)) from None
    try:
        cfg = msgspec.convert(raw, Config)
    except msgspec.ValidationError as exc:
        raise ConfigError(_describe(exc, raw, label)) from None
    return _check(cfg, label)


def _merge(lower: Mapping[str, Any], upper: Mapping[str, Any]) -> dict[str, Any]:
    """Overlay ``upper`` on ``lower``; a set side of an exclusive pair drops the other side."""
    merged = dict(lower)
    for a, b in _EXCLUSIVE:
        for mine, other in ((a, b), (b, a)):
            if upper.get(mine):
                merged.pop(other, None)
    merged.update(upper)
    return merged


def load_config(cli_args: argparse.Namespace | Mapping[str, Any]) -> Config:
    """Build the Config from defaults, the --config TOML file and command-line options.

    ``cli_args`` is the parsed command line (options not given are None) or
    an equivalent mapping of field names, optionally with ``config`` (path
    of a TOML file).  Raises ConfigError naming the source, key and problem.
    """
    given = _given_options(cli_args)
    config_path = given.pop(_CONFIG_KEY, None)
    layered: dict[str, Any] = {}
    if config_path is not None:
        config_path = str(config_path)
        file_values = _absolutise(read_config_file(config_path),
                                  os.path.dirname(os.path.abspath(config_path)))
        label = f"config file {config_path}"
        file_values = _split_families(file_values, label)
        _validate(file_values, label)
        layered = file_values
    cli_values = _split_families(_absolutise(given, os.getcwd()), _CLI_LABEL)
    cfg = _validate(_merge(layered, cli_values), _CLI_LABEL)
    if cfg.socket is None and cfg.connect is None:
        cfg.socket = default_socket_path()
    if cfg.control is None:
        cfg.control = default_control_path(cfg.socket)
    if cfg.repair_path is None:
        cfg.repair_path = (cfg.socket or cfg.connect or default_socket_path()) + REPAIR_SUFFIX
    return _check(cfg, "default paths")
