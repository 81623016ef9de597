"""The busy table every case builds, its keys and values, and the bounds on the waits of a case."""

from __future__ import annotations

import zlib
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from itertools import count

from mpflight._layout import SlotState

# Bounds how long any actor may take once the garbage is written: still busy then is a hang. The
# longest legitimate path is N's dozen calls, each of which may time out after N_TIMEOUT.
HARD = 5.0
# check_interval of every handle: how soon a waiter notices its call is lost or its owner gone.
CHECK = 0.05
N_TIMEOUT = 0.2  # N's handle: joins of a call that will never complete end in TimeoutError
J_TIMEOUT = 0.5  # J's handle
# How long the runner lets J try to join HELD before it lets A complete (J may fail to join at all).
JOIN_GRACE = 0.3
# Bounds the life of every forked process, should the runner itself die (not a speed target).
CHILD_LIMIT = 60.0

FREE, RUNNING, COMPLETING, DONE = (s.value for s in SlotState)


def _home(key: str, slots: int) -> int:
    """The slot a str key hashes to (as _group computes it: crc32 of the key, seeded with kind 0)."""
    return zlib.crc32(key.encode()) % slots


def _key(prefix: str, ok: Callable[[str], bool]) -> str:
    return next(k for i in count() if ok(k := f"{prefix}{i}"))


# The three live calls have distinct homes in 4 slots (so in 8), which keeps their slots, and so the
# offsets a case writes to, the same from one run to the next. COLLIDE shares HELD's home.
HELD = "held"
SMALL = _key("small-", lambda k: _home(k, 4) != _home(HELD, 4))
BIG = _key("big-", lambda k: _home(k, 4) not in (_home(HELD, 4), _home(SMALL, 4)))
COLLIDE = _key("collide-", lambda k: _home(k, 8) == _home(HELD, 8))
IDLE = ("idle-0", "idle-1", "idle-2", "idle-3")

SMALL_VALUE = {"n": [1, -2, 2**40, 1.5, None, True], "s": "välue", "b": b"\x00\xff", "t": (1, (2,))}
BIG_VALUE = {
    "rows": [(i, f"row {i}", i / 2) for i in range(200)],  # encoded, well over a slot's 1664 bytes
    "when": datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC),
    "amount": Decimal("12.50"),
    "blob": bytes(range(256)) * 2,
}
