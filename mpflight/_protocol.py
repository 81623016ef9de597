"""The slot protocol: one execution of a key's call among every process and thread sharing a table.

A call lives in one slot of the table and is named by the slot's generation. Its state byte moves::

            claim               finish: nobody joined, no linger
    FREE ----------> RUNNING ------------------------> FREE
                     |  ^  |   finish: waiters joined, or the outcome lingers
                     |  |  v
                     |  | COMPLETING --- publish ---> DONE --- the last reader leaves ---> FREE
                     |  |  |                          ^  (and the linger, if any, is over)
                     |  |  '--- abort ----------------|  (the owner died, or left do() early)
                     |  '--- a waiter takes it over   |
                     '--> vacant (RUNNING, owner pid 0): the owner is gone and a waiter may take
                          the call over (on_abort="retry"); the last that may, leaving, ends it

Who does what, under the table lock and outside it::

    caller   under the table lock                          outside it
    ------   --------------------                          ----------
    owner    enter: no joinable call of the key: claim     run fn
             finish: nobody joined: FREE the slot          (nothing to publish)
             finish: somebody joined: COMPLETING           encode the outcome, write the payload
             publish: DONE; count the registered waiters   post the slot's semaphore once each
    waiter   enter: the key's joinable call: a record      wait on the semaphore; on each slice
             (a lingering outcome: a record to read it)    check the owner
             look: take a vacant call over, or leave
             leave: drop the record; the last one FREEs    read the outcome

Every write of a state byte is in this module (repair, which rebuilds what a dead lock holder left, is
the table's). A ``Call`` is one caller's part in one call: the owner's claim, or a waiter's record. It
is also the caller's token: the table registers the claim or record under a weak reference to it, so
that what an exception left registered (it skipped every cleanup, the Call is gone) is ended by the
reaper (``end_orphans``). docs/design.md has the argument.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import threading
import time
import weakref
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Generic, NamedTuple, Protocol, TypeVar

from . import _codec, _faults, _owner
from ._errors import (
    AbortError,
    CorruptSlot,
    DamagedTable,
    DeadlockError,
    MPFlightError,
    RemoteError,
    SegmentFull,
    SerializationError,
    WaitTimeout,
    short_key,
)
from ._layout import (
    C_ABORTS,
    C_ERRORS,
    C_FALLBACKS,
    C_JOINS,
    C_LINGER_HITS,
    C_RUNS,
    C_SHARED,
    C_TAKEOVERS,
    C_TIMEOUTS,
    C_WAIT_NS,
    DIGEST_SIZE,
    I_BLOCKED_SLOT,
    I_FLAGS,
    I_HOME,
    I_JOINS,
    I_OWNER_PID,
    I_PAYLOAD_LEN,
    I_WAITERS,
    JOINABLE,
    KEY_BYTES,
    KEY_CAP,
    KEY_DIGEST,
    KEY_STR,
    PAYLOAD_CAP,
    PAYLOAD_INLINE,
    PAYLOAD_LOCAL,
    PAYLOAD_NONE,
    PAYLOAD_SEGMENT,
    Q_BLOCKED_GEN,
    Q_KEY_LEN,
    Q_LINGER,
    Q_OWNER_START,
    Q_OWNER_TID,
    R_TAKEOVERS,
    RECORD,
    S_KEY,
    S_KEY_KIND,
    S_PAYLOAD,
    S_PAYLOAD_AT,
    S_TAKEOVERS,
    S_TIER,
    S_TIER_LEN,
    SLOT,
    SLOT_SIZE,
    TIER_CAP,
    U32S,
    U64S,
)
from ._locks import LockTimeout, unlink_segment
from ._table import COMPLETING, DONE, FREE, MAX_KEY_BYTES, RUNNING, LocalCall, Table

log = logging.getLogger("mpflight")

T = TypeVar("T")

# A caller's role in its call, as ``enter`` finds it.
OWN: Final = 0  # claimed a slot: runs fn and finishes the call
JOIN: Final = 1  # registered as a waiter of a running call: waits, then reads
ALONE: Final = 2  # no slot or record free: runs fn without coalescing

# Encoded outcomes up to 2**32 - 1 bytes: the slot's length field is a u32.
MAX_RESULT_BYTES: Final = 0xFFFFFFFF

_RUNNING_BYTE: Final = bytes((RUNNING,))
_FAULT: Final = _faults.FAULT  # read once, as _faults reads it
_SHORT_KEY: Final = KEY_CAP // 4  # characters: a str key this long always fits a slot, encoded
_NO_RECORD: Final = -1  # _try_join: every waiter record is taken
_OWNER_GONE: Final = -2  # _try_join: the call's owner is gone; it is aborted, claim anew
# At most one "table is full" warning per table and process this often (stats count every fallback).
FULL_WARNING_INTERVAL: Final = 10.0
_warned_full: dict[str, float] = {}  # when this process last warned, by table


class Result(NamedTuple, Generic[T]):
    """What ``do_ex`` returns: fn's value, and whether it was shared with another caller (as Go's Do)."""

    value: T
    shared: bool


@dataclass(frozen=True, slots=True)
class Options:
    """What a handle asks of its calls."""

    name: str
    timeout: float | None
    check_interval: float
    codec: _codec.Codec | None
    max_result_bytes: int
    takeovers: int = 0  # on_abort="retry": how many times a waiter may take a call over; 0: "raise"
    linger: float = 0.0  # seconds a published outcome stays for callers that arrive after it
    linger_errors: bool = False  # fn's exceptions linger too (aborts never do)

    @property
    def linger_ns(self) -> int:
        return int(self.linger * 1e9)


class RunHere(Exception):
    """Raised by an entry's ``wait``: the caller owns its call from now on and runs fn (``own``) as an
    owner does, for itself and whoever waits on it: it took over the call of an owner that is gone, or
    the next tier cannot serve it (it is unreachable, or its outcome is not shared with this host)."""


def key_identity(key: object) -> tuple[int, bytes, bytes]:
    """(kind, encoded key, what the slot stores to identify it); TypeError or ValueError for a bad key."""
    if type(key) is str:
        kind, raw = KEY_STR, key.encode("utf-8", "surrogatepass")
    elif isinstance(key, bytes):
        kind, raw = KEY_BYTES, bytes(key)
    elif isinstance(key, str):
        kind, raw = KEY_STR, key.encode("utf-8", "surrogatepass")
    else:
        raise TypeError(f"key must be str or bytes, not {type(key).__name__}")
    if len(raw) <= KEY_CAP:
        return kind, raw, raw
    if len(raw) > MAX_KEY_BYTES:
        raise ValueError(f"key is {len(raw)} bytes encoded; at most {MAX_KEY_BYTES} are allowed")
    digest = hashlib.sha256(bytes((kind,)) + raw).digest()
    return kind | KEY_DIGEST, raw, digest + raw[: KEY_CAP - DIGEST_SIZE]


def home_of(t: Table, kind: int, stored: bytes) -> int:
    """The slot a key hashes to: where its call is looked for first, and claimed if free."""
    return zlib.crc32(stored, kind) % t.slots


def slot_key(slot: bytes | memoryview) -> tuple[str | bytes, bool]:
    """The key a slot's bytes hold, for display, and whether it is the whole key."""
    kind = slot[S_KEY_KIND]
    key_len = int.from_bytes(slot[Q_KEY_LEN * 8 : Q_KEY_LEN * 8 + 8], "little")
    if kind & KEY_DIGEST:
        raw, complete = slot[S_KEY + DIGEST_SIZE : S_KEY + KEY_CAP], False
    else:
        raw, complete = slot[S_KEY : S_KEY + min(key_len, KEY_CAP)], True
    if kind & KEY_BYTES:
        return bytes(raw), complete
    try:
        return bytes(raw).decode("utf-8", "surrogatepass"), complete
    except UnicodeDecodeError:  # a prefix cut inside a character, or a damaged slot
        return bytes(raw).decode("utf-8", "replace"), False


def tier_bytes(slot: bytes | memoryview) -> bytes:
    """The wrapping tier's opaque bytes in a slot's bytes (empty when it wrote none)."""
    n = min(slot[S_TIER_LEN], TIER_CAP)
    return bytes(slot[S_TIER : S_TIER + n])


def _held(ref: weakref.ref[Call] | None) -> bool:
    """Whether a registered claim or record still has somebody responsible for it in this process."""
    return ref is not None and ref() is not None


# A claim made by ``enter`` is registered under its Call itself, not a weak reference to it: nearly
# every claim is freed a few microseconds later, and a weak reference would cost it a few percent of
# its time. Whoever needs to know whether somebody still holds a claim asks ``_held_claim``, which
# weakens its entry first; the reaper asks of every claim of this process that stays in the table.


def registered(entry: Call | weakref.ref[Call] | None) -> Call | None:
    """The Call a registration names, if it still exists."""
    return entry if entry is None or isinstance(entry, Call) else entry()


def _held_claim(t: Table, index: int, gen: int) -> bool:
    """Whether somebody in this process is still responsible for its claim (index, gen)."""
    entry = t.owners.get((index, gen))
    if isinstance(entry, Call):
        entry = t.owners[index, gen] = weakref.ref(entry)  # this name no longer holds the Call
    return _held(entry)


def _locked_later(t: Table, body: Callable[..., object], *args: object) -> Callable[[float | None], object]:
    """Work for the reaper (``Table.defer``): ``body(*args)`` under the lock, by the deadline the reaper
    gives (LockTimeout: it tries again at its next round)."""
    return lambda deadline: t.locked(body, args, deadline)


def _table_lock_timeout(opts: Options) -> WaitTimeout:
    return WaitTimeout(
        f"gave up waiting {opts.timeout} s for the table lock of {opts.name!r}", None, opts.timeout
    )


_warned_uncarried: set[tuple[str, str]] = set()  # (group, what): this process warned once


def encode_outcome(
    value: object, error: BaseException | None, codec: _codec.Codec | None, limit: int, key: str | bytes,
    group: str,
) -> bytes:  # fmt: skip
    """fn's outcome as the payload its waiters read: its value, its exception, or an abort when fn left
    by KeyboardInterrupt or SystemExit. A value that cannot be carried, or a payload over ``limit``,
    becomes the SerializationError every waiter raises, naming the key, the type and the remedy; the
    owner logs the first of each kind once per group."""
    if error is None:
        try:
            payload = _codec.pack_value(value, codec)
        except SerializationError as e:
            what = f"type {type(value).__name__}"
            payload = _not_carried(
                group, what, f"the value of key {short_key(key)} cannot be carried to the other processes: "
                f"{e}; register a codec for it (mpflight.Codec.register) or return a carried type",
            )  # fmt: skip
    elif isinstance(error, Exception):
        payload = _codec.pack_error(error, codec)
    else:
        payload = _codec.pack_abort(f"the owner left fn with {type(error).__name__}")
    if len(payload) > limit:
        kind = type(value if error is None else error).__name__
        payload = _not_carried(
            group, "size", f"the outcome of key {short_key(key)} ({kind}, {len(payload)} bytes encoded) "
            f"exceeds max_result_bytes ({limit}); raise max_result_bytes",
        )  # fmt: skip
    return payload


def _not_carried(group: str, what: str, message: str) -> bytes:
    if (group, what) not in _warned_uncarried:
        _warned_uncarried.add((group, what))
        log.warning("mpflight group %r: %s (the waiters get a SerializationError)", group, message)
    return _codec.pack_not_carried(message)


class Finisher(Protocol):
    """What the owner runner needs of an entry."""

    def finish(self, value: object, error: BaseException | None) -> bool: ...


def own(
    entry: Finisher, fn: Callable[..., T], args: tuple[object, ...], kwargs: dict[str, object]
) -> tuple[T, bool]:
    """The one owner runner of every way of calling and every tier: run fn, then finish the call with
    its outcome; (value, shared). (A coroutine fn is awaited by do_async, which finishes the same way.)"""
    try:
        value = fn(*args, **kwargs)
    except BaseException as e:
        entry.finish(None, e)
        raise
    return value, entry.finish(value, None)


class Call:
    """One caller's part in one call of one slot: the owner's claim, or a waiter's ``record`` (>= 0).

    Made by the caller (``Call()``, with ``t``, ``opts`` and ``deadline`` set) and filled in by
    ``enter`` under the lock; the methods are the protocol's transitions. Those named ``_...ing`` run
    under the table lock.
    """

    __slots__ = ("__weakref__", "deadline", "gen", "hit", "index", "opts", "pending", "record", "seen", "t")

    t: Table
    opts: Options  # the handle's: its name, timeout, codec, bounds
    deadline: float | None  # the caller's, monotonic: no wait of this call lasts past it
    index: int
    gen: int
    record: int
    pending: bool  # a transition of this call was handed to the reaper: it ends the call, not recover
    seen: int  # a waiter's, set as it joins: the call's takeovers then (a later one may end its wait)
    hit: bool  # a waiter's, set as it joins: it reads a lingering outcome (a linger hit), not a wait's

    @classmethod
    def of(cls, t: Table, index: int, gen: int, record: int = -1) -> Call:
        """The call (index, gen) of ``t``, as a party to it that is not its caller (an aborter, gc)."""
        call = cls()
        call.t, call.index, call.gen, call.record, call.deadline, call.pending = (
            t,
            index,
            gen,
            record,
            None,
            False,
        )
        call.seen, call.hit = 0, False
        return call

    # -- entering: claim or join ----------------------------------------------------------------------

    def enter(self, key: str | bytes, tid: int, blocking: bool) -> int:
        """Claim the key's call or join it, under the lock; fill this Call in. Returns OWN, JOIN or
        ALONE (no slot or waiter record was free: the caller runs fn without coalescing).

        ``tid`` names the caller (a thread, a task, a future) for re-entry and cycle checks;
        ``blocking`` callers also note what their thread waits on, for the cycle checks of others.
        TimeoutError when the lock is not free by the deadline; DeadlockError when the wait would
        never end.
        """
        t = self.t
        if key.__class__ is str and len(key) <= _SHORT_KEY:  # the common key: short text, no digest
            kind, raw = KEY_STR, key.encode("utf-8", "surrogatepass")
            stored = raw
        else:
            kind, raw, stored = key_identity(key)
        try:
            entered = t.locked(
                _entering, (self, key, kind, raw, stored, zlib.crc32(stored, kind) % t.slots, tid, blocking),
                self.deadline,
            )  # fmt: skip
        except LockTimeout:
            raise _table_lock_timeout(self.opts) from None
        if entered.__class__ is int:
            return entered
        if isinstance(entered, MPFlightError):
            raise entered
        now = time.monotonic()
        if now - _warned_full.get(t.group, -FULL_WARNING_INTERVAL) >= FULL_WARNING_INTERVAL:
            _warned_full[t.group] = now  # one warning a while, not one per call
            log.warning("mpflight table %r has no free %s: running fn without coalescing", t.group, entered)
        return ALONE

    def ours(self) -> bool:
        """Under the lock: whether the slot still holds this call, unpublished."""
        t = self.t
        return t.u64s[self.index * U64S] == self.gen and t.states[self.index] in (RUNNING, COMPLETING)

    # -- the owner: run fn, finish ---------------------------------------------------------------------

    own = own  # the one owner runner, defined above: fn here, then finish

    def finish(self, value: object, error: BaseException | None, later: float | None = None) -> bool:
        """fn returned ``value`` or raised ``error``: end the call. Returns ``shared``.

        Nobody joined: the slot is FREE again, in this one hold of the lock. Somebody did: the outcome
        is written and published, and the waiters are woken. fn's caller has its outcome whatever
        happens here; when the lock is not free by the deadline, the rest runs in the reaper (which
        keeps this Call, and so the claim, alive). ``later``: the reaper's run, by that deadline.
        """
        t = self.t
        deadline = self.deadline if later is None else later
        try:
            remote = t.locked(_finishing, (self, value, error), deadline)
        except LockTimeout:
            self.pending = True
            t.defer(functools.partial(Call.finish, self, value, error))
            return bool(t.u32s[self.index * U32S + I_JOINS])
        if remote is None:
            return False
        _faults.reached("completing")
        where, length = PAYLOAD_LOCAL, 0
        try:
            fns = True
            if remote > 0:
                where, length, fns = self._write_outcome(value, error)
        except BaseException as e:
            # Whatever stopped the writing (an OSError from /dev/shm, a KeyboardInterrupt during a long
            # encode), the waiters must not wait for an outcome that never comes: they get an abort.
            where, length = self._write_inline(
                _codec.pack_abort(f"the owner could not publish: {ascii(e)[:200]}")
            )
            if not isinstance(e, Exception):
                self.publish(where, length, deadline, False)
                raise
            self.publish(where, length, deadline, False)
            return True
        self.publish(where, length, deadline, fns)  # what could not be carried does not linger
        # Whether anybody joined the call (a lingering outcome is published with nobody waiting yet):
        # the count only grows until DONE, and a linger hit does not count.
        return bool(t.u32s[self.index * U32S + I_JOINS])

    def _local_waiters(self) -> int:
        """Under the lock: the registered waiters of this call that are threads of this process,
        counted from the records themselves, which are the truth whatever interrupted whom."""
        t = self.t
        pid, start = _owner.identity()
        base, end, mm, n = t.geo.record_map, t.geo.record_map + t.records, t.mm, 0
        r = mm.find(b"\1", base, end)
        while r >= 0:
            rpid, slot, rstart, _, rgen, _ = RECORD.unpack_from(mm, t.geo.record(r - base))
            n += (rpid, rstart, slot, rgen) == (pid, start, self.index, self.gen)
            r = mm.find(b"\1", r + 1, end)
        return n

    def _write_outcome(self, value: object, error: BaseException | None) -> tuple[int, int, bool]:
        """Outside the lock, in COMPLETING (the payload area is the owner's): encode the outcome into
        a payload, inline in the slot or in a segment. Returns (where, length, whether the payload is
        fn's outcome: not an error saying it could not be carried)."""
        opts, t = self.opts, self.t
        off = t.slot_off(self.index)
        key = slot_key(t.mm[off : off + SLOT_SIZE])[0]
        payload = encode_outcome(value, error, opts.codec, opts.max_result_bytes, key, opts.name)
        fns = _codec.is_fns(payload)
        if len(payload) <= PAYLOAD_CAP:
            if _faults.FAULT == "result":
                self._write_inline(payload[: len(payload) // 2])
                _faults.reached("result")
            return (*self._write_inline(payload), fns)
        try:
            if _faults.FAULT == "result":
                t.write_segment(self.index, payload[: len(payload) // 2])
                _faults.reached("result")
                unlink_segment(t.segment(self.index))
            t.write_segment(self.index, payload)  # a random name, in the slot before DONE; the table's mode
        except SegmentFull as e:
            log.warning("mpflight table %r: %s", opts.name, e)
            return (*self._write_inline(_codec.pack_not_carried(str(e))), False)
        return PAYLOAD_SEGMENT, len(payload), fns

    def _write_inline(self, payload: bytes) -> tuple[int, int]:
        """Outside the lock, in COMPLETING: a small payload, in the slot's payload area."""
        off = self.t.slot_off(self.index) + S_PAYLOAD
        self.t.mm[off : off + len(payload)] = payload
        return PAYLOAD_INLINE, len(payload)

    def publish(self, where: int, length: int, deadline: float | None, outcome: bool = True) -> None:
        """Mark the outcome DONE and wake the waiters (in the reaper when the lock is not free by the
        deadline: the owner's caller has its outcome already). ``outcome`` False: an abort written in
        place of the outcome, which never lingers."""
        t = self.t
        try:
            waiters = t.locked(self._publishing, (where, length, outcome), deadline)
        except LockTimeout:
            self.pending = True
            t.defer(functools.partial(self.publish, where, length, outcome=outcome))
            return
        if waiters:
            self._post(waiters)
        t.owners.pop((self.index, self.gen), None)  # woken: an exception before leaves it to recover

    def _publishing(self, where: int, length: int, outcome: bool = True) -> int:
        """Under the lock: the payload is in place; DONE. Returns how many waiters to wake.

        A call still joinable here lingers (its owner kept it so in finish): its outcome stays,
        for ``linger`` seconds from now, for the callers that come after it. The claim stays
        registered until its waiters are woken (publish): an exception before DONE leaves it to
        recover, which aborts it; one after, which wakes them."""
        t, index = self.t, self.index
        if t.u64s[index * U64S] != self.gen or t.states[index] != COMPLETING:
            # Freed by a repair or taken for dead and aborted meanwhile: the slot is not ours.
            t.owners.pop((index, self.gen), None)
            if where == PAYLOAD_SEGMENT:
                unlink_segment(t.segment(index))
            return 0
        t.mm[t.slot_off(index) + S_PAYLOAD_AT] = where
        t.u32s[index * U32S + I_PAYLOAD_LEN] = length
        if t.u32s[index * U32S + I_FLAGS] & JOINABLE:
            if outcome and where != PAYLOAD_LOCAL:
                t.u64s[index * U64S + Q_LINGER] = time.monotonic_ns() + self.opts.linger_ns
            else:
                self._unjoin()
        t.states[index] = DONE
        _faults.reached("publish")
        waiters = self._waiters()
        if waiters == 0 and not self._lingering():
            self._free_and_unlink()
        return waiters

    def _lingering(self) -> bool:
        """Under the lock, of a DONE call: whether its outcome lingers still."""
        t, index = self.t, self.index
        return (
            bool(t.u32s[index * U32S + I_FLAGS] & JOINABLE)
            and t.u64s[index * U64S + Q_LINGER] > time.monotonic_ns()
        )

    def _post(self, times: int) -> None:
        if _faults.FAULT == "woken" and times > 1:
            self.t.sems.post(self.index, 1)
            _faults.reached("woken")
        self.t.sems.post(self.index, times)

    def rename(self, tid: int) -> None:
        """The call is run by ``tid`` from now on (a thread or task), for re-entry and cycle checks."""
        self._bounded(self._renaming, tid)

    def _bounded(self, body: Callable[..., object], *args: object) -> None:
        """Run ``body`` under the lock by the deadline, else in the reaper soon (a hint that may wait)."""
        try:
            self.t.locked(body, args, self.deadline)
        except LockTimeout:
            self.t.defer(_locked_later(self.t, body, *args))

    def _renaming(self, tid: int) -> None:
        if self.t.gen(self.index) == self.gen and self.t.states[self.index] == RUNNING:
            self.t.u64s[self.index * U64S + Q_OWNER_TID] = tid

    def note(self, data: bytes) -> None:
        """Keep the wrapping tier's ``data`` (at most TIER_CAP bytes) in the slot of this running call."""
        if len(data) > TIER_CAP:
            raise ValueError(f"a tier keeps at most {TIER_CAP} bytes in a slot, not {len(data)}")
        self._bounded(self._noting, bytes(data))

    def _noting(self, data: bytes) -> None:
        t, off = self.t, self.t.slot_off(self.index)
        if t.gen(self.index) == self.gen and t.states[self.index] == RUNNING:
            t.mm[off + S_TIER : off + S_TIER + len(data)] = data
            t.mm[off + S_TIER_LEN] = len(data)

    def abandon(self, reason: str) -> None:
        """The owner ends its own call without an outcome (its outcome was to come from elsewhere and
        will not): the waiters get an abort, as if the owner had died."""
        self._bounded(self._aborting, reason)

    # -- the waiter: wait, read, leave ------------------------------------------------------------------

    def wait(self, key: str | bytes, detached: Callable[[], bool] | None = None) -> Result[Any]:
        """Wait for the outcome, then read it and leave the call.

        ``detached`` is asked after every slice of waiting: True makes this caller leave (Detached).
        When the owner is gone and this waiter may take the call over (on_abort="retry"), it becomes
        the call's owner (RunHere); one that may not gets AbortError. Whatever this raises,
        ``recover`` drops the record (or ends the claim it took over).
        """
        t, index, gen, deadline, opts = self.t, self.index, self.gen, self.deadline, self.opts
        began = time.monotonic()
        owner = (t.u32s[index * U32S + I_OWNER_PID], t.u64s[index * U64S + Q_OWNER_START])
        interval = opts.check_interval
        check_at = began + interval
        u32s, mm, off = t.u32s, t.mm, t.slot_off(index)
        while True:
            if self.record < 0:  # its caller's block ended it under this thread (end_orphans)
                raise Detached
            state = t.states[index]
            if state == DONE and t.gen(index) == gen:
                break
            if t.gen(index) != gen or state == FREE:
                raise AbortError(key, owner[0], "the call was lost (the table was repaired)")
            if state > DONE:
                raise DamagedTable(opts.name, f"slot {index} state {state}")
            now = time.monotonic()
            if state == RUNNING and (
                (pid := u32s[index * U32S + I_OWNER_PID]) != owner[0]
                or pid == 0
                or mm[off + S_TAKEOVERS] | mm[off + S_TAKEOVERS + 1] << 8 != self.seen
            ):
                # The owner is gone and the call vacant (maybe since before this waiter joined), or one
                # of its waiters took it over.
                try:
                    watch = t.locked(self._looking, (key, began), deadline)
                except LockTimeout:
                    watch = owner  # looked at again on the next slice
                if watch is None:
                    raise RunHere(f"took over the call of key {short_key(key)}")
                owner = watch
                check_at = now + interval
            elif now >= check_at:
                check_at = now + interval
                if "owner-check" not in _faults.DISABLED and not _owner.is_alive(*owner):
                    with contextlib.suppress(LockTimeout):
                        t.locked(self._aborting, ("owner died", owner), deadline)
                    continue
                if "table-identity" not in _faults.DISABLED and t.file.replaced():
                    t.replaced = True  # the next call of this process moves to the new table
            if deadline is not None and now >= deadline:
                try:
                    done = t.locked(self._giving_up, (began,), now)
                except LockTimeout:  # the reaper leaves for us: never wait past the deadline
                    t.defer(_locked_later(t, self._giving_up, began))
                    done = False
                if done:
                    break
                raise WaitTimeout(
                    f"gave up waiting {opts.timeout} s for the call of key {short_key(key)}",
                    key,
                    opts.timeout,
                )
            wait = interval if deadline is None else min(interval, deadline - now)
            t.sems.wait(index, wait)
            if detached is not None and detached():
                raise Detached
        return self._read(key, began)

    def _looking(self, key: str | bytes, began: float) -> tuple[int, int] | None:
        """Under the lock: the call's owner changed since this waiter last looked. None: this waiter
        took the call over (it owns it now); else the owner to watch from now on. AbortError when
        this waiter may not take it over (its budget is spent, or on_abort="raise"): it left."""
        t, index = self.t, self.index
        base, off = index * U32S, t.slot_off(index)
        owner = (t.u32s[base + I_OWNER_PID], t.u64s[index * U64S + Q_OWNER_START])
        if (
            t.gen(index) != self.gen
            or t.states[index] != RUNNING
            or self.record < 0
            or t.rmap[self.record] != 1
        ):
            return owner  # published, lost or left meanwhile: the wait loop sees which
        taken = int.from_bytes(t.mm[off + S_TAKEOVERS : off + S_TAKEOVERS + 2], "little")
        budget = self.opts.takeovers
        if owner[0] == 0 and budget > taken:
            self._taking(began)
            return None
        if owner[0] != 0 and taken <= budget:
            self.seen = taken  # taken over within this waiter's budget: it waits for the new owner
            return owner
        reason = self._vacancy_reason()
        self._leaving(began)
        raise AbortError(key, owner[0], reason, taken)

    def _vacancy_reason(self) -> str:
        """Under the lock, of a RUNNING call that was vacated: why its owner went (kept in the payload
        area, which is nobody's while the call runs)."""
        t, index = self.t, self.index
        off = t.slot_off(index) + S_PAYLOAD
        length = min(t.u32s[index * U32S + I_PAYLOAD_LEN], PAYLOAD_CAP)
        try:
            _codec.unpack(bytes(t.mm[off : off + length]), None, key="", owner_pid=0)
        except AbortError as e:
            return e.reason
        except MPFlightError:
            pass
        return "the owner is gone"

    def _taking(self, began: float) -> None:
        """Under the lock: this waiter takes the vacant call over: its record becomes the claim."""
        t, index, gen, record = self.t, self.index, self.gen, self.record
        base, off = index * U32S, t.slot_off(index)
        pid, start = _owner.identity()
        t.u32s[base + I_OWNER_PID] = pid
        t.u64s[index * U64S + Q_OWNER_START] = start
        t.u64s[index * U64S + Q_OWNER_TID] = threading.get_ident()
        t.u32s[base + I_BLOCKED_SLOT] = 0
        taken = int.from_bytes(t.mm[off + S_TAKEOVERS : off + S_TAKEOVERS + 2], "little") + 1
        t.mm[off + S_TAKEOVERS : off + S_TAKEOVERS + 2] = min(taken, 0xFFFF).to_bytes(2, "little")
        t.owners[index, gen] = weakref.ref(self)  # the claim, registered before the record goes
        _faults.reached("take")
        t.rmap[record] = 0
        t.readers.pop(record, None)
        t.u32s[base + I_WAITERS] = max(t.u32s[base + I_WAITERS] - 1, 0)
        self.record = -1
        _set_blocked(t, 0, 0)
        t.bump(C_WAIT_NS, int((time.monotonic() - began) * 1e9))
        t.bump(C_TAKEOVERS)
        t.bump(C_RUNS)
        if (index, gen) not in t.local:
            t.local[index, gen] = LocalCall()  # threads of this process may wait on it now
        log.info("mpflight table %r: took over the call of key %s (takeover %d)", t.group,
                 short_key(slot_key(t.mm[off : off + SLOT_SIZE])[0]), taken)  # fmt: skip

    def _giving_up(self, began: float) -> bool:
        """Under the lock: the waiter's time ran out; True if the outcome came meanwhile (read it)."""
        t = self.t
        if t.states[self.index] == DONE and t.gen(self.index) == self.gen:
            return True
        if self.record >= 0 and t.rmap[self.record] == 1:
            self._leaving(began)
            t.bump(C_TIMEOUTS)
        return False

    def _read(self, key: str | bytes, began: float) -> Result[Any]:
        """Take the published outcome, then leave the call; the last reader frees the slot."""
        t, index, deadline, opts = self.t, self.index, self.deadline, self.opts
        off = t.slot_off(index)
        # The owner that published (a DONE slot's owner fields are fixed): who took it over, if anyone.
        owner = (t.u32s[index * U32S + I_OWNER_PID], t.u64s[index * U64S + Q_OWNER_START])
        taken = int.from_bytes(t.mm[off + S_TAKEOVERS : off + S_TAKEOVERS + 2], "little")
        where = t.mm[off + S_PAYLOAD_AT]
        length = t.u32s[index * U32S + I_PAYLOAD_LEN]
        local = t.local.get((index, self.gen)) if owner == _owner.identity() else None
        served = True  # a value or fn's exception reached us; not an abort or a failure to read
        try:
            # The owner's very object, once the owner has filled it in; an outcome it never filled
            # in (an abort) is read from the slot like any other.
            if local is not None and local.filled:
                if local.error is None:
                    return Result(local.value, True)
                if isinstance(local.error, Exception):
                    raise local.error
                raise AbortError(key, owner[0], f"the owner left fn with {type(local.error).__name__}", taken)
            if where == PAYLOAD_INLINE and length <= PAYLOAD_CAP:
                payload = bytes(t.mm[off + S_PAYLOAD : off + S_PAYLOAD + length])
                return Result(_codec.unpack(payload, opts.codec, key=key, owner_pid=owner[0]), True)
            if where == PAYLOAD_SEGMENT and 0 < length <= MAX_RESULT_BYTES:
                with t.map_segment(index, length) as seg, memoryview(seg) as view:
                    value = _codec.unpack(view, opts.codec, key=key, owner_pid=owner[0])
                return Result(value, True)
            raise CorruptSlot(opts.name, index, f"outcome location {where}")
        except AbortError as e:
            served = False
            if taken and not e.takeovers:
                raise AbortError(key, owner[0], e.reason, taken) from None
            raise
        except MPFlightError as e:
            served = isinstance(e, RemoteError)
            raise
        finally:
            served = served and not self.hit
            try:
                t.locked(self._leaving, (began, served), deadline)
            except LockTimeout:  # the outcome is ours already: leave in the background
                t.defer(_locked_later(t, self._leaving, began, served))

    def _leaving(self, began: float | None, served: bool = False) -> None:
        """Under the lock: drop the waiter's record; the last reader of a DONE call frees its slot.

        ``began`` is when the waiter began to wait; None when reclaiming a record that nobody left.
        """
        t, record, index = self.t, self.record, self.index
        if record < 0 or t.rmap[record] != 1:
            t.readers.pop(record, None)
            return  # left already (reclaimed, or by a repair)
        t.rmap[record] = 0
        t.readers.pop(record, None)  # after the record is gone: an exception before leaves it registered
        if _faults.FAULT:
            _faults.reached("leave")
        if began is not None:
            _set_blocked(t, 0, 0)
            t.bump(C_WAIT_NS, int((time.monotonic() - began) * 1e9))
        if served:
            t.bump(C_SHARED)
        if index >= t.slots or t.gen(index) != self.gen or t.states[index] == FREE:
            return
        waiters = t.u32s[index * U32S + I_WAITERS] - 1
        t.u32s[index * U32S + I_WAITERS] = max(waiters, 0)
        state = t.states[index]
        if waiters <= 0 and state == DONE and not self._lingering():
            self._free_and_unlink()
        elif state == RUNNING and t.u32s[index * U32S + I_OWNER_PID] == 0 and not self._takers():
            self._end_vacancy()  # the last waiter that could take the call over left

    # -- anyone: abort, free --------------------------------------------------------------------------

    def _aborting(self, reason: str, owner: tuple[int, int] | None = None) -> None:
        """Under the lock: end the call, whose owner is gone, with an abort for its waiters. ``owner``:
        the (pid, start) found gone, outside the lock; a call that has another owner now (one of its
        waiters took it over meanwhile) is left alone."""
        t, index, gen = self.t, self.index, self.gen
        state = t.states[index]
        if t.gen(index) != gen or state not in (RUNNING, COMPLETING):
            return
        if owner is not None and owner != (
            t.u32s[index * U32S + I_OWNER_PID],
            t.u64s[index * U64S + Q_OWNER_START],
        ):
            return
        if state == RUNNING and t.u32s[index * U32S + I_OWNER_PID] == 0:
            return  # vacant already: a waiter takes it over, or the last that could ends it
        if self._takers():
            self._vacate(reason)
            return
        off = t.slot_off(index)
        pid = t.u32s[index * U32S + I_OWNER_PID]
        key = slot_key(t.mm[off : off + SLOT_SIZE])[0]
        log.warning("mpflight table %r: call of key %s (owner %d) aborted: %s", t.group, short_key(key),
                    pid, reason)  # fmt: skip
        _faults.reached("abort")
        self._write_abort(reason)
        t.owners.pop((index, gen), None)  # after DONE: an exception before leaves it registered
        t.bump(C_ABORTS)
        self._tell_tier("abort", reason)
        self._publish_abort(state)

    def _write_abort(self, reason: str) -> None:
        """Under the lock: an abort for ``reason`` in the slot's payload area."""
        t, index = self.t, self.index
        off = t.slot_off(index)
        payload = _codec.pack_abort(reason)
        t.mm[off + S_PAYLOAD : off + S_PAYLOAD + len(payload)] = payload
        t.mm[off + S_PAYLOAD_AT] = PAYLOAD_INLINE
        t.u32s[index * U32S + I_PAYLOAD_LEN] = len(payload)

    def _publish_abort(self, state: int) -> None:
        """Under the lock: the abort in the payload area is the call's outcome: DONE, waiters woken."""
        t, index = self.t, self.index
        self._unjoin()
        t.states[index] = DONE
        if state == COMPLETING:  # an owner may die while writing one; it named it in the slot first
            unlink_segment(t.segment(index))
        waiters = self._waiters()
        if waiters == 0:
            self._free()
        else:
            t.sems.post(index, waiters)

    # -- takeover: a waiter becomes the owner of a call whose owner is gone --------------------------------

    def _takers(self) -> bool:
        """Under the lock: whether a waiter of the call may take it over (its budget is not spent)."""
        t, index, gen = self.t, self.index, self.gen
        off = t.slot_off(index)
        taken = int.from_bytes(t.mm[off + S_TAKEOVERS : off + S_TAKEOVERS + 2], "little")
        base, end, mm = t.geo.record_map, t.geo.record_map + t.records, t.mm
        r = mm.find(b"\1", base, end)
        while r >= 0:
            at = t.geo.record(r - base)
            _, slot, _, _, rgen, _ = RECORD.unpack_from(mm, at)
            budget = int.from_bytes(mm[at + R_TAKEOVERS : at + R_TAKEOVERS + 4], "little")
            if (slot, rgen) == (index, gen) and budget > taken:
                return True
            r = mm.find(b"\1", r + 1, end)
        return False

    def _vacate(self, reason: str) -> None:
        """Under the lock: the owner is gone and a waiter may take the call over: the call runs on,
        vacant (owner pid 0), and its waiters are woken to look; the first that may takes it. The
        reason waits in the payload area for the waiters that may not."""
        t, index, gen = self.t, self.index, self.gen
        state, base, off = t.states[index], index * U32S, t.slot_off(index)
        log.warning("mpflight table %r: the owner (pid %d) of the call of key %s is gone (%s): a waiter "
                    "takes it over", t.group, t.u32s[base + I_OWNER_PID],
                    short_key(slot_key(t.mm[off : off + SLOT_SIZE])[0]), reason)  # fmt: skip
        self._write_abort(reason)
        t.u32s[base + I_OWNER_PID] = 0
        t.u64s[index * U64S + Q_OWNER_START] = 0
        t.u64s[index * U64S + Q_OWNER_TID] = 0
        t.u32s[base + I_BLOCKED_SLOT] = 0
        if state == COMPLETING:  # the gone owner may have named a segment; the next owner makes its own
            unlink_segment(t.segment(index))
        t.states[index] = RUNNING
        _faults.reached("vacate")
        t.owners.pop((index, gen), None)
        t.bump(C_ABORTS)
        self._tell_tier("abort", reason)
        t.mm[off + S_TIER_LEN] = 0  # the next owner notes its own
        t.sems.post(index, max(self._waiters(), 1))

    def _end_vacancy(self) -> None:
        """Under the lock: a vacant call that no waiter may take over any more ends with its abort."""
        self._publish_abort(RUNNING)

    def _free(self) -> None:
        """Under the lock: make the slot FREE (its segment, if it has one, is the caller's to unlink).
        A run that nobody joined is freed by _finishing, which writes this out."""
        t, index = self.t, self.index
        self._unjoin()
        off = t.slot_off(index)
        if t.mm[off + S_TIER_LEN]:
            self._tell_tier("free", "")
            t.mm[off + S_TIER_LEN] = 0
        t.states[index] = FREE
        call = (index, self.gen)
        t.local.pop(call, None)
        t.owners.pop(call, None)

    def _free_and_unlink(self) -> None:
        t, index = self.t, self.index
        segment = t.segment(index) if t.mm[t.slot_off(index) + S_PAYLOAD_AT] == PAYLOAD_SEGMENT else None
        self._free()
        if segment is not None:
            unlink_segment(segment)

    def _unjoin(self) -> None:
        """Under the lock: the call takes no new joiners from now on."""
        t, base = self.t, self.index * U32S
        u32s = t.u32s
        flags = u32s[base + I_FLAGS]
        if flags & JOINABLE:
            u32s[base + I_FLAGS] = flags & ~JOINABLE
            home, homes = u32s[base + I_HOME], t.homes  # one joinable call fewer has this home
            if home < t.slots and homes[home]:
                homes[home] -= 1
            else:
                t.damaged = True  # only damage gets here; the call goes on, and the table is repaired

    def _waiters(self) -> int:
        """Under the lock: the call's waiter count, which can never exceed the records."""
        t = self.t
        waiters = t.u32s[self.index * U32S + I_WAITERS]
        if waiters > t.records:
            t.damaged = True
            return t.records
        return waiters

    def _tell_tier(self, event: str, reason: str) -> None:
        """Under the lock: hand the wrapping tier's bytes of the call to its hook (run after the lock)."""
        t = self.t
        if not t.hooks:
            return  # no tier behind the table in this process: nobody here to tell
        off = t.slot_off(self.index)
        data = tier_bytes(t.mm[off : off + SLOT_SIZE])
        if data:
            t.events.append((event, slot_key(t.mm[off : off + SLOT_SIZE])[0], data, reason))


# -- finishing -----------------------------------------------------------------------------------------


def _finishing(call: Call, value: object, error: BaseException | None) -> int | None:
    """Under the lock: end the run. None when nobody joined (the slot is FREE again) or the call is
    no longer ours; else it is COMPLETING, and this is how many waiters are in other processes
    (threads of ours take the owner's very objects)."""
    t, index, gen = call.t, call.index, call.gen
    if t.u64s[index * U64S] != gen or t.states[index] != RUNNING:
        # Aborted under us (we were taken for dead): nobody waits for us.
        t.owners.pop((index, gen), None)
        return None
    opts = call.opts
    if error is not None:
        if not isinstance(error, Exception):  # fn left by KeyboardInterrupt, SystemExit: an abort
            if call._takers():
                call._vacate(f"the owner left fn with {type(error).__name__}")
                return None
            t.bump(C_ABORTS)
        else:
            t.bump(C_ERRORS)
    # Lingers: the outcome stays for callers that come after it (unless the call was forgotten).
    lingers = (
        opts.linger
        and t.u32s[index * U32S + I_FLAGS] & JOINABLE
        and (error is None or (opts.linger_errors and isinstance(error, Exception)))
    )
    if not lingers:
        u32s, base = t.u32s, index * U32S
        if not u32s[base + I_JOINS]:
            # Nobody joined: the slot is FREE again. Nearly every call ends here, so this is _free
            # written out (its _unjoin too), not called; the flags are left as they are, as a FREE
            # slot's fields mean nothing (every reader looks at the state first) until a claim
            # writes them all.
            if u32s[base + I_FLAGS] & JOINABLE:  # counted in its home (unless it was forgotten)
                home, homes = u32s[base + I_HOME], t.homes
                if home < t.slots and homes[home]:
                    homes[home] -= 1
                else:
                    t.damaged = True  # only damage gets here; the table is repaired
            if t.mm[t.geo.slot_base + index * SLOT_SIZE + S_TIER_LEN]:
                call._tell_tier("free", "")
                t.mm[t.geo.slot_base + index * SLOT_SIZE + S_TIER_LEN] = 0
            t.states[index] = FREE
            if t.local:
                t.local.pop((index, gen), None)
            t.owners.pop((index, gen), None)
            return None
        call._unjoin()
    t.states[index] = COMPLETING
    local = t.local.get((index, gen))
    if local is not None:
        local.value, local.error, local.filled = value, error, True
    remote = call._waiters() - call._local_waiters()
    return max(remote, 1) if lingers else remote  # a lingering outcome is written for later callers


# -- entering: claim or join ---------------------------------------------------------------------------


def _entering(
    call: Call, key: str | bytes, kind: int, raw: bytes, stored: bytes, home: int, tid: int, blocking: bool
) -> int | MPFlightError | str:
    """Under the lock: enter's work. A refusal is returned, having written nothing, so that the lock is
    left clean; so is what ran out ("slots" or "waiter records") when nothing was free."""
    t = call.t
    pid, start = _owner._identity or _owner.identity()
    if t.homes[home]:  # a joinable call has this home: maybe the key's
        index = _find(t, kind, stored, len(raw), home)
        if index >= 0 and t.states[index] == DONE:  # a lingering outcome, or one whose linger ended
            if t.u64s[index * U64S + Q_LINGER] > time.monotonic_ns():
                hit = _linger_hit(call, index, pid, start, tid)
                if hit is not None:
                    return hit
            _end_linger(t, index)  # expired; or no record is free to read it: a miss, never a fallback
            index = -1
        if index >= 0:
            try:
                gen = _try_join(call, index, key, pid, start, tid, blocking)
            except MPFlightError as e:  # a refusal, or no semaphore: nothing was written
                return e
            if gen >= 0:
                return JOIN
            if gen == _NO_RECORD:
                t.bump(C_FALLBACKS)
                return "waiter records"
            # _OWNER_GONE: its call is aborted; start a new one
    # Nobody runs this key: claim the first free slot from its home on (usually the home itself).
    index = home
    if t.states[home]:
        state_map = t.geo.state_map
        index = t.mm.find(b"\0", state_map + home, state_map + t.slots)
        if index < 0:
            index = t.mm.find(b"\0", state_map, state_map + home)
            if index < 0 and _evict_lingering(t):  # a full table: a lingering outcome makes room first
                index = t.mm.find(b"\0", state_map, state_map + t.slots)
            if index < 0:
                t.bump(C_FALLBACKS)
                return "slots"
        index -= state_map
    # Claim it: registered under the Call before the state byte makes it a call, and counted as a run
    # (every call is counted once, as a run, a join or a fallback, whatever happens next).
    off = t.geo.slot_base + index * SLOT_SIZE
    gen = (t.u64s[index * U64S] + 1) & 0xFFFFFFFFFFFFFFFF
    call.index, call.gen, call.record = index, gen, -1
    t.owners[index, gen] = call  # weakened when somebody asks (_held_claim)
    counters = t.counters
    counters[C_RUNS] = (counters[C_RUNS] + 1) & 0xFFFFFFFFFFFFFFFF
    mm = t.mm
    SLOT.pack_into(
        mm, off, gen, home, JOINABLE, 0, 0, pid, 0, start, tid, time.time(), 0, kind, PAYLOAD_NONE, 0, 0,
        len(raw), 0,
    )  # fmt: skip
    mm[off + S_KEY : off + S_KEY + len(stored)] = stored
    t.states[index] = RUNNING
    if _FAULT:
        _faults.reached("claim")
    t.homes[home] = (t.homes[home] + 1) & 0xFFFFFFFF
    return OWN


def _find(t: Table, kind: int, stored: bytes, key_len: int, home: int) -> int:
    """Under the lock: the slot of the joinable call for this key, or -1.

    Scans from the key's home until it has seen as many joinable calls of that home as its count says
    (usually one, usually at the home itself).
    """
    mm, states, u32s, u64s, slots = t.mm, t.states, t.u32s, t.u64s, t.slots
    want = t.homes[home]
    n = DIGEST_SIZE if kind & KEY_DIGEST else len(stored)
    probe = stored[:n]
    slot_base = t.geo.slot_base
    i = home
    for _ in range(slots):
        if states[i]:  # RUNNING, or COMPLETING and DONE when the call lingers
            base = i * U32S
            if u32s[base + I_HOME] == home and u32s[base + I_FLAGS] & JOINABLE:
                off = slot_base + i * SLOT_SIZE
                if (
                    mm[off + S_KEY_KIND] == kind
                    and u64s[i * U64S + Q_KEY_LEN] == key_len
                    and mm[off + S_KEY : off + S_KEY + n] == probe
                ):
                    return i
                want -= 1
                if want <= 0:
                    return -1
        i += 1
        if i == slots:
            i = 0
    return -1


def _try_join(
    call: Call, index: int, key: str | bytes, pid: int, start: int, tid: int, blocking: bool
) -> int:
    """Under the lock: register as a waiter of the call in ``index``, under ``call``.

    Returns the call's generation, or _OWNER_GONE when its owner is gone (the call is aborted: claim
    anew), _NO_RECORD when every waiter record is taken (run fn alone). Raises DeadlockError, having
    written nothing, when the wait would never end, and MPFlightError, having written nothing, when the
    slot's semaphore cannot be made (a full /dev/shm).
    """
    t = call.t
    gen = t.gen(index)
    owner = t.u32s[index * U32S + I_OWNER_PID]
    found = Call.of(t, index, gen)
    if owner == 0:
        pass  # vacant: a waiter takes it over, this caller maybe (its wait looks first)
    elif owner == pid:
        # This process's pid: our call only if the start time is ours too (else the pid was reused after
        # its owner died), and only while somebody in this process is responsible for it (else the
        # thread that claimed it left without ending it, or died).
        mine = t.u64s[index * U64S + Q_OWNER_START] == start
        if "own-identity" in _faults.DISABLED:
            pass  # a bare pid: ours, and so a DeadlockError below
        elif not mine or not _held_claim(t, index, gen):
            found._aborting("owner died" if not mine else "the owner left do() early")
            return _OWNER_GONE
    else:
        # A cheap look before joining: a pid that is gone is a dead owner (zombies and reused pids are
        # caught by the waiters' identity checks).
        try:
            if not 0 < owner <= _owner.PID_MAX:
                raise ProcessLookupError
            os.kill(owner, 0)
        except ProcessLookupError:
            found._aborting("owner died")
            return _OWNER_GONE
        except PermissionError:
            pass  # another user's process: alive
    if "cycle-check" not in _faults.DISABLED:
        _check_cycle(t, index, key, pid, tid)
    r = t.mm.find(b"\0", t.geo.record_map, t.geo.record_map + t.records)
    if r < 0:
        return _NO_RECORD
    r -= t.geo.record_map
    t.sems.ensure(index)  # the slot's semaphore, made by its first waiter; raises having written nothing
    at = t.geo.record(r)
    RECORD.pack_into(t.mm, at, pid, index, start, tid, gen, time.time())
    t.mm[at + R_TAKEOVERS : at + R_TAKEOVERS + 4] = call.opts.takeovers.to_bytes(4, "little")
    call.index, call.gen, call.record, call.hit = index, gen, r, False
    off = t.slot_off(index)
    call.seen = int.from_bytes(t.mm[off + S_TAKEOVERS : off + S_TAKEOVERS + 2], "little")
    t.readers[r] = weakref.ref(call)
    t.rmap[r] = 1
    _faults.reached("join")
    base = index * U32S
    t.u32s[base + I_WAITERS] += 1
    t.u32s[base + I_JOINS] = (t.u32s[base + I_JOINS] + 1) & 0xFFFFFFFF
    t.bump(C_JOINS)
    if owner == pid and (index, gen) not in t.local:
        t.local[index, gen] = LocalCall()
    if blocking:
        _set_blocked(t, index + 1, gen)
    return gen


def _linger_hit(call: Call, index: int, pid: int, start: int, tid: int) -> int | None:
    """Under the lock: register as a reader of the lingering outcome in ``index`` (its record keeps
    the slot, and its segment, until this caller has read it). JOIN; None when no record is free."""
    t = call.t
    r = t.mm.find(b"\0", t.geo.record_map, t.geo.record_map + t.records)
    if r < 0:
        return None
    r -= t.geo.record_map
    gen = t.gen(index)
    at = t.geo.record(r)
    RECORD.pack_into(t.mm, at, pid, index, start, tid, gen, time.time())
    t.mm[at + R_TAKEOVERS : at + R_TAKEOVERS + 4] = bytes(4)
    call.index, call.gen, call.record, call.hit, call.seen = index, gen, r, True, 0
    t.readers[r] = weakref.ref(call)
    t.rmap[r] = 1
    t.u32s[index * U32S + I_WAITERS] += 1
    t.bump(C_LINGER_HITS)
    return JOIN


def _end_linger(t: Table, index: int) -> None:
    """Under the lock: the DONE call in ``index`` lingers no more (it expired, or was forgotten): no new
    caller reads it, and it is freed now unless a reader still reads it (the last one frees it)."""
    call = Call.of(t, index, t.gen(index))
    call._unjoin()
    t.u64s[index * U64S + Q_LINGER] = 0
    if call._waiters() == 0:
        call._free_and_unlink()


def _lingering_slots(t: Table) -> list[int]:
    """Under the lock: the DONE slots whose call was kept to linger (expired or not)."""
    found, states, u32s, u64s = [], t.states, t.u32s, t.u64s
    state_map, mm = t.geo.state_map, t.mm
    index = mm.find(b"\3", state_map, state_map + t.slots)
    while index >= 0:
        index -= state_map
        if (
            states[index] == DONE
            and u64s[index * U64S + Q_LINGER]
            and u32s[index * U32S + I_FLAGS] & JOINABLE
        ):
            found.append(index)
        index = mm.find(b"\3", state_map + index + 1, state_map + t.slots)
    return found


def _evict_lingering(t: Table) -> bool:
    """Under the lock, with no slot free: free a lingering outcome nobody reads now, an expired one
    first, else the one that expires soonest. Whether one was freed."""
    now = time.monotonic_ns()
    idle = [i for i in _lingering_slots(t) if t.u32s[i * U32S + I_WAITERS] == 0]
    if not idle:
        return False
    victim = min(idle, key=lambda i: (t.u64s[i * U64S + Q_LINGER] > now, t.u64s[i * U64S + Q_LINGER]))
    _end_linger(t, victim)
    return True


def _set_blocked(t: Table, slot_plus_one: int, gen: int) -> None:
    """Under the lock: note in every call this thread owns what it now waits on (for cycle checks).

    Found by scanning the running calls for this thread's identity, so that owners keep no record of
    their own on the uncontended path.
    """
    pid, tid = _owner.identity()[0], threading.get_ident()
    mm, u32s, u64s, state_map = t.mm, t.u32s, t.u64s, t.geo.state_map
    index = mm.find(_RUNNING_BYTE, state_map, state_map + t.slots)
    while index >= 0:
        index -= state_map
        if u32s[index * U32S + I_OWNER_PID] == pid and u64s[index * U64S + Q_OWNER_TID] == tid:
            u32s[index * U32S + I_BLOCKED_SLOT] = slot_plus_one
            u64s[index * U64S + Q_BLOCKED_GEN] = gen
        index = mm.find(_RUNNING_BYTE, state_map + index + 1, state_map + t.slots)


def _check_cycle(t: Table, index: int, key: str | bytes, pid: int, tid: int) -> None:
    """Under the lock: refuse a wait on a call whose owner waits, maybe through others, on ours."""
    keys: list[str | bytes] = [key]
    cur = index
    u32s, u64s = t.u32s, t.u64s
    for _ in range(t.slots):
        if u32s[cur * U32S + I_OWNER_PID] == pid and u64s[cur * U64S + Q_OWNER_TID] == tid:
            raise DeadlockError(keys)
        nxt = u32s[cur * U32S + I_BLOCKED_SLOT] - 1
        if not 0 <= nxt < t.slots or t.states[nxt] not in (RUNNING, COMPLETING):
            return
        if t.gen(nxt) != u64s[cur * U64S + Q_BLOCKED_GEN]:
            return
        off = t.slot_off(nxt)
        keys.append(slot_key(t.mm[off : off + SLOT_SIZE])[0])
        cur = nxt


def forget(t: Table, key: object) -> None:
    """Let the next caller of ``key`` start a new call; callers already waiting keep the current one."""
    kind, raw, stored = key_identity(key)
    t.locked(_forgetting, (t, kind, raw, stored, home_of(t, kind, stored)))


def _forgetting(t: Table, kind: int, raw: bytes, stored: bytes, home: int) -> None:
    if t.homes[home]:
        index = _find(t, kind, stored, len(raw), home)
        if index >= 0 and t.states[index] == DONE:
            _end_linger(t, index)  # a lingering outcome ends at once
        elif index >= 0:
            Call.of(t, index, t.gen(index))._unjoin()


# -- ending what an exception left -------------------------------------------------------------------


def recover(call: Call, deadline: float | None = None) -> None:
    """End what the table registers under ``call``: after an exception took its caller out of the call
    early (an interruption, a failure to read, a cancellation), nothing of it stays behind. A claim is
    freed (nobody joined) or aborted for its waiters; a record is dropped. When the lock is not free
    by ``deadline``, the reaper does it."""
    t = call.t
    if (
        t.closed
        or call.pending
        or not any(registered(entry) is call for entry in (*t.owners.values(), *t.readers.values()))
        or "recover" in _faults.DISABLED
    ):
        return
    try:
        t.locked(end_orphans, (t, call), deadline)
    except LockTimeout:
        t.defer(_locked_later(t, end_orphans, t, call))


def end_orphans(t: Table, token: Call | None) -> tuple[int, int]:
    """Under the lock: end the claims and records registered under ``token``, or (None) under a Call
    that no longer exists (a claim still registered under its Call itself is end_unregistered's).
    Returns how many calls and records."""
    calls = records = 0
    for (index, gen), entry in list(t.owners.items()):
        held = registered(entry)
        if held is not token if token is not None else held is not None:
            continue
        calls += 1
        call = Call.of(t, index, gen)
        if t.gen(index) == gen and t.states[index] == DONE:  # published, maybe never woken
            t.owners.pop((index, gen), None)
            waiters = call._waiters()
            if waiters:
                t.sems.post(index, waiters)  # an extra post only makes a waiter look again
        elif not call.ours():
            t.owners.pop((index, gen), None)
        elif t.states[index] == RUNNING and t.u32s[index * U32S + I_JOINS] == 0:
            t.bump(C_ABORTS)
            call._free_and_unlink()
        else:
            call._aborting("the owner left do() early (an exception interrupted it)")
    for record, ref in list(t.readers.items()):
        held = ref()
        if held is not token if token is not None else held is not None:
            continue
        records += 1
        if t.rmap[record] == 1:
            _, slot, _, _, gen, _ = RECORD.unpack_from(t.mm, t.geo.record(record))
            Call.of(t, slot, gen, record)._leaving(None)
        t.readers.pop(record, None)
        if held is not None and held.record == record:
            # A thread may still wait under this Call (a wait thread its caller left): the record it
            # would leave may be another waiter's by then. It holds none now, and ends at its next look.
            held.record = -1
    return calls, records


def end_unregistered(t: Table) -> tuple[int, int]:
    """Under the lock: end calls and records of this process that nobody here is registered for (an
    exception came between the end of a registration and the end of what it registered)."""
    me = _owner.identity()
    calls = records = 0
    for index in range(t.slots):
        if t.states[index] not in (RUNNING, COMPLETING):
            continue
        gen = t.gen(index)
        owner = (t.u32s[index * U32S + I_OWNER_PID], t.u64s[index * U64S + Q_OWNER_START])
        if owner == me and not _held_claim(t, index, gen):
            Call.of(t, index, gen)._aborting("the owner left do() early (an exception interrupted it)")
            calls += 1
    base, end = t.geo.record_map, t.geo.record_map + t.records
    r = t.mm.find(b"\1", base, end)
    while r >= 0:
        pid, slot, start, _, gen, _ = RECORD.unpack_from(t.mm, t.geo.record(r - base))
        if (pid, start) == me and not _held(t.readers.get(r - base)):
            Call.of(t, slot, gen, r - base)._leaving(None)
            records += 1
        r = t.mm.find(b"\1", r + 1, end)
    return calls, records


def abort_dead(call: Call, owner: tuple[int, int]) -> bool:
    """Under the lock: abort ``call`` if it is still unpublished and still ``owner``'s (gc found that
    owner dead; since then, the call may have been published, vacated or taken over)."""
    t, index = call.t, call.index
    if not call.ours() or owner != (t.u32s[index * U32S + I_OWNER_PID], t.u64s[index * U64S + Q_OWNER_START]):
        return False
    call._aborting("owner died", owner)
    return True


def drop_dead_record(call: Call, fields: tuple[object, ...]) -> bool:
    """Under the lock: drop ``call``'s waiter record if it still holds ``fields`` (its waiter died)."""
    t = call.t
    if t.rmap[call.record] != 1 or RECORD.unpack_from(t.mm, t.geo.record(call.record)) != fields:
        return False
    call._leaving(None)
    return True


class Detached(Exception):
    """A waiter whose future was cancelled leaves its call, or one whose record its caller's block
    ended while this thread waited under it (raised inside Call.wait)."""
