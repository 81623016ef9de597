"""The chaos test: six workers hammer twenty keys while a killer SIGKILLs one every ~100 ms.

Kills land wherever the workers happen to be: inside fn, waiting, holding the table lock, writing a
result. Whatever they hit, no caller gets another key's outcome; every call ends with its value, its
own ValueError, AbortError or TimeoutError; the table drains, serves a fresh process on every key,
and keeps no result segment.

The run ends on state, not on time: once the killer has made MIN_KILLS kills and the workers have
logged MIN_CALLS calls. The killer's cadence is the only timing.
"""

from __future__ import annotations

import functools
import json
import os
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import mpflight
from mpflight import _layout
from tests import workers
from tests.conftest import shm_entries
from tests.helpers import DEADLINE, mp_context, table_problems, wait_until

WORKERS = 6
# The workers' Group timeout: only a call wedged this long reaches it.
TIMEOUT = 2.0
# The killer's cadence.
KILL_EVERY = 0.1
# The run goes on until both are reached.
MIN_KILLS = 50
MIN_CALLS = 1000
# Bounds the run (a table that stops serving calls fails here); not a speed target.
RUN_DEADLINE = 60.0

# How each allowed exception type is logged (workers._type_name), and the outcome it stands for.
EXCEPTION_KINDS = {
    "builtins.ValueError": "error",
    f"{mpflight.AbortError.__module__}.{mpflight.AbortError.__qualname__}": "abort",
    f"{mpflight.WaitTimeout.__module__}.{mpflight.WaitTimeout.__qualname__}": "timeout",
}
OUTCOMES = ("value", "error", "abort", "timeout")


@dataclass
class Worker:
    proc: Any
    log: Path
    killed: bool = False
    seen: int = 0  # bytes of the log counted so far
    lines: int = 0

    def ready(self) -> bool:
        """True once the worker has attached to the group and begun calling."""
        return self.log.exists()

    def calls(self) -> int:
        """Calls logged so far (the log is read incrementally)."""
        if self.log.exists():
            with self.log.open("rb") as f:
                f.seek(self.seen)
                chunk = f.read()
            self.seen += len(chunk)
            self.lines += chunk.count(b"\n")
        return self.lines

    def records(self) -> tuple[list[dict[str, Any]], bool]:
        """The logged calls, and whether a kill tore the last line (only a killed worker may have one)."""
        *lines, tail = self.log.read_bytes().split(b"\n")
        assert not tail or self.killed, f"{self.log.name}: a worker that exited cleanly tore {tail!r}"
        return [json.loads(line) for line in lines], bool(tail)


@dataclass
class Crew:
    """The worker processes: WORKERS of them run at a time; killed ones are reaped and replaced."""

    name: str
    tmp: Path
    rng: random.Random
    everyone: list[Worker] = field(default_factory=list)
    current: list[Worker] = field(default_factory=list)
    target: Any = workers.chaos

    @property
    def stop(self) -> Path:
        return self.tmp / "stop"

    def start(self) -> None:
        log = self.tmp / f"worker-{len(self.everyone):04d}.jsonl"
        proc = mp_context("spawn").Process(
            target=self.target,
            args=(self.name, str(log), self.rng.randrange(2**32), str(self.stop), TIMEOUT),
        )
        proc.start()
        w = Worker(proc, log)
        self.everyone.append(w)
        self.current.append(w)

    def kill_one(self) -> bool:
        """SIGKILL a random worker that has begun calling, reap it, start another. False if none had."""
        for w in self.current:
            assert w.proc.exitcode is None, f"worker {w.proc.pid} died by itself: {w.proc.exitcode}"
        ready = [w for w in self.current if w.ready()]
        if not ready:
            return False
        w = self.rng.choice(ready)
        w.proc.kill()
        w.proc.join(DEADLINE)
        assert w.proc.exitcode == -signal.SIGKILL, f"worker {w.proc.pid} died by itself: {w.proc.exitcode}"
        w.killed = True
        self.current.remove(w)
        self.start()
        return True

    def calls(self) -> int:
        return sum(w.calls() for w in self.everyone)

    def finish(self) -> None:
        """Let the workers finish their calls and exit; each must exit cleanly."""
        self.stop.touch()
        for w in self.current:
            w.proc.join(DEADLINE)
            assert w.proc.exitcode == 0, f"worker {w.proc.pid} exited with {w.proc.exitcode}"

    def reap(self) -> None:
        """Kill and reap whatever still runs (after a failure)."""
        self.stop.touch()
        for w in self.everyone:
            if w.proc.exitcode is None:
                w.proc.kill()
            w.proc.join(DEADLINE)


def _classify(rec: dict[str, Any]) -> str | None:
    """The outcome a logged call had, of OUTCOMES; None when the contract does not allow it."""
    key = rec["key"]
    if rec["kind"] == "value":
        ok = rec["value"] in (workers.chaos_value(key), workers.chaos_value(key, large=True))
        return "value" if ok else None
    kind = EXCEPTION_KINDS.get(rec["type"])
    if kind == "error" and rec["args"] != [repr(workers.chaos_error(key))]:
        return None
    if kind == "abort" and rec["error_key"] != key:
        return None
    if kind == "timeout" and repr(key) not in rec["args"][0]:
        return None
    return kind


def _gc(group: mpflight.Group, into: dict[str, int]) -> None:
    for k, n in group.gc().items():
        into[k] = into.get(k, 0) + n


@pytest.mark.chaos
@pytest.mark.timeout(120)
@pytest.mark.parametrize("on_abort", ["raise", "retry"])
def test_kills_under_load_never_mix_keys_and_the_table_recovers(
    name: str, tmp_path: Path, on_abort: str
) -> None:
    """With on_abort="retry" the run also goes on until a kill has been taken over, and fn may run
    at most once more per abort: executions <= runs, takeovers <= aborts."""
    began = time.monotonic()
    seed = random.randrange(2**32)
    target = functools.partial(workers.chaos, on_abort=on_abort)
    crew = Crew(name, tmp_path, random.Random(seed), target=target)
    kills = 0
    live_gc: dict[str, int] = {}
    with mpflight.Group(name) as group:

        def taken_over() -> bool:
            return on_abort == "raise" or group.stats()["takeovers"] > 0

        try:
            for _ in range(WORKERS):
                crew.start()
            wait_until(lambda: all(w.ready() for w in crew.current), "every worker to start calling")
            end = time.monotonic() + RUN_DEADLINE
            tick = time.monotonic()
            while kills < MIN_KILLS or crew.calls() < MIN_CALLS or not taken_over():
                assert time.monotonic() < end, f"{kills} kills, {crew.calls()} calls in {RUN_DEADLINE} s"
                tick = max(tick + KILL_EVERY, time.monotonic())
                time.sleep(max(0.0, tick - time.monotonic()))
                kills += crew.kill_one()
                _gc(group, live_gc)  # an operator's gc alongside the traffic, as housekeeping does
            crew.finish()
        finally:
            crew.reap()
        summary: dict[str, object] = {
            "seed": seed,
            "chaos_seconds": round(time.monotonic() - began, 1),
            "workers": len(crew.everyone),
            "kills": kills,
        }

        # Every logged call ended with an outcome the contract allows, and its own key's.
        tally = dict.fromkeys((*OUTCOMES, "shared", "torn"), 0)
        bad = []
        for w in crew.everyone:
            records, torn = w.records()
            tally["torn"] += torn
            for rec in records:
                kind = _classify(rec)
                if kind is None:
                    bad.append(rec)
                else:
                    tally[kind] += 1
                    tally["shared"] += rec.get("shared") is True
        calls = sum(tally[k] for k in OUTCOMES)
        summary |= {"calls": calls, **tally, **{f"live_gc_{k}": v for k, v in live_gc.items()}}
        print(f"chaos: {json.dumps(summary)}")
        assert not bad, f"{len(bad)} of {calls + len(bad)} calls ended wrongly: {bad[:5]}"
        assert calls >= MIN_CALLS

        # What the dead left is reclaimed: by the waiters and housekeeping during the run, gc here.
        drain_gc: dict[str, int] = {}

        def drained() -> bool:
            _gc(group, drain_gc)
            return not group.inflight()

        wait_until(drained, "inflight() to drain")
        stats = group.stats()
        print(f"drain: {json.dumps({'gc': drain_gc, 'stats': stats})}")
        assert stats["fallbacks"] == 0
        assert table_problems(group) == []
        executions = sum(len(Path(f"{w.log}.runs").read_bytes()) for w in crew.everyone)
        assert executions <= stats["runs"]  # a kill between the claim and fn's first line: one less
        assert stats["takeovers"] <= stats["aborts"]  # at most one re-execution per abort
        if on_abort == "raise":
            assert stats["takeovers"] == 0

    # A fresh process runs fn itself on every key: no call of the chaos is left joinable.
    out = tmp_path / "fresh.json"
    proc = mp_context("spawn").Process(target=workers.chaos_fresh, args=(name, str(out), TIMEOUT))
    proc.start()
    proc.join(DEADLINE)
    assert proc.exitcode == 0
    assert json.loads(out.read_text()) == {k: [workers.chaos_value(k), False] for k in workers.CHAOS_KEYS}

    # Nothing but the table and its semaphores is left in /dev/shm: no result segment.
    table = f"mpf{_layout.LAYOUT_VERSION}@{name}"
    assert [e for e in shm_entries(name) if e != table and not e.startswith(f"sem.{table}@s")] == []
    print(f"seconds: {time.monotonic() - began:.1f}")


# -- the same, with SIGINTs that the workers survive ------------------------------------------------------

# The cadence of the SIGINTs between kills: one to a random worker every 0 to this many seconds.
SIGINT_EVERY = 0.004
# Every running worker logs a line (a call, or the interrupts it caught) at least this often; its calls
# are bounded by TIMEOUT, so only a deadlock exceeds it. Not a speed target.
PROGRESS_DEADLINE = 10.0
# With every worker stopped, what survivors left must be gone within this, without gc().
DRAIN_DEADLINE = 10.0


def _dead_leftovers(group: mpflight.Group) -> list[str]:
    """Calls whose owner is dead, and records of dead waiters: what only gc or housekeeping reclaims."""
    import psutil

    found = []
    for c in group.inflight():
        if not c.owner_alive:
            found.append(f"{c.state} call of {c.key!r} by dead owner {c.owner_pid}")
        found += [
            f"record of dead waiter {pid} on {c.key!r}" for pid in c.waiter_pids if not psutil.pid_exists(pid)
        ]
    return found


@pytest.mark.chaos
@pytest.mark.timeout(120)
def test_kills_and_survived_interrupts_under_load_leave_nothing_behind(name: str, tmp_path: Path) -> None:
    """The chaos test, with SIGINTs on top of the SIGKILLs: workers catch each KeyboardInterrupt and go on.

    After the run, kills stop first, and the workers' own housekeeping reclaims what the killed ones left
    (the test calls no gc()); then the workers stop, and whatever is still in the table was left by a
    process that survived its interrupts: inflight() must drain, and /dev/shm hold only the table and its
    semaphores.
    """
    began = time.monotonic()
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    crew = Crew(name, tmp_path, random.Random(seed + 1), target=workers.chaos_interrupted)
    kills = sigints = 0
    progress: dict[int, tuple[int, float]] = {}  # pid -> (lines, when that count was first seen)

    def check_progress() -> None:
        now = time.monotonic()
        for w in crew.current:
            lines = w.calls()
            seen = progress.get(w.proc.pid)
            if seen is None or seen[0] != lines:
                progress[w.proc.pid] = (lines, now)
            else:
                assert now - seen[1] < PROGRESS_DEADLINE, (
                    f"worker {w.proc.pid} made no progress for {PROGRESS_DEADLINE} s (a deadlock?)"
                )

    def interrupt_until(until: float) -> int:
        sent = 0
        while time.monotonic() < until:
            time.sleep(rng.random() * SIGINT_EVERY)
            calling = [w for w in crew.current if w.calls() > 0]  # inside its loop's try: it survives
            if calling:
                w = rng.choice(calling)
                if w.proc.exitcode is None:  # not reaped: its pid is still its own
                    os.kill(w.proc.pid, signal.SIGINT)
                    sent += 1
        return sent

    with mpflight.Group(name) as group:
        try:
            for _ in range(WORKERS):
                crew.start()
            wait_until(lambda: all(w.ready() for w in crew.current), "every worker to start calling")
            end = time.monotonic() + RUN_DEADLINE
            tick = time.monotonic()
            while kills < MIN_KILLS or crew.calls() < MIN_CALLS:
                assert time.monotonic() < end, f"{kills} kills, {crew.calls()} calls in {RUN_DEADLINE} s"
                tick = max(tick + KILL_EVERY, time.monotonic())
                sigints += interrupt_until(tick)
                kills += crew.kill_one()
                check_progress()
            # No more kills: the survivors' housekeeping reclaims what the killed workers left.
            drain_end = time.monotonic() + DRAIN_DEADLINE
            while _dead_leftovers(group):
                assert time.monotonic() < drain_end, (
                    f"not reclaimed by housekeeping: {_dead_leftovers(group)}"
                )
                sigints += interrupt_until(time.monotonic() + KILL_EVERY)
                check_progress()
            crew.finish()
        finally:
            crew.reap()

        tally = dict.fromkeys((*OUTCOMES, "shared", "torn", "interrupted"), 0)
        bad = []
        for w in crew.everyone:
            records, torn = w.records()
            tally["torn"] += torn
            for rec in records:
                if rec["kind"] == "interrupted":
                    tally["interrupted"] += rec["n"]
                    continue
                kind = _classify(rec)
                if kind is None:
                    bad.append(rec)
                else:
                    tally[kind] += 1
                    tally["shared"] += rec.get("shared") is True
        calls = sum(tally[k] for k in OUTCOMES)
        summary = {
            "seed": seed,
            "workers": len(crew.everyone),
            "kills": kills,
            "sigints": sigints,
            "calls": calls,
        }
        print(f"interrupted chaos: {json.dumps(summary | tally)}")
        assert not bad, f"{len(bad)} of {calls + len(bad)} calls ended wrongly: {bad[:5]}"
        assert calls >= MIN_CALLS

        # Every worker has exited: nothing of theirs may remain, and nobody runs gc.
        try:
            wait_until(lambda: not group.inflight(), "inflight() to drain without gc", DRAIN_DEADLINE)
        except AssertionError:
            raise AssertionError(
                f"left in the table by processes that survived: {group.inflight()}"
            ) from None
        table = f"mpf{_layout.LAYOUT_VERSION}@{name}"
        assert [e for e in shm_entries(name) if e != table and not e.startswith(f"sem.{table}@s")] == []
    print(f"seconds: {time.monotonic() - began:.1f}")
