"""Soak mpflight under SIGINTs that a process survives: rounds of calls, one process interrupted hundreds of times.

Each round: PROCS processes with THREADS threads each call ``do()`` on KEYS keys in a loop; one of them (the
victim) calls in its main thread too and catches every KeyboardInterrupt around its calls; another process
sends it SIGINTS SIGINTs at random delays of 0 to MAX_DELAY_US microseconds. Then every worker stops and the
round reports:

- deadlocks: a thread that made no progress for PROGRESS_DEADLINE s (its calls are bounded by the group's
  TIMEOUT, so only a wedged lock exceeds it);
- timeouts: calls that gave up waiting (a call left in flight with nobody running it);
- leaked slots and leaked records: what ``inflight()`` still shows LEAK_DEADLINE s after every worker exited,
  with no ``gc()`` anywhere (nobody was SIGKILLed: whatever is left, a survivor left);
- wrong values: a call that returned anything but its own key's value;
- errors: a call that raised anything but AbortError or TimeoutError (fn raises nothing).

One line per round, then a summary line; the exit status is 1 on any failure. The round's table, semaphores and
segments are unlinked, and /dev/shm is checked for anything left under its name.

Run it (about a minute for 20 rounds on 2 cores):

    .venv/bin/python scripts/soak_interrupts.py            # 20 rounds
    .venv/bin/python scripts/soak_interrupts.py --rounds 5 --sigints 500
"""

from __future__ import annotations

import argparse
import faulthandler
import multiprocessing
import os
import random
import signal
import sys
import threading
import time
from typing import Any

import mpflight

# Bounds a thread's silence: more than this without a finished call is a deadlock. Not a speed target.
PROGRESS_DEADLINE = 10.0
# The workers' Group timeout: a waiter on a call nobody runs gives up after this (counted as a timeout).
TIMEOUT = 2.0
# After every worker exited, what is left in the table must be gone within this (no gc is run).
LEAK_DEADLINE = 10.0
# Bounds a child's life (it dumps its stack and exits); not a speed target.
CHILD_DEADLINE = 120.0

# Counters each worker thread keeps in shared memory: calls, wrong values, timeouts, aborts, interrupts, and
# other errors (DeadlockError on a key a leaked slot says this very thread owns, MPFlightError...).
CALLS, WRONG, TIMEOUTS, ABORTS, INTERRUPTS, ERRORS = range(6)
FIELDS = 6


def value_of(key: str) -> str:
    return f"value:{key}"


def _fn(key: str, rng: random.Random) -> str:
    if rng.random() < 0.5:
        time.sleep(rng.random() * 0.0005)
    return value_of(key)


# The victim's SIGINT handler raises KeyboardInterrupt only while its main thread is inside the try around
# a call (as a real one would anywhere): one landing in the handler's own except block would kill the
# victim for the application's fault, not mpflight's.
_in_try = [False]


def _on_sigint(signum: int, frame: object) -> None:
    if _in_try[0]:
        raise KeyboardInterrupt


def _loop(
    group: mpflight.Group, keys: list[str], stop: Any, counters: Any, base: int, seed: int, main: bool = False
) -> None:
    """Call keys at random until stop; count outcomes in counters[base : base + FIELDS]."""
    rng = random.Random(seed)
    while not stop.is_set():
        try:
            _in_try[0] = main
            key = rng.choice(keys)
            try:
                if group.do(key, _fn, key, rng) != value_of(key):
                    counters[base + WRONG] += 1
            except mpflight.AbortError:
                counters[base + ABORTS] += 1
            except TimeoutError:
                counters[base + TIMEOUTS] += 1
            except Exception as e:
                counters[base + ERRORS] += 1
                print(f"error in pid {os.getpid()}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            counters[base + CALLS] += 1
            _in_try[0] = False
        except KeyboardInterrupt:  # only the victim's main thread gets them; it survives and goes on
            _in_try[0] = False
            counters[base + INTERRUPTS] += 1


def worker(name: str, keys: list[str], threads: int, stop: Any, counters: Any, first: int, seed: int) -> None:
    """``threads`` threads call in a loop; the victim (counting its main thread among them) catches SIGINTs."""
    faulthandler.dump_traceback_later(CHILD_DEADLINE, exit=True)
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    signal.signal(signal.SIGINT, _on_sigint)
    with mpflight.Group(name, timeout=TIMEOUT) as group:
        others = [
            threading.Thread(
                target=_loop, args=(group, keys, stop, counters, (first + i) * FIELDS, seed + i), daemon=True
            )
            for i in range(1, threads)
        ]
        for t in others:
            t.start()
        _loop(group, keys, stop, counters, first * FIELDS, seed, main=True)
        for t in others:
            t.join(CHILD_DEADLINE)


def sender(pid: int, sigints: int, max_delay_us: int, seed: int, ready: Any, done: Any) -> None:
    """Send ``sigints`` SIGINTs to pid at random delays, once the victim is calling."""
    faulthandler.dump_traceback_later(CHILD_DEADLINE, exit=True)
    rng = random.Random(seed)
    ready.wait(CHILD_DEADLINE)
    for _ in range(sigints):
        time.sleep(rng.randrange(max_delay_us + 1) / 1e6)
        os.kill(pid, signal.SIGINT)
    done.set()


def shm_left(name: str) -> list[str]:
    return sorted(e for e in os.listdir("/dev/shm") if f"@{name}" in e)


def one_round(n: int, args: argparse.Namespace, rng: random.Random) -> dict[str, int]:
    ctx = multiprocessing.get_context("spawn")
    name = f"soak-{os.getpid()}-{n}"
    keys = [f"k{i}" for i in range(args.keys)]
    threads = args.threads
    counters = ctx.Array("q", args.procs * threads * FIELDS, lock=False)
    stop, ready, done = ctx.Event(), ctx.Event(), ctx.Event()
    result = {"deadlocks": 0, "timeouts": 0, "leaked_slots": 0, "leaked_records": 0, "wrong": 0, "errors": 0}
    procs = [
        ctx.Process(
            target=worker, args=(name, keys, threads, stop, counters, p * threads, rng.randrange(2**32))
        )
        for p in range(args.procs)
    ]
    try:
        for p in procs:
            p.start()
        victim = procs[0]
        send = ctx.Process(
            target=sender,
            args=(victim.pid, args.sigints, args.max_delay_us, rng.randrange(2**32), ready, done),
        )
        send.start()
        # The victim's main thread is inside its loop's try once it has finished a call.
        end = time.monotonic() + PROGRESS_DEADLINE
        while counters[CALLS] == 0 and time.monotonic() < end:
            time.sleep(0.001)
        ready.set()
        last = list(counters[CALLS::FIELDS])
        seen_at = [time.monotonic()] * len(last)
        while not done.is_set() or time.monotonic() < seen_at[0] + 0.2:
            done.wait(0.05)
            now = time.monotonic()
            calls = list(counters[CALLS::FIELDS])
            for i, c in enumerate(calls):
                if c != last[i]:
                    last[i], seen_at[i] = c, now
            stuck = [i for i, t in enumerate(seen_at) if now - t > PROGRESS_DEADLINE]
            if stuck:
                result["deadlocks"] = len(stuck)
                for p in procs:  # their stacks, to stderr (faulthandler, registered in each worker)
                    if p.pid is not None and p.exitcode is None:
                        os.kill(p.pid, signal.SIGUSR1)
                time.sleep(0.5)
                break
            if done.is_set() and all(now - t < 0.2 for t in seen_at):
                break  # the SIGINTs are over and everyone is still calling
        stop.set()
        send.join(CHILD_DEADLINE)
        for p in procs:
            p.join(PROGRESS_DEADLINE)
            if p.exitcode is None:  # a deadlocked worker: kill it (its leftovers are then a dead one's)
                result["deadlocks"] = max(result["deadlocks"], 1)
                p.kill()
                p.join()
        exited_badly = [p.exitcode for p in procs if p.exitcode not in (0, -signal.SIGKILL)]
        if exited_badly:
            raise RuntimeError(f"round {n}: workers exited with {exited_badly}")
        result["wrong"] = sum(counters[WRONG::FIELDS])
        result["timeouts"] = sum(counters[TIMEOUTS::FIELDS])
        result["errors"] = sum(counters[ERRORS::FIELDS])
        with mpflight.Group(name) as group:
            end = time.monotonic() + LEAK_DEADLINE
            left = group.inflight()
            while left and time.monotonic() < end:
                time.sleep(0.01)
                left = group.inflight()
            result["leaked_slots"] = len(left)
            result["leaked_records"] = sum(len(c.waiter_pids) for c in left)
        result |= {
            "calls": sum(counters[CALLS::FIELDS]),
            "aborts": sum(counters[ABORTS::FIELDS]),
            "interrupts": sum(counters[INTERRUPTS::FIELDS]),
        }
    finally:
        stop.set()
        for p in procs:
            if p.exitcode is None:
                p.kill()
                p.join()
        mpflight.unlink(name)
        if shm_left(name):
            raise RuntimeError(f"round {n}: /dev/shm still holds {shm_left(name)}")
    return result


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--procs", type=int, default=3, help="worker processes (the first is the victim)")
    parser.add_argument("--threads", type=int, default=3, help="calling threads per worker, main included")
    parser.add_argument("--keys", type=int, default=5)
    parser.add_argument("--sigints", type=int, default=300, help="SIGINTs sent to the victim per round")
    parser.add_argument(
        "--max-delay-us", type=int, default=3000, help="the longest delay between two SIGINTs"
    )
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    seed = random.randrange(2**32) if args.seed is None else args.seed
    rng = random.Random(seed)
    print(f"seed {seed}: {args.rounds} rounds of {args.procs} processes x {args.threads} threads, "
          f"{args.keys} keys, {args.sigints} SIGINTs to one process")  # fmt: skip
    began = time.monotonic()
    totals = {"deadlocks": 0, "timeouts": 0, "leaked_slots": 0, "leaked_records": 0, "wrong": 0, "errors": 0}
    failed_rounds = 0
    for n in range(1, args.rounds + 1):
        t0 = time.monotonic()
        r = one_round(n, args, rng)
        bad = any(r[k] for k in totals)
        failed_rounds += bad
        for k in totals:
            totals[k] += r[k]
        print(
            f"round {n}: {'FAIL' if bad else 'ok'}  {r.get('calls', 0)} calls, {r.get('interrupts', 0)} interrupts "
            f"caught, {r.get('aborts', 0)} aborts; {r['deadlocks']} deadlocks, {r['timeouts']} timeouts, "
            f"{r['leaked_slots']} leaked slots, {r['leaked_records']} leaked records, {r['wrong']} wrong values, "
            f"{r['errors']} errors "
            f"({time.monotonic() - t0:.1f} s)",
            flush=True,
        )
    print(
        f"{args.rounds} rounds: {totals['deadlocks']} deadlocks, {totals['leaked_slots']} leaked slots, "
        f"{totals['leaked_records']} leaked records, {totals['wrong']} wrong values, {totals['timeouts']} timeouts, "
        f"{totals['errors']} errors "
        f"({failed_rounds} rounds failed, {time.monotonic() - began:.0f} s, seed {seed})"
    )
    return 1 if failed_rounds else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
