"""The TCP_REPAIR helper's connection while a worker has it (coordinator/migration.py, coordinator/restore.py).

The coordinator watches the helper's connection between requests (end of
file drops it) and keeps serving its loop while the workers restore a
document.  A worker that was lent the connection reads the helper's replies
itself: the coordinator's loop must not read them first (it did, now and
then, and the worker timed out and reset the moved connection).  Here the
real :class:`Migration` runs its own selector, a socket plays the helper, and
a pool stand-in holds each posted request until the test answers it.
"""

from __future__ import annotations

import selectors
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from shardswitch.coordinator.migration import Migration
from tests.migration.statekit import echo_flood


@dataclass
class HeldPool:
    """Worker pool stand-in: posted requests wait in :attr:`posted` until the test answers them."""

    count: int = 1
    posted: list[tuple[int, Callable[[object | None], None]]] = field(default_factory=list)

    def call(self, pair: int, message: object, fds: list[int] | tuple[int, ...] = (),
             timeout: float = 0.0) -> object | None:
        """Not used here: a save would block the loop anyway."""
        raise AssertionError("no blocking call expected")

    def post(self, pair: int, message: object, fds: list[int] | tuple[int, ...],
             done: Callable[[object | None], None], timeout: float) -> bool:
        """Hold the request (with the helper's descriptor, as a worker would get it)."""
        assert len(fds) == 2, "the helper's connection goes with the part"
        self.posted.append((pair, done))
        return True

    def expire(self, now: float) -> float | None:
        """No deadlines here."""
        return None


def _spin(sel: selectors.BaseSelector) -> None:
    """Run the coordinator's handlers for whatever is ready now."""
    for _ in range(3):
        for key, _events in sel.select(timeout=0.05):
            key.data()


@pytest.fixture
def coordinator(tmp_path: Path) -> Iterator[tuple[Migration, HeldPool, socket.socket, selectors.BaseSelector]]:
    """A Migration listening for a helper, and the helper connected (it said nothing yet)."""
    sel = selectors.DefaultSelector()
    pool = HeldPool()
    migration = Migration(pool, sel, lambda: None, iter(range(1, 1 << 30)).__next__,
                          repair_path=str(tmp_path / "repair.sock"))
    migration.listen()
    helper = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    helper.connect(str(tmp_path / "repair.sock"))
    _spin(sel)
    assert migration.helper is not None
    try:
        yield migration, pool, helper, sel
    finally:
        helper.close()
        migration.close()
        sel.close()


def _restoring(migration: Migration, pool: HeldPool, sel: selectors.BaseSelector) -> None:
    """Start a restore of a small document and drive it until its part is posted to the worker."""
    posted = len(pool.posted)
    migration.saved = echo_flood(3).whole()
    migration.rollback()
    while migration.restore is not None and len(pool.posted) == posted:
        migration.tick(0.0)
    assert len(pool.posted) == posted + 1, "the part went to the worker"


def test_the_loop_leaves_the_workers_reply_to_the_worker(
        coordinator: tuple[Migration, HeldPool, socket.socket, selectors.BaseSelector]) -> None:
    """The helper answers while the worker has the connection: the byte is still there for the worker, however
    long the coordinator's loop runs; once the worker answered, the loop watches the connection again."""
    migration, pool, helper, sel = coordinator
    _restoring(migration, pool, sel)
    helper.sendall(b"\x01")                           # the helper's reply to the worker's request
    _spin(sel)
    assert migration.helper is not None
    assert migration.helper.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"\x01"
    assert migration.helper.recv(1) == b"\x01"        # the worker reads it
    _pair, done = pool.posted.pop()
    done(None)
    assert not migration.helper_loans
    helper.close()                                    # the helper goes away: the loop notices again
    _spin(sel)
    assert migration.helper is None


def test_a_late_answer_of_an_abandoned_restore_does_not_end_the_next_loan(
        coordinator: tuple[Migration, HeldPool, socket.socket, selectors.BaseSelector]) -> None:
    """A rollback abandons a restore whose worker still has the connection, and the next restore lends it
    again: the first worker's late answer leaves it unwatched for the second."""
    migration, pool, helper, sel = coordinator
    _restoring(migration, pool, sel)
    _restoring(migration, pool, sel)                  # the first is abandoned, its part still in flight
    first, second = pool.posted
    first[1](None)                                    # the abandoned part's late answer
    helper.sendall(b"\x01")                          # the helper answers the second worker
    _spin(sel)
    assert migration.helper is not None
    assert migration.helper.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"\x01"
    migration.helper.recv(1)
    second[1](None)
    assert not migration.helper_loans
    helper.close()
    _spin(sel)
    assert migration.helper is None


def test_a_helper_dropped_while_lent_is_not_watched_again(
        coordinator: tuple[Migration, HeldPool, socket.socket, selectors.BaseSelector]) -> None:
    """The switch closes the helper's connection while a worker has it (shutting down): the answer that
    follows does not bring it back into the loop."""
    migration, pool, _helper, sel = coordinator
    _restoring(migration, pool, sel)
    lent = migration.helper
    migration.close()
    _pair, done = pool.posted.pop()
    done(None)
    assert migration.helper is None
    assert all(key.fileobj is not lent for key in sel.get_map().values())
