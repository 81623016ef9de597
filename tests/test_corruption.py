"""Crash safety, point 8: garbage written over a table gives MPFlightError or recovers, never worse.

Every case builds one table (4 or 8 slots, so that random writes often hit live fields) in a realistic
state, writes garbage over it, and then uses every part of the API on it:

* process A ran a few quick calls (their slots are FREE again, with stale fields naming a live
  process), then owns the call for HELD, held open; a thread of A and processes B1, B2 wait on it;
* the calls for SMALL (fn raised: the outcome is inline) and BIG (a value in a result segment) are
  DONE, each with one registered reader (R_small, R_big) stopped by SIGSTOP before it read;
* the runner writes garbage through its own mapping of ``/mpf2@NAME``: header fields (counters, dirty
  byte, geometry), state map, record map, home counts, slot fields, key and result areas (the msgpack
  payload of a published outcome), waiter records, runs of random bytes anywhere, or BIG's segment;
* then new processes attach and use the API (N: inflight, stats, gc, tables, forget, do on colliding
  and non-colliding keys; J joins HELD); A completes its call on the corrupted table (or, in a
  quarter of the cases, is killed, so that its call is aborted); the readers resume; and once all are
  done a last process (Z) attaches, collects and calls again.

Each actor (a thread or process that uses the API) must return, or raise MPFlightError, or what its
role documents: TimeoutError for a handle with a timeout, the owner's exception for the reader of an
error. Any other exception (a MemoryError under the address-space limit AS_LIMIT included), a death by
signal, or an actor still busy HARD seconds after the corruption is a failure. A keeps living after
its call, as a worker does, so a waiter that only its owner's death would release counts as hung.
Failures are reported deduplicated by where they happen, with the seed, case, the bytes written and
a traceback (faulthandler's dump for a hang or a crash); ``python -m tests.test_corruption SEED CASE``
runs one case again. PINNED replays the smallest garbage found for each distinct failure.

One subprocess per test (the driver, under RLIMIT_AS) forks a runner per case, PARALLEL at a time,
and each runner forks the actors' processes: forks of an interpreter that has imported everything,
so a case costs milliseconds of process start rather than a new interpreter per process. Each runner
unlinks its case's group (named NAME.CASE after the test's ``name``, so the fixture's check of
/dev/shm covers it): the segments a corruption orphans go with it, and no test is marked
leaves_segments.
"""

from __future__ import annotations

import contextlib
import faulthandler
import fcntl
import gc
import json
import math
import mmap
import os
import random
import re
import resource
import select
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
import zlib
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from itertools import count
from pathlib import Path
from typing import Any, NamedTuple

import posix_ipc
import pytest

import mpflight
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
    H_NONCE,
    H_PIDNS,
    H_READY,
    H_RECORD_SIZE,
    H_RECORDS,
    H_RESULT_CAP,
    H_SLOT_SIZE,
    H_SLOTS,
    H_VERSION,
    HEADER_SIZE,
    KEY_CAP,
    R_GEN,
    R_PID,
    R_SINCE,
    R_SLOT,
    R_START,
    R_TID,
    RESULT_CAP,
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
    S_RESULT,
    S_RESULT_LEN,
    S_RESULT_WHERE,
    S_SEGMENT_TOKEN,
    S_SEM_TOKEN,
    S_STARTED,
    S_WAITERS,
    Geometry,
    SlotState,
)
from mpflight._locks import object_name, segment_name
from tests.helpers import DEADLINE, ROOT, wait_until

SEEDS = (1, 2, 3)
CASES_PER_SEED = 80
# Cases run at once by the driver: most of a case is waiting (on slices of CHECK, on timeouts).
PARALLEL = 6
# Bounds how long any actor may take once the garbage is written: still busy then is a hang. The
# longest legitimate path is N's dozen calls, each of which may time out after N_TIMEOUT.
HARD = 5.0
# Address space of every process of the driver: an unbounded allocation fails as MemoryError.
AS_LIMIT = 1 << 30
# check_interval of every handle: how soon a waiter notices its call is lost or its owner gone.
CHECK = 0.05
N_TIMEOUT = 0.2  # N's handle: joins of a call that will never complete end in TimeoutError
J_TIMEOUT = 0.5  # J's handle
# How long the runner lets J try to join HELD before it lets A complete (J may fail to join at all).
JOIN_GRACE = 0.3
# Bounds the life of every forked process, should the runner itself die (not a speed target).
CHILD_LIMIT = 60.0
# Bounds one case in the driver (set-up, garbage, two HARD windows, clean-up); then its runner is killed.
RUNNER_LIMIT = DEADLINE + 3 * HARD
DRIVER_LIMIT = 100.0

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


# -- what a case writes --------------------------------------------------------------------------------


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
        if area == "slot" and self.field >= S_RESULT:
            name = f"result+{self.field - S_RESULT}"
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
    (H_RESULT_CAP, 4, "result capacity"),
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
    (S_RESULT_WHERE, 1, "result location"),
    (S_RESULT_LEN, 4, "result length"),
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


class _Live(NamedTuple):
    """The slots and records of the roles, found after the set-up; what role names in a Write mean."""

    slots: dict[str, int]
    homes: dict[str, int]
    gens: dict[str, int]
    records: dict[str, int]
    pids: list[int]


def _random_writes(rng: random.Random, raw: _Raw, live: _Live) -> list[Write]:
    n = rng.choices((1, 2, 3), weights=(7, 2, 1))[0]
    return [_random_write(rng, raw, live) for _ in range(n)]


def _random_write(rng: random.Random, raw: _Raw, live: _Live) -> Write:  # noqa: PLR0911
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
        length = raw.int(g.slot(live.slots[which]) + S_RESULT_LEN, 4)
        cap = length if area == "segment" else RESULT_CAP
        pos = rng.randrange(max(1, min(length or cap, cap)))  # within the payload, when there is one
        mode = rng.choice(["xor", "run", "bomb", "zero"])
        data = {
            "xor": lambda: bytes([rng.randrange(1, 256)]),  # flips bits of what is there
            "run": lambda: rng.randbytes(rng.randint(1, 8)),
            "bomb": lambda: rng.choice(_BOMBS),
            "zero": lambda: bytes(rng.randint(1, 8)),
        }[mode]()[: max(1, cap - pos)]
        area = ("slot" if area == "result" else "segment") + ("^" if mode == "xor" else "")
        return Write(area, which, pos + (S_RESULT if area.startswith("slot") else 0), data)
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


# -- the runner's own view of a table ------------------------------------------------------------------


class _Raw:
    """The runner's own mapping of a table: to watch the set-up and to write the garbage."""

    def __init__(self, name: str, slots: int) -> None:
        self.name = name
        self.geo = Geometry.for_slots(slots)
        self.fd = posix_ipc.SharedMemory(object_name(name), 0).fd
        self.mm = mmap.mmap(self.fd, self.geo.size)

    def pass_the_lock(self) -> None:
        """Take and drop the table lock: whoever held it when this was called has left it since."""
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        fcntl.flock(self.fd, fcntl.LOCK_UN)

    def int(self, off: int, width: int) -> int:
        return int.from_bytes(self.mm[off : off + width], "little")

    def f64(self, off: int) -> float:
        value: float = struct.unpack_from("<d", self.mm, off)[0]
        return value

    def state(self, index: int) -> int:
        return self.mm[self.geo.state_map + index]

    def waiters(self, index: int) -> int:
        return self.int(self.geo.slot(index) + S_WAITERS, 4)

    def find(self, key: str) -> int:
        """The slot of the (non-FREE) call for key, or -1."""
        raw = key.encode()
        for i in range(self.geo.slots):
            off = self.geo.slot(i)
            if (
                self.state(i) != FREE
                and self.int(off + S_KEY_LEN, 8) == len(raw)
                and self.mm[off + S_KEY : off + S_KEY + len(raw)] == raw
            ):
                return i
        return -1

    def record_of(self, pid: int, index: int) -> int:
        g = self.geo
        for r in range(g.records):
            off = g.record(r)
            if self.mm[g.record_map + r] == 1 and (self.int(off + R_PID, 4), self.int(off + R_SLOT, 4)) == (
                pid,
                index,
            ):
                return r
        raise AssertionError(f"no record of pid {pid} on slot {index}")

    def apply(self, w: Write, live: _Live) -> None:
        g = self.geo

        def at(roles: dict[str, int]) -> int:
            return roles[w.which] if isinstance(w.which, str) else w.which

        area, xor = w.area.rstrip("^"), w.area.endswith("^")
        if area == "segment":
            nonce = int.from_bytes(self.mm[H_NONCE : H_NONCE + 4], "little")
            big = live.slots["big"]
            token = self.int(g.slot(big) + S_SEGMENT_TOKEN, 8)
            name = segment_name(self.name, nonce, big, token)
            shm = posix_ipc.SharedMemory(name, 0)
            try:
                with mmap.mmap(shm.fd, 0) as seg:
                    self._put(seg, w.field, w.data, xor)
            finally:
                shm.close_fd()
            return
        off = {
            "header": lambda: w.field,
            "table": lambda: w.field,
            "state": lambda: g.state_map + at(live.slots),
            "rmap": lambda: g.record_map + at(live.records),
            "home": lambda: g.home_counts + 4 * at(live.homes),
            "slot": lambda: g.slot(at(live.slots)) + w.field,
            "record": lambda: g.record(at(live.records)) + w.field,
        }[area]()
        self._put(self.mm, off, w.data, xor)

    @staticmethod
    def _put(mm: mmap.mmap, off: int, data: bytes, xor: bool) -> None:
        data = data[: max(0, len(mm) - off)]
        if xor:
            data = bytes(a ^ b for a, b in zip(mm[off : off + len(data)], data, strict=True))
        mm[off : off + len(data)] = data

    def close(self) -> None:
        self.mm.close()
        os.close(self.fd)


# -- actors: the processes and threads that use the API --------------------------------------------------


class _Ctx(NamedTuple):
    dir: Path
    name: str
    slots: int

    def put(self, what: str, obj: object) -> None:
        tmp = self.dir / f".{what}.{os.getpid()}.{threading.get_ident()}"
        tmp.write_text(json.dumps(obj))
        os.replace(tmp, self.dir / what)

    def get(self, what: str) -> Any:
        try:
            return json.loads((self.dir / what).read_text())
        except FileNotFoundError:
            return None

    def has(self, what: str) -> bool:
        return (self.dir / what).exists()


class _Actor:
    """Runs API calls, sorting what each raised into allowed and not; reports once done."""

    def __init__(self, ctx: _Ctx, name: str, allowed: tuple[type[BaseException], ...]) -> None:
        self.ctx, self.name, self.allowed = ctx, name, allowed
        self.ops: list[dict[str, object]] = []

    def attempt(self, op: str, call: Callable[[], Any]) -> Any:
        self.ctx.put(f"{self.name}.op", {"op": op, "tid": threading.get_ident()})
        try:
            value = call()
        except self.allowed as e:
            self.ops.append({"op": op, "status": "allowed", "type": type(e).__name__})
            return None
        except BaseException as e:
            self.ops.append({"op": op, "status": "fail", **_exception_failure(e)})
            return None
        self.ops.append({"op": op, "status": "ok"})
        return value

    def done(self) -> None:
        self.ctx.put(f"{self.name}.json", self.ops)


def _exception_failure(e: BaseException) -> dict[str, str]:
    frames = traceback.extract_tb(e.__traceback__)
    ours = [f for f in frames if "/mpflight/" in f.filename] or frames
    where = f"{Path(ours[-1].filename).name}:{ours[-1].lineno} in {ours[-1].name}" if ours else "?"
    try:
        message = str(e)[:300]
    except BaseException:  # a broken __str__ is a finding of its own, reported by its type
        message = "<str() failed>"
    kind = type(e)
    module = "" if kind.__module__ == "builtins" else f"{kind.__module__}."
    return {
        "kind": "exception",
        "type": f"{module}{kind.__qualname__}",
        "message": message,
        "location": where,
        "detail": "".join(traceback.format_exception(e))[-3000:],
    }


def _fork(ctx: _Ctx, proc: str, body: Callable[[], None]) -> int:
    """Start body in a child of this (single-threaded) runner; its stderr goes to PROC.err."""
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    code = 0
    try:
        fd = os.open(ctx.dir / f"{proc}.err", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(fd, 2)
        os.close(fd)
        faulthandler.enable(all_threads=True)
        faulthandler.register(signal.SIGUSR2, all_threads=True)
        faulthandler.dump_traceback_later(CHILD_LIMIT, exit=True)
        body()
    except BaseException:
        traceback.print_exc()
        code = 70
    finally:
        sys.stderr.flush()
        os._exit(code)


def _block(fd: int) -> None:
    """Hold until the runner writes a byte to the pipe."""
    if not select.select([fd], [], [], CHILD_LIMIT)[0]:
        raise RuntimeError("the runner never released this process")
    os.read(fd, 1)


def _never() -> None:
    raise AssertionError("a registered waiter ran fn")


def _raise_lookup() -> None:
    raise LookupError("small", 7)


WAITER_ALLOWED: tuple[type[BaseException], ...] = (mpflight.MPFlightError,)
TIMED_ALLOWED: tuple[type[BaseException], ...] = (mpflight.MPFlightError, TimeoutError)


def _role_a(ctx: _Ctx, gate: int, linger: int, big: bool) -> None:
    """Create the table; leave stale FREE slots; own HELD (held open) with a waiting thread of its own."""
    group = mpflight.Group(ctx.name, slots=ctx.slots, check_interval=CHECK)
    for key in IDLE:
        group.do(key, str, key)
    local = _Actor(ctx, "A_local", WAITER_ALLOWED)

    def local_waiter() -> None:
        local.attempt("do(HELD) in the owner's process, registered", lambda: group.do(HELD, _never))
        local.done()

    def fn() -> object:
        threading.Thread(target=local_waiter, daemon=True).start()
        _block(gate)
        return BIG_VALUE if big else SMALL_VALUE

    owner = _Actor(ctx, "A", WAITER_ALLOWED)
    owner.attempt("do_ex(HELD) as its owner, completing", lambda: group.do_ex(HELD, fn))
    owner.done()
    _block(linger)  # a worker lives on after its call: its waiters cannot count on its death


def _role_done_owner(ctx: _Ctx, key: str, gate: int, fn: Callable[[], object]) -> None:
    group = mpflight.Group(ctx.name, check_interval=CHECK)

    def held() -> object:
        _block(gate)
        return fn()

    with contextlib.suppress(LookupError):  # SMALL's fn raises it: its outcome is an error
        group.do(key, held)


def _role_waiter(ctx: _Ctx, actor: str, key: str, allowed: tuple[type[BaseException], ...]) -> None:
    group = mpflight.Group(ctx.name, check_interval=CHECK)
    waiter = _Actor(ctx, actor, allowed)
    waiter.attempt(f"do({key}), registered before the garbage", lambda: group.do(key, _never))
    waiter.done()


def _attach(actor: _Actor, timeout: float) -> mpflight.Group | None:
    group: mpflight.Group | None = actor.attempt(
        "Group(name)", lambda: mpflight.Group(actor.ctx.name, timeout=timeout, check_interval=CHECK)
    )
    return group


def _role_new(ctx: _Ctx, seed_text: str) -> None:
    """A new process: attach, then every API call, in an order drawn from the case's seed."""
    actor = _Actor(ctx, "N", TIMED_ALLOWED)
    group = _attach(actor, N_TIMEOUT)
    if group is not None:
        g = group
        ops: list[tuple[str, Callable[[], object]]] = [
            ("inflight()", g.inflight),
            ("stats()", g.stats),
            ("gc()", g.gc),
            ("mpflight.tables()", mpflight.tables),
            ("forget(HELD)", lambda: g.forget(HELD)),
            ("forget(COLLIDE)", lambda: g.forget(COLLIDE)),
            ("do(fresh key)", lambda: g.do("fresh", str, "n")),
            ("do(COLLIDE), HELD's home slot", lambda: g.do(COLLIDE, str, "c")),
            ("do(HELD)", lambda: g.do(HELD, str, "h")),
            ("do(SMALL), a DONE call's key", lambda: g.do(SMALL, str, "s")),
            ("do(BIG), a DONE call's key", lambda: g.do(BIG, str, "b")),
            ("do(b'held'), bytes key", lambda: g.do(HELD.encode(), bytes)),
            ("do(300-byte key)", lambda: g.do("L" * 300, str)),
            ("do(outer) calling do(inner)", lambda: g.do("outer", lambda: g.do("inner", str, "i"))),
        ]
        random.Random(f"{seed_text}:ops").shuffle(ops)
        for op, call in ops:
            actor.attempt(op, call)
    actor.done()


def _role_joiner(ctx: _Ctx) -> None:
    actor = _Actor(ctx, "J", TIMED_ALLOWED)
    group = _attach(actor, J_TIMEOUT)
    if group is not None:
        g = group
        ctx.put("J.go", True)
        actor.attempt("do(HELD), joining the held call", lambda: g.do(HELD, ctx.put, "J.ran", True))
    actor.done()


def _role_last(ctx: _Ctx) -> None:
    """After everyone is gone: attach, collect, look, and call again."""
    actor = _Actor(ctx, "Z", TIMED_ALLOWED)
    group = _attach(actor, N_TIMEOUT)
    if group is not None:
        g = group
        for op, call in [
            ("gc()", g.gc),
            ("inflight()", g.inflight),
            ("stats()", g.stats),
            ("do(HELD)", lambda: g.do(HELD, str, "h")),
            ("do(SMALL)", lambda: g.do(SMALL, str, "s")),
            ("do(BIG)", lambda: g.do(BIG, str, "b")),
            ("do(COLLIDE)", lambda: g.do(COLLIDE, str, "c")),
            ("forget(HELD)", lambda: g.forget(HELD)),
            ("gc() again", g.gc),
        ]:
            actor.attempt(op, call)
        # Everyone who took part is dead and gc() ran: a call still listed is left for good. Not a
        # failure of this test (the garbage may leave one), but reported with the case.
        calls = actor.attempt("inflight() again", g.inflight) or []
        ctx.put("Z.stuck", [f"{c.key!r} {c.state}, {c.waiters} waiters" for c in calls])
    actor.done()


# -- one case --------------------------------------------------------------------------------------------


def _thread_block(dump: str, tid: int | None) -> str:
    """The frames of thread tid in a faulthandler dump (the first thread when tid is unknown)."""
    pattern = r"(?:Current thread|Thread) 0x0*" + (f"{tid:x}" if tid else "[0-9a-f]+")
    m = re.search(pattern + r" \(most recent call first\):\n((?:  .*\n?)*)", dump)
    return m.group(1) if m else ""


def _dump_location(block: str) -> str:
    """Where a stack dump (most recent call first) is stuck, by protocol step: the innermost frame of
    _group or _table, whatever it waits on below (a semaphore, psutil), unless that is the lock."""
    frames = re.findall(r'File "([^"]+)", line \d+ in (\S+)', block)
    ours = [(Path(f).name, func) for f, func in frames if "/mpflight/" in f]
    if not ours:
        return f"{Path(frames[0][0]).name} in {frames[0][1]}" if frames else "?"
    step = next((f for f in ours if f[0] in ("_group.py", "_table.py")), ours[0])
    lock = ", waiting for the table lock" if ours[0] == ("_locks.py", "acquire") else ""
    return f"{step[0]} in {step[1]}{lock}"


class _Case:
    """The runner of one case: its processes, what each actor reported, what went wrong."""

    def __init__(self, spec: dict[str, Any], case_dir: Path) -> None:
        self.spec = spec
        self.seed_text = f"{spec['seed']}:{spec['index']}"
        rng = random.Random(self.seed_text)
        slots = spec.get("slots") or rng.choice((4, 8))
        self.held_big = spec.get("held_big", rng.random() < 0.3)
        # Instead of completing, A dies (SIGKILL) once the garbage is there: its call is aborted.
        self.owner_dies = spec.get("owner_dies", rng.random() < 0.25)
        case_dir.mkdir()
        self.ctx = _Ctx(case_dir, spec["name"], slots)
        self.procs: dict[str, int] = {}
        self.exited: dict[str, int] = {}
        self.killed: set[str] = set()
        self.failures: list[dict[str, object]] = []
        self.outcomes: list[str] = []  # what each actor raised, allowed or not: to tell causes apart
        self.pipes = {k: os.pipe() for k in ("held", "linger", "small", "big")}

    def start(self, proc: str, body: Callable[[], None]) -> None:
        self.procs[proc] = _fork(self.ctx, proc, body)

    def release(self, pipe: str) -> None:
        os.write(self.pipes[pipe][1], b"x")

    def reap(self, procs: list[str], deadline: float) -> None:
        """Wait for procs to exit until deadline; then kill what is left."""
        left = [p for p in procs if p not in self.exited]
        while left:
            for p in list(left):
                pid, status = os.waitpid(self.procs[p], os.WNOHANG)
                if pid:
                    self.exited[p] = status
                    left.remove(p)
            if not left:
                break
            if time.monotonic() > deadline:
                for p in left:
                    os.kill(self.procs[p], signal.SIGKILL)
                    self.exited[p] = os.waitpid(self.procs[p], 0)[1]
                    self.killed.add(p)
                break
            time.sleep(0.005)

    def poll(self) -> None:
        """Note the processes that exited (stops are not reported: no WUNTRACED)."""
        for proc, pid in self.procs.items():
            if proc not in self.exited:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    self.exited[proc] = status

    def await_actors(self, actors: dict[str, str], deadline: float) -> None:
        """Wait until every actor reported; an actor still busy at deadline is a hang."""

        def busy() -> dict[str, str]:
            return {a: p for a, p in actors.items() if not self.ctx.has(f"{a}.json")}

        while (left := busy()) and time.monotonic() < deadline:
            self.poll()
            if all(p in self.exited for p in left.values()):
                break
            time.sleep(0.005)
        self.poll()
        dumped = set()
        for proc in set(busy().values()):
            if proc not in self.exited:
                os.kill(self.procs[proc], signal.SIGUSR2)
                dumped.add(proc)
        if dumped:
            time.sleep(0.3)  # faulthandler writes from the signal handler; give it the time to finish
        for actor, proc in busy().items():
            progress = self.ctx.get(f"{actor}.op") or {}
            dump = self.err(proc)
            block = _thread_block(dump, progress.get("tid")) if proc in dumped else ""
            self.failures.append(
                {
                    "actor": actor,
                    "op": progress.get("op", "?"),
                    "kind": "hang" if proc in dumped else "exit",
                    "type": "hang" if proc in dumped else "no report",
                    "message": f"still busy {HARD} s after the garbage was written"
                    if proc in dumped
                    else "its process exited without reporting",
                    "location": _dump_location(block) if proc in dumped else "?",
                    "detail": block or dump[-3000:],
                }
            )

    def err(self, proc: str) -> str:
        try:
            return (self.ctx.dir / f"{proc}.err").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def check_exits(self, procs: list[str]) -> None:
        for proc in procs:
            status = self.exited.get(proc)
            if status is None or proc in self.killed:
                continue
            if os.WIFSIGNALED(status):
                sig = signal.Signals(os.WTERMSIG(status)).name
                dump = self.err(proc)
                block = dump[dump.find("Fatal Python error") :] if "Fatal Python error" in dump else dump
                self.failures.append(
                    {
                        "actor": proc,
                        "op": "(process)",
                        "kind": "signal",
                        "type": sig,
                        "message": f"process {proc} died of {sig}",
                        "location": _dump_location(_thread_block(block, None)),
                        "detail": block[-3000:],
                    }
                )
            elif os.WEXITSTATUS(status) != 0:
                dump = self.err(proc)
                self.failures.append(
                    {
                        "actor": proc,
                        "op": "(process)",
                        "kind": "exit",
                        "type": f"exit {os.WEXITSTATUS(status)}",
                        "message": (dump.strip().splitlines() or ["(no stderr)"])[-1][:300],
                        "location": _dump_location(dump),
                        "detail": dump[-3000:],
                    }
                )

    def collect_reports(self, actors: list[str]) -> None:
        for actor in actors:
            for op in self.ctx.get(f"{actor}.json") or []:
                if op["status"] == "fail":
                    self.failures.append({"actor": actor, **op})
                if op["status"] != "ok":
                    self.outcomes.append(f"{actor} {op['op']}: {op['type']}")

    def run(self) -> dict[str, Any]:
        try:
            writes = self._run()
        finally:
            for proc, pid in self.procs.items():
                if proc not in self.exited:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
            mpflight.unlink(self.ctx.name)
            for r, w in self.pipes.values():
                os.close(r)
                os.close(w)
        return {
            **self.spec,
            "slots": self.ctx.slots,
            "held_big": self.held_big,
            "owner_dies": self.owner_dies,
            "writes": [[w.area, w.which, w.field, w.data.hex()] for w in writes],
            "labels": [w.label() for w in writes],
            "failures": self.failures,
            "outcomes": self.outcomes,
            "stuck": self.ctx.get("Z.stuck") or [],
        }

    def _run(self) -> list[Write]:
        ctx, pipes = self.ctx, self.pipes
        self.start("A", lambda: _role_a(ctx, pipes["held"][0], pipes["linger"][0], self.held_big))
        geo = Geometry.for_slots(ctx.slots)
        shm_path = Path("/dev/shm") / object_name(ctx.name).lstrip("/")
        wait_until(lambda: shm_path.exists() and shm_path.stat().st_size >= geo.size, "A to size the table")
        raw = _Raw(ctx.name, ctx.slots)
        try:
            return self._set_up_and_corrupt(raw)
        finally:
            raw.close()

    def _set_up_and_corrupt(self, raw: _Raw) -> list[Write]:
        ctx, pipes = self.ctx, self.pipes
        wait_until(lambda: raw.int(H_READY, 4) == 1, "A to initialize the table")
        wait_until(lambda: raw.find(HELD) >= 0 and raw.waiters(raw.find(HELD)) == 1, "A_local to join HELD")
        held = raw.find(HELD)
        for n, proc in enumerate(("B1", "B2"), start=2):
            self.start(proc, lambda proc=proc: _role_waiter(ctx, proc, HELD, WAITER_ALLOWED))
            wait_until(lambda n=n: raw.waiters(held) == n, f"{proc} to join HELD")
        self.start("O_small", lambda: _role_done_owner(ctx, SMALL, pipes["small"][0], _raise_lookup))
        self.start("O_big", lambda: _role_done_owner(ctx, BIG, pipes["big"][0], lambda: BIG_VALUE))
        wait_until(lambda: raw.find(SMALL) >= 0 and raw.find(BIG) >= 0, "the owners of SMALL and BIG")
        small, big = raw.find(SMALL), raw.find(BIG)
        allowed_small = (*WAITER_ALLOWED, LookupError)  # the owner's exception, rebuilt
        self.start("R_small", lambda: _role_waiter(ctx, "R_small", SMALL, allowed_small))
        self.start("R_big", lambda: _role_waiter(ctx, "R_big", BIG, WAITER_ALLOWED))
        wait_until(lambda: raw.waiters(small) == 1 and raw.waiters(big) == 1, "the readers to join")
        raw.pass_the_lock()  # the readers count themselves under the lock: they have left it now
        for proc in ("R_small", "R_big"):  # stopped in its wait: it has not read when the garbage comes
            os.kill(self.procs[proc], signal.SIGSTOP)
            _, status = os.waitpid(self.procs[proc], os.WUNTRACED)
            assert os.WIFSTOPPED(status), status
        self.release("small")
        self.release("big")
        self.reap(["O_small", "O_big"], time.monotonic() + DEADLINE)
        assert all(self.exited[p] == 0 for p in ("O_small", "O_big")), self.exited
        assert (raw.state(small), raw.state(big)) == (DONE, DONE)

        slots = {"held": held, "small": small, "big": big}
        procs = self.procs
        records = {
            "A_local": raw.record_of(procs["A"], held),
            "B1": raw.record_of(procs["B1"], held),
            "B2": raw.record_of(procs["B2"], held),
            "R_small": raw.record_of(procs["R_small"], small),
            "R_big": raw.record_of(procs["R_big"], big),
        }
        live = _Live(
            slots=slots,
            homes={k: raw.int(raw.geo.slot(i) + S_HOME, 4) for k, i in slots.items()},
            gens={k: raw.int(raw.geo.slot(i) + S_GEN, 8) for k, i in slots.items()},
            records=records,
            pids=[procs[p] for p in ("A", "B1", "B2", "R_small", "R_big")] + [os.getpid(), 1],
        )
        if self.spec.get("writes") is None:
            writes = _random_writes(random.Random(f"{self.seed_text}:writes"), raw, live)
        else:
            writes = [Write(a, wh, f, bytes.fromhex(d)) for a, wh, f, d in self.spec["writes"]]

        # The garbage, then everything at once.
        for w in writes:
            raw.apply(w, live)
        written = time.monotonic()
        waiters_after = raw.waiters(held)
        self.start("N", lambda: _role_new(ctx, self.seed_text))
        self.start("J", lambda: _role_joiner(ctx))
        # Let J attach and try to join before A goes on; J may hang in either (then await_actors says so).
        attached = written + HARD
        while time.monotonic() < attached and not (ctx.has("J.go") or ctx.has("J.json")):
            time.sleep(0.002)
        grace = time.monotonic() + JOIN_GRACE
        while time.monotonic() < grace and not (
            ctx.has("J.ran") or ctx.has("J.json") or raw.waiters(held) > waiters_after
        ):
            time.sleep(0.002)
        if self.owner_dies:
            os.kill(procs["A"], signal.SIGKILL)
            self.reap(["A"], time.monotonic() + DEADLINE)
            self.killed.add("A")
        else:
            self.release("held")
        for proc in ("R_small", "R_big"):
            os.kill(procs[proc], signal.SIGCONT)
        actors = {"B1": "B1", "B2": "B2", "R_small": "R_small", "R_big": "R_big", "N": "N", "J": "J"}
        if not self.owner_dies:
            actors |= {"A": "A", "A_local": "A"}
        self.await_actors(actors, written + HARD)
        self.release("linger")
        others = [p for p in procs if p not in ("O_small", "O_big")]
        self.reap(others, time.monotonic() + 1.0)
        self.check_exits(others)
        self.start("Z", lambda: _role_last(ctx))
        self.await_actors({"Z": "Z"}, time.monotonic() + HARD)
        self.reap(["Z"], time.monotonic() + 1.0)
        self.check_exits(["Z"])
        self.collect_reports([*actors, "Z"])
        return writes


# -- the driver: one subprocess per test ----------------------------------------------------------------


def _runner(spec: dict[str, Any], out: Path) -> None:
    result: dict[str, Any]
    try:
        os.setpgid(0, 0)
        result = _Case(spec, out / f"case-{spec['index']}").run()
    except BaseException:
        result = {**spec, "error": traceback.format_exc()}
    try:
        (out / f"{spec['index']}.json").write_text(json.dumps(result))
    finally:
        os._exit(0)


def drive(spec_path: str) -> None:
    """Run the cases of spec_path, PARALLEL at a time, each in a forked runner; results in out/."""
    resource.setrlimit(resource.RLIMIT_AS, (AS_LIMIT, AS_LIMIT))
    gc.freeze()  # forks share the imported modules' pages instead of copying them as gc walks them
    spec = json.loads(Path(spec_path).read_text())
    out = Path(spec["out"])
    pending: list[dict[str, Any]] = list(spec["cases"])
    running: dict[int, tuple[dict[str, Any], float]] = {}
    while pending or running:
        while pending and len(running) < spec["parallel"]:
            case = pending.pop(0)
            pid = os.fork()
            if pid == 0:
                _runner(case, out)
            os.setpgid(pid, pid)
            running[pid] = (case, time.monotonic())
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            for runner, (_, began) in running.items():
                if time.monotonic() - began > RUNNER_LIMIT:
                    os.killpg(runner, signal.SIGKILL)
            time.sleep(0.005)
            continue
        case, _ = running.pop(pid)
        result = out / f"{case['index']}.json"
        if not result.exists():
            result.write_text(json.dumps({**case, "error": f"the runner ended with status {status:#x}"}))


def _drive(cases: list[dict[str, Any]], tmp: Path) -> list[dict[str, Any]]:
    out = tmp / "cases"
    out.mkdir()
    spec = tmp / "spec.json"
    spec.write_text(json.dumps({"out": str(out), "parallel": PARALLEL, "cases": cases}))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    code = "import sys\nfrom tests.test_corruption import drive\ndrive(sys.argv[1])"
    try:
        proc = subprocess.run(
            [sys.executable, "-W", "error", "-c", code, str(spec)],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=DRIVER_LIMIT,
            check=False,
        )
    finally:
        for case in cases:
            mpflight.unlink(case["name"])
    assert proc.returncode == 0, proc.stderr
    results = [json.loads((out / f"{c['index']}.json").read_text()) for c in cases]
    broken = [r for r in results if r.get("error")]
    assert not broken, f"the harness failed (not necessarily the library):\n{broken[0]['error']}"
    return results


def _trigger(result: dict[str, Any]) -> tuple[str, ...]:
    """What a case wrote to, without the values: cases that differ only in values trigger alike."""
    return tuple(sorted(re.split(r" \^?= ", label)[0] for label in result["labels"]))


def _report(results: list[dict[str, Any]]) -> str:
    """Failures deduplicated by (type, location); for each, the smallest cases of up to 3 triggers."""
    distinct: dict[tuple[str, str], list[tuple[dict[str, Any], dict[str, Any]]]] = {}
    for r in results:
        for f in r["failures"]:
            distinct.setdefault((f["type"], f["location"]), []).append((r, f))
    lines = []
    for (kind, where), hits in sorted(distinct.items(), key=lambda kv: -len(kv[1])):
        hits.sort(key=lambda h: (len(h[0]["writes"]), sum(len(w[3]) for w in h[0]["writes"])))
        cases = sorted({(h[0]["seed"], h[0]["index"]) for h in hits})
        lines.append(f"== {kind} at {where}: {len(hits)} times in {len(cases)} cases, e.g. {cases[:6]}")
        shown: set[tuple[str, ...]] = set()
        for r, f in hits:
            if _trigger(r) in shown or len(shown) == 3:
                continue
            shown.add(_trigger(r))
            held = ("big" if r["held_big"] else "small") + (", A killed" if r["owner_dies"] else "")
            lines += [
                f"   seed {r['seed']} case {r['index']} (slots {r['slots']}, HELD {held}) "
                f"wrote {'; '.join(r['labels'])}",
                f"     {f['actor']}, {f['op']}: {f['message']}",
                f"     others: {'; '.join(r['outcomes']) or 'all returned'}",
            ]
        detail = str(hits[0][1]["detail"]).rstrip().splitlines()
        # A traceback ends with the innermost frame; faulthandler's dump of a hang or crash starts with it.
        detail = detail[-14:] if hits[0][1]["kind"] == "exception" else detail[:8]
        lines.append("     " + "\n     ".join(detail))
    return "\n".join(lines)


# -- the tests -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_random_garbage_gives_an_error_or_recovers(name: str, seed: int, tmp_path: Path) -> None:
    """Seeded garbage over a busy table: every actor returns or raises MPFlightError, within HARD."""
    cases = [{"name": f"{name}.{i}", "seed": seed, "index": i} for i in range(CASES_PER_SEED)]
    report = _report(_drive(cases, tmp_path))
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
    results = _drive(cases, tmp_path_factory.mktemp("pinned"))
    return dict(zip(PINNED, results, strict=True))


@pytest.mark.parametrize("case", list(PINNED))
def test_pinned_garbage_gives_an_error_or_recovers(
    case: str, pinned_results: dict[str, dict[str, Any]]
) -> None:
    report = _report([pinned_results[case]])
    if report:
        pytest.fail(f"corruption led to failures:\n{report}", pytrace=False)


def main(argv: list[str]) -> None:
    """``python -m tests.test_corruption SEED CASE``: run one case again and print what failed."""
    seed, index = argv
    name = f"t-repro-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory() as tmp:
        results = _drive([{"name": name, "seed": int(seed), "index": int(index)}], Path(tmp))
    print(f"seed {seed} case {index}: wrote {'; '.join(results[0]['labels'])}")
    print("raised:", "; ".join(results[0]["outcomes"]) or "nothing")
    print("left in the table after gc():", "; ".join(results[0]["stuck"]) or "nothing")
    print(_report(results) or "no failure")


if __name__ == "__main__":
    main(sys.argv[1:])
