"""multiprocessing.Pool and ProcessPoolExecutor, spawn, fork and forkserver; a group opened before fork."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pytest

import mpflight
from tests import workers
from tests.helpers import DEADLINE, ROOT, Gate, mp_context, wait_until, waiting

PROCESSES = 4
_group: mpflight.Group | None = None  # opened in the parent before fork, or per child on first use


def _work(name: str, key: str, gate: str, runs: str) -> tuple[str, int]:
    global _group
    workers.arm()
    if _group is None:
        _group = mpflight.Group(name)
    return _group.do(key, workers.held, gate, runs, "v"), os.getpid()  # type: ignore[return-value]


@pytest.mark.parametrize("method", ["spawn", "fork", "forkserver"])
@pytest.mark.parametrize("kind", ["Pool", "ProcessPoolExecutor"])
def test_pool_processes_coalesce(name: str, tmp_path: Path, method: str, kind: str) -> None:
    global _group
    gate = Gate(tmp_path)
    ctx = mp_context(method)
    if method == "fork":
        _group = mpflight.Group(name)  # gunicorn --preload: the children inherit it
    try:
        with mpflight.Group(name) as group:
            if kind == "Pool":
                with ctx.Pool(PROCESSES) as pool:
                    pending = [
                        pool.apply_async(_work, (name, "k", gate.gate, gate.runs)) for _ in range(PROCESSES)
                    ]
                    wait_until(lambda: waiting(group, "k") == PROCESSES - 1, "every pool process on the call")
                    gate.open()
                    results = [p.get(DEADLINE) for p in pending]
            else:
                with ProcessPoolExecutor(PROCESSES, mp_context=ctx) as executor:
                    futures = [
                        executor.submit(_work, name, "k", gate.gate, gate.runs) for _ in range(PROCESSES)
                    ]
                    wait_until(lambda: waiting(group, "k") == PROCESSES - 1, "every pool process on the call")
                    gate.open()
                    results = [f.result(DEADLINE) for f in futures]
    finally:
        if _group is not None:
            _group.close()
            _group = None
    assert [value for value, _ in results] == ["v"] * PROCESSES
    assert len({pid for _, pid in results}) == PROCESSES
    assert gate.executions() == 1


def test_a_group_opened_before_fork_works_in_the_children(name: str, tmp_path: Path) -> None:
    """Each child gets its own lock on the table: two forked children exclude each other, not share."""
    gate = Gate(tmp_path)
    with mpflight.Group(name) as group:
        group.do("warm", int)  # the table is mapped and locked once before fork
        ctx = mp_context("fork")
        outs = [tmp_path / f"o{i}" for i in range(3)]
        procs = [ctx.Process(target=_work_into, args=(group, gate, str(o))) for o in outs]
        for p in procs:
            p.start()
        wait_until(lambda: waiting(group, "k") == 2, "two forked waiters")
        gate.open()
        for p in procs:
            p.join(DEADLINE)
            assert p.exitcode == 0
        assert group.do("after", lambda: "parent still works") == "parent still works"
    assert [o.read_text() for o in outs] == ["v"] * 3
    assert gate.executions() == 1


def _work_into(group: mpflight.Group, gate: Gate, out: str) -> None:
    workers.arm()
    Path(out).write_text(group.do("k", workers.held, gate.gate, gate.runs, "v"))  # type: ignore[arg-type]


def test_a_forked_child_takes_the_table_lock_on_a_description_of_its_own(name: str, tmp_path: Path) -> None:
    """A group opened before fork: a child's locked region keeps the parent out. (A description
    inherited from the parent would be the parent's own lock: flock would let both in at once.)"""
    ready, release = tmp_path / "ready", tmp_path / "release"
    with mpflight.Group(name) as group:
        group.do("warm", int)  # the parent's thread has its description now
        child = mp_context("fork").Process(target=_hold_the_lock, args=(group, str(ready), str(release)))
        child.start()
        try:
            wait_until(ready.exists, "the child inside its locked region")
            hold = group._table().lock.hold()
            with pytest.raises(BlockingIOError):
                fcntl.flock(hold.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            release.touch()
            child.join(DEADLINE)
        assert child.exitcode == 0
        assert group.do("after", lambda: "parent still works") == "parent still works"


def _hold_the_lock(group: mpflight.Group, ready: str, release: str) -> None:
    def inside() -> None:
        Path(ready).touch()
        wait_until(Path(release).exists, "the parent's look")

    group._table().locked(inside, ())


def test_the_pools_example_runs() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "pools.py")], capture_output=True, text=True, timeout=DEADLINE,
        env=dict(os.environ, PYTHONPATH=str(ROOT)), check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines: Any = proc.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["Pool", "ProcessPoolExecutor", "forked Pool"]
