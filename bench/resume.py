"""Resumable relays: what resuming costs, side by side with plain (v1) relays.

    python -m bench.resume            # full run (~30 s on 2 cores)
    python -m bench.resume --quick    # CI: tiny sizes, integrity checks only (~5 s)

Three scenarios, each against its baseline in the same run:

* ``cpu``: server CPU per GiB of resumable relays that never break against
  plain relays, transfers interleaved (plain, resumable, plain, ...), on the
  buffered path (``--kernel-splice-min-bytes 0``) and on the default
  splice(2) path. CPU is the server's summed ``sum_exec_runtime``
  (/proc/PID/task/*/schedstat, nanoseconds; psutil's 10 ms ticks are kept
  as a cross-check).
* ``recovery``: after a source break (a new PUT with Content-Range) and a
  destination break (a new GET with Range), the time from the new request's
  connect to the first body byte at the destination; the baseline is a
  fresh plain relay's same step (a PUT to a waiting GET, a GET to a waiting
  PUT). Both data paths.
* ``memory``: N resumable relays broken once and left waiting (the GET's
  response open and paused, its PUT gone): server RSS growth per relay,
  against N plain relays whose GET waits.

Nothing here asserts a timing; ``--quick`` fails only if a relay's bytes are
short or wrong (every transfer is checked, including the resumed ones).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import multiprocessing
import os
import pathlib
import socket
import statistics
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import uvloop

from . import record, servers
from .clients import Endpoint, Received, get_head, random_file, read_response, send_file
from .load import raise_nofile
from .record import IntegrityError

MIB = 1024 * 1024
KIB = 1024
RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a RST
BUFFERED = ["--kernel-splice-min-bytes", "0"]  # the server flag forcing the buffered path


# --- measuring the server ---------------------------------------------------------------


def cpu_ns(server: servers.Server) -> int:
    """The server's CPU time so far (user + sys), in ns: the sum of every
    thread's ``sum_exec_runtime`` (first field of /proc/PID/task/TID/schedstat).
    psutil's user+sys counts 10 ms clock ticks, too coarse for one transfer;
    falls back to it where schedstat is missing."""
    total = 0
    try:
        for tid in os.listdir(f"/proc/{server.process.pid}/task"):
            with (
                contextlib.suppress(FileNotFoundError, ProcessLookupError),
                open(f"/proc/{server.process.pid}/task/{tid}/schedstat") as f,
            ):
                total += int(f.read().split()[0])
    except OSError:
        return int(server.cpu_s() * 1e9)
    return total


def metrics(ep: Endpoint) -> dict[str, float]:
    """The server's /metrics gauges without labels (blocking; for polling)."""
    with ep.connect() as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    out: dict[str, float] = {}
    for line in data.partition(b"\r\n\r\n")[2].decode().splitlines():
        if line and not line.startswith("#") and "{" not in line:
            k, _, v = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[k] = float(v)
    return out


def wait_waiting(ep: Endpoint, sides: int, connections: int | None = None) -> None:
    """Poll /metrics until ``sides`` requests wait (``fastrelay_waiting_sides``)
    and, if given, at most ``connections`` client connections are open (the
    scrape's own included): a break has been seen and its survivor waits."""
    deadline = time.monotonic() + 60
    while True:
        m = metrics(ep)
        if m.get("fastrelay_waiting_sides") == sides and (
            connections is None or m.get("fastrelay_connections", 0) <= connections
        ):
            return
        if time.monotonic() > deadline:
            raise IntegrityError(f"never {sides} waiting sides: {m}")
        time.sleep(0.005)  # a poll interval, not an ordering


# --- blocking HTTP pieces ---------------------------------------------------------------


def mint_request(resumable: bool) -> bytes:
    doc: dict[str, Any] = {"workspace_id": "bench", "source_exe_id": "s", "dest_exe_id": "d"}
    if resumable:
        doc["resumable"] = True
    body = json.dumps(doc).encode()
    return (
        f"POST /api/exec-gateway/relay/create HTTP/1.1\r\nHost: bench\r\n"
        f"Authorization: Bearer {servers.SECRET}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def mint(ep: Endpoint, resumable: bool) -> str:
    """One ticket, on a connection of its own."""
    with ep.connect() as sock:
        sock.sendall(mint_request(resumable))
        status, headers, rest = read_head(sock)
        body = recv_exact(sock, int(headers["content-length"]), rest)
    doc = json.loads(body)
    if status not in (200, 201) or doc.get("resumable", False) is not resumable:
        raise IntegrityError(f"mint answered {status} {doc}")
    return str(doc["ticket"])


def read_head(sock: socket.socket, buf: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    """A response head (100 Continue skipped): status, headers, bytes after it."""
    while True:
        while b"\r\n\r\n" not in buf:
            chunk = sock.recv(65536)
            if not chunk:
                raise IntegrityError(f"closed before a head: {buf[:200]!r}")
            buf += chunk
        head, _, buf = buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        if status != 100:
            headers = {
                k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])
            }
            return status, headers, buf


def recv_exact(sock: socket.socket, n: int, have: bytes = b"") -> bytes:
    buf = bytearray(have)
    while len(buf) < n:
        chunk = sock.recv(min(1 << 20, n - len(buf)))
        if not chunk:
            raise IntegrityError(f"closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def relay_head(method: str, ticket: str, extra: str = "") -> bytes:
    return (
        f"{method} /relay/{ticket} HTTP/1.1\r\nHost: bench\r\n"
        f"Authorization: Bearer {ticket}\r\n{extra}\r\n"
    ).encode()


def put_answer(sock: socket.socket) -> dict[str, Any]:
    status, headers, rest = read_head(sock)
    doc: dict[str, Any] = json.loads(recv_exact(sock, int(headers["content-length"]), rest))
    if status != 200:
        raise IntegrityError(f"PUT answered {status} {doc}")
    return doc


def close_cleanly(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


def reset(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET)
    sock.close()


def sender(sock: socket.socket, data: bytes) -> threading.Thread:
    """Send ``data`` from a thread (the relay's backpressure may hold it while
    this thread reads the destination)."""

    def run() -> None:
        with contextlib.suppress(OSError):
            sock.sendall(data)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


# --- 1. CPU per GiB, no breaks -----------------------------------------------------------


def transfer(
    server: servers.Server, ticket: str, path: str, size: int, sha: str, verify: bool
) -> float:
    """Move the file through one relay (a lean sendfile sender and a
    recv_into receiver, two forked processes, as bench.load does); returns
    seconds and raises on a short or corrupted body or a PUT not answered 200."""
    ep = server.endpoint
    url = f"/relay/{ticket}"
    ctx = multiprocessing.get_context("fork")
    results: Any = ctx.Queue()

    def receive() -> None:
        with ep.connect() as sock:
            sock.sendall(get_head(url, ticket))
            results.put(("get", read_response(sock, verify=verify)))

    def upload() -> None:
        with ep.connect() as sock:
            sock.sendall(
                f"PUT {url} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n"
                f"Authorization: Bearer {ticket}\r\nContent-Length: {size}\r\n\r\n".encode()
            )
            send_file(sock, path, chunked=False)
            results.put(("put", read_response(sock, verify=False)))

    t0 = time.perf_counter()
    procs = [ctx.Process(target=receive), ctx.Process(target=upload)]
    for proc in procs:
        proc.start()
    got = dict(results.get(timeout=300) for _ in procs)
    elapsed = time.perf_counter() - t0
    for proc in procs:
        proc.join(30)
    results.close()
    results.join_thread()
    rec: Received | None = got.get("get")
    if rec is None or rec.status != 200 or rec.body_bytes != size:
        raise IntegrityError(f"bad transfer {rec}")
    if verify and rec.sha256 != sha:
        raise IntegrityError("sha256 mismatch")
    if got["put"].status != 200:
        raise IntegrityError(f"PUT answered {got['put']}")
    return elapsed


@dataclasses.dataclass
class CpuRow:
    path: str
    transfers: int
    size: int
    plain_s_per_gib: float
    resumable_s_per_gib: float
    ratio: float
    plain_psutil_s_per_gib: float
    resumable_psutil_s_per_gib: float
    plain_mb_s: float
    resumable_mb_s: float
    plain_per_transfer: list[float]
    """s/GiB of each timed transfer, in order (the spread is the noise)."""
    resumable_per_transfer: list[float]


def cpu_per_gib(env: Env, path_name: str, extra: list[str]) -> CpuRow:
    """``--cpu-transfers`` transfers of each kind, interleaved (plain,
    resumable, plain, ...), one server; after one sha256-checked transfer of
    each kind, timed ones only count bytes (hashing costs as much CPU as the
    relay) unless --quick, where every transfer is checked."""
    a = env.args
    size, n = a.cpu_size, a.cpu_transfers
    path = str(env.workdir / f"payload-{size}.bin")
    sha = random_file(path, size)
    ns: dict[bool, list[int]] = {False: [], True: []}
    ps = {False: 0.0, True: 0.0}
    secs: dict[bool, list[float]] = {False: [], True: []}
    with servers.fastrelay(None, None, a.loop, extra) as fr:
        for resumable in (False, True):  # the checked round (and warm-up)
            transfer(fr, mint(fr.endpoint, resumable), path, size, sha, verify=True)
        for _ in range(n):
            for resumable in (False, True):
                ticket = mint(fr.endpoint, resumable)  # the mint stays out of the count
                c0, p0 = cpu_ns(fr), fr.cpu_s()
                secs[resumable].append(transfer(fr, ticket, path, size, sha, verify=a.quick))
                ns[resumable].append(cpu_ns(fr) - c0)
                ps[resumable] += fr.cpu_s() - p0
    gib = n * size / 2**30
    plain, res = sum(ns[False]) / 1e9 / gib, sum(ns[True]) / 1e9 / gib
    one = size / 2**30
    return CpuRow(
        path_name,
        n,
        size,
        plain,
        res,
        res / plain if plain else float("nan"),
        ps[False] / gib,
        ps[True] / gib,
        size / statistics.median(secs[False]) / 1e6,
        size / statistics.median(secs[True]) / 1e6,
        [round(c / 1e9 / one, 4) for c in ns[False]],
        [round(c / 1e9 / one, 4) for c in ns[True]],
    )


# --- 2. recovery latency ---------------------------------------------------------------------


FIRST = 64 * KIB  # what a new request sends (or has waiting) before the timer stops


def source_break(ep: Endpoint, data: bytes, k: int, resumable: bool) -> float:
    """Resumable: the source breaks (clean close) after ``k`` bytes, all of
    them at the destination; a new PUT with ``Content-Range: bytes k-..``
    continues the same response. Plain baseline: a fresh relay's GET waits
    and a PUT comes. Seconds from the (new) PUT's connect to the first body
    byte at the destination; the whole body is checked after."""
    size = len(data)
    ticket = mint(ep, resumable)
    down = ep.connect()
    try:
        down.sendall(relay_head("GET", ticket, "Connection: close\r\n"))
        got = b""
        if resumable:
            up = ep.connect()
            up.sendall(relay_head("PUT", ticket, f"Content-Length: {size}\r\n") + data[:k])
            status, _, rest = read_head(down)
            got = recv_exact(down, k, rest)
            if status != 200:
                raise IntegrityError(f"GET answered {status}")
            close_cleanly(up)  # the break: exactly k bytes were sent and delivered
        wait_waiting(ep, 1, connections=2)  # the GET waits, alone (+ this scrape)
        extra = f"Content-Length: {size - k}\r\nContent-Range: bytes {k}-{size - 1}/{size}\r\n"
        if not resumable:
            extra = f"Content-Length: {size}\r\n"
        body = data[k:] if resumable else data
        t0 = time.perf_counter()
        up = ep.connect()
        up.sendall(relay_head("PUT", ticket, extra) + body[:FIRST])
        if resumable:
            first = down.recv(65536)  # the same response goes on: body bytes only
        else:
            status, _, first = read_head(down)
            if status != 200:
                raise IntegrityError(f"GET answered {status}")
            while not first:
                first = down.recv(65536)
        t1 = time.perf_counter()
        if not first:
            raise IntegrityError("the destination saw EOF instead of the resumed body")
        thread = sender(up, body[FIRST:])
        got = recv_exact(down, size, got + first)
        thread.join(30)
        answer = put_answer(up)
        up.close()
        if got != data or answer.get("resumes", 0) != (1 if resumable else 0):
            raise IntegrityError(f"source break: {len(got)} bytes, answer {answer}")
        return t1 - t0
    finally:
        down.close()


def destination_break(ep: Endpoint, data: bytes, k: int, resumable: bool) -> float:
    """Resumable: the destination breaks (reset) after receiving ``k`` bytes,
    all the PUT had sent; the PUT is paused, the source's next 64 KiB wait in
    its socket, and a new GET with ``Range: bytes=k-`` gets 206 from the open
    PUT. Plain baseline: a fresh relay's PUT waits (its head sent, then
    64 KiB of body) and a GET comes. Seconds from the (new) GET's connect to
    its first body byte; the whole body is checked after."""
    size = len(data)
    at = k if resumable else 0  # where the new GET starts
    ticket = mint(ep, resumable)
    up = ep.connect()
    try:
        up.sendall(relay_head("PUT", ticket, f"Content-Length: {size}\r\n") + data[:at])
        before = b""  # what the destination had before its break
        if resumable:
            down = ep.connect()
            down.sendall(relay_head("GET", ticket, "Connection: close\r\n"))
            status, _, rest = read_head(down)
            before = recv_exact(down, k, rest)
            if status != 200:
                raise IntegrityError(f"GET answered {status}")
            reset(down)  # the break: the destination has exactly what the source sent
        wait_waiting(ep, 1, connections=2)  # the PUT waits (resumable: paused), alone
        up.sendall(data[at : at + FIRST])  # the source goes on; the relay does not read yet
        extra = f"Range: bytes={k}-\r\n" if resumable else ""
        want = 206 if resumable else 200
        t0 = time.perf_counter()
        down = ep.connect()
        down.sendall(relay_head("GET", ticket, "Connection: close\r\n" + extra))
        status, _, first = read_head(down)
        while not first:
            first = down.recv(65536)
        t1 = time.perf_counter()
        if status != want:
            raise IntegrityError(f"GET answered {status}, not {want}")
        thread = sender(up, data[at + FIRST :])
        got = before + recv_exact(down, size - at, first)
        thread.join(30)
        answer = put_answer(up)
        down.close()
        if got != data or answer.get("resumes", 0) != (1 if resumable else 0):
            raise IntegrityError(f"destination break: {len(got)} bytes, answer {answer}")
        return t1 - t0
    finally:
        up.close()


@dataclasses.dataclass
class RecoveryRow:
    path: str
    side: str
    breaks: int
    resumed_median_ms: float
    resumed_max_ms: float
    fresh_median_ms: float
    fresh_max_ms: float


def recovery(env: Env, path_name: str, extra: list[str]) -> list[RecoveryRow]:
    """``--breaks`` breaks of each side, interleaved with their baselines."""
    a = env.args
    data = os.urandom(a.break_size)
    k = a.break_size // 4
    runs: dict[tuple[str, bool], list[float]] = {
        (s, r): [] for s in ("source", "destination") for r in (False, True)
    }
    fns: dict[str, Callable[[Endpoint, bytes, int, bool], float]] = {
        "source": source_break,
        "destination": destination_break,
    }
    with servers.fastrelay(None, None, a.loop, extra) as fr:
        for fn in fns.values():  # warm-up, untimed
            for resumable in (False, True):
                fn(fr.endpoint, data, k, resumable)
        for _ in range(a.breaks):
            for side, fn in fns.items():
                for resumable in (False, True):
                    runs[side, resumable].append(fn(fr.endpoint, data, k, resumable))
    return [
        RecoveryRow(
            path_name,
            side,
            a.breaks,
            statistics.median(runs[side, True]) * 1e3,
            max(runs[side, True]) * 1e3,
            statistics.median(runs[side, False]) * 1e3,
            max(runs[side, False]) * 1e3,
        )
        for side in fns
    ]


# --- 3. memory per interrupted ticket -----------------------------------------------------


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    while head.startswith(b"HTTP/1.1 100"):
        head = await reader.readuntil(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), head


async def _metrics(ep: Endpoint) -> dict[str, float]:
    return await asyncio.get_running_loop().run_in_executor(None, metrics, ep)


def payload_of(base: bytes, i: int) -> bytes:
    """Relay ``i``'s body: distinct per relay (its index in front)."""
    return i.to_bytes(8, "big") + base[8:]


@dataclasses.dataclass
class Parked:
    rss_idle: int
    rss_waiting: int
    seconds: float


async def _parked(server: servers.Server, n: int, resumable: bool, base: bytes, k: int) -> Parked:
    """``n`` relays left waiting, RSS read there, then all finished and checked.

    Plain: minted, GET sent, nothing else. Resumable: minted, GET sent, a PUT
    declaring ``len(base)`` bytes sends ``k`` of them, the GET reads them, and
    the PUT closes (a clean close, a break): the GET's response stays open
    and paused. Then every relay gets its (rest of the) body from a new PUT
    and every GET's bytes are compared.
    """
    ep = server.endpoint
    size = len(base)
    t0 = time.perf_counter()
    rss_idle = server.rss()
    req = mint_request(resumable)
    r, w = await asyncio.open_connection(ep.host, ep.port)  # one keep-alive connection
    tickets: list[str] = []
    for start in range(0, n, 500):  # pipelined batches of 500 mints
        batch = min(500, n - start)
        w.write(req * batch)
        for _ in range(batch):
            status, head = await _read_head(r)
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            doc = json.loads(await r.readexactly(length))
            if status not in (200, 201) or doc.get("resumable", False) is not resumable:
                raise IntegrityError(f"mint answered {status} {doc}")
            tickets.append(doc["ticket"])
    w.close()
    gets: dict[int, tuple[asyncio.StreamReader, asyncio.StreamWriter]] = {}
    connecting = asyncio.Semaphore(256)  # the server's listen backlog is 1024

    async def park(i: int) -> None:
        async with connecting:
            gr, gw = await asyncio.open_connection(ep.host, ep.port)
            gw.write(relay_head("GET", tickets[i], "Connection: close\r\n"))
            gets[i] = (gr, gw)
            if not resumable:
                await gw.drain()
                return
            _, pw = await asyncio.open_connection(ep.host, ep.port)
            pw.write(relay_head("PUT", tickets[i], f"Content-Length: {size}\r\n"))
            pw.write(payload_of(base, i)[:k])
            status, _ = await _read_head(gr)
            got = await gr.readexactly(k)
            if status != 200 or got != payload_of(base, i)[:k]:
                raise IntegrityError(f"parked relay {i}: {status}, {len(got)} bytes")
            pw.close()  # the break, after exactly k bytes
            await pw.wait_closed()

    await asyncio.gather(*(park(i) for i in range(n)))
    # Every GET waits again (resumable: after its break) and no PUT is left.
    deadline = time.monotonic() + 120
    while True:
        m = await _metrics(ep)
        if m.get("fastrelay_waiting_sides") == n and m.get("fastrelay_connections", 0) <= n + 1:
            break
        if time.monotonic() > deadline:
            raise IntegrityError(f"never {n} waiting GETs: {m}")
        await asyncio.sleep(0.05)
    rss_waiting = server.rss()

    finishing = asyncio.Semaphore(32)

    async def finish(i: int) -> None:
        gr, gw = gets[i]
        body = payload_of(base, i)
        async with finishing:
            pr, pw = await asyncio.open_connection(ep.host, ep.port)
            if resumable:
                range_ = f"Content-Range: bytes {k}-{size - 1}/{size}\r\n"
                pw.write(relay_head("PUT", tickets[i], f"Content-Length: {size - k}\r\n{range_}"))
                pw.write(body[k:])
                got = await gr.readexactly(size - k)
                ok = got == body[k:]
            else:
                pw.write(relay_head("PUT", tickets[i], f"Content-Length: {size}\r\n"))
                pw.write(body)
                status, _ = await _read_head(gr)
                got = await gr.readexactly(size)
                ok = status == 200 and got == body
            status, _ = await _read_head(pr)
            pw.close()
            gw.close()
            if not ok or status != 200:
                raise IntegrityError(
                    f"parked relay {i} finished wrong ({len(got)} bytes, PUT {status})"
                )

    await asyncio.gather(*(finish(i) for i in range(n)))
    return Parked(rss_idle, rss_waiting, time.perf_counter() - t0)


@dataclasses.dataclass
class MemoryRow:
    tickets: int
    body_bytes: int
    broken_at: int
    plain_kib_per_relay: float
    resumable_kib_per_relay: float
    plain_rss_mib: tuple[float, float]
    resumable_rss_mib: tuple[float, float]


def memory(env: Env) -> MemoryRow:
    """RSS per waiting relay: plain (GET waiting) and resumable (GET waiting
    again after its source broke), each on a fresh server warmed up by a few
    relays of its kind done the same way."""
    a = env.args
    n: int = a.tickets
    raise_nofile(2 * n + 1024)
    base = os.urandom(a.parked_size)
    k = 64 * KIB
    out: dict[bool, Parked] = {}
    for resumable in (False, True):
        with servers.fastrelay(None, None, a.loop, ["--max-connections", str(2 * n + 1000)]) as fr:
            uvloop.run(_parked(fr, 20, resumable, base, k))  # warm-up: code paths, free lists
            time.sleep(0.2)
            out[resumable] = uvloop.run(_parked(fr, n, resumable, base, k))

    def per(p: Parked) -> float:
        return (p.rss_waiting - p.rss_idle) / n / KIB

    return MemoryRow(
        n,
        a.parked_size,
        k,
        per(out[False]),
        per(out[True]),
        (out[False].rss_idle / MIB, out[False].rss_waiting / MIB),
        (out[True].rss_idle / MIB, out[True].rss_waiting / MIB),
    )


# --- driver -------------------------------------------------------------------------------


@dataclasses.dataclass
class Env:
    args: argparse.Namespace
    workdir: pathlib.Path


PATHS = {"buffered": BUFFERED, "splice": []}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, integrity only (CI)")
    p.add_argument(
        "--cpu-transfers", type=int, help="transfers of each kind per path (16; quick 2)"
    )
    p.add_argument("--cpu-size", type=int, help="bytes per transfer (128 MiB; quick 4 MiB)")
    p.add_argument("--breaks", type=int, help="breaks of each side per path (10; quick 2)")
    p.add_argument("--break-size", type=int, help="body of a broken relay (4 MiB; quick 2 MiB)")
    p.add_argument("--tickets", type=int, help="relays left waiting (2000; quick 50)")
    p.add_argument(
        "--parked-size",
        type=int,
        default=MIB + 128 * KIB,
        help="body of a parked relay (1.125 MiB)",
    )
    p.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    p.add_argument("--only", help="comma-separated: cpu, recovery, memory")
    p.add_argument("--json", default="bench/results/resume.json", help="where to write results")
    a = p.parse_args(argv)
    q = a.quick
    a.cpu_transfers = a.cpu_transfers or (2 if q else 16)
    a.cpu_size = a.cpu_size or (4 * MIB if q else 128 * MIB)
    a.breaks = a.breaks or (2 if q else 10)
    a.break_size = a.break_size or (2 * MIB if q else 4 * MIB)
    a.tickets = a.tickets or (50 if q else 2000)
    return a


@contextlib.contextmanager
def environment(args: argparse.Namespace) -> Iterator[Env]:
    with tempfile.TemporaryDirectory(
        prefix="fastrelay-bench-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None
    ) as tmp:
        yield Env(args, pathlib.Path(tmp))


def run(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    only = set(args.only.split(",")) if args.only else {"cpu", "recovery", "memory"}
    result: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    with environment(args) as env:
        if "cpu" in only:
            t0 = time.perf_counter()
            result["cpu"] = [cpu_per_gib(env, name, extra) for name, extra in PATHS.items()]
            seconds["cpu"] = time.perf_counter() - t0
        if "recovery" in only:
            t0 = time.perf_counter()
            result["recovery"] = [
                row for name, extra in PATHS.items() for row in recovery(env, name, extra)
            ]
            seconds["recovery"] = time.perf_counter() - t0
        if "memory" in only:
            t0 = time.perf_counter()
            result["memory"] = [memory(env)]
            seconds["memory"] = time.perf_counter() - t0
    report(result, seconds, args, argv)
    return result


def spread(values: list[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f}"


def report(
    result: dict[str, Any],
    seconds: dict[str, float],
    args: argparse.Namespace,
    argv: list[str] | None,
) -> None:
    lines: list[str] = []
    if args.quick:
        lines += ["--quick: tiny sizes, integrity checked; the figures below mean nothing", ""]
    if "cpu" in result:
        r0: CpuRow = result["cpu"][0]
        lines += [
            f"CPU per GiB, no breaks ({r0.transfers} x {r0.size // MIB} MiB of each kind per path, "
            f"interleaved; {seconds['cpu']:.0f} s)",
            "",
            "| data path | plain s/GiB | resumable s/GiB | resumable / plain | per transfer, plain / resumable | psutil plain / resumable | MB/s plain / resumable |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in result["cpu"]:
            lines.append(
                f"| {r.path} | {r.plain_s_per_gib:.3f} | {r.resumable_s_per_gib:.3f} | "
                f"**{r.ratio:.2f}x** | {spread(r.plain_per_transfer)} / "
                f"{spread(r.resumable_per_transfer)} | {r.plain_psutil_s_per_gib:.2f} / {r.resumable_psutil_s_per_gib:.2f} | "
                f"{r.plain_mb_s:.0f} / {r.resumable_mb_s:.0f} |"
            )
        lines.append("")
    if "recovery" in result:
        r1: RecoveryRow = result["recovery"][0]
        lines += [
            f"Recovery latency, connect to first body byte at the destination "
            f"({r1.breaks} breaks of each side per path; {seconds['recovery']:.0f} s)",
            "",
            "| data path | break | resumed: median / max ms | fresh plain relay: median / max ms | median ratio |",
            "|---|---|---|---|---|",
        ]
        for r in result["recovery"]:
            lines.append(
                f"| {r.path} | {r.side} | {r.resumed_median_ms:.2f} / {r.resumed_max_ms:.2f} | "
                f"{r.fresh_median_ms:.2f} / {r.fresh_max_ms:.2f} | "
                f"{r.resumed_median_ms / r.fresh_median_ms:.2f}x |"
            )
        lines.append("")
    if "memory" in result:
        m: MemoryRow = result["memory"][0]
        lines += [
            f"Memory per waiting relay ({m.tickets} relays, {m.body_bytes} B bodies, "
            f"resumable ones broken at {m.broken_at} B; {seconds['memory']:.0f} s)",
            "",
            "| relays waiting | RSS idle -> waiting MiB | KiB per relay |",
            "|---|---|---|",
            f"| plain: GET waiting | {m.plain_rss_mib[0]:.1f} -> {m.plain_rss_mib[1]:.1f} | "
            f"{m.plain_kib_per_relay:.2f} |",
            f"| resumable: GET paused after a source break, PUT gone | "
            f"{m.resumable_rss_mib[0]:.1f} -> {m.resumable_rss_mib[1]:.1f} | "
            f"**{m.resumable_kib_per_relay:.2f}** |",
            "",
        ]
    machine = record.machine(f"loop {args.loop}")
    lines.append(f"machine: {machine}")
    print("\n".join(lines))
    record.write_json(
        args.json,
        "bench.resume",
        argv,
        machine=machine,
        quick=args.quick,
        seconds=seconds,
        **{k: [dataclasses.asdict(r) for r in v] for k, v in result.items()},
    )


if __name__ == "__main__":
    sys.exit(record.main(run))
