"""One process's mapping of a table: its views, its lock discipline and its repair.

Every Group of the same name in a process shares one Table (through mpflight._registry), so that a
slot's local waiters find the owner's object. The protocol itself (claim, join, finish, publish, abort)
lives in mpflight._protocol, which alone writes state bytes; this module owns the bytes, their
invariants and their repair, and keeps what this process registered in them (its claims and records).
"""

from __future__ import annotations

import logging
import mmap
import secrets
import time
import weakref
from collections.abc import Callable
from fcntl import LOCK_EX, LOCK_NB, LOCK_UN, flock
from typing import Any, Final, TypeVar

from . import _faults, _owner
from ._errors import AccessDenied, DamagedTable, IncompatibleTable, NotInitialised
from ._layout import (
    COUNTERS,
    DEFAULT_SLOTS,
    H_COUNTERS,
    H_DIRTY,
    H_MODE,
    H_NONCE,
    H_READY,
    H_TIER_COUNTERS,
    HEADER,
    HEADER_SIZE,
    I_JOINS,
    I_PAYLOAD_LEN,
    I_WAITERS,
    JOINABLE,
    KEY_CAP,
    LAYOUT_VERSION,
    MAGIC,
    MAX_SLOTS,
    PAYLOAD_CAP,
    PAYLOAD_INLINE,
    PAYLOAD_LOCAL,
    PAYLOAD_NONE,
    PAYLOAD_SEGMENT,
    Q_GEN,
    Q_LINGER,
    Q_SEGMENT_TOKEN,
    Q_SEM_TOKEN,
    RECORD,
    RECORD_SIZE,
    S_KEY_KIND,
    S_KEY_LEN,
    S_PAYLOAD_AT,
    SLOT,
    SLOT_SIZE,
    TIER_COUNTERS,
    U32S,
    U64S,
    Geometry,
    SlotState,
    header_geometry,
)
from ._locks import (
    NAME_TRIES,
    Hold,
    SegmentExists,
    Semaphores,
    TableFile,
    map_segment,
    new_token,
    segment_name,
    unlink_segment,
    write_segment,
)

log = logging.getLogger("mpflight")

R = TypeVar("R")


def _no_deferral(job: Callable[[float | None], object]) -> None:
    """A table not attached through the registry (a tool's) runs deferred work at once."""
    job(None)


def _held_by(fd: int) -> bool:
    """Whether the description ``fd`` holds its flock: taking it again on the same description succeeds
    at once either way, so ask /proc/self/fdinfo, which lists the locks a descriptor holds."""
    try:
        with open(f"/proc/self/fdinfo/{fd}") as info:
            return any(line.startswith("lock:") and "FLOCK" in line for line in info)
    except OSError:
        return False


FREE: Final = SlotState.FREE.value
RUNNING: Final = SlotState.RUNNING.value
COMPLETING: Final = SlotState.COMPLETING.value
DONE: Final = SlotState.DONE.value

# Keys longer than this are refused (ValueError): bounds what a caller hashes and what a slot's key
# length field may claim.
MAX_KEY_BYTES: Final = 64 * 1024
# Whether the next holder of the lock repairs what a dead holder left (a test switch turns it off).
_REPAIR: Final = "repair" not in _faults.DISABLED
_FAULT: Final = _faults.FAULT  # read once, as _faults reads it
_TRY_LOCK: Final = LOCK_EX | LOCK_NB
# The mode of a table made without mode=: only its user gets in.
DEFAULT_MODE: Final = 0o600


class LocalCall:
    """What the owner's process keeps for its own waiting threads: the owner's very outcome."""

    __slots__ = ("error", "filled", "value")

    def __init__(self) -> None:
        self.filled = False  # set by the owner with value and error, before the call is DONE
        self.value: object = None
        self.error: BaseException | None = None


class Table:
    """A mapped table and its lock. ``with table:`` holds the lock and repairs what a dead holder left."""

    def __init__(
        self, group: str, *, slots: int | None, mode: int | None, create: bool, deadline: float | None = None
    ) -> None:
        self.group = group
        self.file = TableFile(group, create=create, mode=DEFAULT_MODE if mode is None else mode)
        # The table's mode and group are the file's own (fstat), whatever this handle asked for: every
        # process makes semaphores and segments with them.
        self.mode, self.gid = self.file.mode, self.file.gid
        if "table-mode" in _faults.DISABLED:  # each process its own handle's mode and its own group
            self.mode, self.gid = DEFAULT_MODE if mode is None else mode, -1  # -1: whichever is ours
        try:
            if mode is not None and mode != self.file.mode:
                raise IncompatibleTable(
                    group,
                    f"mpflight table {group!r} ({self.file.path}) has mode {self.file.mode:#o}, not "
                    f"{mode:#o}: omit mode= to adopt the table's, or unlink it to make it anew with another",
                )
            self.geo = self._initialize_or_check(slots, create, deadline)
            self.mm = self.file.map(self.geo.size)
        except BaseException:
            if self.file.created and "space-errors" not in _faults.DISABLED:
                self.file.remove()  # a creation that failed (a full /dev/shm) leaves nothing behind
            else:
                self.file.close()
            raise
        g = self.geo
        self.slots = g.slots
        self.records = g.records
        self.view = memoryview(self.mm)
        self.nonce = int.from_bytes(self.mm[H_NONCE : H_NONCE + 4], "little")
        self.states = self.view[g.state_map : g.state_map + g.slots]
        self.rmap = self.view[g.record_map : g.record_map + g.records]
        self.homes = self.view[g.home_counts : g.home_counts + 4 * g.slots].cast("I")
        self.counters = self.view[H_COUNTERS : H_COUNTERS + COUNTERS.size].cast("Q")
        self.tier_counters = self.view[H_TIER_COUNTERS : H_TIER_COUNTERS + TIER_COUNTERS.size].cast("Q")
        # The slots as arrays of u32 and u64: slot i's field at byte offset o is u32s[i * U32S + o // 4]
        # (and u64s[i * U64S + o // 8]); indexing a memoryview is the cheapest read of shared memory.
        self.u32s = self.view[g.slot_base : g.record_base].cast("I")
        self.u64s = self.view[g.slot_base : g.record_base].cast("Q")
        self.lock = self.file.lock
        self.holds = self.lock.local  # .hold: this thread's Hold of the lock (read on every hold)
        self.sems = Semaphores(group, self.sem_token, self.set_sem_token, self.mode, self.gid)
        self.local: dict[tuple[int, int], LocalCall] = {}
        # Who in this process is responsible for each claim (slot, generation) and each waiter record
        # it made: weak references to the callers' Calls (mpflight._protocol), written under the lock
        # with the claim or record. One whose Call is gone was left by an exception; the reaper ends it.
        # A claim is registered under its Call itself until somebody asks (_protocol._held_claim).
        self.owners: dict[tuple[int, int], Any] = {}
        self.readers: dict[int, weakref.ref[Any]] = {}
        # Runs a transition's rest in the background when the lock was not free by a caller's deadline
        # (set by mpflight._registry, which keeps the table mapped until it has run).
        self.defer: Callable[[Callable[[float | None], object]], None] = _no_deferral
        # The hooks of the tiers stacked behind the table in this process (mpflight._tier), called after
        # the lock is released with each call that carried tier bytes and was aborted or freed meanwhile:
        # (event, key, bytes, reason). Noted under the lock in ``events``.
        self.hooks: list[Callable[[str, str | bytes, bytes, str], None]] = []
        self.events: list[tuple[str, str | bytes, bytes, str]] = []
        self.replaced = False  # a waiter saw the name lead elsewhere: the next call moves
        self.closed = False
        # Set under the lock when a derived field is found wrong: repair on the next entry.
        self.damaged = False

    # -- creation ------------------------------------------------------------------------------

    def _initialize_or_check(self, slots: int | None, create: bool, deadline: float | None) -> Geometry:
        """Under the lock: initialize the table if nobody finished doing so, else check its geometry.

        Whoever takes the lock first initializes; a creator that died halfway left ``ready`` at 0,
        so the next one starts over. Nobody maps a table before it is ready. A process that may not
        create (``create=False``: the CLI) never initializes one either: NotInitialised.
        """
        f = self.file
        hold = f.lock.hold()
        try:
            f.lock.acquire(hold, deadline)
            size = f.size()
            if size >= HEADER_SIZE:
                with mmap.mmap(f.fd, HEADER_SIZE) as head:
                    fields = HEADER.unpack_from(head, 0)
                if fields[2] == 1:
                    return self._check(fields, size, slots)
            if not create and "no-init" not in _faults.DISABLED:
                raise NotInitialised(self.group)
            if size >= HEADER_SIZE:
                # Not ready: its creator died halfway (or the byte was damaged). Keep the slot count it
                # wrote, if any, so that processes that may have mapped it agree on the geometry.
                written = fields[3]
                if fields[0] == MAGIC and isinstance(written, int) and 1 <= written <= MAX_SLOTS:
                    slots = written
            return self._initialize(slots or DEFAULT_SLOTS)
        finally:
            flock(hold.fd, LOCK_UN)

    def _initialize(self, slots: int) -> Geometry:
        g = Geometry.for_slots(slots)
        f = self.file
        f.reserve(g.size)
        with f.map(g.size) as mm:
            mm[:] = bytes(g.size)  # a creator may have died halfway: start from zeros
            name = self.group.encode()
            HEADER.pack_into(
                mm, 0, MAGIC, LAYOUT_VERSION, 0, slots, SLOT_SIZE, KEY_CAP, PAYLOAD_CAP, g.records,
                RECORD_SIZE, len(name), _owner.pid_namespace(), time.time(), name,
            )  # fmt: skip
            mm[H_NONCE : H_NONCE + 4] = secrets.token_bytes(4)
            mm[H_MODE : H_MODE + 4] = self.file.mode.to_bytes(4, "little")
            _faults.reached("init")
            mm[H_READY : H_READY + 4] = (1).to_bytes(4, "little")
        return g

    def _check(self, fields: tuple[object, ...], size: int, slots: int | None) -> Geometry:
        version, name_len, pidns, name = fields[1], fields[9], fields[10], fields[12]
        what = f"mpflight table {self.group!r} ({self.file.os_name})"
        g = header_geometry(fields, size)
        if g == "version":
            raise IncompatibleTable(
                self.group, f"{what} has an incompatible layout (version {version!r}, ours {LAYOUT_VERSION})"
            )
        if g in ("geometry", "slots"):
            raise IncompatibleTable(
                self.group, f"{what} has another geometry than this version of mpflight writes"
            )
        if not isinstance(g, Geometry):
            raise DamagedTable(
                self.group, f"{what} is damaged: its size or record count does not match its header"
            )
        assert isinstance(name, bytes) and isinstance(name_len, int)
        if name[:name_len] != self.group.encode():
            raise IncompatibleTable(
                self.group, f"{what} belongs to group {name[:name_len]!r}: two names share one digest"
            )
        if slots is not None and slots != g.slots:
            raise IncompatibleTable(
                self.group, f"{what} exists with {g.slots} slots, not {slots}: unlink it to resize"
            )
        if pidns not in (0, _owner.pid_namespace()) and "pidns-check" not in _faults.DISABLED:
            raise IncompatibleTable(
                self.group,
                f"{what} is used by processes in another pid namespace, whose pids this process cannot "
                "check: give each container its own /dev/shm, or share the pid namespace too",
            )
        return g

    # -- the lock ------------------------------------------------------------------------------

    def locked(self, body: Callable[..., R], args: tuple[Any, ...], deadline: float | None = None) -> R:
        """Run ``body(*args)`` holding the table lock, after repairing what a dead holder left.

        The only way the library takes the lock, the uncontended call included. The dirty byte is
        set while the body writes: a body that does not return, because its process died or an
        exception was raised inside it, leaves it set, and the next holder repairs.
        Raises LockTimeout when ``deadline`` (monotonic) passes before the lock is free.
        """
        try:
            hold = self.holds.hold
        except AttributeError:
            hold = self.lock.hold()
        try:
            if hold.fd == hold.own:
                try:  # acquire's first step, taken here because it is what nearly every hold needs
                    flock(hold.fd, _TRY_LOCK)  # contended when it raises
                except BlockingIOError:
                    self.lock.acquire(hold, deadline)  # contended
            else:
                self.lock.acquire(hold, deadline)  # contended before: a timed wait's description
            if _FAULT:
                _faults.reached("locked")
            mm = self.mm
            if mm[H_DIRTY]:
                if not _REPAIR:
                    return body(*args)  # work on the damage as it is; the byte stays set for others
                self.repair()
            mm[H_DIRTY] = 1
            result = body(*args)
            if self.damaged or self.events:
                self._settle(hold)
            elif _REPAIR:
                mm[H_DIRTY] = 0
            return result
        finally:
            flock(hold.fd, LOCK_UN)  # a second unlock after _settle's is harmless

    def _settle(self, hold: Hold) -> None:
        """The end of a body that found damage or noted events: the dirty byte stays set for the next
        holder to repair what was found; the events are taken while the lock is held, as they were
        noted (no other hold's are lost), and told once it is released."""
        if self.damaged:
            self.damaged = False
        elif _REPAIR:
            self.mm[H_DIRTY] = 0
        events, self.events = self.events, []
        flock(hold.fd, LOCK_UN)
        self._tell_tiers(events)

    def _tell_tiers(self, events: list[tuple[str, str | bytes, bytes, str]]) -> None:
        """Outside the lock: hand the events a body noted to the hooks of the tiers behind the table."""
        for event in events:
            for hook in self.hooks:
                try:
                    hook(*event)
                except Exception:
                    log.exception("mpflight table %r: the tier's %s hook failed", self.group, event[0])

    def peek(self, body: Callable[..., R], *args: object) -> R:
        """Run ``body(*args)`` holding the lock, to copy a consistent snapshot: no repair, no write."""
        hold = self.lock.hold()
        try:
            self.lock.acquire(hold)
            return body(*args)
        finally:
            flock(hold.fd, LOCK_UN)

    def holding(self) -> bool:
        """Whether this thread holds the lock now (for tests)."""
        return _held_by(self.lock.hold().fd)

    def __enter__(self) -> Table:
        """``with table:`` holds the lock as ``locked`` does, for tests and tools only: a Python-level
        ``__exit__`` can be skipped by an asynchronous exception, so the library never uses it."""
        hold = self.lock.hold()
        self.lock.acquire(hold)
        if self.mm[H_DIRTY] and "repair" not in _faults.DISABLED:
            self.repair()
        self.mm[H_DIRTY] = 1
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if self.damaged:
            self.damaged = False
        elif exc_type is None and "repair" not in _faults.DISABLED:
            self.mm[H_DIRTY] = 0
        flock(self.lock.hold().fd, LOCK_UN)

    # -- slot fields -----------------------------------------------------------------------------

    def segment(self, index: int) -> str:
        """The name of the result segment slot ``index`` records (S_SEGMENT_TOKEN)."""
        return segment_name(self.group, self.nonce, index, self.u64s[index * U64S + Q_SEGMENT_TOKEN])

    def sem_token(self, index: int) -> int:
        return self.u64s[index * U64S + Q_SEM_TOKEN] if 0 <= index < self.slots else 0

    def set_sem_token(self, index: int, token: int) -> None:
        """Under the lock: slot ``index``'s semaphore is now the one named by ``token``."""
        self.u64s[index * U64S + Q_SEM_TOKEN] = token

    def write_segment(self, index: int, payload: bytes | memoryview) -> None:
        """Outside the lock, in COMPLETING (the payload area is the owner's): put ``payload`` in a new
        segment with a random name, recorded in the slot before the segment is made (so that an aborter
        or gc that sees the segment also sees its name), with the table's mode and group."""
        for _ in range(NAME_TRIES):
            self.u64s[index * U64S + Q_SEGMENT_TOKEN] = new_token(self.gen(index))
            try:
                write_segment(self.segment(index), payload, self.mode, self.gid)
                return
            except SegmentExists:
                continue
        raise AccessDenied(
            self.group,
            f"cannot create a result segment for table {self.group!r}: {NAME_TRIES} names in a row exist",
        )

    def map_segment(self, index: int, length: int) -> mmap.mmap:
        """Map the segment slot ``index`` names, checked to be ours or our group's (fstat)."""
        return map_segment(self.group, self.segment(index), length, self.gid, self.mode)

    def slot_off(self, index: int) -> int:
        return self.geo.slot_base + index * SLOT_SIZE

    def gen(self, index: int) -> int:
        return self.u64s[index * U64S + Q_GEN]

    def bump(self, counter: int, n: int = 1) -> None:
        """Under the lock: add to a shared counter (wrapping, so garbage in it cannot raise)."""
        c = self.counters
        c[counter] = (c[counter] + n) & 0xFFFFFFFFFFFFFFFF

    def bump_tier(self, counter: int) -> None:
        """Under the lock: add one to a counter of the tier behind the table."""
        c = self.tier_counters
        c[counter] = (c[counter] + 1) & 0xFFFFFFFFFFFFFFFF

    # -- repair ----------------------------------------------------------------------------------

    def repair(self) -> None:
        """Under the lock, after a holder died inside it: rebuild every derived field from primary ones.

        Primary: the state map, each slot's fixed fields, the record map and each record. Derived: home
        counts, waiter counts, DONE slots nobody reads any more (and whose linger is over). Anything out
        of bounds is dropped.
        """
        log.warning(
            "mpflight table %r: a process died holding its lock, or it was damaged; repairing", self.group
        )
        self.reconcile()

    def reconcile(self) -> None:
        """Under the lock: recompute what is derived (the repair; also what gc runs, quietly)."""
        slots, mm, states = self.slots, self.mm, self.states
        now = time.monotonic_ns()
        counts = [0] * slots
        for r in range(self.records):
            if self.rmap[r] == 0:
                continue
            _, slot, _, _, gen, _ = RECORD.unpack_from(mm, self.geo.record(r))
            if self.rmap[r] != 1 or slot >= slots or states[slot] == FREE or self.gen(slot) != gen:
                self.rmap[r] = 0
            else:
                counts[slot] += 1
        homes = [0] * slots
        unlink: list[str] = []
        for i in range(slots):
            state = states[i]
            if state == FREE:
                continue
            off = self.slot_off(i)
            gen, home, flags, _, joins = SLOT.unpack_from(mm, off)[:5]
            where, length = mm[off + S_PAYLOAD_AT], self.u32s[i * U32S + I_PAYLOAD_LEN]
            key_len = int.from_bytes(mm[off + S_KEY_LEN : off + S_KEY_LEN + 8], "little")
            sane = (
                state <= DONE
                and home < slots
                and mm[off + S_KEY_KIND] <= 3
                and key_len <= MAX_KEY_BYTES
                and where in (PAYLOAD_NONE, PAYLOAD_INLINE, PAYLOAD_SEGMENT, PAYLOAD_LOCAL)
                and (where != PAYLOAD_INLINE or length <= PAYLOAD_CAP)
            )
            if not sane:
                states[i] = FREE
                log.warning("mpflight table %r: slot %d held garbage; freed", self.group, i)
                continue
            self.u32s[i * U32S + I_WAITERS] = counts[i]
            self.u32s[i * U32S + I_JOINS] = max(joins, counts[i])
            lingers = flags & JOINABLE and self.u64s[i * U64S + Q_LINGER] > now
            if state == DONE and counts[i] == 0 and not lingers:
                states[i] = FREE  # read by all, or its linger is over
                if where == PAYLOAD_SEGMENT:
                    unlink.append(self.segment(i))
            elif flags & JOINABLE:  # running, or (completing, done) kept to linger
                homes[home] += 1
        for i in range(slots):
            self.homes[i] = homes[i]
        for name in unlink:
            unlink_segment(name)

    # -- life --------------------------------------------------------------------------------------

    def after_fork_in_child(self) -> None:
        self.file.after_fork_in_child()
        self.lock = self.file.lock
        self.holds = self.lock.local
        self.local.clear()
        self.owners.clear()  # the parent's callers are not ours
        self.readers.clear()
        self.events.clear()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.unmap()

    def unmap(self) -> None:
        """Release every view, the mapping and the descriptor (``closed`` is already set)."""
        self.sems.close()
        for v in (
            self.states,
            self.rmap,
            self.homes,
            self.counters,
            self.tier_counters,
            self.u32s,
            self.u64s,
            self.view,
        ):
            v.release()
        self.mm.close()
        self.file.close()
