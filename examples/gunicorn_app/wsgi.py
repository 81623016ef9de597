"""A WSGI app whose endpoint computes an expensive value through mpflight.

    gunicorn -w 4 -b 127.0.0.1:8000 --chdir examples/gunicorn_app wsgi:app
    curl 'http://127.0.0.1:8000/value?key=report-42'

Concurrent requests for one key, in any worker, share one computation. A worker killed while it
computes (the OOM killer, gunicorn's timeout) answers the requests that waited for it with 503;
they may retry at once.

Environment: MPFLIGHT_EXAMPLE_LINGER is the group's linger (default 0): a request that comes within
that many seconds of a computation's end takes its value instead of computing again. For the tests:
MPFLIGHT_EXAMPLE_GROUP names the group; MPFLIGHT_EXAMPLE_LOG is a file each computation appends its
start and end to; MPFLIGHT_EXAMPLE_GATE is a directory in which a computation of KEY waits for the
file KEY before it returns; without it, a computation takes MPFLIGHT_EXAMPLE_SECONDS (default 0.02).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import mpflight

GROUP = mpflight.Group(
    os.environ.get("MPFLIGHT_EXAMPLE_GROUP", "example-wsgi"),
    timeout=30,
    linger=float(os.environ.get("MPFLIGHT_EXAMPLE_LINGER", "0")),
)
LOG = os.environ.get("MPFLIGHT_EXAMPLE_LOG")
GATE = os.environ.get("MPFLIGHT_EXAMPLE_GATE")
SECONDS = float(os.environ.get("MPFLIGHT_EXAMPLE_SECONDS", "0.02"))


def _log(event: str, key: str) -> None:
    if LOG:
        line = f"{event} {key} {os.getpid()} {time.monotonic():.6f}\n".encode()
        fd = os.open(LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            os.write(fd, line)  # one write on O_APPEND: lines from many workers never interleave
        finally:
            os.close(fd)


def expensive(key: str) -> dict[str, str]:
    """Stands for a slow query or render."""
    _log("start", key)
    if GATE:
        while not (Path(GATE) / key).exists():
            time.sleep(0.002)
    else:
        time.sleep(SECONDS)
    _log("end", key)
    return {"key": key, "value": hashlib.sha256(key.encode()).hexdigest()}


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    key = parse_qs(environ.get("QUERY_STRING", "")).get("key", ["default"])[0]
    try:
        status, body = "200 OK", GROUP.do(key, expensive, key)
    except mpflight.AbortError as e:
        status, body = "503 Service Unavailable", {"error": str(e)}
    except TimeoutError as e:
        status, body = "504 Gateway Timeout", {"error": str(e)}
    data = json.dumps(body).encode()
    start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
    return [data]
