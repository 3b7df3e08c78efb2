"""Crafted device-state documents, as a hostile migration source sends them, and a writer that feeds them.

Theory of operation
-------------------
A migration source controls every byte of the device state the target reads.
:func:`echo_flood` makes a valid document (right magic, version, types) with
as many echo flows as asked, millions if need be, without ever holding it
whole: a :class:`Crafted` is its size and a generator of pieces, each flow a
record of 82 to 84 bytes (one 65,536-record block, made once, is repeated;
within a block every flow has its own echo identifier).  :func:`queue_flood`
makes one of a few TCP connections whose socket queues are as large as the
format lets each be, the zeros streamed likewise.

:class:`Feeder` is QEMU's side of a LOAD: it sends SET_DEVICE_STATE_FD with a
pipe and writes the pieces into it from a thread, counting the bytes the pipe
took; a refusal shows as a broken pipe (the switch closed its end), so a test
can assert that a document was refused before it was read whole
(``written < size``).  It can stop at a given byte count and wait
(:meth:`Feeder.resume`): a source that dribbles its document while the test
checks that the switch serves on meanwhile.  Nothing here measures time.
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache

import msgspec
from hypothesis import strategies as st

from shardswitch.coordinator.migration import REPLY_USE_YOUR_FD
from shardswitch.frontend.client import VhostUserFrontend
from shardswitch.migration import format as fmt
from shardswitch.net import inany
from shardswitch.shm.layout import Pif
from shardswitch.vhost.wire import TransferDirection
from tests.switchkit import check_state, set_state_fd

#: The guest and the gateway it pings (tests.switch.DEFAULT_ADDRESSING).
GUEST4, GATEWAY4 = inany.from_str("10.0.2.15"), inany.from_str("10.0.2.2")
#: Flows per block of distinct echo identifiers.
BLOCK = 1 << 16
#: Bytes a writer hands to the pipe at once.
WRITE_SIZE = 1 << 16


def echo_state(ident: int) -> fmt.PingState:
    """An echo flow of the guest's, identifier ``ident``, to the gateway."""
    return fmt.PingState(False, fmt.Side(Pif.GUEST, GUEST4, ident, GATEWAY4, 0),
                         fmt.Side(Pif.HOST, GATEWAY4, 0, inany.ANY6, 0))


@lru_cache(maxsize=2)
def _block(same: bool) -> tuple[bytes, list[int]]:
    """:data:`BLOCK` echo records back to back (identifiers 0 to BLOCK - 1, or all 7 when ``same``) and
    where each record ends (records are 82 to 84 bytes long, as msgspec encodes the identifier)."""
    records = [msgspec.msgpack.encode(echo_state(7 if same else ident)) for ident in range(BLOCK)]
    ends = [0]
    for record in records:
        ends.append(ends[-1] + len(record))
    return b"".join(records), ends


def _array(length: int) -> bytes:
    """A msgpack array header of 32-bit length (valid for any length)."""
    return b"\xdd" + struct.pack("!I", length)


@dataclass(frozen=True)
class Crafted:
    """A device-state document as pieces: ``flows`` flows, ``size`` bytes, never held whole."""

    flows: int
    size: int
    pieces: Callable[[], Iterator[bytes | memoryview]]

    def whole(self) -> bytes:
        """The document in one piece (small documents only)."""
        return b"".join(self.pieces())


_SEND, _RECV = b"<send queue here>", b"<recv queue here>"


def _connection(port: int) -> fmt.TcpState:
    """An established connection of the guest's, its socket state with marked queues."""
    sock = fmt.TcpSocketState(tcpi_state=1, tcpi_options=7, snd_ws=7, rcv_ws=7, mss=1460, timestamp=1,
                              seq_snd=1, seq_rcv=1, snd_wl1=1, snd_wnd=65535, max_window=65535, rcv_wnd=65535,
                              rcv_wup=1, send_queue=_SEND, recv_queue=_RECV)
    return fmt.TcpState(guest=fmt.Side(Pif.GUEST, GUEST4, port, GATEWAY4, 80),
                        host=fmt.Side(Pif.HOST, GATEWAY4, 80, GUEST4, port), isn=1, our_mss=1460, seq_to_guest=1,
                        seq_ack_from_guest=1, seq_from_guest=1, seq_ack_to_guest=1, mss=1460, ws_from_guest=7,
                        ws_to_guest=7, wnd_from_guest=65535, wnd_to_guest=65535, flags=1, socket=sock)


def queue_flood(connections: int) -> Crafted:
    """A valid document of ``connections`` TCP connections whose send and receive queues are each of the
    largest size the format accepts (:data:`~shardswitch.migration.format.MAX_QUEUE` zeros)."""
    zeros = memoryview(bytes(1 << 20))
    queue_head = b"\xc6" + struct.pack("!I", fmt.MAX_QUEUE)
    records = []
    for port in range(40000, 40000 + connections):
        record = msgspec.msgpack.encode(_connection(port))
        send, recv = record.index(bytes([0xC4, len(_SEND)]) + _SEND), record.index(bytes([0xC4, len(_RECV)]) + _RECV)
        assert send < recv
        records.append((record[:send], record[send + 2 + len(_SEND):recv], record[recv + 2 + len(_RECV):]))
    prefix = (fmt.HEADER.pack(fmt.MAGIC, fmt.VERSION, fmt.COMPAT_VERSION) + b"\x81\xa5pairs\x91\x82\xa4pair\x00"
              b"\xa3tcp" + _array(connections))

    def queue() -> Iterator[bytes | memoryview]:
        """One queue: its bin32 header, then its zeros a MiB at a time."""
        yield queue_head
        for _ in range(fmt.MAX_QUEUE // len(zeros)):
            yield zeros

    def pieces() -> Iterator[bytes | memoryview]:
        """The document: each connection's record with its two queues spliced in."""
        yield prefix
        for head, middle, tail in records:
            yield head
            yield from queue()
            yield middle
            yield from queue()
            yield tail

    size = len(prefix) + sum(len(h) + len(m) + len(t) + 2 * (len(queue_head) + fmt.MAX_QUEUE) for h, m, t in records)
    return Crafted(connections, size, pieces)


def echo_flood(flows: int, pairs: int = 1, *, same: bool = False) -> Crafted:
    """A valid document of ``flows`` echo flows over ``pairs`` queue pairs, each list within the format's
    per-list limit; ``same``: every flow is the same one (all but one fail to be re-created)."""
    shares = [flows // pairs + (p < flows % pairs) for p in range(pairs)]
    assert max(shares) <= fmt.MAX_FLOWS, "raise pairs: a list longer than the format's limit is not valid"
    data, ends = _block(same)
    prefix = fmt.HEADER.pack(fmt.MAGIC, fmt.VERSION, fmt.COMPAT_VERSION) + b"\x81\xa5pairs" + _array(pairs)

    def pair_head(pair: int, share: int) -> bytes:
        """A queue pair's map up to its echo flows."""
        return b"\x82\xa4pair" + msgspec.msgpack.encode(pair) + b"\xa4ping" + _array(share)

    def pieces() -> Iterator[bytes | memoryview]:
        """The document: its header, then each pair's head and its flows, block by block."""
        block = memoryview(data)
        yield prefix
        for pair, share in enumerate(shares):
            yield pair_head(pair, share)
            for start in range(0, share, BLOCK):
                yield block[:ends[min(BLOCK, share - start)]]

    size = len(prefix) + sum(len(pair_head(p, s)) + (s // BLOCK) * len(data) + ends[s % BLOCK]
                             for p, s in enumerate(shares))
    return Crafted(flows, size, pieces)


class Feeder:
    """QEMU's side of a LOAD: the document written into the switch's pipe from a thread."""

    def __init__(self, fe: VhostUserFrontend, document: Crafted | bytes, *, pause_at: int | None = None) -> None:
        """Feed ``document`` through ``fe``; ``pause_at``: stop after that many bytes until :meth:`resume`."""
        self.fe = fe
        self.document = document if isinstance(document, Crafted) else \
            Crafted(0, len(document), lambda: iter([document]))
        self.pause_at = pause_at
        #: Bytes the pipe took, and whether the switch closed it before the end (refused).
        self.written = 0
        self.broken = False
        self.paused = threading.Event()
        self._resume = threading.Event()
        self._fd = -1
        self._thread = threading.Thread(target=self._write, daemon=True)

    def start(self) -> "Feeder":
        """SET_DEVICE_STATE_FD (LOAD) with a new pipe, then start writing."""
        read_end, self._fd = os.pipe()
        try:
            assert set_state_fd(self.fe, TransferDirection.LOAD, read_end) == REPLY_USE_YOUR_FD
        finally:
            os.close(read_end)
        self._thread.start()
        return self

    def _write(self) -> None:
        """Write every piece (pausing once at ``pause_at``), then close: end of file."""
        try:
            for piece in self.document.pieces():
                view = memoryview(piece)
                while view:
                    if self.pause_at is not None and self.written >= self.pause_at:
                        self.paused.set()
                        self._resume.wait()
                        self.pause_at = None
                    step = WRITE_SIZE if self.pause_at is None else min(WRITE_SIZE, self.pause_at - self.written)
                    done = os.write(self._fd, view[:step])
                    self.written += done
                    view = view[done:]
        except BrokenPipeError:
            self.broken = True
        finally:
            self.paused.set()
            os.close(self._fd)

    def resume(self) -> None:
        """Let a paused writer go on."""
        self._resume.set()

    def finish(self, timeout: float = 60.0) -> "Feeder":
        """Wait for the writer to end (the whole document written, or the pipe broken)."""
        self._resume.set()
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the switch neither read the document nor closed the pipe"
        return self


def feed(fe: VhostUserFrontend, document: Crafted | bytes) -> tuple[int, Feeder]:
    """Load ``document`` as QEMU does: CHECK_DEVICE_STATE's answer and the finished feeder."""
    feeder = Feeder(fe, document).start().finish()
    return check_state(fe), feeder


@st.composite
def mutated(draw: st.DrawFn, template: bytes) -> bytes:
    """``template`` with a few bytes flipped, overwritten, inserted or deleted."""
    data = bytearray(template)
    for _ in range(draw(st.integers(1, 6))):
        op, pos = draw(st.sampled_from(["flip", "set", "insert", "delete"])), draw(st.integers(0, len(data)))
        if op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=4))
        elif pos < len(data):
            if op == "delete":
                del data[pos:pos + draw(st.integers(1, 4))]
            elif op == "flip":
                data[pos] ^= 1 << draw(st.integers(0, 7))
            else:
                data[pos] = draw(st.integers(0, 255))
    return bytes(data)
