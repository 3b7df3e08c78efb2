"""The device state of a live migration through a running switch: SET_DEVICE_STATE_FD and CHECK_DEVICE_STATE.

The Python front-end does what QEMU 10 does: it negotiates DEVICE_STATE,
sends a pipe with SET_DEVICE_STATE_FD and reads (save) or writes (load) the
document through it, then asks CHECK_DEVICE_STATE.  A target given a
malformed, truncated or foreign document refuses it with a clear error in its
log and a failed check (QEMU then fails the migration), applies nothing, and
keeps serving its guest.  The real QEMU 10 migration is
tests/guest/test_guest_migration.py.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from shardswitch.coordinator.migration import REPLY_FAILED
from shardswitch.frontend.client import VhostUserFrontend
from shardswitch.migration import format as fmt
from shardswitch.vhost.wire import ProtocolFeature, Request, TransferDirection
from tests.switch import Switch
from tests.switchkit import (STATE_FEATURES, arp_roundtrip, check_state, is_periodic_ra, load_state, save_state,
                             set_state_fd)

PAIRS = 2


@pytest.fixture
def target(tmp_path: Path) -> Iterator[tuple[Switch, VhostUserFrontend]]:
    """A switch with a front-end that negotiated DEVICE_STATE and started its rings."""
    with Switch(tmp_path, workers=PAIRS) as switch, \
            VhostUserFrontend.connect(switch.socket, queue_pairs=PAIRS, ignore=is_periodic_ra,
                                      protocol_features=STATE_FEATURES) as fe:
        fe.handshake()
        assert fe.protocol_features & ProtocolFeature.DEVICE_STATE
        yield switch, fe


def test_saved_state_loads_back(target: tuple[Switch, VhostUserFrontend]) -> None:
    """A document saved by the switch decodes, names the guest's queue pairs, and loads into a switch."""
    switch, fe = target
    for pair in range(PAIRS):
        arp_roundtrip(fe, pair)                          # the guest's MAC is known
    document = save_state(fe)
    state = fmt.decode(document)
    assert len(state.pairs) == PAIRS
    assert load_state(fe, document) == 0
    assert switch.status()["migration"]["last"]["direction"] == "loaded"
    for pair in range(PAIRS):
        arp_roundtrip(fe, pair)


MALFORMED = {
    "empty": b"",
    "garbage": os.urandom(4096),
    "foreign magic": fmt.HEADER.pack(b"NOTOURS!", fmt.VERSION, fmt.COMPAT_VERSION) + b"\x80",
    "future version": fmt.HEADER.pack(fmt.MAGIC, fmt.VERSION + 5, fmt.VERSION + 5) + b"\x80",
    "header only": fmt.HEADER.pack(fmt.MAGIC, fmt.VERSION, fmt.COMPAT_VERSION),
}


@pytest.mark.parametrize("name", [*MALFORMED, "truncated"])
def test_malformed_state_is_refused_and_the_switch_serves_on(target: tuple[Switch, VhostUserFrontend],
                                                             name: str) -> None:
    """A malformed or truncated document: CHECK_DEVICE_STATE fails, the log says why, nothing is applied,
    and the switch keeps serving (on the same connection, and the next transfer works)."""
    switch, fe = target
    for pair in range(PAIRS):
        arp_roundtrip(fe, pair)
    good = save_state(fe)
    document = good[:len(good) - 3] if name == "truncated" else MALFORMED[name]
    assert load_state(fe, document) == REPLY_FAILED
    status = switch.status()
    assert status["frontend"]["connected"], status
    assert status["migration"]["last"]["direction"] == "load" and status["migration"]["last"]["error"], status
    assert "device state refused" in switch.log(), switch.log()[-3000:]
    assert not any(w["restarts"] for w in status["workers"]), status
    for pair in range(PAIRS):
        arp_roundtrip(fe, pair)
    assert load_state(fe, good) == 0                           # the next migration is not spoilt


def test_bad_requests_are_refused_without_a_disconnection(target: tuple[Switch, VhostUserFrontend]) -> None:
    """An unknown direction or phase, no descriptor, or a descriptor that is not a pipe: an error code in
    the answer and a logged refusal; the connection goes on."""
    switch, fe = target
    read_end, write_end = os.pipe()
    try:
        assert set_state_fd(fe, 7, read_end) & REPLY_FAILED
        assert set_state_fd(fe, TransferDirection.LOAD, read_end, phase=3) & REPLY_FAILED
        reply = fe.request(Request.SET_DEVICE_STATE_FD, struct.pack("<II", 1, 0))
        assert reply is not None and struct.unpack("<Q", reply)[0] & REPLY_FAILED
        memfd = os.memfd_create("not-a-pipe")
        try:
            assert set_state_fd(fe, TransferDirection.LOAD, memfd) & REPLY_FAILED
        finally:
            os.close(memfd)
        assert set_state_fd(fe, TransferDirection.SAVE, read_end) & REPLY_FAILED   # the wrong end
    finally:
        os.close(read_end)
        os.close(write_end)
    assert check_state(fe) != 0
    assert switch.status()["frontend"]["connected"]
    for pair in range(PAIRS):
        arp_roundtrip(fe, pair)
    log = switch.log()
    assert "SET_DEVICE_STATE_FD" in log and "unknown" in log
