"""A real redis-server for the tests: started on a free loopback port with persistence off, stopped by
pid. When it cannot start (no redis-server), the tests that need it fail: they never skip."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import pytest

STARTUP = 15.0  # seconds a server may take to answer PING: catches a server that never comes up


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """One redis-server process, which a test may stop, continue, kill and start again."""

    def __init__(self, *extra: str) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed (.ci/run installs it): the Redis tests cannot run")
        self.binary = binary
        self.extra = extra
        self.dir = tempfile.mkdtemp(prefix="mpflight-redis-")
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", self.dir, *self.extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        end = time.monotonic() + STARTUP
        while True:
            try:
                if self.command("PING") == b"+PONG":
                    return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > end:
                self.stop()
                pytest.fail(f"redis-server did not start on port {self.port}")
            time.sleep(0.02)

    def command(self, *args: str) -> bytes:
        """One inline command over a plain socket (no client library): its first reply line."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
            s.sendall((" ".join(args) + "\r\n").encode())
            return s.recv(65536).split(b"\r\n")[0]

    def pause(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def kill(self) -> None:
        if self.proc is not None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)


def _free_cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free too."""
    for _ in range(100):
        port = free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    pytest.fail("no free port pair for a cluster node")


class RedisClusterServers:
    """A Redis Cluster of ``masters`` nodes on loopback, no replicas, persistence off."""

    def __init__(self, masters: int = 3) -> None:
        self.nodes: list[RedisServer] = []
        try:
            for _ in range(masters):
                node = RedisServer.__new__(RedisServer)
                node.binary = shutil.which("redis-server") or pytest.fail("redis-server is not installed")
                node.dir = tempfile.mkdtemp(prefix="mpflight-cluster-")
                node.port = _free_cluster_port()
                node.extra = ("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                              "--cluster-node-timeout", "2000")  # fmt: skip
                node.proc = None
                node.start()
                self.nodes.append(node)
            cli = shutil.which("redis-cli") or pytest.fail("redis-cli is not installed")
            subprocess.run(
                [cli, "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in self.nodes), "--cluster-replicas", "0",
                 "--cluster-yes"],
                check=True, capture_output=True, timeout=60,
            )  # fmt: skip
            end = time.monotonic() + STARTUP
            while not all(b"cluster_state:ok" in self._info(n) for n in self.nodes):
                if time.monotonic() > end:
                    pytest.fail("the cluster did not become ready")
                time.sleep(0.05)
        except BaseException:
            self.stop()
            raise

    @staticmethod
    def _info(node: RedisServer) -> bytes:
        with socket.create_connection(("127.0.0.1", node.port), timeout=2) as s:
            s.sendall(b"CLUSTER INFO\r\n")
            return s.recv(65536)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
