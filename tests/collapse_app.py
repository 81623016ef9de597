"""The app that tests/test_middleware.py serves through gunicorn and uvicorn, wrapped by
mpflight.wsgi.collapse (``wsgi``) and mpflight.asgi.collapse (``asgi``); ``COLLAPSE_OFF=1`` serves
it bare (the benchmark's comparison).

``GET /page?id=X`` appends one line per execution of the app to ``COLLAPSE_LOG`` and answers JSON
naming the execution. Query options, all acted on by the first execution of an id only:
``wait=N`` answers once ``inflight()`` shows the call with N waiters; ``calls=N`` once N calls of
the id are in flight at once; ``die=1`` SIGKILLs the worker instead of answering; ``go=1`` also
waits for the file ``COLLAPSE_GATE/<id>``; ``set_cookie=1`` and ``vary=1`` add Set-Cookie and
``Vary: Accept-Language``; ``big=N`` answers N more bytes; ``sleep=S`` takes S seconds (for the
benchmark). Under ASGI, ``watch=1`` ends the execution (logged "disconnected") if its client goes.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import mpflight
import mpflight.asgi
import mpflight.wsgi

NAME = os.environ.get("COLLAPSE_GROUP", "collapse-test")
LOG = Path(os.environ.get("COLLAPSE_LOG", "/dev/null"))
GATE = Path(os.environ.get("COLLAPSE_GATE", "/nonexistent"))
OPTIONS: dict[str, Any] = {"timeout": 30.0}
if os.environ.get("COLLAPSE_RETRY"):
    OPTIONS["on_abort"] = "retry"
if os.environ.get("COLLAPSE_LINGER"):
    OPTIONS["linger"] = float(os.environ["COLLAPSE_LINGER"])
DEADLINE = 20.0  # an expected waiter that never comes: answer anyway (the test then fails)

_group: mpflight.Group | None = None


def _inflight() -> list[mpflight.InflightCall]:
    global _group
    if _group is None:
        _group = mpflight.Group(NAME)
    return _group.inflight()


def _execution(ident: str) -> int:
    """Log one execution of the app for ``ident``; how many there have been so far, this one included."""
    fd = os.open(LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"run {ident} {os.getpid()}\n".encode())
    finally:
        os.close(fd)
    # Complete lines only: another process's line may be in the middle of its write.
    return sum(1 for line in LOG.read_text().split("\n")[:-1] if line.split()[1] == ident)


def _ready(ident: str, query: dict[str, str]) -> bool:
    mine = [c for c in _inflight() if f"id={ident}&" in f"{c.key}&" or f"id={ident} " in f"{c.key} "]
    if "wait" in query and not any(c.waiters >= int(query["wait"]) for c in mine):
        return False
    if "calls" in query and len(mine) < int(query["calls"]):
        return False
    return "go" not in query or (GATE / ident).exists()


def _answer(
    query: dict[str, str], headers: dict[str, str], run: int
) -> tuple[str, list[tuple[str, str]], bytes]:
    ident = query["id"]
    body = {"id": ident, "run": run, "pid": os.getpid(), "lang": headers.get("accept-language", "")}
    out = [("Content-Type", "application/json")]
    if query.get("set_cookie"):
        out.append(("Set-Cookie", f"session={os.getpid()}.{run}"))
    if query.get("vary"):
        out.append(("Vary", "Accept-Language"))
    data = json.dumps(body).encode() + b" " * int(query.get("big", "0"))
    return "200 OK", out, data


def _query(raw: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(raw).items()}


def raw_wsgi(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    query = _query(environ.get("QUERY_STRING", ""))
    if environ.get("PATH_INFO") != "/page" or "id" not in query:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]
    ident = query["id"]
    run = _execution(ident)
    if run == 1:
        end = time.monotonic() + DEADLINE
        while not _ready(ident, query) and time.monotonic() < end:
            time.sleep(0.002)
        if query.get("die"):
            os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(float(query.get("sleep", "0")))
    headers = {k[5:].replace("_", "-").lower(): v for k, v in environ.items() if k.startswith("HTTP_")}
    status, out, data = _answer(query, headers, run)
    start_response(status, out)
    return [data]


async def raw_asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    query = _query(scope.get("query_string", b"").decode())
    if scope["path"] != "/page" or "id" not in query:
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]}
        )
        await send({"type": "http.response.body", "body": b"ok"})
        return
    ident = query["id"]
    run = _execution(ident)
    work = asyncio.ensure_future(_work(ident, query, run))
    if query.get("watch"):
        watcher = asyncio.ensure_future(_disconnected(receive))
        await asyncio.wait([work, watcher], return_when=asyncio.FIRST_COMPLETED)
        if not work.done():
            work.cancel()
            with open(LOG, "a") as log:
                log.write(f"disconnected {ident} {os.getpid()}\n")
            return
        watcher.cancel()
    headers = {bytes(k).decode().lower(): bytes(v).decode() for k, v in scope.get("headers", [])}
    status, out, data = _answer(query, headers, await work)
    await send({
        "type": "http.response.start", "status": int(status.split()[0]),
        "headers": [(k.lower().encode(), v.encode()) for k, v in out],
    })  # fmt: skip
    await send({"type": "http.response.body", "body": data})


async def _work(ident: str, query: dict[str, str], run: int) -> int:
    if run == 1:
        end = time.monotonic() + DEADLINE
        while not _ready(ident, query) and time.monotonic() < end:
            await asyncio.sleep(0.002)
        if query.get("die"):
            os.kill(os.getpid(), signal.SIGKILL)
    await asyncio.sleep(float(query.get("sleep", "0")))
    return run


async def _disconnected(receive: Any) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


if os.environ.get("COLLAPSE_OFF"):
    wsgi, asgi = raw_wsgi, raw_asgi
else:
    wsgi = mpflight.wsgi.collapse(raw_wsgi, name=NAME, **OPTIONS)
    asgi = mpflight.asgi.collapse(raw_asgi, name=NAME, **OPTIONS)
