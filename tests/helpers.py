"""Helpers shared by the tests: waiting on state under a deadline, gates, child processes."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mpflight

# Bounds every wait for state in a test: a hang fails here instead of stalling CI. Not a speed target.
DEADLINE = 30.0
ROOT = Path(__file__).resolve().parent.parent


def lines(path: Path) -> list[str]:
    """The complete lines of a log that other processes append to while it is read: a line still being
    written (a write across a page boundary shows in parts) is not one yet. [] when there is no file."""
    try:
        return path.read_text().split("\n")[:-1]
    except FileNotFoundError:
        return []


def refuse_thread_start(monkeypatch: Any, prefix: str) -> None:
    """From now on (until ``monkeypatch`` undoes it), threads named ``prefix...`` cannot start, as in
    a process that has no thread left: their start raises RuntimeError("can't start new thread")."""
    start = threading.Thread.start

    def refusing(thread: threading.Thread) -> None:
        if thread.name.startswith(prefix):
            raise RuntimeError("can't start new thread")
        start(thread)

    monkeypatch.setattr(threading.Thread, "start", refusing)


def wait_until(predicate: Callable[[], bool], what: str, deadline: float = DEADLINE) -> None:
    end = time.monotonic() + deadline
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.002)


def waiting(group: mpflight.Group, key: str | bytes) -> int:
    """How many callers wait on the running call for key (-1: no such call)."""
    for call in group.inflight():
        if call.key == key and call.state == "running":
            return call.waiters
    return -1


class Gate:
    """Files that hold the tests' fn open and count its executions."""

    def __init__(self, tmp: Path, tag: str = "") -> None:
        self.gate = str(tmp / f"gate{tag}")
        self.runs = str(tmp / f"runs{tag}")
        Path(self.runs).touch()

    def open(self) -> None:
        Path(self.gate).touch()

    def executions(self) -> int:
        return len(Path(self.runs).read_text().split())


def start_subprocess(*args: str, **env: str) -> subprocess.Popen[bytes]:
    """``python -m tests.workers ARGS`` with extra environment (MPFLIGHT_FAULT=..., ...)."""
    full_env = dict(os.environ, PYTHONPATH=str(ROOT), **env)
    return subprocess.Popen([sys.executable, "-m", "tests.workers", *args], env=full_env, cwd=ROOT)


def mp_context(method: str) -> Any:
    return multiprocessing.get_context(method)


def read_outcomes(paths: list[Path]) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in paths]


def remote_owner(
    name: str, key: str | bytes, factory: str, tmp: Path, **options: Any
) -> tuple[Any, Gate, Path]:
    """Start a spawned child that owns the call for key, held open; returns (process, gate, out)."""
    from tests import workers

    gate = Gate(tmp, tag=str(len(list(tmp.iterdir()))))
    out = tmp / f"owner-out-{gate.gate[-3:]}"
    proc = mp_context("spawn").Process(
        target=workers.own, args=(name, key, gate.gate, gate.runs, factory, str(out)), kwargs=options
    )
    proc.start()
    wait_until(lambda: gate.executions() == 1, "the child to start fn")
    return proc, gate, out


def join_in_thread(group: mpflight.Group, key: str | bytes) -> tuple[Any, list[Any]]:
    """Call do_ex(key) in a thread (it should join a running call); returns (thread, [outcome])."""
    box: list[Any] = []

    def run() -> None:
        try:
            box.append(group.do_ex(key, _must_not_run))
        except BaseException as e:
            box.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, box


def _must_not_run() -> None:
    raise AssertionError("a joiner ran fn")


def shared_outcome(name: str, key: str | bytes, factory: str, tmp: Path, **options: Any) -> tuple[Any, Any]:
    """A child owns key with FACTORIES[factory]; this process joins. Returns (our outcome, owner's)."""
    import pickle

    proc, gate, out = remote_owner(name, key, factory, tmp, **options)
    with mpflight.Group(name, **options) as group:
        thread, box = join_in_thread(group, key)
        wait_until(lambda: waiting(group, key) == 1, "this process to join")
        gate.open()
        thread.join(DEADLINE)
        proc.join(DEADLINE)
        assert proc.exitcode == 0
    return box[0], pickle.loads(out.read_bytes())


def table_problems(group: mpflight.Group) -> list[str]:
    """Every broken invariant of the table, read under its lock (which repairs it first, unless disabled)."""
    from mpflight import _layout
    from mpflight._table import DONE, FREE, RUNNING

    t = group._table()
    problems = []
    with t:
        counts = [0] * t.slots
        for r in range(t.records):
            if t.rmap[r] == 0:
                continue
            _, slot, _, _, gen, _ = _layout.RECORD.unpack_from(t.mm, t.geo.record(r))
            if t.rmap[r] != 1 or slot >= t.slots or t.states[slot] == FREE or t.gen(slot) != gen:
                problems.append(f"record {r} points at no call")
            else:
                counts[slot] += 1
        homes = [0] * t.slots
        for i in range(t.slots):
            state = t.states[i]
            if state == FREE:
                continue
            home, flags, waiters = _layout.SLOT.unpack_from(t.mm, t.slot_off(i))[1:4]
            if state > DONE:
                problems.append(f"slot {i} in state {state}")
            if waiters != counts[i]:
                problems.append(f"slot {i} counts {waiters} waiters, {counts[i]} are registered")
            if state == DONE and counts[i] == 0:
                problems.append(f"slot {i} is DONE with nobody to read it")
            if flags & _layout.JOINABLE:
                if state == RUNNING and home < t.slots:
                    homes[home] += 1
                else:
                    problems.append(f"slot {i} is joinable in state {state}")
        if t.homes.tolist() != homes:
            problems.append(f"home counts {t.homes.tolist()} != {homes}")
    return problems


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    """Stop a server started in a session of its own (start_new_session=True): SIGTERM, then SIGKILL
    if it does not exit; then its session, so that workers a failed test left blocked go too."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(DEADLINE)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(DEADLINE)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
