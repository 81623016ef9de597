"""mpflight inside real servers: gunicorn (sync, gthread, recycled workers, --preload) and uvicorn."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest

import mpflight
from tests.helpers import DEADLINE, ROOT, lines, stop_server, wait_until, waiting

EXAMPLES = ROOT / "examples"
# A request that takes longer than this has hung: the test fails instead of waiting forever.
REQUEST_DEADLINE = 60.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """A real server process on a loopback port, with the example app's test hooks set."""

    def __init__(self, argv: list[str], name: str, tmp: Path, **app_env: str) -> None:
        """``app_env``: more of the app's environment (MPFLIGHT_EXAMPLE_LINGER=...; an empty
        MPFLIGHT_EXAMPLE_GATE: no gate)."""
        self.port = _free_port()
        self.log = tmp / "executions.log"
        self.gate = tmp / "gate"
        self.gate.mkdir()
        env = dict(
            os.environ, PYTHONPATH=str(ROOT), MPFLIGHT_EXAMPLE_GROUP=name, MPFLIGHT_EXAMPLE_LOG=str(self.log),
            MPFLIGHT_EXAMPLE_GATE=str(self.gate),
        )  # fmt: skip
        env.update(app_env)
        argv = [a.replace("{port}", str(self.port)) for a in argv]
        self.argv = argv
        self.output = (tmp / "server.out").open("wb")
        # A session of its own: stopping it reaches the workers too, even if the master dies first.
        self.proc = subprocess.Popen(
            argv, env=env, stdout=self.output, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True
        )
        for key in ("ready",):
            (self.gate / key).touch()
        try:
            wait_until(self._answers, "the server to answer", deadline=DEADLINE)
        except BaseException:  # a server that never answered must not outlive the test
            self.stop()
            raise

    def _answers(self) -> bool:
        assert self.proc.poll() is None, f"the server exited: {(self.output.name)}"
        try:
            return self.get("ready")[0] == 200
        except OSError:
            return False

    def get(self, key: str) -> tuple[int, dict[str, str]]:
        url = f"http://127.0.0.1:{self.port}/value?key={key}"
        try:
            with urllib.request.urlopen(url, timeout=REQUEST_DEADLINE) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def burst(self, keys: list[str]) -> list[tuple[int, dict[str, str]]]:
        with ThreadPoolExecutor(len(keys)) as pool:
            return list(pool.map(self.get, keys))

    def open(self, key: str) -> None:
        (self.gate / key).touch()

    def workers(self) -> list[int]:
        return [p.pid for p in psutil.Process(self.proc.pid).children(recursive=True)]

    def executions(self) -> dict[str, list[tuple[float, float | None, int]]]:
        """Per key: (start, end or None, pid) of each execution of fn, from the log."""
        runs: dict[str, list[tuple[float, float | None, int]]] = defaultdict(list)
        open_runs: dict[tuple[str, int], float] = {}
        for line in lines(self.log):
            event, key, pid, at = line.split()
            if event == "start":
                open_runs[key, int(pid)] = float(at)
            else:
                runs[key].append((open_runs.pop((key, int(pid))), float(at), int(pid)))
        for (key, pid), start in open_runs.items():
            runs[key].append((start, None, pid))
        return runs

    def stop(self) -> None:
        stop_server(self.proc)
        self.output.close()


def expected(key: str) -> dict[str, str]:
    return {"key": key, "value": hashlib.sha256(key.encode()).hexdigest()}


def assert_no_overlap(server: Server, killed_at: float | None = None) -> None:
    """No two executions of one key ever overlapped in time, across every worker."""
    for key, runs in server.executions().items():
        spans = sorted((start, end if end is not None else killed_at) for start, end, _ in runs)
        assert all(end is not None for _, end in spans), f"an execution of {key} never ended"
        for (_, end), (start, _) in itertools.pairwise(spans):
            assert end <= start, f"two executions of {key} overlapped"  # type: ignore[operator]


GUNICORN = [
    sys.executable,
    "-m",
    "gunicorn",
    "-b",
    "127.0.0.1:{port}",
    "--chdir",
    str(EXAMPLES / "gunicorn_app"),
]
SERVERS = {
    "sync": ([*GUNICORN, "-w", "4", "wsgi:app"], 4),
    # At most 4 connections a worker: a worker whose threads are all busy accepts no more (else a
    # request could queue inside a busy worker instead of reaching the table).
    "gthread": (
        [*GUNICORN, "-w", "4", "-k", "gthread", "--threads", "4", "--worker-connections", "4", "wsgi:app"],
        16,
    ),
    "preload": ([*GUNICORN, "-w", "4", "--preload", "wsgi:app"], 4),
    "uvicorn": (
        [
            sys.executable,
            "-m",
            "uvicorn",
            "--workers",
            "2",
            "--port",
            "{port}",
            "--app-dir",
            str(EXAMPLES / "asgi_app"),
            "asgi:app",
        ],
        16,
    ),
}


@pytest.fixture(params=list(SERVERS))
def server(request: pytest.FixtureRequest, name: str, tmp_path: Path) -> Iterator[tuple[Server, int]]:
    argv, concurrency = SERVERS[request.param]
    s = Server(argv, name, tmp_path)
    try:
        yield s, concurrency
    finally:
        s.stop()


@pytest.mark.timeout(180)
def test_a_held_burst_runs_fn_once(server: tuple[Server, int], name: str) -> None:
    """Every request of the burst arrives while the first execution runs: fn runs once."""
    s, concurrency = server
    with mpflight.Group(name) as group, ThreadPoolExecutor(4 * concurrency) as pool:
        futures = [pool.submit(s.get, "hot") for _ in range(concurrency)]
        wait_until(lambda: waiting(group, "hot") == concurrency - 1, f"{concurrency - 1} waiting requests")
        # An async worker may take every request of a burst: add requests until two processes share the call.
        while len({c.owner_pid, *c.waiter_pids} if (c := group.inflight()[0]) else ()) < 2:
            assert len(futures) < 4 * concurrency, "every request went to one worker"
            futures.append(pool.submit(s.get, "hot"))
            wait_until(lambda: waiting(group, "hot") == len(futures) - 1, "one more waiting request")
        s.open("hot")
        responses = [f.result(REQUEST_DEADLINE) for f in futures]
    assert responses == [(200, expected("hot"))] * len(futures)
    assert len(s.executions()["hot"]) == 1
    assert_no_overlap(s)


@pytest.mark.timeout(180)
def test_mixed_bursts_are_right_and_never_overlap(server: tuple[Server, int]) -> None:
    s, concurrency = server
    for key in ("k0", "k1", "k2", "k3"):
        s.open(key)
    keys = [f"k{i % 4}" for i in range(concurrency * 3)]
    for _ in range(3):
        assert s.burst(keys) == [(200, expected(k)) for k in keys]
    assert_no_overlap(s)


@pytest.mark.timeout(180)
def test_an_owner_killed_mid_call_never_hangs_the_others(server: tuple[Server, int], name: str) -> None:
    s, concurrency = server

    def get(key: str) -> tuple[int, dict[str, str]]:
        try:
            return s.get(key)
        except (ConnectionError, urllib.error.URLError):  # a request the killed worker itself was serving
            return 0, {}

    def call() -> mpflight.InflightCall | None:
        return next((c for c in group.inflight() if c.key == "doomed"), None)

    with mpflight.Group(name) as group, ThreadPoolExecutor(4 * concurrency) as pool:
        # Requests until some wait in another worker than the owner's (an async worker may accept many).
        futures = [pool.submit(get, "doomed")]
        wait_until(lambda: call() is not None, "the owner")
        while len(futures) < 4 * concurrency:
            futures.append(pool.submit(get, "doomed"))
            wait_until(lambda: call().waiters == len(futures) - 1, "the request to wait")  # type: ignore[union-attr]
            current = call()
            assert current is not None
            if len(futures) >= concurrency and any(p != current.owner_pid for p in current.waiter_pids):
                break
        others = sum(p != current.owner_pid for p in current.waiter_pids)
        assert others > 0
        killed_at = time.monotonic()
        os.kill(current.owner_pid, signal.SIGKILL)
        s.open("doomed")  # a re-run after the abort may proceed
        responses = [f.result(REQUEST_DEADLINE) for f in futures]
    for status, body in responses:
        assert (status, body) in ((200, expected("doomed")), (0, {})) or (
            status == 503 and "aborted" in body["error"]
        )
    # Only the requests inside the killed worker lose their connection; every other one is answered.
    assert sum(status != 0 for status, _ in responses) >= others
    assert any(status == 503 for status, _ in responses), "the dead owner's waiters were told"
    s.open("after")
    wait_until(lambda: s.get("after")[0] == 200, "the server to serve again")
    assert_no_overlap(s, killed_at)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("linger", [pytest.param(5.0, id="linger=5"), pytest.param(0.0, id="linger=0")])
def test_near_misses_of_sync_workers_share_one_run_only_with_linger(
    name: str, tmp_path: Path, linger: float
) -> None:
    """gunicorn sync workers x4, a 300 ms fn, 40 concurrent requests for one key: a sync worker serves
    one request at a time, so at most 4 requests are in the call and the other 36 (or more) begin after
    it published. With linger=5 they take its value: fn runs once. With linger=0 the first of them
    finds no call and runs fn again (a call holds at most 4 of the 40: fn runs 10 times or more).
    Whatever order the requests come in, each is in the call or after it: the test needs none."""
    s = Server(
        [*GUNICORN, "-w", "4", "wsgi:app"], name, tmp_path,
        MPFLIGHT_EXAMPLE_LINGER=str(linger), MPFLIGHT_EXAMPLE_GATE="", MPFLIGHT_EXAMPLE_SECONDS="0.3",
    )  # fmt: skip
    try:
        with mpflight.Group(name) as group:
            before = group.stats()
            responses = s.burst(["hot"] * 40)
            after = group.stats()
        runs = len(s.executions()["hot"])
        joins, hits = after["joins"] - before["joins"], after["linger_hits"] - before["linger_hits"]
        print(f"linger={linger:g}: fn ran {runs} times for 40 requests ({joins} joins, {hits} linger hits)")
        assert responses == [(200, expected("hot"))] * 40
        assert after["runs"] - before["runs"] == runs
        if linger:
            assert runs == 1
            assert hits >= 36, "the requests after the call took its lingering value"
        else:
            assert runs >= 40 // 4, "a call holds at most one request per sync worker"
            assert hits == 0
        assert_no_overlap(s)
    finally:
        s.stop()


@pytest.mark.timeout(180)
def test_recycled_workers_under_load(name: str, tmp_path: Path) -> None:
    """--max-requests: gunicorn replaces workers in the middle of the load; every answer is right."""
    s = Server(
        [*GUNICORN, "-w", "4", "--max-requests", "10", "--max-requests-jitter", "3", "wsgi:app"],
        name,
        tmp_path,
    )
    try:
        for key in ("k0", "k1", "k2", "k3"):
            s.open(key)
        before = set(s.workers())
        keys = [f"k{i % 4}" for i in range(16)]
        for _ in range(6):
            assert s.burst(keys) == [(200, expected(k)) for k in keys]
        assert set(s.workers()) != before, "workers were recycled"
        assert_no_overlap(s)
    finally:
        s.stop()
