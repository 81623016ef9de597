"""A table's life: creation races, geometry, signals and clocks, bad input, modes."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import posix_ipc
import pytest

import mpflight
from mpflight import _layout
from tests import workers
from tests.conftest import shm_entries
from tests.helpers import DEADLINE, ROOT, Gate, mp_context, wait_until

ATTACHERS = 16


def _attach_and_call(name: str, barrier: object, out: str) -> None:
    workers.arm()
    barrier.wait()  # type: ignore[attr-defined]
    with mpflight.Group(name) as group:
        value = group.do(f"k{os.getpid()}", lambda: group.slots)
    Path(out).write_text(str(value))


def _attach_together(name: str, tmp_path: Path) -> list[str]:
    ctx = mp_context("fork")
    barrier = ctx.Barrier(ATTACHERS)
    outs = [tmp_path / f"a{i}" for i in range(ATTACHERS)]
    procs = [ctx.Process(target=_attach_and_call, args=(name, barrier, str(o))) for o in outs]
    for p in procs:
        p.start()
    for p in procs:
        p.join(DEADLINE)
        assert p.exitcode == 0
    return [o.read_text() for o in outs]


def test_sixteen_processes_creating_at_once_make_one_table(name: str, tmp_path: Path) -> None:
    assert _attach_together(name, tmp_path) == [str(_layout.DEFAULT_SLOTS)] * ATTACHERS
    assert [e for e in shm_entries(name) if "@" not in e.split("@", 1)[1]] == [
        f"mpf{_layout.LAYOUT_VERSION}@{name}"
    ]
    with mpflight.Group(name) as group:
        assert group.stats()["runs"] == ATTACHERS


def test_a_creator_killed_halfway_through_initializing(name: str, tmp_path: Path) -> None:
    """The creator dies after sizing the table and writing part of its header, before marking it ready."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), MPFLIGHT_FAULT="init")
    proc = subprocess.run(
        [sys.executable, "-c", f"import mpflight; mpflight.Group({name!r}, slots=8)"],
        env=env,
        timeout=DEADLINE,
        check=False,
    )
    assert proc.returncode == -signal.SIGKILL
    assert shm_entries(name), "the half-made table is there"
    # Made anew, with the slot count its creator had written: a process that had mapped it agrees.
    assert _attach_together(name, tmp_path) == ["8"] * ATTACHERS


def _in_child(code: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=DEADLINE, check=False
    )


def test_other_slot_count_is_refused(name: str) -> None:
    with mpflight.Group(name, slots=8) as group:
        assert group.slots == 8
        with pytest.raises(mpflight.MPFlightError, match="8 slots, not 16"):
            mpflight.Group(name, slots=16)
        with mpflight.Group(name) as adopted:
            assert adopted.slots == 8
    # and from a process that has nothing attached
    child = _in_child(
        f"import mpflight\ntry:\n mpflight.Group({name!r}, slots=16)\nexcept mpflight.MPFlightError as e: print(e)"
    )
    assert "8 slots, not 16" in child.stdout, child.stderr


def test_foreign_layout_or_geometry_is_refused(name: str) -> None:
    mpflight.Group(name, slots=4).close()
    shm = posix_ipc.SharedMemory(f"/mpf{_layout.LAYOUT_VERSION}@{name}", 0)
    try:
        os.pwrite(shm.fd, (99).to_bytes(4, "little"), _layout.H_VERSION)
        child = _in_child(
            f"import mpflight\ntry:\n mpflight.Group({name!r})\nexcept mpflight.MPFlightError as e: print(e)"
        )
        assert "incompatible layout (version 99" in child.stdout, child.stderr
        os.pwrite(shm.fd, _layout.LAYOUT_VERSION.to_bytes(4, "little"), _layout.H_VERSION)
        os.pwrite(shm.fd, (512).to_bytes(4, "little"), _layout.H_SLOT_SIZE)
        child = _in_child(
            f"import mpflight\ntry:\n mpflight.Group({name!r})\nexcept mpflight.MPFlightError as e: print(e)"
        )
        assert "another geometry" in child.stdout, child.stderr
        os.pwrite(shm.fd, b"NOTMPFLT", _layout.H_MAGIC)
        child = _in_child(
            f"import mpflight\ntry:\n mpflight.Group({name!r})\nexcept mpflight.MPFlightError as e: print(e)"
        )
        assert "incompatible layout" in child.stdout, child.stderr
    finally:
        shm.close_fd()


def test_a_signal_during_a_wait_resumes_it(name: str, tmp_path: Path) -> None:
    """Gunicorn signals its workers: EINTR in sem_timedwait resumes the wait, with the time left."""
    gate = Gate(tmp_path)
    got: list[int] = []
    previous = signal.signal(signal.SIGUSR1, lambda *_: got.append(1))
    stop = threading.Event()

    def pester() -> None:
        while not stop.wait(0.01):
            os.kill(os.getpid(), signal.SIGUSR1)

    ctx = mp_context("spawn")
    out = tmp_path / "owner"
    owner = ctx.Process(target=workers.call, args=(name, "k", gate.gate, gate.runs, str(out), "v"))
    pesterer = threading.Thread(target=pester)
    try:
        owner.start()
        wait_until(lambda: gate.executions() == 1, "the owner to run fn")
        with mpflight.Group(name, timeout=0.5) as group:
            pesterer.start()
            began = time.monotonic()
            with pytest.raises(TimeoutError):
                group.do("k", lambda: "never")
            waited = time.monotonic() - began
            assert len(got) > 5, "signals arrived during the wait"
            # Each signal restarting the full timeout would have waited until the deadline below.
            assert waited < DEADLINE
            gate.open()
            with mpflight.Group(name) as patient:
                assert patient.do("k2", lambda: "after") == "after"
        owner.join(DEADLINE)
        assert '"value": "v"' in out.read_text()
    finally:
        stop.set()
        if pesterer.is_alive():
            pesterer.join()
        signal.signal(signal.SIGUSR1, previous)


def test_a_signal_during_a_wait_still_delivers_the_value(name: str, tmp_path: Path) -> None:
    gate = Gate(tmp_path)
    got: list[int] = []
    previous = signal.signal(signal.SIGUSR1, lambda *_: got.append(1))
    ctx = mp_context("spawn")
    owner = ctx.Process(target=workers.call, args=(name, "k", gate.gate, gate.runs, str(tmp_path / "o"), "v"))
    try:
        owner.start()
        wait_until(lambda: gate.executions() == 1, "the owner to run fn")

        def pester_then_open() -> None:
            with mpflight.Group(name) as g:
                wait_until(lambda: any(c.waiters == 1 for c in g.inflight()), "the main thread to wait")
            for _ in range(20):
                os.kill(os.getpid(), signal.SIGUSR1)
                time.sleep(0.01)
            gate.open()

        helper = threading.Thread(target=pester_then_open)
        helper.start()
        with mpflight.Group(name) as group:
            assert group.do_ex("k", lambda: "never") == mpflight.Result("v", True)
        helper.join(DEADLINE)
        owner.join(DEADLINE)
        assert got
    finally:
        signal.signal(signal.SIGUSR1, previous)


@pytest.mark.parametrize("bad", ["", "a/b", "a b", "x" * 65, "ü", "a@b", None, 3])
def test_invalid_group_names(bad: object) -> None:
    with pytest.raises(ValueError, match="group name"):
        mpflight.Group(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="group name"):
        mpflight.unlink(bad)  # type: ignore[arg-type]


def test_longest_valid_name(name: str) -> None:
    long = (name + "x" * 64)[:64]
    try:
        with mpflight.Group(long) as group:
            assert group.do("k", lambda: 1) == 1
    finally:
        assert mpflight.unlink(long)
    assert not mpflight.unlink(long)


@pytest.mark.parametrize("timeout", [0, -1, -0.5])
def test_non_positive_timeouts_are_refused(name: str, timeout: float) -> None:
    with pytest.raises(ValueError, match="timeout must be positive"):
        mpflight.Group(name, timeout=timeout)
    assert shm_entries(name) == []


def test_other_bad_arguments(name: str) -> None:
    with pytest.raises(TypeError, match="timeout"):
        mpflight.Group(name, timeout="1")  # type: ignore[arg-type]
    for slots in (0, -1, 65537, 1.5, True):
        with pytest.raises(ValueError, match="slots"):
            mpflight.Group(name, slots=slots)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="codec"):
        mpflight.Group(name, codec=object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mode"):
        mpflight.Group(name, mode=0o1777)
    with pytest.raises(ValueError, match="max_result_bytes"):
        mpflight.Group(name, max_result_bytes=0)
    with mpflight.Group(name) as group:
        with pytest.raises(TypeError, match="fn must be callable"):
            group.do("k", "not callable")  # type: ignore[arg-type]
        assert group.inflight() == []


def test_keywords_all_go_to_fn(name: str) -> None:
    """No keyword of fn is ever taken by mpflight: not even timeout, key or fn."""
    with mpflight.Group(name) as group:
        assert group.do("k", lambda **kw: kw, timeout=1, key=2, fn=3, self=4) == {
            "timeout": 1,
            "key": 2,
            "fn": 3,
            "self": 4,
        }


def test_closed_group_refuses_use(name: str) -> None:
    group = mpflight.Group(name)
    group.close()
    group.close()  # closing twice is fine, as for a file
    for use in (
        lambda: group.do("k", int),
        group.inflight,
        group.stats,
        lambda: group.forget("k"),
    ):
        with pytest.raises(ValueError, match="closed"):
            use()


def test_private_by_default(name: str, tmp_path: Path) -> None:
    gate = Gate(tmp_path)
    with mpflight.Group(name) as group:
        ctx = mp_context("fork")
        owner = ctx.Process(target=workers.call, args=(name, "k", gate.gate, gate.runs, str(tmp_path / "o")))
        owner.start()
        wait_until(lambda: gate.executions() == 1, "the owner")
        waiter = threading.Thread(target=group.do, args=("k", int))
        waiter.start()
        wait_until(lambda: any(c.waiters for c in group.inflight()), "a waiter, which opens the semaphore")
        modes = {e: stat.S_IMODE(os.stat(f"/dev/shm/{e}").st_mode) for e in shm_entries(name)}
        gate.open()
        waiter.join(DEADLINE)
        owner.join(DEADLINE)
    assert len(modes) == 2 and set(modes.values()) == {0o600}, modes


def test_mode_widens_knowingly(name: str) -> None:
    old = os.umask(0o022)
    try:
        mpflight.Group(name, mode=0o666).close()
    finally:
        os.umask(old)
    assert {stat.S_IMODE(os.stat(f"/dev/shm/{e}").st_mode) for e in shm_entries(name)} == {0o666}


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
def test_another_users_table_gives_a_clear_error(name: str) -> None:
    mpflight.Group(name).close()  # root's, 0o600
    code = (
        "import os, mpflight\nos.setgid(65534); os.setuid(65534)\n"
        f"try:\n mpflight.Group({name!r})\nexcept mpflight.MPFlightError as e: print(e)"
    )
    child = _in_child(code)
    assert "permission denied" in child.stdout and "root" in child.stdout and "mode" in child.stdout, child
