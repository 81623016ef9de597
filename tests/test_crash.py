"""Crash safety: processes killed at any step never wedge the table, lose or mix up a result.

Each mechanism's test also runs with the mechanism switched off (MPFLIGHT_TEST_DISABLE, read by the
process that would use it) and shows the failure it prevents.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import psutil
import pytest

import mpflight
from mpflight import _layout
from mpflight._table import RUNNING
from tests import workers
from tests.conftest import shm_entries
from tests.helpers import (
    DEADLINE,
    ROOT,
    Gate,
    join_in_thread,
    mp_context,
    remote_owner,
    start_subprocess,
    table_problems,
    wait_until,
    waiting,
)

# Bounds the waits of joiners that are expected to give up: long enough that an owner check (every
# 0.2 s) would have found a dead owner many times over.
GIVE_UP = 3.0


def joiner(
    name: str, key: str, tmp: Path, tag: str, *, timeout: float = DEADLINE, clock_step: float = 0, **env: str
) -> tuple[subprocess.Popen[bytes], Path, Path]:
    """A subprocess that joins key and writes its outcome; returns (process, outcome file, checks file)."""
    out, checks = tmp / f"join-{tag}", tmp / f"checks-{tag}"
    env.setdefault("MPFLIGHT_FAULT", "")
    proc = start_subprocess(
        "join", name, key, str(out), str(timeout), "0.2", str(clock_step), str(checks), **env
    )
    return proc, out, checks


def outcome(out: Path) -> dict[str, Any]:
    return json.loads(out.read_text())  # type: ignore[no-any-return]


def lines(path: Path) -> int:
    return len(path.read_text().split()) if path.exists() else 0


def run_worker(*args: str, **env: str) -> Any:
    """Run ``python -m tests.workers ARGS OUT`` to completion; return what it wrote to OUT."""
    out = Path(args[-1])
    proc = start_subprocess(*args, **{"MPFLIGHT_FAULT": "", **env})
    assert proc.wait(DEADLINE) == 0
    return json.loads(out.read_text())


# -- owner death inside fn: the owner check --------------------------------------------------------


@pytest.mark.parametrize("death", ["sigkill", "exit", "segfault"])
def test_owner_dying_inside_fn_aborts_every_waiter(name: str, tmp_path: Path, death: str) -> None:
    proc, gate, _ = remote_owner(name, "k", death, tmp_path)
    with mpflight.Group(name) as group:
        thread, box = join_in_thread(group, "k")
        other, out, _ = joiner(name, "k", tmp_path, "other")
        wait_until(lambda: waiting(group, "k") == 2, "two waiters")
        gate.open()
        thread.join(DEADLINE)
        assert other.wait(DEADLINE) == 0
        proc.join(DEADLINE)
        assert proc.exitcode != 0
        [error] = box
        assert isinstance(error, mpflight.AbortError)
        assert (error.key, error.owner_pid) == ("k", proc.pid)
        assert outcome(out) == {
            "kind": "AbortError",
            "key": "k",
            "owner_pid": proc.pid,
            "reason": "owner died",
        }
        assert group.do_ex("k", lambda: "fresh") == mpflight.Result("fresh", False)
        assert group.inflight() == []
        assert group.stats()["aborts"] == 1
        assert table_problems(group) == []


def test_without_the_owner_check_waiters_of_a_dead_owner_hang(name: str, tmp_path: Path) -> None:
    proc, gate, _ = remote_owner(name, "k", "sigkill", tmp_path)
    waiter, out, _ = joiner(name, "k", tmp_path, "w", timeout=GIVE_UP, MPFLIGHT_TEST_DISABLE="owner-check")
    with mpflight.Group(name) as group:
        wait_until(lambda: waiting(group, "k") == 1, "the waiter")
        gate.open()
        assert waiter.wait(DEADLINE) == 0
        proc.join(DEADLINE)
        assert outcome(out)["kind"] == "WaitTimeout"
        wait_until(lambda: group.inflight() == [], "the dead call, nobody's now, to be reclaimed")


def test_check_interval_is_a_group_option(name: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="check_interval"):
        mpflight.Group(name, check_interval=0)
    proc, gate, _ = remote_owner(name, "k", "sigkill", tmp_path)
    with mpflight.Group(name, check_interval=0.05) as group:
        thread, box = join_in_thread(group, "k")
        wait_until(lambda: waiting(group, "k") == 1, "the waiter")
        gate.open()
        thread.join(DEADLINE)
        proc.join(DEADLINE)
    assert isinstance(box[0], mpflight.AbortError)


# -- identity: zombies, reused pids, clock steps, pid namespaces -----------------------------------


@pytest.mark.parametrize(("disabled", "expected"), [("", "AbortError"), ("zombie-check", "WaitTimeout")])
def test_a_zombie_owner_is_dead(name: str, tmp_path: Path, disabled: str, expected: str) -> None:
    """The owner exits inside fn and its parent (this test) does not reap it until the end."""
    gate = Gate(tmp_path)
    pid = os.fork()
    if pid == 0:  # the owner
        try:
            workers.arm()
            with mpflight.Group(name) as g:
                g.do("k", lambda: (workers.held(gate.gate, gate.runs, None), os._exit(0)))
        finally:
            os._exit(1)
    try:
        wait_until(lambda: gate.executions() == 1, "the owner to run fn")
        waiter, out, _ = joiner(name, "k", tmp_path, "w", timeout=GIVE_UP, MPFLIGHT_TEST_DISABLE=disabled)
        with mpflight.Group(name) as group:
            wait_until(lambda: waiting(group, "k") == 1, "the waiter")
            gate.open()
            assert waiter.wait(DEADLINE) == 0
            assert psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
            assert outcome(out)["kind"] == expected
    finally:
        os.waitpid(pid, 0)
    with mpflight.Group(name) as group:
        group.gc()
        assert group.inflight() == []


@pytest.mark.parametrize(("disabled", "expected"), [("", "AbortError"), ("start-time", "WaitTimeout")])
def test_a_reused_pid_is_not_the_owner(name: str, tmp_path: Path, disabled: str, expected: str) -> None:
    """The slot names a live process with the owner's pid but another start time: a recycled pid."""
    proc, gate, _ = remote_owner(name, "k", "value", tmp_path)
    with mpflight.Group(name) as group:
        t = group._table()
        with t:
            [index] = [i for i in range(t.slots) if t.states[i] == RUNNING]
            at = t.slot_off(index) + _layout.S_OWNER_START
            t.mm[at : at + 8] = (int.from_bytes(t.mm[at : at + 8], "little") + 12345).to_bytes(8, "little")
        waiter, out, _ = joiner(name, "k", tmp_path, "w", timeout=GIVE_UP, MPFLIGHT_TEST_DISABLE=disabled)
        assert waiter.wait(DEADLINE) == 0
        assert outcome(out)["kind"] == expected
        gate.open()
        proc.join(DEADLINE)
        assert proc.exitcode == 0
        group.gc()
        assert group.inflight() == []


@pytest.mark.parametrize(("disabled", "expected"), [("", "value"), ("boot-relative", "AbortError")])
def test_a_clock_step_never_makes_a_live_owner_look_dead(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, disabled: str, expected: str
) -> None:
    """The waiter's psutil reads a boot time an hour later (an NTP step) while the owner lives on."""
    monkeypatch.setenv("MPFLIGHT_TEST_DISABLE", disabled)  # the owner, a spawned child, computes alike
    proc, gate, _ = remote_owner(name, "k", "value", tmp_path)
    waiter, out, checks = joiner(name, "k", tmp_path, "w", clock_step=3600)
    with mpflight.Group(name) as group:
        wait_until(lambda: lines(checks) >= 3 or waiter.poll() is not None, "three identity checks")
        gate.open()
        assert waiter.wait(DEADLINE) == 0
        proc.join(DEADLINE)
        assert outcome(out)["kind"] == expected
        group.gc()


@pytest.mark.skipif(os.geteuid() != 0, reason="a new pid namespace needs root")
@pytest.mark.parametrize(
    ("disabled", "expected"), [("", "another pid namespace"), ("pidns-check", "attached")]
)
def test_a_process_of_another_pid_namespace_is_refused(name: str, disabled: str, expected: str) -> None:
    mpflight.Group(name).close()
    code = f"import mpflight\ntry:\n mpflight.Group({name!r}).close(); print('attached')\nexcept mpflight.MPFlightError as e: print(e)"
    env = dict(os.environ, PYTHONPATH=str(ROOT), MPFLIGHT_TEST_DISABLE=disabled)
    proc = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", code],
        env=env, capture_output=True, text=True, timeout=DEADLINE, check=False,
    )  # fmt: skip
    assert expected in proc.stdout, proc.stderr


# -- death at a named step: the kernel's lock, the dirty byte and repair ---------------------------

OWNER_STEPS = [
    # (MPFLIGHT_FAULT, what fn returns, what its waiters get)
    ("locked:1", "value", None),  # right after taking the lock to claim: nobody could join
    ("claim", "value", None),  # halfway through the slot update: RUNNING, home count not yet raised
    ("locked:2", "value", "AbortError"),  # right after taking the lock to complete
    ("completing", "value", "AbortError"),  # after making the call unjoinable, before writing
    ("result", "value", "AbortError"),  # halfway through writing an inline result
    ("result", "big", "AbortError"),  # halfway through writing a result segment
    ("publish", "value", "value"),  # DONE written, still holding the lock, nobody woken
    ("publish", "big", "value"),
    ("woken", "value", "value"),  # after waking one of the two waiters
]


@pytest.mark.parametrize(("step", "factory", "expected"), OWNER_STEPS)
def test_owner_killed_at_each_step(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: str, factory: str, expected: str | None
) -> None:
    monkeypatch.setenv("MPFLIGHT_FAULT", step)  # read by the spawned owner only: this process has imported
    gate = Gate(tmp_path)
    ctx_out = tmp_path / "owner"
    proc = workers_process(name, gate, factory, ctx_out)
    with mpflight.Group(name) as group:
        if expected is None:  # died before fn: nothing to join
            proc.join(DEADLINE)
            assert proc.exitcode == -signal.SIGKILL
            assert group.do("k", lambda: "fresh") == "fresh"
        else:
            wait_until(lambda: gate.executions() == 1, "the owner to run fn")
            thread, box = join_in_thread(group, "k")
            other, out, _ = joiner(name, "k", tmp_path, "other")
            wait_until(lambda: waiting(group, "k") == 2, "two waiters")
            gate.open()
            thread.join(DEADLINE)
            assert other.wait(DEADLINE) == 0
            proc.join(DEADLINE)
            assert proc.exitcode == -signal.SIGKILL
            got = outcome(out)
            if expected == "value":
                assert box[0].value == workers.FACTORIES[factory]()
                assert got["value"] == workers.describe(box[0].value)
            else:
                assert isinstance(box[0], mpflight.AbortError)
                assert got["kind"] == "AbortError"
            assert group.do("k", lambda: "fresh") == "fresh"
        assert group.inflight() == []
        assert table_problems(group) == []
    assert [e for e in shm_entries(name) if "@r" in e] == []


def workers_process(name: str, gate: Gate, factory: str, out: Path) -> Any:
    proc = mp_context("spawn").Process(
        target=workers.own, args=(name, "k", gate.gate, gate.runs, factory, str(out))
    )
    proc.start()
    return proc


@pytest.mark.parametrize(
    ("step", "factory"), [("join", "value"), ("leave", "value"), ("leave", "big"), ("locked:1", "value")]
)
def test_waiter_killed_at_each_step(name: str, tmp_path: Path, step: str, factory: str) -> None:
    proc, gate, _ = remote_owner(name, "k", factory, tmp_path)
    with mpflight.Group(name) as group:
        victim, _, _ = joiner(name, "k", tmp_path, "victim", MPFLIGHT_FAULT=step)
        if step != "leave":
            assert victim.wait(DEADLINE) == -signal.SIGKILL
        thread, box = join_in_thread(group, "k")
        # A victim killed at join left a record of a dead process, which inflight() reclaims at once.
        wait_until(lambda: waiting(group, "k") == (2 if step == "leave" else 1), "the waiters")
        gate.open()
        thread.join(DEADLINE)
        proc.join(DEADLINE)
        if step == "leave":
            assert victim.wait(DEADLINE) == -signal.SIGKILL
        assert box[0] == mpflight.Result(workers.FACTORIES[factory](), True)
        group.gc()  # the victim's record, if it was still counted
        assert group.inflight() == []
        assert table_problems(group) == []


def test_waiter_killed_while_aborting_a_dead_owners_call(name: str, tmp_path: Path) -> None:
    proc, gate, _ = remote_owner(name, "k", "sigkill", tmp_path)
    victim, _, _ = joiner(name, "k", tmp_path, "victim", MPFLIGHT_FAULT="abort")
    with mpflight.Group(name) as group:
        wait_until(lambda: waiting(group, "k") == 1, "the victim to wait")
        gate.open()
        assert victim.wait(DEADLINE) == -signal.SIGKILL
        proc.join(DEADLINE)
        assert group.gc() == {"calls": 1, "waiters": 1, "segments": 0}
        assert group.inflight() == []
        assert table_problems(group) == []
        assert group.do("k", lambda: "fresh") == "fresh"


@pytest.mark.parametrize("step", ["claim", "join", "leave"])
def test_without_repair_a_dead_lock_holder_leaves_the_table_broken(
    name: str, tmp_path: Path, step: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same crashes, read by a process that does not repair: the invariants are broken."""
    # The owner's reaper would take the lock (and repair) at moments of its own, before the check.
    monkeypatch.setenv("MPFLIGHT_TEST_DISABLE", "reaper")
    mpflight.Group(name).close()
    proc = None
    if step == "claim":
        assert start_subprocess("calls", name, "k", MPFLIGHT_FAULT="claim").wait(DEADLINE) == -signal.SIGKILL
    else:
        proc, gate, _ = remote_owner(name, "k", "big", tmp_path)
        victim, _, _ = joiner(name, "k", tmp_path, "victim", MPFLIGHT_FAULT=step)
        if step == "leave":  # it dies leaving, after reading the outcome
            with mpflight.Group(name) as group:
                wait_until(lambda: waiting(group, "k") == 1, "the victim to wait")
            gate.open()
        assert victim.wait(DEADLINE) == -signal.SIGKILL
    # Read before any other process takes the lock (and repairs).
    broken = run_worker("check", name, str(tmp_path / "broken"), MPFLIGHT_TEST_DISABLE="repair")
    assert broken != []
    if proc is not None:
        gate.open()
        proc.join(DEADLINE)
    with mpflight.Group(name) as group:
        assert table_problems(group) == []  # this process repairs
        group.gc()


# -- waiter death and departure: reclaimed records, stale wake-ups ---------------------------------


def test_a_waiter_killed_while_blocked(name: str, tmp_path: Path) -> None:
    """The others still get their wake-ups; the dead waiter's record is reclaimed."""
    proc, gate, _ = remote_owner(name, "k", "big", tmp_path)
    victim, _, _ = joiner(name, "k", tmp_path, "victim")
    with mpflight.Group(name) as group:
        thread, box = join_in_thread(group, "k")
        other, out, _ = joiner(name, "k", tmp_path, "other")
        wait_until(lambda: waiting(group, "k") == 3, "three waiters")
        victim.kill()
        victim.wait(DEADLINE)
        gate.open()
        thread.join(DEADLINE)
        assert other.wait(DEADLINE) == 0
        proc.join(DEADLINE)
        assert box[0].value == workers.FACTORIES["big"]()
        assert outcome(out)["value"] == workers.describe(box[0].value)
        # The dead one's record (and with it the outcome and its segment) is reclaimed with no gc():
        # by this idle process's reaper, or by inflight() itself. tests/test_reliability.py shows it
        # stays without the reaper or the dead-waiters mechanism.
        wait_until(lambda: group.inflight() == [], "the dead waiter's record to go")
        assert table_problems(group) == []


def test_housekeeping_reclaims_a_dead_waiter_on_its_own(name: str, tmp_path: Path) -> None:
    proc, gate, _ = remote_owner(name, "k", "big", tmp_path)
    victim, _, _ = joiner(name, "k", tmp_path, "victim")
    with mpflight.Group(name) as group:
        wait_until(lambda: waiting(group, "k") == 1, "the victim")
        victim.kill()
        victim.wait(DEADLINE)
        gate.open()
        proc.join(DEADLINE)
        # Calls go on as usual; within two housekeeping intervals one of them reclaims the stuck call.
        wait_until(lambda: group.do("other", lambda: True) and group.inflight() == [], "housekeeping")
        assert table_problems(group) == []


def test_a_waiter_interrupted_while_blocked_leaves_cleanly(name: str, tmp_path: Path) -> None:
    proc, gate, _ = remote_owner(name, "k", "value", tmp_path)
    victim, _, _ = joiner(name, "k", tmp_path, "victim")
    with mpflight.Group(name) as group:
        thread, box = join_in_thread(group, "k")
        wait_until(lambda: waiting(group, "k") == 2, "two waiters")
        victim.send_signal(signal.SIGINT)
        assert victim.wait(DEADLINE) != 0  # KeyboardInterrupt
        wait_until(lambda: waiting(group, "k") == 1, "the count to drop")
        gate.open()
        thread.join(DEADLINE)
        proc.join(DEADLINE)
        assert box[0] == mpflight.Result("the value", True)
        assert group.inflight() == []
        assert table_problems(group) == []


def test_a_later_generation_gets_no_stale_wake_up(name: str, tmp_path: Path) -> None:
    """A waiter killed after its post was sent leaves that post behind; the next call of the slot
    is woken by it once, sees its own call still running, and waits on for its own value."""
    mpflight.Group(name, slots=1).close()
    first, second = Gate(tmp_path, "1"), Gate(tmp_path, "2")
    ctx = mp_context("spawn")
    owner1 = ctx.Process(
        target=workers.call, args=(name, "a", first.gate, first.runs, str(tmp_path / "o1"), "A")
    )
    owner1.start()
    wait_until(lambda: first.executions() == 1, "the first owner")
    with mpflight.Group(name) as group:
        victim, _, _ = joiner(name, "a", tmp_path, "victim")
        thread, box = join_in_thread(group, "a")
        wait_until(lambda: waiting(group, "a") == 2, "two waiters")
        os.kill(victim.pid, signal.SIGSTOP)  # it will not take its post
        first.open()
        thread.join(DEADLINE)
        owner1.join(DEADLINE)
        victim.kill()
        victim.wait(DEADLINE)
        assert box[0] == mpflight.Result("A", True)
        assert group.gc()["waiters"] == 1
        assert group.inflight() == []
        sem = mpflight._locks.posix_ipc.Semaphore(group._table().sems.name(0))
        assert sem.value == 1, "the dead waiter's post is still there"
        sem.close()
        owner2 = ctx.Process(
            target=workers.call, args=(name, "b", second.gate, second.runs, str(tmp_path / "o2"), "B")
        )
        owner2.start()
        wait_until(lambda: second.executions() == 1, "the second owner")
        thread, box = join_in_thread(group, "b")
        wait_until(lambda: waiting(group, "b") == 1, "a waiter of the second call")
        second.open()
        thread.join(DEADLINE)
        owner2.join(DEADLINE)
        assert box[0] == mpflight.Result("B", True)


# -- table identity: the table removed under live workers ------------------------------------------

REPLACED = textwrap.dedent(
    """
    import json, sys, time
    import mpflight
    name = sys.argv[1]
    group = mpflight.Group(name)
    group.do("probe", int)
    print("attached", flush=True)
    sys.stdin.readline()  # the table was unlinked and made anew; a call is held in the new one
    end = time.monotonic() + 3  # three housekeeping intervals of ordinary calls
    while time.monotonic() < end:
        group.do("probe", int)
        time.sleep(0.01)
    value, shared = group.do_ex("k", lambda: "ran in a table of its own")
    print(json.dumps([value, shared]), flush=True)
    group.close()
    """
)


@pytest.mark.parametrize(
    ("disabled", "expected"),
    [("", ["the value", True]), ("table-identity", ["ran in a table of its own", False])],
)
def test_a_removed_table_is_noticed_and_replaced(
    name: str, tmp_path: Path, disabled: str, expected: list[object]
) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT), MPFLIGHT_TEST_DISABLE=disabled)
    with subprocess.Popen(
        [sys.executable, "-c", REPLACED, name],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as worker:
        assert worker.stdout is not None
        assert worker.stdin is not None
        assert worker.stdout.readline() == "attached\n"
        assert mpflight.unlink(name)
        proc, gate, _ = remote_owner(name, "k", "value", tmp_path)  # creates the table anew
        worker.stdin.write("go\n")
        worker.stdin.flush()
        with mpflight.Group(name) as group:
            wait_until(lambda: waiting(group, "k") == 1 or worker.poll() is not None, "the worker to join")
            gate.open()
            assert json.loads(worker.stdout.readline()) == expected
            assert worker.wait(DEADLINE) == 0
            proc.join(DEADLINE)


# -- a crashed deployment: the next start repairs and reclaims -------------------------------------


def test_a_table_left_by_a_crashed_deployment(name: str, tmp_path: Path) -> None:
    """Owners in fn, waiters blocked, a result being read, a process dead inside the lock: all killed."""
    procs = []
    gates = []
    for key, factory in [("a", "value"), ("b", "big")]:
        proc, gate, _ = remote_owner(name, key, factory, tmp_path)
        procs.append(proc)
        gates.append(gate)
    joiners = [joiner(name, key, tmp_path, f"j{key}")[0] for key in ("a", "a", "b")]
    with mpflight.Group(name) as group:
        wait_until(lambda: waiting(group, "a") == 2 and waiting(group, "b") == 1, "the waiters")
    assert start_subprocess("calls", name, "c", MPFLIGHT_FAULT="claim").wait(DEADLINE) == -signal.SIGKILL
    for p in procs:
        p.kill()
        p.join(DEADLINE)
    for j in joiners:
        j.kill()
        j.wait(DEADLINE)
    # The next start: a fresh process uses every key as if nothing happened.
    start = start_subprocess("calls", name, "a", "b", "c", "d", MPFLIGHT_FAULT="")
    assert start.wait(DEADLINE) == 0
    with mpflight.Group(name) as group:
        group.gc()
        assert group.inflight() == []
        assert table_problems(group) == []


# -- waits that can never end: the cycle check -----------------------------------------------------


def _cycle(name: str, mine: str, other: str, gate: str, runs: str, out: str, timeout: float) -> None:
    workers.arm()
    with mpflight.Group(name, timeout=timeout) as group:

        def fn() -> object:
            workers.held(gate, runs, None)
            return group.do(other, lambda: "never")

        try:
            group.do(mine, fn)
            result = {"kind": "value"}
        except Exception as e:
            result = {"kind": type(e).__name__, "message": str(e), "keys": getattr(e, "keys", None)}
    Path(out).write_text(json.dumps(result))


@pytest.mark.parametrize(("disabled", "expected"), [("", "DeadlockError"), ("cycle-check", "WaitTimeout")])
def test_a_cross_process_cycle_is_refused(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, disabled: str, expected: str
) -> None:
    """P owns A and waits on B; Q owns B and then asks for A: Q's wait would close the cycle."""
    monkeypatch.setenv("MPFLIGHT_TEST_DISABLE", disabled)
    ctx = mp_context("spawn")
    gp, gq = Gate(tmp_path, "p"), Gate(tmp_path, "q")
    p = ctx.Process(target=_cycle, args=(name, "A", "B", gp.gate, gp.runs, str(tmp_path / "p"), GIVE_UP))
    q = ctx.Process(target=_cycle, args=(name, "B", "A", gq.gate, gq.runs, str(tmp_path / "q"), GIVE_UP))
    p.start()
    q.start()
    with mpflight.Group(name) as group:
        wait_until(lambda: gp.executions() == gq.executions() == 1, "both owners in fn")
        gp.open()
        wait_until(lambda: waiting(group, "B") == 1, "P to wait on B")
        gq.open()
        p.join(DEADLINE)
        q.join(DEADLINE)
        group.gc()
    got = json.loads((tmp_path / "q").read_text())
    assert got["kind"] == expected
    if expected == "DeadlockError":
        assert got["keys"] == ["A", "B"]
        assert "'A' -> 'B'" in got["message"]


def test_threads_cycle_in_one_process_is_refused(name: str) -> None:
    """Two threads of one process, each owning a key and asking for the other's."""
    with mpflight.Group(name, timeout=DEADLINE) as group:
        b_waits = threading.Event()
        results: dict[str, object] = {}

        def owner_a() -> None:
            def fn() -> object:
                wait_until(lambda: any(c.key == "B" for c in group.inflight()), "B to be claimed")
                return group.do("B", lambda: "never")

            try:
                results["a"] = group.do("A", fn)
            except Exception as e:
                results["a"] = e

        def owner_b() -> None:
            def fn() -> object:
                wait_until(lambda: waiting(group, "B") == 1, "A's owner to wait on B")
                b_waits.set()
                return group.do("A", lambda: "never")

            try:
                results["b"] = group.do("B", fn)
            except Exception as e:
                results["b"] = e

        ta = threading.Thread(target=owner_a)
        ta.start()
        wait_until(lambda: any(c.key == "A" for c in group.inflight()), "A to be claimed")
        tb = threading.Thread(target=owner_b)
        tb.start()
        ta.join(DEADLINE)
        tb.join(DEADLINE)
    assert b_waits.is_set()
    assert isinstance(results["b"], mpflight.DeadlockError)
    assert isinstance(results["a"], mpflight.DeadlockError)  # B's outcome, shared with A's owner


# -- gc: orphaned segments, decided under the table lock -------------------------------------------


def test_gc_never_unlinks_a_segment_being_written(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """gc decides which segments are orphans while it holds the table lock, which an owner needs
    before it may make a segment: so the segment of a call that is completing is never taken for
    an orphan. (Listing outside the lock lost a live segment under the chaos test.)"""
    gate = Gate(tmp_path)
    listed_under_lock: list[bool] = []
    real_listdir = os.listdir

    with mpflight.Group(name) as group:
        t = group._table()

        def listdir(path: Any) -> list[str]:
            if path == "/dev/shm":
                listed_under_lock.append(t.holding())
                gate.open()  # fn returns now; its owner goes for the lock to publish its segment
            return real_listdir(path)

        owner = group.do_future("k", workers.held, gate.gate, gate.runs, "x" * 5000)
        wait_until(lambda: gate.executions() == 1, "the owner in fn")
        waiter, out, _ = joiner(name, "k", tmp_path, "w")
        wait_until(lambda: waiting(group, "k") == 1, "a waiter in another process")
        monkeypatch.setattr(mpflight._group.os, "listdir", listdir)
        group.gc()
        monkeypatch.undo()
        assert owner.result(DEADLINE).value == "x" * 5000
        assert waiter.wait(DEADLINE) == 0
    assert listed_under_lock == [True]
    assert outcome(out) == {"kind": "value", "value": "x" * 5000, "shared": True}
