"""Request smuggling through bodies the handler does not read.

A request may carry a body (Content-Length or chunked) on a route whose
handler never reads one: ``GET /healthz``, ``GET /metrics``, a relay GET,
404 and 405 answers. The server must then either read (and drop) that body
before it reads the next head, or say ``Connection: close`` and close: it
must never parse body bytes as a request. Every body here is a whole mint
request with a workspace named ``smuggled-...``, and every request is
followed on the same connection (the same ``sendall``) by a marker request
to a ``/no-such-marker-...`` path, so that an executed body shows as a 201,
as one answer too many, or as a mint in the registry and the log.

Also: absolute-form targets, CONNECT, and the idle keep-alive close.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import select
import socket
import ssl
import time
import uuid
from collections.abc import Callable

import pytest
from conftest import SECRET, Relay
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_e2e_edge import (
    Response,
    active,
    connect,
    parse_responses,
    put_request,
    wait_claimed,
)

import fastrelay

MINT_PATH = "/api/exec-gateway/relay/create"
SMUGGLED_WS = "smuggled-"
METHODS = ("GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS")
FRAMINGS = ("none", "content-length", "chunked", "chunked-trailers", "cl+te")
ENDPOINTS = ("healthz", "metrics", "mint", "unknown", "relay-live", "relay-gone", "relay-badauth")


# --- requests ------------------------------------------------------------------------


def tag() -> str:
    return uuid.uuid4().hex[:12]


def smuggled_mint(workspace: str) -> bytes:
    """A complete keep-alive mint request: executed, it answers 201."""
    body = json.dumps(
        {"workspace_id": workspace, "source_exe_id": "src", "dest_exe_id": "dst"}
    ).encode()
    return (
        f"POST {MINT_PATH} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {SECRET}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def marker(name: str) -> bytes:
    """The request after the one under test: a 404 that closes."""
    return f"GET /{name} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()


def chunk(data: bytes, pieces: int = 2, trailers: bytes = b"") -> bytes:
    """``data`` as a chunked body of up to ``pieces`` chunks."""
    step = max(1, -(-len(data) // pieces))
    out = b"".join(
        f"{len(data[i : i + step]):x}\r\n".encode() + data[i : i + step] + b"\r\n"
        for i in range(0, len(data), step)
    )
    return out + b"0\r\n" + trailers + b"\r\n"


def request(
    method: str,
    target: str,
    body: bytes,
    framing: str,
    *,
    close: bool = False,
    headers: str = "",
) -> bytes:
    """One request with ``body`` framed as ``framing`` (``none`` sends no body)."""
    head = f"{method} {target} HTTP/1.1\r\nHost: x\r\n{headers}"
    if close:
        head += "Connection: close\r\n"
    if framing == "none":
        return (head + "\r\n").encode()
    if framing == "content-length":
        return (head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    if framing == "cl+te":
        head += f"Content-Length: {len(body)}\r\nTransfer-Encoding: chunked\r\n\r\n"
        return head.encode() + chunk(body)
    trailers = b"X-Trailer: t\r\n" if framing == "chunked-trailers" else b""
    return (head + "Transfer-Encoding: chunked\r\n\r\n").encode() + chunk(body, 2, trailers)


# --- reading -------------------------------------------------------------------------


def read_to_close(sock: socket.socket, timeout: float = 10.0) -> tuple[bytes, bool]:
    """Everything until the server closes, or ``timeout``: (bytes, closed).
    A reset or a TLS error counts as closed."""
    deadline = time.monotonic() + timeout
    chunks = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return b"".join(chunks), False
        sock.settimeout(left)
        try:
            b = sock.recv(65536)
        except TimeoutError:
            return b"".join(chunks), False
        except (ConnectionResetError, ssl.SSLError):
            return b"".join(chunks), True
        if not b:
            return b"".join(chunks), True
        chunks.append(b)


def parse_all(data: bytes, first_to_head: bool = False) -> list[Response]:
    """`parse_responses`, except that the first answer may be to a HEAD
    request: its Content-Length then announces a body that is not sent
    (unless the head was refused unparsed, when the server cannot know)."""
    end = data.find(b"\r\n\r\n") + 4
    rest = data[end:]
    if not first_to_head or end < 4 or (rest and not rest.startswith(b"HTTP/1.1 ")):
        return parse_responses(data)
    lines = data[: end - 4].decode("latin-1").split("\r\n")
    assert lines[0].startswith("HTTP/1.1 "), lines[0]
    fields = [line.split(":", 1) for line in lines[1:]]
    first = Response(int(lines[0].split()[1]), [(k.strip(), v.strip()) for k, v in fields], b"")
    return [first, *parse_responses(rest)]


def says_close(resp: Response) -> bool:
    value = resp.header("connection")
    return value is not None and "close" in value.lower()


def describe(resps: list[Response]) -> list[tuple[int, str | None, bytes]]:
    return [(r.status, r.header("connection"), r.body[:60]) for r in resps]


def assert_no_smuggled_mint(caplog: pytest.LogCaptureFixture, since: int = 0) -> None:
    """No "relay created" record for a smuggled workspace (from record ``since`` on)."""
    messages = [r.getMessage() for r in caplog.records[since:]]
    minted = [m for m in messages if "relay created" in m and SMUGGLED_WS in m]
    assert not minted, f"a smuggled mint was executed: {minted}"


def assert_answer_then_marker(
    resps: list[Response], closed: bool, first_status: set[int], *, client_close: bool
) -> Response:
    """Exactly the first answer, then either the marker's 404 (the body was
    read and dropped) or nothing (the first answer said Connection: close)."""
    assert closed, f"the server never closed: {describe(resps)}"
    assert resps, "no answer at all"
    first = resps[0]
    assert first.status in first_status, describe(resps)
    if client_close:
        assert len(resps) == 1, f"answers after a Connection: close request: {describe(resps)}"
    elif len(resps) == 1:
        assert says_close(first), f"closed without Connection: close: {describe(resps)}"
    else:
        assert len(resps) == 2, f"body bytes were read as a request: {describe(resps)}"
        assert resps[1].status != 408, f"the pipelined marker was never read: {describe(resps)}"
        assert resps[1].status == 404 and says_close(resps[1]), describe(resps)
        assert not says_close(first), describe(resps)
    return first


# --- the property --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    endpoint: str
    method: str
    framing: str
    close: bool


def expected_first(case: Case) -> set[int]:
    """The statuses the first request may get."""
    if case.framing == "cl+te":
        return {400}
    m, e = case.method, case.endpoint
    # Methods no route implements: a fix may refuse them before routing.
    unsupported = {405, 501} if m in ("DELETE", "OPTIONS", "HEAD") else set()
    if e in ("healthz", "metrics"):
        return {200} if m == "GET" else {405} | unsupported
    if e == "mint":
        # The body (a request, not JSON) is read by the mint: invalid JSON.
        return {400} if m == "POST" else {405} | unsupported
    if e == "unknown":
        return {404} | unsupported
    if m not in ("GET", "PUT"):
        return {405} | unsupported
    if e == "relay-live":
        return {200, 400} if m == "GET" else {200}
    return {410} if e == "relay-gone" else {401}


def target_of(case: Case, ticket: str) -> str:
    return {
        "healthz": "/healthz",
        "metrics": "/metrics",
        "mint": MINT_PATH,
        "unknown": f"/no-such-path-{tag()}",
    }.get(case.endpoint, f"/relay/{ticket}")


def auth_of(case: Case, ticket: str) -> str:
    if case.endpoint == "mint":
        return f"Authorization: Bearer {SECRET}\r\n"
    if case.endpoint.startswith("relay"):
        bearer = "rly_wrong" if case.endpoint == "relay-badauth" else ticket
        return f"Authorization: Bearer {bearer}\r\n"
    return ""


def claimed_or_answered(relay: Relay, r: fastrelay.Relay, sock: socket.socket) -> bool:
    """Wait until the GET on ``sock`` holds its side (True) or was answered
    without (False)."""
    deadline = time.monotonic() + 10
    while True:
        if relay.call(lambda: r.session.get_claimed):
            return True
        readable, _, _ = select.select([sock], [], [], 0.005)
        if readable:
            return False
        assert time.monotonic() < deadline, "the GET neither claimed nor was answered"


def run_case(relay: Relay, case: Case) -> None:
    smuggled = smuggled_mint(f"{SMUGGLED_WS}{tag()}")
    mark = marker(f"no-such-marker-{tag()}")
    live = relay.create(workspace_id=f"live-{tag()}") if case.endpoint == "relay-live" else None
    ticket = live.ticket if live is not None else f"rly_{'A' * 43}"
    first = request(
        case.method,
        target_of(case, ticket),
        smuggled,
        case.framing,
        close=case.close,
        headers=auth_of(case, ticket),
    )
    statuses = expected_first(case)
    head_only = case.method == "HEAD"
    transfer = live is not None and case.method in ("GET", "PUT") and case.framing != "cl+te"
    if not transfer:
        with connect(relay) as sock:
            sock.sendall(first + mark)
            raw, closed = read_to_close(sock)
        resps = parse_all(raw, head_only)
        assert_answer_then_marker(resps, closed, statuses, client_close=case.close)
        return
    assert live is not None
    payload = f"payload-{tag()}".encode()
    if case.method == "PUT":
        # The body is the upload: the GET gets it byte for byte, the PUT's
        # answer closes (the contract: one PUT per connection).
        with connect(relay) as get:
            get.sendall(
                f"GET /relay/{ticket} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ticket}\r\n"
                f"Connection: close\r\n\r\n".encode()
            )
            wait_claimed(relay, live, "get_claimed")
            with connect(relay) as put:
                put.sendall(first + mark)
                put_raw, put_closed = read_to_close(put)
            get_raw, get_closed = read_to_close(get)
        [put_resp] = parse_responses(put_raw)
        assert put_closed and put_resp.status == 200, describe([put_resp])
        want = smuggled if case.framing != "none" else b""
        assert put_resp.json() == {"bytes": len(want), "status": "ok"}
        [got] = parse_responses(get_raw)
        assert get_closed and got.status == 200 and got.body == want
        return
    # A GET carrying a body: the transfer, then the body must not be a request.
    with connect(relay) as get:
        get.sendall(first + mark)
        if claimed_or_answered(relay, live, get):
            with connect(relay) as put:
                put.sendall(put_request(ticket, payload))
                put_raw, _ = read_to_close(put)
            assert [p.status for p in parse_responses(put_raw)] == [200], put_raw
        get_raw, get_closed = read_to_close(get)
    resps = parse_responses(get_raw)
    answer = assert_answer_then_marker(resps, get_closed, statuses, client_close=case.close)
    if answer.status == 200:
        assert answer.body == payload
    else:  # refused for its body: then it must close
        assert case.framing != "none" and (case.close or says_close(answer)), describe(resps)


CASES = st.builds(
    Case,
    endpoint=st.sampled_from(ENDPOINTS),
    method=st.sampled_from(METHODS),
    framing=st.sampled_from(FRAMINGS),
    close=st.booleans(),
)


def test_unread_bodies_are_never_requests(relay: Relay, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="fastrelay")

    @settings(
        max_examples=150,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
    )
    @given(case=CASES)
    def one(case: Case) -> None:
        before, since = active(relay), len(caplog.records)
        run_case(relay, case)
        assert_no_smuggled_mint(caplog, since)
        # A live ticket left unused (a refused or a 405 request) still counts.
        left = case.endpoint == "relay-live" and (
            case.method not in ("GET", "PUT") or case.framing == "cl+te"
        )
        assert active(relay) == before + left, "a smuggled body minted a relay"

    one()


@pytest.mark.parametrize("target", ["/healthz", "/metrics", MINT_PATH, "/relay/rly_x", "/nope"])
def test_content_length_with_transfer_encoding_is_400_and_close(
    relay: Relay, caplog: pytest.LogCaptureFixture, target: str
) -> None:
    caplog.set_level(logging.INFO, logger="fastrelay")
    method = "POST" if target == MINT_PATH else "GET"
    data = request(method, target, smuggled_mint(f"{SMUGGLED_WS}{tag()}"), "cl+te")
    with connect(relay) as sock:
        sock.sendall(data + marker(f"no-such-marker-{tag()}"))
        raw, closed = read_to_close(sock)
    resps = parse_responses(raw)
    assert [r.status for r in resps] == [400] and says_close(resps[0]), describe(resps)
    assert closed
    assert_no_smuggled_mint(caplog)


# --- regressions ---------------------------------------------------------------------


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_healthz_body_holding_a_mint_is_not_executed(
    any_relay: Relay, caplog: pytest.LogCaptureFixture, framing: str
) -> None:
    relay = any_relay
    caplog.set_level(logging.INFO, logger="fastrelay")
    before = active(relay)
    data = request("GET", "/healthz", smuggled_mint(f"{SMUGGLED_WS}{tag()}"), framing)
    with connect(relay) as sock:
        sock.sendall(data + marker(f"no-such-marker-{tag()}"))
        raw, closed = read_to_close(sock)
    resps = parse_responses(raw)
    first = assert_answer_then_marker(resps, closed, {200}, client_close=False)
    assert first.body == b"ok\n"
    assert active(relay) == before
    assert_no_smuggled_mint(caplog)


def test_relay_get_body_is_not_a_request_after_the_transfer(
    relay: Relay, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="fastrelay")
    r = relay.create(workspace_id=f"live-{tag()}")
    before = active(relay)
    payload = b"relayed bytes"
    data = request(
        "GET",
        f"/relay/{r.ticket}",
        smuggled_mint(f"{SMUGGLED_WS}{tag()}"),
        "content-length",
        headers=f"Authorization: Bearer {r.ticket}\r\n",
    )
    with connect(relay) as get:
        get.sendall(data + marker(f"no-such-marker-{tag()}"))
        wait_claimed(relay, r, "get_claimed")
        with connect(relay) as put:
            put.sendall(put_request(r.ticket, payload))
            put_raw, _ = read_to_close(put)
        assert [p.status for p in parse_responses(put_raw)] == [200], put_raw
        get_raw, closed = read_to_close(get)
    resps = parse_responses(get_raw)
    first = assert_answer_then_marker(resps, closed, {200}, client_close=False)
    assert first.body == payload
    relay.wait_done(r)
    assert active(relay) == before - 1  # the relay ended; nothing new was minted
    assert_no_smuggled_mint(caplog)


def test_absolute_form_healthz(any_relay: Relay) -> None:
    relay = any_relay
    data = f"GET {relay.base}/healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    with connect(relay) as sock:
        sock.sendall(data.encode())
        raw, closed = read_to_close(sock)
    assert [(r.status, r.body) for r in parse_responses(raw)] == [(200, b"ok\n")]
    assert closed


def test_absolute_form_relay_pairs_and_transfers(relay: Relay) -> None:
    r = relay.create(workspace_id=f"abs-{tag()}")
    url, auth = relay.url(r.ticket), f"Authorization: Bearer {r.ticket}\r\n"
    payload = b"absolute-form body"
    with connect(relay) as get:
        get.sendall(request("GET", url, b"", "none", close=True, headers=auth))
        if not claimed_or_answered(relay, r, get):
            raise AssertionError(f"the GET was answered unpaired: {read_to_close(get)[0]!r}")
        with connect(relay) as put:
            put.sendall(request("PUT", url, payload, "content-length", close=True, headers=auth))
            put_raw, _ = read_to_close(put)
        get_raw, get_closed = read_to_close(get)
    [put_resp] = parse_responses(put_raw)
    assert (put_resp.status, put_resp.json()) == (200, {"bytes": len(payload), "status": "ok"})
    [got] = parse_responses(get_raw)
    assert (got.status, got.body) == (200, payload) and get_closed
    relay.wait_done(r)


def test_connect_is_refused_and_closed(any_relay: Relay) -> None:
    with connect(any_relay) as sock:
        sock.sendall(
            b"CONNECT 127.0.0.1:443 HTTP/1.1\r\nHost: 127.0.0.1:443\r\n\r\n"
            + marker(f"no-such-marker-{tag()}")
        )
        raw, closed = read_to_close(sock)
    resps = parse_responses(raw)
    assert [r.status for r in resps] in ([405], [400]), describe(resps)
    assert says_close(resps[0]), describe(resps)
    assert closed


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_idle_keep_alive_connection_is_closed_silently(
    relay_factory: Callable[..., Relay], loop_kind: str, tls: bool
) -> None:
    relay = relay_factory(loop_kind, tls=tls, header_timeout_s=0.5)
    with connect(relay) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        raw = b""
        deadline = time.monotonic() + 10
        while not raw.endswith(b"ok\n"):  # the whole answer, and no more
            assert time.monotonic() < deadline, raw
            b = sock.recv(65536)
            assert b, f"closed before the answer was read: {raw!r}"
            raw += b
        [resp] = parse_responses(raw)
        assert resp.status == 200 and not says_close(resp)
        rest, closed = read_to_close(sock, timeout=10)
    assert closed, "the idle connection was never closed"
    assert rest == b"", f"bytes sent on an idle connection's close: {rest!r}"
