"""Every other row of the wire contract, over real sockets (uvloop, plain)."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
from collections.abc import Callable

import pytest
from conftest import SECRET, Relay, parse_response, read_all
from test_e2e_transfer import AUTH, finish, wait_waiting, waiting_get

import fastrelay


def request(
    relay: Relay, method: str, path: str, headers: dict[str, str] | None = None, body: bytes = b""
) -> tuple[int, dict[str, str], bytes]:
    lines = [f"{method} {path} HTTP/1.1", "Host: x", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if body or method in ("PUT", "POST"):
        lines.append(f"Content-Length: {len(body)}")
    return relay.raw(("\r\n".join(lines) + "\r\n\r\n").encode() + body)


@pytest.mark.parametrize(
    "auth",
    [None, "bearer {t}", "Token {t}", "Bearer ", "Bearer  {t}", "Bearer {t}x", "Bearer rly_other"],
)
@pytest.mark.parametrize("method", ["GET", "PUT"])
def test_401_unless_header_is_exactly_bearer_url_ticket(
    relay: Relay, auth: str | None, method: str
) -> None:
    r = relay.create()
    headers = {} if auth is None else {"Authorization": auth.format(t=r.ticket)}
    status, h, body = request(relay, method, f"/relay/{r.ticket}", headers)
    assert (status, body) == (401, b"unauthorized\n")
    assert h["content-type"] == "text/plain; charset=utf-8"
    # checked before the ticket: an unknown ticket with a bad header is 401 too
    status, _, _ = request(relay, method, "/relay/rly_unknown", headers)
    assert status == 401


def test_410_unknown_ticket(relay: Relay) -> None:
    t = "rly_" + "A" * 43
    status, h, body = request(relay, "GET", f"/relay/{t}", {"Authorization": f"Bearer {t}"})
    assert (status, body) == (410, b"ticket not found or expired\n")


def test_423_second_live_claim_and_single_use(relay: Relay) -> None:
    r = relay.create()
    get = waiting_get(relay, r, stdout=subprocess.PIPE)
    status, _, body = request(
        relay, "GET", f"/relay/{r.ticket}", {"Authorization": f"Bearer {r.ticket}"}
    )
    assert (status, body) == (423, b'{"error":"GET side already claimed"}')
    put = relay.popen(
        "-H",
        AUTH.format(r.ticket),
        "-T",
        "-",
        relay.url(r.ticket),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    wait_waiting(relay, r, "PUT")
    status, _, body = request(
        relay, "PUT", f"/relay/{r.ticket}", {"Authorization": f"Bearer {r.ticket}"}, b"x"
    )
    assert (status, body) == (423, b'{"error":"PUT side already claimed"}')
    assert put.stdin is not None
    put.stdin.write(b"hello")
    put.stdin.close()
    put.stdin = None
    assert finish(put)[0] == 0
    rc, out, _ = finish(get)
    assert rc == 0 and out == b"hello"
    relay.wait_done(r)
    for method in ("GET", "PUT"):  # one ticket, one PUT and one GET
        status, _, _ = request(
            relay, method, f"/relay/{r.ticket}", {"Authorization": f"Bearer {r.ticket}"}
        )
        assert status == 410


@pytest.mark.parametrize("side", ["GET", "PUT"])
def test_408_when_the_pairing_deadline_passes(relay: Relay, side: str) -> None:
    r = relay.create(ttl=0.5)
    other = "PUT" if side == "GET" else "GET"
    status, h, body = request(
        relay,
        side,
        f"/relay/{r.ticket}",
        {"Authorization": f"Bearer {r.ticket}"},
        b"x" if side == "PUT" else b"",
    )
    assert status == 408
    assert body == b'{"error":"timed out waiting for %s side"}' % other.encode()
    assert h["content-type"] == "application/json"
    assert r.outcome is fastrelay.Outcome.EXPIRED
    status, _, _ = request(
        relay, side, f"/relay/{r.ticket}", {"Authorization": f"Bearer {r.ticket}"}
    )
    assert status == 410


def test_405_and_404(relay: Relay) -> None:
    r = relay.create()
    for method in ("POST", "DELETE", "HEAD", "PATCH"):
        status, h, _ = request(
            relay, method, f"/relay/{r.ticket}", {"Authorization": f"Bearer {r.ticket}"}
        )
        assert status == 405 and h["allow"] == "GET, PUT"
    for path in ("/", "/relay/", "/relay/a/b", "/nope"):
        assert request(relay, "GET", path)[0] == 404


@pytest.mark.parametrize("side", ["GET", "PUT"])
def test_a_waiting_side_that_disconnects_can_be_retried(relay: Relay, side: str) -> None:
    r = relay.create()
    with relay.connect() as sock:
        body = b"hi"
        extra = f"Content-Length: {len(body)}\r\n" if side == "PUT" else ""
        sock.sendall(
            f"{side} /relay/{r.ticket} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {r.ticket}\r\n{extra}\r\n".encode()
        )
        wait_waiting(relay, r, side)
    deadline = time.monotonic() + 10
    attr = "put_claimed" if side == "PUT" else "get_claimed"
    while relay.call(lambda: getattr(r.session, attr)):
        assert time.monotonic() < deadline, "claim not released"
        time.sleep(0.01)
    get = relay.popen(
        "-f",
        "-H",
        AUTH.format(r.ticket),
        relay.url(r.ticket),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    put_done = relay.curl(
        "-f",
        "-H",
        AUTH.format(r.ticket),
        "--data-binary",
        "payload",
        "-X",
        "PUT",
        relay.url(r.ticket),
    )
    assert put_done.returncode == 0, put_done.stderr
    rc, out, _ = finish(get)
    assert rc == 0 and out == b"payload"


def test_headers_are_passed_on(relay: Relay) -> None:
    r = relay.create()
    get = relay.popen(
        "-f",
        "-D",
        "-",
        "-H",
        AUTH.format(r.ticket),
        relay.url(r.ticket),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    wait_waiting(relay, r, "GET")
    put = relay.curl(
        "-f",
        "-H",
        AUTH.format(r.ticket),
        "-H",
        "Content-Type: text/csv",
        "-H",
        'Content-Disposition: attachment; filename="a.csv"',
        "--data-binary",
        "a,b\n1,2\n",
        "-X",
        "PUT",
        relay.url(r.ticket),
    )
    assert put.returncode == 0
    rc, out, _ = finish(get)
    status, headers, body = parse_response(out.replace(b"\r\n", b"\r\n"))
    assert rc == 0 and status == 200 and body == b"a,b\n1,2\n"
    assert headers["content-type"] == "text/csv"
    assert headers["content-disposition"] == 'attachment; filename="a.csv"'
    assert headers["content-length"] == "8"


def test_download_gone_mid_stream_gives_the_source_500(relay: Relay) -> None:
    r = relay.create()
    get_sock = relay.connect()
    get_sock.sendall(
        f"GET /relay/{r.ticket} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {r.ticket}\r\n\r\n".encode()
    )
    wait_waiting(relay, r, "GET")
    put_sock = relay.connect()
    size = 64 * 1024 * 1024
    put_sock.sendall(
        f"PUT /relay/{r.ticket} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {r.ticket}\r\nContent-Length: {size}\r\n\r\n".encode()
    )
    put_sock.sendall(b"x" * 1024 * 1024)
    # Mid-stream means after body bytes reached the GET, not just its head
    # (a reset right after the head left this flaky: bytes was 0).
    got = b""
    while b"\r\n\r\n" not in got or got.endswith(b"\r\n\r\n"):
        chunk = get_sock.recv(65536)
        assert chunk, "GET closed before any body byte"
        got += chunk
    get_sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    get_sock.close()  # reset
    status, _, body = parse_response(read_all(put_sock))
    put_sock.close()
    assert status == 500
    doc = json.loads(body)
    assert doc["error"].startswith("relay: download connection lost") and doc["bytes"] > 0
    relay.wait_done(r)
    assert r.outcome is fastrelay.Outcome.DOWNLOAD_ABORTED


def test_idle_transfer_is_aborted_visibly(relay_factory: Callable[..., Relay]) -> None:
    relay = relay_factory(idle_timeout_s=0.5)
    r = relay.create()
    get = waiting_get(relay, r, stdout=subprocess.DEVNULL)
    with relay.connect() as put_sock:
        put_sock.sendall(
            f"PUT /relay/{r.ticket} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {r.ticket}\r\nContent-Length: 1000\r\n\r\nabc".encode()
        )
        status, _, body = parse_response(read_all(put_sock))  # stalls: the server gives up
    assert status == 500 and b"idle timeout" in body
    assert finish(get)[0] in (18, 56)
    assert r.outcome is fastrelay.Outcome.IDLE_TIMEOUT


# --- mint endpoint ------------------------------------------------------------------


def test_mint_201(relay: Relay) -> None:
    status, body = relay.mint_http(
        {
            "workspace_id": "w",
            "source_exe_id": "s",
            "dest_exe_id": "d",
            "ttl_seconds": 60,
            "extra": 1,
        }
    )
    assert status == 201 and body.endswith(b"}\n")
    doc = json.loads(body)
    assert re.fullmatch(r"rly_[A-Za-z0-9_-]{43}", doc["ticket"])
    assert doc["upload_url"] == doc["download_url"] == f"{relay.base}/relay/{doc['ticket']}"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", doc["expires_at"])
    r = relay.call(lambda: relay.registry.lookup(doc["ticket"]))
    assert r is not None and r.workspace_id == "w"


@pytest.mark.parametrize(
    ("body", "secret", "status", "expected"),
    [
        (None, "wrong", 401, b"unauthorized\n"),
        # Go's text first (clients match the prefix), then what is wrong.
        (
            b"{nope",
            SECRET,
            400,
            b'{"error":"invalid JSON: Expecting property name enclosed in double quotes'
            b' at line 1 column 2"}\n',
        ),
        (
            {"workspace_id": "w", "source_exe_id": "s"},
            SECRET,
            400,
            b'{"error":"workspace_id, source_exe_id, dest_exe_id required"}\n',
        ),
        (
            {"workspace_id": "w", "source_exe_id": "s", "dest_exe_id": "d", "ttl_seconds": "1"},
            SECRET,
            400,
            b'{"error":"invalid JSON: ttl_seconds must be a whole number of seconds,'
            b' not a string"}\n',
        ),
        (b"x" * (64 * 1024 + 1), SECRET, 413, None),
    ],
)
def test_mint_errors(
    relay: Relay, body: object, secret: str, status: int, expected: bytes | None
) -> None:
    got_status, got = relay.mint_http(body, secret=secret)  # type: ignore[arg-type]
    assert got_status == status
    if expected is not None:
        assert got == expected


def test_mint_429_at_the_workspace_cap(relay_factory: Callable[..., Relay]) -> None:
    relay = relay_factory(max_per_workspace=2)
    for _ in range(2):
        assert relay.mint_http()[0] == 201
    assert relay.mint_http() == (
        429,
        b'{"error":"relay: workspace concurrent relay cap reached"}\n',
    )
    assert (
        relay.mint_http({"workspace_id": "other", "source_exe_id": "s", "dest_exe_id": "d"})[0]
        == 201
    )


def test_mint_then_transfer_with_curl_as_a_gateway_would(relay: Relay) -> None:
    status, body = relay.mint_http()
    doc = json.loads(body)
    get = relay.popen(
        "-fsS",
        "-H",
        AUTH.format(doc["ticket"]),
        doc["download_url"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    put = relay.curl(
        "-fsS", "-H", AUTH.format(doc["ticket"]), "-T", "-", doc["upload_url"], input=b"z" * 100_000
    )
    assert put.returncode == 0
    rc, out, _ = finish(get)
    assert rc == 0 and out == b"z" * 100_000


def test_healthz_and_metrics(relay: Relay) -> None:
    status, h, body = request(relay, "GET", "/healthz")
    assert (status, body) == (200, b"ok\n")
    status, h, body = request(relay, "GET", "/metrics")
    assert status == 200 and h["content-type"].startswith("text/plain")
    assert b'fastrelay_relays_total{outcome="ok"}' in body and b"fastrelay_active_relays" in body
