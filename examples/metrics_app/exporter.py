"""A tiny exporter: the machine's mpflight metrics over HTTP, from a process of their own.

    python examples/metrics_app/exporter.py --port 9464            # every table of the machine
    python examples/metrics_app/exporter.py --port 9464 app app+b  # only these tables

Run it beside the app (a systemd unit, a sidecar sharing the app's /dev/shm), as the app's user: it
reads each table's counters from shared memory at every scrape, so it serves the machine's totals
however the app's workers come and go, and writes nothing anywhere. prometheus_client's own HTTP
server answers both formats: OpenMetrics to a scraper that asks for it (Prometheus does), the classic
text format otherwise.
"""

from __future__ import annotations

import argparse
import threading

from prometheus_client import REGISTRY, start_http_server

from mpflight.prometheus import MPFlightCollector


def main() -> None:
    p = argparse.ArgumentParser(description="The machine's mpflight metrics over HTTP.")
    p.add_argument("tables", nargs="*", help="the tables to export (default: every table)")
    p.add_argument("--port", type=int, default=9464)
    p.add_argument("--addr", default="127.0.0.1", help="the address to listen on (default 127.0.0.1)")
    args = p.parse_args()
    REGISTRY.register(MPFlightCollector(args.tables or None))  # beside this process's own metrics
    start_http_server(args.port, addr=args.addr)
    threading.Event().wait()  # serve until killed


if __name__ == "__main__":
    main()
