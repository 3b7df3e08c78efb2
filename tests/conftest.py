"""Shared pytest fixtures and the prerequisite gate for real-guest tests.

Tests marked ``guest`` (QEMU guest, namespaces) or ``dpdk`` (testpmd) need
root and some Debian packages (scripts/install-deps.sh).  Where those are
missing such tests are skipped - except in CI (environment ``CI=true``), where
they fail instead: the real-QEMU tests must run there, never silently skip.

Fixtures: ``guest_image`` (session; the cached initramfs + kernel, built under
the repository's git-ignored .cache/guest/), ``nobody_dir`` (a /run directory
the switch's default --runas user owns) and ``netns`` (a fresh
:class:`tests.guest.netns.TestNetns`, torn down even when the test fails).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import pytest

from tests.guest import missing_dpdk_prerequisites, missing_guest_prerequisites
from tests.guest.image import GuestImage, build_initramfs
from tests.guest.netns import TestNetns

REPO_ROOT = Path(__file__).resolve().parent.parent
GUEST_CACHE_DIR = REPO_ROOT / ".cache" / "guest"

_GATES: tuple[tuple[str, Callable[[], list[str]]], ...] = (
    ("guest", missing_guest_prerequisites),
    ("dpdk", missing_dpdk_prerequisites),
)


def in_ci() -> bool:
    """Whether we run in CI, where missing prerequisites are failures."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Skip (or, in CI, fail) ``guest``/``dpdk`` tests whose prerequisites are missing."""
    for marker, missing_of in _GATES:
        if item.get_closest_marker(marker) is None:
            continue
        missing = missing_of()
        if missing:
            reason = f"{marker} test prerequisites missing: " + "; ".join(missing)
            if in_ci():
                pytest.fail(reason + " (CI=true: real-guest tests must not skip)", pytrace=False)
            pytest.skip(reason)


@pytest.fixture(scope="session")
def guest_image() -> GuestImage:
    """The guest kernel + initramfs, rebuilt only when an input changed."""
    return build_initramfs(GUEST_CACHE_DIR)


@pytest.fixture
def netns() -> Iterator[TestNetns]:
    """A host + upstream namespace pair for one test, removed afterwards."""
    with TestNetns() as ns:
        yield ns


#: The user a root start of the switch runs as (its default --runas).
NOBODY = 65534


@pytest.fixture
def nobody_dir() -> Iterator[Path]:
    """A directory under /run owned by the user a root-started switch becomes, as systemd's
    RuntimeDirectory= with User= makes one: that user may create and remove sockets in it."""
    path = Path(tempfile.mkdtemp(prefix="shardswitch-test-", dir="/run"))
    try:
        os.chown(path, NOBODY, NOBODY)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def runtime_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Make the default socket path predictable: $XDG_RUNTIME_DIR under tmp_path."""
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
