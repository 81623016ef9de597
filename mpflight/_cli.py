"""The ``mpflight`` command (also ``python -m mpflight``): see what is in flight, and clean up.

Exit codes: 0 done (a table with nothing in flight is fine), 1 no such table (or one not initialised),
2 usage or other error. Reading a table never writes to it and holds its lock only while copying a
snapshot; ``gc`` and ``unlink`` are the only commands that change anything. Every command opens with
``create=False``, which never creates a table nor initialises one that its creator has not finished;
``stats --format openmetrics`` (or ``prometheus``) maps tables read-only and takes no lock at all.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import reprlib
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import TextIO

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


def human_seconds(s: float) -> str:
    if s < 1:
        return f"{s * 1000:.0f} ms"
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


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


def _table(rows: list[list[str]], right: set[int], style: _Style) -> str:
    """Rows as aligned columns; the first row is the header. Styles are applied after padding."""
    widths = [max(len(_plain(r[i])) for r in rows) for i in range(len(rows[0]))]
    out = []
    for n, row in enumerate(rows):
        cells = []
        for i, cell in enumerate(row):
            pad = " " * (widths[i] - len(_plain(cell)))
            cells.append(pad + cell if i in right else cell + pad)
        line = "  ".join(cells).rstrip()
        out.append(style.bold(line) if n == 0 else line)
    return "\n".join(out)


def _plain(cell: str) -> str:
    """A cell's visible text (without ANSI styles)."""
    while "\x1b[" in cell:
        start = cell.index("\x1b[")
        cell = cell[:start] + cell[cell.index("m", start) + 1 :]
    return cell


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
        print(_table(rows, right={1, 2, 3, 4, 5, 6, 7}, style=style), file=out)
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
    key: dict[str, object] = {"key": c.key} if isinstance(c.key, str) else {"key_hex": c.key.hex()}
    return {
        **key,
        "key_complete": c.key_complete,
        "owner_pid": c.owner_pid,
        "owner_alive": c.owner_alive,
        "started": c.started,
        "age_s": round(max(0.0, now - c.started), 6),
        "waiters": c.waiters,
        "state": c.state,
        "result_bytes": c.result_bytes,
        "takeovers": c.takeovers,
        "linger_left_s": None if c.linger_left is None else round(c.linger_left, 6),
        **({"tier_hex": c.tier.hex()} if c.tier else {}),  # the state a tier behind the table keeps
        **({"tier": parse_note(c.tier)} if parse_note(c.tier) else {}),  # the cross-host tier's, read
    }


def render_inspect(group: Group, style: _Style) -> str:
    calls = group.inflight()
    now = time.time()
    head = f"table {group.name}: {group.slots} slots, {len(calls)} in flight"
    if not calls:
        return style.bold(head)
    rows = _inflight_rows(calls, now, style)
    return style.bold(head) + "\n" + _table(rows, right={1, 3, 4, 6}, style=style)


def cmd_inspect(args: argparse.Namespace, out: TextIO) -> int:
    with _open(args.name) as group:
        if args.json:
            now = time.time()
            print(json.dumps([_call_json(c, now) for c in group.inflight()], indent=2), file=out)
            return EXIT_OK
        style = _Style(out)
        if not args.watch:
            print(render_inspect(group, style), file=out)
            return EXIT_OK
        return _watch(lambda: render_inspect(group, style), args.interval, out)


def _watch(render: Callable[[], str], interval: float, out: TextIO) -> int:
    """Redraw ``render()`` in place every ``interval`` seconds until Ctrl-C (or SIGTERM)."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        while True:
            stamp = time.strftime("%H:%M:%S")
            out.write(f"\x1b[H\x1b[2J{render()}\n\nrefreshed {stamp} every {interval:g} s; Ctrl-C quits\n")
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
    rows = [
        ["calls", str(stats["calls"]), ""],
        ["runs", str(stats["runs"]), "executions of fn by owners"],
        ["shared", str(stats["shared"]), f"waiters served another's outcome{share}"],
        ["errors", str(stats["errors"]), "fn raised"],
        ["aborts", str(stats["aborts"]), "calls whose owner died or left fn abnormally"],
        ["timeouts", str(stats["timeouts"]), "waiters that gave up"],
        ["fallbacks", str(stats["fallbacks"]), "calls run alone: the table was full"],
        ["mean wait", human_seconds(mean_wait), ""],
    ]
    print(_table([["COUNTER", "VALUE", ""], *rows], right={1}, style=_Style(out)), file=out)
    return EXIT_OK


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
        f"fn takes {args.delay * 1000:.0f} ms",
        f"fn ran {runs} times; {stats['shared']} calls took the outcome of another's execution",
        f"without mpflight, fn would have run {calls} times: {calls / max(runs, 1):.1f}x the work",
    ]
    print("\n".join(lines), file=out)
    return EXIT_OK


# -- main ------------------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mpflight", description="See and clean up the mpflight tables of this machine."
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    ls = sub.add_parser("ls", help="every mpflight table on this machine")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ins = sub.add_parser("inspect", help="the calls in flight in one table")
    ins.add_argument("name")
    ins.add_argument("--json", action="store_true", help="machine-readable output")
    ins.add_argument("--watch", action="store_true", help="refresh in place until Ctrl-C")
    ins.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes (default 1)")
    st = sub.add_parser("stats", help="the counters of one table (or of every table, as metrics)")
    st.add_argument(
        "name", nargs="?", help="the table (every table, with --format openmetrics or prometheus)"
    )
    st.add_argument(
        "--format", choices=["text", "json", *_METRIC_FORMATS], default=None,
        help="text (default), json, openmetrics (OpenMetrics text), or prometheus (the text format "
        "node_exporter's textfile collector reads)",
    )  # fmt: skip
    st.add_argument("--json", action="store_true", help="the same as --format json")
    gc = sub.add_parser("gc", help="reclaim slots of dead owners and leaked result segments")
    gc.add_argument("name")
    gc.add_argument("--json", action="store_true", help="machine-readable output")
    un = sub.add_parser("unlink", help="remove a table, its semaphores and segments")
    un.add_argument("name")
    un.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    d = sub.add_parser("demo", help="watch worker processes coalesce their calls")
    d.add_argument("--workers", type=int, default=8)
    d.add_argument("--keys", type=int, default=4)
    d.add_argument("--calls", type=int, default=40, help="calls per worker")
    d.add_argument("--delay", type=float, default=0.05, help="seconds fn takes")
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
    if getattr(args, "interval", 1.0) <= 0:
        print("mpflight: --interval must be positive", file=sys.stderr)
        return EXIT_ERROR
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
