"""Paced relays against the real server: the wire contract's "Paced relays"
section measured from the destination's side.

The contract: over any window of 5 s or more, the bytes reaching the
destination are at most ``rate x window + burst`` with ``burst =
max(1 s of rate, 256 KiB)``, and the relay runs no more than 10% below its
rate when the network allows. Every test here checks exactly those
tolerances, no tighter: a receiver thread timestamps every ``recv`` (with
``time.monotonic``), and the timeline is checked over every window of 5 s or
more that starts on a 0.25 s grid from the first byte and ends at any
``recv``; the average is the body over first-to-last byte.

Bodies are 6.25 s of rate, so that a run lasts more than 5 s even after the
burst the contract allows (a body the burst plus 5 s of rate could carry may
legally arrive within one window, which proves nothing).
The 6 s runs use one loop (uvloop) only; the data paths are the splice(2)
path (plain Content-Length >= 1 MiB), the buffered path
(``kernel_splice_min_bytes=0``), a chunked upload (curl ``-T -``) and TLS.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import Relay
from test_e2e_cli import one_error_line, ready_url, serve, stop
from test_e2e_metrics import scrape
from test_e2e_transfer import AUTH, feed_stdin, finish, wait_waiting

import fastrelay

KIB = 1024
MIB = 1024 * KIB
RATE = 1 * MIB
"""The rate of the single-relay runs: a 7 MiB body lasts ~6-7 s."""
SPAN_S = 6.25
"""Seconds of rate in a body: past 5 s of rate plus the largest burst, so
a run lasts over 5 s whatever burst the server takes."""
WINDOW_S = 5.0
STEP_S = 0.25
MIN_BURST = 256 * KIB
LOW = 0.9
"""The contract: not more than 10% below the rate."""

BODY = os.urandom(19 * MIB)
"""Slices of one random body (the largest run moves 18.75 MiB)."""

PACED_METRIC = "fastrelay_paced_seconds_total"
SECRET = "pacing-s3cret-value"


def body_for(rate: float) -> bytes:
    """A body of ``SPAN_S`` seconds at ``rate``."""
    return BODY[: int(SPAN_S * rate)]


def burst(rate: int) -> int:
    """The contract's burst allowance for ``rate``."""
    return max(rate, MIN_BURST)


# --- sockets and processes, closed after every test ------------------------------------

_OPEN: list[socket.socket] = []
_PROCS: list[subprocess.Popen[bytes]] = []


@pytest.fixture(autouse=True)
def _cleanup(relay_factory: Callable[..., Relay]) -> Iterator[None]:
    """Close what a test opened before its servers stop (set up after
    ``relay_factory``, so torn down first): a TLS server closing connections
    whose peers neither read nor close waits for their close_notify."""
    yield
    while _PROCS:
        proc = _PROCS.pop()
        if proc.poll() is None:
            proc.kill()
        with contextlib.suppress(Exception):
            proc.communicate(timeout=10)
    while _OPEN:
        _OPEN.pop().close()


def connect(relay: Relay) -> socket.socket:
    sock = relay.connect()
    sock.settimeout(30)
    _OPEN.append(sock)
    return sock


def wait_for(check: Callable[[], bool], what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)  # a poll interval, not an ordering


# --- the timeline a destination sees -----------------------------------------------------


@dataclasses.dataclass
class Timeline:
    """Payload bytes by the monotonic time each ``recv`` returned them."""

    times: list[float] = dataclasses.field(default_factory=list)
    sizes: list[int] = dataclasses.field(default_factory=list)

    def add(self, when: float, n: int) -> None:
        if n:
            self.times.append(when)
            self.sizes.append(n)

    @property
    def total(self) -> int:
        return sum(self.sizes)

    @property
    def first(self) -> float:
        return self.times[0]

    @property
    def last(self) -> float:
        return self.times[-1]

    def between(self, start: float, end: float) -> int:
        """Bytes received at ``start <= t <= end``."""
        i = bisect.bisect_left(self.times, start)
        j = bisect.bisect_right(self.times, end)
        return sum(self.sizes[i:j])

    @staticmethod
    def merged(*lines: Timeline) -> Timeline:
        pairs = sorted(
            (t, n) for line in lines for t, n in zip(line.times, line.sizes, strict=True)
        )
        return Timeline([t for t, _ in pairs], [n for _, n in pairs])


def average(line: Timeline) -> float:
    """Bytes/s over the run, first byte to last."""
    span = line.last - line.first
    assert span > 0, "the whole body came in one recv"
    return line.total / span


def worst_window(line: Timeline, rate: int) -> tuple[float, float, float]:
    """The largest ``bytes - rate x window`` over windows of 5 s or more
    starting on a 0.25 s grid from the first byte and ending at any recv:
    (excess bytes, window start from the first byte, window length)."""
    times, sizes = line.times, line.sizes
    cum = [0]
    for n in sizes:
        cum.append(cum[-1] + n)
    worst = (-float("inf"), 0.0, 0.0)
    k = 0
    while line.first + k * STEP_S <= line.last:
        start = line.first + k * STEP_S
        i = bisect.bisect_left(times, start)
        for j in range(i, len(times)):
            window = max(times[j] - start, WINDOW_S)
            excess = cum[j + 1] - cum[i] - rate * window
            if excess > worst[0]:
                worst = (excess, start - line.first, window)
        k += 1
    return worst


def assert_not_above(line: Timeline, rate: int, what: str) -> float:
    """Over every window >= 5 s, at most ``rate x window + burst``. Returns
    the worst excess."""
    excess, start, window = worst_window(line, rate)
    assert excess <= burst(rate), (
        f"{what}: {excess / KIB:.0f} KiB over {rate / MIB:.3f} MiB/s x {window:.2f} s "
        f"in the window from +{start:.2f} s; the contract allows {burst(rate) / KIB:.0f} KiB "
        f"(average {average(line) / MIB:.3f} MiB/s, {line.total} bytes in "
        f"{line.last - line.first:.2f} s)"
    )
    return excess


def assert_paced(line: Timeline, rate: int, what: str) -> float:
    """The whole contract for one run at ``rate``; returns its average."""
    excess = assert_not_above(line, rate, what)
    avg = average(line)
    assert avg >= LOW * rate, (
        f"{what}: average {avg / MIB:.3f} MiB/s is more than 10% below "
        f"{rate / MIB:.3f} MiB/s ({line.total} bytes in {line.last - line.first:.2f} s)"
    )
    print(
        f"\n{what}: {avg / MIB:.3f} MiB/s over {line.last - line.first:.2f} s "
        f"(rate {rate / MIB:.3f} MiB/s; worst window {excess / KIB:+.0f} KiB "
        f"vs {burst(rate) / KIB:.0f} KiB allowed)"
    )
    return avg


def assert_share(line: Timeline, start: float, end: float, rate: float, what: str) -> float:
    """Over ``[start, end]`` (>= 5 s, all of it shared) ``line`` got no
    more than 10% below ``rate``; returns what it got."""
    assert end - start >= WINDOW_S, f"{what}: the relays overlapped only {end - start:.2f} s"
    got = line.between(start, end) / (end - start)
    assert got >= LOW * rate, (
        f"{what}: {got / MIB:.3f} MiB/s while sharing, more than 10% below "
        f"{rate / MIB:.3f} MiB/s (over {end - start:.2f} s)"
    )
    print(f"\n{what}: {got / MIB:.3f} MiB/s while sharing {end - start:.2f} s")
    return got


# --- the destination: a raw GET whose thread timestamps every recv ------------------------


class Dechunker:
    """Payload of a chunked body, fed as it arrives."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._left = 0
        self._state = "size"
        self.done = False

    def feed(self, data: bytes) -> bytes:
        buf = self._buf
        buf += data
        out = bytearray()
        while not self.done:
            if self._state == "size":
                end = buf.find(b"\r\n")
                if end < 0:
                    break
                size = int(bytes(buf[:end]).split(b";")[0], 16)
                del buf[: end + 2]
                self._left = size
                self._state = "data" if size else "trailer"
            elif self._state == "data":
                if not buf:
                    break
                take = min(self._left, len(buf))
                out += buf[:take]
                del buf[:take]
                self._left -= take
                if not self._left:
                    self._state = "crlf"
            elif self._state == "crlf":
                if len(buf) < 2:
                    break
                assert buf[:2] == b"\r\n", bytes(buf[:16])
                del buf[:2]
                self._state = "size"
            else:  # trailer section, up to its empty line
                end = buf.find(b"\r\n")
                if end < 0:
                    break
                line = bytes(buf[:end])
                del buf[: end + 2]
                self.done = not line
        return bytes(out)


class Download:
    """A GET on a raw socket; a thread reads the whole answer, timestamping
    every recv that brought payload."""

    def __init__(self, relay: Relay, ticket: str) -> None:
        self.sock = connect(relay)
        self.sock.sendall(
            f"GET /relay/{ticket} HTTP/1.1\r\nHost: x\r\n{AUTH.format(ticket)}\r\n\r\n".encode()
        )
        self.line = Timeline()
        self.status = 0
        self.headers: dict[str, str] = {}
        self._sha = hashlib.sha256()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @property
    def received(self) -> int:
        return self.line.total

    def _run(self) -> None:
        try:
            self._receive()
        except BaseException as exc:
            self._error = exc

    def _take(self, when: float, payload: bytes) -> None:
        self._sha.update(payload)
        self.line.add(when, len(payload))

    def _receive(self) -> None:
        sock = self.sock
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = sock.recv(65536)
            if not chunk:
                raise AssertionError(f"closed before a head: {buf!r}")
            buf += chunk
        when = time.monotonic()
        head, rest = buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split()[1])
        for line in lines[1:]:
            k, _, v = line.partition(":")
            self.headers[k.strip().lower()] = v.strip()
        assert self.status == 200, (lines, rest[:200])
        if "content-length" in self.headers:
            left = int(self.headers["content-length"])
            self._take(when, rest)
            left -= len(rest)
            while left > 0:
                chunk = sock.recv(min(left, 1 << 20))
                when = time.monotonic()
                if not chunk:
                    raise AssertionError(f"closed after {self.received} bytes")
                self._take(when, chunk)
                left -= len(chunk)
        else:
            assert self.headers.get("transfer-encoding") == "chunked", self.headers
            body = Dechunker()
            self._take(when, body.feed(rest))
            while not body.done:
                chunk = sock.recv(1 << 20)
                when = time.monotonic()
                if not chunk:
                    raise AssertionError(f"closed after {self.received} bytes")
                self._take(when, body.feed(chunk))

    def result(self, body: bytes, timeout: float = 60) -> Timeline:
        """The timeline once the whole body is here (checked byte for byte)."""
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"the download is still going ({self.received} bytes)"
        if self._error is not None:
            raise self._error
        assert self.line.total == len(body), (self.line.total, len(body))
        assert self._sha.hexdigest() == hashlib.sha256(body).hexdigest(), "the body differs"
        return self.line


# --- the source: a raw PUT (Content-Length) or curl -T - (chunked) ------------------------


class Upload:
    """A PUT whose body goes out from a thread (pacing holds it back)."""

    def __init__(self, relay: Relay, ticket: str, body: bytes, *, chunked: bool = False) -> None:
        self.started = time.monotonic()
        self._answer: tuple[int, bytes] | None = None
        self._error: BaseException | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        if chunked:
            # curl sends a body of unknown length (stdin) chunked.
            self.proc = relay.popen(
                "-T",
                "-",
                "-H",
                AUTH.format(ticket),
                "-w",
                "\n%{http_code}",
                relay.url(ticket),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            _PROCS.append(self.proc)
            feed_stdin(self.proc, body)
            return
        self.sock = connect(relay)
        head = (
            f"PUT /relay/{ticket} HTTP/1.1\r\nHost: x\r\n{AUTH.format(ticket)}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        self._thread = threading.Thread(target=self._run, args=(head, body), daemon=True)
        self._thread.start()

    def _run(self, head: bytes, body: bytes) -> None:
        try:
            self.sock.sendall(head)
            self.sock.sendall(memoryview(body))
            buf = b""
            while b"\r\n\r\n" not in buf or len(buf.split(b"\r\n\r\n", 1)[1]) < _length(buf):
                chunk = self.sock.recv(65536)
                if not chunk:
                    break
                buf += chunk
            head_, _, rest = buf.partition(b"\r\n\r\n")
            self._answer = (int(head_.split()[1]), rest)
        except BaseException as exc:
            self._error = exc

    def answer(self, timeout: float = 60) -> tuple[int, Any]:
        """(status, JSON body) of the PUT's answer."""
        if self.proc is not None:
            rc, out, err = finish(self.proc, timeout)
            assert rc == 0, (rc, out, err)
            text, _, code = out.rpartition(b"\n")
            return int(code), json.loads(text)
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the upload is still going"
        if self._error is not None:
            raise self._error
        assert self._answer is not None
        return self._answer[0], json.loads(self._answer[1])


def _length(buf: bytes) -> int:
    head = buf.split(b"\r\n\r\n", 1)[0].decode("latin-1").lower()
    for line in head.split("\r\n"):
        if line.startswith("content-length:"):
            return int(line.split(":", 1)[1])
    return 0


def assert_ok(upload: Upload, size: int, **more: Any) -> None:
    status, doc = upload.answer()
    assert status == 200, doc
    assert doc["bytes"] == size and doc["status"] == "ok", doc
    for key, value in more.items():
        assert doc[key] == value, doc


def paced_run(
    relay: Relay,
    r: fastrelay.Relay,
    body: bytes,
    *,
    chunked: bool = False,
    put_first: bool = False,
) -> tuple[Download, Upload]:
    """GET first (so no body waits before pairing), then the PUT; or the
    PUT first, so the body the server reads while it waits (up to
    ``waiting_body_bytes``) leaves at pairing, inside the pace too."""
    if put_first:
        up = Upload(relay, r.ticket, body, chunked=chunked)
        wait_waiting(relay, r, "PUT")
        return Download(relay, r.ticket), up
    down = Download(relay, r.ticket)
    wait_waiting(relay, r, "GET")
    return down, Upload(relay, r.ticket, body, chunked=chunked)


def kernel_paths(relay: Relay) -> int:
    """Transfers of this server moving through splice(2) right now (both
    of a relay's connections share its transfer)."""

    def count() -> int:
        transfers = {getattr(conn, "transfer", None) for conn in relay.server.connections}
        return sum(1 for t in transfers if getattr(t, "_kernel", None) is not None)

    return int(relay.call(count))


# --- 1. accuracy over windows of 5 s and more, on every data path ------------------------

PATHS: dict[str, dict[str, Any]] = {
    "splice": {},
    "buffered": {"kernel_splice_min_bytes": 0},
    "chunked": {},
    "tls": {"tls": True},
}


@pytest.mark.parametrize("path", list(PATHS))
def test_a_paced_relay_holds_its_rate_over_every_window(
    relay_factory: Callable[..., Relay], path: str
) -> None:
    relay = relay_factory(**PATHS[path])
    r = relay.create(max_rate=RATE)
    assert r.max_rate == RATE
    body = body_for(RATE)
    down, up = paced_run(relay, r, body, chunked=path == "chunked")
    # The data path is the one this case is about.
    if path == "splice":
        wait_for(lambda: kernel_paths(relay) == 1, "the transfer to take splice(2)")
    elif path == "buffered":
        wait_for(lambda: down.received > 0, "the first bytes")
        assert kernel_paths(relay) == 0
    line = down.result(body)
    assert_ok(up, len(body))
    if path != "chunked":
        assert down.headers["content-length"] == str(len(body))
    assert_paced(line, RATE, path)


# --- 2. the server's --max-rate ------------------------------------------------------------


def mint(relay: Relay, **v2: Any) -> dict[str, Any]:
    status, body = relay.mint_http(
        {"workspace_id": "ws", "source_exe_id": "src", "dest_exe_id": "dst", **v2}
    )
    assert status == 201, body
    doc: dict[str, Any] = json.loads(body)
    return doc


def test_the_server_max_rate_caps_every_relay(relay_factory: Callable[..., Relay]) -> None:
    relay = relay_factory(max_rate=RATE)
    v1 = mint(relay)
    assert not {"max_rate", "receivers", "resumable"} & v1.keys(), v1  # the v1 answer
    faster = mint(relay, max_rate=4 * RATE)
    assert (faster["max_rate"], faster["receivers"], faster["resumable"]) == (RATE, 1, False)
    slower = mint(relay, max_rate=RATE // 2)
    assert slower["max_rate"] == RATE // 2  # lower than the server's: its own
    assert mint(relay, max_rate=0)["max_rate"] == RATE  # 0: the server's
    runs = []
    for doc, rate in ((v1, RATE), (faster, RATE), (slower, RATE // 2)):
        r = relay.call(functools.partial(relay.registry.lookup, doc["ticket"]))
        assert r is not None
        body = body_for(rate)
        # The v1 relay's PUT comes first: what was read while it waited counts too.
        runs.append((*paced_run(relay, r, body, put_first=doc is v1), body, rate))
    for (down, up, body, rate), what in zip(
        runs, ("no max_rate (PUT first)", "max_rate 4 MiB/s", "max_rate 0.5 MiB/s"), strict=True
    ):
        line = down.result(body)
        assert_ok(up, len(body))
        assert_paced(line, rate, f"--max-rate 1 MiB/s, {what}")


# --- 3. --workspace-rate ----------------------------------------------------------------------


def test_a_workspace_shares_its_rate_evenly_and_others_keep_theirs(
    relay_factory: Callable[..., Relay],
) -> None:
    w = 2 * MIB
    relay = relay_factory(workspace_rate=w)
    a, b = relay.create(), relay.create()
    other = relay.create(workspace_id="other")
    body = body_for(w / 2)  # each of the two: ~6 s at w/2
    other_body = body_for(w)  # alone in its workspace: ~6 s at w
    runs = [paced_run(relay, r, body) for r in (a, b)]
    wait_for(lambda: all(down.received for down, _ in runs), "both relays to stream")
    other_down, other_up = paced_run(relay, other, other_body)
    lines = [down.result(body) for down, _ in runs]
    for _, up in runs:
        assert_ok(up, len(body))
    other_line = other_down.result(other_body)
    assert_ok(other_up, len(other_body))
    # Together the workspace's relays stay within w, and each gets about w/2.
    both = Timeline.merged(*lines)
    assert_not_above(both, w, "the workspace's two relays together")
    start = max(line.first for line in lines)
    end = min(line.last for line in lines)
    for line, what in zip(lines, ("relay A", "relay B"), strict=True):
        assert_share(line, start, end, w / 2, f"{what} of two sharing 2 MiB/s")
    # The other workspace's relay ran at its own workspace's rate, alongside.
    assert other_line.first < end, "the other workspace's relay did not overlap"
    assert_paced(other_line, w, "a relay of another workspace")


def test_a_relay_with_a_lower_rate_keeps_it_and_the_other_gets_the_rest(
    relay_factory: Callable[..., Relay],
) -> None:
    w = 4 * MIB
    relay = relay_factory(workspace_rate=w)
    slow = relay.create(max_rate=RATE)
    free = relay.create()
    slow_body = body_for(RATE)  # ~6 s at 1 MiB/s
    free_body = body_for(w - RATE)  # ~6 s at the 3 MiB/s left
    slow_down, slow_up = paced_run(relay, slow, slow_body)
    free_down, free_up = paced_run(relay, free, free_body)
    slow_line = slow_down.result(slow_body)
    free_line = free_down.result(free_body)
    assert_ok(slow_up, len(slow_body))
    assert_ok(free_up, len(free_body))
    assert_paced(slow_line, RATE, "max_rate 1 MiB/s in a 4 MiB/s workspace")
    assert_not_above(Timeline.merged(slow_line, free_line), w, "the workspace together")
    start = max(slow_line.first, free_line.first)
    end = min(slow_line.last, free_line.last)
    assert_share(free_line, start, end, w - RATE, "unlimited relay beside a 1 MiB/s one")


# --- 4. fan-out and pacing ----------------------------------------------------------------------


def test_each_fan_out_receiver_gets_the_body_at_the_rate(
    relay_factory: Callable[..., Relay],
) -> None:
    relay = relay_factory()
    r = relay.create(max_rate=RATE, receivers=2)
    body = body_for(RATE)
    downs = [Download(relay, r.ticket) for _ in range(2)]
    wait_waiting(relay, r, "GET")  # claimed once both receivers are here
    up = Upload(relay, r.ticket, body)
    lines = [down.result(body) for down in downs]
    assert_ok(up, len(body), receivers=2, delivered=2)
    for i, line in enumerate(lines, 1):
        assert_paced(line, RATE, f"fan-out receiver {i}/2")


# --- 5. the paced-seconds metric --------------------------------------------------------------


@pytest.mark.parametrize("path", ["splice", "buffered"])
def test_paced_seconds_grow_with_a_paced_upload(
    relay_factory: Callable[..., Relay], path: str
) -> None:
    relay = relay_factory(**PATHS[path])
    body = BODY[: 2 * MIB]
    before = scrape(relay)[PACED_METRIC]
    # An unpaced relay is never paused.
    r = relay.create()
    down, up = paced_run(relay, r, body)
    down.result(body)
    assert_ok(up, len(body))
    relay.wait_done(r)
    assert scrape(relay)[PACED_METRIC] == before
    # 2 MiB at 1 MiB/s: nearly two seconds spent paused.
    r = relay.create(max_rate=RATE)
    down, up = paced_run(relay, r, body)
    line = down.result(body)
    assert_ok(up, len(body))
    relay.wait_done(r)
    took = time.monotonic() - up.started
    paused = scrape(relay)[PACED_METRIC] - before
    print(f"\n{path}: paused {paused:.2f} s of a {line.last - line.first:.2f} s run")
    assert 1.0 <= paused <= took, (paused, took)


# --- 6. the serve flags ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--max-rate", "10X"), ("--workspace-rate", "-5"), ("--max-rate", "")],
)
def test_a_bad_rate_flag_exits_2_naming_it(flag: str, value: str) -> None:
    proc = serve("--port", "0", flag, value, env={"FASTRELAY_SHARED_SECRET": SECRET})
    line = one_error_line(proc)
    assert line.startswith(f"fastrelay: error: {flag}"), line
    assert SECRET not in line


def test_a_bad_rate_flag_prints_no_generated_secret() -> None:
    # No secret given: the error comes before one would be generated (and
    # printed): the error is the only line.
    line = one_error_line(serve("--port", "0", "--max-rate", "10X"))
    assert line.startswith("fastrelay: error: --max-rate"), line


def test_serve_takes_rates_with_suffixes() -> None:
    proc = serve(
        "--port",
        "0",
        "--max-rate",
        "512K",
        "--workspace-rate",
        "1.5M",
        env={"FASTRELAY_SHARED_SECRET": SECRET},
    )
    try:
        url = ready_url(proc)
        req = urllib.request.Request(
            url + "/api/exec-gateway/relay/create",
            data=json.dumps(
                {
                    "workspace_id": "w",
                    "source_exe_id": "s",
                    "dest_exe_id": "d",
                    "max_rate": 10 * MIB,
                }
            ).encode(),
            headers={"Authorization": f"Bearer {SECRET}"},
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 201
            assert json.loads(resp.read())["max_rate"] == 512 * KIB  # lowered to --max-rate
    finally:
        rc, err = stop(proc)
    assert rc == 0, err
    assert SECRET not in err
