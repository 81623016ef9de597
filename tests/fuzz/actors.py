"""The actors: the processes and threads of a case that use the API, and the role each plays."""

from __future__ import annotations

import contextlib
import faulthandler
import json
import os
import random
import select
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import mpflight
from tests.fuzz.scene import (
    BIG,
    BIG_VALUE,
    CHECK,
    CHILD_LIMIT,
    COLLIDE,
    HELD,
    IDLE,
    J_TIMEOUT,
    N_TIMEOUT,
    SMALL,
    SMALL_VALUE,
)


class Ctx(NamedTuple):
    dir: Path
    name: str
    slots: int

    def put(self, what: str, obj: object) -> None:
        tmp = self.dir / f".{what}.{os.getpid()}.{threading.get_ident()}"
        tmp.write_text(json.dumps(obj))
        os.replace(tmp, self.dir / what)

    def get(self, what: str) -> Any:
        try:
            return json.loads((self.dir / what).read_text())
        except FileNotFoundError:
            return None

    def has(self, what: str) -> bool:
        return (self.dir / what).exists()


class Actor:
    """Runs API calls, sorting what each raised into allowed and not; reports once done."""

    def __init__(self, ctx: Ctx, name: str, allowed: tuple[type[BaseException], ...]) -> None:
        self.ctx, self.name, self.allowed = ctx, name, allowed
        self.ops: list[dict[str, object]] = []

    def attempt(self, op: str, call: Callable[[], Any]) -> Any:
        self.ctx.put(f"{self.name}.op", {"op": op, "tid": threading.get_ident()})
        try:
            value = call()
        except self.allowed as e:
            self.ops.append({"op": op, "status": "allowed", "type": type(e).__name__})
            return None
        except BaseException as e:
            self.ops.append({"op": op, "status": "fail", **_exception_failure(e)})
            return None
        self.ops.append({"op": op, "status": "ok"})
        return value

    def done(self) -> None:
        self.ctx.put(f"{self.name}.json", self.ops)


def _exception_failure(e: BaseException) -> dict[str, str]:
    frames = traceback.extract_tb(e.__traceback__)
    ours = [f for f in frames if "/mpflight/" in f.filename] or frames
    where = f"{Path(ours[-1].filename).name}:{ours[-1].lineno} in {ours[-1].name}" if ours else "?"
    try:
        message = str(e)[:300]
    except BaseException:  # a broken __str__ is a finding of its own, reported by its type
        message = "<str() failed>"
    kind = type(e)
    module = "" if kind.__module__ == "builtins" else f"{kind.__module__}."
    return {
        "kind": "exception",
        "type": f"{module}{kind.__qualname__}",
        "message": message,
        "location": where,
        "detail": "".join(traceback.format_exception(e))[-3000:],
    }


def fork_process(ctx: Ctx, proc: str, body: Callable[[], None]) -> int:
    """Start body in a child of this (single-threaded) runner; its stderr goes to PROC.err."""
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    code = 0
    try:
        fd = os.open(ctx.dir / f"{proc}.err", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(fd, 2)
        os.close(fd)
        faulthandler.enable(all_threads=True)
        faulthandler.register(signal.SIGUSR2, all_threads=True)
        faulthandler.dump_traceback_later(CHILD_LIMIT, exit=True)
        body()
    except BaseException:
        traceback.print_exc()
        code = 70
    finally:
        sys.stderr.flush()
        os._exit(code)


def _block(fd: int) -> None:
    """Hold until the runner writes a byte to the pipe."""
    if not select.select([fd], [], [], CHILD_LIMIT)[0]:
        raise RuntimeError("the runner never released this process")
    os.read(fd, 1)


def _never() -> None:
    raise AssertionError("a registered waiter ran fn")


def raise_lookup() -> None:
    raise LookupError("small", 7)


WAITER_ALLOWED: tuple[type[BaseException], ...] = (mpflight.MPFlightError,)
TIMED_ALLOWED: tuple[type[BaseException], ...] = (mpflight.MPFlightError, TimeoutError)


def role_a(ctx: Ctx, gate: int, linger: int, big: bool) -> None:
    """Create the table; leave stale FREE slots; own HELD (held open) with a waiting thread of its own."""
    group = mpflight.Group(ctx.name, slots=ctx.slots, check_interval=CHECK)
    for key in IDLE:
        group.do(key, str, key)
    local = Actor(ctx, "A_local", WAITER_ALLOWED)

    def local_waiter() -> None:
        local.attempt("do(HELD) in the owner's process, registered", lambda: group.do(HELD, _never))
        local.done()

    def fn() -> object:
        threading.Thread(target=local_waiter, daemon=True).start()
        _block(gate)
        return BIG_VALUE if big else SMALL_VALUE

    owner = Actor(ctx, "A", WAITER_ALLOWED)
    owner.attempt("do_ex(HELD) as its owner, completing", lambda: group.do_ex(HELD, fn))
    owner.done()
    _block(linger)  # a worker lives on after its call: its waiters cannot count on its death


def role_done_owner(ctx: Ctx, key: str, gate: int, fn: Callable[[], object]) -> None:
    group = mpflight.Group(ctx.name, check_interval=CHECK)

    def held() -> object:
        _block(gate)
        return fn()

    with contextlib.suppress(LookupError):  # SMALL's fn raises it: its outcome is an error
        group.do(key, held)


def role_waiter(ctx: Ctx, actor: str, key: str, allowed: tuple[type[BaseException], ...]) -> None:
    group = mpflight.Group(ctx.name, check_interval=CHECK)
    waiter = Actor(ctx, actor, allowed)
    waiter.attempt(f"do({key}), registered before the garbage", lambda: group.do(key, _never))
    waiter.done()


def _attach(actor: Actor, timeout: float) -> mpflight.Group | None:
    group: mpflight.Group | None = actor.attempt(
        "Group(name)", lambda: mpflight.Group(actor.ctx.name, timeout=timeout, check_interval=CHECK)
    )
    return group


def role_new(ctx: Ctx, seed_text: str) -> None:
    """A new process: attach, then every API call, in an order drawn from the case's seed."""
    actor = Actor(ctx, "N", TIMED_ALLOWED)
    group = _attach(actor, N_TIMEOUT)
    if group is not None:
        g = group
        ops: list[tuple[str, Callable[[], object]]] = [
            ("inflight()", g.inflight),
            ("stats()", g.stats),
            ("gc()", g.gc),
            ("mpflight.tables()", mpflight.tables),
            ("forget(HELD)", lambda: g.forget(HELD)),
            ("forget(COLLIDE)", lambda: g.forget(COLLIDE)),
            ("do(fresh key)", lambda: g.do("fresh", str, "n")),
            ("do(COLLIDE), HELD's home slot", lambda: g.do(COLLIDE, str, "c")),
            ("do(HELD)", lambda: g.do(HELD, str, "h")),
            ("do(SMALL), a DONE call's key", lambda: g.do(SMALL, str, "s")),
            ("do(BIG), a DONE call's key", lambda: g.do(BIG, str, "b")),
            ("do(b'held'), bytes key", lambda: g.do(HELD.encode(), bytes)),
            ("do(300-byte key)", lambda: g.do("L" * 300, str)),
            ("do(outer) calling do(inner)", lambda: g.do("outer", lambda: g.do("inner", str, "i"))),
        ]
        random.Random(f"{seed_text}:ops").shuffle(ops)
        for op, call in ops:
            actor.attempt(op, call)
    actor.done()


def role_joiner(ctx: Ctx) -> None:
    actor = Actor(ctx, "J", TIMED_ALLOWED)
    group = _attach(actor, J_TIMEOUT)
    if group is not None:
        g = group
        ctx.put("J.go", True)
        actor.attempt("do(HELD), joining the held call", lambda: g.do(HELD, ctx.put, "J.ran", True))
    actor.done()


def role_last(ctx: Ctx) -> None:
    """After everyone is gone: attach, collect, look, and call again."""
    actor = Actor(ctx, "Z", TIMED_ALLOWED)
    group = _attach(actor, N_TIMEOUT)
    if group is not None:
        g = group
        for op, call in [
            ("gc()", g.gc),
            ("inflight()", g.inflight),
            ("stats()", g.stats),
            ("do(HELD)", lambda: g.do(HELD, str, "h")),
            ("do(SMALL)", lambda: g.do(SMALL, str, "s")),
            ("do(BIG)", lambda: g.do(BIG, str, "b")),
            ("do(COLLIDE)", lambda: g.do(COLLIDE, str, "c")),
            ("forget(HELD)", lambda: g.forget(HELD)),
            ("gc() again", g.gc),
        ]:
            actor.attempt(op, call)
        # Everyone who took part is dead and gc() ran: a call still listed is left for good. Not a
        # failure of this test (the garbage may leave one), but reported with the case.
        calls = actor.attempt("inflight() again", g.inflight) or []
        ctx.put("Z.stuck", [f"{c.key!r} {c.state}, {c.waiters} waiters" for c in calls])
    actor.done()
