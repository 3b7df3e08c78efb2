"""A hostile migration source against a running switch: device states bounded by the switch's flow table.

The switch runs with a table of :data:`CAPACITY` flows (``--max-flows``) and
two queue pairs; the Python front-end plays QEMU's part of a LOAD with
documents crafted as a hostile source would (tests/migration/statekit.py):
valid ones with far more flows than the table holds (5,000, and 3.2 million:
262 MB, which the format's own limits alone let through), and one whose TCP
queues make it larger than the switch accepts.  Each is refused with a clear
error before anything is applied, the huge ones before they are read whole
(the pipe breaks under the writer; the coordinator's memory grows by no more
than the limit), and the switch serves on: the same front-end, a later
migration.  A source that dribbles its document does not hold the switch:
status queries and vhost-user requests are answered meanwhile, and so is the
CHECK_DEVICE_STATE asked before the end, once the document is in.  The
workers' warnings about flows they cannot re-create are rate-limited, with a
count at the end.  Nothing here measures time.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from shardswitch.coordinator.migration import CHUNK, REPLY_FAILED
from shardswitch.frontend.client import VhostUserFrontend
from shardswitch.loglimit import BURST
from shardswitch.migration.admit import Bounds
from shardswitch.vhost.wire import Request
from tests.migration.statekit import Crafted, Feeder, echo_flood, feed, queue_flood
from tests.switch import Switch
from tests.switchkit import STATE_FEATURES, arp_roundtrip, is_periodic_ra, load_state, save_state, wait_status

PAIRS = 2
CAPACITY = 1024
BOUNDS = Bounds.for_table(CAPACITY)


@pytest.fixture
def target(tmp_path: Path) -> Iterator[tuple[Switch, VhostUserFrontend]]:
    """A switch with a table of CAPACITY flows and a front-end that negotiated DEVICE_STATE."""
    with Switch(tmp_path, workers=PAIRS, args=["--max-flows", str(CAPACITY)]) as switch, \
            VhostUserFrontend.connect(switch.socket, queue_pairs=PAIRS, ignore=is_periodic_ra,
                                      protocol_features=STATE_FEATURES) as fe:
        fe.handshake()
        yield switch, fe


def _peak_memory(pid: int) -> int:
    """Process ``pid``'s peak resident memory in bytes (VmHWM)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def _serves_on(switch: Switch, fe: VhostUserFrontend) -> None:
    """Nothing was applied and no worker died; the same front-end is served, and a real migration works."""
    status = switch.status()
    assert status["frontend"]["connected"], status
    assert not any(w["restarts"] for w in status["workers"]), status
    assert not [f for f in switch.query("flows")["flows"] if f["type"].startswith("ping")]
    for pair in range(PAIRS):
        arp_roundtrip(fe, pair)
    assert load_state(fe, save_state(fe)) == 0
    assert switch.status()["migration"]["last"]["direction"] == "loaded"


def _refused(switch: Switch, fe: VhostUserFrontend, document: Crafted, why: str) -> tuple[Feeder, int]:
    """Load ``document``: CHECK_DEVICE_STATE fails and the log says ``why``; the feeder and the bytes the
    switch read."""
    answer, feeder = feed(fe, document)
    assert answer == REPLY_FAILED
    last = switch.status()["migration"]["last"]
    assert last["direction"] == "load" and re.search(why, last["error"]), last
    assert re.search(rf"device state refused \({last['bytes']} bytes\): {why}", switch.log()), switch.log()[-3000:]
    return feeder, last["bytes"]


def test_more_flows_than_the_table_holds(target: tuple[Switch, VhostUserFrontend]) -> None:
    """5,000 valid echo flows for a table of 1,024: refused from the document's outline, with the counts."""
    switch, fe = target
    document = echo_flood(5000, PAIRS)
    assert document.size < BOUNDS.size                             # within the byte limit: read whole
    _refused(switch, fe, document, f"5000 flows, more than the {CAPACITY} the flow table holds")
    _serves_on(switch, fe)


def test_millions_of_flows_are_refused_unread(target: tuple[Switch, VhostUserFrontend]) -> None:
    """3.2 million echo flows (262 MB, under the format's own 256 MiB limit): refused once the bytes pass the
    table's limit, the rest unread (the writer's pipe breaks), the coordinator's memory up by no more than
    the limit."""
    switch, fe = target
    document = echo_flood(3_200_000, 4, same=True)
    before = _peak_memory(switch.pid)
    feeder, read = _refused(switch, fe, document, re.escape(f"larger than {BOUNDS.describe()}"))
    assert feeder.broken and feeder.written < document.size, (feeder.written, document.size)
    assert BOUNDS.size < read <= BOUNDS.size + CHUNK
    assert _peak_memory(switch.pid) - before < BOUNDS.size + (64 << 20)
    _serves_on(switch, fe)


def test_larger_than_the_table_allows(target: tuple[Switch, VhostUserFrontend]) -> None:
    """Three connections whose queues are each as large as the format allows (192 MiB in all, few flows):
    refused at the byte limit, before the end."""
    switch, fe = target
    document = queue_flood(3)
    assert document.flows <= CAPACITY < document.size
    feeder, read = _refused(switch, fe, document, re.escape(f"larger than {BOUNDS.describe()}"))
    assert feeder.broken and feeder.written < document.size
    assert read <= BOUNDS.size + CHUNK
    _serves_on(switch, fe)


def test_the_switch_serves_while_a_document_dribbles_in(target: tuple[Switch, VhostUserFrontend]) -> None:
    """A source writes half its document and stops: status queries and vhost-user requests are answered;
    CHECK_DEVICE_STATE asked then waits, without holding the switch, and is answered once the rest is in."""
    switch, fe = target
    document = echo_flood(1000, PAIRS)
    half = document.size // 2
    feeder = Feeder(fe, document, pause_at=half).start()
    try:
        assert feeder.paused.wait(10)
        wait_status(switch, lambda s: (s["migration"]["transfer"] or {}).get("bytes") == half,
                    "the switch to read what was written")
        assert fe.request(Request.GET_FEATURES) is not None            # the front-end is served too
        fe.send_request(Request.CHECK_DEVICE_STATE)
        status = wait_status(switch, lambda s: (s["migration"]["transfer"] or {}).get("check_waiting"),
                             "CHECK_DEVICE_STATE to wait for the rest")
        assert status["migration"]["transfer"]["stage"] == "transfer"
        assert not fe.reply_waiting(), "CHECK_DEVICE_STATE answered before the document was in"
    finally:
        feeder.resume()
        feeder.finish()
    assert int.from_bytes(fe.read_reply(Request.CHECK_DEVICE_STATE), "little") == 0
    status = switch.status()
    assert status["migration"]["last"]["direction"] == "loaded" and status["migration"]["last"]["flows"] == 1000
    assert status["migration"]["transfer"] is None
    for pair in range(PAIRS):
        arp_roundtrip(fe, pair)


def test_warnings_of_flows_not_recreated_are_rate_limited(target: tuple[Switch, VhostUserFrontend]) -> None:
    """1,000 copies of one echo flow over both pairs: one is re-created, the 999 others fail (a duplicate,
    or a flow the other worker owns); each worker logs at most its burst of warnings, then one count."""
    switch, fe = target
    answer, _feeder = feed(fe, echo_flood(1000, PAIRS, same=True))
    assert answer == 0
    status = switch.status()
    assert not any(w["restarts"] for w in status["workers"]), status
    log = switch.log()
    lines = re.findall(r"worker \d: echo flow not re-created: ", log)
    assert 0 < len(lines) <= PAIRS * BURST, len(lines)
    counts = [int(n) for n in re.findall(r"worker \d: (\d+) echo flow\(s\) of the migration not re-created", log)]
    assert len(counts) == PAIRS and sum(counts) + status["migration"]["last"]["other"] == 1000, (counts, status)
