"""The ``shardswitch`` command line.

Theory of operation
-------------------
Three entry points, parsed with argparse::

    shardswitch start [--workers N] [--socket PATH | --connect PATH] [--control PATH] [--control-group GROUP]
                      [-a ADDR]... [-n PREFIX]... [-g GW]... [-M MAC] [-m MTU] [-i IFACE] [-4 | -6]
                      [--dns ADDR]... [--search DOMAIN]... [--config FILE] [-d | -q] ...
    shardswitch status [--control PATH] [--json]
    shardswitch forward list|add|remove [-t SPEC]... [-u SPEC]... [--control PATH] [--json]
    shardswitch --print-capabilities        (libvirt's probe: prints {"type": "net"})

Options of ``start`` default to None ("not given") so that
:func:`shardswitch.settings.load_config` can layer them over the TOML file;
their argparse ``dest`` names are the :class:`~shardswitch.settings.Config`
field names.  ``start`` then sets up logging, creates the socket directories
and hands the Config to ``shardswitch.coordinator.startup.run`` (imported
late: it pulls in the whole data path).  ``status`` asks the running
instance over its control socket (``shardswitch.coordinator.control``).

Exit codes (:class:`ExitCode`): 0 success, 1 runtime failure, 2 usage or
configuration error, 130 interrupted by Ctrl-C before the coordinator took
over SIGINT.  User errors are one line on stderr, never a
traceback; argparse's own usage errors also exit with 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import stat
import sys
from enum import IntEnum
from typing import Any, Final

from shardswitch import __version__, systemd
from shardswitch.logfile import LogFile
from shardswitch.virtio import ringimpl
from shardswitch.settings import (DEFAULT_MAC, DEFAULT_MTU, Config, ConfigError, Limit,
                                  default_control_path, load_config)

PROG: Final = "shardswitch"
CAPABILITIES: Final = '{"type": "net"}'
LOG_FORMAT: Final = "%(asctime)s.%(msecs)03d %(name)s[%(process)d] %(levelname)s: %(message)s"
LOG_DATE_FORMAT: Final = "%Y-%m-%d %H:%M:%S"
SOCKET_DIR_MODE: Final = 0o700

log = logging.getLogger(__name__)


class ExitCode(IntEnum):
    """Process exit statuses."""

    OK = 0
    RUNTIME = 1
    USAGE = 2
    #: 128 + SIGINT, the shell's convention for a run ended by Ctrl-C.
    INTERRUPTED = 130


def _add_start_options(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``shardswitch start`` (all defaulting to None = not given)."""
    parser.add_argument("--config", metavar="FILE", help="TOML settings file (options override it)")
    parser.add_argument("--workers", type=int, metavar="N",
                        help=f"worker processes = queue pairs, {int(Limit.MIN_WORKERS)}.."
                             f"{int(Limit.MAX_WORKERS)} (default 1)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("-s", "--socket", "--socket-path", dest="socket", metavar="PATH",
                       help="listen for the vhost-user front-end on this unix socket (default: "
                            "$XDG_RUNTIME_DIR/shardswitch/shardswitch.sock, "
                            "/run/shardswitch/shardswitch.sock for root, else "
                            "/tmp/shardswitch-$UID/shardswitch.sock)")
    where.add_argument("--connect", metavar="PATH",
                       help="connect to a front-end listening on this unix socket (QEMU server=on)")
    parser.add_argument("-c", "--control", "--conf-path", dest="control", metavar="PATH",
                        help="control socket for 'shardswitch status', 'forward'... (default: socket path + .ctl)")
    parser.add_argument("--control-group", dest="control_group", metavar="GROUP",
                        help="processes whose primary group is GROUP (name or number) may use the control socket "
                             "too (default: only root and the switch's own user)")
    parser.add_argument("-a", "--address", action="append", metavar="ADDR",
                        help="guest IPv4 or IPv6 address[/prefix length] (once per family; "
                             "default: the host's)")
    parser.add_argument("-n", "--netmask", dest="prefix_len", action="append", metavar="PREFIX",
                        help="IPv4 prefix length 0..32 or dotted netmask, or IPv6 prefix length 33..128 "
                             "(once per family; default: the host's)")
    parser.add_argument("-g", "--gateway", action="append", metavar="GW",
                        help="guest default gateway, IPv4 or IPv6 (once per family; default: the host's)")
    parser.add_argument("-M", "--mac-addr", dest="mac", metavar="MAC",
                        help=f"MAC address shardswitch uses towards the guest (default {DEFAULT_MAC})")
    parser.add_argument("-m", "--mtu", type=int, metavar="MTU",
                        help=f"MTU offered to the guest, {int(Limit.MIN_MTU)}..{int(Limit.MAX_MTU)}, or 0 to "
                             f"offer none (default {DEFAULT_MTU})")
    parser.add_argument("-i", "--interface", metavar="IFACE",
                        help="host interface to mirror addressing from (default: the one "
                             "holding each family's default route)")
    family = parser.add_mutually_exclusive_group()
    family.add_argument("-4", "--ipv4-only", dest="ipv4_only", action="store_true", default=None,
                        help="IPv4 only: no IPv6 for the guest")
    family.add_argument("-6", "--ipv6-only", dest="ipv6_only", action="store_true", default=None,
                        help="IPv6 only: no IPv4 for the guest")
    parser.add_argument("-o", "--outbound", action="append", metavar="ADDR",
                        help="bind host sockets of the guest's connections to this source address "
                             "(once per family)")
    for version in ("4", "6"):
        parser.add_argument(f"--outbound-if{version}", dest=f"outbound_if{version}", metavar="IFACE",
                            help=f"bind host sockets of the guest's IPv{version} connections to this interface")
    parser.add_argument("--map-guest-addr", dest="map_guest_addr", metavar="ADDR",
                        help="guest traffic to ADDR goes to the host's own address (the one the guest's "
                             "address shadows)")
    parser.add_argument("--deny", action="append", metavar="ADDR[/LEN]",
                        help="the guest's flows may not reach these destinations (IPv4 or IPv6 address or "
                             "prefix; repeatable)")
    parser.add_argument("--allow-link-local", dest="allow_link_local", action="store_true", default=None,
                        help="let the guest reach link-local addresses and cloud metadata services "
                             "(169.254.169.254...), as passt does (refused by default)")
    parser.add_argument("-D", "--dns", action="append", metavar="ADDR",
                        help="DNS server offered to the guest (repeatable; none: no DNS server; default: the "
                             "host's)")
    parser.add_argument("-S", "--search", action="append", metavar="DOMAINS",
                        help="DNS search domains offered to the guest, space-separated (repeatable; none: no "
                             "search list; default: the host's)")
    parser.add_argument("--no-dhcp-dns", dest="no_dhcp_dns", action="store_true", default=None,
                        help="offer no DNS server by DHCP, DHCPv6 or router advertisements")
    parser.add_argument("--no-dhcp-search", dest="no_dhcp_search", action="store_true", default=None,
                        help="offer no search list by DHCP, DHCPv6 or router advertisements")
    parser.add_argument("-H", "--hostname", metavar="NAME", help="host name given to the guest (DHCP option 12)")
    parser.add_argument("--fqdn", metavar="NAME",
                        help="fully qualified name given to the guest (DHCP option 81, DHCPv6 option 39)")
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-d", "--debug", action="store_true", default=None, help="debug logging")
    verbosity.add_argument("-q", "--quiet", action="store_true", default=None, help="log errors only")
    parser.add_argument("--trace", action="store_true", default=None,
                        help="log every frame to and from the guest (implies --debug)")
    parser.add_argument("--stats", type=int, metavar="DELAY",
                        help="log what the workers moved at most every DELAY seconds, when anything moved")
    parser.add_argument("--max-flows", dest="max_flows", type=int, metavar="N",
                        help="capacity of the shared flow table (default 131071)")
    mapping = parser.add_mutually_exclusive_group()
    mapping.add_argument("--map-host-loopback", dest="map_host_loopback", metavar="ADDR",
                         help="guest traffic to ADDR goes to the host's loopback (default: the gateway; none: "
                              "no address, as --no-map-gw)")
    mapping.add_argument("--no-map-gw", dest="no_map_gw", action="store_true", default=None,
                         help="map no address to the host's loopback")
    parser.add_argument("-t", "--tcp-ports", dest="tcp_ports", action="append", metavar="SPEC",
                        help="forward host TCP ports to the guest: none, all, or "
                             "[ADDR[%%IF]/]PORT[-PORT][:TO[-TO]] and ~PORT[-PORT], comma-separated (repeatable)")
    parser.add_argument("-u", "--udp-ports", dest="udp_ports", action="append", metavar="SPEC",
                        help="forward host UDP ports to the guest, same syntax as -t (repeatable)")
    parser.add_argument("--dns-forward", dest="dns_forward", action="append", metavar="ADDR",
                        help="guest DNS queries to ADDR (UDP and TCP ports 53 and 853) go to the host's resolvers "
                             "(once per family)")
    parser.add_argument("--dns-host", dest="dns_host", action="append", metavar="ADDR",
                        help="the host resolver forwarded DNS queries go to (once per family; default: "
                             "resolv.conf's first); without --dns-forward the gateway forwards to it")
    for name, what in (("dhcp", "no DHCPv4 server"), ("dhcpv6", "no DHCPv6 server"),
                       ("ndp", "no NDP (neighbour and router advertisements)"),
                       ("ra", "no router advertisements"), ("icmp", "no ICMP/ICMPv6 echo (and no NDP, as passt)"),
                       ("tcp", "no TCP: the guest's TCP frames are dropped, no TCP port is forwarded"),
                       ("udp", "no UDP: the guest's UDP frames are dropped (DHCP still works), no UDP port is "
                               "forwarded")):
        parser.add_argument(f"--no-{name}", dest=f"no_{name}", action="store_true", default=None, help=what)
    parser.add_argument("--runas", metavar="USER[:GROUP]",
                        help="started as root, become USER (default nobody) once sockets and ports are bound")
    parser.add_argument("--no-sandbox", dest="no_sandbox", action="store_true", default=None,
                        help="keep privileges and install no seccomp filter (debugging only)")
    parser.add_argument("--chroot-fallback", dest="chroot_fallback", action="store_true", default=None,
                        help="sandbox: chroot into the empty root when pivot_root cannot (an initramfs or tmpfs "
                             "root)")
    parser.add_argument("--repair-path", dest="repair_path", metavar="PATH",
                        help="where the TCP_REPAIR helper connects, to move TCP connections in a live migration "
                             "(default: the socket path + .repair; none: no helper)")
    parser.add_argument("-F", "--fd", type=int, metavar="N",
                        help="serve this already open unix socket: listening (the vhost-user socket, e.g. from "
                             "a parent process) or connected (one front-end; exit when it leaves)")
    parser.add_argument("-P", "--pid", dest="pid_file", metavar="FILE", help="write the process ID into FILE")
    parser.add_argument("-1", "--one-off", dest="one_off", action="store_true", default=None,
                        help="exit once the first front-end has gone")
    parser.add_argument("--migrate-exit", dest="migrate_exit", action="store_true", default=None,
                        help="exit once an outgoing migration has completed (passt's, deprecated there)")
    parser.add_argument("--migrate-no-linger", dest="migrate_no_linger", action="store_true", default=None,
                        help="after an outgoing migration keep no guard on the local ports of the TCP connections "
                             "that moved (passt's, deprecated there)")
    parser.add_argument("--freebind", action="store_true", default=None,
                        help="forwarded ports may listen on addresses the host does not have (yet)")
    parser.add_argument("-l", "--log-file", dest="log_file", metavar="FILE",
                        help="log into FILE instead of stderr (its size kept under --log-size)")
    parser.add_argument("--log-size", dest="log_size", type=int, metavar="BYTES",
                        help="size limit of the log file; the oldest lines go first (default 1 MiB)")
    parser.add_argument("--metrics", metavar="ADDR:PORT",
                        help="serve Prometheus metrics on http://ADDR:PORT/metrics (e.g. 127.0.0.1:9410)")
    parser.add_argument("-p", "--pcap", metavar="FILE",
                        help="capture every frame to and from the guest into FILE (pcap; FILE.1 takes over "
                             "when FILE reaches --pcap-size)")
    parser.add_argument("--pcap-size", dest="pcap_size", type=int, metavar="BYTES",
                        help="size limit of each capture file (default 256 MiB; 0: none)")
    parser.add_argument("--reflect", action="store_true", default=None, help=argparse.SUPPRESS)
    # passt's options that describe what shardswitch always does: accepted, so that a passt command line works.
    parser.add_argument("-f", "--foreground", dest="passt_foreground", action="store_true",
                        help="accepted as passt's: shardswitch always runs in the foreground")
    parser.add_argument("-e", "--stderr", dest="passt_stderr", action="store_true",
                        help="accepted as passt's: shardswitch logs to stderr unless --log-file is given")
    parser.add_argument("--vhost-user", dest="passt_vhost_user", action="store_true",
                        help="accepted as passt's: shardswitch always speaks vhost-user")


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser for all sub-commands."""
    parser = argparse.ArgumentParser(
        prog=PROG, description="User-mode network back-end for virtual machines over vhost-user.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--print-capabilities", action="store_true",
                        help='print the vhost-user back-end capabilities ({"type": "net"}) and exit')
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    start = commands.add_parser("start", help="run the back-end in the foreground",
                                description="Run the back-end in the foreground.")
    _add_start_options(start)
    for name, what in (("status", "the state of a running instance"),
                       ("flows", "the live flows of a running instance"),
                       ("metrics", "the Prometheus metrics of a running instance")):
        query = commands.add_parser(name, help=f"show {what}", description=f"Show {what}.")
        query.add_argument("--control", metavar="PATH",
                           help="control socket (default: the default socket path + .ctl)")
        query.add_argument("--json", action="store_true", help="print the raw answer as JSON")
        if name == "status":
            query.add_argument("--watch", action="store_true",
                               help="refresh every --interval seconds with per-second rates (Ctrl-C ends)")
            query.add_argument("--interval", type=float, default=1.0, metavar="SECONDS",
                               help="refresh interval of --watch (default 1)")
            query.add_argument("--count", type=int, default=0, metavar="N", help="stop --watch after N refreshes")
    capture = commands.add_parser(
        "capture", help="start or stop a packet capture of a running instance",
        description="Start (or stop) capturing every frame to and from the guest into a pcap file, at run "
                    "time. The files (FILE and FILE.1) are opened here, with your rights, and handed over.")
    capture.add_argument("action", choices=("start", "stop"))
    capture.add_argument("file", nargs="?", metavar="FILE", help="the pcap file (start)")
    capture.add_argument("--size", type=int, default=256 << 20, metavar="BYTES",
                         help="size limit of each file, then the other takes over (default 256 MiB; 0: none)")
    capture.add_argument("--control", metavar="PATH",
                         help="control socket (default: the default socket path + .ctl)")
    forward = commands.add_parser(
        "forward", help="list, add or remove port forwarding rules of a running instance",
        description="List the port forwarding rules of a running instance, or add or remove rules (passt's -t/-u "
                    "SPEC syntax) on every worker at once, or on none when one cannot be (the port is taken, the "
                    "SPEC is bad or conflicts). Rules added here last until the instance exits; the settings file "
                    "is not changed.")
    forward.add_argument("action", choices=("list", "add", "remove"))
    forward.add_argument("-t", "--tcp-ports", dest="tcp", action="append", default=[], metavar="SPEC",
                         help="a TCP rule (add, remove; repeatable)")
    forward.add_argument("-u", "--udp-ports", dest="udp", action="append", default=[], metavar="SPEC",
                         help="a UDP rule (add, remove; repeatable)")
    forward.add_argument("--control", metavar="PATH",
                         help="control socket (default: the default socket path + .ctl)")
    forward.add_argument("--json", action="store_true", help="print the raw answer as JSON")
    helper = commands.add_parser(
        "repair-helper", help="lend CAP_NET_ADMIN to a switch for TCP_REPAIR (live migration)",
        description="Connect to a switch's repair socket and put the TCP sockets it sends into or out of repair "
                    "mode (passt-repair's protocol), so that its TCP connections move in a live migration. "
                    "Run as root (or with CAP_NET_ADMIN) beside a switch that dropped its privileges; it keeps "
                    "CAP_NET_ADMIN alone and exits when the switch closes the connection.")
    helper.add_argument("path", metavar="PATH", help="the switch's repair socket (its socket path + .repair)")
    helper.add_argument("--wait", type=float, default=10.0, metavar="SECONDS",
                        help="wait this long for the switch to listen (default 10)")
    return parser


def setup_logging(debug: bool, quiet: bool, log_file: LogFile | None = None) -> None:
    """Send log records to stderr (or ``log_file``) with time, process name/pid and level.

    Level DEBUG with ``debug``, ERROR with ``quiet``, else INFO.  When stderr is the journal's stream
    (systemd), records carry syslog priority prefixes and no timestamp.  Replaces any handlers already on
    the root logger, so it may be called again (workers inherit the configuration when forked).
    """
    level = logging.DEBUG if debug else logging.ERROR if quiet else logging.INFO
    formatter = logging.Formatter(LOG_FORMAT, LOG_DATE_FORMAT)
    if log_file is not None:
        handler = log_file.handler(formatter)
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(systemd.JournalFormatter() if systemd.journal_stream(os.environ) else formatter)
    logging.basicConfig(level=level, handlers=[handler], force=True)
    # Library chatter (every netlink message at DEBUG) hides our own records.
    logging.getLogger("pyroute2").setLevel(max(level, logging.WARNING))


def _error(message: str) -> None:
    """Print one user-facing error line on stderr."""
    print(f"{PROG}: error: {message}", file=sys.stderr)


def prepare_socket_dir(path: str) -> None:
    """Make sure the directory that will hold socket ``path`` exists and is safe to use.

    A missing directory is created with mode 0700 (parents as needed).
    Under /tmp, where anybody may have created the directory first, it must
    be a real directory (not a symlink) owned by this user and not writable
    by others.  Raises OSError (PermissionError for an unsafe directory).
    """
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, mode=SOCKET_DIR_MODE, exist_ok=True)
    if not os.path.realpath(directory).startswith("/tmp/"):
        return
    info = os.lstat(directory)
    if (not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid()
            or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)):
        raise PermissionError(f"{directory} is not a directory owned by uid {os.getuid()} "
                              "and writable only by it; refusing to put sockets there")


def _start(args: argparse.Namespace) -> int:
    """Run ``shardswitch start``: load the settings and run the coordinator until it exits."""
    try:
        cfg = load_config(args)
        ring = ringimpl.name()          # SHARDSWITCH_RING: refused here, not in every worker
    except (ConfigError, ringimpl.RingImplError) as exc:
        _error(str(exc))
        return ExitCode.USAGE
    log_file = None
    if cfg.log_file is not None:
        try:
            log_file = LogFile(cfg.log_file, cfg.log_size)
        except OSError as exc:
            _error(f"cannot open the log file {cfg.log_file}: {exc.strerror or exc}")
            return ExitCode.RUNTIME
    setup_logging(cfg.debug or cfg.trace, cfg.quiet, log_file)
    log.debug("ring mechanics: %s", "compiled helper" if ring == "c" else "Python reference")
    try:
        for path in (cfg.socket, cfg.control):
            if path is not None:
                prepare_socket_dir(path)
    except OSError as exc:
        _error(f"cannot prepare the socket directory: {exc}")
        return ExitCode.RUNTIME
    return _run(cfg, log_file)


def _run(cfg: Config, log_file: LogFile | None = None) -> int:
    """Call the coordinator, mapping its failures to exit codes and one-line messages."""
    from shardswitch.coordinator import startup

    try:
        return int(startup.run(cfg, log_file))
    except ConfigError as exc:
        _error(str(exc))
        return ExitCode.USAGE
    except KeyboardInterrupt:
        return ExitCode.INTERRUPTED
    except OSError as exc:
        log.debug("run failed", exc_info=True)
        _error(str(exc))
        return ExitCode.RUNTIME


def _query(args: argparse.Namespace) -> int:
    """Run ``shardswitch status`` / ``flows``: query the control socket and print the answer."""
    from shardswitch.coordinator import control

    path = args.control or default_control_path()
    if getattr(args, "watch", False):
        return _watch(path, args.interval, args.count)
    try:
        answer: dict[str, Any] = control.query(path, args.command)
    except control.ControlError as exc:
        _error(str(exc) if isinstance(exc, control.ControlRefused) else f"{exc} (is shardswitch running?)")
        return ExitCode.RUNTIME
    if args.json:
        print(json.dumps(answer, indent=2, sort_keys=True))
    else:
        formatters = {"status": control.format_status, "flows": control.format_flows,
                      "metrics": lambda metrics: str(metrics["text"]).rstrip("\n")}
        print(formatters[args.command](answer))
    return ExitCode.OK


def _watch(path: str, interval: float, count: int) -> int:
    """``shardswitch status --watch``: per-second rates, refreshed (the screen cleared on a terminal)."""
    import time

    from shardswitch.coordinator import control

    clear = "\x1b[H\x1b[2J" if sys.stdout.isatty() else ""
    shown = 0
    try:
        before, since = control.query(path, "status"), time.monotonic()
        while not count or shown < count:
            time.sleep(max(interval, 0.1))
            after, now = control.query(path, "status"), time.monotonic()
            print(clear + control.format_rates(before, after, now - since), flush=True)
            before, since, shown = after, now, shown + 1
    except control.ControlError as exc:
        _error(str(exc) if isinstance(exc, control.ControlRefused) else f"{exc} (is shardswitch running?)")
        return ExitCode.RUNTIME
    except KeyboardInterrupt:
        pass
    return ExitCode.OK


def _capture(args: argparse.Namespace) -> int:
    """``shardswitch capture start FILE`` / ``stop``: open the files here, hand them to the instance."""
    from shardswitch.coordinator import control
    from shardswitch.pcap import open_pair

    path = args.control or default_control_path()
    fds: tuple[int, ...] = ()
    try:
        if args.action == "start":
            if not args.file:
                _error("capture start needs a FILE")
                return ExitCode.USAGE
            fds = open_pair(args.file)
            answer = control.query(path, "capture-start", args={"size": args.size, "file": args.file}, fds=fds)
            print(f"capturing into {answer['capture']['file']}")
        else:
            answer = control.query(path, "capture-stop")
            print("capture stopped" if answer["stopped"] else "no capture was running")
    except OSError as exc:
        _error(f"cannot open {args.file}: {exc.strerror or exc}")
        return ExitCode.RUNTIME
    except control.ControlError as exc:
        _error(str(exc))
        return ExitCode.RUNTIME
    finally:
        for fd in fds:
            os.close(fd)
    return ExitCode.OK


def _forward(args: argparse.Namespace) -> int:
    """``shardswitch forward list`` / ``add -t SPEC`` / ``remove -u SPEC``: over the control socket."""
    from shardswitch.coordinator import control
    from shardswitch.coordinator.forwarding import format_rules

    path = args.control or default_control_path()
    if args.action == "list" and (args.tcp or args.udp):
        _error("forward list takes no -t/-u SPEC")
        return ExitCode.USAGE
    if args.action != "list" and not (args.tcp or args.udp):
        _error(f"forward {args.action} needs -t SPEC or -u SPEC")
        return ExitCode.USAGE
    try:
        answer = control.query(path, f"forward-{args.action}", args={"tcp": args.tcp, "udp": args.udp}
                               if args.action != "list" else None)
    except control.ControlError as exc:
        _error(str(exc) if isinstance(exc, control.ControlRefused) else f"{exc} (is shardswitch running?)")
        return ExitCode.RUNTIME
    if args.json:
        print(json.dumps(answer, indent=2, sort_keys=True))
        return ExitCode.OK
    for done, key in (("added", "added"), ("removed", "removed")):
        for rule in answer.get(key, []):
            print(f"{done}: {rule['option']} {rule['spec']}")
    if args.action == "list":
        print(format_rules(answer))
    return ExitCode.OK


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: sys.argv[1:]), run the sub-command and return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help, --version, usage errors
        return exc.code if isinstance(exc.code, int) else ExitCode.USAGE
    if args.print_capabilities:
        print(CAPABILITIES)
        return ExitCode.OK
    if args.command == "start":
        return _start(args)
    if args.command in ("status", "flows", "metrics"):
        return _query(args)
    if args.command == "capture":
        return _capture(args)
    if args.command == "forward":
        return _forward(args)
    if args.command == "repair-helper":
        from shardswitch.migration import repair

        setup_logging(False, False)
        return repair.helper_main(args.path, args.wait)
    parser.print_usage(sys.stderr)
    _error("a command is required (start, status, flows, metrics, capture, forward, repair-helper)")
    return ExitCode.USAGE
