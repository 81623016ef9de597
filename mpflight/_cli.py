"""The ``mpflight`` command (also ``python -m mpflight``)."""

from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import sys
import time
from collections.abc import Sequence

from ._group import Group, unlink


def _expensive(key: str, delay: float) -> str:
    time.sleep(delay)  # stands for a slow query or render
    return f"value of {key}"


def _demo_worker(name: str, keys: int, calls: int, delay: float, start: float) -> None:
    rng = random.Random(os.getpid())
    with Group[str](name) as group:
        time.sleep(max(0.0, start - time.time()))  # released together, like a herd
        for _ in range(calls):
            key = f"key-{rng.randrange(keys)}"
            if group.do(key, _expensive, key, delay) != f"value of {key}":
                raise SystemExit(f"wrong value for {key}")


def demo(workers: int, keys: int, calls: int, delay: float) -> int:
    """Start worker processes that hammer a few keys; print calls against executions of fn."""
    name = f"demo-{os.getpid()}"
    ctx = multiprocessing.get_context("spawn")
    try:
        Group(name).close()  # create the table once, up front
        start = time.time() + 0.5
        procs = [
            ctx.Process(target=_demo_worker, args=(name, keys, calls, delay, start)) for _ in range(workers)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        with Group[object](name) as group:
            stats = group.stats()
    finally:
        unlink(name)
    if any(p.exitcode for p in procs):
        print("a worker failed", file=sys.stderr)
        return 1
    print(
        f"{workers} worker processes made {stats['calls']} calls on {keys} keys; "
        f"fn takes {delay * 1000:.0f} ms"
    )
    print(f"fn ran {stats['runs']} times; {stats['shared']} calls took the outcome of another's execution")
    print(
        f"without mpflight, fn would have run {stats['calls']} times: "
        f"{stats['calls'] / max(stats['runs'], 1):.1f}x the work"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mpflight", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="watch worker processes coalesce their calls")
    d.add_argument("--workers", type=int, default=8)
    d.add_argument("--keys", type=int, default=4)
    d.add_argument("--calls", type=int, default=40, help="calls per worker")
    d.add_argument("--delay", type=float, default=0.05, help="seconds fn takes")
    args = parser.parse_args(argv)
    if args.command == "demo":
        return demo(args.workers, args.keys, args.calls, args.delay)
    return 2  # pragma: no cover (argparse refuses unknown commands)


if __name__ == "__main__":
    sys.exit(main())
