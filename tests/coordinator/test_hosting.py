"""What a starter hands the switch (coordinator/hosting.py): socket activation, --fd, --pid, sd_notify, the
log file; each through a real switch in a test namespace, driven by the Python front-end.

Socket activation runs systemd's own ``systemd-socket-activate``, which
listens, starts the switch at the first connection and passes the socket as
systemd does (LISTEN_FDS, LISTEN_PID, LISTEN_FDNAMES).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from shardswitch.frontend.client import VhostUserFrontend
from tests.coordinator.hostingkit import activate_argv
from tests.guest.netns import TestNetns, stop_process
from tests.switch import Switch
from tests.switchkit import arp_roundtrip, is_periodic_ra, wait_until

def test_socket_activation_starts_the_switch_on_first_connection(tmp_path: Path, netns: TestNetns) -> None:
    """Nothing runs until the front-end connects; then the switch starts on the socket it was handed
    (its control socket beside it), answers the handshake queued meanwhile, and serves."""
    path = tmp_path / "vm.sock"
    log = open(tmp_path / "activate.log", "wb")
    activator = netns.popen(activate_argv(netns, path), stdout=log, stderr=subprocess.STDOUT)
    log.close()
    try:
        wait_until(lambda: path.exists() or None, "the activator's socket", timeout=10)
        assert not Path(f"{path}.ctl").exists()                 # not started yet
        with VhostUserFrontend.connect(str(path), timeout=30, ignore=is_periodic_ra) as fe:
            fe.handshake()
            arp_roundtrip(fe, 0)
            wait_until(lambda: Path(f"{path}.ctl").exists() or None, "the control socket")
            output = (tmp_path / "activate.log").read_text(errors="replace")
            assert f"listening on {path}" in output, output
    finally:
        stop_process(activator)


def test_fd_listening_socket(tmp_path: Path, netns: TestNetns) -> None:
    """--fd N with a listening socket made by the parent: served as the vhost-user socket, not removed."""
    path = tmp_path / "parent.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    fd = listener.fileno()
    with Switch(tmp_path, prefix=netns.exec_argv([]), socket_path=str(path), where=["--fd", str(fd)],
                pass_fds=(fd,)) as switch:
        with VhostUserFrontend.connect(str(path), ignore=is_periodic_ra) as fe:
            fe.handshake()
            arp_roundtrip(fe, 0)
        assert f"listening on {path}" in switch.log()
    listener.close()


def test_fd_connected_front_end_is_served_then_the_switch_exits(tmp_path: Path, netns: TestNetns) -> None:
    """--fd N with a connected socket: that front-end is served, and the switch exits when it leaves."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    fd = theirs.fileno()
    switch = Switch(tmp_path, prefix=netns.exec_argv([]), where=["--fd", str(fd)], pass_fds=(fd,)).start()
    theirs.close()
    try:
        with VhostUserFrontend("socketpair", sock=ours, ignore=is_periodic_ra) as fe:
            fe.handshake()
            arp_roundtrip(fe, 0)
        assert switch.proc is not None and switch.proc.wait(15) == 0, switch.log()
        assert "exiting when it leaves" in switch.log()
    finally:
        switch.stop()


def test_fd_that_is_not_a_socket_is_refused(tmp_path: Path, netns: TestNetns) -> None:
    """--fd naming a pipe: a clear error, exit status 1."""
    read_end, write_end = os.pipe()
    switch = Switch(tmp_path, prefix=netns.exec_argv([]), where=["--fd", str(read_end)], pass_fds=(read_end,))
    with pytest.raises(RuntimeError, match="is not a socket"):
        switch.start()
    os.close(read_end)
    os.close(write_end)


def test_pid_file_and_notifications(tmp_path: Path, netns: TestNetns) -> None:
    """--pid writes the coordinator's PID (as the host sees it); NOTIFY_SOCKET gets MAINPID= that PID from the
    keeper when the coordinator runs in a PID namespace of its own (so that systemd accepts what it sends
    next), READY=1 with a status once it serves, WATCHDOG=1 every half of WATCHDOG_USEC, and STOPPING=1 when
    it stops."""
    notify = tmp_path / "notify.sock"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(notify))
    os.chmod(notify, 0o666)                     # the switch sends after dropping root
    receiver.settimeout(10)
    pid_file = tmp_path / "switch.pid"
    switch = Switch(tmp_path, prefix=netns.exec_argv([]), args=["--pid", str(pid_file)],
                    env={"NOTIFY_SOCKET": str(notify), "WATCHDOG_USEC": "400000"}).start()
    try:
        assert pid_file.read_text() == f"{switch.pid}\n"
        first = receiver.recv(4096).decode()
        if switch.status()["sandbox"].get("pid_namespace"):
            assert first == f"MAINPID={switch.pid}" and switch.pid != switch.proc.pid, first
            first = receiver.recv(4096).decode()
        assert "READY=1" in first and "STATUS=1 worker(s), serving" in first, first
        started = time.monotonic()
        pings = [receiver.recv(4096) for _ in range(3)]
        assert pings == [b"WATCHDOG=1"] * 3
        assert time.monotonic() - started < 2.0
        assert switch.proc is not None
        switch.proc.send_signal(signal.SIGTERM)
        while (message := receiver.recv(4096)) == b"WATCHDOG=1":
            pass
        assert message.startswith(b"STOPPING=1"), message
    finally:
        switch.stop()
        receiver.close()


def test_log_file(tmp_path: Path, netns: TestNetns) -> None:
    """-l FILE: the coordinator's and the workers' lines go into the file, none to stderr; a file over
    --log-size (here from earlier runs) is cut to its newest lines within a second, by the sandboxed
    coordinator."""
    log_file = tmp_path / "switch.log"
    log_file.write_text("an old line\n" * 10000)               # 120 kB
    with Switch(tmp_path, workers=2, prefix=netns.exec_argv([]),
                args=["-l", str(log_file), "--log-size", "65536"]) as switch:
        with VhostUserFrontend.connect(switch.socket, queue_pairs=2, ignore=is_periodic_ra) as fe:
            fe.handshake()
        wait_until(lambda: "front-end disconnected" in log_file.read_text() or None, "the disconnection logged")
        wait_until(lambda: log_file.read_text().startswith("--- log file over 65536 bytes") or None,
                   "the log file cut", timeout=5)
    text = log_file.read_text()
    assert len(text) < 65536, len(text)
    assert "worker 0 started" in text and "worker 1 started" in text and "front-end connected" in text, text
    assert "front-end connected" not in switch.log()        # stderr has only what Python prints itself


@pytest.mark.parametrize(("args", "message"), [
    (["--pcap", "/nonexistent-dir/c.pcap"], "--pcap /nonexistent-dir/c.pcap: No such file or directory"),
    (["--pid", "/nonexistent-dir/s.pid"], "PID file /nonexistent-dir/s.pid: No such file or directory"),
    (["-l", "/nonexistent-dir/s.log"], "cannot open the log file /nonexistent-dir/s.log: No such file"),
    (["--metrics", "192.0.2.1:9410"], "--metrics 192.0.2.1:9410: [Errno 99] Cannot assign requested address"),
])
def test_unusable_files_and_addresses_stop_the_start_clearly(tmp_path: Path, netns: TestNetns, args: list[str],
                                                             message: str) -> None:
    """A file or an address the switch cannot use: one clear line and a non-zero exit, nothing left running."""
    switch = Switch(tmp_path, prefix=netns.exec_argv([]), args=args)
    with pytest.raises(RuntimeError, match="exited with 1") as failed:
        switch.start()
    assert message in str(failed.value), str(failed.value)
