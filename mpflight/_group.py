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
import functools
import hashlib
import inspect
import logging
import os
import re
import threading
import time
import weakref
import zlib
from collections.abc import Awaitable, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from fcntl import LOCK_EX, LOCK_UN, flock
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
    SegmentFull,
    check_mode,
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
# How often a process checks, on its way into do(), that its table is still the one under its name,
# and looks for calls stuck since the last look (their owners or readers may have died).
HOUSEKEEPING_INTERVAL: Final = 1.0
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
_REFUSED: Final = -3  # (set by _enter) the wait would deadlock

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


def _attach(name: str, slots: int | None, mode: int | None, create: bool) -> Table:
    with _tables_lock:
        t = _tables.get(name)
        if t is None or t.closed:
            t = Table(name, slots=slots, mode=mode, create=create)
            _tables[name] = t
        elif slots is not None and slots != t.slots:
            raise MPFlightError(f"mpflight table {name!r} exists with {t.slots} slots, not {slots}")
        elif mode is not None and mode != t.file.mode:
            raise MPFlightError(
                f"mpflight table {name!r} ({t.file.path}) has mode {t.file.mode:#o}, not {mode:#o}: "
                "omit mode= to adopt the table's, or unlink it to make it anew with another"
            )
        t.refs += 1
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
    process shares one mapping (and one set of the owner's objects for its local waiters).
    """
    with _tables_lock:
        if t.refs == 0 and not t.active and not t.closed:
            if _tables.get(t.group) is t:
                del _tables[t.group]
            t.close()


def _after_fork_in_child() -> None:
    global _tables_lock
    _tables_lock = threading.Lock()
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
        self._t: Table | None = _attach(self.name, slots, mode, create)
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
        if t.refs == 0 and not t.active:
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
        claimed = None
        if _FAST and t is not None and callable(fn) and time.monotonic() - t.checked <= HOUSEKEEPING_INTERVAL:
            kind = KEY_STR if type(key) is str else KEY_BYTES if type(key) is bytes else -1
            if kind >= 0:
                raw = key.encode("utf-8", "surrogatepass") if kind == KEY_STR else key  # type: ignore[union-attr]
                if len(raw) <= KEY_CAP:
                    claimed = self._claim_if_free(t, kind, raw)  # type: ignore[arg-type]
        if claimed is not None:
            assert t is not None
            index, gen = claimed
            role, record = _OWN, -1
        else:
            t = self._table_for(fn)
            role, index, gen, record = self._enter(t, key, threading.get_ident(), blocking=True)
            if role == _ALONE:
                return fn(*args, **kwargs), False
        # While this thread is inside the table, closing the handle must not unmap it.
        t.active.append(None)
        try:
            if role == _JOIN:
                return self._wait(t, index, gen, record, key)
            try:
                value = fn(*args, **kwargs)
            except BaseException as e:
                self._complete(t, index, gen, None, e)
                raise
            # Nobody joined (a hint, read without the lock; _free_if_alone reads it again under it):
            # free the slot in one short hold. Somebody joined: publish.
            if (
                claimed is not None
                and not t.u32s[index * U32S + S_JOINS // 4]
                and self._free_if_alone(t, index, gen)
            ):
                return value, False
            return value, self._complete(t, index, gen, value, None)
        finally:
            t.active.pop()
            if t.refs == 0 and not t.active:
                _close_unused(t)

    def _free_if_alone(self, t: Table, index: int, gen: int) -> bool:
        """The uncontended end of ``do``: when nobody joined the call, free its slot in one short hold
        of the lock. False leaves everything to _complete (someone joined, or the table needs repair)."""
        tl = t.thread_lock
        tl.acquire()
        try:
            flock(t.fd, LOCK_EX)
        except BaseException:
            tl.release()
            raise
        mm, u32s, base = t.mm, t.u32s, index * U32S
        try:
            if (
                mm[H_DIRTY]
                or t.u64s[index * U64S] != gen
                or t.states[index] != RUNNING
                or u32s[base + S_JOINS // 4]
            ):
                return False
            mm[H_DIRTY] = 1
            counters = t.counters
            counters[C_RUNS] = (counters[C_RUNS] + 1) & 0xFFFFFFFFFFFFFFFF
            if u32s[base + S_FLAGS // 4] & JOINABLE:
                home = u32s[base + S_HOME // 4]
                if home < t.slots and t.homes[home]:
                    t.homes[home] -= 1
                else:
                    t.unhome(home)  # damage: marks the table for repair
            t.states[index] = FREE
            if not t.damaged:
                mm[H_DIRTY] = 0
            t.damaged = False
            return True
        finally:
            flock(t.fd, LOCK_UN)
            tl.release()

    def _claim_if_free(self, t: Table, kind: int, raw: bytes) -> tuple[int, int] | None:
        """The uncontended path of ``do``, in one short hold of the lock: when no call of the key is
        joinable and the table needs no repair, claim a free slot. None sends the caller down the
        general path (_enter), which handles everything else.
        """
        home = zlib.crc32(raw, kind) % t.slots
        tl = t.thread_lock
        tl.acquire()
        try:
            flock(t.fd, LOCK_EX)
        except BaseException:
            tl.release()
            raise
        mm = t.mm
        try:
            index = -1
            # A joinable call of this very key means joining it, and a dirty table repair: both are
            # the general path's. A joinable call of another key with the same home is not.
            if not mm[H_DIRTY] and (not t.homes[home] or self._find(t, kind, raw, len(raw), home) < 0):
                state_map = t.geo.state_map
                index = mm.find(b"\0", state_map + home, state_map + t.slots)
                if index < 0:
                    index = mm.find(b"\0", state_map, state_map + home)
            if index < 0:
                flock(t.fd, LOCK_UN)
                return None
            index -= state_map
            mm[H_DIRTY] = 1
            pid, start = _owner._identity or _owner.identity()
            gen = self._claim(t, index, home, kind, raw, raw, pid, start, threading.get_ident())
            mm[H_DIRTY] = 0
            flock(t.fd, LOCK_UN)
            return index, gen
        except BaseException:
            flock(t.fd, LOCK_UN)  # the dirty byte, if set, stays set: the next holder repairs
            raise
        finally:
            tl.release()

    def do_future(
        self, key: str | bytes, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs
    ) -> Future[Result[T]]:
        """As ``do_ex``, without blocking: a Future that resolves to the Result (Go's DoChan).

        When this caller owns the call, fn runs in the handle's thread pool; a wait runs in a thread
        of its own, never in that pool. Cancelling the future detaches this caller only: the call
        goes on for everyone else. Every outcome resolves the future, aborts and timeouts included.
        """
        t = self._table_for(fn)
        _key_identity(key)  # a bad key raises here, at once
        future: Future[Result[T]] = Future()
        t.active.append(None)
        try:
            self._pool().submit(self._begin_future, t, future, key, fn, args, kwargs)
        except BaseException:
            self._left(t)
            raise
        return future

    def _begin_future(
        self, t: Table, future: Future[Result[T]], key: str | bytes, fn: Callable[..., T],
        args: tuple[object, ...], kwargs: dict[str, object],
    ) -> None:  # fmt: skip
        """In a pool thread: claim or join the call only now (a call queued behind busy pool threads
        holds no slot that others would wait on), then run fn here, or hand the wait to a thread of
        its own and free this pool thread."""
        if future.cancelled():
            self._left(t)
            return
        try:
            role, index, gen, record = self._enter(t, key, threading.get_ident(), blocking=False)
            if role == _JOIN:
                threading.Thread(
                    target=self._wait_into, args=(t, future, index, gen, record, key), daemon=True,
                    name=f"mpflight-wait-{self.name}",
                ).start()  # fmt: skip
                return
        except BaseException as e:
            _resolve(future, error=e)
            self._left(t)
            return
        self._run_into(t, future, role, index, gen, fn, args, kwargs)

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
        thread. Cancelling the awaiting task detaches this caller only, also when it owns the call:
        the call goes on and every other caller still gets its outcome.
        """
        t = self._table_for(fn)
        task = asyncio.current_task()
        token = id(task) if task is not None else threading.get_ident()
        role, index, gen, record = self._enter(t, key, token, blocking=False)
        if role == _JOIN:
            waited: Future[Result[Any]] = Future()
            t.active.append(None)
            threading.Thread(
                target=self._wait_into, args=(t, waited, index, gen, record, key), daemon=True,
                name=f"mpflight-wait-{self.name}",
            ).start()  # fmt: skip
            return (await asyncio.wrap_future(waited)).value
        loop = asyncio.get_running_loop()
        if role == _ALONE:
            return await self._call_async(loop, fn, args, kwargs)
        t.active.append(None)
        runner = loop.create_task(self._own_async(loop, t, index, gen, fn, args, kwargs))
        t.tasks.add(runner)
        runner.add_done_callback(t.tasks.discard)
        runner.add_done_callback(_retrieve)
        self._rename_owner(t, index, gen, id(runner))  # fn runs in the runner: re-entry is seen there
        return (await asyncio.shield(runner)).value

    async def _call_async(
        self, loop: asyncio.AbstractEventLoop, fn: Callable[..., object], args: tuple[object, ...],
        kwargs: dict[str, object],
    ) -> object:  # fmt: skip
        if inspect.iscoroutinefunction(fn):
            return await fn(*args, **kwargs)
        return await loop.run_in_executor(None, functools.partial(fn, *args, **kwargs))

    async def _own_async(
        self, loop: asyncio.AbstractEventLoop, t: Table, index: int, gen: int, fn: Callable[..., object],
        args: tuple[object, ...], kwargs: dict[str, object],
    ) -> Result[object]:  # fmt: skip
        """The owner's side of do_async, as a task of its own so that cancelling the caller spares it."""
        try:
            try:
                if inspect.iscoroutinefunction(fn):
                    value = await fn(*args, **kwargs)
                else:
                    call = functools.partial(self._adopted, t, index, gen, fn, args, kwargs)
                    value = await loop.run_in_executor(None, call)
            except BaseException as e:
                self._complete(t, index, gen, None, e)
                raise
            return Result(value, self._complete(t, index, gen, value, None))
        finally:
            self._left(t)

    def _adopted(
        self, t: Table, index: int, gen: int, fn: Callable[..., object], args: tuple[object, ...],
        kwargs: dict[str, object],
    ) -> object:  # fmt: skip
        """Run fn in this thread as the owner of (index, gen): the slot names this thread from now on."""
        self._rename_owner(t, index, gen, threading.get_ident())
        return fn(*args, **kwargs)

    def _rename_owner(self, t: Table, index: int, gen: int, tid: int) -> None:
        """The call (index, gen) is now run by ``tid`` (a thread or task), for re-entry and cycle checks."""
        with t:
            if t.gen(index) == gen and t.states[index] == RUNNING:
                t.u64s[index * U64S + S_OWNER_TID // 8] = tid

    def _run_into(
        self, t: Table, future: Future[Result[T]], role: int, index: int, gen: int, fn: Callable[..., T],
        args: tuple[object, ...], kwargs: dict[str, object],
    ) -> None:  # fmt: skip
        """In the pool: run fn (as the call's owner, or alone) and resolve the future."""
        try:
            if role == _ALONE:
                result = Result(fn(*args, **kwargs), False)
            else:
                result = self._run(t, index, gen, fn, args, kwargs)
        except BaseException as e:
            _resolve(future, error=e)
        else:
            _resolve(future, result)
        finally:
            self._left(t)

    def _wait_into(
        self, t: Table, future: Future[Result[T]], index: int, gen: int, record: int, key: str | bytes
    ) -> None:
        """In a thread of its own: wait for the call and resolve the future; leave if it is cancelled."""
        try:
            result: Result[T] = self._wait(t, index, gen, record, key, detached=future.cancelled)
        except _Detached:
            pass
        except BaseException as e:
            _resolve(future, error=e)
        else:
            _resolve(future, result)
        finally:
            self._left(t)

    def _left(self, t: Table) -> None:
        t.active.pop()
        if t.refs == 0 and not t.active:
            _close_unused(t)

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
            t = self._housekeeping(t)
        return t

    def _enter(self, t: Table, key: object, tid: int, *, blocking: bool) -> tuple[int, int, int, int]:
        """Under the lock: claim the key's call or join it. Returns (role, slot, generation, record).

        ``tid`` names the caller (a thread, a task, a future) for re-entry and cycle checks;
        ``blocking`` callers also note what their thread waits on, for the cycle checks of others.
        """
        kind, raw, ident = _key_identity(key)
        home = zlib.crc32(ident, kind) % t.slots
        pid, start = _owner.identity()
        refused: MPFlightError | None = None
        with t:
            index = self._find(t, kind, ident, len(raw), home) if t.homes[home] else -1
            if index >= 0:
                try:
                    gen, record = self._try_join(t, index, key, pid, start, tid, blocking)  # type: ignore[arg-type]
                except MPFlightError as e:  # nothing was written: leave the lock clean, then raise
                    refused, gen, record = e, _REFUSED, -1
                if gen >= 0:
                    return _JOIN, index, gen, record
                if gen == _OWNER_GONE:  # its call is aborted: start a new one
                    index = -1
                elif gen == _NO_RECORD:
                    t.bump(C_FALLBACKS)
                    full = "waiter records"
            if index == -1:  # nobody runs this key: claim the first free slot from its home on
                state_map = t.geo.state_map
                index = t.mm.find(b"\0", state_map + home, state_map + t.slots)
                if index < 0:
                    index = t.mm.find(b"\0", state_map, state_map + home)
                if index >= 0:
                    index -= state_map
                    return _OWN, index, self._claim(t, index, home, kind, raw, ident, pid, start, tid), -1
                t.bump(C_FALLBACKS)
                full = "slots"
        if refused is not None:
            raise refused
        now = time.monotonic()
        if now - t.warned_full >= FULL_WARNING_INTERVAL:  # one warning a while, not one per call
            t.warned_full = now
            log.warning("mpflight table %r has no free %s: running fn without coalescing", self.name, full)
        return _ALONE, -1, -1, -1

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
    ) -> int:
        """Under the lock: make FREE slot ``index`` this caller's RUNNING call. Returns its generation."""
        off = t.geo.slot_base + index * SLOT_SIZE
        gen = (t.u64s[index * U64S] + 1) & 0xFFFFFFFFFFFFFFFF
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
        self, t: Table, index: int, key: str | bytes, pid: int, start: int, tid: int, blocking: bool
    ) -> tuple[int, int]:
        """Under the lock: register as a waiter of the call in ``index``.

        Returns (the call's generation, our record); the generation is _OWNER_GONE when its owner is
        gone (the call is aborted: claim anew), _NO_RECORD when every waiter record is taken (run fn
        alone). Raises DeadlockError, having written nothing, when the wait would never end, and
        MPFlightError, having written nothing, when the slot's semaphore cannot be made (a full /dev/shm).
        """
        off = t.slot_off(index)
        gen = t.gen(index)
        owner = t.u32(off + S_OWNER_PID)
        if owner != pid:
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
        t.rmap[r] = 1
        _faults.reached("join")
        t.set_u32(off + S_WAITERS, t.u32(off + S_WAITERS) + 1)
        t.set_u32(off + S_JOINS, t.u32(off + S_JOINS) + 1)
        t.bump(C_JOINS)
        if owner == pid:
            local = t.local.get((index, gen))
            if local is None:
                local = t.local[(index, gen)] = LocalCall()
            local.waiting += 1
        if blocking:
            self._set_blocked(t, index + 1, gen)
        return gen, r

    def _set_blocked(self, t: Table, slot_plus_one: int, gen: int) -> None:
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
        self,
        t: Table,
        index: int,
        gen: int,
        fn: Callable[..., T],
        args: tuple[object, ...],
        kwargs: dict[str, object],
    ) -> Result[T]:
        try:
            value = fn(*args, **kwargs)
        except BaseException as e:
            self._complete(t, index, gen, None, e)
            raise
        return Result(value, self._complete(t, index, gen, value, None))

    def _complete(self, t: Table, index: int, gen: int, value: object, error: BaseException | None) -> bool:
        """Publish the outcome of the call in ``index`` to its waiters; returns ``shared``."""
        with t:
            if t.u64s[index * U64S] != gen or t.states[index] in (FREE, DONE):
                # Our call was aborted under us (we were taken for dead): nobody waits for us.
                return False
            base = index * U32S
            t.bump(C_RUNS)
            if error is not None and isinstance(error, Exception):
                t.bump(C_ERRORS)
            if t.u32s[base + S_JOINS // 4] == 0:  # nobody joined: free the slot, publish nothing
                if t.u32s[base + S_FLAGS // 4] & JOINABLE:
                    t.unhome(t.u32s[base + S_HOME // 4])
                t.states[index] = FREE
                return False
            t.unjoin(index)
            t.states[index] = COMPLETING
            waiters = t.waiters_of(index)
            local = t.local.get((index, gen))
            if local is not None:
                local.value, local.error, local.filled = value, error, True
            remote = waiters - (local.waiting if local is not None else 0)
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
                self._publish(t, index, gen, where, length)
                raise
        self._publish(t, index, gen, where, length)
        return True

    def _publish(self, t: Table, index: int, gen: int, where: int, length: int) -> None:
        """Under the lock: mark the outcome of (index, gen) DONE and wake its waiters."""
        off = t.geo.slot_base + index * SLOT_SIZE
        with t:
            if t.u64s[index * U64S] != gen or t.states[index] != COMPLETING:
                # Freed by a repair or taken for dead and aborted meanwhile: the slot is not ours.
                if where == RESULT_SEGMENT:
                    unlink_segment(t.segment(index))
                return
            t.mm[off + S_RESULT_WHERE] = where
            t.set_u32(off + S_RESULT_LEN, length)
            t.states[index] = DONE
            _faults.reached("publish")
            waiters = t.waiters_of(index)
            segment = t.free(index, gen) if waiters == 0 else None
        if segment is not None:
            unlink_segment(segment)
        if waiters:
            self._post(t, index, waiters)

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
        self, t: Table, index: int, gen: int, record: int, key: str | bytes,
        detached: Callable[[], bool] | None = None,
    ) -> Result[T]:  # fmt: skip
        """Wait for call (index, gen), registered as ``record``, and take its outcome.

        ``detached`` is asked after every slice of waiting: True makes this caller leave (_Detached).
        """
        began = time.monotonic()
        deadline = None if self.timeout is None else began + self.timeout
        off = t.slot_off(index)
        owner = (t.u32(off + S_OWNER_PID), int.from_bytes(t.mm[off + S_OWNER_START : off + 40], "little"))
        interval = self.check_interval
        check_at = began + interval
        left = False  # whether this waiter already left the call (on timeout)
        try:
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
                    raise MPFlightError(
                        f"mpflight table {self.name!r} is damaged: slot {index} state {state}"
                    )
                now = time.monotonic()
                if now >= check_at:
                    check_at = now + interval
                    if "owner-check" not in _faults.DISABLED and not _owner.is_alive(*owner):
                        with t:
                            self._abort(t, index, gen, "owner died")
                        continue
                    if "table-identity" not in _faults.DISABLED and t.file.replaced():
                        t.checked = -HOUSEKEEPING_INTERVAL  # the next call moves to the new table
                if deadline is not None and now >= deadline:
                    with t:
                        if t.states[index] == DONE and t.gen(index) == gen:
                            break
                        self._leave(t, index, gen, record, began)
                        t.bump(C_TIMEOUTS)
                    left = True
                    raise TimeoutError(
                        f"gave up waiting {self.timeout} s for the call of key {short_key(key)}"
                    )
        except BaseException:
            if not left:
                with t:
                    if t.rmap[record] == 1:
                        self._leave(t, index, gen, record, began)
            raise
        return self._read(t, index, gen, record, key, owner[0], began)

    def _read(
        self, t: Table, index: int, gen: int, record: int, key: str | bytes, owner: int, began: float
    ) -> Result[T]:
        """Take the published outcome of call (index, gen), then leave it; the last reader frees the slot."""
        off = t.slot_off(index)
        where = t.mm[off + S_RESULT_WHERE]
        length = t.u32(off + S_RESULT_LEN)
        local = t.local.get((index, gen)) if owner == os.getpid() else None
        served = True  # a value or fn's exception reached us; not an abort or a failure to read
        try:
            # The owner's very object, once the owner has filled it in; an outcome it never filled
            # in (an abort) is read from the slot like any other.
            if local is not None and local.filled:
                if local.error is None:
                    return Result(local.value, True)  # type: ignore[arg-type]
                if isinstance(local.error, Exception):
                    raise local.error
                raise AbortError(key, owner, f"owner left fn with {type(local.error).__name__}")
            if where == RESULT_INLINE and length <= RESULT_CAP:
                payload = bytes(t.mm[off + S_RESULT : off + S_RESULT + length])
                return Result(_codec.unpack(payload, self.codec, key=key, owner_pid=owner), True)  # type: ignore[arg-type]
            if where == RESULT_SEGMENT and length <= MAX_RESULT_BYTES:
                with t.map_segment(index, length) as seg, memoryview(seg) as view:
                    value = _codec.unpack(view, self.codec, key=key, owner_pid=owner)
                return Result(value, True)  # type: ignore[arg-type]
            raise MPFlightError(f"corrupt slot {index} in table {self.name!r}: outcome location {where}")
        except MPFlightError as e:
            served = isinstance(e, RemoteError)
            raise
        finally:
            with t:
                if t.rmap[record] == 1:
                    self._leave(t, index, gen, record, began, served=served)

    def _leave(
        self, t: Table, index: int, gen: int, record: int, began: float | None, served: bool = False
    ) -> None:
        """Under the lock: drop a waiter's record; the last reader of a DONE call frees its slot.

        ``began`` is when this thread began to wait; None when reclaiming a dead waiter's record.
        """
        t.rmap[record] = 0
        if _faults.FAULT:
            _faults.reached("leave")
        if began is not None:
            self._set_blocked(t, 0, 0)
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
        local = t.local.get((index, gen))
        if local is not None:
            local.waiting -= 1
        if waiters <= 0 and t.states[index] == DONE:
            segment = t.free(index, gen)
            if segment is not None:
                unlink_segment(segment)

    def _abort(self, t: Table, index: int, gen: int, reason: str) -> None:
        """Under the lock: end call (index, gen), whose owner is gone, with an abort for its waiters."""
        state = t.states[index]
        if t.gen(index) != gen or state not in (RUNNING, COMPLETING):
            return
        off = t.slot_off(index)
        pid = t.u32(off + S_OWNER_PID)
        log.warning("mpflight table %r: owner %d of key %s died; aborting its call", self.name, pid,
                    short_key(self._slot_key(t, index)[0]))  # fmt: skip
        t.unjoin(index)
        _faults.reached("abort")
        payload = _codec.pack_abort(reason)
        t.mm[off + S_RESULT : off + S_RESULT + len(payload)] = payload
        t.mm[off + S_RESULT_WHERE] = RESULT_INLINE
        t.set_u32(off + S_RESULT_LEN, len(payload))
        t.states[index] = DONE
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
        home = zlib.crc32(ident, kind) % t.slots
        with t:
            if t.homes[home]:
                index = self._find(t, kind, ident, len(raw), home)
                if index >= 0:
                    t.unjoin(index)

    def stats(self) -> dict[str, int]:
        """Counters of this table, kept in shared memory and so summed over every process.

        calls = runs + joins + fallbacks; shared counts the waiters that received an outcome;
        wait_ns is the total time waiters spent waiting.
        """
        t = self._table()
        with t.peek():
            c = dict(zip(COUNTER_NAMES, t.counters.tolist(), strict=True))
        c["calls"] = c["runs"] + c["joins"] + c["fallbacks"]
        return c

    def _slot_key(self, t: Table, index: int) -> tuple[str | bytes, bool]:
        off = t.slot_off(index)
        return _slot_key(t.mm[off : off + SLOT_SIZE])

    def inflight(self) -> list[InflightCall]:
        """The calls in flight now, oldest first: a snapshot, copied under the lock, read outside it."""
        t = self._table()
        with t.peek():
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
                    owner_alive=pid == os.getpid() or _owner.is_alive(pid, start),
                    result_bytes=length
                    if where in (RESULT_INLINE, RESULT_SEGMENT) and state == DONE
                    else None,
                    key_complete=complete,
                    waiter_pids=tuple(sorted(by_call.get((index, gen), ()))),
                )
            )
        calls.sort(key=lambda c: c.started)
        return calls

    def gc(self) -> dict[str, int]:
        """Reclaim what dead processes left: their calls, their waiter records, orphaned segments."""
        t = self._table()
        reclaimed = {"calls": 0, "waiters": 0, "segments": 0}
        with t:
            t.reconcile()  # counts that disagree with the records (damage) are set right first
            owners = [
                (i, t.gen(i), t.u32(t.slot_off(i) + S_OWNER_PID),
                 int.from_bytes(t.mm[t.slot_off(i) + S_OWNER_START : t.slot_off(i) + 40], "little"))
                for i in range(t.slots) if t.states[i] in (RUNNING, COMPLETING)
            ]  # fmt: skip
            waiters = [
                (r, RECORD.unpack_from(t.mm, t.geo.record(r))) for r in range(t.records) if t.rmap[r] == 1
            ]
        alive: dict[tuple[int, int], bool] = {}

        def live(pid: int, start: int) -> bool:
            if (pid, start) not in alive:
                alive[pid, start] = _owner.is_alive(pid, start)
            return alive[pid, start]

        dead_calls = [(i, gen) for i, gen, pid, start in owners if not live(pid, start)]
        dead_waiters = [(r, rec) for r, rec in waiters if not live(rec[0], rec[2])]
        if "dead-waiters" in _faults.DISABLED:
            dead_waiters = []
        with t:
            for i, gen in dead_calls:
                if t.gen(i) == gen and t.states[i] in (RUNNING, COMPLETING):
                    self._abort(t, i, gen, "owner died")
                    reclaimed["calls"] += 1
            for r, rec in dead_waiters:
                if t.rmap[r] == 1 and RECORD.unpack_from(t.mm, t.geo.record(r)) == rec:
                    self._leave(t, rec[1], rec[4], r, None)
                    reclaimed["waiters"] += 1
            # Under the lock: an owner must take it to become COMPLETING before it makes a segment, and
            # names the segment in its slot before making it. So, listing first and reading the names
            # after, a listed segment that no COMPLETING or DONE slot names now is an orphan.
            entries = shm_entries()
            expected = {t.segment(i).lstrip("/") for i in range(t.slots) if t.states[i] in (COMPLETING, DONE)}
            reclaimed["segments"] = self._unlink_orphan_segments(t, entries, expected)
        if any(reclaimed.values()):
            log.warning("mpflight table %r: reclaimed %s", self.name, reclaimed)
        return reclaimed

    def _unlink_orphan_segments(self, t: Table, entries: list[str], expected: set[str]) -> int:
        """Unlink this table's segments (by its nonce) that no call names; another table's are left."""
        stem = t.segment(0).lstrip("/").rsplit(".", 2)[0] + "."
        n = 0
        for entry in entries:
            if entry.startswith(stem) and entry not in expected:
                n += unlink_segment("/" + entry)
        return n

    def _housekeeping(self, t: Table) -> Table:
        """At most once per HOUSEKEEPING_INTERVAL: follow the name to a new table; reclaim stuck calls."""
        t.checked = time.monotonic()
        if "table-identity" not in _faults.DISABLED and t.file.replaced():
            log.warning("mpflight table %r was removed or replaced under this process; moving to the new one",
                        self.name)  # fmt: skip
            with _tables_lock:
                if _tables.get(self.name) is t:
                    del _tables[self.name]  # the name leads elsewhere now
            new = _attach(self.name, None, self._mode, self._create)
            with _tables_lock:
                if self._t is t:
                    self._t, t.refs, self.mode = new, t.refs - 1, new.mode
                else:  # another thread of this handle moved it first
                    new.refs -= 1
            if t.refs == 0 and not t.active:
                _close_unused(t)
            return self._t if self._t is not None else new
        states = bytes(t.states)
        busy = {(i, t.gen(i), state) for i, state in enumerate(states) if state}
        stuck = busy & t.seen_busy
        t.seen_busy = busy
        # A call seen twice is usually just a slow fn; gc only when its owner is gone, or readers of a
        # published outcome have stayed for a whole interval (they may have died).
        if any(state == DONE or not self._owner_alive(t, i) for i, _, state in stuck):
            self.gc()
        return t

    def _owner_alive(self, t: Table, index: int) -> bool:
        base = index * U32S
        pid = t.u32s[base + S_OWNER_PID // 4]
        return pid == os.getpid() or _owner.is_alive(pid, t.u64s[index * U64S + S_OWNER_START // 8])


def _positive(what: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{what} must be a number of seconds, not {type(value).__name__}")
    if not value > 0:
        raise ValueError(f"{what} must be positive, not {value!r}")
    return float(value)
