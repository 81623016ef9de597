"""The library's own errors.

Each error keeps the data it was raised with, builds its message from that data, and pickles
(so it can cross a ``multiprocessing`` pipe unchanged).
"""

from __future__ import annotations

import reprlib
import threading

_short = reprlib.Repr()
_short.maxstring = 80
_short.maxother = 80


def short_key(key: str | bytes) -> str:
    """Return a printable form of ``key``, shortened if long."""
    return _short.repr(key)


def start_thread(thread: threading.Thread) -> None:
    """``thread.start()``, with an interruption during it raised as itself.

    Thread.start waits for the new thread to run on an Event; an exception that a signal handler
    raises in that wait, after its Condition's lock is released and before the with block ends,
    surfaces as CPython's follow-on RuntimeError("release unlocked lock"), the interruption only its
    context. The caller gets the interruption (the app's KeyboardInterrupt, a SIGALRM's timeout). The
    thread may run by then, as after any interruption at a start: each caller hands its thread the
    work so that one of the two ends it.
    """
    try:
        thread.start()
    except RuntimeError as e:
        interruption = e.__context__
        if interruption is None or str(e) != "release unlocked lock":
            raise
        raise interruption from None


class MPFlightError(Exception):
    """Base of every error mpflight raises on its own account."""


class AbortError(MPFlightError):
    """The call this caller joined ended without an outcome: its owner died or left fn abnormally.

    ``owner_died`` tells the two apart (a crash, the OOM killer, a lost host; or fn left by
    KeyboardInterrupt, SystemExit or an interruption); ``takeovers`` is how many times the call was
    already taken over by one of its waiters (``on_abort="retry"``). Calling again is always safe.
    """

    def __init__(
        self, key: str | bytes, owner_pid: int, reason: str = "owner died", takeovers: int = 0
    ) -> None:
        self.key = key
        self.owner_pid = owner_pid
        self.reason = reason
        self.takeovers = takeovers
        advice = f"{takeovers} takeover(s) spent; retry" if takeovers else "retry, or on_abort='retry'"
        super().__init__(f"call for key {short_key(key)} aborted: {reason} (owner pid {owner_pid}); {advice}")

    @property
    def owner_died(self) -> bool:
        """True when the owner process (or its host) died; False when it left fn but lives on."""
        return died(self.reason)

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.key, self.owner_pid, self.reason, self.takeovers))


# How the reason of every abort whose owner died begins (the others begin "the owner left", "the
# owner could not publish", "the owner's caller ended early", "the call was lost", ...).
DIED: tuple[str, ...] = ("owner died", "the owner's lease")


def died(reason: str) -> bool:
    """Whether an abort's reason says the owner (or its host) died, by how it begins: a reason may
    quote other text (an exception's message, a key) after that."""
    return reason.startswith(DIED)


class WaitTimeout(MPFlightError, TimeoutError):
    """mpflight gave up waiting (for a call's outcome, or the table lock) at the caller's timeout.

    A TimeoutError too, so ``except TimeoutError`` keeps working; fn's own TimeoutError reaches its
    callers as itself, and never as this."""

    def __init__(self, message: str, key: str | bytes | None = None, timeout: float | None = None) -> None:
        self.message = message
        self.key = key
        self.timeout = timeout
        super().__init__(message)

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.message, self.key, self.timeout))


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


class _Described(MPFlightError):
    """An error about one named thing (a table, a segment), with a detail: both kept, and pickled."""

    def __init__(self, name: str, detail: str) -> None:
        self.name = name
        self.detail = detail
        super().__init__(detail)

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.name, self.detail))


class NoSuchTable(MPFlightError):
    """There is no table of this name (raised when attaching without creating)."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"no mpflight table named {name!r}")

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.name,))


class NotInitialised(MPFlightError):
    """The table exists but its creator has not finished it (raised when attaching without creating)."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(
            f"mpflight table {name!r} is not initialised (its creator has not finished, or died halfway): "
            f"the next Group({name!r}) that may create it initialises it; mpflight.unlink({name!r}) drops it"
        )

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.name,))


class IncompatibleTable(_Described):
    """The table was made by another layout version or geometry of mpflight, or is used from another
    pid namespace, or exists with other options (slots, mode) than asked for."""


class DamagedTable(_Described):
    """The table's bytes are inconsistent beyond what repair rebuilds (its header, a slot's state)."""


class CorruptSlot(DamagedTable):
    """One slot's published outcome cannot be located (its location byte or length is garbage)."""

    def __init__(self, name: str, slot: int, detail: str) -> None:
        self.slot = slot
        super().__init__(name, f"corrupt slot {slot} in table {name!r}: {detail}")
        self.detail = detail

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.name, self.slot, self.detail))


class AccessDenied(_Described):
    """The OS refused access to an object of the table, or mpflight refused an object it must not trust
    (another user's table, semaphore or segment)."""


class NoSpace(_Described):
    """/dev/shm has no room for an object of the table (the table, a semaphore, a result segment)."""


class SegmentFull(NoSpace):
    """/dev/shm has no room for a result segment (the waiters get the outcome "not carried")."""


class CorruptPayload(MPFlightError):
    """A published payload cannot be decoded (damage, or a writer that is not mpflight)."""

    def __init__(self, detail: str) -> None:
        self.detail = detail
        super().__init__(f"corrupt result: {detail}")

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.detail,))


class TierUnavailable(MPFlightError):
    """The tier behind the table (Redis) could not serve a call, and the group fails closed."""

    def __init__(self, group: str, reason: str) -> None:
        self.group = group
        self.reason = reason
        super().__init__(f"mpflight group {group!r}: the cross-host tier is unavailable: {reason}")

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.group, self.reason))
