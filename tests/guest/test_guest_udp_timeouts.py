"""A real guest's DNS lookups do not hold host sockets for minutes: its UDP flows are under passt's timeouts, the
host's conntrack UDP settings.

The guest resolves names through the gateway (the switch's default options), which the switch forwards to the
stub resolver on 127.0.0.53 of the test namespace (dnsmasq, tests/guest/dnskit.py), as on a systemd-resolved
host.  The namespace's ``nf_conntrack_udp_timeout`` and ``_stream`` (per network namespace) are set to
:data:`PLAIN` and :data:`STREAM` seconds where the namespace has them, and read back as the switch reads them
(passt's 30 and 120 where it has not), so the test waits for the timeout the switch actually uses.

* one ``nslookup NAME``: busybox sends the A and AAAA queries from one socket and gets two answers, so the flow
  looks like a stream (more than one datagram each way): the stream timeout;
* then :data:`LOOKUPS` ``nslookup -type=a NAME``: one query and one answer each, a new flow each (a new source
  port): the plain timeout.  While they live, ``shardswitch flows --json`` shows each UDP flow with its
  timeout; once the plain timeout has passed since the last lookup, at most :data:`HANDFUL` UDP flows are left
  (the stream, and any lookup the guest had to retry).

Everything the guest sends goes to the gateway, mapped to the namespace's own stub resolver.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.guest.dnskit import ANSWER, NAME, start_dnsmasq
from tests.guest.image import GuestImage
from tests.guest.netns import TestNetns
from tests.guest.vm import GuestVM
from tests.switch import Switch
from tests.worker.udpkit import conntrack_udp_timeouts

pytestmark = pytest.mark.guest

#: Lookups of one query and one answer the guest makes.
LOOKUPS = 200
#: UDP flows that may be left once the plain timeout has passed.
HANDFUL = 5
#: The namespace's conntrack UDP timeouts the test sets (where it can), seconds.
PLAIN, STREAM = 20, 600
#: Seconds allowed beyond the plain timeout for the flows to go (the switch's timers run once a second).
SLACK = 15.0

SCRIPT = f"""
dhcp || exit 1
nslookup {NAME} > /tmp/stream 2>&1
echo STREAM-LOOKUP: $(grep -c {ANSWER} /tmp/stream)
i=0
failed=0
while [ $i -lt {LOOKUPS} ]; do
    nslookup -type=a {NAME} > /tmp/ns 2>&1 && grep -q {ANSWER} /tmp/ns || failed=$((failed + 1))
    i=$((i + 1))
done
echo LOOKUPS-DONE failed=$failed
sleep 600
"""


def shardswitch_flows(switch: Switch, *options: str) -> str:
    """``shardswitch flows`` run as a user would, against the switch's control socket: its output."""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    done = subprocess.run([sys.executable, "-m", "shardswitch", "flows", "--control", switch.control, *options],
                          capture_output=True, text=True, timeout=30, env=env, check=False)
    assert done.returncode == 0, (done.stdout, done.stderr)
    return done.stdout


def udp_flows(switch: Switch) -> list[dict[str, Any]]:
    """The UDP flows ``shardswitch flows --json`` lists."""
    return [f for f in json.loads(shardswitch_flows(switch, "--json"))["flows"] if f["type"] == "udp"]


def test_dns_lookups_leave_no_flows_behind_after_the_plain_timeout(tmp_path: Path, netns: TestNetns,
                                                                   guest_image: GuestImage) -> None:
    """200 lookups: each under the plain timeout while it lives, gone once it has passed; the A+AAAA lookup is
    under the stream timeout."""
    timeouts = conntrack_udp_timeouts(netns, PLAIN, STREAM)
    start_dnsmasq(netns, tmp_path)
    with Switch(tmp_path, workers=1, prefix=netns.exec_argv([]), addressing=[]) as switch, \
            GuestVM(guest_image, SCRIPT, socket=Path(switch.socket), netns=netns) as vm:
        started = time.monotonic()
        vm.wait_for("LOOKUPS-DONE", timeout=600)
        done = time.monotonic()
        live = udp_flows(switch)
        text = shardswitch_flows(switch)
        output = vm.output()
        print(f"lookups took {done - started:.1f} s; {len(live)} UDP flows live")
        assert "STREAM-LOOKUP: 1" in output and "LOOKUPS-DONE failed=0" in output, output
        # While they live: every UDP flow shows the timeout it is under, the plain one but for the stream.
        assert len(live) > HANDFUL, (live, output)
        by_timeout = {t: sum(1 for f in live if f["timeout"] == t) for t in {f["timeout"] for f in live}}
        assert set(by_timeout) <= {timeouts.timeout, timeouts.stream}, by_timeout
        assert by_timeout.get(timeouts.timeout, 0) >= len(live) - HANDFUL, by_timeout
        stream = [f for f in live if f["timeout"] == timeouts.stream]
        assert stream, by_timeout               # the A+AAAA lookup: two queries and two answers on one socket
        assert all(f["sides"][1]["ep_addr"] == "127.0.0.53" and f["sides"][1]["ep_port"] == 53 for f in live), live
        assert f"timeout {timeouts.timeout}s" in text, text
        # Once the plain timeout has passed since the last lookup, at most a handful are left: the stream ones.
        deadline = done + timeouts.timeout + SLACK
        while True:
            left = udp_flows(switch)
            if len(left) <= HANDFUL or time.monotonic() > deadline:
                break
            time.sleep(1.0)
        print(f"{len(left)} UDP flows left {time.monotonic() - done:.1f} s after the last lookup")
        assert len(left) <= HANDFUL, left
        if timeouts.stream > time.monotonic() - started + SLACK:
            assert any(f["index"] == stream[0]["index"] and f["timeout"] == timeouts.stream for f in left), \
                (stream, left)
