"""The cross-host tier against a real redis-server: simulated hosts (MPFLIGHT_HOST_ID, each its own
table and processes) share one execution per key through Redis, and every failure ends in an outcome:
the value, fn's error, an AbortError, or a fallback to coalescing on the host alone."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import datetime
import io
import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis
from redis.cluster import ClusterNode, RedisCluster

import mpflight
from mpflight._protocol import JOIN, OWN, Options
from mpflight._redis import RedisTier
from tests.helpers import DEADLINE, ROOT, lines, refuse_thread_start, wait_until
from tests.redis_server import RedisClusterServers, RedisServer

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    s = RedisServer()
    yield s
    _stop(s)


@pytest.fixture
def own_server() -> Iterator[RedisServer]:
    """A server of the test's own, which it may pause or kill."""
    s = RedisServer()
    yield s
    _stop(s)


_clients: dict[int, Any] = {}  # the tests' own client of each server, closed with the server


def _client(server: RedisServer | RedisClusterServers) -> Any:
    if id(server) not in _clients:
        if isinstance(server, RedisClusterServers):
            port = server.nodes[0].port
            _clients[id(server)] = RedisCluster(
                startup_nodes=[ClusterNode("127.0.0.1", port)], socket_timeout=5
            )
        else:
            _clients[id(server)] = redis.Redis.from_url(server.url, socket_timeout=5)
    return _clients[id(server)]


def _stop(server: RedisServer | RedisClusterServers) -> None:
    client = _clients.pop(id(server), None)
    if client is not None:
        client.close()
    server.stop()


def _leases(server: RedisServer | RedisClusterServers, name: str) -> list[bytes]:
    return sorted(_client(server).scan_iter(f"mpf:{name}:*:lease"))


def _joined(server: RedisServer | RedisClusterServers, name: str) -> list[int]:
    """How many remote waiters each lease of the group has."""
    return [int(_client(server).hlen(lease)) - 5 for lease in _leases(server, name)]


def _remote_waiters(server: RedisServer | RedisClusterServers, name: str) -> int:
    leases = _leases(server, name)
    return -1 if len(leases) != 1 else int(_client(server).hlen(leases[0])) - 5


class Netns:
    """A network namespace joined to this one by a veth pair: a host whose link to Redis can be cut."""

    def __init__(self) -> None:
        if os.geteuid() != 0:
            pytest.fail("the partition test needs root (ip netns): CI runs as root")
        tag = uuid.uuid4().hex[:6]
        self.name, self.link = f"mpf-{tag}", f"mpf{tag}"
        third = int(tag[:2], 16)
        self.outside, inside = f"10.201.{third}.1", f"10.201.{third}.2"
        steps = [
            ["ip", "netns", "add", self.name],
            ["ip", "link", "add", self.link, "type", "veth", "peer", "name", f"{self.link}p"],
            ["ip", "link", "set", f"{self.link}p", "netns", self.name],
            ["ip", "addr", "add", f"{self.outside}/30", "dev", self.link],
            ["ip", "link", "set", self.link, "up"],
            ["ip", "netns", "exec", self.name, "ip", "addr", "add", f"{inside}/30", "dev", f"{self.link}p"],
            ["ip", "netns", "exec", self.name, "ip", "link", "set", f"{self.link}p", "up"],
            ["ip", "netns", "exec", self.name, "ip", "link", "set", "lo", "up"],
        ]
        try:
            for step in steps:
                subprocess.run(step, check=True, capture_output=True, timeout=DEADLINE)
        except BaseException:
            self.delete()
            raise

    def cut(self) -> None:
        subprocess.run(["ip", "link", "set", self.link, "down"], check=True, timeout=DEADLINE)

    def delete(self) -> None:
        subprocess.run(["ip", "link", "del", self.link], capture_output=True, timeout=DEADLINE, check=False)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=DEADLINE, check=False)


class Hosts:
    """Simulated hosts: each caller is a process (tests.redis_hosts) in its host's process group."""

    def __init__(self, server: RedisServer | RedisClusterServers, name: str, tmp: Path) -> None:
        self.server, self.name, self.dir = server, name, tmp
        self.groups: dict[str, int] = {}
        self.procs: list[subprocess.Popen[bytes]] = []
        (tmp / "runs").touch()
        (tmp / "out").touch()

    def start(self, host: str, key: str = "k", mode: str = "value", env: dict[str, str] | None = None,
              netns: Netns | None = None, **options: Any) -> subprocess.Popen[bytes]:  # fmt: skip
        cluster = isinstance(self.server, RedisClusterServers)
        url = "" if cluster else self.server.url
        if netns is not None:  # the host's process runs in the namespace and reaches Redis over its link
            url = url.replace("127.0.0.1", netns.outside)
        config = {"url": url, "name": self.name, "host": host, "key": key,
                  "mode": mode, "dir": str(self.dir), "options": options,
                  "cluster": self.server.nodes[0].port if cluster else None}  # fmt: skip
        prefix = ["ip", "netns", "exec", netns.name] if netns is not None else []
        proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "tests.redis_hosts", json.dumps(config)],
            cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT), **(env or {})),
            process_group=self.groups.get(host, 0),
        )  # fmt: skip
        self.groups.setdefault(host, proc.pid)
        self.procs.append(proc)
        return proc

    def runs(self) -> list[list[str]]:
        return [line.split() for line in lines(self.dir / "runs")]

    def outs(self, n: int) -> list[dict[str, Any]]:
        wait_until(lambda: len(lines(self.dir / "out")) >= n, f"{n} outcomes", 60)
        return [json.loads(line) for line in lines(self.dir / "out")]

    def open(self, host: str = "") -> None:
        (self.dir / ("gate" if not host else f"gate-{host}")).touch()

    def waiting(self, host: str, n: int) -> Callable[[], bool]:
        """Whether ``n`` callers wait on the host's table for the running call."""

        def check() -> bool:
            with mpflight.Group(self.name, host_id=host, create=False) as g:
                return sum(c.waiters for c in g.inflight()) == n

        return check

    def herd(self, per_host: int, mode: str = "value") -> list[str]:
        """Start ``per_host`` callers of key "k" on each of hosts h0, h1, h2 and wait until the owner
        runs fn and every other caller waits (two hosts in Redis, the rest in their tables); returns
        the owner's line in ``runs`` (host, pid, fence)."""
        for i in range(3 * per_host):
            self.start(f"h{i % 3}", mode=mode)
        wait_until(lambda: len(self.runs()) == 1, "the owner's fn")
        wait_until(lambda: _remote_waiters(self.server, self.name) == 2, "the two other hosts in Redis")
        for h in ("h0", "h1", "h2"):
            wait_until(self.waiting(h, per_host - 1), f"{per_host - 1} local waiter(s) on {h}")
        return self.runs()[0]

    def kill_host(self, host: str) -> None:
        os.killpg(self.groups[host], signal.SIGKILL)

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)  # a stopped process dies only once it runs
                proc.kill()
            proc.wait()
        for host in self.groups:
            mpflight.unlink(f"{self.name}+{host}")


@pytest.fixture
def hosts(server: RedisServer, name: str, tmp_path: Path) -> Iterator[Hosts]:
    h = Hosts(server, name, tmp_path)
    yield h
    h.close()
    _flush(server, name)


def _flush(server: RedisServer | RedisClusterServers, name: str) -> None:
    c = _client(server)
    for key in c.scan_iter(f"mpf:{name}:*"):
        c.delete(key)


@contextlib.contextmanager
def _in_process_hosts(
    server: RedisServer, name: str, hosts: str, url: str | None = None, **options: Any
) -> Iterator[dict[str, mpflight.Group]]:
    """One handle per simulated host (a letter of ``hosts`` each), in this process; all cleaned up."""
    options = {"timeout": DEADLINE, **options}
    groups = {h: mpflight.Group(name, redis=url or server.url, host_id=h, **options) for h in hosts}
    try:
        yield groups
    finally:
        for h, g in groups.items():
            g.close()
            mpflight.unlink(f"{name}+{h}")
        _flush(server, name)


class _Held:
    """A call of ``key`` owned on one host, whose fn waits for ``end``, and joined from another host:
    each caller in a thread of its own; ``end`` returns what each one's do_ex returned."""

    def __init__(self, server: RedisServer, name: str, owner: mpflight.Group, owner_fn: Callable[[], Any],
                 waiter: mpflight.Group, waiter_fn: Callable[[], Any], key: str = "k") -> None:  # fmt: skip
        self.release = threading.Event()
        self.got: dict[str, object] = {}
        self.threads: list[threading.Thread] = []
        self._start("owner", owner, key, lambda: self.release.wait(DEADLINE) and owner_fn())
        wait_until(lambda: len(_leases(server, name)) == 1, "the owner's lease")
        self._start("waiter", waiter, key, waiter_fn)
        wait_until(lambda: _remote_waiters(server, name) == 1, "the waiter's host in Redis")

    def _start(self, who: str, group: mpflight.Group, key: str, fn: Callable[[], Any]) -> None:
        thread = threading.Thread(target=lambda: self.got.update({who: group.do_ex(key, fn)}))
        thread.start()
        self.threads.append(thread)

    def end(self) -> dict[str, object]:
        self.release.set()
        for thread in self.threads:
            thread.join(DEADLINE)
        return self.got


# -- one execution per key, fleet-wide ----------------------------------------------------------------


def test_three_hosts_of_four_processes_share_one_execution(hosts: Hosts, server: RedisServer) -> None:
    owner_host, owner_pid, _ = hosts.herd(4)
    hosts.open()
    outs = hosts.outs(12)
    assert len(hosts.runs()) == 1
    assert {json.dumps(o.get("value"), sort_keys=True) for o in outs} == {
        json.dumps({"key": "k", "host": owner_host, "pid": int(owner_pid)}, sort_keys=True)
    }
    assert all(o["shared"] for o in outs)
    by_host = {o["host"]: o["stats"] for o in outs}
    assert sum(s["remote_owners"] for s in by_host.values()) == 1
    assert sum(s["remote_joins"] for s in by_host.values()) == 2
    assert hosts.runs()[0][2] != "None"  # fn saw its fence number


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisClusterServers]:
    c = RedisClusterServers(3)
    yield c
    _stop(c)


def test_a_cluster_of_three_masters_shares_one_execution(
    cluster: RedisClusterServers, name: str, tmp_path: Path
) -> None:
    hosts = Hosts(cluster, name, tmp_path)
    try:
        owner_host, owner_pid, _ = hosts.herd(4)
        hosts.open()
        outs = hosts.outs(12)
        assert len(hosts.runs()) == 1
        assert {json.dumps(o.get("value"), sort_keys=True) for o in outs} == {
            json.dumps({"key": "k", "host": owner_host, "pid": int(owner_pid)}, sort_keys=True)
        }
        assert all(o["shared"] for o in outs)
    finally:
        hosts.close()
        _flush(cluster, name)


def test_fns_error_reaches_every_caller_on_every_host(hosts: Hosts, server: RedisServer) -> None:
    owner_host, _, _ = hosts.herd(2, mode="raise")
    hosts.open()
    outs = hosts.outs(6)
    assert len(hosts.runs()) == 1
    assert {(o["error"], o["message"]) for o in outs} == {("ValueError", f"boom from {owner_host}")}
    remote = [o for o in outs if o["host"] != owner_host]
    assert remote and all(any(f"host {owner_host}" in n for n in o["notes"]) for o in remote)


@pytest.mark.parametrize("key", ["k", "k" * 10_000], ids=["short", "10 KiB"])
def test_a_dead_owner_process_is_reported_to_other_hosts_before_its_lease_ends(
    hosts: Hosts, server: RedisServer, key: str
) -> None:
    # The lease is long: only the owner's host seeing the death (and publishing an abort) explains a
    # quick AbortError on the other host. (The table keeps only a long key's first bytes.)
    for host in ("a", "a", "b", "b"):
        hosts.start(host, key=key, lease=60.0)
    wait_until(lambda: len(hosts.runs()) == 1, "the owner's fn")
    owner_host, owner_pid = hosts.runs()[0][0], int(hosts.runs()[0][1])
    wait_until(lambda: _remote_waiters(server, hosts.name) == 1, "the other host in Redis")
    for h in ("a", "b"):
        wait_until(hosts.waiting(h, 1), f"a local waiter on {h}")
    began = time.monotonic()
    os.kill(owner_pid, signal.SIGKILL)
    outs = hosts.outs(3)
    assert time.monotonic() - began < 30  # well inside the 60 s lease: a catch for hangs, not a speed target
    assert {o["error"] for o in outs} == {"AbortError"}
    assert any(o["host"] != owner_host for o in outs)


def test_a_dead_owner_host_is_reported_when_its_lease_expires(hosts: Hosts, server: RedisServer) -> None:
    lease = 1.0
    for host in ("a", "a", "b", "b"):
        hosts.start(host, lease=lease)
    wait_until(lambda: len(hosts.runs()) == 1, "the owner's fn")
    owner_host = hosts.runs()[0][0]
    other = "b" if owner_host == "a" else "a"
    wait_until(lambda: _remote_waiters(server, hosts.name) == 1, "the other host in Redis")
    wait_until(hosts.waiting(other, 1), "a local waiter on the other host")
    began = time.monotonic()
    hosts.kill_host(owner_host)
    outs = hosts.outs(2)
    assert time.monotonic() - began < lease + 10
    assert [(o["host"], o["error"]) for o in outs] == [(other, "AbortError")] * 2
    assert any("lease" in o["message"] for o in outs)


@pytest.mark.parametrize("fencing", ["on", "off"])
def test_a_late_owner_never_overwrites_a_newer_call(hosts: Hosts, server: RedisServer, fencing: str) -> None:
    """Owner A pauses past its lease; B's wait aborts; C runs the key again and D waits on C; A wakes
    and publishes: Redis rejects it, and D gets C's value. With fencing off, D gets A's stale value."""
    env = {"MPFLIGHT_TEST_DISABLE": "fencing"} if fencing == "off" else {}
    a = hosts.start("A", lease=1.0, env=env)
    wait_until(lambda: len(hosts.runs()) == 1, "A's fn")
    os.kill(a.pid, signal.SIGSTOP)
    hosts.start("B", lease=1.0)
    (b_out,) = hosts.outs(1)
    assert b_out["error"] == "AbortError" and "lease" in b_out["message"]
    c = hosts.start("C", lease=1.0)
    wait_until(lambda: len(hosts.runs()) == 2, "C's fn")
    hosts.start("D", lease=1.0)
    wait_until(lambda: _remote_waiters(server, hosts.name) == 1, "D in Redis")
    os.kill(a.pid, signal.SIGCONT)
    hosts.open("A")
    wait_until(lambda: len(hosts.outs(2)) >= 2, "A's outcome")
    if fencing == "on":
        a_out = next(o for o in hosts.outs(2) if o["host"] == "A")
        assert a_out["shared"] is False and a_out["stats"]["remote_fenced"] == 1
    hosts.open("C")
    d_out = next(o for o in hosts.outs(4) if o["host"] == "D")
    if fencing == "on":
        assert d_out["value"]["pid"] == c.pid
    else:  # the test can fail: without the token check the late publish lands
        assert d_out["value"]["pid"] == a.pid


# -- wake-ups carried by data ------------------------------------------------------------------------------


def _tier(server: RedisServer, name: str, host: str, **kw: Any) -> RedisTier:
    counts: list[str] = []
    return RedisTier(
        server.url, Options(name, None, 0.2, None, 1 << 20), host=host, namespace="", lease=5.0, renew=5 / 3,
        fail="open", max_remote_bytes=1 << 20, fence_ttl=60.0, secret=kw.get("secret"), timeout=1.0,
        count=counts.append,
    )  # fmt: skip


def test_a_waiter_that_reads_after_the_publish_gets_the_outcome_at_once(
    server: RedisServer, name: str
) -> None:
    owner, waiter = _tier(server, name, "a"), _tier(server, name, "b")
    try:
        o, w = owner.caller(None), waiter.caller(time.monotonic() + DEADLINE)
        assert o.enter("k", 1, True) == OWN
        assert w.enter("k", 2, True) == JOIN
        assert o.finish({"v": 1}, None) is True  # published before the waiter reads
        began = time.monotonic()
        assert w.wait("k").value == {"v": 1}
        assert time.monotonic() - began < 0.5  # not a timed wait for a missed message: a hang catch
        o.close(), w.close()
    finally:
        owner.close(), waiter.close()
        _flush(server, name)


def test_a_forged_outcome_is_refused_when_the_group_has_a_secret(server: RedisServer, name: str) -> None:
    owner = _tier(server, name, "a", secret=b"wrong")
    waiter = _tier(server, name, "b", secret=b"right")
    try:
        o, w = owner.caller(None), waiter.caller(time.monotonic() + DEADLINE)
        assert o.enter("k", 1, True) == OWN and w.enter("k", 2, True) == JOIN
        o.finish({"v": "forged"}, None)
        with pytest.raises(mpflight.CorruptPayload, match="not signed"):
            w.wait("k")
    finally:
        owner.close(), waiter.close()
        _flush(server, name)


# -- every entry point, in one process with two simulated hosts ----------------------------------------------


def test_every_entry_point_works_through_the_tier(server: RedisServer, name: str) -> None:
    async def coroutine() -> str:
        return "async"

    with mpflight.Group(name, redis=server.url, host_id="a") as g:
        decorated = g.coalesce(key=lambda: "decorated")(lambda: "dec")
        assert g.do("k1", lambda: 1) == 1
        assert g.do_ex("k2", lambda: 2) == mpflight.Result(2, False)
        assert g.do_future("k3", lambda: 3).result(DEADLINE) == mpflight.Result(3, False)
        assert asyncio.run(g.do_async("k4", coroutine)) == "async"
        assert asyncio.run(g.do_async("k5", lambda: 5)) == 5
        assert decorated() == "dec"
        assert g.stats()["remote_owners"] == 6
    mpflight.unlink(f"{name}+a")
    _flush(server, name)


def test_waiters_of_every_kind_on_another_host_share_the_outcome(server: RedisServer, name: str) -> None:
    release = threading.Event()
    runs: list[str] = []

    def fn(who: str) -> str:
        runs.append(who)
        release.wait(DEADLINE)
        return f"from {who}"

    async def afn(who: str) -> str:
        return fn(who)

    a = mpflight.Group(name, redis=server.url, host_id="a", timeout=DEADLINE)
    b = mpflight.Group(name, redis=server.url, host_id="b", timeout=DEADLINE)
    try:
        owner = threading.Thread(target=lambda: runs.append(a.do("k", fn, "a")))
        owner.start()
        wait_until(lambda: runs == ["a"], "the owner's fn")
        future = b.do_future("k", fn, "b")
        wait_until(lambda: _remote_waiters(server, name) == 1, "host b in Redis")
        got: list[object] = []
        waiter = threading.Thread(target=lambda: got.append(asyncio.run(b.do_async("k", afn, "b"))))
        waiter.start()
        wait_until(lambda: sum(c.waiters for c in b.inflight()) == 1, "a local waiter on host b")
        release.set()
        owner.join(DEADLINE)
        waiter.join(DEADLINE)
        assert future.result(DEADLINE) == mpflight.Result("from a", True)
        assert got == ["from a"]
        assert runs == ["a", "from a"]
    finally:
        release.set()
        a.close(), b.close()
        mpflight.unlink(f"{name}+a"), mpflight.unlink(f"{name}+b")
        _flush(server, name)


def test_a_reader_that_could_not_start_is_started_by_the_next_wait(
    server: RedisServer, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Host b's first wait in Redis has no thread to read the outcome streams in (none could start):
    that caller gets the error, and the next wait starts the reader and gets the outcome, instead of
    waiting for a reader that never runs."""
    runs: list[str] = []
    release = threading.Event()

    def fn() -> str:
        runs.append("a")
        assert release.wait(DEADLINE)
        return "from a"

    with _in_process_hosts(server, name, "ab") as g:
        try:
            owner = threading.Thread(target=lambda: g["a"].do("k", fn))
            owner.start()
            wait_until(lambda: runs == ["a"], "the owner's fn")
            refuse_thread_start(monkeypatch, "mpflight-read-")
            with pytest.raises(RuntimeError, match="can't start new thread"):
                g["b"].do("k", lambda: "b ran")
            monkeypatch.undo()
            got: list[object] = []
            waiter = threading.Thread(target=lambda: got.append(g["b"].do_ex("k", lambda: "b ran")))
            waiter.start()
            wait_until(  # it registers its wait, then starts the reader
                lambda: any(t.name.startswith(f"mpflight-read-{name}") for t in threading.enumerate()),
                "a reader",
            )
            release.set()
            owner.join(DEADLINE)
            waiter.join(DEADLINE)
            assert got == [mpflight.Result("from a", True)]
            assert runs == ["a"]
        finally:
            release.set()


def test_forget_lets_the_next_caller_on_any_host_start_anew(server: RedisServer, name: str) -> None:
    with _in_process_hosts(server, name, "abc") as g:
        held = _Held(server, name, g["a"], lambda: "old", g["c"], lambda: "c ran")
        g["b"].forget("k")
        assert g["b"].do("k", lambda: "new") == "new"  # not joined to the forgotten call
        # who joined before forget keeps the old call
        assert held.end() == {"owner": mpflight.Result("old", True), "waiter": mpflight.Result("old", True)}


# -- takeover and linger across hosts -----------------------------------------------------------------------


@pytest.mark.parametrize("death", ["process", "host"])
def test_a_dead_owner_is_taken_over_by_one_host_and_the_others_join_it(
    hosts: Hosts, server: RedisServer, death: str
) -> None:
    """on_abort="retry" on three hosts of two processes: the owner process (or its whole host) dies
    inside fn; fn runs once more in the fleet, and every surviving caller gets that run's value."""
    lease = 60.0 if death == "process" else 1.0  # a process's death is told at once; a host's, by its lease
    for i in range(6):
        hosts.start(f"h{i % 3}", lease=lease, on_abort="retry")
    wait_until(lambda: len(hosts.runs()) == 1, "the owner's fn")
    owner_host, owner_pid, _ = hosts.runs()[0]
    wait_until(lambda: _remote_waiters(server, hosts.name) == 2, "the two other hosts in Redis")
    for h in ("h0", "h1", "h2"):
        wait_until(hosts.waiting(h, 1), f"a local waiter on {h}")
    if death == "process":
        os.kill(int(owner_pid), signal.SIGKILL)
    else:
        hosts.kill_host(owner_host)
    wait_until(lambda: len(hosts.runs()) == 2, "one host to run fn again")
    new_host, new_pid, _ = hosts.runs()[1]
    others = 2 if death == "process" else 1
    wait_until(lambda: _remote_waiters(server, hosts.name) == others, "the other hosts to join the new call")
    hosts.open()
    survivors = 5 if death == "process" else 4
    outs = hosts.outs(survivors)
    assert len(hosts.runs()) == 2
    assert [o.get("value") for o in outs] == [{"key": "k", "host": new_host, "pid": int(new_pid)}] * survivors
    if death == "host":
        assert new_host != owner_host


def test_without_takeover_the_other_hosts_get_the_abort(hosts: Hosts, server: RedisServer) -> None:
    """The same with on_abort="raise": nobody runs fn again (shows the test above can fail)."""
    for i in range(4):
        hosts.start(f"h{i % 2}", lease=60.0)
    wait_until(lambda: len(hosts.runs()) == 1, "the owner's fn")
    wait_until(lambda: _remote_waiters(server, hosts.name) == 1, "the other host in Redis")
    os.kill(int(hosts.runs()[0][1]), signal.SIGKILL)
    outs = hosts.outs(3)
    hosts.open()
    assert {o["error"] for o in outs} == {"AbortError"}
    assert len(hosts.runs()) == 1


def test_an_outcome_lingers_for_callers_on_other_hosts(server: RedisServer, name: str) -> None:
    """linger=: a caller on another host that comes after the publish gets the outcome; errors do not
    linger unless asked; forget ends a linger; without linger the other host runs fn."""
    with _in_process_hosts(server, name, "abcd", linger=30) as g:
        assert g["a"].do_ex("k", lambda: "from a") == mpflight.Result("from a", False)
        assert g["b"].do_ex("k", lambda: "b ran") == mpflight.Result("from a", True)
        assert g["c"].with_options(linger=0).do("k", lambda: "c ran") == "from a"  # a's linger, a's clock
        g["d"].forget("k")
        assert g["d"].do("k", lambda: "d ran") == "d ran"
        with pytest.raises(ValueError, match="a's error"):
            g["a"].do("e", _raise, ValueError("a's error"))
        assert g["b"].do("e", lambda: "b ran") == "b ran"  # an error does not linger
        with pytest.raises(ValueError, match="a's error"):
            g["a"].with_options(linger_errors=True).do("f", _raise, ValueError("a's error"))
        with pytest.raises(ValueError, match="a's error"):
            g["b"].do("f", lambda: "b ran")
    with _in_process_hosts(server, name, "ab") as g:  # no linger
        assert g["a"].do("k", lambda: "from a") == "from a"
        assert g["b"].do("k", lambda: "b ran") == "b ran"


def _raise(e: Exception) -> None:
    raise e


# -- Redis trouble, large outcomes, bad data ------------------------------------------------------------------


@pytest.mark.parametrize("trouble", ["paused", "killed"])
def test_callers_fall_back_to_their_host_when_redis_is_gone(
    own_server: RedisServer, name: str, trouble: str, caplog: pytest.LogCaptureFixture
) -> None:
    with _in_process_hosts(own_server, name, "ab", timeout=20, redis_timeout=0.5) as g:
        held = _Held(own_server, name, g["a"], lambda: "a", g["b"], lambda: "b ran itself")
        try:
            with caplog.at_level(logging.WARNING, logger="mpflight"):
                own_server.pause() if trouble == "paused" else own_server.kill()
                held.threads[1].join(DEADLINE)  # the waiter's read fails: it runs fn for its host
                assert held.got == {"waiter": mpflight.Result("b ran itself", False)}
                assert g["b"].do("k2", lambda: "alone") == "alone"  # a new call: coalesced on the host alone
                assert held.end()["owner"] == mpflight.Result("a", False)
            assert g["b"].stats()["remote_fallbacks"] >= 2
            episodes = [r for r in caplog.records if "Redis unavailable" in r.getMessage()]
            assert 1 <= len(episodes) <= 2  # once per episode and handle, not once per step
        finally:
            if trouble == "paused":
                own_server.resume()
            else:
                own_server.start()  # for the cleanup


def test_fail_closed_raises_when_redis_is_gone(own_server: RedisServer, name: str) -> None:
    with mpflight.Group(name, redis=own_server.url, fail="closed", redis_timeout=0.5) as g:
        own_server.kill()
        with pytest.raises(mpflight.TierUnavailable, match="unavailable"):
            g.do("k", lambda: 1)


def test_an_outcome_larger_than_max_remote_bytes_is_not_shared(server: RedisServer, name: str) -> None:
    big = b"x" * (20 * 1024 * 1024)
    runs: list[str] = []

    def fn(who: str) -> bytes:
        runs.append(who)
        return big

    with _in_process_hosts(server, name, "ab") as g:
        held = _Held(server, name, g["a"], lambda: fn("a"), g["b"], lambda: fn("b"))
        got = held.end()
        assert got == {"owner": mpflight.Result(big, False), "waiter": mpflight.Result(big, False)}
        assert runs == ["a", "b"]  # host b ran fn itself, never truncated
        assert g["a"].stats()["remote_not_shared"] == 1


def test_garbage_in_a_calls_keys_gives_a_fallback_not_a_crash(
    server: RedisServer, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    with mpflight.Group(name, redis=server.url, host_id="a") as g:
        prefix, _ = g._next.keys_of("k")  # type: ignore[union-attr]
        c = _client(server)
        c.hset(prefix + "lease", mapping={"t": "not a token", "f": "x", "h": "?", "p": "-", "k": b"\0k"})
        c.pexpire(prefix + "lease", 60_000)
        with caplog.at_level(logging.WARNING, logger="mpflight"):
            assert g.do("k", lambda: "ran") == "ran"
        assert g.stats()["remote_fallbacks"] == 1
        assert any("ENTER replied" in r.getMessage() for r in caplog.records)
    mpflight.unlink(f"{name}+a")
    _flush(server, name)


def test_every_key_the_tier_writes_expires(server: RedisServer, name: str) -> None:
    owner, waiter = _tier(server, name, "a"), _tier(server, name, "b")
    try:
        o, w = owner.caller(None), waiter.caller(time.monotonic() + DEADLINE)
        assert o.enter("k", 1, True) == OWN and w.enter("k", 2, True) == JOIN
        o.finish("v", None)
        c = _client(server)
        keys = list(c.scan_iter(f"mpf:{name}:*"))
        assert keys and all(c.pttl(k) > 0 for k in keys)  # the fence counter and the outcome's stream
        assert not any(k.endswith(b":lease") for k in keys)  # a finished call is not joined
    finally:
        owner.close(), waiter.close()
        _flush(server, name)


# -- options and processes -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"redis": 123}, TypeError),
        ({"redis": "http://localhost"}, ValueError),
        ({"redis": "redis://x", "fail": "sometimes"}, ValueError),
        ({"redis": "redis://x", "lease": 0}, ValueError),
        ({"redis": "redis://x", "max_remote_bytes": -1}, ValueError),
        ({"redis": "redis://x", "namespace": "{a}"}, ValueError),
        ({"redis": "redis://x", "secret": 5}, TypeError),
        ({"host_id": "a b"}, ValueError),
        ({"host_id": "x" * 80}, ValueError),
    ],
)
def test_bad_options_are_refused_with_a_clear_error(name: str, options: dict[str, Any], error: type) -> None:
    with pytest.raises(error):
        mpflight.Group(name, **options)
    assert mpflight.tables() == [] or all(not t.startswith(name) for t in mpflight.tables())


def test_mpflight_host_id_names_the_hosts_table(name: str) -> None:
    code = f"import mpflight; g = mpflight.Group({name!r}); g.do('k', lambda: 1); print(g.host_id); g.close()"
    out = subprocess.run(
        [sys.executable, "-c", code], env=dict(os.environ, MPFLIGHT_HOST_ID="h7", PYTHONPATH=str(ROOT)),
        capture_output=True, text=True, timeout=DEADLINE, check=True,
    ).stdout  # fmt: skip
    assert out.strip() == "h7"
    assert f"{name}+h7" in mpflight.tables()
    assert mpflight.unlink(f"{name}+h7")


def test_a_client_made_before_fork_is_refused_in_the_child(server: RedisServer, name: str) -> None:
    client = redis.Redis.from_url(server.url, socket_timeout=5)
    with mpflight.Group(name, redis=client) as g:
        assert g.do("k", lambda: 1) == 1
        pid = os.fork()
        if pid == 0:
            try:
                g.do("k2", lambda: 2)
                code = 1
            except mpflight.MPFlightError as e:
                code = 0 if "fork" in str(e) else 2
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    client.close()
    _flush(server, name)


def test_without_redis_the_tier_is_not_imported(name: str) -> None:
    code = f"import sys, mpflight; mpflight.Group({name!r}).do('k', lambda: 1); print('redis' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(ROOT)),
        capture_output=True, text=True, timeout=DEADLINE, check=True,
    ).stdout  # fmt: skip
    assert out.strip() == "False"


# -- TLS and ACLs -----------------------------------------------------------------------------------------


@pytest.fixture
def tls_server(tmp_path: Path, name: str) -> Iterator[tuple[RedisServer, int, str]]:
    """A server with a TLS port (a self-signed certificate) and an ACL user limited to the group's keys."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=DEADLINE,
    )  # fmt: skip
    from tests.redis_server import free_port

    tls_port = free_port()
    s = RedisServer(
        "--tls-port", str(tls_port), "--tls-cert-file", str(cert), "--tls-key-file", str(key),
        "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no",
        "--user", "app", "on", ">secret-pw", f"~mpf:{name}:*", "&*", "+@all", "-@dangerous",
        "--user", "stranger", "on", ">other-pw", "~elsewhere:*", "&*", "+@all", "-@dangerous",
    )  # fmt: skip
    yield s, tls_port, str(cert)
    _stop(s)


def test_rediss_with_an_acl_user_limited_to_the_prefix_works(
    tls_server: tuple[RedisServer, int, str], name: str
) -> None:
    server, port, ca = tls_server
    url = f"rediss://app:secret-pw@127.0.0.1:{port}/0?ssl_ca_certs={ca}"
    with _in_process_hosts(server, name, "ab", url=url, fail="closed") as g:
        held = _Held(server, name, g["a"], lambda: "a", g["b"], lambda: "b ran")
        assert held.end() == {"owner": mpflight.Result("a", True), "waiter": mpflight.Result("a", True)}


def test_closing_a_group_closes_its_connections_to_redis(
    tls_server: tuple[RedisServer, int, str], name: str
) -> None:
    """Every connection the handle opened (plain or TLS, the pool's and the reader's) is closed by
    close(), not left for the garbage collector."""
    plain, port, ca = tls_server
    for url, at in (
        (plain.url, plain.port),
        (f"rediss://app:secret-pw@127.0.0.1:{port}/0?ssl_ca_certs={ca}", port),
    ):
        with mpflight.Group(name, redis=url, fail="closed") as g:
            assert g.do("k", lambda: 1) == 1
            assert _connections_to(at) > 0
        assert _connections_to(at) == 0, f"close() left connections to {url.split('@')[-1]}"


def _connections_to(port: int) -> int:
    return sum(
        1 for c in psutil.Process().net_connections("tcp")
        if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED
    )  # fmt: skip


@pytest.mark.parametrize("fail", ["open", "closed"])
def test_a_user_without_rights_gets_a_clear_error(
    tls_server: tuple[RedisServer, int, str], name: str, fail: str
) -> None:
    _, port, ca = tls_server
    for user, password, why in (
        ("stranger", "other-pw", "NoPermissionError"),
        ("app", "wrong", "Authentication"),
    ):
        url = f"rediss://{user}:{password}@127.0.0.1:{port}/0?ssl_ca_certs={ca}"
        with mpflight.Group(name, redis=url, fail=fail) as g:
            with pytest.raises(mpflight.TierUnavailable, match=why):
                g.do("k", lambda: 1)
            assert g.inflight() == []  # nothing of the call stays in the table


# -- failover ------------------------------------------------------------------------------------------------


def test_a_failover_mid_flight_gives_no_wrong_value_and_no_hang(name: str) -> None:
    """Callers of two keys on two hosts; the primary hands over to its replica (FAILOVER) while the
    owners run. Whatever each caller gets (the value, a fallback run of its own, an AbortError), it is
    its own key's, and it comes within its timeout."""
    primary = RedisServer("--repl-diskless-sync-delay", "0")
    replica = RedisServer("--replicaof", "127.0.0.1", str(primary.port))
    timeout = 10.0
    release = threading.Event()
    groups = {h: mpflight.Group(name, redis=primary.url, host_id=h, timeout=timeout, redis_timeout=0.5)
              for h in ("a", "b")}  # fmt: skip
    got: list[tuple[str, str, object, float]] = []

    def call(host: str, key: str) -> None:
        began = time.monotonic()
        try:
            value: object = groups[host].do(key, lambda: release.wait(DEADLINE) and f"{key}:{host}")
        except (mpflight.AbortError, TimeoutError) as e:
            value = e
        got.append((host, key, value, time.monotonic() - began))

    try:
        wait_until(lambda: b"master_link_status:up" in _info(replica), "the replica in sync")
        threads = [threading.Thread(target=call, args=(h, k)) for k in ("k1", "k2") for h in ("a", "b")]
        for t in threads:
            t.start()
        wait_until(
            lambda: _remote_waiters(primary, name) == -1 and len(_leases(primary, name)) == 2, "both leases"
        )
        assert primary.command("FAILOVER") == b"+OK"
        wait_until(lambda: b"role:slave" in _info(primary), "the primary to hand over")
        release.set()
        for t in threads:
            t.join(timeout + DEADLINE)
        assert len(got) == 4
        for host, key, value, took in got:
            assert isinstance(value, Exception) or value in (f"{key}:a", f"{key}:b"), (host, key, value)
            assert took < timeout + 5, (host, key, took)
    finally:
        release.set()
        for h, g in groups.items():
            g.close()
            mpflight.unlink(f"{name}+{h}")
        _stop(replica)
        _stop(primary)


def _info(server: RedisServer) -> bytes:
    with socket.create_connection(("127.0.0.1", server.port), timeout=2) as s:
        s.sendall(b"INFO replication\r\n")
        return s.recv(65536)


# -- a host cut off from Redis -----------------------------------------------------------------------------


def test_a_host_cut_off_from_redis_loses_its_lease_and_the_others_are_told(name: str, tmp_path: Path) -> None:
    """The owner's host runs in a network namespace; its link to Redis goes down while fn runs: its
    lease expires, the other host's callers get AbortError within the lease plus a margin, and the
    cut-off owner still returns its own value within its timeout."""
    netns = Netns()
    server = RedisServer("--bind", "127.0.0.1", netns.outside, "--protected-mode", "no")
    hosts = Hosts(server, name, tmp_path)
    lease = 1.0
    try:
        hosts.start("cut", netns=netns, lease=lease, timeout=20, redis_timeout=0.5)
        wait_until(lambda: len(hosts.runs()) == 1, "the cut-off host's fn")
        hosts.start("other", lease=lease)
        hosts.start("other", lease=lease)
        wait_until(lambda: _remote_waiters(server, name) == 1, "the other host in Redis")
        wait_until(hosts.waiting("other", 1), "a local waiter on the other host")
        began = time.monotonic()
        netns.cut()
        outs = hosts.outs(2)
        assert time.monotonic() - began < lease + 10
        assert [(o["host"], o["error"]) for o in outs] == [("other", "AbortError")] * 2
        hosts.open()
        cut = next(o for o in hosts.outs(3) if o["host"] == "cut")
        assert cut["value"]["host"] == "cut" and cut["stats"]["remote_fallbacks"] >= 1
    finally:
        hosts.close()
        _stop(server)
        netns.delete()


# -- chaos -------------------------------------------------------------------------------------------------------


def test_chaos_kills_on_three_hosts_and_a_redis_restart_give_no_wrong_value(
    own_server: RedisServer, name: str, tmp_path: Path
) -> None:
    """Three hosts of three workers call 20 keys while random workers are SIGKILLed (and replaced) and
    Redis is killed and started again once: every outcome a caller gets is its own key's, made by an
    execution of that key; every worker ends; every key the tier leaves in Redis expires."""
    seed = int(os.environ.get("MPFLIGHT_CHAOS_SEED", "7"))
    rng = random.Random(seed)
    (tmp_path / "runs").touch()
    (tmp_path / "out").touch()
    procs: dict[int, tuple[str, subprocess.Popen[bytes]]] = {}
    serial = 0

    def start(host: str) -> None:
        nonlocal serial
        serial += 1
        config = {"url": own_server.url, "name": name, "host": host, "dir": str(tmp_path), "keys": 20,
                  "seed": seed * 1000 + serial}  # fmt: skip
        proc = subprocess.Popen([sys.executable, "-m", "tests.redis_chaos", json.dumps(config)], cwd=ROOT,
                                env=dict(os.environ, PYTHONPATH=str(ROOT)))  # fmt: skip
        procs[proc.pid] = (host, proc)

    def calls() -> int:
        return len(lines(tmp_path / "out"))

    def more_calls(n: int, what: str) -> None:
        before = calls()
        wait_until(lambda: calls() > before + n, what, 60)

    try:
        for i in range(9):
            start(f"h{i % 3}")
        more_calls(200, "calls before the chaos")
        kills = 0
        for step in range(40):
            if step == 20:
                own_server.kill()
                more_calls(20, "calls while Redis is gone")
                own_server.start()
            pid = rng.choice(list(procs))
            host, proc = procs.pop(pid)
            proc.kill()
            proc.wait()
            kills += 1
            start(host)
            more_calls(5, "calls after a kill")
        (tmp_path / "stop").touch()
        for _, proc in procs.values():
            assert proc.wait(DEADLINE) == 0  # no worker hangs
        made = {tuple(line.split()) for line in (tmp_path / "runs").read_text().splitlines()}
        outcomes = [line.split() for line in (tmp_path / "out").read_text().splitlines()]
        values = [(k, v) for k, v in outcomes if not v.startswith("!")]
        assert len(outcomes) > 200 + 20 + 40 * 5 and values and kills == 40  # what the waits ensured
        for key, value in values:
            k, _, token = value.partition(":")
            assert k == key and (key, token) in made, (key, value)  # its own key's, from a real run
        wait_until(lambda: not _leases(own_server, name), "the leases to expire", 10)
        c = _client(own_server)
        assert all(c.pttl(k) > 0 for k in c.scan_iter(f"mpf:{name}:*"))  # the rest expires too
    finally:
        for _, proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for h in ("h0", "h1", "h2"):
            mpflight.unlink(f"{name}+{h}")


# -- many keys, one connection -----------------------------------------------------------------------------------


@pytest.mark.timeout(900)  # the recorded run of 10,000 keys takes minutes; a hang catch
def test_many_keys_in_flight_share_one_blocking_read(server: RedisServer, name: str) -> None:
    """A process waiting on many keys of other hosts holds a bounded number of connections (its waits
    share one blocking read), and each wait gets its own key's value. MPFLIGHT_MANY_KEYS=10000 is the
    recorded run; the test command's is smaller."""
    n = int(os.environ.get("MPFLIGHT_MANY_KEYS", "300"))
    owner, waiter = _tier(server, name, "a"), _tier(server, name, "b")
    clients = _client(server)
    got: list[object] = [None] * n
    threads: list[threading.Thread] = []
    previous = threading.stack_size(256 * 1024)  # many threads, each only waiting
    try:
        owners = [owner.caller(None) for _ in range(n)]
        assert all(o.enter(f"k{i}", i, True) == OWN for i, o in enumerate(owners))
        before = len(clients.client_list())
        deadline = time.monotonic() + 120
        entries = [waiter.caller(deadline) for _ in range(n)]
        assert all(w.enter(f"k{i}", i, True) == JOIN for i, w in enumerate(entries))

        def wait(i: int) -> None:
            got[i] = entries[i].wait(f"k{i}").value

        threads = [threading.Thread(target=wait, args=(i,), daemon=True) for i in range(n)]
        for t in threads:
            t.start()
        reader = waiter.reader
        assert reader is not None
        wait_until(lambda: len(reader.waits) == n, f"{n} waits registered", 120)
        during = len(clients.client_list())
        for i, o in enumerate(owners):
            o.finish(f"v{i}", None)
        for t in threads:
            t.join(120)
        assert got == [f"v{i}" for i in range(n)]
        # The reader's connection, and the pool's for short commands that overlap (pokes, the last
        # entering): a handful, not one per key.
        assert during - before <= 8 < n, (before, during)
    finally:
        threading.stack_size(previous)
        owner.close(), waiter.close()
        _flush(server, name)


@dataclasses.dataclass(frozen=True)
class Point:
    x: int
    y: int


def test_values_cross_hosts_type_faithful_through_the_groups_codec(server: RedisServer, name: str) -> None:
    codec = mpflight.Codec()
    codec.register(Point, 1, lambda p: [p.x, p.y], lambda v: Point(*v))
    value = {"p": Point(1, 2), "when": datetime.date(2026, 12, 2), "t": (1, 2), "s": {3}}
    with _in_process_hosts(server, name, "ab", codec=codec) as g:
        got = _Held(server, name, g["a"], lambda: value, g["b"], lambda: "b ran").end()["waiter"]
        assert got == mpflight.Result(value, True)
        assert type(got.value["p"]) is Point  # type: ignore[attr-defined]


def test_an_eviction_policy_that_can_drop_leases_is_warned_about_once(
    name: str, caplog: pytest.LogCaptureFixture
) -> None:
    s = RedisServer("--maxmemory-policy", "allkeys-lru")
    try:
        with caplog.at_level(logging.WARNING, logger="mpflight"), mpflight.Group(name, redis=s.url) as g:
            assert [g.do(f"k{i}", lambda: 1) for i in range(3)] == [1, 1, 1]
        assert sum("allkeys-lru" in r.getMessage() for r in caplog.records) == 1
    finally:
        _flush(s, name)
        _stop(s)


def test_inspect_shows_each_calls_part_in_the_tier(server: RedisServer, name: str) -> None:
    from mpflight import _cli

    with _in_process_hosts(server, name, "ab") as g:
        held = _Held(server, name, g["a"], lambda: "a", g["b"], lambda: "b ran")
        seen = {}
        for host in ("a", "b"):
            out = io.StringIO()
            args = _cli.parser().parse_args(["inspect", f"{name}+{host}", "--json"])
            assert _cli.COMMANDS["inspect"](args, out) == 0
            (call,) = json.loads(out.getvalue())
            seen[host] = (call["tier"]["role"], call["tier"]["owner_host"])
        assert seen == {"a": ("owner", "a"), "b": ("waiter", "a")}
        text = io.StringIO()
        _cli.COMMANDS["inspect"](_cli.parser().parse_args(["inspect", f"{name}+b"]), text)
        assert "waits on a" in text.getvalue()
        held.end()


def test_nothing_starts_before_the_first_call(server: RedisServer, name: str) -> None:
    """gunicorn --preload forks after import: Group(redis=...) opens no connection and starts no thread."""
    before = {t.name for t in threading.enumerate()}
    clients = len(_client(server).client_list())
    with mpflight.Group(name, redis=server.url, host_id="a") as g:
        assert {t.name for t in threading.enumerate()} == before
        assert len(_client(server).client_list()) == clients
        release = threading.Event()
        owner = threading.Thread(target=lambda: g.do("k", lambda: release.wait(DEADLINE)))
        owner.start()
        wait_until(
            lambda: any(t.name.startswith("mpflight-renew") for t in threading.enumerate()), "the renewer"
        )
        release.set()
        owner.join(DEADLINE)
    mpflight.unlink(f"{name}+a")
    _flush(server, name)


# -- what the owner's fn sees, and relays whose caller leaves ---------------------------------------------------


def test_fn_sees_its_fence_number_in_every_way_of_calling_and_nothing_after(
    server: RedisServer, name: str
) -> None:
    async def coroutine() -> int | None:
        return mpflight.fence()

    with _in_process_hosts(server, name, "a") as g:
        group = g["a"]
        fences = [
            group.do("k1", mpflight.fence),
            group.do_future("k2", mpflight.fence).result(DEADLINE).value,
            asyncio.run(group.do_async("k3", coroutine)),
            asyncio.run(group.do_async("k4", mpflight.fence)),
        ]
        assert all(type(f) is int and f >= 1 for f in fences), fences
        assert mpflight.fence() is None  # only while fn runs
        with concurrent.futures.ThreadPoolExecutor(1) as pool:  # nor in a thread fn ran in before
            assert asyncio.run(group.do_async("k5", mpflight.fence)) is not None
            assert pool.submit(mpflight.fence).result(DEADLINE) is None


@pytest.mark.parametrize("leaves", ["timeout", "cancelled"])
def test_a_relay_whose_caller_leaves_still_serves_its_hosts_other_waiters(
    server: RedisServer, name: str, leaves: str
) -> None:
    """Host b's first caller waits in Redis for host a and relays to b's table; it leaves (its own
    timeout, or its do_async task is cancelled); b's other waiter still gets a's value."""
    with _in_process_hosts(server, name, "ab") as g:
        quick = mpflight.Group(name, redis=server.url, host_id="b", timeout=1.0)
        release = threading.Event()
        got: dict[str, object] = {}
        loop = asyncio.new_event_loop()
        try:
            owner = threading.Thread(
                target=lambda: got.update(a=g["a"].do("k", lambda: release.wait(DEADLINE) and "a"))
            )
            owner.start()
            wait_until(lambda: len(_leases(server, name)) == 1, "the owner's lease")
            if leaves == "timeout":
                relay = threading.Thread(
                    target=lambda: _catch(got, "relay", lambda: quick.do("k", lambda: "ran"))
                )
                relay.start()
            else:
                task = loop.create_task(g["b"].do_async("k", lambda: "ran"))
                relay = threading.Thread(
                    target=lambda: _catch(got, "relay", lambda: loop.run_until_complete(task))
                )
                relay.start()
            wait_until(  # it registers its wait, then starts the reader
                lambda: any(t.name.startswith(f"mpflight-read-{name}") for t in threading.enumerate()),
                "a reader",
            )
            other = threading.Thread(target=lambda: got.update(other=g["b"].do("k", lambda: "ran")))
            other.start()
            wait_until(lambda: sum(c.waiters for c in g["b"].inflight()) == 1, "b's other waiter")
            if leaves == "cancelled":
                loop.call_soon_threadsafe(task.cancel)
            relay.join(DEADLINE)
            assert got["relay"] in ("WaitTimeout", "CancelledError")
            release.set()
            owner.join(DEADLINE), other.join(DEADLINE)
            assert got["other"] == "a"  # the relay went on for it
        finally:
            release.set()
            quick.close()
            loop.close()


def _catch(into: dict[str, object], name: str, call: Callable[[], object]) -> None:
    try:
        into[name] = call()
    except BaseException as e:  # the test looks at which
        into[name] = type(e).__name__
