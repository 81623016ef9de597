# mpflight: one execution per key across the processes of a machine (Go's singleflight over /dev/shm).
# Layers, each importing only those above it (docs/design.md, "Module map"):
#   _errors, _layout, _faults         errors; the bytes of a table (no I/O); test switches
#   _locks, _codec, _owner            posix_ipc objects and names; msgpack payloads; psutil identities
#   _table                            one process's mapping of a table, its lock and its repair
#   _protocol                         the slot protocol: claim, join, finish, publish, wait, abort
#   _registry                         this process's attachments to tables
#   _tier                             the seam: the table as a tier, and a next tier behind it
#   _housekeeping, _metrics           the reaper, gc, inflight, stats; the counters read for metrics
#   _drivers, _coalesce               do/do_ex, do_future, do_async; the decorator
#   _group, _cli, prometheus          Group, the facade; the command line; the prometheus_client collector
"""Coalesce duplicate work across processes: ``Group(name).do(key, fn)`` runs fn once per key at a time."""

from ._codec import Codec
from ._errors import (
    AbortError,
    AccessDenied,
    CorruptPayload,
    CorruptSlot,
    DamagedTable,
    DeadlockError,
    IncompatibleTable,
    MPFlightError,
    NoSpace,
    NoSuchTable,
    NotInitialised,
    RemoteError,
    SerializationError,
    TierUnavailable,
    WaitTimeout,
)
from ._group import Group, coalesce
from ._housekeeping import InflightCall, tables, unlink
from ._protocol import Result
from ._redis import fence

__version__ = "0.1.0"

__all__ = [
    "AbortError",
    "AccessDenied",
    "Codec",
    "CorruptPayload",
    "CorruptSlot",
    "DamagedTable",
    "DeadlockError",
    "Group",
    "IncompatibleTable",
    "InflightCall",
    "MPFlightError",
    "NoSpace",
    "NoSuchTable",
    "NotInitialised",
    "RemoteError",
    "Result",
    "SerializationError",
    "TierUnavailable",
    "WaitTimeout",
    "coalesce",
    "fence",
    "tables",
    "unlink",
]
