"""`fastrelay.server.metrics`: the relay's numbers through prometheus_client."""

from __future__ import annotations

import dataclasses
import re

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fastrelay.core.observe import Metrics
from fastrelay.core.session import Outcome
from fastrelay.server import metrics

RELAY_NAMES = [
    "fastrelay_relays_total",
    "fastrelay_bytes_total",
    "fastrelay_active_relays",
    "fastrelay_waiting_relays",
    "fastrelay_waiting_sides",
    "fastrelay_connections",
    "fastrelay_pairing_seconds",
    "fastrelay_transfer_seconds",
    "fastrelay_refused_connections_total",
    "fastrelay_tls_handshake_failures_total",
    "fastrelay_build_info",
]


@dataclasses.dataclass
class FakeSource:
    metrics: Metrics
    active_count: int = 3
    waiting_count: int = 1
    waiting_sides: int = 6
    open_connections: int = 5
    refused_connections: int = 2
    failed_handshakes: int = 7
    cluster_health: tuple[bool, int] | None = None


def fake_source() -> FakeSource:
    m = Metrics()
    m.outcomes[Outcome.OK] = 10
    m.outcomes[Outcome.EXPIRED] = 2
    m.bytes_total = 123_456_789_012
    m.paired = 11
    m.pairing_s_sum = 4.5
    m.transfer_s_sum = 20.25
    return FakeSource(m)


def samples(body: bytes) -> dict[str, float]:
    """``name{labels}`` -> value, from the text format."""
    out = {}
    for line in body.decode().splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def test_text_format_names_and_values() -> None:
    source = fake_source()
    registry = metrics.make_registry(source)
    ctype, body = metrics.render_metrics(registry, None)
    assert ctype == "text/plain; version=0.0.4; charset=utf-8"
    text = body.decode()
    for name in RELAY_NAMES:
        assert f"# TYPE {name} " in text, name
    # The existing HELP strings are kept.
    assert "# HELP fastrelay_relays_total Relays finished, by outcome.\n" in text
    assert "# TYPE fastrelay_pairing_seconds summary\n" in text
    assert "# TYPE fastrelay_refused_connections_total counter\n" in text
    s = samples(body)
    assert s['fastrelay_relays_total{outcome="ok"}'] == 10
    assert s['fastrelay_relays_total{outcome="expired"}'] == 2
    for outcome in Outcome:
        assert f'fastrelay_relays_total{{outcome="{outcome.value}"}}' in s
    assert s["fastrelay_bytes_total"] == 123_456_789_012
    assert s["fastrelay_active_relays"] == 3
    assert s["fastrelay_waiting_relays"] == 1
    assert s["fastrelay_connections"] == 5
    assert s["fastrelay_waiting_sides"] == 6
    assert s["fastrelay_pairing_seconds_sum"] == 4.5
    assert s["fastrelay_pairing_seconds_count"] == 11
    assert s["fastrelay_transfer_seconds_sum"] == 20.25
    assert s["fastrelay_transfer_seconds_count"] == 11
    assert s["fastrelay_refused_connections_total"] == 2
    assert s["fastrelay_tls_handshake_failures_total"] == 7
    [build] = [k for k in s if k.startswith("fastrelay_build_info{")]
    assert re.fullmatch(r'fastrelay_build_info\{version="[^"]+"\}', build) and s[build] == 1
    # Standard process metrics.
    for name in ("process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds"):
        assert name in s, name
    # No accidental double suffix or _created samples.
    assert "_total_total" not in text and "_created" not in text
    # The text parses as Prometheus exposition.
    names = {f.name for f in text_string_to_metric_families(text)}
    assert "fastrelay_relays" in names  # the parser strips _total from counter families


def test_cluster_metrics_only_with_a_shared_ledger() -> None:
    source = fake_source()
    registry = metrics.make_registry(source)
    s = samples(metrics.render_metrics(registry, None)[1])
    assert "fastrelay_cluster_up" not in s and "fastrelay_cluster_errors_total" not in s
    source.cluster_health = (False, 4)
    s = samples(metrics.render_metrics(registry, None)[1])
    assert s["fastrelay_cluster_up"] == 0
    assert s["fastrelay_cluster_errors_total"] == 4
    source.cluster_health = (True, 4)
    assert samples(metrics.render_metrics(registry, None)[1])["fastrelay_cluster_up"] == 1


def test_values_are_read_at_scrape_time() -> None:
    source = fake_source()
    registry = metrics.make_registry(source)
    source.active_count = 42
    source.metrics.outcomes[Outcome.OK] += 1
    _, body = metrics.render_metrics(registry, "text/plain")
    s = samples(body)
    assert s["fastrelay_active_relays"] == 42
    assert s['fastrelay_relays_total{outcome="ok"}'] == 11


@pytest.mark.parametrize(
    "accept",
    [
        "application/openmetrics-text",
        "application/openmetrics-text; version=1.0.0; charset=utf-8",
        "application/openmetrics-text;version=1.0.0;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
        "text/plain, Application/OpenMetrics-Text",
    ],
)
def test_openmetrics_when_asked(accept: str) -> None:
    registry = metrics.make_registry(fake_source())
    ctype, body = metrics.render_metrics(registry, accept)
    assert ctype.startswith("application/openmetrics-text; version=1.0.0")
    text = body.decode()
    assert text.endswith("# EOF\n")
    assert 'fastrelay_relays_total{outcome="ok"} 10' in text
    assert "# TYPE fastrelay_relays counter" in text
    assert "fastrelay_refused_connections_total 2" in text
    assert "fastrelay_pairing_seconds_count 11" in text


@pytest.mark.parametrize(
    "accept", [None, "", "text/plain", "*/*", "application/openmetrics-text;q=0", "text/html"]
)
def test_text_otherwise(accept: str | None) -> None:
    ctype, body = metrics.render_metrics(metrics.make_registry(fake_source()), accept)
    assert ctype.startswith("text/plain; version=0.0.4")
    assert b"# EOF" not in body


def test_each_server_has_its_own_registry() -> None:
    a, b = fake_source(), fake_source()
    b.active_count = 99
    ra, rb = metrics.make_registry(a), metrics.make_registry(b)
    assert samples(metrics.render_metrics(ra, None)[1])["fastrelay_active_relays"] == 3
    assert samples(metrics.render_metrics(rb, None)[1])["fastrelay_active_relays"] == 99
