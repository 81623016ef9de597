#!/usr/bin/env python3
"""mpflight side by side with what users would pick instead, in one run on one machine.

Regenerate docs/benchmarks.md (about 10 minutes on 2 cores; needs the `bench` extra and, for the
redis peer, redis-server on PATH):

    python scripts/bench.py --markdown docs/benchmarks.md --json docs/benchmarks.json

A smoke run of every table, under a minute: ``python scripts/bench.py --quick``.

Peers, each written the way its own documentation recommends: ``inproc`` (Go's algorithm in plain
Python: a threading.Lock over a dict of calls, an Event per call; the floor for per-call cost),
``none`` (no coalescing), ``filelock`` (a FileLock per key and a result file), ``diskcache`` (its
Lock recipe, result in the cache), ``redis`` (redis-py's Lock, result in Redis, against a
redis-server started here on a free loopback port), ``manager`` (multiprocessing.Manager: a Lock, a
dict and a Condition). The lock-based peers share only overlapping calls, like mpflight: a result
counts only if it was written after the caller began. Wake-up times run from the moment fn returns.
A row named ``mpflight OPTION=VALUE`` runs mpflight with that Group option (W5's on_abort="retry",
W7's linger=). W8 serves tests/collapse_app.py under real gunicorn (sync x4), with and without
mpflight.wsgi.collapse, and sends it bursts of identical HTTP requests.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import multiprocessing
import os
import pickle
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mpflight
from mpflight import _locks

CTX = multiprocessing.get_context("spawn")
NOTES_MARK = "<!-- notes: kept when the tables above are regenerated -->"
PEERS = ["mpflight", "inproc", "none", "filelock", "diskcache", "redis", "manager"]
CROSS = ["mpflight", "filelock", "diskcache", "redis", "manager"]  # peers that coalesce across processes


# -- peers ------------------------------------------------------------------------------------------------


class InProc:
    """Go's singleflight in plain Python: one lock, a dict of calls, an Event made per call."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: dict[str, list[Any]] = {}

    def do(self, key: str, fn: Callable[[], Any]) -> Any:
        with self.lock:
            call = self.calls.get(key)
            if call is None:
                call = self.calls[key] = [threading.Event(), None]
                owner = True
            else:
                owner = False
        if not owner:
            call[0].wait()
            return call[1]
        call[1] = fn()
        with self.lock:
            del self.calls[key]
        call[0].set()
        return call[1]


class Peer:
    """What a benchmark worker calls: ``do(key, fn)``; built in each process from a picklable spec."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.kind = spec["kind"]
        self.spec = spec
        if self.kind == "mpflight":
            self.group = mpflight.Group(
                spec["name"], check_interval=spec.get("check_interval", 0.2), **spec["options"]
            )
        elif self.kind == "inproc":
            self.inproc = InProc()
        elif self.kind == "diskcache":
            import diskcache

            self.cache = diskcache.Cache(spec["dir"])
        elif self.kind == "redis":
            import redis

            self.redis = redis.Redis(port=spec["port"])

    def do(self, key: str, fn: Callable[[], Any]) -> Any:
        kind = self.kind
        if kind == "mpflight":
            return self.group.do(key, fn)
        if kind == "inproc":
            return self.inproc.do(key, fn)
        if kind == "none":
            return fn()
        began = time.time()
        if kind == "filelock":
            return self._filelock(key, fn, began)
        if kind == "diskcache":
            import diskcache

            with diskcache.Lock(self.cache, f"lock:{key}"):  # spins, sleeping 1 ms
                got = self.cache.get(f"res:{key}")
                if got is not None and got[0] >= began:
                    return got[1]
                value = fn()
                self.cache.set(f"res:{key}", (time.time(), value))
                return value
        if kind == "redis":
            with self.redis.lock(f"lock:{key}", timeout=10):  # a 10 s lease; retries every 100 ms
                raw = self.redis.get(f"res:{key}")
                if raw is not None:
                    stamp, value = pickle.loads(raw)
                    if stamp >= began:
                        return value
                value = fn()
                self.redis.set(f"res:{key}", pickle.dumps((time.time(), value)))
                return value
        if kind == "manager":
            lock, calls, results, cond = (
                self.spec["lock"],
                self.spec["calls"],
                self.spec["results"],
                self.spec["cond"],
            )
            # A waiter waits for the very call it saw (its token), not for "a result newer than my
            # start": a result stamped before a waiter began, by a call it still saw running, would
            # leave it waiting for a call of the key that may never come.
            with lock:
                call = calls.get(key)
                owner = call is None
                if owner:
                    call = calls[key] = (os.getpid(), time.monotonic_ns())
            if owner:
                value = fn()
                with cond:
                    results[call] = value  # by call, not key: a later call may not overwrite it
                    calls.pop(key, None)
                    cond.notify_all()
                return value
            with cond:
                cond.wait_for(lambda: call in results)
                return results[call]
        raise ValueError(kind)

    def _filelock(self, key: str, fn: Callable[[], Any], began: float) -> Any:
        from filelock import FileLock

        stem = os.path.join(self.spec["dir"], hashlib.sha1(key.encode()).hexdigest())
        with FileLock(f"{stem}.lock"):
            try:
                if os.stat(f"{stem}.res").st_mtime >= began:
                    with open(f"{stem}.res", "rb") as f:
                        return pickle.load(f)
            except FileNotFoundError:
                pass
            value = fn()
            with open(f"{stem}.tmp", "wb") as f:
                pickle.dump(value, f)
            os.replace(f"{stem}.tmp", f"{stem}.res")
            return value

    def close(self) -> None:
        if self.kind == "mpflight":
            self.group.close()


@contextlib.contextmanager
def peer_spec(kind: str, tag: str, env: dict[str, Any], **options: Any) -> Iterator[dict[str, Any] | None]:
    """The spec of a peer for one workload, with whatever it needs set up and torn down around it;
    ``options`` are mpflight's Group options (``on_abort="retry"``, ``linger=1``)."""
    if kind == "redis" and env.get("redis_port") is None:
        yield None
        return
    if options and kind != "mpflight":
        raise ValueError(f"{kind} takes no Group options")
    spec: dict[str, Any] = {"kind": kind}
    tmp = tempfile.mkdtemp(prefix=f"bench-{kind}-")
    manager = None
    try:
        if kind == "mpflight":
            spec["name"] = f"bench-{os.getpid()}-{tag}"
            spec["options"] = options
        elif kind in ("filelock", "diskcache"):
            spec["dir"] = tmp
        elif kind == "redis":
            spec["port"] = env["redis_port"]
            import redis

            redis.Redis(port=env["redis_port"]).flushall()
        elif kind == "manager":
            manager = CTX.Manager()
            spec.update(
                lock=manager.Lock(), calls=manager.dict(), results=manager.dict(), cond=manager.Condition()
            )
        yield spec
    finally:
        if kind == "mpflight":
            mpflight.unlink(spec["name"])
        if manager is not None:
            manager.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def redis_server() -> Iterator[int | None]:
    exe = shutil.which("redis-server")
    if exe is None:
        yield None
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        import redis

        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis(port=port).ping()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


# -- statistics ----------------------------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def summary(values: list[float]) -> dict[str, float]:
    return {
        "median": pct(values, 50),
        "p90": pct(values, 90),
        "p99": pct(values, 99),
        "max": max(values, default=float("nan")),
        "n": len(values),
    }


def ms(x: float) -> str:
    if math.isnan(x):
        return "-"
    return f"{x * 1000:.3f}" if x < 0.01 else f"{x * 1000:.1f}"


# -- W1: per-call overhead -----------------------------------------------------------------------------------


def w1(env: dict[str, Any], quick: bool, kinds: list[str] = PEERS) -> dict[str, Any]:
    calls = 2000 if quick else 20000
    repeats = 3 if quick else 7
    out: dict[str, Any] = {}
    for kind in kinds:
        n = calls if kind not in ("filelock", "diskcache", "redis", "manager") else max(200, calls // 20)
        with peer_spec(kind, "w1", env) as spec:
            if spec is None:
                out[kind] = None
                continue
            peer = Peer(spec)
            keys = [f"k{i}" for i in range(n)]
            fn = lambda: {"a": 1, "b": [1, 2, 3]}  # noqa: E731
            samples = []
            for _ in range(repeats):
                start = time.perf_counter()
                for k in keys:
                    peer.do(k, fn)
                samples.append((time.perf_counter() - start) / n * 1e6)
            peer.close()
        out[kind] = {
            "us_per_call": statistics.median(samples),
            "spread": [min(samples), max(samples)],
            "calls": n,
        }
    return out


# -- W2 / W4 / scaling: a herd on one key -------------------------------------------------------------------


def _herd_worker(
    spec: dict[str, Any], rounds: int, barrier: Any, queue: Any, size: int, sleep: float
) -> None:
    peer = Peer(spec)
    payload = b"x" * size
    rows = []  # sent once at the end: nothing but the next barrier runs between rounds
    for r in range(rounds):
        ran: list[float] = []

        def fn(ran: list[float] = ran) -> bytes:
            time.sleep(sleep)
            ran.append(time.monotonic())
            return payload

        barrier.wait()
        cpu = time.thread_time()  # this thread's: not the queue's feeder thread
        try:
            value = peer.do(f"herd-{r}", fn)
            ok = len(value) == size
        except Exception:
            ok = False
        done = time.monotonic()
        rows.append((r, ran[0] if ran else None, done, time.thread_time() - cpu, ok))
    queue.put(rows)
    peer.close()


def herd(spec: dict[str, Any], processes: int, rounds: int, size: int, sleep: float) -> dict[str, Any]:
    barrier = CTX.Barrier(processes)
    queue = CTX.Queue()
    workers = [
        CTX.Process(target=_herd_worker, args=(spec, rounds, barrier, queue, size, sleep))
        for _ in range(processes)
    ]
    for w in workers:
        w.start()
    rows = [row for _ in range(processes) for row in queue.get(timeout=600)]
    for w in workers:
        w.join(60)
    wakes, lasts, executions, cpu, failures = [], [], [], [], 0
    for r in range(rounds):
        round_rows = [row for row in rows if row[0] == r]
        returns = [row[1] for row in round_rows if row[1] is not None]
        executions.append(len(returns))
        failures += sum(not row[4] for row in round_rows)
        if returns:
            fn_returned = min(returns)
            waits = [row[2] - fn_returned for row in round_rows if row[1] is None]
            wakes += waits
            if waits:
                lasts.append(max(waits))
            cpu += [row[3] for row in round_rows if row[1] is None]
    return {
        "executions_per_round": statistics.mean(executions),
        "wake": summary(wakes),
        "last": summary(lasts),
        "waiter_cpu_ms_per_round": statistics.mean(cpu) * 1000 * (processes - 1) if cpu else float("nan"),
        "failures": failures,
    }


def w2(env: dict[str, Any], quick: bool, kinds: list[str] = CROSS) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for n in (4, 8) if quick else (8, 32):
        for kind in kinds:
            rounds = 2 if quick else (20 if kind != "redis" else 8)
            with peer_spec(kind, f"w2-{n}", env) as spec:
                out[f"{kind}/{n}"] = None if spec is None else herd(spec, n, rounds, 1024, 0.02)
    return out


def w4(env: dict[str, Any], quick: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind in CROSS:
        with peer_spec(kind, "w4", env) as spec:
            out[kind] = None if spec is None else herd(spec, 8, 1 if quick else 5, 16 * 1024 * 1024, 0.02)
    return out


# -- W6: one key across simulated hosts (the Redis tier) ------------------------------------------------------


def _fleet_worker(url: str, name: str, host: str, rounds: int, barrier: Any, queue: Any) -> None:
    import mpflight

    group = mpflight.Group(name, redis=url, host_id=host, timeout=60)
    rows = []
    for r in range(rounds):
        ran: list[float] = []

        def fn(ran: list[float] = ran) -> bytes:
            time.sleep(0.02)
            ran.append(time.monotonic())
            return b"x" * 1024

        barrier.wait()
        try:
            ok = group.do(f"fleet-{r}", fn) == b"x" * 1024
        except Exception:
            ok = False
        rows.append((r, host, ran[0] if ran else None, time.monotonic(), ok))
    queue.put(rows)
    group.close()


# Commands that the tier's scripts run inside Redis: INFO commandstats counts them, but they are no
# round trip of their own.
_IN_SCRIPTS = {"hget", "hset", "hmget", "hlen", "del", "incr", "pexpire", "pttl", "xadd", "rename"}


def _commands(client: Any) -> dict[str, int]:
    """Redis's own count of the round trips clients made, by command (INFO commandstats)."""
    stats = client.info("commandstats").items()
    return {
        k.removeprefix("cmdstat_"): v["calls"]
        for k, v in stats
        if k.removeprefix("cmdstat_") not in _IN_SCRIPTS
    }


def _uncontended(url: str | None, name: str, calls: int, client: Any = None) -> tuple[float, float]:
    """Seconds per uncontended do(), and Redis round trips per call (with ``url``)."""
    import mpflight

    group = mpflight.Group(name, redis=url) if url else mpflight.Group(name)
    keys = [f"u{i}" for i in range(calls)]
    group.do("warm-up", int)  # the connection and the scripts, once per process
    before = sum(_commands(client).values()) if client is not None else 0
    start = time.perf_counter()
    for k in keys:
        group.do(k, int)
    elapsed = (time.perf_counter() - start) / calls
    trips = (sum(_commands(client).values()) - before - 1) / calls if client is not None else 0.0  # less INFO
    group.close()
    return elapsed, trips


def w6(env: dict[str, Any], quick: bool) -> dict[str, Any] | None:
    """A herd on one key across 3 simulated hosts x 4 processes (fn 20 ms), through one Redis."""
    port = env.get("redis_port")
    if port is None:
        return None
    import redis

    import mpflight

    url, name, hosts = f"redis://127.0.0.1:{port}/0", f"bench-{os.getpid()}-w6", ("h0", "h1", "h2")
    client = redis.Redis(port=port)
    rounds = 3 if quick else 20
    barrier, queue = CTX.Barrier(12), CTX.Queue()
    before = _commands(client)
    workers = [
        CTX.Process(target=_fleet_worker, args=(url, name, hosts[i % 3], rounds, barrier, queue))
        for i in range(12)
    ]
    for w in workers:
        w.start()
    rows = [row for _ in workers for row in queue.get(timeout=600)]
    for w in workers:
        w.join(60)
    after = _commands(client)
    ran = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    executions, remote, local, failures = [], [], [], 0
    for r in range(rounds):
        round_rows = [row for row in rows if row[0] == r]
        owners = [row for row in round_rows if row[2] is not None]
        executions.append(len(owners))
        failures += sum(not row[4] for row in round_rows)
        if owners:
            returned, owner_host = min(row[2] for row in owners), owners[0][1]
            for row in round_rows:
                if row[2] is None:
                    (local if row[1] == owner_host else remote).append(row[3] - returned)
    calls = 200 if quick else 2000
    plain, _ = _uncontended(None, f"{name}-plain", calls)
    tiered, uncontended_trips = _uncontended(url, f"{name}-tier", calls, client)
    for table in mpflight.tables():
        if table.startswith(name):
            mpflight.unlink(table)
    for key in client.scan_iter(f"mpf:{name}*"):
        client.delete(key)
    return {
        "executions_per_round": statistics.mean(executions),
        "remote_wake": summary(remote),
        "local_wake": summary(local),
        "failures": failures,
        "commands_per_round": {k: v / rounds for k, v in sorted(ran.items()) if v and k != "info"},
        "round_trips_per_round": sum(v for k, v in ran.items() if k != "info") / rounds,
        "uncontended_us": {"without": plain * 1e6, "with": tiered * 1e6},
        "uncontended_commands_per_call": uncontended_trips,
    }


# -- W3: mixed load -------------------------------------------------------------------------------------------


def _mixed_worker(spec: dict[str, Any], calls: int, seed: int, barrier: Any, queue: Any) -> None:
    peer = Peer(spec)
    rng = random.Random(seed)
    weights = [1 / (i + 1) for i in range(100)]  # Zipf over 100 keys
    keys = rng.choices([f"z{i}" for i in range(100)], weights, k=calls)
    runs = 0

    def fn() -> int:
        nonlocal runs
        runs += 1
        time.sleep(0.001)
        return 1

    barrier.wait()
    start = time.monotonic()
    for key in keys:
        peer.do(key, fn)
    queue.put((start, time.monotonic(), runs))
    peer.close()


def w3(env: dict[str, Any], quick: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind in ["mpflight", "none", "filelock", "diskcache", "redis", "manager"]:
        calls = 100 if quick else (5000 if kind in ("mpflight", "none") else 1000)
        with peer_spec(kind, "w3", env) as spec:
            if spec is None:
                out[kind] = None
                continue
            barrier, queue = CTX.Barrier(4), CTX.Queue()
            procs = [
                CTX.Process(target=_mixed_worker, args=(spec, calls, i, barrier, queue)) for i in range(4)
            ]
            for p in procs:
                p.start()
            rows = [queue.get(timeout=600) for _ in procs]
            for p in procs:
                p.join(60)
        elapsed = max(r[1] for r in rows) - min(r[0] for r in rows)
        total = 4 * calls
        out[kind] = {
            "calls_per_s": total / elapsed,
            "executions_per_call": sum(r[2] for r in rows) / total,
            "calls": total,
        }
    return out


# -- W5: the owner is killed ------------------------------------------------------------------------------

# fn's time in W5: the owner is killed at its end, and a re-run of fn (by a taker, or by a lock-based
# peer's next holder) takes as long again.
W5_FN = 0.2
# Who W5 runs: (row, peer kind, mpflight's options).
W5_PEERS = [
    ("mpflight", "mpflight", {}),
    ("mpflight on_abort=retry", "mpflight", {"on_abort": "retry"}),
    *((kind, kind, {}) for kind in CROSS if kind != "mpflight"),
]
RAN, TOOK = "ran fn again", "the re-run's value"  # a waiter's outcome when its do() returned


def _crash_owner(spec: dict[str, Any], killed_at: Any, in_fn: Any, ready: Any, waiters: int) -> None:
    peer = Peer(spec)

    def fn() -> int:
        in_fn.set()
        for _ in range(waiters):
            ready.acquire()  # each waiter is about to call
        time.sleep(W5_FN)  # and is waiting by now
        killed_at.value = time.monotonic()
        os.kill(os.getpid(), signal.SIGKILL)
        return 0

    peer.do("crash", fn)


def _crash_waiter(spec: dict[str, Any], queue: Any, ready: Any) -> None:
    peer = Peer(spec)
    ran: list[bool] = []

    def fn() -> str:
        ran.append(True)
        time.sleep(W5_FN)
        return "re-ran"

    ready.release()
    try:
        outcome = (RAN if ran else TOOK) if peer.do("crash", fn) == "re-ran" else "a wrong value"
    except mpflight.AbortError:
        outcome = "AbortError"
    except Exception as e:
        outcome = type(e).__name__
    queue.put((outcome, time.monotonic()))


def w5(env: dict[str, Any], quick: bool) -> dict[str, Any]:
    cap = 1.5 if quick else 15.0
    out: dict[str, Any] = {}
    for row, kind, options in W5_PEERS:
        with peer_spec(kind, f"w5-{len(out)}", env, **options) as spec:
            if spec is None:
                out[row] = None
                continue
            killed_at, in_fn, queue, ready = CTX.Value("d", 0.0), CTX.Event(), CTX.Queue(), CTX.Semaphore(0)
            owner = CTX.Process(target=_crash_owner, args=(spec, killed_at, in_fn, ready, 4))
            owner.start()
            in_fn.wait(60)
            waiters = [CTX.Process(target=_crash_waiter, args=(spec, queue, ready)) for _ in range(4)]
            for w in waiters:
                w.start()
            owner.join(60)
            results = []
            end = time.monotonic() + cap + 1
            for _ in waiters:
                try:
                    results.append(queue.get(timeout=max(0.01, end - time.monotonic())))
                except Exception:
                    break
            for w in waiters:
                w.kill()
                w.join(10)
        got = [f"{o} after {ms(t - killed_at.value)} ms" for o, t in results]
        hung = len(waiters) - len(results)
        detect = [t - killed_at.value for _, t in results]
        counts = dict(sorted(Counter(o for o, _ in results).items()))
        out[row] = {
            "outcomes": sorted(counts) + ([f"hang (> {cap:.0f} s)"] if hung else []),
            "counts": counts,  # how many waiters had each outcome
            "latest_s": max(detect) if detect and not hung else None,  # the kill to the last waiter's outcome
            "hung": hung,
            "detail": got,
            "fn_s": W5_FN,
        }
    return out


# -- W7: near misses: sync workers, staggered arrivals -------------------------------------------------------

W7_WORKERS = 4  # processes that serve one request at a time, as gunicorn's sync workers do
W7_FN = 0.1  # fn's time
W7_GAP = 0.005  # between two arrivals of the key: far more requests than the workers can hold at once
# Who W7 runs: (row, peer kind, mpflight's options).
W7_PEERS = [
    ("none", "none", {}),
    ("mpflight linger=0", "mpflight", {}),
    ("mpflight linger=1", "mpflight", {"linger": 1.0}),
]


def _sync_worker(spec: dict[str, Any], inbox: Any, outbox: Any, ready: Any) -> None:
    """Serves the requests of ``inbox`` one at a time, each a do() of its key: (key, arrival time)."""
    peer = Peer(spec)
    ready.release()
    while (request := inbox.get()) is not None:
        key, arrived = request
        ran: list[bool] = []

        def fn(ran: list[bool] = ran) -> bytes:
            ran.append(True)
            time.sleep(W7_FN)
            return b"x" * 1024

        try:
            ok = peer.do(key, fn) == b"x" * 1024
        except Exception:
            ok = False
        outbox.put((arrived, time.monotonic(), bool(ran), ok))
    peer.close()


def near_misses(spec: dict[str, Any], rounds: int, window: float) -> dict[str, Any]:
    """Each round, requests for one key arrive every W7_GAP over ``window`` (longer than fn) at a
    queue that W7_WORKERS processes take them from; the round ends when every request is answered."""
    inbox, outbox, ready = CTX.Queue(), CTX.Queue(), CTX.Semaphore(0)
    workers = [CTX.Process(target=_sync_worker, args=(spec, inbox, outbox, ready)) for _ in range(W7_WORKERS)]
    for w in workers:
        w.start()
    for _ in workers:
        assert ready.acquire(timeout=60), "a worker did not start"
    executions, latencies, busy, failures, requests = [], [], 0.0, 0, round(window / W7_GAP)
    for r in range(rounds):
        start = time.monotonic()
        for i in range(requests):
            time.sleep(max(0.0, start + i * W7_GAP - time.monotonic()))
            inbox.put((f"page-{r}", time.monotonic()))
        rows = [outbox.get(timeout=600) for _ in range(requests)]
        executions.append(sum(row[2] for row in rows))
        latencies += [row[1] - row[0] for row in rows]
        busy += max(row[1] for row in rows) - min(row[0] for row in rows)
        failures += sum(not row[3] for row in rows)
    for _ in workers:
        inbox.put(None)
    for w in workers:
        w.join(60)
    out = {
        "executions_per_window": statistics.mean(executions),
        "requests_per_window": requests,
        "window_s": window,
        "requests_per_s": requests * rounds / busy,
        "latency": summary(latencies),
        "failures": failures,
    }
    if spec["kind"] == "mpflight":
        with mpflight.Group(spec["name"]) as group:  # the table's counters, summed over the workers
            stats = group.stats()
        out["joins_per_window"] = stats["joins"] / rounds
        out["linger_hits_per_window"] = stats["linger_hits"] / rounds
    return out


def w7(env: dict[str, Any], quick: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for row, kind, options in W7_PEERS:
        with peer_spec(kind, f"w7-{len(out)}", env, **options) as spec:
            assert spec is not None
            out[row] = near_misses(spec, 1 if quick else 5, 0.3 if quick else 0.5)
    return out


# -- W8: request collapsing under real gunicorn ---------------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent
W8_WORKERS = 4  # gunicorn sync workers: each serves one request at a time
W8_CLIENTS = 16  # identical requests sent at once, each on its own connection
W8_SLEEP = 0.05  # the app's time
# Who W8 runs: (row, the served app's environment beyond its group and log).
W8_ROWS = [
    ("none", {"COLLAPSE_OFF": "1"}),
    ("mpflight.wsgi.collapse", {}),
    ("mpflight.wsgi.collapse linger=0.5", {"COLLAPSE_LINGER": "0.5"}),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _http_get(port: int, target: str, timeout: float = 60.0) -> tuple[int, bytes]:
    """One GET on a connection of its own, closed after the answer (no keep-alive)."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", target, headers={"Connection": "close"})
        answer = conn.getresponse()
        return answer.status, answer.read()
    finally:
        conn.close()


@contextlib.contextmanager
def gunicorn_sync(name: str, log: Path, output: Path, **env: str) -> Iterator[int]:
    """tests/collapse_app.py under gunicorn sync x W8_WORKERS on a free loopback port; yields the port
    once it answers. Stopped (SIGTERM, wait, then SIGKILL to its process group) and the group's table
    unlinked on the way out."""
    port = _free_port()
    full = dict(os.environ, PYTHONPATH=str(ROOT), COLLAPSE_GROUP=name, COLLAPSE_LOG=str(log), **env)
    argv = [sys.executable, "-m", "gunicorn", "-b", f"127.0.0.1:{port}", "-w", str(W8_WORKERS),
            "-k", "sync", "tests.collapse_app:wsgi"]  # fmt: skip
    with output.open("wb") as out:
        proc = subprocess.Popen(
            argv, env=full, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            deadline = time.monotonic() + 60
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"gunicorn exited: {output.read_text()[-2000:]}")
                try:
                    if _http_get(port, "/", timeout=5)[0] == 200:
                        break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("gunicorn did not answer within 60 s")
                time.sleep(0.05)
            yield port
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(30)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            mpflight.unlink(name)


def _burst(port: int, target: str, clients: int) -> list[tuple[int, bytes, float]]:
    """``clients`` threads send ``target`` at once (a barrier), each on a new connection: (status,
    body, seconds from the send to the whole answer), or (0, error, seconds) for a failed request."""
    from concurrent.futures import ThreadPoolExecutor

    barrier = threading.Barrier(clients)

    def one(_: int) -> tuple[int, bytes, float]:
        barrier.wait()
        start = time.perf_counter()
        try:
            status, body = _http_get(port, target)
        except Exception as e:
            status, body = 0, repr(e).encode()
        return status, body, time.perf_counter() - start

    with ThreadPoolExecutor(clients) as pool:
        return list(pool.map(one, range(clients)))


def collapsed_rounds(port: int, log: Path, tag: str, rounds: int) -> dict[str, Any]:
    """``rounds`` bursts of W8_CLIENTS identical requests, a fresh id each (after one uncounted round
    that warms every worker up); the app's executions of each id are the log's lines for it."""
    _burst(port, f"/page?id={tag}-warm&sleep={W8_SLEEP:g}", W8_CLIENTS)
    latencies: list[float] = []
    ids, identical, distinct, failures = [], 0, [], 0
    for r in range(rounds):
        ident = f"{tag}-{r}"
        answers = _burst(port, f"/page?id={ident}&sleep={W8_SLEEP:g}", W8_CLIENTS)
        ids.append(ident)
        latencies += [a[2] for a in answers]
        failures += sum(a[0] != 200 for a in answers)
        identical += len({a[1] for a in answers}) == 1 and all(a[0] == 200 for a in answers)
        distinct.append(len({a[1] for a in answers if a[0] == 200}))
    runs = Counter(line.split()[1] for line in log.read_text().splitlines() if line.startswith("run "))
    executions = [runs[i] for i in ids]
    return {
        "executions_per_round": statistics.mean(executions),
        "executions_max": max(executions),
        "executions": executions,
        "requests_per_round": W8_CLIENTS,
        "rounds": rounds,
        "identical_rounds": identical,  # rounds whose every response had the same bytes
        "distinct_bodies_per_round": statistics.mean(distinct),  # the app's body names its execution
        "latency": summary(latencies),
        "failures": failures,
    }


def w8(env: dict[str, Any], quick: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    tmp = Path(tempfile.mkdtemp(prefix="bench-w8-"))
    try:
        for i, (row, extra) in enumerate(W8_ROWS):
            name, log = f"bench-{os.getpid()}-w8-{i}", tmp / f"runs-{i}.log"
            with gunicorn_sync(name, log, tmp / f"gunicorn-{i}.out", **extra) as port:
                out[row] = collapsed_rounds(port, log, f"r{i}", 3 if quick else 20)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# -- floors ---------------------------------------------------------------------------------------------------


def _floor_waiter(name: str, ready: Any, times: Any, i: int, leave: Any) -> None:
    import posix_ipc

    sem = posix_ipc.Semaphore(name)
    ready.release()
    sem.acquire()
    times[i] = time.monotonic()  # and nothing else until every waiter has woken: a floor
    leave.wait()


def broadcast_floor(waiters: int, rounds: int) -> dict[str, Any]:
    """One process posts a POSIX semaphore once per waiter; each waiting process returns at once."""
    import posix_ipc

    wakes, lasts = [], []
    for r in range(rounds):
        name = f"/mpfbench-floor-{os.getpid()}-{r}"
        sem = posix_ipc.Semaphore(name, posix_ipc.O_CREX)
        ready, times, leave = CTX.Semaphore(0), CTX.Array("d", waiters, lock=False), CTX.Event()
        procs = [
            CTX.Process(target=_floor_waiter, args=(name, ready, times, i, leave)) for i in range(waiters)
        ]
        for p in procs:
            p.start()
        for _ in procs:
            ready.acquire()
        time.sleep(0.2)  # every waiter is in sem_wait by now
        start = time.monotonic()
        for _ in procs:
            sem.release()
        while not all(times[i] for i in range(waiters)):
            time.sleep(0.001)
        leave.set()
        for p in procs:
            p.join(60)
        sem.unlink()
        sem.close()
        got = [times[i] - start for i in range(waiters)]
        wakes += got
        lasts.append(max(got))
    return {"wake": summary(wakes), "last": summary(lasts)}


def _copy_out(name: str, size: int, ready: Any, go: Any, times: Any, i: int, leave: Any) -> None:
    import mmap

    import posix_ipc

    shm = posix_ipc.SharedMemory(name)
    mm = mmap.mmap(shm.fd, size)
    shm.close_fd()
    ready.release()
    go.wait()
    data = bytes(mm)
    times[i] = time.monotonic()
    assert len(data) == size
    leave.wait()
    mm.close()


def copy_floor(waiters: int, rounds: int) -> dict[str, Any]:
    """16 MiB copied into shared memory once, and out once by each waiting process."""
    import mmap

    import posix_ipc

    size = 16 * 1024 * 1024
    payload = b"x" * size
    lasts = []
    for r in range(rounds):
        name = f"/mpfbench-copy-{os.getpid()}-{r}"
        shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, size=size)
        mm = mmap.mmap(shm.fd, size)
        ready, go, times, leave = (
            CTX.Semaphore(0),
            CTX.Event(),
            CTX.Array("d", waiters, lock=False),
            CTX.Event(),
        )
        procs = [
            CTX.Process(target=_copy_out, args=(name, size, ready, go, times, i, leave))
            for i in range(waiters)
        ]
        for p in procs:
            p.start()
        for _ in procs:
            ready.acquire()
        time.sleep(0.2)  # every process waits for the go
        start = time.monotonic()
        mm[:] = payload
        go.set()
        while not all(times[i] for i in range(waiters)):
            time.sleep(0.001)
        leave.set()
        for p in procs:
            p.join(60)
        lasts.append(max(times[i] for i in range(waiters)) - start)
        mm.close()
        shm.close_fd()
        shm.unlink()
    return {"last": summary(lasts)}


# -- scaling ---------------------------------------------------------------------------------------------------


def fill_cost(quick: bool) -> dict[str, Any]:
    """Per-call cost of uncontended do() while a share of the table's slots is held by running calls."""
    slots = 256
    name = f"bench-fill-{os.getpid()}"
    out = {}
    try:
        with mpflight.Group(name, slots=slots) as group:
            for fill in (0.10, 0.50, 0.75, 0.90):
                release = threading.Event()
                held = int(slots * fill)
                threads = [
                    threading.Thread(target=group.do, args=(f"held-{fill}-{i}", release.wait))
                    for i in range(held)
                ]
                for t in threads:
                    t.start()
                while len(group.inflight()) < held:
                    time.sleep(0.01)
                n = 300 if quick else 10000
                samples = []
                for _ in range(3 if quick else 7):
                    start = time.perf_counter()
                    for i in range(n):
                        group.do(f"free-{i}", int)
                    samples.append((time.perf_counter() - start) / n * 1e6)
                release.set()
                for t in threads:
                    t.join()
                out[f"{round(fill * 100)}%"] = statistics.median(samples)
    finally:
        mpflight.unlink(name)
    return out


def waiter_scaling(quick: bool) -> dict[str, Any]:
    out = {}
    for n in (1, 4) if quick else (1, 4, 16, 64):
        with peer_spec("mpflight", f"scale-{n}", {}) as spec:
            assert spec is not None
            got = herd(spec, n + 1, 2 if quick else 5, 1024, 0.02)
        out[str(n)] = got["last"]["median"]
    return out


def footprint() -> dict[str, Any]:
    import psutil

    name = f"bench-size-{os.getpid()}"
    before = psutil.Process().memory_info().rss
    try:
        group = mpflight.Group(name)
        group.do("k", int)
        after = psutil.Process().memory_info().rss
        st = os.stat(f"/dev/shm/{_locks.object_name(name).lstrip('/')}")
        group.close()
    finally:
        mpflight.unlink(name)
    return {
        "table_bytes": st.st_size,
        "table_resident_bytes": st.st_blocks * 512,
        "rss_gained_bytes": after - before,
    }


# -- the report ------------------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    versions = {}
    for pkg in ("mpflight", "posix-ipc", "msgpack", "psutil", "filelock", "diskcache", "redis"):
        try:
            from importlib.metadata import version

            versions[pkg] = version(pkg)
        except Exception:
            versions[pkg] = "-"
    redis_version = "-"
    if shutil.which("redis-server"):
        redis_version = subprocess.run(
            ["redis-server", "--version"], capture_output=True, text=True, check=False
        ).stdout.split()[2]
    return {
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "packages": versions,
        "redis-server": redis_version,
        "date": time.strftime("%Y-%m-%d"),
    }


def w8_targets(r: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    if r.get("w8") is None:
        return []
    bare, once, held = (r["w8"][k] for k, _ in W8_ROWS)
    return [
        (
            f"W8: collapse runs the app at most once per worker per round (<= {W8_WORKERS} of {W8_CLIENTS}) and linger=0.5 once",
            f"at most {once['executions_max']:g} (mean {once['executions_per_round']:g}); linger=0.5: at most"
            f" {held['executions_max']:g} (none: {bare['executions_per_round']:g})",
            once["executions_max"] <= W8_WORKERS
            and all(n == 1 for n in held["executions"])
            and not once["failures"] + held["failures"],
        )
    ]


def targets(r: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    rows: list[tuple[str, str, bool | None]] = []
    w1r = r["w1"]
    ratio = w1r["mpflight"]["us_per_call"] / w1r["inproc"]["us_per_call"]
    rows.append(("W1: uncontended do() at most 1.5x inproc", f"{ratio:.2f}x", ratio <= 1.5))
    for n in (4, 8) if r["quick"] else (8, 32):
        m = r["w2"][f"mpflight/{n}"]["wake"]["median"]
        floor = r["floors"][f"broadcast/{n - 1}"]["wake"]["median"]
        rows.append(
            (
                f"W2 herd of {n}: median wake within 2x of the broadcast floor",
                f"{m / floor:.2f}x",
                m / floor <= 2,
            )
        )
        peers = [
            v["wake"]["median"]
            for k, v in r["w2"].items()
            if k.endswith(f"/{n}") and v and not k.startswith("mpflight")
        ]
        best = min(peers) if peers else float("nan")
        rows.append(
            (f"W2 herd of {n}: at least 10x below the best peer", f"{best / m:.1f}x below", best / m >= 10)
        )
    if r.get("w6") is not None:
        w6r, lock = r["w6"], (r["w2"].get("redis/8") or {}).get("wake", {}).get("median", float("nan"))
        remote = w6r["remote_wake"]["median"]
        rows.append(("W6: one execution per round across 3 hosts", f"{w6r['executions_per_round']:g}",
                     w6r["executions_per_round"] == 1))  # fmt: skip
        rows.append(("W6: remote wake median under 2 ms", f"{ms(remote)} ms", remote < 0.002))
        rows.append(("W6: remote wake at least 50x below redis-py Lock (W2 herd of 8)",
                     f"{lock / remote:.0f}x below", lock / remote >= 50))  # fmt: skip
        per_call = w6r["uncontended_commands_per_call"]
        rows.append(("W6: uncontended call costs 2 round trips", f"{per_call:.2f}", per_call <= 2.01))
    p99 = r["w2"]["mpflight/8"]["wake"]["p99"]
    rows.append(("W2 herd of 8: p99 under 2 ms", f"{ms(p99)} ms", p99 < 0.002))
    cpus = [
        v["waiter_cpu_ms_per_round"]
        for k, v in r["w2"].items()
        if k.endswith("/8") and v and k.split("/")[0] in ("diskcache", "redis", "filelock")
    ]
    mine = r["w2"]["mpflight/8"]["waiter_cpu_ms_per_round"]
    if cpus:
        rows.append(
            (
                "W2: waiters burn at most 1/5 of the CPU of the best polling peer",
                f"{mine:.2f} vs {min(cpus):.2f} ms",
                mine <= min(cpus) / 5,
            )
        )
    w3r = r["w3"]
    rows.append(
        (
            "W3: calls/s at least equal to none",
            f"{w3r['mpflight']['calls_per_s'] / w3r['none']['calls_per_s']:.2f}x",
            w3r["mpflight"]["calls_per_s"] >= w3r["none"]["calls_per_s"],
        )
    )
    others = [v["executions_per_call"] for k, v in w3r.items() if v and k not in ("mpflight", "none")]
    rows.append(
        (
            "W3: executions per call no higher than any peer",
            f"{w3r['mpflight']['executions_per_call']:.3f} vs min {min(others):.3f}",
            w3r["mpflight"]["executions_per_call"] <= min(others) + 1e-9,
        )
    )
    m4 = r["w4"]["mpflight"]["last"]["median"]
    copy = r["floors"]["copy/7"]["last"]["median"]
    rows.append(("W4: within 1.5x of the copy floor", f"{m4 / copy:.2f}x", m4 / copy <= 1.5))
    best4 = min(v["last"]["median"] for k, v in r["w4"].items() if v and k != "mpflight")
    rows.append(("W4: below the best peer", f"{ms(m4)} vs {ms(best4)} ms", m4 < best4))
    c = r["w5"]["mpflight"]
    rows.append(
        (
            "W5: every waiter has AbortError, within 0.25 s of the kill",
            f"{c['outcomes']}, latest {ms(c['latest_s'] or float('nan'))} ms",
            c["outcomes"] == ["AbortError"] and (c["latest_s"] or 9) <= 0.25,
        )
    )
    c = r["w5"]["mpflight on_abort=retry"]
    rows.append(
        (
            "W5 takeover: one waiter re-runs fn, all 4 have its value within fn's time + 0.25 s of the kill",
            f"{', '.join(f'{o}: {n}' for o, n in c['counts'].items())}; latest {ms(c['latest_s'] or float('nan'))} ms",
            c["counts"] == {RAN: 1, TOOK: 3} and (c["latest_s"] or 9) <= c["fn_s"] + 0.25,
        )
    )
    once, again = r["w7"]["mpflight linger=1"], r["w7"]["mpflight linger=0"]
    rows.append(
        (
            "W7 near misses: linger=1 runs fn once per window",
            f"{once['executions_per_window']:g} (linger=0: {again['executions_per_window']:g})",
            once["executions_per_window"] == 1,
        )
    )
    rows += w8_targets(r)
    f = r["scaling"]["fill"]
    rows.append(
        (
            "Scaling: per-call cost at 75% fill within 1.5x of 10%",
            f"{f['75%'] / f['10%']:.2f}x",
            f["75%"] / f["10%"] <= 1.5,
        )
    )
    w = r["scaling"]["waiters"]
    growth = (w[max(w, key=int)] / w["1"]) / int(max(w, key=int))
    rows.append(
        (
            "Scaling: last waiter's wake grows no faster than linearly",
            f"{growth:.2f} of linear",
            growth <= 1.0,
        )
    )
    return rows


def w8_markdown(r: dict[str, Any]) -> list[str]:
    if r.get("w8") is None:
        return []
    lines = [
        "",
        f"## W8: request collapsing under gunicorn sync x{W8_WORKERS} ({W8_CLIENTS} identical requests, app {W8_SLEEP * 1e3:g} ms)",
        "",
        f"tests/collapse_app.py under `gunicorn -w {W8_WORKERS}` (sync); each round {W8_CLIENTS} client threads send `GET /page?id=<fresh id>&sleep={W8_SLEEP:g}` at once, one connection per request (no keep-alive). Latency runs from a request's send to its whole answer; app executions are the app's own log lines for the round's id; each body names the execution that made it.",
        "",
        "| row | app executions per round (mean / max) | rounds | latency p50 ms | p99 | max | rounds with identical bytes in every response | distinct bodies per round | failures |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for k, v in r["w8"].items():
        lat = v["latency"]
        lines.append(
            f"| {k} | {v['executions_per_round']:g} / {v['executions_max']:g} | {v['rounds']} | {ms(lat['median'])} | {ms(lat['p99'])} | {ms(lat['max'])} | {v['identical_rounds']} of {v['rounds']} | {v['distinct_bodies_per_round']:g} | {v['failures']} |"
        )
    return lines


def markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = [
        "# Benchmarks",
        "",
        "Generated by `python scripts/bench.py --markdown docs/benchmarks.md --json docs/benchmarks.json`"
        + (" (quick run)" if r["quick"] else "")
        + ".",
        "",
        f"Machine: {m['cores']} cores, Linux {m['kernel']}, Python {m['python']}, redis-server {m['redis-server']}; "
        + ", ".join(f"{k} {v}" for k, v in m["packages"].items())
        + f". Run on {m['date']}.",
        "",
        "Times are medians over repeats, with spreads; wake-ups run from the moment fn returns.",
        "",
        "## Targets",
        "",
        "| target | measured | met |",
        "|---|---|---|",
    ]
    for name, got, ok in r["targets"]:
        lines.append(f"| {name} | {got} | {'yes' if ok else 'NO' if ok is False else '-'} |")
    lines += [
        "",
        "## W1: per-call overhead (one process, distinct keys, small dict result)",
        "",
        "| peer | us per call | spread | calls |",
        "|---|---|---|---|",
    ]
    for k, v in r["w1"].items():
        lines.append(
            f"| {k} | "
            + (
                "skipped (no redis-server) | | |"
                if v is None
                else f"{v['us_per_call']:.1f} | {v['spread'][0]:.1f}-{v['spread'][1]:.1f} | {v['calls']} |"
            )
        )
    lines += [
        "",
        "## W2: herd on one key (fn sleeps 20 ms, returns 1 KiB)",
        "",
        "| peer / processes | executions per round | wake median ms | p90 | p99 | max | last waiter median ms | waiters' CPU ms per round |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for k, v in r["w2"].items():
        if v is None:
            lines.append(f"| {k} | skipped | | | | | | |")
            continue
        w = v["wake"]
        lines.append(
            f"| {k} | {v['executions_per_round']:.2f} | {ms(w['median'])} | {ms(w['p90'])} | {ms(w['p99'])} | {ms(w['max'])} | {ms(v['last']['median'])} | {v['waiter_cpu_ms_per_round']:.2f} |"
        )
    lines += [
        "",
        "## W3: mixed load (4 processes, 100 Zipf keys, fn sleeps 1 ms)",
        "",
        "| peer | calls/s | executions per call | calls |",
        "|---|---|---|---|",
    ]
    for k, v in r["w3"].items():
        lines.append(
            f"| {k} | "
            + (
                "skipped | | |"
                if v is None
                else f"{v['calls_per_s']:.0f} | {v['executions_per_call']:.3f} | {v['calls']} |"
            )
        )
    lines += [
        "",
        "## W4: a 16 MiB result to 7 waiters (fn's return to the last waiter's return)",
        "",
        "| peer | median ms | max ms | executions per round |",
        "|---|---|---|---|",
    ]
    for k, v in r["w4"].items():
        lines.append(
            f"| {k} | "
            + (
                "skipped | | |"
                if v is None
                else f"{ms(v['last']['median'])} | {ms(v['last']['max'])} | {v['executions_per_round']:.2f} |"
            )
        )
    fn5 = next(v["fn_s"] for v in r["w5"].values() if v) * 1e3
    lines += [
        "",
        f"## W5: the owner SIGKILLs itself inside fn while 4 wait (fn {fn5:g} ms; a re-run takes as long)",
        "",
        "| peer | what the waiters get | the last one, ms after the kill | each, after the kill |",
        "|---|---|---|---|",
    ]
    for k, v in r["w5"].items():
        if v is None:
            lines.append(f"| {k} | skipped | | |")
            continue
        what = [f"{o}: {n}" for o, n in v["counts"].items()]
        what += [f"{o}: {v['hung']}" for o in v["outcomes"] if o.startswith("hang")]
        lines.append(
            f"| {k} | {', '.join(what)} | {ms(v['latest_s'] or float('nan'))} | {'; '.join(v['detail']) or '-'} |"
        )
    w6r = r.get("w6")
    lines += ["", "## W6: one key across 3 simulated hosts x 4 processes, through Redis (fn 20 ms)", ""]
    if w6r is None:
        lines.append("skipped: no redis-server")
    else:
        rw, lw, un = w6r["remote_wake"], w6r["local_wake"], w6r["uncontended_us"]
        cmds = ", ".join(f"{k} {v:g}" for k, v in w6r["commands_per_round"].items())
        lines += [
            "| measure | value |",
            "|---|---|",
            f"| executions per round (12 callers) | {w6r['executions_per_round']:g} |",
            f"| remote wake, median / p99 ms (other hosts' callers, from fn's return) | {ms(rw['median'])} / {ms(rw['p99'])} |",
            f"| local wake, median / p99 ms (the owner host's other callers) | {ms(lw['median'])} / {ms(lw['p99'])} |",
            f"| Redis round trips per round (1 owner host, 2 waiting hosts; 12 callers) | {w6r['round_trips_per_round']:g}: {cmds} |",
            f"| uncontended do(), us without / with the tier | {un['without']:.1f} / {un['with']:.1f} |",
            f"| Redis round trips per uncontended call | {w6r['uncontended_commands_per_call']:.2f} |",
            f"| failures | {w6r['failures']} |",
        ]
    window = next(iter(r["w7"].values()))["window_s"]
    lines += [
        "",
        f"## W7: near misses: {W7_WORKERS} sync workers; a request for one key every {W7_GAP * 1e3:g} ms for {window * 1e3:g} ms (fn {W7_FN * 1e3:g} ms)",
        "",
        f"Each worker serves one request at a time; a window ends when every request is answered. Requests/s: the requests answered per second from the window's first arrival to its last answer (they arrive at {1 / W7_GAP:g}/s). Latency runs from a request's arrival to its answer.",
        "",
        "| peer | fn executions per window | requests per window | joins / linger hits per window | requests/s | latency median ms | p90 | max |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for k, v in r["w7"].items():
        lat, shared = v["latency"], "-"
        if "joins_per_window" in v:
            shared = f"{v['joins_per_window']:g} / {v['linger_hits_per_window']:g}"
        lines.append(
            f"| {k} | {v['executions_per_window']:g} | {v['requests_per_window']} | {shared} | {v['requests_per_s']:.0f} | {ms(lat['median'])} | {ms(lat['p90'])} | {ms(lat['max'])} |"
        )
    lines += w8_markdown(r)
    fl = r["floors"]
    lines += [
        "",
        "## Floors: what the machine allows",
        "",
        "| floor | median ms | p99 ms | last waiter median ms |",
        "|---|---|---|---|",
    ]
    for k, v in fl.items():
        w = v.get("wake")
        lines.append(
            f"| {k} | {ms(w['median']) if w else '-'} | {ms(w['p99']) if w else '-'} | {ms(v['last']['median'])} |"
        )
    s = r["scaling"]
    lines += ["", "## Scaling", "", "| table fill | us per uncontended call |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in s["fill"].items()]
    lines += ["", "| waiters | last waiter's wake, median ms |", "|---|---|"]
    lines += [f"| {k} | {ms(v)} |" for k, v in s["waiters"].items()]
    fp = s["footprint"]
    lines += [
        "",
        f"A default table is {fp['table_bytes']:,} bytes in /dev/shm ({fp['table_resident_bytes']:,} resident after a call); attaching to it and making one call grows a process's RSS by {fp['rss_gained_bytes']:,} bytes.",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run of every table, under a minute")
    parser.add_argument("--markdown", type=Path, help="write the report here")
    parser.add_argument("--json", type=Path, help="write the raw results here")
    parser.add_argument(
        "--ab", action="store_true",
        help="W1 and W2 of mpflight alone, one JSON line: for runs of two versions side by side",
    )  # fmt: skip
    args = parser.parse_args()
    if args.ab:
        one = {"w1": w1({}, args.quick, ["mpflight"]), "w2": w2({}, args.quick, ["mpflight"])}
        herds = {k.split("/")[1]: v["wake"]["median"] * 1e3 for k, v in one["w2"].items()}
        print(json.dumps({"w1_us": one["w1"]["mpflight"]["us_per_call"], "w2_wake_ms": herds}))
        return 0
    results: dict[str, Any] = {"quick": args.quick, "machine": machine()}
    with redis_server() as port:
        env = {"redis_port": port}
        if port is None:
            print("note: redis-server is not installed: the redis peer is skipped", file=sys.stderr)
        runs = (
            ("w1", w1),
            ("w2", w2),
            ("w3", w3),
            ("w4", w4),
            ("w5", w5),
            ("w6", w6),
            ("w7", w7),
            ("w8", w8),
        )
        for name, run in runs:
            started = time.monotonic()
            results[name] = run(env, args.quick)
            print(f"{name} done in {time.monotonic() - started:.1f} s", file=sys.stderr)
    rounds = 3 if args.quick else 20
    herds = (4, 8) if args.quick else (8, 32)
    results["floors"] = {f"broadcast/{n - 1}": broadcast_floor(n - 1, rounds) for n in herds}
    results["floors"]["copy/7"] = copy_floor(7, 1 if args.quick else 5)
    results["scaling"] = {
        "fill": fill_cost(args.quick),
        "waiters": waiter_scaling(args.quick),
        "footprint": footprint(),
    }
    results["targets"] = targets(results)
    report = markdown(results)
    print(report)
    if args.markdown:
        # Notes written by hand after the tables stay when the tables are regenerated.
        old = args.markdown.read_text() if args.markdown.exists() else ""
        notes = old[old.index(NOTES_MARK) :] if NOTES_MARK in old else f"{NOTES_MARK}\n"
        args.markdown.write_text(f"{report}\n{notes}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
