"""pcap files (shardswitch/pcap.py), read back by scapy as an independent decoder."""

from __future__ import annotations

import os
import time
from pathlib import Path

from scapy.layers.l2 import Ether
from scapy.utils import rdpcap

from shardswitch import pcap

FRAME = bytes(Ether(dst="52:54:00:12:34:56", src="9a:55:9a:55:9a:55") / (b"x" * 100))


def test_records_read_back(tmp_path: Path) -> None:
    """Whole frames, frames in pieces and a frame past the snap length: scapy reads each with its length
    and a timestamp of now; one write per flush."""
    fds = pcap.open_pair(str(tmp_path / "c.pcap"))
    writer = pcap.PcapWriter(os.dup(fds[0]))
    writer.add(FRAME)
    view = memoryview(FRAME)
    writer.add_views([view[:10], view[10:60], view[60:]], len(FRAME))
    big = FRAME + b"y" * (pcap.SNAPLEN + 10 - len(FRAME))
    writer.add(big)
    assert os.fstat(fds[0]).st_size == pcap.GLOBAL_HEADER.size      # buffered until the flush
    writer.close()
    packets = rdpcap(str(tmp_path / "c.pcap"))
    assert [bytes(p) for p in packets[:2]] == [FRAME, FRAME]
    assert all(abs(float(p.time) - time.time()) < 60 for p in packets)
    # scapy reads at most 65535 bytes of a record: the third record's header, read directly.
    data = (tmp_path / "c.pcap").read_bytes()
    third = pcap.GLOBAL_HEADER.size + 2 * (pcap.RECORD.size + len(FRAME))
    _sec, _usec, kept, length = pcap.RECORD.unpack_from(data, third)
    assert (kept, length) == (pcap.SNAPLEN, len(big)) and len(data) == third + pcap.RECORD.size + kept
    assert writer.frames == 3 and writer.lost == 0
    for fd in fds:
        os.close(fd)


def test_rotation_alternates_between_the_two_files(tmp_path: Path) -> None:
    """Past the limit the other file is emptied, gets its header and becomes current; looks happen once a
    second; without a limit never."""
    path = tmp_path / "c.pcap"
    files = pcap.CaptureFiles(pcap.open_pair(str(path)), pcap.MIN_SIZE, str(path))
    writer = pcap.PcapWriter(os.dup(files.fd))
    for _ in range(pcap.MIN_SIZE // len(FRAME) + 10):
        writer.add(FRAME)
    writer.close()
    assert files.due(10.0) == (True, pcap.CHECK_INTERVAL)
    assert files.due(10.5) == (False, 0.5)
    first = len(rdpcap(str(path)))
    files.rotate()
    assert files.current == 1 and files.rotations == 1
    writer = pcap.PcapWriter(os.dup(files.fd))
    writer.add(FRAME)
    writer.close()
    assert len(rdpcap(str(path) + ".1")) == 1 and len(rdpcap(str(path))) == first
    files.rotate()
    assert files.current == 0 and os.path.getsize(path) == pcap.GLOBAL_HEADER.size
    files.close()
    unbounded = pcap.CaptureFiles(pcap.open_pair(str(tmp_path / "u.pcap")), 0, "u")
    assert unbounded.due(0.0) == (False, pcap.CHECK_INTERVAL)
    unbounded.close()
