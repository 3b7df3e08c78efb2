#!/usr/bin/env python3
"""Container entrypoint: map SHARDSWITCH_* environment variables to options and exec shardswitch.

Theory of operation
-------------------
The container runs ``shardswitch start`` in the foreground.  Settings come
from environment variables (convenient in compose files and Kubernetes pod
specs), turned into command-line options by :func:`environ_to_argv`; the
container's own arguments are appended after them, so for single-valued
options an argument overrides the variable (argparse keeps the last value),
while ``--dns``/``--search`` accumulate, and ``-a``/``-n``/``-g`` take one
value per IP family (given twice for one family, shardswitch refuses).  The process then *replaces itself*
with shardswitch (``os.execvp``), so shardswitch gets the container's PID and
receives SIGTERM from ``podman stop`` / ``docker stop`` directly; the
coordinator handles SIGTERM (as PID 1 a process has no default signal
actions, so without its handler SIGTERM would be ignored).

Variables (an empty value counts as unset):

===========================  =========================================
SHARDSWITCH_WORKERS          ``--workers N``
SHARDSWITCH_SOCKET           ``--socket PATH``
SHARDSWITCH_CONNECT          ``--connect PATH``
SHARDSWITCH_CONTROL          ``--control PATH``
SHARDSWITCH_CONFIG           ``--config FILE`` (TOML)
SHARDSWITCH_ADDRESS          ``-a ADDR`` per entry (one IPv4, one IPv6)
SHARDSWITCH_NETMASK          ``-n PREFIX`` per entry (length or dotted netmask)
SHARDSWITCH_GATEWAY          ``-g GW`` per entry (one IPv4, one IPv6)
SHARDSWITCH_MAC              ``-M MAC``
SHARDSWITCH_MTU              ``-m MTU``
SHARDSWITCH_INTERFACE        ``-i IFACE``
SHARDSWITCH_DNS              ``--dns ADDR`` per comma/space-separated entry
SHARDSWITCH_SEARCH           ``--search DOMAIN`` per comma/space-separated entry
SHARDSWITCH_METRICS          ``--metrics ADDR:PORT`` (Prometheus)
SHARDSWITCH_PCAP             ``--pcap FILE``
SHARDSWITCH_LOG_FILE         ``--log-file FILE``
SHARDSWITCH_DEBUG            ``-d`` when true (1, true, yes, on)
SHARDSWITCH_QUIET            ``-q`` when true
===========================  =========================================

Container arguments select what runs (:func:`build_command`): none or
options only -> ``shardswitch start`` with the variables; ``start ...`` ->
the same; ``status ...`` -> ``shardswitch status`` with ``--control`` from
SHARDSWITCH_CONTROL or SHARDSWITCH_SOCKET + ".ctl" (usable as a health
check); ``--print-capabilities``/``--version``/``--help`` -> passed to
shardswitch as they are; anything else (``sh``) is executed as given.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Final

PROGRAM: Final = "shardswitch"
PREFIX: Final = "SHARDSWITCH_"
CONTROL_SUFFIX: Final = ".ctl"
USAGE_ERROR: Final = 2

#: Variables holding one value: suffix -> option.
SINGLE: Final = (
    ("WORKERS", "--workers"),
    ("SOCKET", "--socket"),
    ("CONNECT", "--connect"),
    ("CONTROL", "--control"),
    ("CONFIG", "--config"),
    ("MAC", "-M"),
    ("MTU", "-m"),
    ("INTERFACE", "-i"),
    ("METRICS", "--metrics"),
    ("PCAP", "--pcap"),
    ("LOG_FILE", "--log-file"),
)
#: Variables holding a comma- or space-separated list: suffix -> repeated option.
LISTS: Final = (("ADDRESS", "-a"), ("NETMASK", "-n"), ("GATEWAY", "-g"), ("DNS", "--dns"), ("SEARCH", "--search"))
#: Boolean variables: suffix -> flag.
FLAGS: Final = (("DEBUG", "-d"), ("QUIET", "-q"))

TRUE_WORDS: Final = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS: Final = frozenset({"0", "false", "no", "off"})
PASSTHROUGH: Final = frozenset({"--print-capabilities", "--version", "-h", "--help"})
_LIST_SPLIT: Final = re.compile(r"[,\s]+")


class EntrypointError(Exception):
    """An environment variable has a value that cannot be mapped."""


def _value(environ: Mapping[str, str], suffix: str) -> str | None:
    """Return the stripped value of SHARDSWITCH_<suffix>, or None when unset or empty."""
    value = environ.get(PREFIX + suffix, "").strip()
    return value or None


def parse_bool(name: str, value: str) -> bool:
    """Parse a boolean variable's value; raise EntrypointError for anything unrecognised."""
    word = value.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS or not word:
        return False
    raise EntrypointError(f"{name}={value!r}: expected one of "
                          f"{', '.join(sorted(TRUE_WORDS | FALSE_WORDS))}")


def environ_to_argv(environ: Mapping[str, str]) -> list[str]:
    """Return the ``shardswitch start`` options that the SHARDSWITCH_* variables ask for."""
    argv: list[str] = []
    for suffix, option in SINGLE:
        value = _value(environ, suffix)
        if value is not None:
            argv += [option, value]
    for suffix, option in LISTS:
        value = _value(environ, suffix)
        for item in _LIST_SPLIT.split(value or ""):
            if item:
                argv += [option, item]
    for suffix, option in FLAGS:
        value = _value(environ, suffix)
        if value is not None and parse_bool(PREFIX + suffix, value):
            argv.append(option)
    return argv


def status_argv(environ: Mapping[str, str]) -> list[str]:
    """Return the ``shardswitch status`` options locating the control socket, if configured."""
    control = _value(environ, "CONTROL")
    socket_path = _value(environ, "SOCKET")
    if control is None and socket_path is not None:
        control = socket_path + CONTROL_SUFFIX
    return ["--control", control] if control is not None else []


def build_command(args: Sequence[str], environ: Mapping[str, str]) -> list[str]:
    """Return the full command to exec for container arguments ``args``."""
    if not args or (args[0].startswith("-") and args[0] not in PASSTHROUGH):
        return [PROGRAM, "start", *environ_to_argv(environ), *args]
    head, rest = args[0], list(args[1:])
    if head == "start":
        return [PROGRAM, "start", *environ_to_argv(environ), *rest]
    if head == "status":
        return [PROGRAM, "status", *status_argv(environ), *rest]
    if head in PASSTHROUGH:
        return [PROGRAM, *args]
    return list(args)


def main(argv: Sequence[str] | None = None) -> int:
    """Build the command from the environment and arguments and exec it (returns only on error)."""
    args = sys.argv[1:] if argv is None else argv
    try:
        command = build_command(args, os.environ)
    except EntrypointError as exc:
        print(f"shardswitch-entrypoint: error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    try:
        os.execvp(command[0], command)
    except OSError as exc:
        print(f"shardswitch-entrypoint: cannot run {command[0]}: {exc.strerror or exc}",
              file=sys.stderr)
    return 127


if __name__ == "__main__":
    sys.exit(main())
