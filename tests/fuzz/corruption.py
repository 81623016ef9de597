"""The driver of the corruption cases, their report, and ``main``.

One subprocess (the driver, under RLIMIT_AS) forks a runner per case, PARALLEL at a time;
``python -m tests.fuzz.corruption SEED CASE`` runs one case again and prints what failed.
"""

from __future__ import annotations

import gc
import json
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from pathlib import Path
from typing import Any

import mpflight
from tests.fuzz.case import Case
from tests.fuzz.scene import HARD
from tests.helpers import DEADLINE, ROOT

# Cases run at once by the driver: most of a case is waiting (on slices of CHECK, on timeouts).
PARALLEL = 6
# Address space of every process of the driver: an unbounded allocation fails as MemoryError.
AS_LIMIT = 1 << 30
# Bounds one case in the driver (set-up, garbage, two HARD windows, clean-up); then its runner is killed.
RUNNER_LIMIT = DEADLINE + 3 * HARD
DRIVER_LIMIT = 100.0


def _runner(spec: dict[str, Any], out: Path) -> None:
    result: dict[str, Any]
    try:
        os.setpgid(0, 0)
        result = Case(spec, out / f"case-{spec['index']}").run()
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


def run_cases(cases: list[dict[str, Any]], tmp: Path) -> list[dict[str, Any]]:
    out = tmp / "cases"
    out.mkdir()
    spec = tmp / "spec.json"
    spec.write_text(json.dumps({"out": str(out), "parallel": PARALLEL, "cases": cases}))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    code = "import sys\nfrom tests.fuzz.corruption import drive\ndrive(sys.argv[1])"
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


def report(results: list[dict[str, Any]]) -> str:
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


def main(argv: list[str]) -> None:
    """``python -m tests.fuzz.corruption SEED CASE``: run one case again and print what failed."""
    seed, index = argv
    name = f"t-repro-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory() as tmp:
        results = run_cases([{"name": name, "seed": int(seed), "index": int(index)}], Path(tmp))
    print(f"seed {seed} case {index}: wrote {'; '.join(results[0]['labels'])}")
    print("raised:", "; ".join(results[0]["outcomes"]) or "nothing")
    print("left in the table after gc():", "; ".join(results[0]["stuck"]) or "nothing")
    print(report(results) or "no failure")


if __name__ == "__main__":
    main(sys.argv[1:])
