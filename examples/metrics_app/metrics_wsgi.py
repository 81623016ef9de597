"""A WSGI app that coalesces its expensive endpoint through mpflight, and whose every worker serves the
machine's mpflight metrics at /metrics.

    gunicorn -w 4 --max-requests 1000 -b 127.0.0.1:8000 --chdir examples/metrics_app metrics_wsgi:app
    curl 'http://127.0.0.1:8000/value?key=report-42'
    curl http://127.0.0.1:8000/metrics

Whichever worker answers /metrics, it reads the same host-wide counters from shared memory: a worker
started a second ago reports the calls of every worker before it, recycled or dead ones included, and
nothing is written to disk (no PROMETHEUS_MULTIPROC_DIR). The registry is the app's own, holding only
the mpflight collector: prometheus_client's default one would add the answering worker's own process_*
metrics, which change with whichever worker answers.

Environment: MPFLIGHT_EXAMPLE_GROUP names the group (default example-metrics). For the tests:
MPFLIGHT_EXAMPLE_LOG is a file each computation appends a line to; with MPFLIGHT_EXAMPLE_GATE (a
directory), a request ``/value?key=KEY&gate=G`` computes only once the file G exists there.
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

from prometheus_client import CollectorRegistry, make_wsgi_app

import mpflight
from mpflight.prometheus import MPFlightCollector

GROUP = mpflight.Group(os.environ.get("MPFLIGHT_EXAMPLE_GROUP", "example-metrics"), timeout=30)
REGISTRY = CollectorRegistry()
REGISTRY.register(MPFlightCollector())  # every table of the machine; MPFlightCollector([GROUP.name]) for one
METRICS = make_wsgi_app(REGISTRY)

LOG = os.environ.get("MPFLIGHT_EXAMPLE_LOG")
GATE = os.environ.get("MPFLIGHT_EXAMPLE_GATE")
# Bounds how long a computation waits for its gate file (a test that never opens it fails, not hangs).
GATE_DEADLINE = 60.0


def expensive(key: str, gate: str | None) -> dict[str, str]:
    """Stands for a slow query or render."""
    if LOG:
        fd = os.open(LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            os.write(fd, f"{key} {os.getpid()}\n".encode())  # one write on O_APPEND: lines never interleave
        finally:
            os.close(fd)
    if GATE and gate:
        end = time.monotonic() + GATE_DEADLINE
        while not (Path(GATE) / gate).exists():
            if time.monotonic() > end:
                raise TimeoutError(f"gate {gate} never opened")
            time.sleep(0.002)
    return {"key": key, "value": hashlib.sha256(key.encode()).hexdigest()}


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    if environ.get("PATH_INFO") == "/metrics":
        metrics: Iterable[bytes] = METRICS(environ, start_response)
        return metrics
    query = parse_qs(environ.get("QUERY_STRING", ""))
    key, gate = query.get("key", ["default"])[0], query.get("gate", [None])[0]
    try:
        status, body = "200 OK", GROUP.do(key, expensive, key, gate)
    except mpflight.AbortError as e:
        status, body = "503 Service Unavailable", {"error": str(e)}
    except TimeoutError as e:
        status, body = "504 Gateway Timeout", {"error": str(e)}
    data = json.dumps(body).encode()
    start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
    return [data]
