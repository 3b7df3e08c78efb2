"""Forwarding rules changed at run time (coordinator/forwarding.py): the rule table's checks, the requests'
bounds, and the changes applied to real worker processes - every worker or none, established connections
kept, a replacement worker forked with the rules in force - then the same over a real switch's control
socket, as a client that sends malformed or oversized requests would try it."""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shardswitch.coordinator.control import ControlRefused, query
from shardswitch.coordinator.forwarding import (ForwardError, Limit, PortForwarding, Proto, RuleTable,
                                                format_rules, parse_request)
from shardswitch.coordinator.workers import WorkerPool
from shardswitch.ipc import ForwardSetup, StatusQuery, WorkerSetup, WorkerStatus
from shardswitch.net.params import GuestParams
from shardswitch.portspec import Forward, parse
from tests.switch import Switch
from tests.switchkit import in_child, wait_until

#: Workers of a guest at 10.0.2.15 whose gateway stands for the host's loopback (where the clients are).
SETUP = WorkerSetup(pair=0, params=GuestParams(address="10.0.2.15", prefix_len=24, gateway="10.0.2.2"),
                    forward=ForwardSetup(map_host_loopback=("10.0.2.2",)))


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port of 127.0.0.1 nobody holds right now."""
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def fwd(spec: str) -> Forward:
    """The one forward of ``spec``."""
    (only,) = parse(spec)
    return only


# -- the rule table and the requests (no I/O) -------------------------------------------------------------


def test_conflicts_duplicates_and_limits_are_refused() -> None:
    """passt's conflict test (matching addresses, overlapping ports, per protocol), an exact duplicate, and
    the bounds on rules and ports."""
    table = RuleTable()
    table.rules.append(table.new_rule(Proto.TCP, fwd("0.0.0.0/5000-5010"), runtime=True))
    table.check_add([(Proto.UDP, fwd("5005"))])                       # another protocol
    table.check_add([(Proto.TCP, fwd("127.0.0.1/5011"))])            # ports apart
    table.check_add([(Proto.TCP, fwd("[::1]/5005"))])                # another family than 0.0.0.0
    for spec, words in (("127.0.0.1/5005", "conflicts with -t 0.0.0.0/5000-5010"),
                        ("5010", "conflicts"), ("0.0.0.0/5000-5010", "already in force")):
        with pytest.raises(ForwardError, match=words):
            table.check_add([(Proto.TCP, fwd(spec))])
    with pytest.raises(ForwardError, match="-t 127.0.0.1/7000 conflicts with -t 7000"):
        table.check_add([(Proto.TCP, fwd("7000")), (Proto.TCP, fwd("127.0.0.1/7000"))])
    with pytest.raises(ForwardError, match="opens 1101 ports"):
        table.check_add([(Proto.TCP, fwd("127.0.0.1/20000-21100"))])
    table.rules += [table.new_rule(Proto.UDP, fwd(f"127.0.0.1/{port}"), runtime=False)
                    for port in range(1, int(Limit.MAX_RULES))]
    with pytest.raises(ForwardError, match="too many forwarding rules: 256 in force"):
        table.check_add([(Proto.TCP, fwd("127.0.0.1/9999"))])


def test_removal_names_rules_exactly() -> None:
    """A SPEC removes the rule it matches exactly; one that only overlaps a rule, or matches none, is refused."""
    table = RuleTable()
    rule = table.new_rule(Proto.TCP, fwd("0.0.0.0/5000:192.0.2.5/6000"), runtime=True)
    table.rules.append(rule)
    assert table.find([(Proto.TCP, fwd("0.0.0.0/5000:192.0.2.5/6000"))]) == [rule]
    with pytest.raises(ForwardError, match="overlaps the rule -t 0.0.0.0/5000:192.0.2.5/6000 without matching"):
        table.find([(Proto.TCP, fwd("0.0.0.0/5000"))])
    with pytest.raises(ForwardError, match="no forwarding rule -u 0.0.0.0/5000:192.0.2.5/6000"):
        table.find([(Proto.UDP, fwd("0.0.0.0/5000:192.0.2.5/6000"))])


def test_requests_are_bounded() -> None:
    """A request is lists of SPEC strings, at most MAX_SPECS of at most MAX_SPEC_LEN characters, at least one."""
    assert parse_request({"tcp": ["22"], "udp": ["53", "54"]}) == [(Proto.TCP, "22"), (Proto.UDP, "53"),
                                                                   (Proto.UDP, "54")]
    for request, words in (({"tcp": "22"}, "must be a list"), ({"udp": [22]}, "must be a list"), ({}, "no SPEC"),
                           ({"tcp": ["1"] * 17}, "17 SPECs in one request"),
                           ({"tcp": ["1" * 300]}, "longer than 256")):
        with pytest.raises(ForwardError, match=words):
            parse_request(request)


def test_rules_listed_in_passt_syntax() -> None:
    """`forward list`: one -t/-u line per rule, run-time ones marked; nothing: a sentence."""
    answer = {"tcp": [{"option": "-t", "spec": "22", "origin": "start"}],
              "udp": [{"option": "-u", "spec": "0.0.0.0/53:192.0.2.5/5353", "origin": "run-time"}]}
    assert format_rules(answer).splitlines() == ["-t 22", "-u 0.0.0.0/53:192.0.2.5/5353    # added at run time"]
    assert format_rules({"tcp": [], "udp": []}) == "no forwarding rules"


# -- real workers -------------------------------------------------------------------------------------------


@pytest.fixture
def pool() -> Iterator[WorkerPool]:
    """Two real worker processes (no front-end), stopped at the end."""
    workers = WorkerPool(2, SETUP)
    workers.start()
    try:
        yield workers
    finally:
        workers.stop()


def listening(pool: WorkerPool) -> list[dict[str, int]]:
    """Each worker's listening sockets of forwarded ports, by kind (its own status answer)."""
    answers = [pool.call(pair, StatusQuery(seq=1000 + pair)) for pair in range(pool.count)]
    assert all(isinstance(answer, WorkerStatus) for answer in answers), answers
    return [answer.listeners for answer in answers if isinstance(answer, WorkerStatus)]


def refused(port: int) -> bool:
    """Whether a connection to 127.0.0.1:``port`` is refused (no listener); one that a worker accepted and
    reset at once (no guest here to take it) was not."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    except ConnectionResetError:
        pass
    return False


def test_added_on_every_worker_or_on_none(pool: WorkerPool) -> None:
    """An added rule's listeners reach both workers; a port taken or a bad SPEC in the same request refuses
    it whole (nothing bound, nothing sent); removal closes them; a replacement worker gets the rules in force."""
    seq = itertools.count(1).__next__
    forwarding = PortForwarding(pool, seq)
    first, second, taken = free_port(), free_port(), free_port()
    answer = forwarding.request("add", {"tcp": [f"127.0.0.1/{first}"]})
    assert answer["added"][0]["spec"] == f"127.0.0.1/{first}", answer
    assert [entry["tcp"] for entry in listening(pool)] == [1, 1]
    assert not refused(first)
    before = list(pool.ports)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", taken))
        holder.listen()
        answer = forwarding.request("add", {"tcp": [f"127.0.0.1/{second}", f"127.0.0.1/{taken}"]})
    assert "Address already in use" in answer["error"] and "nothing changed" in answer["error"], answer
    answer = forwarding.request("add", {"tcp": [f"127.0.0.1/{second}"], "udp": ["127.0.0.1/5353-"]})
    assert "invalid port specifier '127.0.0.1/5353-'" in answer["error"], answer
    assert pool.ports == before and refused(second)
    assert [entry["tcp"] for entry in listening(pool)] == [1, 1]
    assert forwarding.status()["changes"] == {"added": 1, "removed": 0, "refused": 2}
    # A replacement worker is forked with the rules in force, not those of the start.
    handle = pool.handle(1)
    assert handle is not None
    os.kill(handle.pid, signal.SIGKILL)
    wait_until(lambda: not pool.alive(1), "worker 1 to die")
    pool.reap(handle)
    assert [entry["tcp"] for entry in listening(pool)] == [1, 1]
    answer = forwarding.request("remove", {"tcp": [f"127.0.0.1/{first}"]})
    assert answer["removed"][0]["spec"] == f"127.0.0.1/{first}" and answer["tcp"] == [], answer
    assert [entry["tcp"] for entry in listening(pool)] == [0, 0]
    assert refused(first) and pool.ports == [((), ()), ((), ())]


def test_a_worker_that_does_not_answer_leaves_no_rule_anywhere(pool: WorkerPool) -> None:
    """A live worker that does not take its listeners in time refuses the add; the one that did drops them
    again, and so does the late one once it runs on (its messages come in order)."""
    forwarding = PortForwarding(pool, itertools.count(1).__next__)
    port = free_port()
    handle = pool.handle(1)
    assert handle is not None
    os.kill(handle.pid, signal.SIGSTOP)
    try:
        answer = forwarding.request("add", {"tcp": [f"127.0.0.1/{port}"]})
    finally:
        os.kill(handle.pid, signal.SIGCONT)
    assert "worker 1 did not take the new listeners (no answer); nothing changed" in answer["error"], answer
    assert forwarding.listing() == {"tcp": [], "udp": []}
    assert wait_until(lambda: [entry["tcp"] for entry in listening(pool)] == [0, 0], "no listener left")
    assert refused(port)


def test_removed_udp_listener_drains_its_flows() -> None:
    """A removed -u rule's socket stays for the flow it carries: that client's datagrams still go to the
    guest, a new client's are dropped (UDP_FORWARD_REMOVED); the rule added again takes the flow over."""
    workers = WorkerPool(1, SETUP)
    workers.start()
    try:
        forwarding = PortForwarding(workers, itertools.count(1).__next__)
        port = free_port(socket.SOCK_DGRAM)
        spec = {"udp": [f"127.0.0.1/{port}"]}
        assert "added" in forwarding.request("add", spec)
        known = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with known, stranger:
            known.sendto(b"hello", ("127.0.0.1", port))
            wait_until(lambda: status(workers).flows == 1, "the client's flow")
            assert "removed" in forwarding.request("remove", spec)
            assert status(workers).listeners == {"tcp": 0, "udp": 0, "udp_draining": 1}
            stranger.sendto(b"new", ("127.0.0.1", port))
            wait_until(lambda: status(workers).drops.get("UDP_FORWARD_REMOVED") == 1, "the stranger's drop")
            # One socket reads in order: once the stranger's second datagram is counted, the known client's,
            # sent before it, was taken, and not as a stranger's.
            known.sendto(b"still", ("127.0.0.1", port))
            stranger.sendto(b"again", ("127.0.0.1", port))
            wait_until(lambda: status(workers).drops.get("UDP_FORWARD_REMOVED") == 2, "the stranger's second drop")
            assert status(workers).drops.get("UDP_FORWARD_REMOVED") == 2 and status(workers).flows == 1
            assert "added" in forwarding.request("add", spec)
            assert status(workers).listeners == {"tcp": 0, "udp": 1, "udp_draining": 0}
            assert status(workers).flows == 1
    finally:
        workers.stop()


def status(pool: WorkerPool) -> WorkerStatus:
    """Worker 0's status answer."""
    answer = pool.call(0, StatusQuery(seq=int(time.monotonic() * 1e6)))
    assert isinstance(answer, WorkerStatus)
    return answer


# -- a real switch's control socket -------------------------------------------------------------------------


def raw_request(path: str, data: bytes) -> dict[str, object]:
    """Send ``data`` as it is on the control socket; the decoded answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(path)
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = b""
        while not answer.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    decoded: dict[str, object] = json.loads(answer)
    return decoded


def test_malformed_and_oversized_requests_are_refused_and_the_switch_serves_on(tmp_path: Path) -> None:
    """Over a real switch's control socket: an oversized line, bad JSON shapes, too many or too long SPECs,
    too many ports, a port below 1024 after the privilege drop, and a peer of another user: each refused with
    a clear error, nothing changed; then a good add works and status shows it."""
    with Switch(tmp_path, workers=2, args=["-t", "127.0.0.1/5000"]) as sw:
        path = sw.control
        assert "longer than 4096" in str(raw_request(path, b'{"cmd": "forward-add", "tcp": ["' + b"1" * 5000)
                                             ["error"])
        for request, words in (({"tcp": 22}, "must be a list"), ({"tcp": [["22"]]}, "must be a list"),
                               ({"tcp": [str(p) for p in range(6000, 6017)]}, "17 SPECs"),
                               ({"tcp": ["6" * 300]}, "longer than 256"),
                               ({"tcp": ["127.0.0.1/20000-21100"]}, "opens 1101 ports"),
                               ({"tcp": ["80"]}, "ports below 1024 need CAP_NET_BIND_SERVICE"),
                               ({"tcp": ["0.0.0.0/6000:10.0.2.2"]}, "the flow policy refuses the target"),
                               ({"udp": ["0.0.0.0/6000:[2001:db8::5]/53"]}, "forward from IPv4 (0.0.0.0) to IPv6")):
            answer = raw_request(path, json.dumps({"cmd": "forward-add", **request}).encode() + b"\n")
            assert words in str(answer["error"]) and "nothing changed" in str(answer["error"]), (request, answer)
        assert "bad request" in str(raw_request(path, b'{"cmd": "forward-add", "tcp": [\n')["error"])
        # Another user cannot even reach the socket (mode 0600; the peer check stands behind it).
        with pytest.raises(AssertionError, match="ControlError: cannot reach .*Permission denied"):
            in_child(lambda: query(path, "forward-add", args={"tcp": ["6001"], "udp": []}), uid=12345)
        assert query(path, "forward-list")["tcp"][0]["spec"] == "127.0.0.1/5000"
        assert len(query(path, "forward-list")["tcp"]) == 1
        added = query(path, "forward-add", args={"tcp": ["127.0.0.1/6002:10.0.2.15/22"]})
        assert added["added"][0]["origin"] == "run-time"
        status = sw.status()
        assert status["forwarding"]["rules"] == {"tcp": 2, "udp": 0}, status["forwarding"]
        assert status["forwarding"]["changes"]["refused"] == 8, status["forwarding"]        # the parsed ones
        assert status["control"]["refused"] == {"too_long": 1}, status["control"]
        assert [w["listeners"]["tcp"] for w in status["workers"]] == [2, 2]
        metrics = query(path, "metrics")["text"]
        assert 'shardswitch_forward_rules{proto="tcp"} 2.0' in metrics, metrics
        assert 'shardswitch_worker_listeners{kind="tcp",pair="1"} 2.0' in metrics, metrics
        with pytest.raises(ControlRefused, match="no forwarding rule -t 127.0.0.1/6003"):
            query(path, "forward-remove", args={"tcp": ["127.0.0.1/6003"]})
