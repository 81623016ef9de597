# mpflight: one execution per key across the processes of a machine (Go's singleflight over /dev/shm).
# Layers, each importing only those above it:
#   _errors, _layout          errors; the bytes of a table (no I/O)
#   _locks, _codec, _owner    posix_ipc objects and names; msgpack values; psutil identities
#   _table, _group            one process's mapping and its repair; Group and the call protocol
"""Coalesce duplicate work across processes: ``Group(name).do(key, fn)`` runs fn once per key at a time."""

from ._codec import Codec
from ._errors import AbortError, DeadlockError, MPFlightError, RemoteError, SerializationError
from ._group import Group, InflightCall, Result, coalesce, tables, unlink
from ._locks import NoSuchTable

__version__ = "0.1.0"

__all__ = [
    "AbortError",
    "Codec",
    "DeadlockError",
    "Group",
    "InflightCall",
    "MPFlightError",
    "NoSuchTable",
    "RemoteError",
    "Result",
    "SerializationError",
    "coalesce",
    "tables",
    "unlink",
]
