"""Child-process targets for the tests: importable by spawn and forkserver children, and runnable as
``python -m tests.workers call NAME KEY GATE RUNS OUT`` for independent interpreters.

Synchronisation is on state, never on time: fn appends a line to a RUNS file when it starts and
then holds until the GATE file exists; the test releases it once ``inflight()`` shows every waiter.
"""

from __future__ import annotations

import faulthandler
import json
import os
import pickle
import sys
import time
from pathlib import Path

import mpflight

# Bounds a hang in a child (a child stuck this long dumps its stack and exits); not a speed target.
CHILD_DEADLINE = 60.0


def arm() -> None:
    faulthandler.dump_traceback_later(CHILD_DEADLINE, exit=True)


def held(gate: str, runs: str, value: object) -> object:
    """fn for the tests: record this execution, hold until the gate opens, return value."""
    with open(runs, "a") as f:
        f.write(f"{os.getpid()}\n")
    deadline = time.monotonic() + CHILD_DEADLINE
    while not os.path.exists(gate):
        if time.monotonic() > deadline:
            raise RuntimeError("gate never opened")
        time.sleep(0.002)
    return value


def held_factory(gate: str, runs: str, factory: str) -> object:
    """fn that holds like ``held`` and then returns (or raises) what FACTORIES[factory] makes."""
    held(gate, runs, None)
    return FACTORIES[factory]()


def own(
    name: str, key: str | bytes, gate: str, runs: str, factory: str, out: str, **group_options: object
) -> None:
    """Own the call for key (fn held by the gate); write the owner's outcome, pickled, to out."""
    arm()
    with mpflight.Group(name, **group_options) as group:  # type: ignore[arg-type]
        try:
            res = group.do_ex(key, held_factory, gate, runs, factory)
            outcome: object = ("value", res.value, res.shared)
        except BaseException as e:
            outcome = ("error", type(e).__name__, str(e))
    Path(out).write_bytes(pickle.dumps(outcome))


def _raise_value_error() -> object:
    raise ValueError("bad input", 42)


class CustomError(Exception):
    pass


def _raise_custom() -> object:
    raise CustomError("custom message")


def _keyboard_interrupt() -> object:
    raise KeyboardInterrupt


def _unserializable() -> object:
    return object()


def _big() -> object:
    return b"x" * (16 * 1024 * 1024)


def _rich() -> object:
    import datetime
    import decimal
    import uuid

    return {
        (1, 2): [None, True, 2**70, -(2**65), 1.5, "s", b"b", (3, (4,)), {5, 6}, frozenset({7})],
        7: {datetime.date(2024, 1, 2): datetime.timedelta(days=1, microseconds=5)},
        None: [datetime.datetime(2024, 1, 2, 3, 4, 5, 6, tzinfo=datetime.UTC), datetime.time(1, 2)],
        frozenset({1}): [decimal.Decimal("1.10"), uuid.UUID(int=12345)],
        b"k": ((((((((((("deep",),),),),),),),),),),),
    }


FACTORIES = {
    "value": lambda: "the value",
    "rich": _rich,
    "value_error": _raise_value_error,
    "custom_error": _raise_custom,
    "keyboard_interrupt": _keyboard_interrupt,
    "unserializable": _unserializable,
    "big": _big,
}


def call(name: str, key: str, gate: str, runs: str, out: str, value: object = "v") -> None:
    """Join or run the call for key; write {"value", "shared", "pid"} or {"error", "type"} to out."""
    arm()
    with mpflight.Group(name) as group:
        try:
            res = group.do_ex(key, held, gate, runs, value)
            outcome = {"value": res.value, "shared": res.shared, "pid": os.getpid()}
        except Exception as e:
            outcome = {"error": str(e), "type": type(e).__name__, "pid": os.getpid()}
    Path(out).write_text(json.dumps(outcome))


def main(argv: list[str]) -> None:
    if argv[0] == "call":
        call(*argv[1:6])
    else:
        raise SystemExit(f"unknown command {argv[0]!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
