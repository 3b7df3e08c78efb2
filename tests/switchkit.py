"""Shared checks for tests that drive a real shardswitch process with the Python front-end.

Theory of operation: a robustness test starts a real switch
(:class:`tests.switch.Switch`, in its own network namespace), records a
:class:`Baseline` while no front-end is connected (coordinator PID, worker
PIDs, the coordinator's open descriptors), abuses the switch through a
:class:`~shardswitch.frontend.client.VhostUserFrontend`, and finally calls
:func:`assert_recovered`: the same coordinator (same PID) with the same
workers (unless the test replaced one on purpose) must serve a NEW,
well-behaved front-end - full handshake, an ARP reply on every queue pair -
and, once that front-end has gone, hold no descriptor and no guest-memory
mapping it did not hold before.

The ARP exchange is the cheapest end-to-end proof that a queue pair works:
the request crosses the TX ring, the worker's endpoint answers it, and the
reply crosses the RX ring.  Frames are built by the independent helpers of
:mod:`tests.net.net_testlib`, never by the code under test.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

from shardswitch.coordinator.migration import REPLY_USE_YOUR_FD
from shardswitch.frontend.client import BASE_PROTOCOL_FEATURES, VhostUserFrontend
from shardswitch.vhost.wire import ProtocolFeature, Request, TransferDirection, TransferPhase
from tests.guest.netns import TestNetns
from tests.net.net_testlib import GUEST_MAC, arp_frame, decode_arp_frame, ip
from tests.switch import Switch

#: The addressing tests.switch.DEFAULT_ADDRESSING gives the guest.
GUEST_IP = "10.0.2.15"
GATEWAY_IP = "10.0.2.2"
#: The memfd name of the test front-end's guest RAM, as it appears in /proc/PID/maps.
GUEST_RAM_NAME = "shardswitch-guest-ram"

T = TypeVar("T")

#: The user a root-started switch becomes by default.
NOBODY = 65534


def in_child(action: Callable[[], object], uid: int | None = None) -> object:
    """Run ``action`` in a forked child (as ``uid``, its group the same number, if given) and return what it
    returned (JSON through a pipe); an exception in the child fails the calling test with its text."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            if uid is not None:
                os.setgroups([])
                os.setresgid(uid, uid, uid)
                os.setresuid(uid, uid, uid)
            result: object = {"ok": action()}
        except Exception as err:  # noqa: BLE001 - reported to the parent
            result = {"error": f"{type(err).__name__}: {err}"}
        os.write(w, json.dumps(result).encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    _pid, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    answer = json.loads(data)
    if "error" in answer:
        raise AssertionError(answer["error"])
    return answer["ok"]


def wait_until(probe: Callable[[], T | None], what: str, timeout: float = 3.0, interval: float = 0.02) -> T:
    """Call ``probe`` until it returns something truthy; return that, or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {value!r})")
        time.sleep(interval)


def arp_request(sender_ip: str = GUEST_IP, target_ip: str = GATEWAY_IP) -> bytes:
    """A broadcast ARP who-has for ``target_ip`` from the guest."""
    return arp_frame(1, GUEST_MAC, ip(sender_ip), bytes(6), ip(target_ip))


def check_arp_reply(frame: bytes) -> None:
    """Assert that ``frame`` is the gateway's ARP reply to the guest."""
    reply = decode_arp_frame(frame)
    assert reply.op == 2, reply
    assert (reply.spa, reply.tpa, reply.tha, reply.eth_dst) == (ip(GATEWAY_IP), ip(GUEST_IP), GUEST_MAC,
                                                                 GUEST_MAC), reply


def arp_roundtrip(fe: VhostUserFrontend, pair: int, timeout: float = 2.0) -> None:
    """Post one RX buffer, send an ARP request on ``pair`` and check the reply comes back on it (posting
    one more buffer for each ignored frame, a periodic router advertisement, that took one)."""
    fe.post_rx(pair, 1)
    fe.send_frame(pair, arp_request())
    ignored = fe.ignored
    frames = fe.recv_frames(pair, timeout)
    while not frames and fe.ignored > ignored:
        fe.post_rx(pair, fe.ignored - ignored)
        ignored = fe.ignored
        frames = fe.recv_frames(pair, timeout)
    assert len(frames) == 1, f"pair {pair}: expected one ARP reply, got {len(frames)} frames"
    check_arp_reply(frames[0])


def worker_pids(status: dict[str, Any]) -> list[int]:
    """The worker PID of every queue pair, in pair order."""
    return [int(w["pid"]) for w in status["workers"]]


def ring_status(status: dict[str, Any], index: int) -> dict[str, Any]:
    """The worker's view of vring ``index``."""
    ring: dict[str, Any] = status["workers"][index // 2]["rings"][index % 2]
    assert ring["index"] == index
    return ring


def drops(status: dict[str, Any], pair: int) -> Counter[str]:
    """The drop counters of ``pair``'s worker."""
    return Counter(status["workers"][pair].get("drops") or {})


def events(status: dict[str, Any], pair: int) -> Counter[str]:
    """The event counters of ``pair``'s worker (what lost no frame: a broken ring, an ICMP error relayed)."""
    return Counter(status["workers"][pair].get("events") or {})


def open_fds(pid: int) -> int:
    """How many descriptors process ``pid`` holds."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def settled_fds(pid: int, samples: int = 4, interval: float = 0.01) -> int:
    """The coordinator's descriptor count without transient ones.

    A status query briefly adds the accepted control connection, which the
    coordinator closes only after the client has its answer: the smallest of
    a few samples is the idle count.
    """
    counts = []
    for _ in range(samples):
        counts.append(open_fds(pid))
        time.sleep(interval)
    return min(counts)


def maps_guest_ram(pid: int) -> bool:
    """True while process ``pid`` still maps the test front-end's guest RAM."""
    with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as maps:
        return any(GUEST_RAM_NAME in line for line in maps)


def wait_status(switch: Switch, check: Callable[[dict[str, Any]], bool], what: str,
                timeout: float = 3.0) -> dict[str, Any]:
    """Query the status until ``check`` accepts it; return that status."""
    def probe() -> dict[str, Any] | None:
        """The status if ``check`` accepts it."""
        status = switch.status()
        return status if check(status) else None

    return wait_until(probe, what, timeout)


def wait_idle(switch: Switch, timeout: float = 3.0) -> dict[str, Any]:
    """Wait until the switch has processed the front-end's departure; return its status."""
    return wait_status(switch, lambda s: not s["frontend"]["connected"], "the front-end to be gone", timeout)


@dataclass(frozen=True)
class Baseline:
    """What an idle switch looks like before a test abuses it."""

    pid: int
    worker_pids: list[int]
    fds: int


def baseline(switch: Switch) -> Baseline:
    """Record the idle switch's PIDs and descriptor count."""
    status = wait_idle(switch)
    assert status["pid"] == switch.pid, "the status must come from the process the test started"
    return Baseline(switch.pid, worker_pids(status), settled_fds(switch.pid))


def serve_fresh_frontend(switch: Switch, pairs: int) -> None:
    """A new well-behaved front-end: full handshake, then an ARP reply on every pair."""
    with VhostUserFrontend.connect(switch.socket, queue_pairs=pairs, ignore=is_periodic_ra) as fe:
        fe.handshake()
        for pair in range(pairs):
            arp_roundtrip(fe, pair)


def assert_recovered(switch: Switch, before: Baseline, *, replaced: frozenset[int] = frozenset()) -> None:
    """The same switch serves a new front-end on every pair and leaks nothing.

    Worker PIDs must be unchanged except for the pairs in ``replaced``, whose
    workers the test killed and which must have been replaced.
    """
    assert switch.alive(), f"shardswitch died:\n{switch.log()[-3000:]}"
    status = wait_idle(switch)
    assert status["pid"] == before.pid
    pids = worker_pids(status)
    for pair, (old, new) in enumerate(zip(before.worker_pids, pids)):
        assert (old != new) == (pair in replaced), f"pair {pair}: worker pid {old} -> {new}"
    serve_fresh_frontend(switch, len(pids))
    status = wait_idle(switch)
    assert worker_pids(status) == pids, "a worker changed while serving a well-behaved front-end"
    assert switch.alive() and status["pid"] == before.pid
    wait_until(lambda: settled_fds(before.pid) == before.fds,
               f"the coordinator to hold its {before.fds} idle descriptors again", timeout=2.0)
    for pid in [before.pid, *pids]:
        wait_until(lambda: not maps_guest_ram(pid), f"process {pid} to unmap guest memory", timeout=2.0)


#: Ethernet destination, EtherType, IPv6 next header and ICMPv6 type of a router advertisement to all-nodes.
_ALL_NODES_MAC = bytes.fromhex("333300000001")
_IPV6, _ICMPV6, _RA = b"\x86\xdd", 58, 134


def is_periodic_ra(frame: bytes) -> bool:
    """Whether ``frame`` is a router advertisement to all-nodes (what worker 0 sends unsolicited)."""
    return (frame[:6] == _ALL_NODES_MAC and frame[12:14] == _IPV6 and len(frame) > 54
            and frame[20] == _ICMPV6 and frame[54] == _RA)


def ready_frontend(switch: Switch, *, pairs: int = 2, rx: int = 64, features: int | None = None,
                   keep_ra: bool = False) -> VhostUserFrontend:
    """A front-end that completed the handshake (with exactly ``features`` when given) and posted ``rx``
    RX buffers on each of its ``pairs`` queue pairs; the caller closes it (``with``).  Periodic router
    advertisements, which may arrive at any time, are left out of what it receives unless ``keep_ra``."""
    kw: dict[str, Any] = {"queue_pairs": pairs}
    if features is not None:
        kw["features"] = features
    fe = VhostUserFrontend.connect(switch.socket, ignore=None if keep_ra else is_periodic_ra, **kw)
    try:
        fe.handshake()
        if features is not None:
            assert fe.negotiated_features == features
        for pair in range(pairs):
            fe.post_rx(pair, rx)
    except BaseException:
        fe.close()
        raise
    return fe


def start_server(netns: TestNetns, script: str, *args: str) -> subprocess.Popen[bytes]:
    """Run a Python server ``script`` in ``netns``; returns once it printed its ``ready`` line."""
    server = netns.popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE)
    assert server.stdout is not None and server.stdout.readline().strip() == b"ready", "server did not start"
    return server


# -- live migration: the device state through a front-end ------------------------------

#: Protocol features with DEVICE_STATE (SET_DEVICE_STATE_FD, CHECK_DEVICE_STATE).
STATE_FEATURES = int(BASE_PROTOCOL_FEATURES | ProtocolFeature.DEVICE_STATE)


def set_state_fd(fe: VhostUserFrontend, direction: int, fd: int, phase: int = TransferPhase.STOPPED) -> int:
    """SET_DEVICE_STATE_FD with ``fd``: the back-end's u64 answer."""
    reply = fe.request(Request.SET_DEVICE_STATE_FD, struct.pack("<II", direction, phase), [fd])
    assert reply is not None
    return int(struct.unpack("<Q", reply)[0])


def check_state(fe: VhostUserFrontend) -> int:
    """CHECK_DEVICE_STATE's answer (0: the transfer succeeded)."""
    reply = fe.request(Request.CHECK_DEVICE_STATE)
    assert reply is not None
    return int(struct.unpack("<Q", reply)[0])


def save_state(fe: VhostUserFrontend) -> bytes:
    """The switch's document, read from the pipe as QEMU does, and checked."""
    read_end, write_end = os.pipe()
    try:
        assert set_state_fd(fe, TransferDirection.SAVE, write_end) == REPLY_USE_YOUR_FD
        os.close(write_end)
        write_end = -1
        chunks = []
        while chunk := os.read(read_end, 1 << 16):
            chunks.append(chunk)
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)
    assert check_state(fe) == 0
    return b"".join(chunks)


def load_state(fe: VhostUserFrontend, document: bytes) -> int:
    """Write ``document`` into the pipe of a LOAD (from a thread: it may exceed the pipe's buffer), close our
    end, and answer CHECK_DEVICE_STATE."""
    read_end, write_end = os.pipe()
    try:
        assert set_state_fd(fe, TransferDirection.LOAD, read_end) == REPLY_USE_YOUR_FD
    finally:
        os.close(read_end)

    def write_all() -> None:
        try:
            view = memoryview(document)
            while view:
                view = view[os.write(write_end, view):]
        except BrokenPipeError:
            pass                                          # the switch gave up reading: refused
        finally:
            os.close(write_end)

    writer = threading.Thread(target=write_all)
    writer.start()
    writer.join(timeout=20)
    assert not writer.is_alive()
    return check_state(fe)
