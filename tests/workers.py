"""Child-process targets for the tests: importable by spawn and forkserver children, and runnable as
``python -m tests.workers call NAME KEY GATE RUNS OUT`` for independent interpreters.

Synchronisation is on state, never on time: fn appends a line to a RUNS file when it starts and
then holds until the GATE file exists; the test releases it once ``inflight()`` shows every waiter.
"""

from __future__ import annotations

import ctypes
import faulthandler
import hashlib
import json
import os
import pickle
import random
import signal
import sys
import time
import traceback
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
    if group_options.get("codec") == "point":  # a codec is made in each process, not sent to it
        group_options["codec"] = POINT_CODEC
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


def _sigkill() -> object:
    os.kill(os.getpid(), signal.SIGKILL)
    raise AssertionError("unreachable")


def _exit() -> object:
    os._exit(3)


def _segfault() -> object:
    faulthandler.disable()  # die quietly, as a crash in a C extension would
    ctypes.string_at(0)
    raise AssertionError("unreachable")


class Point:
    """A user type, carried by POINT_CODEC."""

    def __init__(self, x: int, y: int) -> None:
        self.x, self.y = x, y

    def __eq__(self, other: object) -> bool:
        return type(other) is Point and (self.x, self.y) == (other.x, other.y)

    __hash__ = None  # type: ignore[assignment]


def _point_to_wire(p: Point) -> object:
    return [p.x, p.y]


def _point_from_wire(v: object) -> Point:
    x, y = v  # type: ignore[misc]
    return Point(x, y)


POINT_CODEC = mpflight.Codec()
POINT_CODEC.register(Point, 1, _point_to_wire, _point_from_wire)


FACTORIES = {
    "value": lambda: "the value",
    "rich": _rich,
    "value_error": _raise_value_error,
    "custom_error": _raise_custom,
    "keyboard_interrupt": _keyboard_interrupt,
    "unserializable": _unserializable,
    "big": _big,
    "sigkill": _sigkill,
    "exit": _exit,
    "segfault": _segfault,
    "point": lambda: {"where": Point(3, 4)},
}


def join(
    name: str,
    key: str,
    out: str,
    timeout: str = "0",
    check_interval: str = "0.2",
    clock_step: str = "0",
    checks: str = "",
) -> None:
    """Join the call for key (never running fn); write the outcome as JSON to out.

    ``clock_step`` seconds are added to the boot time psutil reads, as an NTP step would; each
    check of the owner's identity appends a line to the file ``checks``.
    """
    arm()
    if checks:
        from mpflight import _owner

        real_is_alive = _owner.is_alive

        def logged(pid: int, ticks: int) -> bool:
            alive = real_is_alive(pid, ticks)
            with open(checks, "a") as f:
                f.write(f"{alive}\n")
            return alive

        _owner.is_alive = logged  # type: ignore[assignment]
    if float(clock_step):
        import psutil

        real = psutil._psplatform.boot_time  # what both psutil.boot_time() and create_time() read

        psutil._psplatform.boot_time = lambda: real() + float(clock_step)
        psutil.boot_time = psutil._psplatform.boot_time
    options = {"timeout": float(timeout)} if float(timeout) else {}
    with mpflight.Group(name, check_interval=float(check_interval), **options) as group:  # type: ignore[arg-type]
        try:
            res = group.do_ex(key, _never)
            outcome = {"kind": "value", "value": describe(res.value), "shared": res.shared}
        except mpflight.AbortError as e:
            outcome = {"kind": "AbortError", "key": e.key, "owner_pid": e.owner_pid, "reason": e.reason}
        except Exception as e:
            outcome = {"kind": type(e).__name__, "message": str(e)}
    Path(out).write_text(json.dumps(outcome))


def describe(value: object) -> object:
    """value itself when JSON carries it; for bytes, their length and digest."""
    if isinstance(value, bytes):
        return {"bytes": len(value), "sha256": hashlib.sha256(value).hexdigest()}
    return value


def _never() -> object:
    raise AssertionError("a joiner ran fn")


def calls(name: str, *keys: str) -> None:
    """Run do() on each key in turn, fn returning the key."""
    arm()
    with mpflight.Group(name) as group:
        for key in keys:
            assert group.do(key, lambda key=key: key) == key


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


def retry(
    name: str, key: str, gate: str, runs: str, out: str, factory: str = "value", options: str = "{}"
) -> None:
    """Call key with on_abort="retry" (fn held by the gate, then FACTORIES[factory]); write
    {"value", "shared", "pid"}, or {"type", "message", "takeovers", "owner_died", "pid"}, to out."""
    arm()
    with mpflight.Group(name, on_abort="retry", **json.loads(options)) as group:
        try:
            res = group.do_ex(key, held_factory, gate, runs, factory)
            outcome: dict[str, object] = {"value": describe(res.value), "shared": res.shared}
        except mpflight.AbortError as e:
            outcome = {"type": "AbortError", "message": str(e), "takeovers": e.takeovers,
                       "owner_died": e.owner_died}  # fmt: skip
        except Exception as e:
            outcome = {"type": type(e).__name__, "message": str(e)}
    outcome["pid"] = os.getpid()
    Path(out).write_text(json.dumps(outcome))


def give_up_and_exit(name: str, exiting: str) -> None:
    """A multiprocessing child whose wait for ``k`` times out while the table's lock is held: it
    returns on WaitTimeout, and marks its exit (a finalizer run before mpflight's) so the test can let
    the lock go."""
    from multiprocessing import util

    arm()
    util.Finalize(None, lambda: Path(exiting).touch(), exitpriority=10)
    try:
        mpflight.Group(name, timeout=1.0).do("k", _never)
    except mpflight.WaitTimeout:
        return
    raise AssertionError("the wait did not time out")


def gc(name: str, out: str) -> None:
    arm()
    with mpflight.Group(name) as group:
        Path(out).write_text(json.dumps(group.gc()))


def check(name: str, out: str) -> None:
    """Write the table's broken invariants (tests.helpers.table_problems) as JSON to out."""
    from tests.helpers import table_problems

    arm()
    with mpflight.Group(name) as group:
        Path(out).write_text(json.dumps(table_problems(group)))


def main(argv: list[str]) -> None:
    commands = {
        "call": call,
        "own": lambda *a: own(*a[:6]),
        "join": join,
        "calls": calls,
        "check": check,
        "gc": gc,
        "retry": retry,
    }
    commands[argv[0]](*argv[1:])


# -- the chaos test's children (tests/test_chaos.py) ---------------------------------------------------

CHAOS_KEYS = [f"k{i:02d}" for i in range(20)]


def chaos_value(key: str, large: bool = False) -> str:
    """fn's value for key: short (inline in the slot), or large (over 1664 bytes encoded: a segment)."""
    return f"value:{key}" + (f";{key}" * 600 if large else "")


def chaos_error(key: str) -> str:
    """The message of the ValueError that fn raises for key."""
    return f"error:{key}"


def _chaos_fn(key: str, rng: random.Random) -> str:
    time.sleep(rng.random() * 0.005)
    roll = rng.random()
    if roll < 0.2:
        raise ValueError(chaos_error(key))
    return chaos_value(key, large=roll < 0.4)


def _type_name(e: BaseException) -> str:
    return f"{type(e).__module__}.{type(e).__qualname__}"


def _chaos_counted(fd: int, key: str, rng: random.Random) -> str:
    """_chaos_fn, each execution first counted by a byte appended to fd."""
    os.write(fd, b"x")
    return _chaos_fn(key, rng)


def chaos(name: str, log: str, seed: int, stop: str, timeout: float, on_abort: str = "raise") -> None:
    """Call CHAOS_KEYS at random until the stop file exists; append one JSON line per finished call to log.

    The log is created once the group is attached (the test kills only workers that got that far).
    Each line goes out in one write on an O_APPEND descriptor: a SIGKILL can tear at most the last one.
    Every execution of fn appends a byte to LOG.runs first.
    """
    arm()
    rng = random.Random(seed)
    with mpflight.Group(name, timeout=timeout, on_abort=on_abort) as group:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        runs = os.open(log + ".runs", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            while not os.path.exists(stop):
                key = rng.choice(CHAOS_KEYS)
                line: dict[str, object] = {"key": key}
                try:
                    value, shared = group.do_ex(key, _chaos_counted, runs, key, rng)
                    line.update(kind="value", value=value, shared=shared)
                except Exception as e:
                    line.update(kind="error", type=_type_name(e), args=[repr(a) for a in e.args])
                    if isinstance(e, mpflight.AbortError):
                        line["error_key"] = e.key
                    elif not isinstance(e, ValueError | TimeoutError):
                        line["traceback"] = traceback.format_exc()
                data = (json.dumps(line) + "\n").encode()
                if os.write(fd, data) != len(data):
                    raise RuntimeError(f"short write to {log}")
        finally:
            os.close(fd)
            os.close(runs)


def chaos_interrupted(name: str, log: str, seed: int, stop: str, timeout: float) -> None:
    """As ``chaos``, in a worker that the test also sends SIGINTs: it catches each KeyboardInterrupt and
    goes on calling, as a server that survives its signals does. A line {"kind": "interrupted", "n": N}
    counts the KeyboardInterrupts caught since the previous line.
    """
    arm()
    rng = random.Random(seed)
    interrupts = 0
    armed = [False]

    def interrupt(signum: int, frame: object) -> None:
        # Raise only inside the iteration's try, once per arming: an interrupt that landed in the
        # worker's own except clause would kill it, which is the worker's doing, not mpflight's.
        if armed[0]:
            armed[0] = False
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupt)
    with mpflight.Group(name, timeout=timeout) as group:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        try:
            while True:
                try:  # the whole iteration, its loop test included: a SIGINT may land anywhere in it
                    armed[0] = True
                    if os.path.exists(stop):
                        break
                    if interrupts:
                        os.write(fd, (json.dumps({"kind": "interrupted", "n": interrupts}) + "\n").encode())
                        interrupts = 0
                    key = rng.choice(CHAOS_KEYS)
                    line: dict[str, object] = {"key": key}
                    try:
                        value, shared = group.do_ex(key, _chaos_fn, key, rng)
                        line.update(kind="value", value=value, shared=shared)
                    except Exception as e:
                        line.update(kind="error", type=_type_name(e), args=[repr(a) for a in e.args])
                        if isinstance(e, mpflight.AbortError):
                            line["error_key"] = e.key
                        elif not isinstance(e, ValueError | TimeoutError):
                            line["traceback"] = traceback.format_exc()
                    data = (json.dumps(line) + "\n").encode()
                    if os.write(fd, data) != len(data):
                        raise RuntimeError(f"short write to {log}")
                except KeyboardInterrupt:
                    interrupts += 1
                armed[0] = False
        finally:
            armed[0] = False
            os.close(fd)


def chaos_fresh(name: str, out: str, timeout: float) -> None:
    """Call every chaos key once, alone; write {key: [value, shared]} (or [error type, message]) to out."""
    arm()
    results: dict[str, list[object]] = {}
    with mpflight.Group(name, timeout=timeout) as group:
        for key in CHAOS_KEYS:
            try:
                results[key] = list(group.do_ex(key, chaos_value, key))
            except Exception as e:
                results[key] = [_type_name(e), str(e)]
    Path(out).write_text(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1:])


# -- the other process of tests/test_interrupts.py -----------------------------------------------------


def interrupt_peer(conn: object, timeout: float) -> None:
    """Join or own keys on command from the test, in a thread each, and send back every outcome.

    Commands (tuples on the pipe): ("join", name, key) joins the call for key and replies
    ("joined", key, kind, detail); ("own", name, key[, held]) runs fn for key, replying ("owning", key)
    once fn runs, fn returning once a waiter is registered (unless ``held``) or ("release", key) came,
    then ("owned", key, kind, value, shared); ("quiesce",) waits for every command begun so far to end, closes the groups and
    replies ("quiet", "-"); ("stop",) ends the process. ``timeout`` is the Group timeout: a waiter that
    would hang reports TimeoutError instead.
    """
    import threading

    from tests.helpers import waiting

    groups: dict[str, mpflight.Group] = {}
    releases: dict[str, threading.Event] = {}
    send_lock = threading.Lock()

    def reply(*msg: object) -> None:
        with send_lock:
            conn.send(msg)  # type: ignore[attr-defined]

    def group(name: str) -> mpflight.Group:
        # Opened without holding a lock: opening a table whose flock the test process left held blocks
        # this thread only, not every other command's reply.
        g = groups.get(name)
        if g is None:
            g = groups.setdefault(name, mpflight.Group(name, timeout=timeout))
        return g

    def join(name: str, key: str) -> None:
        try:
            res = group(name).do_ex(key, _never)
            reply("joined", key, "value", res.value)
        except mpflight.AbortError as e:
            reply("joined", key, "AbortError", e.reason)
        except Exception as e:
            reply("joined", key, type(e).__name__, str(e))

    def own(name: str, key: str, held: bool = False) -> None:
        release = releases.setdefault(key, threading.Event())
        g = group(name)

        def fn() -> str:
            reply("owning", key)
            deadline = time.monotonic() + CHILD_DEADLINE
            while not release.is_set() and (held or waiting(g, key) < 1):
                if time.monotonic() > deadline:
                    raise RuntimeError("nobody joined and no release came")
                release.wait(0.001)
            return f"owned:{key}"

        try:
            res = g.do_ex(key, fn)
            reply("owned", key, "value", res.value, res.shared)
        except Exception as e:
            reply("owned", key, type(e).__name__, str(e), False)

    running: list[threading.Thread] = []
    while True:
        msg = conn.recv()  # type: ignore[attr-defined]
        arm()  # the peer lives for the whole test module: each command re-arms the hang bound
        if msg[0] == "stop":
            return
        if msg[0] == "release":
            releases.setdefault(msg[1], threading.Event()).set()
            continue
        if msg[0] == "quiesce":  # nothing of this peer touches the tables after this
            for thread in running:
                thread.join(CHILD_DEADLINE)
            running.clear()
            for g in groups.values():
                g.close()
            groups.clear()
            reply("quiet", "-")
            continue
        target = {"join": join, "own": own}[msg[0]]
        thread = threading.Thread(target=target, args=msg[1:], daemon=True)
        running.append(thread)
        thread.start()


def interrupted_wait_start(name: str, key: str, gate: str, out: str, how: str, when: str) -> None:
    """Join the call for key (another process owns it, held by the gate) with ``how`` ("future" or
    "async"), a KeyboardInterrupt arriving as the wait thread starts: once it has taken the entry
    (``when`` "taken") or before it exists ("not started"); close the handle, then open the gate.
    Writes what followed to out as JSON; a table unmapped under the wait thread kills this process
    instead (SIGSEGV in its semaphore wait)."""
    import asyncio
    import threading
    import types

    from mpflight import _drivers
    from mpflight._registry import registry

    arm()
    errors: list[str] = []
    threading.excepthook = lambda args: errors.append(f"{args.exc_type.__name__}: {args.exc_value}")

    class InterruptedStart(threading.Thread):
        def start(self) -> None:
            if when == "not started":
                raise KeyboardInterrupt("a signal before the wait thread started")
            super().start()
            handed = self._target.__self__  # type: ignore[attr-defined]
            end = time.monotonic() + CHILD_DEADLINE
            while handed.state == _drivers._HANDING and time.monotonic() < end:
                time.sleep(0.001)  # until the thread has taken the entry
            raise KeyboardInterrupt("a signal right after the wait thread started")

    group = mpflight.Group(name, timeout=CHILD_DEADLINE, check_interval=0.01)
    at = registry.tables[name]
    real = _drivers.threading
    _drivers.threading = types.SimpleNamespace(**{**vars(threading), "Thread": InterruptedStart})  # type: ignore[assignment]
    try:
        if how == "future":
            raised = group.do_future(key, _never).exception(CHILD_DEADLINE)
        else:
            try:
                asyncio.run(group.do_async(key, _never))
                raised = None
            except KeyboardInterrupt as e:
                raised = e
    finally:
        _drivers.threading = real
    waits = [t for t in threading.enumerate() if t.name.startswith("mpflight-wait-")]
    group.close()
    mapped_after_close = not at.table.closed  # the wait thread still uses the table
    Path(gate).touch()  # the owner returns; the wait thread wakes in the table and ends
    for t in waits:
        t.join(CHILD_DEADLINE)
    end = time.monotonic() + CHILD_DEADLINE  # the reaper may be the last to leave the table
    while not at.table.closed and time.monotonic() < end:
        time.sleep(0.001)
    report = {
        "raised": type(raised).__name__,
        "wait_threads": len(waits),
        "mapped_after_close": mapped_after_close,
        "waits_ended": not any(t.is_alive() for t in waits),
        "unmapped_at_the_end": at.table.closed and name not in registry.tables,
        "thread_errors": errors,
    }
    Path(out).write_text(json.dumps(report))
