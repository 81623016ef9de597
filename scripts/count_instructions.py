#!/usr/bin/env python3
"""Instructions per uncontended do(), counted by valgrind: a measure of the per-call cost that does
not move with the machine's load, for comparing versions of the code.

    python scripts/count_instructions.py                  # this checkout
    git worktree add /tmp/old <commit>
    python scripts/count_instructions.py /tmp/old .       # an older version beside this one

Each version runs twice under ``valgrind --tool=cachegrind``: once with the warm-up alone, once with
the warm-up and ``--calls`` more calls of distinct keys (W1's workload); the difference over the
calls is the figure. It counts the instructions run in user space (the interpreter, mpflight, libc),
not the time spent in the kernel: the lock's system calls, the same in every version, do not show.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

# Imports mpflight from the path given, warms up, then makes the calls counted.
CHILD = """
import os, sys
sys.path.insert(0, sys.argv[1])
import mpflight
calls = int(sys.argv[2])
group = mpflight.Group(f"count-instructions-{os.getpid()}")
fn = lambda: {"a": 1, "b": [1, 2, 3]}
keys = [f"k{i}" for i in range(1000 + calls)]
for key in keys[:1000]:
    group.do(key, fn)
do = group.do
for key in keys[1000:]:
    do(key, fn)
group.close()
mpflight.unlink(group.name)
"""


def instructions(path: Path, calls: int) -> int:
    """What one run of the child with ``calls`` counted calls executes, in instructions."""
    out = subprocess.run(
        ["valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null",
         sys.executable, "-c", CHILD, str(path), str(calls)],
        capture_output=True, text=True, check=True,
        env={**os.environ, "PYTHONHASHSEED": "0"},  # the same dict layouts in both runs
    )  # fmt: skip
    found = re.search(r"I\s+refs:\s+([\d,]+)", out.stderr)
    if found is None:
        raise RuntimeError(f"no instruction count in valgrind's output:\n{out.stderr[-2000:]}")
    return int(found.group(1).replace(",", ""))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="*", type=Path, help="checkouts to measure (default: this one)")
    parser.add_argument("--calls", type=int, default=6000, help="calls counted per version (default 6000)")
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        parser.error("valgrind is not installed (apt-get install valgrind)")
    if args.calls < 1:
        parser.error("--calls must be at least 1")
    paths = args.paths or [Path(__file__).resolve().parent.parent]
    for path in paths:
        if not (path / "mpflight" / "__init__.py").is_file():
            parser.error(f"{path} has no mpflight package")
    for path in paths:
        per_call = (instructions(path, args.calls) - instructions(path, 0)) / args.calls
        print(f"{path}: {per_call:,.0f} instructions per uncontended do()")
    return 0


if __name__ == "__main__":
    sys.exit(main())
