"""The bytes of a table: header, state maps, home counts, slots and waiter records.

No I/O here: only formats, offsets and the rules of who writes which field when. docs/design.md shows
the same tables; tests/test_docs.py keeps the two equal.

A table is one shared-memory object::

    header        HEADER_SIZE bytes
    state map     one byte per slot (SlotState)
    record map    one byte per waiter record (0 free, 1 in use)
    home counts   one u32 per slot: how many joinable calls have that slot as their home
    slots         SLOT_SIZE bytes each
    records       RECORD_SIZE bytes each

Every field is written only while the table lock is held, except the payload area of a slot in state
COMPLETING, which belongs to its owner alone. Readers outside the lock (waiters polling their slot,
the inspection tool) treat what they read as a hint and confirm under the lock before acting on it.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Final

MAGIC: Final = b"MPFLIGHT"
# Bumped whenever any byte below changes meaning; part of every OS object name (see _locks.object_name),
# so that two versions of the library running side by side use two tables.
LAYOUT_VERSION: Final = 4

DEFAULT_SLOTS: Final = 1024
# Bounds a table to 64 MiB of slots: far more calls in flight at once than one machine runs.
MAX_SLOTS: Final = 65536
# Every slot can be waited on by four callers on average before registering a waiter falls back.
RECORDS_PER_SLOT: Final = 4

# Header: written once by the initializer under the table lock, then read-only, except the counters
# and the dirty byte, which change under the table lock.
HEADER: Final = struct.Struct("<8s9IQd64s")
H_MAGIC: Final = 0
H_VERSION: Final = 8
H_READY: Final = 12  # 0 until the initializer has written everything else; written last
H_SLOTS: Final = 16
H_SLOT_SIZE: Final = 20
H_KEY_CAP: Final = 24
H_PAYLOAD_CAP: Final = 28
H_RECORDS: Final = 32
H_RECORD_SIZE: Final = 36
H_NAME_LEN: Final = 40
H_PIDNS: Final = 44  # inode of the creator's pid namespace (/proc/self/ns/pid)
H_CREATED: Final = 52  # epoch seconds
H_NAME: Final = 60  # the group's name, UTF-8, H_NAME_LEN bytes used
H_NONCE: Final = 124  # u32, random, chosen by the initializer: part of the names of the table's segments
H_COUNTERS: Final = 128  # COUNTERS.size bytes of u64 counters
COUNTERS: Final = struct.Struct("<10Q")
COUNTER_NAMES: Final = (
    "runs", "joins", "shared", "errors", "aborts", "timeouts", "fallbacks", "wait_ns", "takeovers",
    "linger_hits",
)  # fmt: skip
(
    C_RUNS,
    C_JOINS,
    C_SHARED,
    C_ERRORS,
    C_ABORTS,
    C_TIMEOUTS,
    C_FALLBACKS,
    C_WAIT_NS,
    C_TAKEOVERS,
    C_LINGER_HITS,
) = range(10)
# Set to 1 by each holder of the table lock on entry and back to 0 on a clean exit. The kernel drops a
# dead holder's lock, but not this byte: the next holder that finds it set repairs the table.
H_DIRTY: Final = 208
# u32: the permission bits the table was made with, written once by the initializer. What is enforced is
# the table file's own st_mode and st_gid (read with fstat on attach); this records what was asked.
H_MODE: Final = 212
# u64 counters of the tier behind the table (mpflight._tier), summed over its processes on this host.
H_TIER_COUNTERS: Final = 216
TIER_COUNTERS: Final = struct.Struct("<5Q")
TIER_COUNTER_NAMES: Final = (
    "remote_owners", "remote_joins", "remote_fallbacks", "remote_fenced", "remote_not_shared",
)  # fmt: skip
HEADER_SIZE: Final = 256
assert HEADER.size <= H_COUNTERS and H_COUNTERS + COUNTERS.size <= H_DIRTY < H_MODE <= H_TIER_COUNTERS - 4
assert H_TIER_COUNTERS + TIER_COUNTERS.size <= HEADER_SIZE


class SlotState(enum.IntEnum):
    """A slot's state, one byte in the state map. FREE must be 0: free slots are found with bytes.find."""

    FREE = 0  # no call; every other field is stale
    RUNNING = 1  # the owner runs fn, joinable unless forgotten (owner pid 0: vacant, a waiter takes it over)
    COMPLETING = 2  # fn returned; the owner writes the outcome; no longer joinable
    DONE = 3  # the outcome is published; the registered waiters read it; the last one frees the slot,
    # unless it lingers (S_LINGER): then the next caller after it expires, housekeeping or a full table


# Slot flags.
JOINABLE: Final = 1  # not forgotten: new callers of the key join this call (RUNNING), or read its lingering
# outcome (COMPLETING and DONE, when the call lingers; else the flag is cleared when fn returns)

# Key kinds: the key's type is part of its identity. DIGEST is added when the key is longer than
# KEY_CAP: the slot then holds the SHA-256 of kind byte + key, followed by the key's first bytes
# (kept only to show the key in inflight(); never compared).
KEY_STR: Final = 0
KEY_BYTES: Final = 1
KEY_DIGEST: Final = 2
DIGEST_SIZE: Final = 32

# Where a published payload is (S_PAYLOAD_AT).
PAYLOAD_NONE: Final = 0
PAYLOAD_INLINE: Final = 1  # in the slot, at S_PAYLOAD
PAYLOAD_SEGMENT: Final = 2  # msgpack payload in the segment the slot names (S_SEGMENT_TOKEN)
PAYLOAD_LOCAL: Final = 3  # only threads of the owner's process wait: they take the owner's object

# Slot. The fixed part is written in one piece by the claimer (under the lock, before the state byte
# makes the slot RUNNING); waiters, joins and blocked_* change under the lock afterwards; the result
# fields are written by the owner under the lock before the state byte says DONE.
SLOT: Final = struct.Struct("<QIIIIIIQQdQBBHIQB")
S_GEN: Final = 0  # u64: incremented by every claim; names the call
S_HOME: Final = 8  # u32: slot index the key hashes to
S_FLAGS: Final = 12  # u32: JOINABLE
S_WAITERS: Final = 16  # u32: waiters registered and not yet gone (derived from the records)
S_JOINS: Final = 20  # u32: callers that ever joined this call (the owner's `shared`)
S_OWNER_PID: Final = 24  # u32
S_BLOCKED_SLOT: Final = 28  # u32: 0, or 1 + the slot the owner's thread now waits on
S_OWNER_START: Final = 32  # u64: owner's start time in clock ticks since boot
S_OWNER_TID: Final = 40  # u64: owner's thread (threading.get_ident), for re-entry and cycles
S_STARTED: Final = 48  # f64: epoch seconds when the call began
S_BLOCKED_GEN: Final = 56  # u64: generation of the slot the owner's thread waits on
S_KEY_KIND: Final = 64  # u8: KEY_*
S_PAYLOAD_AT: Final = 65  # u8: PAYLOAD_*, where the published payload is
S_TAKEOVERS: Final = 66  # u16: how many times one of the call's waiters took it over from a gone owner
S_PAYLOAD_LEN: Final = 68  # u32: bytes of the payload, inline or in the segment
S_KEY_LEN: Final = 72  # u64: length of the full encoded key
# u64, random and nonzero, 0 until the slot's first waiter: names the slot's wake-up semaphore
# (_locks.semaphore_name). Written under the lock by the first waiter of any call of the slot, which
# creates the semaphore (O_CREX) before writing its own record; kept across generations (the claimer's
# SLOT.pack_into stops short of it); replaced under the lock only when its semaphore is gone. Read by
# waiters and the owner to open the semaphore; never used to create one outside the lock.
S_SEM_TOKEN: Final = 88
# u64, random: names the call's result segment (_locks.segment_name). Written by the owner in
# COMPLETING, outside the lock (the payload area is its own then), before it creates the segment
# (O_CREX) and before the state byte says DONE; read after DONE by readers, and under the lock by the
# last reader, the aborter, repair and gc, only when the outcome location says PAYLOAD_SEGMENT (or the
# slot is COMPLETING).
S_SEGMENT_TOKEN: Final = 96
S_TIER_LEN: Final = 80  # u8: how many of the TIER_CAP bytes at S_TIER hold the tier's data; the claim's 0
# TIER_CAP opaque bytes that belong to the tier behind this table (mpflight._tier): its own state of the
# call (a lease, the remote owner). Written by the owner under the lock while RUNNING; shown by
# inflight() and handed to the tier's hook when the call is aborted or freed.
S_TIER: Final = 104
TIER_CAP: Final = 56
# u64: CLOCK_MONOTONIC nanoseconds until which the call's published outcome lingers (0: it does not).
# Written under the lock when the outcome is published (never while fn runs), 0 again when a forget ends
# the linger; the clock is the machine's, so every process compares it alike.
S_LINGER: Final = 160
S_KEY: Final = 168
KEY_CAP: Final = 256
S_PAYLOAD: Final = S_KEY + KEY_CAP
# Results up to this many bytes (encoded) travel inside the slot; a 1 KiB value with its msgpack framing
# fits, so the common small-to-medium result never costs a segment.
PAYLOAD_CAP: Final = 1624
SLOT_SIZE: Final = S_PAYLOAD + PAYLOAD_CAP
U32S: Final = SLOT_SIZE // 4  # a slot's length in u32 (Table.u32s) and u64 (Table.u64s) units
U64S: Final = SLOT_SIZE // 8
assert SLOT.size <= S_SEM_TOKEN and S_SEGMENT_TOKEN + 8 <= S_TIER and S_TIER + TIER_CAP <= S_LINGER < S_KEY

# The one way a slot's numeric fields are read and written: slot i's u32 field is
# ``table.u32s[i * U32S + I_FIELD]``, its u64 field ``table.u64s[i * U64S + Q_FIELD]`` (the byte
# offset divided by the width; indexing a memoryview is the cheapest access to shared memory).
Q_GEN: Final = S_GEN // 8
I_HOME: Final = S_HOME // 4
I_FLAGS: Final = S_FLAGS // 4
I_WAITERS: Final = S_WAITERS // 4
I_JOINS: Final = S_JOINS // 4
I_OWNER_PID: Final = S_OWNER_PID // 4
I_BLOCKED_SLOT: Final = S_BLOCKED_SLOT // 4
Q_OWNER_START: Final = S_OWNER_START // 8
Q_OWNER_TID: Final = S_OWNER_TID // 8
Q_BLOCKED_GEN: Final = S_BLOCKED_GEN // 8
I_PAYLOAD_LEN: Final = S_PAYLOAD_LEN // 4
Q_KEY_LEN: Final = S_KEY_LEN // 8
Q_SEM_TOKEN: Final = S_SEM_TOKEN // 8
Q_SEGMENT_TOKEN: Final = S_SEGMENT_TOKEN // 8
Q_LINGER: Final = S_LINGER // 8

# Waiter record: one per registered waiter, written by that waiter under the lock before its byte in
# the record map is set; the byte is the commit. Slot waiter counts are derived from these, so a
# repair can recount them and a sweep can find waiters that died.
RECORD: Final = struct.Struct("<IIQQQd")
R_PID: Final = 0
R_SLOT: Final = 4
R_START: Final = 8
R_TID: Final = 16
R_GEN: Final = 24
R_SINCE: Final = 32
# u32 beside the record's fields: the waiter's takeover budget (0: on_abort="raise"), written with them.
R_TAKEOVERS: Final = 40
RECORD_SIZE: Final = 48
assert RECORD.size <= R_TAKEOVERS and R_TAKEOVERS + 4 <= RECORD_SIZE


def _align(n: int) -> int:
    return (n + 63) & ~63


@dataclass(frozen=True, slots=True)
class Geometry:
    """Where each region of a table of ``slots`` slots starts, and how big the table is."""

    slots: int
    records: int
    state_map: int
    record_map: int
    home_counts: int
    slot_base: int
    record_base: int
    size: int

    @classmethod
    def for_slots(cls, slots: int) -> Geometry:
        records = slots * RECORDS_PER_SLOT
        state_map = HEADER_SIZE
        record_map = _align(state_map + slots)
        home_counts = _align(record_map + records)
        slot_base = _align(home_counts + 4 * slots)
        record_base = slot_base + slots * SLOT_SIZE
        size = record_base + records * RECORD_SIZE
        return cls(slots, records, state_map, record_map, home_counts, slot_base, record_base, size)

    def slot(self, index: int) -> int:
        return self.slot_base + index * SLOT_SIZE

    def record(self, index: int) -> int:
        return self.record_base + index * RECORD_SIZE


def header_geometry(fields: tuple[object, ...], size: int) -> Geometry | str:
    """What a table's header (``HEADER``'s fields) describes, checked against the layout this version
    writes and the object's ``size``: its Geometry, or which check failed: "version" (magic or layout
    version), "geometry" (slot, key, payload or record sizes), "slots" (a slot count out of range),
    "size" (a record count or object size that does not match). Each reader names the failure its way."""
    magic, version, _, slots, slot_size, key_cap, payload_cap, records, record_size = fields[:9]
    if magic != MAGIC or version != LAYOUT_VERSION:
        return "version"
    if (slot_size, key_cap, payload_cap, record_size) != (SLOT_SIZE, KEY_CAP, PAYLOAD_CAP, RECORD_SIZE):
        return "geometry"
    if not isinstance(slots, int) or not 1 <= slots <= MAX_SLOTS:
        return "slots"
    geo = Geometry.for_slots(slots)
    if records != geo.records or size < geo.size:
        return "size"
    return geo
