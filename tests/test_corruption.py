"""Damaged memory: garbage written over a busy table gives MPFlightError or recovers, never worse.

The cases are built, corrupted and judged by the harness in tests/fuzz/ (its docstring says how);
this module holds the tests: seeded random garbage, and the garbage that once broke the library.
``python -m tests.fuzz.corruption SEED CASE`` runs one case of the random test again.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from mpflight._layout import S_WAITERS
from tests.fuzz import corruption
from tests.fuzz.garbage import Write

SEEDS = (1, 2, 3)
CASES_PER_SEED = 80


@pytest.mark.parametrize("seed", SEEDS)
def test_random_garbage_gives_an_error_or_recovers(name: str, seed: int, tmp_path: Path) -> None:
    """Seeded garbage over a busy table: every actor returns or raises MPFlightError, within HARD."""
    cases = [{"name": f"{name}.{i}", "seed": seed, "index": i} for i in range(CASES_PER_SEED)]
    report = corruption.report(corruption.run_cases(cases, tmp_path))
    if report:
        pytest.fail(f"corruption led to failures:\n{report}", pytrace=False)


# Garbage that broke the library when this test was written: one case per distinct cause, each the
# smallest write the random test found for it, replayed on the same set-up. (slots, HELD's value big,
# A killed instead of completing, writes)
PINNED = {
    # A's completion raises MPFlightError (the home count it decrements is 0) and leaves its call
    # RUNNING: its waiters without a timeout (a thread of A; B1, B2) wait for as long as A lives.
    "home-count-of-a-running-call-zeroed": (8, False, False, [Write("home", "held", 0, bytes(4))]),
    # A's completion takes the COMPLETING state for an abort done under it and publishes nothing:
    # the same waiters wait for as long as A lives.
    "running-call-marked-completing": (8, False, False, [Write("state", "held", 0, b"\x02")]),
    # The owner posts the slot's semaphore once per waiter the slot counts: 2**32 - 2 times.
    "waiter-count-huge-at-completion": (
        8, False, False, [Write("slot", "held", S_WAITERS, (2**32 - 2).to_bytes(4, "little"))],
    ),
    # A dead owner's call is aborted with one post per counted waiter, under the table lock: every
    # process of the table then waits for the lock.
    "waiter-count-huge-at-abort": (
        8, False, True, [Write("slot", "held", S_WAITERS, (2**31 - 1).to_bytes(4, "little"))],
    ),
}  # fmt: skip


@pytest.fixture(scope="module")
def pinned_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """Every PINNED case, run at once (a hang costs HARD seconds; they overlap)."""
    prefix = f"t-{uuid.uuid4().hex[:12]}"
    cases = [
        {
            "name": f"{prefix}.{i}",
            "seed": 0,
            "index": i,
            "slots": slots,
            "held_big": held_big,
            "owner_dies": owner_dies,
            "writes": [[w.area, w.which, w.field, w.data.hex()] for w in writes],
        }
        for i, (slots, held_big, owner_dies, writes) in enumerate(PINNED.values())
    ]
    results = corruption.run_cases(cases, tmp_path_factory.mktemp("pinned"))
    return dict(zip(PINNED, results, strict=True))


@pytest.mark.parametrize("case", list(PINNED))
def test_pinned_garbage_gives_an_error_or_recovers(
    case: str, pinned_results: dict[str, dict[str, Any]]
) -> None:
    report = corruption.report([pinned_results[case]])
    if report:
        pytest.fail(f"corruption led to failures:\n{report}", pytrace=False)
