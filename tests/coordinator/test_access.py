"""Who may use the control socket (coordinator/access.py): the peer's credentials against root, the switch's
own user and --control-group, checked as an attacker would try it: a process of another user (a child of
the test that gives up root) connecting to a real switch's control socket to start a packet capture."""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from shardswitch.coordinator.access import (AccessError, AccessPolicy, Peer, resolve_group,
                                            restrict_socket_file)
from shardswitch.coordinator.control import ControlError, query
from tests.conftest import NOBODY
from tests.coordinator.accesskit import OPERATORS, STRANGER, answer_of, as_user, ask
from tests.switch import Switch

CAPTURE_REQUEST = b'{"cmd": "capture-start", "file": "stolen.pcap", "size": 0}\n'
STATUS_REQUEST = b'{"cmd": "status"}\n'


def with_query(path: str) -> Callable[[], str]:
    """An action for :func:`as_user`: ``shardswitch status``'s query; the error it raised."""
    def action() -> str:
        try:
            query(path, "status", timeout=20)
        except ControlError as err:
            return f"{type(err).__name__}: {err}"
        return "served"
    return action


@pytest.fixture
def open_dir(nobody_dir: Path) -> Path:
    """A socket directory any user may enter (the switch's own user owns it)."""
    nobody_dir.chmod(0o755)
    return nobody_dir


def test_other_users_cannot_capture(open_dir: Path, tmp_path: Path) -> None:
    """The control socket is mode 0600: another user cannot even connect.  Made writable for all (a wide
    UMask, a socket handed over), it still refuses that user, who gets "not allowed" and starts no
    capture; root and the switch's own user (nobody) are served; the refusal is counted and logged."""
    with Switch(tmp_path, socket_path=str(open_dir / "ss.sock")) as switch:
        assert stat.S_IMODE(os.stat(switch.control).st_mode) == 0o600
        files = [os.open(tmp_path / name, os.O_WRONLY | os.O_CREAT, 0o666) for name in ("a.pcap", "b.pcap")]
        try:
            assert as_user(STRANGER, STRANGER, ask(switch.control, CAPTURE_REQUEST, files)) == \
                "connect: Permission denied"
            os.chmod(switch.control, 0o666)
            stolen = as_user(STRANGER, STRANGER, ask(switch.control, CAPTURE_REQUEST, files))
        finally:
            for fd in files:
                os.close(fd)
        assert answer_of(stolen) == {"error": f"not allowed: uid {STRANGER}"}, stolen
        for _ in range(3):      # refused at once, whether or not the request was sent before the close
            assert as_user(STRANGER, STRANGER, with_query(switch.control)) == \
                f"ControlRefused: not allowed: uid {STRANGER}"
        own = answer_of(as_user(NOBODY, NOBODY, ask(switch.control, STATUS_REQUEST)))
        status = switch.status()                                     # root
        assert own["socket"] == status["socket"] == switch.socket
        assert status["capture"] == {"active": False}
        assert status["control"]["refused"] == {"not_allowed": 4}
        assert f"uid {STRANGER} gid {STRANGER} (allowed: root, uid {NOBODY})" in switch.log()


def test_control_group_members_are_served(open_dir: Path, tmp_path: Path) -> None:
    """--control-group: the socket file is the group's, mode 0660; a process whose group it is may use the
    control socket; a process of another group cannot connect, nor is it served where the file lets it."""
    with Switch(tmp_path, socket_path=str(open_dir / "ss.sock"), args=["--control-group", str(OPERATORS)]) as sw:
        info = os.stat(sw.control)
        assert (stat.S_IMODE(info.st_mode), info.st_gid) == (0o660, OPERATORS)
        member = answer_of(as_user(STRANGER, OPERATORS, ask(sw.control, STATUS_REQUEST)))
        assert member["socket"] == sw.socket
        assert member["control"] == {"clients": 1, "refused": {}, "group": OPERATORS}
        assert as_user(STRANGER, STRANGER, ask(sw.control, STATUS_REQUEST)) == "connect: Permission denied"
        os.chmod(sw.control, 0o666)
        assert answer_of(as_user(STRANGER, STRANGER, ask(sw.control, STATUS_REQUEST))) == \
            {"error": f"not allowed: uid {STRANGER}"}
        assert sw.status()["control"]["refused"] == {"not_allowed": 1}


def test_unknown_control_group_is_a_start_error(tmp_path: Path) -> None:
    """A group that does not exist: the switch does not start, and says why."""
    with pytest.raises(RuntimeError, match="--control-group: no group named 'no-such-group-here'"):
        Switch(tmp_path, args=["--control-group", "no-such-group-here"]).start()
    assert not (tmp_path / "ss.sock.ctl").exists()


def test_resolve_group() -> None:
    """Names through the group database, numbers as they are; unknown names and impossible numbers refused."""
    assert resolve_group(None) is None
    assert resolve_group("root") == 0 and resolve_group("4242") == 4242
    with pytest.raises(AccessError, match="no group named 'nope-nope'"):
        resolve_group("nope-nope")
    with pytest.raises(AccessError, match="not a group ID"):
        resolve_group("4294967295")


def test_policy() -> None:
    """Root, our own uid and the group's gid are allowed; in a user namespace of our own the overflow ids
    (every unmapped peer, root included) match nothing, even when they are ours."""
    me = os.geteuid()
    policy = AccessPolicy(group=OPERATORS)
    assert policy.allows(Peer(1, 0, 0)) and policy.allows(Peer(1, me, 5)) and policy.allows(Peer(1, 7, OPERATORS))
    assert not policy.allows(Peer(1, STRANGER, STRANGER)) and not AccessPolicy().allows(Peer(1, 7, OPERATORS))
    unmapped = AccessPolicy(group=NOBODY, unmapped=(me, NOBODY))
    assert not unmapped.allows(Peer(1, me, NOBODY))
    assert AccessPolicy(unmapped=(NOBODY, NOBODY)).allows(Peer(1, 0, 0))


def test_restrict_socket_file(tmp_path: Path) -> None:
    """Mode 0600 without a group; the group's with mode 0660 with one."""
    path = tmp_path / "s"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))
        assert restrict_socket_file(str(path), None) == ""
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert restrict_socket_file(str(path), OPERATORS) == ""
        assert (stat.S_IMODE(path.stat().st_mode), path.stat().st_gid) == (0o660, OPERATORS)
