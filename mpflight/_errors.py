"""The library's own errors.

Each error keeps the data it was raised with, builds its message from that data, and pickles
(so it can cross a ``multiprocessing`` pipe unchanged).
"""

from __future__ import annotations

import reprlib

_short = reprlib.Repr()
_short.maxstring = 80
_short.maxother = 80


def short_key(key: str | bytes) -> str:
    """Return a printable form of ``key``, shortened if long."""
    return _short.repr(key)


class MPFlightError(Exception):
    """Base of every error mpflight raises on its own account."""


class AbortError(MPFlightError):
    """The call this caller joined ended without an outcome: its owner died or left fn abnormally."""

    def __init__(self, key: str | bytes, owner_pid: int, reason: str = "owner died") -> None:
        self.key = key
        self.owner_pid = owner_pid
        self.reason = reason
        super().__init__(f"call for key {short_key(key)} aborted: {reason} (owner pid {owner_pid})")

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.key, self.owner_pid, self.reason))


class SerializationError(MPFlightError):
    """The owner's outcome could not be carried to the waiters (unknown type, too large, no space)."""

    def __init__(self, message: str) -> None:
        self.message = message
        super().__init__(message)

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.message,))


class RemoteError(MPFlightError):
    """fn raised, in another process, an exception whose type cannot be rebuilt here safely."""

    def __init__(self, type_name: str, message: str, traceback: str) -> None:
        self.type_name = type_name
        self.message = message
        self.traceback = traceback
        super().__init__(f"{type_name}: {message}" if message else type_name)

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.type_name, self.message, self.traceback))


class DeadlockError(MPFlightError, RuntimeError):
    """Waiting would never end: the call waited on is, directly or through other owners, this caller's own."""

    def __init__(self, keys: list[str | bytes]) -> None:
        self.keys = list(keys)
        chain = " -> ".join(short_key(k) for k in self.keys)
        super().__init__(f"waiting would deadlock: {chain} is owned by this caller")

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.keys,))


class RemoteTraceback(Exception):
    """Set as ``__cause__`` of an exception rebuilt from another process: its str is the owner's traceback."""

    def __init__(self, tb: str) -> None:
        self.tb = tb
        super().__init__(tb)

    def __str__(self) -> str:
        return self.tb
