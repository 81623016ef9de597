"""One case: build the busy table, write the garbage over it, let every actor go, note what went wrong."""

from __future__ import annotations

import os
import random
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mpflight
from mpflight._layout import H_READY, S_GEN, S_HOME, Geometry
from mpflight._locks import object_name
from tests.fuzz.actors import (
    WAITER_ALLOWED,
    Ctx,
    fork_process,
    raise_lookup,
    role_a,
    role_done_owner,
    role_joiner,
    role_last,
    role_new,
    role_waiter,
)
from tests.fuzz.garbage import Live, Write, random_writes
from tests.fuzz.mapping import Raw
from tests.fuzz.scene import BIG, BIG_VALUE, DONE, HARD, HELD, JOIN_GRACE, SMALL
from tests.helpers import DEADLINE, wait_until


def _thread_block(dump: str, tid: int | None) -> str:
    """The frames of thread tid in a faulthandler dump (the first thread when tid is unknown)."""
    pattern = r"(?:Current thread|Thread) 0x0*" + (f"{tid:x}" if tid else "[0-9a-f]+")
    m = re.search(pattern + r" \(most recent call first\):\n((?:  .*\n?)*)", dump)
    return m.group(1) if m else ""


def _dump_location(block: str) -> str:
    """Where a stack dump (most recent call first) is stuck, by protocol step: the innermost frame of
    _group or _table, whatever it waits on below (a semaphore, psutil), unless that is the lock."""
    frames = re.findall(r'File "([^"]+)", line \d+ in (\S+)', block)
    ours = [(Path(f).name, func) for f, func in frames if "/mpflight/" in f]
    if not ours:
        return f"{Path(frames[0][0]).name} in {frames[0][1]}" if frames else "?"
    step = next((f for f in ours if f[0] in ("_group.py", "_table.py")), ours[0])
    lock = ", waiting for the table lock" if ours[0] == ("_locks.py", "acquire") else ""
    return f"{step[0]} in {step[1]}{lock}"


class Case:
    """The runner of one case: its processes, what each actor reported, what went wrong."""

    def __init__(self, spec: dict[str, Any], case_dir: Path) -> None:
        self.spec = spec
        self.seed_text = f"{spec['seed']}:{spec['index']}"
        rng = random.Random(self.seed_text)
        slots = spec.get("slots") or rng.choice((4, 8))
        self.held_big = spec.get("held_big", rng.random() < 0.3)
        # Instead of completing, A dies (SIGKILL) once the garbage is there: its call is aborted.
        self.owner_dies = spec.get("owner_dies", rng.random() < 0.25)
        case_dir.mkdir()
        self.ctx = Ctx(case_dir, spec["name"], slots)
        self.procs: dict[str, int] = {}
        self.exited: dict[str, int] = {}
        self.killed: set[str] = set()
        self.failures: list[dict[str, object]] = []
        self.outcomes: list[str] = []  # what each actor raised, allowed or not: to tell causes apart
        self.pipes = {k: os.pipe() for k in ("held", "linger", "small", "big")}

    def start(self, proc: str, body: Callable[[], None]) -> None:
        self.procs[proc] = fork_process(self.ctx, proc, body)

    def release(self, pipe: str) -> None:
        os.write(self.pipes[pipe][1], b"x")

    def reap(self, procs: list[str], deadline: float) -> None:
        """Wait for procs to exit until deadline; then kill what is left."""
        left = [p for p in procs if p not in self.exited]
        while left:
            for p in list(left):
                pid, status = os.waitpid(self.procs[p], os.WNOHANG)
                if pid:
                    self.exited[p] = status
                    left.remove(p)
            if not left:
                break
            if time.monotonic() > deadline:
                for p in left:
                    os.kill(self.procs[p], signal.SIGKILL)
                    self.exited[p] = os.waitpid(self.procs[p], 0)[1]
                    self.killed.add(p)
                break
            time.sleep(0.005)

    def poll(self) -> None:
        """Note the processes that exited (stops are not reported: no WUNTRACED)."""
        for proc, pid in self.procs.items():
            if proc not in self.exited:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    self.exited[proc] = status

    def await_actors(self, actors: dict[str, str], deadline: float) -> None:
        """Wait until every actor reported; an actor still busy at deadline is a hang."""

        def busy() -> dict[str, str]:
            return {a: p for a, p in actors.items() if not self.ctx.has(f"{a}.json")}

        while (left := busy()) and time.monotonic() < deadline:
            self.poll()
            if all(p in self.exited for p in left.values()):
                break
            time.sleep(0.005)
        self.poll()
        dumped = set()
        for proc in set(busy().values()):
            if proc not in self.exited:
                os.kill(self.procs[proc], signal.SIGUSR2)
                dumped.add(proc)
        if dumped:
            time.sleep(0.3)  # faulthandler writes from the signal handler; give it the time to finish
        for actor, proc in busy().items():
            progress = self.ctx.get(f"{actor}.op") or {}
            dump = self.err(proc)
            block = _thread_block(dump, progress.get("tid")) if proc in dumped else ""
            self.failures.append(
                {
                    "actor": actor,
                    "op": progress.get("op", "?"),
                    "kind": "hang" if proc in dumped else "exit",
                    "type": "hang" if proc in dumped else "no report",
                    "message": f"still busy {HARD} s after the garbage was written"
                    if proc in dumped
                    else "its process exited without reporting",
                    "location": _dump_location(block) if proc in dumped else "?",
                    "detail": block or dump[-3000:],
                }
            )

    def err(self, proc: str) -> str:
        try:
            return (self.ctx.dir / f"{proc}.err").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def check_exits(self, procs: list[str]) -> None:
        for proc in procs:
            status = self.exited.get(proc)
            if status is None or proc in self.killed:
                continue
            if os.WIFSIGNALED(status):
                sig = signal.Signals(os.WTERMSIG(status)).name
                dump = self.err(proc)
                block = dump[dump.find("Fatal Python error") :] if "Fatal Python error" in dump else dump
                self.failures.append(
                    {
                        "actor": proc,
                        "op": "(process)",
                        "kind": "signal",
                        "type": sig,
                        "message": f"process {proc} died of {sig}",
                        "location": _dump_location(_thread_block(block, None)),
                        "detail": block[-3000:],
                    }
                )
            elif os.WEXITSTATUS(status) != 0:
                dump = self.err(proc)
                self.failures.append(
                    {
                        "actor": proc,
                        "op": "(process)",
                        "kind": "exit",
                        "type": f"exit {os.WEXITSTATUS(status)}",
                        "message": (dump.strip().splitlines() or ["(no stderr)"])[-1][:300],
                        "location": _dump_location(dump),
                        "detail": dump[-3000:],
                    }
                )

    def collect_reports(self, actors: list[str]) -> None:
        for actor in actors:
            for op in self.ctx.get(f"{actor}.json") or []:
                if op["status"] == "fail":
                    self.failures.append({"actor": actor, **op})
                if op["status"] != "ok":
                    self.outcomes.append(f"{actor} {op['op']}: {op['type']}")

    def run(self) -> dict[str, Any]:
        try:
            writes = self._run()
        finally:
            for proc, pid in self.procs.items():
                if proc not in self.exited:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
            mpflight.unlink(self.ctx.name)
            for r, w in self.pipes.values():
                os.close(r)
                os.close(w)
        return {
            **self.spec,
            "slots": self.ctx.slots,
            "held_big": self.held_big,
            "owner_dies": self.owner_dies,
            "writes": [[w.area, w.which, w.field, w.data.hex()] for w in writes],
            "labels": [w.label() for w in writes],
            "failures": self.failures,
            "outcomes": self.outcomes,
            "stuck": self.ctx.get("Z.stuck") or [],
        }

    def _run(self) -> list[Write]:
        ctx, pipes = self.ctx, self.pipes
        self.start("A", lambda: role_a(ctx, pipes["held"][0], pipes["linger"][0], self.held_big))
        geo = Geometry.for_slots(ctx.slots)
        shm_path = Path("/dev/shm") / object_name(ctx.name).lstrip("/")
        wait_until(lambda: shm_path.exists() and shm_path.stat().st_size >= geo.size, "A to size the table")
        raw = Raw(ctx.name, ctx.slots)
        try:
            return self._set_up_and_corrupt(raw)
        finally:
            raw.close()

    def _set_up_and_corrupt(self, raw: Raw) -> list[Write]:
        ctx, pipes = self.ctx, self.pipes
        wait_until(lambda: raw.int(H_READY, 4) == 1, "A to initialize the table")
        wait_until(lambda: raw.find(HELD) >= 0 and raw.waiters(raw.find(HELD)) == 1, "A_local to join HELD")
        held = raw.find(HELD)
        for n, proc in enumerate(("B1", "B2"), start=2):
            self.start(proc, lambda proc=proc: role_waiter(ctx, proc, HELD, WAITER_ALLOWED))
            wait_until(lambda n=n: raw.waiters(held) == n, f"{proc} to join HELD")
        self.start("O_small", lambda: role_done_owner(ctx, SMALL, pipes["small"][0], raise_lookup))
        self.start("O_big", lambda: role_done_owner(ctx, BIG, pipes["big"][0], lambda: BIG_VALUE))
        wait_until(lambda: raw.find(SMALL) >= 0 and raw.find(BIG) >= 0, "the owners of SMALL and BIG")
        small, big = raw.find(SMALL), raw.find(BIG)
        allowed_small = (*WAITER_ALLOWED, LookupError)  # the owner's exception, rebuilt
        self.start("R_small", lambda: role_waiter(ctx, "R_small", SMALL, allowed_small))
        self.start("R_big", lambda: role_waiter(ctx, "R_big", BIG, WAITER_ALLOWED))
        wait_until(lambda: raw.waiters(small) == 1 and raw.waiters(big) == 1, "the readers to join")
        raw.pass_the_lock()  # the readers count themselves under the lock: they have left it now
        for proc in ("R_small", "R_big"):  # stopped in its wait: it has not read when the garbage comes
            os.kill(self.procs[proc], signal.SIGSTOP)
            _, status = os.waitpid(self.procs[proc], os.WUNTRACED)
            assert os.WIFSTOPPED(status), status
        self.release("small")
        self.release("big")
        self.reap(["O_small", "O_big"], time.monotonic() + DEADLINE)
        assert all(self.exited[p] == 0 for p in ("O_small", "O_big")), self.exited
        assert (raw.state(small), raw.state(big)) == (DONE, DONE)

        slots = {"held": held, "small": small, "big": big}
        procs = self.procs
        records = {
            "A_local": raw.record_of(procs["A"], held),
            "B1": raw.record_of(procs["B1"], held),
            "B2": raw.record_of(procs["B2"], held),
            "R_small": raw.record_of(procs["R_small"], small),
            "R_big": raw.record_of(procs["R_big"], big),
        }
        live = Live(
            slots=slots,
            homes={k: raw.int(raw.geo.slot(i) + S_HOME, 4) for k, i in slots.items()},
            gens={k: raw.int(raw.geo.slot(i) + S_GEN, 8) for k, i in slots.items()},
            records=records,
            pids=[procs[p] for p in ("A", "B1", "B2", "R_small", "R_big")] + [os.getpid(), 1],
        )
        if self.spec.get("writes") is None:
            writes = random_writes(random.Random(f"{self.seed_text}:writes"), raw, live)
        else:
            writes = [Write(a, wh, f, bytes.fromhex(d)) for a, wh, f, d in self.spec["writes"]]

        # The garbage, then everything at once.
        for w in writes:
            raw.apply(w, live)
        written = time.monotonic()
        waiters_after = raw.waiters(held)
        self.start("N", lambda: role_new(ctx, self.seed_text))
        self.start("J", lambda: role_joiner(ctx))
        # Let J attach and try to join before A goes on; J may hang in either (then await_actors says so).
        attached = written + HARD
        while time.monotonic() < attached and not (ctx.has("J.go") or ctx.has("J.json")):
            time.sleep(0.002)
        grace = time.monotonic() + JOIN_GRACE
        while time.monotonic() < grace and not (
            ctx.has("J.ran") or ctx.has("J.json") or raw.waiters(held) > waiters_after
        ):
            time.sleep(0.002)
        if self.owner_dies:
            os.kill(procs["A"], signal.SIGKILL)
            self.reap(["A"], time.monotonic() + DEADLINE)
            self.killed.add("A")
        else:
            self.release("held")
        for proc in ("R_small", "R_big"):
            os.kill(procs[proc], signal.SIGCONT)
        actors = {"B1": "B1", "B2": "B2", "R_small": "R_small", "R_big": "R_big", "N": "N", "J": "J"}
        if not self.owner_dies:
            actors |= {"A": "A", "A_local": "A"}
        self.await_actors(actors, written + HARD)
        self.release("linger")
        others = [p for p in procs if p not in ("O_small", "O_big")]
        self.reap(others, time.monotonic() + 1.0)
        self.check_exits(others)
        self.start("Z", lambda: role_last(ctx))
        self.await_actors({"Z": "Z"}, time.monotonic() + HARD)
        self.reap(["Z"], time.monotonic() + 1.0)
        self.check_exits(["Z"])
        self.collect_reports([*actors, "Z"])
        return writes
