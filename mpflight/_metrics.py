"""The machine's mpflight metrics, read from shared memory at the instant they are asked for.

Every table keeps its counters in its header (mpflight._layout), summed over every process that ever
used it, so one read from any process is the machine's total: no per-process file, nothing to merge
or wipe when workers die or are recycled. A scrape maps each table read-only (mpflight._locks.
map_read_only: never created, initialised, locked or written) and copies

- each counter with one aligned 8-byte load: writers store each counter with one aligned store (under
  the table lock, which a scrape does not take, so that a stalled holder cannot stall a scrape nor a
  scrape the callers). A counter is never seen half-written; two counters may be read microseconds
  apart, as in any scrape of a live process;
- the header's creation time (epoch seconds), every counter's ``_created``: a table unlinked and made
  anew starts from zero with a later creation time, which Prometheus reads as a counter reset;
- the state and record maps, for the gauges: a hint at one instant, as ``mpflight ls`` shows. A dead
  process's call is counted until a reaper reclaims it (within about a second while any process has
  the table open; this reader reclaims nothing).

Tables it cannot read are skipped and counted by reason (``mpflight_skipped_tables``), never raised:
one of another layout version, one whose creator has not finished, another user's, a damaged one.
No prometheus_client here: mpflight.prometheus turns ``families()`` into its metrics, and the CLI
writes them as text (``openmetrics``, ``prometheus_text``).
"""

from __future__ import annotations

import mmap
import re
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Final, NamedTuple

from ._errors import AccessDenied, DamagedTable, IncompatibleTable, MPFlightError, NoSuchTable, NotInitialised
from ._housekeeping import Stats, counted
from ._layout import (
    COUNTERS,
    H_COUNTERS,
    H_TIER_COUNTERS,
    HEADER,
    JOINABLE,
    LAYOUT_VERSION,
    S_FLAGS,
    S_LINGER,
    S_OWNER_PID,
    TIER_COUNTERS,
    Geometry,
    header_geometry,
)
from ._locks import map_read_only, object_name, other_versions, table_objects
from ._registry import validate_table_name

# The states of a call in flight, named as Group.inflight() names them.
STATES: Final = ("running", "vacant", "completing", "done", "lingering")
# Why a table was skipped: another layout version's (another mpflight runs beside this one), not
# initialised (its creator has not finished, or died halfway), not ours (another user's, refused as
# every open refuses it, or one the OS does not let us open), unreadable (a damaged header, or an
# open or a map that failed otherwise).
SKIP_REASONS: Final = ("other_version", "not_initialised", "not_ours", "unreadable")

# One help line per counter of Group.stats(): the counter metric is mpflight_<name>, except wait_ns,
# which is mpflight_wait_seconds. tests/test_metrics.py keeps these keys equal to stats()'s.
COUNTER_HELP: Final = {
    "calls": "Calls that reached the table: runs - takeovers + joins + linger_hits + fallbacks",
    "runs": "Executions of fn in a slot: calls that claimed one, and takeovers",
    "joins": "Calls that waited on another caller's run",
    "shared": "Joins that received the run's outcome (value or exception)",
    "errors": "Runs that ended with fn raising an Exception",
    "aborts": "Runs that ended without an outcome: the owner died or left fn abnormally",
    "timeouts": "Joins that gave up at their timeout",
    "fallbacks": "Calls run without coalescing: the table or its waiter records were full",
    "wait_ns": "Time waiters spent waiting",
    "takeovers": "Waiters that took a call over from an owner that was gone",
    "linger_hits": "Calls that read a lingering outcome instead of running fn or joining",
    "remote_owners": "Runs that owned the call fleet-wide (redis=)",
    "remote_joins": "Runs that waited on another host's owner (redis=)",
    "remote_fallbacks": "Redis steps that failed, so that the host coalesced alone (redis=)",
    "remote_fenced": "Late publishes that Redis rejected: the lease was lost (redis=)",
    "remote_not_shared": "Outcomes above max_remote_bytes, not shared across hosts (redis=)",
}
TABLE_LABELS: Final = ("table", "group", "host")
_BUSY: Final = re.compile(rb"[\x01-\x03]")  # RUNNING, COMPLETING, DONE in the state map


@dataclass(frozen=True, slots=True)
class TableMetrics:
    """What one read of one table saw."""

    table: str  # the table's name: the group's, or group+host for a simulated host (MPFLIGHT_HOST_ID)
    group: str
    host: str  # "" for a table of no simulated host
    created: float  # epoch seconds, from the header: when the table was made
    slots: int
    counters: Stats  # what Group.stats() returns
    calls: dict[str, int]  # calls in flight by state (STATES)
    waiters: int  # waiter records in use: one per caller waiting on another's run


@dataclass(frozen=True, slots=True)
class Scrape:
    """Every table read, by name, and how many were skipped, by reason (SKIP_REASONS)."""

    tables: tuple[TableMetrics, ...]
    skipped: dict[str, int]


def read_table(name: str) -> TableMetrics:
    """The table ``name`` (``NAME`` or ``NAME+HOST``), read now. Raises NoSuchTable, NotInitialised,
    AccessDenied, IncompatibleTable (another layout version's) or DamagedTable, as the CLI reports them."""
    name = validate_table_name(name)
    try:
        return _read(object_name(name), name)
    except NoSuchTable:
        versions = other_versions(name)
        if versions:
            raise _other_version(name, versions[0]) from None
        raise


def scrape(names: Iterable[str] | None = None) -> Scrape:
    """Every table of this layout version on this machine, or those named, read now; what cannot be
    read is counted in ``skipped``. A named table that does not exist is not there, and not counted."""
    skipped = dict.fromkeys(SKIP_REASONS, 0)
    targets: list[tuple[str, str | None]] = []
    if names is None:
        for version, os_name in table_objects():
            if version == LAYOUT_VERSION:
                targets.append((os_name, None))
            else:
                skipped["other_version"] += 1
    else:
        targets = [(object_name(n), n) for n in (validate_table_name(n) for n in names)]
    found = []
    for os_name, name in targets:
        try:
            found.append(_read(os_name, name))
        except NoSuchTable:  # removed since it was listed, or (named) not made yet
            if name is not None and other_versions(name):
                skipped["other_version"] += 1
        except NotInitialised:
            skipped["not_initialised"] += 1
        except AccessDenied:
            skipped["not_ours"] += 1
        except MPFlightError:
            skipped["unreadable"] += 1
    return Scrape(tuple(sorted(found, key=lambda t: t.table)), skipped)


def _other_version(name: str, version: int) -> MPFlightError:
    return IncompatibleTable(
        name,
        f"mpflight table {name!r} has layout version {version}; this mpflight reads version "
        f"{LAYOUT_VERSION}: use the mpflight that made it",
    )


def _read(os_name: str, expected: str | None) -> TableMetrics:
    """Read the table object ``os_name`` (which must be the table ``expected``, when given)."""
    mm = map_read_only(expected or os_name, os_name)
    try:
        fields = HEADER.unpack_from(mm, 0)
        ready, name_len, created, raw = fields[2], fields[9], fields[11], fields[12]
        what = f"mpflight table {os_name}"
        if ready != 1:
            raise NotInitialised(expected or os_name)
        geo = header_geometry(fields, len(mm))
        if geo == "version":
            raise DamagedTable(os_name, f"{what} has a damaged header (magic or version)")
        try:
            name = validate_table_name(raw[:name_len].decode())
        except (UnicodeDecodeError, ValueError):
            raise DamagedTable(os_name, f"{what} has a damaged header (its name)") from None
        if object_name(name) != os_name or expected not in (None, name):
            raise DamagedTable(os_name, f"{what} names another table in its header: {name!r}")
        if geo == "geometry":
            raise DamagedTable(os_name, f"{what} has another geometry than this version of mpflight writes")
        if geo == "slots":
            raise DamagedTable(os_name, f"{what} has a damaged header (its slot count)")
        if not isinstance(geo, Geometry):
            raise DamagedTable(
                os_name, f"{what} is damaged: its size or record count does not match its header"
            )
        slots = geo.slots
        # Native u64 loads (memoryview.cast), each counter read whole; struct's "<Q" reads byte by byte.
        with memoryview(mm) as view:
            with view[H_COUNTERS : H_COUNTERS + COUNTERS.size] as part, part.cast("Q") as words:
                values = words.tolist()
            with (
                view[H_TIER_COUNTERS : H_TIER_COUNTERS + TIER_COUNTERS.size] as part,
                part.cast("Q") as words,
            ):
                values += words.tolist()
        calls = _calls(mm, geo)
        waiters = mm[geo.record_map : geo.record_map + geo.records].count(1)
    finally:
        mm.close()
    group, _, host = name.partition("+")
    return TableMetrics(name, group, host, created, slots, counted(values), calls, waiters)


def _calls(mm: mmap.mmap, geo: Geometry) -> dict[str, int]:
    """The calls in flight by state, classified as inflight() does (without reclaiming anything)."""
    with memoryview(mm) as buf:
        states = bytes(buf[geo.state_map : geo.state_map + geo.slots])
        calls = dict.fromkeys(STATES, 0)
        now = time.monotonic_ns()
        for match in _BUSY.finditer(states):
            index, state = match.start(), states[match.start()]
            off = geo.slot(index)
            if state == 1:
                pid = int.from_bytes(buf[off + S_OWNER_PID : off + S_OWNER_PID + 4], "little")
                calls["running" if pid else "vacant"] += 1
            elif state == 2:
                calls["completing"] += 1
            else:
                flags = int.from_bytes(buf[off + S_FLAGS : off + S_FLAGS + 4], "little")
                until = int.from_bytes(buf[off + S_LINGER : off + S_LINGER + 8], "little")
                calls["lingering" if flags & JOINABLE and until > now else "done"] += 1
        return calls


# -- as metric families ------------------------------------------------------------------------------


# One sample: the label values, the value, and a counter's created time (epoch seconds).
Sample = tuple[tuple[str, ...], float, float | None]


class Family(NamedTuple):
    """One metric family: its name (a counter's without ``_total``), its samples (label values, value,
    and a counter's created time)."""

    name: str
    kind: str  # "counter" or "gauge"
    help: str
    unit: str  # "" or "seconds"; the name ends with it
    labels: tuple[str, ...]
    samples: Sequence[Sample]


def families(s: Scrape) -> Iterator[Family]:
    """The metrics of a scrape: a counter per counter of stats(), then the gauges."""
    for counter, text in COUNTER_HELP.items():
        seconds = counter == "wait_ns"
        name = "mpflight_wait_seconds" if seconds else f"mpflight_{counter}"
        samples: list[Sample] = [
            (_of(t), t.counters[counter] / 1e9 if seconds else t.counters[counter], t.created)
            for t in s.tables
        ]
        yield Family(name, "counter", text, "seconds" if seconds else "", TABLE_LABELS, samples)
    in_flight = [((*_of(t), state), t.calls[state], None) for t in s.tables for state in STATES]
    yield Family("mpflight_calls_in_flight", "gauge", _IN_FLIGHT, "", (*TABLE_LABELS, "state"), in_flight)
    waiters = [(_of(t), t.waiters, None) for t in s.tables]
    yield Family("mpflight_waiters", "gauge", _WAITERS, "", TABLE_LABELS, waiters)
    slots = [(_of(t), t.slots, None) for t in s.tables]
    yield Family("mpflight_slots", "gauge", _SLOTS, "", TABLE_LABELS, slots)
    skipped = [((reason,), n, None) for reason, n in s.skipped.items()]
    yield Family("mpflight_skipped_tables", "gauge", _SKIPPED, "", ("reason",), skipped)


def _of(t: TableMetrics) -> tuple[str, str, str]:
    return t.table, t.group, t.host


_IN_FLIGHT: Final = (
    "Calls in the table now, by state as Group.inflight() names them (dead processes' too, until reclaimed)"
)
_WAITERS: Final = "Callers waiting on another caller's run now (waiter records in use)"
_SLOTS: Final = "The table's slots: how many calls can be in flight at once before calls fall back"
_SKIPPED: Final = "Tables this scrape could not read, by reason: " + ", ".join(SKIP_REASONS)


# -- as text ---------------------------------------------------------------------------------------------
# Written here rather than with prometheus_client's exposition, so that `mpflight stats --format ...`
# works where only the core is installed (a host whose node_exporter reads a textfile); the tests parse
# both texts with prometheus_client's own parsers and compare them with its exposition of the collector.


def openmetrics(s: Scrape) -> str:
    """The scrape as OpenMetrics 1.0 text (application/openmetrics-text), ending with ``# EOF``."""
    lines = []
    for f in families(s):
        lines += [f"# HELP {f.name} {_help(f.help)}", f"# TYPE {f.name} {f.kind}"]
        if f.unit:
            lines.append(f"# UNIT {f.name} {f.unit}")
        for values, value, created in f.samples:
            labels = _labels(f.labels, values)
            lines.append(f"{f.name}{'_total' if f.kind == 'counter' else ''}{labels} {_number(value)}")
            if created is not None:
                lines.append(f"{f.name}_created{labels} {_number(created)}")
    lines.append("# EOF")
    return "\n".join(lines) + "\n"


def prometheus_text(s: Scrape) -> str:
    """The scrape in Prometheus's text format 0.0.4, which node_exporter's textfile collector reads (it
    does not read OpenMetrics); a counter's created time is the gauge NAME_created, as prometheus_client
    writes it."""
    lines = []
    for f in families(s):
        name = f"{f.name}_total" if f.kind == "counter" else f.name
        lines += [f"# HELP {name} {_help(f.help)}", f"# TYPE {name} {f.kind}"]
        lines += [f"{name}{_labels(f.labels, v)} {_number(value)}" for v, value, _ in f.samples]
        if f.kind == "counter":
            lines += [f"# HELP {f.name}_created {_help(f.help)}", f"# TYPE {f.name}_created gauge"]
            lines += [
                f"{f.name}_created{_labels(f.labels, v)} {_number(c)}"
                for v, _, c in f.samples
                if c is not None
            ]
    return "\n".join(lines) + "\n"


def _help(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n")


def _labels(names: tuple[str, ...], values: tuple[str, ...]) -> str:
    escaped = (v.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"") for v in values)
    return "{" + ",".join(f'{n}="{v}"' for n, v in zip(names, escaped, strict=True)) + "}"


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) else repr(float(value))
