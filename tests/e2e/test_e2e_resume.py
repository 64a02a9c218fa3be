"""Resumable relays against the real server: every rule of the wire contract's
"Resumable relays" section, on the buffered path and the splice(2) path,
plain and TLS, with connections broken for real (a clean close at an exact
byte, a reset, a superseding request).

Raw sockets drive both sides so each break lands at a known offset; the
destination's own count of what it received is what it resumes from, as a
real client's file size is.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import Relay

import fastrelay
from fastrelay.core.session import State

L = 3 * 1024 * 1024 + 4321  # past kernel_splice_min_bytes on the splice path
DATA = os.urandom(L)
RESET = struct.pack("ii", 1, 0)


@pytest.fixture(params=["buffered", "splice"])
def path_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=[False, True], ids=["plain", "tls"])
def rrelay(
    request: pytest.FixtureRequest, relay_factory: Callable[..., Relay], path_kind: str
) -> Relay:
    """uvloop, plain or TLS, with the data path forced one way."""
    splice_min = 0 if path_kind == "buffered" else 1
    return relay_factory(tls=bool(request.param), kernel_splice_min_bytes=splice_min)


_OPEN: list[socket.socket] = []


@pytest.fixture(autouse=True)
def _close_sockets(relay_factory: Callable[..., Relay]) -> Iterator[None]:
    """Every socket a test opened is closed after it, whatever it left, and
    before its server stops (set up after ``relay_factory``, so torn down
    first): a server closing TLS connections whose peers neither read nor
    close waits for their close_notify."""
    yield
    while _OPEN:
        _OPEN.pop().close()


@pytest.fixture
def relay(relay_factory: Callable[..., Relay]) -> Relay:
    """uvloop, plain (the conftest's, made through relay_factory so that
    `_close_sockets` runs before it stops)."""
    return relay_factory()


def connect(relay: Relay) -> socket.socket:
    sock = relay.connect()
    sock.settimeout(20)
    _OPEN.append(sock)
    return sock


def mint(relay: Relay, **kw: Any) -> fastrelay.Relay:
    return relay.create(resumable=True, **kw)


def wait_for(check: Callable[[], bool], what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)  # a poll interval, not an ordering


def state(relay: Relay, r: fastrelay.Relay) -> State:
    return relay.call(lambda: r.session.state)  # type: ignore[no-any-return]


def head_of(ticket: str, method: str, extra: str = "") -> str:
    return (
        f"{method} /relay/{ticket} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ticket}\r\n{extra}"
    )


class Upload:
    """A PUT whose body goes out from a thread (the relay's backpressure may
    hold it while this thread reads the destination), never at the same
    time as this thread uses its socket."""

    def __init__(self, sock: socket.socket, data: bytes) -> None:
        self.sock = sock
        self._thread: threading.Thread | None = None
        self.send_more(data)

    def send_more(self, data: bytes) -> None:
        self.wait_sent()
        self._thread = threading.Thread(target=self._send, args=(data,), daemon=True)
        self._thread.start()

    def _send(self, data: bytes) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(data)

    def wait_sent(self) -> None:
        if self._thread is not None:
            self._thread.join(30)
            assert not self._thread.is_alive(), "the upload's body did not go out"
            self._thread = None

    def answer(self) -> Answer:
        self.wait_sent()
        return read_answer(self.sock)

    def close_cleanly(self) -> None:
        self.wait_sent()
        close_cleanly(self.sock)


def put(
    relay: Relay,
    ticket: str,
    body: bytes,
    *,
    length: int | None = None,
    offset: int | None = None,
    extra: str = "",
) -> Upload:
    """A PUT that sends its head and ``body`` (maybe less than it declares)."""
    sock = connect(relay)
    if offset is not None:
        extra += f"Content-Range: bytes {offset}-{L - 1}/{L}\r\n"
    declared = len(body) if length is None else length
    head = (head_of(ticket, "PUT", extra) + f"Content-Length: {declared}\r\n\r\n").encode()
    return Upload(sock, head + body)


def get(relay: Relay, ticket: str, offset: int | None = None) -> socket.socket:
    sock = connect(relay)
    extra = f"Range: bytes={offset}-\r\n" if offset is not None else ""
    sock.sendall((head_of(ticket, "GET", extra) + "\r\n").encode())
    return sock


class Answer:
    def __init__(self, status: int, headers: dict[str, str], rest: bytes) -> None:
        self.status, self.headers, self.rest = status, headers, rest

    def json(self) -> Any:
        return json.loads(self.rest[: int(self.headers["content-length"])])


def read_head(sock: socket.socket) -> Answer:
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"closed before a head: {buf!r}")
        buf += chunk
    head, rest = buf.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    if status == 100:
        return read_head_after(sock, rest)
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return Answer(status, headers, rest)


def read_head_after(sock: socket.socket, rest: bytes) -> Answer:
    if b"\r\n\r\n" in rest:
        head, more = rest.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        headers = {
            k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])
        }
        return Answer(int(lines[0].split()[1]), headers, more)
    return read_head_with(sock, rest)


def read_head_with(sock: socket.socket, buf: bytes) -> Answer:
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"closed before a head: {buf!r}")
        buf += chunk
    return read_head_after(sock, buf)


def read_answer(sock: socket.socket) -> Answer:
    """A small answer: its head and whole body."""
    answer = read_head(sock)
    need = int(answer.headers.get("content-length", "0"))
    while len(answer.rest) < need:
        chunk = sock.recv(65536)
        if not chunk:
            break
        answer.rest += chunk
    return answer


def recv_exact(sock: socket.socket, n: int, have: bytes = b"") -> bytes:
    buf = bytearray(have)
    while len(buf) < n:
        chunk = sock.recv(min(1 << 20, n - len(buf)))
        if not chunk:
            raise AssertionError(f"closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def close_cleanly(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


def reset(sock: socket.socket) -> None:
    """Close with a TCP reset (TLS too: no close_notify, as a dead peer)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET)
    sock.close()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- the source breaks ----------------------------------------------------------------


@pytest.mark.parametrize("resume_from", ["whole", "at_point", "before_point"])
def test_source_break_continues_the_same_response(
    rrelay: Relay, path_kind: str, resume_from: str
) -> None:
    r = mint(rrelay)
    t = r.ticket
    down = get(rrelay, t)
    k = 1_500_000
    up = put(rrelay, t, DATA[:k], length=L)
    answer = read_head(down)
    assert answer.status == 200 and answer.headers["content-length"] == str(L)
    got = recv_exact(down, k, answer.rest)
    # The source goes away cleanly after exactly k bytes: a break at k.
    up.close_cleanly()
    wait_for(lambda: state(rrelay, r) is State.GET_WAITING, "the relay to wait for a source")
    offset = {"whole": None, "at_point": k, "before_point": k - 12345}[resume_from]
    body = DATA if offset is None else DATA[offset:]
    up2 = put(rrelay, t, body, offset=offset)
    got = recv_exact(down, L, got)
    done = up2.answer()
    assert sha(got) == sha(DATA)
    assert done.status == 200, done.rest
    assert done.json() == {"bytes": L, "status": "ok", "resumes": 1}
    rrelay.wait_done(r)
    assert r.outcome is fastrelay.Outcome.OK and r.bytes == L
    # The response ends there: the connection stays usable, nothing more came.
    down.settimeout(0.2)
    with pytest.raises(TimeoutError):
        down.recv(1)
    down.close()
    up2.sock.close()


def test_a_put_past_the_resume_point_gets_409_before_100_continue(rrelay: Relay) -> None:
    r = mint(rrelay)
    t = r.ticket
    down = get(rrelay, t)
    up = put(rrelay, t, DATA[:1000], length=L)
    got = recv_exact(down, 1000, read_head(down).rest)
    up.close_cleanly()
    wait_for(lambda: state(rrelay, r) is State.GET_WAITING, "the break")
    late = put(rrelay, t, b"", length=L - 5000, offset=5000, extra="Expect: 100-continue\r\n")
    answer = late.answer()
    assert answer.status == 409  # never a 100 first: read_head would have skipped it
    assert answer.headers["upload-offset"] == "1000"
    assert answer.json() == {"error": "resume from 1000", "offset": 1000}
    # The ticket waits on: a PUT from the point finishes it.
    up2 = put(rrelay, t, DATA[1000:], offset=1000)
    assert sha(recv_exact(down, L, got)) == sha(DATA)
    assert up2.answer().status == 200


def test_a_chunked_put_on_a_resumable_ticket_is_411(relay: Relay) -> None:
    r = mint(relay)
    sock = connect(relay)
    sock.sendall(
        (
            head_of(r.ticket, "PUT") + "Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        ).encode()
    )
    assert read_answer(sock).status == 411


@pytest.mark.parametrize("what", ["length", "digest"])
def test_a_put_describing_another_body_is_409_and_the_ticket_waits_on(
    relay: Relay, what: str
) -> None:
    r = mint(relay)
    t = r.ticket
    digest = "Repr-Digest: sha-256=:AAAA:\r\n"
    down = get(relay, t)
    up = put(relay, t, DATA[:100], length=L, extra=digest)
    got = recv_exact(down, 100, read_head(down).rest)
    up.close_cleanly()
    wait_for(lambda: state(relay, r) is State.GET_WAITING, "the break")
    if what == "length":
        bad = put(relay, t, b"x" * 10, extra=digest)
    else:
        bad = put(relay, t, DATA, extra="Repr-Digest: sha-256=:BBBB:\r\n")
    answer = bad.answer()
    assert answer.status == 409 and "resumable relay" in answer.json()["error"]
    up2 = put(relay, t, DATA, extra=digest)
    assert sha(recv_exact(down, L, got)) == sha(DATA)
    assert up2.answer().status == 200


# --- the destination breaks -------------------------------------------------------------


def test_destination_break_then_range_continues_from_the_open_put(rrelay: Relay) -> None:
    r = mint(rrelay)
    t = r.ticket
    k = 700_000
    up = put(rrelay, t, DATA[:k], length=L)
    down = get(rrelay, t)
    got = recv_exact(down, k, read_head(down).rest)
    # The destination has exactly k bytes, and the open PUT has sent exactly
    # k: it can serve byte k next.
    reset(down)
    wait_for(lambda: state(rrelay, r) is State.PUT_WAITING, "the relay to wait for a destination")
    down2 = get(rrelay, t, offset=k)
    answer2 = read_head(down2)
    assert answer2.status == 206
    assert answer2.headers["content-range"] == f"bytes {k}-{L - 1}/{L}"
    assert answer2.headers["content-length"] == str(L - k)
    up.send_more(DATA[k:])
    rest = recv_exact(down2, L - k, answer2.rest)
    assert sha(got + rest) == sha(DATA)
    done = up.answer()
    assert done.status == 200 and done.json()["resumes"] == 1


def test_a_get_without_range_after_a_break_gets_the_whole_body(relay: Relay) -> None:
    r = mint(relay)
    t = r.ticket
    up = put(relay, t, DATA[:5000], length=L)
    down = get(relay, t)
    recv_exact(down, 5000, read_head(down).rest)
    reset(down)
    wait_for(lambda: state(relay, r) is State.PUT_WAITING, "the break")
    down2 = get(relay, t)
    # The open PUT is past byte 0: it is told to send again from 0.
    refused = up.answer()
    assert refused.status == 409 and refused.headers["upload-offset"] == "0"
    up2 = put(relay, t, DATA)
    answer = read_head(down2)
    assert answer.status == 200 and answer.headers["content-length"] == str(L)
    assert sha(recv_exact(down2, L, answer.rest)) == sha(DATA)
    assert up2.answer().json() == {"bytes": L, "status": "ok", "resumes": 1}


def test_a_new_get_behind_the_open_put_makes_it_409_and_a_new_put_finishes(
    rrelay: Relay,
) -> None:
    r = mint(rrelay)
    t = r.ticket
    k = 700_000
    up = put(rrelay, t, DATA[:k], length=L)
    down = get(rrelay, t)
    got = recv_exact(down, k, read_head(down).rest)
    reset(down)
    wait_for(lambda: state(rrelay, r) is State.PUT_WAITING, "the break")
    n = k - 100_000  # the new destination has less than the PUT has sent
    down2 = get(rrelay, t, offset=n)
    refused = up.answer()
    assert refused.status == 409 and refused.headers["upload-offset"] == str(n)
    assert refused.headers.get("connection") == "close"
    up2 = put(rrelay, t, DATA[n:], offset=n)
    answer2 = read_head(down2)
    assert answer2.status == 206
    rest = recv_exact(down2, L - n, answer2.rest)
    assert sha(got[:n] + rest) == sha(DATA)
    assert up2.answer().json() == {"bytes": L, "status": "ok", "resumes": 1}


def test_a_range_past_the_end_is_416(relay: Relay) -> None:
    r = mint(relay)
    t = r.ticket
    up = put(relay, t, DATA[:10], length=L)
    down = get(relay, t)
    recv_exact(down, 10, read_head(down).rest)
    reset(down)
    wait_for(lambda: state(relay, r) is State.PUT_WAITING, "the break")
    answer = read_answer(get(relay, t, offset=L))
    assert answer.status == 416 and answer.headers["content-range"] == f"bytes */{L}"
    up.sock.close()


# --- superseding, limits, deadlines -----------------------------------------------------------


def test_a_new_get_supersedes_a_silent_one_instead_of_423(rrelay: Relay) -> None:
    r = mint(rrelay)
    t = r.ticket
    k = 400_000
    up = put(rrelay, t, DATA[:k], length=L)
    old = get(rrelay, t)
    got = recv_exact(old, k, read_head(old).rest)
    # The old destination's network went silent: its connection is still
    # open on our side. A new GET from what it had takes over.
    new = get(rrelay, t, offset=k)
    answer = read_head(new)
    assert answer.status == 206
    up.send_more(DATA[k:])
    assert sha(got + recv_exact(new, L - k, answer.rest)) == sha(DATA)
    assert up.answer().json()["resumes"] == 1
    # The old connection was closed (a reset, or a close after its bytes).
    old.settimeout(5)
    with pytest.raises((ConnectionResetError, AssertionError, OSError)):
        recv_exact(old, L, got)
    assert relay_metric(rrelay, "superseded") == 1
    with rrelay.connect() as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        scrape = b""
        while chunk := sock.recv(65536):
            scrape += chunk
    assert b"fastrelay_superseded_total 1.0" in scrape
    assert b'fastrelay_resumes_total{side="GET"} 1.0' in scrape


def relay_metric(relay: Relay, name: str) -> int:
    return int(relay.call(lambda: getattr(relay.registry.metrics, name)))


def test_a_get_on_a_v1_ticket_is_still_423_and_range_is_ignored(relay: Relay) -> None:
    r = relay.create()
    t = r.ticket
    down = get(relay, t, offset=5)
    wait_for(lambda: state(relay, r) is State.GET_WAITING, "the GET to wait")
    assert read_answer(get(relay, t)).status == 423
    up = put(relay, t, DATA[:1000])
    answer = read_head(down)
    assert answer.status == 200 and "content-range" not in answer.headers
    assert recv_exact(down, 1000, answer.rest) == DATA[:1000]
    assert up.answer().json() == {"bytes": 1000, "status": "ok"}


def test_one_break_past_max_resumes_fails_the_relay_visibly(relay: Relay) -> None:
    relay.call(lambda: setattr(relay.registry, "max_resumes", 1))
    r = mint(relay)
    t = r.ticket
    down = get(relay, t)
    up = put(relay, t, DATA[:1000], length=L)
    got = recv_exact(down, 1000, read_head(down).rest)
    up.close_cleanly()  # break 1: survived
    wait_for(lambda: state(relay, r) is State.GET_WAITING, "the first break")
    up2 = put(relay, t, DATA[1000:2000], length=L - 1000, offset=1000)
    got = recv_exact(down, 2000, got)
    up2.close_cleanly()  # break 2: one too many
    relay.wait_done(r)
    assert r.outcome is fastrelay.Outcome.UPLOAD_ABORTED
    # The destination sees a failure, never a clean end.
    down.settimeout(5)
    with pytest.raises((ConnectionResetError, AssertionError)):
        recv_exact(down, L, got)


def test_the_pairing_window_opens_again_after_a_break(relay: Relay) -> None:
    r = mint(relay, ttl=0.5)
    t = r.ticket
    down = get(relay, t)
    up = put(relay, t, DATA[:1000], length=L)
    got = recv_exact(down, 1000, read_head(down).rest)
    # Well past the first window: the transfer is paired, the TTL is off.
    wait_for(lambda: relay.call(lambda: relay.registry.clock() > r.deadline + 0.2), "the TTL")
    up.close_cleanly()
    wait_for(lambda: state(relay, r) is State.GET_WAITING, "the break")
    assert not relay.call(r.done)
    # Nobody comes back within a TTL: the ticket ends, the waiting
    # destination sees its body fail.
    relay.wait_done(r, timeout=10)
    assert r.outcome is fastrelay.Outcome.EXPIRED
    down.settimeout(5)
    with pytest.raises((ConnectionResetError, AssertionError)):
        recv_exact(down, L, got)
