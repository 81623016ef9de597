"""Takeover: when a call's owner dies or leaves fn, one of its waiters runs fn again for all of them.

``on_abort="retry"`` gives every caller a budget of takeovers (``takeovers=``, 1 by default); when the
owner is gone, exactly one waiter whose budget is not spent becomes the call's owner and runs fn, and
the other waiters wait on for its outcome. Each test counts fn's executions in a file.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest

import mpflight
from tests import workers
from tests.helpers import (
    DEADLINE,
    Gate,
    mp_context,
    remote_owner,
    start_subprocess,
    table_problems,
    wait_until,
    waiting,
)


class Waiters:
    """Processes that call key with on_abort="retry", fn held by ``gate``; each writes its outcome."""

    def __init__(self, name: str, key: str, tmp: Path, runs: str, gate: Gate, **options: object) -> None:
        self.name, self.key, self.tmp, self.runs, self.gate = name, key, tmp, runs, gate
        self.options = json.dumps(options)
        self.procs: list[Any] = []
        self.outs: list[Path] = []

    def start(self, how: str, factory: str = "value") -> None:
        out = self.tmp / f"retry-{len(self.outs)}"
        args = (self.name, self.key, self.gate.gate, self.runs, str(out), factory, self.options)
        if how == "subprocess":
            proc: Any = start_subprocess("retry", *args, MPFLIGHT_FAULT="")
        else:
            proc = mp_context(how).Process(target=workers.retry, args=args)
            proc.start()
        self.procs.append(proc)
        self.outs.append(out)

    def outcomes(self) -> list[dict[str, Any]]:
        for proc in self.procs:
            if hasattr(proc, "returncode") and not hasattr(proc, "exitcode"):
                assert proc.wait(DEADLINE) == 0
            else:
                proc.join(DEADLINE)
                assert proc.exitcode == 0
        return [json.loads(out.read_text()) for out in self.outs]


def executions(runs: str) -> list[int]:
    """The pids that ran fn, in order."""
    return [int(pid) for pid in Path(runs).read_text().split()]


def calls_of(group: mpflight.Group, key: str) -> list[mpflight.InflightCall]:
    return [c for c in group.inflight() if c.key == key]


# -- the herd: eight processes, one re-execution ---------------------------------------------------------

HOWS = ["spawn", "fork", "subprocess", "spawn", "fork", "subprocess", "spawn", "fork"]


@pytest.mark.parametrize("death", ["sigkill", "keyboard_interrupt"])
def test_eight_waiting_processes_share_one_re_execution(name: str, tmp_path: Path, death: str) -> None:
    """The owner is SIGKILLed (or leaves fn by KeyboardInterrupt and lives on): fn runs twice in all,
    once in the dead owner and once in the one waiter that took the call over; all eight get its value."""
    owner, gate, owner_out = remote_owner(name, "k", death, tmp_path)
    again = Gate(tmp_path, "again")
    herd = Waiters(name, "k", tmp_path, gate.runs, again)
    for how in HOWS:
        herd.start(how)
    with mpflight.Group(name) as group:
        wait_until(lambda: waiting(group, "k") == 8, "eight waiters")
        gate.open()  # the owner dies, or leaves fn
        wait_until(lambda: len(executions(gate.runs)) == 2, "a waiter to take the call over")
        [call] = calls_of(group, "k")
        assert call.state == "running"
        assert call.owner_pid in [p.pid for p in herd.procs]  # the new owner is one of the herd
        assert call.takeovers == 1
        wait_until(lambda: waiting(group, "k") == 7, "the seven others to wait for the new owner")
        again.open()
        got = herd.outcomes()
        owner.join(DEADLINE)
        assert [o["value"] for o in got] == ["the value"] * 8, got
        runners = executions(gate.runs)
        assert len(runners) == 2
        assert runners[0] == owner.pid
        assert runners[1] in [o["pid"] for o in got]
        stats = group.stats()
        assert (stats["takeovers"], stats["aborts"], stats["runs"], stats["joins"]) == (1, 1, 2, 8)
        assert stats["calls"] == 9  # one caller each: the owner and the herd
        assert group.inflight() == []
        assert table_problems(group) == []
    if death == "sigkill":
        assert owner.exitcode == -signal.SIGKILL
    else:
        assert owner.exitcode == 0
        assert workers.pickle.loads(owner_out.read_bytes())[:2] == ("error", "KeyboardInterrupt")


def test_without_takeover_every_waiter_gets_the_abort(name: str, tmp_path: Path) -> None:
    """on_abort="raise" (the default): the same herd gets AbortError and nobody runs fn again."""
    owner, gate, _ = remote_owner(name, "k", "sigkill", tmp_path)
    herd = Waiters(name, "k", tmp_path, gate.runs, Gate(tmp_path, "again"), takeovers=0)
    for how in HOWS[:4]:
        herd.start(how)
    with mpflight.Group(name) as group:
        wait_until(lambda: waiting(group, "k") == 4, "four waiters")
        gate.open()
        got = herd.outcomes()
        owner.join(DEADLINE)
        assert {o["type"] for o in got} == {"AbortError"}
        assert all(o["owner_died"] and "retry" in o["message"] for o in got)
        assert len(executions(gate.runs)) == 1
        assert group.stats()["takeovers"] == 0


# -- the budget -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("budget", [1, 2])
def test_a_spent_budget_ends_in_abort_error(name: str, tmp_path: Path, budget: int) -> None:
    """Every owner dies: each death is taken over while the budget lasts, then the rest get AbortError."""
    owner, gate, _ = remote_owner(name, "k", "sigkill", tmp_path)
    herd = Waiters(name, "k", tmp_path, gate.runs, gate, takeovers=budget)  # the gate is open by then
    for how in HOWS[:4]:
        herd.start(how, factory="sigkill")  # a taker dies too
    with mpflight.Group(name) as group:
        wait_until(lambda: waiting(group, "k") == 4, "four waiters")
        gate.open()
        for proc in herd.procs:
            proc.join(DEADLINE) if hasattr(proc, "exitcode") else proc.wait(DEADLINE)
        owner.join(DEADLINE)
        survivors = [json.loads(out.read_text()) for out in herd.outs if out.exists()]
        assert len(executions(gate.runs)) == 1 + budget  # the owner, then one per takeover
        assert len(survivors) == 4 - budget
        assert {o["type"] for o in survivors} == {"AbortError"}
        assert {o["takeovers"] for o in survivors} == {budget}
        assert group.stats()["takeovers"] == budget
        assert group.stats()["aborts"] == budget + 1
        assert group.inflight() == []
        assert table_problems(group) == []


def test_a_caller_whose_time_runs_out_during_a_takeover_gets_wait_timeout(name: str, tmp_path: Path) -> None:
    """Two waiters with a short timeout: one takes over and runs fn (an owner is not bound by it), the
    other's time runs out while it waits for the new owner: WaitTimeout, never a hang."""
    _owner, gate, _ = remote_owner(name, "k", "sigkill", tmp_path)
    again = Gate(tmp_path, "again")
    herd = Waiters(name, "k", tmp_path, gate.runs, again, timeout=2.0)
    herd.start("spawn")
    herd.start("subprocess")
    with mpflight.Group(name) as group:
        wait_until(lambda: waiting(group, "k") == 2, "two waiters")
        gate.open()
        wait_until(lambda: any(out.exists() for out in herd.outs), "one waiter to give up")
        [gave_up] = [json.loads(out.read_text()) for out in herd.outs if out.exists()]
        assert gave_up["type"] == "WaitTimeout"
        again.open()
        got = herd.outcomes()
        assert sorted(o.get("type", o.get("value")) for o in got) == ["WaitTimeout", "the value"]
        assert len(executions(gate.runs)) == 2
        assert group.stats()["timeouts"] == 1


# -- threads, futures, asyncio ----------------------------------------------------------------------------


def test_threads_futures_and_tasks_of_one_process_take_over_once(name: str, tmp_path: Path) -> None:
    """Waiters in this process (threads in do, do_future, do_async): one of them runs fn, here."""
    owner, gate, _ = remote_owner(name, "k", "sigkill", tmp_path)
    ran: list[str] = []
    release = threading.Event()

    def fn() -> str:
        ran.append(threading.current_thread().name)
        assert release.wait(DEADLINE)
        return "taken over"

    async def afn() -> str:
        ran.append("task")
        while not release.is_set():
            await asyncio.sleep(0.005)
        return "taken over"

    outcomes: list[Any] = []
    lock = threading.Lock()

    def keep(v: Any) -> None:
        with lock:
            outcomes.append(v)

    with mpflight.Group(name, on_abort="retry") as group:
        threads = [threading.Thread(target=lambda: keep(group.do("k", fn)), name=f"t{i}") for i in range(3)]
        for t in threads:
            t.start()
        futures: list[Future[mpflight.Result[str]]] = [group.do_future("k", fn) for _ in range(2)]

        async def tasks() -> list[str]:
            return list(await asyncio.gather(group.do_async("k", afn), group.do_async("k", fn)))

        loop_thread = threading.Thread(target=lambda: [keep(v) for v in asyncio.run(tasks())])
        loop_thread.start()
        wait_until(lambda: waiting(group, "k") == 7, "seven waiters")
        gate.open()
        wait_until(lambda: len(ran) == 1, "one of them to take over")
        release.set()
        for t in [*threads, loop_thread]:
            t.join(DEADLINE)
        for f in futures:
            keep(f.result(DEADLINE).value)
        owner.join(DEADLINE)
        assert outcomes == ["taken over"] * 7
        assert len(ran) == 1
        assert len(executions(gate.runs)) == 1  # the dead owner's own run
        assert group.stats()["takeovers"] == 1
        assert group.inflight() == []


# -- the owner killed at each step -----------------------------------------------------------------------

# (step, factory, whose value the waiters get): before DONE the call is taken over; after, the owner's
# outcome is there already.
OWNER_STEPS = [
    ("completing", "value", "taken"),  # the call made unjoinable, nothing written yet
    ("result", "value", "taken"),  # halfway through an inline outcome
    ("result", "big", "taken"),  # halfway through a result segment
    ("publish", "value", "owner"),  # DONE, the lock still held, nobody woken
    ("publish", "big", "owner"),
    ("woken", "value", "owner"),  # one of the waiters woken
]


@pytest.mark.parametrize(("step", "factory", "whose"), OWNER_STEPS)
def test_owner_killed_at_each_step_is_taken_over_once(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: str, factory: str, whose: str
) -> None:
    monkeypatch.setenv("MPFLIGHT_FAULT", step)  # read by the spawned owner; the waiters clear it
    owner, gate, _ = remote_owner(name, "k", factory, tmp_path)
    monkeypatch.delenv("MPFLIGHT_FAULT")
    again = Gate(tmp_path, "again")
    again.open()  # the taker's fn returns at once
    herd = Waiters(name, "k", tmp_path, gate.runs, again)
    for how in ("spawn", "subprocess", "fork"):
        herd.start(how, factory="value")
    with mpflight.Group(name) as group:
        wait_until(lambda: waiting(group, "k") == 3, "three waiters")
        gate.open()
        got = herd.outcomes()
        owner.join(DEADLINE)
        assert owner.exitcode == -signal.SIGKILL
        expected = workers.describe(workers.FACTORIES[factory]()) if whose == "owner" else "the value"
        assert [o["value"] for o in got] == [expected] * 3
        assert len(executions(gate.runs)) == (2 if whose == "taken" else 1)
        assert group.stats()["takeovers"] == (1 if whose == "taken" else 0)
        assert group.inflight() == []
        assert table_problems(group) == []


@pytest.mark.parametrize("step", ["vacate", "take"])
def test_a_waiter_killed_while_taking_over(name: str, tmp_path: Path, step: str) -> None:
    """The waiter that vacates the dead owner's call, or the one that takes it, dies there holding the
    table lock: the table is repaired and another waiter takes the call over (budget 2). The other
    waiters are stopped (SIGSTOP) until the doomed one has died, so that it is the one that acts."""
    owner, gate, _ = remote_owner(name, "k", "sigkill", tmp_path)
    again = Gate(tmp_path, "again")
    again.open()
    herd = Waiters(name, "k", tmp_path, gate.runs, again, takeovers=2)
    with mpflight.Group(name) as group:
        herd.start("spawn")
        herd.start("subprocess")
        wait_until(lambda: waiting(group, "k") == 2, "two waiters")
        for proc in herd.procs:
            os.kill(proc.pid, signal.SIGSTOP)
        doomed = start_subprocess(
            "retry", name, "k", again.gate, gate.runs, str(tmp_path / "doomed"), "value",
            json.dumps({"takeovers": 2}), MPFLIGHT_FAULT=step,
        )  # fmt: skip
        try:
            wait_until(lambda: waiting(group, "k") == 3, "the doomed waiter")
            gate.open()
            assert doomed.wait(DEADLINE) == -signal.SIGKILL
            owner.join(DEADLINE)
            [call] = calls_of(group, "k")  # repaired; kept for its live (stopped) waiters
            assert (call.state, call.takeovers) == (("vacant", 0) if step == "vacate" else ("running", 1))
        finally:
            for proc in herd.procs:
                os.kill(proc.pid, signal.SIGCONT)
        got = herd.outcomes()
        assert [o["value"] for o in got] == ["the value"] * 2
        assert len(executions(gate.runs)) == 2  # the dead owner's run and the new owner's
        assert group.stats()["takeovers"] == 1  # the doomed taker never ran fn: not counted
        assert group.stats()["calls"] == 4
        assert group.inflight() == []
        assert table_problems(group) == []


def test_takeover_is_also_a_per_call_option(name: str, tmp_path: Path) -> None:
    """with_options(on_abort="retry") on a handle made with the default: that call takes over, on the
    handle's own table; the handle's other calls keep on_abort="raise"."""
    owner, gate, _ = remote_owner(name, "k", "sigkill", tmp_path)
    with mpflight.Group(name) as group:
        retrying = group.with_options(on_abort="retry")
        assert (retrying.on_abort, retrying.takeovers, group.on_abort, group.takeovers) == (
            "retry",
            1,
            "raise",
            0,
        )
        box: list[object] = []

        def call(handle: mpflight.Group) -> None:
            try:
                box.append(handle.do("k", lambda: "taken over"))
            except mpflight.AbortError as e:
                box.append(e)

        threads = [threading.Thread(target=call, args=(h,)) for h in (retrying, group)]
        for t in threads:
            t.start()
        wait_until(lambda: waiting(group, "k") == 2, "two waiters")
        gate.open()
        for t in threads:
            t.join(DEADLINE)
        owner.join(DEADLINE)
        assert "taken over" in box
        assert len(box) == 2
        assert group.stats()["takeovers"] == 1
        retrying.close()  # a view: the handle it came from still works
        assert group.do("k2", lambda: "fine") == "fine"


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"on_abort": "sometimes"}, ValueError),
        ({"on_abort": "raise", "takeovers": 2}, ValueError),
        ({"on_abort": "retry", "takeovers": -1}, ValueError),
        ({"on_abort": "retry", "takeovers": 101}, ValueError),
        ({"on_abort": "retry", "takeovers": 1.5}, ValueError),
    ],
)
def test_bad_takeover_options_are_refused(name: str, options: dict[str, Any], error: type) -> None:
    with pytest.raises(error):
        mpflight.Group(name, **options)
    with mpflight.Group(name) as group, pytest.raises(error):
        group.with_options(**options)
