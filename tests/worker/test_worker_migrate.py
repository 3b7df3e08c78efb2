"""The workers' part of a live migration (worker/migrate.py) through two running switches.

Switch A and switch B run in one test namespace holding the UDP echo server
(tests/worker/udpkit.py); a Python front-end drives each as QEMU
does: the guest's rings stop, A saves its device state, B loads it, B's rings
start.  UDP and echo flows the guest started are re-created on B, UDP from the
same local port (so that the peer's answers to that port reach the guest),
and they work at once.  Should the guest resume on A instead (the migration
failed after the save), A loads its own document back.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shardswitch.frontend.client import VhostUserFrontend
from shardswitch.migration import format as fmt
from tests.guest.netns import TestNetns, stop_process
from tests.switch import Switch
from tests.switchkit import STATE_FEATURES, is_periodic_ra, load_state, save_state, start_server, wait_until
from tests.worker.tcpkit import ACK, BLOB, ECHO, PSH, SERVERS, SINK, GuestTcp
from tests.worker.pingkit import echo4, replies
from tests.worker.udpkit import ECHO_PORT, GATEWAY4, GUEST4, frame4, received, start_echo_server

GUEST_PORT = 40123
IDENT = 0x5151


def _frontend(switch: Switch) -> VhostUserFrontend:
    """A front-end that negotiated DEVICE_STATE, with RX buffers on its one queue pair."""
    fe = VhostUserFrontend.connect(switch.socket, queue_pairs=1, ignore=is_periodic_ra,
                                   protocol_features=STATE_FEATURES)
    try:
        fe.handshake()
        fe.post_rx(0, 128)
    except BaseException:
        fe.close()
        raise
    return fe


@pytest.fixture
def two(netns: TestNetns, tmp_path: Path) -> Iterator[tuple[Switch, VhostUserFrontend, Switch, VhostUserFrontend]]:
    """Switches A and B (one worker each) in the echo namespace, each with its front-end."""
    start_echo_server(netns, tmp_path)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with Switch(tmp_path / "a", prefix=netns.exec_argv([])) as switch_a, \
            Switch(tmp_path / "b", prefix=netns.exec_argv([])) as switch_b, \
            _frontend(switch_a) as fe_a, _frontend(switch_b) as fe_b:
        yield switch_a, fe_a, switch_b, fe_b


def _flows(switch: Switch, kind: str) -> list[dict[str, Any]]:
    """The switch's flows of ``kind`` (udp, ping)."""
    return [f for f in switch.query("flows")["flows"] if f["type"].startswith(kind)]


def _guest_flows(fe: VhostUserFrontend) -> None:
    """The guest talks: a UDP datagram and an echo request to the gateway, both answered."""
    fe.send_frame(0, frame4(GUEST_PORT, ECHO_PORT, b"before"))
    assert received(fe, 0, 1) == [(GATEWAY4, ECHO_PORT, GUEST4, GUEST_PORT, b"echo:before")]
    fe.send_frame(0, echo4(IDENT, 1))
    assert replies(fe, 0) == [(0, IDENT, 1)]


def _still_working(fe: VhostUserFrontend) -> None:
    """The same flows answer on ``fe``'s switch."""
    fe.post_rx(0, 16)
    fe.send_frame(0, frame4(GUEST_PORT, ECHO_PORT, b"after"))
    assert received(fe, 0, 1) == [(GATEWAY4, ECHO_PORT, GUEST4, GUEST_PORT, b"echo:after")]
    fe.send_frame(0, echo4(IDENT, 2))
    assert replies(fe, 0) == [(0, IDENT, 2)]


def test_udp_and_echo_flows_are_recreated_on_the_target(
        two: tuple[Switch, VhostUserFrontend, Switch, VhostUserFrontend]) -> None:
    """A's UDP and echo flows go in the document and are closed on A; B re-creates them, the UDP one from
    the same local port, and both answer at once; each side counts them."""
    switch_a, fe_a, switch_b, fe_b = two
    _guest_flows(fe_a)
    (flow_a,) = _flows(switch_a, "udp")
    fe_a.stop_rings()
    document = save_state(fe_a)
    state = fmt.decode(document)
    assert [len(p.udp) for p in state.pairs] == [1] and [len(p.ping) for p in state.pairs] == [1]
    assert _flows(switch_a, "udp") == [] and _flows(switch_a, "ping") == []

    bases = fe_b.stop_rings()
    assert load_state(fe_b, document) == 0
    fe_b.resume_rings(bases)
    (flow_b,) = _flows(switch_b, "udp")
    assert flow_b["sides"][1]["our_port"] == flow_a["sides"][1]["our_port"], (flow_a, flow_b)
    assert len(_flows(switch_b, "ping")) == 1
    _still_working(fe_b)
    assert switch_a.status()["migration"]["last"]["other"] == 2
    assert switch_b.status()["migration"]["last"]["other"] == 2


def test_the_source_takes_its_flows_back_when_the_guest_resumes_there(
        two: tuple[Switch, VhostUserFrontend, Switch, VhostUserFrontend]) -> None:
    """The migration fails after A saved (A closed its flows): the guest's rings start again on A, which
    loads its own document back; the flows answer from the same local port."""
    switch_a, fe_a, _switch_b, _fe_b = two
    _guest_flows(fe_a)
    (before,) = _flows(switch_a, "udp")
    bases = fe_a.stop_rings()
    save_state(fe_a)
    assert _flows(switch_a, "udp") == []
    fe_a.resume_rings(bases)
    (after,) = _flows(switch_a, "udp")
    assert after["sides"][1]["our_port"] == before["sides"][1]["our_port"]
    assert "the guest resumed on this side" in switch_a.log()
    assert switch_a.status()["migration"]["last"]["direction"] == "restored"
    _still_working(fe_a)


def _inbound_record(guest: str, remote: str, client: str, bound: str, port: int, guest_port: int) -> fmt.TcpState:
    """A connection a host ``client`` opened on forwarded ``port`` (bound to ``bound``), as a migration
    document names it: towards ``guest``:``guest_port``, appearing there from ``remote``."""
    from shardswitch.shm.layout import Pif, ip16

    return fmt.TcpState(guest=fmt.Side(Pif.GUEST, ip16(guest), guest_port, ip16(remote), 40000),
                        host=fmt.Side(Pif.HOST, ip16(client), 40000, ip16(bound), port), inbound=True, isn=1,
                        our_mss=1460, seq_to_guest=1, seq_ack_from_guest=1, seq_from_guest=1, seq_ack_to_guest=1,
                        mss=1460, ws_from_guest=0, ws_to_guest=0, wnd_from_guest=65535, wnd_to_guest=65535, flags=0)


@pytest.mark.parametrize(("target", "guest", "admitted"), [
    ("192.0.2.5", "192.0.2.5", True),         # to the rule's target, as a new client's would go
    ("192.0.2.5", "10.0.2.15", False),        # the document says the guest's own address: not this rule's
    (None, "10.0.2.15", True),                # no target: the guest's own address
    ("10.0.2.2", "10.0.2.2", False),          # a target the flow policy refuses (the switch's own address)
])
def test_a_restored_forwarded_connection_goes_where_its_rule_says(target: str | None, guest: str,
                                                                  admitted: bool) -> None:
    """A connection a host client opened, restored by a migration, is admitted only towards the target of
    the rule of its port (screened by the flow policy, as a new one), from where such a client appears."""
    import socket

    from shardswitch.ipc import Channel, ForwardSetup, ToWorker, WorkerSetup
    from shardswitch.net.params import GuestParams
    from shardswitch.portspec import Forward
    from shardswitch.worker.listen import bind_forward, describe
    from shardswitch.worker.worker import Worker

    rule = Forward("127.0.0.1", None, 0, 0, 6000, target)
    listener = bind_forward(rule, 0, socket.SOCK_STREAM)
    port = listener.getsockname()[1]
    rule = Forward("127.0.0.1", None, port, port, 6000, target)
    peer, ours = socket.socketpair()
    setup = WorkerSetup(pair=0, params=GuestParams(address="10.0.2.15", prefix_len=24, gateway="10.0.2.2"),
                        forward=ForwardSetup(map_host_loopback=("10.0.2.2",)),
                        tcp_listeners=(describe(listener, rule, port, 1),))
    worker = Worker(setup, Channel(ours, ToWorker))
    try:
        record = _inbound_record(guest, "10.0.2.2", "127.0.0.1", "127.0.0.1", port, 6000)
        assert worker.migration._admitted(record) is admitted
        assert not worker.migration._admitted(_inbound_record(guest, "10.0.2.2", "127.0.0.1", "127.0.0.1", port,
                                                              6001))
    finally:
        listener.detach()                       # the worker's listener owns the descriptor now
        assert worker.tcp.forwarder.remove({1}) == 1
        worker.flows.close_all()
        worker.tcp.close()
        worker.epoll.close()
        ours.close()
        peer.close()


@pytest.mark.parametrize("linger", [True, False], ids=["guarded", "no-linger"])
def test_moved_connection_guard_and_no_linger(netns: TestNetns, tmp_path: Path, linger: bool) -> None:
    """A TCP connection the guest opened moves out (repair helper connected): by default the source keeps a
    frozen listening guard on its local port, so that the peer meets no reset before the target holds it;
    with --migrate-no-linger it keeps none (passt closes such sockets at once)."""
    start_server(netns, SERVERS)
    args = [] if linger else ["--migrate-no-linger"]
    with Switch(tmp_path, prefix=netns.exec_argv([]), args=args) as switch:
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
        helper = netns.popen([sys.executable, "-m", "shardswitch", "repair-helper", switch.socket + ".repair",
                              "--wait", "10"], env=env, stdout=subprocess.DEVNULL)
        try:
            wait_until(lambda: switch.status()["migration"]["repair_helper"] or None, "the repair helper",
                       timeout=15.0)
            with _frontend(switch) as fe:
                conn = GuestTcp(fe, ECHO, 40100)
                conn.connect()
                conn.send(PSH | ACK, b"hello")
                assert conn.read(5) == b"hello"
                save_state(fe)
                assert switch.status()["migration"]["last"]["tcp_moved"] == 1
                listening = netns.run(["ss", "-Htln"]).stdout.splitlines()
                guards = [line for line in listening
                          if not line.split()[3].endswith(tuple(f":{port}" for port in (ECHO, BLOB, SINK)))]
                assert bool(guards) == linger, listening
        finally:
            stop_process(helper)
