"""Linger: a published outcome stays for the callers of its key that come within ``linger`` seconds of
its publication, in any process, and they take it without running fn.

Each test would fail without the mechanism it names: with linger=0 (the no-linger cases show it) every
later caller runs fn again. Callers that must come after a publication are started after it, or are
released by a file once it is seen; fn counts its executions in a file that every process appends to.
The only sleeps let a short linger run out, up to a deadline known to be past its end (from
``inflight()``'s linger_left, or from when ``do`` returned: the outcome was published before); every
other wait is on state, under helpers.DEADLINE. Child targets are module-level functions here
(spawn children import ``tests.test_linger``; ``python -m tests.test_linger`` runs one call).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest

import mpflight
import mpflight._housekeeping
import mpflight._locks
from tests import workers
from tests.conftest import shm_entries
from tests.helpers import (
    DEADLINE,
    ROOT,
    Gate,
    join_in_thread,
    mp_context,
    remote_owner,
    wait_until,
    waiting,
)

# A linger no test outlives: it never runs out under a test, however slow the machine. Each test that
# uses it ends it (forget) or leaves it to the fixture's unlink.
LONG = 600.0
# A linger that tests let run out (they sleep past its deadline).
SHORT = 0.2
# An outcome too large for the slot (about 1.6 KiB encoded): it lingers in a result segment.
BIG = bytes(i % 251 for i in range(100_000))
# The kinds of process a later caller runs in: multiprocessing's spawn and fork, and an independent
# interpreter.
HOWS = ["spawn", "fork", "subprocess"]


# -- fn and the child's call ------------------------------------------------------------------------


def record(runs: str, value: str = "", raises: str = "", gate: str = "") -> object:
    """fn for the tests, in any process: append this execution to ``runs``, hold until ``gate`` exists
    (if given), then raise ValueError(raises) or return value (``"big"``: BIG)."""
    with open(runs, "a") as f:
        f.write(f"{os.getpid()}\n")
    if gate:
        wait_for_file(gate)
    if raises:
        raise ValueError(raises)
    return BIG if value == "big" else value


def wait_for_file(path: str) -> None:
    deadline = time.monotonic() + workers.CHILD_DEADLINE
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} never appeared")
        time.sleep(0.002)


def call_once(name: str, key: str, runs: str, out: str, spec: str = "{}") -> None:
    """A child's one call: ``do_ex(key, record, ...)`` through Group(name, **spec["options"]), made once
    the file spec["go"] exists (if given; the file spec["ready"] says the group is open); writes the outcome as JSON to ``out``: {"kind": "value",
    "value", "shared"} (bytes described by length and digest) or {"kind": the exception's type,
    "message"}. spec["value"], ["raises"], ["gate"] are record's."""
    workers.arm()
    s = json.loads(spec)
    with mpflight.Group(name, **s.get("options", {})) as group:
        if s.get("go"):
            Path(s["ready"]).touch()
            wait_for_file(s["go"])
        try:
            res = group.do_ex(key, record, runs, s.get("value", ""), s.get("raises", ""), s.get("gate", ""))
            outcome = {"kind": "value", "value": workers.describe(res.value), "shared": res.shared}
        except Exception as e:
            outcome = {"kind": type(e).__name__, "message": str(e)}
    Path(out).write_text(json.dumps(outcome))


def forget_key(name: str, key: str) -> None:
    workers.arm()
    with mpflight.Group(name) as group:
        group.forget(key)


class Child:
    """call_once in a process started by ``how`` (spawn, fork or subprocess)."""

    def __init__(self, how: str, name: str, key: str, runs: str, tmp: Path, **spec: Any) -> None:
        self.out = tmp / f"out-{how}-{uuid.uuid4().hex[:8]}"
        args = (name, key, runs, str(self.out), json.dumps(spec))
        self.proc: Any
        if how == "subprocess":
            env = dict(os.environ, PYTHONPATH=str(ROOT))
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.test_linger", *args], env=env, cwd=ROOT
            )
        else:
            self.proc = mp_context(how).Process(target=call_once, args=args)
            self.proc.start()

    def exitcode(self) -> int | None:
        if isinstance(self.proc, subprocess.Popen):
            return self.proc.wait(DEADLINE)
        self.proc.join(DEADLINE)
        code: int | None = self.proc.exitcode
        return code

    def outcome(self) -> dict[str, Any]:
        assert self.exitcode() == 0
        outcome: dict[str, Any] = json.loads(self.out.read_text())
        return outcome


def call_in(how: str, name: str, key: str, runs: str, tmp: Path, **spec: Any) -> dict[str, Any]:
    """One call in a new process, to its end: its outcome."""
    return Child(how, name, key, runs, tmp, **spec).outcome()


def value(v: object, shared: bool) -> dict[str, Any]:
    """What call_once writes for a value."""
    return {"kind": "value", "value": workers.describe(v), "shared": shared}


# -- what the tests look at ---------------------------------------------------------------------------


def assert_counts(group: mpflight.Group, calls: int, **expected: int) -> None:
    """stats() has these counters (joins and linger_hits 0 unless given), no fallback and no takeover,
    and counts exactly ``calls`` calls (calls = runs - takeovers + joins + linger_hits + fallbacks)."""
    stats = group.stats()
    want = {"joins": 0, "linger_hits": 0, "fallbacks": 0, "takeovers": 0, **expected}
    assert {k: stats[k] for k in want} == want
    assert stats["calls"] == calls


def lingering(group: mpflight.Group) -> dict[str | bytes, mpflight.InflightCall]:
    """The lingering outcomes now, by key (inflight() first reclaims what it finds idle)."""
    return {c.key: c for c in group.inflight() if c.state == "lingering"}


def wait_for_linger(group: mpflight.Group, key: str | bytes) -> tuple[mpflight.InflightCall, float]:
    """key's lingering outcome, once inflight() shows it, and a monotonic time by which it has run out:
    inflight() reads the clock under the lock before this does, so its linger_left added to this later
    reading is past the deadline."""
    end = time.monotonic() + DEADLINE
    while (call := lingering(group).get(key)) is None:
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for the outcome of {key!r} to linger")
        time.sleep(0.002)
    assert call.linger_left is not None
    return call, time.monotonic() + call.linger_left


def sleep_until(when: float) -> None:
    """Let a short linger run out (passing time is what is tested; this orders nothing)."""
    while (left := when - time.monotonic()) >= 0:
        time.sleep(left + 0.001)


def segments(name: str) -> list[str]:
    return [e for e in shm_entries(name) if "@r" in e]


def busy_slots(group: mpflight.Group) -> int:
    """Slots not FREE, read from the state map itself: inflight() and gc() would reclaim first."""
    return sum(1 for state in bytes(group._table().states) if state)


@contextlib.contextmanager
def no_reaper() -> Iterator[None]:
    """Hold this process's reaper off: its sweep would free an expired linger before the step tested."""
    sweeping = mpflight._housekeeping.reaper.sweeping
    assert sweeping.acquire(timeout=DEADLINE)
    try:
        yield
    finally:
        sweeping.release()


def _never(*args: object) -> object:
    raise AssertionError("a caller of a lingering outcome ran fn")


async def _never_async() -> object:
    raise AssertionError("a caller of a lingering outcome ran fn")


# -- the options --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"linger": -1}, ValueError),
        ({"linger": 3600.5}, ValueError),
        ({"linger": float("inf")}, ValueError),
        ({"linger": float("nan")}, ValueError),
        ({"linger": "1"}, TypeError),
        ({"linger": True}, TypeError),
        ({"linger_errors": 1}, TypeError),
        ({"linger_errors": "yes"}, TypeError),
    ],
)
def test_bad_linger_options_are_refused(name: str, options: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error, match="linger"):
        mpflight.Group(name, **options)
    with mpflight.Group(name) as group, pytest.raises(error, match="linger"):
        group.with_options(**options)


def test_linger_options_and_their_bounds(name: str) -> None:
    with mpflight.Group(name) as group:
        assert (group.linger, group.linger_errors) == (0.0, False)
        view = group.with_options(linger=3600, linger_errors=True)
        assert (view.linger, view.linger_errors) == (3600.0, True)
        assert (group.linger, group.linger_errors) == (0.0, False)  # the view's, not the handle's
        assert view.with_options(linger=0).linger == 0.0
    with mpflight.Group(name, linger=0.5, linger_errors=True) as group:
        assert (group.linger, group.linger_errors) == (0.5, True)


# -- 1, 2: across processes -----------------------------------------------------------------------------


@pytest.mark.parametrize("linger", [LONG, 0.0], ids=["linger", "no-linger"])
def test_later_callers_in_other_processes_take_the_lingering_outcome(
    name: str, tmp_path: Path, linger: float
) -> None:
    """A spawned owner publishes and exits; then, one after another, a spawned, a forked and an
    independent process, and this one, call the key (with linger 0 of their own: the owner's linger
    decides). They take the owner's value, shared, and fn ran once; with no linger each runs fn."""
    runs = Gate(tmp_path).runs
    owner = call_in("spawn", name, "k", runs, tmp_path, value="owner", options={"linger": linger})
    assert owner["kind"] == "value" and owner["value"] == "owner"
    later = [call_in(how, name, "k", runs, tmp_path, value=how) for how in HOWS]
    with mpflight.Group(name) as group:
        mine = group.do_ex("k", record, runs, "here")
        executions = len(Path(runs).read_text().split())
        if linger:
            assert later == [value("owner", True)] * len(HOWS)
            assert mine == mpflight.Result("owner", True)
            assert executions == 1
            assert_counts(group, calls=1 + len(HOWS) + 1, runs=1, linger_hits=len(HOWS) + 1)
            group.forget("k")
        else:
            assert later == [value(how, False) for how in HOWS]
            assert mine == mpflight.Result("here", False)
            assert executions == 1 + len(HOWS) + 1
            assert_counts(group, calls=1 + len(HOWS) + 1, runs=1 + len(HOWS) + 1)
        assert group.inflight() == []


def test_the_owner_of_a_lingering_call_nobody_joined_is_not_shared(name: str, tmp_path: Path) -> None:
    """do_ex's shared says whether the outcome was shared with another caller; the owner of a call
    nobody joined has shared it with nobody when it returns, linger or not (a later caller's linger hit
    is that caller's shared=True)."""
    runs = Gate(tmp_path).runs
    with mpflight.Group(name) as group:
        assert group.do_ex("plain", record, runs, "v") == mpflight.Result("v", False)
        assert group.with_options(linger=LONG).do_ex("k", record, runs, "v") == mpflight.Result("v", False)
        assert call_in("fork", name, "k", runs, tmp_path) == value("v", True)
        group.forget("k")


# -- 3: the clock starts at publication -------------------------------------------------------------------


def test_the_linger_starts_when_the_outcome_is_published(name: str, tmp_path: Path) -> None:
    """fn runs for over twice the linger: a linger counted from the claim or from fn's start would be
    over when fn returns. Counted from publication, the outcome lingers its full linger: a caller right
    after it takes it; once it has run out, the next caller runs fn."""
    linger = 1.0
    gate = Gate(tmp_path)
    owner = Child(
        "spawn", name, "k", gate.runs, tmp_path, value="owner", gate=gate.gate, options={"linger": linger}
    )
    with mpflight.Group(name) as group:
        wait_until(lambda: gate.executions() == 1, "the owner to run fn")
        sleep_until(time.monotonic() + 2 * linger)  # fn's run outlasts the linger (it began before)
        released = time.monotonic()
        gate.open()
        call, end = wait_for_linger(group, "k")
        assert group.do_ex("k", _never) == mpflight.Result("owner", True)
        assert call.linger_left is not None and 0 < call.linger_left <= linger
        assert end >= released + linger  # published after the release: its linger ends a full linger later
        assert owner.outcome()["value"] == "owner"
        sleep_until(end)
        assert group.do_ex("k", record, gate.runs, "again") == mpflight.Result("again", False)
        assert gate.executions() == 2
        assert_counts(group, calls=3, runs=2, linger_hits=1)


# -- 4, 5: errors linger only when asked; aborts never ----------------------------------------------------


@pytest.mark.parametrize("linger_errors", [False, True])
def test_an_error_lingers_only_with_linger_errors(name: str, tmp_path: Path, linger_errors: bool) -> None:
    """A spawned owner's fn raises ValueError. By default the next caller (a forked process) runs fn,
    and its value lingers for the next one (this process); with linger_errors=True both get the
    owner's ValueError, and fn ran once."""
    runs = Gate(tmp_path).runs
    options = {"linger": LONG, "linger_errors": linger_errors}
    owner = call_in("spawn", name, "k", runs, tmp_path, raises="bad", options=options)
    assert owner == {"kind": "ValueError", "message": "bad"}
    second = call_in("fork", name, "k", runs, tmp_path, value="second", options=options)
    with mpflight.Group(name) as group:
        if linger_errors:
            assert second == owner
            with pytest.raises(ValueError) as caught:
                group.do("k", _never)
            assert caught.value.args == ("bad",)
            assert len(Path(runs).read_text().split()) == 1
            assert_counts(group, calls=3, runs=1, errors=1, linger_hits=2)
        else:
            # It ran fn (its shared flag is test_the_owner_of_a_lingering_call_nobody_joined_is_not_shared's).
            assert (second["kind"], second["value"]) == ("value", "second")
            assert group.do_ex("k", _never) == mpflight.Result("second", True)
            assert len(Path(runs).read_text().split()) == 2
            assert_counts(group, calls=3, runs=2, errors=1, linger_hits=1)
        group.forget("k")


@pytest.mark.parametrize("joined", [True, False], ids=["a-waiter", "no-waiter"])
@pytest.mark.parametrize("factory", ["keyboard_interrupt", "sigkill"])
def test_an_abort_never_lingers(name: str, tmp_path: Path, factory: str, joined: bool) -> None:
    """The owner (a spawned child, with linger and linger_errors) leaves fn by KeyboardInterrupt, which
    it catches, or dies; a waiter, if one joined, gets AbortError. The next caller runs fn."""
    proc, gate, out = remote_owner(name, "k", factory, tmp_path, linger=LONG, linger_errors=True)
    runs = Gate(tmp_path, tag="-fresh").runs
    with mpflight.Group(name) as group:
        if joined:
            thread, box = join_in_thread(group, "k")
            wait_until(lambda: waiting(group, "k") == 1, "this process to join")
        gate.open()
        proc.join(DEADLINE)
        if factory == "sigkill":
            assert proc.exitcode == -signal.SIGKILL
        else:
            assert proc.exitcode == 0
            assert pickle.loads(out.read_bytes())[:2] == ("error", "KeyboardInterrupt")
        if joined:
            thread.join(DEADLINE)
            assert [type(e) for e in box] == [mpflight.AbortError]
        assert group.do_ex("k", record, runs, "fresh") == mpflight.Result("fresh", False)
        assert len(Path(runs).read_text().split()) == 1
        assert_counts(group, calls=2 + joined, runs=2, joins=int(joined), aborts=1)


# -- 6: forget ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["here", "spawn"])
def test_forget_ends_a_linger_at_once(name: str, tmp_path: Path, where: str) -> None:
    """A lingering outcome (one forked caller takes it) is forgotten, here or in a spawned process:
    it is gone from inflight() and the next caller, forked, runs fn."""
    runs = Gate(tmp_path).runs
    with mpflight.Group(name, linger=LONG) as group:
        assert group.do("k", record, runs, "first") == "first"
        assert call_in("fork", name, "k", runs, tmp_path) == value("first", True)
        assert list(lingering(group)) == ["k"]
        if where == "here":
            group.forget("k")
        else:
            proc = mp_context("spawn").Process(target=forget_key, args=(name, "k"))
            proc.start()
            proc.join(DEADLINE)
            assert proc.exitcode == 0
        assert group.inflight() == []
        assert call_in("fork", name, "k", runs, tmp_path, value="second") == value("second", False)
        assert len(Path(runs).read_text().split()) == 2
        assert_counts(group, calls=3, runs=2, linger_hits=1)


# -- 7: inflight, gc, the reaper --------------------------------------------------------------------------


def test_inflight_shows_a_lingering_outcome_until_gc_frees_it(name: str, tmp_path: Path) -> None:
    """A running call has no linger_left; its published outcome is "lingering" with 0 < linger_left <=
    linger. A short linger that has run out keeps its slot (the reaper is held off, nobody calls the key)
    until gc frees it; inflight() then shows only the long one."""
    gate = Gate(tmp_path)
    with no_reaper(), mpflight.Group(name, linger=LONG) as group:
        owner = threading.Thread(target=group.do, args=("k", record, gate.runs, "v", "", gate.gate))
        owner.start()
        wait_until(lambda: gate.executions() == 1, "the owner to run fn")
        [running] = group.inflight()
        assert (running.key, running.state, running.linger_left) == ("k", "running", None)
        gate.open()
        owner.join(DEADLINE)
        [call] = group.inflight()
        assert (call.key, call.state, call.waiters, call.owner_pid) == ("k", "lingering", 0, os.getpid())
        assert call.linger_left is not None and 0 < call.linger_left <= LONG
        assert call.result_bytes is not None and call.result_bytes > 0
        assert group.with_options(linger=SHORT).do("s", record, gate.runs, "v") == "v"
        sleep_until(time.monotonic() + SHORT)  # published before do returned: run out after this
        assert busy_slots(group) == 2  # s has run out, and is not freed yet: nobody came
        group.gc()
        assert busy_slots(group) == 1
        assert [(c.key, c.state) for c in group.inflight()] == [("k", "lingering")]
        assert_counts(group, calls=2, runs=2)
        group.forget("k")


def test_the_reaper_frees_an_expired_linger(name: str, tmp_path: Path) -> None:
    """Nobody calls the key again and nobody runs gc: the process's reaper frees the slot, and the
    outcome's segment, once its linger has run out."""
    runs = Gate(tmp_path).runs
    with mpflight.Group(name, linger=SHORT) as group:
        with no_reaper():
            assert group.do("k", record, runs, "big") == BIG
            assert busy_slots(group) == 1 and len(segments(name)) == 1
        wait_until(lambda: busy_slots(group) == 0, "the reaper to free the slot")
        assert segments(name) == []


def test_a_table_whose_lock_is_held_does_not_hold_up_the_reaper(name: str, tmp_path: Path) -> None:
    """The reaper wants to sweep a table whose lock somebody holds (a stopped process): it gives that
    table up for the round, and frees another table's expired linger all the same."""
    runs = Gate(tmp_path).runs
    held = f"{name}-held"
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(mpflight.unlink, held)
        _reaper_past_a_held_lock(held, name, runs)


def _reaper_past_a_held_lock(held: str, name: str, runs: Path) -> None:
    with mpflight.Group(held, linger=LONG) as stuck, mpflight.Group(name, linger=SHORT) as group:
        with no_reaper():
            assert stuck.do("s", record, runs, "s") == "s"  # busy at every sweep: one the reaper takes on
            assert group.do("k", record, runs, "big") == BIG
        fd = os.open(mpflight._locks.shm_path(stuck._table().file.os_name), os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # a description of its own: it keeps the reaper out too
            wait_until(lambda: busy_slots(group) == 0, "the reaper to free the slot")
        finally:
            os.close(fd)
        assert segments(name) == []


def test_work_deferred_on_a_table_whose_lock_is_held_does_not_hold_up_the_reaper(
    name: str, tmp_path: Path
) -> None:
    """An owner's finish could not have the table lock by its deadline (somebody holds it, as a stopped
    process would) and went to the reaper: the reaper tries it for a bounded time, leaves it for a
    later round, and frees another table's expired linger meanwhile. Once the lock is free, the
    finish is done and the slot is free again."""
    runs = Gate(tmp_path).runs
    held = f"{name}-held"
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(mpflight.unlink, held)
        with mpflight.Group(held) as stuck, mpflight.Group(name, linger=SHORT) as group:
            with no_reaper():
                assert group.do("k", record, runs, "big") == BIG
            fd = os.open(mpflight._locks.shm_path(stuck._table().file.os_name), os.O_RDWR)
            try:

                def take_the_lock() -> str:  # a description of its own: the owner's finish waits for it
                    fcntl.flock(fd, fcntl.LOCK_EX)
                    return "v"

                assert stuck.with_options(timeout=0.2).do("s", take_the_lock) == "v"
                assert busy_slots(stuck) == 1  # its finish is the reaper's now
                wait_until(lambda: busy_slots(group) == 0, "the reaper to free the other table's slot")
                assert busy_slots(stuck) == 1
            finally:
                os.close(fd)
            wait_until(lambda: busy_slots(stuck) == 0, "the reaper to finish the call")
        assert segments(name) == []


# -- 8: a full table ----------------------------------------------------------------------------------------


def test_a_full_table_evicts_lingering_outcomes_expired_first_then_the_soonest(
    name: str, tmp_path: Path
) -> None:
    """A table of three slots, each holding a lingering outcome: a call of a new key evicts one, never
    running as a fallback. First an expired one (published last, and large: its segment goes with it);
    then, of unexpired ones, the one that expires soonest (neither the oldest nor the newest)."""
    runs = Gate(tmp_path).runs
    with no_reaper(), mpflight.Group(name, slots=3) as group:
        assert group.with_options(linger=LONG).do("a", record, runs, "a") == "a"
        assert group.with_options(linger=LONG / 2).do("b", record, runs, "b") == "b"
        assert group.with_options(linger=SHORT).do("c", record, runs, "big") == BIG
        sleep_until(time.monotonic() + SHORT)  # published before do returned: run out after this
        assert len(segments(name)) == 1
        assert busy_slots(group) == 3  # c has run out, and holds its slot until somebody needs it
        assert group.do("x", record, runs, "x") == "x"  # a full table: c goes
        assert sorted(lingering(group)) == ["a", "b"]
        assert segments(name) == []
        assert group.with_options(linger=LONG).do("y", record, runs, "y") == "y"  # full again
        assert group.do("z", record, runs, "z") == "z"  # b expires soonest: it goes
        assert sorted(lingering(group)) == ["a", "y"]
        assert group.do_ex("a", _never) == mpflight.Result("a", True)
        assert group.do_ex("y", _never) == mpflight.Result("y", True)
        assert group.do_ex("b", record, runs, "b again") == mpflight.Result("b again", False)
        assert len(Path(runs).read_text().split()) == 7
        assert_counts(group, calls=9, runs=7, linger_hits=2)  # no fallback among them


def test_a_full_table_of_lingering_outcomes_makes_room_for_another_process(name: str, tmp_path: Path) -> None:
    """A table of one slot, its lingering outcome published here: a new key's call in a forked and a
    spawned process each runs fn in the table, not as a fallback."""
    runs = Gate(tmp_path).runs
    with mpflight.Group(name, slots=1, linger=LONG) as group:
        assert group.do("a", record, runs, "a") == "a"
        assert call_in("fork", name, "b", runs, tmp_path, value="b") == value("b", False)
        third = call_in("spawn", name, "c", runs, tmp_path, value="c", options={"linger": LONG})
        assert (third["kind"], third["value"]) == ("value", "c")
        assert list(lingering(group)) == ["c"]
        assert_counts(group, calls=3, runs=3)
        group.forget("c")


def test_a_lingering_outcome_never_makes_its_caller_a_fallback(name: str, tmp_path: Path) -> None:
    """Every waiter record is taken (a held call of another key has as many waiters as the table has
    records) when a caller of a lingering key comes. Without the linger it would claim the key's free
    slot and run fn in the table; the linger must not make it run as a fallback instead (a linger hit
    it cannot register is a miss: it runs fn in the table)."""
    gate = Gate(tmp_path)
    runs = Gate(tmp_path, tag="-a").runs
    with mpflight.Group(name, slots=2) as group:
        records = group._table().records  # slots x RECORDS_PER_SLOT
        assert group.with_options(linger=LONG).do("a", record, runs, "a") == "a"
        owner = threading.Thread(target=group.do, args=("b", record, gate.runs, "b", "", gate.gate))
        owner.start()
        wait_until(lambda: gate.executions() == 1, "the owner of b to run fn")
        joiners = [join_in_thread(group, "b") for _ in range(records)]
        wait_until(lambda: waiting(group, "b") == records, "every waiter record taken")
        try:
            assert group.do("a", record, runs, "a again") in ("a", "a again")
            assert group.stats()["fallbacks"] == 0
        finally:
            gate.open()
            owner.join(DEADLINE)
            for thread, _ in joiners:
                thread.join(DEADLINE)
        assert [box for _, box in joiners] == [[mpflight.Result("b", True)]] * records
        group.forget("a")


# -- 9: a large outcome ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("end", ["forget", "gc", "next-caller"])
def test_a_large_lingering_outcome_is_read_by_other_processes_and_its_segment_removed(
    name: str, tmp_path: Path, end: str
) -> None:
    """BIG lingers in a result segment; a spawned and a forked process, released once it is published,
    read it. The segment stays while the outcome lingers and goes when the linger ends: by forget, or
    once it has run out, by gc or by the next caller (which runs fn)."""
    runs, go = Gate(tmp_path).runs, str(tmp_path / "go")
    linger = LONG if end == "forget" else 2.0  # the readers wait for the go file: they call within it
    ready = {how: str(tmp_path / f"ready-{how}") for how in ("spawn", "fork")}
    readers = [Child(how, name, "k", runs, tmp_path, go=go, ready=r) for how, r in ready.items()]
    with no_reaper(), mpflight.Group(name, linger=linger) as group:
        wait_until(lambda: all(map(os.path.exists, ready.values())), "the readers to open the group")
        assert group.do("k", record, runs, "big") == BIG
        until = time.monotonic() + linger  # published before do returned: run out after this
        assert len(segments(name)) == 1
        Path(go).touch()
        assert [r.outcome() for r in readers] == [value(BIG, True)] * 2
        assert len(segments(name)) == 1  # still lingering: still there
        if end == "forget":
            group.forget("k")
        else:
            sleep_until(until)
            assert len(segments(name)) == 1  # run out; freed by the next step, not before
            if end == "gc":
                group.gc()
            else:
                assert group.do("k", record, runs, "small") == "small"
        assert segments(name) == []
        executions = len(Path(runs).read_text().split())
        assert executions == 1 + (end == "next-caller")
        assert_counts(group, calls=3 + (end == "next-caller"), runs=executions, linger_hits=2)


# -- 10: threads, futures and asyncio ---------------------------------------------------------------------


THREADS = 4


@pytest.mark.parametrize("owner", ["here", "async", "spawn"])
def test_threads_futures_and_tasks_take_a_lingering_outcome(name: str, tmp_path: Path, owner: str) -> None:
    """After the owner (do in this process, do_async with a coroutine fn, or a spawned process) has
    published: threads released together (do, do_ex), futures (do_future) and tasks (do_async, with a
    coroutine fn and a plain one) all take its outcome; fn ran once."""
    runs = Gate(tmp_path).runs
    with mpflight.Group(name) as group:
        if owner == "here":
            assert group.with_options(linger=LONG).do("k", record, runs, "owner") == "owner"
        elif owner == "async":

            async def owned() -> object:
                return record(runs, "owner")

            assert asyncio.run(group.with_options(linger=LONG).do_async("k", owned)) == "owner"
        else:
            out = call_in("spawn", name, "k", runs, tmp_path, value="owner", options={"linger": LONG})
            assert out["value"] == "owner"
        together = threading.Barrier(THREADS)
        outcomes: list[object] = []

        def call(i: int) -> None:
            together.wait(DEADLINE)
            try:
                outcomes.append(group.do("k", _never) if i % 2 else group.do_ex("k", _never).value)
            except BaseException as e:  # kept for the assertion below, not lost in the thread
                outcomes.append(e)

        threads = [threading.Thread(target=call, args=(i,)) for i in range(THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(DEADLINE)
        futures: list[Future[mpflight.Result[object]]] = [group.do_future("k", _never) for _ in range(2)]

        async def tasks() -> list[object]:
            return [
                *await asyncio.gather(
                    group.do_async("k", _never_async),
                    group.do_async("k", _never_async),
                    group.do_async("k", _never),
                )
            ]

        assert outcomes == ["owner"] * THREADS
        assert [f.result(DEADLINE) for f in futures] == [mpflight.Result("owner", True)] * 2
        assert asyncio.run(tasks()) == ["owner"] * 3
        assert len(Path(runs).read_text().split()) == 1
        hits = THREADS + 2 + 3
        assert_counts(group, calls=1 + hits, runs=1, linger_hits=hits)
        group.forget("k")


def test_a_linger_is_its_key_s_alone(name: str, tmp_path: Path) -> None:
    """A str key's lingering outcome is not the bytes key with the same bytes; a key too long to keep
    whole in a slot (kept by its digest) lingers too, and not for a key that differs only at its end."""
    runs = Gate(tmp_path).runs
    long_key = "x" * 5000
    with mpflight.Group(name, linger=LONG) as group:
        assert group.do("k", record, runs, "str") == "str"
        assert group.do(b"k", record, runs, "bytes") == "bytes"
        assert group.do_ex("k", _never) == mpflight.Result("str", True)
        assert group.do(long_key, record, runs, "long") == "long"
        assert group.do(long_key[:-1] + "y", record, runs, "other") == "other"
        assert call_in("fork", name, long_key, runs, tmp_path) == value("long", True)
        assert len(Path(runs).read_text().split()) == 4
        assert_counts(group, calls=6, runs=4, linger_hits=2)
        for key in ("k", b"k", long_key, long_key[:-1] + "y"):
            group.forget(key)


# -- what is not fn's outcome does not linger ---------------------------------------------------------------


@pytest.mark.parametrize("uncarried", ["type", "size"])
def test_a_value_that_cannot_be_carried_does_not_linger(name: str, tmp_path: Path, uncarried: str) -> None:
    """The owner keeps a value the codec cannot carry (a type it does not know, or over max_result_bytes);
    callers that joined get SerializationError. That failure is neither fn's value nor fn's exception:
    it must not linger. A later caller, here or forked, runs fn and gets its value (without linger it
    would have: a linger must never turn a call that would succeed into a failure)."""
    runs = Gate(tmp_path).runs
    fn_value: object = object() if uncarried == "type" else "y" * 4096
    with mpflight.Group(name, linger=LONG, max_result_bytes=1024) as group:
        assert group.do("k", lambda: fn_value) is fn_value
        assert call_in("fork", name, "k", runs, tmp_path, value="carried") == value("carried", False)
        group.forget("k")
        assert group.do("k", lambda: fn_value) is fn_value
        assert group.do("k", record, runs, "carried") == "carried"
        group.forget("k")


def main(argv: list[str]) -> None:
    call_once(*argv)


if __name__ == "__main__":
    main(sys.argv[1:])
