"""Paced relays (``max_rate``): asked vs measured rate, and what pacing costs in server CPU.

    python -m bench.pacing            # 1M, 8M, 32M x 3 paths, 6.5 s each (~1.5 min)
    python -m bench.pacing --quick    # CI: 8M, 2 s windows: integrity only (~15 s)

Rates are bytes/s with K/M/G (x1024) suffixes, as the server's --max-rate
(``fastrelay.core.pacing.parse_rate``); each relay is minted with
``{"max_rate": R}`` and moves ``R x --seconds`` bytes, so it should last
``--seconds`` (>= 6 s in the full run). Three data paths:

* ``splice``: Content-Length upload on a default server (splice(2) path);
* ``buffered``: Content-Length upload on ``--kernel-splice-min-bytes 0``;
* ``chunked``: chunked upload (65,524-byte chunks like ``curl -T -``) on a
  default server (always the buffered path).

Per relay: the measured rate at the receiver (body bytes / time from the
first to the last body byte), the worst window of >= 5 s against the
contract (bytes in the window - rate x window, to compare with the burst
allowance max(1 s of rate, 256 KiB)), and the server's CPU
(``sum_exec_runtime``, as bench.resume reads it) per GiB, against an
unpaced relay (``{"max_rate": 0}``) of the same byte count on the same
server, the median of ``--unpaced`` of them. The server's idle CPU is read
over 1 s first and reported (a paced relay lasts seconds; an idle server's
timers count in its figure). The PUT answer and the byte count are checked
on every relay; the sha256 on the paced ones. Nothing asserts a timing.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import multiprocessing
import pathlib
import socket
import statistics
import sys
import time
from typing import Any

from fastrelay.core.chunked import ChunkedDecoder
from fastrelay.core.pacing import parse_rate

from . import record, servers
from .clients import RECV_BYTES, get_head, put_head, random_file, reap, send_file
from .fanout import mint_v2, put_doc
from .record import IntegrityError
from .resume import BUFFERED, cpu_ns, environment, metrics, read_head

MIB = 1024 * 1024
GIB = 1024 * MIB
KIB = 1024
BUCKET_S = 0.01
"""the receiver's timeline resolution: (time, bytes so far) at most every 10 ms"""
WINDOW_S = 5.0

PATHS: dict[str, tuple[list[str], bool]] = {
    "splice": ([], False),
    "buffered": (BUFFERED, False),
    "chunked": ([], True),
}
"""path -> (server flags, chunked upload)"""


# --- a receiver that keeps a timeline ---------------------------------------------------


@dataclasses.dataclass
class Timed:
    status: int
    body_bytes: int
    sha256: str | None
    first: float
    """time.monotonic() of the first body byte"""
    last: float
    timeline: list[tuple[float, int]]
    """(monotonic time, body bytes so far), one point per 10 ms at most"""


def timed_read(sock: socket.socket, verify: bool) -> Timed:
    """Read one response (Content-Length or chunked), recording when the body
    bytes arrive. Memory: one 1 MiB buffer and ~100 timeline points a second."""
    status, headers, rest = read_head(sock)
    length = int(headers["content-length"]) if "content-length" in headers else None
    decoder = ChunkedDecoder() if headers.get("transfer-encoding") == "chunked" else None
    digest = hashlib.sha256() if verify else None
    buf = bytearray(RECV_BYTES)
    view = memoryview(buf)
    total = 0
    first = last = 0.0
    timeline: list[tuple[float, int]] = []

    def take(data: memoryview) -> bool:
        nonlocal total, first, last
        before = total
        if decoder is not None:
            runs, _ = decoder.feed(data)
            for a, b in runs:
                total += b - a
                if digest is not None:
                    digest.update(data[a:b])
        else:
            total += len(data)
            if digest is not None:
                digest.update(data)
        if total > before:
            now = time.monotonic()
            if not first:
                first = now
            last = now
            if not timeline or now - timeline[-1][0] >= BUCKET_S:
                timeline.append((now, total))
            else:
                timeline[-1] = (timeline[-1][0], total)
        if decoder is not None:
            return bool(decoder.done)
        return length is not None and total >= length

    done = take(memoryview(rest)) if rest else length == 0
    while not done:
        try:
            n = sock.recv_into(buf)
        except OSError:
            break
        if not n:
            break
        done = take(view[:n])
    complete = done or (length is None and decoder is None)
    return Timed(
        status if complete else -status,
        total,
        digest.hexdigest() if digest is not None else None,
        first,
        last,
        timeline,
    )


def worst_window(timeline: list[tuple[float, int]], rate: int) -> tuple[float, float]:
    """The largest (bytes in a window of >= 5 s) - rate x window over the
    timeline, and that window's length; (nan, 0) if the body took < 5 s.
    The window from point i to point j counts the bytes of points i..j,
    ``b[j] - b[i-1]``; a point's time is its 10 ms bucket's first arrival
    and its count takes the bucket's later ones too, so a window may hold up
    to 10 ms more bytes than its length says (errs against the server)."""
    worst, at = float("nan"), 0.0
    for i in range(len(timeline)):
        t_i = timeline[i][0]
        before = timeline[i - 1][1] if i else 0
        for j in range(len(timeline) - 1, i - 1, -1):
            t_j, b_j = timeline[j]
            window = t_j - t_i
            if window < WINDOW_S:
                break
            excess = (b_j - before) - rate * window
            if not worst >= excess:  # also replaces nan
                worst, at = excess, window
    return worst, at


# --- one relay -------------------------------------------------------------------------


@dataclasses.dataclass
class Relay:
    timed: Timed
    cpu_s: float
    paced_s: float | None
    """the server's fastrelay_paced_seconds_total grew by this much"""


def paced_transfer(
    server: servers.Server,
    rate: int,
    path: str,
    size: int,
    sha: str,
    chunked: bool,
    verify: bool,
    timeout: float,
) -> Relay:
    """One relay minted with ``{"max_rate": rate}`` (0: unpaced): a forked
    receiver that keeps a timeline and a forked lean sender (sendfile, or
    64 KiB chunks). Raises IntegrityError on a short or corrupted body, a
    PUT answer other than 200, or no end within ``timeout`` s."""
    ep = server.endpoint
    ticket, _ = mint_v2(ep, max_rate=rate)
    url = f"/relay/{ticket}"
    ctx = multiprocessing.get_context("fork")
    results: Any = ctx.Queue()

    def receive() -> None:
        try:
            with ep.connect() as sock:
                sock.sendall(get_head(url, ticket))
                results.put(("get", timed_read(sock, verify)))
        except (OSError, IntegrityError) as exc:
            results.put(("get", repr(exc)))

    def upload() -> None:
        try:
            with ep.connect() as sock:
                sock.sendall(put_head(url, ticket, None if chunked else size))
                send_file(sock, path, chunked)
                results.put(("put", put_doc(sock)))
        except (OSError, IntegrityError) as exc:
            results.put(("put", repr(exc)))

    m0 = metrics(ep).get("fastrelay_paced_seconds_total") if rate else None
    procs = [ctx.Process(target=receive), ctx.Process(target=upload)]
    got: dict[str, Any] = {}
    c0 = cpu_ns(server)
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        while len(got) < 2:
            kind, value = results.get(timeout=max(0.1, deadline - time.monotonic()))
            got[kind] = value
        cpu = (cpu_ns(server) - c0) / 1e9
    except Exception as exc:  # queue.Empty: a hang
        raise IntegrityError(
            f"{server.name}: max_rate={rate} {size} B chunked={chunked}: after {timeout:.0f} s "
            f"only {got} [{exc!r}]"
        ) from None
    finally:
        reap(procs, results)
    label = f"{server.name}: max_rate={rate} {size} B chunked={chunked}"
    rec = got["get"]
    if not isinstance(rec, Timed) or rec.status != 200 or rec.body_bytes != size:
        shown = rec if not isinstance(rec, Timed) else (rec.status, rec.body_bytes)
        raise IntegrityError(f"{label}: bad transfer {shown}")
    if verify and rec.sha256 != sha:
        raise IntegrityError(f"{label}: sha256 mismatch")
    answer = got["put"]
    if not (isinstance(answer, tuple) and answer[0] == 200 and answer[1].get("bytes") == size):
        raise IntegrityError(f"{label}: PUT answered {answer}")
    paced = None
    if m0 is not None:
        m1 = metrics(ep).get("fastrelay_paced_seconds_total")
        paced = None if m1 is None else m1 - m0
    return Relay(rec, cpu, paced)


# --- the scenario ----------------------------------------------------------------------


@dataclasses.dataclass
class Row:
    path: str
    asked: int
    """bytes/s"""
    size: int
    measured: float
    """body bytes / (last - first body byte), bytes/s"""
    measured_vs_asked: float
    seconds: float
    """first to last body byte"""
    worst_window_excess: float
    """max over windows >= 5 s of bytes - rate x window (nan under 5 s)"""
    burst_allowance: int
    """max(1 s of rate, 256 KiB)"""
    paced_cpu_s_per_gib: float
    unpaced_cpu_s_per_gib: float
    paced_vs_unpaced_cpu: float
    idle_cpu_s_per_gib: float
    """the idle server's CPU over this relay's duration, per GiB of it"""
    paced_seconds_metric: float | None
    unpaced_cpu_s: list[float]


def rows_for(path_name: str, a: argparse.Namespace, workdir: pathlib.Path) -> list[Row]:
    flags, chunked = PATHS[path_name]
    rows = []
    with servers.fastrelay(None, None, a.loop, flags) as fr:
        c0 = cpu_ns(fr)
        time.sleep(1.0)
        idle_per_s = (cpu_ns(fr) - c0) / 1e9
        for rate in a.rate_list:
            size = int(rate * a.seconds)
            payload = str(workdir / f"payload-{size}.bin")
            sha = random_file(payload, size)
            timeout = 2 * a.seconds + 60
            # warm-up and the unpaced baseline first (fast), then the paced relay
            paced_transfer(fr, 0, payload, size, sha, chunked, True, timeout)
            unpaced = [
                paced_transfer(fr, 0, payload, size, sha, chunked, False, timeout).cpu_s
                for _ in range(a.unpaced)
            ]
            relay = paced_transfer(fr, rate, payload, size, sha, chunked, True, timeout)
            t = relay.timed
            secs = t.last - t.first
            measured = t.body_bytes / secs if secs > 0 else float("inf")
            excess, _ = worst_window(t.timeline, rate)
            gib = size / GIB
            u = statistics.median(unpaced)
            rows.append(
                Row(
                    path_name,
                    rate,
                    size,
                    measured,
                    measured / rate,
                    secs,
                    excess,
                    max(rate, 256 * KIB),
                    relay.cpu_s / gib,
                    u / gib,
                    relay.cpu_s / u if u else float("nan"),
                    idle_per_s * secs / gib,
                    relay.paced_s,
                    [round(c, 5) for c in unpaced],
                )
            )
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="8M, 2 s per relay: integrity only (CI)")
    p.add_argument("--rates", help="comma-separated rates, K/M/G suffixes (1M,8M,32M; quick 8M)")
    p.add_argument(
        "--seconds", type=float, help="how long each paced relay should last (6.5; quick 2)"
    )
    p.add_argument("--unpaced", type=int, default=3, help="unpaced baselines per rate (median)")
    p.add_argument(
        "--paths",
        default="splice,buffered,chunked",
        help="comma-separated: splice, buffered, chunked",
    )
    p.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    p.add_argument("--json", default="bench/results/pacing.json", help="where to write results")
    a = p.parse_args(argv)
    a.rates = a.rates or ("8M" if a.quick else "1M,8M,32M")
    a.rate_list = [parse_rate(x) for x in a.rates.split(",")]
    a.seconds = a.seconds or (2.0 if a.quick else 6.5)
    a.path_list = [x for x in a.paths.split(",") if x]
    return a


def run(argv: list[str] | None = None) -> list[Row]:
    a = parse_args(argv)
    t_start = time.perf_counter()
    rows: list[Row] = []
    with environment(a) as env:
        for name in a.path_list:
            rows += rows_for(name, a, env.workdir)
    report(rows, a, argv, time.perf_counter() - t_start)
    return rows


def rate_text(r: float) -> str:
    return f"{r / MIB:.2f} MiB/s"


def report(rows: list[Row], a: argparse.Namespace, argv: list[str] | None, secs: float) -> None:
    lines: list[str] = []
    if a.quick:
        lines += ["--quick: small sizes, integrity checked; the figures below mean nothing", ""]
    lines += [
        f"Paced relays: asked vs measured at the receiver (first to last body byte), "
        f"~{a.seconds:g} s each; CPU per GiB against unpaced relays of the same size "
        f"(median of {a.unpaced}); {secs:.0f} s",
        "",
        "| path | asked | measured | measured / asked | s | worst >=5 s window over rate x window (allowance) | "
        "paced s/GiB | unpaced s/GiB | paced / unpaced | idle server s/GiB over the relay | paced_seconds |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        excess = (
            "n/a (< 5 s)"
            if r.worst_window_excess != r.worst_window_excess
            else f"{r.worst_window_excess / KIB:+.0f} KiB ({r.burst_allowance // KIB} KiB)"
        )
        paced_s = "-" if r.paced_seconds_metric is None else f"{r.paced_seconds_metric:.1f}"
        lines.append(
            f"| {r.path} | {rate_text(r.asked)} | {rate_text(r.measured)} | "
            f"**{r.measured_vs_asked:.3f}** | {r.seconds:.2f} | {excess} | "
            f"{r.paced_cpu_s_per_gib:.3f} | {r.unpaced_cpu_s_per_gib:.3f} | "
            f"**{r.paced_vs_unpaced_cpu:.2f}x** | {r.idle_cpu_s_per_gib:.3f} | {paced_s} |"
        )
    record.publish(
        lines,
        f"loop {a.loop}",
        a.json,
        "bench.pacing",
        argv,
        quick=a.quick,
        seconds=secs,
        rows=[dataclasses.asdict(r) for r in rows],
    )


if __name__ == "__main__":
    sys.exit(record.main(run))
