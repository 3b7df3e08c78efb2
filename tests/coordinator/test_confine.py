"""What the coordinator keeps in its filesystem view after the drop (coordinator/confine.py): only what it still
uses, i.e. the directories where its user may remove the files it made, and the front-end's in client mode."""

from __future__ import annotations

import os
from pathlib import Path

from shardswitch.coordinator.confine import kept_dirs
from shardswitch.sandbox import SandboxSetup
from shardswitch.sandbox.privileges import RunAs

NOBODY = RunAs("nobody", 65534, 65534)


def made(folder: Path, mode: int, folder_owner: int = 0, file_owner: int = 0) -> str:
    """A file ``folder/f`` (created as root would before the drop) in a folder of ``mode``; its path."""
    folder.mkdir()
    os.chown(folder, folder_owner, folder_owner)
    folder.chmod(mode)
    path = folder / "f"
    path.write_text("")
    os.chown(path, file_owner, file_owner)
    return str(path)


def test_only_directories_whose_files_the_user_can_remove(tmp_path: Path) -> None:
    """A root-only directory, or a sticky one where root owns the file, stays out of view (the file is left
    for the next start); the user's own directory and a sticky one where it owns the file are kept."""
    own = made(tmp_path / "own", 0o750, folder_owner=NOBODY.uid)
    root_only = made(tmp_path / "root", 0o755)
    sticky_root_file = made(tmp_path / "sticky1", 0o1777)
    sticky_own_file = made(tmp_path / "sticky2", 0o1777, file_owner=NOBODY.uid)
    kept = kept_dirs([own, root_only, sticky_root_file, sticky_own_file], SandboxSetup(NOBODY))
    assert kept.dirs == sorted([str(tmp_path / "own"), str(tmp_path / "sticky2")])
    assert kept.left == [root_only, sticky_root_file]


def test_client_mode_keeps_the_front_ends_directory(tmp_path: Path) -> None:
    """In client mode the front-end's socket is reconnected by path: its directory stays whoever owns it (if
    it exists: a directory made after the start could not be seen anyway)."""
    (tmp_path / "qemu").mkdir()
    kept = kept_dirs([], SandboxSetup(NOBODY), connect_path=str(tmp_path / "qemu" / "vhost.sock"))
    assert kept.dirs == [str(tmp_path / "qemu")] and kept.left == []
    assert kept_dirs([], SandboxSetup(NOBODY), connect_path=str(tmp_path / "later" / "vhost.sock")).dirs == []
