"""``/metrics`` through prometheus_client, with no per-request cost.

The relay already counts what it needs (`observe.Metrics`, the registry's
live counts, the server's connection counters). `RelayCollector` reads those
numbers when a scrape asks for them and turns them into metric families, so
nothing is updated on the data path for the sake of Prometheus.

Each server gets its own `CollectorRegistry` from `make_registry` (never the
process-global one, so two servers in one process do not collide), holding
`RelayCollector`, ``fastrelay_build_info`` and the standard process metrics
(CPU seconds, resident memory, open file descriptors). `render_metrics`
answers a scrape in the format its ``Accept`` header asks for.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable, Iterator
from typing import Protocol, cast

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.openmetrics import exposition as _openmetrics
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString as _untyped_float_to_go_string

from ..core.observe import Histogram, Metrics

__all__ = [
    "OPENMETRICS_CONTENT_TYPE",
    "TEXT_CONTENT_TYPE",
    "MetricsSource",
    "RelayCollector",
    "make_registry",
    "render_metrics",
]

TEXT_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OPENMETRICS_CONTENT_TYPE = "application/openmetrics-text; version=1.0.0; charset=utf-8"
_OPENMETRICS = "application/openmetrics-text"
# Not annotated upstream.
_generate_openmetrics = cast(Callable[[CollectorRegistry], bytes], _openmetrics.generate_latest)
_float_to_go_string = cast(Callable[[float], str], _untyped_float_to_go_string)


class MetricsSource(Protocol):
    """What `RelayCollector` reads at scrape time (a server satisfies it)."""

    @property
    def metrics(self) -> Metrics: ...
    @property
    def active_count(self) -> int: ...
    @property
    def waiting_count(self) -> int: ...
    @property
    def waiting_sides(self) -> int: ...
    @property
    def open_connections(self) -> int: ...
    @property
    def refused_connections(self) -> int: ...
    @property
    def failed_handshakes(self) -> int: ...
    @property
    def cluster_health(self) -> tuple[bool, int] | None:
        """(Redis reachable at the last call, failed calls), or None alone."""


class RelayCollector(Collector):
    """The relay's own metrics, read from ``source`` on each scrape.

    Counter names are given without ``_total``: prometheus_client adds it to
    the sample (and, in the text format, to HELP/TYPE), so the exposed names
    are ``fastrelay_relays_total`` and so on.
    """

    def __init__(self, source: MetricsSource) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        src = self._source
        m = src.metrics
        relays = CounterMetricFamily(
            "fastrelay_relays", "Relays finished, by outcome.", labels=["outcome"]
        )
        for outcome, n in m.outcomes.items():
            relays.add_metric([outcome.value], n)
        yield relays
        yield CounterMetricFamily(
            "fastrelay_bytes", "Payload bytes delivered to destinations.", value=m.bytes_total
        )
        yield GaugeMetricFamily(
            "fastrelay_active_relays", "Live tickets (any state).", value=src.active_count
        )
        yield GaugeMetricFamily(
            "fastrelay_waiting_relays", "Live tickets not yet paired.", value=src.waiting_count
        )
        yield GaugeMetricFamily(
            "fastrelay_waiting_sides",
            "Requests (PUT or GET) holding one side of a relay, waiting for the other.",
            value=src.waiting_sides,
        )
        yield GaugeMetricFamily(
            "fastrelay_connections", "Open client connections.", value=src.open_connections
        )
        # Histograms (they were summaries with _sum/_count only): buckets
        # add up across nodes and give quantiles; observe.py says why these
        # bounds. _sum and _count are the same series as before.
        yield _histogram(
            "fastrelay_pairing_seconds", "Mint-to-pairing time of paired relays.", m.pairing
        )
        yield _histogram(
            "fastrelay_transfer_seconds", "Pairing-to-end time of paired relays.", m.transfer
        )
        mints = CounterMetricFamily(
            "fastrelay_mints",
            "Mint requests answered, by outcome (created, or why refused).",
            labels=["outcome"],
        )
        for label, n in m.mints.items():
            mints.add_metric([label], n)
        yield mints
        refusals = CounterMetricFamily(
            "fastrelay_relay_refusals",
            "Error answers to PUT/GET /relay/{ticket} before any byte moved, by HTTP status.",
            labels=["status"],
        )
        for status, n in sorted(m.relay_refusals.items()):
            refusals.add_metric([str(status)], n)
        yield refusals
        resumes = CounterMetricFamily(
            "fastrelay_resumes",
            "Requests that continued a resumable relay after a break, by side (PUT, GET).",
            labels=["side"],
        )
        for side, n in sorted(m.resumes.items()):
            resumes.add_metric([side], n)
        yield resumes
        yield CounterMetricFamily(
            "fastrelay_superseded",
            "Connections of resumable relays taken over by a newer request for their side.",
            value=m.superseded,
        )
        dropped = CounterMetricFamily(
            "fastrelay_fanout_receivers_dropped",
            "Fan-out receivers cut while the others went on, by why (idle, lost).",
            labels=["why"],
        )
        for why, n in sorted(m.dropped_receivers.items()):
            dropped.add_metric([why], n)
        yield dropped
        yield CounterMetricFamily(
            "fastrelay_fanout_receiver_bytes",
            "Payload bytes written to fan-out receivers (each receiver counts its own).",
            value=m.receiver_bytes,
        )
        yield _histogram(
            "fastrelay_fanout_delivered_bytes",
            "Bytes each fan-out receiver got, observed once per receiver when done or dropped.",
            m.receivers_delivered,
        )
        yield CounterMetricFamily(
            "fastrelay_paced_seconds",
            "Seconds uploads spent paused by pacing (max_rate, --max-rate, --workspace-rate).",
            value=m.paced_s,
        )
        yield CounterMetricFamily(
            "fastrelay_refused_connections",
            "Connections closed at once (--max-connections or draining).",
            value=src.refused_connections,
        )
        yield CounterMetricFamily(
            "fastrelay_tls_handshake_failures",
            "TLS handshakes that failed.",
            value=src.failed_handshakes,
        )
        health = src.cluster_health
        if health is not None:
            up, errors = health
            yield GaugeMetricFamily(
                "fastrelay_cluster_up",
                "1 if the last call to the shared ledger (Redis) succeeded, else 0.",
                value=int(up),
            )
            yield CounterMetricFamily(
                "fastrelay_cluster_errors",
                "Calls to the shared ledger (Redis) that failed or timed out.",
                value=errors,
            )


def _histogram(name: str, documentation: str, histogram: Histogram) -> HistogramMetricFamily:
    # floatToGoString: the ``le`` spelling Prometheus clients share ("0.005",
    # "1.0", "+Inf"), so series from every node line up.
    buckets = [(_float_to_go_string(bound), n) for bound, n in histogram.cumulative()]
    return HistogramMetricFamily(name, documentation, buckets=buckets, sum_value=histogram.sum)


class _BuildInfo(Collector):
    def __init__(self, version: str) -> None:
        self._version = version

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily(
            "fastrelay_build_info",
            "fastrelay build; the value is always 1.",
            labels=["version"],
        )
        info.add_metric([self._version], 1)
        yield info


def _version() -> str:
    try:
        return importlib.metadata.version("fastrelay")
    except importlib.metadata.PackageNotFoundError:  # running from a source tree
        from .._version import __version__

        return __version__


def make_registry(source: MetricsSource) -> CollectorRegistry:
    """A fresh registry (not the global one) with the relay's, build and
    process metrics."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RelayCollector(source))
    registry.register(_BuildInfo(_version()))
    ProcessCollector(registry=registry)
    return registry


def wants_openmetrics(accept: str | None) -> bool:
    """Whether an ``Accept`` header asks for OpenMetrics (with q > 0)."""
    if not accept:
        return False
    for media_range in accept.split(","):
        media_type, *params = (p.strip() for p in media_range.split(";"))
        if media_type.lower() != _OPENMETRICS:
            continue
        q = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        if q > 0:
            return True
    return False


def render_metrics(registry: CollectorRegistry, accept: str | None) -> tuple[str, bytes]:
    """``(content_type, body)`` for a scrape: OpenMetrics when ``accept`` asks
    for ``application/openmetrics-text``, else the Prometheus text format 0.0.4."""
    if wants_openmetrics(accept):
        return OPENMETRICS_CONTENT_TYPE, _generate_openmetrics(registry)
    return TEXT_CONTENT_TYPE, generate_latest(registry)
