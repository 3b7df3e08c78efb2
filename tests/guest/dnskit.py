"""The DNS server the guest tests resolve through: dnsmasq in the test namespace, answering one name.

On 127.0.0.53 (the default) it is the stub resolver the namespace's
resolv.conf names, so it is the resolver the switch forwards the guest's
queries to.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from tests.guest.netns import TestNetns

#: The name dnsmasq answers, and its address.
NAME, ANSWER = "test.example", "10.9.8.7"


def start_dnsmasq(netns: TestNetns, tmp_path: Path, listen: str = "127.0.0.53") -> None:
    """dnsmasq on ``listen`` port 53 of ``netns`` answering NAME; returns once it listens."""
    netns.popen(["dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--port=53", f"--listen-address={listen}",
                 "--bind-interfaces", "--no-resolv", "--no-hosts", f"--address=/{NAME}/{ANSWER}",
                 f"--pid-file={tmp_path / 'dnsmasq.pid'}", f"--dhcp-leasefile={tmp_path / 'dnsmasq.leases'}",
                 "--user=root"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while netns.run(["sh", "-c", f"ss -Huln | grep -q '{listen}:53 '"], check=False).returncode:
        assert time.monotonic() < deadline, "dnsmasq did not start"
        time.sleep(0.1)
