"""Test-only switches, read once from the environment when mpflight is imported. Not for production.

``MPFLIGHT_FAULT=STEP`` or ``STEP:N``: SIGKILL this process the N-th time (default: the first) it
reaches the named step, as a crash at that instruction would. docs/design.md ("Failure model") lists
the steps and the test that kills a process at each.

``MPFLIGHT_TEST_DISABLE=NAME,...``: turn a recovery mechanism off, so that the test suite can show
that the test of each mechanism fails without it. The names are in MECHANISMS.
"""

from __future__ import annotations

import os
import signal
from typing import Final

MECHANISMS: Final = frozenset(
    {
        "owner-check",  # waiters check the owner's identity on every check interval
        "zombie-check",  # a zombie counts as dead
        "start-time",  # an owner is (pid, start time), not a bare pid
        "boot-relative",  # start times are ticks since boot, not epoch seconds that move with the clock
        "repair",  # the next lock holder repairs what a dead holder half-wrote
        "table-identity",  # processes notice that their table was removed or replaced
        "cycle-check",  # a wait that would close a cycle of owners is refused
        "pidns-check",  # a process of another pid namespace is refused
        "reserve",  # segment space is reserved before writing (else SIGBUS on a full /dev/shm)
        "dead-waiters",  # records of dead waiters are reclaimed
        "owner-trust",  # a table or segment neither ours nor our group's is refused (fstat)
        "random-names",  # semaphores and segments get random names (else predictable ones)
        "read-only-modes",  # modes granting read without write (0o644, 0o640) are refused
        "table-mode",  # every process makes objects with the table's mode and group
        "space-errors",  # a full /dev/shm is an MPFlightError; a failed creation leaves nothing
        "no-init",  # create=False never initializes a table
        "recover",  # a caller an exception takes out of a call ends its claim or record at once
        "reaper",  # each process's reaper thread reclaims what no live process takes part in
        "lock-deadline",  # a caller with a timeout waits for the table lock no longer than it
        "own-identity",  # a call of our pid is ours only with our start time and a live token
        "fencing",  # Redis rejects the publish of an owner whose lease was lost (its token is checked)
    }
)

_step, _, _count = os.environ.get("MPFLIGHT_FAULT", "").partition(":")
FAULT: Final = _step or None
_remaining = int(_count or 1)

DISABLED: Final = frozenset(filter(None, os.environ.get("MPFLIGHT_TEST_DISABLE", "").split(",")))
if DISABLED - MECHANISMS:
    raise ValueError(f"MPFLIGHT_TEST_DISABLE names unknown mechanisms: {sorted(DISABLED - MECHANISMS)}")


def reached(step: str) -> None:
    """Die here if MPFLIGHT_FAULT names this step (and this is its N-th time)."""
    global _remaining
    if step == FAULT:
        _remaining -= 1
        if _remaining == 0:
            os.kill(os.getpid(), signal.SIGKILL)
