"""Keys, Go's semantics, a full table, re-entry."""

from __future__ import annotations

import threading
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest

import mpflight
from mpflight import _protocol
from tests import workers
from tests.helpers import DEADLINE, Gate, join_in_thread, mp_context, remote_owner, wait_until, waiting


def test_only_overlapping_calls_coalesce(name: str) -> None:
    """No caching: once a call completes, the next do() runs fn again."""
    runs: list[int] = []
    with mpflight.Group(name) as group:
        for i in range(3):
            assert group.do_ex("k", lambda i=i: runs.append(i) or i) == mpflight.Result(i, False)
    assert runs == [0, 1, 2]


def test_owner_shared_is_true_exactly_when_someone_joined(name: str, tmp_path: Path) -> None:
    """A waiter that joined and then gave up still makes the owner's result shared (Go counts dups)."""
    gate = Gate(tmp_path)
    box: list[mpflight.Result[object]] = []
    with mpflight.Group(name) as group, mpflight.Group(name, timeout=0.05) as impatient:
        owner = threading.Thread(
            target=lambda: box.append(group.do_ex("k", workers.held, gate.gate, gate.runs, 1))
        )
        owner.start()
        wait_until(lambda: gate.executions() == 1, "the owner to run fn")
        with pytest.raises(TimeoutError):
            impatient.do("k", workers.held, gate.gate, gate.runs, 2)
        assert waiting(group, "k") == 0
        gate.open()
        owner.join(DEADLINE)
    assert box == [mpflight.Result(1, True)]
    assert group_stats_after(name)["timeouts"] == 1


def group_stats_after(name: str) -> dict[str, int]:
    with mpflight.Group(name) as g:
        return g.stats()


def test_error_reaches_every_caller_of_the_call(name: str, tmp_path: Path) -> None:
    """The Varnish/dogpile failure: every waiter gets the error at once, nobody retries fn."""
    proc, gate, _ = remote_owner(name, "k", "value_error", tmp_path)
    with mpflight.Group(name) as group:
        joiners = [join_in_thread(group, "k") for _ in range(3)]
        wait_until(lambda: waiting(group, "k") == 3, "three joiners")
        gate.open()
        for thread, _ in joiners:
            thread.join(DEADLINE)
        proc.join(DEADLINE)
        assert group.stats()["errors"] == 1
    assert gate.executions() == 1
    assert [type(box[0]) for _, box in joiners] == [ValueError] * 3


def test_nobody_joins_a_call_that_is_completing(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Go 8fcdb60: while the owner writes its outcome, a new caller starts a new call instead of joining."""
    writing = threading.Event()
    release = threading.Event()
    real = _protocol.Call._write_outcome

    def slow_write(self: _protocol.Call, *args: object) -> tuple[int, int]:
        writing.set()
        assert release.wait(DEADLINE)
        return real(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(_protocol.Call, "_write_outcome", slow_write)
    gate = Gate(tmp_path)
    ctx = mp_context("spawn")
    out = tmp_path / "joiner"
    with mpflight.Group(name) as group:
        box: list[object] = []
        owner = threading.Thread(
            target=lambda: box.append(group.do("k", workers.held, gate.gate, gate.runs, "old"))
        )
        owner.start()
        wait_until(lambda: gate.executions() == 1, "the owner to run fn")
        joiner = ctx.Process(target=workers.call, args=(name, "k", gate.gate, str(tmp_path / "x"), str(out)))
        joiner.start()
        wait_until(lambda: waiting(group, "k") == 1, "a joiner in another process")
        gate.open()
        assert writing.wait(DEADLINE)
        assert group.do_ex("k", lambda: "new") == mpflight.Result("new", False)
        release.set()
        owner.join(DEADLINE)
        joiner.join(DEADLINE)
    assert box == ["old"]
    assert '"value": "old"' in out.read_text()


def test_forget_starts_a_new_call_and_the_old_one_cannot_touch_it(name: str, tmp_path: Path) -> None:
    """Go issue 31420: after forget, the old call's completion neither clears nor wakes the new call."""
    old_gate, new_gate = Gate(tmp_path, "old"), Gate(tmp_path, "new")
    with mpflight.Group(name) as group:
        results: dict[str, list[object]] = {"old": [], "new": []}

        def caller(tag: str, gate: Gate) -> None:
            results[tag].append(group.do_ex("k", workers.held, gate.gate, gate.runs, tag))

        old_owner = threading.Thread(target=caller, args=("old", old_gate))
        old_owner.start()
        wait_until(lambda: old_gate.executions() == 1, "the old call")
        old_waiter = threading.Thread(target=caller, args=("old", old_gate))
        old_waiter.start()
        wait_until(lambda: waiting(group, "k") == 1, "a waiter on the old call")
        with mpflight.Group(name) as other_handle:
            other_handle.forget("k")
        new_owner = threading.Thread(target=caller, args=("new", new_gate))
        new_owner.start()
        wait_until(lambda: new_gate.executions() == 1, "a new call after forget")
        new_waiter = threading.Thread(target=caller, args=("new", new_gate))
        new_waiter.start()
        wait_until(
            lambda: waiting(group, "k") == 1 and len(group.inflight()) == 2, "a waiter on the new call"
        )
        old_gate.open()
        old_owner.join(DEADLINE)
        old_waiter.join(DEADLINE)
        assert [c.state for c in group.inflight()] == ["running"], (
            "the old completion left the new call alone"
        )
        assert waiting(group, "k") == 1
        new_gate.open()
        new_owner.join(DEADLINE)
        new_waiter.join(DEADLINE)
    assert sorted(r.value for r in results["old"]) == ["old", "old"]  # type: ignore[attr-defined]
    assert sorted(r.value for r in results["new"]) == ["new", "new"]  # type: ignore[attr-defined]


def test_forget_of_an_idle_key_is_harmless(name: str) -> None:
    with mpflight.Group(name) as group:
        group.forget("nothing")
        assert group.do("nothing", lambda: 1) == 1


def test_a_full_table_runs_fn_without_coalescing(name: str, tmp_path: Path) -> None:
    gate = Gate(tmp_path)
    with mpflight.Group(name, slots=1) as group:
        holder = threading.Thread(target=group.do, args=("a", workers.held, gate.gate, gate.runs, 1))
        holder.start()
        wait_until(lambda: gate.executions() == 1, "slot 0 taken")
        assert group.do_ex("b", lambda: "ran anyway") == mpflight.Result("ran anyway", False)
        assert group.stats()["fallbacks"] == 1
        gate.open()
        holder.join(DEADLINE)
        assert group.do("b", lambda: "coalescing again") == "coalescing again"
        assert group.stats()["fallbacks"] == 1


def test_reentry_on_own_key_raises_instead_of_deadlocking(name: str) -> None:
    with mpflight.Group(name) as group:

        def fn() -> object:
            inner = group.do("other", lambda: "inner works")
            with pytest.raises(RuntimeError, match="deadlock") as info:
                group.do("k", lambda: "never")
            assert isinstance(info.value, mpflight.DeadlockError)
            assert info.value.keys == ["k"]
            return inner

        assert group.do("k", fn) == "inner works"
        assert group.inflight() == []


def _own_and_report(name: str, key: str | bytes, gate: str, runs: str, out: str) -> None:
    workers.arm()
    with mpflight.Group(name) as group:
        value = group.do(key, workers.held, gate, runs, repr(key))
    Path(out).write_text(value)  # type: ignore[arg-type]


def _hold_keys_and_join(name: str, keys: list[str | bytes], tmp_path: Path, slots: int | None = None) -> None:
    """One spawned owner per key, all held at once; this process joins each; nobody gets another's value."""
    gate = Gate(tmp_path)
    ctx = mp_context("spawn")
    if slots is not None:
        mpflight.Group(name, slots=slots).close()
    with mpflight.Group(name) as group:
        owners = []
        for i, key in enumerate(keys):
            p = ctx.Process(
                target=_own_and_report, args=(name, key, gate.gate, gate.runs, str(tmp_path / f"o{i}"))
            )
            p.start()
            owners.append(p)
            wait_until(lambda i=i: gate.executions() == i + 1, f"owner {i} to run fn")
        joiners = [join_in_thread(group, key) for key in keys]
        wait_until(lambda: sum(c.waiters for c in group.inflight()) == len(keys), "a joiner on every call")
        gate.open()
        for thread, _ in joiners:
            thread.join(DEADLINE)
        for p in owners:
            p.join(DEADLINE)
            assert p.exitcode == 0
    assert gate.executions() == len(keys)
    for i, (key, (_, box)) in enumerate(zip(keys, joiners, strict=True)):
        assert box[0] == mpflight.Result(repr(key), True)
        assert (tmp_path / f"o{i}").read_text() == repr(key)


def _home(key: str | bytes, slots: int) -> int:
    kind, _, ident = _protocol.key_identity(key)
    return zlib.crc32(ident, kind) % slots


def _colliding(make: Callable[[int], str | bytes], slots: int) -> list[str | bytes]:
    """Two keys made by ``make`` that hash to the same home slot of a table of ``slots``."""
    first = make(0)
    other = next(make(i) for i in range(1, 90) if _home(make(i), slots) == _home(first, slots))
    return [first, other]


def test_colliding_keys_never_share_a_result(name: str, tmp_path: Path) -> None:
    """A four-slot table, keys picked to share their home slot; str and bytes of one text are distinct."""
    keys = _colliding(lambda i: f"key{i}", 4)
    _hold_keys_and_join(name, [*keys, "a", b"a"], tmp_path, slots=4)


def test_long_keys_differing_in_the_last_byte(name: str, tmp_path: Path) -> None:
    """10 KiB keys (identified by digest) that differ only in their last byte and share a home slot."""
    base = "x" * (10 * 1024 - 1)
    keys = _colliding(lambda i: base + chr(33 + i), 4)
    assert keys[0][:-1] == keys[1][:-1] and len(keys[0]) == len(keys[1]) == 10 * 1024
    _hold_keys_and_join(name, [*keys, keys[0].encode()], tmp_path, slots=4)  # type: ignore[union-attr]


def test_empty_key_is_a_key(name: str) -> None:
    with mpflight.Group(name) as group:
        assert group.do("", lambda: "empty") == "empty"
        assert group.do(b"", lambda: "empty bytes") == "empty bytes"


@pytest.mark.parametrize("key", [1, None, 1.5, ("a",), bytearray(b"a"), memoryview(b"a")])
def test_keys_of_other_types_are_a_type_error(name: str, key: object) -> None:
    with mpflight.Group(name) as group, pytest.raises(TypeError, match="key must be str or bytes"):
        group.do(key, lambda: 1)  # type: ignore[arg-type]
    with mpflight.Group(name) as group:
        assert group.inflight() == []


def test_keys_over_64_kib_are_a_value_error(name: str) -> None:
    with mpflight.Group(name) as group:
        assert group.do("k" * 65536, lambda: "at the limit") == "at the limit"
        with pytest.raises(ValueError, match="65537 bytes"):
            group.do("k" * 65537, lambda: 1)
        with pytest.raises(ValueError, match="bytes encoded"):
            group.do("é" * 40000, lambda: 1)


def test_inflight_shows_keys_and_waiters(name: str, tmp_path: Path) -> None:
    proc, gate, _ = remote_owner(name, "k" * 1000, "value", tmp_path)
    with mpflight.Group(name) as group:
        thread, _ = join_in_thread(group, "k" * 1000)
        wait_until(lambda: len(group.inflight()) == 1 and group.inflight()[0].waiters == 1, "the joiner")
        [call] = group.inflight()
        assert call.owner_pid == proc.pid and call.owner_alive and call.state == "running"
        assert call.key_complete is False and call.key == "k" * 224
        gate.open()
        thread.join(DEADLINE)
        proc.join(DEADLINE)
        assert group.inflight() == []
