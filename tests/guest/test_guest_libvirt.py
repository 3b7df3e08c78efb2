"""A guest started by libvirt (issue 12, acceptance 4): Debian's libvirtd (tests/guest/libvirtd.py) starts a
TCG guest whose ``<interface type='vhostuser'>`` (client mode, reconnect) is the README's libvirt section,
on a shardswitch socket-activated as by shardswitch.socket; the guest gets its lease and pings its gateway,
and its interface counters agree with ``shardswitch status``.

``virsh domifstat`` cannot be the witness: libvirt (9.0, Debian 12's, and later) reads the counters of a
vhost-user interface only from Open vSwitch (``ovs-vsctl``), so it has none for any other back-end."""

from __future__ import annotations

import re
import secrets
import shutil
import subprocess
from pathlib import Path

import pytest

from shardswitch.coordinator.control import query
from tests.conftest import in_ci
from tests.coordinator.hostingkit import activate_argv
from tests.guest.image import GuestImage
from tests.guest.libvirtd import LIBVIRTD, Libvirtd
from tests.guest.netns import TestNetns, stop_process
from tests.guest.vm import GuestVM, parse_lease
from tests.switchkit import wait_until

pytestmark = pytest.mark.guest

README = Path(__file__).resolve().parents[2] / "README.md"
README_SOCKET = "/run/shardswitch/vm1.sock"


def readme_blocks() -> dict[str, str]:
    """The README's libvirt section: its ``<memoryBacking>`` and ``<interface>`` elements."""
    section = README.read_text().split("### libvirt", 1)[1].split("\n## ", 1)[0]
    xml = "\n".join(re.findall(r"```xml\n(.*?)```", section, re.DOTALL))
    blocks = {}
    for tag in ("memoryBacking", "interface"):
        found = re.search(rf"<{tag}\b.*?</{tag}>", xml, re.DOTALL)
        assert found, f"no <{tag}> in the README's libvirt section"
        blocks[tag] = found[0]
    return blocks


def domain_xml(name: str, image: GuestImage, script: str, serial: Path, socket: str) -> str:
    """A TCG domain booting the test guest, with the README's memory backing and interface."""
    blocks = readme_blocks()
    assert README_SOCKET in blocks["interface"]
    cmdline = GuestVM(image, script).kernel_cmdline()
    assert "ss_script=" in cmdline, "the test's script must fit on the kernel command line"
    return f"""<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{name}</name>
  <memory unit='MiB'>512</memory>
  <vcpu>2</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{image.kernel}</kernel>
    <initrd>{image.initrd}</initrd>
    <cmdline>{cmdline}</cmdline>
  </os>
  {blocks["memoryBacking"]}
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <serial type='file'><source path='{serial}'/><target port='0'/></serial>
    {blocks["interface"].replace(README_SOCKET, socket)}
    <memballoon model='none'/>
  </devices>
  <qemu:override>
    <qemu:device alias='net0'>
      <qemu:frontend>
        <qemu:property name='vectors' type='unsigned' value='0'/>
      </qemu:frontend>
    </qemu:device>
  </qemu:override>
</domain>
"""


def test_guest_through_libvirt(tmp_path: Path, netns: TestNetns, guest_image: GuestImage) -> None:
    """libvirtd starts the guest on the README's interface, on a socket-activated shardswitch (QEMU's
    connection starts it, as with shardswitch.socket); lease, ping, and the guest's own interface counters
    agree with ``shardswitch status``."""
    if not Path(LIBVIRTD).exists() or shutil.which("virsh") is None:
        if in_ci():
            pytest.fail("libvirt missing (scripts/install-deps.sh installs libvirt-daemon-system)", pytrace=False)
        pytest.skip("libvirt missing")
    script = """
dhcp || exit 1
gw=$(ip route | awk '/default/ {print $3}')
ping -c 5 -W 3 $gw > /dev/null && echo PING-OK
s=/sys/class/net/eth0/statistics
echo STATS tx=$(cat $s/tx_packets) rx=$(cat $s/rx_packets) rx_dropped=$(cat $s/rx_dropped)
echo GUEST-DONE
sleep 600
"""
    name = f"ss-test-{secrets.token_hex(3)}"
    serial = tmp_path / "serial.log"
    socket_path = tmp_path / "vm1.sock"
    (tmp_path / "lv").mkdir()
    with open(tmp_path / "switch.log", "wb") as log:
        activator = netns.popen(activate_argv(netns, socket_path, ["--workers", "2"]), stdout=log,
                                stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: socket_path.exists() or None, "the activator's socket", timeout=10)
        with Libvirtd(tmp_path / "lv", netns) as libvirt:
            (tmp_path / "domain.xml").write_text(domain_xml(name, guest_image, script, serial, str(socket_path)))
            libvirt.virsh("create", str(tmp_path / "domain.xml"))
            output = wait_until(lambda: serial.exists() and "GUEST-DONE" in (text := serial.read_text(
                errors="replace")) and text or None, "the guest's run", timeout=240, interval=0.5)
            assert "PING-OK" in output, output
            lease = parse_lease(output)
            assert lease is not None and lease.ip == netns.host_addr, output
            status = query(f"{socket_path}.ctl", "status")
            assert libvirt.virsh("domstate", name).stdout.strip() == "running"
    finally:
        stop_process(activator)
    guest = {k: int(v) for k, v in re.findall(r"(tx|rx|rx_dropped)=(\d+)", output)}
    ours_tx = sum(w["tx_frames"] for w in status["workers"])
    ours_rx = sum(w["rx_frames"] for w in status["workers"])
    # The guest may send (IPv6 neighbour discovery) and we may send (router advertisements) after it printed.
    assert guest["tx"] <= ours_tx <= guest["tx"] + 5, (guest, status["workers"])
    assert guest["rx"] + guest["rx_dropped"] <= ours_rx <= guest["rx"] + guest["rx_dropped"] + 5, (guest, status)
    assert all(w["tx_frames"] for w in status["workers"]) or ours_tx, status
