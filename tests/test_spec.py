"""The slot state machine, one transition per test, in one process: the tests read as a spec.

In the manner of Go's singleflight tests (TestDo, TestDoErr, TestDoDupSuppress, TestForget, TestDoChan,
TestPanicDo), each test walks one path through docs/design.md's "Slot states" (FREE -> RUNNING ->
COMPLETING -> DONE -> FREE, or RUNNING -> FREE when nobody joined) and states what a caller sees: fn's
outcome, do_ex's shared flag, what inflight() shows while fn runs, and how stats() moves (as
Group.stats's docstring says: every call is one run, join or fallback). After every outcome the slot is
FREE again, which the tests see through a table of one slot (two for forget): the next caller of the
key runs fn afresh, and as many new calls at once as the table has slots each claim one, none running
as a fallback; and inflight() is empty.

Only the public API is used. Concurrent callers are threads (or futures, or tasks) ordered by events and
by what inflight() shows, never by sleeping; fn is held open by an Event until every waiter is registered.
"""

from __future__ import annotations

import asyncio
import functools
import os
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

import mpflight
from mpflight._layout import TIER_COUNTER_NAMES
from tests.helpers import DEADLINE, wait_until, waiting

# Callers that join one held call in the tests below (Go's TestDoDupSuppress has 9): within the four
# waiter records that each slot brings (docs/operations.md, "Sizing"), so that none runs as a fallback.
WAITERS = 3


class SpecError(Exception):
    """fn's own exception: it must reach every caller with its class."""


class Held:
    """fn for the tests: counts its executions, says when one has started, holds until released.

    Then it returns ``value`` (one object: callers in this process get that very object), or raises
    ``raises(tag)``.
    """

    def __init__(self, tag: str, raises: type[BaseException] | None = None) -> None:
        self.tag = tag
        self.value = {"tag": tag}
        self.raises = raises
        self.runs: list[int] = []  # the thread of each execution
        self.entered = threading.Event()
        self.release = threading.Event()

    def fn(self) -> dict[str, str]:
        self.runs.append(threading.get_ident())
        self.entered.set()
        assert self.release.wait(DEADLINE), f"fn of {self.tag!r} was never released"
        if self.raises is not None:
            raise self.raises(self.tag)
        return self.value


class Caller(threading.Thread):
    """A thread that makes one call and keeps its outcome: what it returned, or what it raised."""

    def __init__(self, call: Callable[[], object], barrier: threading.Barrier | None = None) -> None:
        super().__init__(daemon=True)
        self.call, self.barrier = call, barrier
        self.outcome: object = None

    def run(self) -> None:
        try:
            if self.barrier is not None:
                self.barrier.wait(DEADLINE)
            self.outcome = self.call()
        except BaseException as e:  # KeyboardInterrupt and SystemExit from fn included
            self.outcome = e

    def result(self) -> Any:
        self.join(DEADLINE)
        assert not self.is_alive(), "the call never returned"
        return self.outcome


def started(*callers: Caller) -> list[Caller]:
    for caller in callers:
        caller.start()
    return list(callers)


def assert_counters(
    group: mpflight.Group, *, runs: int = 0, joins: int = 0, shared: int = 0, errors: int = 0,
    aborts: int = 0, timeouts: int = 0, fallbacks: int = 0, takeovers: int = 0, linger_hits: int = 0,
) -> None:  # fmt: skip
    """stats() is exactly these counts (the ones not named are 0),
    calls = runs - takeovers + joins + linger_hits + fallbacks, and wait_ns has moved if and only if
    somebody waited."""
    stats = dict(group.stats())
    wait_ns = stats.pop("wait_ns")
    assert stats == {
        "runs": runs,
        "joins": joins,
        "shared": shared,
        "errors": errors,
        "aborts": aborts,
        "timeouts": timeouts,
        "fallbacks": fallbacks,
        "takeovers": takeovers,
        "linger_hits": linger_hits,
        "calls": runs - takeovers + joins + linger_hits + fallbacks,
        **dict.fromkeys(TIER_COUNTER_NAMES, 0),  # no tier behind the table
    }
    assert (wait_ns > 0) == (joins > 0), wait_ns


def assert_free(group: mpflight.Group, key: str | bytes) -> None:
    """Every slot is FREE again: the next caller of key runs fn afresh, alone; then as many calls at once
    as the table has slots each claim one (a slot left taken would make one a fallback). Nothing is in
    flight. Checked before anything else looks at the table: inflight() reclaims what it finds idle."""
    before = group.stats()
    assert group.do_ex(key, str, "afresh") == mpflight.Result("afresh", False)
    together = threading.Barrier(group.slots)
    probes = [
        Caller(functools.partial(group.do, f"probe-{i}", together.wait, DEADLINE)) for i in range(group.slots)
    ]
    assert sorted(p.result() for p in started(*probes)) == list(range(group.slots))
    after = group.stats()
    assert (after["runs"], after["fallbacks"]) == (before["runs"] + 1 + group.slots, before["fallbacks"])
    assert group.inflight() == []


def hold_with_waiters(group: mpflight.Group, key: str, held: Held, n: int) -> tuple[Caller, list[Caller]]:
    """An owner thread in held.fn, and n waiter threads registered on its call (held is not released)."""
    [owner] = started(Caller(lambda: group.do_ex(key, held.fn)))
    assert held.entered.wait(DEADLINE)
    joiners = started(*(Caller(lambda: group.do_ex(key, held.fn)) for _ in range(n)))
    wait_until(lambda: waiting(group, key) == n, f"{n} waiters on the call of {key!r}")
    return owner, joiners


# -- FREE -> RUNNING -> FREE: one caller ------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_a_free_key_runs_fn_and_frees_its_slot(name: str) -> None:
    """Go's TestDo: the caller of a free key runs fn with its arguments and gets the very value,
    unshared; the slot is FREE once it returns, so calls that do not overlap never coalesce. One slot
    serves call after call, key after key: none is left taken (that would make them fallbacks)."""
    seen: list[tuple[int, int]] = []
    value = {"v": 1}

    def fn(a: int, *, b: int) -> dict[str, int]:
        seen.append((a, b))
        return value

    with mpflight.Group(name, slots=1) as group:
        assert group.inflight() == []
        result = group.do_ex("k", fn, 1, b=2)
        assert result == mpflight.Result(value, False) and result.value is value
        assert group.inflight() == []
        assert group.do("k", fn, 3, b=4) is value  # no caching: fn runs again
        assert group.do("other", fn, 5, b=6) is value
        assert seen == [(1, 2), (3, 4), (5, 6)]
        assert_counters(group, runs=3)
        assert_free(group, "k")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("raises", [SpecError, LookupError])
def test_fn_raising_reaches_its_caller_with_its_class(name: str, raises: type[Exception]) -> None:
    """Go's TestDoErr: fn's exception reaches the caller as itself; it is counted as an error of a
    run, and the slot is FREE again."""

    def fn() -> None:
        raise raises("boom", 7)

    with mpflight.Group(name, slots=1) as group:
        with pytest.raises(raises) as info:
            group.do_ex("k", fn)
        assert type(info.value) is raises and info.value.args == ("boom", 7)
        assert_counters(group, runs=1, errors=1)
        assert_free(group, "k")


# -- FREE -> RUNNING -> COMPLETING -> DONE -> FREE: callers that share ------------------------------------


@pytest.mark.timeout(60)
def test_concurrent_callers_share_one_execution(name: str) -> None:
    """Go's TestDoDupSuppress: callers released at once by a barrier; one of them runs fn, the others
    join its call and wait; each gets the owner's very value, and do_ex says shared to all of them
    (the owner's was shared because somebody joined; the waiters' because they received it)."""
    held = Held("v")
    with mpflight.Group(name, slots=1) as group:
        barrier = threading.Barrier(WAITERS + 1)
        callers = started(*(Caller(lambda: group.do_ex("k", held.fn), barrier) for _ in range(WAITERS + 1)))
        assert held.entered.wait(DEADLINE)
        wait_until(lambda: waiting(group, "k") == WAITERS, f"{WAITERS} callers to join the call")
        held.release.set()
        results = [c.result() for c in callers]
        assert len(held.runs) == 1, "fn ran once"
        assert [c.ident for c in callers].count(held.runs[0]) == 1, "in one of the callers' threads"
        assert results == [mpflight.Result(held.value, True)] * (WAITERS + 1)
        assert all(r.value is held.value for r in results)
        assert_counters(group, runs=1, joins=WAITERS, shared=WAITERS)
        assert_free(group, "k")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("key", ["k", b"k"], ids=["str", "bytes"])
def test_inflight_shows_the_running_call_and_its_waiters(name: str, key: str | bytes) -> None:
    """While fn runs, inflight() lists the call as running, owned by this live process, with each
    registered waiter counted and its process named; once the outcome is read, nothing."""
    held = Held("v")
    with mpflight.Group(name, slots=1) as group:
        [owner] = started(Caller(lambda: group.do_ex(key, held.fn)))
        assert held.entered.wait(DEADLINE)
        [call] = group.inflight()
        assert (call.key, call.state, call.waiters, call.waiter_pids) == (key, "running", 0, ())
        assert (call.owner_pid, call.owner_alive, call.key_complete) == (os.getpid(), True, True)
        assert call.result_bytes is None
        assert abs(call.started - time.time()) < DEADLINE, "epoch seconds, taken at the claim"
        joiners = started(*(Caller(lambda: group.do_ex(key, held.fn)) for _ in range(2)))
        wait_until(lambda: waiting(group, key) == 2, "two waiters")
        [call] = group.inflight()
        assert (call.key, call.state, call.waiters) == (key, "running", 2)
        assert call.waiter_pids == (os.getpid(), os.getpid())
        held.release.set()
        assert [c.result() for c in [owner, *joiners]] == [mpflight.Result(held.value, True)] * 3
        assert_free(group, key)


@pytest.mark.timeout(60)
def test_fn_raising_reaches_every_waiter_with_its_class(name: str) -> None:
    """Go's TestDoErr with waiters: the owner and every waiter get fn's exception, of its class; one
    error of one run, and every waiter received the outcome (shared)."""
    held = Held("bad input", raises=SpecError)
    with mpflight.Group(name, slots=1) as group:
        owner, joiners = hold_with_waiters(group, "k", held, WAITERS)
        held.release.set()
        outcomes = [c.result() for c in [owner, *joiners]]
        assert [type(e) for e in outcomes] == [SpecError] * (WAITERS + 1)
        assert all(e.args == ("bad input",) for e in outcomes)
        assert len(held.runs) == 1
        assert_counters(group, runs=1, joins=WAITERS, shared=WAITERS, errors=1)
        assert_free(group, "k")


@pytest.mark.timeout(60)
def test_forget_starts_a_new_call_while_earlier_waiters_keep_the_first(name: str) -> None:
    """Go's TestForget: forget makes the running call unjoinable without ending it. The next caller
    starts a call of its own (fn runs again) that later callers join; the first call's waiters still
    get the first call's value, and its completion leaves the new call running."""
    first, second = Held("first"), Held("second")
    with mpflight.Group(name, slots=2) as group:
        owner1, [waiter1] = hold_with_waiters(group, "k", first, 1)
        group.forget("k")
        [call] = group.inflight()
        assert (call.state, call.waiters) == ("running", 1), "forget does not end the call"
        [owner2] = started(Caller(lambda: group.do_ex("k", second.fn)))
        assert second.entered.wait(DEADLINE), "the caller after forget started a new call"
        [waiter2] = started(Caller(lambda: group.do_ex("k", second.fn)))
        wait_until(lambda: [c.waiters for c in group.inflight()] == [1, 1], "a waiter on each call")
        first.release.set()
        assert [owner1.result(), waiter1.result()] == [mpflight.Result(first.value, True)] * 2
        [call] = group.inflight()
        assert (call.state, call.waiters) == ("running", 1), "the new call goes on, its waiter with it"
        second.release.set()
        assert [owner2.result(), waiter2.result()] == [mpflight.Result(second.value, True)] * 2
        assert (len(first.runs), len(second.runs)) == (1, 1)
        assert_counters(group, runs=2, joins=2, shared=2)
        assert_free(group, "k")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("raises", [KeyboardInterrupt, SystemExit])
@pytest.mark.parametrize("n", [0, WAITERS])
def test_fn_left_by_a_base_exception_aborts_its_waiters(
    name: str, raises: type[BaseException], n: int
) -> None:
    """Go's TestPanicDo: fn left by KeyboardInterrupt or SystemExit. The owner's caller gets that very
    exception, every waiter AbortError naming the key and the owner; the run counts as an abort, the
    waiters received no outcome (not shared); and the slot is FREE again, joined or not."""
    held = Held("interrupted", raises=raises)
    with mpflight.Group(name, slots=1) as group:
        owner, joiners = hold_with_waiters(group, "k", held, n)
        held.release.set()
        assert type(owner.result()) is raises
        for joiner in joiners:
            error = joiner.result()
            assert type(error) is mpflight.AbortError
            assert (error.key, error.owner_pid) == ("k", os.getpid())
        assert len(held.runs) == 1
        assert_counters(group, runs=1, joins=n, aborts=1)
        assert_free(group, "k")


@pytest.mark.timeout(60)
def test_a_waiter_that_times_out_leaves_and_the_call_goes_on(name: str) -> None:
    """A waiter whose handle's timeout runs out gets TimeoutError and leaves the call (counted as a
    timeout, not shared); the call goes on, and the owner's outcome was shared: somebody joined."""
    held = Held("v")
    with mpflight.Group(name, slots=1) as group, mpflight.Group(name, timeout=0.05) as impatient:
        [owner] = started(Caller(lambda: group.do_ex("k", held.fn)))
        assert held.entered.wait(DEADLINE)
        with pytest.raises(TimeoutError):
            impatient.do_ex("k", held.fn)
        [call] = group.inflight()
        assert (call.state, call.waiters, call.waiter_pids) == ("running", 0, ())
        held.release.set()
        assert owner.result() == mpflight.Result(held.value, True)
        assert_counters(group, runs=1, joins=1, timeouts=1)
        assert_free(group, "k")


# -- no FREE slot: fallback ---------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_a_full_table_runs_fn_uncoalesced(name: str) -> None:
    """With the table's one slot taken, callers of another key each run fn themselves, concurrently,
    unshared and counted as fallbacks (which take no slot); once the slot is FREE, the next call claims it."""

    def tagged(tag: str, *, suffix: str) -> str:
        return tag + suffix

    a, b = Held("a"), Held("b")
    with mpflight.Group(name, slots=1) as group:
        [holder] = started(Caller(lambda: group.do_ex("a", a.fn)))
        assert a.entered.wait(DEADLINE)
        [first] = started(Caller(lambda: group.do_ex("b", b.fn)))
        assert b.entered.wait(DEADLINE)
        # b's first caller is inside its fn: a second caller of b does not wait for it, but runs fn too.
        assert group.do_ex("b", tagged, "b", suffix=" again") == mpflight.Result("b again", False)
        assert [c.key for c in group.inflight()] == ["a"]
        b.release.set()
        assert first.result() == mpflight.Result(b.value, False)
        a.release.set()
        assert holder.result() == mpflight.Result(a.value, False)
        assert_counters(group, runs=1, fallbacks=2)
        assert_free(group, "b")


# -- do_future and do_async: the same transitions ----------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("raises", [None, SpecError, KeyboardInterrupt])
def test_do_future_follows_the_same_transitions(name: str, raises: type[BaseException] | None) -> None:
    """Go's TestDoChan: do_future returns at once; the owner's fn runs in the handle's pool and the
    waiters' futures join its call. Each future resolves to the shared Result, to fn's exception, or
    (fn left by KeyboardInterrupt) the owner's to that exception and the waiters' to AbortError; the
    counters move as with do, and the slot is FREE again."""
    held = Held("v", raises=raises)
    with mpflight.Group(name, slots=1) as group:
        owner = group.do_future("k", held.fn)
        assert held.entered.wait(DEADLINE)
        joiners = [group.do_future("k", held.fn) for _ in range(WAITERS)]
        wait_until(lambda: waiting(group, "k") == WAITERS, f"{WAITERS} waiting futures")
        assert not owner.done() and not any(f.done() for f in joiners)
        held.release.set()
        if raises is None:
            results = [f.result(DEADLINE) for f in [owner, *joiners]]
            assert results == [mpflight.Result(held.value, True)] * (WAITERS + 1)
            assert all(r.value is held.value for r in results)
        else:
            assert type(owner.exception(DEADLINE)) is raises
            expected = raises if issubclass(raises, Exception) else mpflight.AbortError
            assert [type(f.exception(DEADLINE)) for f in joiners] == [expected] * WAITERS
        assert len(held.runs) == 1
        served = WAITERS if raises is not KeyboardInterrupt else 0
        assert_counters(
            group, runs=1, joins=WAITERS, shared=served, errors=int(raises is SpecError),
            aborts=int(raises is KeyboardInterrupt),
        )  # fmt: skip
        assert group.do_future("k", str, "alone").result(DEADLINE) == mpflight.Result("alone", False)
        assert_free(group, "k")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["coroutine", "plain"])
@pytest.mark.parametrize("raises", [None, SpecError])
def test_do_async_follows_the_same_transitions(name: str, kind: str, raises: type[Exception] | None) -> None:
    """do_async: the owner's fn (a coroutine function awaited on the loop, or a plain one run in the
    executor) runs once; tasks that call the key meanwhile join its call, and every task gets its
    value or its exception; the counters move as with do, and the slot is FREE again."""
    runs: list[int] = []
    value = {"tag": "async"}

    async def main() -> None:
        fn: Callable[[], Any]
        until_entered: Callable[[], Awaitable[object]]
        let_go: Callable[[], None]
        if kind == "coroutine":
            entered, release = asyncio.Event(), asyncio.Event()

            async def coroutine_fn() -> dict[str, str]:
                runs.append(1)
                entered.set()
                await release.wait()
                if raises is not None:
                    raise raises("async")
                return value

            fn, until_entered, let_go = coroutine_fn, entered.wait, release.set
        else:
            held = Held("async", raises=raises)
            held.value = value

            def plain_fn() -> dict[str, str]:
                runs.append(1)
                return held.fn()

            async def until_held_entered() -> None:
                assert await asyncio.to_thread(held.entered.wait, DEADLINE)

            fn, until_entered, let_go = plain_fn, until_held_entered, held.release.set

        with mpflight.Group(name, slots=1) as group:
            owner = asyncio.create_task(group.do_async("k", fn))
            await asyncio.wait_for(until_entered(), DEADLINE)
            joiners = [asyncio.create_task(group.do_async("k", fn)) for _ in range(WAITERS)]
            await asyncio.to_thread(wait_until, lambda: waiting(group, "k") == WAITERS, "waiting tasks")
            let_go()
            outcomes = await asyncio.wait_for(
                asyncio.gather(owner, *joiners, return_exceptions=True), DEADLINE
            )
            if raises is None:
                assert all(outcome is value for outcome in outcomes), outcomes
            else:
                assert [type(e) for e in outcomes] == [raises] * (WAITERS + 1)
            assert runs == [1]
            assert_counters(group, runs=1, joins=WAITERS, shared=WAITERS, errors=int(raises is not None))
            assert await group.do_async("k", str, "alone") == "alone"
            await asyncio.to_thread(assert_free, group, "k")

    asyncio.run(main())
