"""mpflight's metrics for prometheus_client (``pip install 'mpflight[prometheus]'``)::

    from prometheus_client import REGISTRY
    from mpflight.prometheus import MPFlightCollector

    REGISTRY.register(MPFlightCollector())  # every table of the machine, read at each scrape

The counters are the tables' own, kept in shared memory and summed over every process of the machine
(mpflight._metrics): any process serves the same numbers, a worker that never made a call or a
separate exporter, however many workers died or were recycled. Nothing is written anywhere: no
per-process files, no PROMETHEUS_MULTIPROC_DIR. The only module that imports prometheus_client; the
core never does (``mpflight stats --format openmetrics`` writes the same metrics without it).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

try:
    from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
except ImportError as e:
    raise ImportError(
        "mpflight.prometheus needs prometheus_client: install it with pip install 'mpflight[prometheus]'",
        name=e.name,
    ) from e

from . import _metrics
from ._registry import validate_table_name

__all__ = ["MPFlightCollector"]


class MPFlightCollector:
    """A prometheus_client collector of every mpflight table of this machine, or of the ``tables``
    named (``NAME``, or ``NAME+HOST`` for a simulated host's), read from shared memory at each scrape.

    Per table, labelled ``table``, ``group`` and ``host`` (empty unless the table is ``NAME+HOST``): a
    counter per counter of ``Group.stats()`` (``mpflight_calls_total``, ``mpflight_runs_total``, ...;
    ``wait_ns`` as ``mpflight_wait_seconds_total``), each with the table's creation time as its
    ``_created``, so a table unlinked and made anew reads as a counter reset; gauges
    ``mpflight_calls_in_flight`` (by ``state``), ``mpflight_waiters`` and ``mpflight_slots``. And
    ``mpflight_skipped_tables`` (by ``reason``): tables the scrape could not read (another layout
    version's, one not initialised yet, another user's, a damaged one), skipped rather than failing
    the scrape. Never creates, initialises or locks a table; a named table that does not exist has no
    samples.
    """

    def __init__(self, tables: Iterable[str] | None = None) -> None:
        if isinstance(tables, str | bytes):
            raise TypeError(f"tables must be a list of table names, not {tables!r}")
        self.tables = None if tables is None else tuple(validate_table_name(t) for t in tables)

    def describe(self) -> list[Metric]:
        """The metrics without their samples, for CollectorRegistry.register (which then does not
        scrape to learn their names)."""
        return list(_metrics_of(_metrics.Scrape((), {})))

    def collect(self) -> Iterator[Metric]:
        return _metrics_of(_metrics.scrape(self.tables))

    def __repr__(self) -> str:
        return f"MPFlightCollector(tables={self.tables!r})"


def _metrics_of(scrape: _metrics.Scrape) -> Iterator[Metric]:
    for f in _metrics.families(scrape):
        metric: CounterMetricFamily | GaugeMetricFamily
        if f.kind == "counter":
            metric = CounterMetricFamily(f.name, f.help, labels=f.labels, unit=f.unit)
            for values, value, created in f.samples:
                metric.add_metric(values, value, created=created)
        else:
            metric = GaugeMetricFamily(f.name, f.help, labels=f.labels, unit=f.unit)
            for values, value, _ in f.samples:
                metric.add_metric(values, value)
        yield metric
