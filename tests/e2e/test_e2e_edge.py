"""Edge attacks over real loopback sockets: framing, folding, repeated
headers, hostile mint bodies, log injection, copied headers, and a fuzzer.

Every case checks the exact answer and then that the server still relays
bytes end to end (`assert_normal_relay_works`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import socket
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from conftest import SECRET, Relay
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastrelay
from fastrelay.core.tickets import ticket_id

MINT = b"POST /api/exec-gateway/relay/create HTTP/1.1\r\n"
MINT_AUTH = f"Authorization: Bearer {SECRET}\r\n".encode()


# --- a strict client ---------------------------------------------------------------


@dataclasses.dataclass
class Response:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k.lower() == name.lower()]
        assert len(values) <= 1, f"repeated {name} in a response: {self.headers}"
        return values[0] if values else None

    def json(self) -> Any:
        return json.loads(self.body)


_STATUS = re.compile(rb"HTTP/1\.1 ([1-5][0-9][0-9]) [^\r\n]*\r\n")
_FIELD = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+): ?([^\r\n]*)\r\n")


def parse_responses(data: bytes) -> list[Response]:
    """Every response in ``data``, strictly: an HTTP/1.1 status line, CRLF
    header lines, and a body framed exactly by Content-Length or chunked.
    Interim 1xx answers are skipped. Trailing garbage is an error."""
    out: list[Response] = []
    pos = 0
    while pos < len(data):
        m = _STATUS.match(data, pos)
        assert m, f"bad status line at {pos}: {data[pos : pos + 80]!r}"
        status = int(m.group(1))
        pos = m.end()
        headers: list[tuple[str, str]] = []
        while not data.startswith(b"\r\n", pos):
            f = _FIELD.match(data, pos)
            assert f, f"bad header line at {pos}: {data[pos : pos + 80]!r}"
            headers.append((f.group(1).decode(), f.group(2).decode("latin-1").strip()))
            pos = f.end()
        pos += 2
        resp = Response(status, headers, b"")
        if 100 <= status < 200:
            continue
        te, cl = resp.header("transfer-encoding"), resp.header("content-length")
        if te is not None:
            assert te == "chunked" and cl is None, headers
            body = bytearray()
            while True:
                end = data.index(b"\r\n", pos)
                size = int(data[pos:end].split(b";")[0], 16)
                pos = end + 2
                if size == 0:
                    assert data.startswith(b"\r\n", pos), data[pos : pos + 40]
                    pos += 2
                    break
                body += data[pos : pos + size]
                assert data.startswith(b"\r\n", pos + size)
                pos += size + 2
            resp.body = bytes(body)
        else:
            assert cl is not None and cl.isdigit(), f"no Content-Length: {headers}"
            n = int(cl)
            assert len(data) - pos >= n, f"body short: want {n}, have {len(data) - pos}"
            resp.body = data[pos : pos + n]
            pos += n
        out.append(resp)
    return out


def connect(relay: Relay, timeout: float = 5.0) -> socket.socket:
    sock = relay.connect()
    sock.settimeout(timeout)
    return sock


def read_until_close(sock: socket.socket, timeout: float = 5.0) -> tuple[bytes, bool]:
    """Read until the server closes or ``timeout`` passes: (bytes, closed)."""
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
        except ConnectionResetError:
            return b"".join(chunks), True
        if not b:
            return b"".join(chunks), True
        chunks.append(b)


def exchange(relay: Relay, data: bytes, timeout: float = 5.0) -> tuple[list[Response], bool]:
    """Send ``data`` on a fresh connection; the responses, and whether the
    server closed the connection within ``timeout``."""
    with connect(relay) as sock:
        sock.sendall(data)
        raw, closed = read_until_close(sock, timeout)
    return parse_responses(raw), closed


def assert_400_and_close(relay: Relay, data: bytes) -> Response:
    resps, closed = exchange(relay, data)
    assert [r.status for r in resps] == [400], [(r.status, r.body) for r in resps]
    assert closed, "connection left open after a 400"
    return resps[0]


# --- relays over raw sockets -------------------------------------------------------


def wait_claimed(relay: Relay, r: fastrelay.Relay, attr: str) -> None:
    deadline = time.monotonic() + 10
    while not relay.call(lambda: getattr(r.session, attr)):
        assert time.monotonic() < deadline, f"{attr} never became true"
        time.sleep(0.005)


def get_head(ticket: str, auth: str | None = None) -> bytes:
    return (
        f"GET /relay/{ticket} HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {auth or ticket}\r\nConnection: close\r\n\r\n"
    ).encode()


def put_request(ticket: str, data: bytes, extra: bytes = b"") -> bytes:
    return (
        (
            f"PUT /relay/{ticket} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ticket}\r\n"
            f"Content-Length: {len(data)}\r\nConnection: close\r\n"
        ).encode()
        + extra
        + b"\r\n"
        + data
    )


def waiting_get_socket(relay: Relay, r: fastrelay.Relay) -> socket.socket:
    sock = connect(relay)
    sock.sendall(get_head(r.ticket))
    wait_claimed(relay, r, "get_claimed")
    return sock


def relay_put(
    relay: Relay, r: fastrelay.Relay, put_bytes: bytes
) -> tuple[list[Response], bytes, bool]:
    """With a GET waiting on ``r``, send ``put_bytes`` as the upload
    connection. Returns the PUT's responses, the GET's raw bytes and
    whether the GET connection closed. A refused PUT leaves the GET waiting:
    it is then dropped after a short read."""
    with waiting_get_socket(relay, r) as get:
        with connect(relay) as put:
            put.sendall(put_bytes)
            put_raw, _ = read_until_close(put)
        put_resps = parse_responses(put_raw)
        refused = not put_resps or put_resps[-1].status != 200
        get_raw, get_closed = read_until_close(get, 0.5 if refused else 5.0)
    return put_resps, get_raw, get_closed


def assert_normal_relay_works(relay: Relay) -> None:
    """Mint in-process, PUT and GET a small body over raw sockets."""
    r = relay.create(workspace_id=f"ok-{uuid.uuid4().hex[:8]}")
    data = os.urandom(4096)
    put_resps, get_raw, get_closed = relay_put(relay, r, put_request(r.ticket, data))
    assert [p.status for p in put_resps] == [200], put_resps
    assert put_resps[0].json() == {"bytes": len(data), "status": "ok"}
    assert get_closed
    [got] = parse_responses(get_raw)
    assert got.status == 200 and got.body == data
    resps, closed = exchange(
        relay, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert [(p.status, p.body) for p in resps] == [(200, b"ok\n")] and closed


def mint_bytes(body: bytes, *, auth: bytes = MINT_AUTH, extra: bytes = b"") -> bytes:
    return (
        MINT
        + b"Host: x\r\n"
        + auth
        + f"Content-Length: {len(body)}\r\n".encode()
        + extra
        + b"Connection: close\r\n\r\n"
        + body
    )


def ids(ws: str = "ws", **kw: Any) -> dict[str, Any]:
    return {"workspace_id": ws, "source_exe_id": "src", "dest_exe_id": "dst", **kw}


def active(relay: Relay) -> int:
    return int(relay.call(lambda: relay.registry.active_count))


# --- 1. one framing ----------------------------------------------------------------


def test_mint_bare_lf_head_end_then_pipelined_wrong_secret(relay: Relay) -> None:
    body = json.dumps(ids("ws-1a")).encode()
    first = MINT + b"Host: x\r\n" + MINT_AUTH + f"Content-Length: {len(body)}\n\r\n".encode() + body
    second = mint_bytes(
        json.dumps(ids("ws-evil")).encode(), auth=b"Authorization: Bearer wrong-secret\r\n"
    )
    before = active(relay)
    resps, closed = exchange(relay, first + second)
    statuses = [r.status for r in resps]
    assert closed
    assert statuses in ([201, 401], [400]), [(r.status, r.body) for r in resps]
    if statuses == [201, 401]:
        ticket = resps[0].json()["ticket"]
        minted = relay.call(lambda: relay.registry.lookup(ticket))
        assert minted is not None and minted.workspace_id == "ws-1a"
        assert active(relay) == before + 1
    else:
        assert active(relay) == before
    assert_normal_relay_works(relay)


def test_put_bare_lf_head_end_never_leaks_the_smuggled_tail(relay: Relay) -> None:
    r = relay.create()
    put = (
        f"PUT /relay/{r.ticket} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {r.ticket}\r\n"
        f"Content-Length: 10\n\r\n0123456789\r\n\r\nABCDEFGHIJ"
    ).encode()
    put_resps, get_raw, _ = relay_put(relay, r, put)
    assert b"ABCDEFGHIJ" not in get_raw
    assert put_resps, "no answer to the PUT"
    if put_resps[0].status == 400:
        assert not get_raw.partition(b"\r\n\r\n")[2]  # no body reached the GET
    else:
        assert put_resps[0].status == 200, put_resps
        [got] = parse_responses(get_raw)
        assert got.status == 200 and got.body == b"0123456789"
    assert_normal_relay_works(relay)


def test_pipelined_bare_lf_head_end_gets_both_answers_or_400(relay: Relay) -> None:
    resps, closed = exchange(
        relay,
        b"GET /healthz HTTP/1.1\r\nHost: x\n\r\n"
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    assert closed
    statuses = [r.status for r in resps]
    assert statuses in ([200, 200], [400]), [(r.status, r.body[:80]) for r in resps]
    if statuses == [200, 200]:
        assert resps[0].body == b"ok\n"
        assert b"fastrelay_" in resps[1].body
    assert_normal_relay_works(relay)


# --- 2./3./4. folding, HTTP/1.0 chunked, repeated singletons -----------------------

FOLDS = {
    "te-fold": b"PUT /relay/nosuch HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer nosuch\r\n"
    b"Transfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n",
    "cl-fold": b"PUT /relay/nosuch HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer nosuch\r\n"
    b"Content-Length:\r\n 98\r\n\r\n" + b"z" * 98,
    "ordinary-fold": b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: b\r\n c\r\n\r\n",
    "mint-fold": MINT + b"Host: x\r\n" + MINT_AUTH + b"X-A: b\r\n\tc\r\n"
    b"Content-Length: 2\r\n\r\n{}",
}


@pytest.mark.parametrize("raw", FOLDS.values(), ids=FOLDS.keys())
def test_obsolete_line_folding_is_400_and_close(relay: Relay, raw: bytes) -> None:
    assert_400_and_close(relay, raw)
    assert_normal_relay_works(relay)


def test_http10_with_transfer_encoding_is_400_and_close(relay: Relay) -> None:
    assert_400_and_close(
        relay,
        b"PUT /relay/nosuch HTTP/1.0\r\nHost: x\r\nAuthorization: Bearer nosuch\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    )
    body = json.dumps(ids()).encode()
    chunked = f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
    assert_400_and_close(
        relay,
        b"POST /api/exec-gateway/relay/create HTTP/1.0\r\nHost: x\r\n"
        + MINT_AUTH
        + b"Transfer-Encoding: chunked\r\n\r\n"
        + chunked,
    )
    assert_normal_relay_works(relay)


MINT_BODY = json.dumps(ids("ws-dup")).encode()
DUP_MINT = {
    "authorization": b"Authorization: Bearer not-the-secret\r\n",
    "content-length": f"Content-Length: {len(MINT_BODY)}\r\n".encode(),
    "host": b"Host: y\r\n",
    "content-type": b"Content-Type: application/json\r\nContent-Type: text/plain\r\n",
    "expect": b"Expect: 100-continue\r\nExpect: 100-continue\r\n",
}


@pytest.mark.parametrize("extra", DUP_MINT.values(), ids=DUP_MINT.keys())
def test_repeated_singleton_header_on_mint_is_400_and_close(relay: Relay, extra: bytes) -> None:
    before = active(relay)
    resp = assert_400_and_close(relay, mint_bytes(MINT_BODY, extra=extra))
    assert resp.status == 400
    assert active(relay) == before  # nothing minted
    # control: the same mint without the repeat is a 201
    assert relay.mint_http(ids("ws-control"))[0] == 201
    assert_normal_relay_works(relay)


def test_repeated_transfer_encoding_on_mint_is_400_and_close(relay: Relay) -> None:
    chunked = f"{len(MINT_BODY):x}\r\n".encode() + MINT_BODY + b"\r\n0\r\n\r\n"
    before = active(relay)
    assert_400_and_close(
        relay,
        MINT
        + b"Host: x\r\n"
        + MINT_AUTH
        + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n"
        + chunked,
    )
    assert active(relay) == before
    assert_normal_relay_works(relay)


def test_repeated_content_length_equal_on_put_is_400_and_close(relay: Relay) -> None:
    assert_400_and_close(
        relay,
        b"PUT /relay/nosuch HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer nosuch\r\n"
        b"Content-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
    )
    assert_normal_relay_works(relay)


@pytest.mark.parametrize(
    "extra",
    [b"Authorization: Bearer rly_someoneelse\r\n", b"Content-Type: text/html\r\n"],
    ids=["authorization", "content-type"],
)
def test_repeated_singleton_header_on_put_is_400(relay: Relay, extra: bytes) -> None:
    r = relay.create()
    put = (
        (
            f"PUT /relay/{r.ticket} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {r.ticket}\r\n"
            f"Content-Type: text/plain\r\nContent-Length: 3\r\nConnection: close\r\n"
        ).encode()
        + extra
        + b"\r\nabc"
    )
    put_resps, get_raw, _ = relay_put(relay, r, put)
    assert [p.status for p in put_resps] == [400], [(p.status, p.body) for p in put_resps]
    assert b"abc" not in get_raw
    assert_normal_relay_works(relay)


def test_repeated_authorization_on_get_is_400(relay: Relay) -> None:
    r = relay.create()
    with connect(relay) as put:
        put.sendall(put_request(r.ticket, b"abc"))
        wait_claimed(relay, r, "put_claimed")
        head = get_head(r.ticket).replace(
            b"Connection: close\r\n",
            b"Authorization: Bearer rly_someoneelse\r\nConnection: close\r\n",
        )
        resps, closed = exchange(relay, head)
        assert [p.status for p in resps] == [400], [(p.status, p.body) for p in resps]
        assert closed
    assert_normal_relay_works(relay)


def test_space_before_colon_is_400(relay: Relay) -> None:
    assert_400_and_close(relay, b"GET /healthz HTTP/1.1\r\nHost : x\r\n\r\n")
    assert_normal_relay_works(relay)


# --- 5./6. hostile mint bodies, and no exception escapes ---------------------------


def mint_answer(relay: Relay, body: bytes) -> Response:
    resps, closed = exchange(relay, mint_bytes(body))
    assert closed, "the mint connection was left open"
    assert len(resps) == 1, f"{len(resps)} answers to one mint (none: an exception escaped?)"
    resp = resps[0]
    assert resp.header("content-type") is not None
    return resp


def assert_no_escaped_exception(caplog: pytest.LogCaptureFixture) -> None:
    bad = [r for r in caplog.records if r.exc_info is not None or "Traceback" in r.getMessage()]
    assert not bad, [(r.name, r.getMessage()[:200]) for r in bad]
    assert "Traceback" not in caplog.text


INVALID_BODIES = {
    "arrays-30000": b"[" * 30000 + b"]" * 30000,
    "objects-6000": b'{"a":' * 6000 + b"1" + b"}" * 6000,
    "mint-nested-arrays": b'{"workspace_id":"w","source_exe_id":"s","dest_exe_id":"d","x":'
    + b"[" * 30000
    + b"]" * 30000
    + b"}",
    "utf16-bom": json.dumps(ids()).encode("utf-16"),
    "utf16-le-no-bom": json.dumps(ids()).encode("utf-16-le"),
    "utf8-bom": b"\xef\xbb\xbf" + json.dumps(ids()).encode(),
}


@pytest.mark.parametrize("body", INVALID_BODIES.values(), ids=INVALID_BODIES.keys())
def test_hostile_mint_body_is_invalid_json(
    relay: Relay, caplog: pytest.LogCaptureFixture, body: bytes
) -> None:
    caplog.set_level(logging.WARNING)
    before = active(relay)
    resp = mint_answer(relay, body)
    # Go's text as the prefix (byte-compatible clients match it), then the detail.
    assert resp.status == 400 and resp.body.startswith(b'{"error":"invalid JSON: '), resp.body
    assert active(relay) == before
    assert_normal_relay_works(relay)
    assert_no_escaped_exception(caplog)


@pytest.mark.parametrize("ttl", [10**12, 2**63 - 1], ids=["1e12", "int64max"])
def test_huge_ttl_is_400_naming_the_field(
    relay: Relay, caplog: pytest.LogCaptureFixture, ttl: int
) -> None:
    caplog.set_level(logging.WARNING)
    before = active(relay)
    resp = mint_answer(relay, json.dumps(ids(ttl_seconds=ttl)).encode())
    assert resp.status == 400, resp
    assert "ttl_seconds" in resp.json()["error"]
    assert active(relay) == before
    assert_normal_relay_works(relay)
    assert_no_escaped_exception(caplog)


BAD_IDS = [
    (field, value)
    for field in ("workspace_id", "source_exe_id", "dest_exe_id")
    for value in ("a" * 300, "a\nb", "a\rb", "a\x1b[31mb")
]


@pytest.mark.parametrize(
    ("field", "value"),
    BAD_IDS,
    ids=[f"{f}-{['300', 'lf', 'cr', 'esc'][i % 4]}" for i, (f, _) in enumerate(BAD_IDS)],
)
def test_bad_id_is_400_naming_the_field(
    relay: Relay, caplog: pytest.LogCaptureFixture, field: str, value: str
) -> None:
    caplog.set_level(logging.WARNING)
    before = active(relay)
    resp = mint_answer(relay, json.dumps({**ids(), field: value}).encode())
    assert resp.status == 400, resp
    assert field in resp.json()["error"]
    assert active(relay) == before
    assert_normal_relay_works(relay)
    assert_no_escaped_exception(caplog)


def test_max_ttl_is_enforced(relay_factory: Callable[..., Relay]) -> None:
    relay = relay_factory(max_ttl_s=100, ticket_ttl_s=100)
    resp = mint_answer(relay, json.dumps(ids(ttl_seconds=101)).encode())
    assert resp.status == 400 and "ttl_seconds" in resp.json()["error"]
    resp = mint_answer(relay, json.dumps(ids(ttl_seconds=100)).encode())
    assert resp.status == 201, resp
    assert_normal_relay_works(relay)


# --- 7. log injection ---------------------------------------------------------------

EVIL_IDS = {
    "newline": "a\nrelay ended id=000 outcome=ok workspace=admin",
    "cr": "a\rrelay ended id=000 outcome=ok",
    "escape": "\x1b[31mred",
    "huge": "x" * 60000,
}


@pytest.mark.parametrize("evil", EVIL_IDS.values(), ids=EVIL_IDS.keys())
def test_log_records_are_one_line_and_bounded(
    relay: Relay, caplog: pytest.LogCaptureFixture, evil: str
) -> None:
    caplog.set_level(logging.INFO, logger="fastrelay")
    r = relay.create(workspace_id=evil, source_exe_id=evil, dest_exe_id=evil)
    tid = ticket_id(r.ticket)
    put_resps, get_raw, _ = relay_put(relay, r, put_request(r.ticket, b"hello"))
    assert [p.status for p in put_resps] == [200]
    assert parse_responses(get_raw)[0].body == b"hello"
    relay.wait_done(r)

    def of_this(prefix: str) -> list[logging.LogRecord]:
        return [
            rec
            for rec in caplog.records
            if rec.name == "fastrelay"
            and rec.getMessage().startswith(prefix)
            and f"id={tid}" in rec.getMessage()
        ]

    deadline = time.monotonic() + 10
    while not of_this("relay ended"):
        assert time.monotonic() < deadline, "no 'relay ended' record"
        time.sleep(0.01)
    assert_normal_relay_works(relay)
    messages = [rec.getMessage() for rec in caplog.records if rec.name == "fastrelay"]
    unsafe = [repr(m[:120]) for m in messages if {"\n", "\r", "\x1b"} & set(m)]
    assert not unsafe, f"control characters in log records: {unsafe}"
    long = [len(m) for m in messages if len(m) >= 4096]
    assert not long, f"log records of {long} characters"
    assert len(of_this("relay created")) == 1
    assert len(of_this("relay ended")) == 1


# --- 8. copied headers ----------------------------------------------------------------


def test_non_ascii_content_disposition_is_dropped(relay: Relay) -> None:
    r = relay.create()
    extra = b'Content-Type: text/plain\r\nContent-Disposition: attachment; filename="\xe9.txt"\r\n'
    put_resps, get_raw, _ = relay_put(relay, r, put_request(r.ticket, b"payload", extra))
    assert [p.status for p in put_resps] == [200], put_resps
    [got] = parse_responses(get_raw)
    assert got.status == 200 and got.body == b"payload"
    assert got.header("content-disposition") is None
    assert got.header("content-type") == "text/plain"
    assert b"\xe9" not in get_raw
    assert_normal_relay_works(relay)


# --- 9. fuzz ----------------------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(), inner, max_size=5),
    max_leaves=30,
)
ID_VALUES = st.text(max_size=400) | st.integers() | st.none() | JSON_VALUES
MINT_LIKE = st.fixed_dictionaries(
    {},
    optional={
        "workspace_id": ID_VALUES,
        "source_exe_id": ID_VALUES,
        "dest_exe_id": ID_VALUES,
        "ttl_seconds": st.integers(-(2**64), 2**64) | JSON_VALUES,
        "max_bytes": st.integers(-(2**64), 2**64) | JSON_VALUES,
    },
)
FUZZ = settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


def assert_well_formed_mint_answer(relay: Relay, body: bytes) -> None:
    resps, closed = exchange(relay, mint_bytes(body))
    assert closed and len(resps) == 1, resps
    resp = resps[0]
    assert 200 <= resp.status < 300 or 400 <= resp.status < 500, (resp.status, resp.body)
    if resp.status == 201:
        assert set(resp.json()) == {"ticket", "upload_url", "download_url", "expires_at"}
    else:
        assert isinstance(resp.json()["error"], str)


def test_fuzz_mint_json(relay: Relay) -> None:
    @FUZZ
    @given(doc=JSON_VALUES | MINT_LIKE)
    def one(doc: Any) -> None:
        assert_well_formed_mint_answer(relay, json.dumps(doc).encode())

    one()
    assert_normal_relay_works(relay)


def test_fuzz_mint_bytes(relay: Relay) -> None:
    @FUZZ
    @given(body=st.binary(max_size=2048))
    def one(body: bytes) -> None:
        assert_well_formed_mint_answer(relay, body)

    one()
    assert_normal_relay_works(relay)
