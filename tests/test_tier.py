"""The seam for tiers is real: a next tier of a few dozen lines, stacked behind the table, changes nothing
of do, do_ex, do_future, do_async and the decorator, and coalesces across tables as a fleet tier would
across hosts (two tables stand for two hosts); it keeps its bytes in the slot and hears the hooks."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any

import pytest

import mpflight
from mpflight._protocol import JOIN, OWN, Detached, Result
from tests.helpers import DEADLINE, ROOT, refuse_thread_start, wait_until, waiting

pytestmark = pytest.mark.timeout(60)


class _Shared:
    def __init__(self) -> None:
        self.done = threading.Event()
        self.outcome: tuple[object, BaseException | None] = (None, None)
        self.waiters = 0


class LocalTier:
    """A next tier inside this process: the first table owner of a key owns, later ones wait for it."""

    name = "local"

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: dict[str | bytes, _Shared] = {}
        self.events: list[tuple[str, str | bytes, bytes, str]] = []
        self.owned = 0
        self.detached = 0  # waits left because their caller detached

    def caller(self, deadline: float | None) -> LocalEntry:
        return LocalEntry(self)

    def keep(self) -> Any:
        return _Nothing()

    def on_event(self, event: str, key: str | bytes, data: bytes, reason: str) -> None:
        self.events.append((event, key, data, reason))


class _Nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


class LocalEntry:
    def __init__(self, tier: LocalTier) -> None:
        self.tier, self.key, self.call, self.owner, self.noted = tier, b"", _Shared(), False, b""

    def __enter__(self) -> LocalEntry:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None:
            self.recover()

    def enter(self, key: str | bytes, tid: int, blocking: bool) -> int:
        with self.tier.lock:
            self.key, found = key, self.tier.calls.get(key)
            if found is None:
                self.tier.calls[key], self.owner = self.call, True
                self.tier.owned += 1
                self.noted = f"local:{os.getpid()}".encode()
                return OWN
            self.call, found.waiters = found, found.waiters + 1
            return JOIN

    def finish(self, value: object, error: BaseException | None) -> bool:
        with self.tier.lock:
            if self.tier.calls.get(self.key) is self.call:
                del self.tier.calls[self.key]
        self.call.outcome = (value, error)
        self.call.done.set()
        return self.call.waiters > 0

    def wait(self, key: str | bytes, detached: Callable[[], bool] | None = None) -> Result[Any]:
        while not self.call.done.wait(0.01):
            if detached is not None and detached():
                self.tier.detached += 1
                raise Detached
        value, error = self.call.outcome
        if error is not None:
            raise error
        return Result(value, True)

    def rename(self, tid: int) -> None:
        pass

    def note(self, data: bytes) -> None:
        pass

    def recover(self, wait: bool = True) -> None:
        if self.owner and not self.call.done.is_set():
            self.finish(None, mpflight.AbortError(self.key, os.getpid(), "the owner left"))


@pytest.fixture(params=["table", "table+local"])
def tier(request: pytest.FixtureRequest) -> LocalTier | None:
    return LocalTier() if request.param == "table+local" else None


# -- the behaviour of every way of calling, with and without the next tier --------------------------


def _call_each_way(group: mpflight.Group, key: str, fn: Callable[[], Any]) -> list[Any]:
    async def coroutine() -> Any:
        return fn()

    decorated = group.coalesce(key=lambda: f"{key}-decorated")(fn)
    return [
        group.do(key + "-do", fn),
        group.do_ex(key + "-do_ex", fn),
        group.do_future(key + "-future", fn).result(DEADLINE),
        asyncio.run(group.do_async(key + "-async-plain", fn)),
        asyncio.run(group.do_async(key + "-async", coroutine)),
        decorated(),
    ]


def test_every_way_of_calling_returns_fns_value(name: str, tier: LocalTier | None) -> None:
    with mpflight.Group(name, tier=tier) as group:
        got = _call_each_way(group, "k", lambda: {"v": 1})
        assert got == [
            {"v": 1},
            Result({"v": 1}, False),
            Result({"v": 1}, False),
            {"v": 1},
            {"v": 1},
            {"v": 1},
        ]
        assert group.inflight() == []
    if tier is not None:
        assert tier.owned == 6 and tier.calls == {}, "every owner in the table owned in the next tier too"


def test_every_way_of_calling_raises_fns_exception(name: str, tier: LocalTier | None) -> None:
    def fn() -> None:
        raise KeyError("missing")

    with mpflight.Group(name, tier=tier) as group:
        for call in (
            lambda: group.do("k1", fn),
            lambda: group.do_ex("k2", fn),
            lambda: group.do_future("k3", fn).result(DEADLINE),
            lambda: asyncio.run(group.do_async("k4", fn)),
            group.coalesce(key=lambda: "k5")(fn),
        ):
            with pytest.raises(KeyError, match="missing"):
                call()
        assert group.inflight() == []


def test_callers_of_one_table_share_one_execution(name: str, tier: LocalTier | None) -> None:
    started, release = threading.Event(), threading.Event()
    runs: list[int] = []

    def fn() -> str:
        runs.append(1)
        started.set()
        assert release.wait(DEADLINE)
        return "once"

    with mpflight.Group(name, tier=tier) as group:
        owner = group.do_future("k", fn)
        assert started.wait(DEADLINE)
        joined = [group.do_future("k", fn) for _ in range(3)]
        wait_until(lambda: waiting(group, "k") == 3, "three waiters")
        release.set()
        assert owner.result(DEADLINE) == Result("once", True)
        assert [f.result(DEADLINE) for f in joined] == [Result("once", True)] * 3
    assert runs == [1]


# -- across tables: what a fleet tier does across hosts -----------------------------------------------


def test_the_owner_of_a_key_in_another_table_runs_fn_for_both(name: str) -> None:
    """Table B's owner of a key finds table A's owner in the next tier: it waits there, and publishes
    what it gets to B's own waiters; fn runs once for both tables."""
    local = LocalTier()
    started, release = threading.Event(), threading.Event()
    runs: list[str] = []

    def fn(where: str) -> str:
        runs.append(where)
        started.set()
        assert release.wait(DEADLINE)
        return "fleet-wide"

    with mpflight.Group(name + "-a", tier=local) as a, mpflight.Group(name + "-b", tier=local) as b:
        try:
            owner = a.do_future("k", fn, "a")
            assert started.wait(DEADLINE)
            relay = b.do_future("k", fn, "b")  # owns in table b, waits in the next tier
            wait_until(
                lambda: local.calls.get("k") is not None and local.calls["k"].waiters == 1, "b in the tier"
            )
            behind = b.do_future("k", fn, "b")  # waits in table b for b's owner
            wait_until(lambda: waiting(b, "k") == 1, "a waiter in table b")
            [call] = b.inflight()
            assert call.state == "running" and call.tier == b""  # b's owner noted nothing: it waits
            [call] = a.inflight()
            assert call.tier == f"local:{os.getpid()}".encode(), "the next tier's bytes are in a's slot"
            release.set()
            assert owner.result(DEADLINE) == Result("fleet-wide", True)
            assert relay.result(DEADLINE) == Result("fleet-wide", True)
            assert behind.result(DEADLINE) == Result("fleet-wide", True)
        finally:
            release.set()
            mpflight.unlink(name + "-a")
            mpflight.unlink(name + "-b")
    assert runs == ["a"]
    assert ("free", "k", f"local:{os.getpid()}".encode(), "") in local.events, "the free hook fired"


@pytest.mark.parametrize("relay_thread", ["starts", "cannot start"])
def test_a_relay_whose_caller_detaches_still_serves_its_tables_waiters(
    name: str, monkeypatch: pytest.MonkeyPatch, relay_thread: str
) -> None:
    """Table b's owner waits in the next tier for table a's call; its own caller cancels its future:
    b's other waiter still gets the fleet-wide outcome (the relay goes on without its caller). When no
    thread can start for the relay (the process has none left), the caller's block ends the entry as
    any other: b's waiter is told at once (AbortError). Either way nothing keeps b's table mapped."""
    local = LocalTier()
    started, release = threading.Event(), threading.Event()

    def fn() -> str:
        started.set()
        assert release.wait(DEADLINE)
        return "fleet-wide"

    if relay_thread == "cannot start":
        refuse_thread_start(monkeypatch, "mpflight-relay-")
    with mpflight.Group(name + "-a", tier=local) as a, mpflight.Group(name + "-b", tier=local) as b:
        try:
            owner = a.do_future("k", fn)
            assert started.wait(DEADLINE)
            relay = b.do_future("k", fn)
            wait_until(lambda: local.calls.get("k") is not None and local.calls["k"].waiters == 1, "b relays")
            behind: list[object] = []
            thread = threading.Thread(target=lambda: behind.append(_outcome(lambda: b.do_ex("k", fn))))
            thread.start()
            wait_until(lambda: waiting(b, "k") == 1, "a waiter behind the relay")
            assert relay.cancel()
            wait_until(lambda: local.detached == 1, "the relay's caller to detach")
            if relay_thread == "starts":
                release.set()
            thread.join(DEADLINE)
            assert behind == [Result("fleet-wide", True) if relay_thread == "starts" else "AbortError"]
            release.set()
            assert owner.result(DEADLINE) == Result("fleet-wide", True)
            wait_until(lambda: b.inflight() == [], "b's call to end")
            at = b._at
            assert at is not None
            wait_until(lambda: not at.active, "b's callers all to leave the table")
        finally:
            release.set()
            mpflight.unlink(name + "-a")
            mpflight.unlink(name + "-b")


def _outcome(call: Callable[[], object]) -> object:
    try:
        return call()
    except Exception as e:
        return type(e).__name__


def test_an_exception_crosses_the_tier_with_its_class(name: str) -> None:
    local = LocalTier()
    started, release = threading.Event(), threading.Event()

    def fn() -> None:
        started.set()
        assert release.wait(DEADLINE)
        raise LookupError("not found")

    with mpflight.Group(name + "-a", tier=local) as a, mpflight.Group(name + "-b", tier=local) as b:
        try:
            owner = a.do_future("k", fn)
            assert started.wait(DEADLINE)
            relay = b.do_future("k", fn)
            wait_until(lambda: local.calls["k"].waiters == 1, "b in the tier")
            release.set()
            for future in (owner, relay):
                with pytest.raises(LookupError, match="not found"):
                    future.result(DEADLINE)
        finally:
            release.set()
            mpflight.unlink(name + "-a")
            mpflight.unlink(name + "-b")


_DYING_OWNER = """
import os, sys, mpflight
from tests.test_tier import LocalTier
group = mpflight.Group(sys.argv[1], tier=LocalTier())
def fn():
    print("running", flush=True)
    sys.stdin.read()  # until killed
group.do("k", fn)
"""


def test_the_abort_hook_fires_where_a_dead_owners_call_is_aborted(name: str) -> None:
    """An owner process that noted the next tier's bytes dies inside fn: this process, aborting its
    call in gc, hands the bytes to its own next tier's hook, as a fleet tier needs to end a lease."""
    local = LocalTier()
    with subprocess.Popen(
        [sys.executable, "-c", _DYING_OWNER, name], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        cwd=ROOT, text=True,
    ) as proc:  # fmt: skip
        try:
            assert proc.stdout is not None and proc.stdout.readline() == "running\n"
            with mpflight.Group(name, tier=local) as group:
                [call] = group.inflight()
                assert call.tier == f"local:{proc.pid}".encode()
                shown = subprocess.run(
                    [sys.executable, "-m", "mpflight", "inspect", name, "--json"], capture_output=True,
                    text=True, check=True, cwd=ROOT, timeout=DEADLINE,
                )  # fmt: skip
                [listed] = json.loads(shown.stdout)
                assert bytes.fromhex(listed["tier_hex"]) == call.tier, "the CLI shows the tier's bytes"
                proc.send_signal(signal.SIGKILL)
                proc.wait(DEADLINE)
                assert group.gc()["calls"] == 1
                assert ("abort", "k", f"local:{proc.pid}".encode(), "owner died") in local.events
                assert ("free", "k", f"local:{proc.pid}".encode(), "") in local.events
                assert group.inflight() == []
        finally:
            proc.kill()


def test_a_tier_that_is_not_one_is_refused(name: str) -> None:
    with pytest.raises(TypeError, match="tier must be a NextTier"):
        mpflight.Group(name, tier=object())  # type: ignore[arg-type]
