"""Fixtures: a unique group name per test, and the check that the test left nothing in /dev/shm."""

from __future__ import annotations

import gc
import os
import uuid
from collections.abc import Iterator

import pytest

import mpflight


def shm_entries(name: str) -> list[str]:
    """Everything in /dev/shm that belongs to group ``name`` (table, semaphores, segments)."""
    return sorted(e for e in os.listdir("/dev/shm") if f"@{name}" in e)


_made: list[str] = []  # the names this session's tests used
# Descriptors held by garbage (a traceback's frames keep a dead thread's description of a table) are
# collected once this many are open, so that a long run never nears select()'s limit of 1024.
FD_COLLECT = 256


@pytest.fixture(autouse=True)
def _collect_garbage_descriptors() -> Iterator[None]:
    yield
    if len(os.listdir("/proc/self/fd")) > FD_COLLECT:
        gc.collect()


@pytest.fixture
def name(request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh group name; afterwards, no result segment may be left, and unlink removes the rest."""
    group = f"t-{uuid.uuid4().hex[:12]}"
    _made.append(group)
    yield group
    segments = [e for e in shm_entries(group) if "@r" in e]
    for table in mpflight.tables():
        if table.startswith(f"{group}+"):  # a simulated host's table (MPFLIGHT_HOST_ID)
            mpflight.unlink(table)
    mpflight.unlink(group)
    assert shm_entries(group) == [], "unlink left objects behind"
    if request.node.get_closest_marker("leaves_segments") is None:
        assert segments == [], f"result segments outlived their readers: {segments}"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "leaves_segments: the test leaks a result segment on purpose")


def pytest_sessionfinish(session: pytest.Session) -> None:
    left = [e for e in os.listdir("/dev/shm") if any(f"@{n}" in e for n in _made)]
    if left:
        session.exitstatus = 1
        print(f"\n/dev/shm entries left by the tests: {left}")
