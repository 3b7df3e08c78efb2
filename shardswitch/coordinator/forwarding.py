"""Port forwarding rules of a running switch: the -t/-u SPECs of its start, and those changed at run time.

Theory of operation
-------------------
A *rule* is one :class:`~shardswitch.portspec.Forward` of one protocol: host
ports on a listening address (and interface) going to guest ports, at the
guest's own address or at a target address inside it.  The coordinator owns
the table of rules (:class:`RuleTable`, no I/O) and, for each rule, one
listening socket per port per worker (SO_REUSEPORT: the kernel spreads the
clients over the workers), bound by the coordinator and kept for as long as
the rule lasts.  Each worker holds its own copies; a replacement worker is
forked with the sockets of the rules in force *then* (:attr:`WorkerPool.ports
<shardswitch.coordinator.workers.WorkerPool.ports>`), not those of the start.

``shardswitch forward add -t SPEC`` / ``remove`` (the control socket's
``forward-add`` / ``forward-remove`` requests, :class:`PortForwarding`)
change the table while the switch runs, as passt's pesto does with its
-c/--conf-path socket:

* add: every SPEC of the request is parsed (passt's syntax and rules), each
  target address is screened by the flow policy (the worker screens it again
  for every flow), the new rules must not conflict with each other or with
  the table (passt's test: matching listening addresses and overlapping
  ports), and the request must stay within :class:`Limit`; then every
  socket is bound (a port taken, or below 1024 once root is given up, refuses
  the request), and each worker is sent its sockets (:class:`ForwardAdd
  <shardswitch.ipc.ForwardAdd>`, a few descriptors per message) and must
  answer.  Only then is the table changed.  Any refusal before that point
  leaves nothing behind: sockets bound are closed, workers that took theirs
  are told to drop them (messages to a worker are handled in order, so even
  one that answers late ends without them), and the error says what was
  wrong.  A worker that died meanwhile is not waited for: its replacement is
  forked with the new table.
* remove: each SPEC must name rules of the table exactly (as passt: a SPEC
  that overlaps a rule without matching it is refused); the workers close
  their listeners (new clients are refused, established connections, which
  have sockets of their own, carry on; a UDP listener still carrying flows
  drains, see :mod:`shardswitch.worker.udp`), and the coordinator closes its
  copies.

Privileges: the rules of the start are bound before the coordinator gives up
root; a run-time rule is bound by a process without any capability (the
sandbox drops them all, CAP_NET_BIND_SERVICE included, and keeps none back),
so a port below ``net.ipv4.ip_unprivileged_port_start`` (1024 by default) is
refused with an error saying so (under ``--no-sandbox`` a switch started as
root keeps the right).  The settings file is never rewritten: run-time rules
last until the process exits.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Callable, Protocol

from shardswitch import portspec
from shardswitch.ipc import MAX_FDS, ForwardAdd, ForwardDone, ForwardRemove, PortFd, WorkerSetup
from shardswitch.net import inany
from shardswitch.net.drop import PacketError
from shardswitch.net.params import ParamsError, resolve
from shardswitch.worker.fwd import flow_policy
from shardswitch.worker.listen import bind_copies, describe
from shardswitch.worker.policy import FlowPolicy

log = logging.getLogger("shardswitch")

#: Where the kernel says which ports need CAP_NET_BIND_SERVICE.
UNPRIVILEGED_PORT_START = "/proc/sys/net/ipv4/ip_unprivileged_port_start"


class Proto(IntEnum):
    """The protocols of forwarding rules, valued as their socket types."""

    TCP = socket.SOCK_STREAM
    UDP = socket.SOCK_DGRAM

    @property
    def option(self) -> str:
        """``-t`` or ``-u``."""
        return "-t" if self == Proto.TCP else "-u"

    @property
    def key(self) -> str:
        """``tcp`` or ``udp`` (in requests and answers)."""
        return self.name.lower()


class Limit(IntEnum):
    """Bounds of what control clients may make the switch hold (a client may not grow it without end)."""

    #: Rules in the table (start-time ones included) beyond which an add is refused (passt: 255).
    MAX_RULES = 256
    #: SPECs in one request, and the length of one.
    MAX_SPECS = 16
    MAX_SPEC_LEN = 256
    #: Host ports one add may open (each is one socket per worker).
    MAX_NEW_PORTS = 1024
    #: Host ports of all rules added at run time together.
    MAX_RUNTIME_PORTS = 4096


class ForwardError(Exception):
    """A forwarding request refused: nothing changed."""


@dataclass
class Rule:
    """One forwarding rule and the listening sockets it holds."""

    ident: int
    proto: Proto
    fwd: portspec.Forward
    #: Added at run time (``shardswitch forward add``), else given at start.
    runtime: bool
    #: Per queue pair, the descriptions of its sockets (one per port bound).
    ports: list[list[PortFd]] = field(default_factory=list)
    #: Every socket of the rule (all pairs'), closed when it goes.
    sockets: list[socket.socket] = field(default_factory=list)

    @property
    def spec(self) -> str:
        """The rule in passt's SPEC syntax."""
        return portspec.format_forward(self.fwd)

    def close(self) -> None:
        """Close the coordinator's copies of its sockets."""
        for sock in self.sockets:
            sock.close()
        self.sockets = []

    def entry(self) -> dict[str, Any]:
        """The rule as ``shardswitch forward list --json`` shows it."""
        return {"rule": self.ident, "option": self.proto.option, "spec": self.spec,
                "origin": "run-time" if self.runtime else "start",
                "ports": len(self.ports[0]) if self.ports else 0}


class RuleTable:
    """The rules in force and the checks a change must pass (no I/O)."""

    def __init__(self) -> None:
        """No rule."""
        self.rules: list[Rule] = []
        self.next_ident = 1

    def new_rule(self, proto: Proto, fwd: portspec.Forward, runtime: bool) -> Rule:
        """A rule with a fresh number (not in the table yet)."""
        rule = Rule(self.next_ident, proto, fwd, runtime)
        self.next_ident += 1
        return rule

    def check_add(self, new: list[tuple[Proto, portspec.Forward]]) -> None:
        """Refuse (ForwardError) rules that conflict with each other or with the table, or break a limit."""
        if len(self.rules) + len(new) > Limit.MAX_RULES:
            raise ForwardError(f"too many forwarding rules: {len(self.rules)} in force, {len(new)} more asked, "
                               f"at most {int(Limit.MAX_RULES)}")
        ports = sum(fwd.last - fwd.first + 1 for _proto, fwd in new)
        if ports > Limit.MAX_NEW_PORTS:
            raise ForwardError(f"the request opens {ports} ports; at most {int(Limit.MAX_NEW_PORTS)} at once")
        held = sum(rule.fwd.last - rule.fwd.first + 1 for rule in self.rules if rule.runtime)
        if held + ports > Limit.MAX_RUNTIME_PORTS:
            raise ForwardError(f"rules added at run time would forward {held + ports} ports; at most "
                               f"{int(Limit.MAX_RUNTIME_PORTS)}")
        seen: list[tuple[Proto, portspec.Forward]] = [(rule.proto, rule.fwd) for rule in self.rules]
        for proto, fwd in new:
            for other_proto, other in seen:
                if other_proto == proto and fwd == other:
                    raise ForwardError(f"{proto.option} {portspec.format_forward(fwd)} is already in force")
                if other_proto == proto and portspec.conflicts(fwd, other):
                    raise ForwardError(f"{proto.option} {portspec.format_forward(fwd)} conflicts with "
                                       f"{proto.option} {portspec.format_forward(other)}")
            seen.append((proto, fwd))

    def find(self, gone: list[tuple[Proto, portspec.Forward]]) -> list[Rule]:
        """The rules ``gone`` names, each exactly (ForwardError when one is not in the table, or only
        overlaps a rule, as passt's fwd_rule_del)."""
        found: list[Rule] = []
        for proto, fwd in gone:
            rule = next((r for r in self.rules if r.proto == proto and r.fwd == fwd), None)
            if rule is None:
                near = next((r for r in self.rules if r.proto == proto and portspec.conflicts(r.fwd, fwd)), None)
                text = f"{proto.option} {portspec.format_forward(fwd)}"
                if near is not None:
                    raise ForwardError(f"{text} overlaps the rule {proto.option} {near.spec} without matching it; "
                                       "remove that rule as it is listed")
                raise ForwardError(f"no forwarding rule {text}")
            if rule not in found:
                found.append(rule)
        return found

    def per_pair(self, pair: int) -> tuple[tuple[PortFd, ...], tuple[PortFd, ...]]:
        """The TCP and UDP sockets of queue pair ``pair``, over every rule."""
        return (tuple(p for r in self.rules if r.proto == Proto.TCP for p in r.ports[pair]),
                tuple(p for r in self.rules if r.proto == Proto.UDP for p in r.ports[pair]))

    def listing(self) -> dict[str, Any]:
        """Every rule, by protocol (``shardswitch forward list``)."""
        return {proto.key: [r.entry() for r in self.rules if r.proto == proto] for proto in Proto}


class WorkerLink(Protocol):
    """What the forwarding needs of the worker pool (:class:`~shardswitch.coordinator.workers.WorkerPool`)."""

    count: int
    ports: list[tuple[tuple[PortFd, ...], tuple[PortFd, ...]]]

    def call(self, pair: int, message: object, fds: list[int] | tuple[int, ...] = (),
             timeout: float = ..., *, wait_posted: bool = True) -> object | None:
        """A request and its answer (None: none came)."""

    def send(self, pair: int, message: object, fds: list[int] | tuple[int, ...] = ()) -> bool:
        """A message sent without waiting."""

    def alive(self, pair: int) -> bool:
        """Whether ``pair``'s worker process runs."""


def read_unprivileged_start(path: str = UNPRIVILEGED_PORT_START) -> int:
    """The lowest port a process without CAP_NET_BIND_SERVICE may bind (1024 when unreadable)."""
    try:
        with open(path, encoding="ascii") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return 1024


def parse_request(request: dict[str, Any]) -> list[tuple[Proto, str]]:
    """The SPECs of a ``forward-add`` / ``forward-remove`` request (``{"tcp": [SPEC...], "udp": [...]}``),
    within :class:`Limit`; ForwardError for anything else."""
    specs: list[tuple[Proto, str]] = []
    for proto in Proto:
        given = request.get(proto.key, [])
        if not isinstance(given, list) or not all(isinstance(spec, str) for spec in given):
            raise ForwardError(f"bad request: {proto.key!r} must be a list of SPEC strings")
        specs += [(proto, spec) for spec in given]
    if not specs:
        raise ForwardError("no SPEC given (-t SPEC or -u SPEC)")
    if len(specs) > Limit.MAX_SPECS:
        raise ForwardError(f"{len(specs)} SPECs in one request; at most {int(Limit.MAX_SPECS)}")
    for _proto, spec in specs:
        if len(spec) > Limit.MAX_SPEC_LEN:
            raise ForwardError(f"SPEC longer than {int(Limit.MAX_SPEC_LEN)} characters: {spec[:40]!r}...")
    return specs


class PortForwarding:
    """The forwarding rules of a running switch and their sockets (see the module's theory of operation)."""

    def __init__(self, pool: WorkerLink, next_seq: Callable[[], int], policy: FlowPolicy | None = None) -> None:
        """Rules for the workers of ``pool`` (requests numbered by ``next_seq``); ``policy``: screens target
        addresses when a rule is added (None: not screened here)."""
        self.pool = pool
        self.next_seq = next_seq
        self.policy = policy
        self.table = RuleTable()
        #: Read now, before any sandbox hides /proc.
        self.ephemeral = portspec.read_ephemeral()
        self.unprivileged_start = read_unprivileged_start()
        #: Root was given up (the sandbox): ports below unprivileged_start cannot be bound any more.
        self.unprivileged = False
        #: Changes made and refused (``shardswitch status``, metrics).
        self.changes: Counter[str] = Counter()
        #: --freebind: listening addresses may be ones the host does not have (yet).
        self.freebind = False

    # -- start ------------------------------------------------------------------------------------

    def open_start(self, tcp: tuple[str, ...], udp: tuple[str, ...]) -> None:
        """Bind the rules of the -t and -u SPECs of the start (before privileges go).  A port that cannot
        be bound is logged and skipped, the others still work; ForwardError when a target is refused."""
        for proto, specs in ((Proto.TCP, tcp), (Proto.UDP, udp)):
            if not specs:
                continue
            for fwd in portspec.parse_all(specs, proto.option, self.ephemeral):
                self._screen(proto, fwd)
                rule = self.table.new_rule(proto, fwd, runtime=False)
                rule.ports = [[] for _ in range(self.pool.count)]
                for port in fwd.ports():
                    try:
                        self._bind_port(rule, port)
                    except OSError as err:
                        log.error("%s port %d: %s", proto.option, port, err.strerror)
                self.table.rules.append(rule)
        self._publish()

    # -- control requests -------------------------------------------------------------------------

    def request(self, action: str, request: dict[str, Any]) -> dict[str, Any]:
        """Answer a control request: ``list``, ``add`` or ``remove`` (an ``error`` answer when refused)."""
        if action == "list":
            return self.listing()
        try:
            specs = parse_request(request)
            answer = self.add(specs) if action == "add" else self.remove(specs)
        except ForwardError as err:
            self.changes["refused"] += 1
            log.warning("forward %s refused: %s", action, err)
            return {"error": f"forward {action}: {err}; nothing changed"}
        return answer

    def command(self, action: str) -> Callable[[dict[str, Any], list[int]], dict[str, Any]]:
        """The control socket's command for ``add`` or ``remove``: a request that carries no descriptor (any
        it carries is closed)."""
        def answer(request: dict[str, Any], fds: list[int]) -> dict[str, Any]:
            close_quietly(fds)
            return self.request(action, request)
        return answer

    def listing(self) -> dict[str, Any]:
        """The rules in force."""
        return self.table.listing()

    def _parse(self, specs: list[tuple[Proto, str]]) -> list[tuple[Proto, portspec.Forward]]:
        """Every rule of ``specs`` (ForwardError naming a bad SPEC and its bad part)."""
        parsed: list[tuple[Proto, portspec.Forward]] = []
        for proto, spec in specs:
            try:
                forwards = portspec.parse(spec, self.ephemeral)
            except portspec.PortSpecError as err:
                raise ForwardError(f"{proto.option}: {err}") from None
            if not forwards:
                raise ForwardError(f"{proto.option} {spec!r} names no port")
            parsed += [(proto, fwd) for fwd in forwards]
        return parsed

    def _screen(self, proto: Proto, fwd: portspec.Forward) -> None:
        """Refuse (ForwardError) a target address the flow policy would refuse for every flow."""
        if fwd.to_addr is None or self.policy is None:
            return
        try:
            self.policy.forward_target(inany.from_str(fwd.to_addr))
        except PacketError as err:
            raise ForwardError(f"{proto.option} {portspec.format_forward(fwd)}: the flow policy refuses the "
                               f"target {fwd.to_addr} ({err.reason.name}: {err.detail})") from None

    def add(self, specs: list[tuple[Proto, str]]) -> dict[str, Any]:
        """Add the rules of ``specs`` on every worker, or on none (ForwardError)."""
        new = self._parse(specs)
        for proto, fwd in new:
            self._screen(proto, fwd)
        self.table.check_add(new)
        rules = [self.table.new_rule(proto, fwd, runtime=True) for proto, fwd in new]
        try:
            for rule in rules:
                rule.ports = [[] for _ in range(self.pool.count)]
                for port in rule.fwd.ports():
                    self._bind_port(rule, port)
            self._hand_out(rules)
        except ForwardError:
            for rule in rules:
                rule.close()
            raise
        self.table.rules += rules
        self._publish()
        self.changes["added"] += len(rules)
        for rule in rules:
            log.info("forwarding rule added: %s %s", rule.proto.option, rule.spec)
        return {"added": [rule.entry() for rule in rules], **self.listing()}

    def remove(self, specs: list[tuple[Proto, str]]) -> dict[str, Any]:
        """Remove the rules ``specs`` name exactly (ForwardError when one is not in force)."""
        gone = self.table.find(self._parse(specs))
        for rule in gone:
            self.table.rules.remove(rule)
        self._publish()
        for proto in Proto:
            idents = [rule.ident for rule in gone if rule.proto == proto]
            if idents:
                self._tell_all(proto, idents)
        for rule in gone:
            rule.close()
            log.info("forwarding rule removed: %s %s", rule.proto.option, rule.spec)
        self.changes["removed"] += len(gone)
        return {"removed": [rule.entry() for rule in gone], **self.listing()}

    # -- sockets and workers ----------------------------------------------------------------------

    def _bind_port(self, rule: Rule, port: int) -> None:
        """One socket per worker for ``port`` of ``rule`` (OSError, or ForwardError at run time, when the
        kernel refuses)."""
        try:
            copies = bind_copies(rule.fwd, port, rule.proto, self.pool.count, self.freebind)
        except OSError as err:
            if not rule.runtime:
                raise
            why = err.strerror or str(err)
            if err.errno == errno.EACCES and port < self.unprivileged_start:
                why += (f": ports below {self.unprivileged_start} need CAP_NET_BIND_SERVICE, which the switch gave "
                        "up with root when it started" if self.unprivileged else
                        f": ports below {self.unprivileged_start} need CAP_NET_BIND_SERVICE")
                why += "; forward them at start (-t/-u in the command line or the settings file)"
            raise ForwardError(f"{rule.proto.option} {rule.spec}: port {port}: {why}") from None
        rule.sockets += copies
        for pair, sock in enumerate(copies):
            rule.ports[pair].append(describe(sock, rule.fwd, port, rule.ident))

    def _hand_out(self, rules: list[Rule]) -> None:
        """Send every live worker its sockets of ``rules`` and wait for each answer; ForwardError (every
        worker told to drop them again) when a live worker refuses or does not answer."""
        for pair in range(self.pool.count):
            for proto in Proto:
                ports = [desc for rule in rules if rule.proto == proto for desc in rule.ports[pair]]
                for start in range(0, len(ports), MAX_FDS):
                    batch = ports[start:start + MAX_FDS]
                    message = ForwardAdd(seq=self.next_seq(), tcp=proto == Proto.TCP, ports=batch)
                    answer = self.pool.call(pair, message, [desc.fd for desc in batch])
                    if isinstance(answer, ForwardDone) and not answer.error:
                        continue
                    if not self.pool.alive(pair):
                        break                  # its replacement is forked with the table as it will be
                    why = answer.error if isinstance(answer, ForwardDone) else "no answer"
                    self._withdraw(rules)
                    raise ForwardError(f"worker {pair} did not take the new listeners ({why})")

    def _withdraw(self, rules: list[Rule]) -> None:
        """Tell every worker to drop the sockets of ``rules`` it may have taken (not waiting: its messages
        are handled in order)."""
        for proto in Proto:
            idents = [rule.ident for rule in rules if rule.proto == proto]
            if idents:
                for pair in range(self.pool.count):
                    self.pool.send(pair, ForwardRemove(seq=self.next_seq(), tcp=proto == Proto.TCP, rules=idents))

    def _tell_all(self, proto: Proto, idents: list[int]) -> None:
        """Tell every worker to close its listeners of rules ``idents`` and wait for its answer (one that
        does not answer is logged: it handles the message when it gets to it)."""
        for pair in range(self.pool.count):
            message = ForwardRemove(seq=self.next_seq(), tcp=proto == Proto.TCP, rules=idents)
            answer = self.pool.call(pair, message)
            if not isinstance(answer, ForwardDone) and self.pool.alive(pair):
                log.warning("worker %d did not confirm a forwarding change; it applies it when it can", pair)

    def _publish(self) -> None:
        """What a worker forked from now on gets: the sockets of the rules in force."""
        for pair in range(self.pool.count):
            self.pool.ports[pair] = self.table.per_pair(pair)

    # -- status -----------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Rules and ports by protocol, and the changes made (``shardswitch status``)."""
        rules = self.table.rules
        return {"rules": {p.key: sum(1 for r in rules if r.proto == p) for p in Proto},
                "runtime_rules": sum(1 for r in rules if r.runtime),
                "ports": {p.key: sum(len(r.ports[0]) for r in rules if r.proto == p and r.ports) for p in Proto},
                "changes": {name: self.changes[name] for name in ("added", "removed", "refused")}}

    def close(self) -> None:
        """Close every rule's sockets (the switch stops)."""
        for rule in self.table.rules:
            rule.close()


def format_rules(answer: dict[str, Any]) -> str:
    """``shardswitch forward list``: one ``-t SPEC`` / ``-u SPEC`` line per rule, run-time ones marked."""
    lines = [f"{rule['option']} {rule['spec']}" + ("    # added at run time" if rule.get("origin") == "run-time"
                                                   else "")
             for key in ("tcp", "udp") for rule in answer.get(key, [])]
    return "\n".join(lines) if lines else "no forwarding rules"


def target_policy(setup: WorkerSetup) -> FlowPolicy | None:
    """The workers' flow policy, to screen forwarding rules' target addresses when they are added (None:
    the guest's parameters do not resolve; the workers screen every flow anyway)."""
    try:
        return flow_policy(setup.forward, resolve(setup.params))
    except ParamsError:
        return None


def close_quietly(fds: Iterable[int]) -> None:
    """Close descriptors a request should not have carried."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
