"""--chroot-fallback: where pivot_root cannot move the root (an initramfs's rootfs), the empty filesystem view
is still built, by moving it over / and chrooting into it, as passt's move_root().

No test host boots from an initramfs, so pivot_root never refuses here: the fallback is driven directly
(``try_pivot=False``) in a forked child, with the real mount(2) and chroot(2) calls, and what the child can
see afterwards is checked.  The option itself is checked end to end on a running switch (it serves,
sandboxed, with the option given).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shardswitch.sandbox.mounts import empty_root
from tests.switch import Switch
from tests.switchkit import in_child

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root, as systemd and libvirt start us")


def test_fallback_builds_the_empty_view(tmp_path: Path) -> None:
    """The chroot fallback leaves only /dev (null, shm), a read-only /proc and the kept directory, read-only."""
    kept = tmp_path / "kept"
    kept.mkdir()

    def fall_back() -> object:
        """In the child: build the view through the fallback, report what is visible."""
        empty_root([str(kept)], chroot_fallback=True, try_pivot=False)
        try:
            open("/new-file", "w").close()
            writable = True
        except OSError:
            writable = False
        return {"top": sorted(os.listdir("/")), "dev": sorted(os.listdir("/dev")), "writable": writable,
                "kept": os.path.isdir(str(kept)), "proc": os.path.exists("/proc/self/status")}

    seen = in_child(fall_back)
    assert seen == {"top": sorted(["dev", "proc", kept.parts[1]]), "dev": ["null", "shm"], "writable": False,
                    "kept": True, "proc": True}, seen


def test_without_the_option_the_refusal_names_it() -> None:
    """pivot_root refused and no --chroot-fallback: the error says which option falls back (nothing changes)."""
    def refused() -> object:
        """In the child: the view refused; the root still holds the host's directories."""
        try:
            empty_root([], try_pivot=False)
        except Exception as err:  # noqa: BLE001 - the message is what is checked
            return {"error": str(err), "usr": os.path.isdir("/usr")}
        return {"error": "", "usr": os.path.isdir("/usr")}

    assert in_child(refused) == {"error": "pivot_root: Invalid argument (--chroot-fallback chroots instead)",
                                 "usr": True}


def test_switch_with_the_option_serves_sandboxed(tmp_path: Path) -> None:
    """`--chroot-fallback` on a host where pivot_root works: the switch is sandboxed as usual."""
    with Switch(tmp_path, args=["--chroot-fallback"]) as switch:
        sandbox = switch.status()["sandbox"]
        assert sandbox["enabled"] and sandbox["namespaces"], sandbox
        assert not {"usr", "etc"} & set(os.listdir(f"/proc/{switch.pid}/root"))
