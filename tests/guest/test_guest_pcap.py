"""Packet capture of a real guest's traffic (issue 12, acceptance 1): ``--pcap`` during two HTTP downloads,
one per queue pair, read back by tcpdump and by a record-by-record parse, against ``shardswitch status``."""

from __future__ import annotations

import hashlib
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from shardswitch import pcap
from shardswitch.settings import DEFAULT_MAC
from tests.conftest import in_ci
from tests.guest.image import GuestImage
from tests.guest.netns import TestNetns
from tests.guest.servers import HTTP_PORT, serve_blob
from tests.guest.vm import GuestVM
from tests.switch import Switch
from tests.guest.scripts import GATEWAY, WARM_UP

pytestmark = pytest.mark.guest

BLOB_MB = 4
OUR_MAC = bytes.fromhex(DEFAULT_MAC.replace(":", ""))


def records(path: Path) -> list[tuple[int, int, bytes]]:
    """Every record of a capture file: (captured length, original length, frame)."""
    data = path.read_bytes()
    magic, _major, _minor, _zone, _sigfigs, snaplen, linktype = pcap.GLOBAL_HEADER.unpack_from(data)
    assert (magic, snaplen, linktype) == (pcap.MAGIC, pcap.SNAPLEN, pcap.LINKTYPE_ETHERNET)
    found, offset = [], pcap.GLOBAL_HEADER.size
    while offset < len(data):
        _sec, usec, kept, length = pcap.RECORD.unpack_from(data, offset)
        assert usec < 1_000_000 and kept == length, (offset, kept, length)   # nothing torn, nothing cut
        offset += pcap.RECORD.size
        found.append((kept, length, data[offset:offset + kept]))
        offset += kept
    assert offset == len(data)
    return found


def http_segment(frame: bytes) -> tuple[int, int, int] | None:
    """(guest port, sequence number, payload bytes) of an IPv4 TCP frame from the HTTP server's port to the
    guest; None for anything else.  A SYN counts as one byte of sequence, as TCP has it."""
    if frame[6:12] != OUR_MAC or frame[12:14] != b"\x08\x00" or frame[23] != 6:
        return None
    ihl = (frame[14] & 0x0F) * 4
    total = struct.unpack_from("!H", frame, 16)[0]
    tcp = 14 + ihl
    source, guest_port, seq = struct.unpack_from("!HHI", frame, tcp)
    if source != HTTP_PORT:
        return None
    syn = frame[tcp + 13] & 0x02
    return guest_port, seq, total - ihl - (frame[tcp + 12] >> 4) * 4 + (1 if syn else 0)


def covered(segments: list[tuple[int, int, int]]) -> dict[int, int]:
    """Per guest port, the sequence bytes the segments cover at least once (retransmissions overlap), from
    the first segment's sequence number on (u32 arithmetic)."""
    flows: dict[int, list[tuple[int, int]]] = {}
    for port, seq, length in segments:
        flows.setdefault(port, []).append((seq, length))
    result = {}
    for port, spans in flows.items():
        base = spans[0][0]
        intervals = sorted(((seq - base) % 2 ** 32, (seq - base) % 2 ** 32 + length) for seq, length in spans)
        total, end = 0, 0
        for start, stop in intervals:
            if stop > end:
                total += stop - max(start, end)
                end = stop
        result[port] = total
    return result


def test_capture_of_two_downloads(tmp_path: Path, netns: TestNetns, guest_image: GuestImage) -> None:
    """Every frame each way on both queue pairs is in the file: tcpdump reads as many frames as the
    status counts, the bytes each way match the status, and the HTTP payload holds both downloads whole."""
    tcpdump = shutil.which("tcpdump")
    if tcpdump is None:
        if in_ci():
            pytest.fail("tcpdump missing (scripts/install-deps.sh installs it)", pytrace=False)
        pytest.skip("tcpdump missing")
    blob = serve_blob(netns, tmp_path, BLOB_MB)
    capture = tmp_path / "guest.pcap"
    script = f"""
dhcp || exit 1
{GATEWAY}
{WARM_UP}
taskset 1 wget -q -O /tmp/a http://$gw:{HTTP_PORT}/blob &
taskset 2 wget -q -O /tmp/b http://$gw:{HTTP_PORT}/blob &
wait
echo A=$(sha256sum < /tmp/a | cut -d' ' -f1) B=$(sha256sum < /tmp/b | cut -d' ' -f1)
"""
    with Switch(tmp_path, workers=2, prefix=netns.exec_argv([]), addressing=[],
                args=["--pcap", str(capture), "--pcap-size", "0"]) as switch:
        with GuestVM(guest_image, script, socket=Path(switch.socket), queues=2, smp=2, netns=netns) as vm:
            assert vm.wait_exit(timeout=300) == 0, vm.output()
            digest = hashlib.sha256(blob).hexdigest()
            assert f"A={digest} B={digest}" in vm.output(), vm.output()
        status = switch.status()
        assert status["capture"]["active"], status["capture"]
    # The switch stopped: every worker flushed and closed its writer.
    workers = status["workers"]
    assert all(w["tx_frames"] > 0 and w["rx_frames"] > 0 for w in workers), \
        [(w["tx_frames"], w["rx_frames"]) for w in workers]                             # both pairs
    found = records(capture)
    to_guest = [frame for _kept, _length, frame in found if frame[6:12] == OUR_MAC]
    from_guest = [frame for _kept, _length, frame in found if frame[6:12] != OUR_MAC]
    assert len(from_guest) == sum(w["tx_frames"] for w in workers)
    assert len(to_guest) == sum(w["rx_frames"] for w in workers)
    assert sum(map(len, from_guest)) == sum(w["tx_bytes"] for w in workers)
    assert sum(map(len, to_guest)) == sum(w["rx_bytes"] for w in workers)
    # Every byte of both answers (headers, blob) is there; our retransmissions may repeat some.
    segments = [seg for seg in map(http_segment, to_guest) if seg is not None]
    answers = covered(segments)
    assert len(answers) == 2 and all(len(blob) < n - 1 < len(blob) + 2048 for n in answers.values()), answers
    listed = subprocess.run([tcpdump, "-r", str(capture), "-nn"], capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    assert sum(1 for line in listed.stdout.splitlines() if line[:1].isdigit()) == len(found)
    assert f".{HTTP_PORT} > " in listed.stdout and f".{HTTP_PORT}: " in listed.stdout
