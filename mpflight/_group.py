"""Group: one execution of fn per key at a time, across the processes and threads of a machine.

The facade validates, delegates and documents: the protocol is _protocol, the seam _tier, the ways of
calling _drivers, tidying and reporting _housekeeping, this process's attachments _registry.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import socket
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from time import monotonic
from typing import Any, Final, ParamSpec, TypeVar, cast, overload

from . import _codec, _drivers, _faults, _housekeeping, _owner, _protocol
from ._coalesce import decorator
from ._housekeeping import InflightCall, Reclaimed, Stats
from ._layout import MAX_SLOTS, TIER_COUNTER_NAMES
from ._locks import LockTimeout, check_mode
from ._protocol import MAX_RESULT_BYTES, Options, Result
from ._redis import (
    DEFAULT_FENCE_TTL,
    DEFAULT_LEASE,
    DEFAULT_MAX_REMOTE_BYTES,
    DEFAULT_REDIS_TIMEOUT,
    redis_tier,
)
from ._registry import HOUSEKEEPING_INTERVAL, Attachment, registry, seconds, table_name, validate_name
from ._table import Table
from ._tier import NextTier, ShmTier, Stacked, Tier

log = logging.getLogger("mpflight")

T = TypeVar("T")
R = TypeVar("R")
P = ParamSpec("P")

# Default bound on an encoded outcome: what a result segment may take of /dev/shm (Docker's is 64 MB).
DEFAULT_MAX_RESULT_BYTES: Final = 64 * 1024 * 1024
# How often a waiter checks that the owner lives: detection of a dead owner takes at most about this.
DEFAULT_CHECK_INTERVAL: Final = 0.2
# How long a tier's count waits for the table lock before it is dropped.
COUNT_WAIT: Final = 0.5
# Bounds of the takeover budget (the slot counts takeovers in a u16) and of a linger.
MAX_TAKEOVERS: Final = 100
MAX_LINGER: Final = 3600.0
_SAME: Final = object()  # with_options: an option not given

_handles: weakref.WeakSet[Group] = weakref.WeakSet()  # handles with a thread pool


class Group:
    """A named table of calls in flight, shared by every process of the machine that opens the name.

    ``Group(name)`` creates the table or attaches to it. The handle is safe to use from many threads;
    it is a context manager, and ``close()`` detaches it. ``tier`` puts a next tier behind the table
    (mpflight._tier.NextTier): the table's owner of a key then meets that tier's other callers.

    ``redis`` (a redis://, rediss:// or unix:// URL, or a redis-py client made in this process) puts
    the cross-host tier behind it (mpflight._redis): one execution per key for every host on that Redis.
    Its options: ``host_id`` (default MPFLIGHT_HOST_ID, else none; the table is then ``name+host``, and
    the host's name in Redis, else the hostname), ``namespace`` (a prefix of the keys in Redis),
    ``lease`` (seconds, renewed every third of it), ``fail`` ("open": coalesce on this host alone while
    Redis is in trouble; "closed": raise TierUnavailable), ``max_remote_bytes`` (larger outcomes are not
    shared across hosts), ``fence_ttl`` (how long a key's fence counter lives), ``secret`` (signs the
    outcomes, which readers check) and ``redis_timeout`` (seconds for a connection and a command).
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
        tier: NextTier | None = None,
        redis: object = None,
        host_id: str | None = None,
        namespace: str = "",
        lease: float = DEFAULT_LEASE,
        fail: str = "open",
        max_remote_bytes: int = DEFAULT_MAX_REMOTE_BYTES,
        fence_ttl: float = DEFAULT_FENCE_TTL,
        secret: bytes | str | None = None,
        redis_timeout: float = DEFAULT_REDIS_TIMEOUT,
        on_abort: str = "raise",
        takeovers: int | None = None,
        linger: float = 0.0,
        linger_errors: bool = False,
        errors: Iterable[type[BaseException]] = (),
    ) -> None:
        self.name = validate_name(name)
        if host_id is None:
            host_id = os.environ.get("MPFLIGHT_HOST_ID") or None
        self.host_id = host_id
        self._table_name = table_name(self.name, host_id)
        if slots is not None and (type(slots) is not int or not 1 <= slots <= MAX_SLOTS):
            raise ValueError(f"slots must be an int from 1 to {MAX_SLOTS}, not {slots!r}")
        self.timeout = None if timeout is None else seconds("timeout", timeout)
        self.check_interval = seconds("check_interval", check_interval)
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
        if isinstance(errors, type | str | bytes) or not isinstance(errors, Iterable):
            raise TypeError(f"errors must be a list of exception types, not {errors!r}")
        errors = list(errors)
        if errors:
            codec = _codec.Codec() if codec is None else codec.copy()  # the caller's codec stays as it is
            for error_type in errors:
                codec.register_error(error_type)
        for method in ("caller", "keep", "on_event"):
            if tier is not None and not callable(getattr(tier, method, None)):
                raise TypeError(f"tier must be a NextTier (it has no {method}()), not {type(tier).__name__}")
        self._mode = mode  # as asked: None adopts the table's (and makes a new one 0o600)
        self.max_result_bytes = max_result_bytes
        self.codec = codec
        self._create = create
        self._next = tier
        self._executor: ThreadPoolExecutor | None = None
        budget = _takeovers(on_abort, takeovers)
        self._opts = Options(
            self.name, self.timeout, self.check_interval, codec, max_result_bytes, budget,
            _linger(linger), _flag("linger_errors", linger_errors),
        )  # fmt: skip
        self.on_abort, self.takeovers = on_abort, budget
        self.linger, self.linger_errors = self._opts.linger, self._opts.linger_errors
        if redis is not None:
            if tier is not None:
                raise ValueError("redis= and tier= both put a tier behind the table: give one")
            self._next = redis_tier(
                redis, self._opts, host=host_id or socket.gethostname(), namespace=namespace, lease=lease,
                fail=fail, max_remote_bytes=max_remote_bytes, fence_ttl=fence_ttl, secret=secret,
                timeout=redis_timeout, count=self._count,
            )  # fmt: skip
        self._at: Attachment | None = None
        self._parent: Group | None = None  # the handle a with_options view was made from
        self._use(registry.attach(self._table_name, slots, mode, create, self.timeout))

    def with_options(
        self,
        *,
        timeout: float | object | None = _SAME,
        on_abort: str | None = None,
        takeovers: int | None = None,
        linger: float | None = None,
        linger_errors: bool | None = None,
    ) -> Group:
        """This handle with other options for the calls made through it (per call:
        ``group.with_options(linger=2).do(key, fn)``): the same table, tier and pool; cheap to make, and
        never closed on its own (it ends with this handle). Options not given stay as they are."""
        opts = self._opts
        if on_abort is None and takeovers is None:
            budget = opts.takeovers
        else:
            budget = _takeovers(on_abort or ("retry" if takeovers or opts.takeovers else "raise"), takeovers)
        view = object.__new__(Group)
        view.__dict__.update(self.__dict__)
        if timeout is not _SAME:
            view.timeout = None if timeout is None else seconds("timeout", cast(float, timeout))
        view._opts = dataclasses.replace(
            opts,
            timeout=view.timeout,
            takeovers=budget,
            linger=opts.linger if linger is None else _linger(linger),
            linger_errors=opts.linger_errors
            if linger_errors is None
            else _flag("linger_errors", linger_errors),
        )
        view.on_abort, view.takeovers = ("retry" if budget else "raise"), budget
        view.linger, view.linger_errors = view._opts.linger, view._opts.linger_errors
        view._parent = self
        view._use_view()
        return view

    def _use_view(self) -> None:
        """A view's tiers: its own options on the handle's table and next tier."""
        at = self._at
        if at is None:
            raise ValueError(f"operation on closed mpflight.Group {self.name!r}")
        self._shm = ShmTier(at, self._opts)
        self._tier: Tier = self._shm if self._next is None else Stacked(self._shm, self._next)

    def _count(self, counter: str) -> None:
        """A counter of the tier behind the table (stats()), bumped under the table lock."""
        at = self._at
        if at is not None:
            with contextlib.suppress(LockTimeout):  # a stalled lock holder costs a count, not a caller
                at.table.locked(at.table.bump_tier, (TIER_COUNTER_NAMES.index(counter),),
                                time.monotonic() + COUNT_WAIT)  # fmt: skip

    def _use(self, at: Attachment) -> None:
        self._at, self.mode = at, at.table.mode  # the table's mode: what every process makes objects with
        self._use_view()

    # -- life ----------------------------------------------------------------------------------------

    def __enter__(self) -> Group:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._at is None else f"{self._at.table.slots} slots"
        return f"<mpflight.Group {self.name!r} {state}>"

    def close(self) -> None:
        """Detach from the table (it stays for the other processes; ``unlink`` removes it). A handle
        made by ``with_options`` only stops taking calls: the handle it came from owns the table."""
        at, self._at = self._at, None
        if at is None or self._parent is not None:
            return
        if self._executor is not None:
            self._executor.shutdown(wait=False)
        if isinstance(self._tier, Stacked):
            self._tier.close()
        registry.release(at)
        close_next = getattr(self._next, "close", None)
        if close_next is not None:
            close_next()  # the next tier's connections

    def _table(self) -> Table:
        if self._at is None:
            raise ValueError(f"operation on closed mpflight.Group {self.name!r}")
        return self._at.table

    @property
    def slots(self) -> int:
        return self._table().slots

    # -- the calls -------------------------------------------------------------------------------------

    def do(self, key: str | bytes, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``fn(*args, **kwargs)`` unless a call for ``key`` is in flight anywhere; return its value.

        Concurrent callers of one key, in any process, share one execution and its outcome: its
        value, or the exception fn raised. Waits are bounded by the handle's ``timeout``
        (TimeoutError); a dead owner is reported as AbortError.
        """
        at, timeout, now = self._at, self.timeout, monotonic()
        if at is None or at.table.replaced or now - at.checked > HOUSEKEEPING_INTERVAL or not callable(fn):
            self._tier_for(fn)  # raises for a closed handle; housekeeping
        deadline = None if timeout is None else now + timeout
        return _drivers.call(self._tier, key, fn, args, kwargs, deadline)[0]

    def do_ex(self, key: str | bytes, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Result[T]:
        """As ``do``, and say whether the outcome was shared with another caller."""
        return Result(*_drivers.call(self._tier_for(fn), key, fn, args, kwargs, self._deadline()))

    def do_future(
        self, key: str | bytes, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs
    ) -> Future[Result[T]]:
        """As ``do_ex``, without blocking: a Future that resolves to the Result (Go's DoChan).

        When this caller owns the call, fn runs in the handle's thread pool; a wait runs in a thread
        of its own, never in that pool. Cancelling the future detaches this caller only: the call
        goes on for everyone else. Every outcome resolves the future, aborts and timeouts included.
        """
        tier = self._tier_for(fn)
        return _drivers.submit(tier, self._pool(), key, fn, args, kwargs, self._deadline())

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
        deadline = self._deadline()
        return await _drivers.call_async(self._tier_for(fn), key, fn, args, kwargs, deadline)

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
        return decorator(lambda: self, key)

    def _deadline(self) -> float | None:
        return None if self.timeout is None else time.monotonic() + self.timeout

    def _tier_for(self, fn: object) -> Tier:
        """The tier for a new call: raises for a closed handle or a bad fn; housekeeping when due."""
        at = self._at
        if at is None:
            raise ValueError(f"operation on closed mpflight.Group {self.name!r}")
        if not callable(fn):
            raise TypeError(f"fn must be callable, not {type(fn).__name__}")
        if time.monotonic() - at.checked > HOUSEKEEPING_INTERVAL or at.table.replaced:
            self._housekeeping(at)
        return self._tier

    def _housekeeping(self, at: Attachment) -> None:
        """At most once per interval: follow the name to a new table (stuck calls are the reaper's)."""
        registry.start_reaper()
        parent = self._parent
        if parent is not None:  # a with_options view follows its handle
            if parent._at is None:
                raise ValueError(f"operation on closed mpflight.Group {self.name!r}")
            if parent._at is at:
                parent._housekeeping(at)
            self._at = parent._at
            self._use_view()
            return
        if "table-identity" in _faults.DISABLED:
            at.checked = time.monotonic()
            return
        new = registry.follow(at, self._mode, self._create, self.timeout)
        if new is None:
            return
        log.warning("mpflight table %r was removed or replaced under this process; moving to the new one",
                    self.name)  # fmt: skip
        with registry.lock:
            moved = self._at is at
            if moved:
                self._use(new)
        registry.release(at if moved else new)

    def _pool(self) -> ThreadPoolExecutor:
        """The handle's thread pool for owners' fns, made on first use (and again after fork)."""
        with registry.lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(thread_name_prefix=f"mpflight-{self.name}")
                _handles.add(self)
            return self._executor

    # -- the rest of the API -------------------------------------------------------------------------

    def forget(self, key: str | bytes) -> None:
        """Let the next ``do`` for ``key`` start a new call; callers already waiting keep the current one."""
        _protocol.forget(self._table(), key)
        forget_next = getattr(self._next, "forget", None)
        if forget_next is not None:
            forget_next(key)  # across hosts too

    def stats(self) -> Stats:
        """Counters of this table, kept in shared memory and so summed over every process: a read-only
        mapping (``stats()["aborts"]``, ``stats().aborts``).

        Every call is counted once, when it starts: as a run (it claimed a slot: fn runs, or ran, in
        it), a join (it waits for another's run) or a fallback (no slot or record was free: fn ran
        without coalescing); so calls = runs + joins + fallbacks. Of the runs, errors ended with fn
        raising an Exception and aborts ended without an outcome (the owner died, fn left by
        KeyboardInterrupt or SystemExit, or an exception interrupted the call). Of the joins, shared
        counts the waiters that received an outcome and timeouts those that gave up; wait_ns is the
        total time waiters spent waiting. With ``redis=``, of the runs, remote_owners owned the call
        fleet-wide and remote_joins waited on another host; remote_fallbacks are the steps Redis could
        not serve, remote_fenced the publishes it rejected (the lease was lost), and remote_not_shared
        the outcomes too large to share across hosts (all 0 without the tier).
        """
        return _housekeeping.stats(self._table())

    def inflight(self) -> list[InflightCall]:
        """The calls in flight now, oldest first: a snapshot, copied under the lock, read outside it.

        What no live process takes part in any more is reclaimed first (as the reaper would), so only
        calls with a live owner or waiter are listed.
        """
        return _housekeeping.inflight(self._table())

    def gc(self) -> Reclaimed:
        """Reclaim what dead processes left: their calls, their waiter records, orphaned segments; and
        what callers of this process left when an exception took them out of a call early. A read-only
        mapping of how many (``calls``, ``waiters``, ``segments``).

        Each process's reaper thread does this for calls that no live process takes part in, within
        about two of its intervals; gc does it now, and also aborts a dead owner's call that live
        waiters still wait on (they would notice within their check interval).
        """
        return _housekeeping.reclaim(self._table())


def _takeovers(on_abort: object, takeovers: object) -> int:
    """The takeover budget that on_abort and takeovers ask for (0: "raise")."""
    if on_abort not in ("raise", "retry"):
        raise ValueError(f'on_abort must be "raise" or "retry", not {on_abort!r}')
    if takeovers is None:
        return 1 if on_abort == "retry" else 0
    if type(takeovers) is not int or not 0 <= takeovers <= MAX_TAKEOVERS:
        raise ValueError(f"takeovers must be an int from 0 to {MAX_TAKEOVERS}, not {takeovers!r}")
    if on_abort == "raise" and takeovers:
        raise ValueError('takeovers is a budget of on_abort="retry"; on_abort="raise" takes none over')
    return takeovers


def _linger(linger: Any) -> float:
    if type(linger) in (int, float) and linger == 0:
        return 0.0
    value = seconds("linger", linger)
    if value > MAX_LINGER:
        raise ValueError(f"linger must be at most {MAX_LINGER} s (it is a short reuse, not a cache)")
    return value


def _flag(name: str, value: object) -> bool:
    if type(value) is not bool:
        raise TypeError(f"{name} must be True or False, not {value!r}")
    return value


def coalesce(
    group_name: str, *, key: Callable[..., str | bytes] | None = None, **group_options: Any
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """``@mpflight.coalesce("name")``: as ``Group.coalesce``, on a group opened in each process on
    its first call (so importing a module opens nothing, and forked workers open their own)."""
    validate_name(group_name)
    opened: list[Group] = []
    lock = threading.Lock()

    def group() -> Group:
        if not opened:
            with lock:
                if not opened:
                    opened.append(Group(group_name, **group_options))
        return opened[0]

    return decorator(group, key)


def _after_fork_in_child() -> None:
    for handle in list(_handles):
        handle._executor = None  # its threads were not forked
    _owner.forget_identity()


os.register_at_fork(after_in_child=_after_fork_in_child)
