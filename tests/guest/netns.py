"""Private network namespaces for tests: a "host" joined to an "upstream" by veth.

Theory of operation
-------------------
Every test that moves real packets runs shardswitch (and QEMU, or testpmd) in a
namespace of its own, so nothing a guest sends can leave the machine:

    [host ns  NAME]   uplink0 10.200.Y.2/24      --veth-- downlink0 10.200.Y.1/24   [upstream ns NAME-up]
                              2001:db8:Y::2/64                2001:db8:Y::1/64, fe80::1
                      default via 10.200.Y.1
                      default via fe80::1 (IPv6)

For a migration between two hosts, :meth:`TestNetns.add_twin` adds a second
host namespace ``NAME-b`` that is the first one's twin (same interface, MAC,
addresses and routes: the guest's addresses move with it, as passt requires)
and puts a bridge ``br0`` in the upstream namespace, holding the upstream's
addresses and a server address (``server_addr``); only one twin is on the
bridge at a time, :meth:`TestNetns.move_to_twin` swaps them, as a network
does when a host's address moves to another machine.

The host namespace looks like a users' host: dual-stack, an interface with
addresses and default routes for the back-end to mirror to the guest (the
IPv6 router link-local, as routers advertise themselves), and a resolv.conf
naming a stub resolver on 127.0.0.53, as systemd-resolved hosts have (a test
that needs DNS runs dnsmasq there).  The upstream namespace plays the router
and can hold servers a test starts.  Y is drawn at random per
instance (the namespaces are isolated, so equal Y in two instances is harmless;
drawing it only makes logs easier to tell apart).  Names are ``ss-<pid>-<hex>``
(and ``...-up``); namespaces left behind by a test process that died without
tearing down (SIGKILL) are removed by the next :meth:`TestNetns.create`, which
recognises them by the dead PID in their name.

All set-up uses iproute2 (``ip -n NS ...``); the veth pair is created directly
inside the two namespaces, so nothing ever appears in the root namespace.
``/etc/netns/NAME/resolv.conf`` (``nameserver 127.0.0.53``) is bind-mounted
over /etc/resolv.conf by ``ip netns exec``, so DNS lookups inside point at a
server the test runs on loopback.  IPv6 addresses are added without duplicate
address detection (``nodad``), so they are usable at once.  The sysctl ``net.ipv4.ping_group_range`` is opened
in the host namespace for unprivileged ICMP echo sockets.

Processes started with :meth:`TestNetns.popen` are remembered and, at
teardown, stopped by PID (SIGTERM, then SIGKILL); no other process is touched.
Teardown is idempotent, best-effort, and runs from ``__exit__``, so a failing
test still leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
from pathlib import Path
from types import TracebackType
from typing import Any, Sequence

NETNS_RUN_DIR = Path("/run/netns")
NETNS_ETC_DIR = Path("/etc/netns")
PREFIX = "ss"
_OWN_NAME = re.compile(rf"^{PREFIX}-(?P<pid>\d+)-[0-9a-f]{{4}}(?:-up|-b)?$")
_IP_TIMEOUT_S = 30.0


class NetnsError(Exception):
    """Creating or using a test namespace failed."""


def stop_process(proc: subprocess.Popen[Any], grace: float = 5.0) -> int | None:
    """Stop ``proc`` by PID: SIGTERM, wait ``grace`` seconds, then SIGKILL.

    A process that already exited (and was reaped) is left alone.  Returns the
    exit status, or None if even SIGKILL did not reap it within 10 s.
    """
    if proc.poll() is not None:
        return proc.returncode
    try:
        proc.send_signal(signal.SIGTERM)
        return proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    proc.kill()
    try:
        return proc.wait(timeout=10.0)
    except subprocess.TimeoutExpired:
        return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``ip ARGS``; a failure with ``check`` raises NetnsError with ip's message."""
    try:
        done = subprocess.run(["ip", *args], capture_output=True, text=True,
                              timeout=_IP_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetnsError(f"ip {' '.join(args)}: {exc}") from exc
    if check and done.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)} failed: {done.stderr.strip()}")
    return done


def _pid_alive(pid: int) -> bool:
    """Whether a process with this PID exists (signal 0 probe)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def list_namespaces() -> list[str]:
    """Names of all named network namespaces (``ip netns list``)."""
    return [line.split()[0] for line in _ip("netns", "list").stdout.splitlines() if line.strip()]


def remove_stale_namespaces() -> list[str]:
    """Delete namespaces (and /etc/netns dirs) of ours whose creating process is gone."""
    removed = []
    candidates = set(list_namespaces())
    if NETNS_ETC_DIR.is_dir():
        candidates.update(p.name for p in NETNS_ETC_DIR.iterdir())
    for name in sorted(candidates):
        m = _OWN_NAME.match(name)
        if m is None or _pid_alive(int(m["pid"])):
            continue
        _ip("netns", "del", name, check=False)
        shutil.rmtree(NETNS_ETC_DIR / name, ignore_errors=True)
        removed.append(name)
    return removed


class TestNetns:
    """A host + upstream namespace pair with a veth link; a context manager.

    Attributes (valid after construction): ``name`` / ``upstream_name``
    (namespace names), ``host_if`` / ``upstream_if`` (veth ends),
    ``host_addr`` / ``upstream_addr`` (IPv4, no prefix), ``prefixlen``, ``host_addr6`` /
    ``upstream_addr6`` (IPv6, no prefix; /64), ``router6`` (the host's IPv6 gateway, link-local),
    ``stub_resolver`` (the address resolv.conf names).
    """

    __test__ = False  # not a pytest test class despite the name

    def __init__(self, host_if: str = "uplink0", upstream_if: str = "downlink0") -> None:
        """Choose names and addresses; nothing is created before :meth:`create`."""
        self.name = f"{PREFIX}-{os.getpid()}-{secrets.token_hex(2)}"
        self.upstream_name = f"{self.name}-up"
        self.host_if = host_if
        self.upstream_if = upstream_if
        subnet = 1 + secrets.randbelow(254)
        self.host_addr = f"10.200.{subnet}.2"
        self.upstream_addr = f"10.200.{subnet}.1"
        self.prefixlen = 24
        self.host_addr6 = f"2001:db8:{subnet:x}::2"
        self.upstream_addr6 = f"2001:db8:{subnet:x}::1"
        self.prefix6 = f"2001:db8:{subnet:x}::"
        self.router6 = "fe80::1"
        self.stub_resolver = "127.0.0.53"
        self.server_addr = f"10.200.{subnet}.100"
        self.twin_name = f"{self.name}-b"
        self._procs: list[subprocess.Popen[Any]] = []
        self._created: list[str] = []

    @property
    def resolv_conf(self) -> Path:
        """The resolv.conf ``ip netns exec`` shows inside the host namespace."""
        return NETNS_ETC_DIR / self.name / "resolv.conf"

    def create(self) -> None:
        """Create both namespaces, the veth link, addresses, routes and sysctls.

        On any failure everything created so far is removed before NetnsError propagates.
        """
        remove_stale_namespaces()
        try:
            self._create()
        except BaseException:
            self.close()
            raise

    def _create(self) -> None:
        """The creation steps proper (see :meth:`create`)."""
        h, u = self.name, self.upstream_name
        for ns in (h, u):
            _ip("netns", "add", ns)
            self._created.append(ns)
        self.resolv_conf.parent.mkdir(parents=True, exist_ok=True)
        self.resolv_conf.write_text(f"nameserver {self.stub_resolver}\n")
        _ip("-n", h, "link", "add", self.host_if, "type", "veth",
            "peer", "name", self.upstream_if, "netns", u)
        _ip("-n", h, "addr", "add", f"{self.host_addr}/{self.prefixlen}", "dev", self.host_if)
        _ip("-n", u, "addr", "add", f"{self.upstream_addr}/{self.prefixlen}", "dev", self.upstream_if)
        _ip("-n", h, "addr", "add", f"{self.host_addr6}/64", "dev", self.host_if, "nodad")
        _ip("-n", u, "addr", "add", f"{self.upstream_addr6}/64", "dev", self.upstream_if, "nodad")
        _ip("-n", u, "addr", "add", f"{self.router6}/64", "dev", self.upstream_if, "nodad")
        for ns, ifname in ((h, self.host_if), (u, self.upstream_if)):
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "link", "set", ifname, "up")
        _ip("-n", h, "route", "add", "default", "via", self.upstream_addr)
        _ip("-n", h, "-6", "route", "add", "default", "via", self.router6, "dev", self.host_if)
        self.run(["sysctl", "-q", "-w", "net.ipv4.ping_group_range=0 2147483647"])

    def add_twin(self) -> None:
        """The twin host namespace and the upstream's bridge (see the module's docstring); the twin is not on
        the bridge yet."""
        h, u, t = self.name, self.upstream_name, self.twin_name
        _ip("-n", u, "link", "add", "br0", "type", "bridge")
        for addr in (f"{self.upstream_addr}/{self.prefixlen}", f"{self.upstream_addr6}/64", f"{self.router6}/64"):
            _ip("-n", u, "addr", "del", addr, "dev", self.upstream_if)
        for addr in (f"{self.upstream_addr}/{self.prefixlen}", f"{self.server_addr}/{self.prefixlen}"):
            _ip("-n", u, "addr", "add", addr, "dev", "br0")
        for addr in (f"{self.upstream_addr6}/64", f"{self.router6}/64"):
            _ip("-n", u, "addr", "add", addr, "dev", "br0", "nodad")
        _ip("-n", u, "link", "set", self.upstream_if, "master", "br0")
        _ip("-n", u, "link", "set", "br0", "up")
        _ip("netns", "add", t)
        self._created.append(t)
        (NETNS_ETC_DIR / t).mkdir(parents=True, exist_ok=True)
        (NETNS_ETC_DIR / t / "resolv.conf").write_text(f"nameserver {self.stub_resolver}\n")
        mac = _ip("-n", h, "-j", "link", "show", self.host_if).stdout
        _ip("-n", t, "link", "add", self.host_if, "type", "veth", "peer", "name", "downlink1", "netns", u)
        _ip("-n", t, "link", "set", self.host_if, "address", json.loads(mac)[0]["address"])
        _ip("-n", t, "addr", "add", f"{self.host_addr}/{self.prefixlen}", "dev", self.host_if)
        _ip("-n", t, "addr", "add", f"{self.host_addr6}/64", "dev", self.host_if, "nodad")
        for ns, ifname in ((t, "lo"), (t, self.host_if), (u, "downlink1")):
            _ip("-n", ns, "link", "set", ifname, "up")
        _ip("-n", t, "route", "add", "default", "via", self.upstream_addr)
        _ip("-n", t, "-6", "route", "add", "default", "via", self.router6, "dev", self.host_if)
        subprocess.run(["ip", "netns", "exec", t, "sysctl", "-q", "-w", "net.ipv4.ping_group_range=0 2147483647"],
                       check=True, timeout=_IP_TIMEOUT_S)

    def move_to_twin(self) -> None:
        """The upstream now reaches the host's addresses on the twin, no longer on this host."""
        _ip("-n", self.upstream_name, "link", "set", self.upstream_if, "nomaster")
        _ip("-n", self.upstream_name, "link", "set", "downlink1", "master", "br0")

    def exec_argv(self, argv: Sequence[str], *, upstream: bool = False, twin: bool = False) -> list[str]:
        """``argv`` prefixed to run inside the host (or upstream, or twin) namespace."""
        ns = self.upstream_name if upstream else self.twin_name if twin else self.name
        return ["ip", "netns", "exec", ns, *argv]

    def popen(self, argv: Sequence[str], *, upstream: bool = False,
              **popen_kw: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` inside the namespace; it is stopped by PID at teardown.

        ``ip netns exec`` execs the command in place, so the PID is the command's.
        """
        if not self._created:
            raise NetnsError(f"namespace {self.name} is not created")
        proc: subprocess.Popen[Any] = subprocess.Popen(self.exec_argv(argv, upstream=upstream),
                                                       **popen_kw)
        self._procs.append(proc)
        return proc

    def run(self, argv: Sequence[str], *, upstream: bool = False, check: bool = True,
            timeout: float = 60.0, **popen_kw: Any) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside the namespace to completion and return its result.

        Output is captured as text unless ``popen_kw`` says otherwise; a non-zero exit
        with ``check`` raises NetnsError carrying the command's output.
        """
        if not self._created:
            raise NetnsError(f"namespace {self.name} is not created")
        if not {"stdout", "stderr", "capture_output"} & popen_kw.keys():
            popen_kw["capture_output"] = True
        popen_kw.setdefault("text", True)
        done: subprocess.CompletedProcess[str] = subprocess.run(
            self.exec_argv(argv, upstream=upstream), timeout=timeout, check=False, **popen_kw)
        if check and done.returncode != 0:
            raise NetnsError(f"{' '.join(argv)} in {self.name} exited {done.returncode}: "
                             f"{done.stdout or ''}{done.stderr or ''}")
        return done

    def close(self) -> None:
        """Stop the processes we started, delete both namespaces and the resolv.conf dir.

        Idempotent; every step runs even when an earlier one fails.
        """
        while self._procs:
            stop_process(self._procs.pop())
        while self._created:
            _ip("netns", "del", self._created.pop(), check=False)
        shutil.rmtree(NETNS_ETC_DIR / self.name, ignore_errors=True)
        shutil.rmtree(NETNS_ETC_DIR / self.twin_name, ignore_errors=True)

    def __enter__(self) -> TestNetns:
        """Create the namespaces."""
        self.create()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        """Tear everything down, whatever happened in the block."""
        self.close()
