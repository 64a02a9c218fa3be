"""A failed download fails in every client.

Spec: when an upload dies mid-stream after the GET's 200 head and part of the
body were sent, the GET connection ends with a TCP reset (never a clean
close), so every real HTTP client raises or reports failure; successful GET
answers carry no ``Connection: close``.

Real downloaders: ``urllib.request`` + ``shutil.copyfileobj``, ``requests``
(``stream=True`` + ``iter_content``), ``httpx.stream`` + ``iter_bytes`` and
Node's built-in ``fetch`` (``clients/fetch_get.mjs``). The uploader is a raw
socket (so the test controls exactly how much of the body is sent and how it
dies), or real curl for the waiting-uploader faults.

Ordering never relies on sleep: every step polls a condition with a deadline
(the relay's state through ``relay.call``, a client thread's "first chunk"
event, the node script's "first" line).
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import pathlib
import select
import shutil
import socket
import ssl
import struct
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable
from typing import Any

import httpx
import psutil
import pytest
import requests
from conftest import Relay

import fastrelay

KIB = 1024
MIB = 1024 * KIB
DECLARED = 8 * MIB  # Content-Length the dying uploader announces
SENT = 1 * MIB  # what it actually sends before it dies
CHUNK = 64 * KIB
PIPELINED = 40_000  # requests in the memory test (see there)
CLIENT_TIMEOUT = 15.0  # a client read stalled this long fails the test, not hangs it
NODE = shutil.which("node")
FETCH_GET = pathlib.Path(__file__).parent / "clients" / "fetch_get.mjs"


# --- helpers --------------------------------------------------------------------------


def poll(cond: Callable[[], Any], what: str, timeout: float = 10.0) -> Any:
    """Return ``cond()``'s first truthy value; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        time.sleep(0.005)


def wait_state(relay: Relay, cond: Callable[[], Any], what: str, timeout: float = 10.0) -> Any:
    """Poll ``cond`` on the server's loop thread."""
    return poll(lambda: relay.call(cond), what, timeout)


def auth(ticket: str) -> str:
    return f"Bearer {ticket}"


def put_head(ticket: str, chunked: bool, length: int = DECLARED) -> bytes:
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {length}"
    return (
        f"PUT /relay/{ticket} HTTP/1.1\r\nHost: x\r\nAuthorization: {auth(ticket)}\r\n"
        f"{framing}\r\n\r\n"
    ).encode()


def encode_body(data: bytes, chunked: bool, last: bool) -> bytes:
    """``data`` as sent on the wire; chunked without the last chunk unless ``last``."""
    if not chunked:
        return data
    out = bytearray()
    for i in range(0, len(data), CHUNK):
        piece = data[i : i + CHUNK]
        out += b"%x\r\n" % len(piece) + piece + b"\r\n"
    if last:
        out += b"0\r\n\r\n"
    return bytes(out)


def kill_socket(sock: socket.socket, how: str) -> None:
    """End the uploader: ``reset`` (SO_LINGER 0: RST) or a plain ``close``."""
    if how == "reset":
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def recv_head(sock: socket.socket) -> tuple[bytes, bytes]:
    """Read one response head (skipping 1xx); return (head, bytes after it)."""
    buf = b""
    while True:
        while b"\r\n\r\n" not in buf:
            b = sock.recv(65536)
            if not b:
                raise AssertionError(f"connection closed inside a head: {buf[:300]!r}")
            buf += b
        head, _, rest = buf.partition(b"\r\n\r\n")
        if head.startswith(b"HTTP/1.1 1") or head.startswith(b"HTTP/1.0 1"):
            buf = rest
            continue
        return head, rest


def head_fields(head: bytes) -> tuple[str, int, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    version, status = lines[0].split()[:2]
    headers: dict[str, str] = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return version, int(status), headers


def read_one_response(
    sock: socket.socket, carry: bytes
) -> tuple[int, dict[str, str], bytes, bytes]:
    """Read one Content-Length framed response; (status, headers, body, leftover)."""
    buf = carry
    while b"\r\n\r\n" not in buf:
        b = sock.recv(65536)
        if not b:
            raise AssertionError(f"connection closed before a whole head: {buf!r}")
        buf += b
    head, _, rest = buf.partition(b"\r\n\r\n")
    _, status, headers = head_fields(head)
    n = int(headers.get("content-length", "0"))
    while len(rest) < n:
        b = sock.recv(65536)
        if not b:
            raise AssertionError(f"connection closed inside a body: {head!r}")
        rest += b
    return status, headers, rest[:n], rest[n:]


def close_tokens(headers: dict[str, str]) -> set[str]:
    return {t.strip().lower() for t in headers.get("connection", "").split(",") if t.strip()}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- downloaders ----------------------------------------------------------------------


class Download:
    """One real client downloading in the background.

    ``first`` is set once it holds the first body bytes; ``finished`` when it
    is over. ``failed`` says whether the client raised or reported failure;
    ``detail`` is what it said.
    """

    def __init__(self) -> None:
        self.first = threading.Event()
        self.finished = threading.Event()
        self.failed: bool | None = None
        self.detail = ""
        self.nbytes = 0

    def wait(self, timeout: float = CLIENT_TIMEOUT + 10) -> None:
        assert self.finished.wait(timeout), "downloader never finished"


# What each Python client may raise when a body is cut short. Anything else
# (a warning turned error, a bug in the test) is not counted as "failed".
PY_FAILURES: dict[str, tuple[type[BaseException], ...]] = {
    "urllib": (http.client.HTTPException, OSError),  # IncompleteRead, ConnectionReset, SSL
    "requests": (requests.exceptions.RequestException,),
    "httpx": (httpx.TransportError,),
}


def _urllib_get(relay: Relay, ticket: str, dl: Download, sink: pathlib.Path) -> None:
    req = urllib.request.Request(relay.url(ticket), headers={"Authorization": auth(ticket)})
    ctx = ssl.create_default_context(cafile=relay.ca_file) if relay.tls else None

    class Sink:
        def __init__(self, f: Any) -> None:
            self.f = f

        def write(self, b: bytes) -> int:
            dl.nbytes += len(b)
            n: int = self.f.write(b)
            dl.first.set()
            return n

    with (
        urllib.request.urlopen(req, context=ctx, timeout=CLIENT_TIMEOUT) as resp,
        sink.open("wb") as f,
    ):
        shutil.copyfileobj(resp, Sink(f))


def _requests_get(relay: Relay, ticket: str, dl: Download, sink: pathlib.Path) -> None:
    verify: str | bool = relay.ca_file if relay.tls and relay.ca_file else True
    with requests.get(
        relay.url(ticket),
        headers={"Authorization": auth(ticket)},
        stream=True,
        verify=verify,
        timeout=CLIENT_TIMEOUT,
    ) as resp:
        resp.raise_for_status()
        for chunk in resp.iter_content(chunk_size=CHUNK):
            dl.nbytes += len(chunk)
            dl.first.set()


def _httpx_get(relay: Relay, ticket: str, dl: Download, sink: pathlib.Path) -> None:
    verify: ssl.SSLContext | bool = (
        ssl.create_default_context(cafile=relay.ca_file) if relay.tls else True
    )
    with httpx.stream(
        "GET",
        relay.url(ticket),
        headers={"Authorization": auth(ticket)},
        verify=verify,
        timeout=CLIENT_TIMEOUT,
    ) as resp:
        resp.raise_for_status()
        for chunk in resp.iter_bytes():
            dl.nbytes += len(chunk)
            dl.first.set()


PY_CLIENTS = {"urllib": _urllib_get, "requests": _requests_get, "httpx": _httpx_get}


def start_py_download(
    kind: str, relay: Relay, ticket: str, sink: pathlib.Path
) -> tuple[Download, threading.Thread]:
    dl = Download()

    def run() -> None:
        try:
            PY_CLIENTS[kind](relay, ticket, dl, sink)
        except PY_FAILURES[kind] as exc:
            dl.failed = True
            dl.detail = f"{type(exc).__module__}.{type(exc).__name__}: {exc}"
        except BaseException as exc:  # unexpected: report it, not as a client failure
            dl.failed = None
            dl.detail = f"UNEXPECTED {type(exc).__name__}: {exc}"
        else:
            dl.failed = False
            dl.detail = f"completed with {dl.nbytes} bytes"
        finally:
            dl.first.set()  # unblock a waiter; it checks ``finished``
            dl.finished.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return dl, thread


def start_node_download(relay: Relay, ticket: str) -> tuple[Download, subprocess.Popen[bytes]]:
    assert NODE is not None
    env = dict(os.environ)
    if relay.tls and relay.ca_file:
        env["NODE_EXTRA_CA_CERTS"] = relay.ca_file
    proc = subprocess.Popen(
        [NODE, str(FETCH_GET), relay.url(ticket), auth(ticket)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    dl = Download()

    def reader() -> None:
        assert proc.stdout is not None and proc.stderr is not None
        out = []
        for line in proc.stdout:
            out.append(line)
            if line.strip() == b"first":
                dl.first.set()
        err = proc.stderr.read()
        try:
            rc = proc.wait(timeout=CLIENT_TIMEOUT + 10)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        dl.failed = rc != 0
        dl.detail = f"node exit {rc}: {b''.join(out)!r} {err.decode(errors='replace').strip()}"
        dl.first.set()
        dl.finished.set()

    threading.Thread(target=reader, daemon=True).start()
    return dl, proc


CLIENTS = ["urllib", "requests", "httpx", "node"]


def start_download(
    kind: str, relay: Relay, ticket: str, tmp: pathlib.Path
) -> tuple[Download, Callable[[], None]]:
    """Start a downloader; returns it and a cleanup callable."""
    if kind == "node":
        if NODE is None:
            pytest.skip("node is not on PATH: the Node fetch client cannot run")
        dl, proc = start_node_download(relay, ticket)

        def stop_node() -> None:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            for f in (proc.stdout, proc.stderr):
                if f is not None:
                    f.close()

        return dl, stop_node
    dl, thread = start_py_download(kind, relay, ticket, tmp / f"{kind}.out")
    return dl, lambda: thread.join(CLIENT_TIMEOUT + 10)


@pytest.fixture(params=[("uvloop", False), ("asyncio", True)], ids=["uvloop-plain", "asyncio-tls"])
def client_relay(request: pytest.FixtureRequest, relay_factory: Callable[..., Relay]) -> Relay:
    loop_kind, tls = request.param
    return relay_factory(loop_kind, tls)


# --- 1-4: a dying upload fails every real client ---------------------------------------


def open_partial_upload(
    relay: Relay, r: fastrelay.Relay, chunked: bool, size: int = SENT
) -> socket.socket:
    """A raw PUT that pairs with the waiting GET and sends ``size`` bytes of its body."""
    put = relay.connect()
    try:
        put.sendall(put_head(r.ticket, chunked))
        wait_state(relay, lambda: r.paired, "relay paired")
        put.sendall(encode_body(os.urandom(size), chunked, last=False))
    except BaseException:
        put.close()
        raise
    return put


@pytest.mark.parametrize("kill", ["reset", "close"])
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("client", CLIENTS)
def test_dying_upload_fails_the_client(
    client_relay: Relay, client: str, chunked: bool, kill: str, tmp_path: pathlib.Path
) -> None:
    relay = client_relay
    r = relay.create()
    dl, cleanup = start_download(client, relay, r.ticket, tmp_path)
    try:
        wait_state(relay, lambda: r.session.get_claimed, "GET claimed", timeout=15)
        with open_partial_upload(relay, r, chunked) as put:
            assert dl.first.wait(CLIENT_TIMEOUT), "client never received a byte"
            assert not dl.finished.is_set(), f"client ended before the uploader died: {dl.detail}"
            kill_socket(put, kill)
        dl.wait()
    finally:
        cleanup()
    assert dl.failed is not None, dl.detail
    assert dl.failed, f"{client} reported success on a dead upload: {dl.detail}"
    relay.wait_done(r)
    assert r.outcome is fastrelay.Outcome.UPLOAD_ABORTED


def failure_of(relay: Relay) -> type[Exception] | tuple[type[Exception], ...]:
    """What a reading socket raises when the server fails the download.

    Plain TCP: the reset. TLS: the server first sends a record no TLS client
    accepts, since a bare reset reads as a (suppressed) ragged EOF there.
    """
    if relay.tls:
        return (ConnectionResetError, ssl.SSLError)
    return ConnectionResetError


@pytest.mark.parametrize("kill", ["reset", "close"])
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_dying_upload_resets_the_get_connection(
    client_relay: Relay, chunked: bool, kill: str
) -> None:
    """The wire-level statement of the spec: the GET socket sees a TCP reset
    (over TLS, first an invalid record, so the client's TLS layer fails)."""
    relay = client_relay
    r = relay.create()
    with relay.connect() as get:
        get.sendall(
            f"GET /relay/{r.ticket} HTTP/1.1\r\nHost: x\r\nAuthorization: {auth(r.ticket)}"
            "\r\n\r\n".encode()
        )
        wait_state(relay, lambda: r.session.get_claimed, "GET claimed")
        # Small enough for the socket buffers: nobody reads the GET until below.
        put = open_partial_upload(relay, r, chunked, size=2 * CHUNK)
        with put:
            head, rest = recv_head(get)
            _, status, _ = head_fields(head)
            assert status == 200, head
            if not rest:
                rest = get.recv(65536)
            assert rest, "no body byte before the uploader died"
            kill_socket(put, kill)
        with pytest.raises(failure_of(relay)):
            while get.recv(65536):
                pass
    relay.wait_done(r)
    assert r.outcome is fastrelay.Outcome.UPLOAD_ABORTED


# --- 5: successful answers keep the connection; HEAD has no body ---------------------------


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_successful_get_has_no_connection_close(client_relay: Relay, chunked: bool) -> None:
    relay = client_relay
    r = relay.create()
    payload = os.urandom(2 * MIB + 123)
    conn: http.client.HTTPConnection
    if relay.tls:
        conn = http.client.HTTPSConnection(
            "localhost", relay.server.port, context=relay.client_ctx, timeout=20
        )
    else:
        conn = http.client.HTTPConnection("127.0.0.1", relay.server.port, timeout=20)
    with relay.connect() as put, contextlib.closing(conn):
        put.sendall(put_head(r.ticket, chunked, len(payload)))
        wait_state(relay, lambda: r.session.put_claimed, "PUT claimed")
        sender = threading.Thread(
            target=put.sendall, args=(encode_body(payload, chunked, last=True),), daemon=True
        )
        sender.start()
        conn.request("GET", f"/relay/{r.ticket}", headers={"Authorization": auth(r.ticket)})
        resp = conn.getresponse()
        body = resp.read()
        headers = {k.lower(): v for k, v in resp.getheaders()}
        sender.join(20)
        status = read_one_response(put, b"")[0]
    assert resp.status == 200
    assert sha(body) == sha(payload)
    if chunked:
        assert headers.get("transfer-encoding") == "chunked"
    else:
        assert headers.get("content-length") == str(len(payload))
    assert "close" not in close_tokens(headers), headers
    assert status == 200
    relay.wait_done(r)
    assert r.outcome is fastrelay.Outcome.OK


def test_head_on_relay_is_405_without_body(relay: Relay) -> None:
    r = relay.create()
    # The HEAD, then a pipelined /healthz with Connection: close. After the
    # 405's head the stream must hold nothing but EOF or the next response:
    # any body byte of the 405 would show up in between.
    req = (
        f"HEAD /relay/{r.ticket} HTTP/1.1\r\nHost: x\r\nAuthorization: {auth(r.ticket)}\r\n\r\n"
        "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    ).encode()
    with relay.connect() as sock:
        sock.sendall(req)
        head, rest = recv_head(sock)
        with contextlib.suppress(ConnectionResetError):
            while b := sock.recv(65536):
                rest += b
    _, status, headers = head_fields(head)
    assert status == 405, head
    assert rest == b"" or rest.startswith(b"HTTP/1.1 "), (head, rest[:200])


# --- 6: HTTP/1.0 downloads are never chunked --------------------------------------------


def test_http10_get_of_chunked_upload_is_not_chunked(client_relay: Relay) -> None:
    relay = client_relay
    r = relay.create()
    with contextlib.ExitStack() as stack, relay.connect() as get:
        get.sendall(
            f"GET /relay/{r.ticket} HTTP/1.0\r\nHost: x\r\nAuthorization: {auth(r.ticket)}"
            "\r\n\r\n".encode()
        )
        wait_state(relay, lambda: r.session.get_claimed, "GET claimed")
        put = relay.connect()
        stack.callback(put.close)
        put.sendall(put_head(r.ticket, chunked=True))
        # A small first part: if the GET is refused, nobody reads the PUT.
        put.sendall(encode_body(os.urandom(CHUNK), True, last=False))
        head, rest = recv_head(get)
        version, status, headers = head_fields(head)
        assert version in ("HTTP/1.0", "HTTP/1.1"), head
        assert "chunked" not in headers.get("transfer-encoding", "").lower(), head
        if 400 <= status < 500:
            kill_socket(put, "reset")
            return  # a clear refusal: allowed
        assert status == 200, head
        assert "content-length" not in headers, head  # close-delimited
        if not rest:
            rest = get.recv(65536)
        assert rest, "no body byte before the uploader died"
        kill_socket(put, "reset")
        with pytest.raises(failure_of(relay)):
            while get.recv(65536):
                pass


# --- 7: a waiting uploader that dies keeps its claim ------------------------------------


def stashed_bytes(relay: Relay, r: fastrelay.Relay) -> int | None:
    """Body bytes the server holds for a waiting PUT (its connection's ``inbuf``).

    There is no metric for this, so it reads the waiting party's receive
    stash; None if that internal is not there (then callers fall back to the
    claim alone).
    """

    def get() -> int | None:
        party = r.put_party
        buf = getattr(party, "inbuf", None)
        return None if buf is None else len(buf)

    return relay.call(get)  # type: ignore[no-any-return]


def wait_body_received(relay: Relay, r: fastrelay.Relay) -> None:
    """Claim visible, then up to 5 s (curl's 1 s Expect wait) for stashed body bytes."""
    wait_state(relay, lambda: r.session.put_claimed, "PUT claimed")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        n = stashed_bytes(relay, r)
        if n is None or n > 0:
            return
        time.sleep(0.01)
    raise AssertionError("the server never received a body byte from the waiting PUT")


def start_curl_put(relay: Relay, ticket: str, src: pathlib.Path, *extra: str) -> Any:
    return relay.popen(
        "-f",
        "-H",
        f"Authorization: {auth(ticket)}",
        *extra,
        "-T",
        str(src),
        relay.url(ticket),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def retry_and_download(relay: Relay, r: fastrelay.Relay, tmp: pathlib.Path) -> None:
    """A retry PUT with curl and a curl GET both succeed; the GET has the retry's bytes."""
    retry = tmp / "retry.bin"
    retry.write_bytes(os.urandom(200 * KIB + 7))
    put = start_curl_put(relay, r.ticket, retry)
    try:
        wait_state(relay, lambda: r.session.put_claimed, "retry PUT claimed")
        out = tmp / "got.bin"
        get = relay.curl(
            "-f", "-H", f"Authorization: {auth(r.ticket)}", "-o", str(out), relay.url(r.ticket)
        )
        assert get.returncode == 0, get.stderr
        put_out, put_err = put.communicate(timeout=30)
        assert put.returncode == 0, put_err
    finally:
        if put.poll() is None:
            put.kill()
            put.communicate()
    assert sha(out.read_bytes()) == sha(retry.read_bytes())
    relay.wait_done(r)
    assert r.outcome is fastrelay.Outcome.OK


EXPECT = pytest.mark.parametrize("expect", [[], ["-H", "Expect:"]], ids=["expect-100", "no-expect"])


@EXPECT
def test_killed_waiting_curl_upload_releases_its_claim(
    client_relay: Relay, expect: list[str], tmp_path: pathlib.Path
) -> None:
    relay = client_relay
    r = relay.create()
    src = tmp_path / "file.bin"
    src.write_bytes(os.urandom(200 * KIB))
    put = start_curl_put(relay, r.ticket, src, *expect)
    try:
        wait_body_received(relay, r)
    finally:
        put.kill()
        put.communicate()
    deadline = time.monotonic() + 2
    while relay.call(lambda: r.session.put_claimed):
        assert time.monotonic() < deadline, "claim of a killed waiting PUT still held after 2 s"
        time.sleep(0.01)
    retry_and_download(relay, r, tmp_path)


@EXPECT
def test_killed_waiting_curl_upload_50mb_never_short_success(
    relay: Relay, expect: list[str], tmp_path: pathlib.Path
) -> None:
    r = relay.create()
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(50 * 1000 * 1000))
    put = start_curl_put(relay, r.ticket, src, *expect)
    try:
        wait_body_received(relay, r)
    finally:
        put.kill()
        put.communicate()
    # Give the server up to 2 s to notice (polled), then send a GET either way.
    with contextlib.suppress(AssertionError):
        wait_state(relay, lambda: not r.session.put_claimed, "claim released", timeout=2)
    out = tmp_path / "got.bin"
    get = relay.popen(
        "-f",
        "--max-time",
        "20",
        "-H",
        f"Authorization: {auth(r.ticket)}",
        "-o",
        str(out),
        relay.url(r.ticket),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        wait_state(
            relay,
            lambda: r.done() or r.session.get_claimed,
            "GET claimed or relay over",
        )
        paired_with_dead = relay.call(lambda: r.done() or r.paired)
        if paired_with_dead:
            _, err = get.communicate(timeout=30)
            print(f"50MB: claim kept, GET paired with the dead upload: curl exit {get.returncode}")
            assert get.returncode != 0, (
                f"curl GET exit 0 with {out.stat().st_size} of {src.stat().st_size} bytes "
                "from a killed upload"
            )
            assert get.returncode != 28, f"GET hung until --max-time: {err!r}"
            return
        print("50MB: claim released, retrying")  # the retry must work
        retry = tmp_path / "retry.bin"
        retry.write_bytes(os.urandom(300 * KIB))
        retry_put = relay.curl(
            "-f", "-H", f"Authorization: {auth(r.ticket)}", "-T", str(retry), relay.url(r.ticket)
        )
        assert retry_put.returncode == 0, retry_put.stderr
        _, err = get.communicate(timeout=30)
        assert get.returncode == 0, err
        assert sha(out.read_bytes()) == sha(retry.read_bytes())
    finally:
        if get.poll() is None:
            get.kill()
            get.communicate()


# --- 8: mint errors keep the connection ---------------------------------------------------


def test_mint_errors_keep_the_connection(relay: Relay) -> None:
    good = b'{"workspace_id":"ws","source_exe_id":"src","dest_exe_id":"dst"}'

    def mint(secret: str, body: bytes) -> bytes:
        return (
            f"POST /api/exec-gateway/relay/create HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {secret}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode() + body

    answers = []
    carry = b""
    with relay.connect() as sock:
        for secret, body in (
            ("wrong-secret", good),
            ("test-secret", b"{not json"),
            ("test-secret", good),
        ):
            sock.sendall(mint(secret, body))
            status, headers, _, carry = read_one_response(sock, carry)
            answers.append(status)
            if status != 201:
                assert "close" not in close_tokens(headers), (answers, headers)
    assert answers == [401, 400, 201]


# --- 9: bounded response memory ---------------------------------------------------------


def test_pipelined_requests_never_read_keep_memory_bounded(relay: Relay) -> None:
    # 40,000 rather than 20,000: each /metrics answer is ~1.7 KB, so a server
    # that buffers every answer grows ~67 MiB, well clear of the 32 MiB bound
    # (20,000 lands at ~33 MiB, too close to it to tell reliably).
    limit = 32 * MIB
    data = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" * PIPELINED
    proc = psutil.Process()
    before = proc.memory_info().rss
    peak = before
    sock = relay.connect()
    try:
        sock.setblocking(False)
        view = memoryview(data)
        sent = 0
        deadline = time.monotonic() + 5
        while sent < len(data) and time.monotonic() < deadline:
            try:
                sent += sock.send(view[sent:])
            except BlockingIOError:
                # Full socket buffers: the server stopped reading. Wait a moment for room.
                _, writable, _ = select.select([], [sock], [], 0.25)
                if not writable:
                    break
            peak = max(peak, proc.memory_info().rss)
        # Let the server work through what it has read: watch the peak for up
        # to 3 s (a measuring window, not an ordering step); stop early on excess.
        watch_until = time.monotonic() + 3
        while time.monotonic() < watch_until and peak - before < limit:
            relay.call(lambda: None)  # a loop round trip
            peak = max(peak, proc.memory_info().rss)
            time.sleep(0.02)
        growth = peak - before
        assert growth < limit, (
            f"RSS grew {growth / MIB:.1f} MiB (sent {sent} of {len(data)} request bytes)"
        )
    finally:
        sock.close()
    status, _, body = relay.raw(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status == 200, body
