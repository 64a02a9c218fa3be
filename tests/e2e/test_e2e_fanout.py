"""Fan-out relays (``"receivers": N``, issue #19) against the real server:
every bullet of the wire contract's "Fan-out" section (PROTOCOL.md, v2).

One PUT, N GETs that each get the whole body. Real curl where the client's
own view matters (exit codes, files, headers), raw sockets where a receiver
must misbehave at a known point: stop reading (idle), reset mid-body, leave
before the start. Every wait is on a condition with a deadline (the
server's connection phases, a socket's answer or EOF, a metric), never a
sleep standing in for an ordering.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pathlib
import re
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import psutil
import pytest
from conftest import Relay

import fastrelay
from fastrelay.core.phases import Phase
from tests.support.faultproxy import FaultProxy, reset_after

KIB = 1024
MIB = 1024 * KIB
DATA = os.urandom(32 * MIB)
RESET = struct.pack("ii", 1, 0)
AUTH = "Authorization: Bearer {}"


def sha(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


# --- bookkeeping: whatever a test opened is closed before its server stops ------------

_OPEN: list[socket.socket] = []
_THREADS: list[Receiver] = []
_PROCS: list[subprocess.Popen[Any]] = []
_PROXIES: list[FaultProxy] = []


@pytest.fixture(autouse=True)
def _cleanup(relay_factory: Callable[..., Relay]) -> Iterator[None]:
    """Set up after ``relay_factory``, so torn down before its servers stop:
    receivers are told to quit, sockets closed, curl processes killed."""
    yield
    for rx in _THREADS:
        rx.quit.set()
    while _PROCS:
        proc = _PROCS.pop()
        if proc.poll() is None:
            proc.kill()
        with contextlib.suppress(Exception):
            proc.communicate(timeout=10)
    while _OPEN:
        sock = _OPEN.pop()
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()
    while _THREADS:
        _THREADS.pop().thread.join(10)
    while _PROXIES:
        _PROXIES.pop().close()


@pytest.fixture
def relay(relay_factory: Callable[..., Relay]) -> Relay:
    """uvloop, plain (made through relay_factory so `_cleanup` runs first)."""
    return relay_factory()


MATRIX = [("uvloop", False), ("uvloop", True), ("asyncio", False), ("asyncio", True)]


@pytest.fixture(params=MATRIX, ids=[f"{k}-{'tls' if t else 'plain'}" for k, t in MATRIX])
def matrix_relay(request: pytest.FixtureRequest, relay_factory: Callable[..., Relay]) -> Relay:
    """The core matrix (as conftest's ``any_relay``): uvloop and asyncio, plain and TLS."""
    loop_kind, tls = request.param
    return relay_factory(loop_kind=loop_kind, tls=tls)


@pytest.fixture(params=[False, True], ids=["plain", "tls"])
def tls(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


# --- waiting on conditions ------------------------------------------------------------


def wait_for(check: Callable[[], bool], what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)  # a poll interval, not an ordering


def waiting_sides(relay: Relay) -> int:
    """Requests holding a side of a relay and waiting (the server's own count,
    also ``fastrelay_waiting_sides`` in /metrics)."""
    return int(
        relay.call(lambda: sum(1 for c in relay.server.connections if c.phase is Phase.WAITING))
    )


def wait_waiting(relay: Relay, n: int) -> None:
    wait_for(lambda: waiting_sides(relay) == n, f"{n} waiting requests")


def metrics_text(relay: Relay) -> str:
    status, _, body = relay.raw(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status == 200
    return body.decode()


def metric(text: str, sample: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def dropped_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        rec.getMessage()
        for rec in caplog.records
        if rec.getMessage().startswith("relay receiver dropped")
    ]


DROPPED = re.compile(
    r"relay receiver dropped id=\S+ receiver=(\d+)/(\d+) offset=(\d+) why=(idle timeout|connection lost(?:: .+)?)"
)


# --- raw HTTP -------------------------------------------------------------------------


def open_socket(relay: Relay, rcvbuf: int | None = None) -> socket.socket:
    """A connection to the server, plain or TLS; ``rcvbuf`` is set before
    connecting so the window it advertises is small from the start."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(30)
        sock.connect(("127.0.0.1", relay.server.port))
        if relay.client_ctx is not None:
            sock = relay.client_ctx.wrap_socket(sock, server_hostname="localhost")
    except BaseException:
        sock.close()
        raise
    _OPEN.append(sock)
    return sock


def head_of(ticket: str, method: str, extra: str = "") -> bytes:
    return (
        f"{method} /relay/{ticket} HTTP/1.1\r\nHost: x\r\n{AUTH.format(ticket)}\r\n{extra}\r\n"
    ).encode()


class Answer:
    def __init__(self, status: int, headers: dict[str, str], rest: bytes) -> None:
        self.status, self.headers, self.rest = status, headers, rest

    def json(self) -> Any:
        return json.loads(self.rest[: int(self.headers["content-length"])])

    def __repr__(self) -> str:
        return f"<Answer {self.status} {self.headers} {self.rest[:200]!r}>"


def read_head(sock: socket.socket, buf: bytes = b"") -> Answer:
    while True:
        while b"\r\n\r\n" not in buf:
            chunk = sock.recv(65536)
            if not chunk:
                raise AssertionError(f"closed before a head: {buf!r}")
            buf += chunk
        head, rest = buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        if status == 100:
            buf = rest
            continue
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        return Answer(status, headers, rest)


def read_answer(sock: socket.socket, timeout: float = 30) -> Answer:
    """A small answer: its head and its whole (Content-Length) body."""
    sock.settimeout(timeout)
    answer = read_head(sock)
    need = int(answer.headers.get("content-length", "0"))
    while len(answer.rest) < need:
        chunk = sock.recv(65536)
        if not chunk:
            break
        answer.rest += chunk
    return answer


def ask(relay: Relay, ticket: str, method: str = "GET", body: bytes = b"") -> Answer:
    """One request on its own connection; its (small) answer."""
    sock = open_socket(relay)
    extra = f"Content-Length: {len(body)}\r\n" if method == "PUT" else ""
    sock.sendall(head_of(ticket, method, extra) + body)
    return read_answer(sock)


def reset(sock: socket.socket) -> None:
    """Close with a TCP reset (TLS too: no close_notify, as a dead peer)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET)
    sock.close()


def drain(sock: socket.socket, timeout: float = 15) -> tuple[int, str]:
    """Read until the connection ends: (bytes read, how it ended)."""
    sock.settimeout(timeout)
    n = 0
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except (ConnectionResetError, BrokenPipeError):
            return n, "reset"
        except ssl.SSLError:
            return n, "reset"  # TLS cut without close_notify
        except TimeoutError:
            return n, "timeout"
        if not chunk:
            return n, "eof"
        n += len(chunk)


class Chunked:
    """An incremental decoder of a chunked body: ``done`` once the last chunk came."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.done = False
        self._need = -1  # bytes of the current chunk still to come; -1: a size line next

    def feed(self, data: bytes) -> bytes:
        self.buf += data
        out = bytearray()
        while not self.done:
            if self._need < 0:
                end = self.buf.find(b"\r\n")
                if end < 0:
                    break
                size = int(bytes(self.buf[:end]).split(b";")[0], 16)
                if size == 0:
                    if self.buf[end + 2 : end + 4] != b"\r\n":
                        break  # the final CRLF (no trailers) is still to come
                    del self.buf[: end + 4]
                    self.done = True
                    break
                del self.buf[: end + 2]
                self._need = size
            take = min(self._need, len(self.buf))
            out += self.buf[:take]
            del self.buf[:take]
            self._need -= take
            if self._need > 0:
                break  # the rest of this chunk is still to come
            if self._need == 0:
                if len(self.buf) < 2:
                    self._need = 0
                    break
                assert self.buf[:2] == b"\r\n", "a chunk without its CRLF"
                del self.buf[:2]
                self._need = -1
        return bytes(out)


class Receiver:
    """A GET on its own thread: reads the head, then the body as it comes.

    ``rate`` paces the reads (bytes/s); ``reset_after`` resets the connection
    once that many body bytes have arrived; ``chunk`` is the recv size. The
    body is kept (``keep``) or only hashed. ``end`` says how it finished:
    "complete" (the whole Content-Length, or the last chunk), "eof" or
    "reset" before that, "we-reset", "timeout", "quit".
    """

    def __init__(
        self,
        connect: Callable[[int | None], socket.socket],
        ticket: str,
        *,
        rate: float | None = None,
        reset_after: int | None = None,
        rcvbuf: int | None = None,
        chunk: int = 1 << 20,
        keep: bool = True,
        timeout: float = 60,
    ) -> None:
        self.sock = connect(rcvbuf)
        self.sock.settimeout(timeout)
        self.rate, self.reset_after, self.chunk, self.keep = rate, reset_after, chunk, keep
        self.status = 0
        self.headers: dict[str, str] = {}
        self.count = 0
        self.body = bytearray()
        self._hash = hashlib.sha256()
        self.end = ""
        self.error = ""
        self.done = threading.Event()
        self.quit = threading.Event()
        self.sock.sendall(head_of(ticket, "GET"))
        self.thread = threading.Thread(target=self._run, daemon=True)
        _THREADS.append(self)
        self.thread.start()

    @property
    def sha(self) -> str:
        return self._hash.hexdigest()

    def _take(self, data: bytes) -> None:
        self.count += len(data)
        self._hash.update(data)
        if self.keep:
            self.body += data

    def _run(self) -> None:
        try:
            self.end = self._read()
        except (ConnectionResetError, BrokenPipeError, ssl.SSLError) as exc:
            self.end, self.error = "reset", repr(exc)
        except TimeoutError:
            self.end = "timeout"
        except (AssertionError, OSError) as exc:
            self.end, self.error = "error", repr(exc)
        finally:
            self.done.set()

    def _read(self) -> str:
        answer = read_head(self.sock)
        self.status, self.headers = answer.status, answer.headers
        if answer.status != 200:
            need = int(answer.headers.get("content-length", "0"))
            rest = answer.rest
            while len(rest) < need and (more := self.sock.recv(65536)):
                rest += more
            self.body += rest
            return "answered"
        length = answer.headers.get("content-length")
        decoder = None if length is not None else Chunked()
        total = int(length) if length is not None else None
        started = time.monotonic()

        def take(data: bytes) -> bool:
            self._take(decoder.feed(data) if decoder is not None else data)
            return decoder.done if decoder is not None else self.count >= (total or 0)

        if take(answer.rest):
            return "complete"
        while not self.quit.is_set():
            if self.reset_after is not None and self.count >= self.reset_after:
                reset(self.sock)
                return "we-reset"
            want = self.chunk if total is None else min(self.chunk, total - self.count)
            data = self.sock.recv(want)
            if not data:
                return "eof"
            if take(data):
                return "complete"
            if self.rate:
                ahead = started + self.count / self.rate - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)  # pacing the reads, not ordering events
        return "quit"

    def wait(self, timeout: float = 60) -> Receiver:
        assert self.done.wait(timeout), f"receiver still reading after {timeout}s: {self!r}"
        return self

    def __repr__(self) -> str:
        return (
            f"<Receiver status={self.status} count={self.count} end={self.end} error={self.error}>"
        )


class Upload:
    """A raw PUT whose body goes out from a thread (backpressure may hold it)."""

    def __init__(
        self,
        sock: socket.socket,
        ticket: str,
        length: int | None,
        first: Iterable[bytes | memoryview] = (),
        extra: str = "",
    ) -> None:
        self.sock = sock
        framing = f"Content-Length: {length}\r\n" if length is not None else ""
        if length is None:
            framing = "Transfer-Encoding: chunked\r\n"
        self.chunked = length is None
        self.sock.sendall(head_of(ticket, "PUT", framing + extra))
        self._thread: threading.Thread | None = None
        self.send_more(first)

    def send_more(self, parts: Iterable[bytes | memoryview]) -> None:
        self.wait_sent()
        self._thread = threading.Thread(target=self._send, args=(parts,), daemon=True)
        self._thread.start()

    def _send(self, parts: Iterable[bytes | memoryview]) -> None:
        with contextlib.suppress(OSError):
            for part in parts:
                if self.chunked:
                    if not part:
                        continue
                    self.sock.sendall(b"%x\r\n" % len(part))
                    self.sock.sendall(part)
                    self.sock.sendall(b"\r\n")
                else:
                    self.sock.sendall(part)

    def finish_chunked(self) -> None:
        self.wait_sent()
        self.sock.sendall(b"0\r\n\r\n")

    def wait_sent(self, timeout: float = 60) -> None:
        if self._thread is not None:
            self._thread.join(timeout)
            assert not self._thread.is_alive(), "the upload's body did not go out"
            self._thread = None

    def answer(self, timeout: float = 30, wait_sent: bool = True) -> Answer:
        if wait_sent:
            self.wait_sent()
        return read_answer(self.sock, timeout)


def pieces(data: bytes, size: int = MIB) -> Iterator[memoryview]:
    view = memoryview(data)
    for i in range(0, len(view), size):
        yield view[i : i + size]


def receivers_of(relay: Relay, ticket: str, n: int, **kw: Any) -> list[Receiver]:
    return [Receiver(lambda rb: open_socket(relay, rb), ticket, **kw) for _ in range(n)]


def ok_answer(size: int, n: int) -> dict[str, Any]:
    return {"bytes": size, "status": "ok", "receivers": n, "delivered": n}


def failed_answer(size: int, n: int, failed: int) -> dict[str, Any]:
    return {
        "bytes": size,
        "error": f"{failed} of {n} receivers failed",
        "receivers": n,
        "delivered": n - failed,
    }


# --- curl -----------------------------------------------------------------------------


def curl_get(
    relay: Relay, ticket: str, out: pathlib.Path, url: str | None = None
) -> subprocess.Popen[bytes]:
    proc = relay.popen(
        "-H",
        AUTH.format(ticket),
        "-o",
        str(out),
        "-D",
        str(out) + ".head",
        "-w",
        "%{http_code}",
        url or relay.url(ticket),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    _PROCS.append(proc)
    return proc


def finish(proc: subprocess.Popen[bytes], timeout: float = 60) -> tuple[int, bytes, bytes]:
    if proc.stdin is not None and proc.stdin.closed:
        proc.stdin = None
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out or b"", err or b""


def head_file(out: pathlib.Path) -> dict[str, str]:
    text = pathlib.Path(str(out) + ".head").read_bytes().decode("latin-1")
    head = text.strip().split("\r\n\r\n")[-1]
    return {
        k.strip().lower(): v.strip()
        for k, _, v in (line.partition(":") for line in head.split("\r\n")[1:])
    }


def split_code(out: bytes) -> tuple[bytes, int]:
    """curl ``-w "\\n%{http_code}"`` output: (body, status)."""
    body, _, code = out.rpartition(b"\n")
    return body, int(code)


# === 1. every receiver gets the whole body ==============================================


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_three_curl_receivers_get_identical_whole_bodies(
    matrix_relay: Relay, payload_file: pathlib.Path, tmp_path: pathlib.Path, framing: str
) -> None:
    """Content-Length: the GETs first, then ``curl -T file`` (plain: past
    kernel_splice_min_bytes, the splice path's size). Chunked: the PUT first,
    ``curl -T -`` from a pipe, then the GETs."""
    relay = matrix_relay
    data = payload_file.read_bytes()
    size = len(data)
    r = relay.create(receivers=3)
    assert relay.call(lambda: (r.receivers, r.max_rate)) == (3, 0)
    outs = [tmp_path / f"out{i}.bin" for i in range(3)]
    put_argv = ["-H", AUTH.format(r.ticket), "-w", "\n%{http_code}", "--expect100-timeout", "30"]
    if framing == "content-length":
        gets = [curl_get(relay, r.ticket, out) for out in outs]
        wait_waiting(relay, 3)
        started = time.monotonic()
        put = relay.popen(
            *put_argv,
            "-T",
            str(payload_file),
            relay.url(r.ticket),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        _PROCS.append(put)
    else:
        put = relay.popen(
            *put_argv,
            "-T",
            "-",
            relay.url(r.ticket),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        _PROCS.append(put)
        feeder = threading.Thread(target=_feed, args=(put, data), daemon=True)
        feeder.start()
        wait_waiting(relay, 1)
        gets = []
        for i, out in enumerate(outs):
            gets.append(curl_get(relay, r.ticket, out))
            if i < 2:
                wait_waiting(relay, 2 + i)
        started = time.monotonic()
    rc, put_out, err = finish(put)
    elapsed = time.monotonic() - started
    assert rc == 0, err
    body, code = split_code(put_out)
    assert code == 200, body
    assert json.loads(body) == ok_answer(size, 3)
    # 100 Continue came once all were there: curl never waited out its 30 s.
    assert elapsed < 20, f"the PUT took {elapsed:.1f}s: no 100 Continue?"
    want = sha(data)
    for get, out in zip(gets, outs, strict=True):
        rc, code_out, err = finish(get)
        assert rc == 0 and code_out == b"200", (rc, code_out, err)
        assert sha(out.read_bytes()) == want
        head = head_file(out)
        if framing == "content-length":
            assert head["content-length"] == str(size)
        else:
            assert head.get("transfer-encoding") == "chunked" and "content-length" not in head
    relay.wait_done(r)
    assert r.outcome is fastrelay.Outcome.OK
    assert ask(relay, r.ticket).status == 410  # one transfer per ticket, as v1


def _feed(proc: subprocess.Popen[bytes], data: bytes) -> None:
    assert proc.stdin is not None
    with contextlib.suppress(BrokenPipeError, ValueError):
        proc.stdin.write(data)
        proc.stdin.close()


@pytest.mark.parametrize(
    ("path_kind", "tls"),
    [("splice", False), ("buffered", False), ("buffered", True)],
    ids=["splice-plain", "buffered-plain", "buffered-tls"],
)
def test_receivers_at_different_paces_all_get_every_byte(
    relay_factory: Callable[..., Relay], path_kind: str, tls: bool
) -> None:
    """16 MiB with Content-Length: on a plain listener with the default
    kernel_splice_min_bytes (1 MiB) this is the size v1 splices; fan-out must
    still give every receiver every byte. Receivers read 4 KiB, 64 KiB and
    1 MiB at a time, one of them paced, so they are never in step."""
    config = {} if path_kind == "splice" else {"kernel_splice_min_bytes": 0}
    relay = relay_factory(tls=tls, **config)
    size = 16 * MIB
    data = DATA[:size]
    r = relay.create(receivers=3)
    connect = lambda rb: open_socket(relay, rb)  # noqa: E731
    rxs = [
        Receiver(connect, r.ticket, chunk=4 * KIB),
        Receiver(connect, r.ticket, chunk=64 * KIB, rate=64 * MIB),
        Receiver(connect, r.ticket, chunk=MIB),
    ]
    wait_waiting(relay, 3)
    up = Upload(open_socket(relay), r.ticket, size, pieces(data), "Content-Type: text/csv\r\n")
    done = up.answer(timeout=60)
    assert done.status == 200, done
    assert done.json() == ok_answer(size, 3)
    assert done.headers["content-type"] == "application/json"
    for rx in rxs:
        rx.wait()
        assert rx.end == "complete" and rx.status == 200, rx
        assert rx.headers["content-length"] == str(size)
        assert rx.headers["content-type"] == "text/csv"  # the v1 answer, copied from the PUT
        assert rx.count == size and rx.sha == sha(data)
    relay.wait_done(r)
    assert r.outcome is fastrelay.Outcome.OK
    text = metrics_text(relay)
    assert metric(text, "fastrelay_fanout_receiver_bytes_total") == 3 * size
    assert metric(text, 'fastrelay_fanout_receivers_dropped_total{why="idle"}') == 0
    assert metric(text, 'fastrelay_fanout_receivers_dropped_total{why="lost"}') == 0


def test_raw_chunked_upload_reaches_every_receiver_chunked(relay: Relay) -> None:
    """A chunked PUT (odd chunk sizes) gives each GET a chunked answer that
    ends with the last chunk."""
    data = DATA[: 2 * MIB + 17]
    r = relay.create(receivers=2)
    rxs = receivers_of(relay, r.ticket, 2)
    wait_waiting(relay, 2)
    up = Upload(open_socket(relay), r.ticket, None, pieces(data, 100_003))
    up.finish_chunked()
    done = up.answer()
    assert done.status == 200 and done.json() == ok_answer(len(data), 2), done
    for rx in rxs:
        rx.wait()
        assert rx.end == "complete" and rx.headers.get("transfer-encoding") == "chunked", rx
        assert "content-length" not in rx.headers
        assert bytes(rx.body) == data


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_zero_byte_upload_gives_every_receiver_an_empty_body(relay: Relay, chunked: bool) -> None:
    r = relay.create(receivers=3)
    rxs = receivers_of(relay, r.ticket, 3)
    wait_waiting(relay, 3)
    up = Upload(open_socket(relay), r.ticket, None if chunked else 0)
    if chunked:
        up.finish_chunked()
    done = up.answer()
    assert done.status == 200 and done.json() == ok_answer(0, 3), done
    for rx in rxs:
        rx.wait(15)
        assert rx.end == "complete" and rx.status == 200 and rx.count == 0, rx
        if chunked:
            assert rx.headers.get("transfer-encoding") == "chunked"
        else:
            assert rx.headers["content-length"] == "0"


@pytest.mark.parametrize("how", ["reset", "close"])
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_source_that_breaks_mid_body_fails_every_receiver(
    relay: Relay, chunked: bool, how: str
) -> None:
    """The v1 rule for every receiver: an upload that ends early is never a
    complete body (short of Content-Length, or no last chunk), for any of them."""
    size = len(DATA)
    r = relay.create(receivers=3)
    rxs = receivers_of(relay, r.ticket, 3)
    wait_waiting(relay, 3)
    up = Upload(open_socket(relay), r.ticket, None if chunked else size, pieces(DATA[:MIB]))
    up.wait_sent()
    wait_for(lambda: all(rx.count >= MIB for rx in rxs), "the first MiB at every receiver")
    if how == "reset":
        reset(up.sock)
    else:
        up.sock.shutdown(socket.SHUT_RDWR)
        up.sock.close()
    for rx in rxs:
        rx.wait(15)
        assert rx.status == 200 and rx.end in ("reset", "eof"), rx
        assert rx.count == MIB and bytes(rx.body) == DATA[:MIB]
    relay.wait_done(r)
    assert r.outcome is fastrelay.Outcome.UPLOAD_ABORTED


def test_a_stalled_source_times_out_and_every_receiver_is_cut(
    relay_factory: Callable[..., Relay],
) -> None:
    relay = relay_factory(idle_timeout_s=1)
    r = relay.create(receivers=3)
    rxs = receivers_of(relay, r.ticket, 3)
    wait_waiting(relay, 3)
    up = Upload(open_socket(relay), r.ticket, 10 * MIB, [DATA[:1000]])
    done = up.answer(timeout=15)  # the source sends nothing more: the relay gives up
    assert done.status == 500 and "idle timeout" in done.json()["error"], done
    for rx in rxs:
        rx.wait(15)
        assert rx.end in ("reset", "eof") and rx.count == 1000, rx
    relay.wait_done(r)
    assert r.outcome is fastrelay.Outcome.IDLE_TIMEOUT


def test_sixteen_receivers_the_default_maximum(relay: Relay) -> None:
    size = 4 * MIB + 1
    data = DATA[:size]
    r = relay.create(receivers=16)
    rxs = receivers_of(relay, r.ticket, 16, keep=False)
    wait_waiting(relay, 16)
    assert ask(relay, r.ticket).status == 423
    up = Upload(open_socket(relay), r.ticket, size, pieces(data))
    done = up.answer(timeout=60)
    assert done.status == 200 and done.json() == ok_answer(size, 16), done
    for rx in rxs:
        assert rx.wait().end == "complete" and rx.sha == sha(data), rx


def test_max_rate_applies_to_the_one_upload(relay: Relay) -> None:
    """12 MiB at 4 MiB/s to three receivers: about 3 s (at least 2 s: the
    burst is at most 1 s of rate), each receiver at the full rate. Were the
    rate spent on the 36 MiB written to the receivers, it would take 8 s."""
    rate, size = 4 * MIB, 12 * MIB
    data = DATA[:size]
    r = relay.create(receivers=3, max_rate=rate)
    rxs = receivers_of(relay, r.ticket, 3, keep=False)
    wait_waiting(relay, 3)
    started = time.monotonic()
    up = Upload(open_socket(relay), r.ticket, size, pieces(data))
    done = up.answer(timeout=60)
    elapsed = time.monotonic() - started
    assert done.status == 200 and done.json() == ok_answer(size, 3), done
    for rx in rxs:
        assert rx.wait().end == "complete" and rx.sha == sha(data), rx
    assert 0.95 * (size - rate) / rate <= elapsed < 6, f"{elapsed:.2f}s"


def test_a_slow_but_steady_receiver_is_not_dropped(relay_factory: Callable[..., Relay]) -> None:
    """Idle means no progress, not slow: a receiver taking 4 MiB/s in 64 KiB
    reads holds everyone back but is never idle for the 1 s timeout."""
    relay = relay_factory(idle_timeout_s=1)
    size = 8 * MIB
    data = DATA[:size]
    r = relay.create(receivers=2)
    connect = lambda rb: open_socket(relay, rb)  # noqa: E731
    fast = Receiver(connect, r.ticket, keep=False)
    slow = Receiver(connect, r.ticket, keep=False, rate=4 * MIB, chunk=64 * KIB)
    wait_waiting(relay, 2)
    up = Upload(open_socket(relay), r.ticket, size, pieces(data))
    done = up.answer(timeout=60)
    assert done.status == 200 and done.json() == ok_answer(size, 2), done
    for rx in (fast, slow):
        assert rx.wait().end == "complete" and rx.sha == sha(data), rx


# === 2. a stalled receiver is dropped, the others go on ==================================


@pytest.mark.parametrize(
    ("tls", "chunked"),
    [(False, False), (True, False), (False, True)],
    ids=["plain", "tls", "plain-chunked"],
)
def test_a_stalled_receiver_is_dropped_and_the_others_get_every_byte(
    relay_factory: Callable[..., Relay],
    tls: bool,
    chunked: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    relay = relay_factory(tls=tls, idle_timeout_s=1)
    size = len(DATA)  # far more than the stalled receiver's buffers hold
    r = relay.create(receivers=3)
    caplog.set_level(logging.INFO, logger="fastrelay")
    good = receivers_of(relay, r.ticket, 2)
    stalled = open_socket(relay, rcvbuf=4096)
    stalled.sendall(head_of(r.ticket, "GET"))
    wait_waiting(relay, 3)
    up = Upload(open_socket(relay), r.ticket, None if chunked else size, pieces(DATA))
    head = read_head(stalled)  # the transfer started; now it stops reading
    assert head.status == 200
    if chunked:
        assert head.headers["transfer-encoding"] == "chunked"
        up.finish_chunked()
    else:
        assert head.headers["content-length"] == str(size)
    done = up.answer(timeout=60)
    assert done.status == 502, done
    assert done.json() == failed_answer(size, 3, 1)
    for rx in good:
        rx.wait()
        assert rx.end == "complete" and rx.count == size and rx.sha == sha(DATA), rx
    # Its response was cut: short of its Content-Length, then a reset (or an end).
    got, how = drain(stalled)
    assert how in ("reset", "eof"), how
    assert len(head.rest) + got < size
    relay.wait_done(r)
    lines = dropped_lines(caplog)
    assert len(lines) == 1, lines
    m = DROPPED.fullmatch(lines[0])
    assert m and m.group(2) == "3" and m.group(4) == "idle timeout", lines[0]
    assert int(m.group(1)) <= 3
    assert int(m.group(3)) < size
    text = metrics_text(relay)
    assert metric(text, 'fastrelay_fanout_receivers_dropped_total{why="idle"}') == 1
    assert metric(text, 'fastrelay_fanout_receivers_dropped_total{why="lost"}') == 0
    written = metric(text, "fastrelay_fanout_receiver_bytes_total")
    assert written is not None and 2 * size <= written < 3 * size


# === 3. a receiver that disconnects mid-body ============================================


def test_a_receiver_reset_mid_body_is_dropped_and_the_others_get_every_byte(
    relay_factory: Callable[..., Relay], tls: bool, caplog: pytest.LogCaptureFixture
) -> None:
    relay = relay_factory(tls=tls)
    size = len(DATA)
    r = relay.create(receivers=3)
    caplog.set_level(logging.INFO, logger="fastrelay")
    connect = lambda rb: open_socket(relay, rb)  # noqa: E731
    good = [Receiver(connect, r.ticket), Receiver(connect, r.ticket)]
    # A small window: the reset comes long before the relay could have
    # written the whole body to it.
    quitter = Receiver(connect, r.ticket, reset_after=256 * KIB, rcvbuf=64 * KIB)
    wait_waiting(relay, 3)
    up = Upload(open_socket(relay), r.ticket, size, pieces(DATA))
    done = up.answer(timeout=60)
    assert done.status == 502, done
    assert done.json() == failed_answer(size, 3, 1)
    assert quitter.wait().end == "we-reset", quitter
    for rx in good:
        rx.wait()
        assert rx.end == "complete" and rx.count == size and rx.sha == sha(DATA), rx
    relay.wait_done(r)
    lines = dropped_lines(caplog)
    assert len(lines) == 1, lines
    m = DROPPED.fullmatch(lines[0])
    # The spec's form is "connection lost: <detail>"; the detail is not
    # always known (a write finding the transport already closing).
    assert m and m.group(4).startswith("connection lost"), lines[0]
    assert int(m.group(3)) < size
    text = metrics_text(relay)
    assert metric(text, 'fastrelay_fanout_receivers_dropped_total{why="lost"}') == 1
    assert metric(text, 'fastrelay_fanout_receivers_dropped_total{why="idle"}') == 0


def test_a_curl_receiver_cut_by_the_network_fails_and_the_others_succeed(
    relay_factory: Callable[..., Relay],
    tls: bool,
    tmp_path: pathlib.Path,
) -> None:
    """Real curl receivers; one reaches the server through a proxy that resets
    its connection after 1 MiB: that curl exits non-zero, the others get the
    whole file, the PUT (curl) gets 502. 32 MiB: far more than the socket
    buffers between the relay and the cut receiver hold, so the relay cannot
    have handed it every byte before the reset."""
    relay = relay_factory(tls=tls)
    data = DATA
    payload_file = tmp_path / "payload.bin"
    payload_file.write_bytes(data)
    r = relay.create(receivers=3)
    proxy = FaultProxy(("127.0.0.1", relay.server.port), [reset_after(MIB, "down")])
    _PROXIES.append(proxy)
    scheme = "https" if tls else "http"
    outs = [tmp_path / f"out{i}.bin" for i in range(3)]
    gets = [curl_get(relay, r.ticket, outs[0]), curl_get(relay, r.ticket, outs[1])]
    gets.append(
        curl_get(relay, r.ticket, outs[2], f"{scheme}://127.0.0.1:{proxy.port}/relay/{r.ticket}")
    )
    wait_waiting(relay, 3)
    put = relay.curl(
        "-H",
        AUTH.format(r.ticket),
        "-w",
        "\n%{http_code}",
        "-T",
        str(payload_file),
        relay.url(r.ticket),
    )
    body, code = split_code(put.stdout)
    assert code == 502, put
    assert json.loads(body) == failed_answer(len(data), 3, 1)
    proxy.wait_faulted(0, timeout=10)
    for get, out in zip(gets[:2], outs[:2], strict=True):
        rc, code_out, err = finish(get)
        assert rc == 0 and code_out == b"200", err
        assert sha(out.read_bytes()) == sha(data)
    rc, _, err = finish(gets[2])
    assert rc != 0, err  # curl sees the failure (56: reset)
    cut = outs[2].read_bytes() if outs[2].exists() else b""
    assert len(cut) < len(data) and cut == data[: len(cut)]


# === 4. a receiver that leaves before the start frees its slot ==========================


def test_one_of_three_waiting_receivers_leaving_frees_its_slot(relay: Relay) -> None:
    """The GET side complete (all three here, no PUT yet), then one leaves:
    the side is open again for one GET, and only one (a fifth is 423)."""
    data = DATA[: 2 * MIB]
    r = relay.create(receivers=3)
    connect = lambda rb: open_socket(relay, rb)  # noqa: E731
    stay = [Receiver(connect, r.ticket), Receiver(connect, r.ticket)]
    leaver = open_socket(relay)
    leaver.sendall(head_of(r.ticket, "GET"))
    wait_waiting(relay, 3)
    assert ask(relay, r.ticket).status == 423
    reset(leaver)
    wait_waiting(relay, 2)
    stay.append(Receiver(connect, r.ticket))
    wait_waiting(relay, 3)
    extra = ask(relay, r.ticket)
    assert (extra.status, extra.rest) == (423, b'{"error":"GET side already claimed"}')
    up = Upload(open_socket(relay), r.ticket, len(data), pieces(data))
    done = up.answer()
    assert done.status == 200 and done.json() == ok_answer(len(data), 3), done
    for rx in stay:
        assert rx.wait().end == "complete" and bytes(rx.body) == data, rx


@pytest.mark.parametrize("put_first", [False, True], ids=["gets-only", "put-waiting"])
def test_a_receiver_leaving_before_the_start_frees_its_slot(relay: Relay, put_first: bool) -> None:
    size = 3 * MIB
    data = DATA[:size]
    r = relay.create(receivers=3)
    base = 0
    up = None
    if put_first:
        up = Upload(open_socket(relay), r.ticket, size, pieces(data))
        wait_waiting(relay, 1)
        base = 1
    connect = lambda rb: open_socket(relay, rb)  # noqa: E731
    first = Receiver(connect, r.ticket)
    leaver = open_socket(relay)
    leaver.sendall(head_of(r.ticket, "GET"))
    wait_waiting(relay, base + 2)
    leaver.close()  # before the start: its slot is free again
    wait_waiting(relay, base + 1)
    rest = [Receiver(connect, r.ticket)]
    wait_waiting(relay, base + 2)  # the freed slot was taken, not refused
    assert rest[0].status == 0 and not rest[0].done.is_set()
    rest.append(Receiver(connect, r.ticket))
    if up is None:
        wait_waiting(relay, 3)
        up = Upload(open_socket(relay), r.ticket, size, pieces(data))
    done = up.answer()
    assert done.status == 200 and done.json() == ok_answer(size, 3), done
    for rx in (first, *rest):
        rx.wait()
        assert rx.end == "complete" and bytes(rx.body) == data, rx


# === 5. one GET too many ================================================================


def test_a_fourth_get_is_423_while_waiting_and_while_streaming(relay: Relay) -> None:
    size = 8 * MIB
    data = DATA[:size]
    r = relay.create(receivers=3)
    rxs = receivers_of(relay, r.ticket, 3)
    wait_waiting(relay, 3)
    extra = ask(relay, r.ticket)
    assert (extra.status, extra.rest) == (423, b'{"error":"GET side already claimed"}')
    assert waiting_sides(relay) == 3  # the three keep their slots
    up = Upload(open_socket(relay), r.ticket, size, pieces(data[: 2 * MIB]))
    wait_for(lambda: all(rx.count > 0 for rx in rxs), "bytes at every receiver")
    extra = ask(relay, r.ticket)  # streaming: still 423
    assert (extra.status, extra.rest) == (423, b'{"error":"GET side already claimed"}')
    second_put = ask(relay, r.ticket, "PUT", b"x")
    assert (second_put.status, second_put.rest) == (423, b'{"error":"PUT side already claimed"}')
    up.send_more(pieces(data[2 * MIB :]))
    done = up.answer()
    assert done.status == 200 and done.json() == ok_answer(size, 3), done
    for rx in rxs:
        assert rx.wait().end == "complete" and rx.sha == sha(data), rx
    relay.wait_done(r)
    assert ask(relay, r.ticket).status == 410


def test_four_gets_at_once_get_three_slots_and_one_423(relay: Relay) -> None:
    """The slots are counted exactly when GETs race for them."""
    r = relay.create(receivers=3)
    connect = lambda rb: open_socket(relay, rb)  # noqa: E731
    rxs = [Receiver(connect, r.ticket) for _ in range(4)]
    wait_for(lambda: sum(rx.done.is_set() for rx in rxs) == 1, "one GET answered")
    refused = [rx for rx in rxs if rx.done.is_set()]
    assert refused[0].status == 423 and bytes(refused[0].body) == (
        b'{"error":"GET side already claimed"}'
    )
    wait_waiting(relay, 3)
    data = DATA[:100_000]
    up = Upload(open_socket(relay), r.ticket, len(data), [data])
    assert up.answer().json() == ok_answer(len(data), 3)
    for rx in rxs:
        if rx is not refused[0]:
            assert rx.wait().end == "complete" and bytes(rx.body) == data


# === 6. not every receiver arrives within the TTL =======================================


@pytest.mark.parametrize(
    ("with_put", "gets"),
    [(True, 2), (False, 2), (False, 3)],
    ids=["put-and-2-gets", "2-gets", "3-gets-no-put"],
)
def test_receivers_missing_at_the_ttl_every_waiting_request_gets_408(
    relay: Relay, with_put: bool, gets: int
) -> None:
    r = relay.create(receivers=3, ttl=1)
    socks = []
    if with_put:
        put = open_socket(relay)
        put.sendall(head_of(r.ticket, "PUT", "Content-Length: 5\r\n") + b"hello")
        socks.append(put)
    for _ in range(gets):
        get = open_socket(relay)
        get.sendall(head_of(r.ticket, "GET"))
        socks.append(get)
    wait_waiting(relay, len(socks))
    started = time.monotonic()
    answers = [read_answer(sock, timeout=15) for sock in socks]
    assert time.monotonic() - started < 10
    put_body = b'{"error":"timed out waiting for GET side"}'
    get_bodies = (put_body, b'{"error":"timed out waiting for PUT side"}')
    for i, answer in enumerate(answers):
        assert answer.status == 408, answer
        assert answer.headers["content-type"] == "application/json"
        if with_put and i == 0:
            assert answer.rest == put_body
        elif with_put:
            assert answer.rest in get_bodies
        else:
            assert answer.rest == get_bodies[1]
    relay.wait_done(r)
    assert r.outcome is fastrelay.Outcome.EXPIRED
    assert ask(relay, r.ticket).status == 410


# === 7. every receiver dropped: the PUT is answered at once ==============================


def test_every_receiver_dropped_ends_the_transfer_at_once_with_502(
    relay_factory: Callable[..., Relay],
) -> None:
    relay = relay_factory(idle_timeout_s=60)  # far away: this is not the idle path
    size = 64 * MIB
    r = relay.create(receivers=3)
    rxs = receivers_of(relay, r.ticket, 3, reset_after=256 * KIB, rcvbuf=64 * KIB)
    wait_waiting(relay, 3)
    # The PUT sends 2 MiB of its 64 MiB and then nothing: its answer cannot
    # wait for the end of the upload.
    up = Upload(open_socket(relay), r.ticket, size, pieces(DATA[: 2 * MIB]))
    for rx in rxs:
        assert rx.wait(30).end == "we-reset", rx
    last_reset = time.monotonic()
    done = up.answer(timeout=20, wait_sent=False)
    assert time.monotonic() - last_reset < 10
    assert done.status == 502, done
    doc = done.json()
    assert isinstance(doc.pop("bytes"), int)
    assert doc == {"error": "3 of 3 receivers failed", "receivers": 3, "delivered": 0}
    relay.wait_done(r)
    text = metrics_text(relay)
    assert metric(text, 'fastrelay_fanout_receivers_dropped_total{why="lost"}') == 3


# === 8. max_bytes applies to the one upload =============================================


def test_a_chunked_upload_over_max_bytes_fails_every_receiver(
    matrix_relay: Relay, payload_file: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    relay = matrix_relay
    limit = 200_000
    data = payload_file.read_bytes()
    r = relay.create(receivers=3, max_bytes=limit)
    outs = [tmp_path / f"out{i}.bin" for i in range(3)]
    gets = [curl_get(relay, r.ticket, out) for out in outs]
    wait_waiting(relay, 3)
    put = relay.curl(
        "-H",
        AUTH.format(r.ticket),
        "-T",
        "-",
        "-w",
        "\n%{http_code}",
        relay.url(r.ticket),
        input=data,
    )
    body, code = split_code(put.stdout)
    assert code == 413, put
    doc = json.loads(body)  # as v1
    assert doc["bytes"] == limit
    assert doc["error"].startswith("relay: payload exceeded MaxBytes ("), doc
    for get, out in zip(gets, outs, strict=True):
        rc, _, err = finish(get)
        assert rc != 0, err  # never a clean end
        got = out.read_bytes() if out.exists() else b""
        assert len(got) <= limit and got == data[: len(got)]
    relay.wait_done(r)
    assert r.outcome is fastrelay.Outcome.TOO_LARGE


def test_a_content_length_over_max_bytes_is_413_and_every_waiting_get_502(
    relay: Relay,
) -> None:
    size = 5000
    r = relay.create(receivers=3, max_bytes=1000)
    socks = []
    for _ in range(3):
        get = open_socket(relay)
        get.sendall(head_of(r.ticket, "GET"))
        socks.append(get)
    wait_waiting(relay, 3)
    put = open_socket(relay)
    put.sendall(head_of(r.ticket, "PUT", f"Content-Length: {size}\r\n"))
    answer = read_answer(put)
    assert answer.status == 413
    assert answer.rest == (
        b'{"bytes":0,"error":"relay: payload exceeded MaxBytes (%d > 1000)"}' % size
    )
    for sock in socks:
        got = read_answer(sock)
        assert got.status == 502, got
        assert (
            got.rest == b'{"error":"upload failed: payload exceeded MaxBytes (%d > 1000)"}' % size
        )
    relay.wait_done(r)
    assert r.outcome is fastrelay.Outcome.TOO_LARGE


# === 9. minting over HTTP ===============================================================

IDS = {"workspace_id": "w", "source_exe_id": "s", "dest_exe_id": "d"}
RECEIVERS_ERROR = "receivers must be a whole number from 1 to {}"
RATE_ERROR = "max_rate must be a whole number of bytes per second, 0 or more"


@pytest.mark.parametrize("value", [0, 17, -1, "3", 2.5, 3.0, True, [3], {"n": 3}])
def test_mint_receivers_out_of_range_is_400_naming_the_field(relay: Relay, value: Any) -> None:
    status, body = relay.mint_http({**IDS, "receivers": value})
    assert status == 400, body
    assert body.endswith(b"}\n")
    assert json.loads(body) == {"error": RECEIVERS_ERROR.format(16)}


def test_mint_receivers_bound_follows_max_receivers(relay_factory: Callable[..., Relay]) -> None:
    relay = relay_factory(max_receivers=4)
    status, body = relay.mint_http({**IDS, "receivers": 5})
    assert status == 400 and json.loads(body) == {"error": RECEIVERS_ERROR.format(4)}
    status, body = relay.mint_http({**IDS, "receivers": 4})
    assert status == 201 and json.loads(body)["receivers"] == 4


@pytest.mark.parametrize("value", [-1, "1M", 1.5, True, [1]])
def test_mint_max_rate_bad_is_400_naming_the_field(relay: Relay, value: Any) -> None:
    status, body = relay.mint_http({**IDS, "max_rate": value})
    assert status == 400, body
    assert json.loads(body) == {"error": RATE_ERROR}


def test_mint_resumable_with_receivers_is_400(relay: Relay) -> None:
    status, body = relay.mint_http({**IDS, "resumable": True, "receivers": 2})
    assert status == 400
    assert json.loads(body) == {"error": "resumable and receivers > 1 cannot be combined"}
    # receivers 1 is no fan-out: resumable is fine with it
    status, body = relay.mint_http({**IDS, "resumable": True, "receivers": 1})
    assert status == 201, body
    doc = json.loads(body)
    assert (doc["resumable"], doc["receivers"], doc["max_rate"]) == (True, 1, 0)


@pytest.mark.parametrize(
    ("asked", "echo"),
    [
        ({"receivers": 3}, {"resumable": False, "receivers": 3, "max_rate": 0}),
        ({"receivers": 16}, {"resumable": False, "receivers": 16, "max_rate": 0}),
        ({"receivers": 1}, {"resumable": False, "receivers": 1, "max_rate": 0}),
        ({"max_rate": 1000}, {"resumable": False, "receivers": 1, "max_rate": 1000}),
        ({"max_rate": 0}, {"resumable": False, "receivers": 1, "max_rate": 0}),
        ({"resumable": False}, {"resumable": False, "receivers": 1, "max_rate": 0}),
        (
            {"receivers": 2, "max_rate": 5, "resumable": False},
            {"resumable": False, "receivers": 2, "max_rate": 5},
        ),
    ],
)
def test_mint_echoes_every_v2_option_when_one_is_named(
    relay: Relay, asked: dict[str, Any], echo: dict[str, Any]
) -> None:
    status, body = relay.mint_http({**IDS, **asked})
    assert status == 201, body
    doc = json.loads(body)
    assert list(doc)[:4] == ["ticket", "upload_url", "download_url", "expires_at"]
    assert {k: doc[k] for k in doc if k not in V1_KEYS} == echo
    r = relay.call(lambda: relay.registry.lookup(doc["ticket"]))
    assert (r.receivers, r.max_rate) == (echo["receivers"], echo["max_rate"])


V1_KEYS = ("ticket", "upload_url", "download_url", "expires_at")


def test_mint_without_v2_fields_is_the_v1_answer(relay: Relay) -> None:
    status, body = relay.mint_http({**IDS, "ttl_seconds": 60, "max_bytes": 10, "extra": 1})
    assert status == 201 and body.endswith(b"}\n")
    doc = json.loads(body)
    assert list(doc) == list(V1_KEYS)
    assert body == (
        b'{"ticket":"%s","upload_url":"%s","download_url":"%s","expires_at":"%s"}\n'
        % tuple(doc[k].encode() for k in V1_KEYS)
    )
    r = relay.call(lambda: relay.registry.lookup(doc["ticket"]))
    assert r.receivers == 1


def test_mint_max_rate_is_lowered_to_the_servers(relay_factory: Callable[..., Relay]) -> None:
    relay = relay_factory(max_rate=MIB)
    for asked, effective in ((0, MIB), (10 * MIB, MIB), (1000, 1000)):
        status, body = relay.mint_http({**IDS, "receivers": 2, "max_rate": asked})
        assert status == 201, body
        assert json.loads(body)["max_rate"] == effective, asked


def test_a_ticket_minted_over_http_fans_out_to_curl(relay: Relay, tmp_path: pathlib.Path) -> None:
    status, body = relay.mint_http({**IDS, "receivers": 2})
    assert status == 201
    doc = json.loads(body)
    t = doc["ticket"]
    outs = [tmp_path / "a.bin", tmp_path / "b.bin"]
    gets = [curl_get(relay, t, out, doc["download_url"]) for out in outs]
    wait_waiting(relay, 2)
    data = DATA[: 1 * MIB + 3]
    put = relay.curl("-fsS", "-H", AUTH.format(t), "-T", "-", doc["upload_url"], input=data)
    assert put.returncode == 0, put.stderr
    assert json.loads(put.stdout) == ok_answer(len(data), 2)
    for get, out in zip(gets, outs, strict=True):
        rc, code, err = finish(get)
        assert rc == 0 and code == b"200", err
        assert out.read_bytes() == data


# === 10. a slow receiver of 256 MiB: bounded server memory ===============================


class ServeProcess:
    """``python -m fastrelay serve`` on a free port."""

    SECRET = "fanout-secret"

    def __init__(self, log: pathlib.Path, *args: str) -> None:
        env = {**os.environ, "FASTRELAY_SHARED_SECRET": self.SECRET}
        self.log = log
        self._log_file = log.open("w")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fastrelay",
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                *args,
            ],
            stdout=subprocess.PIPE,
            stderr=self._log_file,
            text=True,
            env=env,
        )
        _PROCS.append(self.proc)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.startswith("fastrelay: listening on http"), (line, log.read_text())
        self.url = line.split()[-1]
        self.port = int(self.url.rsplit(":", 1)[1])
        self.ps = psutil.Process(self.proc.pid)

    def connect(self, rcvbuf: int | None = None) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(30)
        _OPEN.append(sock)
        sock.connect(("127.0.0.1", self.port))
        return sock

    def mint(self, **options: Any) -> str:
        req = urllib.request.Request(
            self.url + "/api/exec-gateway/relay/create",
            data=json.dumps({**IDS, **options}).encode(),
            headers={"Authorization": f"Bearer {self.SECRET}"},
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 201
            return str(json.loads(resp.read())["ticket"])

    def mint_status(self, **options: Any) -> tuple[int, Any]:
        req = urllib.request.Request(
            self.url + "/api/exec-gateway/relay/create",
            data=json.dumps({**IDS, **options}).encode(),
            headers={"Authorization": f"Bearer {self.SECRET}"},
        )
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, json.loads(exc.read())

    def metric(self, sample: str) -> float | None:
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as resp:
            return metric(resp.read().decode(), sample)

    def stop(self) -> str:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate(timeout=10)
        self._log_file.close()
        return self.log.read_text()


def test_a_slow_receiver_of_256_mib_keeps_server_memory_bounded(tmp_path: pathlib.Path) -> None:
    size = 256 * MIB
    slow_rate = 64 * MIB  # ~4 s for the whole body
    server = ServeProcess(tmp_path / "serve.log", "--log-level", "WARNING", "--max-receivers", "2")
    try:
        refused = server.mint_status(receivers=3)
        assert refused == (400, {"error": RECEIVERS_ERROR.format(2)})
        t = server.mint(receivers=2)
        fast = Receiver(server.connect, t, keep=False)
        slow = Receiver(server.connect, t, keep=False, rate=slow_rate, chunk=256 * KIB)
        wait_for(lambda: server.metric("fastrelay_waiting_sides") == 2, "both receivers")
        base = server.ps.memory_info().rss
        peak = [base]
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                with contextlib.suppress(psutil.Error):
                    peak[0] = max(peak[0], server.ps.memory_info().rss)
                stop.wait(0.02)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        block = os.urandom(2 * MIB)
        want = hashlib.sha256()

        def body() -> Iterator[memoryview]:
            view = memoryview(block)
            for i in range(size // MIB):
                off = (i * 4099) % MIB
                part = view[off : off + MIB]
                want.update(part)
                yield part

        started = time.monotonic()
        up = Upload(server.connect(), t, size, body())
        done = up.answer(timeout=90)
        elapsed = time.monotonic() - started
        stop.set()
        sampler.join(5)
        assert done.status == 200, done
        assert done.json() == ok_answer(size, 2)
        for rx in (fast, slow):
            rx.wait(30)
            assert rx.end == "complete" and rx.count == size, rx
            assert rx.sha == want.hexdigest()
        growth = peak[0] - base
        assert growth < 64 * MIB, f"server RSS grew {growth / MIB:.1f} MiB"
        # The slow receiver set the pace (the source was not read faster).
        assert elapsed > 0.8 * size / slow_rate, elapsed
    finally:
        log = server.stop()
    assert "Traceback" not in log, log
