"""Admitting a device state from its source: bounds tied to the target's flow table, checks in steps.

Theory of operation
-------------------
The migration source controls every byte of the document the target reads.
Two bounds make what it can cost the target proportional to what the target
could hold anyway (:class:`Bounds`, from the flow table's capacity, the
``--max-flows`` setting):

* *flows*: no more than the table holds, every queue pair and kind together;
* *bytes*: each of those flows at its largest record (:data:`FLOW_BYTES`),
  an allowance for the contents of the TCP socket queues that move with the
  connections (:data:`QUEUE_BYTES`) and the envelope of the most queue pairs
  a document names, never more than
  :data:`~shardswitch.migration.format.MAX_STATE`.  The reader stops at this
  many bytes (:mod:`shardswitch.coordinator.migration`).

A document within them is then checked in steps, none costing more than
:data:`BATCH` flows, so that the coordinator serves between them:

1. :func:`outline`, one call: the header, then the body's outline: the
   guest's addresses, the queue pairs and each pair's lists of flows as raw
   bytes (msgspec skips their contents in C and makes no object per flow;
   each list's length is in its msgpack header).  More flows than the bounds
   allow is refused here, before any flow is decoded.
2. :class:`Admission` splits each list into raw records (one small object
   per flow, so at most the table's capacity of them), and each
   :meth:`Admission.step` decodes at most :data:`BATCH` of them with their
   types and checks (:func:`~shardswitch.migration.format.check_flows`), then
   lets the decoded records go.
3. :meth:`Admission.part` then gives each queue pair's flows for its worker:
   the checked records as they came, encoded as
   :func:`~shardswitch.migration.format.encode_pair` encodes a pair (the
   worker decodes and checks them once more).

Any failure is a :class:`~shardswitch.migration.format.StateError` naming
what is wrong, with the value's path as :func:`~shardswitch.migration.format.decode`
gives it; nothing is applied until every step has passed.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from typing import Annotated, Any

import msgspec

from shardswitch.migration import format as fmt

#: Flows decoded and checked per step.
BATCH = 4096
#: The largest record of one flow without its queues' contents: a TCP connection with every field at its widest
#: encodes in 508 bytes; the rest is room for the fields a newer version may add (older readers skip them).
FLOW_BYTES = 640
#: Allowance for the contents of TCP socket queues in one document: the queues of four connections at
#: :data:`~shardswitch.migration.format.MAX_QUEUE` each, or of many smaller ones.
QUEUE_BYTES = 4 * fmt.MAX_QUEUE
#: The envelope: header, guest addresses, and each queue pair's map with its three list headers.
ENVELOPE_BYTES = 256
PAIR_BYTES = 64
StateError = fmt.StateError
_KINDS = ("tcp", "udp", "ping")
_NAMES = {"tcp": "TCP", "udp": "UDP", "ping": "echo"}
_EMPTY = msgspec.Raw(b"\x90")


@dataclass(frozen=True)
class Bounds:
    """What a target admits: at most ``flows`` flows in at most ``size`` bytes."""

    flows: int
    size: int

    @classmethod
    def for_table(cls, capacity: int) -> "Bounds":
        """The bounds of a target whose flow table holds ``capacity`` flows (see the module's docstring)."""
        size = ENVELOPE_BYTES + fmt.MAX_PAIRS * PAIR_BYTES + capacity * FLOW_BYTES + QUEUE_BYTES
        return cls(capacity, min(size, fmt.MAX_STATE))

    def describe(self) -> str:
        """The bounds in words, for refusals."""
        return f"the {self.size} bytes accepted for a table of {self.flows} flows"


class _PairOutline(msgspec.Struct, kw_only=True):
    """A queue pair of the document with its lists of flows undecoded."""

    pair: Annotated[int, msgspec.Meta(ge=0, lt=fmt.MAX_PAIRS)]
    tcp: msgspec.Raw = _EMPTY
    udp: msgspec.Raw = _EMPTY
    ping: msgspec.Raw = _EMPTY


class _Outline(msgspec.Struct, kw_only=True):
    """The document's body with its flows undecoded (the fields of :class:`~.format.DeviceState`)."""

    guest_mac: fmt.Mac | None = None
    guest6: fmt.Addr16 | None = None
    pairs: Annotated[list[_PairOutline], msgspec.Meta(max_length=fmt.MAX_PAIRS)] = []


_OUTLINE = msgspec.msgpack.Decoder(_Outline)
_SPLIT = msgspec.msgpack.Decoder(list[msgspec.Raw])
_RECORDS: dict[str, msgspec.msgpack.Decoder[Any]] = {
    "tcp": msgspec.msgpack.Decoder(list[fmt.TcpState]), "udp": msgspec.msgpack.Decoder(list[fmt.UdpState]),
    "ping": msgspec.msgpack.Decoder(list[fmt.PingState])}
_ENCODER = msgspec.msgpack.Encoder()
_AT_RECORD = re.compile(r"`\$\[(\d+)\]")


def _array_header(length: int) -> bytes:
    """The msgpack header of an array of ``length`` items."""
    if length < 16:
        return bytes([0x90 | length])
    if length < 1 << 16:
        return b"\xdc" + struct.pack("!H", length)
    return b"\xdd" + struct.pack("!I", length)


def _array_length(raw: msgspec.Raw, where: str, version: int) -> int:
    """The item count in the msgpack header of the array ``raw`` (StateError naming ``where`` if not one)."""
    head = memoryview(raw)[:5]
    kind = head[0] if head else 0xC1
    if 0x90 <= kind <= 0x9F:
        return kind & 0x0F
    if kind == 0xDC and len(head) >= 3:
        return int(struct.unpack_from("!H", head, 1)[0])
    if kind == 0xDD and len(head) >= 5:
        return int(struct.unpack_from("!I", head, 1)[0])
    raise StateError(f"device state body (version {version}): Expected `array` - at `{where}`")


@dataclass
class _List:
    """One list of flows of the document: its queue pair, its kind and its records, still raw."""

    index: int
    pair: int
    kind: str
    raw: msgspec.Raw
    length: int
    records: list[msgspec.Raw] | None = None


class Admission:
    """A document whose outline passed, its flows checked :data:`BATCH` at a time (see the module's docstring)."""

    def __init__(self, outline: _Outline, lists: list[_List], version: int, size: int) -> None:
        """From :func:`outline`."""
        self.guest_mac = outline.guest_mac
        self.guest6 = outline.guest6
        self.pairs = [p.pair for p in outline.pairs]
        self.version = version
        #: The document's size in bytes, and its flows.
        self.size = size
        self.flows = sum(entry.length for entry in lists)
        self._lists = lists
        self._next = 0
        self._done_in_list = 0
        #: Flows checked so far.
        self.checked = 0

    @property
    def done(self) -> bool:
        """Every flow has been checked."""
        return self._next >= len(self._lists)

    def step(self, batch: int = BATCH) -> bool:
        """Check at most ``batch`` more flows (StateError when one is wrong); whether all are checked now."""
        left = batch
        while left > 0 and not self.done:
            entry = self._lists[self._next]
            if entry.records is None:
                entry.records = self._split(entry)
                left -= 1
                continue
            start = self._done_in_list
            chunk = entry.records[start:start + left]
            self._check(entry, start, chunk)
            self._done_in_list += len(chunk)
            self.checked += len(chunk)
            left -= len(chunk)
            if self._done_in_list >= entry.length:
                self._next += 1
                self._done_in_list = 0
        return self.done

    def _split(self, entry: _List) -> list[msgspec.Raw]:
        """A list's records, each still raw (C speed: one small object per record)."""
        try:
            records = _SPLIT.decode(entry.raw)
        except (msgspec.DecodeError, RecursionError) as err:
            raise StateError(f"device state body (version {self.version}): "
                             f"{_at(err, entry.index, entry.kind, 0)}") from None
        if len(records) != entry.length:           # cannot be: the header gave the length
            raise StateError(f"queue pair {entry.pair}: {len(records)} {_NAMES[entry.kind]} flows, "
                             f"not the {entry.length} announced")
        return records

    def _check(self, entry: _List, start: int, chunk: list[msgspec.Raw]) -> None:
        """Decode ``chunk`` with its types and check what they cannot say; the records then go."""
        data = _array_header(len(chunk)) + b"".join(chunk)
        try:
            records = _RECORDS[entry.kind].decode(data)
        except (msgspec.DecodeError, RecursionError) as err:
            raise StateError(f"device state body (version {self.version}): "
                             f"{_at(err, entry.index, entry.kind, start)}") from None
        if entry.kind == "tcp":
            fmt.check_flows(entry.pair, tcp=records)
        elif entry.kind == "udp":
            fmt.check_flows(entry.pair, udp=records)
        else:
            fmt.check_flows(entry.pair, ping=records)

    def part(self, index: int) -> tuple[int, bytes]:
        """The ``index``-th queue pair of the document and its flows for its worker (once all are checked)."""
        assert self.done, "flows not checked yet"
        pair = self.pairs[index]
        lists = {entry.kind: entry.records for entry in self._lists if entry.index == index}
        pieces = [b"\x84\xa4pair", _ENCODER.encode(pair)]
        for kind in _KINDS:
            records = lists.get(kind) or []
            pieces += [_ENCODER.encode(kind), _array_header(len(records)), *records]
        return pair, b"".join(pieces)


def _at(err: Exception, index: int, kind: str, start: int) -> str:
    """msgspec's message about a batch of records, its path made the document's (``$[i]`` is flow start+i)."""
    return _AT_RECORD.sub(lambda m: f"`$.pairs[{index}].{kind}[{start + int(m[1])}]", str(err))


def outline(data: bytes | bytearray | memoryview, bounds: Bounds) -> Admission:
    """Check ``data``'s size, header and outline against ``bounds``; the admission that checks its flows.

    StateError when the document is larger than ``bounds`` allow, is not one
    of ours, has a version this reader cannot read, does not decode as an
    outline, or names more flows than ``bounds`` allow.
    """
    size = len(data)
    if size > bounds.size:
        raise StateError(f"larger than {bounds.describe()}")
    version = fmt.check_header(data)
    try:
        body = _OUTLINE.decode(memoryview(data)[fmt.HEADER.size:])
    except (msgspec.DecodeError, RecursionError) as err:
        raise StateError(f"device state body (version {version}): {err}") from None
    seen: set[int] = set()
    lists: list[_List] = []
    for index, pair in enumerate(body.pairs):
        if pair.pair in seen:
            raise StateError(f"queue pair {pair.pair} appears twice")
        seen.add(pair.pair)
        for kind in _KINDS:
            raw = getattr(pair, kind)
            length = _array_length(raw, f"$.pairs[{index}].{kind}", version)
            if length > fmt.MAX_FLOWS:
                raise StateError(f"device state body (version {version}): Expected `array` of length <= "
                                 f"{fmt.MAX_FLOWS} - at `$.pairs[{index}].{kind}`")
            if length:
                lists.append(_List(index, pair.pair, kind, raw, length))
    flows = sum(entry.length for entry in lists)
    if flows > bounds.flows:
        raise StateError(f"{flows} flows, more than the {bounds.flows} the flow table holds")
    return Admission(body, lists, version, size)
