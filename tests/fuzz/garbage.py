"""What a case writes over the table: named writes, so that a case replays byte for byte, and the
seeded random ones.
"""

from __future__ import annotations

import math
import random
import struct
from typing import TYPE_CHECKING, NamedTuple

from mpflight._layout import (
    COUNTER_NAMES,
    H_COUNTERS,
    H_CREATED,
    H_DIRTY,
    H_KEY_CAP,
    H_MAGIC,
    H_MODE,
    H_NAME,
    H_NAME_LEN,
    H_PAYLOAD_CAP,
    H_PIDNS,
    H_READY,
    H_RECORD_SIZE,
    H_RECORDS,
    H_SLOT_SIZE,
    H_SLOTS,
    H_VERSION,
    HEADER_SIZE,
    KEY_CAP,
    PAYLOAD_CAP,
    R_GEN,
    R_PID,
    R_SINCE,
    R_SLOT,
    R_START,
    R_TID,
    S_BLOCKED_GEN,
    S_BLOCKED_SLOT,
    S_FLAGS,
    S_GEN,
    S_HOME,
    S_JOINS,
    S_KEY,
    S_KEY_KIND,
    S_KEY_LEN,
    S_OWNER_PID,
    S_OWNER_START,
    S_OWNER_TID,
    S_PAYLOAD,
    S_PAYLOAD_AT,
    S_PAYLOAD_LEN,
    S_SEGMENT_TOKEN,
    S_SEM_TOKEN,
    S_STARTED,
    S_WAITERS,
)
from tests.fuzz.scene import COMPLETING, DONE, FREE, RUNNING

if TYPE_CHECKING:
    from tests.fuzz.mapping import Raw


class Write(NamedTuple):
    """Bytes a case writes over the table, named so that a case reads (and replays) the same every run.

    ``area`` is header, state, rmap, home, slot, record, table (anywhere) or segment (BIG's);
    ``which`` the slot or record, by role (held, small, big; A_local, B1, B2, R_small, R_big) or index;
    ``field`` the offset within the area's unit (a slot, a record, the table, the segment).
    """

    area: str
    which: str | int
    field: int
    data: bytes

    def label(self) -> str:
        area = self.area.rstrip("^")  # a trailing ^: the bytes are xor-ed into what is there
        unit = f"{area}[{self.which}]" if self.which != "" else area
        name = _FIELD_NAMES.get((area, self.field), "")
        if area == "slot" and self.field >= S_PAYLOAD:
            name = f"result+{self.field - S_PAYLOAD}"
        elif area == "slot" and self.field >= S_KEY:
            name = f"key+{self.field - S_KEY}"
        value = (
            hex(int.from_bytes(self.data, "little"))
            if len(self.data) in (4, 8) or area in ("state", "rmap") or name == "dirty"
            else self.data.hex()
        )
        op = "^=" if self.area.endswith("^") else "="
        return f"{unit}+{self.field}{f' ({name})' if name else ''} {op} {value}"


HEADER_FIELDS = [
    (H_MAGIC, 8, "magic"),
    (H_VERSION, 4, "version"),
    (H_READY, 4, "ready"),
    (H_SLOTS, 4, "slots"),
    (H_SLOT_SIZE, 4, "slot size"),
    (H_KEY_CAP, 4, "key capacity"),
    (H_PAYLOAD_CAP, 4, "result capacity"),
    (H_RECORDS, 4, "records"),
    (H_RECORD_SIZE, 4, "record size"),
    (H_NAME_LEN, 4, "name length"),
    (H_PIDNS, 8, "pid namespace"),
    (H_CREATED, 8, "created"),
    *[(H_COUNTERS + 8 * i, 8, f"counter {n}") for i, n in enumerate(COUNTER_NAMES)],
    (H_DIRTY, 1, "dirty"),
    (H_MODE, 4, "mode"),
]
SLOT_FIELDS = [
    (S_GEN, 8, "generation"),
    (S_HOME, 4, "home"),
    (S_FLAGS, 4, "flags"),
    (S_WAITERS, 4, "waiters"),
    (S_JOINS, 4, "joins"),
    (S_OWNER_PID, 4, "owner pid"),
    (S_BLOCKED_SLOT, 4, "blocked slot"),
    (S_OWNER_START, 8, "owner start"),
    (S_OWNER_TID, 8, "owner thread"),
    (S_STARTED, 8, "started"),
    (S_BLOCKED_GEN, 8, "blocked generation"),
    (S_KEY_KIND, 1, "key kind"),
    (S_PAYLOAD_AT, 1, "result location"),
    (S_PAYLOAD_LEN, 4, "result length"),
    (S_KEY_LEN, 8, "key length"),
    (S_SEM_TOKEN, 8, "semaphore token"),
    (S_SEGMENT_TOKEN, 8, "segment token"),
]
RECORD_FIELDS = [
    (R_PID, 4, "pid"),
    (R_SLOT, 4, "slot"),
    (R_START, 8, "start"),
    (R_TID, 8, "thread"),
    (R_GEN, 8, "generation"),
    (R_SINCE, 8, "since"),
]
_FIELD_NAMES = {
    **{("header", off): n for off, _, n in HEADER_FIELDS},
    **{("slot", off): n for off, _, n in SLOT_FIELDS},
    **{("record", off): n for off, _, n in RECORD_FIELDS},
}
_FLOATS = {("header", H_CREATED), ("slot", S_STARTED), ("record", R_SINCE)}
# msgpack headers that announce 2**32 - 1 items or bytes (or a forbidden byte): length bombs.
_BOMBS = (
    b"\xdd\xff\xff\xff\xff",  # array 32
    b"\xdf\xff\xff\xff\xff",  # map 32
    b"\xc6\xff\xff\xff\xff",  # bin 32
    b"\xdb\xff\xff\xff\xff",  # str 32
    b"\xc9\xff\xff\xff\xff\x03",  # ext 32
    b"\xdc\xff\xff",  # array 16
    b"\xc1",  # never used
)


def _uint(rng: random.Random, width: int, cur: int) -> int:
    bits = 8 * width
    top = (1 << bits) - 1
    picks = [0, 1, 2, 3, top, top - 1, top >> 1, (top >> 1) + 1, cur - 1, cur + 1]
    picks += [cur ^ (1 << rng.randrange(bits)), rng.getrandbits(bits)]
    if width >= 4:  # around slot counts, the result capacity, PID_MAX, the sign bit of a C int
        picks += [4, 7, 8, 9, 32, 640, 641, 1 << 16, 1 << 22, 1 << 31]
    return rng.choice(picks) & top


def _float(rng: random.Random, cur: float) -> bytes:
    if rng.random() < 0.3:
        return rng.randbytes(8)
    return struct.pack("<d", rng.choice([math.nan, math.inf, -math.inf, 0.0, -1.0, 1e308, 5e-324, cur + 1]))


class Live(NamedTuple):
    """The slots and records of the roles, found after the set-up; what role names in a Write mean."""

    slots: dict[str, int]
    homes: dict[str, int]
    gens: dict[str, int]
    records: dict[str, int]
    pids: list[int]


def random_writes(rng: random.Random, raw: Raw, live: Live) -> list[Write]:
    n = rng.choices((1, 2, 3), weights=(7, 2, 1))[0]
    return [_random_write(rng, raw, live) for _ in range(n)]


def _random_write(rng: random.Random, raw: Raw, live: Live) -> Write:  # noqa: PLR0911
    g = raw.geo

    def slot() -> str | int:
        return rng.choice(["held", "held", "small", "big"]) if rng.random() < 0.75 else rng.randrange(g.slots)

    def record() -> str | int:
        return rng.choice(list(live.records)) if rng.random() < 0.75 else rng.randrange(g.records)

    def index(which: str | int, roles: dict[str, int]) -> int:
        return roles[which] if isinstance(which, str) else which

    area = rng.choices(
        ["header", "state", "rmap", "home", "slot", "key", "result", "record", "table", "byte", "segment"],
        weights=[4, 4, 2, 2, 10, 2, 4, 4, 3, 1, 2],
    )[0]
    if area == "header":
        fields = [*HEADER_FIELDS, (H_DIRTY, 1, "dirty"), (H_DIRTY, 1, "dirty"), (H_READY, 4, "ready")]
        fields += [(H_NAME, 0, "name"), (H_DIRTY + 1, 0, "tail")]
        off, width, _ = rng.choice(fields)
        if width == 0:  # a run inside the name, or in the unused tail of the header
            end = H_NAME + 64 if off == H_NAME else HEADER_SIZE
            off = rng.randrange(off, end)
            return Write("header", "", off, rng.randbytes(rng.randint(1, min(8, end - off))))
        if ("header", off) in _FLOATS:
            return Write("header", "", off, _float(rng, raw.f64(off)))
        if off == H_DIRTY:
            return Write("header", "", off, bytes([rng.choice([0, 1, 2, 0xFF, rng.randrange(256)])]))
        return Write("header", "", off, _uint(rng, width, raw.int(off, width)).to_bytes(width, "little"))
    if area == "state":
        value = rng.choice([FREE, RUNNING, COMPLETING, DONE, 4, 0x80, 0xFF, rng.randrange(256)])
        return Write("state", slot(), 0, bytes([value]))
    if area == "rmap":
        return Write("rmap", record(), 0, bytes([rng.choice([0, 1, 2, 0xFF, rng.randrange(256)])]))
    if area == "home":
        which = slot()
        cur = raw.int(g.home_counts + 4 * index(which, live.homes), 4)
        return Write("home", which, 0, _uint(rng, 4, cur).to_bytes(4, "little"))
    if area == "slot":
        which = slot()
        off, width, _ = rng.choice(SLOT_FIELDS)
        base = g.slot(index(which, live.slots))
        if ("slot", off) in _FLOATS:
            return Write("slot", which, off, _float(rng, raw.f64(base + off)))
        value = _uint(rng, width, raw.int(base + off, width))
        if off == S_OWNER_PID and rng.random() < 0.3:
            value = rng.choice(live.pids)  # another live process (not its start time)
        return Write("slot", which, off, value.to_bytes(width, "little"))
    if area == "key":
        which = slot()
        off = rng.randrange(KEY_CAP)
        return Write("slot", which, S_KEY + off, rng.randbytes(rng.randint(1, min(16, KEY_CAP - off))))
    if area in ("result", "segment"):
        which = rng.choice(["small", "small", "held", "big"]) if area == "result" else "big"
        length = raw.int(g.slot(live.slots[which]) + S_PAYLOAD_LEN, 4)
        cap = length if area == "segment" else PAYLOAD_CAP
        pos = rng.randrange(max(1, min(length or cap, cap)))  # within the payload, when there is one
        mode = rng.choice(["xor", "run", "bomb", "zero"])
        data = {
            "xor": lambda: bytes([rng.randrange(1, 256)]),  # flips bits of what is there
            "run": lambda: rng.randbytes(rng.randint(1, 8)),
            "bomb": lambda: rng.choice(_BOMBS),
            "zero": lambda: bytes(rng.randint(1, 8)),
        }[mode]()[: max(1, cap - pos)]
        area = ("slot" if area == "result" else "segment") + ("^" if mode == "xor" else "")
        return Write(area, which, pos + (S_PAYLOAD if area.startswith("slot") else 0), data)
    if area == "record":
        which = record()
        off, width, _ = rng.choice(RECORD_FIELDS)
        base = g.record(index(which, live.records))
        if ("record", off) in _FLOATS:
            return Write("record", which, off, _float(rng, raw.f64(base + off)))
        value = _uint(rng, width, raw.int(base + off, width))
        if off == R_SLOT and rng.random() < 0.5:
            value = rng.choice([*live.slots.values(), g.slots, g.slots - 1])
        return Write("record", which, off, value.to_bytes(width, "little"))
    if area == "table":
        off = rng.randrange(g.size)
        n = min(rng.randint(1, 64), g.size - off)
        data = rng.choice([rng.randbytes(n), bytes(n), b"\xff" * n])
        return Write("table", "", off, data)
    off = rng.randrange(g.size)
    return Write("table", "", off, bytes([rng.randrange(256)]))
