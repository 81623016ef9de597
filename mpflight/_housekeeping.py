"""Keeping tables tidy and telling what is in them: the reaper, gc, inflight and stats.

Each process runs one reaper thread (``Reaper``) for every table it has attached: it reclaims what no
live process takes part in any more and runs the work callers handed it when the table lock was not
free by their deadline. ``reclaim`` is gc's work; ``inflight`` and ``stats`` read a snapshot copied
under the lock. Every transition these make is the protocol's (mpflight._protocol).
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, NoReturn

from . import _faults, _owner
from ._errors import start_thread
from ._layout import (
    COUNTER_NAMES,
    HEADER,
    I_OWNER_PID,
    JOINABLE,
    MAGIC,
    PAYLOAD_INLINE,
    PAYLOAD_SEGMENT,
    Q_OWNER_START,
    RECORD,
    S_LINGER,
    SLOT,
    SLOT_SIZE,
    TIER_COUNTER_NAMES,
    U32S,
    U64S,
)
from ._locks import SEP, LockTimeout, lock_holder, shm_entries, table_headers, unlink_all, unlink_segment
from ._protocol import (
    Call,
    abort_dead,
    drop_dead_record,
    end_orphans,
    end_unregistered,
    registered,
    slot_key,
    tier_bytes,
)
from ._registry import Attachment, Inside, registry, validate_table_name
from ._table import COMPLETING, DONE, RUNNING, Table

log = logging.getLogger("mpflight")

# How often each process's reaper sweeps its tables: what no live process takes part in any more is
# reclaimed within about two intervals (a call must be seen at two sweeps before psutil is asked).
REAP_INTERVAL: Final = 0.5
# How long a sweep waits for one table's lock before it leaves that table to the next sweep.
SWEEP_LOCK_WAIT: Final = 1.0
# A wait for the table lock longer than this (without a deadline) is logged once, naming the holder.
LONG_LOCK_WAIT: Final = 5.0


class Counts(dict[str, int]):
    """A small read-only dict of counts, with attribute access: ``c["aborts"] == c.aborts``.

    A dict, so that ``dict(c)``, ``json.dumps(c)`` and comparisons with dicts work as before."""

    __slots__ = ()

    def __getattr__(self, name: str) -> int:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def _read_only(self, *args: object, **kwargs: object) -> NoReturn:
        raise TypeError(f"{type(self).__name__} is read-only")

    __setitem__ = __delitem__ = __setattr__ = __ior__ = _read_only
    clear = pop = popitem = setdefault = update = _read_only

    def __repr__(self) -> str:
        return f"{type(self).__name__}({dict(self)!r})"

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (dict(self),))


class Stats(Counts):
    """What ``Group.stats()`` returns: the table's counters (see its docstring)."""


class Reclaimed(Counts):
    """What ``Group.gc()`` returns: how many calls, waiter records and segments it reclaimed."""


@dataclass(frozen=True, slots=True)
class InflightCall:
    """One call in flight, as ``Group.inflight()`` sees it at one instant."""

    key: str | bytes  # the key, or its first bytes when it was too long to keep (key_complete False)
    owner_pid: int
    started: float  # epoch seconds
    waiters: int
    # "running"; "vacant" (its owner is gone and a waiter takes it over); "completing" (fn returned, the
    # outcome is being written); "done" (being read); "lingering" (published, kept for later callers)
    state: str
    owner_alive: bool
    result_bytes: int | None  # size of the encoded outcome once published
    key_complete: bool
    waiter_pids: tuple[int, ...] = ()  # the process of each registered waiter (one per waiting thread)
    tier: bytes = b""  # what the tier behind the table keeps of the call (mpflight._tier), if any
    takeovers: int = 0  # how many times a waiter took the call over from an owner that was gone
    linger_left: float | None = None  # a lingering outcome's seconds left; None when it does not linger


def stats(t: Table) -> Stats:
    """The table's counters, summed over every process, and
    calls = runs - takeovers + joins + linger_hits + fallbacks."""
    return counted(t.peek(lambda: t.counters.tolist() + t.tier_counters.tolist()))


def counted(values: list[int]) -> Stats:
    """The counters from their u64 values (COUNTER_NAMES, then TIER_COUNTER_NAMES), with calls: the one
    place the identity is written (stats() and mpflight._metrics both read through it)."""
    c = dict(zip(COUNTER_NAMES + TIER_COUNTER_NAMES, values, strict=True))
    c["calls"] = c["runs"] - c["takeovers"] + c["joins"] + c["linger_hits"] + c["fallbacks"]
    return Stats(c)


def inflight(t: Table) -> list[InflightCall]:
    """The calls in flight now, oldest first (what nobody alive takes part in is reclaimed first)."""
    reclaim(t, idle_only=True)
    copies, records = t.peek(_snapshot, t)
    by_call: dict[tuple[int, int], list[int]] = {}
    for pid, slot, _, _, gen, _ in records:
        by_call.setdefault((slot, gen), []).append(pid)
    calls = []
    names = {RUNNING: "running", COMPLETING: "completing", DONE: "done"}
    now_ns = time.monotonic_ns()
    for index, state, slot in copies:
        gen, _, flags, waiters, _, pid, _, start, _, started, _, _, where, taken, length, _, _ = (
            SLOT.unpack_from(slot)
        )
        key, complete = slot_key(slot)
        name, left = names[state], None
        until = int.from_bytes(slot[S_LINGER : S_LINGER + 8], "little")
        if state == DONE and flags & JOINABLE and until > now_ns:
            name, left = "lingering", (until - now_ns) / 1e9
        elif state == RUNNING and pid == 0:
            name = "vacant"
        calls.append(
            InflightCall(
                key=key,
                owner_pid=pid,
                started=started,
                waiters=waiters,
                state=name,
                owner_alive=pid != 0 and ((pid, start) == _owner.identity() or _owner.is_alive(pid, start)),
                result_bytes=length if where in (PAYLOAD_INLINE, PAYLOAD_SEGMENT) and state == DONE else None,
                key_complete=complete,
                waiter_pids=tuple(sorted(by_call.get((index, gen), ()))),
                tier=tier_bytes(slot),
                takeovers=taken,
                linger_left=left,
            )
        )
    calls.sort(key=lambda c: c.started)
    return calls


def _snapshot(t: Table) -> tuple[list[tuple[int, int, bytes]], list[tuple[Any, ...]]]:
    """Under the lock: copies of the busy slots and the waiter records."""
    states = bytes(t.states)
    copies = [
        (i, states[i], bytes(t.mm[t.slot_off(i) : t.slot_off(i) + SLOT_SIZE]))
        for i in range(t.slots)
        if RUNNING <= states[i] <= DONE
    ]
    in_use = bytes(t.rmap)
    records = []
    r = in_use.find(1)
    while r >= 0:
        records.append(RECORD.unpack_from(t.mm, t.geo.record(r)))
        r = in_use.find(1, r + 1)
    return copies, records


def reclaim(t: Table, *, idle_only: bool = False, deadline: float | None = None) -> Reclaimed:
    """gc's work: end the calls and records of dead processes, what this process's callers left when
    an exception took them out of a call, and orphaned segments. ``idle_only`` leaves alone a dead
    owner's call that a live waiter still waits on: that waiter reports the abort itself. Raises
    LockTimeout if the table lock is not free by ``deadline`` (monotonic)."""
    owners, waiters = t.locked(_survey, (t,), deadline)
    me = _owner.identity()
    alive: dict[tuple[int, int], bool] = {me: True}

    def live(pid: int, start: int) -> bool:
        if (pid, start) not in alive:
            alive[pid, start] = _owner.is_alive(pid, start)
        return alive[pid, start]

    dead_calls = [(i, gen, pid, start) for i, gen, pid, start in owners if pid and not live(pid, start)]
    dead_waiters = [(r, rec) for r, rec in waiters if not live(rec[0], rec[2])]
    if idle_only:
        watched = {(rec[1], rec[4]) for _, rec in waiters if live(rec[0], rec[2])}
        dead_calls = [call for call in dead_calls if call[:2] not in watched]
    if "dead-waiters" in _faults.DISABLED:
        dead_waiters = []
    reclaimed = t.locked(_reclaimed, (t, dead_calls, dead_waiters), deadline)
    if any(reclaimed.values()):
        log.warning("mpflight table %r: reclaimed %s", t.group, dict(reclaimed))
    return reclaimed


def _survey(t: Table) -> tuple[list[tuple[int, int, int, int]], list[tuple[int, tuple[Any, ...]]]]:
    """Under the lock: (slot, generation, owner pid, owner start) of every call that has not published
    yet, and (record, fields) of every waiter record."""
    t.reconcile()  # counts that disagree with the records (damage) are set right first
    owners = [
        (i, t.gen(i), t.u32s[i * U32S + I_OWNER_PID], t.u64s[i * U64S + Q_OWNER_START])
        for i in range(t.slots)
        if t.states[i] in (RUNNING, COMPLETING)
    ]
    waiters = [(r, RECORD.unpack_from(t.mm, t.geo.record(r))) for r in range(t.records) if t.rmap[r] == 1]
    return owners, waiters


def _reclaimed(
    t: Table, dead_calls: list[tuple[int, int, int, int]], dead_waiters: list[tuple[int, tuple[Any, ...]]]
) -> Reclaimed:
    """Under the lock: end what reclaim found dead, if it is still there, and what this process's
    callers left behind; then unlink the orphaned segments."""
    counts = {"calls": 0, "waiters": 0, "segments": 0}
    for i, gen, pid, start in dead_calls:
        counts["calls"] += abort_dead(Call.of(t, i, gen), (pid, start))
    for r, rec in dead_waiters:
        counts["waiters"] += drop_dead_record(Call.of(t, rec[1], rec[4], r), rec)
    if "recover" not in _faults.DISABLED:
        for calls, records in (end_orphans(t, None), end_unregistered(t)):
            counts["calls"] += calls
            counts["waiters"] += records
    # Under the lock: an owner must take it to become COMPLETING before it makes a segment, and names
    # the segment in its slot before making it. So, listing first and reading the names after, a
    # listed segment that no COMPLETING or DONE slot names now is an orphan.
    entries = shm_entries()
    expected = {t.segment(i).lstrip("/") for i in range(t.slots) if t.states[i] in (COMPLETING, DONE)}
    counts["segments"] = _unlink_orphan_segments(t, entries, expected)
    return Reclaimed(counts)


def _unlink_orphan_segments(t: Table, entries: list[str], expected: set[str]) -> int:
    """Unlink this table's segments (by its nonce) that no call names; another table's are left."""
    stem = t.segment(0).lstrip("/").rsplit(".", 2)[0] + "."
    n = 0
    for entry in entries:
        if entry.startswith(stem) and entry not in expected:
            n += unlink_segment("/" + entry)
    return n


class Reaper:
    """One thread per process that keeps every table the process has attached tidy, traffic or not.

    Every REAP_INTERVAL it reclaims what no live process takes part in any more (the calls of dead
    owners nobody waits for, records of dead waiters, published outcomes whose readers all died, and
    what callers of this process left when an exception took them out of a call), and logs a wait for
    the table lock that takes unusually long. It also runs what a caller with a deadline handed it
    (mpflight._registry's queue). psutil is used only for calls seen busy at two sweeps in a row.
    Started on first use, and again in a forked child.
    """

    def __init__(self) -> None:
        self.pid = 0
        self.lock = threading.Lock()
        self.sweeping = threading.Lock()  # held through each sweep; while a test holds it, no sweeps
        self.working = threading.Lock()  # held while deferred work runs (the reaper's, or the exit's)

    def ensure(self) -> None:
        """Start this process's reaper thread if it does not run yet."""
        if self.pid != os.getpid() and "reaper" not in _faults.DISABLED:
            with self.lock:
                if self.pid != os.getpid():
                    self.pid = os.getpid()
                    thread = threading.Thread(target=self._run, args=(self.pid,), daemon=True)
                    thread.name = "mpflight-reaper"
                    start_thread(thread)
                    _at_exit_of_a_multiprocessing_child(self.at_exit)

    def _run(self, pid: int) -> None:
        while os.getpid() == pid:
            registry.wake.wait(REAP_INTERVAL)
            registry.wake.clear()
            self._round()

    def _round(self) -> None:
        """Run the deferred work, then sweep every table of the process."""
        with self.working:
            self._deferred()
        if not self.sweeping.acquire(blocking=False):
            return  # held off (by a test): the deferred work above still runs
        try:
            for at in registry.live():
                try:
                    with Inside(at):
                        self._sweep(at)
                except Exception:  # closed, or removed or damaged under us: the next sweep looks again
                    log.debug("mpflight table %r: sweep failed", at.table.group, exc_info=True)
        finally:
            self.sweeping.release()

    def at_exit(self) -> None:
        """When the interpreter exits: run the work callers handed over that is still queued (a waiter's
        give-up, an owner's publish), once, bounded as a round's; the reaper thread dies with the
        process and would never run it. The job a round is running is waited for first."""
        if self.pid != os.getpid() or registry.work.empty():
            return
        if self.working.acquire(timeout=2 * SWEEP_LOCK_WAIT):
            try:
                self._deferred()
            finally:
                self.working.release()

    def _deferred(self) -> None:
        # Each job waits for its table's lock a bounded time, as the sweeps do: a table whose lock is
        # held (by a stopped process, say) cannot hold up the others' work. Its jobs wait for the next
        # round, the table mapped meanwhile (their markers stay).
        stalled: set[int] = set()
        for _ in range(registry.work.qsize()):  # what is queued again waits for the next round
            try:
                at, marker, job = registry.work.get_nowait()
            except queue.Empty:
                break
            done = True
            try:
                if id(at) in stalled:
                    raise LockTimeout("the table's lock was not free for its earlier job")
                job(time.monotonic() + SWEEP_LOCK_WAIT)
            except LockTimeout:
                done = False
                stalled.add(id(at))
                registry.work.put((at, marker, job))
            except Exception:
                log.exception("mpflight table %r: deferred work failed", at.table.group)
            finally:
                if done:
                    at.leave(marker)

    def _sweep(self, at: Attachment) -> None:
        t, now = at.table, time.monotonic()
        for tid, since in list(t.lock.waits.items()):
            if now - since >= LONG_LOCK_WAIT and (tid, since) not in at.warned_waits:
                at.warned_waits.add((tid, since))
                holder = lock_holder(t.file.fd)
                log.warning(
                    "mpflight table %r: a thread has waited %.0f s for the table lock, held by %s", t.group,
                    now - since, f"pid {holder}" if holder else "a process that cannot be named",
                )  # fmt: skip
        orphans = any(registered(entry) is None for entry in (*t.owners.values(), *t.readers.values()))
        states, records = bytes(t.states), bytes(t.rmap)
        busy = {(i, t.gen(i), state) for i, state in enumerate(states) if state}
        busy.update((-1 - r, 0, 0) for r, used in enumerate(records) if used)
        stuck = busy & at.seen_busy
        at.seen_busy = busy
        if orphans or stuck:
            # Bounded: a table whose lock is held (a stopped process) must not hold up the others'.
            reclaim(t, idle_only=True, deadline=time.monotonic() + SWEEP_LOCK_WAIT)


def _at_exit_of_a_multiprocessing_child(hook: Callable[[], None]) -> None:
    """A multiprocessing child started by fork or forkserver ends with os._exit, which runs no atexit
    hook: its own exit hooks (multiprocessing.util's finalizers, run after the target returns) run
    ``hook`` there."""
    mp, util = sys.modules.get("multiprocessing"), sys.modules.get("multiprocessing.util")
    if mp is not None and util is not None and mp.parent_process() is not None:  # imported by the child
        util.Finalize(None, hook, exitpriority=0)


reaper: Final = Reaper()
registry.start_reaper = reaper.ensure
atexit.register(reaper.at_exit)


def _after_fork_in_child() -> None:
    reaper.lock = threading.Lock()  # the reaper thread is not forked: the next call starts one
    reaper.sweeping = threading.Lock()
    reaper.working = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


def tables() -> list[str]:
    """The names of the mpflight tables of this layout version on this machine, read from their headers."""
    names = []
    for os_name, header in table_headers():
        fields = HEADER.unpack_from(header) if header is not None else None
        if fields is not None and fields[0] == MAGIC and fields[2] == 1:
            raw = fields[12][: fields[9]]
            names.append(raw.decode("utf-8", "replace"))
        else:  # unreadable or not initialized: the name in the object's own name
            names.append(os_name.split(SEP, 1)[1])
    return sorted(set(names))


def unlink(name: str) -> bool:
    """Remove the table ``name``, its semaphores and result segments; True if anything existed.

    Processes still attached keep their mapping; they notice on their slow path and move to a new
    table under the name.
    """
    return unlink_all(validate_table_name(name))
