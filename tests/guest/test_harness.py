"""Tests of the real-guest harness itself (image, guest runner, namespaces, testpmd).

The unmarked tests are pure (command-line shape, output parsers); ``guest``
tests need root, QEMU and the cloud kernel; ``dpdk`` tests need dpdk-testpmd.
Each guest boot costs a few seconds of TCG, so boots are few and combined.
"""

from __future__ import annotations

import gzip
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.guest import image as image_mod
from tests.guest.image import GuestImage, build_initramfs
from tests.guest.netns import NETNS_ETC_DIR, TestNetns, list_namespaces, remove_stale_namespaces
from tests.guest.testpmd import Testpmd, TestpmdError, parse_port_stats
from tests.guest.vm import KERNEL_CMDLINE_MAX, GuestError, GuestVM, parse_lease

FAKE_IMAGE = GuestImage(kernel=Path("/boot/vmlinuz-x"), initrd=Path("/tmp/initrd-x"),
                        kernel_version="x", key="x")

# Echo request to the upstream end over an unprivileged ICMP socket: needs the
# host namespace's ping_group_range and a working veth link.
ICMP_PING = r"""
import socket, struct, sys
v6 = ":" in sys.argv[1]
s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM,
                  socket.IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP)
s.settimeout(10)
s.sendto(struct.pack("!BBHHH", 128 if v6 else 8, 0, 0, 0, 1) + b"ss", (sys.argv[1], 0))
data, peer = s.recvfrom(256)
print("reply", peer[0], data[0])
"""

PORT_STATS_SAMPLE = """
  ######################## NIC statistics for port 0  ########################
  RX-packets: 453120     RX-missed: 0          RX-bytes:  27187200
  RX-errors: 0
  RX-nombuf:  0
  TX-packets: 38909696   TX-errors: 0          TX-bytes:  2334581760

  Throughput (since last show)
  Rx-pps:       301444          Rx-bps:            0
  Tx-pps:     25885210          Tx-bps:            0
  ############################################################################
"""


# -- pure tests -----------------------------------------------------------------

def test_command_line_shape_with_vhost_user_nic(tmp_path: Path) -> None:
    """The QEMU argv has the known-good shape: shared memfd, vectors=0, mq only with queues > 1."""
    vm = GuestVM(FAKE_IMAGE, "true", socket=tmp_path / "s,ock", queues=2, smp=2,
                 reconnect=True, workdir=tmp_path)
    argv = vm.command()
    joined = " ".join(argv)
    assert "memory-backend-memfd,id=mem,size=512M,share=on" in joined
    assert argv[argv.index("-accel") + 1] in ("tcg", "kvm")
    assert f"socket,id=c0,path={tmp_path}/s,,ock,reconnect=1" in argv
    assert "vhost-user,id=n0,chardev=c0,queues=2" in argv
    assert "virtio-net-pci,netdev=n0,vectors=0,romfile=,mq=on" in argv
    one = GuestVM(FAKE_IMAGE, "true", socket=tmp_path / "s", workdir=tmp_path).command()
    assert "virtio-net-pci,netdev=n0,vectors=0,romfile=" in one
    none = GuestVM(FAKE_IMAGE, "true", workdir=tmp_path).command()
    assert "-netdev" not in none and "-device" not in none


def test_long_script_moves_to_fw_cfg(tmp_path: Path) -> None:
    """A script that would overflow the kernel command line is passed through fw_cfg."""
    short = GuestVM(FAKE_IMAGE, "echo hi", workdir=tmp_path)
    assert "ss_script=" in short.kernel_cmdline()
    long_script = "echo x\n" * 400
    vm = GuestVM(FAKE_IMAGE, long_script, workdir=tmp_path)
    assert "ss_script=" not in vm.kernel_cmdline()
    assert len(vm.kernel_cmdline()) <= KERNEL_CMDLINE_MAX
    argv = vm.command()
    assert argv[argv.index("-fw_cfg") + 1] == f"name=opt/shardswitch/script,file={tmp_path}/script.sh"
    assert (tmp_path / "script.sh").read_text() == long_script


def test_parse_lease() -> None:
    """SS-LEASE lines parse into a Lease; the last one wins; absent gives None."""
    text = ("noise\nSS-LEASE ip=10.0.0.9 mask=16 router= mtu= dns= domain=\n"
            "SS-LEASE ip=10.1.2.3 mask=24 router=10.1.2.1,10.1.2.254 mtu=65520 "
            "dns=10.1.2.1,10.9.9.9 domain=example.test\n")
    lease = parse_lease(text)
    assert lease is not None
    assert (lease.ip, lease.prefixlen, lease.router, lease.mtu) == ("10.1.2.3", 24, "10.1.2.1", 65520)
    assert lease.dns == ("10.1.2.1", "10.9.9.9") and lease.domain == "example.test"
    empty = parse_lease("SS-LEASE ip=10.0.0.9 mask=16 router= mtu= dns= domain=\n")
    assert empty is not None and empty.router is None and empty.mtu is None and empty.dns == ()
    assert parse_lease("SS-BEGIN\nSS-EXIT 0\n") is None


def test_parse_port_stats() -> None:
    """``show port stats all`` output parses into numbers per port."""
    stats = parse_port_stats(PORT_STATS_SAMPLE + PORT_STATS_SAMPLE.replace("port 0", "port 1"))
    assert set(stats) == {0, 1}
    assert stats[0].rx_packets == 453120 and stats[0].tx_packets == 38909696
    assert stats[1].tx_bytes == 2334581760 and stats[1].tx_pps == 25885210


# -- initramfs --------------------------------------------------------------------

@pytest.mark.guest
def test_initramfs_builds_and_is_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The archive holds what the guest needs, is reused when unchanged, rebuilt on change."""
    first = build_initramfs(tmp_path)
    archive = gzip.decompress(first.initrd.read_bytes())
    for member in (b"init", b"bin/busybox", b"bin/sh", b"sbin/udhcpc", b"usr/bin/iperf3",
                   b"lib/modules/virtio_net.ko", b"usr/share/udhcpc/default.script",
                   b"usr/bin/dhcp", b"dev/console", b"TRAILER!!!"):
        assert member + b"\0" in archive, member
    stamp = first.initrd.stat()
    again = build_initramfs(tmp_path)
    assert again == first
    assert (again.initrd.stat().st_ino, again.initrd.stat().st_mtime_ns) == (stamp.st_ino, stamp.st_mtime_ns)

    changed_init = tmp_path / "init.sh"
    changed_init.write_bytes(image_mod.INIT_SCRIPT.read_bytes() + b"# changed\n")
    monkeypatch.setattr(image_mod, "INIT_SCRIPT", changed_init)
    rebuilt = build_initramfs(tmp_path)
    assert rebuilt.key != first.key and rebuilt.initrd.exists() and first.initrd.exists()
    assert not list(tmp_path.glob(".initrd-*"))


@pytest.mark.guest
def test_parallel_builds_are_safe(tmp_path: Path) -> None:
    """Two builders racing on one cache directory agree on one complete archive."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        images = list(pool.map(build_initramfs, [tmp_path, tmp_path]))
    assert images[0] == images[1]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("initrd-")] == [images[0].initrd.name]
    gzip.decompress(images[0].initrd.read_bytes())


# -- guest boots --------------------------------------------------------------------

@pytest.mark.guest
def test_guest_without_nic_runs_script(guest_image: GuestImage) -> None:
    """A NIC-less guest runs the script, reports its output and exit code, and powers off."""
    script = ("echo hello; cat /proc/cpuinfo | grep -c processor\n"
              "[ -e /sys/class/net/eth0 ] && echo HAS-ETH0\n"
              "exit 7\n")
    with GuestVM(guest_image, script, smp=2) as vm:
        assert vm.wait_exit() == 7
        out = vm.output()
        assert vm.returncode == 0
        with pytest.raises(GuestError) as failure:
            vm.wait_for("NEVER-PRINTED", timeout=5)
    assert "SS-BEGIN\nhello\n2\nSS-EXIT 7" in out, out
    assert "HAS-ETH0" not in out and "SS-WARN" not in out, out
    assert "--- serial log ---" in str(failure.value) and "hello" in str(failure.value)


@pytest.mark.guest
def test_guest_runs_long_script_from_fw_cfg(guest_image: GuestImage) -> None:
    """A script too long for the command line still runs (fw_cfg path of /init)."""
    script = "".join(f"v{i}={i}\n" for i in range(400)) + 'echo "last=$v399"\nexit 3\n'
    with GuestVM(guest_image, script) as vm:
        assert "ss_script=" not in vm.kernel_cmdline()
        assert vm.wait_exit() == 3
        assert "last=399" in vm.output(), vm.output()


@pytest.mark.guest
def test_guest_without_backend_fails_with_qemu_output(guest_image: GuestImage, tmp_path: Path) -> None:
    """With no back-end on the socket QEMU exits at once and the error shows why."""
    with GuestVM(guest_image, "true", socket=tmp_path / "absent.sock", queues=2) as vm:
        with pytest.raises(GuestError, match="Failed to connect") as failure:
            vm.wait_exit(timeout=60)
    assert "--- QEMU output ---" in str(failure.value)


@pytest.mark.guest
def test_guest_dhcp_helper_applies_lease(guest_image: GuestImage, netns: TestNetns) -> None:
    """init brings eth0 up and ``dhcp`` applies and reports a lease.

    The NIC is QEMU's own user-mode network with ``restrict=on`` (its built-in
    DHCP server; nothing leaves QEMU), run inside the test namespace: this checks
    the guest side of the harness without a shardswitch back-end.
    """
    slirp = ["-netdev", "user,id=u0,restrict=on",
             "-device", "virtio-net-pci,netdev=u0,vectors=0,romfile="]
    script = "dhcp || exit 1\nip -4 addr show dev eth0\n"
    with GuestVM(guest_image, script, netns=netns, extra_args=slirp) as vm:
        lease = vm.lease()
        assert vm.wait_exit() == 0
        out = vm.output()
    assert (lease.ip, lease.prefixlen, lease.routers) == ("10.0.2.15", 24, ()), out
    assert "inet 10.0.2.15/24" in out, out


# -- namespaces --------------------------------------------------------------------

@pytest.mark.guest
def test_netns_create_and_teardown_leaves_nothing() -> None:
    """Both namespaces work as specified and vanish, with their processes, at teardown."""
    with pytest.raises(RuntimeError, match="test failure"):
        with TestNetns() as ns:
            names = (ns.name, ns.upstream_name)
            assert set(names) <= set(list_namespaces())
            assert ns.run(["cat", "/etc/resolv.conf"]).stdout == "nameserver 127.0.0.53\n"
            group_range = ns.run(["cat", "/proc/sys/net/ipv4/ping_group_range"]).stdout.split()
            assert group_range == ["0", "2147483647"]
            route = ns.run(["ip", "route", "show", "default"]).stdout
            assert f"default via {ns.upstream_addr} dev {ns.host_if}" in route
            reply = ns.run([sys.executable, "-c", ICMP_PING, ns.upstream_addr]).stdout
            assert reply.split() == ["reply", ns.upstream_addr, "0"]
            route6 = ns.run(["ip", "-6", "route", "show", "default"]).stdout
            assert f"default via {ns.router6} dev {ns.host_if}" in route6
            reply = ns.run([sys.executable, "-c", ICMP_PING, ns.upstream_addr6]).stdout
            assert reply.split() == ["reply", ns.upstream_addr6, "129"]
            sleeper = ns.popen(["sleep", "600"])
            raise RuntimeError("test failure")
    assert sleeper.poll() is not None
    assert not set(names) & set(list_namespaces())
    assert not (NETNS_ETC_DIR / names[0]).exists()


@pytest.mark.guest
def test_stale_namespaces_of_dead_processes_are_swept() -> None:
    """A namespace named after a test process that no longer exists is removed."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    name = f"ss-{dead.pid}-beef"
    subprocess.run(["ip", "netns", "add", name], check=True)
    (NETNS_ETC_DIR / name).mkdir(parents=True, exist_ok=True)
    try:
        assert name in remove_stale_namespaces()
        assert name not in list_namespaces() and not (NETNS_ETC_DIR / name).exists()
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


# -- testpmd ----------------------------------------------------------------------

@pytest.mark.dpdk
def test_testpmd_without_backend_fails_cleanly(netns: TestNetns, tmp_path: Path) -> None:
    """With nothing listening on the socket, launch raises with testpmd's log, quickly."""
    pmd = Testpmd(tmp_path / "absent.sock", netns, memory_mb=256, mbufs=4096)
    with pytest.raises(TestpmdError) as failure:
        with pmd:
            pass
    assert "absent.sock" in str(failure.value) and "--- testpmd log ---" in str(failure.value)
    assert not Path("/var/run/dpdk", pmd.file_prefix).exists()


@pytest.mark.dpdk
def test_testpmd_interactive_commands(netns: TestNetns, tmp_path: Path) -> None:
    """Commands, forwarding modes and port stats work (on a null port, no back-end needed)."""
    with Testpmd(tmp_path / "unused.sock", netns, vdev="net_null0", queues=1,
                 memory_mb=256, mbufs=4096) as pmd:
        assert pmd.port_stats()[0].tx_packets == 0
        pmd.set_fwd("txonly")
        pmd.start()
        assert "Forward statistics for port 0" in pmd.stop()
        assert pmd.port_stats()[0].tx_packets > 0
        with pytest.raises(TestpmdError, match="Command not found"):
            pmd.command("no such command")
        assert f"--tx-ip={netns.host_addr},{netns.upstream_addr}" in pmd.argv()
        assert pmd.quit() == 0
    assert "Bye..." in pmd.log
    assert not Path("/var/run/dpdk", pmd.file_prefix).exists()
