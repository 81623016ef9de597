"""Outcomes of any size and type reach every waiter, or a clear error."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

import mpflight
from tests import workers
from tests.conftest import shm_entries
from tests.helpers import (
    DEADLINE,
    ROOT,
    Gate,
    join_in_thread,
    remote_owner,
    shared_outcome,
    wait_until,
    waiting,
)


def test_value_crosses_processes(name: str, tmp_path: Path) -> None:
    mine, owner = shared_outcome(name, "k", "value", tmp_path)
    assert mine == mpflight.Result("the value", True)
    assert owner == ("value", "the value", True)


def test_rich_value_keeps_every_type(name: str, tmp_path: Path) -> None:
    """Tuples stay tuples, int keys and big ints survive, sets, dates, Decimal and UUID come back as such."""
    mine, _ = shared_outcome(name, "k", "rich", tmp_path)
    expected = workers.FACTORIES["rich"]()
    assert mine.value == expected
    assert _types(mine.value) == _types(expected)


def _types(obj: object) -> object:
    if isinstance(obj, dict):
        return (dict, sorted((repr(_types(k)), repr(_types(v))) for k, v in obj.items()))
    if isinstance(obj, list | tuple):
        return (type(obj), [_types(x) for x in obj])
    if isinstance(obj, set | frozenset):
        return (type(obj), sorted(repr(_types(x)) for x in obj))
    return type(obj)


def test_a_user_codec_carries_its_types_across_processes(name: str, tmp_path: Path) -> None:
    """Group(..., codec=...): the owner's process encodes a registered type, the waiter's decodes it."""
    proc, gate, _ = remote_owner(name, "k", "point", tmp_path, codec="point")
    with mpflight.Group(name, codec=workers.POINT_CODEC) as group:
        thread, box = join_in_thread(group, "k")
        wait_until(lambda: waiting(group, "k") == 1, "this process to join")
        gate.open()
        thread.join(DEADLINE)
        proc.join(DEADLINE)
    assert box == [mpflight.Result({"where": workers.Point(3, 4)}, True)]


def test_without_the_codec_the_type_is_not_carried(name: str, tmp_path: Path) -> None:
    mine, _ = shared_outcome(name, "k", "point", tmp_path)
    assert isinstance(mine, mpflight.SerializationError)
    assert "tests.workers.Point" in str(mine)


def test_builtin_exception_is_rebuilt_with_owner_traceback(name: str, tmp_path: Path) -> None:
    mine, owner = shared_outcome(name, "k", "value_error", tmp_path)
    assert owner[:2] == ("error", "ValueError")
    assert type(mine) is ValueError
    assert mine.args == ("bad input", 42)
    assert "_raise_value_error" in str(mine.__cause__)
    assert any("_raise_value_error" in note for note in mine.__notes__)


def test_unknown_exception_type_is_a_remote_error(name: str, tmp_path: Path) -> None:
    mine, owner = shared_outcome(name, "k", "custom_error", tmp_path)
    assert owner[:2] == ("error", "CustomError")
    assert isinstance(mine, mpflight.RemoteError)
    assert mine.type_name == "tests.workers.CustomError"
    assert mine.message == "custom message"
    assert "_raise_custom" in mine.traceback


def test_owner_leaving_fn_by_base_exception_aborts_waiters(name: str, tmp_path: Path) -> None:
    """Go's Goexit: waiters get AbortError; the owner's KeyboardInterrupt propagates unchanged."""
    mine, owner = shared_outcome(name, "k", "keyboard_interrupt", tmp_path)
    assert owner[:2] == ("error", "KeyboardInterrupt")
    assert isinstance(mine, mpflight.AbortError)
    assert "KeyboardInterrupt" in str(mine)


def test_value_the_codec_cannot_carry(name: str, tmp_path: Path) -> None:
    """The owner keeps its value; waiters get SerializationError naming the type."""
    mine, owner = shared_outcome(name, "k", "unserializable", tmp_path)
    assert owner[0] == "value" and owner[2] is True
    assert isinstance(mine, mpflight.SerializationError)
    assert "object" in str(mine)


def test_16_mib_result_travels_by_segment_and_is_removed(name: str, tmp_path: Path) -> None:
    seen: list[list[str]] = []
    real_unpack = mpflight._codec.unpack

    def spy(*args: object, **kwargs: object) -> object:
        seen.append([e for e in shm_entries(name) if "@r" in e])
        return real_unpack(*args, **kwargs)  # type: ignore[arg-type]

    mpflight._codec.unpack = spy  # type: ignore[assignment]
    try:
        mine, _ = shared_outcome(name, "k", "big", tmp_path)
    finally:
        mpflight._codec.unpack = real_unpack
    assert mine.value == workers.FACTORIES["big"]()
    assert len(seen) == 1 and len(seen[0]) == 1, "the result travelled through exactly one segment"
    assert [e for e in shm_entries(name) if "@r" in e] == []


def test_result_over_the_cap(name: str, tmp_path: Path) -> None:
    mine, owner = shared_outcome(name, "k", "big", tmp_path, max_result_bytes=1024 * 1024)
    assert owner[0] == "value" and len(owner[1]) == 16 * 1024 * 1024
    assert isinstance(mine, mpflight.SerializationError)
    assert "max_result_bytes" in str(mine)


def test_results_are_not_serialized_for_local_waiters(name: str, tmp_path: Path) -> None:
    """Threads of the owner's process take its very object: even one the codec cannot carry."""
    gate = Gate(tmp_path)
    value = object()
    owner_box: list[object] = []
    with mpflight.Group(name) as group:
        owner = threading.Thread(
            target=lambda: owner_box.append(group.do("k", workers.held, gate.gate, gate.runs, value))
        )
        owner.start()
        wait_until(lambda: gate.executions() == 1, "the owner to run fn")
        joiners = [join_in_thread(group, "k") for _ in range(2)]
        wait_until(lambda: waiting(group, "k") == 2, "two joining threads")
        gate.open()
        owner.join(DEADLINE)
        for thread, _ in joiners:
            thread.join(DEADLINE)
    assert owner_box == [value]
    assert [box[0] for _, box in joiners] == [mpflight.Result(value, True)] * 2
    assert all(box[0].value is value for _, box in joiners)


FULL_SHM_SCRIPT = textwrap.dedent(
    """
    import multiprocessing, os, sys, threading, time
    sys.path.insert(0, sys.argv[1])
    import mpflight
    from tests import workers
    from tests.helpers import Gate, join_in_thread, wait_until, waiting
    from pathlib import Path
    tmp = Path(sys.argv[2])
    gate = Gate(tmp)
    ctx = multiprocessing.get_context("fork")
    out = tmp / "owner"
    proc = ctx.Process(target=workers.own, args=("full", "k", gate.gate, gate.runs, "big", str(out)))
    with mpflight.Group("full") as group:
        proc.start()
        wait_until(lambda: gate.executions() == 1, "owner")
        thread, box = join_in_thread(group, "k")
        wait_until(lambda: waiting(group, "k") == 1, "join")
        gate.open()
        thread.join(60)
        proc.join(60)
    import json, pickle
    owner = pickle.loads(out.read_bytes()) if out.exists() else None
    print(json.dumps({
        "waiter": type(box[0]).__name__, "message": str(box[0]), "owner_exit": proc.exitcode,
        "owner": None if owner is None else [owner[0], len(owner[1])],
    }))
    mpflight.unlink("full")
    """
)


@pytest.mark.skipif(shutil.which("unshare") is None or os.geteuid() != 0, reason="needs root and unshare(1)")
@pytest.mark.parametrize("disabled", ["", "reserve"])
def test_full_dev_shm_gives_waiters_a_clear_error(tmp_path: Path, disabled: str) -> None:
    """A 16 MiB result into an 8 MiB /dev/shm (a private tmpfs in a mount namespace): no SIGBUS.

    Without reserving the segment's space first, the owner dies of SIGBUS writing it.
    """
    script = tmp_path / "full.py"
    script.write_text(FULL_SHM_SCRIPT)
    proc = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         f'mount -t tmpfs -o size=8m tmpfs /dev/shm && exec "{sys.executable}" "{script}" "{ROOT}" "{tmp_path}"'],
        capture_output=True, text=True, timeout=120, check=False, env=dict(os.environ, MPFLIGHT_TEST_DISABLE=disabled),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    if disabled:
        assert got["owner_exit"] == -signal.SIGBUS
        assert got["waiter"] == "AbortError"
    else:
        assert got["owner_exit"] == 0
        assert got["owner"] == ["value", 16 * 1024 * 1024]
        assert got["waiter"] == "SerializationError"
        assert "no room" in got["message"]
