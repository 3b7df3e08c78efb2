"""The live-migration device-state document (shardswitch.migration.format): round trips, refusals, fuzzing.

The document comes from the front-end (QEMU's pipe), so :func:`~shardswitch.migration.format.decode` must
return a whole, checked state or raise :class:`~shardswitch.migration.format.StateError` naming the problem,
whatever the bytes; :func:`~shardswitch.migration.format.decode_pair` (a worker's flows) likewise.  The fuzz
properties follow tests/net/test_net_fuzz.py: ``SHARDSWITCH_FUZZ_EXAMPLES`` examples (default 10,000, what
CI runs), derandomized, no example database.
"""

from __future__ import annotations

import os
import re
import struct

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shardswitch.migration import format as fmt
from shardswitch.migration.format import (DeviceState, PairState, PingState, Side, StateError, TcpSocketState,
                                          TcpState, UdpState)
from shardswitch.net import inany
from shardswitch.shm.layout import Pif
from tests.migration.statekit import mutated

EXAMPLES = int(os.environ.get("SHARDSWITCH_FUZZ_EXAMPLES", "10000"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                suppress_health_check=list(HealthCheck))
FUZZ_PART = settings(FUZZ, max_examples=max(1, EXAMPLES // 4))

GUEST4, REMOTE4, LOCAL4 = inany.from_str("10.0.2.15"), inany.from_str("93.184.216.34"), inany.from_str("10.0.0.5")
GUEST6, REMOTE6, LOCAL6 = inany.from_str("2001:db8::15"), inany.from_str("2606:4700::1"), inany.from_str("2001:db8::5")
#: A send queue whose msgpack header the limit test rewrites (a marker unlikely elsewhere in a document).
MARKER = b"@@send-queue@@"

SOCKET4 = TcpSocketState(tcpi_state=1, tcpi_options=7, snd_ws=7, rcv_ws=9, mss=1460, timestamp=0x1234ABCD,
                         seq_snd=0xFFFFFF00, seq_rcv=77, snd_wl1=77, snd_wnd=64240, max_window=65535,
                         rcv_wnd=131072, rcv_wup=77, send_queue=b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", not_sent=9,
                         recv_queue=b"HTTP/1.1 200 OK\r\n" * 20)
SOCKET6 = TcpSocketState(tcpi_state=4, tcpi_options=3, snd_ws=14, rcv_ws=0, mss=1440, timestamp=0, seq_snd=1,
                         seq_rcv=0xFFFFFFFF, snd_wl1=0, snd_wnd=0, max_window=0xFFFFFFFF, rcv_wnd=0, rcv_wup=0,
                         send_queue=MARKER, not_sent=len(MARKER))


def _tcp(guest: bytes, remote: bytes, local: bytes, port: int, sock: TcpSocketState | None) -> TcpState:
    """A connection from the guest's ``port`` to ``remote`` port 443, as FlowMigration._tcp_record makes it."""
    return TcpState(guest=Side(Pif.GUEST, guest, port, remote, 443), host=Side(Pif.HOST, remote, 443, local, port),
                    inbound=sock is None, isn=0xDEADBEEF, our_mss=65480, seq_to_guest=0xDEADBEF0,
                    seq_ack_from_guest=0xDEADBEF0, seq_from_guest=1000, seq_ack_to_guest=1000, mss=1460,
                    ws_from_guest=7, ws_to_guest=14, wnd_from_guest=0xFFFFFFFF, wnd_to_guest=65535, flags=0x81,
                    socket=sock)


PAIR0 = PairState(
    pair=0,
    tcp=[_tcp(GUEST4, REMOTE4, LOCAL4, 40000, SOCKET4), _tcp(GUEST6, REMOTE6, LOCAL6, 65535, SOCKET6),
         _tcp(GUEST4, REMOTE4, LOCAL4, 40001, None)],
    udp=[UdpState(Side(Pif.GUEST, GUEST4, 5353, REMOTE4, 53), Side(Pif.HOST, REMOTE4, 53, inany.ANY6, 41000))],
    ping=[PingState(False, Side(Pif.GUEST, GUEST4, 7, REMOTE4, 0), Side(Pif.HOST, REMOTE4, 0, inany.ANY6, 9)),
          PingState(True, Side(Pif.GUEST, GUEST6, 8, REMOTE6, 0), Side(Pif.HOST, REMOTE6, 0, inany.ANY6, 10))])
PAIR1 = PairState(pair=1, tcp=[_tcp(GUEST6, REMOTE6, LOCAL6, 50000, None)],
                  udp=[UdpState(Side(Pif.GUEST, GUEST6, 546, REMOTE6, 547),
                                Side(Pif.HOST, REMOTE6, 547, LOCAL6, 546))])
STATE = DeviceState(guest_mac=bytes.fromhex("525400123456"), guest6=GUEST6, pairs=[PAIR0, PAIR1])
SMALL = DeviceState(pairs=[PairState(pair=3, udp=[PAIR0.udp[0]])])


def _header(version: int = fmt.VERSION, compat: int = fmt.COMPAT_VERSION) -> bytes:
    """A document header."""
    return fmt.HEADER.pack(fmt.MAGIC, version, compat)


def _first_tcp(**changes: object) -> DeviceState:
    """STATE with its first TCP record changed."""
    tcp = msgspec.structs.replace(PAIR0.tcp[0], **changes)
    return msgspec.structs.replace(STATE, pairs=[msgspec.structs.replace(PAIR0, tcp=[tcp, *PAIR0.tcp[1:]]), PAIR1])


def _first_socket(**changes: object) -> DeviceState:
    """STATE with the socket state of its first TCP record changed."""
    return _first_tcp(socket=msgspec.structs.replace(SOCKET4, **changes))


def test_document_round_trip() -> None:
    """A realistic two-pair state comes back equal, behind a version-1 header."""
    data = fmt.encode(STATE)
    assert data[:fmt.HEADER.size] == _header()
    assert fmt.decode(data) == STATE
    assert fmt.decode(memoryview(data)) == STATE
    assert fmt.decode(fmt.encode(DeviceState())) == DeviceState()
    assert fmt.decode(data).flow_count() == 8


def test_pair_round_trip() -> None:
    """Each pair's flows alone come back equal."""
    for pair in (PAIR0, PAIR1, PairState(pair=fmt.MAX_PAIRS - 1)):
        assert fmt.decode_pair(fmt.encode_pair(pair)) == pair
        assert fmt.decode_pair(memoryview(fmt.encode_pair(pair))) == pair


@pytest.mark.parametrize("size", range(fmt.HEADER.size))
def test_truncated_header(size: int) -> None:
    """Empty input and every cut inside the header are refused as truncated."""
    with pytest.raises(StateError, match=f"truncated: {size} bytes, less than its 16-byte header"):
        fmt.decode(fmt.encode(STATE)[:size])


def test_truncated_body() -> None:
    """A document cut anywhere in its body (every offset of a small one, several of a large one) is refused."""
    small = fmt.encode(SMALL)
    for cut in range(fmt.HEADER.size, len(small)):
        with pytest.raises(StateError, match="device state body .*truncated"):
            fmt.decode(small[:cut])
    large = fmt.encode(STATE)
    for cut in (fmt.HEADER.size, fmt.HEADER.size + 1, 100, len(large) // 2, len(large) - 2, len(large) - 1):
        with pytest.raises(StateError, match="device state body .*truncated"):
            fmt.decode(large[:cut])


def test_truncated_pair() -> None:
    """A pair's flows cut at any offset are refused."""
    data = fmt.encode_pair(PAIR0)
    for cut in range(len(data)):
        with pytest.raises(StateError, match="flows of a queue pair: .*truncated"):
            fmt.decode_pair(data[:cut])


def test_bad_magic() -> None:
    """A foreign document is refused, the magic it had quoted."""
    data = b"NOTOURS!" + fmt.encode(STATE)[8:]
    with pytest.raises(StateError, match=re.escape("not a shardswitch device state (magic b'NOTOURS!')")):
        fmt.decode(data)


@pytest.mark.parametrize(("version", "compat"), [(1, 0), (0, 0), (1, 2), (7, 9)])
def test_inconsistent_header(version: int, compat: int) -> None:
    """A compat version of 0 or above the document's own version is refused."""
    with pytest.raises(StateError, match=f"header: version {version}, compatible down to {compat}"):
        fmt.decode(_header(version, compat) + fmt.encode(STATE)[fmt.HEADER.size:])


@pytest.mark.parametrize("compat", [fmt.VERSION + 1, 0xFFFFFFFF])
def test_future_document_refused(compat: int) -> None:
    """A document only a newer reader can read is refused, saying which version it needs."""
    with pytest.raises(StateError, match=f"needs a reader of version {compat} or later; this one reads version 1"):
        fmt.decode(_header(compat, compat) + fmt.encode(STATE)[fmt.HEADER.size:])


def test_newer_readable_document_accepted() -> None:
    """A newer version still readable by version 1 (compat 1) is read; its new fields are ignored."""
    body = msgspec.msgpack.encode({**msgspec.structs.asdict(STATE), "added_in_v2": {"x": [1, 2, 3]}})
    assert fmt.decode(_header(fmt.VERSION + 1, fmt.VERSION) + body) == STATE
    assert fmt.decode(_header(0xFFFFFFFF, 1) + fmt.encode(STATE)[fmt.HEADER.size:]) == STATE


def test_trailing_garbage() -> None:
    """Bytes after the body are refused, in a document and in a pair's flows."""
    with pytest.raises(StateError, match="device state body .*trailing characters"):
        fmt.decode(fmt.encode(STATE) + b"\x00")
    with pytest.raises(StateError, match="flows of a queue pair: .*trailing characters"):
        fmt.decode_pair(fmt.encode_pair(PAIR0) + b"\xc0")


def test_size_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """A document over MAX_STATE (read at call time, so lowered here) is refused before anything is decoded."""
    data = fmt.encode(STATE)
    monkeypatch.setattr(fmt, "MAX_STATE", len(data))
    assert fmt.decode(data) == STATE
    monkeypatch.setattr(fmt, "MAX_STATE", len(data) - 1)
    with pytest.raises(StateError, match=f"of {len(data)} bytes: more than the {len(data) - 1} accepted"):
        fmt.decode(data)
    monkeypatch.setattr(fmt, "MAX_STATE", 100)
    with pytest.raises(StateError, match="of 101 bytes: more than the 100 accepted"):
        fmt.decode(b"garbage!" * 12 + b"xyzxy")


TCP0 = "$.pairs[0].tcp[0]"


@pytest.mark.parametrize(("state", "expected", "path"), [
    (_first_tcp(guest=Side(Pif.GUEST, GUEST4, 65536, REMOTE4, 443)), "<= 65535", f"{TCP0}.guest[2]"),
    (_first_tcp(host=Side(Pif.HOST, REMOTE4, 443, LOCAL4, -1)), ">= 0", f"{TCP0}.host[4]"),
    (_first_tcp(guest=Side(Pif.GUEST, GUEST4[1:], 1, REMOTE4, 443)), "length >= 16", f"{TCP0}.guest[1]"),
    (_first_tcp(host=Side(Pif.HOST, REMOTE4, 443, LOCAL4 + b"\0", 1)), "length <= 16", f"{TCP0}.host[3]"),
    (_first_tcp(guest=Side(256, GUEST4, 1, REMOTE4, 443)), "<= 255", f"{TCP0}.guest[0]"),
    (_first_tcp(ws_to_guest=15), "<= 14", f"{TCP0}.ws_to_guest"),
    (_first_tcp(isn=1 << 32), "<= 4294967295", f"{TCP0}.isn"),
    (_first_socket(snd_ws=15), "<= 14", f"{TCP0}.socket.snd_ws"),
    (_first_socket(not_sent=-1), ">= 0", f"{TCP0}.socket.not_sent"),
    (msgspec.structs.replace(STATE, guest_mac=bytes(5)), "length >= 6", "$.guest_mac"),
    (msgspec.structs.replace(STATE, guest6=bytes(4)), "length >= 16", "$.guest6"),
    (msgspec.structs.replace(STATE, pairs=[PairState(pair=fmt.MAX_PAIRS)]), "<= 255", "$.pairs[0].pair"),
    (msgspec.structs.replace(STATE, pairs=[PairState(pair=i % 256) for i in range(fmt.MAX_PAIRS + 1)]),
     "length <= 256", "$.pairs"),
], ids=["port", "negative-port", "short-addr", "long-addr", "pif", "ws", "u32", "sock-ws", "not-sent", "mac",
        "guest6", "pair-index", "too-many-pairs"])
def test_out_of_range(state: DeviceState, expected: str, path: str) -> None:
    """A value outside its type's range or length is refused, naming the value's path."""
    match = re.escape("device state body (version 1): Expected `") + ".*" + re.escape(f"{expected} - at `{path}`")
    with pytest.raises(StateError, match=match):
        fmt.decode(fmt.encode(state))


def test_not_sent_beyond_send_queue() -> None:
    """More bytes not sent than the send queue holds is refused; exactly all of it is accepted."""
    bad = _first_socket(not_sent=len(SOCKET4.send_queue) + 1)
    match = f"queue pair 0: TCP flow with {len(SOCKET4.send_queue) + 1} bytes not sent of a 27-byte send queue"
    with pytest.raises(StateError, match=match):
        fmt.decode(fmt.encode(bad))
    with pytest.raises(StateError, match=match):
        fmt.decode_pair(fmt.encode_pair(bad.pairs[0]))
    assert fmt.decode(fmt.encode(_first_socket(not_sent=len(SOCKET4.send_queue)))).pairs[0].tcp[0].socket


@pytest.mark.parametrize("kind", ["TCP", "UDP", "echo"])
@pytest.mark.parametrize(("guest_pif", "host_pif"), [(Pif.HOST, Pif.GUEST), (Pif.GUEST, Pif.GUEST),
                                                     (Pif.NONE, Pif.HOST), (Pif.GUEST, 3)])
def test_wrong_interface_kind(kind: str, guest_pif: int, host_pif: int) -> None:
    """A flow whose guest side is not the guest's, or host side not the host's, is refused."""
    guest, host = Side(guest_pif, GUEST4, 1, REMOTE4, 2), Side(host_pif, REMOTE4, 2, LOCAL4, 1)
    tcp = msgspec.structs.replace(PAIR0.tcp[0], guest=guest, host=host)
    pair = PairState(pair=5, tcp=[tcp] * (kind == "TCP"), udp=[UdpState(guest, host)] * (kind == "UDP"),
                     ping=[PingState(False, guest, host)] * (kind == "echo"))
    match = f"queue pair 5: {kind} flow with sides of kinds {int(guest_pif)} and {int(host_pif)}"
    with pytest.raises(StateError, match=match):
        fmt.decode(fmt.encode(DeviceState(pairs=[PAIR1, pair])))
    with pytest.raises(StateError, match=match):
        fmt.decode_pair(fmt.encode_pair(pair))


def test_duplicate_pair() -> None:
    """The same queue pair twice is refused."""
    with pytest.raises(StateError, match="queue pair 1 appears twice"):
        fmt.decode(fmt.encode(DeviceState(pairs=[PAIR1, PAIR0, PAIR1])))


def test_too_many_flows_and_queue_too_long() -> None:
    """Lists over MAX_FLOWS and queues over MAX_QUEUE are refused from their msgpack length alone."""
    claim = struct.pack("!I", fmt.MAX_FLOWS + 1)
    for key in (b"tcp", b"udp", b"ping"):
        data = b"\x82\xa4pair\x00" + bytes([0xA0 | len(key)]) + key + b"\xdd" + claim
        with pytest.raises(StateError, match=rf"length <= {fmt.MAX_FLOWS} - at `\$\.{key.decode()}`"):
            fmt.decode_pair(data)
    data = fmt.encode(STATE)
    cut = data.index(b"\xc4" + bytes([len(MARKER)]) + MARKER)
    data = data[:cut] + b"\xc6" + struct.pack("!I", fmt.MAX_QUEUE + 1)
    path = re.escape("`$.pairs[0].tcp[1].socket.send_queue`")
    with pytest.raises(StateError, match=rf"length <= {fmt.MAX_QUEUE} - at {path}"):
        fmt.decode(data)


def test_deep_nesting_refused() -> None:
    """Values nested beyond the interpreter's recursion limit (in a field the reader skips) give StateError."""
    deep = b"\x91" * 100_000 + b"\xc0"
    with pytest.raises(StateError, match="device state body .*recursion"):
        fmt.decode(_header() + b"\x81\xa5extra" + deep)
    with pytest.raises(StateError, match="flows of a queue pair: .*recursion"):
        fmt.decode_pair(b"\x82\xa4pair\x00\xa5extra" + deep)


def _check_decode(data: bytes) -> None:
    """decode returns a state that round-trips, or raises StateError; nothing else."""
    try:
        state = fmt.decode(data)
    except StateError:
        return
    assert fmt.decode(fmt.encode(state)) == state


def _check_decode_pair(data: bytes) -> None:
    """decode_pair returns flows that round-trip, or raises StateError; nothing else."""
    try:
        pair = fmt.decode_pair(data)
    except StateError:
        return
    assert fmt.decode_pair(fmt.encode_pair(pair)) == pair


HEADED = st.builds(lambda version, compat, body: _header(version, compat) + body,
                   st.sampled_from([0, 1, 2, 0xFFFFFFFF]), st.sampled_from([0, 1, 2]), st.binary(max_size=300))


@FUZZ
@given(data=st.one_of(st.binary(max_size=300), HEADED))
def test_fuzz_decode(data: bytes) -> None:
    """Arbitrary bytes, and bytes behind a header: a state or StateError."""
    _check_decode(data)


@FUZZ_PART
@given(data=st.binary(max_size=300))
def test_fuzz_decode_pair(data: bytes) -> None:
    """Arbitrary bytes as a pair's flows: flows or StateError."""
    _check_decode_pair(data)


@FUZZ
@given(doc=st.one_of(mutated(fmt.encode(STATE)), mutated(fmt.encode(SMALL))),
       pair=st.one_of(mutated(fmt.encode_pair(PAIR0)), mutated(fmt.encode_pair(PAIR1))))
def test_fuzz_mutations(doc: bytes, pair: bytes) -> None:
    """Valid documents and pair flows with bytes flipped, inserted or deleted: a value or StateError."""
    _check_decode(doc)
    _check_decode_pair(pair)
