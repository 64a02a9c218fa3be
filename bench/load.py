"""fastrelay load benchmark: every scenario side by side with its baselines.

    python -m bench.load            # full run (1 GiB transfers; a few minutes)
    python -m bench.load --quick    # CI: small sizes, integrity checks only

Figures are ratios against baselines measured in the same run (absolute
numbers drift on shared machines). Nothing here asserts a timing; --quick
fails only if a transfer is incomplete or corrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hashlib
import json
import multiprocessing
import os
import pathlib
import platform
import resource
import socket
import ssl
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psutil
import trustme
import uvloop

from . import servers
from .clients import (
    Endpoint,
    Received,
    get_head,
    mint,
    put_head,
    random_file,
    read_response,
    send_file,
)
from .record import IntegrityError

MIB = 1024 * 1024


@dataclasses.dataclass
class Row:
    scenario: str
    unit: str
    fastrelay: float
    baselines: dict[str, float | None]
    cpu_s_per_gib: float | None = None
    peak_rss_mib: float | None = None
    note: str = ""

    def ratios(self) -> dict[str, float | None]:
        return {k: (self.fastrelay / v if v else None) for k, v in self.baselines.items()}


# --- one transfer --------------------------------------------------------------------


def relay_path(server: servers.Server, sock: socket.socket | None = None) -> tuple[str, str | None]:
    if server.name.startswith("fastrelay"):
        ticket = mint(server.endpoint, servers.SECRET, sock=sock)
        return f"/relay/{ticket}", ticket
    return f"/bench-{uuid.uuid4().hex}", None


def one_transfer(
    server: servers.Server,
    path: str,
    size: int,
    sha: str,
    chunked: bool,
    rate: float = 0.0,
    verify: bool = True,
) -> float:
    """Move the file through ``server``; returns seconds; raises on corruption.

    Sender and receiver run in two forked processes, so neither waits on the
    other's GIL and the bench process stays out of the way. With
    ``verify=False`` the receiver only counts bytes: hashing costs about as
    much CPU as the relay itself, so timed rounds skip it and a separate
    round checks the sha256.
    """
    url, ticket = relay_path(server)
    ep = server.endpoint
    ctx = multiprocessing.get_context("fork")
    results: Any = ctx.Queue()

    def receive() -> None:
        with ep.connect() as sock:
            sock.sendall(get_head(url, ticket))
            results.put(("get", read_response(sock, verify=verify, rate_bytes_s=rate)))

    def upload() -> None:
        with ep.connect() as sock:
            sock.sendall(put_head(url, ticket, None if chunked else size))
            send_file(sock, path, chunked)
            results.put(("put", read_response(sock, verify=False)))

    t0 = time.perf_counter()
    procs = [ctx.Process(target=receive), ctx.Process(target=upload)]
    for proc in procs:
        proc.start()
    got = dict(results.get(timeout=600) for _ in procs)
    elapsed = time.perf_counter() - t0
    for proc in procs:
        proc.join(30)
    results.close()
    results.join_thread()
    received = got.get("get")
    if received is None or received.status != 200 or received.body_bytes != size:
        raise IntegrityError(f"{server.name}: bad transfer {received}")
    if verify and received.sha256 != sha:
        raise IntegrityError(f"{server.name}: sha256 mismatch")
    return elapsed


def direct_pair(path: str, size: int, sha: str, verify: bool = False) -> float:
    """The floor: sender -> receiver over one loopback TCP connection, no relay."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        digest = hashlib.sha256()
        received = [0]

        def receive() -> None:
            conn, _ = listener.accept()
            buf = bytearray(1 << 20)
            view = memoryview(buf)
            with conn:
                while n := conn.recv_into(buf):
                    if verify:
                        digest.update(view[:n])
                    received[0] += n

        t0 = time.perf_counter()
        thread = threading.Thread(target=receive)
        thread.start()
        with socket.create_connection(("127.0.0.1", port)) as s, open(path, "rb") as f:
            s.sendfile(f)
        thread.join()
        elapsed = time.perf_counter() - t0
    if received[0] != size or (verify and digest.hexdigest() != sha):
        raise IntegrityError("direct pair corrupted")
    return elapsed


def measure(
    server: servers.Server, rounds: int, fn: Callable[[bool], float]
) -> tuple[float, float]:
    """One sha256-verified round, then ``rounds`` timed ones: median seconds
    and median server CPU seconds per round."""
    fn(True)
    times, cpus = [], []
    for _ in range(rounds):
        c0 = server.cpu_s()
        times.append(fn(False))
        cpus.append(server.cpu_s() - c0)
    return statistics.median(times), statistics.median(cpus)


# --- scenarios ----------------------------------------------------------------------


@dataclasses.dataclass
class Env:
    args: argparse.Namespace
    workdir: pathlib.Path
    cert: tuple[str, str]
    client_ssl: ssl.SSLContext


def mbps(size: int, seconds: float) -> float:
    return size / seconds / 1e6


def big_transfer(
    env: Env, tls: bool, chunked: bool
) -> tuple[float, float, float | None, float | None]:
    """(fastrelay MB/s, its CPU s/GiB, piping MB/s, piping CPU s/GiB)."""
    size = env.args.size
    path = str(env.workdir / f"payload-{size}.bin")
    sha = random_file(path, size)
    cert = env.cert if tls else None
    ctx = env.client_ssl if tls else None
    with servers.fastrelay(cert, ctx, env.args.loop, env.args.server_arg) as fr:
        t, cpu = measure(
            fr, env.args.rounds, lambda v: one_transfer(fr, path, size, sha, chunked, verify=v)
        )
    result_pp: tuple[float | None, float | None] = (None, None)
    if not env.args.no_piping:
        with servers.piping_server(cert, ctx) as pp:
            if pp is not None:
                tp, cpup = measure(
                    pp,
                    env.args.rounds,
                    lambda v: one_transfer(pp, path, size, sha, chunked, verify=v),
                )
                result_pp = (mbps(size, tp), cpup / (size / 2**30))
    return mbps(size, t), cpu / (size / 2**30), result_pp[0], result_pp[1]


def small_relays(server: servers.Server, pairs: int, concurrency: int) -> float:
    """Pairs per second of 4 KiB relays, ``concurrency`` at a time.

    fastrelay's pairs include their mint (on a keep-alive connection per
    worker); piping-server has no mint. The client is asyncio on uvloop, the
    cheapest client we can write in Python.
    """
    return float(uvloop.run(_small_relays(server, pairs, concurrency)))


async def _read_response(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    while head.startswith(b"HTTP/1.1 100"):
        head = await reader.readuntil(b"\r\n\r\n")
    lower = head.lower()
    if b"content-length:" in lower:
        length = int(lower.split(b"content-length:")[1].split(b"\r\n")[0])
        return head, await reader.readexactly(length)
    return head, await reader.read()


async def _small_relays(
    server: servers.Server, pairs: int, concurrency: int, fresh_mint: bool = False
) -> float:
    payload = os.urandom(4096)
    ep = server.endpoint
    is_fastrelay = server.name.startswith("fastrelay")
    mint_body = json.dumps(
        {"workspace_id": "bench", "source_exe_id": "s", "dest_exe_id": "d"}
    ).encode()
    mint_req = (
        f"POST /api/exec-gateway/relay/create HTTP/1.1\r\nHost: bench\r\n"
        f"Authorization: Bearer {servers.SECRET}\r\nContent-Length: {len(mint_body)}\r\n\r\n"
    ).encode() + mint_body
    fresh_req = mint_req.replace(b"Host: bench\r\n", b"Host: bench\r\nConnection: close\r\n", 1)
    queue = iter(range(pairs))

    async def worker() -> None:
        mint_conn = (
            await asyncio.open_connection(ep.host, ep.port)
            if is_fastrelay and not fresh_mint
            else None
        )
        for _ in queue:
            if is_fastrelay:
                if mint_conn is not None:
                    mint_conn[1].write(mint_req)
                    _, body = await _read_response(mint_conn[0])
                else:  # a new connection per mint, closed after the answer
                    mr, mw = await asyncio.open_connection(ep.host, ep.port)
                    mw.write(fresh_req)
                    _, body = await _read_response(mr)
                    mw.close()
                ticket: str | None = json.loads(body)["ticket"]
                path = f"/relay/{ticket}"
            else:
                ticket, path = None, f"/bench-{uuid.uuid4().hex}"
            gr, gw = await asyncio.open_connection(ep.host, ep.port)
            pr, pw = await asyncio.open_connection(ep.host, ep.port)
            gw.write(get_head(path, ticket))
            pw.write(put_head(path, ticket, len(payload)) + payload)
            _, got = await _read_response(gr)
            await pr.read()
            gw.close()
            pw.close()
            if got != payload:
                raise IntegrityError(f"{server.name}: small relay corrupted ({len(got)} bytes)")
        if mint_conn is not None:
            mint_conn[1].close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return pairs / (time.perf_counter() - t0)


async def _in_flight(ep: Endpoint, pairs: int, size: int) -> None:
    block = os.urandom(size)
    want = hashlib.sha256(block).hexdigest()
    tickets = [mint(ep, servers.SECRET, workspace=f"w{i % 997}") for i in range(pairs)]

    async def get(ticket: str) -> None:
        r, w = await asyncio.open_connection(ep.host, ep.port)
        w.write(get_head(f"/relay/{ticket}", ticket))
        data = await r.read()
        w.close()
        body = data.split(b"\r\n\r\n", 1)[1]
        if hashlib.sha256(body).hexdigest() != want:
            raise IntegrityError(f"in-flight relay corrupted ({len(body)} bytes)")

    async def put(ticket: str) -> None:
        r, w = await asyncio.open_connection(ep.host, ep.port)
        w.write(put_head(f"/relay/{ticket}", ticket, size))
        w.write(block)
        await w.drain()
        await r.read()
        w.close()

    gets = [asyncio.ensure_future(get(t)) for t in tickets]
    await asyncio.sleep(0.5)  # let every GET wait: all relays are in flight at once
    await asyncio.gather(*(put(t) for t in tickets), *gets)


def in_flight(env: Env) -> tuple[float, float]:
    """All ``inflight`` relays at once: seconds and peak server RSS (MiB)."""
    with servers.fastrelay(None, None, env.args.loop, env.args.server_arg) as fr:
        with servers.PeakRSS(fr) as rss:
            t0 = time.perf_counter()
            asyncio.run(_in_flight(fr.endpoint, env.args.inflight, MIB))
            elapsed = time.perf_counter() - t0
        return elapsed, rss.peak / MIB


def slow_reader(env: Env) -> tuple[float, float]:
    """One chunked upload (the buffered path) read at 16 MB/s: server RSS at
    start and peak (MiB)."""
    size = env.args.slow_size
    path = str(env.workdir / f"payload-{size}.bin")
    sha = random_file(path, size)
    with servers.fastrelay(None, None, env.args.loop, env.args.server_arg) as fr:
        with servers.PeakRSS(fr) as rss:
            one_transfer(fr, path, size, sha, chunked=True, rate=16e6)
        return rss.start / MIB, rss.peak / MIB


# --- scenarios for the "faster than Go" targets ---------------------------------------


def stream_pairs(
    server: servers.Server, path: str, size: int, sha: str, n: int, verify: bool
) -> float:
    """``n`` concurrent transfers of the file through ``server``; seconds for all.

    Two forked processes (all senders, all receivers), ``n`` threads each:
    sendfile / recv_into / SSL read-write release the GIL, and 2 processes
    stay lighter on 2 cores than 2n. Raises on any short or corrupted body.
    """
    routes = [relay_path(server) for _ in range(n)]
    ep = server.endpoint
    ctx = multiprocessing.get_context("fork")
    results: Any = ctx.Queue()

    def side(kind: str) -> None:
        out: list[Any] = [None] * n

        def one(i: int) -> None:
            url, ticket = routes[i]
            try:
                with ep.connect() as sock:
                    if kind == "get":
                        sock.sendall(get_head(url, ticket))
                        out[i] = read_response(sock, verify=verify)
                    else:
                        sock.sendall(put_head(url, ticket, size))
                        send_file(sock, path, chunked=False)
                        out[i] = read_response(sock, verify=False)
            except OSError as exc:
                out[i] = repr(exc)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        results.put((kind, out))

    t0 = time.perf_counter()
    procs = [ctx.Process(target=side, args=(k,)) for k in ("get", "put")]
    for proc in procs:
        proc.start()
    got = dict(results.get(timeout=900) for _ in procs)
    elapsed = time.perf_counter() - t0
    for proc in procs:
        proc.join(30)
    results.close()
    results.join_thread()
    for i, rec in enumerate(got["get"]):
        if not isinstance(rec, Received) or rec.status != 200 or rec.body_bytes != size:
            raise IntegrityError(f"{server.name}: stream {i}/{n} bad transfer {rec}")
        if verify and rec.sha256 != sha:
            raise IntegrityError(f"{server.name}: stream {i}/{n} sha256 mismatch")
    return elapsed


def direct_streams(path: str, size: int, sha: str, n: int, verify: bool) -> float:
    """The floor for ``n`` streams: ``n`` direct loopback connections, no relay."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(n)
        port = listener.getsockname()[1]
        got: list[tuple[int, str]] = []
        lock = threading.Lock()

        def receive() -> None:
            conn, _ = listener.accept()
            buf = bytearray(1 << 20)
            view = memoryview(buf)
            digest = hashlib.sha256()
            total = 0
            with conn:
                while k := conn.recv_into(buf):
                    if verify:
                        digest.update(view[:k])
                    total += k
            with lock:
                got.append((total, digest.hexdigest()))

        def send() -> None:
            with socket.create_connection(("127.0.0.1", port)) as s, open(path, "rb") as f:
                s.sendfile(f)

        t0 = time.perf_counter()
        threads = [threading.Thread(target=receive) for _ in range(n)]
        threads += [threading.Thread(target=send) for _ in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - t0
    if len(got) != n or any(t != size or (verify and h != sha) for t, h in got):
        raise IntegrityError("direct streams corrupted")
    return elapsed


def streams(env: Env, tls: bool) -> Row:
    """``--streams`` concurrent transfers of ``--stream-size`` bytes."""
    a = env.args
    n, size = a.streams, a.stream_size
    path = str(env.workdir / f"payload-{size}.bin")
    sha = random_file(path, size)
    gib = n * size / 2**30
    cert = env.cert if tls else None
    ctx = env.client_ssl if tls else None
    run_ = lambda srv: lambda v: stream_pairs(srv, path, size, sha, n, v)  # noqa: E731
    with servers.fastrelay(cert, ctx, a.loop, a.server_arg) as fr:
        t, cpu = measure(fr, a.rounds, run_(fr))
    baselines: dict[str, float | None] = {}
    note = ""
    name = "piping-server https" if tls else "piping-server"
    baselines[name] = None
    if not a.no_piping:
        with servers.piping_server(cert, ctx) as pp:
            if pp is not None:
                tp, cpup = measure(pp, a.rounds, run_(pp))
                baselines[name] = mbps(n * size, tp)
                note = f"piping-server CPU {cpup / gib:.2f} s/GiB"
    if not tls:
        direct_streams(path, size, sha, n, verify=True)
        td = statistics.median(direct_streams(path, size, sha, n, False) for _ in range(a.rounds))
        baselines["direct loopback"] = mbps(n * size, td)
    return Row(
        f"{n} streams x {size // MIB} MiB at once, {'TLS (trustme cert, verified)' if tls else 'plain'}",
        "MB/s",
        mbps(n * size, t),
        baselines,
        cpu / gib,
        note=note,
    )


def small_fresh(env: Env) -> Row:
    """4 KiB relays, ``--concurrency`` at a time, mint + PUT + GET each on a NEW
    connection (as a gateway makes them): server CPU ms per relay."""
    a = env.args
    pairs = a.fresh_pairs
    with servers.fastrelay(None, None, a.loop, a.server_arg) as fr:
        c0 = fr.cpu_s()
        rate = float(uvloop.run(_small_relays(fr, pairs, a.concurrency, fresh_mint=True)))
        cpu_ms = (fr.cpu_s() - c0) * 1000 / pairs
    pp_ms = pp_rate = None
    if not a.no_piping:
        with servers.piping_server(None, None) as pp:
            if pp is not None:
                c0 = pp.cpu_s()
                pp_rate = float(uvloop.run(_small_relays(pp, pairs, a.concurrency)))
                pp_ms = (pp.cpu_s() - c0) * 1000 / pairs
    return Row(
        f"4 KiB relays x{pairs}, {a.concurrency} at a time, mint/PUT/GET each on a new connection",
        "ms CPU/relay",
        cpu_ms,
        {"piping-server (no mint)": pp_ms},
        note=f"{rate:.0f} relays/s"
        + (f" (piping-server {pp_rate:.0f}/s)" if pp_rate else "")
        + "; ratio = fastrelay CPU / piping-server CPU, lower is better",
    )


def raise_nofile(need: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE to the hard limit, and the hard
    limit itself to ``need`` when allowed (root); children inherit it.
    Returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < need:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (need, need))
            return need
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


async def _metrics(ep: Endpoint) -> dict[str, float]:
    r, w = await asyncio.open_connection(ep.host, ep.port)
    w.write(b"GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
    _, body = await _read_response(r)
    w.close()
    out: dict[str, float] = {}
    for line in body.decode().splitlines():
        if line and not line.startswith("#") and "{" not in line:
            k, _, v = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[k] = float(v)  # values print as floats: "10000.0"
    return out


@dataclasses.dataclass
class Waiting:
    rss_idle: int
    rss_waiting: int
    seconds_to_wait: float
    seconds_total: float
    put_concurrency: int
    cpu_s: float


async def _waiting(server: servers.Server, n: int, body: int, fd_soft: int) -> Waiting:
    ep = server.endpoint
    is_fr = server.name.startswith("fastrelay")
    connecting = asyncio.Semaphore(256)  # the server's listen backlog is 1024
    rss_idle = server.rss()
    c0 = server.cpu_s()
    t0 = time.perf_counter()
    if is_fr:
        mint_body = json.dumps(
            {"workspace_id": "bench", "source_exe_id": "s", "dest_exe_id": "d"}
        ).encode()
        mint_req = (
            f"POST /api/exec-gateway/relay/create HTTP/1.1\r\nHost: bench\r\n"
            f"Authorization: Bearer {servers.SECRET}\r\nContent-Length: {len(mint_body)}\r\n\r\n"
        ).encode() + mint_body
        r, w = await asyncio.open_connection(ep.host, ep.port)  # one keep-alive connection
        tickets: list[str | None] = []
        for start in range(0, n, 500):  # batches of 500 requests, pipelined
            k = min(500, n - start)
            w.write(mint_req * k)
            for _ in range(k):
                head, answer = await _read_response(r)
                if not head.startswith(b"HTTP/1.1 20"):
                    raise IntegrityError(f"mint failed: {head[:60]!r} {answer[:200]!r}")
                tickets.append(json.loads(answer)["ticket"])
        w.close()
        paths = [f"/relay/{t}" for t in tickets]
    else:
        tickets = [None] * n
        paths = [f"/bench-{uuid.uuid4().hex}" for _ in range(n)]
    payloads = [os.urandom(body) for _ in range(n)]
    ready = [0]

    async def get(i: int) -> None:
        async with connecting:
            r, w = await asyncio.open_connection(ep.host, ep.port)
            w.write(get_head(paths[i], tickets[i]))
            await w.drain()
        ready[0] += 1
        data = await r.read()
        w.close()
        head, _, got = data.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200") or got != payloads[i]:
            raise IntegrityError(
                f"{server.name}: waiting relay {i} got {head[:40]!r} + {len(got)} bytes"
            )

    fds0 = server.process.num_fds()
    gets = [asyncio.ensure_future(get(i)) for i in range(n)]
    # all GETs parked: every head written, the server holds n connections
    # and (fastrelay) /metrics says n waiting relays
    deadline = time.monotonic() + 300
    while True:
        await asyncio.sleep(0.2)
        for g in gets:
            if g.done() and g.exception():
                raise g.exception()  # type: ignore[misc]
        if ready[0] == n:
            if is_fr:
                # Every GET parsed and holding its side: exact, no settling time.
                m = await _metrics(ep)
                if m.get("fastrelay_waiting_sides") == n:
                    break
            elif server.process.num_fds() >= fds0 + n:
                break
        if time.monotonic() > deadline:
            raise IntegrityError(f"{server.name}: GETs never all waited ({ready[0]}/{n})")
    if not is_fr:
        # piping-server says nothing of its waiting requests: give the last
        # heads time to be parsed (the fd count only shows accepted sockets).
        await asyncio.sleep(1.0)
    rss_waiting = server.rss()
    t_wait = time.perf_counter() - t0
    # n more sockets; keep within this process's open-file limit (20,000 at once if it allows)
    put_conc = max(1, min(n, fd_soft - n - 200))
    putting = asyncio.Semaphore(put_conc)

    async def put(i: int) -> None:
        async with putting:
            async with connecting:
                r, w = await asyncio.open_connection(ep.host, ep.port)
            w.write(put_head(paths[i], tickets[i], body) + payloads[i])
            data = await r.read()
            w.close()
            if not data.startswith(b"HTTP/1.1 2"):
                raise IntegrityError(f"{server.name}: PUT {i} answered {data[:60]!r}")

    await asyncio.gather(*(put(i) for i in range(n)), *gets)
    return Waiting(
        rss_idle, rss_waiting, t_wait, time.perf_counter() - t0, put_conc, server.cpu_s() - c0
    )


def waiting(env: Env) -> Row:
    """``--waiting`` relays whose GETs all wait at once, then all their PUTs."""
    a = env.args
    n = a.waiting
    soft = raise_nofile(2 * n + 1024)
    extra = [
        "--max-connections",
        str(2 * n + 10000),
        "--max-pending",
        str(2 * n),
        "--max-per-workspace",
        str(2 * n),
        *a.server_arg,
    ]

    def one(srv: servers.Server) -> tuple[Waiting, float]:
        with servers.PeakRSS(srv) as rss:
            w = uvloop.run(_waiting(srv, n, a.waiting_body, soft))
        return w, rss.peak / MIB

    with servers.fastrelay(None, None, a.loop, extra) as fr:
        w, peak = one(fr)
    note = (
        f"RSS idle {w.rss_idle / MIB:.1f} MiB, {w.rss_waiting / MIB:.1f} MiB with {n} waiting "
        f"= {(w.rss_waiting - w.rss_idle) / n / 1024:.1f} KiB/waiting relay; "
        f"{2 * n if w.put_concurrency >= n else n + w.put_concurrency} connections at most "
        f"(PUTs {w.put_concurrency} at a time); all {n} intact; {w.seconds_total:.1f} s, "
        f"CPU {w.cpu_s * 1000 / n:.2f} ms/relay"
    )
    base: float | None = None
    if not a.no_piping:
        with servers.piping_server(None, None) as pp:
            if pp is not None:
                wp, base = one(pp)
                note += (
                    f"; piping-server {wp.rss_waiting / MIB:.1f} MiB with {n} waiting, "
                    f"CPU {wp.cpu_s * 1000 / n:.2f} ms/relay"
                )
    return Row(
        f"{n} relays waiting at once ({a.waiting_body} B bodies), then all PUTs",
        "MiB peak RSS",
        peak,
        {"piping-server peak RSS (no mint)": base},
        peak_rss_mib=peak,
        note=note,
    )


# --- driver -------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes, one round (CI)")
    p.add_argument("--size", type=int, help="bytes per big transfer (default 1 GiB; quick 32 MiB)")
    p.add_argument("--rounds", type=int, help="rounds per big transfer, median kept (3; quick 1)")
    p.add_argument("--pairs", type=int, help="small relays (3000; quick 300)")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--inflight", type=int, help="relays in flight at once (1000; quick 100)")
    p.add_argument(
        "--slow-size", type=int, help="bytes for the slow reader (128 MiB; quick 16 MiB)"
    )
    p.add_argument("--streams", type=int, help="concurrent transfers in `streams` (16; quick 4)")
    p.add_argument(
        "--stream-size", type=int, help="bytes per transfer in `streams` (64 MiB; quick 8 MiB)"
    )
    p.add_argument("--fresh-pairs", type=int, help="relays in `small_fresh` (3000; quick 100)")
    p.add_argument(
        "--waiting", type=int, help="relays waiting at once in `waiting_10k` (10000; quick 500)"
    )
    p.add_argument(
        "--waiting-body", type=int, default=1024, help="bytes per relay in `waiting_10k`"
    )
    p.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    p.add_argument(
        "--server-arg",
        action="append",
        default=[],
        help="extra argument for `fastrelay serve` (repeatable), e.g. --server-arg=--buffer-size=1048576",
    )
    p.add_argument("--no-piping", action="store_true", help="skip the piping-server baseline")
    p.add_argument(
        "--only",
        help="comma-separated scenario names to run: plain, tls, chunked, small, inflight, "
        "slow, streams, small_fresh, waiting_10k",
    )
    p.add_argument("--json", default="bench/results/latest.json", help="where to write results")
    a = p.parse_args(argv)
    q = a.quick
    a.size = a.size or (32 * MIB if q else 1024 * MIB)
    a.rounds = a.rounds or (1 if q else 3)
    a.pairs = a.pairs or (300 if q else 3000)
    a.inflight = a.inflight or (100 if q else 1000)
    a.slow_size = a.slow_size or (16 * MIB if q else 128 * MIB)
    a.streams = a.streams or (4 if q else 16)
    a.stream_size = a.stream_size or (8 * MIB if q else 64 * MIB)
    a.fresh_pairs = a.fresh_pairs or (100 if q else 3000)
    a.waiting = a.waiting or (500 if q else 10000)
    return a


@contextlib.contextmanager
def environment(args: argparse.Namespace) -> Iterator[Env]:
    with tempfile.TemporaryDirectory(
        prefix="fastrelay-bench-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None
    ) as tmp:
        work = pathlib.Path(tmp)
        ca = trustme.CA()
        leaf = ca.issue_cert("localhost", "127.0.0.1")
        cert, key = work / "cert.pem", work / "key.pem"
        leaf.cert_chain_pems[0].write_to_path(str(cert))
        leaf.private_key_pem.write_to_path(str(key))
        ctx = ssl.create_default_context()
        ca.configure_trust(ctx)
        yield Env(args, work, (str(cert), str(key)), ctx)


def run(argv: list[str] | None = None) -> list[Row]:
    args = parse_args(argv)
    only = set(args.only.split(",")) if args.only else None
    rows: list[Row] = []

    def want(name: str) -> bool:
        return only is None or name in only

    with environment(args) as env:
        size = args.size
        path = str(env.workdir / f"payload-{size}.bin")
        sha = random_file(path, size)
        if want("plain"):
            direct_pair(path, size, sha, verify=True)
            direct = mbps(
                size, statistics.median(direct_pair(path, size, sha) for _ in range(args.rounds))
            )
            fr, cpu, pp, pp_cpu = big_transfer(env, tls=False, chunked=False)
            rows.append(
                Row(
                    f"{size // MIB} MiB Content-Length, plain",
                    "MB/s",
                    fr,
                    {"piping-server": pp, "direct loopback": direct},
                    cpu,
                    note=f"piping-server CPU {pp_cpu:.2f} s/GiB" if pp_cpu else "",
                )
            )
        if want("tls"):
            fr, cpu, pp, pp_cpu = big_transfer(env, tls=True, chunked=False)
            rows.append(
                Row(
                    f"{size // MIB} MiB Content-Length, TLS",
                    "MB/s",
                    fr,
                    {"piping-server https": pp},
                    cpu,
                    note=f"piping-server CPU {pp_cpu:.2f} s/GiB" if pp_cpu else "",
                )
            )
        if want("chunked"):
            fr_cl = rows[0].fastrelay if rows and "plain" in rows[0].scenario else None
            fr, cpu, _, _ = big_transfer(env, tls=False, chunked=True)
            rows.append(
                Row(
                    f"{size // MIB} MiB chunked upload, plain",
                    "MB/s",
                    fr,
                    {"fastrelay Content-Length": fr_cl},
                    cpu,
                )
            )
        if want("small"):
            with servers.fastrelay(None, None, args.loop, args.server_arg) as frs:
                c0 = frs.cpu_s()
                fr = small_relays(frs, args.pairs, args.concurrency)
                note = f"relay CPU {(frs.cpu_s() - c0) * 1000 / args.pairs:.2f} ms/pair"
            pp_rate = None
            if not args.no_piping:
                with servers.piping_server(None, None) as pps:
                    if pps is not None:
                        c0 = pps.cpu_s()
                        pp_rate = small_relays(pps, args.pairs, args.concurrency)
                        note += f" (piping-server {(pps.cpu_s() - c0) * 1000 / args.pairs:.2f})"
            rows.append(
                Row(
                    f"4 KiB relays x{args.pairs}, {args.concurrency} at a time (fastrelay mints)",
                    "pairs/s",
                    fr,
                    {"piping-server (no mint)": pp_rate},
                    note=note,
                )
            )
        if want("inflight"):
            seconds, peak = in_flight(env)
            rows.append(
                Row(
                    f"{args.inflight} relays of 1 MiB in flight at once",
                    "s",
                    seconds,
                    {},
                    peak_rss_mib=peak,
                    note="all intact",
                )
            )
        if want("slow"):
            start, peak = slow_reader(env)
            rows.append(
                Row(
                    f"slow reader 16 MB/s, {args.slow_size // MIB} MiB chunked upload",
                    "RSS growth MiB",
                    peak - start,
                    {},
                    peak_rss_mib=peak,
                    note=f"RSS start {start:.1f} MiB",
                )
            )
        if want("streams"):
            rows.append(streams(env, tls=False))
            rows.append(streams(env, tls=True))
        if want("small_fresh"):
            rows.append(small_fresh(env))
        if want("waiting_10k"):
            rows.append(waiting(env))
    report(rows, args)
    return rows


def report(rows: list[Row], args: argparse.Namespace) -> None:
    lines = [
        "| scenario | fastrelay | baselines | ratio | relay CPU s/GiB | peak RSS MiB | note |",
        "|---|---|---|---|---|---|---|",
    ]

    def num(v: float) -> str:
        return f"{v:.2f}" if abs(v) < 10 else f"{v:.0f}"

    for r in rows:
        base = (
            ", ".join(f"{k} {num(v)}" if v else f"{k} n/a" for k, v in r.baselines.items()) or "-"
        )
        ratio = ", ".join(f"{v:.2f}x {k}" for k, v in r.ratios().items() if v) or "-"
        cpu = f"{r.cpu_s_per_gib:.2f}" if r.cpu_s_per_gib is not None else "-"
        rss = f"{r.peak_rss_mib:.0f}" if r.peak_rss_mib is not None else "-"
        lines.append(
            f"| {r.scenario} | {num(r.fastrelay)} {r.unit} | {base} | {ratio} | {cpu} | {rss} | {r.note} |"
        )
    print("\n".join(lines))
    machine = f"{platform.machine()}, {psutil.cpu_count()} CPUs, {psutil.virtual_memory().total // 2**30} GiB, Python {platform.python_version()}, loop {args.loop}"
    print(f"\nmachine: {machine}")
    out = pathlib.Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "machine": machine,
                "quick": args.quick,
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "rows": [{**dataclasses.asdict(r), "ratios": r.ratios()} for r in rows],
            },
            indent=2,
        )
    )


def main() -> int:
    try:
        run(sys.argv[1:])
    except IntegrityError as exc:
        print(f"bench: INTEGRITY FAILURE: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
