"""The mpflight command, end to end in subprocesses, against a table real workers are using."""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import importlib.metadata
import json
import math
import os
import pty
import re
import select
import shlex
import signal
import struct
import subprocess
import sys
import sysconfig
import termios
import threading
import time
import unicodedata
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import posix_ipc
import pytest

import mpflight
from mpflight import _cli
from mpflight._locks import segment_name
from tests.helpers import DEADLINE, ROOT, join_in_thread, remote_owner, start_subprocess, wait_until, waiting

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def mpflight_cli(
    *args: str, stdin: str = "", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    full_env = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", "mpflight", *args], input=stdin, capture_output=True, text=True, env=full_env,
        timeout=DEADLINE, check=False,
    )  # fmt: skip


@pytest.fixture
def busy_table(name: str, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A table in use: a key held in flight with a waiter, a dead owner's call that a live waiter
    still waits on (one that does not check its owner), and a 16 MiB result whose reader died (which
    the reaper and the CLI reclaim on their own)."""
    held, held_gate, _ = remote_owner(name, "held", "value", tmp_path)
    dead, _, _ = remote_owner(name, b"dead\x00\xff", "value", tmp_path)
    group = mpflight.Group(name)
    blind = subprocess.Popen(
        [sys.executable, "-c", f"import mpflight\nmpflight.Group({name!r}, timeout=60).do(b'dead\\x00\\xff', int)"],
        env=dict(os.environ, PYTHONPATH=str(ROOT), MPFLIGHT_TEST_DISABLE="owner-check"), cwd=ROOT,
    )  # fmt: skip
    wait_until(lambda: waiting(group, b"dead\x00\xff") == 1, "a waiter of the dead owner's call")
    dead.kill()
    dead.join(DEADLINE)
    leaker, leak_gate, _ = remote_owner(name, "big", "big", tmp_path)
    victim = start_subprocess("join", name, "big", str(tmp_path / "victim"), MPFLIGHT_FAULT="")
    wait_until(lambda: waiting(group, "big") == 1, "a reader of the big result")
    victim.kill()
    victim.wait(DEADLINE)
    leak_gate.open()
    leaker.join(DEADLINE)  # it published a 16 MiB segment to a reader that died
    thread, box = join_in_thread(group, "held")
    wait_until(lambda: waiting(group, "held") == 1, "a waiter on the held key")
    try:
        yield {"name": name, "held_pid": held.pid, "dead_pid": dead.pid, "leaker_pid": leaker.pid}
    finally:
        blind.kill()
        blind.wait(DEADLINE)
        held_gate.open()
        thread.join(DEADLINE)
        held.join(DEADLINE)
        group.gc()
        group.close()
    assert box[0] == mpflight.Result("the value", True)


def _no_segments(name: str) -> bool:
    return [e for e in os.listdir("/dev/shm") if f"@{name}@r" in e] == []


def test_inspect_json(busy_table: dict[str, Any]) -> None:
    proc = mpflight_cli("inspect", busy_table["name"], "--json")
    assert proc.returncode == 0, proc.stderr
    calls = {c.get("key") or bytes.fromhex(c["key_hex"]): c for c in json.loads(proc.stdout)}
    assert set(calls) == {"held", b"dead\x00\xff"}  # the dead reader's outcome is reclaimed
    assert calls["held"] | {"age_s": 0, "started": 0} == {
        "key": "held", "key_complete": True, "owner_pid": busy_table["held_pid"], "owner_alive": True,
        "started": 0, "age_s": 0, "waiters": 1, "waiter_pids": [os.getpid()], "state": "running",
        "result_bytes": None, "takeovers": 0, "linger_left_s": None, "tier_hex": "", "tier": None,
    }  # fmt: skip
    assert calls[b"dead\x00\xff"]["owner_alive"] is False
    assert calls[b"dead\x00\xff"]["owner_pid"] == busy_table["dead_pid"]
    assert calls[b"dead\x00\xff"]["waiters"] == 1
    assert _no_segments(busy_table["name"])
    ages = [c["age_s"] for c in json.loads(proc.stdout)]
    assert ages == sorted(ages, reverse=True), "oldest first"


def test_inspect_text(busy_table: dict[str, Any]) -> None:
    proc = mpflight_cli("inspect", busy_table["name"])
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == f"table {busy_table['name']}: 1024 slots, 2 in flight"
    assert lines[1].split() == ["KEY", "OWNER", "ALIVE", "AGE", "WAITERS", "STATE", "RESULT"]
    rows = {line.split()[0]: line for line in lines[2:]}
    assert "DEAD" in rows["b'dead\\x00\\xff'"]
    assert "'big'" not in rows
    assert "running" in rows["'held'"] and " yes " in rows["'held'"]
    assert len({line.index("OWNER") if "OWNER" in line else None for line in lines[1:2]}) == 1
    assert not ANSI.search(proc.stdout), "no colour when not writing to a terminal"
    script = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "inspect_table.py"), busy_table["name"], "--json"],
        capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=DEADLINE, check=False,
    )  # fmt: skip
    assert script.returncode == 0, script.stderr
    assert len(json.loads(script.stdout)) == 2


def test_ls_and_stats(busy_table: dict[str, Any]) -> None:
    proc = mpflight_cli("ls", "--json")
    assert proc.returncode == 0, proc.stderr
    [row] = [r for r in json.loads(proc.stdout) if r["name"] == busy_table["name"]]
    assert (row["slots"], row["in_use"], row["runs"], row["fallbacks"]) == (1024, 2, 3, 0)
    text = mpflight_cli("ls").stdout
    assert text.splitlines()[0].split() == [
        "NAME",
        "SLOTS",
        "IN",
        "USE",
        "CALLS",
        "RUNS",
        "SHARED",
        "FALLBACKS",
        "ABORTS",
    ]
    assert any(line.startswith(busy_table["name"]) for line in text.splitlines())
    stats = json.loads(mpflight_cli("stats", busy_table["name"], "--json").stdout)
    assert stats["calls"] == stats["runs"] + stats["joins"] + stats["fallbacks"]
    assert stats["joins"] == 3
    text = mpflight_cli("stats", busy_table["name"]).stdout
    assert re.search(r"^joins|^runs\s+3\b", text, re.M)
    assert "mean wait" in text


def test_gc_reclaims_a_dead_owners_call_and_a_leaked_segment(busy_table: dict[str, Any]) -> None:
    """The leaked segment goes on its own (the reaper); gc also ends the dead owner's call that a
    live waiter still waits on, which the reaper leaves to that waiter."""
    name = busy_table["name"]
    wait_until(lambda: _no_segments(name), "the reaper to reclaim the leaked segment", deadline=10)
    proc = mpflight_cli("gc", name, "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"calls": 1, "waiters": 0, "segments": 0}
    calls = json.loads(mpflight_cli("inspect", name, "--json").stdout)
    assert [c.get("key") for c in calls] == ["held"]
    again = mpflight_cli("gc", name)
    assert again.stdout.strip() == "nothing to reclaim", (again.returncode, again.stderr)


def test_gc_removes_an_orphaned_segment(name: str) -> None:
    with mpflight.Group(name) as group:
        t = group._table()
        orphan = posix_ipc.SharedMemory(segment_name(name, t.nonce, 5, 7), posix_ipc.O_CREX, size=4096)
    orphan.close_fd()
    proc = mpflight_cli("gc", name)
    assert (
        proc.stdout.strip()
        == "reclaimed 0 call(s) of dead owners, 0 dead waiter record(s), 1 orphaned segment(s)"
    )
    assert not [e for e in os.listdir("/dev/shm") if f"@{name}@r" in e]


def test_exit_codes_and_messages(name: str) -> None:
    missing = mpflight_cli("inspect", name)
    assert (missing.returncode, missing.stdout) == (1, "")
    assert missing.stderr == f"mpflight: no mpflight table named {name!r}\n"
    assert mpflight_cli("stats", name).returncode == 1
    assert mpflight_cli("gc", name).returncode == 1
    assert shm_free(name), "inspecting never creates a table"
    bad = mpflight_cli("inspect", "bad name")
    assert bad.returncode == 2
    assert "group name" in bad.stderr
    assert "Traceback" not in bad.stderr
    assert mpflight_cli().returncode == 2
    assert mpflight_cli("frobnicate").returncode == 2
    assert mpflight_cli("--help").returncode == 0
    with mpflight.Group(name):
        empty = mpflight_cli("inspect", name)
        assert (empty.returncode, empty.stdout) == (0, f"table {name}: 1024 slots, 0 in flight\n")


def shm_free(name: str) -> bool:
    return not [e for e in os.listdir("/dev/shm") if f"@{name}" in e]


def test_incompatible_layout_version(name: str) -> None:
    other = posix_ipc.SharedMemory(f"/mpf99@{name}", posix_ipc.O_CREX, size=4096)
    other.close_fd()
    try:
        proc = mpflight_cli("inspect", name)
        assert proc.returncode == 2
        assert "layout version 99" in proc.stderr
        assert "Traceback" not in proc.stderr
    finally:
        posix_ipc.unlink_shared_memory(f"/mpf99@{name}")


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
def test_permission_denied(name: str) -> None:
    mpflight.Group(name).close()
    # Everything is imported before dropping root: the interpreter itself lives under /root.
    code = (
        "import os, sys, shutil, gettext\nfrom mpflight._cli import main, parser\nparser()\n"
        f"os.setgid(65534); os.setuid(65534)\nsys.exit(main(['inspect', {name!r}]))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)),
        timeout=DEADLINE, check=False,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "permission denied" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unlink_asks_first_on_a_terminal(name: str) -> None:
    mpflight.Group(name).close()
    for answer, said in ((b"n\n", "kept"), (b"y\n", f"removed table {name!r}")):
        pid, fd = _pty_run(["unlink", name], _pty_env())
        try:
            _read_until(fd, lambda s: s.endswith("[y/N] "))
            os.write(fd, answer)
            _read_until(fd, lambda s, said=said: said in s)
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0
        finally:
            os.close(fd)
        assert (name in mpflight.tables()) is (said == "kept")
    assert shm_free(name)
    assert mpflight_cli("unlink", name, "--yes").returncode == 1


def test_unlink_without_a_terminal_refuses_unless_yes(name: str) -> None:
    """A script or cron job has nobody to ask: no question on stdout, a refusal on stderr, exit 2."""
    mpflight.Group(name).close()
    refused = mpflight_cli("unlink", name, stdin="y\n")
    assert (refused.returncode, refused.stdout) == (2, "")
    assert refused.stderr == (
        f"mpflight: not removing table {name!r}: nobody to confirm it (stdin is not a terminal); pass --yes\n"
    )
    assert name in mpflight.tables()
    removed = mpflight_cli("unlink", name, "--yes")
    assert (removed.returncode, removed.stdout) == (0, f"removed table {name!r}\n")
    assert name not in mpflight.tables()
    assert shm_free(name)


def _pty_run(args: list[str], env: dict[str, str], size: tuple[int, int] | None = None) -> tuple[int, int]:
    """Start the CLI on a pseudo-terminal of ``size`` (lines, columns), set before the command starts;
    returns (pid, the terminal's master side)."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: become the command
        if size is not None:
            fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", size[0], size[1], 0, 0))
        os.execve(sys.executable, [sys.executable, "-m", "mpflight", *args], env)
    return pid, fd


def _pty_env() -> dict[str, str]:
    """The environment of a command on a pseudo-terminal: its size is the terminal's, not COLUMNS'."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for var in ("COLUMNS", "LINES", "NO_COLOR"):
        env.pop(var, None)
    return env


def _read_until(fd: int, predicate: Any, deadline: float = DEADLINE) -> str:
    out = b""
    end = time.monotonic() + deadline
    poll = select.poll()  # not select.select: a test process may hold descriptors numbered past 1024
    poll.register(fd, select.POLLIN)
    while not predicate(out.decode(errors="replace")):
        if time.monotonic() > end:
            raise AssertionError(f"timed out; got {out[-500:]!r}")
        if poll.poll(100):
            try:
                out += os.read(fd, 65536)
            except OSError:  # the child closed the terminal
                break
    return out.decode(errors="replace")


@pytest.mark.parametrize("no_color", [False, True])
def test_watch_refreshes_in_place_and_exits_on_sigint(busy_table: dict[str, Any], no_color: bool) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("NO_COLOR", None)
    if no_color:
        env["NO_COLOR"] = "1"
    pid, fd = _pty_run(["inspect", busy_table["name"], "--watch", "--interval", "0.05"], env)
    try:
        screen = _read_until(fd, lambda s: s.count("\x1b[H\x1b[2J") >= 3)
        assert "'held'" in screen
        assert ("\x1b[31;1mDEAD" in screen) is not no_color
        os.kill(pid, signal.SIGINT)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        os.close(fd)


CLEAR = "\x1b[H\x1b[2J"  # the watch starts each screen with it


def _screens(text: str) -> list[str]:
    """The screens a watch drew completely (the next one has begun), without styles or carriage returns."""
    return [ANSI.sub("", screen).replace("\r", "") for screen in text.split(CLEAR)[1:-1]]


def _screen_where(fd: int, predicate: Callable[[str], object]) -> str:
    """The first screen drawn from now on that satisfies ``predicate``, within the deadline."""
    text = _read_until(fd, lambda s: any(predicate(screen) for screen in _screens(s)))
    return next(screen for screen in _screens(text) if predicate(screen))


def _cells(text: str) -> int:
    """The terminal cells text takes: 2 for East Asian wide and full-width characters (CJK, emoji)."""
    return sum(
        0 if unicodedata.combining(c) or unicodedata.category(c) in ("Mn", "Me", "Cf")
        else 2 if unicodedata.east_asian_width(c) in ("W", "F")
        else 1
        for c in text
    )  # fmt: skip


def _stop(pid: int, fd: int) -> None:
    try:
        os.kill(pid, signal.SIGINT)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        os.close(fd)


@pytest.mark.timeout(120)
def test_watch_follows_the_table_when_it_is_removed_and_made_anew(name: str, tmp_path: Path) -> None:
    """The watch holds a mapping that outlives an unlink: it must follow the name, not the mapping."""
    old, old_gate, _ = remote_owner(name, "old", "value", tmp_path)
    new = None
    pid, fd = _pty_run(["inspect", name, "--watch", "--interval", "0.05"], _pty_env())
    try:
        first = _screen_where(fd, lambda s: "'old'" in s)
        assert first.splitlines()[0] == f"table {name}: 1024 slots, 1 in flight"
        mpflight.unlink(name)  # the old owner keeps running in the old table's mapping
        gone = _screen_where(fd, lambda s: "was removed" in s)
        assert re.fullmatch(
            rf"table {name} was removed at \d\d:\d\d:\d\d; waiting for it", gone.splitlines()[0]
        )
        assert "'old'" not in gone
        new, new_gate, _ = remote_owner(name, "new", "value", tmp_path)  # makes the table anew
        anew = _screen_where(fd, lambda s: "'new'" in s)
        lines = anew.splitlines()
        assert lines[0] == f"table {name}: 1024 slots, 1 in flight"
        assert re.fullmatch(rf"table {name} was made anew at \d\d:\d\d:\d\d", lines[1])
        assert "'old'" not in anew
    finally:
        _stop(pid, fd)
        old_gate.open()
        old.join(DEADLINE)
        if new is not None:
            new_gate.open()
            new.join(DEADLINE)


@pytest.mark.timeout(120)
def test_watch_fits_the_terminal_and_aligns_wide_characters(name: str) -> None:
    """80x15 and 23 calls in flight: no line wider than the terminal (a long key is cut with an
    ellipsis), the header stays on screen with '... N more' below, and CJK and emoji keys take two
    cells a character without shifting their rows."""
    keys = ["日本語のキー", "😀 party", "x" * 200, *(f"k{i}" for i in range(20))]
    release = threading.Event()
    threads = []
    with mpflight.Group(name) as group:
        try:
            for n, key in enumerate(keys, 1):  # one at a time: oldest first is this order
                thread = threading.Thread(target=group.do, args=(key, release.wait, DEADLINE))
                thread.start()
                threads.append(thread)
                wait_until(lambda n=n: len(group.inflight()) == n, f"{n} calls in flight")
            pid, fd = _pty_run(["inspect", name, "--watch", "--interval", "0.05"], _pty_env(), size=(15, 80))
            try:
                screen = _screen_where(fd, lambda s: "more" in s or s.count("\n") >= 15)
            finally:
                _stop(pid, fd)
        finally:
            release.set()
            for thread in threads:
                thread.join(DEADLINE)
    lines = screen.split("\n")
    assert len(lines) <= 15, "the header would scroll off"
    assert [line for line in lines if _cells(line) > 80] == []
    assert lines[0] == f"table {name}: 1024 slots, 23 in flight"
    [at] = [i for i, line in enumerate(lines) if line.startswith("KEY")]
    header, rows = lines[at], lines[at + 1 :]
    more = rows.index("") - 1
    shown = rows[:more]
    assert rows[more] == f"... {len(keys) - len(shown)} more"
    assert lines[-1].startswith("refreshed ")
    assert [row.split("  ")[0].rstrip() for row in shown[:2]] == ["'日本語のキー'", "'😀 party'"]
    assert re.match(r"'x+\.\.\.x+…  ", shown[2]), shown[2]  # reprlib's cut, then the terminal's
    owner_ends = _cells(header[: header.index("OWNER") + len("OWNER")])
    pid_text = str(os.getpid())
    assert [_cells(row[: row.index(pid_text) + len(pid_text)]) for row in shown] == [owner_ends] * len(shown)


@pytest.mark.timeout(60)
def test_watch_shows_the_rates_since_the_last_refresh(name: str) -> None:
    with mpflight.Group(name, linger=60) as group:
        group.do("warm", int)  # before the watch: never in its rates
        pid, fd = _pty_run(["inspect", name, "--watch", "--interval", "0.2"], _pty_env())
        try:
            first = _screen_where(fd, lambda s: "rates" in s or "calls/s" in s)
            assert first.splitlines()[1] == "rates from the next refresh on"
            idle = r"^0\.0 calls/s, 0\.0 runs/s, - coalesced, 0 aborts \(last [0-9.]+ (ms|s)\)$"
            _screen_where(fd, lambda s: re.search(idle, s, re.M))
            for _ in range(50):
                group.do("k", int)  # one run; every later call reads its lingering outcome
            busy = r"^[1-9][0-9.]* calls/s, [0-9.]+ runs/s, [0-9.]+% coalesced, 0 aborts"
            _screen_where(fd, lambda s: re.search(busy, s, re.M))
            _screen_where(fd, lambda s: re.search(idle, s, re.M))  # rates, not totals
        finally:
            _stop(pid, fd)


def test_rates_between_two_reads_of_the_counters() -> None:
    before = {"calls": 10, "runs": 5, "joins": 3, "linger_hits": 1, "aborts": 1}
    after = {"calls": 30, "runs": 9, "joins": 14, "linger_hits": 3, "aborts": 3}
    assert (
        _cli._rates(before, after, 2.0) == "10.0 calls/s, 2.0 runs/s, 65.0% coalesced, 2 aborts (last 2.0 s)"
    )
    assert _cli._rates(after, after, 1.0) == "0.0 calls/s, 0.0 runs/s, - coalesced, 0 aborts (last 1.0 s)"


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.0, "0.0 ms"), (-1.0, "0.0 ms"), (0.0004, "0.4 ms"), (0.00094, "0.9 ms"), (0.00096, "1 ms"),
        (0.012, "12 ms"), (0.99949, "999 ms"), (0.99996, "1.0 s"), (0.9996, "1.0 s"), (1.0, "1.0 s"),
        (59.94, "59.9 s"), (59.96, "1.0 min"), (90.0, "1.5 min"), (3599.9, "1.0 h"), (7200.0, "2.0 h"),
    ],
)  # fmt: skip
def test_durations_are_formatted_one_way(seconds: float, text: str) -> None:
    assert _cli.human_seconds(seconds) == text


def test_no_duration_rounds_up_to_the_next_unit() -> None:
    """Around each unit's end (1 ms, 999.96 ms, 59.96 s, 59.96 min) no value reaches it once rounded."""
    limits = {"s": 60.0, "min": 60.0, "h": math.inf}
    for end in (1e-3, 1.0, 60.0, 3600.0):
        for step in range(-300, 300):
            text = _cli.human_seconds(end * (1 + step / 1e5))
            value, unit = text.split()
            limit = limits.get(unit, 1.0 if "." in value else 1000.0)  # ms: 0.4 ms below 1 ms, 12 ms above
            assert float(value) < limit, text
    assert _cli.human_seconds(0.99996) == "1.0 s"  # 999.96 ms


def test_version() -> None:
    proc = mpflight_cli("--version")
    assert (proc.returncode, proc.stdout) == (0, f"mpflight {importlib.metadata.version('mpflight')}\n")


def test_every_command_has_a_description_and_examples_in_its_help(capsys: pytest.CaptureFixture[str]) -> None:
    parser = _cli.parser()
    [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert set(sub.choices) == set(_cli.COMMANDS)
    for command, subparser in sub.choices.items():
        assert _cli.main([command, "--help"]) == 0
        text = capsys.readouterr().out
        assert subparser.description, command
        assert subparser.description in text, "the description keeps its lines"
        examples = [line for line in text.split("\nexamples:\n", 1)[1].splitlines() if line]
        assert examples, command
        for example in examples:
            assert example.startswith(f"  mpflight {command}"), example
            words = shlex.split(example.split(" | ")[0].split(" > ")[0])
            parser.parse_args(words[1:])  # every example is a valid command line


def test_stats_text_shows_every_counter(name: str) -> None:
    with mpflight.Group(name, linger=60) as group:
        group.do("k", int)
        group.do("k", int)
        stats = group.stats()
    proc = mpflight_cli("stats", name)
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[0]: line.split()[1] for line in proc.stdout.splitlines()[1:]}
    assert {k: rows.get(k) for k in stats} == {k: str(v) for k, v in stats.items()}
    assert re.search(r"^mean wait +0\.0 ms ", proc.stdout, re.M)  # nobody waited
    assert json.loads(mpflight_cli("stats", name, "--json").stdout).keys() == {*stats, "mean_wait_s"}


def test_inspect_json_carries_every_field_of_inflight(busy_table: dict[str, Any]) -> None:
    """Each record has every field of mpflight.InflightCall (under the names docs/operations.md gives
    the renamed ones), and age_s and the cross-host tier's part besides."""
    renamed = {"linger_left": "linger_left_s", "tier": "tier_hex"}
    fields = {renamed.get(f.name, f.name) for f in dataclasses.fields(mpflight.InflightCall)}
    with mpflight.Group(busy_table["name"]) as group:
        expected = {call.key: call for call in group.inflight()}
    proc = mpflight_cli("inspect", busy_table["name"], "--json")
    assert proc.returncode == 0, proc.stderr
    records = json.loads(proc.stdout)
    assert len(records) == len(expected) == 2
    for record in records:
        key = record.get("key") or bytes.fromhex(record["key_hex"])
        key_field = "key" if isinstance(key, str) else "key_hex"
        assert set(record) == (fields - {"key"}) | {key_field, "age_s", "tier"}
        assert record["waiter_pids"] == list(expected[key].waiter_pids)
    assert next(r for r in records if r.get("key") == "held")["waiter_pids"] == [os.getpid()]


@pytest.mark.parametrize(
    "args",
    [
        ["demo", "--keys", "0"], ["demo", "--workers", "0"], ["demo", "--calls", "-3"], ["demo", "--delay", "-1"],
        ["demo", "--delay", "nan"], ["demo", "--delay", "inf"], ["demo", "--workers", "two"],
        ["inspect", "x", "--watch", "--interval", "0"],
    ],
)  # fmt: skip
def test_arguments_are_checked_by_argparse(args: list[str]) -> None:
    proc = mpflight_cli(*args)
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr.startswith(f"usage: mpflight {args[0]} ")
    assert f"mpflight {args[0]}: error: argument {args[-2]}: " in proc.stderr
    assert "Traceback" not in proc.stderr


def test_console_script_is_installed() -> None:
    script = Path(sysconfig.get_path("scripts")) / "mpflight"
    assert script.exists(), "pip install puts the mpflight command next to the interpreter"
    proc = subprocess.run(
        [str(script), "--help"], capture_output=True, text=True, timeout=DEADLINE, check=False
    )
    assert proc.returncode == 0
    assert "inspect" in proc.stdout


def test_demo_runs() -> None:
    proc = mpflight_cli("demo", "--workers", "3", "--calls", "5", "--delay", "0.01")
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"3 worker processes made 15 calls on 4 keys", proc.stdout)
    assert "fn takes 10 ms" in proc.stdout  # the durations' one format
    assert "fn ran" in proc.stdout
    assert "'mpflight ls'" in proc.stdout and "'mpflight inspect NAME --watch'" in proc.stdout
    assert re.search(r"the demo removed its table (demo-\d+)", proc.stdout)
