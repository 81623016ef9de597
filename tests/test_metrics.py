"""Metrics for Prometheus: the collector (mpflight.prometheus) and `mpflight stats --format openmetrics`,
read from shared memory at scrape time, checked through prometheus_client's own exposition and parsers."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import posix_ipc
import psutil
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics import exposition as om_exposition
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_prometheus

import mpflight
from mpflight import _layout, _metrics
from mpflight.prometheus import MPFlightCollector
from tests.conftest import shm_entries
from tests.helpers import DEADLINE, ROOT, join_in_thread, remote_owner, start_subprocess, wait_until, waiting

EXAMPLE = ROOT / "examples" / "metrics_app"
# A request that takes longer than this has hung: the test fails instead of waiting forever.
REQUEST_DEADLINE = 60.0
ZEROS = dict.fromkeys(_metrics.SKIP_REASONS, 0.0)


# -- reading what was exposed --------------------------------------------------------------------------


def samples_of(families: Iterable[Metric], table: str) -> dict[str, float]:
    """One table's samples, by sample name (a gauge by state as ``NAME{state}``); each label set checked."""
    group, _, host = table.partition("+")
    found: dict[str, float] = {}
    for family in families:
        for s in family.samples:
            if s.labels.get("table") != table:
                continue
            assert (s.labels["group"], s.labels["host"]) == (group, host), s
            key = f"{s.name}{{{s.labels['state']}}}" if "state" in s.labels else s.name
            assert key not in found, f"{key} twice"
            found[key] = s.value
    return found


def skipped_of(families: Iterable[Metric]) -> dict[str, float]:
    return {
        s.labels["reason"]: s.value
        for f in families
        for s in f.samples
        if s.name == "mpflight_skipped_tables"
    }


def collected(collector: MPFlightCollector, openmetrics: bool = True) -> list[Metric]:
    """What prometheus_client's own exposition writes for ``collector``, parsed by its own parser."""
    registry = CollectorRegistry()
    registry.register(collector)
    if openmetrics:
        return list(parse_openmetrics(om_exposition.generate_latest(registry).decode()))
    return list(parse_prometheus(generate_latest(registry).decode()))


def expected(
    stats: dict[str, int], created: float, calls: dict[str, int] | None = None, waiters: int = 0
) -> dict[str, float]:
    """The samples a table with these counters (Group.stats()) and calls in flight must have."""
    want: dict[str, float] = {}
    for counter, value in stats.items():
        name = "mpflight_wait_seconds" if counter == "wait_ns" else f"mpflight_{counter}"
        want[f"{name}_total"] = value / 1e9 if counter == "wait_ns" else value
        want[f"{name}_created"] = created
    for state in _metrics.STATES:
        want[f"mpflight_calls_in_flight{{{state}}}"] = (calls or {}).get(state, 0)
    want["mpflight_waiters"] = waiters
    want["mpflight_slots"] = 1024
    return want


def created_of(samples: dict[str, float]) -> float:
    """The table's creation time, the same on every counter."""
    times = {v for k, v in samples.items() if k.endswith("_created")}
    assert len(times) == 1, times
    return times.pop()


def mpflight_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mpflight", *args], capture_output=True, text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=DEADLINE, check=False,
    )  # fmt: skip


def run_calls(name: str, *keys: str, **env: str) -> None:
    """A child process that calls do() on each key in turn (a run each), then exits."""
    child = start_subprocess("calls", name, *keys, **env)
    assert child.wait(DEADLINE) == 0


# -- the collector -----------------------------------------------------------------------------------------


def test_every_counter_of_stats_is_a_metric(name: str) -> None:
    with mpflight.Group(name) as group:
        assert set(_metrics.COUNTER_HELP) == set(group.stats())


@pytest.mark.timeout(120)
def test_two_tables_one_of_a_simulated_host(name: str, tmp_path: Path) -> None:
    """Counters made by other processes, a call held open with a waiter, a lingering outcome; a table of
    simulated host hb (NAME+hb) is labelled group NAME, host hb. Each sample equals what stats() and
    inflight() say; every table's samples are the same in the scrape of every table."""
    host = f"{name}+hb"
    run_calls(name, "a", "b", "c")
    run_calls(name, "x", "y", MPFLIGHT_HOST_ID="hb")
    owner, gate, _ = remote_owner(name, "held", "value", tmp_path)
    with mpflight.Group(name, linger=60) as group, mpflight.Group(name, host_id="hb") as other:
        thread, box = join_in_thread(group, "held")
        wait_until(lambda: waiting(group, "held") == 1, "this process to join the held call")
        held = samples_of(collected(MPFlightCollector([name])), name)
        assert held == expected(group.stats(), created_of(held), {"running": 1}, waiters=1)
        assert (held["mpflight_calls_total"], held["mpflight_runs_total"], held["mpflight_joins_total"]) == (
            5,
            4,
            1,
        )
        gate.open()
        thread.join(DEADLINE)
        owner.join(DEADLINE)
        assert box == [mpflight.Result("the value", True)]
        assert group.do("l", lambda: "lingers") == "lingers"
        assert [c.state for c in group.inflight()] == ["lingering"]

        families = collected(MPFlightCollector([name, host]))
        mine, theirs = samples_of(families, name), samples_of(families, host)
        assert mine == expected(group.stats(), created_of(mine), {"lingering": 1})
        assert (
            mine["mpflight_calls_total"],
            mine["mpflight_shared_total"],
            mine["mpflight_errors_total"],
        ) == (6, 1, 0)
        assert mine["mpflight_wait_seconds_total"] > 0
        assert theirs == expected(other.stats(), created_of(theirs))
        assert (theirs["mpflight_calls_total"], theirs["mpflight_runs_total"]) == (2, 2)
        assert skipped_of(families) == ZEROS
        every = collected(MPFlightCollector())
        assert (samples_of(every, name), samples_of(every, host)) == (mine, theirs)
        classic = collected(MPFlightCollector([name, host]), openmetrics=False)
        assert (samples_of(classic, name), samples_of(classic, host)) == (mine, theirs)


@pytest.mark.timeout(120)
def test_created_is_the_tables_and_a_table_made_anew_reads_as_a_reset(name: str) -> None:
    """Unlinked and made anew by another process while this one still holds a handle on the old table: the
    scrape reads the new table (the name's), with its own creation time and counters from zero."""
    collector = MPFlightCollector([name])
    before = time.time()
    old = mpflight.Group(name)
    made = time.time()
    try:
        for key in ("a", "b"):
            old.do(key, lambda: 1)
        first = samples_of(collected(collector), name)
        assert before <= created_of(first) <= made
        assert first["mpflight_calls_total"] == 2
        mpflight.unlink(name)
        assert samples_of(collected(collector), name) == {}, "a table that is gone has no samples"
        assert shm_entries(name) == [], "scraping never creates a table"
        again = time.time()
        run_calls(name, "z")
        second = samples_of(collected(collector), name)
        assert again <= created_of(second) <= time.time()
        assert created_of(second) > created_of(first)
        assert (second["mpflight_calls_total"], second["mpflight_runs_total"]) == (1, 1)
    finally:
        old.close()


@pytest.mark.timeout(120)
def test_unreadable_and_other_version_tables_are_skipped(name: str) -> None:
    """Beside a good table: one of layout version 99, one of 0 bytes (its creator has not reserved it),
    one whose ready byte is 0 (its creator died halfway), one with a garbage header, one whose header
    claims more slots than its size holds, and (as root) another user's. None fails the scrape; each is
    counted under its reason; a named table that does not exist is neither counted nor created."""
    made = []

    def fake(os_name: str, data: bytes, uid: int | None = None) -> str:
        shm = posix_ipc.SharedMemory(os_name, posix_ipc.O_CREX, mode=0o600, size=len(data))
        made.append(os_name)
        try:
            if data:
                os.pwrite(shm.fd, data, 0)
            if uid is not None:
                os.fchown(shm.fd, uid, uid)
        finally:
            shm.close_fd()
        return os_name[len(f"/mpf{_layout.LAYOUT_VERSION}@") :]

    def header(name_: str, ready: int, slots: int = 1024, magic: bytes = _layout.MAGIC) -> bytes:
        head = bytearray(_layout.HEADER_SIZE)
        _layout.HEADER.pack_into(
            head, 0, magic, _layout.LAYOUT_VERSION, ready, slots, _layout.SLOT_SIZE, _layout.KEY_CAP,
            _layout.PAYLOAD_CAP, slots * _layout.RECORDS_PER_SLOT, _layout.RECORD_SIZE, len(name_), 0, time.time(),
            name_.encode(),
        )  # fmt: skip
        return bytes(head) + bytes(4096 - _layout.HEADER_SIZE)

    v = f"/mpf{_layout.LAYOUT_VERSION}@{name}"
    run_calls(name, "a")
    try:
        posix_ipc.SharedMemory(f"/mpf99@{name}-old", posix_ipc.O_CREX, size=4096).close_fd()
        made.append(f"/mpf99@{name}-old")
        tables = [
            name, f"{name}-old", f"{name}-gone",
            fake(f"{v}-empty", b""),
            fake(f"{v}-half", header(f"{name}-half", ready=0)),
            fake(f"{v}-junk", b"\xa5" * 12 + (1).to_bytes(4, "little") + b"\xa5" * 4080),
            fake(f"{v}-short", header(f"{name}-short", ready=1)),
        ]  # fmt: skip
        if os.geteuid() == 0:
            tables.append(fake(f"{v}-theirs", header(f"{name}-theirs", ready=1, slots=1), uid=65534))
        families = collected(MPFlightCollector(tables))
        assert samples_of(families, name)["mpflight_calls_total"] == 1
        assert {s.labels.get("table") for f in families for s in f.samples} == {name, None}
        assert skipped_of(families) == {
            "other_version": 1, "not_initialised": 2, "not_ours": 1 if os.geteuid() == 0 else 0, "unreadable": 2,
        }  # fmt: skip
        every = collected(MPFlightCollector())  # other tests' tables come and go meanwhile: at least ours
        assert samples_of(every, name)["mpflight_calls_total"] == 1
        assert all(skipped_of(every)[reason] >= n for reason, n in skipped_of(families).items())
        text = mpflight_cli("stats", "--format", "openmetrics")
        assert text.returncode == 0, text.stderr
        assert samples_of(parse_openmetrics(text.stdout), name)["mpflight_calls_total"] == 1
        for table, code, message in (
            (f"{name}-old", 2, "layout version 99"),
            (f"{name}-half", 1, "not initialised"),
        ):
            one = mpflight_cli("stats", table, "--format", "openmetrics")
            assert (one.returncode, one.stdout) == (code, ""), one.stderr
            assert message in one.stderr
        assert shm_entries(f"{name}-gone") == [], "scraping never creates a table"
    finally:
        for os_name in made:
            posix_ipc.unlink_shared_memory(os_name)


def test_core_never_imports_prometheus_client_and_the_collector_names_its_extra() -> None:
    code = (
        "import sys, io\nfrom mpflight._cli import main\nassert main(['stats', '--format', 'openmetrics']) == 0\n"
        "assert 'prometheus_client' not in sys.modules, 'the core imported prometheus_client'"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    core = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=DEADLINE, check=False
    )
    assert core.returncode == 0, core.stderr
    code = "import sys\nsys.modules['prometheus_client'] = None\nimport mpflight.prometheus"
    missing = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=DEADLINE, check=False
    )
    assert missing.returncode == 1
    assert "ImportError: mpflight.prometheus needs prometheus_client" in missing.stderr
    assert "pip install 'mpflight[prometheus]'" in missing.stderr
    with pytest.raises(TypeError, match="list of table names"):
        MPFlightCollector("one-table")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="group name"):
        MPFlightCollector(["bad name"])


# -- the command line ----------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_stats_format_openmetrics_and_prometheus(name: str) -> None:
    """The CLI's texts parse with prometheus_client's parsers and say what its exposition of the
    collector says; one table, or every table with no name; stats NAME [--json] is as it was."""
    host = f"{name}+hb"
    run_calls(name, "a", "b")
    run_calls(name, "x", MPFLIGHT_HOST_ID="hb")
    proc = mpflight_cli("stats", name, "--format", "openmetrics")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.endswith("\n# EOF\n")
    one = list(parse_openmetrics(proc.stdout))
    mine = samples_of(collected(MPFlightCollector([name])), name)
    assert samples_of(one, name) == mine
    assert mine["mpflight_calls_total"] == 2
    assert skipped_of(one) == ZEROS
    assert {s.labels.get("table") for f in one for s in f.samples} == {name, None}
    assert [f.name for f in one] == [f.name for f in collected(MPFlightCollector([name]))]

    every = mpflight_cli("stats", "--format", "openmetrics")
    assert every.returncode == 0, every.stderr
    families = list(parse_openmetrics(every.stdout))
    assert samples_of(families, name) == mine
    assert samples_of(families, host) == samples_of(collected(MPFlightCollector([host])), host)
    assert samples_of(families, host)["mpflight_calls_total"] == 1

    classic = mpflight_cli("stats", name, "--format", "prometheus")
    assert classic.returncode == 0, classic.stderr
    assert "# EOF" not in classic.stdout
    assert samples_of(parse_prometheus(classic.stdout), name) == mine
    assert {(f.name, f.type) for f in parse_prometheus(classic.stdout)} == {
        (f.name, f.type) for f in collected(MPFlightCollector([name]), openmetrics=False)
    }

    as_json = json.loads(mpflight_cli("stats", name, "--json").stdout)
    assert as_json == json.loads(mpflight_cli("stats", name, "--format", "json").stdout)
    assert (as_json["calls"], as_json["runs"]) == (2, 2)
    assert "runs" in mpflight_cli("stats", name).stdout
    for args, code in [(("stats",), 2), (("stats", name, "--json", "--format", "openmetrics"), 2),
                       (("stats", f"{name}-missing", "--format", "openmetrics"), 1)]:  # fmt: skip
        bad = mpflight_cli(*args)
        assert (bad.returncode, bad.stdout) == (code, ""), (args, bad.stderr)
        assert "Traceback" not in bad.stderr
    assert shm_entries(f"{name}-missing") == [], "reading never creates a table"


# -- under gunicorn, recycled workers ---------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(url: str, accept: str | None = None) -> tuple[int, str, str]:
    """(status, content type, body) of a GET."""
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(request, timeout=REQUEST_DEADLINE) as r:
        return r.status, r.headers["Content-Type"], r.read().decode()


def answers(url: str, proc: subprocess.Popen[bytes]) -> bool:
    assert proc.poll() is None, f"{proc.args} exited"
    try:
        return http_get(url)[0] == 200
    except OSError:
        return False


def value_of(key: str) -> tuple[int, dict[str, str]]:
    return 200, {"key": key, "value": hashlib.sha256(key.encode()).hexdigest()}


def workers(server: subprocess.Popen[bytes]) -> set[int]:
    return {p.pid for p in psutil.Process(server.pid).children(recursive=True)}


class Started:
    """Processes a test starts, each in a session of its own with its output in a file; ``stop`` ends
    them with their children."""

    def __init__(self, tmp: Path) -> None:
        self.output = (tmp / "server.out").open("wb")
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, argv: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            argv, env=env, stdout=self.output, stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True
        )
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in self.procs:
            proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(DEADLINE)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(DEADLINE)
            with contextlib.suppress(ProcessLookupError):  # what a failed test left in its session
                os.killpg(proc.pid, signal.SIGKILL)
        self.output.close()


@pytest.fixture
def started(tmp_path: Path) -> Iterator[Started]:
    s = Started(tmp_path)
    try:
        yield s
    finally:
        s.stop()


WORKERS = 3
ROUNDS = 4
COLD = 5


@pytest.mark.timeout(180)
def test_gunicorn_with_recycled_workers_scraped_through_prometheus_client(
    name: str, tmp_path: Path, started: Started
) -> None:
    """gunicorn sync x3 with --max-requests 4, examples/metrics_app: rounds of 3 concurrent requests for
    one key, released once 2 wait (1 run, 2 joins each), then 5 requests for new keys one at a time (a run
    each): 17 calls, more than the first 3 workers may serve, so some of them are replaced under the load.
    Scraped through prometheus_client's own HTTP servers: a separate exporter process (start_http_server,
    OpenMetrics) and the app's /metrics route in whichever worker answers (make_wsgi_app, classic text).
    Every scrape says the calls made; fn ran as often as runs says; /dev/shm holds the table and one
    semaphore throughout, and nothing else is written anywhere (no multiprocess directory)."""
    gate, log, home = tmp_path / "gate", tmp_path / "computations.log", tmp_path / "exporter-home"
    gate.mkdir()
    home.mkdir()
    env = {
        k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"
    }  # its multiprocess mode: off
    env.update(PYTHONPATH=str(ROOT), MPFLIGHT_EXAMPLE_GROUP=name, MPFLIGHT_EXAMPLE_GATE=str(gate),
               MPFLIGHT_EXAMPLE_LOG=str(log))  # fmt: skip
    app_port, exporter_port = _free_port(), _free_port()
    app, exporter = f"http://127.0.0.1:{app_port}", f"http://127.0.0.1:{exporter_port}/metrics"
    before = time.time()
    server = started.start(
        [sys.executable, "-m", "gunicorn", "-b", f"127.0.0.1:{app_port}", "-w", str(WORKERS), "--max-requests", "4",
         "--chdir", str(EXAMPLE), "metrics_wsgi:app"], env, ROOT,
    )  # fmt: skip
    exporter_proc = started.start(
        [sys.executable, str(EXAMPLE / "exporter.py"), "--port", str(exporter_port)], env, home
    )
    wait_until(lambda: answers(f"{app}/metrics", server), "the app to answer")
    wait_until(lambda: answers(exporter, exporter_proc), "the exporter to answer")
    ready = time.time()
    first_generation = workers(server)

    def get(path: str) -> tuple[int, dict[str, str]]:
        status, _, body = http_get(f"{app}{path}")
        return status, json.loads(body)

    layout: list[str] = []
    with mpflight.Group(name) as group, ThreadPoolExecutor(WORKERS) as pool:
        for r in range(ROUNDS):
            futures = [pool.submit(get, f"/value?key=hot&gate=r{r}") for _ in range(WORKERS)]
            wait_until(
                lambda: waiting(group, "hot") == WORKERS - 1, f"{WORKERS - 1} requests to wait, round {r}"
            )
            (gate / f"r{r}").touch()
            assert [f.result(REQUEST_DEADLINE) for f in futures] == [value_of("hot")] * WORKERS
            layout = layout or shm_entries(name)
            assert shm_entries(name) == layout, "what the group has in /dev/shm grew"
        for i in range(COLD):
            assert get(f"/value?key=cold{i}") == value_of(f"cold{i}")
    table = f"mpf{_layout.LAYOUT_VERSION}@{name}"
    assert len(layout) == 2 and layout[0] == table
    assert layout[1].startswith(f"sem.{table}@s"), "the table and the one semaphore its waiters woke on"

    calls, runs = ROUNDS * WORKERS + COLD, ROUNDS + COLD
    status, kind, text = http_get(exporter, accept="application/openmetrics-text; version=1.0.0")
    assert (status, kind.split(";")[0]) == (200, "application/openmetrics-text")
    scraped = samples_of(parse_openmetrics(text), name)
    created = created_of(scraped)
    assert before <= created <= ready, "created is when the first worker made the table"
    stats = dict.fromkeys(_metrics.COUNTER_HELP, 0) | {"calls": calls, "runs": runs, "joins": calls - runs}
    want = expected(stats | {"shared": calls - runs}, created)
    assert scraped["mpflight_wait_seconds_total"] > 0
    assert scraped == want | {"mpflight_wait_seconds_total": scraped["mpflight_wait_seconds_total"]}
    for _ in range(2 * WORKERS):  # whichever worker answers: some were born after every call was made
        status, kind, text = http_get(f"{app}/metrics")
        assert (status, kind.split(";")[0]) == (200, "text/plain")
        assert samples_of(parse_prometheus(text), name) == scraped

    assert len(log.read_text().splitlines()) == runs, "fn ran as often as runs counts"
    assert first_generation - workers(server), "gunicorn replaced workers of the first generation"
    assert shm_entries(name) == layout
    assert list(home.iterdir()) == [], "the exporter wrote nothing"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "computations.log",
        "exporter-home",
        "gate",
        "server.out",
    ]


@pytest.mark.parametrize(
    ("offset", "value", "message"),
    [
        (_layout.H_MAGIC, int.from_bytes(b"NOTMPFLI", "little"), "damaged header (magic or version)"),
        (20, 1, "another geometry"),  # the slot size
        (16, 0, "damaged header (its slot count)"),
        (32, 7, "size or record count does not match"),  # the record count
    ],
)
def test_a_damaged_header_is_reported_not_read(name: str, offset: int, value: int, message: str) -> None:
    """A scrape reads only what the header describes as this version's layout (the same checks as an
    attach's, in mpflight._layout): each damaged field is a DamagedTable that says which, and a scrape
    of every table counts the table as unreadable rather than failing."""
    with mpflight.Group(name) as group:
        group.do("k", int)
        os_name = group._table().file.os_name
    width = 8 if offset == _layout.H_MAGIC else 4
    with open(f"/dev/shm/{os_name.lstrip('/')}", "r+b") as f:
        f.seek(offset)
        f.write(value.to_bytes(width, "little"))
    with pytest.raises(mpflight.MPFlightError, match=re.escape(message)) as raised:
        _metrics.read_table(name)
    assert type(raised.value).__name__ == "DamagedTable"
    assert _metrics.scrape([name]).skipped["unreadable"] == 1
