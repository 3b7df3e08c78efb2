"""Device-state bounds and the checks in steps (shardswitch.migration.admit).

A target admits no more flows than its table holds, in no more bytes than
such a document may take: :class:`~shardswitch.migration.admit.Bounds`.  The
outline refuses too many flows from the lists' headers alone, before any
flow is decoded; the flows are then checked a bounded batch at a time, with
the same verdict, and the same message, as
:func:`~shardswitch.migration.format.decode` gives the whole document; the
parts for the workers decode back to the document's pairs.
"""

from __future__ import annotations

import os
import struct

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shardswitch.migration import admit
from shardswitch.migration import format as fmt
from shardswitch.migration.admit import Bounds, StateError
from shardswitch.migration.format import DeviceState, PairState, Side, TcpSocketState, TcpState, UdpState
from shardswitch.net import inany
from shardswitch.shm.layout import Pif
from tests.migration.statekit import echo_flood, echo_state, mutated

EXAMPLES = max(1, int(os.environ.get("SHARDSWITCH_FUZZ_EXAMPLES", "10000")) // 4)
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                suppress_health_check=list(HealthCheck))
WIDE = Bounds(fmt.MAX_FLOWS, fmt.MAX_STATE)

GUEST, REMOTE, LOCAL = inany.from_str("10.0.2.15"), inany.from_str("93.184.216.34"), inany.from_str("10.0.0.5")
U32 = 0xFFFFFFFF


def _tcp(port: int, sock: TcpSocketState | None = None, **changes: object) -> TcpState:
    """A connection from the guest's ``port``."""
    record = TcpState(guest=Side(Pif.GUEST, GUEST, port, REMOTE, 443), host=Side(Pif.HOST, REMOTE, 443, LOCAL, port),
                      isn=7, our_mss=1460, seq_to_guest=1, seq_ack_from_guest=1, seq_from_guest=2,
                      seq_ack_to_guest=2, mss=1460, ws_from_guest=7, ws_to_guest=7, wnd_from_guest=65535,
                      wnd_to_guest=65535, flags=1, socket=sock)
    return msgspec.structs.replace(record, **changes)


SOCKET = TcpSocketState(tcpi_state=1, tcpi_options=7, snd_ws=7, rcv_ws=7, mss=1460, timestamp=9, seq_snd=1, seq_rcv=2,
                        snd_wl1=2, snd_wnd=65535, max_window=65535, rcv_wnd=65535, rcv_wup=2,
                        send_queue=b"GET / HTTP/1.1\r\n\r\n", not_sent=4, recv_queue=b"HTTP/1.1 200 OK\r\n")
UDP = UdpState(Side(Pif.GUEST, GUEST, 5353, REMOTE, 53), Side(Pif.HOST, REMOTE, 53, inany.ANY6, 41000))
STATE = DeviceState(guest_mac=bytes.fromhex("525400123456"), guest6=inany.from_str("2001:db8::15"), pairs=[
    PairState(pair=0, tcp=[_tcp(port, SOCKET) for port in range(40000, 40020)] + [_tcp(40020)], udp=[UDP] * 3,
              ping=[echo_state(ident) for ident in range(17)]),
    PairState(pair=5, udp=[UDP]),
    PairState(pair=1)])


def _admit(data: bytes, bounds: Bounds = WIDE, batch: int = admit.BATCH) -> admit.Admission:
    """``data`` outlined and every flow checked."""
    admission = admit.outline(data, bounds)
    while not admission.step(batch):
        pass
    return admission


def test_bounds_follow_the_table() -> None:
    """The byte limit grows with the table, by the largest flow record per flow, up to MAX_STATE."""
    small, large = Bounds.for_table(1024), Bounds.for_table(2048)
    assert (small.flows, large.flows) == (1024, 2048)
    assert large.size - small.size == 1024 * admit.FLOW_BYTES
    assert small.size > admit.QUEUE_BYTES
    assert Bounds.for_table(1_048_575).size == fmt.MAX_STATE
    assert small.describe() == f"the {small.size} bytes accepted for a table of 1024 flows"


def test_largest_records_fit_the_bounds() -> None:
    """A TCP connection with every field at its widest (and 32-bit queue headers) fits FLOW_BYTES; the
    envelope of MAX_PAIRS pairs with 32-bit list headers fits what the bounds count for it."""
    wide = Side(Pif.GUEST, b"\xff" * 16, 0xFFFF, b"\xff" * 16, 0xFFFF)
    sock = TcpSocketState(tcpi_state=255, tcpi_options=255, snd_ws=14, rcv_ws=14, mss=U32, timestamp=U32,
                          seq_snd=U32, seq_rcv=U32, snd_wl1=U32, snd_wnd=U32, max_window=U32, rcv_wnd=U32,
                          rcv_wup=U32, not_sent=U32)
    record = TcpState(guest=wide, host=wide, inbound=True, isn=U32, our_mss=0xFFFF, seq_to_guest=U32,
                      seq_ack_from_guest=U32, seq_from_guest=U32, seq_ack_to_guest=U32, mss=0xFFFF, ws_from_guest=14,
                      ws_to_guest=14, wnd_from_guest=U32, wnd_to_guest=U32, flags=255, socket=sock)
    largest = len(msgspec.msgpack.encode(record)) + 2 * 4          # bin8 headers of empty queues become bin32
    assert largest <= admit.FLOW_BYTES
    for kind in (msgspec.msgpack.encode(UDP), msgspec.msgpack.encode(echo_state(0xFFFF))):
        assert len(kind) <= admit.FLOW_BYTES
    pair = b"\x84\xa4pair\xcc\xff" + b"".join(msgspec.msgpack.encode(k) + b"\xdd" + bytes(4)
                                              for k in ("tcp", "udp", "ping"))
    assert len(pair) <= admit.PAIR_BYTES
    envelope = fmt.encode(DeviceState(guest_mac=bytes(6), guest6=bytes(16), pairs=[]))
    assert len(envelope) + 5 <= admit.ENVELOPE_BYTES                 # a 32-bit header for the pairs


def test_a_document_is_admitted_in_steps() -> None:
    """Each step checks at most its batch; once all are checked, each pair's part decodes to that pair."""
    data = fmt.encode(STATE)
    admission = admit.outline(data, Bounds.for_table(STATE.flow_count()))
    assert (admission.flows, admission.size, admission.checked) == (STATE.flow_count(), len(data), 0)
    assert (admission.guest_mac, admission.guest6, admission.pairs) == (STATE.guest_mac, STATE.guest6, [0, 5, 1])
    steps = 0
    while not admission.done:
        before = admission.checked
        admission.step(4)
        assert admission.checked - before <= 4
        steps += 1
    assert admission.checked == STATE.flow_count() and steps >= STATE.flow_count() // 4
    for index, expected in enumerate(STATE.pairs):
        pair, part = admission.part(index)
        assert pair == expected.pair and fmt.decode_pair(part) == expected


def test_more_flows_than_the_table_holds_are_refused_from_the_outline() -> None:
    """5,000 echo flows for a table of 1,024 are refused by their count: no flow is decoded, so records that
    are not even flows (nil) are refused the same way."""
    document = echo_flood(5000, 3).whole()
    with pytest.raises(StateError, match="^5000 flows, more than the 1024 the flow table holds$"):
        admit.outline(document, Bounds.for_table(1024))
    assert _admit(document, Bounds.for_table(5000)).flows == 5000
    garbage = fmt.HEADER.pack(fmt.MAGIC, 1, 1) + b"\x81\xa5pairs\x91\x82\xa4pair\x00\xa4ping\xdc\x13\x88" + \
        b"\xc0" * 5000
    with pytest.raises(StateError, match="5000 flows, more than the 1024"):
        admit.outline(garbage, Bounds.for_table(1024))
    with pytest.raises(StateError, match=r"Expected `array`, got `None` - at `\$\.pairs\[0\]\.ping\[0\]`"):
        _admit(garbage, Bounds.for_table(5000))


def test_a_document_larger_than_the_bounds_is_refused() -> None:
    """One byte over the limit is refused before its header is looked at."""
    data = fmt.encode(STATE)
    assert _admit(data, Bounds(100, len(data))).flows == STATE.flow_count()
    with pytest.raises(StateError, match=f"^larger than the {len(data) - 1} bytes accepted for a table of 100 flows$"):
        admit.outline(data, Bounds(100, len(data) - 1))


@pytest.mark.parametrize(("state", "message"), [
    (DeviceState(pairs=[PairState(pair=2, tcp=[_tcp(1, SOCKET)] * 9 + [_tcp(1, guest=Side(Pif.GUEST, GUEST, 65536,
                                                                                          REMOTE, 443))])]),
     "Expected `int` <= 65535 - at `$.pairs[0].tcp[9].guest[2]`"),
    (DeviceState(pairs=[PairState(pair=2), PairState(pair=3, udp=[UDP] * 7 + [UdpState(UDP.host, UDP.guest)])]),
     "queue pair 3: UDP flow with sides of kinds 2 and 1"),
    (DeviceState(pairs=[PairState(pair=0, tcp=[_tcp(1, msgspec.structs.replace(SOCKET, not_sent=99))])]),
     "queue pair 0: TCP flow with 99 bytes not sent of a 18-byte send queue"),
    (DeviceState(pairs=[PairState(pair=1), PairState(pair=1)]), "queue pair 1 appears twice"),
    (DeviceState(pairs=[PairState(pair=fmt.MAX_PAIRS)]), "<= 255 - at `$.pairs[0].pair`"),
], ids=["range", "sides", "not-sent", "twice", "pair-index"])
def test_refusals_say_what_decode_says(state: DeviceState, message: str) -> None:
    """A flow that fails its type or its checks in any batch is refused with decode's message and path."""
    data = fmt.encode(state)
    with pytest.raises(StateError) as whole:
        fmt.decode(data)
    with pytest.raises(StateError) as stepped:
        _admit(data, batch=3)
    assert str(stepped.value) == str(whole.value) and message in str(whole.value)


def test_flow_lists_that_are_not_lists() -> None:
    """A list of flows that is something else is refused, named."""
    body = b"\x81\xa5pairs\x91\x82\xa4pair\x00\xa3udp\x05"
    with pytest.raises(StateError, match=r"Expected `array` - at `\$\.pairs\[0\]\.udp`"):
        admit.outline(fmt.HEADER.pack(fmt.MAGIC, 1, 1) + body, WIDE)
    claim = b"\x81\xa5pairs\x91\x82\xa4pair\x00\xa3tcp\xdd" + struct.pack("!I", fmt.MAX_FLOWS + 1)
    with pytest.raises(StateError):
        admit.outline(fmt.HEADER.pack(fmt.MAGIC, 1, 1) + claim, WIDE)


@FUZZ
@given(data=st.one_of(mutated(fmt.encode(STATE)), st.binary(max_size=200)))
def test_fuzz_admission_agrees_with_decode(data: bytes) -> None:
    """Mutated documents: admitted exactly when decode accepts them, with its message when not, and the
    parts decode to the pairs decode gives."""
    try:
        state = fmt.decode(data)
    except StateError as err:
        with pytest.raises(StateError) as stepped:
            _admit(data, batch=5)
        if str(err).startswith(("device state truncated", "not a shardswitch", "device state header",
                                "device state version")):
            assert str(stepped.value) == str(err)
        return
    admission = _admit(data, batch=5)
    assert admission.flows == state.flow_count()
    assert [fmt.decode_pair(admission.part(i)[1]) for i in range(len(state.pairs))] == state.pairs
