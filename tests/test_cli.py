"""Tests of the command line (shardswitch.cli, python -m shardswitch) and deploy/entrypoint.py.

The coordinator is replaced by stand-ins (monkeypatched ``startup.run`` and
``control.query``/``format_status``): these tests check parsing, exit codes,
messages and the hand-over, not the data path.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from shardswitch import cli
from shardswitch.settings import Config, ConfigError
from shardswitch.virtio import ringimpl

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _runtime_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """Default socket paths go under tmp_path; logging is restored after each test."""
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    root = logging.getLogger()
    saved = (root.level, list(root.handlers))
    yield
    root.setLevel(saved[0])
    root.handlers[:] = saved[1]


class FakeRun:
    """Stand-in for shardswitch.coordinator.startup.run: records the Config, returns or raises."""

    def __init__(self, result: int | BaseException = 0) -> None:
        """Remember what to return (an int) or raise (an exception)."""
        self.result = result
        self.configs: list[Config] = []
        self.log_files: list[object] = []

    def __call__(self, cfg: Config, log_file: object = None) -> int:
        """Record ``cfg`` (and the log file) and return/raise the configured result."""
        self.configs.append(cfg)
        self.log_files.append(log_file)
        if isinstance(self.result, BaseException):
            raise self.result
        return self.result


def fake_server(monkeypatch: pytest.MonkeyPatch, result: int | BaseException = 0) -> FakeRun:
    """Install a FakeRun as shardswitch.coordinator.startup.run."""
    from shardswitch.coordinator import startup

    fake = FakeRun(result)
    monkeypatch.setattr(startup, "run", fake, raising=False)
    return fake


# ------------------------------------------------------------------ top level


def test_print_capabilities(capsys: pytest.CaptureFixture[str]) -> None:
    """libvirt's probe: exactly {"type": "net"} on stdout, exit 0."""
    assert cli.main(["--print-capabilities"]) == 0
    out = capsys.readouterr().out
    assert out == '{"type": "net"}\n'
    assert json.loads(out) == {"type": "net"}


def test_python_dash_m() -> None:
    """``python -m shardswitch`` runs the same main (one real process)."""
    done = subprocess.run([sys.executable, "-m", "shardswitch", "--print-capabilities"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout) == (0, '{"type": "net"}\n')


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    """Without a sub-command: usage on stderr, exit 2."""
    assert cli.main([]) == 2
    assert "a command is required" in capsys.readouterr().err


def test_argparse_errors_and_help_return_codes(capsys: pytest.CaptureFixture[str]) -> None:
    """main returns argparse's codes instead of raising SystemExit."""
    assert cli.main(["start", "--workers", "many"]) == 2
    assert "invalid int value: 'many'" in capsys.readouterr().err
    assert cli.main(["start", "-d", "-q"]) == 2
    assert cli.main(["start", "--socket", "/a", "--connect", "/b"]) == 2
    assert cli.main(["start", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--workers" in out and "--reflect" not in out  # --reflect is hidden


# ------------------------------------------------------------------ start


def test_start_hands_config_to_coordinator(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Every option lands in the Config handed to startup.run; socket dirs are created 0700."""
    fake = fake_server(monkeypatch, 0)
    sock = tmp_path / "sockdir" / "s.sock"
    argv = ["start", "--workers", "4", "--socket", str(sock), "-a", "10.0.0.2", "-n", "255.255.255.0",
            "-g", "10.0.0.1", "-M", "02:00:00:00:00:09", "-m", "1500", "-i", "eth1",
            "--dns", "192.0.2.1", "--dns", "192.0.2.2", "--search", "a.example", "--reflect", "-q"]
    assert cli.main(argv) == 0
    (cfg,) = fake.configs
    assert cfg == Config(workers=4, socket=str(sock), control=str(sock) + ".ctl", repair_path=str(sock) + ".repair", address="10.0.0.2",
                         prefix_len=24, gateway="10.0.0.1", mac="02:00:00:00:00:09", mtu=1500,
                         interface="eth1", dns=["192.0.2.1", "192.0.2.2"], search=["a.example"],
                         quiet=True, reflect=True)
    assert stat.S_IMODE(os.stat(sock.parent).st_mode) == 0o700
    assert logging.getLogger().level == logging.ERROR


def test_start_with_config_file_and_connect(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """--config is layered under the options; --connect replaces the file's socket."""
    fake = fake_server(monkeypatch, 3)
    conf = tmp_path / "ss.toml"
    conf.write_text('workers = 2\nsocket = "/tmp/never.sock"\nmtu = 9000\n')
    assert cli.main(["start", "--config", str(conf), "--connect", "/tmp/qemu.sock", "-d"]) == 3
    (cfg,) = fake.configs
    assert (cfg.workers, cfg.mtu, cfg.socket, cfg.connect, cfg.debug) == (2, 9000, None,
                                                                         "/tmp/qemu.sock", True)
    assert cfg.control == str(tmp_path / "run/shardswitch/shardswitch.sock.ctl")


@pytest.mark.parametrize("argv,message", [
    (["start", "--workers", "0"], "shardswitch: error: command line: --workers: Expected `int` >= 1, got 0"),
    (["start", "-n", "200"], "-n/--netmask or -a ADDR/LEN: Expected `int` <= 128"),
    (["start", "-n", "255.0.255.0"], "-n/--netmask: '255.0.255.0' is not a prefix length"),
    (["start", "--config", "/nonexistent/ss.toml"], "config file /nonexistent/ss.toml: No such file"),
])
def test_start_config_errors(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                             argv: list[str], message: str) -> None:
    """Configuration errors: one line on stderr, exit 2, coordinator never called."""
    fake = fake_server(monkeypatch)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1
    assert fake.configs == []


@pytest.mark.parametrize("value,message", [
    ("fast", "SHARDSWITCH_RING='fast': choose one of auto, python, c"),
    ("c", "SHARDSWITCH_RING=c but the compiled ring helper is missing"),
])
def test_start_refuses_a_bad_ring_choice(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                         value: str, message: str) -> None:
    """SHARDSWITCH_RING that cannot be honoured (a typo; ``c`` without the helper): one line, exit 2, before
    any worker could die of it."""
    import shardswitch.virtio

    fake = fake_server(monkeypatch)
    # As if pip had not built the helper: the import fails.
    monkeypatch.setitem(sys.modules, "shardswitch.virtio._vring", None)
    monkeypatch.delattr(shardswitch.virtio, "_vring", raising=False)
    monkeypatch.setenv("SHARDSWITCH_RING", value)
    ringimpl.compiled.cache_clear()
    try:
        assert cli.main(["start", "-q"]) == 2
    finally:
        ringimpl.compiled.cache_clear()
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1
    assert fake.configs == []


@pytest.mark.parametrize("exc,code,message", [
    (ConfigError("cannot choose the guest's addressing: the host has no IPv4 default route"), 2,
     "no IPv4 default route"),
    (PermissionError(13, "Permission denied"), 1, "Permission denied"),
    (KeyboardInterrupt(), 130, ""),
])
def test_start_runtime_errors(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                              exc: BaseException, code: int, message: str) -> None:
    """Errors raised by the coordinator map to exit codes, without tracebacks."""
    fake_server(monkeypatch, exc)
    assert cli.main(["start", "-q"]) == code
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_prepare_socket_dir_refuses_shared_tmp_dirs(tmp_path: Path) -> None:
    """Under /tmp a group/world-writable directory is refused (someone else may control it)."""
    assert str(tmp_path).startswith("/tmp/")
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(PermissionError, match="refusing to put sockets there"):
        cli.prepare_socket_dir(str(shared / "s.sock"))
    cli.prepare_socket_dir(str(tmp_path / "new" / "deeper" / "s.sock"))
    assert stat.S_IMODE(os.stat(tmp_path / "new" / "deeper").st_mode) == 0o700


def test_start_unsafe_socket_dir_is_a_runtime_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """An unusable socket directory: exit 1 with the reason, coordinator not started."""
    fake = fake_server(monkeypatch)
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    assert cli.main(["start", "-q", "--socket", str(shared / "s.sock")]) == 1
    assert "cannot prepare the socket directory" in capsys.readouterr().err
    assert fake.configs == []


def test_setup_logging_levels() -> None:
    """-d gives DEBUG, -q ERROR, neither INFO; the format names the process."""
    cli.setup_logging(True, False)
    assert logging.getLogger().level == logging.DEBUG
    cli.setup_logging(False, True)
    assert logging.getLogger().level == logging.ERROR
    cli.setup_logging(False, False)
    root = logging.getLogger()
    assert root.level == logging.INFO and len(root.handlers) == 1
    assert root.handlers[0].formatter is not None
    assert "%(process)d" in (root.handlers[0].formatter._fmt or "")


# ------------------------------------------------------------------ status

STATUS = {"version": "0.1.0", "pid": 42, "workers": []}


@pytest.fixture
def fake_control(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Replace control.query/format_status; return the list of (path, cmd) queried."""
    from shardswitch.coordinator import control

    calls: list[tuple[str, str]] = []

    def query(path: str, cmd: str, timeout: float = 10.0) -> dict[str, Any]:
        """Record the query; fail for paths containing 'down'."""
        calls.append((path, cmd))
        if "down" in path:
            raise control.ControlError(f"cannot reach shardswitch at {path}: Connection refused")
        return dict(STATUS)

    monkeypatch.setattr(control, "query", query)
    monkeypatch.setattr(control, "format_status", lambda d: f"shardswitch pid {d['pid']}")
    return calls


def test_status_text_and_json(fake_control: list[tuple[str, str]], capsys: pytest.CaptureFixture[str],
                              tmp_path: Path) -> None:
    """status prints format_status's text, or the JSON; default control path from the defaults."""
    assert cli.main(["status"]) == 0
    assert capsys.readouterr().out == "shardswitch pid 42\n"
    assert fake_control[-1] == (str(tmp_path / "run/shardswitch/shardswitch.sock.ctl"), "status")
    assert cli.main(["status", "--control", "/x/c.ctl", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == STATUS
    assert fake_control[-1] == ("/x/c.ctl", "status")


def test_status_unreachable(fake_control: list[tuple[str, str]], capsys: pytest.CaptureFixture[str]) -> None:
    """An unreachable control socket: one line on stderr, exit 1."""
    assert cli.main(["status", "--control", "/down.ctl"]) == 1
    err = capsys.readouterr().err
    assert "cannot reach shardswitch at /down.ctl" in err and "Traceback" not in err


# ------------------------------------------------------------------ deploy/entrypoint.py


@pytest.fixture(scope="module")
def entrypoint() -> ModuleType:
    """Load deploy/entrypoint.py (not a package module) by path."""
    spec = importlib.util.spec_from_file_location("ss_entrypoint", REPO / "deploy" / "entrypoint.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_environ_to_argv(entrypoint: ModuleType) -> None:
    """Every variable maps to its option; lists split on commas/spaces; empty means unset."""
    env = {"SHARDSWITCH_WORKERS": "4", "SHARDSWITCH_SOCKET": "/run/shardswitch/s.sock",
           "SHARDSWITCH_CONTROL": "/run/c.ctl", "SHARDSWITCH_CONFIG": "/etc/ss.toml",
           "SHARDSWITCH_ADDRESS": "10.0.0.2, 2001:db8::2", "SHARDSWITCH_NETMASK": "255.255.255.0",
           "SHARDSWITCH_GATEWAY": "10.0.0.1", "SHARDSWITCH_MAC": "02:00:00:00:00:01",
           "SHARDSWITCH_MTU": "1500", "SHARDSWITCH_INTERFACE": "eth0",
           "SHARDSWITCH_DNS": "192.0.2.1, 192.0.2.2", "SHARDSWITCH_SEARCH": "a.example b.example",
           "SHARDSWITCH_DEBUG": "yes", "SHARDSWITCH_QUIET": "0", "SHARDSWITCH_CONNECT": "",
           "SHARDSWITCH_METRICS": "0.0.0.0:9410", "SHARDSWITCH_PCAP": "/tmp/c.pcap",
           "SHARDSWITCH_LOG_FILE": "/var/log/s.log", "OTHER": "x"}
    assert entrypoint.environ_to_argv(env) == [
        "--workers", "4", "--socket", "/run/shardswitch/s.sock", "--control", "/run/c.ctl",
        "--config", "/etc/ss.toml", "-M", "02:00:00:00:00:01", "-m", "1500", "-i", "eth0",
        "--metrics", "0.0.0.0:9410", "--pcap", "/tmp/c.pcap", "--log-file", "/var/log/s.log",
        "-a", "10.0.0.2", "-a", "2001:db8::2", "-n", "255.255.255.0", "-g", "10.0.0.1",
        "--dns", "192.0.2.1", "--dns", "192.0.2.2", "--search", "a.example", "--search", "b.example",
        "-d"]
    assert entrypoint.environ_to_argv({}) == []


def test_environ_argv_is_accepted_by_the_parser(entrypoint: ModuleType) -> None:
    """The mapped options parse into the intended Config fields."""
    env = {"SHARDSWITCH_WORKERS": "2", "SHARDSWITCH_CONNECT": "/q.sock", "SHARDSWITCH_QUIET": "on",
           "SHARDSWITCH_NETMASK": "16", "SHARDSWITCH_DNS": "192.0.2.9"}
    command = entrypoint.build_command([], env)
    assert command[:2] == ["shardswitch", "start"]
    args = cli.build_parser().parse_args(command[1:])
    assert (args.workers, args.connect, args.quiet, args.prefix_len, args.dns) == (
        2, "/q.sock", True, ["16"], ["192.0.2.9"])


def test_bad_boolean(entrypoint: ModuleType, capsys: pytest.CaptureFixture[str],
                     monkeypatch: pytest.MonkeyPatch) -> None:
    """An unrecognised boolean is a usage error (exit 2), before anything is executed."""
    with pytest.raises(entrypoint.EntrypointError, match="SHARDSWITCH_DEBUG='maybe'"):
        entrypoint.environ_to_argv({"SHARDSWITCH_DEBUG": "maybe"})
    monkeypatch.setenv("SHARDSWITCH_DEBUG", "maybe")
    assert entrypoint.main([]) == 2
    assert "SHARDSWITCH_DEBUG" in capsys.readouterr().err


@pytest.mark.parametrize("args,expected", [
    ([], ["shardswitch", "start", "--workers", "3", "--socket", "/r/s.sock"]),
    (["-m", "1500"], ["shardswitch", "start", "--workers", "3", "--socket", "/r/s.sock", "-m", "1500"]),
    (["start", "-q"], ["shardswitch", "start", "--workers", "3", "--socket", "/r/s.sock", "-q"]),
    (["status", "--json"], ["shardswitch", "status", "--control", "/r/s.sock.ctl", "--json"]),
    (["--print-capabilities"], ["shardswitch", "--print-capabilities"]),
    (["sh", "-c", "true"], ["sh", "-c", "true"]),
])
def test_build_command(entrypoint: ModuleType, args: list[str], expected: list[str]) -> None:
    """Container arguments choose start (with the variables), status, pass-through, or a program."""
    env = {"SHARDSWITCH_WORKERS": "3", "SHARDSWITCH_SOCKET": "/r/s.sock"}
    assert entrypoint.build_command(args, env) == expected


def test_status_control_prefers_explicit_control(entrypoint: ModuleType) -> None:
    """SHARDSWITCH_CONTROL wins over the socket-derived path; nothing set, no --control."""
    env = {"SHARDSWITCH_SOCKET": "/r/s.sock", "SHARDSWITCH_CONTROL": "/r/c"}
    assert entrypoint.status_argv(env) == ["--control", "/r/c"]
    assert entrypoint.status_argv({}) == []


def test_entrypoint_execs_shardswitch(tmp_path: Path) -> None:
    """The real script execs the command (here a stub 'shardswitch' on PATH printing its argv)."""
    stub = tmp_path / "shardswitch"
    stub.write_text('#!/bin/sh\necho "$$ $*"\n')
    stub.chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "SHARDSWITCH_WORKERS": "2", "SHARDSWITCH_DNS": "192.0.2.1"}
    done = subprocess.Popen([sys.executable, str(REPO / "deploy" / "entrypoint.py"), "-m", "1500"],
                            env=env, stdout=subprocess.PIPE, text=True)
    out, _ = done.communicate(timeout=60)
    pid, argv = out.strip().split(" ", 1)
    assert done.returncode == 0
    assert int(pid) == done.pid  # exec: same process, so signals reach shardswitch directly
    assert argv == "start --workers 2 --dns 192.0.2.1 -m 1500"


def test_runas_and_no_sandbox_options(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """--runas and --no-sandbox reach the Config."""
    fake = fake_server(monkeypatch, 0)
    sock = tmp_path / "s.sock"
    assert cli.main(["start", "--socket", str(sock), "--runas", "nobody:nogroup", "-q"]) == 0
    assert cli.main(["start", "--socket", str(sock), "--no-sandbox", "-q"]) == 0
    first, second = fake.configs
    assert (first.runas, first.no_sandbox) == ("nobody:nogroup", False)
    assert (second.runas, second.no_sandbox) == (None, True)


@pytest.mark.skipif(os.geteuid() != 0, reason="a root start resolves --runas")
def test_unknown_runas_user_is_refused_before_anything_starts(tmp_path: Path) -> None:
    """--runas naming no user: exit status 1 and the reason, nothing listening."""
    sock = tmp_path / "s.sock"
    done = subprocess.run([sys.executable, "-m", "shardswitch", "start", "--socket", str(sock),
                           "--runas", "no-such-user-here"], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert done.returncode == 1, done
    assert "--runas: no user named 'no-such-user-here'" in done.stderr
    assert not sock.exists()


def test_forward_list_add_remove_on_a_running_switch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`shardswitch forward`: add (several SPECs at once), list as text and JSON, remove; a refused change
    is one error line and exit 1, and changes nothing."""
    from tests.switch import Switch

    with Switch(tmp_path, workers=1, args=["-t", "127.0.0.1/5000"]) as sw:
        control = ["--control", sw.control]
        assert cli.main(["forward", "add", "-t", "127.0.0.1/5001:10.0.2.16/22", "-u", "127.0.0.1/5353:53",
                         *control]) == cli.ExitCode.OK
        assert capsys.readouterr().out.splitlines() == ["added: -t 127.0.0.1/5001:10.0.2.16/22",
                                                        "added: -u 127.0.0.1/5353:53"]
        assert cli.main(["forward", "list", *control]) == cli.ExitCode.OK
        assert capsys.readouterr().out.splitlines() == [
            "-t 127.0.0.1/5000", "-t 127.0.0.1/5001:10.0.2.16/22    # added at run time",
            "-u 127.0.0.1/5353:53    # added at run time"]
        assert cli.main(["forward", "list", "--json", *control]) == cli.ExitCode.OK
        listed = json.loads(capsys.readouterr().out)
        assert [rule["origin"] for rule in listed["tcp"]] == ["start", "run-time"]
        assert cli.main(["forward", "add", "-t", "127.0.0.1/5000-5001", *control]) == cli.ExitCode.RUNTIME
        err = capsys.readouterr().err
        assert err.startswith("shardswitch: error: forward add: -t 127.0.0.1/5000-5001 conflicts with")
        assert err.rstrip().endswith("nothing changed")
        assert cli.main(["forward", "remove", "-u", "127.0.0.1/5353:53", *control]) == cli.ExitCode.OK
        assert capsys.readouterr().out.strip() == "removed: -u 127.0.0.1/5353:53"
        assert cli.main(["forward", "remove", "-t", "127.0.0.1/5000", *control]) == cli.ExitCode.OK
        capsys.readouterr()
        assert cli.main(["forward", "list", *control]) == cli.ExitCode.OK
        assert capsys.readouterr().out.splitlines() == ["-t 127.0.0.1/5001:10.0.2.16/22    # added at run time"]
        assert "forwarding: TCP 1 rule(s), 1 port(s); UDP 0 rule(s)" in cli_status(control, capsys)


def cli_status(control: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """`shardswitch status`'s text."""
    assert cli.main(["status", *control]) == cli.ExitCode.OK
    return capsys.readouterr().out


def test_forward_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """add/remove need a SPEC, list takes none, the action is one of three; an absent switch is exit 1."""
    control = ["--control", str(tmp_path / "none.ctl")]
    assert cli.main(["forward", "add", *control]) == cli.ExitCode.USAGE
    assert "forward add needs -t SPEC or -u SPEC" in capsys.readouterr().err
    assert cli.main(["forward", "list", "-t", "22", *control]) == cli.ExitCode.USAGE
    assert "forward list takes no -t/-u SPEC" in capsys.readouterr().err
    assert cli.main(["forward", "flush", *control]) == cli.ExitCode.USAGE
    capsys.readouterr()
    assert cli.main(["forward", "list", *control]) == cli.ExitCode.RUNTIME
    assert "(is shardswitch running?)" in capsys.readouterr().err


def test_version_as_passt() -> None:
    """--version (passt's too): the version on stdout, exit 0."""
    from shardswitch import __version__

    done = subprocess.run([sys.executable, "-m", "shardswitch", "--version"], capture_output=True, text=True,
                          timeout=60, cwd=Path(__file__).resolve().parents[1])
    assert (done.returncode, done.stdout.strip()) == (0, f"shardswitch {__version__}")
