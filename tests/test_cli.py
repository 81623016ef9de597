"""The mpflight command, end to end in subprocesses, against a table real workers are using."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import posix_ipc
import pytest

import mpflight
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
        "started": 0, "age_s": 0, "waiters": 1, "state": "running", "result_bytes": None, "takeovers": 0,
        "linger_left_s": None,
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


def test_unlink_asks_first(name: str) -> None:
    mpflight.Group(name).close()
    kept = mpflight_cli("unlink", name, stdin="n\n")
    assert kept.returncode == 0
    assert "kept" in kept.stdout
    assert name in mpflight.tables()
    removed = mpflight_cli("unlink", name, "--yes")
    assert removed.returncode == 0
    assert name not in mpflight.tables()
    assert shm_free(name)
    assert mpflight_cli("unlink", name, "--yes").returncode == 1


def _pty_run(args: list[str], env: dict[str, str]) -> tuple[int, int]:
    """Start the CLI on a pseudo-terminal; returns (pid, the terminal's master side)."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: become the command
        os.execve(sys.executable, [sys.executable, "-m", "mpflight", *args], env)
    return pid, fd


def _read_until(fd: int, predicate: Any, deadline: float = DEADLINE) -> str:
    out = b""
    end = time.monotonic() + deadline
    while not predicate(out.decode(errors="replace")):
        if time.monotonic() > end:
            raise AssertionError(f"timed out; got {out[-500:]!r}")
        ready, _, _ = select.select([fd], [], [], 0.1)
        if ready:
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
    assert "fn ran" in proc.stdout
