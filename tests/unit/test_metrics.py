"""`fastrelay.server.metrics`: the relay's numbers through prometheus_client."""

from __future__ import annotations

import dataclasses
import re

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fastrelay.core import errors
from fastrelay.core.heads import RequestHead, parse_head
from fastrelay.core.observe import (
    MINT_OUTCOMES,
    PAIRING_BUCKETS_S,
    RELAY_REFUSAL_STATUSES,
    TRANSFER_BUCKETS_S,
    Histogram,
    Metrics,
    mint_outcome,
)
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
    "fastrelay_mints_total",
    "fastrelay_relay_refusals_total",
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
    # 11 paired relays; binary fractions, so the sums are exact.
    for waited in [0.0625] * 8 + [1.0] * 2 + [2.0]:  # sum 4.5
        m.pairing.observe(waited)
    for took in [0.5] * 10 + [15.25]:  # sum 20.25
        m.transfer.observe(took)
    m.mints["created"] = 9
    m.mints["unauthorized"] = 4
    m.relay_refusals[410] = 6
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
    assert "# TYPE fastrelay_pairing_seconds histogram\n" in text
    assert "# TYPE fastrelay_transfer_seconds histogram\n" in text
    assert "# TYPE fastrelay_mints_total counter\n" in text
    assert "# TYPE fastrelay_relay_refusals_total counter\n" in text
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
    # Cumulative buckets; a value on a bound counts in that bound's bucket.
    pairing = {'le="0.05"': 0, 'le="0.1"': 8, 'le="0.5"': 8, 'le="1.0"': 10, 'le="2.5"': 11}
    for le, n in pairing.items():
        assert s[f"fastrelay_pairing_seconds_bucket{{{le}}}"] == n, le
    assert s['fastrelay_pairing_seconds_bucket{le="86400.0"}'] == 11
    assert s['fastrelay_pairing_seconds_bucket{le="+Inf"}'] == 11
    transfer = {'le="0.25"': 0, 'le="1.0"': 10, 'le="10.0"': 10, 'le="30.0"': 11}
    for le, n in transfer.items():
        assert s[f"fastrelay_transfer_seconds_bucket{{{le}}}"] == n, le
    assert s['fastrelay_transfer_seconds_bucket{le="+Inf"}'] == 11
    assert len([k for k in s if k.startswith("fastrelay_pairing_seconds_bucket")]) == (
        len(PAIRING_BUCKETS_S) + 1
    )
    assert len([k for k in s if k.startswith("fastrelay_transfer_seconds_bucket")]) == (
        len(TRANSFER_BUCKETS_S) + 1
    )
    # Every mint outcome and the usual refusal statuses exist from the start.
    assert s['fastrelay_mints_total{outcome="created"}'] == 9
    assert s['fastrelay_mints_total{outcome="unauthorized"}'] == 4
    assert {k for k in s if k.startswith("fastrelay_mints_total")} == {
        f'fastrelay_mints_total{{outcome="{o}"}}' for o in MINT_OUTCOMES
    }
    assert s['fastrelay_relay_refusals_total{status="410"}'] == 6
    assert s['fastrelay_relay_refusals_total{status="401"}'] == 0
    assert {k for k in s if k.startswith("fastrelay_relay_refusals_total")} == {
        f'fastrelay_relay_refusals_total{{status="{st}"}}' for st in RELAY_REFUSAL_STATUSES
    }
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
    assert "# TYPE fastrelay_pairing_seconds histogram" in text
    assert 'fastrelay_pairing_seconds_bucket{le="+Inf"} 11' in text
    assert 'fastrelay_relay_refusals_total{status="410"} 6' in text


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


# --- histograms, mint outcomes and refusals (pure: no server, no clock) ------------


def test_histogram_buckets_are_cumulative_and_inclusive() -> None:
    h = Histogram((0.1, 1.0, 10.0))
    for value in (0.0, 0.1, 0.10001, 1.0, 9.0, 10.0, 10.5, 1e9):
        h.observe(value)
    assert h.cumulative() == [(0.1, 2), (1.0, 4), (10.0, 6), (float("inf"), 8)]
    assert h.count == 8
    assert h.sum == pytest.approx(0.0 + 0.1 + 0.10001 + 1.0 + 9.0 + 10.0 + 10.5 + 1e9)
    with pytest.raises(AssertionError):
        Histogram((1.0, 0.5))


def test_bucket_bounds_cover_the_workload() -> None:
    # Pairing: from a few ms up to the largest default --max-ttl.
    assert PAIRING_BUCKETS_S[0] <= 0.005 and PAIRING_BUCKETS_S[-1] == 86400
    assert 300 in PAIRING_BUCKETS_S  # the default --ttl: "waited the whole TTL"
    # Transfer: from a millisecond to hours.
    assert TRANSFER_BUCKETS_S[0] <= 0.001 and TRANSFER_BUCKETS_S[-1] >= 4 * 3600
    for bounds in (PAIRING_BUCKETS_S, TRANSFER_BUCKETS_S):
        assert list(bounds) == sorted(set(bounds)) and len(bounds) <= 25


def test_paired_relays_feed_both_histograms() -> None:
    m = Metrics()
    m.pairing.observe(0.002)
    m.transfer.observe(7200.0)
    assert (m.paired, m.pairing_s_sum, m.transfer_s_sum) == (1, 0.002, 7200.0)


def head(method: str, path: str) -> RequestHead:
    return parse_head(f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())


MINT_PATH = "/api/exec-gateway/relay/create"


@pytest.mark.parametrize(
    ("err", "outcome"),
    [
        (errors.MintUnauthorized(), "unauthorized"),
        (errors.InvalidJSON("ttl_seconds must be a whole number of seconds"), "invalid"),
        (errors.MissingIds(), "invalid"),
        (errors.InvalidField("ttl_seconds", "ttl_seconds must be at most 86400"), "invalid"),
        (errors.BadRequest("bad chunk size"), "invalid"),
        (errors.MintBodyTooLarge(), "too_large"),
        (errors.WorkspaceCapReached(), "cap_reached"),
        (errors.MintDisabled(), "disabled"),
        (errors.MintDisabled("relay: too many pending relays"), "disabled"),
        (errors.ClusterUnavailable(), "cluster_unavailable"),
        (errors.RequestTimeout(), "timeout"),
        (errors.InternalError(), "error"),
    ],
)
def test_mint_refusals_are_counted_by_outcome(err: errors.RelayError, outcome: str) -> None:
    assert mint_outcome(err) == outcome
    m = Metrics()
    m.refused(err, head("POST", MINT_PATH))
    assert m.mints == {o: int(o == outcome) for o in MINT_OUTCOMES}
    assert set(m.relay_refusals.values()) == {0}


def test_created_mints() -> None:
    m = Metrics()
    m.minted()
    m.minted()
    assert m.mints["created"] == 2


@pytest.mark.parametrize(
    ("err", "method", "status"),
    [
        (errors.Unauthorized(), "PUT", 401),
        (errors.TicketNotFound(), "GET", 410),
        (errors.SideAlreadyClaimed("PUT"), "PUT", 423),
        (errors.PairingTimeout("GET"), "PUT", 408),
        (errors.PayloadTooLarge(10, 5), "PUT", 413),
        (errors.ServedElsewhere(), "GET", 421),
        (errors.UpstreamFailed(errors.PayloadTooLarge(10, 5)), "GET", 502),
        (errors.ShuttingDown(), "GET", 503),
        (errors.ClusterUnavailable(), "GET", 503),  # a signed ticket's first arrival
        (errors.MethodNotAllowed(), "POST", 405),
        (errors.InternalError(), "GET", 500),
    ],
)
def test_relay_refusals_are_counted_by_status(
    err: errors.RelayError, method: str, status: int
) -> None:
    m = Metrics()
    m.refused(err, head(method, "/relay/rly_x"))
    assert m.relay_refusals[status] == 1
    assert sum(m.relay_refusals.values()) == 1
    assert set(m.mints.values()) == {0}


def test_other_routes_and_headless_refusals_are_not_counted() -> None:
    m = Metrics()
    m.refused(errors.NotFound(), head("GET", "/nope"))
    m.refused(errors.MethodNotAllowed("GET"), head("POST", "/healthz"))
    m.refused(errors.MethodNotAllowed("POST"), head("GET", MINT_PATH))  # not a mint request
    m.refused(errors.BadRequest(), None)  # a head that did not parse
    assert set(m.mints.values()) == {0} and set(m.relay_refusals.values()) == {0}


def test_label_sets_stay_bounded_whatever_the_client_sends() -> None:
    m = Metrics()
    for i in range(1000):
        m.refused(errors.TicketNotFound(), head("GET", f"/relay/rly_{i}"))
        m.refused(errors.InvalidJSON(f"detail {i}"), head("POST", MINT_PATH))
    assert set(m.mints) == set(MINT_OUTCOMES)
    assert set(m.relay_refusals) == set(RELAY_REFUSAL_STATUSES)
    assert (m.relay_refusals[410], m.mints["invalid"]) == (1000, 1000)
