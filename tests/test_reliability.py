"""Reliability: deadlines bound the table lock, close() against calls in flight, "is this me" by
identity, and nothing dead lingers in a quiet table (each process's reaper).

Each mechanism's test also runs with it switched off (MPFLIGHT_TEST_DISABLE, read at import, so that
side runs in a child process) and shows the failure it prevents.
"""

from __future__ import annotations

import asyncio
import json
import logging
import mmap
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import mpflight
from mpflight import _layout
from mpflight._errors import start_thread
from mpflight._locks import object_name
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

pytestmark = pytest.mark.timeout(90)

# How long a test lets a call that must not finish run before it calls it blocked. Only the side with
# a mechanism switched off waits this long; it bounds nothing else.
BLOCKED_FOR = 3.0


def child(code: str, *, disabled: str = "", **popen: Any) -> subprocess.Popen[str]:
    """A fresh interpreter running ``code`` (mpflight imported after the environment is set)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), MPFLIGHT_TEST_DISABLE=disabled)
    popen.setdefault("stdout", subprocess.PIPE)
    return subprocess.Popen([sys.executable, "-c", code], env=env, cwd=ROOT, text=True, **popen)


def hold_lock(name: str, tmp_path: Path, *, stop: bool) -> subprocess.Popen[str]:
    """A process that takes the table lock and keeps it (SIGSTOPped, when ``stop``) until killed."""
    ready = tmp_path / "locked"
    code = (
        "import fcntl, os, signal, sys, time\n"
        f"fd = os.open('/dev/shm/{object_name(name).lstrip('/')}', os.O_RDWR)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        f"open({str(ready)!r}, 'w').close()\n"
        f"if {stop}: os.kill(os.getpid(), signal.SIGSTOP)\n"
        "time.sleep(120)\n"
    )
    proc = child(code, stdout=subprocess.DEVNULL)
    wait_until(ready.exists, "the lock holder")
    return proc


def release(proc: subprocess.Popen[str]) -> None:
    proc.kill()
    proc.communicate(timeout=DEADLINE)


# -- deadlines: timeouts bound every wait, the table lock included ----------------------------------------


@pytest.mark.parametrize("disabled", ["", "lock-deadline"])
def test_a_stopped_lock_holder_cannot_keep_a_timed_call(name: str, tmp_path: Path, disabled: str) -> None:
    """A process SIGSTOPped while it holds the table lock: Group(timeout=1).do() raises TimeoutError
    at its deadline instead of waiting for as long as the holder stays stopped; so does attaching."""
    mpflight.Group(name).close()
    caller = child(
        "import json, sys, time, mpflight\n"
        f"g = mpflight.Group({name!r}, timeout=1)\n"
        "print('attached', flush=True)\n"
        "sys.stdin.readline()\n"
        "outcomes = []\n"
        "for call in (lambda: g.do('unrelated', int),):\n"
        "    began = time.monotonic()\n"
        "    try:\n        call()\n        outcomes.append(['returned', 0])\n"
        "    except TimeoutError as e:\n        outcomes.append([type(e).__name__, time.monotonic() - began])\n"
        "print(json.dumps(outcomes))\n",
        disabled=disabled,
        stdin=subprocess.PIPE,
    )
    assert caller.stdout is not None and caller.stdin is not None
    assert caller.stdout.readline() == "attached\n"
    holder = hold_lock(name, tmp_path, stop=True)
    try:
        caller.stdin.write("go\n")
        caller.stdin.flush()
        if disabled:
            with pytest.raises(subprocess.TimeoutExpired):
                caller.wait(BLOCKED_FOR)  # blocked behind the stopped holder
            caller.kill()
            caller.communicate(timeout=DEADLINE)
            return
        out, _ = caller.communicate(timeout=DEADLINE)
        [(kind, elapsed)] = json.loads(out)
        assert kind == "WaitTimeout"
        assert elapsed < DEADLINE  # it did not wait for the holder, which never lets go
        attach = child(
            f"import mpflight\ntry:\n mpflight.Group({name!r}, timeout=1)\nexcept TimeoutError: print('timeout')"
        )
        assert attach.communicate(timeout=DEADLINE)[0] == "timeout\n"  # attaching is bounded too
    finally:
        release(holder)


def _interrupted_start(monkeypatch: pytest.MonkeyPatch, prefix: str) -> None:
    """Thread.start of mpflight's threads named ``prefix...`` ends as CPython ends it when a signal
    handler raises while start waits for the thread to run: the thread runs, and start raises
    RuntimeError("release unlocked lock") with the KeyboardInterrupt as its context."""
    start = threading.Thread.start

    def interrupted(thread: threading.Thread) -> None:
        start(thread)
        if thread.name.startswith(prefix):
            try:
                raise KeyboardInterrupt
            except KeyboardInterrupt:  # the follow-on is raised while it is handled: it is the context
                raise RuntimeError("release unlocked lock") from None

    monkeypatch.setattr(threading.Thread, "start", interrupted)


def test_an_interruption_as_the_lock_helper_starts_reaches_the_caller_as_itself(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A timed call that finds the table lock held starts a helper thread to wait in flock; a signal
    handler's KeyboardInterrupt during that start reaches the caller as the KeyboardInterrupt (not
    as CPython's RuntimeError about the Event's lock), and the helper, which runs, gives the lock back
    once it gets it: the next call goes through."""
    with mpflight.Group(name, timeout=DEADLINE) as group:
        holder = hold_lock(name, tmp_path, stop=False)
        try:
            _interrupted_start(monkeypatch, "mpflight-lock")
            with pytest.raises(KeyboardInterrupt):
                group.do("k", lambda: pytest.fail("fn ran though the lock was never taken"))
            monkeypatch.undo()
        finally:
            release(holder)
        assert group.do("k", lambda: "after") == "after"
        assert group.inflight() == []


def test_start_thread_leaves_other_errors_as_they_are() -> None:
    """No thread to start (RuntimeError "can't start new thread") is raised as it is, whatever it
    was raised while handling."""
    thread = threading.Thread(target=lambda: None)
    thread.start()
    thread.join()
    try:
        raise KeyboardInterrupt
    except KeyboardInterrupt:
        with pytest.raises(RuntimeError, match="threads can only be started once"):
            start_thread(thread)


@pytest.mark.parametrize("started", ["interpreter", "fork", "forkserver", "spawn"])
def test_a_give_up_handed_to_the_reaper_still_runs_when_its_process_exits(
    name: str, tmp_path: Path, started: str
) -> None:
    """A waiter whose time runs out while the table lock is held hands its give-up to the reaper and
    returns WaitTimeout at once; then its process exits: an interpreter of its own, or a
    multiprocessing child (fork's and forkserver's end with os._exit, which runs no atexit hook;
    spawn's exit as an interpreter does). The give-up still runs, at
    the exit: the timeout is counted and the record is gone. (The reaper thread dies with the process:
    without the exit's run, the count is lost and the record stays for another process to reclaim.)"""
    owner, gate, _ = remote_owner(name, "k", "value", tmp_path)
    exiting = tmp_path / "exiting"
    with mpflight.Group(name) as group:
        if started == "interpreter":
            waiter: Any = child(
                "import atexit, mpflight\n"
                # registered after mpflight's own handler, so run before it: the lock is let go meanwhile
                f"atexit.register(lambda: open({str(exiting)!r}, 'w').close())\n"
                f"g = mpflight.Group({name!r}, timeout=1.0)\n"
                "try:\n    g.do('k', lambda: 'ran')\nexcept mpflight.WaitTimeout:\n    print('WaitTimeout')\n"
            )
        else:
            waiter = mp_context(started).Process(target=workers.give_up_and_exit, args=(name, str(exiting)))
            waiter.start()
        wait_until(lambda: waiting(group, "k") == 1, "the waiter")
        holder = hold_lock(name, tmp_path, stop=False)  # taken well before the waiter's deadline
        try:
            wait_until(exiting.exists, "the waiter to exit")
        finally:
            holder.kill()
            holder.wait()
        if started == "interpreter":
            out, _ = waiter.communicate(timeout=DEADLINE)
            assert (out.split(), waiter.returncode) == (["WaitTimeout"], 0)
        else:
            waiter.join(DEADLINE)
            assert waiter.exitcode == 0
        assert group.stats()["timeouts"] == 1
        assert waiting(group, "k") == 0
        gate.open()
        owner.join(DEADLINE)
        assert owner.exitcode == 0


def test_an_owner_gets_its_value_though_the_lock_is_held_past_its_deadline(name: str, tmp_path: Path) -> None:
    """fn returned while a stopped process holds the lock: the owner's caller gets the value at its
    deadline, and the publication its waiter needs is finished in the background once the lock frees."""
    gate = Gate(tmp_path)
    with mpflight.Group(name, timeout=1) as group:
        owner = group.do_future("k", workers.held, gate.gate, gate.runs, "the value")
        wait_until(lambda: gate.executions() == 1, "the owner in fn")
        waiter = child(
            f"import json, mpflight\ng = mpflight.Group({name!r})\nprint(json.dumps(g.do_ex('k', int)))\n"
        )
        wait_until(lambda: waiting(group, "k") == 1, "a waiter in another process")
        holder = hold_lock(name, tmp_path, stop=True)
        try:
            gate.open()
            assert owner.result(DEADLINE) == ("the value", True)  # at the deadline, not when the lock frees
            assert waiter.poll() is None  # its outcome is not published yet: the lock is still held
        finally:
            release(holder)
        out, _ = waiter.communicate(timeout=DEADLINE)
        assert json.loads(out) == ["the value", True]


def test_an_owner_whose_fn_raises_while_the_lock_is_held_keeps_its_deadline(
    name: str, tmp_path: Path
) -> None:
    """fn raised while a stopped process holds the lock: the owner's caller gets fn's exception at its
    deadline, and its waiter gets fn's exception too (not an abort) once the lock frees: the ending of
    the call handed to the reaper is not undone by the caller's own recovery."""
    release_fn = threading.Event()

    def fn() -> None:
        assert release_fn.wait(DEADLINE)
        raise ValueError("boom")

    with mpflight.Group(name, timeout=1) as group:
        owner = group.do_future("k", fn)
        waiter = child(
            "import json, mpflight\n"
            f"g = mpflight.Group({name!r})\n"
            "try:\n    g.do('k', int)\nexcept Exception as e:\n    print(json.dumps([type(e).__name__, str(e)]))\n"
        )
        wait_until(lambda: waiting(group, "k") == 1, "a waiter in another process")
        holder = hold_lock(name, tmp_path, stop=True)
        try:
            release_fn.set()
            assert isinstance(owner.exception(DEADLINE), ValueError)  # at the deadline: the lock is held
            assert waiter.poll() is None  # its outcome is not published yet
        finally:
            release(holder)
        out, _ = waiter.communicate(timeout=DEADLINE)
        assert json.loads(out) == ["ValueError", "boom"]
        wait_until(lambda: group.inflight() == [], "the call to end")
        stats = group.stats()
        assert (stats.errors, stats.aborts) == (1, 0)


def test_a_long_wait_for_the_lock_is_logged_once_with_the_holder(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(mpflight._housekeeping, "LONG_LOCK_WAIT", 0.3)
    caplog.set_level(logging.WARNING, logger="mpflight")
    with mpflight.Group(name) as group:
        group.do("warm", int)  # the reaper runs from the first call on
        holder = hold_lock(name, tmp_path, stop=False)
        try:
            thread = threading.Thread(target=group.do, args=("k", int))
            thread.start()
            wait_until(lambda: "waited" in caplog.text, "the warning")
        finally:
            release(holder)
        thread.join(DEADLINE)
    warnings = [r.getMessage() for r in caplog.records if "waited" in r.getMessage()]
    assert len(warnings) == 1 and f"pid {holder.pid}" in warnings[0], warnings


# -- close() against calls in flight ----------------------------------------------------------------------


def test_close_racing_calls_never_leaks_a_call(name: str) -> None:
    """Threads keep calling while the handle they use is closed under them: each call finishes or
    raises the closed-handle ValueError, and no call of this process is left in the table."""
    errors: list[BaseException] = []
    for _ in range(50):
        group = mpflight.Group(name)
        stop = threading.Event()

        def hammer(group: mpflight.Group = group, stop: threading.Event = stop) -> None:
            while not stop.is_set():
                try:
                    group.do("k", int)
                except ValueError as e:
                    if "closed" not in str(e):
                        errors.append(e)
                    return
                except BaseException as e:
                    errors.append(e)
                    return

        threads = [threading.Thread(target=hammer) for _ in range(3)]
        for thread in threads:
            thread.start()
        group.close()
        stop.set()
        for thread in threads:
            thread.join(DEADLINE)
    assert errors == []
    with mpflight.Group(name) as group:
        assert group.inflight() == []
        assert group.do("k", lambda: "fresh") == "fresh"


# -- "is this me": by (pid, start time), and a live token of ours -----------------------------------------


def _orphan(group: mpflight.Group, key: str, tid: int) -> None:
    """Leave in the table what a caller of this process leaves when an exception takes it out of do()
    between its claim and fn: a RUNNING call of ours, nobody responsible for it, named after ``tid``."""
    caller = group._tier.caller(None)
    assert caller.enter(key, tid, True) == mpflight._protocol.OWN
    del caller  # gone: what an interrupted caller leaves


@pytest.mark.parametrize("disabled", ["", "own-identity"])
def test_a_reused_thread_ident_is_not_the_owner(name: str, disabled: str) -> None:
    """A call left by a thread that is gone names a thread ident that a new thread reuses: the new
    thread's call for the key runs fn instead of raising DeadlockError."""
    code = (
        "import json, threading, mpflight\n"
        "from tests.test_reliability import _orphan\n"
        f"g = mpflight.Group({name!r})\n"
        "_orphan(g, 'k', threading.get_ident())\n"
        "try:\n    print(json.dumps(g.do('k', lambda: 'ran')))\n"
        "except mpflight.DeadlockError as e:\n    print(json.dumps(type(e).__name__))\n"
    )
    out, _ = child(code, disabled=disabled).communicate(timeout=DEADLINE)
    assert json.loads(out) == ("DeadlockError" if disabled else "ran")


@pytest.mark.parametrize("disabled", ["", "own-identity"])
def test_a_reused_pid_is_not_ourselves(name: str, tmp_path: Path, disabled: str) -> None:
    """A call whose owner had this process's pid and another start time (its pid was reused): this
    process's call for the key is not refused as its own."""
    proc, gate, _ = remote_owner(name, "k", "value", tmp_path)
    code = (
        "import json, os, threading, mpflight\n"
        "from mpflight import _layout\n"
        f"g = mpflight.Group({name!r})\n"
        "t = g._table()\n"
        "with t:\n"
        "    [i] = [i for i in range(t.slots) if t.states[i] == 1]\n"
        "    off = t.slot_off(i)\n"
        "    t.u32s[i * _layout.U32S + _layout.I_OWNER_PID] = os.getpid()\n"
        "    t.mm[off + _layout.S_OWNER_TID : off + _layout.S_OWNER_TID + 8] = threading.get_ident().to_bytes(8, 'little')\n"
        "try:\n    print(json.dumps(g.do('k', lambda: 'ran')))\n"
        "except mpflight.DeadlockError as e:\n    print(json.dumps(type(e).__name__))\n"
    )
    try:
        out, _ = child(code, disabled=disabled).communicate(timeout=DEADLINE)
        assert json.loads(out) == ("DeadlockError" if disabled else "ran")
    finally:
        gate.open()
        proc.join(DEADLINE)


# -- nothing dead lingers: the reaper, recovery, the counters ---------------------------------------------


def _table_view(name: str) -> tuple[mmap.mmap, _layout.Geometry]:
    """The table, mapped read-only by the test itself (no mpflight handle: no reaper of its own)."""
    fd = os.open(f"/dev/shm/{object_name(name).lstrip('/')}", os.O_RDONLY)
    try:
        slots = int.from_bytes(os.pread(fd, 4, _layout.H_SLOTS), "little")
        geo = _layout.Geometry.for_slots(slots)
        return mmap.mmap(fd, geo.size, prot=mmap.PROT_READ), geo
    finally:
        os.close(fd)


def _busy(name: str) -> tuple[int, int]:
    """(slots not FREE, records in use), read without the lock."""
    mm, geo = _table_view(name)
    with mm:
        states = mm[geo.state_map : geo.state_map + geo.slots]
        records = mm[geo.record_map : geo.record_map + geo.records]
    return geo.slots - states.count(0), geo.records - records.count(0)


@pytest.mark.parametrize("disabled", ["", "reaper", "dead-waiters"])
def test_a_killed_waiters_outcome_is_reclaimed_in_a_quiet_table(
    name: str, tmp_path: Path, disabled: str
) -> None:
    """A waiter SIGKILLed while blocked on a call with a 16 MiB result: once the owner publishes, the
    DONE slot and its segment go away within the deadline, with no traffic and no gc() (the idle
    owner's reaper). The test process keeps no handle, so no reaper of its own helps."""
    gate, quit_ = tmp_path / "gate", tmp_path / "quit"
    owner = child(
        "import os, sys, time, mpflight\n"
        "from tests import workers\n"
        f"g = mpflight.Group({name!r})\n"
        f"g.do('k', workers.held, {str(gate)!r}, {str(tmp_path / 'runs')!r}, b'x' * (16 << 20))\n"
        "print('returned', flush=True)\n"
        f"while not os.path.exists({str(quit_)!r}):\n    time.sleep(0.01)\n",
        disabled=disabled,
    )
    wait_until((tmp_path / "runs").exists, "the owner in fn")
    victim = child(f"import mpflight\nmpflight.Group({name!r}).do('k', int)\n", disabled=disabled)
    wait_until(lambda: _busy(name)[1] == 1, "the victim to wait")
    release(victim)
    gate.touch()
    assert owner.stdout is not None and owner.stdout.readline() == "returned\n"
    try:
        if disabled:
            time.sleep(BLOCKED_FOR)  # the side without the mechanism: nothing reclaims it
            assert _busy(name) == (1, 1) and [e for e in shm_entries(name) if "@r" in e]
            mpflight.unlink(name)  # the segment would outlive the test
        else:
            wait_until(lambda: _busy(name) == (0, 0), "the reaper to free the slot", deadline=10)
            assert [e for e in shm_entries(name) if "@r" in e] == []
    finally:
        quit_.touch()
        owner.communicate(timeout=DEADLINE)


@pytest.mark.parametrize("disabled", ["", "reaper"])
def test_a_claim_its_caller_left_behind_is_ended_by_its_processs_reaper(
    name: str, tmp_path: Path, disabled: str
) -> None:
    """A thread claims a call and leaves without ending it (what an exception inside the cleanup
    itself leaves) while a caller in another process waits for it: the process lives on, so only its
    own reaper can tell that nobody there holds the claim any more. It ends it, and the waiter gets
    AbortError instead of waiting out its timeout. (A claim is registered under its Call itself,
    which the reaper weakens when it asks: without that, the registration would hold the Call.)"""
    go, quit_ = tmp_path / "go", tmp_path / "quit"
    leaver = child(
        "import os, time, mpflight\n"
        f"g = mpflight.Group({name!r})\n"
        "g.do('warm', int)  # its first call starts the process's reaper\n"
        "caller = g._tier.caller(None)\n"
        "assert caller.enter('k', 1, True) == mpflight._protocol.OWN\n"
        "print('claimed', flush=True)\n"
        f"while not os.path.exists({str(go)!r}):\n    time.sleep(0.01)\n"
        "del caller  # gone, its claim still registered\n"
        f"while not os.path.exists({str(quit_)!r}):\n    time.sleep(0.01)\n",
        disabled=disabled,
    )
    assert leaver.stdout is not None and leaver.stdout.readline() == "claimed\n"
    timeout = BLOCKED_FOR if disabled else DEADLINE
    waiter = child(
        "import json, mpflight\n"
        f"g = mpflight.Group({name!r}, timeout={timeout})\n"
        "try:\n    print(json.dumps(g.do('k', lambda: 'ran')))\n"
        "except mpflight.MPFlightError as e:\n    print(json.dumps(type(e).__name__))\n"
    )
    try:
        with mpflight.Group(name) as g:
            wait_until(lambda: waiting(g, "k") == 1, "the waiter to join")
        go.touch()
        out, _ = waiter.communicate(timeout=DEADLINE + 10)
        assert json.loads(out) == ("WaitTimeout" if disabled else "AbortError")
    finally:
        quit_.touch()
        leaver.communicate(timeout=DEADLINE)
        waiter.kill()
        waiter.wait()


def test_inflight_lists_only_calls_with_a_live_participant(name: str, tmp_path: Path) -> None:
    dead, _, _ = remote_owner(name, "dead", "value", tmp_path)
    live, gate, _ = remote_owner(name, "live", "value", tmp_path)
    dead.kill()
    dead.join(DEADLINE)
    with mpflight.Group(name) as group:
        assert [c.key for c in group.inflight()] == ["live"]
        gate.open()
        live.join(DEADLINE)
        wait_until(lambda: group.inflight() == [], "the live call to end")


@pytest.mark.parametrize("disabled", ["", "recover"])
def test_a_cancelled_do_async_waiter_drops_its_record_at_once(
    name: str, tmp_path: Path, disabled: str
) -> None:
    """A do_async waiter cancelled (as Ctrl-C under asyncio.run cancels it) leaves at once, not when
    its wait thread next looks (here: a check interval far longer than the test)."""
    proc, gate, _ = remote_owner(name, "k", "value", tmp_path)
    code = (
        "import asyncio, json, mpflight\n"
        "from tests.helpers import wait_until, waiting\n"
        f"g = mpflight.Group({name!r}, check_interval=300)\n"
        "async def main():\n"
        "    task = asyncio.ensure_future(g.do_async('k', int))\n"
        "    while waiting(g, 'k') != 1:\n        await asyncio.sleep(0.005)\n"
        "    task.cancel()\n"
        "    try:\n        await task\n    except asyncio.CancelledError:\n        pass\n"
        "    return [c.waiters for c in g.inflight()]\n"
        "print(json.dumps(asyncio.run(main())))\n"
    )
    try:
        out, _ = child(code, disabled=disabled).communicate(timeout=DEADLINE)
        assert json.loads(out) == ([1] if disabled else [0])
    finally:
        gate.open()
        proc.join(DEADLINE)


def _interrupted() -> None:
    raise KeyboardInterrupt


def test_aborts_count_fn_left_by_keyboard_interrupt(name: str) -> None:
    with mpflight.Group(name) as group:
        with pytest.raises(KeyboardInterrupt):
            group.do("k", _interrupted)
        stats = group.stats()
    assert (stats["runs"], stats["aborts"], stats["errors"]) == (1, 1, 0)


def test_the_counters_sum_up(name: str, tmp_path: Path) -> None:
    """calls = runs + joins + fallbacks, over runs, joins, errors, aborts, timeouts and fallbacks;
    and each counter equals what this test made happen."""
    made = 0
    with mpflight.Group(name, slots=1, timeout=0.3) as group:
        for _ in range(3):
            group.do("plain", int)
        made += 3
        with pytest.raises(ValueError):
            group.do("error", int, "not a number")
        made += 1
        with pytest.raises(KeyboardInterrupt):
            group.do("abort", _interrupted)
        made += 1
        proc, gate, _ = remote_owner(name, "held", "value", tmp_path, slots=1)
        made += 1  # the remote owner's call
        thread, box = join_in_thread(group, "held")
        wait_until(lambda: bool(box), "the joiner to give up")  # timeout 0.3 s: it times out
        thread.join(DEADLINE)
        made += 1
        assert isinstance(box[0], TimeoutError)
        assert group.do("other", lambda: "alone") == "alone"  # the one slot is taken: a fallback
        made += 1
        gate.open()
        proc.join(DEADLINE)
        stats = group.stats()
    assert stats["calls"] == stats["runs"] + stats["joins"] + stats["fallbacks"] == made
    assert (stats["runs"], stats["joins"], stats["fallbacks"]) == (6, 1, 1)
    assert (stats["errors"], stats["aborts"], stats["timeouts"], stats["shared"]) == (1, 1, 1, 0)


def test_the_counters_sum_up_with_takeovers_and_linger_hits(name: str, tmp_path: Path) -> None:
    """calls = runs - takeovers + joins + linger_hits + fallbacks: a takeover is a second run of one
    caller's call, a linger hit a call that neither ran nor joined."""
    made = 0
    with mpflight.Group(name, on_abort="retry", linger=30) as group:
        assert group.do("a", lambda: "a") == "a"
        made += 1
        assert [group.do("a", lambda: "again") for _ in range(2)] == ["a", "a"]  # linger hits
        made += 2
        proc, gate, _ = remote_owner(name, "held", "sigkill", tmp_path)
        made += 1  # the remote owner's call
        box: list[object] = []
        thread = threading.Thread(target=lambda: box.append(group.do("held", lambda: "taken over")))
        thread.start()
        made += 1
        wait_until(lambda: waiting(group, "held") == 1, "this process to join")
        gate.open()  # the owner dies: this process's waiter takes the call over
        thread.join(DEADLINE)
        proc.join(DEADLINE)
        assert box == ["taken over"]
        assert group.do("held", lambda: "again") == "taken over"  # the new owner's value lingers
        made += 1
        stats = group.stats()
    assert (stats["runs"], stats["takeovers"], stats["joins"], stats["linger_hits"]) == (3, 1, 1, 3)
    assert (stats["aborts"], stats["fallbacks"]) == (1, 0)
    assert (
        stats["calls"] == stats["runs"] - stats["takeovers"] + stats["joins"] + stats["linger_hits"] == made
    )


def test_a_sigint_caught_by_the_app_leaves_nothing(name: str, tmp_path: Path) -> None:
    """Ctrl-C (SIGINT) delivered while a process's main thread owns a call that another process waits
    on: the app catches KeyboardInterrupt and lives on; the waiter gets AbortError, the process's next
    call works, and nothing of it stays in the table."""
    ready, read = tmp_path / "ready", tmp_path / "read"
    code = (
        "import json, os, time, mpflight\n"
        f"g = mpflight.Group({name!r})\n"
        "def slow():\n"
        f"    open({str(ready)!r}, 'w').close()\n"
        "    time.sleep(60)\n"
        "try:\n    g.do('k', slow)\nexcept KeyboardInterrupt:\n    pass\n"
        "nxt = g.do('k', lambda: 'next')\n"
        # the aborted call stays DONE until the other process's waiter has read it: list after that
        f"while not os.path.exists({str(read)!r}):\n    time.sleep(0.001)\n"
        "print(json.dumps([nxt, [c.key for c in g.inflight()]]), flush=True)\n"
    )
    owner = child(code)
    wait_until(ready.exists, "the owner in fn")
    with mpflight.Group(name) as group:
        thread, box = join_in_thread(group, "k")
        wait_until(lambda: waiting(group, "k") == 1, "a waiter")
        owner.send_signal(signal.SIGINT)
        thread.join(DEADLINE)
        read.touch()
        out, _ = owner.communicate(timeout=DEADLINE)
        assert json.loads(out) == ["next", []]
        assert isinstance(box[0], mpflight.AbortError)
        assert group.inflight() == []


def test_asyncio_owner_cancelled_by_loop_shutdown_aborts(name: str) -> None:
    """An asyncio owner whose loop is shut down mid-fn (asyncio.run on Ctrl-C cancels every task):
    the call ends as an abort, and the table holds nothing of it."""

    async def main(group: mpflight.Group) -> None:
        started = asyncio.Event()

        async def slow() -> None:
            started.set()
            await asyncio.sleep(60)

        task = asyncio.ensure_future(group.do_async("k", slow))
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    with mpflight.Group(name) as group:
        asyncio.run(main(group))
        wait_until(lambda: group.inflight() == [], "the owner's call to end")
        assert group.stats()["aborts"] == 1


@pytest.mark.parametrize("when", ["taken", "not started"])
@pytest.mark.parametrize("how", ["future", "async"])
def test_an_interruption_as_a_wait_thread_starts_leaves_it_its_table(
    name: str, tmp_path: Path, how: str, when: str
) -> None:
    """A KeyboardInterrupt that comes as a waiter's wait thread starts ends the caller's block, and the
    app closes its handle. A thread that has taken the entry still waits in the table: the table stays
    mapped until that thread is done (it ends at its next look, with no error), and then goes; one that
    never started holds nothing, and the table goes with the handle. Unmapped under a waiting thread,
    the semaphore it waits on is closed, and the process dies of SIGSEGV when the wait wakes."""
    proc, gate, owned = remote_owner(name, "k", "value", tmp_path)
    report = tmp_path / "report"
    waiter = mp_context("spawn").Process(
        target=workers.interrupted_wait_start, args=(name, "k", gate.gate, str(report), how, when)
    )
    waiter.start()
    waiter.join(DEADLINE)
    proc.join(DEADLINE)
    assert waiter.exitcode == 0, f"the waiting process died with exit code {waiter.exitcode}"
    started = when == "taken"
    assert json.loads(report.read_text()) == {
        "raised": "KeyboardInterrupt",
        "wait_threads": int(started),
        "mapped_after_close": started,
        "waits_ended": True,
        "unmapped_at_the_end": True,
        "thread_errors": [],
    }
    assert proc.exitcode == 0
    assert pickle.loads(owned.read_bytes())[:2] == ("value", "the value")
