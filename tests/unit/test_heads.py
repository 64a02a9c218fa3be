"""Request heads -> intents, and hand-built response heads."""

from __future__ import annotations

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastrelay.core.errors import (
    BadRequest,
    HeadTooLarge,
    MethodNotAllowed,
    NotFound,
    NotImplementedFraming,
    RelayError,
    TicketNotFound,
)
from fastrelay.core.heads import (
    Route,
    download_head,
    error_response,
    find_head_end,
    last_chunk,
    parse_head,
    route,
)

PUT = (
    b"PUT /relay/rly_x HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer rly_x\r\n"
    b"Content-Length: 5\r\nExpect: 100-continue\r\nContent-Type: text/csv\r\n\r\n"
)


def test_put_head() -> None:
    head = parse_head(PUT)
    assert route(head) == (Route.RELAY_PUT, "rly_x")
    assert head.content_length == 5 and not head.chunked and head.expect_continue
    assert head.header("content-type") == "text/csv"
    assert head.header("authorization") == "Bearer rly_x"
    assert head.keep_alive and head.has_body


def test_find_head_end_whole_bytewise_and_with_trailing_body() -> None:
    assert find_head_end(PUT + b"hello", 16384) == len(PUT)
    for i in range(len(PUT)):
        assert find_head_end(PUT[:i], 16384) is None
    assert find_head_end(b"GET / HTTP/1.1\nHost: h\n\n", 16384) == 24


def test_head_too_large() -> None:
    big = b"GET / HTTP/1.1\r\nX: " + b"a" * 20000
    with pytest.raises(HeadTooLarge):
        find_head_end(big, 16384)
    with pytest.raises(HeadTooLarge):
        find_head_end(big + b"\r\n\r\n", 16384)


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        (
            b"PUT /relay/x HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n",
            BadRequest,
        ),
        (
            b"PUT /relay/x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            NotImplementedFraming,
        ),
        (b"PUT /relay/x HTTP/1.1\r\nHost: h\r\nContent-Length: -1\r\n\r\n", BadRequest),
        (
            b"PUT /relay/x HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            BadRequest,
        ),
        (
            b"PUT /relay/x HTTP/1.1\r\nHost: h\r\nContent-Length: 99999999999999999999\r\n\r\n",
            BadRequest,
        ),
        (b"GARBAGE\r\n\r\n", BadRequest),
        (b"GET /relay/x HTTP/1.1\r\n\r\n", BadRequest),  # no Host on 1.1
    ],
)
def test_bad_heads(raw: bytes, error: type[RelayError]) -> None:
    with pytest.raises(error):
        parse_head(raw)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"GET /relay/t", (Route.RELAY_GET, "t")),
        (b"PUT /relay/t?x=1", (Route.RELAY_PUT, "t")),
        (b"POST /api/exec-gateway/relay/create", (Route.MINT, None)),
        (b"GET /healthz", (Route.HEALTH, None)),
        (b"GET /metrics", (Route.METRICS, None)),
    ],
)
def test_routes(line: bytes, expected: tuple[Route, str | None]) -> None:
    assert route(parse_head(line + b" HTTP/1.1\r\nHost: h\r\n\r\n")) == expected


@pytest.mark.parametrize(
    ("line", "error"),
    [
        (b"DELETE /relay/t", MethodNotAllowed),
        (b"POST /relay/t", MethodNotAllowed),
        (b"GET /api/exec-gateway/relay/create", MethodNotAllowed),
        (b"GET /relay/", NotFound),
        (b"GET /relay/a/b", NotFound),
        (b"GET /", NotFound),
    ],
)
def test_route_errors(line: bytes, error: type[RelayError]) -> None:
    with pytest.raises(error):
        route(parse_head(line + b" HTTP/1.1\r\nHost: h\r\n\r\n"))


def test_http10_keep_alive_rules() -> None:
    assert not parse_head(b"GET /healthz HTTP/1.0\r\n\r\n").keep_alive
    assert parse_head(b"GET /healthz HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").keep_alive
    assert not parse_head(
        b"GET /healthz HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
    ).keep_alive


def parse_response(raw: bytes) -> tuple[h11.Response, bytes]:
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("Host", "h")]))
    conn.receive_data(raw)
    conn.receive_data(b"")
    resp = conn.next_event()
    assert isinstance(resp, h11.Response)
    body = b""
    while True:
        ev = conn.next_event()
        if isinstance(ev, h11.Data):
            body += ev.data
        else:
            break
    return resp, body


def test_error_responses_are_valid_http_with_exact_bodies() -> None:
    resp, body = parse_response(error_response(TicketNotFound(), close=True))
    assert resp.status_code == 410 and body == b"ticket not found or expired\n"
    assert (b"content-type", b"text/plain; charset=utf-8") in resp.headers
    resp, _ = parse_response(error_response(MethodNotAllowed(), close=True))
    assert (b"allow", b"GET, PUT") in resp.headers


def test_download_head_framing() -> None:
    assert b"Content-Length: 7\r\n" in download_head([], 7)
    head = download_head(
        [
            ("content-type", "text/csv"),
            ("content-disposition", 'attachment; filename="a.csv"'),
            ("repr-digest", "sha-256=:AAAA:"),
        ],
        None,
    )
    assert b"Transfer-Encoding: chunked\r\n" in head
    assert b"Content-Type: text/csv\r\n" in head
    assert b'Content-Disposition: attachment; filename="a.csv"\r\n' in head
    assert b"Repr-Digest: sha-256=:AAAA:\r\n" in head
    assert b"Connection: close" not in head  # a whole body keeps the connection
    assert b"application/octet-stream" in download_head([], 0)
    close_delimited = download_head([], None, close_delimited=True)
    assert b"chunked" not in close_delimited and b"Content-Length" not in close_delimited
    assert b"Connection: close\r\n" in close_delimited


def test_last_chunk_passes_on_only_the_digest_trailer() -> None:
    trailers = [("repr-digest", b"sha-256=:AAAA:"), ("x-other", b"1"), ("repr-digest", b"\xff")]
    assert last_chunk(trailers) == b"0\r\nRepr-Digest: sha-256=:AAAA:\r\n\r\n"
    assert last_chunk([]) == b"0\r\n\r\n"


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_give_a_head_or_a_relay_error(data: bytes) -> None:
    try:
        end = find_head_end(data, 16384)
        if end is not None:
            route(parse_head(data[:end]))
    except RelayError as err:
        assert 400 <= err.status < 600


@pytest.mark.parametrize("byte", [b"\x00", b"\x01", b"\x08", b"\x0e", b"\x1b", b"\x1f", b"\x7f"])
def test_control_bytes_in_a_value_are_refused(byte: bytes) -> None:
    raw = b"GET /healthz HTTP/1.1\r\nHost: h\r\nX-A: a" + byte + b"b\r\n\r\n"
    with pytest.raises(BadRequest) as exc:
        parse_head(raw)
    assert exc.value.status == 400


def test_tab_and_obs_text_in_a_value_are_fine() -> None:
    head = parse_head(b"GET /healthz HTTP/1.1\r\nHost: h\r\nX-A: a\tb \xe9\r\n\r\n")
    assert head.header("x-a") == "a\tb \xe9"
