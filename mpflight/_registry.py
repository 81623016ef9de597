"""This process's attachments to tables: one mapping per name, shared by its handles and threads.

Every Group of a name in a process uses one ``Attachment``: one mapping (so that a slot's local
waiters find the owner's very objects) and the per-process state around it: how many handles refer to
it, which callers are inside it now, the asyncio owners' tasks, the housekeeping clocks. A table is
unmapped once no handle refers to it and no caller is inside (``Inside``). The registry also queues the
work that callers hand to the reaper (mpflight._housekeeping) when the table lock was not free in time.
"""

from __future__ import annotations

import os
import queue
import re
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Final

from ._errors import IncompatibleTable
from ._table import Table

_NAME: Final = re.compile(r"[A-Za-z0-9._-]{1,64}")

# How often a process checks, on its way into a call, that its table is still the one under its name
# (calls stuck because their owners or readers died are the reaper's).
HOUSEKEEPING_INTERVAL: Final = 1.0


def validate_name(name: object) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"group name must be 1 to 64 characters of [A-Za-z0-9._-], not {name!r}")
    return name


def table_name(group: str, host: str | None) -> str:
    """The name of ``group``'s table on ``host``: the group's own name, or ``group+host`` when the
    machine plays several hosts (MPFLIGHT_HOST_ID); '+' is in no group's name."""
    if host is None:
        return group
    if not isinstance(host, str) or not _NAME.fullmatch(host) or len(group) + 1 + len(host) > 64:
        raise ValueError(
            f"host id must be characters of [A-Za-z0-9._-], at most {63 - len(group)} with group "
            f"{group!r}, not {host!r}"
        )
    return f"{group}+{host}"


def validate_table_name(name: object) -> str:
    """A table's name: a group's name, or ``group+host``."""
    if isinstance(name, str) and name.count("+") == 1 and len(name) <= 64:
        group, host = name.split("+")
        validate_name(group)
        return table_name(group, host)
    return validate_name(name)


def seconds(what: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{what} must be a number of seconds, not {type(value).__name__}")
    if not value > 0:
        raise ValueError(f"{what} must be positive, not {value!r}")
    return float(value)


class Attachment:
    """One process's use of one table: the mapping and what the process keeps about its use of it."""

    def __init__(self, table: Table) -> None:
        self.table = table
        self.refs = 0  # Group handles of this process (changed under the registry's lock)
        self.active: set[object] = set()  # a marker per caller inside (add and discard are atomic)
        self.checked = time.monotonic()  # the last housekeeping check (following a replaced name)
        self.warned_waits: set[tuple[int, float]] = set()  # long lock waits already logged
        self.seen_busy: set[tuple[int, int, int]] = set()  # what the reaper saw busy at its last sweep
        self.closed = False
        table.defer = self.defer

    def leave(self, marker: object) -> None:
        """A caller (``marker``) is no longer inside the table: the last to leave an unused one unmaps it."""
        active = self.active
        active.discard(marker)
        if not active and not self.refs:
            registry.close_unused(self)

    def defer(self, job: Callable[[float | None], object]) -> None:
        """Run ``job`` in the reaper thread, soon; the table stays mapped until then. It is called with
        a deadline for the table lock, and raises LockTimeout if the lock is not free by then (a stopped
        holder): the reaper tries again at its next round and meanwhile sweeps the other tables."""
        marker = object()
        self.active.add(marker)
        registry.work.put((self, marker, job))
        registry.start_reaper()
        registry.wake.set()


class Inside:
    """``with Inside(at):``: a caller is inside the table, which is not unmapped until it leaves.

    Entering a closed attachment raises ValueError (its handle was closed). The marker is this object,
    never the caller's Call: were an exit skipped, it would keep the mapping, not a claim, alive.
    """

    __slots__ = ("at",)

    def __init__(self, at: Attachment) -> None:
        self.at = at

    def __enter__(self) -> Attachment:
        at = self.at
        at.active.add(self)
        if at.closed:
            at.active.discard(self)
            raise ValueError(f"operation on closed mpflight.Group {at.table.group!r}")
        return at

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.at.leave(self)


class Registry:
    """The attachments of this process, by table name."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.tables: dict[str, Attachment] = {}
        self.work: queue.SimpleQueue[tuple[Attachment, object, Callable[[float | None], object]]] = (
            queue.SimpleQueue()
        )
        self.wake = threading.Event()
        # Starts this process's reaper if it does not run (set by mpflight._housekeeping).
        self.start_reaper: Callable[[], None] = lambda: None

    def attach(
        self, name: str, slots: int | None, mode: int | None, create: bool, timeout: float | None
    ) -> Attachment:
        """The attachment of ``name`` for one more handle: the process's, or a new mapping."""
        with self.lock:
            at = self.tables.get(name)
            if at is None or at.closed:
                deadline = None if timeout is None else time.monotonic() + timeout
                at = Attachment(Table(name, slots=slots, mode=mode, create=create, deadline=deadline))
                self.tables[name] = at
            elif slots is not None and slots != at.table.slots:
                raise IncompatibleTable(
                    name, f"mpflight table {name!r} exists with {at.table.slots} slots, not {slots}"
                )
            elif mode is not None and mode != at.table.file.mode:
                raise IncompatibleTable(
                    name,
                    f"mpflight table {name!r} ({at.table.file.path}) has mode {at.table.file.mode:#o}, not "
                    f"{mode:#o}: omit mode= to adopt the table's, or unlink it to make it anew with another",
                )
            at.refs += 1
        self.start_reaper()
        return at

    def release(self, at: Attachment) -> None:
        """One handle fewer refers to ``at``."""
        with self.lock:
            at.refs -= 1
        self.close_unused(at)

    def close_unused(self, at: Attachment) -> None:
        """Unmap a table that no handle of this process refers to and no caller is inside.

        Until then it stays the process's table of its name, so that every handle and thread of the
        process shares one mapping. Closed is set before looking for callers inside: one entering
        meanwhile sees it (``Inside``) and refuses, and one already inside keeps the table until it
        leaves.
        """
        with self.lock:
            if at.refs or at.closed:
                return
            at.closed = True
            if at.active:
                at.closed = False  # the last caller to leave closes it
                return
            if self.tables.get(at.table.group) is at:
                del self.tables[at.table.group]
            at.table.closed = True
            at.table.unmap()

    def follow(
        self, at: Attachment, mode: int | None, create: bool, timeout: float | None
    ) -> Attachment | None:
        """When the name of ``at`` leads to another table (it was removed or replaced), an attachment to
        that one, for a handle of ``at`` (which releases the one it drops). None when ``at`` is current."""
        at.checked = time.monotonic()
        at.table.replaced = False
        if not at.table.file.replaced():
            return None
        with self.lock:
            if self.tables.get(at.table.group) is at:
                del self.tables[at.table.group]  # the name leads elsewhere now
        return self.attach(at.table.group, None, mode, create, timeout)

    def live(self) -> list[Attachment]:
        with self.lock:
            return [at for at in self.tables.values() if not at.closed]

    def after_fork_in_child(self) -> None:
        self.lock = threading.Lock()
        self.work = queue.SimpleQueue()  # the parent's deferred work is the parent's
        self.wake = threading.Event()
        for at in self.tables.values():
            if not at.closed:
                at.table.after_fork_in_child()
                at.active.clear()
                at.checked = -float("inf")  # the first call checks its table, and starts a reaper


registry: Final = Registry()
os.register_at_fork(after_in_child=registry.after_fork_in_child)
