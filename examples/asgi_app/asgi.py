"""An ASGI app whose endpoint computes an expensive value through mpflight's do_async.

    uvicorn --workers 2 --app-dir examples/asgi_app asgi:app
    curl 'http://127.0.0.1:8000/value?key=report-42'

Concurrent requests for one key, in any worker process and any task, share one computation;
waiting never blocks the event loop. Environment as in examples/gunicorn_app/wsgi.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import mpflight

GROUP = mpflight.Group(
    os.environ.get("MPFLIGHT_EXAMPLE_GROUP", "example-asgi"),
    timeout=30,
    linger=float(os.environ.get("MPFLIGHT_EXAMPLE_LINGER", "0")),
)
LOG = os.environ.get("MPFLIGHT_EXAMPLE_LOG")
GATE = os.environ.get("MPFLIGHT_EXAMPLE_GATE")
SECONDS = float(os.environ.get("MPFLIGHT_EXAMPLE_SECONDS", "0.02"))

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


def _log(event: str, key: str) -> None:
    if LOG:
        line = f"{event} {key} {os.getpid()} {time.monotonic():.6f}\n".encode()
        fd = os.open(LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)


async def expensive(key: str) -> dict[str, str]:
    """Stands for a slow query: a coroutine, awaited on the owner's loop."""
    _log("start", key)
    if GATE:
        while not (Path(GATE) / key).exists():
            await asyncio.sleep(0.002)
    else:
        await asyncio.sleep(SECONDS)
    _log("end", key)
    return {"key": key, "value": hashlib.sha256(key.encode()).hexdigest()}


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    key = parse_qs(scope.get("query_string", b"").decode()).get("key", ["default"])[0]
    try:
        status, body = 200, await GROUP.do_async(key, expensive, key)
    except mpflight.AbortError as e:
        status, body = 503, {"error": str(e)}
    except TimeoutError as e:
        status, body = 504, {"error": str(e)}
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})
