"""The shared flow table: shared memory, a crash-recoverable readers-writer lock, recovery.

Modules: :mod:`~shardswitch.shm.layout` (binary layout and codecs),
:mod:`~shardswitch.shm.segment` (an instance's memfd and semaphores, shared by fork only),
:mod:`~shardswitch.shm.rwlock` (the lock and the participant slots),
:mod:`~shardswitch.shm.store` (entries, hash index, free list),
:mod:`~shardswitch.shm.recovery` (repair after a participant died),
:mod:`~shardswitch.shm.table` (:class:`FlowTable`, the public API).
"""

from shardswitch.shm.layout import (DEFAULT_CAPACITY, Flow, FlowRef, FlowSide, FlowTableError,
                                    FlowType, Hit, HookPoint, Pif,
                                    StaleReferenceError, State, TableFullError, ip16, ip_of,
                                    pack_key)
from shardswitch.shm.table import FlowTable

__all__ = ["DEFAULT_CAPACITY", "Flow", "FlowRef", "FlowSide", "FlowTable", "FlowTableError",
           "FlowType", "Hit", "HookPoint", "Pif", "StaleReferenceError",
           "State", "TableFullError", "ip16", "ip_of", "pack_key"]
