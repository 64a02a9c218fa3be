"""Resumable relays with connections broken for real, by real clients.

`test_e2e_resume.py` breaks connections from inside the test (its own raw
sockets, closed or reset at an exact byte). Here the breaks come from the
network: a `FaultProxy` between curl and the server resets a connection or
goes silent at a byte count, and a veth link between two network
namespaces is taken down mid-transfer. The clients are plain curl, resumed
as a user would resume them (``curl -C - -o file``, ``curl -T file``,
``curl -C N -T file``). A long run moves 1 GiB through ten breaks with the
server's memory watched, and the recovery latency after a break is printed.

Nothing is ordered with a sleep: each step waits, with a deadline, for the
condition it needs (the relay's state on its loop, the proxy's fault, a
process's exit, a file's size).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import pathlib
import select
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import IO, Any

import psutil
import pytest
from conftest import CURL, Relay

import fastrelay
from fastrelay.core.session import State
from tests.support.faultproxy import FaultProxy, reset_after, silence_after
from tests.support.netns import NetnsPair, skip_reason

MIB = 1024 * 1024
L = 16 * MIB + 12345  # a body that is still moving when the break lands
K = 2 * MIB + 777  # where the proxy breaks a connection (bytes on the wire)
RESET = struct.pack("ii", 1, 0)


# --- fixtures: servers, and everything a test opened closed before its server stops ------


@dataclasses.dataclass
class Opened:
    procs: list[subprocess.Popen[Any]] = dataclasses.field(default_factory=list)
    socks: list[socket.socket] = dataclasses.field(default_factory=list)
    proxies: list[FaultProxy] = dataclasses.field(default_factory=list)
    files: list[IO[Any]] = dataclasses.field(default_factory=list)


_OPENED = Opened()


@pytest.fixture(autouse=True)
def _close_everything(relay_factory: Callable[..., Relay]) -> Iterator[None]:
    """Set up after ``relay_factory``, so torn down before the servers stop:
    a TLS server closing connections whose peers neither read nor close
    would wait for their close_notify."""
    yield
    for proc in _OPENED.procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
    for sock in _OPENED.socks:
        sock.close()
    for proxy in _OPENED.proxies:
        proxy.close()
    for f in _OPENED.files:
        f.close()
    _OPENED.procs.clear()
    _OPENED.socks.clear()
    _OPENED.proxies.clear()
    _OPENED.files.clear()


@pytest.fixture(params=["buffered", "splice", "tls"])
def frelay(request: pytest.FixtureRequest, relay_factory: Callable[..., Relay]) -> Relay:
    """uvloop; plain on the buffered path, plain on the splice(2) path, TLS."""
    kind = str(request.param)
    if kind == "tls":
        return relay_factory(tls=True)
    return relay_factory(kernel_splice_min_bytes=0 if kind == "buffered" else 1)


@pytest.fixture
def relay(relay_factory: Callable[..., Relay]) -> Relay:
    return relay_factory()


@pytest.fixture(scope="module")
def body_file(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    path = tmp_path_factory.mktemp("faults") / "body.bin"
    path.write_bytes(os.urandom(L))
    return path


# --- helpers ----------------------------------------------------------------------------------


def wait_for(check: Callable[[], bool], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)  # a poll interval, not an ordering


def state(relay: Relay, r: fastrelay.Relay) -> State:
    return relay.call(lambda: r.session.state)  # type: ignore[no-any-return]


def breaks(relay: Relay, r: fastrelay.Relay) -> int:
    return int(relay.call(lambda: r.breaks))


def waiting_after_break(relay: Relay, r: fastrelay.Relay, st: State, n: int = 1) -> None:
    """The relay saw break ``n`` and its surviving side waits in ``st``."""
    try:
        wait_for(lambda: breaks(relay, r) >= n and state(relay, r) is st, f"break {n}, {st.name}")
    except AssertionError as exc:
        seen = f"state {state(relay, r).name}, breaks {breaks(relay, r)}, bytes {r.bytes}"
        raise AssertionError(f"{exc} (saw {seen})") from None


def metric(relay: Relay, name: str) -> int:
    return int(relay.call(lambda: getattr(relay.registry.metrics, name)))


def sha_file(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(MIB):
            h.update(chunk)
    return h.hexdigest()


def mint(relay: Relay) -> fastrelay.Relay:
    return relay.create(resumable=True)


def url_via(relay: Relay, ticket: str, proxy: FaultProxy | None = None) -> str:
    if proxy is None:
        return relay.url(ticket)
    scheme = "https" if relay.tls else "http"
    return f"{scheme}://127.0.0.1:{proxy.port}/relay/{ticket}"


def fault_proxy(relay: Relay, *plans: Any) -> FaultProxy:
    proxy = FaultProxy(("127.0.0.1", relay.server.port), list(plans))
    _OPENED.proxies.append(proxy)
    return proxy


def auth(ticket: str) -> list[str]:
    return ["-H", f"Authorization: Bearer {ticket}"]


class Curl:
    """One curl process; ``-w`` writes the status code to stdout."""

    def __init__(self, argv: list[str], popen: Callable[..., subprocess.Popen[bytes]]) -> None:
        self.proc = popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        _OPENED.procs.append(self.proc)
        self.rc: int | None = None
        self.code = 0
        self.err = b""

    def wait(self, timeout: float = 60) -> int:
        out, self.err = self.proc.communicate(timeout=timeout)
        self.rc = self.proc.returncode
        self.code = int(out or b"0")
        return self.rc

    def __repr__(self) -> str:
        return f"<curl rc={self.rc} code={self.code} err={self.err!r}>"


def curl_get(
    relay: Relay,
    ticket: str,
    out: pathlib.Path,
    *,
    proxy: FaultProxy | None = None,
    resume: bool = False,
) -> Curl:
    argv = [*relay.curl_args(), "-o", str(out), "-w", "%{http_code}", *auth(ticket)]
    if resume:
        argv += ["-C", "-"]
    return Curl([*argv, url_via(relay, ticket, proxy)], subprocess.Popen)


class CurlPut(Curl):
    """``curl -T file`` (``-C N``): the answer's headers and body kept in files."""

    def __init__(
        self,
        base: list[str],
        url: str,
        ticket: str,
        body: pathlib.Path,
        tmp: pathlib.Path,
        offset: int | None = None,
        popen: Callable[..., subprocess.Popen[bytes]] = subprocess.Popen,
    ) -> None:
        tag = f"{time.monotonic_ns()}"
        self.headers_file = tmp / f"put-{tag}.head"
        self.body_file = tmp / f"put-{tag}.body"
        argv = [*base, "-w", "%{http_code}", "-D", str(self.headers_file)]
        argv += ["-o", str(self.body_file), *auth(ticket), "-T", str(body)]
        if offset is not None:
            argv += ["-C", str(offset)]
        super().__init__([*argv, url], popen)

    def headers(self) -> dict[str, str]:
        exists = self.headers_file.exists()
        text = self.headers_file.read_bytes().decode("latin-1") if exists else ""
        # The last head (a 100 Continue may come first).
        head = text.strip().split("\r\n\r\n")[-1]
        return {
            k.strip().lower(): v.strip()
            for k, _, v in (line.partition(":") for line in head.split("\r\n")[1:])
        }

    def json(self) -> Any:
        return json.loads(self.body_file.read_bytes())


def curl_put(
    relay: Relay,
    ticket: str,
    body: pathlib.Path,
    *,
    proxy: FaultProxy | None = None,
    offset: int | None = None,
) -> CurlPut:
    return CurlPut(
        relay.curl_args(), url_via(relay, ticket, proxy), ticket, body, relay.tmp, offset
    )


def finish_put(put: CurlPut, again: Callable[[int], CurlPut], limit: int = 3) -> CurlPut:
    """Wait for the source's answer; a 409 with ``Upload-Offset: N`` (the
    destination came back behind what this upload had sent) is followed, as
    a client does, by ``curl -C N -T file``."""
    for _ in range(limit):
        put.wait()
        if put.code != 409:
            return put
        assert put.rc == 0, put
        offset = int(put.headers()["upload-offset"])
        assert put.json()["offset"] == offset
        put = again(offset)
    raise AssertionError(f"still 409 after {limit} uploads: {put!r}")


# --- 1a. the destination's connection is reset by the network -----------------------------


@pytest.mark.parametrize("again_via", ["direct", "proxy"])
def test_curl_get_reset_by_the_network_resumes_with_range(
    frelay: Relay, body_file: pathlib.Path, again_via: str
) -> None:
    relay = frelay
    r = mint(relay)
    t = r.ticket
    out = relay.tmp / "out.bin"
    proxy = fault_proxy(relay, reset_after(K, "down"))  # then fault-free connections
    get1 = curl_get(relay, t, out, proxy=proxy)
    wait_for(lambda: state(relay, r) is State.GET_WAITING, "the GET to wait")
    put1 = curl_put(relay, t, body_file)
    proxy.wait_faulted(0, timeout=30)
    rc = get1.wait()
    assert rc in (18, 56), get1
    waiting_after_break(relay, r, State.PUT_WAITING)
    have = out.stat().st_size
    assert 0 < have < L

    get2 = curl_get(relay, t, out, proxy=proxy if again_via == "proxy" else None, resume=True)
    put = finish_put(put1, lambda n: curl_put(relay, t, body_file, offset=n))
    assert get2.wait() == 0 and get2.code == 206, get2
    assert put.rc == 0 and put.code == 200, put
    assert put.json() == {"bytes": L, "status": "ok", "resumes": 1}
    assert sha_file(out) == sha_file(body_file)
    relay.wait_done(r)
    assert r.outcome is fastrelay.Outcome.OK and r.bytes == L


# --- 1b. the source's connection is reset by the network ----------------------------------


@pytest.mark.parametrize("resume_from", ["whole", "point"])
def test_curl_put_reset_by_the_network_resumes(
    frelay: Relay, body_file: pathlib.Path, resume_from: str
) -> None:
    relay = frelay
    r = mint(relay)
    t = r.ticket
    out = relay.tmp / "out.bin"
    proxy = fault_proxy(relay, reset_after(K, "up"))
    get = curl_get(relay, t, out)
    wait_for(lambda: state(relay, r) is State.GET_WAITING, "the GET to wait")
    put1 = curl_put(relay, t, body_file, proxy=proxy)
    proxy.wait_faulted(0, timeout=30)
    assert put1.wait() != 0, put1
    waiting_after_break(relay, r, State.GET_WAITING)
    point = int(relay.call(lambda: r.record.point))  # what the GET has been handed
    assert 0 < point < K

    if resume_from == "whole":
        put2 = curl_put(relay, t, body_file, proxy=proxy)
    else:
        put2 = curl_put(relay, t, body_file, proxy=proxy, offset=point)
    assert put2.wait() == 0 and put2.code == 200, put2
    assert put2.json() == {"bytes": L, "status": "ok", "resumes": 1}
    assert get.wait() == 0 and get.code == 200, get
    assert sha_file(out) == sha_file(body_file)
    relay.wait_done(r)
    assert r.outcome is fastrelay.Outcome.OK


# --- 1c. the network goes silent: the old connection stays open on the server -----------


@pytest.mark.parametrize("side", ["GET", "PUT"])
def test_a_new_curl_supersedes_a_connection_the_network_silenced(
    frelay: Relay, body_file: pathlib.Path, side: str
) -> None:
    relay = frelay
    r = mint(relay)
    t = r.ticket
    out = relay.tmp / "out.bin"
    proxy = fault_proxy(relay, silence_after(K, "down" if side == "GET" else "up"))
    get = curl_get(relay, t, out, proxy=proxy if side == "GET" else None)
    wait_for(lambda: state(relay, r) is State.GET_WAITING, "the GET to wait")
    put = curl_put(relay, t, body_file, proxy=proxy if side == "PUT" else None)
    proxy.wait_faulted(0, timeout=30)
    # The client gives up on the dead network; its connection to the proxy
    # ends, the proxy's to the server stays open and quiet.
    old = get if side == "GET" else put
    if side == "GET":  # curl has written most of what it got: it resumes from there
        wait_for(lambda: out.exists() and out.stat().st_size >= MIB, "curl's file to fill")
    old.proc.terminate()
    old.wait()
    assert state(relay, r) is State.STREAMING and breaks(relay, r) == 0
    assert metric(relay, "superseded") == 0

    if side == "GET":
        get = curl_get(relay, t, out, resume=True)
        put = finish_put(put, lambda n: curl_put(relay, t, body_file, offset=n))
        assert get.wait() == 0 and get.code == 206, get
    else:
        put = curl_put(relay, t, body_file)
        put.wait()
        assert get.wait() == 0 and get.code == 200, get
    assert put.rc == 0 and put.code == 200, put
    assert put.json() == {"bytes": L, "status": "ok", "resumes": 1}
    assert sha_file(out) == sha_file(body_file)
    assert metric(relay, "superseded") == 1
    relay.wait_done(r)
    assert r.outcome is fastrelay.Outcome.OK
    proxy.close()  # ends the silenced connection (a reset), as the link coming back would


# --- 2 and 4. many breaks, raw sockets, exact offsets -------------------------------------


def head_of(ticket: str, method: str, extra: str = "") -> str:
    return (
        f"{method} /relay/{ticket} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ticket}\r\n{extra}"
    )


def connect(relay: Relay) -> socket.socket:
    sock = relay.connect()
    sock.settimeout(60)
    _OPENED.socks.append(sock)
    return sock


def reset(sock: socket.socket) -> None:
    """Close with a TCP reset (TLS too: no close_notify, as a dead peer)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET)
    sock.close()


def close_cleanly(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


@dataclasses.dataclass
class Head:
    status: int
    headers: dict[str, str]
    rest: bytes


def read_head(sock: socket.socket) -> Head:
    buf = b""
    while True:
        while b"\r\n\r\n" not in buf:
            chunk = sock.recv(65536)
            if not chunk:
                raise AssertionError(f"closed before a head: {buf!r}")
            buf += chunk
        head, buf = buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        if status != 100:
            headers = {
                k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])
            }
            return Head(status, headers, buf)


class Source:
    """A raw PUT whose body goes out from ``body`` (a file) in ranges, from a
    thread: the relay's backpressure holds it while the test reads."""

    def __init__(self, relay: Relay, ticket: str, body: pathlib.Path, length: int, at: int) -> None:
        self.sock = connect(relay)
        self.file = body.open("rb")
        _OPENED.files.append(self.file)
        extra = f"Content-Range: bytes {at}-{length - 1}/{length}\r\n" if at else ""
        head = head_of(ticket, "PUT", extra) + f"Content-Length: {length - at}\r\n\r\n"
        self.sock.sendall(head.encode())
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def send(self, start: int, stop: int) -> None:
        self.wait_sent()
        self._thread = threading.Thread(target=self._send, args=(start, stop), daemon=True)
        self._thread.start()

    def _send(self, start: int, stop: int) -> None:
        try:
            self.sock.sendfile(self.file, start, stop - start)
        except OSError as exc:
            self.error = exc

    def wait_sent(self) -> None:
        if self._thread is not None:
            self._thread.join(120)
            assert not self._thread.is_alive(), "the upload's body did not go out"
            self._thread = None
        assert self.error is None, self.error

    def answer(self) -> Any:
        self.wait_sent()
        head = read_head(self.sock)
        rest = head.rest
        while len(rest) < int(head.headers["content-length"]):
            chunk = self.sock.recv(65536)
            assert chunk
            rest += chunk
        assert head.status == 200, (head, rest)
        return json.loads(rest)


class Destination:
    """A raw GET that hashes what it receives, never holding the body."""

    def __init__(self) -> None:
        self.hasher = hashlib.sha256()
        self.got = 0
        self._buf = bytearray(MIB)
        self._view = memoryview(self._buf)
        self.sock: socket.socket | None = None

    def open(self, relay: Relay, ticket: str, length: int) -> Head:
        sock = self.sock = connect(relay)
        extra = f"Range: bytes={self.got}-\r\n" if self.got else ""
        sock.sendall((head_of(ticket, "GET", extra) + "\r\n").encode())
        return self.head(length)

    def head(self, length: int) -> Head:
        assert self.sock is not None
        head = read_head(self.sock)
        if self.got:
            assert head.status == 206, head
            assert head.headers["content-range"] == f"bytes {self.got}-{length - 1}/{length}"
        else:
            assert head.status == 200, head
        assert int(head.headers["content-length"]) == length - self.got
        self.take(head.rest)
        return head

    def take(self, data: bytes | memoryview) -> None:
        self.hasher.update(data)
        self.got += len(data)

    def read_some(self, stop: int) -> None:
        assert self.sock is not None
        n = self.sock.recv_into(self._view[: min(MIB, stop - self.got)])
        if not n:
            raise AssertionError(f"closed after {self.got} bytes")
        self.take(self._view[:n])

    def read_to(self, stop: int) -> None:
        while self.got < stop:
            self.read_some(stop)


@dataclasses.dataclass(frozen=True)
class Break:
    at: int
    side: str  # "GET" (the destination resets) or "PUT" (the source goes)
    how: str = "reset"  # the source: "reset" or "close"
    resume_from: int | None = None  # the new PUT's offset (None: the point)


@dataclasses.dataclass
class Run:
    seconds: float
    digest: str
    survived: int
    latencies: list[tuple[str, float]]
    rss_growth: int


class RssWatch:
    """The highest RSS of this process (the server runs in it) while watched."""

    def __init__(self) -> None:
        self.proc = psutil.Process()
        self.base = self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(0.02):  # a sampling period
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(5)
        return self.peak - self.base


def run_with_breaks(
    relay: Relay, body: pathlib.Path, length: int, plan: list[Break], watch: RssWatch | None = None
) -> Run:
    """Move ``body`` through a resumable relay; break the sides at exactly
    the planned offsets (each side has sent/received exactly that much when
    it breaks) and resume them. Measures each recovery: from the new
    request's connect to the first body byte the destination gets after."""
    r = relay.create(resumable=True)
    t = r.ticket
    start = time.monotonic()
    stops = [b.at for b in plan] + [length]
    dest = Destination()
    sock = connect(relay)
    sock.sendall((head_of(t, "GET") + "\r\n").encode())
    dest.sock = sock
    wait_for(lambda: state(relay, r) is State.GET_WAITING, "the GET to wait")
    src = Source(relay, t, body, length, 0)
    src.send(0, stops[0])
    dest.head(length)
    latencies: list[tuple[str, float]] = []
    for n, brk in enumerate(plan, 1):
        dest.read_to(brk.at)
        src.wait_sent()
        nxt = stops[n]
        if brk.side == "GET":
            reset(dest.sock)
            waiting_after_break(relay, r, State.PUT_WAITING, n)
            t0 = time.monotonic()
            dest.sock = sock = connect(relay)
            sock.sendall((head_of(t, "GET", f"Range: bytes={dest.got}-\r\n") + "\r\n").encode())
            src.send(brk.at, nxt)  # the open PUT goes on
            dest.head(length)
        else:
            (reset if brk.how == "reset" else close_cleanly)(src.sock)
            waiting_after_break(relay, r, State.GET_WAITING, n)
            assert relay.call(lambda: r.record.point) == brk.at
            at = brk.at if brk.resume_from is None else brk.resume_from
            t0 = time.monotonic()
            src = Source(relay, t, body, length, at)
            src.send(at, nxt)
        if dest.got == brk.at:
            dest.read_some(nxt)
        skipped = brk.at - (brk.at if brk.resume_from is None else brk.resume_from)
        latencies.append((brk.side if not skipped else "PUT+skip", time.monotonic() - t0))
    dest.read_to(length)
    answer = src.answer()
    seconds = time.monotonic() - start
    growth = watch.stop() if watch is not None else 0
    assert answer == {"bytes": length, "status": "ok", "resumes": len(plan)}
    relay.wait_done(r)
    assert r.outcome is fastrelay.Outcome.OK and r.bytes == length
    assert dest.sock is not None
    dest.sock.close()
    src.sock.close()
    return Run(seconds, dest.hasher.hexdigest(), len(plan), latencies, growth)


def alternating_plan(length: int, count: int) -> list[Break]:
    """``count`` breaks spread over the body, destination and source in
    turn; the source resumes at the point, before it, or from byte 0."""
    plan = []
    for i in range(count):
        at = (i + 1) * length // (count + 1) + 1009 * i
        if i % 2 == 0:
            plan.append(Break(at, "GET"))
        else:
            how = "reset" if i % 4 == 1 else "close"
            resume_from = {1: 0, 3: at - 5 * MIB - 3, 5: None}.get(i % 6)
            plan.append(Break(at, "PUT", how, resume_from))
    return plan


@pytest.fixture(scope="module")
def gib_file(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[pathlib.Path, str]]:
    """1 GiB of random bytes (a 16 MiB random block, rotated differently in
    each 16 MiB so that no two are alike) and its sha256; deleted after."""
    path = tmp_path_factory.mktemp("gib") / "gib.bin"
    block = os.urandom(16 * MIB)
    h = hashlib.sha256()
    with path.open("wb") as f:
        for i in range(64):
            k = (i * 7_919_993) % len(block)
            part = block[k:] + block[:k]
            h.update(part)
            f.write(part)
    del block, part
    yield path, h.hexdigest()
    path.unlink()


@pytest.mark.slow
@pytest.mark.parametrize("path_kind", ["buffered", "splice"])
def test_one_gib_through_ten_breaks_with_bounded_memory(
    relay_factory: Callable[..., Relay], gib_file: tuple[pathlib.Path, str], path_kind: str
) -> None:
    path, digest = gib_file
    length = path.stat().st_size
    assert length == 1024 * MIB
    relay = relay_factory(kernel_splice_min_bytes=0 if path_kind == "buffered" else 1)
    relay.call(lambda: setattr(relay.registry, "max_resumes", 10))
    plan = alternating_plan(length, 10)
    assert sum(b.side == "GET" for b in plan) == 5
    watch = RssWatch()
    run = run_with_breaks(relay, path, length, plan, watch)
    assert run.digest == digest
    print(
        f"\n1 GiB {path_kind}: {run.survived} breaks survived, sha256 {run.digest},"
        f" {run.seconds:.2f}s ({length / MIB / run.seconds:.0f} MiB/s),"
        f" RSS growth {run.rss_growth / MIB:.1f} MiB"
    )
    print_latencies(f"1 GiB {path_kind}", run.latencies)
    assert run.rss_growth < 64 * MIB


def print_latencies(what: str, latencies: list[tuple[str, float]]) -> None:
    for side in ("GET", "PUT", "PUT+skip"):
        ms = [s * 1000 for k, s in latencies if k == side]
        if ms:
            print(
                f"{what}: recovery after a {side} break, connect -> next body byte:"
                f" median {statistics.median(ms):.2f} ms, max {max(ms):.2f} ms,"
                f" runs {' '.join(f'{x:.2f}' for x in ms)}"
            )


def test_recovery_latency_after_breaks(frelay: Relay, body_file: pathlib.Path) -> None:
    """Ten breaks on a small body: each recovery's time from the new
    request's connect to the destination's next body byte (printed only)."""
    plan = alternating_plan(L, 10)
    plan = [dataclasses.replace(b, resume_from=None) for b in plan]  # no skips: pure recovery
    run = run_with_breaks(frelay, body_file, L, plan)
    assert run.digest == sha_file(body_file)
    kind = "tls" if frelay.tls else "plain"
    print()
    print_latencies(f"16 MiB {kind}", run.latencies)


# --- 3. a true link loss between two network namespaces -------------------------------------

NS_SECRET = "netns-secret"


def _read_line_with(proc: subprocess.Popen[bytes], needle: bytes, timeout: float) -> bytes:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    seen = b""
    while needle not in seen:
        left = deadline - time.monotonic()
        if left <= 0 or proc.poll() is not None:
            raise AssertionError(f"server never said {needle!r}: {seen!r}")
        ready, _, _ = select.select([proc.stdout], [], [], left)
        if ready:
            seen += os.read(proc.stdout.fileno(), 4096)
    return seen


def test_a_pulled_cable_under_curl_get_then_curl_resumes(tmp_path: pathlib.Path) -> None:
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    assert CURL is not None
    length = 48 * MIB + 4321
    body = tmp_path / "body.bin"
    body.write_bytes(os.urandom(length))
    out = tmp_path / "out.bin"
    with NetnsPair() as pair:
        # The server and the source in "b"; the destination in "a", across the link.
        port = 8080
        env = {**os.environ, "FASTRELAY_SHARED_SECRET": NS_SECRET}
        argv = [sys.executable, "-m", "fastrelay", "serve", "--host", pair.addr_b]
        server = pair.popen("b", [*argv, "--port", str(port)], env=env, stdout=subprocess.PIPE)
        _OPENED.procs.append(server)
        _read_line_with(server, b"listening on", 30)
        base = f"http://{pair.addr_b}:{port}"
        mint = pair.run(
            "a",
            [
                CURL, "-sS", "-f", "-H", f"Authorization: Bearer {NS_SECRET}",
                "-H", "Content-Type: application/json", "--data",
                json.dumps(
                    {"workspace_id": "w", "source_exe_id": "s", "dest_exe_id": "d",
                     "resumable": True}
                ),
                f"{base}/api/exec-gateway/relay/create",
            ],
        )  # fmt: skip
        ticket = json.loads(mint.stdout)["ticket"]
        url = f"{base}/relay/{ticket}"

        def in_ns(side: str) -> Callable[..., subprocess.Popen[bytes]]:
            return lambda argv, **kw: pair.popen(side, argv, **kw)  # type: ignore[arg-type]

        def put_from(offset: int | None) -> CurlPut:
            return CurlPut([CURL, "-sS"], url, ticket, body, tmp_path, offset, in_ns("b"))

        # A slow reader, so the cable is pulled mid-body.
        get1 = Curl(
            [CURL, "-sS", "-o", str(out), "-w", "%{http_code}", "--limit-rate", "16M",
             *auth(ticket), url],
            in_ns("a"),
        )  # fmt: skip
        put = put_from(None)
        wait_for(lambda: out.exists() and out.stat().st_size >= 4 * MIB, "bytes over the link")
        pair.link_down("a")
        t_down = time.monotonic()
        # The user gives up on the dead link (curl's own --speed-time check
        # would take ~8 s: it averages over a 5 s window). Its FIN or RST is
        # lost with the link: the server still holds the old connection.
        get1.proc.terminate()
        get1.wait(30)
        t_gave_up = time.monotonic()
        have = out.stat().st_size
        assert 0 < have < length
        pair.link_up("a")
        wait_for(lambda: pair.link_state("a") == "UP", "the link")
        t_up = time.monotonic()
        get2 = Curl(
            [CURL, "-sS", "-C", "-", "-o", str(out), "-w", "%{http_code}", *auth(ticket), url],
            in_ns("a"),
        )
        put = finish_put(put, put_from)
        assert get2.wait(60) == 0 and get2.code == 206, get2
        assert put.rc == 0 and put.code == 200, put
        assert put.json() == {"bytes": length, "status": "ok", "resumes": 1}
        assert sha_file(out) == sha_file(body)
        metrics = pair.run("b", [CURL, "-sS", f"{base}/metrics"]).stdout.decode()
        superseded = [x for x in metrics.splitlines() if x.startswith("fastrelay_superseded")]
        print(
            f"\nnetns: link down after {have} bytes at the destination;"
            f" curl gave up after {t_gave_up - t_down:.2f}s, link up after {t_up - t_down:.2f}s,"
            f" finished {time.monotonic() - t_down:.2f}s after the cable was pulled;"
            f" {superseded}"
        )
        server.terminate()
        server.wait(10)
