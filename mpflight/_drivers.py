"""How do, do_ex, do_future and do_async drive a caller through a tier (mpflight._tier).

One owner runner (the entry's ``own``) for every way of calling, one wait-thread starter
(``start_wait``). A caller's part is an Entry used as a context manager; a block that hands it to
another thread (a wait thread, an asyncio runner) leaves it open (``hand``), and that thread closes
it. A call queued for the pool holds a ``keep`` of the tier until a pool thread enters it; work handed
to another thread holds one until it ends there (``_Handed``).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import os
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import Future, ThreadPoolExecutor
from threading import get_ident
from typing import Any, TypeVar, cast

from ._errors import start_thread
from ._protocol import ALONE, JOIN, OWN, Detached, Result, RunHere, key_identity
from ._tier import Entry, Tier

T = TypeVar("T")

# asyncio owners' runners, kept alive until they end (the loop keeps only weak references to tasks).
_runners: set[asyncio.Task[Any]] = set()

_HANDING, _TAKEN, _DROPPED = range(3)


class _Handed:
    """Work handed to another thread (a wait thread, an executor's) keeps the tier, the table's mapping,
    for that thread: the keep is taken here, before the thread can run, and let go there when the work
    ends. Whatever ends the handing block first (an exception right after the thread started, a
    cancelled runner, a closed loop), the table is not unmapped under a thread that still uses it: its
    semaphores closed under a wait would crash the process.

    The hander ``drop``s it when handing failed or it stopped waiting for the work: a thread that has
    not taken the work by then never runs it, and the keep goes at once.
    """

    __slots__ = ("keep", "lock", "state")

    def __init__(self, tier: Tier) -> None:
        self.keep = tier.keep()
        self.keep.__enter__()
        self.lock = threading.Lock()
        self.state = _HANDING

    def run(self, work: Callable[..., T], *args: Any) -> T | None:
        """In the thread: ``work(*args)``, unless the hander dropped it first (None then)."""
        with self.lock:
            if self.state != _HANDING:
                return None
            self.state = _TAKEN
        try:
            return work(*args)
        finally:
            self.keep.__exit__(None, None, None)

    def drop(self) -> None:
        with self.lock:
            if self.state != _HANDING:
                return  # the thread has the work, and lets go of the keep when it ends
            self.state = _DROPPED
        self.keep.__exit__(None, None, None)

    async def run_in_executor(self, work: Callable[..., T], *args: Any) -> T:
        """``work(*args)`` in the loop's default executor, awaited."""
        try:
            done = await asyncio.get_running_loop().run_in_executor(None, self.run, work, *args)
        except BaseException:
            self.drop()  # the awaiting caller went (cancelled, its loop closed): unless it runs already
            raise
        return cast(T, done)  # not dropped: the work ran


def call(
    tier: Tier, key: str | bytes, fn: Callable[..., T], args: tuple[object, ...], kwargs: dict[str, object],
    deadline: float | None,
) -> tuple[T, bool]:  # fmt: skip
    """do and do_ex: (fn's value, shared), in this thread.

    The entry's block, written out: what ``with`` does, without its binding of the two methods anew
    for every call (about 2% of an uncontended call, measured by scripts/count_instructions.py).
    """
    c = tier.caller(deadline)
    try:  # the entry's block, its __enter__ (which returns it) left out
        role = c.enter(key, get_ident(), True)
        if role == OWN:
            return c.own(fn, args, kwargs)
        if role == JOIN:
            try:
                return c.wait(key)
            except RunHere:
                c.rename(get_ident())  # fn runs in this thread: re-entry and cycles are seen here
                return c.own(fn, args, kwargs)
        return fn(*args, **kwargs), False
    except BaseException:
        c.recover()  # an exception leaving the block ends what the entry holds
        raise
    finally:
        c.close()


def _resolve(future: Future[Any], result: object = None, error: BaseException | None = None) -> None:
    """Resolve a caller's future, unless it was cancelled or resolved already: then that caller has
    gone, or had its outcome (an interruption ended its call while a wait thread went on)."""
    try:
        if not future.set_running_or_notify_cancel():
            return
    except RuntimeError:  # resolved already (the claim to resolve it is taken under its lock)
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


# -- do_future ----------------------------------------------------------------------------------------


def submit(
    tier: Tier, pool: ThreadPoolExecutor, key: str | bytes, fn: Callable[..., T], args: tuple[object, ...],
    kwargs: dict[str, object], deadline: float | None,
) -> Future[Result[T]]:  # fmt: skip
    """do_future: a Future of the Result; the call is entered in a pool thread."""
    key_identity(key)  # a bad key raises here, at once
    future: Future[Result[T]] = Future()
    kept = tier.keep()
    kept.__enter__()  # the table stays for the pool thread, whose block ends this keep
    try:
        pool.submit(_begin, tier, kept, future, key, fn, args, kwargs, deadline)
    except BaseException:
        kept.__exit__(None, None, None)
        raise
    return future


def _begin(
    tier: Tier, kept: Any, future: Future[Result[T]], key: str | bytes, fn: Callable[..., T],
    args: tuple[object, ...], kwargs: dict[str, object], deadline: float | None,
) -> None:  # fmt: skip
    """In a pool thread: claim or join the call only now (a call queued behind busy pool threads holds
    no slot that others would wait on), then run fn here, or hand the wait to a thread of its own and
    free this pool thread."""
    with kept:
        if future.cancelled():
            return
        c = tier.caller(deadline)
        try:
            with c:
                role = c.enter(key, threading.get_ident(), False)
                if role == JOIN:
                    start_wait(tier, c, future, key, functools.partial(c.own, fn, args, kwargs))
                    return
                result = (
                    Result(*c.own(fn, args, kwargs)) if role == OWN else Result(fn(*args, **kwargs), False)
                )
        except BaseException as e:
            c.recover()  # done by the block's end, unless a second exception skipped it: the future's
            _resolve(future, error=e)  # traceback would keep the entry, and its claim, alive
        else:
            _resolve(future, result)


def start_wait(
    tier: Tier, c: Entry, future: Future[Result[T]], key: str | bytes, run: Callable[[], tuple[T, bool]]
) -> None:
    """Hand the entry to a thread of its own that waits for its call, resolves ``future`` and closes
    it; cancelling the future makes that thread leave the call. When the wait says the caller owns
    the call after all (RunHere), that thread runs fn as the owner (``run``)."""
    handed = _Handed(tier)
    try:
        start_thread(threading.Thread(
            target=handed.run, args=(_wait_into, c, future, key, run), daemon=True,
            name=f"mpflight-wait-{tier.name}",
        ))  # fmt: skip
    except BaseException:
        handed.drop()  # not started, or not yet running: it never waits (the block ends the entry)
        raise
    c.hand()  # the block that entered it ends without closing it: the wait thread does


def _wait_into(
    c: Entry, future: Future[Result[T]], key: str | bytes, run: Callable[[], tuple[T, bool]]
) -> None:
    try:
        try:
            result: Result[T] = c.wait(key, future.cancelled)
        except RunHere:
            c.rename(threading.get_ident())
            result = Result(*run())
    except Detached:
        c.recover()
    except BaseException as e:
        c.recover()
        _resolve(future, error=e)
    else:
        _resolve(future, result)
    finally:
        c.close()


# -- do_async -----------------------------------------------------------------------------------------


async def call_async(
    tier: Tier, key: str | bytes, fn: Callable[..., Any], args: tuple[object, ...], kwargs: dict[str, object],
    deadline: float | None,
) -> Any:  # fmt: skip
    """do_async: the owner runs in a task of its own (cancelling this caller spares it); a waiter waits
    in a thread of its own; the table lock is taken briefly on the loop, and never waited for on it
    when an exception ends a call (the rest is left to the reaper)."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    tid = id(task) if task is not None else threading.get_ident()
    owning: Coroutine[Any, Any, Result[Any]] | None = None  # the owner's runner, once made
    handed = False  # to the runner or a wait thread, which closes it
    c = tier.caller(deadline)
    try:
        c.__enter__()  # not a with block: its end would wait for the lock on the loop; closed below
        if tier.io:
            role = await _entered(loop, tier, c, key, tid)
            if role < 0:  # cancelled while entering: the entering thread ends what it entered
                handed = True
                raise asyncio.CancelledError
        else:
            role = c.enter(key, tid, False)
        if role == ALONE:
            if inspect.iscoroutinefunction(fn):
                return await fn(*args, **kwargs)
            return await loop.run_in_executor(None, functools.partial(fn, *args, **kwargs))
        if role == OWN:
            owning = _own_async(tier, c, fn, args, kwargs)
            runner = loop.create_task(owning)
            _runners.add(runner)
            runner.add_done_callback(_runners.discard)
            runner.add_done_callback(_retrieve)
            # However the runner ends (even if an exception came before its first line), nothing it
            # claimed stays behind, and it closes the entry.
            runner.add_done_callback(functools.partial(_ended, c))
            c.hand()
            handed = True
            c.rename(id(runner))  # fn runs in the runner: re-entry is seen there
            return (await asyncio.shield(runner)).value
        waited: Future[Result[Any]] = Future()
        start_wait(tier, c, waited, key, functools.partial(_own_in_thread, loop, c, fn, args, kwargs))
        handed = True
        try:
            return (await asyncio.wrap_future(waited)).value
        except BaseException:
            # Cancelled (Ctrl-C under asyncio.run, a timeout): leave now, not when the wait thread next
            # looks; it finds the record gone and ends.
            waited.cancel()
            c.recover(wait=False)
            raise
    except BaseException:
        # A runner that has started ends the call itself (cancelling this caller spares it); one that
        # has not (the exception came first, and its loop may never run it) is ended here.
        if owning is None or inspect.getcoroutinestate(owning) == inspect.CORO_CREATED:
            if owning is not None:
                made = [task for task in _runners if task.get_coro() is owning]
                for made_task in made:
                    made_task.cancel()  # it throws into the coroutine before its first line
                if not made:
                    owning.close()
            c.recover(wait=False)
        raise
    finally:
        if not handed:
            c.close()


async def _entered(loop: asyncio.AbstractEventLoop, tier: Tier, c: Entry, key: str | bytes, tid: int) -> int:
    """Enter in a thread, off the loop (the tier does network I/O); -1 when cancelled meanwhile."""
    handed = _Handed(tier)
    try:
        entering = loop.run_in_executor(None, handed.run, c.enter, key, tid, False)
    except BaseException:
        handed.drop()
        raise
    try:
        return cast(int, await asyncio.shield(entering))  # queued, it runs: only a hander drops it
    except asyncio.CancelledError:
        entering.add_done_callback(functools.partial(_leave_entered, c))
        return -1


def _leave_entered(c: Entry, entering: asyncio.Future[int | None]) -> None:
    """A caller was cancelled while its entry entered: end what it entered, off the loop."""

    def leave() -> None:
        try:
            c.recover()
        finally:
            c.close()

    start_thread(threading.Thread(target=leave, daemon=True, name="mpflight-leave"))


async def _finish(tier: Tier, c: Entry, value: object, error: BaseException | None) -> bool:
    """Finish an asyncio owner's call: on the loop, or off it when the tier does network I/O."""
    if not tier.io:
        return c.finish(value, error)
    return await _Handed(tier).run_in_executor(c.finish, value, error)


async def _own_async(
    tier: Tier, c: Entry, fn: Callable[..., Any], args: tuple[object, ...], kwargs: dict[str, object]
) -> Result[Any]:
    """The owner's side of do_async, as a task of its own so that cancelling the caller spares it."""
    try:
        if inspect.iscoroutinefunction(fn) and hasattr(c, "wrap"):
            fn = c.wrap(fn)  # as the next tier wants it run (a plain fn is wrapped by own)
        if not inspect.iscoroutinefunction(fn):
            adopted = functools.partial(contextvars.copy_context().run, _adopted, c, fn, args, kwargs)
            return Result(*await _Handed(tier).run_in_executor(adopted))
        try:
            value = await fn(*args, **kwargs)
        except BaseException as e:
            await _finish(tier, c, None, e)
            raise
        return Result(value, await _finish(tier, c, value, None))
    except BaseException:
        c.recover(wait=False)
        raise
    finally:
        c.close()


def _adopted(
    c: Entry, fn: Callable[..., T], args: tuple[object, ...], kwargs: dict[str, object]
) -> tuple[T, bool]:
    """In an executor thread: run fn as the owner; the slot names this thread from now on."""
    c.rename(threading.get_ident())
    return c.own(fn, args, kwargs)


def _own_in_thread(
    loop: asyncio.AbstractEventLoop, c: Entry, fn: Callable[..., Any], args: tuple[object, ...],
    kwargs: dict[str, object],
) -> tuple[Any, bool]:  # fmt: skip
    """In a wait thread that was told to run fn after all (RunHere): a coroutine fn runs on its
    caller's loop, a plain one here; either way this thread finishes the call."""
    if not inspect.iscoroutinefunction(fn):
        return c.own(fn, args, kwargs)
    return c.own(lambda: asyncio.run_coroutine_threadsafe(fn(*args, **kwargs), loop).result(), (), {})


def _ended(c: Entry, runner: asyncio.Task[Result[Any]]) -> None:
    """An asyncio owner's runner ended: end what it left registered, if anything, and the entry (it may
    have been cancelled or interrupted before its first line)."""
    c.recover(wait=False)
    c.close()


def _retrieve(task: asyncio.Task[Result[object]]) -> None:
    """An asyncio owner's runner ended: take its exception (its caller may have gone away)."""
    if not task.cancelled():
        task.exception()


os.register_at_fork(after_in_child=_runners.clear)
