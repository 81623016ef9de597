"""Request collapsing: mpflight.wsgi.collapse and mpflight.asgi.collapse under real gunicorn (sync,
gthread) and uvicorn, driven by a real HTTP client; and the rules of what is shared, in-process.

The served app (tests/collapse_app.py) answers once inflight() shows the waiters a test expects, so
"concurrent" is a state the table was seen in, never the hope of a sleep.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
import wsgiref.util
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

import mpflight
import mpflight._collapse
import mpflight.asgi
import mpflight.wsgi
from tests.helpers import DEADLINE, ROOT, lines, stop_server, wait_until

REQUEST_DEADLINE = 60.0

pytestmark = pytest.mark.timeout(120)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Served:
    """tests/collapse_app.py in a real server process, on a loopback port."""

    def __init__(self, kind: str, name: str, tmp: Path, **env: str) -> None:
        self.port = _free_port()
        self.log = tmp / "executions.log"
        self.gate = tmp / "gate"
        self.gate.mkdir(parents=True)
        bind = f"127.0.0.1:{self.port}"
        argv = {
            "sync": ["-m", "gunicorn", "-b", bind, "-w", "4", "tests.collapse_app:wsgi"],
            "gthread": ["-m", "gunicorn", "-b", bind, "-w", "2", "--threads", "6", "-k", "gthread",
                        "tests.collapse_app:wsgi"],
            "uvicorn": ["-m", "uvicorn", "--port", str(self.port), "--workers", "2", "tests.collapse_app:asgi"],
            "uvicorn1": ["-m", "uvicorn", "--port", str(self.port), "tests.collapse_app:asgi"],
        }[kind]  # fmt: skip
        full = dict(
            os.environ, PYTHONPATH=str(ROOT), COLLAPSE_GROUP=name, COLLAPSE_LOG=str(self.log),
            COLLAPSE_GATE=str(self.gate), **env,
        )  # fmt: skip
        self.output = (tmp / "server.out").open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, *argv], env=full, stdout=self.output, stderr=subprocess.STDOUT, cwd=ROOT,
            start_new_session=True,
        )  # fmt: skip
        try:
            wait_until(self._answers, "the server to answer")
        except BaseException:
            self.stop()
            raise

    def _answers(self) -> bool:
        assert self.proc.poll() is None, f"the server exited: {Path(self.output.name).read_text()}"
        try:
            return self.get("/")[0] == 200
        except OSError:
            return False

    def get(self, target: str, **headers: str) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=REQUEST_DEADLINE)
        try:
            conn.request("GET", target, headers={k.replace("_", "-"): v for k, v in headers.items()})
            r = conn.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
        finally:
            conn.close()

    def burst(self, requests: list[tuple[str, dict[str, str]]]) -> list[Any]:
        """Send the requests at once; each answer, or the exception its request met."""

        def one(request: tuple[str, dict[str, str]]) -> Any:
            try:
                return self.get(request[0], **request[1])
            except (OSError, http.client.HTTPException) as e:
                return e

        with ThreadPoolExecutor(len(requests)) as pool:
            return list(pool.map(one, requests))

    def runs(self, ident: str) -> int:
        return sum(1 for line in lines(self.log) if line.split()[:2] == ["run", ident])

    def events(self) -> list[str]:
        return lines(self.log)

    def stop(self) -> None:
        stop_server(self.proc)
        self.output.close()


@pytest.fixture
def serve(name: str, tmp_path: Path) -> Iterator[Callable[..., Served]]:
    servers: list[Served] = []

    def start(kind: str, **env: str) -> Served:
        server = Served(kind, name, tmp_path / f"s{len(servers)}", **env)
        servers.append(server)
        return server

    try:
        yield start
    finally:
        for server in servers:
            server.stop()


# -- one execution for concurrent identical requests ------------------------------------------------------


@pytest.mark.parametrize(("kind", "clients"), [("sync", 4), ("gthread", 6), ("uvicorn", 6)])
def test_identical_requests_run_the_app_once_and_every_client_gets_the_same_bytes(
    serve: Callable[..., Served], kind: str, clients: int
) -> None:
    """gunicorn sync x4 (one request per worker at a time: clients = workers), gthread 2x6 (either worker can take every client) and uvicorn
    x2: the app answers once the call has every other client waiting, and runs once."""
    server = serve(kind)
    answers = server.burst([(f"/page?id=a&wait={clients - 1}", {})] * clients)
    assert [a[0] for a in answers] == [200] * clients, answers
    assert len({a[2] for a in answers}) == 1, "every client gets the owner's bytes"
    assert json.loads(answers[0][2])["run"] == 1
    assert server.runs("a") == 1


def test_sync_workers_with_linger_share_with_requests_that_come_just_after(
    serve: Callable[..., Served],
) -> None:
    """More requests than sync workers: those a worker takes after the response was made get it from
    the linger, and the app still runs once."""
    server = serve("sync", COLLAPSE_LINGER="30")
    answers = server.burst([("/page?id=l&wait=3", {})] * 8)
    assert [a[0] for a in answers] == [200] * 8
    assert len({a[2] for a in answers}) == 1
    assert server.runs("l") == 1


# -- what is never shared ---------------------------------------------------------------------------------


@pytest.mark.parametrize("header", ["Cookie", "Authorization"])
def test_requests_of_two_users_never_share(serve: Callable[..., Served], header: str) -> None:
    """Different Cookie (or Authorization) values: two calls in flight at once, two executions. Were
    they one call, the app would wait for a second call that never comes and the runs would be 1."""
    server = serve("sync")
    answers = server.burst(
        [("/page?id=u&calls=2", {header: "alice"}), ("/page?id=u&calls=2", {header: "bob"})]
    )
    assert [a[0] for a in answers] == [200, 200]
    assert server.runs("u") == 2
    assert answers[0][2] != answers[1][2]


def test_a_response_with_set_cookie_goes_to_its_own_client_only(serve: Callable[..., Served]) -> None:
    """The owner's response sets a cookie: each waiter runs the app itself and gets its own cookie."""
    server = serve("sync")
    answers = server.burst([("/page?id=c&wait=3&set_cookie=1", {})] * 4)
    assert [a[0] for a in answers] == [200] * 4
    assert server.runs("c") == 4
    assert len({a[1]["set-cookie"] for a in answers}) == 4


def test_a_waiter_that_differs_in_a_header_the_response_varies_on_runs_the_app(
    serve: Callable[..., Served], name: str
) -> None:
    """The response says ``Vary: Accept-Language``: the waiter with the owner's language gets the owner's
    response; the one with another language runs the app itself."""
    server = serve("sync")
    results: dict[str, Any] = {}

    def get(tag: str, lang: str) -> None:
        results[tag] = server.get("/page?id=v&wait=2&vary=1", Accept_Language=lang)

    owner = threading.Thread(target=get, args=("owner", "en"))
    owner.start()
    with mpflight.Group(name) as group:
        wait_until(lambda: len(group.inflight()) == 1, "the owner's call")
    waiters = [threading.Thread(target=get, args=(tag, lang)) for tag, lang in (("en", "en"), ("fr", "fr"))]
    for t in (*waiters,):
        t.start()
    for t in (owner, *waiters):
        t.join(REQUEST_DEADLINE)
    assert results["owner"][2] == results["en"][2]
    assert json.loads(results["fr"][2])["lang"] == "fr"
    assert server.runs("v") == 2


# -- a dead owner -----------------------------------------------------------------------------------------


def test_waiters_of_a_dead_owner_get_503_with_retry_after(serve: Callable[..., Served]) -> None:
    server = serve("sync")
    answers = server.burst([("/page?id=d&wait=3&die=1", {})] * 4)
    lost = [a for a in answers if isinstance(a, Exception)]
    assert len(lost) == 1, f"the killed worker's own client loses its connection: {answers}"
    unavailable = [a for a in answers if not isinstance(a, Exception)]
    assert [a[0] for a in unavailable] == [503] * 3
    assert all(a[1]["retry-after"] == "1" for a in unavailable)
    assert server.runs("d") == 1


def test_with_takeover_the_waiters_of_a_dead_owner_share_one_rerun(serve: Callable[..., Served]) -> None:
    server = serve("sync", COLLAPSE_RETRY="1")
    answers = server.burst([("/page?id=t&wait=3&die=1", {})] * 4)
    served = [a for a in answers if not isinstance(a, Exception)]
    assert [a[0] for a in served] == [200] * 3
    assert len({a[2] for a in served}) == 1
    assert json.loads(served[0][2])["run"] == 2
    assert server.runs("t") == 2


# -- ASGI: the owner's client going away ------------------------------------------------------------------


def test_under_asgi_the_owner_disconnecting_does_not_cancel_the_shared_run(
    serve: Callable[..., Served], name: str
) -> None:
    """The app ends an execution whose client disconnects (as Starlette's streaming responses do). The
    first client sends its request and goes away once three others wait: they still get the response,
    from the one execution. (After the disconnect the test gives the server a second to see it before
    the app may answer: a run that did see it would be logged as "disconnected".)"""
    server = serve("uvicorn1")
    owner = socket.create_connection(("127.0.0.1", server.port), timeout=REQUEST_DEADLINE)
    target = "/page?id=x&wait=3&go=1&watch=1"
    owner.sendall(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n\r\n".encode())
    with mpflight.Group(name) as group:
        wait_until(lambda: len(group.inflight()) == 1, "the owner's call")
        with ThreadPoolExecutor(3) as pool:
            waiters = [pool.submit(server.get, target) for _ in range(3)]
            wait_until(lambda: any(c.waiters >= 3 for c in group.inflight()), "three waiters")
            owner.close()
            end = time.monotonic() + 1.0
            while time.monotonic() < end and not any(e.startswith("disconnected") for e in server.events()):
                time.sleep(0.01)
            (server.gate / "x").touch()
            answers = [w.result(REQUEST_DEADLINE) for w in waiters]
    assert [a[0] for a in answers] == [200] * 3
    assert len({a[2] for a in answers}) == 1
    assert not any(e.startswith("disconnected") for e in server.events())
    assert server.runs("x") == 1


# -- the rules, in one process ----------------------------------------------------------------------------


def _environ(method: str = "GET", path: str = "/p", **headers: str) -> dict[str, Any]:
    environ: dict[str, Any] = {"REQUEST_METHOD": method, "PATH_INFO": path}
    wsgiref.util.setup_testing_defaults(environ)
    for k, v in headers.items():
        if k in ("CONTENT_LENGTH", "CONTENT_TYPE"):
            environ[k] = v
        else:
            environ["HTTP_" + k.upper()] = v
    return environ


class App:
    """A WSGI app that counts its executions and, the first time, answers once ``waiters`` wait."""

    def __init__(self, name: str, waiters: int, headers: list[tuple[str, str]] | None = None, body: bytes = b"x",
                 stream: bool = False) -> None:  # fmt: skip
        self.name, self.waiters, self.headers, self.body, self.stream = (
            name,
            waiters,
            headers or [],
            body,
            stream,
        )
        self.runs = 0
        self.pulled = 0  # chunks of a stream read so far
        self.lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        with self.lock:
            self.runs += 1
            first = self.runs == 1
        if first and self.waiters:
            with mpflight.Group(self.name) as group:
                wait_until(lambda: any(c.waiters >= self.waiters for c in group.inflight()), "the waiters")
        start_response("200 OK", [("Content-Type", "text/plain"), *self.headers])
        if self.stream:
            return self._chunks()
        return [self.body]

    def _chunks(self) -> Iterator[bytes]:
        for b in self.body:
            self.pulled += 1
            yield bytes([b])


def _call(app: Callable[..., Iterable[bytes]], environ: dict[str, Any]) -> tuple[str, list[Any], bytes]:
    got: dict[str, Any] = {}
    written: list[bytes] = []

    def start_response(status: str, headers: list[Any], exc_info: Any = None) -> Callable[[bytes], None]:
        got["status"], got["headers"] = status, headers
        return written.append

    iterable = app(environ, start_response)
    try:
        body = b"".join(iterable)
        body = b"".join(written) + body
    finally:
        close = getattr(iterable, "close", None)
        if close is not None:
            close()
    return got["status"], got["headers"], body


def _together(
    app: Callable[..., Iterable[bytes]], environs: list[dict[str, Any]]
) -> list[tuple[str, list[Any], bytes]]:
    with ThreadPoolExecutor(len(environs)) as pool:
        return list(pool.map(lambda e: _call(app, e), environs))


def test_in_process_threads_share_one_run(name: str) -> None:
    inner = App(name, waiters=2)
    app = mpflight.wsgi.collapse(inner, name=name)
    answers = _together(app, [_environ()] * 3)
    assert [a[0] for a in answers] == ["200 OK"] * 3
    assert inner.runs == 1


def test_the_first_requests_of_many_threads_open_one_handle(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A threaded worker's first requests come at once: they share one Group handle, not one each."""
    made: list[mpflight.Group] = []

    class Counted(mpflight.Group):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)
            time.sleep(0.05)  # a slow open: without the lock, every thread would make its own

    monkeypatch.setattr(mpflight._collapse, "Group", Counted)
    inner = App(name, waiters=0)
    app = mpflight.wsgi.collapse(inner, name=name)
    del made[:]  # the handle that checked the options, closed at once
    start = threading.Barrier(6)
    with ThreadPoolExecutor(6) as pool:
        answers = list(
            pool.map(lambda _: (start.wait(DEADLINE), _call(app, _environ(path=f"/{_}")))[1], range(6))
        )
    assert [a[0] for a in answers] == ["200 OK"] * 6
    assert len(made) == 1
    made[0].close()


def test_a_body_past_max_body_streams_to_its_own_client_and_is_not_shared(name: str) -> None:
    """The owner reads past the limit: its client gets all of the body, the waiters run the app."""
    inner = App(name, waiters=2, body=b"y" * 100, stream=True)
    app = mpflight.wsgi.collapse(inner, name=name, max_body=10)
    answers = _together(app, [_environ()] * 3)
    assert [a[2] for a in answers] == [b"y" * 100] * 3
    assert inner.runs == 3


def test_the_owner_stops_reading_at_max_body_and_streams_the_rest(name: str) -> None:
    """Past the limit, the rest of the body is not read into memory before the response starts."""
    inner = App(name, waiters=0, body=b"z" * 1000, stream=True)
    app = mpflight.wsgi.collapse(inner, name=name, max_body=10)
    got: list[str] = []
    iterable = app(_environ(), lambda status, headers: got.append(status))
    assert got == ["200 OK"] and inner.pulled == 11
    try:
        assert b"".join(iterable) == b"z" * 1000
    finally:
        iterable.close()  # type: ignore[attr-defined]
    assert inner.pulled == 1000


@pytest.mark.parametrize(
    "headers",
    [[("Cache-Control", "private, max-age=60")], [("cache-control", "No-Store")], [("Vary", "*")],
     [("Content-Type", "text/event-stream")]],
)  # fmt: skip
def test_responses_for_one_client_are_not_shared(name: str, headers: list[tuple[str, str]]) -> None:
    inner = App(name, waiters=2, headers=headers)
    app = mpflight.wsgi.collapse(inner, name=name)
    answers = _together(app, [_environ()] * 3)
    assert [a[2] for a in answers] == [b"x"] * 3
    assert inner.runs == 3


@pytest.mark.parametrize(
    "environ",
    [_environ("POST"), _environ("GET", CONTENT_LENGTH="3"), _environ("GET", RANGE="bytes=0-1"),
     _environ("GET", TRANSFER_ENCODING="chunked"), _environ("GET", IF_NONE_MATCH='"v1"'),
     _environ("GET", IF_MODIFIED_SINCE="Wed, 02 Dec 2026 00:00:00 GMT")],
)  # fmt: skip
def test_requests_that_may_differ_do_not_collapse(name: str, environ: dict[str, Any]) -> None:
    """A POST, a GET with a body or a range: the app runs for each, and no call enters the table."""
    inner = App(name, waiters=0)
    app = mpflight.wsgi.collapse(inner, name=name)
    assert _call(app, dict(environ))[2] == b"x"
    with mpflight.Group(name) as group:
        assert group.stats()["calls"] == 0
    assert inner.runs == 1


def test_the_key_holds_a_digest_of_the_vary_headers_never_their_values(name: str) -> None:
    seen: list[str] = []

    def inner(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        with mpflight.Group(name) as group:
            seen.extend(str(c.key) for c in group.inflight())
        start_response("200 OK", [])
        return [b""]

    app = mpflight.wsgi.collapse(inner, name=name)
    _call(app, _environ(path="/secret", COOKIE="session=s3cr3t", AUTHORIZATION="Bearer t0ken"))
    assert len(seen) == 1 and seen[0].startswith("GET http://127.0.0.1/secret #")
    assert "s3cr3t" not in seen[0] and "t0ken" not in seen[0]


class Broken(Exception):
    pass


def test_the_apps_own_exception_reaches_the_waiters(name: str) -> None:
    runs = []

    def inner(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        runs.append(1)
        with mpflight.Group(name) as group:
            wait_until(lambda: any(c.waiters >= 1 for c in group.inflight()), "the waiter")
        raise Broken("down")

    app = mpflight.wsgi.collapse(inner, name=name, errors=[Broken])
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(_call, app, _environ()) for _ in range(2)]
        for f in futures:
            with pytest.raises(Broken):
                f.result(DEADLINE)
    assert len(runs) == 1


@pytest.mark.parametrize(
    ("options", "error"),
    [({"vary": "Cookie"}, TypeError), ({"vary": ["bad header"]}, ValueError), ({"max_body": -1}, ValueError),
     ({"methods": ["POST"]}, ValueError), ({"linger": -1}, ValueError),
     ({"max_body": 2048, "max_result_bytes": 1024}, ValueError)],
)  # fmt: skip
def test_bad_options_are_refused_when_the_app_is_wrapped(
    name: str, options: dict[str, Any], error: type[Exception]
) -> None:
    for collapse in (mpflight.wsgi.collapse, mpflight.asgi.collapse):
        with pytest.raises(error):
            collapse(App(name, 0), name=name, **options)  # type: ignore[arg-type]


# -- the rules under ASGI, in one process -----------------------------------------------------------------


class AsgiApp:
    """An ASGI app that counts its executions and, the first time, answers once ``waiters`` wait; its
    body is sent in one-byte messages."""

    def __init__(self, name: str, waiters: int, headers: list[tuple[bytes, bytes]] | None = None,
                 body: bytes = b"x") -> None:  # fmt: skip
        self.name, self.waiters, self.headers, self.body = name, waiters, headers or [], body
        self.runs = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.runs += 1
        if self.runs == 1 and self.waiters:
            with mpflight.Group(self.name) as group:
                end = time.monotonic() + DEADLINE
                while not any(c.waiters >= self.waiters for c in group.inflight()):
                    assert time.monotonic() < end, "the waiters never came"
                    await asyncio.sleep(0.002)
        lang = dict(scope["headers"]).get(b"accept-language", b"")
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"x-lang", lang), *self.headers]}
        )
        for i in range(len(self.body)):
            await send({"type": "http.response.body", "body": self.body[i : i + 1], "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def _scope(path: str = "/p", method: str = "GET", **headers: str) -> dict[str, Any]:
    return {
        "type": "http", "method": method, "scheme": "http", "path": path, "root_path": "", "query_string": b"",
        "server": ("127.0.0.1", 80),
        "headers": [(b"host", b"h"), *((k.replace("_", "-").lower().encode(), v.encode()) for k, v in headers.items())],
    }  # fmt: skip


async def _asgi_call(app: Any, scope: dict[str, Any]) -> tuple[int, dict[bytes, bytes], bytes, int]:
    """Status, headers, body and the number of body messages this request's client got."""
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    start = [m for m in sent if m["type"] == "http.response.start"]
    assert len(start) == 1, sent
    bodies = [m for m in sent if m["type"] == "http.response.body"]
    return (
        start[0]["status"],
        dict(start[0]["headers"]),
        b"".join(m.get("body", b"") for m in bodies),
        len(bodies),
    )


def _asgi_together(app: Any, scopes: list[dict[str, Any]]) -> list[Any]:
    async def main() -> list[Any]:
        return list(await asyncio.gather(*(_asgi_call(app, s) for s in scopes)))

    return asyncio.run(main())


def test_asgi_tasks_share_one_run_and_the_same_response(name: str) -> None:
    inner = AsgiApp(name, waiters=2, body=b"abc")
    answers = _asgi_together(mpflight.asgi.collapse(inner, name=name), [_scope()] * 3)
    assert [(a[0], a[2]) for a in answers] == [(200, b"abc")] * 3
    assert inner.runs == 1


@pytest.mark.parametrize(
    "headers",
    [[(b"set-cookie", b"s=1")], [(b"cache-control", b"private")], [(b"content-type", b"text/event-stream")]],
)
def test_asgi_responses_for_one_client_are_not_shared(name: str, headers: list[tuple[bytes, bytes]]) -> None:
    inner = AsgiApp(name, waiters=2, headers=headers, body=b"abc")
    answers = _asgi_together(mpflight.asgi.collapse(inner, name=name), [_scope()] * 3)
    assert [a[2] for a in answers] == [b"abc"] * 3
    assert inner.runs == 3


def test_asgi_a_body_past_max_body_goes_to_its_own_client_as_it_comes(name: str) -> None:
    """The owner's client gets every message of the body (forwarded, not collected); the waiters run
    the app themselves."""
    inner = AsgiApp(name, waiters=2, body=b"0123456789" * 3)
    answers = _asgi_together(mpflight.asgi.collapse(inner, name=name, max_body=10), [_scope()] * 3)
    assert [a[2] for a in answers] == [b"0123456789" * 3] * 3
    assert inner.runs == 3


def test_asgi_a_waiter_that_differs_in_a_vary_header_runs_the_app(name: str) -> None:
    inner = AsgiApp(name, waiters=2, headers=[(b"vary", b"Accept-Language")])

    async def main() -> list[Any]:
        app = mpflight.asgi.collapse(inner, name=name)
        owner = asyncio.ensure_future(_asgi_call(app, _scope(Accept_Language="en")))
        with mpflight.Group(name) as group:
            while not group.inflight():
                await asyncio.sleep(0.002)
        rest = await asyncio.gather(*(_asgi_call(app, _scope(Accept_Language=lang)) for lang in ("en", "fr")))
        return [await owner, *rest]

    owner, en, fr = asyncio.run(main())
    assert owner[1][b"x-lang"] == en[1][b"x-lang"] == b"en"
    assert fr[1][b"x-lang"] == b"fr"
    assert inner.runs == 2


def test_asgi_lifespan_and_other_methods_pass_through(name: str) -> None:
    inner = AsgiApp(name, waiters=0)
    app = mpflight.asgi.collapse(inner, name=name)
    assert asyncio.run(_asgi_call(app, _scope(method="POST")))[2] == b"x"
    with mpflight.Group(name) as group:
        assert group.stats()["calls"] == 0


# -- what review found: streams release the waiters, keys are unambiguous, headers are the request's own ------


def test_a_response_for_one_client_releases_the_waiters_before_its_body_ends(name: str) -> None:
    """The owner's response sets a cookie and its body goes on until both waiters have run the app
    themselves: they must not wait for it to end (they would wait forever)."""
    runs: list[int] = []
    done = threading.Event()

    def inner(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterator[bytes]:
        runs.append(1)
        mine = len(runs)
        if mine == 1:
            with mpflight.Group(name) as group:
                wait_until(lambda: any(c.waiters >= 2 for c in group.inflight()), "the waiters")
        start_response("200 OK", [("Set-Cookie", f"n={mine}")])
        yield b"first "
        if mine == 1:
            assert done.wait(DEADLINE), "the waiters waited for the owner's body to end"
        elif len(runs) == 3:
            done.set()
        yield b"rest"

    app = mpflight.wsgi.collapse(inner, name=name)
    answers = _together(app, [_environ()] * 3)
    assert [a[2] for a in answers] == [b"first rest"] * 3
    assert sorted(dict(a[1])["Set-Cookie"] for a in answers) == ["n=1", "n=2", "n=3"]


def test_asgi_a_stream_releases_the_waiters_and_hears_its_client_leave(name: str) -> None:
    """An event stream: the waiters run the app themselves at once, while the owner's stream goes on
    to its own client, which the stream hears leave (it reads the client's own receive)."""
    runs: list[str] = []
    both = asyncio.Event()

    async def inner(scope: dict[str, Any], receive: Any, send: Any) -> None:
        runs.append("run")
        mine = runs.count("run")
        if mine == 1:
            with mpflight.Group(name) as group:
                while not any(c.waiters >= 2 for c in group.inflight()):
                    await asyncio.sleep(0.002)
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )
        await send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True})
        if mine == 3:
            both.set()
        if mine == 1:
            await asyncio.wait_for(both.wait(), DEADLINE)
            assert (await receive())["type"] == "http.request"  # its request, which it had not read
            assert (await receive())["type"] == "http.disconnect"  # and its client, gone
            runs.append("heard")
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def main() -> list[Any]:
        app = mpflight.asgi.collapse(inner, name=name)
        gone = {"type": "http.disconnect"}
        owner_sent: list[dict[str, Any]] = []
        request = {"type": "http.request", "body": b"", "more_body": False}
        replies = iter([request, gone])

        async def owner_receive() -> dict[str, Any]:
            return next(replies)

        async def owner_send(message: dict[str, Any]) -> None:
            owner_sent.append(message)

        owner = asyncio.ensure_future(app(_scope(), owner_receive, owner_send))
        with mpflight.Group(name) as group:
            while not group.inflight():
                await asyncio.sleep(0.002)
        rest = await asyncio.wait_for(
            asyncio.gather(*(_asgi_call(app, _scope()) for _ in range(2))), DEADLINE
        )
        await asyncio.wait_for(owner, DEADLINE)
        return [owner_sent, *rest]

    owner_sent, *rest = asyncio.run(main())
    assert [a[2] for a in rest] == [b"data: 1\n\n"] * 2
    assert (
        b"".join(m.get("body", b"") for m in owner_sent if m["type"] == "http.response.body")
        == b"data: 1\n\n"
    )
    assert runs.count("run") == 3 and "heard" in runs


@pytest.mark.parametrize(
    ("a", "b"),
    [((("http", "h", "/a?b=1", "")), ("http", "h", "/a", "b=1")),
     (("http", "h/p", "/q", ""), ("http", "h", "/p/q", "")),
     (("http", "h", "/a%3F", ""), ("http", "h", "/a?", "")),
     (("http", "h", "/a b", ""), ("http", "h", "/a", "") )],
)  # fmt: skip
def test_two_different_requests_never_make_one_key(
    name: str, a: tuple[str, str, str, str], b: tuple[str, str, str, str]
) -> None:
    policy = mpflight._collapse.Policy(name, (), 100, ("GET",), {})
    assert policy.key("GET", a, {}) != policy.key("GET", b, {})


def test_each_request_gets_headers_of_its_own(name: str) -> None:
    """Waiters in the owner's process get its outcome's very object: an outer middleware that appends
    to the header list of one response must not add to another's."""
    inner = App(name, waiters=2)
    collapsed = mpflight.wsgi.collapse(inner, name=name, vary=[])

    def outer(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        def appending(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            headers.append(("X-User", environ["HTTP_X_USER"]))
            return start_response(status, headers, exc_info)

        return collapsed(environ, appending)

    answers = _together(outer, [_environ(X_USER=user) for user in ("ann", "bob", "cy")])
    assert inner.runs == 1
    assert sorted([v for n, v in a[1] if n == "X-User"] for a in answers) == [["ann"], ["bob"], ["cy"]]


def test_a_body_written_with_write_counts_toward_max_body(name: str) -> None:
    runs: list[int] = []

    def inner(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        runs.append(1)
        if len(runs) == 1:
            with mpflight.Group(name) as group:
                wait_until(lambda: any(c.waiters >= 2 for c in group.inflight()), "the waiters")
        start_response("200 OK", [])(b"w" * 100)
        return []

    answers = _together(mpflight.wsgi.collapse(inner, name=name, max_body=10), [_environ()] * 3)
    assert [a[2] for a in answers] == [b"w" * 100] * 3
    assert len(runs) == 3


def test_the_apps_own_wait_timeout_is_not_turned_into_a_503(name: str) -> None:
    def inner(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        raise mpflight.WaitTimeout("the app's own wait")

    with pytest.raises(mpflight.WaitTimeout, match="the app's own wait"):
        _call(mpflight.wsgi.collapse(inner, name=name), _environ())


def test_conditional_answers_are_never_handed_on() -> None:
    assert mpflight._collapse.not_shared([], 304) is not None
    assert mpflight._collapse.not_shared([], 412) is not None
    assert mpflight._collapse.not_shared(
        [("Content-Type", "text/event-stream"), ("Cache-Control", "no-store")]
    ) == ("a stream")


def test_asgi_an_app_that_listens_for_a_disconnect_while_it_sends_is_not_cut_short(name: str) -> None:
    """As Starlette's streaming responses do, the app listens for its client leaving while it sends:
    the shared run hears nothing until its response is complete, then that nobody is left."""
    heard: list[str] = []

    async def inner(scope: dict[str, Any], receive: Any, send: Any) -> None:
        async def listen() -> None:
            while (message := await receive())["type"] != "http.disconnect":
                heard.append(message["type"])
            heard.append("http.disconnect")

        listener = asyncio.ensure_future(listen())
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for part in (b"a", b"b", b"c"):
            await asyncio.sleep(0)  # the listener runs between the parts
            if listener.done():
                return  # cut short: its client is gone
            await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        await asyncio.wait_for(listener, DEADLINE)

    answers = _asgi_together(mpflight.asgi.collapse(inner, name=name), [_scope()])
    assert [(a[0], a[2]) for a in answers] == [(200, b"abc")]
    assert heard == ["http.request", "http.disconnect"]


def test_asgi_a_response_without_its_last_body_message_is_not_shared(name: str) -> None:
    """An app that returns after the start of its response (no body message) is broken: every caller
    gets that error, and nobody an empty body."""

    async def inner(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})

    with pytest.raises(RuntimeError, match="without a complete response"):
        asyncio.run(_asgi_call(mpflight.asgi.collapse(inner, name=name), _scope()))
