"""Processes and threads coalesce on one key: independent interpreters, pool children, threads."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

import mpflight
from tests import workers
from tests.helpers import Gate, mp_context, read_outcomes, start_subprocess, wait_until, waiting

N = 8


def _collect(group: mpflight.Group, gate: Gate, outs: list[Path], join: object) -> None:
    wait_until(lambda: waiting(group, "k") == N - 1, f"{N - 1} waiters on the held call")
    gate.open()
    join()
    outcomes = read_outcomes(outs)
    assert gate.executions() == 1
    assert [o.get("value") for o in outcomes] == ["v"] * N, outcomes
    assert all(o["shared"] for o in outcomes)
    assert group.inflight() == []


def test_independent_interpreters_coalesce(name: str, tmp_path: Path) -> None:
    """8 processes started with sys.executable, as separate gunicorn workers would be: fn runs once."""
    gate = Gate(tmp_path)
    outs = [tmp_path / f"out{i}" for i in range(N)]
    with mpflight.Group(name) as group:
        procs = [start_subprocess("call", name, "k", gate.gate, gate.runs, str(o)) for o in outs]

        def join() -> None:
            for p in procs:
                assert p.wait(timeout=60) == 0

        _collect(group, gate, outs, join)


@pytest.mark.parametrize("method", ["spawn", "fork", "forkserver"])
def test_multiprocessing_children_coalesce(name: str, tmp_path: Path, method: str) -> None:
    gate = Gate(tmp_path)
    outs = [tmp_path / f"out{i}" for i in range(N)]
    ctx = mp_context(method)
    with mpflight.Group(name) as group:
        procs = [
            ctx.Process(target=workers.call, args=(name, "k", gate.gate, gate.runs, str(o))) for o in outs
        ]
        for p in procs:
            p.start()

        def join() -> None:
            for p in procs:
                p.join(60)
                assert p.exitcode == 0

        _collect(group, gate, outs, join)


def test_threads_coalesce_in_one_process(name: str, tmp_path: Path) -> None:
    """16 threads, one execution; threads get the owner's very object, as in Go."""
    gate = Gate(tmp_path)
    value = {"big": list(range(10))}
    results: list[mpflight.Result[object]] = []
    with mpflight.Group(name) as group:
        threads = [
            threading.Thread(
                target=lambda: results.append(group.do_ex("k", workers.held, gate.gate, gate.runs, value))
            )
            for _ in range(16)
        ]
        for t in threads:
            t.start()
        wait_until(lambda: waiting(group, "k") == 15, "15 waiting threads")
        gate.open()
        for t in threads:
            t.join(60)
    assert gate.executions() == 1
    assert len(results) == 16
    assert all(r.value is value and r.shared for r in results)


def _threads_in_child(name: str, gate: str, runs: str, out: str) -> None:
    workers.arm()
    results: list[object] = []
    with mpflight.Group(name) as group:
        threads = [
            threading.Thread(target=lambda: results.append(group.do("k", workers.held, gate, runs, "v")))
            for _ in range(8)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    Path(out).write_text(",".join(map(str, results)))


def test_threads_coalesce_across_processes(name: str, tmp_path: Path) -> None:
    """Two processes of 8 threads each (gunicorn gthread workers): 16 callers, one execution."""
    gate = Gate(tmp_path)
    outs = [tmp_path / "a", tmp_path / "b"]
    ctx = mp_context("spawn")
    with mpflight.Group(name) as group:
        procs = [
            ctx.Process(target=_threads_in_child, args=(name, gate.gate, gate.runs, str(o))) for o in outs
        ]
        for p in procs:
            p.start()
        wait_until(lambda: waiting(group, "k") == 15, "15 waiting threads in two processes")
        gate.open()
        for p in procs:
            p.join(60)
            assert p.exitcode == 0
    assert gate.executions() == 1
    assert [o.read_text() for o in outs] == [",".join(["v"] * 8)] * 2
