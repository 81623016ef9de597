"""do_future (Go's DoChan), do_async, and the coalesce decorator."""

from __future__ import annotations

import asyncio
import inspect
import json
import threading
import time
from concurrent.futures import CancelledError, Future
from pathlib import Path
from typing import Any

import pytest

import mpflight
from tests import workers
from tests.helpers import DEADLINE, Gate, mp_context, remote_owner, wait_until, waiting

# -- do_future -------------------------------------------------------------------------------------------


def test_future_resolves_to_the_shared_result(name: str, tmp_path: Path) -> None:
    gate = Gate(tmp_path)
    with mpflight.Group(name) as group:
        owner = group.do_future("k", workers.held, gate.gate, gate.runs, "v")
        assert not owner.done(), "returns at once, pending"
        wait_until(lambda: gate.executions() == 1, "fn to run in the pool")
        joiners = [group.do_future("k", workers.held, gate.gate, gate.runs, "other") for _ in range(3)]
        wait_until(lambda: waiting(group, "k") == 3, "three waiting futures")
        gate.open()
        results = [f.result(DEADLINE) for f in [owner, *joiners]]
    assert results == [mpflight.Result("v", True)] * 4
    assert gate.executions() == 1


def test_future_bad_input_raises_at_once(name: str) -> None:
    with mpflight.Group(name) as group:
        with pytest.raises(TypeError, match="key must be"):
            group.do_future(1, int)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="fn must be callable"):
            group.do_future("k", None)  # type: ignore[arg-type]


def test_waits_never_take_the_owners_pool(name: str, tmp_path: Path) -> None:
    """More waiting futures than the pool has threads: the owners' fns still run, nothing starves."""
    gates = [Gate(tmp_path, str(i)) for i in range(3)]
    with mpflight.Group(name) as group:
        pool_size = group._pool()._max_workers
        owners = [group.do_future(f"k{i}", workers.held, g.gate, g.runs, i) for i, g in enumerate(gates)]
        wait_until(lambda: all(g.executions() == 1 for g in gates), "the owners to run")
        waiters = [group.do_future(f"k{i % 3}", int) for i in range(pool_size + 8)]
        wait_until(
            lambda: sum(c.waiters for c in group.inflight()) == len(waiters), "every waiter registered"
        )
        # The pool still runs new owners' fns while all those futures wait.
        assert group.do_future("free", lambda: "ran").result(DEADLINE) == mpflight.Result("ran", False)
        for g in gates:
            g.open()
        assert [f.result(DEADLINE).value for f in owners] == [0, 1, 2]
        assert [f.result(DEADLINE).value for f in waiters] == [i % 3 for i in range(pool_size + 8)]


def test_cancelling_a_waiting_future_detaches_only_it(name: str, tmp_path: Path) -> None:
    gate = Gate(tmp_path)
    with mpflight.Group(name) as group:
        owner = group.do_future("k", workers.held, gate.gate, gate.runs, "v")
        wait_until(lambda: gate.executions() == 1, "the owner")
        cancelled, kept = group.do_future("k", int), group.do_future("k", int)
        wait_until(lambda: waiting(group, "k") == 2, "two waiters")
        assert cancelled.cancel()
        wait_until(lambda: waiting(group, "k") == 1, "the cancelled one to leave")
        gate.open()
        assert kept.result(DEADLINE) == mpflight.Result("v", True)
        assert owner.result(DEADLINE) == mpflight.Result("v", True)
        with pytest.raises(CancelledError):
            cancelled.result(0)


def test_cancelling_the_owners_future_does_not_cancel_the_call(name: str, tmp_path: Path) -> None:
    gate = Gate(tmp_path)
    with mpflight.Group(name) as group:
        owner = group.do_future("k", workers.held, gate.gate, gate.runs, "v")
        wait_until(lambda: gate.executions() == 1, "the owner")
        waiter = group.do_future("k", int)
        wait_until(lambda: waiting(group, "k") == 1, "a waiter")
        assert owner.cancel()
        gate.open()
        assert waiter.result(DEADLINE) == mpflight.Result("v", True)
        assert owner.cancelled()


@pytest.mark.parametrize("factory", ["sigkill", "value_error", "keyboard_interrupt"])
def test_every_path_resolves_the_future(name: str, tmp_path: Path, factory: str) -> None:
    """Go's DoChan leaks when fn exits abnormally; here aborts and errors resolve it."""
    proc, gate, _ = remote_owner(name, "k", factory, tmp_path)
    with mpflight.Group(name) as group:
        future = group.do_future("k", int)
        wait_until(lambda: waiting(group, "k") == 1, "the waiter")
        gate.open()
        error = future.exception(DEADLINE)
        proc.join(DEADLINE)
    expected = {
        "sigkill": mpflight.AbortError,
        "value_error": ValueError,
        "keyboard_interrupt": mpflight.AbortError,
    }
    assert type(error) is expected[factory]


def test_a_timeout_resolves_the_future(name: str, tmp_path: Path) -> None:
    proc, gate, _ = remote_owner(name, "k", "value", tmp_path)
    with mpflight.Group(name, timeout=0.2) as group:
        assert isinstance(group.do_future("k", int).exception(DEADLINE), TimeoutError)
    gate.open()
    proc.join(DEADLINE)


def test_owner_fn_raising_in_the_pool(name: str) -> None:
    with mpflight.Group(name) as group:
        future: Future[mpflight.Result[None]] = group.do_future("k", _raise)
        assert isinstance(future.exception(DEADLINE), KeyError)
        assert group.inflight() == []


def _raise() -> None:
    raise KeyError("x")


# -- do_async --------------------------------------------------------------------------------------------


def _wait_in_child(name: str, out: str) -> None:
    workers.arm()
    with mpflight.Group(name) as group:
        Path(out).write_text(json.dumps(group.do("k", int)))


def test_async_waiters_never_block_the_loop(name: str, tmp_path: Path) -> None:
    """8 tasks and 2 other processes wait on one key; a ticker keeps ticking; fn runs once."""
    gate = Gate(tmp_path)
    ctx = mp_context("spawn")
    outs = [tmp_path / "c0", tmp_path / "c1"]

    async def main() -> tuple[list[object], float]:
        group = mpflight.Group(name)
        stall = 0.0
        stop = asyncio.Event()

        async def ticker() -> None:
            nonlocal stall
            last = time.monotonic()
            while not stop.is_set():
                await asyncio.sleep(0.005)
                now = time.monotonic()
                stall = max(stall, now - last)
                last = now

        async def fn() -> str:
            await asyncio.to_thread(workers.held, gate.gate, gate.runs, None)
            return "async value"

        tick = asyncio.create_task(ticker())
        tasks = [asyncio.create_task(group.do_async("k", fn)) for _ in range(9)]
        await asyncio.to_thread(wait_until, lambda: gate.executions() == 1, "fn")
        children = [ctx.Process(target=_wait_in_child, args=(name, str(o))) for o in outs]
        for c in children:
            c.start()
        await asyncio.to_thread(wait_until, lambda: waiting(group, "k") == 10, "8 tasks and 2 processes")
        gate.open()
        values = await asyncio.gather(*tasks)
        for c in children:
            await asyncio.to_thread(c.join, DEADLINE)
        stop.set()
        await tick
        group.close()
        return values, stall

    values, stall = asyncio.run(main())
    assert values == ["async value"] * 9
    assert [json.loads(o.read_text()) for o in outs] == ["async value"] * 2
    assert gate.executions() == 1
    assert stall < 1.0, f"the loop stalled {stall:.3f} s: something blocked it"  # catches a blocked loop


def test_plain_fn_runs_in_the_executor_not_on_the_loop(name: str) -> None:
    async def main() -> tuple[object, int]:
        loop_thread = threading.get_ident()
        with mpflight.Group(name) as group:
            return await group.do_async("k", threading.get_ident), loop_thread

    ran_on, loop_thread = asyncio.run(main())
    assert ran_on != loop_thread


def test_cancelling_the_owner_task_spares_the_call(name: str, tmp_path: Path) -> None:
    """One in-process library cancels every waiter when the owner's task is cancelled: not this one."""
    gate = Gate(tmp_path)
    out = tmp_path / "child"

    async def main() -> tuple[object, object]:
        group = mpflight.Group(name)

        async def fn() -> str:
            await asyncio.to_thread(workers.held, gate.gate, gate.runs, None)
            return "survived"

        owner = asyncio.create_task(group.do_async("k", fn))
        await asyncio.to_thread(wait_until, lambda: gate.executions() == 1, "fn")
        local = asyncio.create_task(group.do_async("k", fn))
        child = mp_context("spawn").Process(target=_wait_in_child, args=(name, str(out)))
        child.start()
        await asyncio.to_thread(wait_until, lambda: waiting(group, "k") == 2, "two waiters")
        owner.cancel()
        with pytest.raises(asyncio.CancelledError):
            await owner
        gate.open()
        value = await local
        await asyncio.to_thread(child.join, DEADLINE)
        group.close()
        return value, json.loads(out.read_text())

    assert asyncio.run(main()) == ("survived", "survived")


def test_cancelling_an_async_waiter_detaches_only_it(name: str, tmp_path: Path) -> None:
    gate = Gate(tmp_path)

    async def main() -> object:
        group = mpflight.Group(name)
        fn = lambda: workers.held(gate.gate, gate.runs, "v")  # noqa: E731
        owner = asyncio.create_task(group.do_async("k", fn))
        await asyncio.to_thread(wait_until, lambda: gate.executions() == 1, "fn")
        waiter = asyncio.create_task(group.do_async("k", fn))
        await asyncio.to_thread(wait_until, lambda: waiting(group, "k") == 1, "the waiter")
        waiter.cancel()
        await asyncio.to_thread(wait_until, lambda: waiting(group, "k") == 0, "the waiter to leave")
        gate.open()
        value = await owner
        group.close()
        return value

    assert asyncio.run(main()) == "v"


# -- the decorator ---------------------------------------------------------------------------------------


def test_decorator_keys_by_bound_arguments(name: str) -> None:
    with mpflight.Group(name) as group:

        @group.coalesce()
        def area(width: int, height: int = 2, **options: object) -> int:
            """The area."""
            return width * height

        keys: list[str | bytes] = []
        real_do = group.do

        def spy(key: str | bytes, fn: Any, *args: Any, **kwargs: Any) -> Any:
            keys.append(key)
            return real_do(key, fn, *args, **kwargs)

        group.do = spy  # type: ignore[method-assign]
        assert area(3) == area(width=3) == area(3, 2) == 6
        assert len(set(keys)) == 1, "defaults applied: one key"
        area(3, 3)
        area(3, color={"r": 1, "g": 2})
        area(3, color={"g": 2, "r": 1})
        assert len(set(keys)) == 3, "dict order does not matter; other arguments do"
        area(3, tags={1, 2, 3})
        area(3, tags={3, 2, 1})
        area(3, tags=frozenset({1, 2, 3}))
        assert len(set(keys)) == 5
        assert area.__name__ == "area"
        assert area.__doc__ == "The area."
        assert inspect.signature(area) == inspect.signature(area.__wrapped__)  # type: ignore[attr-defined]
        assert all(
            k.startswith(b"tests.test_futures.test_decorator_keys_by_bound_arguments.<locals>.area")
            for k in keys
        )  # type: ignore[union-attr]


def test_decorator_coalesces_across_threads(name: str, tmp_path: Path) -> None:
    gate = Gate(tmp_path)
    with mpflight.Group(name) as group:

        @group.coalesce()
        def slow(x: int) -> int:
            workers.held(gate.gate, gate.runs, None)
            return x * 10

        results: list[int] = []
        threads = [threading.Thread(target=lambda: results.append(slow(4))) for _ in range(4)]
        for t in threads:
            t.start()
        wait_until(lambda: sum(c.waiters for c in group.inflight()) == 3, "three joined")
        gate.open()
        for t in threads:
            t.join(DEADLINE)
    assert results == [40] * 4
    assert gate.executions() == 1


def test_decorator_refuses_unkeyable_arguments_and_takes_key(name: str) -> None:
    with mpflight.Group(name) as group:

        @group.coalesce()
        def f(thing: object) -> str:
            return "ran"

        with pytest.raises(TypeError, match="cannot make a key of argument 'thing'"):
            f(object())

        @group.coalesce(key=lambda thing: f"id:{id(thing)}")
        def g(thing: object) -> str:
            return "ran"

        assert g(object()) == "ran"


def test_module_level_decorator_on_async_functions(name: str) -> None:
    @mpflight.coalesce(name)
    async def fetch(url: str) -> str:
        await asyncio.sleep(0.05)
        return f"body of {url}"

    async def main() -> list[str]:
        return await asyncio.gather(*(fetch("u") for _ in range(5)))

    assert inspect.iscoroutinefunction(fetch)
    assert asyncio.run(main()) == ["body of u"] * 5
    with mpflight.Group(name) as group:
        assert group.stats()["runs"] == 1


# -- regressions ------------------------------------------------------------------------------------------


def test_a_closed_handle_with_a_pending_call_shares_its_table(name: str, tmp_path: Path) -> None:
    """A handle closed while its future still runs stays this process's table of the name, so a
    thread that joins through a new handle gets the owner's value, not a never-filled local entry."""
    gate = Gate(tmp_path)
    first = mpflight.Group(name)
    owner = first.do_future("k", workers.held, gate.gate, gate.runs, "v")
    wait_until(lambda: gate.executions() == 1, "the owner")
    first.close()
    with mpflight.Group(name) as second:
        future = second.do_future("k", int)
        wait_until(lambda: waiting(second, "k") == 1, "a local waiter")
        gate.open()
        assert future.result(DEADLINE) == mpflight.Result("v", True)
    assert owner.result(DEADLINE) == mpflight.Result("v", True)


def test_an_owner_that_cannot_publish_aborts_its_waiters(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An OSError writing the result segment (not a full /dev/shm): waiters get AbortError at once,
    the owner keeps its value, and the slot is free."""
    from tests.helpers import start_subprocess

    def broken(*args: object) -> None:
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(mpflight._table, "write_segment", broken)
    gate = Gate(tmp_path)
    with mpflight.Group(name) as group:
        owner = group.do_future("k", workers.held, gate.gate, gate.runs, "x" * 5000)
        wait_until(lambda: gate.executions() == 1, "the owner")
        out = tmp_path / "waiter"
        waiter = start_subprocess("join", name, "k", str(out), str(DEADLINE), MPFLIGHT_FAULT="")
        wait_until(lambda: waiting(group, "k") == 1, "a waiter in another process")
        gate.open()
        assert waiter.wait(DEADLINE) == 0
        assert owner.result(DEADLINE).value == "x" * 5000
        got = json.loads(out.read_text())
        assert got["kind"] == "AbortError"
        assert "could not publish" in got["reason"]
        assert group.inflight() == []


def test_async_reentry_on_own_key_raises(name: str) -> None:
    async def main() -> object:
        with mpflight.Group(name, timeout=DEADLINE) as group:

            async def fn() -> object:
                with pytest.raises(mpflight.DeadlockError):
                    await group.do_async("k", fn)
                return "outer"

            return await group.do_async("k", fn)

    assert asyncio.run(main()) == "outer"


def test_a_refused_wait_leaves_the_lock_clean(name: str, caplog: pytest.LogCaptureFixture) -> None:
    """A DeadlockError is raised before anything is written: no repair follows it."""
    import logging

    caplog.set_level(logging.WARNING, logger="mpflight")
    with mpflight.Group(name) as group:

        def fn() -> object:
            with pytest.raises(mpflight.DeadlockError):
                group.do("k", int)
            return group.do("other", lambda: "fine")

        assert group.do("k", fn) == "fine"
    assert "repairing" not in caplog.text
