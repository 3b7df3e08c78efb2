"""Echo flows through a real switch, driven by the Python front-end.

The switch runs in a namespace of its own (tests.switch), where the gateway
10.0.2.2 and our IPv6 link-local address are mapped to that namespace's
loopback: the only place these echo requests can go.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from shardswitch.frontend.client import VhostUserFrontend
from tests.switch import Switch
from tests.switchkit import ready_frontend
from tests.worker.pingkit import GATEWAY4, GUEST4, echo4, echo6, replies

@pytest.fixture
def switch(tmp_path: Path) -> Iterator[Switch]:
    """A 2-worker switch."""
    with Switch(tmp_path, workers=2) as sw:
        yield sw


@pytest.fixture
def fe(switch: Switch) -> Iterator[VhostUserFrontend]:
    """A connected front-end with RX buffers on both pairs."""
    with ready_frontend(switch, rx=64) as frontend:
        yield frontend


def test_ping4_to_mapped_gateway(switch: Switch, fe: VhostUserFrontend) -> None:
    """Echo requests to the gateway come back from the gateway, with the guest's identifier."""
    for seq in range(3):
        fe.send_frame(0, echo4(0x1234, seq))
    got = replies(fe, 0, expect=3)
    assert got == [(0, 0x1234, 0), (0, 0x1234, 1), (0, 0x1234, 2)]
    (flow,) = switch.query("flows")["flows"]
    assert flow["type"] == "ping4" and flow["owner"] == 0
    assert flow["sides"][0] == {"pif": "guest", "ep_addr": GUEST4, "ep_port": 0x1234, "our_addr": GATEWAY4,
                                "our_port": 0}
    assert flow["sides"][1]["ep_addr"] == "127.0.0.1"


def test_ping6_to_router_link_local(switch: Switch, fe: VhostUserFrontend) -> None:
    """ICMPv6 echo to our link-local address is answered by the host's ::1."""
    fe.send_frame(1, echo6(0x99, 7))
    assert replies(fe, 1) == [(129, 0x99, 7)]
    (flow,) = switch.query("flows")["flows"]
    assert flow["type"] == "ping6" and flow["owner"] == 1 and flow["sides"][1]["ep_addr"] == "::1"


def test_frame_on_other_pair_is_handed_to_owner(switch: Switch, fe: VhostUserFrontend) -> None:
    """Same flow on pair 1 after pair 0 created it: one flow, the owner answers, nothing lost."""
    fe.send_frame(0, echo4(0x55, 1))
    assert replies(fe, 0) == [(0, 0x55, 1)]
    for seq in range(2, 6):
        fe.send_frame(1, echo4(0x55, seq))
    assert replies(fe, 0, expect=4) == [(0, 0x55, seq) for seq in range(2, 6)]
    flows = switch.query("flows")["flows"]
    assert len(flows) == 1 and flows[0]["owner"] == 0
    workers = switch.status()["workers"]
    assert workers[1]["handed_out"] == 4 and workers[0]["handed_in"] == 4


def test_distinct_identifiers_are_distinct_flows(switch: Switch, fe: VhostUserFrontend) -> None:
    """Two identifiers on two pairs: two flows, each owned where it started."""
    fe.send_frame(0, echo4(1, 1))
    fe.send_frame(1, echo4(2, 1))
    assert replies(fe, 0) == [(0, 1, 1)] and replies(fe, 1) == [(0, 2, 1)]
    owners = sorted((f["sides"][0]["ep_port"], f["owner"]) for f in switch.query("flows")["flows"])
    assert owners == [(1, 0), (2, 1)]


def test_unreachable_destination_is_counted_not_fatal(switch: Switch, fe: VhostUserFrontend) -> None:
    """The switch's namespace has no route to 192.0.2.1: the request is dropped and counted, the worker lives."""
    pid = switch.status()["workers"][0]["pid"]
    fe.send_frame(0, echo4(3, 1, dst="192.0.2.1"))
    fe.send_frame(0, echo4(4, 1))
    assert replies(fe, 0) == [(0, 4, 1)]
    worker = switch.status()["workers"][0]
    assert worker["pid"] == pid and worker["drops"].get("PING_SEND_ERROR", 0) + \
        worker["drops"].get("PING_SOCKET_ERROR", 0) == 1


def test_broadcast_and_multicast_pings_are_dropped_quietly(switch: Switch, fe: VhostUserFrontend) -> None:
    """Echo requests to broadcast (limited and the guest's subnet) and multicast addresses are dropped as
    FLOW_DST_MULTICAST by the flow policy, opening no socket and logging nothing; unicast pings still work."""
    log_before = len(switch.log())
    for n, dst in enumerate(("255.255.255.255", "10.0.2.255", "224.0.0.1")):
        fe.send_frame(0, echo4(20 + n, 1, dst=dst))
    fe.send_frame(0, echo6(23, 1, dst="ff02::1"))
    fe.send_frame(0, echo4(24, 1))
    assert replies(fe, 0) == [(0, 24, 1)]
    drops = switch.status()["workers"][0]["drops"]
    assert drops == {"FLOW_DST_MULTICAST": 4}, drops
    assert len(switch.query("flows")["flows"]) == 1
    assert "ping_group_range" not in switch.log()[log_before:]


def start_with(tmp_path: Path, *args: str) -> tuple[Switch, VhostUserFrontend]:
    """A 1-worker switch with extra options and a connected front-end."""
    sw = Switch(tmp_path, args=list(args)).start()
    return sw, ready_frontend(sw, pairs=1, rx=16)


def test_no_map_gw_sends_gateway_pings_to_the_gateway(tmp_path: Path) -> None:
    """--no-map-gw: the gateway is an ordinary address (unreachable in this namespace), nothing is mapped."""
    sw, frontend = start_with(tmp_path, "--no-map-gw")
    try:
        frontend.send_frame(0, echo4(5, 1))
        assert replies(frontend, 0, timeout=1.0) == []
        # No route to 10.0.2.2 here: the ping socket cannot even connect, so no flow is made.
        assert sw.query("flows")["flows"] == []
        assert sw.status()["workers"][0]["drops"] == {"PING_SOCKET_ERROR": 1}
    finally:
        frontend.close()
        sw.stop()


def test_map_host_loopback_other_address(tmp_path: Path) -> None:
    """--map-host-loopback 10.0.2.9: that address reaches the loopback, the gateway no longer does."""
    sw, frontend = start_with(tmp_path, "--map-host-loopback", "10.0.2.9")
    try:
        frontend.send_frame(0, echo4(6, 1, dst="10.0.2.9"))
        assert replies(frontend, 0) == [(0, 6, 1)]
        frontend.send_frame(0, echo4(7, 1))
        assert replies(frontend, 0, timeout=1.0) == []
    finally:
        frontend.close()
        sw.stop()


def test_flows_command_line(switch: Switch, fe: VhostUserFrontend) -> None:
    """`shardswitch flows` prints one line per flow; --json the same as data."""
    import json
    import subprocess
    import sys

    fe.send_frame(0, echo4(0x77, 1))
    assert replies(fe, 0) == [(0, 0x77, 1)]
    base = [sys.executable, "-m", "shardswitch", "flows", "--control", switch.control]
    text = subprocess.run(base, capture_output=True, text=True, check=True).stdout
    assert "1 flow(s)" in text and "ping4" in text and "guest 10.0.2.15:119 > 10.0.2.2:0" in text, text
    data = json.loads(subprocess.run(base + ["--json"], capture_output=True, text=True, check=True).stdout)
    assert data["flows"][0]["sides"][1]["ep_addr"] == "127.0.0.1"
