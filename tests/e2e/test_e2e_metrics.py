"""``/metrics`` after real requests: mint outcomes, relay refusals by status,
and the pairing/transfer histograms with the numbers one relay produced."""

from __future__ import annotations

import json
import math
import subprocess
import time

from conftest import Relay
from prometheus_client.parser import text_string_to_metric_families
from test_e2e_transfer import AUTH, finish

import fastrelay
from fastrelay.core.observe import PAIRING_BUCKETS_S, TRANSFER_BUCKETS_S

PAYLOAD = b"m" * 300_000
UNKNOWN_TICKET = "rly_" + "A" * 43  # well-formed, never minted


def scrape(relay: Relay, accept: str = "text/plain") -> dict[str, float]:
    """``name{labels}`` -> value, parsed as Prometheus does."""
    status, headers, body = relay.raw(
        f"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: {accept}\r\nConnection: close\r\n\r\n".encode()
    )
    assert status == 200, body
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


def relay_get(relay: Relay, ticket: str, bearer: str) -> int:
    status, _, _ = relay.raw(
        f"GET /relay/{ticket} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {bearer}\r\n"
        "Connection: close\r\n\r\n".encode()
    )
    return status


def buckets(s: dict[str, float], name: str) -> list[tuple[float, float]]:
    """``(le, cumulative count)`` of one histogram, in bound order."""
    prefix = f'{name}_bucket{{le="'
    found = [(float(k[len(prefix) : -2]), v) for k, v in s.items() if k.startswith(prefix)]
    return sorted(found)


def assert_one_observation(
    s: dict[str, float], name: str, bounds: tuple[float, ...], most_s: float
) -> None:
    """One value observed: every bucket from the first bound >= it counts 1."""
    got = buckets(s, name)
    assert [le for le, _ in got] == [*bounds, math.inf]
    value = s[f"{name}_sum"]
    assert 0 <= value <= most_s
    assert s[f"{name}_count"] == 1
    for le, n in got:
        assert n == (1 if value <= le else 0), (name, le, n, value)


def test_scrape_after_refusals_and_one_relay(relay: Relay) -> None:
    before = scrape(relay)
    assert before['fastrelay_mints_total{outcome="created"}'] == 0
    assert before['fastrelay_relay_refusals_total{status="410"}'] == 0
    assert before["fastrelay_pairing_seconds_count"] == 0
    assert before['fastrelay_pairing_seconds_bucket{le="+Inf"}'] == 0

    # A mint with a wrong secret, and one whose ttl_seconds is no whole number.
    assert relay.mint_http(secret="wrong") == (401, b"unauthorized\n")
    bad = {"workspace_id": "w", "source_exe_id": "s", "dest_exe_id": "d", "ttl_seconds": 1.5}
    assert relay.mint_http(bad) == (
        400,
        b'{"error":"invalid JSON: ttl_seconds must be a whole number of seconds"}\n',
    )
    # A GET for a ticket that does not exist (410), and two with a bearer that
    # is not the URL's ticket (401).
    assert relay_get(relay, UNKNOWN_TICKET, UNKNOWN_TICKET) == 410
    assert relay_get(relay, UNKNOWN_TICKET, "rly_other") == 401
    assert relay_get(relay, UNKNOWN_TICKET, "rly_other") == 401

    # One successful relay, minted over HTTP.
    started = time.monotonic()
    status, body = relay.mint_http()
    assert status == 201
    doc = json.loads(body)
    live: fastrelay.Relay = relay.call(lambda: relay.registry.lookup(doc["ticket"]))
    get = relay.popen(
        "-fsS",
        "-H",
        AUTH.format(doc["ticket"]),
        doc["download_url"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    put = relay.curl(
        "-fsS", "-H", AUTH.format(doc["ticket"]), "-T", "-", doc["upload_url"], input=PAYLOAD
    )
    assert put.returncode == 0, put.stderr
    rc, out, err = finish(get)
    assert rc == 0 and out == PAYLOAD, err
    relay.wait_done(live)  # its outcome is recorded when it ends
    elapsed = time.monotonic() - started

    s = scrape(relay)
    mints = {k: v for k, v in s.items() if k.startswith("fastrelay_mints_total")}
    assert mints == {
        'fastrelay_mints_total{outcome="created"}': 1,
        'fastrelay_mints_total{outcome="unauthorized"}': 1,
        'fastrelay_mints_total{outcome="invalid"}': 1,
        'fastrelay_mints_total{outcome="too_large"}': 0,
        'fastrelay_mints_total{outcome="cap_reached"}': 0,
        'fastrelay_mints_total{outcome="disabled"}': 0,
        'fastrelay_mints_total{outcome="cluster_unavailable"}': 0,
        'fastrelay_mints_total{outcome="timeout"}': 0,
        'fastrelay_mints_total{outcome="error"}': 0,
    }
    assert s['fastrelay_relay_refusals_total{status="410"}'] == 1
    assert s['fastrelay_relay_refusals_total{status="401"}'] == 2
    assert s['fastrelay_relay_refusals_total{status="423"}'] == 0
    # The mint's 401 is a mint outcome, not a relay refusal; the relay itself
    # was no refusal at all.
    refusals = sum(v for k, v in s.items() if k.startswith("fastrelay_relay_refusals_total"))
    assert refusals == 3
    assert s['fastrelay_relays_total{outcome="ok"}'] == 1
    assert s["fastrelay_bytes_total"] == len(PAYLOAD)
    assert_one_observation(s, "fastrelay_pairing_seconds", PAIRING_BUCKETS_S, elapsed)
    assert_one_observation(s, "fastrelay_transfer_seconds", TRANSFER_BUCKETS_S, elapsed)
    assert s["fastrelay_pairing_seconds_sum"] + s["fastrelay_transfer_seconds_sum"] <= elapsed


def test_openmetrics_scrape_has_the_histograms(relay: Relay) -> None:
    assert relay_get(relay, UNKNOWN_TICKET, UNKNOWN_TICKET) == 410
    status, headers, body = relay.raw(
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: application/openmetrics-text\r\n"
        b"Connection: close\r\n\r\n"
    )
    assert status == 200 and headers["content-type"].startswith("application/openmetrics-text")
    text = body.decode()
    assert text.endswith("# EOF\n")
    assert "# TYPE fastrelay_pairing_seconds histogram\n" in text
    assert "# TYPE fastrelay_transfer_seconds histogram\n" in text
    assert 'fastrelay_pairing_seconds_bucket{le="+Inf"} 0.0\n' in text
    assert 'fastrelay_relay_refusals_total{status="410"} 1.0\n' in text
