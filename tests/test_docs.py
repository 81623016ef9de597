"""docs/design.md's byte tables equal the code's; every Python snippet in the docs runs."""

from __future__ import annotations

import io
import itertools
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import mpflight
from mpflight import _layout
from tests.helpers import DEADLINE, ROOT
from tests.redis_server import RedisServer

DESIGN = (ROOT / "docs" / "design.md").read_text()


def _table(title_line: str) -> list[tuple[int, int]]:
    """(offset, size) rows of the markdown table that follows the line starting with title_line."""
    section = DESIGN.split(title_line, 1)[1]
    rows = []
    for line in section.splitlines()[1:]:
        if not line.startswith("|"):
            if rows:
                break
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0].isdigit():
            rows.append((int(cells[0]), int(cells[1])))
    return rows


def test_header_table_matches_the_code() -> None:
    rows = _table("Header (256 bytes")
    offsets = [o for o, _ in rows]
    assert offsets == [
        _layout.H_MAGIC, _layout.H_VERSION, _layout.H_READY, _layout.H_SLOTS, _layout.H_SLOT_SIZE,
        _layout.H_KEY_CAP, _layout.H_PAYLOAD_CAP, _layout.H_RECORDS, _layout.H_RECORD_SIZE, _layout.H_NAME_LEN,
        _layout.H_PIDNS, _layout.H_CREATED, _layout.H_NAME, _layout.H_NONCE, _layout.H_COUNTERS, _layout.H_DIRTY,
        _layout.H_MODE, _layout.H_TIER_COUNTERS,
    ]  # fmt: skip
    assert _layout.HEADER_SIZE == 256
    assert rows[-4] == (_layout.H_COUNTERS, _layout.COUNTERS.size)
    assert rows[-1] == (_layout.H_TIER_COUNTERS, _layout.TIER_COUNTERS.size)


def test_slot_table_matches_the_code() -> None:
    rows = _table("Slot (2048 bytes")
    assert [o for o, _ in rows] == [
        _layout.S_GEN, _layout.S_HOME, _layout.S_FLAGS, _layout.S_WAITERS, _layout.S_JOINS, _layout.S_OWNER_PID,
        _layout.S_BLOCKED_SLOT, _layout.S_OWNER_START, _layout.S_OWNER_TID, _layout.S_STARTED,
        _layout.S_BLOCKED_GEN, _layout.S_KEY_KIND, _layout.S_PAYLOAD_AT, _layout.S_TAKEOVERS, _layout.S_PAYLOAD_LEN,
        _layout.S_KEY_LEN, _layout.S_TIER_LEN, _layout.S_SEM_TOKEN, _layout.S_SEGMENT_TOKEN, _layout.S_TIER, _layout.S_LINGER, _layout.S_KEY,
        _layout.S_PAYLOAD,
    ]  # fmt: skip
    assert rows[-2:] == [(_layout.S_KEY, _layout.KEY_CAP), (_layout.S_PAYLOAD, _layout.PAYLOAD_CAP)]
    assert _layout.SLOT_SIZE == 2048
    # every field's offset + size fits the struct the code packs
    for (offset, size), (nxt, _) in itertools.pairwise(rows):
        assert offset + size <= nxt


def test_record_and_default_size_match_the_code() -> None:
    assert f"Waiter record ({_layout.RECORD_SIZE} bytes" in DESIGN
    size = _layout.Geometry.for_slots(_layout.DEFAULT_SLOTS).size
    assert f"A default table ({_layout.DEFAULT_SLOTS} slots) is {size:,} bytes" in DESIGN


def _snippets() -> list[tuple[str, int, str]]:
    found = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for i, block in enumerate(re.findall(r"```python\n(.*?)```", doc.read_text(), re.S)):
            found.append((doc.name, i, block))
    return found


@pytest.mark.parametrize(("doc", "index", "code"), _snippets(), ids=lambda v: str(v)[:20])
def test_snippet_runs(doc: str, index: int, code: str, tmp_path: Path) -> None:
    names = set(re.findall(r'(?:Group|coalesce)\("([^"]+)"', code))
    script = tmp_path / "snippet.py"
    script.write_text(code)
    server = RedisServer() if "REDIS_URL" in code else None
    try:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        if server is not None:
            env["REDIS_URL"] = server.url
        proc = subprocess.run(
            [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=DEADLINE,
            check=False,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
    finally:
        for name in names:
            mpflight.unlink(name)
        if server is not None:
            server.stop()


def test_captured_inspect_output_matches_the_command() -> None:
    """docs/operations.md shows output captured from a real run; its columns are still the command's."""
    from mpflight import _cli

    text = (ROOT / "docs" / "operations.md").read_text()
    captured = "".join(re.findall(r"```text\n(.*?)```", text, re.S))
    header = _cli._inflight_rows([], 0.0, _cli._Style(io.StringIO()))[0]
    headers = [line.split() for line in captured.splitlines() if line.startswith("KEY")]
    assert len(headers) == 3
    assert all(h == header for h in headers)
    tables = re.findall(r"^table (\S+): (\d+) slots, (\d+) in flight$", captured, re.M)
    assert tables == [("ops-demo", "1024", "1"), ("thumbnails", "1024", "2"), ("thumbnails", "1024", "1")]
