"""mpflight in multiprocessing.Pool and concurrent.futures.ProcessPoolExecutor.

    python examples/pools.py

Every pool process opens the group by name, or inherits one opened before the pool forked: after
fork, each child reopens what it must (its own lock on the table, its own thread pool) on its own.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor

import mpflight

_group: mpflight.Group | None = None


def open_group(name: str) -> None:
    """Pool initializer: open the group once per process (spawn: nothing is inherited)."""
    global _group
    _group = mpflight.Group(name)


def load(key: str) -> str:
    """Stands for the expensive part."""
    return f"{key} loaded by {os.getpid()}"


def work(key: str) -> str:
    assert _group is not None, "the pool's initializer opens the group"
    return _group.do(key, load, key)


def main() -> None:
    name = f"pools-example-{os.getpid()}"
    keys = ["a", "b", "a", "c", "a", "b"]
    try:
        with multiprocessing.get_context("spawn").Pool(4, initializer=open_group, initargs=(name,)) as pool:
            print("Pool:", pool.map(work, keys))
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(4, mp_context=ctx, initializer=open_group, initargs=(name,)) as executor:
            print("ProcessPoolExecutor:", list(executor.map(work, keys)))
        # Opened before fork (like gunicorn --preload): the forked children use the parent's handle.
        open_group(name)
        with multiprocessing.get_context("fork").Pool(4) as pool:
            print("forked Pool:", pool.map(work, keys))
    finally:
        mpflight.unlink(name)


if __name__ == "__main__":
    main()
