"""Group: one execution of fn per key at a time, across the processes and threads of a machine.

The protocol (docs/design.md has the state machine and the argument):

    caller          under the table lock                      outside it
    ------          --------------------                      ----------
    owner           find no joinable call: claim a FREE slot  run fn
                    nobody joined: FREE the slot              (nothing to publish)
                    somebody joined: COMPLETING, unjoinable   encode the outcome, write it
                    DONE; count the registered waiters        post the slot's semaphore once each
    waiter          find the joinable call: write a record    wait on the semaphore; on each
                                                              timeout slice check the owner
                    drop the record; the last one FREEs        read the outcome
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import inspect
import logging
import os
import queue
import re
import threading
import time
import weakref
import zlib
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from fcntl import LOCK_EX, LOCK_NB, LOCK_UN, flock
from typing import Any, Final, Generic, NamedTuple, ParamSpec, TypeVar, overload

from . import _codec, _faults, _owner
from ._errors import AbortError, DeadlockError, MPFlightError, RemoteError, SerializationError, short_key
from ._layout import (
    C_ABORTS,
    C_ERRORS,
    C_FALLBACKS,
    C_JOINS,
    C_RUNS,
    C_SHARED,
    C_TIMEOUTS,
    C_WAIT_NS,
    COUNTER_NAMES,
    DIGEST_SIZE,
    H_DIRTY,
    HEADER,
    JOINABLE,
    KEY_BYTES,
    KEY_CAP,
    KEY_DIGEST,
    KEY_STR,
    MAGIC,
    MAX_SLOTS,
    RECORD,
    RESULT_CAP,
    RESULT_INLINE,
    RESULT_LOCAL,
    RESULT_NONE,
    RESULT_SEGMENT,
    S_BLOCKED_GEN,
    S_BLOCKED_SLOT,
    S_FLAGS,
    S_HOME,
    S_JOINS,
    S_KEY,
    S_KEY_KIND,
    S_KEY_LEN,
    S_OWNER_PID,
    S_OWNER_START,
    S_OWNER_TID,
    S_RESULT,
    S_RESULT_LEN,
    S_RESULT_WHERE,
    S_WAITERS,
    SLOT,
    SLOT_SIZE,
    U32S,
    U64S,
)
from ._locks import (
    SEP,
    LockTimeout,
    SegmentFull,
    check_mode,
    lock_holder,
    shm_entries,
    table_headers,
    unlink_all,
    unlink_segment,
)
from ._table import COMPLETING, DONE, FREE, MAX_KEY_BYTES, RUNNING, LocalCall, Table

log = logging.getLogger("mpflight")

T = TypeVar("T")
R = TypeVar("R")
P = ParamSpec("P")

_NAME: Final = re.compile(r"[A-Za-z0-9._-]{1,64}")
# Default bound on an encoded result: what a result segment may take of /dev/shm (Docker's is 64 MB).
DEFAULT_MAX_RESULT_BYTES: Final = 64 * 1024 * 1024
# How often a waiter checks that the owner lives: detection of a dead owner takes at most about this.
DEFAULT_CHECK_INTERVAL: Final = 0.2
# How often a process checks, on its way into do(), that its table is still the one under its name
# (calls stuck because their owners or readers died are the reaper's).
HOUSEKEEPING_INTERVAL: Final = 1.0
# How often each process's reaper sweeps its tables: what no live process takes part in any more is
# reclaimed within about two intervals (a call must be seen at two sweeps before psutil is asked).
REAP_INTERVAL: Final = 0.5
# A wait for the table lock longer than this (without a deadline) is logged once, naming the holder.
LONG_LOCK_WAIT: Final = 5.0
# At most one "table is full" warning per table and process this often (stats count every fallback).
FULL_WARNING_INTERVAL: Final = 10.0
# Encoded results up to 2**32 - 1 bytes: the slot's length field is a u32.
MAX_RESULT_BYTES: Final = 0xFFFFFFFF

RUNNING_BYTE: Final = bytes((RUNNING,))
# The inline uncontended path of do() is skipped while the tests inject faults or disable mechanisms,
# so that every named step is reached through the one general path.
_FAST: Final = not _faults.FAULT and not _faults.DISABLED

# A caller's role in its call, as _enter finds it.
_OWN: Final = 0  # claimed a slot: runs fn and publishes
_JOIN: Final = 1  # registered as a waiter of a running call
_ALONE: Final = 2  # no slot or record free: runs fn without coalescing

# What _try_join returns besides a generation (>= 0).
_NO_RECORD: Final = -1
_OWNER_GONE: Final = -2

_tables: dict[str, Table] = {}
_handles: weakref.WeakSet[Group] = weakref.WeakSet()  # handles with a thread pool
_tables_lock = threading.Lock()


class Result(NamedTuple, Generic[T]):
    """What ``do_ex`` returns: fn's value, and whether it was shared with another caller (as Go's Do)."""

    value: T
    shared: bool


@dataclass(frozen=True, slots=True)
class InflightCall:
    """One call in flight, as ``Group.inflight()`` sees it at one instant."""

    key: str | bytes  # the key, or its first bytes when it was too long to keep (key_complete False)
    owner_pid: int
    started: float  # epoch seconds
    waiters: int
    state: str  # "running", "completing" (fn returned, outcome being written) or "done" (being read)
    owner_alive: bool
    result_bytes: int | None  # size of the encoded outcome once published
    key_complete: bool
    waiter_pids: tuple[int, ...] = ()  # the process of each registered waiter (one per waiting thread)


def _slot_key(slot: bytes) -> tuple[str | bytes, bool]:
    """The key a slot's bytes hold, for display, and whether it is the whole key."""
    kind = slot[S_KEY_KIND]
    key_len = int.from_bytes(slot[S_KEY_LEN : S_KEY_LEN + 8], "little")
    if kind & KEY_DIGEST:
        raw, complete = slot[S_KEY + DIGEST_SIZE : S_KEY + KEY_CAP], False
    else:
        raw, complete = slot[S_KEY : S_KEY + min(key_len, KEY_CAP)], True
    if kind & KEY_BYTES:
        return bytes(raw), complete
    try:
        return raw.decode("utf-8", "surrogatepass"), complete
    except UnicodeDecodeError:  # a prefix cut inside a character, or a damaged slot
        return raw.decode("utf-8", "replace"), False


def _validate_name(name: object) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"group name must be 1 to 64 characters of [A-Za-z0-9._-], not {name!r}")
    return name


def _key_identity(key: object) -> tuple[int, bytes, bytes]:
    """(kind, encoded key, what the slot stores to identify it)."""
    if isinstance(key, str):
        kind, raw = KEY_STR, key.encode("utf-8", "surrogatepass")
    elif isinstance(key, bytes):
        kind, raw = KEY_BYTES, bytes(key)
    else:
        raise TypeError(f"key must be str or bytes, not {type(key).__name__}")
    if len(raw) > MAX_KEY_BYTES:
        raise ValueError(f"key is {len(raw)} bytes encoded; at most {MAX_KEY_BYTES} are allowed")
    if len(raw) > KEY_CAP:
        digest = hashlib.sha256(bytes((kind,)) + raw).digest()
        return kind | KEY_DIGEST, raw, digest + raw[: KEY_CAP - DIGEST_SIZE]
    return kind, raw, raw


def _attach(
    name: str, slots: int | None, mode: int | None, create: bool, timeout: float | None = None
) -> Table:
    with _tables_lock:
        t = _tables.get(name)
        if t is None or t.closed:
            deadline = None if timeout is None else time.monotonic() + timeout
            t = Table(name, slots=slots, mode=mode, create=create, deadline=deadline)
            _tables[name] = t
        elif slots is not None and slots != t.slots:
            raise MPFlightError(f"mpflight table {name!r} exists with {t.slots} slots, not {slots}")
        elif mode is not None and mode != t.file.mode:
            raise MPFlightError(
                f"mpflight table {name!r} ({t.file.path}) has mode {t.file.mode:#o}, not {mode:#o}: "
                "omit mode= to adopt the table's, or unlink it to make it anew with another"
            )
        t.refs += 1
    _reaper.ensure()
    return t


class _Detached(Exception):
    """A waiter whose future was cancelled leaves its call (raised inside _wait)."""


def _resolve(future: Future[Any], result: object = None, error: BaseException | None = None) -> None:
    """Resolve a caller's future, unless it was cancelled: then that caller has already gone."""
    if future.set_running_or_notify_cancel():
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)


def _retrieve(task: asyncio.Task[Result[object]]) -> None:
    """An asyncio owner's task ended: take its exception (its caller may have gone away)."""
    if not task.cancelled():
        task.exception()


def _close_unused(t: Table) -> None:
    """Unmap a table that no handle of this process refers to and no thread is inside.

    Until then it stays the process's table of its name, so that every handle and thread of the
    process shares one mapping (and one set of the owner's objects for its local waiters). Closed is
    set before looking for callers inside: one entering meanwhile sees it (``_use``) and refuses, and
    one already inside keeps the table until it leaves (``_left``).
    """
    with _tables_lock:
        if t.refs or t.closed:
            return
        t.closed = True
        if t.active:
            t.closed = False  # the last caller to leave closes it
            return
        if _tables.get(t.group) is t:
            del _tables[t.group]
        t.unmap()


class _Token:
    """A caller's responsibility for what it registered in the table (see Group._call)."""

    __slots__ = ("__weakref__",)


def _held(ref: weakref.ref[_Token] | None) -> bool:
    """Whether a registered claim or record still has somebody responsible for it in this process."""
    return ref is not None and ref() is not None


def _use(t: Table, marker: object) -> Table:
    """Note that a caller (``marker``) is inside ``t``: it is not unmapped until the caller leaves."""
    t.active.add(marker)
    if t.closed:
        t.active.discard(marker)
        raise ValueError(f"operation on closed mpflight.Group {t.group!r}")
    return t


def _left(t: Table, marker: object) -> None:
    """The caller ``marker`` is no longer inside ``t`` (idempotent)."""
    t.active.discard(marker)
    if t.refs == 0 and not t.active:
        _close_unused(t)


class _Reaper:
    """One thread per process that keeps every table the process has open tidy, traffic or not.

    Every REAP_INTERVAL it reclaims what no live process takes part in any more (the calls of dead
    owners nobody waits for, records of dead waiters, published outcomes whose readers all died, and
    what callers of this process left when an exception took them out of a call), and logs a wait for
    the table lock that takes unusually long. It also runs what a caller with a deadline handed it:
    publishing an outcome, leaving a call, when the table lock was not free in time. psutil is used
    only for calls seen busy at two sweeps in a row. Started on first use, and again in a forked child.
    """

    def __init__(self) -> None:
        self.pid = 0
        self.lock = threading.Lock()
        self.sweeping = threading.Lock()  # held through each sweep; while a test holds it, no sweeps
        self.wake = threading.Event()
        self.work: queue.SimpleQueue[tuple[Table, object, Callable[[], object]]] = queue.SimpleQueue()

    def ensure(self) -> None:
        """Start this process's reaper thread if it does not run yet."""
        if self.pid != os.getpid() and "reaper" not in _faults.DISABLED:
            with self.lock:
                if self.pid != os.getpid():
                    self.pid = os.getpid()
                    self.work = queue.SimpleQueue()
                    self.wake = threading.Event()
                    threading.Thread(
                        target=self._run, args=(self.pid,), daemon=True, name="mpflight-reaper"
                    ).start()

    def defer(self, t: Table, job: Callable[[], object]) -> None:
        """Run ``job`` on ``t`` in the reaper thread, soon (the table stays mapped until then)."""
        marker = object()
        t.active.add(marker)
        self.work.put((t, marker, job))
        self.ensure()
        self.wake.set()

    def _run(self, pid: int) -> None:
        while os.getpid() == pid:
            self.wake.wait(REAP_INTERVAL)
            self.wake.clear()
            self._round()

    def _round(self) -> None:
        """Run the deferred work, then sweep every table of the process."""
        while True:
            try:
                t, marker, job = self.work.get_nowait()
            except queue.Empty:
                break
            try:
                job()
            except Exception:
                log.exception("mpflight table %r: deferred work failed", t.group)
            finally:
                _left(t, marker)
        with _tables_lock:
            tables = [t for t in _tables.values() if not t.closed]
        if not self.sweeping.acquire(blocking=False):
            return  # held off (by a test): the deferred work above still runs
        try:
            for t in tables:
                marker = object()
                try:
                    _use(t, marker)
                except ValueError:
                    continue
                try:
                    self._sweep(t)
                except Exception:  # a table removed or damaged under us: the next sweep looks again
                    log.debug("mpflight table %r: sweep failed", t.group, exc_info=True)
                finally:
                    _left(t, marker)
        finally:
            self.sweeping.release()

    def _sweep(self, t: Table) -> None:
        now = time.monotonic()
        for ident, since in list(t.lock.waits.items()):
            if now - since >= LONG_LOCK_WAIT and (ident, since) not in t.warned_waits:
                t.warned_waits.add((ident, since))
                holder = lock_holder(t.file.fd)
                log.warning(
                    "mpflight table %r: a thread has waited %.0f s for the table lock, held by %s", t.group,
                    now - since, f"pid {holder}" if holder else "a process that cannot be named",
                )  # fmt: skip
        orphans = any(ref() is None for ref in (*t.owners.values(), *t.readers.values()))
        states, records = bytes(t.states), bytes(t.rmap)
        busy = {(i, t.gen(i), state) for i, state in enumerate(states) if state}
        busy.update((-1 - r, 0, 0) for r, used in enumerate(records) if used)
        stuck = busy & t.seen_busy
        t.seen_busy = busy
        if orphans or stuck:
            Group._reclaim(t, idle_only=True)


_reaper = _Reaper()


def _after_fork_in_child() -> None:
    global _tables_lock
    _tables_lock = threading.Lock()
    _reaper.lock = threading.Lock()  # the reaper thread is not forked: the next call starts one
    _reaper.sweeping = threading.Lock()
    for handle in list(_handles):
        handle._executor = None  # its threads were not forked
    _owner.forget_identity()
    for t in _tables.values():
        if not t.closed:
            t.after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _decorator(
    group: Callable[[], Group], key: Callable[..., str | bytes] | None
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    def decorate(func: Callable[P, R]) -> Callable[P, R]:
        signature = inspect.signature(func)
        prefix = f"{func.__module__}.{func.__qualname__}".encode()

        def make_key(args: tuple[object, ...], kwargs: dict[str, object]) -> str | bytes:
            if key is not None:  # the function's identity stays part of the key
                made_by_key = key(*args, **kwargs)
                if not isinstance(made_by_key, str | bytes):
                    raise TypeError(f"key= must return str or bytes, not {type(made_by_key).__name__}")
                tail = (
                    made_by_key.encode("utf-8", "surrogatepass")
                    if isinstance(made_by_key, str)
                    else made_by_key
                )
                return prefix + (b"\1" if isinstance(made_by_key, str) else b"\2") + tail
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            codec = group().codec
            parts = [prefix]
            for name, value in bound.arguments.items():
                try:
                    parts.append(_codec.pack_key((name, value), codec))
                except SerializationError as e:
                    raise TypeError(
                        f"cannot make a key of argument {name!r} of {func.__qualname__}: {e}; pass key="
                    ) from None
            made = b"\0".join(parts)
            # Past the key length limit, the digest stands for it (slots keep a digest anyway).
            return made if len(made) <= MAX_KEY_BYTES else prefix + b"\0" + hashlib.sha256(made).digest()

        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def coalesced_async(*args: P.args, **kwargs: P.kwargs) -> Any:
                return await group().do_async(make_key(args, kwargs), func, *args, **kwargs)

            return coalesced_async  # type: ignore[return-value]

        @functools.wraps(func)
        def coalesced(*args: P.args, **kwargs: P.kwargs) -> R:
            return group().do(make_key(args, kwargs), func, *args, **kwargs)

        return coalesced

    return decorate


def coalesce(
    group_name: str, *, key: Callable[..., str | bytes] | None = None, **group_options: Any
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """``@mpflight.coalesce("name")``: as ``Group.coalesce``, on a group opened in each process on
    its first call (so importing a module opens nothing, and forked workers open their own)."""
    _validate_name(group_name)
    opened: list[Group] = []
    lock = threading.Lock()

    def group() -> Group:
        if not opened:
            with lock:
                if not opened:
                    opened.append(Group(group_name, **group_options))
        return opened[0]

    return _decorator(group, key)


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
    return unlink_all(_validate_name(name))


class Group:
    """A named table of calls in flight, shared by every process of the machine that opens the name.

    ``Group(name)`` creates the table or attaches to it. The handle is safe to use from many threads;
    it is a context manager, and ``close()`` detaches it.
    """

    def __init__(
        self,
        name: str,
        *,
        slots: int | None = None,
        timeout: float | None = None,
        mode: int | None = None,
        max_result_bytes: int = DEFAULT_MAX_RESULT_BYTES,
        codec: _codec.Codec | None = None,
        check_interval: float = DEFAULT_CHECK_INTERVAL,
        create: bool = True,
    ) -> None:
        self.name = _validate_name(name)
        if slots is not None and (type(slots) is not int or not 1 <= slots <= MAX_SLOTS):
            raise ValueError(f"slots must be an int from 1 to {MAX_SLOTS}, not {slots!r}")
        self.timeout = None if timeout is None else _positive("timeout", timeout)
        self.check_interval = _positive("check_interval", check_interval)
        if mode is not None:
            if type(mode) is not int or not 0 <= mode <= 0o777:
                raise ValueError(f"mode must be permission bits from 0 to 0o777, not {mode!r}")
            bad = check_mode(mode)
            if bad is not None:
                raise ValueError(bad)
        if type(max_result_bytes) is not int or not 1 <= max_result_bytes <= MAX_RESULT_BYTES:
            raise ValueError(f"max_result_bytes must be an int from 1 to {MAX_RESULT_BYTES}")
        if codec is not None and not isinstance(codec, _codec.Codec):
            raise TypeError(f"codec must be an mpflight.Codec, not {type(codec).__name__}")
        self._mode = mode  # as asked: None adopts the table's (and makes a new one 0o600)
        self.max_result_bytes = max_result_bytes
        self.codec = codec
        self._create = create
        self._executor: ThreadPoolExecutor | None = None
        self._t: Table | None = _attach(self.name, slots, mode, create, self.timeout)
        self.mode: int = self._t.mode  # the table's: what every process makes its objects with

    # -- life ----------------------------------------------------------------------------------------

    def __enter__(self) -> Group:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._t is None else f"{self._t.slots} slots"
        return f"<mpflight.Group {self.name!r} {state}>"

    def close(self) -> None:
        """Detach from the table (it stays for the other processes; ``unlink`` removes it)."""
        t, self._t = self._t, None
        if t is None:
            return
        if self._executor is not None:
            self._executor.shutdown(wait=False)
        with _tables_lock:
            t.refs -= 1
        _close_unused(t)

    def _table(self) -> Table:
        t = self._t
        if t is None:
            raise ValueError(f"operation on closed mpflight.Group {self.name!r}")
        return t

    @property
    def slots(self) -> int:
        return self._table().slots

    # -- the call --------------------------------------------------------------------------------------

    def do(self, key: str | bytes, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``fn(*args, **kwargs)`` unless a call for ``key`` is in flight anywhere; return its value.

        Concurrent callers of one key, in any process, share one execution and its outcome: its
        value, or the exception fn raised. Waits are bounded by the handle's ``timeout``
        (TimeoutError); a dead owner is reported as AbortError.
        """
        return self._call(key, fn, args, kwargs)[0]

    def do_ex(self, key: str | bytes, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Result[T]:
        """As ``do``, and say whether the outcome was shared with another caller."""
        value, shared = self._call(key, fn, args, kwargs)
        return Result(value, shared)

    def _call(
        self, key: str | bytes, fn: Callable[..., T], args: tuple[object, ...], kwargs: dict[str, object]
    ) -> tuple[T, bool]:
        t = self._t
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        # Whoever holds this object is responsible for what the table registers under it: the call this
        # caller claimed or its waiter record. If it goes away while they are registered (an exception
        # skipped every cleanup), the reaper ends them.
        token = _Token()
        claimed = None
        used = None  # the table this caller is inside: closing the handle must not unmap it meanwhile
        try:
            if (
                _FAST
                and t is not None
                and callable(fn)
                and time.monotonic() - t.checked <= HOUSEKEEPING_INTERVAL
            ):
                kind = KEY_STR if type(key) is str else KEY_BYTES if type(key) is bytes else -1
                if kind >= 0:
                    raw = key.encode("utf-8", "surrogatepass") if kind == KEY_STR else key  # type: ignore[union-attr]
                    if len(raw) <= KEY_CAP:
                        used = t  # _use, inline: the finally's discard is harmless if the add never ran
                        t.active.add(token)
                        if t.closed:
                            raise ValueError(f"operation on closed mpflight.Group {self.name!r}")
                        claimed = self._claim_if_free(t, kind, raw, token, deadline)  # type: ignore[arg-type]
            if claimed is not None:
                assert t is not None
                index, gen = claimed
                role, record = _OWN, -1
            else:
                if used is not None:
                    _left(used, token)
                    used = None
                t = used = _use(self._table_for(fn), token)
                role, index, gen, record = self._enter(t, key, threading.get_ident(), token, deadline, True)
                if role == _ALONE:
                    return fn(*args, **kwargs), False
            if role == _JOIN:
                return self._wait(t, index, gen, record, key, token, deadline)
            try:
                value = fn(*args, **kwargs)
            except BaseException as e:
                self._complete(t, index, gen, None, e, deadline)
                raise
            # Nobody joined (a hint, read without the lock; _free_if_alone reads it again under it):
            # free the slot in one short hold. Somebody joined: publish.
            if (
                claimed is not None
                and not t.u32s[index * U32S + S_JOINS // 4]
                and self._free_if_alone(t, index, gen, deadline)
            ):
                return value, False
            return value, self._complete(t, index, gen, value, None, deadline)
        except BaseException:
            if used is not None:
                self._recover(used, token, deadline)
            raise
        finally:
            if used is not None:
                used.active.discard(token)  # _left, inline
                if not used.refs and not used.active:
                    _close_unused(used)

    def _recover(self, t: Table, token: _Token, deadline: float | None = None) -> None:
        """End what the table registers under ``token``: after an exception left a call early (an
        interruption, a failure to read, a cancellation), nothing of this caller's stays behind. Its
        claim is freed (nobody joined) or aborted for its waiters; its waiter record is dropped. When
        the lock is not free by ``deadline``, the reaper does it."""
        if (
            t.closed
            or not any(ref() is token for ref in (*t.owners.values(), *t.readers.values()))
            or "recover" in _faults.DISABLED
        ):
            return
        try:
            t.locked(self._end_orphans, t, token, deadline=deadline)
        except LockTimeout:
            _reaper.defer(t, functools.partial(t.locked, self._end_orphans, t, token))

    @staticmethod
    def _end_unregistered(t: Table) -> tuple[int, int]:
        """Under the lock: end calls and records of this process that nobody here is registered for
        (an exception came between the end of a registration and the end of what it registered)."""
        me = _owner.identity()
        calls = records = 0
        for index in range(t.slots):
            if t.states[index] not in (RUNNING, COMPLETING):
                continue
            gen = t.gen(index)
            owner = (t.u32s[index * U32S + S_OWNER_PID // 4], t.u64s[index * U64S + S_OWNER_START // 8])
            if owner == me and not _held(t.owners.get((index, gen))):
                Group._abort(t, index, gen, "the owner left do() early (an exception interrupted it)")
                calls += 1
        base, end = t.geo.record_map, t.geo.record_map + t.records
        r = t.mm.find(b"\1", base, end)
        while r >= 0:
            pid, slot, start, _, gen, _ = RECORD.unpack_from(t.mm, t.geo.record(r - base))
            if (pid, start) == me and not _held(t.readers.get(r - base)):
                Group._leave(t, slot, gen, r - base, None)
                records += 1
            r = t.mm.find(b"\1", r + 1, end)
        return calls, records

    @staticmethod
    def _end_orphans(t: Table, token: _Token | None) -> tuple[int, int]:
        """Under the lock: end the calls and records registered under ``token``, or (None) under a
        token that no longer exists. Returns how many calls and records."""
        calls = records = 0
        for (index, gen), ref in list(t.owners.items()):
            held = ref()
            if held is not token if token is not None else held is not None:
                continue
            calls += 1
            if t.gen(index) == gen and t.states[index] == DONE:  # published, maybe never woken
                t.owners.pop((index, gen), None)
                waiters = t.waiters_of(index)
                if waiters:
                    t.sems.post(index, waiters)  # an extra post only makes a waiter look again
            elif t.gen(index) != gen or t.states[index] not in (RUNNING, COMPLETING):
                t.owners.pop((index, gen), None)
            elif t.states[index] == RUNNING and t.u32s[index * U32S + S_JOINS // 4] == 0:
                t.bump(C_ABORTS)
                segment = t.free(index, gen)
                if segment is not None:
                    unlink_segment(segment)
            else:
                Group._abort(t, index, gen, "the owner left do() early (an exception interrupted it)")
        for record, ref in list(t.readers.items()):
            held = ref()
            if held is not token if token is not None else held is not None:
                continue
            records += 1
            if t.rmap[record] == 1:
                _, slot, _, _, gen, _ = RECORD.unpack_from(t.mm, t.geo.record(record))
                Group._leave(t, slot, gen, record, None)
            t.readers.pop(record, None)
        return calls, records

    def _free_if_alone(self, t: Table, index: int, gen: int, deadline: float | None) -> bool:
        """The uncontended end of ``do``: when nobody joined the call, free its slot in one short hold
        of the lock. False leaves everything to _complete (someone joined, or the table needs repair)."""
        try:
            hold = t.lock.local.hold
        except AttributeError:
            hold = t.lock.hold()
        try:
            try:
                if hold.fd != hold.own:
                    raise BlockingIOError
                flock(hold.fd, LOCK_EX | LOCK_NB)  # contended when it raises: acquire's first step
            except BlockingIOError:
                try:
                    t.lock.acquire(hold, deadline)  # contended
                except LockTimeout:
                    return False  # _complete defers the rest
            mm, u32s, base = t.mm, t.u32s, index * U32S
            if (
                mm[H_DIRTY]
                or t.u64s[index * U64S] != gen
                or t.states[index] != RUNNING
                or u32s[base + S_JOINS // 4]
            ):
                return False
            mm[H_DIRTY] = 1
            if u32s[base + S_FLAGS // 4] & JOINABLE:
                home = u32s[base + S_HOME // 4]
                if home < t.slots and t.homes[home]:
                    t.homes[home] -= 1
                else:
                    t.unhome(home)  # damage: marks the table for repair
            t.states[index] = FREE
            del t.owners[index, gen]
            if not t.damaged:
                mm[H_DIRTY] = 0
            t.damaged = False
            return True
        finally:
            flock(hold.fd, LOCK_UN)

    def _claim_if_free(
        self, t: Table, kind: int, raw: bytes, token: _Token, deadline: float | None
    ) -> tuple[int, int] | None:
        """The uncontended path of ``do``, in one short hold of the lock: when no call of the key is
        joinable and the table needs no repair, claim a free slot. None sends the caller down the
        general path (_enter), which handles everything else.
        """
        home = zlib.crc32(raw, kind) % t.slots
        try:
            hold = t.lock.local.hold
        except AttributeError:
            hold = t.lock.hold()
        try:
            try:
                if hold.fd != hold.own:
                    raise BlockingIOError
                flock(hold.fd, LOCK_EX | LOCK_NB)  # contended when it raises: acquire's first step
            except BlockingIOError:
                t.lock.acquire(hold, deadline)  # contended
            mm = t.mm
            index = -1
            # A joinable call of this very key means joining it, and a dirty table repair: both are
            # the general path's. A joinable call of another key with the same home is not.
            if not mm[H_DIRTY] and (not t.homes[home] or self._find(t, kind, raw, len(raw), home) < 0):
                state_map = t.geo.state_map
                index = mm.find(b"\0", state_map + home, state_map + t.slots)
                if index < 0:
                    index = mm.find(b"\0", state_map, state_map + home)
            if index < 0:
                return None
            index -= state_map
            mm[H_DIRTY] = 1
            pid, start = _owner._identity or _owner.identity()
            gen = self._claim(t, index, home, kind, raw, raw, pid, start, threading.get_ident(), token)
            mm[H_DIRTY] = 0
            return index, gen
        except LockTimeout:
            raise TimeoutError(
                f"gave up waiting {self.timeout} s for the table lock of {self.name!r}"
            ) from None
        finally:
            flock(hold.fd, LOCK_UN)  # the dirty byte, if set, stays set: the next holder repairs

    def do_future(
        self, key: str | bytes, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs
    ) -> Future[Result[T]]:
        """As ``do_ex``, without blocking: a Future that resolves to the Result (Go's DoChan).

        When this caller owns the call, fn runs in the handle's thread pool; a wait runs in a thread
        of its own, never in that pool. Cancelling the future detaches this caller only: the call
        goes on for everyone else. Every outcome resolves the future, aborts and timeouts included.
        """
        _key_identity(key)  # a bad key raises here, at once
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        token = _Token()
        t = _use(self._table_for(fn), token)
        future: Future[Result[T]] = Future()
        try:
            self._pool().submit(self._begin_future, t, future, key, fn, args, kwargs, token, deadline)
        except BaseException:
            _left(t, token)
            raise
        return future

    def _begin_future(
        self, t: Table, future: Future[Result[T]], key: str | bytes, fn: Callable[..., T],
        args: tuple[object, ...], kwargs: dict[str, object], token: _Token, deadline: float | None,
    ) -> None:  # fmt: skip
        """In a pool thread: claim or join the call only now (a call queued behind busy pool threads
        holds no slot that others would wait on), then run fn here, or hand the wait to a thread of
        its own and free this pool thread."""
        try:
            if future.cancelled():
                return
            role, index, gen, record = self._enter(t, key, threading.get_ident(), token, deadline, False)
            if role == _JOIN:
                self._start_wait(t, future, index, gen, record, key, token, deadline)
                return
            if role == _ALONE:
                result = Result(fn(*args, **kwargs), False)
            else:
                result = self._run(t, index, gen, fn, args, kwargs, token, deadline)
        except BaseException as e:
            self._recover(t, token, deadline)
            _resolve(future, error=e)
        else:
            _resolve(future, result)
        finally:
            _left(t, token)

    def _start_wait(
        self, t: Table, future: Future[Result[T]], index: int, gen: int, record: int, key: str | bytes,
        token: _Token, deadline: float | None,
    ) -> None:  # fmt: skip
        """Wait for (index, gen) in a thread of its own, which resolves ``future`` (and keeps the
        table in use until it ends)."""
        mark = _use(t, object())
        try:
            threading.Thread(
                target=self._wait_into, args=(t, future, index, gen, record, key, token, deadline, mark),
                daemon=True, name=f"mpflight-wait-{self.name}",
            ).start()  # fmt: skip
        except BaseException:
            _left(t, mark)
            raise

    @overload
    async def do_async(
        self, key: str | bytes, fn: Callable[P, Awaitable[R]], /, *args: P.args, **kwargs: P.kwargs
    ) -> R: ...

    @overload
    async def do_async(
        self, key: str | bytes, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs
    ) -> R: ...

    async def do_async(self, key: str | bytes, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """As ``do``, for asyncio: fn is a coroutine function (awaited on this loop) or a plain one
        (run in the loop's default executor). Waiting never blocks the loop nor takes an executor
        thread: a waiter waits in a thread of its own. Cancelling the awaiting task detaches this
        caller only, also when it owns the call: the call goes on and every other caller still gets
        its outcome. The table lock is taken briefly on the loop, as by ``do``.
        """
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        task = asyncio.current_task()
        tid = id(task) if task is not None else threading.get_ident()
        token = _Token()
        t = _use(self._table_for(fn), token)
        owning: Coroutine[Any, Any, Result[Any]] | None = None  # the owner's runner, once made
        try:
            role, index, gen, record = self._enter(t, key, tid, token, deadline, False)
            if role == _ALONE:
                return await self._call_async(asyncio.get_running_loop(), fn, args, kwargs)
            if role == _OWN:
                owning = self._own_async(t, index, gen, fn, args, kwargs, token, deadline)
                runner = asyncio.get_running_loop().create_task(owning)
                t.tasks.add(runner)
                runner.add_done_callback(t.tasks.discard)
                runner.add_done_callback(_retrieve)
                # However the runner ends (even if an exception came before its first line), nothing
                # it claimed stays behind.
                runner.add_done_callback(functools.partial(self._runner_done, t, token))
                self._rename_owner(t, index, gen, id(runner))  # fn runs in the runner: re-entry is seen there
                return (await asyncio.shield(runner)).value
            waited: Future[Result[Any]] = Future()
            self._start_wait(t, waited, index, gen, record, key, token, deadline)
            try:
                return (await asyncio.wrap_future(waited)).value
            except BaseException:
                # Cancelled (Ctrl-C under asyncio.run, a timeout): leave now, not when the wait thread
                # next looks; it finds the record gone and ends.
                waited.cancel()
                self._recover(t, token, time.monotonic())
                raise
        except BaseException:
            # A runner that has started ends the call itself (cancelling this caller spares it); one
            # that has not (the exception came first, and its loop may never run it) is ended here.
            if owning is None or inspect.getcoroutinestate(owning) == inspect.CORO_CREATED:
                if owning is not None:
                    made = [task for task in t.tasks if task.get_coro() is owning]
                    for task in made:
                        task.cancel()  # it throws into the coroutine before its first line
                    if not made:
                        owning.close()
                self._recover(t, token, time.monotonic())
            raise
        finally:
            _left(t, token)

    def _runner_done(self, t: Table, token: _Token, runner: asyncio.Task[Result[Any]]) -> None:
        """An asyncio owner's runner ended: end what it left registered, if anything (it may have been
        cancelled or interrupted before its first line)."""
        self._recover(t, token, time.monotonic())

    async def _call_async(
        self, loop: asyncio.AbstractEventLoop, fn: Callable[..., object], args: tuple[object, ...],
        kwargs: dict[str, object],
    ) -> object:  # fmt: skip
        if inspect.iscoroutinefunction(fn):
            return await fn(*args, **kwargs)
        return await loop.run_in_executor(None, functools.partial(fn, *args, **kwargs))

    async def _own_async(
        self, t: Table, index: int, gen: int, fn: Callable[..., object], args: tuple[object, ...],
        kwargs: dict[str, object], token: _Token, deadline: float | None,
    ) -> Result[object]:  # fmt: skip
        """The owner's side of do_async, as a task of its own so that cancelling the caller spares it."""
        marker = object()
        try:
            _use(t, marker)
            try:
                if inspect.iscoroutinefunction(fn):
                    value = await fn(*args, **kwargs)
                else:
                    call = functools.partial(self._adopted, t, index, gen, fn, args, kwargs)
                    value = await asyncio.get_running_loop().run_in_executor(None, call)
            except BaseException as e:
                self._complete(t, index, gen, None, e, deadline, token)
                raise
            return Result(value, self._complete(t, index, gen, value, None, deadline, token))
        except BaseException:
            self._recover(t, token, time.monotonic())
            raise
        finally:
            _left(t, marker)

    def _adopted(
        self, t: Table, index: int, gen: int, fn: Callable[..., object], args: tuple[object, ...],
        kwargs: dict[str, object],
    ) -> object:  # fmt: skip
        """Run fn in this thread as the owner of (index, gen): the slot names this thread from now on."""
        self._rename_owner(t, index, gen, threading.get_ident())
        return fn(*args, **kwargs)

    def _rename_owner(self, t: Table, index: int, gen: int, tid: int) -> None:
        """The call (index, gen) is now run by ``tid`` (a thread or task), for re-entry and cycle checks."""
        t.locked(self._renamed, t, index, gen, tid)

    def _renamed(self, t: Table, index: int, gen: int, tid: int) -> None:
        if t.gen(index) == gen and t.states[index] == RUNNING:
            t.u64s[index * U64S + S_OWNER_TID // 8] = tid

    def _wait_into(
        self, t: Table, future: Future[Result[T]], index: int, gen: int, record: int, key: str | bytes,
        token: _Token, deadline: float | None, mark: object,
    ) -> None:  # fmt: skip
        """In a thread of its own: wait for the call and resolve the future; leave if it is cancelled."""
        try:
            result: Result[T] = self._wait(t, index, gen, record, key, token, deadline, future.cancelled)
        except _Detached:
            self._recover(t, token, deadline)
        except BaseException as e:
            self._recover(t, token, deadline)
            _resolve(future, error=e)
        else:
            _resolve(future, result)
        finally:
            _left(t, mark)

    def _pool(self) -> ThreadPoolExecutor:
        """The handle's thread pool for owners' fns, made on first use (and again after fork)."""
        with _tables_lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(thread_name_prefix=f"mpflight-{self.name}")
                _handles.add(self)
            return self._executor

    def _table_for(self, fn: object) -> Table:
        """The table for a new call: raises for a closed handle or a bad fn; housekeeping when due."""
        t = self._t
        if t is None:
            raise ValueError(f"operation on closed mpflight.Group {self.name!r}")
        if not callable(fn):
            raise TypeError(f"fn must be callable, not {type(fn).__name__}")
        if time.monotonic() - t.checked > HOUSEKEEPING_INTERVAL:
            _reaper.ensure()
            t = self._housekeeping(t)
        return t

    def _enter(
        self, t: Table, key: object, tid: int, token: _Token, deadline: float | None, blocking: bool
    ) -> tuple[int, int, int, int]:
        """Claim the key's call or join it, under the lock. Returns (role, slot, generation, record).

        ``tid`` names the caller (a thread, a task, a future) for re-entry and cycle checks; the claim
        or record is registered under ``token``; ``blocking`` callers also note what their thread
        waits on, for the cycle checks of others. TimeoutError when the lock is not free by ``deadline``.
        """
        kind, raw, ident = _key_identity(key)
        home = zlib.crc32(ident, kind) % t.slots
        pid, start = _owner.identity()
        try:
            entered = t.locked(
                self._enter_locked, t, key, kind, raw, ident, home, pid, start, tid, token, blocking,
                deadline=deadline,
            )  # fmt: skip
        except LockTimeout:
            raise TimeoutError(
                f"gave up waiting {self.timeout} s for the table lock of {self.name!r}"
            ) from None
        if isinstance(entered, MPFlightError):
            raise entered
        if isinstance(entered, str):
            now = time.monotonic()
            if now - t.warned_full >= FULL_WARNING_INTERVAL:  # one warning a while, not one per call
                t.warned_full = now
                log.warning(
                    "mpflight table %r has no free %s: running fn without coalescing", self.name, entered
                )
            return _ALONE, -1, -1, -1
        return entered

    def _enter_locked(
        self, t: Table, key: str | bytes, kind: int, raw: bytes, ident: bytes, home: int, pid: int,
        start: int, tid: int, token: _Token, blocking: bool,
    ) -> tuple[int, int, int, int] | MPFlightError | str:  # fmt: skip
        """Under the lock: _enter's work. A refusal is returned, having written nothing, so that the
        lock is left clean; so is what ran out ("slots" or "waiter records") when nothing was free."""
        index = self._find(t, kind, ident, len(raw), home) if t.homes[home] else -1
        full = "slots"
        if index >= 0:
            try:
                gen, record = self._try_join(t, index, key, pid, start, tid, token, blocking)
            except MPFlightError as e:  # a refusal, or no semaphore: nothing was written
                return e
            if gen >= 0:
                return _JOIN, index, gen, record
            if gen == _OWNER_GONE:  # its call is aborted: start a new one
                index = -1
            elif gen == _NO_RECORD:
                t.bump(C_FALLBACKS)
                return "waiter records"
        state_map = t.geo.state_map  # nobody runs this key: claim the first free slot from its home on
        index = t.mm.find(b"\0", state_map + home, state_map + t.slots)
        if index < 0:
            index = t.mm.find(b"\0", state_map, state_map + home)
        if index >= 0:
            index -= state_map
            return _OWN, index, self._claim(t, index, home, kind, raw, ident, pid, start, tid, token), -1
        t.bump(C_FALLBACKS)
        return full

    def _find(self, t: Table, kind: int, ident: bytes, key_len: int, home: int) -> int:
        """Under the lock: the slot of the joinable call for this key, or -1.

        Scans from the key's home until it has seen as many joinable calls of that home as its
        count says (usually one, usually at the home itself).
        """
        mm, states, u32s, u64s, slots = t.mm, t.states, t.u32s, t.u64s, t.slots
        want = t.homes[home]
        n = DIGEST_SIZE if kind & KEY_DIGEST else len(ident)
        probe = ident[:n]
        slot_base = t.geo.slot_base
        i = home
        for _ in range(slots):
            if states[i] == RUNNING:
                base = i * U32S
                if u32s[base + S_HOME // 4] == home and u32s[base + S_FLAGS // 4] & JOINABLE:
                    off = slot_base + i * SLOT_SIZE
                    if (
                        mm[off + S_KEY_KIND] == kind
                        and u64s[i * U64S + S_KEY_LEN // 8] == key_len
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

    def _claim(
        self,
        t: Table,
        index: int,
        home: int,
        kind: int,
        raw: bytes,
        ident: bytes,
        pid: int,
        start: int,
        tid: int,
        token: _Token,
    ) -> int:
        """Under the lock: make FREE slot ``index`` this caller's RUNNING call. Returns its generation.

        The claim is registered under ``token`` before the state byte makes it a call, and counted as
        a run: every call is counted once, as a run, a join or a fallback, whatever happens next.
        """
        off = t.geo.slot_base + index * SLOT_SIZE
        gen = (t.u64s[index * U64S] + 1) & 0xFFFFFFFFFFFFFFFF
        t.owners[index, gen] = weakref.ref(token)
        counters = t.counters
        counters[C_RUNS] = (counters[C_RUNS] + 1) & 0xFFFFFFFFFFFFFFFF
        SLOT.pack_into(
            t.mm, off, gen, home, JOINABLE, 0, 0, pid, 0, start, tid, time.time(), 0, kind, RESULT_NONE, 0, 0,
            len(raw),
        )  # fmt: skip
        t.mm[off + S_KEY : off + S_KEY + len(ident)] = ident
        t.states[index] = RUNNING
        if _faults.FAULT:
            _faults.reached("claim")
        t.homes[home] = (t.homes[home] + 1) & 0xFFFFFFFF
        return gen

    def _try_join(
        self, t: Table, index: int, key: str | bytes, pid: int, start: int, tid: int, token: _Token,
        blocking: bool,
    ) -> tuple[int, int]:  # fmt: skip
        """Under the lock: register as a waiter of the call in ``index``, under ``token``.

        Returns (the call's generation, our record); the generation is _OWNER_GONE when its owner is
        gone (the call is aborted: claim anew), _NO_RECORD when every waiter record is taken (run fn
        alone). Raises DeadlockError, having written nothing, when the wait would never end, and
        MPFlightError, having written nothing, when the slot's semaphore cannot be made (a full /dev/shm).
        """
        off = t.slot_off(index)
        gen = t.gen(index)
        owner = t.u32(off + S_OWNER_PID)
        if owner == pid:
            # This process's pid: our call only if the start time is ours too (else the pid was reused
            # after its owner died), and only while somebody in this process is responsible for it (else
            # the thread that claimed it left without ending it, or died).
            mine = t.u64s[index * U64S + S_OWNER_START // 8] == start
            if "own-identity" in _faults.DISABLED:
                pass  # a bare pid: ours, and so a DeadlockError below
            elif not mine or not _held(t.owners.get((index, gen))):
                self._abort(t, index, gen, "owner died" if not mine else "the owner left do() early")
                return _OWNER_GONE, -1
        else:
            # A cheap look before joining: a pid that is gone is a dead owner (zombies and reused
            # pids are caught by the waiters' identity checks).
            try:
                if not 0 < owner <= _owner.PID_MAX:
                    raise ProcessLookupError
                os.kill(owner, 0)
            except ProcessLookupError:
                self._abort(t, index, gen, "owner died")
                return _OWNER_GONE, -1
            except PermissionError:
                pass  # another user's process: alive
        if "cycle-check" not in _faults.DISABLED:
            self._check_cycle(t, index, key, pid, tid)
        r = t.mm.find(b"\0", t.geo.record_map, t.geo.record_map + t.records)
        if r < 0:
            return _NO_RECORD, -1
        r -= t.geo.record_map
        t.sems.ensure(index)  # the slot's semaphore, made by its first waiter; raises having written nothing
        RECORD.pack_into(t.mm, t.geo.record(r), pid, index, start, tid, gen, time.time())
        t.readers[r] = weakref.ref(token)
        t.rmap[r] = 1
        _faults.reached("join")
        t.set_u32(off + S_WAITERS, t.u32(off + S_WAITERS) + 1)
        t.set_u32(off + S_JOINS, t.u32(off + S_JOINS) + 1)
        t.bump(C_JOINS)
        if owner == pid and (index, gen) not in t.local:
            t.local[index, gen] = LocalCall()
        if blocking:
            self._set_blocked(t, index + 1, gen)
        return gen, r

    @staticmethod
    def _set_blocked(t: Table, slot_plus_one: int, gen: int) -> None:
        """Under the lock: note in every call this thread owns what it now waits on (for cycle checks).

        Found by scanning the running calls for this thread's identity, so that owners keep no record
        of their own on the uncontended path.
        """
        pid, tid = _owner.identity()[0], threading.get_ident()
        states, u32s, u64s = t.mm, t.u32s, t.u64s
        index = states.find(RUNNING_BYTE, t.geo.state_map, t.geo.state_map + t.slots)
        while index >= 0:
            index -= t.geo.state_map
            base = index * U32S
            if u32s[base + S_OWNER_PID // 4] == pid and u64s[index * U64S + S_OWNER_TID // 8] == tid:
                u32s[base + S_BLOCKED_SLOT // 4] = slot_plus_one
                u64s[index * U64S + S_BLOCKED_GEN // 8] = gen
            index = states.find(RUNNING_BYTE, t.geo.state_map + index + 1, t.geo.state_map + t.slots)

    def _check_cycle(self, t: Table, index: int, key: str | bytes, pid: int, tid: int) -> None:
        """Under the lock: refuse a wait on a call whose owner waits, maybe through others, on ours."""
        keys: list[str | bytes] = [key]
        cur = index
        for _ in range(t.slots):
            off = t.slot_off(cur)
            if (
                t.u32(off + S_OWNER_PID) == pid
                and int.from_bytes(t.mm[off + S_OWNER_TID : off + 48], "little") == tid
            ):
                raise DeadlockError(keys)
            nxt = t.u32(off + S_BLOCKED_SLOT) - 1
            if not 0 <= nxt < t.slots or t.states[nxt] not in (RUNNING, COMPLETING):
                return
            if t.gen(nxt) != int.from_bytes(t.mm[off + S_BLOCKED_GEN : off + S_BLOCKED_GEN + 8], "little"):
                return
            keys.append(self._slot_key(t, nxt)[0])
            cur = nxt

    # -- owner -----------------------------------------------------------------------------------------

    def _run(
        self, t: Table, index: int, gen: int, fn: Callable[..., T], args: tuple[object, ...],
        kwargs: dict[str, object], token: _Token, deadline: float | None,
    ) -> Result[T]:  # fmt: skip
        """Run fn as the owner of (index, gen), and publish its outcome."""
        try:
            value = fn(*args, **kwargs)
        except BaseException as e:
            self._complete(t, index, gen, None, e, deadline, token)
            raise
        return Result(value, self._complete(t, index, gen, value, None, deadline, token))

    def _complete(
        self, t: Table, index: int, gen: int, value: object, error: BaseException | None,
        deadline: float | None, token: _Token | None = None,
    ) -> bool:  # fmt: skip
        """Publish the outcome of the call in ``index`` to its waiters; returns ``shared``.

        fn has returned: its caller gets its outcome whatever happens here. When the lock is not free
        by the deadline, the rest is handed to the reaper (which keeps ``token``, and so the call, alive).
        """
        try:
            remote = t.locked(self._completing, t, index, gen, value, error, deadline=deadline)
        except LockTimeout:
            finish = functools.partial(self._complete, t, index, gen, value, error, None, token)
            _reaper.defer(t, finish)
            return bool(t.u32s[index * U32S + S_JOINS // 4])
        if remote is None:
            return False
        _faults.reached("completing")
        where, length = RESULT_LOCAL, 0
        try:
            if remote > 0:
                where, length = self._write_outcome(t, index, gen, value, error)
        except BaseException as e:
            # Whatever stopped the writing (an OSError from /dev/shm, a KeyboardInterrupt during a long
            # encode), the waiters must not wait for an outcome that never comes: they get an abort.
            where, length = self._write_inline(
                t, index, _codec.pack_abort(f"the owner could not publish: {ascii(e)[:200]}")
            )
            if not isinstance(e, Exception):
                self._publish(t, index, gen, where, length, deadline, token)
                raise
        self._publish(t, index, gen, where, length, deadline, token)
        return True

    def _completing(
        self, t: Table, index: int, gen: int, value: object, error: BaseException | None
    ) -> int | None:
        """Under the lock: end the call's run. None when nobody joined (the slot is free again) or the
        call is no longer ours; else it is COMPLETING, and this is how many waiters are in other
        processes (threads of ours take the owner's very objects)."""
        if t.u64s[index * U64S] != gen or t.states[index] in (FREE, DONE):
            # Our call was aborted under us (we were taken for dead): nobody waits for us.
            t.owners.pop((index, gen), None)
            return None
        if error is not None:
            t.bump(C_ERRORS if isinstance(error, Exception) else C_ABORTS)
        if t.u32s[index * U32S + S_JOINS // 4] == 0:  # nobody joined: free the slot, publish nothing
            t.free(index, gen)
            return None
        t.unjoin(index)
        t.states[index] = COMPLETING
        local = t.local.get((index, gen))
        if local is not None:
            local.value, local.error, local.filled = value, error, True
        return t.waiters_of(index) - self._local_waiters(t, index, gen)

    def _local_waiters(self, t: Table, index: int, gen: int) -> int:
        """Under the lock: the registered waiters of (index, gen) that are threads of this process,
        counted from the records themselves, which are the truth whatever interrupted whom."""
        pid, start = _owner.identity()
        base, end, mm, n = t.geo.record_map, t.geo.record_map + t.records, t.mm, 0
        r = mm.find(b"\1", base, end)
        while r >= 0:
            rpid, slot, rstart, _, rgen, _ = RECORD.unpack_from(mm, t.geo.record(r - base))
            n += (rpid, rstart, slot, rgen) == (pid, start, index, gen)
            r = mm.find(b"\1", r + 1, end)
        return n

    def _publish(
        self, t: Table, index: int, gen: int, where: int, length: int, deadline: float | None,
        token: _Token | None,
    ) -> None:  # fmt: skip
        """Mark the outcome of (index, gen) DONE and wake its waiters (in the background when the lock
        is not free by the deadline: the owner's caller has its outcome already)."""
        try:
            waiters = t.locked(self._published, t, index, gen, where, length, deadline=deadline)
        except LockTimeout:
            _reaper.defer(t, functools.partial(self._publish, t, index, gen, where, length, None, token))
            return
        if waiters:
            self._post(t, index, waiters)
        t.owners.pop((index, gen), None)  # woken: an exception before leaves it to _recover, to wake

    def _published(self, t: Table, index: int, gen: int, where: int, length: int) -> int:
        """Under the lock: the outcome is in place; DONE. Returns how many waiters to wake.

        The claim stays registered until its waiters are woken (_publish): an exception before DONE
        leaves it to _recover, which aborts it; one after, which wakes them."""
        off = t.geo.slot_base + index * SLOT_SIZE
        if t.u64s[index * U64S] != gen or t.states[index] != COMPLETING:
            # Freed by a repair or taken for dead and aborted meanwhile: the slot is not ours.
            t.owners.pop((index, gen), None)
            if where == RESULT_SEGMENT:
                unlink_segment(t.segment(index))
            return 0
        t.mm[off + S_RESULT_WHERE] = where
        t.set_u32(off + S_RESULT_LEN, length)
        t.states[index] = DONE
        _faults.reached("publish")
        waiters = t.waiters_of(index)
        if waiters == 0:
            segment = t.free(index, gen)
            if segment is not None:
                unlink_segment(segment)
        return waiters

    def _write_inline(self, t: Table, index: int, payload: bytes) -> tuple[int, int]:
        """Outside the lock, in COMPLETING (the result area is the owner's): a small payload, inline."""
        off = t.geo.slot_base + index * SLOT_SIZE + S_RESULT
        t.mm[off : off + len(payload)] = payload
        return RESULT_INLINE, len(payload)

    def _post(self, t: Table, index: int, times: int) -> None:
        if _faults.FAULT == "woken" and times > 1:
            t.sems.post(index, 1)
            _faults.reached("woken")
        t.sems.post(index, times)

    def _write_outcome(
        self, t: Table, index: int, gen: int, value: object, error: BaseException | None
    ) -> tuple[int, int]:
        """Outside the lock, in COMPLETING: encode the outcome into the slot or a segment."""
        if error is None:
            try:
                payload = _codec.pack_value(value, self.codec)
            except SerializationError as e:
                payload = _codec.pack_not_carried(str(e))
        elif isinstance(error, Exception):
            payload = _codec.pack_error(error, self.codec)
        else:
            payload = _codec.pack_abort(f"owner left fn with {type(error).__name__}")
        if len(payload) > self.max_result_bytes:
            payload = _codec.pack_not_carried(
                f"result of {len(payload)} bytes exceeds max_result_bytes ({self.max_result_bytes})"
            )
        if len(payload) <= RESULT_CAP:
            if _faults.FAULT == "result":
                self._write_inline(t, index, payload[: len(payload) // 2])
                _faults.reached("result")
            return self._write_inline(t, index, payload)
        try:
            if _faults.FAULT == "result":
                t.write_segment(index, payload[: len(payload) // 2])
                _faults.reached("result")
                unlink_segment(t.segment(index))
            t.write_segment(index, payload)  # a random name, in the slot before DONE; the table's mode
        except SegmentFull as e:
            log.warning("mpflight table %r: %s", self.name, e)
            return self._write_inline(t, index, _codec.pack_not_carried(str(e)))
        return RESULT_SEGMENT, len(payload)

    # -- waiter ----------------------------------------------------------------------------------------

    def _wait(
        self, t: Table, index: int, gen: int, record: int, key: str | bytes, token: _Token,
        deadline: float | None, detached: Callable[[], bool] | None = None,
    ) -> Result[T]:  # fmt: skip
        """Wait for call (index, gen), registered as ``record`` under ``token``, and take its outcome.

        ``detached`` is asked after every slice of waiting: True makes this caller leave (_Detached).
        Whatever this raises, the caller's _recover drops the record.
        """
        began = time.monotonic()
        off = t.slot_off(index)
        owner = (t.u32(off + S_OWNER_PID), int.from_bytes(t.mm[off + S_OWNER_START : off + 40], "little"))
        interval = self.check_interval
        check_at = began + interval
        while True:
            wait = interval if deadline is None else min(interval, deadline - time.monotonic())
            t.sems.wait(index, wait)
            if detached is not None and detached():
                raise _Detached
            state = t.states[index]
            if state == DONE and t.gen(index) == gen:
                break
            if t.gen(index) != gen or state == FREE:
                raise AbortError(key, owner[0], "the call was lost (the table was repaired)")
            if state > DONE:
                raise MPFlightError(f"mpflight table {self.name!r} is damaged: slot {index} state {state}")
            now = time.monotonic()
            if now >= check_at:
                check_at = now + interval
                if "owner-check" not in _faults.DISABLED and not _owner.is_alive(*owner):
                    with contextlib.suppress(LockTimeout):
                        t.locked(self._abort, t, index, gen, "owner died", deadline=deadline)
                    continue
                if "table-identity" not in _faults.DISABLED and t.file.replaced():
                    t.checked = -HOUSEKEEPING_INTERVAL  # the next call moves to the new table
            if deadline is not None and now >= deadline:
                try:
                    done = t.locked(self._give_up, t, index, gen, record, began, deadline=now)
                except LockTimeout:  # the reaper leaves for us: never wait past the deadline
                    _reaper.defer(t, functools.partial(t.locked, self._give_up, t, index, gen, record, began))
                    done = False
                if done:
                    break
                raise TimeoutError(f"gave up waiting {self.timeout} s for the call of key {short_key(key)}")
        return self._read(t, index, gen, record, key, owner, began, token, deadline)

    def _give_up(self, t: Table, index: int, gen: int, record: int, began: float) -> bool:
        """Under the lock: a waiter's time ran out; True if the outcome came meanwhile (read it)."""
        if t.states[index] == DONE and t.gen(index) == gen:
            return True
        if t.rmap[record] == 1:
            self._leave(t, index, gen, record, began)
            t.bump(C_TIMEOUTS)
        return False

    def _read(
        self, t: Table, index: int, gen: int, record: int, key: str | bytes, owner: tuple[int, int],
        began: float, token: _Token, deadline: float | None,
    ) -> Result[T]:  # fmt: skip
        """Take the published outcome of call (index, gen), then leave it; the last reader frees the slot."""
        off = t.slot_off(index)
        where = t.mm[off + S_RESULT_WHERE]
        length = t.u32(off + S_RESULT_LEN)
        local = t.local.get((index, gen)) if owner == _owner.identity() else None
        served = True  # a value or fn's exception reached us; not an abort or a failure to read
        try:
            # The owner's very object, once the owner has filled it in; an outcome it never filled
            # in (an abort) is read from the slot like any other.
            if local is not None and local.filled:
                if local.error is None:
                    return Result(local.value, True)  # type: ignore[arg-type]
                if isinstance(local.error, Exception):
                    raise local.error
                raise AbortError(key, owner[0], f"owner left fn with {type(local.error).__name__}")
            if where == RESULT_INLINE and length <= RESULT_CAP:
                payload = bytes(t.mm[off + S_RESULT : off + S_RESULT + length])
                return Result(_codec.unpack(payload, self.codec, key=key, owner_pid=owner[0]), True)  # type: ignore[arg-type]
            if where == RESULT_SEGMENT and 0 < length <= MAX_RESULT_BYTES:
                with t.map_segment(index, length) as seg, memoryview(seg) as view:
                    value = _codec.unpack(view, self.codec, key=key, owner_pid=owner[0])
                return Result(value, True)  # type: ignore[arg-type]
            raise MPFlightError(f"corrupt slot {index} in table {self.name!r}: outcome location {where}")
        except MPFlightError as e:
            served = isinstance(e, RemoteError)
            raise
        finally:
            try:
                t.locked(self._leave, t, index, gen, record, began, served, deadline=deadline)
            except LockTimeout:  # the outcome is ours already: leave in the background
                _reaper.defer(
                    t, functools.partial(t.locked, self._leave, t, index, gen, record, began, served)
                )

    @staticmethod
    def _leave(
        t: Table, index: int, gen: int, record: int, began: float | None, served: bool = False
    ) -> None:
        """Under the lock: drop a waiter's record; the last reader of a DONE call frees its slot.

        ``began`` is when this thread began to wait; None when reclaiming a record that nobody left.
        """
        if t.rmap[record] != 1:
            t.readers.pop(record, None)
            return  # left already (reclaimed, or by a repair)
        t.rmap[record] = 0
        t.readers.pop(record, None)  # after the record is gone: an exception before leaves it registered
        if _faults.FAULT:
            _faults.reached("leave")
        if began is not None:
            Group._set_blocked(t, 0, 0)
            t.bump(C_WAIT_NS, int((time.monotonic() - began) * 1e9))
        if served:
            t.bump(C_SHARED)
        if index >= t.slots:
            return
        if t.gen(index) != gen or t.states[index] == FREE:
            return
        off = t.slot_off(index)
        waiters = t.u32(off + S_WAITERS) - 1
        t.set_u32(off + S_WAITERS, max(waiters, 0))
        if waiters <= 0 and t.states[index] == DONE:
            segment = t.free(index, gen)
            if segment is not None:
                unlink_segment(segment)

    @staticmethod
    def _abort(t: Table, index: int, gen: int, reason: str) -> None:
        """Under the lock: end call (index, gen), whose owner is gone, with an abort for its waiters."""
        state = t.states[index]
        if t.gen(index) != gen or state not in (RUNNING, COMPLETING):
            return
        off = t.slot_off(index)
        pid = t.u32(off + S_OWNER_PID)
        log.warning("mpflight table %r: call of key %s (owner %d) aborted: %s", t.group,
                    short_key(_slot_key(t.mm[off : off + SLOT_SIZE])[0]), pid, reason)  # fmt: skip
        t.unjoin(index)
        _faults.reached("abort")
        payload = _codec.pack_abort(reason)
        t.mm[off + S_RESULT : off + S_RESULT + len(payload)] = payload
        t.mm[off + S_RESULT_WHERE] = RESULT_INLINE
        t.set_u32(off + S_RESULT_LEN, len(payload))
        t.states[index] = DONE
        t.owners.pop((index, gen), None)  # after DONE: an exception before leaves it registered
        t.bump(C_ABORTS)
        if state == COMPLETING:  # an owner may die while writing one; it named it in the slot first
            unlink_segment(t.segment(index))
        waiters = t.waiters_of(index)
        if waiters == 0:
            t.free(index, gen)
        else:
            t.sems.post(index, waiters)

    def coalesce(
        self, *, key: Callable[..., str | bytes] | None = None
    ) -> Callable[[Callable[P, R]], Callable[P, R]]:
        """A decorator: concurrent calls of the function with equal arguments share one execution.

        The key is the function's module and qualified name with its arguments bound to its
        signature (defaults applied, so ``f(1)`` and ``f(a=1)`` are one key), encoded canonically
        through the codec (dict and set order do not matter). An argument that cannot be keyed is a
        TypeError; ``key=`` (called with the same arguments) overrides. Async functions go through
        ``do_async``, others through ``do``.
        """
        return _decorator(lambda: self, key)

    # -- the rest of the API -------------------------------------------------------------------------

    def forget(self, key: str | bytes) -> None:
        """Let the next ``do`` for ``key`` start a new call; callers already waiting keep the current one."""
        t = self._table()
        kind, raw, ident = _key_identity(key)
        t.locked(self._forget, t, kind, raw, ident, zlib.crc32(ident, kind) % t.slots)

    def _forget(self, t: Table, kind: int, raw: bytes, ident: bytes, home: int) -> None:
        if t.homes[home]:
            index = self._find(t, kind, ident, len(raw), home)
            if index >= 0:
                t.unjoin(index)

    def stats(self) -> dict[str, int]:
        """Counters of this table, kept in shared memory and so summed over every process.

        Every call is counted once, when it starts: as a run (it claimed a slot: fn runs, or ran, in
        it), a join (it waits for another's run) or a fallback (no slot or record was free: fn ran
        without coalescing); so calls = runs + joins + fallbacks. Of the runs, errors ended with fn
        raising an Exception and aborts ended without an outcome (the owner died, fn left by
        KeyboardInterrupt or SystemExit, or an exception interrupted the call). Of the joins, shared
        counts the waiters that received an outcome and timeouts those that gave up; wait_ns is the
        total time waiters spent waiting.
        """
        t = self._table()
        c = dict(zip(COUNTER_NAMES, t.peek(t.counters.tolist), strict=True))
        c["calls"] = c["runs"] + c["joins"] + c["fallbacks"]
        return c

    def _slot_key(self, t: Table, index: int) -> tuple[str | bytes, bool]:
        off = t.slot_off(index)
        return _slot_key(t.mm[off : off + SLOT_SIZE])

    def inflight(self) -> list[InflightCall]:
        """The calls in flight now, oldest first: a snapshot, copied under the lock, read outside it.

        What no live process takes part in any more is reclaimed first (as the reaper would), so only
        calls with a live owner or waiter are listed.
        """
        t = self._table()
        Group._reclaim(t, idle_only=True)
        copies, records = t.peek(self._snapshot, t)
        by_call: dict[tuple[int, int], list[int]] = {}
        for pid, slot, _, _, gen, _ in records:
            by_call.setdefault((slot, gen), []).append(pid)
        calls = []
        names = {RUNNING: "running", COMPLETING: "completing", DONE: "done"}
        for index, state, slot in copies:
            gen, _, _, waiters, _, pid, _, start, _, started, _, _, where, _, length, _ = SLOT.unpack_from(
                slot
            )
            key, complete = _slot_key(slot)
            calls.append(
                InflightCall(
                    key=key,
                    owner_pid=pid,
                    started=started,
                    waiters=waiters,
                    state=names[state],
                    owner_alive=(pid, start) == _owner.identity() or _owner.is_alive(pid, start),
                    result_bytes=length
                    if where in (RESULT_INLINE, RESULT_SEGMENT) and state == DONE
                    else None,
                    key_complete=complete,
                    waiter_pids=tuple(sorted(by_call.get((index, gen), ()))),
                )
            )
        calls.sort(key=lambda c: c.started)
        return calls

    @staticmethod
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

    def gc(self) -> dict[str, int]:
        """Reclaim what dead processes left: their calls, their waiter records, orphaned segments; and
        what callers of this process left when an exception took them out of a call early.

        Each process's reaper thread does this for calls that no live process takes part in, within
        about two of its intervals; gc does it now, and also aborts a dead owner's call that live
        waiters still wait on (they would notice within their check interval).
        """
        return Group._reclaim(self._table())

    @staticmethod
    def _reclaim(t: Table, *, idle_only: bool = False) -> dict[str, int]:
        """gc's work, for any table of this process. ``idle_only`` leaves alone a dead owner's call
        that a live waiter still waits on: that waiter reports the abort itself."""
        owners, waiters = t.locked(Group._survey, t)
        me = _owner.identity()
        alive: dict[tuple[int, int], bool] = {me: True}

        def live(pid: int, start: int) -> bool:
            if (pid, start) not in alive:
                alive[pid, start] = _owner.is_alive(pid, start)
            return alive[pid, start]

        dead_calls = [(i, gen) for i, gen, pid, start in owners if not live(pid, start)]
        dead_waiters = [(r, rec) for r, rec in waiters if not live(rec[0], rec[2])]
        if idle_only:
            watched = {(rec[1], rec[4]) for _, rec in waiters if live(rec[0], rec[2])}
            dead_calls = [call for call in dead_calls if call not in watched]
        if "dead-waiters" in _faults.DISABLED:
            dead_waiters = []
        reclaimed = t.locked(Group._reclaimed, t, dead_calls, dead_waiters)
        if any(reclaimed.values()):
            log.warning("mpflight table %r: reclaimed %s", t.group, reclaimed)
        return reclaimed

    @staticmethod
    def _survey(t: Table) -> tuple[list[tuple[int, int, int, int]], list[tuple[int, tuple[Any, ...]]]]:
        """Under the lock: (slot, generation, owner pid, owner start) of every call that has not
        published yet, and (record, fields) of every waiter record."""
        t.reconcile()  # counts that disagree with the records (damage) are set right first
        owners = [
            (i, t.gen(i), t.u32s[i * U32S + S_OWNER_PID // 4], t.u64s[i * U64S + S_OWNER_START // 8])
            for i in range(t.slots)
            if t.states[i] in (RUNNING, COMPLETING)
        ]
        waiters = [(r, RECORD.unpack_from(t.mm, t.geo.record(r))) for r in range(t.records) if t.rmap[r] == 1]
        return owners, waiters

    @staticmethod
    def _reclaimed(
        t: Table, dead_calls: list[tuple[int, int]], dead_waiters: list[tuple[int, tuple[Any, ...]]]
    ) -> dict[str, int]:
        """Under the lock: end what _reclaim found dead, if it is still there, and what this process's
        callers left behind; then unlink the orphaned segments."""
        reclaimed = {"calls": 0, "waiters": 0, "segments": 0}
        for i, gen in dead_calls:
            if t.gen(i) == gen and t.states[i] in (RUNNING, COMPLETING):
                Group._abort(t, i, gen, "owner died")
                reclaimed["calls"] += 1
        for r, rec in dead_waiters:
            if t.rmap[r] == 1 and RECORD.unpack_from(t.mm, t.geo.record(r)) == rec:
                Group._leave(t, rec[1], rec[4], r, None)
                reclaimed["waiters"] += 1
        if "recover" not in _faults.DISABLED:
            for calls, records in (Group._end_orphans(t, None), Group._end_unregistered(t)):
                reclaimed["calls"] += calls
                reclaimed["waiters"] += records
        # Under the lock: an owner must take it to become COMPLETING before it makes a segment, and
        # names the segment in its slot before making it. So, listing first and reading the names
        # after, a listed segment that no COMPLETING or DONE slot names now is an orphan.
        entries = shm_entries()
        expected = {t.segment(i).lstrip("/") for i in range(t.slots) if t.states[i] in (COMPLETING, DONE)}
        reclaimed["segments"] = Group._unlink_orphan_segments(t, entries, expected)
        return reclaimed

    @staticmethod
    def _unlink_orphan_segments(t: Table, entries: list[str], expected: set[str]) -> int:
        """Unlink this table's segments (by its nonce) that no call names; another table's are left."""
        stem = t.segment(0).lstrip("/").rsplit(".", 2)[0] + "."
        n = 0
        for entry in entries:
            if entry.startswith(stem) and entry not in expected:
                n += unlink_segment("/" + entry)
        return n

    def _housekeeping(self, t: Table) -> Table:
        """At most once per HOUSEKEEPING_INTERVAL: follow the name to a new table (stuck calls are
        the reaper's)."""
        t.checked = time.monotonic()
        if "table-identity" not in _faults.DISABLED and t.file.replaced():
            log.warning("mpflight table %r was removed or replaced under this process; moving to the new one",
                        self.name)  # fmt: skip
            with _tables_lock:
                if _tables.get(self.name) is t:
                    del _tables[self.name]  # the name leads elsewhere now
            new = _attach(self.name, None, self._mode, self._create, self.timeout)
            with _tables_lock:
                if self._t is t:
                    self._t, t.refs, self.mode = new, t.refs - 1, new.mode
                else:  # another thread of this handle moved it first
                    new.refs -= 1
            _close_unused(t)
            return self._t if self._t is not None else new
        return t


def _positive(what: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{what} must be a number of seconds, not {type(value).__name__}")
    if not value > 0:
        raise ValueError(f"{what} must be positive, not {value!r}")
    return float(value)
