"""Real guests' TCP through shardswitch: bulk transfers, refused connections, many short connections, iperf3.

Servers run on 127.0.0.1 inside the test's namespace; the guest reaches them
through its gateway address, which the switch maps to that loopback.  Each
test boots one guest that runs several checks in one script.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.guest.image import GuestImage
from tests.guest.netns import TestNetns
from tests.guest.vm import GuestVM
from tests.switch import Switch
from tests.guest.scripts import GATEWAY
from tests.guest.servers import HTTP_PORT, NC_CLIENT, iperf_rate, serve_blob, start_http

pytestmark = pytest.mark.guest

DOWNLOAD_MB = 50
UPLOAD_MB = 50
CONNECTIONS = 500
#: Host port forwarded to the same guest port (-t).
FORWARDED = 5301


def switch_in(tmp_path: Path, netns: TestNetns, workers: int = 2, args: list[str] | None = None) -> Switch:
    """A switch inside the test namespace, mirroring its addressing."""
    return Switch(tmp_path, workers=workers, prefix=netns.exec_argv([]), addressing=[], args=args)


def uptime_between(output: str, tag: str) -> float:
    """Seconds between the guest's ``tag-T0 <uptime>`` and ``tag-T1 <uptime>`` lines."""
    t0 = float(re.search(rf"{tag}-T0 ([\d.]+)", output)[1])  # type: ignore[index]
    t1 = float(re.search(rf"{tag}-T1 ([\d.]+)", output)[1])  # type: ignore[index]
    return t1 - t0


def worker_fds(switch: Switch) -> list[int]:
    """Open descriptors of each worker process."""
    return [len(os.listdir(f"/proc/{w['pid']}/fd")) for w in switch.status()["workers"]]


def tcp_flows(switch: Switch) -> list[dict[str, object]]:
    """The switch's TCP flows."""
    return [f for f in switch.query("flows")["flows"] if f["type"] == "tcp"]


def test_bulk_transfers_and_refused(tmp_path: Path, netns: TestNetns, guest_image: GuestImage) -> None:
    """A 50 MB download and a 50 MB upload keep their sha256; a refused connection fails at once."""
    blob = serve_blob(netns, tmp_path, DOWNLOAD_MB)
    script = f"""
dhcp || exit 1
{GATEWAY}
ping -c 1 -W 3 $gw > /dev/null
echo REFUSED-T0 $(cut -d' ' -f1 /proc/uptime)
nc $gw 9 < /dev/null && echo REFUSED-CONNECTED
echo REFUSED-T1 $(cut -d' ' -f1 /proc/uptime)
echo DL-T0 $(cut -d' ' -f1 /proc/uptime)
echo DOWN=$(wget -q -O - http://$gw:{HTTP_PORT}/blob | sha256sum | cut -d' ' -f1)
echo DL-T1 $(cut -d' ' -f1 /proc/uptime)
dd if=/dev/urandom of=/tmp/up bs=1M count={UPLOAD_MB} 2> /dev/null
echo UPLOCAL=$(sha256sum /tmp/up | cut -d' ' -f1)
echo UL-T0 $(cut -d' ' -f1 /proc/uptime)
echo UPREMOTE=$(nc $gw {HTTP_PORT + 1} < /tmp/up)
echo UL-T1 $(cut -d' ' -f1 /proc/uptime)
"""
    with switch_in(tmp_path, netns) as switch, \
            GuestVM(guest_image, script, socket=Path(switch.socket), queues=2, smp=2, netns=netns) as vm:
        assert vm.wait_exit(timeout=300) == 0, vm.output()
        output = vm.output()
        assert "REFUSED-CONNECTED" not in output and uptime_between(output, "REFUSED") < 2.0, output
        assert f"DOWN={hashlib.sha256(blob).hexdigest()}" in output, output
        local = re.search(r"UPLOCAL=(\w+)", output)
        assert local and f"UPREMOTE={local[1]}:{UPLOAD_MB << 20}" in output, output
        down = uptime_between(output, "DL")
        up = uptime_between(output, "UL")
        print(f"download {DOWNLOAD_MB} MB in {down:.1f} s ({DOWNLOAD_MB * 8 / down:.0f} Mbit/s, "
              f"guest hashing included); upload {UPLOAD_MB} MB in {up:.1f} s ({UPLOAD_MB * 8 / up:.0f} Mbit/s)")
        status = switch.status()
        assert not any(w["drops"].get("INTERNAL_ERROR") for w in status["workers"]), status


def test_many_connections_leave_nothing_behind(tmp_path: Path, netns: TestNetns, guest_image: GuestImage) -> None:
    """500 short connections: no flow stays in the table, no descriptor stays open in the workers."""
    root = tmp_path / "www"
    root.mkdir()
    (root / "small").write_bytes(b"small\n")
    start_http(netns, root)
    script = f"""
dhcp || exit 1
{GATEWAY}
ping -c 1 -W 3 $gw > /dev/null
wget -q -O /dev/null http://$gw:{HTTP_PORT}/small || exit 2
echo C-BEGIN
sleep 2
i=0; ok=0
while [ $i -lt {CONNECTIONS} ]; do
    wget -q -O /dev/null http://$gw:{HTTP_PORT}/small && ok=$((ok + 1))
    i=$((i + 1))
done
echo C-OK=$ok
echo C-END
sleep 30
"""
    with switch_in(tmp_path, netns) as switch, \
            GuestVM(guest_image, script, socket=Path(switch.socket), queues=2, smp=2, netns=netns) as vm:
        vm.wait_for("C-BEGIN", timeout=240)
        time.sleep(1.5)   # the warm-up connection is closed and gone
        assert tcp_flows(switch) == []
        before = worker_fds(switch)
        vm.wait_for("C-END", timeout=240)
        assert f"C-OK={CONNECTIONS}" in vm.output(), vm.output()
        deadline = time.monotonic() + 5
        while tcp_flows(switch) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert tcp_flows(switch) == []
        text = subprocess.run([sys.executable, "-m", "shardswitch", "flows", "--control", switch.control],
                              capture_output=True, text=True, check=True).stdout
        assert "tcp" not in text, text
        # The workers' pools of pre-opened sockets refill once a second: wait for that, then any
        # descriptor beyond the count before the connections would be a leak.
        deadline = time.monotonic() + 5
        while worker_fds(switch) != before and time.monotonic() < deadline:
            time.sleep(0.2)
        assert worker_fds(switch) == before


#: A forwarded port for `nc -l` in the guest, and the host-side client: sends a line, half-closes,
#: prints what the guest sent.
NC_PORT = 8123


def test_iperf3_both_directions_pinned_streams_and_forwarding(tmp_path: Path, netns: TestNetns,
                                                              guest_image: GuestImage) -> None:
    """iperf3 to and from the host, two streams pinned to two vCPUs (queues=2), then host clients
    through forwarded ports (-t) to an iperf3 server and to `nc -l` in the guest: no errors, data both ways."""
    for port in (5201, 5202):
        netns.popen(["iperf3", "-s", "-B", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    script = f"""
dhcp || exit 1
{GATEWAY}
ping -c 1 -W 3 $gw > /dev/null
echo ==up==; iperf3 -c $gw -t 3 || exit 2
echo ==down==; iperf3 -c $gw -t 3 -R || exit 3
taskset 1 iperf3 -c $gw -p 5201 -t 3 > /tmp/s0 2>&1 &
taskset 2 iperf3 -c $gw -p 5202 -t 3 > /tmp/s1 2>&1 &
wait
echo ==s0==; cat /tmp/s0; echo ==s1==; cat /tmp/s1
iperf3 -s -1 -p {FORWARDED} > /tmp/fwd 2>&1 &
sleep 1
echo FWD-READY
wait
echo ==fwd==; cat /tmp/fwd
echo from-guest | nc -l -p {NC_PORT} > /tmp/nc &
sleep 1
echo NC-READY
wait
echo NC-GOT=$(cat /tmp/nc)
"""
    with switch_in(tmp_path, netns, args=["-t", f"{FORWARDED},{NC_PORT}"]) as switch, \
            GuestVM(guest_image, script, socket=Path(switch.socket), queues=2, smp=2, netns=netns) as vm:
        vm.wait_for("FWD-READY", timeout=240)
        client = netns.run(["iperf3", "-c", "127.0.0.1", "-p", str(FORWARDED), "-t", "3"], check=False)
        assert client.returncode == 0, (client.stdout, client.stderr, vm.output())
        vm.wait_for("NC-READY", timeout=120)
        nc = netns.run([sys.executable, "-c", NC_CLIENT, str(NC_PORT)], timeout=30)
        assert nc.stdout.strip() == "from-guest", (nc.stdout, nc.stderr, vm.output())
        assert vm.wait_exit(timeout=300) == 0, vm.output()
        assert "NC-GOT=from-host" in vm.output(), vm.output()
        output = vm.output()
        rates = {tag: iperf_rate(output, tag) for tag in ("up", "down", "s0", "s1")}
        rates["fwd"] = iperf_rate("==fwd==" + client.stdout, "fwd")
        print("iperf3 Mbit/s:", rates)
        assert all(rate > 0 for rate in rates.values()), output
        status = switch.status()
        assert all(w["tx_frames"] > 0 for w in status["workers"]), status
        assert not any(w["drops"].get("INTERNAL_ERROR") for w in status["workers"]), status
