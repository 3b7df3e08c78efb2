"""The shared flow table: POSIX shared memory, a crash-recoverable readers-writer lock, recovery.

Modules: :mod:`~shardswitch.shm.layout` (binary layout and codecs),
:mod:`~shardswitch.shm.segment` (the named POSIX objects of an instance),
:mod:`~shardswitch.shm.rwlock` (the lock and the participant slots),
:mod:`~shardswitch.shm.store` (entries, hash index, free list),
:mod:`~shardswitch.shm.recovery` (repair after a participant died),
:mod:`~shardswitch.shm.table` (:class:`FlowTable`, the public API).
"""

from shardswitch.shm.layout import (DEFAULT_CAPACITY, Flow, FlowRef, FlowSide, FlowTableError,
                                    FlowType, Hit, HookPoint, InstanceInUseError, Pif,
                                    StaleReferenceError, State, TableFullError, ip16, ip_of,
                                    pack_key)
from shardswitch.shm.table import FlowTable

__all__ = ["DEFAULT_CAPACITY", "Flow", "FlowRef", "FlowSide", "FlowTable", "FlowTableError",
           "FlowType", "Hit", "HookPoint", "InstanceInUseError", "Pif", "StaleReferenceError",
           "State", "TableFullError", "ip16", "ip_of", "pack_key"]
