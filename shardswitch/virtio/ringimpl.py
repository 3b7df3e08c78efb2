"""Which implementation of the ring mechanics runs: the compiled helper or the Python reference.

``SHARDSWITCH_RING`` chooses, read once per process when first asked:

* ``auto`` (the default): the compiled helper :mod:`shardswitch.virtio._vring`
  when it was built (``pip install`` builds it from ``_vring.c``), else the
  Python reference, with a warning;
* ``python``: the Python reference (:class:`~shardswitch.virtio.virtqueue.Virtqueue`)
  everywhere, the helper never imported;
* ``c``: the compiled helper, and an error if it is missing.

Both give the same results call for call (the differential tests compare
them); the helper only costs less per buffer.
"""

from __future__ import annotations

import logging
import os
from functools import lru_cache
from types import ModuleType

log = logging.getLogger("shardswitch.virtio")

CHOICES = ("auto", "python", "c")


class RingImplError(Exception):
    """SHARDSWITCH_RING asks for something this installation cannot give."""


@lru_cache(maxsize=1)
def compiled() -> ModuleType | None:
    """The compiled helper module when it is to be used, None for the Python reference."""
    choice = os.environ.get("SHARDSWITCH_RING", "auto") or "auto"
    if choice not in CHOICES:
        raise RingImplError(f"SHARDSWITCH_RING={choice!r}: choose one of {', '.join(CHOICES)}")
    if choice == "python":
        return None
    try:
        from shardswitch.virtio import _vring
    except ImportError as exc:
        if choice == "c":
            raise RingImplError(f"SHARDSWITCH_RING=c but the compiled ring helper is missing: {exc}") from exc
        log.warning("compiled ring helper not built (%s): using the Python reference", exc)
        return None
    return _vring


def name() -> str:
    """``"c"`` or ``"python"``: what runs in this process."""
    return "c" if compiled() is not None else "python"
