"""The ``mpflight`` command (also ``python -m mpflight``): see what is in flight, and clean up.

Exit codes: 0 done (a table with nothing in flight is fine), 1 no such table (or one not initialised),
2 usage or other error. Reading a table never writes to it and holds its lock only while copying a
snapshot; ``gc`` and ``unlink`` are the only commands that change anything. Every command opens with
``create=False``, which never creates a table nor initialises one that its creator has not finished;
``stats --format openmetrics`` (or ``prometheus``) maps tables read-only and takes no lock at all.
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import json
import math
import multiprocessing
import os
import random
import re
import reprlib
import shutil
import signal
import sys
import time
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from typing import Final, TextIO

from . import _metrics
from ._errors import MPFlightError, NoSuchTable, NotInitialised
from ._group import Group
from ._housekeeping import InflightCall, tables, unlink
from ._redis import parse_note

EXIT_OK, EXIT_NO_TABLE, EXIT_ERROR = 0, 1, 2

_keys = reprlib.Repr()
_keys.maxstring = 48
_keys.maxother = 48


class _Style:
    """ANSI styles, only when writing to a terminal and NO_COLOR is not set."""

    def __init__(self, stream: TextIO) -> None:
        self.on = stream.isatty() and "NO_COLOR" not in os.environ

    def __call__(self, text: str, code: str) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if self.on else text

    def bold(self, text: str) -> str:
        return self(text, "1")

    def red(self, text: str) -> str:
        return self(text, "31;1")

    def dim(self, text: str) -> str:
        return self(text, "2")


# The units a duration is shown in, smallest first: (unit, its seconds, decimals shown, the value from
# which the next unit takes over). A value is rounded to its unit's decimals before it is compared, so
# that 0.9996 s is "1.0 s", never "1000 ms".
_DURATION_UNITS: Final = (
    ("ms", 1e-3, 1, 1.0),  # below a millisecond: 0.4 ms
    ("ms", 1e-3, 0, 1000.0),
    ("s", 1.0, 1, 60.0),
    ("min", 60.0, 1, 60.0),
    ("h", 3600.0, 1, math.inf),
)


def human_seconds(s: float) -> str:
    """A duration as every command shows one: "0.4 ms", "12 ms", "1.0 s", "2.5 min", "1.2 h"."""
    s = max(0.0, s)
    for unit, size, decimals, limit in _DURATION_UNITS:
        value = round(s / size, decimals)
        if value < limit:
            return f"{value:.{decimals}f} {unit}"
    return f"{s / 3600:.1f} h"  # infinite or NaN


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def show_key(call: InflightCall) -> str:
    text = _keys.repr(call.key)
    return text if call.key_complete else text + "…"


def _table(rows: list[list[str]], right: set[int], style: _Style, width: int | None = None) -> list[str]:
    """Rows as aligned columns; the first row is the header. Styles are applied after padding.

    Columns are measured in display width (a CJK character or an emoji takes two cells). With
    ``width``, the first column is shortened (its cells end in an ellipsis) until the lines fit, and a
    line that still does not is cut: a terminal never wraps them.
    """
    widths = [max(display_width(r[i]) for r in rows) for i in range(len(rows[0]))]
    if width is not None:
        others = sum(widths[1:]) + 2 * (len(widths) - 1)
        widths[0] = max(min(widths[0], width - others), min(widths[0], _MIN_KEY_WIDTH))
        rows = [[fit(row[0], widths[0]), *row[1:]] for row in rows]
    out = []
    for n, row in enumerate(rows):
        cells = []
        for i, cell in enumerate(row):
            pad = " " * (widths[i] - display_width(cell))
            cells.append(pad + cell if i in right else cell + pad)
        line = "  ".join(cells).rstrip()
        if width is not None:
            line = fit(line, width)
        out.append(style.bold(line) if n == 0 else line)
    return out


_MIN_KEY_WIDTH: Final = 12  # the narrowest a key is cut to before whole lines are cut instead
_ANSI: Final = re.compile(r"\x1b\[[0-9;]*m")
_TOKEN: Final = re.compile(r"\x1b\[[0-9;]*m|.", re.S)  # an ANSI style, or one character


def _plain(cell: str) -> str:
    """A cell's visible text (without ANSI styles)."""
    return _ANSI.sub("", cell)


@functools.lru_cache(maxsize=4096)
def _char_width(char: str) -> int:
    """The cells a terminal gives one character: 2 for wide (CJK, most emoji), 0 for combining marks.

    From the standard library's Unicode database (East Asian Width), so that the CLI needs no
    dependency for it; a character a terminal draws otherwise than its Unicode data says (an emoji
    made wide by a variation selector) may still be off by a cell.
    """
    if unicodedata.combining(char) or unicodedata.category(char) in ("Mn", "Me", "Cf"):
        return 0
    return 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1


def display_width(text: str) -> int:
    """How many terminal cells ``text`` takes (ANSI styles take none)."""
    return sum(_char_width(c) for c in _plain(text))


def fit(text: str, width: int) -> str:
    """``text`` cut to ``width`` terminal cells, ending in an ellipsis when cut (styles are kept)."""
    if display_width(text) <= width:
        return text
    if width < 1:
        return ""
    out, used = [], 0
    for token in _TOKEN.findall(text):
        if token.startswith("\x1b["):
            out.append(token)
            continue
        cells = _char_width(token)
        if used + cells > width - 1:
            break
        out.append(token)
        used += cells
    kept = "".join(out)
    return kept + "…" + ("\x1b[0m" if _ANSI.search(kept) else "")


# -- commands ------------------------------------------------------------------------------------------


def _open(name: str) -> Group:
    """The table ``name``: a group's, or ``group+host`` for a simulated host's (MPFLIGHT_HOST_ID)."""
    group, _, host = name.partition("+")
    return Group(group, create=False, host_id=host or None)


def cmd_ls(args: argparse.Namespace, out: TextIO) -> int:
    style = _Style(out)
    rows = [["NAME", "SLOTS", "IN USE", "CALLS", "RUNS", "SHARED", "FALLBACKS", "ABORTS"]]
    data = []
    for name in tables():
        try:
            with _open(name) as group:
                stats, calls, slots = group.stats(), group.inflight(), group.slots
        except NotInitialised:
            rows.append([name, style.dim("not initialised"), "", "", "", "", "", ""])
            continue
        except MPFlightError as e:
            rows.append([name, style.dim(f"({e})"), "", "", "", "", "", ""])
            continue
        share = stats["shared"] / stats["calls"] if stats["calls"] else 0.0
        data.append({"name": name, "slots": slots, "in_use": len(calls), **stats, "shared_fraction": share})
        rows.append(
            [name, str(slots), str(len(calls)), str(stats["calls"]), str(stats["runs"]), f"{share:.1%}",
             str(stats["fallbacks"]), str(stats["aborts"])]
        )  # fmt: skip
    if args.json:
        print(json.dumps(data, indent=2), file=out)
    elif len(rows) == 1:
        print("no mpflight tables on this machine", file=out)
    else:
        print("\n".join(_table(rows, right={1, 2, 3, 4, 5, 6, 7}, style=style)), file=out)
    return EXIT_OK


def _inflight_rows(calls: list[InflightCall], now: float, style: _Style) -> list[list[str]]:
    rows = [["KEY", "OWNER", "ALIVE", "AGE", "WAITERS", "STATE", "RESULT"]]
    for c in calls:
        alive = "yes" if c.owner_alive else "-" if c.state in ("vacant", "lingering") else style.red("DEAD")
        age = human_seconds(max(0.0, now - c.started))
        state = c.state
        if c.linger_left is not None:
            state += f" ({human_seconds(c.linger_left)} left)"
        if c.takeovers:
            state += f", taken over {c.takeovers}x"
        tier = parse_note(c.tier)
        if tier is not None:  # the cross-host tier's part in the call
            state += ", owns in redis" if tier["role"] == "owner" else f", waits on {tier['owner_host']}"
        rows.append(
            [show_key(c), str(c.owner_pid), alive, age, str(c.waiters), state, human_bytes(c.result_bytes)]
        )
    return rows


def _call_json(c: InflightCall, now: float) -> dict[str, object]:
    """Every field of ``c`` (bytes as hex, seconds with their unit in the name), and age_s and the
    cross-host tier's part read from its note (null without the tier)."""
    key: dict[str, object] = {"key": c.key} if isinstance(c.key, str) else {"key_hex": c.key.hex()}
    return {
        **key,
        "key_complete": c.key_complete,
        "owner_pid": c.owner_pid,
        "owner_alive": c.owner_alive,
        "started": c.started,
        "age_s": round(max(0.0, now - c.started), 6),
        "waiters": c.waiters,
        "waiter_pids": list(c.waiter_pids),
        "state": c.state,
        "result_bytes": c.result_bytes,
        "takeovers": c.takeovers,
        "linger_left_s": None if c.linger_left is None else round(c.linger_left, 6),
        "tier_hex": c.tier.hex(),  # the state a tier behind the table keeps ("" without one)
        "tier": parse_note(c.tier),  # the cross-host tier's part, read from it
    }


def render_inspect(group: Group, style: _Style) -> str:
    calls = group.inflight()
    now = time.time()
    head = f"table {group.name}: {group.slots} slots, {len(calls)} in flight"
    if not calls:
        return style.bold(head)
    rows = _inflight_rows(calls, now, style)
    return style.bold(head) + "\n" + "\n".join(_table(rows, right={1, 3, 4, 6}, style=style))


def cmd_inspect(args: argparse.Namespace, out: TextIO) -> int:
    group = _open(args.name)
    if args.json or not args.watch:
        with group:
            if args.json:
                now = time.time()
                print(json.dumps([_call_json(c, now) for c in group.inflight()], indent=2), file=out)
            else:
                print(render_inspect(group, _Style(out)), file=out)
        return EXIT_OK
    watched = _Watched(args.name, group, _Style(out))
    try:
        return _watch(watched.render, args.interval, out)
    finally:
        watched.close()


def _rates(before: Mapping[str, int], after: Mapping[str, int], seconds: float) -> str:
    """What the counters did between two reads ``seconds`` apart: calls and runs per second, the share
    of calls that did not run fn themselves (joins and linger hits), and the aborts."""
    calls = after["calls"] - before["calls"]
    coalesced = after["joins"] - before["joins"] + after["linger_hits"] - before["linger_hits"]
    share = f"{coalesced / calls:.1%}" if calls > 0 else "-"
    return (
        f"{calls / seconds:.1f} calls/s, {(after['runs'] - before['runs']) / seconds:.1f} runs/s, "
        f"{share} coalesced, {after['aborts'] - before['aborts']} aborts "
        f"(last {human_seconds(seconds)})"
    )


class _Watched:
    """The table that ``inspect --watch`` shows, followed by its name: when the table is removed, the
    watch says so and waits; when a table of the name is made anew, the watch shows that one."""

    def __init__(self, name: str, group: Group, style: _Style) -> None:
        self.name, self.style = name, style
        self.group: Group | None = group
        self.notice = ""  # what happened to the table, shown under its header
        self.before: tuple[float, Mapping[str, int]] | None = None  # the counters at the last refresh

    def close(self) -> None:
        if self.group is not None:
            self.group.close()
            self.group = None

    def _follow(self) -> Group | None:
        """The table the name leads to now (None while there is none), announced when it changed."""
        group = self.group
        # Whether the name still leads to the mapping this process holds: inflight() and stats() read
        # the mapping, which outlives an unlink, so without this the watch would show a dead table.
        if group is not None and not group._table().file.replaced():
            return group
        stamp = time.strftime("%H:%M:%S")
        if group is not None:
            self.close()
            self.notice = f"table {self.name} was removed at {stamp}; waiting for it"
        try:
            group = _open(self.name)
        except (NoSuchTable, NotInitialised):
            return None
        except MPFlightError as e:  # another's, another version's: wait until it is ours again
            self.notice = f"table {self.name}: {e}; waiting for it"
            return None
        if group._table().file.replaced():  # replaced again meanwhile, or a mapping still closing
            group.close()
            return None
        self.group, self.before = group, None  # a new table counts from zero
        self.notice = f"table {self.name} was made anew at {stamp}"
        return group

    def render(self, columns: int, lines: int) -> list[str]:
        """One screen, at most ``lines`` lines of at most ``columns`` cells (the footer's line included)."""
        style = self.style
        group = self._follow()
        if group is None:
            return [style.bold(fit(self.notice, columns))]
        calls, stats, now, clock = group.inflight(), group.stats(), time.time(), time.monotonic()
        head = [style.bold(fit(f"table {group.name}: {group.slots} slots, {len(calls)} in flight", columns))]
        if self.notice:
            head.append(fit(self.notice, columns))
        if self.before is None:
            rates = "rates from the next refresh on"
        else:
            rates = _rates(self.before[1], stats, max(clock - self.before[0], 1e-9))
        self.before = (clock, stats)
        head.append(fit(rates, columns))
        if not calls:
            return head
        room = lines - len(head) - 3  # the column header, the blank line and the footer below
        shown = calls if len(calls) <= room else calls[: max(room - 1, 0)]
        rows = _table(_inflight_rows(shown, now, style), right={1, 3, 4, 6}, style=style, width=columns)
        if len(shown) < len(calls):
            rows.append(f"... {len(calls) - len(shown)} more")
        return head + rows


def _watch(render: Callable[[int, int], list[str]], interval: float, out: TextIO) -> int:
    """Redraw ``render(columns, lines)`` in place every ``interval`` seconds until Ctrl-C (or SIGTERM),
    fitted to the terminal's size at each redraw: the cursor stays on the last line, so nothing scrolls."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        while True:
            columns, lines = shutil.get_terminal_size()
            stamp = time.strftime("%H:%M:%S")
            screen = render(columns, lines)
            footer = fit(f"refreshed {stamp} every {human_seconds(interval)}; Ctrl-C quits", columns)
            out.write("\x1b[H\x1b[2J" + "\n".join([*screen, "", footer]))
            out.flush()
            time.sleep(interval)
    except KeyboardInterrupt:
        out.write("\n")
        out.flush()
        return EXIT_OK


_METRIC_FORMATS: dict[str, Callable[[_metrics.Scrape], str]] = {
    "openmetrics": _metrics.openmetrics,
    "prometheus": _metrics.prometheus_text,
}


def cmd_stats(args: argparse.Namespace, out: TextIO) -> int:
    fmt = args.format or ("json" if args.json else "text")
    if args.json and fmt != "json":
        print(f"mpflight: --json and --format {fmt} disagree", file=sys.stderr)
        return EXIT_ERROR
    if fmt in _METRIC_FORMATS:
        # Written by the core (mpflight._metrics), not by prometheus_client: a host whose node_exporter
        # reads a textfile needs no extra for it. Read-only, like the collector's scrape: one table
        # (whose absence is exit 1, as for the other formats), or every table when none is named.
        if args.name is None:
            scrape = _metrics.scrape(None)
        else:
            scrape = _metrics.Scrape(
                (_metrics.read_table(args.name),), dict.fromkeys(_metrics.SKIP_REASONS, 0)
            )
        print(_METRIC_FORMATS[fmt](scrape), end="", file=out)
        return EXIT_OK
    if args.name is None:
        print("mpflight: stats needs a table's name (--format openmetrics and prometheus read every table)",
              file=sys.stderr)  # fmt: skip
        return EXIT_ERROR
    with _open(args.name) as group:
        stats = group.stats()
    waits = stats["shared"] + stats["timeouts"]
    mean_wait = stats["wait_ns"] / waits / 1e9 if waits else 0.0
    if fmt == "json":
        print(json.dumps({**stats, "mean_wait_s": mean_wait}, indent=2), file=out)
        return EXIT_OK
    share = f" ({stats['shared'] / stats['calls']:.1%} of calls)" if stats["calls"] else ""
    notes = {**_COUNTER_NOTES, "shared": _COUNTER_NOTES["shared"] + share}
    order = ["calls", *(k for k in stats if k != "calls")]  # every counter stats() has, calls first
    rows = [[k, str(stats[k]), notes.get(k, "")] for k in order]
    rows.append(["mean wait", human_seconds(mean_wait), "wait_ns over shared and timeouts"])
    print("\n".join(_table([["COUNTER", "VALUE", ""], *rows], right={1}, style=_Style(out))), file=out)
    return EXIT_OK


# What ``stats`` says of each counter (docs/operations.md, "The counters", has the whole story); a
# counter without a note is shown all the same.
_COUNTER_NOTES: Final = {
    "calls": "runs - takeovers + joins + linger_hits + fallbacks",
    "runs": "executions of fn by owners, takeovers included",
    "joins": "calls that waited on another caller's run",
    "shared": "waiters served another's outcome",
    "errors": "fn raised",
    "aborts": "calls whose owner died or left fn abnormally",
    "timeouts": "waiters that gave up",
    "fallbacks": "calls run alone: the table was full",
    "wait_ns": "time waiters spent waiting, in nanoseconds",
    "takeovers": "waiters that took a call over from an owner that was gone",
    "linger_hits": "calls served a lingering outcome",
    "remote_owners": "runs that owned the call fleet-wide (redis=)",
    "remote_joins": "runs that waited on another host's owner (redis=)",
    "remote_fallbacks": "Redis steps that failed: the host coalesced alone",
    "remote_fenced": "late publishes that Redis rejected",
    "remote_not_shared": "outcomes above max_remote_bytes, not shared across hosts",
}


def cmd_gc(args: argparse.Namespace, out: TextIO) -> int:
    with _open(args.name) as group:
        got = group.gc()
    if args.json:
        print(json.dumps(got), file=out)
    elif any(got.values()):
        print(
            f"reclaimed {got['calls']} call(s) of dead owners, {got['waiters']} dead waiter record(s), "
            f"{got['segments']} orphaned segment(s)",
            file=out,
        )
    else:
        print("nothing to reclaim", file=out)
    return EXIT_OK


def cmd_unlink(args: argparse.Namespace, out: TextIO) -> int:
    if args.name not in tables():
        print(f"no mpflight table named {args.name!r}", file=sys.stderr)
        return EXIT_NO_TABLE
    if not args.yes:
        if sys.stdin is None or not sys.stdin.isatty():  # a script, cron, a pipe: nobody to answer
            print(f"mpflight: not removing table {args.name!r}: nobody to confirm it (stdin is not a "
                  "terminal); pass --yes", file=sys.stderr)  # fmt: skip
            return EXIT_ERROR
        question = f"Remove table {args.name!r} with its semaphores and segments? [y/N] "
        print(question, end="", file=out, flush=True)
        if sys.stdin.readline().strip().lower() not in ("y", "yes"):
            print("kept", file=out)
            return EXIT_OK
    unlink(args.name)
    print(f"removed table {args.name!r}", file=out)
    return EXIT_OK


# -- demo ------------------------------------------------------------------------------------------------


def _expensive(key: str, delay: float) -> str:
    time.sleep(delay)  # stands for a slow query or render
    return f"value of {key}"


def _demo_worker(name: str, keys: int, calls: int, delay: float, start: float) -> None:
    rng = random.Random(os.getpid())
    with Group(name) as group:
        time.sleep(max(0.0, start - time.time()))  # released together, like a herd
        for _ in range(calls):
            key = f"key-{rng.randrange(keys)}"
            if group.do(key, _expensive, key, delay) != f"value of {key}":
                raise SystemExit(f"wrong value for {key}")


def cmd_demo(args: argparse.Namespace, out: TextIO) -> int:
    """Start worker processes that hammer a few keys; print calls against executions of fn."""
    name = f"demo-{os.getpid()}"
    ctx = multiprocessing.get_context("spawn")
    try:
        Group(name).close()  # create the table once, up front
        start = time.time() + 0.5
        procs = [
            ctx.Process(target=_demo_worker, args=(name, args.keys, args.calls, args.delay, start))
            for _ in range(args.workers)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        with Group(name) as group:
            stats = group.stats()
    finally:
        unlink(name)
    if any(p.exitcode for p in procs):
        print("a worker failed", file=sys.stderr)
        return EXIT_ERROR
    calls, runs = stats["calls"], stats["runs"]
    lines = [
        f"{args.workers} worker processes made {calls} calls on {args.keys} keys; "
        f"fn takes {human_seconds(args.delay)}",
        f"fn ran {runs} times; {stats['shared']} calls took the outcome of another's execution",
        f"without mpflight, fn would have run {calls} times: {calls / max(runs, 1):.1f}x the work",
        f"(the demo removed its table {name}; with your own, 'mpflight ls' lists the tables of the"
        " machine and 'mpflight inspect NAME --watch' shows their calls live)",
    ]
    print("\n".join(lines), file=out)
    return EXIT_OK


# -- main ------------------------------------------------------------------------------------------------


def _count(text: str) -> int:
    """An argparse type: a whole number, at least 1."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {n}")
    return n


def _seconds(text: str, *, zero: bool = True) -> float:
    """An argparse type: a finite number of seconds, not negative (nor zero, unless ``zero``)."""
    try:
        s = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(s) or s < 0 or (s == 0 and not zero):
        raise argparse.ArgumentTypeError(
            f"must be {'0 or more' if zero else 'more than 0'} seconds, not {text}"
        )
    return s


def _interval(text: str) -> float:
    return _seconds(text, zero=False)


def _version() -> str:
    try:
        return importlib.metadata.version("mpflight")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def _command(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    summary: str,
    description: str,
    examples: str,
) -> argparse.ArgumentParser:
    """A subcommand whose --help says what it does and shows how it is run."""
    return sub.add_parser(
        name, help=summary, description=description, epilog="examples:\n" + examples,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mpflight", description="See and clean up the mpflight tables of this machine.",
        epilog="examples:\n  mpflight ls\n  mpflight inspect NAME --watch\n  mpflight COMMAND --help",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("--version", action="version", version=f"mpflight {_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    ls = _command(
        sub, "ls", "every mpflight table on this machine",
        "List every mpflight table of this machine: its slots, the calls in flight and its counters.\n"
        "Reclaims what dead processes left behind, as every process's reaper does.",
        "  mpflight ls\n  mpflight ls --json | jq '.[].name'",
    )  # fmt: skip
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ins = _command(
        sub, "inspect", "the calls in flight in one table",
        "Show the calls in flight in one table, oldest first: key, owner and whether it lives, age,\n"
        "waiters, state and the size of the outcome. --watch redraws it every --interval seconds\n"
        "with the rates since the last redraw, and follows the name when the table is made anew.",
        "  mpflight inspect thumbnails\n  mpflight inspect thumbnails --watch --interval 0.5\n"
        "  mpflight inspect thumbnails --json",
    )  # fmt: skip
    ins.add_argument("name")
    ins.add_argument("--json", action="store_true", help="machine-readable output")
    ins.add_argument("--watch", action="store_true", help="refresh in place until Ctrl-C")
    ins.add_argument("--interval", type=_interval, default=1.0, help="seconds between refreshes (default 1)")
    st = _command(
        sub, "stats", "the counters of one table (or of every table, as metrics)",
        "Show every counter of one table, summed over every process since the table was made.\n"
        "--format openmetrics or prometheus writes them as metrics, of every table when none is named.",
        "  mpflight stats thumbnails\n  mpflight stats thumbnails --json\n"
        "  mpflight stats --format prometheus > /var/lib/node_exporter/mpflight.prom",
    )  # fmt: skip
    st.add_argument(
        "name", nargs="?", help="the table (every table, with --format openmetrics or prometheus)"
    )
    st.add_argument(
        "--format", choices=["text", "json", *_METRIC_FORMATS], default=None,
        help="text (default), json, openmetrics (OpenMetrics text), or prometheus (the text format "
        "node_exporter's textfile collector reads)",
    )  # fmt: skip
    st.add_argument("--json", action="store_true", help="the same as --format json")
    gc = _command(
        sub, "gc", "reclaim slots of dead owners and leaked result segments",
        "Reclaim what dead processes left in one table: their calls (a dead owner's call that live\n"
        "waiters still wait on is aborted), their waiter records and orphaned result segments.\n"
        "Safe while workers are live.",
        "  mpflight gc thumbnails\n  mpflight gc thumbnails --json",
    )  # fmt: skip
    gc.add_argument("name")
    gc.add_argument("--json", action="store_true", help="machine-readable output")
    un = _command(
        sub, "unlink", "remove a table, its semaphores and segments",
        "Remove one table with its semaphores and result segments. It asks first on a terminal;\n"
        "without one (a script, cron) it refuses unless --yes is given. Live workers move to a new\n"
        "table of the name.",
        "  mpflight unlink thumbnails\n  mpflight unlink thumbnails --yes",
    )  # fmt: skip
    un.add_argument("name")
    un.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    d = _command(
        sub, "demo", "watch worker processes coalesce their calls",
        "Start worker processes that call a few keys at once in a table of their own (removed after),\n"
        "and compare how often fn ran with how often it was called.",
        "  mpflight demo\n  mpflight demo --workers 16 --keys 2 --delay 0.2",
    )  # fmt: skip
    d.add_argument("--workers", type=_count, default=8, help="worker processes (default 8)")
    d.add_argument("--keys", type=_count, default=4, help="distinct keys they call (default 4)")
    d.add_argument("--calls", type=_count, default=40, help="calls per worker (default 40)")
    d.add_argument("--delay", type=_seconds, default=0.05, help="seconds fn takes (default 0.05)")
    return p


COMMANDS: dict[str, Callable[[argparse.Namespace, TextIO], int]] = {
    "ls": cmd_ls,
    "inspect": cmd_inspect,
    "stats": cmd_stats,
    "gc": cmd_gc,
    "unlink": cmd_unlink,
    "demo": cmd_demo,
}


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parser().parse_args(argv)
    except SystemExit as e:  # argparse: --help is 0, a usage error 2
        return int(e.code or 0)
    try:
        return COMMANDS[args.command](args, sys.stdout)
    except (NoSuchTable, NotInitialised) as e:
        print(f"mpflight: {e}", file=sys.stderr)
        return EXIT_NO_TABLE
    except (MPFlightError, ValueError) as e:
        print(f"mpflight: {e}", file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:  # `mpflight inspect x | head`
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
