"""scripts/bench.py --quick runs and produces every table (never a timing assertion)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT


@pytest.mark.timeout(300)
def test_quick_benchmark_produces_every_table(tmp_path: Path) -> None:
    report, raw = tmp_path / "bench.md", tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), "--quick", "--markdown", str(report), "--json", str(raw)],
        capture_output=True, text=True, timeout=280, env=dict(os.environ, PYTHONPATH=str(ROOT)), check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    text = report.read_text()
    headings = ("## Targets", *(f"## W{i}" for i in range(1, 9)), "## Floors", "## Scaling")
    for heading in headings:
        assert heading in text
    results = json.loads(raw.read_text())
    workloads = {f"w{i}" for i in range(1, 9)}
    assert {*workloads, "floors", "scaling", "targets", "machine"} <= set(results)
    assert results["w1"]["mpflight"]["calls"] > 0
    assert results["w2"]["mpflight/8"]["executions_per_round"] >= 1
    assert results["w5"]["mpflight"]["outcomes"]
    assert results["w5"]["mpflight on_abort=retry"]["outcomes"]
    assert {"mpflight linger=0", "mpflight linger=1"} <= set(results["w7"])
    assert all(row["executions_per_window"] >= 1 for row in results["w7"].values())
    assert set(results["w8"]) == {"none", "mpflight.wsgi.collapse", "mpflight.wsgi.collapse linger=0.5"}
    assert all(row["executions_per_round"] >= 1 and row["latency"]["n"] for row in results["w8"].values())
    assert results["w6"]["executions_per_round"] >= 1  # redis-server is there: the tests need it
    assert not [e for e in os.listdir("/dev/shm") if e.startswith(("mpf4@bench-", "mpfbench"))], (
        "bench cleans up"
    )
