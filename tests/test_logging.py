"""The library logs through logging.getLogger("mpflight"): quiet on the hot path, WARNING on trouble."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

import pytest

import mpflight
from tests import workers
from tests.helpers import DEADLINE, Gate, join_in_thread, remote_owner, start_subprocess, wait_until, waiting


def test_the_hot_path_logs_nothing(name: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="mpflight")
    with mpflight.Group(name) as group:
        for i in range(100):
            group.do(str(i), lambda: 1)
    assert caplog.records == []


def test_warnings_for_a_dead_owner_a_recovered_lock_and_a_full_table(
    name: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mpflight")
    mpflight.Group(name, slots=1).close()
    proc, gate, _ = remote_owner(name, "k", "sigkill", tmp_path)
    with mpflight.Group(name, slots=1) as group:
        thread, box = join_in_thread(group, "k")
        wait_until(lambda: waiting(group, "k") == 1, "the waiter")
        gate.open()
        thread.join(DEADLINE)
        proc.join(DEADLINE)
        assert isinstance(box[0], mpflight.AbortError)
        assert start_subprocess("calls", name, "x", MPFLIGHT_FAULT="claim").wait(DEADLINE) == -signal.SIGKILL
        held = Gate(tmp_path, "held")
        holder = threading.Thread(target=group.do, args=("held", workers.held, held.gate, held.runs, 1))
        holder.start()  # repairs the dead claimer's work, finds its call, aborts it, takes the slot
        wait_until(lambda: held.executions() == 1, "the only slot to be taken")
        assert group.do("other", lambda: 2) == 2  # no slot: runs alone
        held.open()
        holder.join(DEADLINE)
    messages = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert all(level == logging.WARNING for level, _ in messages), messages
    text = "\n".join(m for _, m in messages)
    assert "owner" in text and "died" in text
    assert "died holding its lock" in text
    assert "has no free slots: running fn without coalescing" in text
