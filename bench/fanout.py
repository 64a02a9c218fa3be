"""Fan-out relays (``"receivers": N``): one upload, N receivers, side by side with piping-server ?n=N.

    python -m bench.fanout            # 256 MiB, N in 1,2,4,8, 3 rounds, both data paths (~1.5 min)
    python -m bench.fanout --quick    # CI: 16 MiB, 1 round: integrity only (~10 s)

For each N one Content-Length upload of ``--size`` bytes (a lean sendfile
sender, bench.clients) goes to N receivers (recv_into a reused buffer), each
sender and receiver a forked process. fastrelay mints the ticket with
``{"receivers": N}``; piping-server gets ``PUT /path?n=N`` and N
``GET /path?n=N``. Per N:

* server CPU (``sum_exec_runtime`` of every thread, as bench.resume reads
  it) per GiB delivered (size x N);
* the fan-out ratio: CPU of the N-receiver relay / (N x CPU of a
  receivers=1 relay of the same size, same server, same run); the goal is
  <= 0.6 for N > 1 (one read of the upload should be shared);
* throughput per receiver: size / (upload start -> last receiver's last
  byte), MB/s;
* peak server RSS growth during the relay (bounded memory).

fastrelay runs on the default splice(2) path and on the buffered path
(``--kernel-splice-min-bytes 0``); a v1 ticket (no v2 field) of the same size
is timed too, as a check that ``receivers: 1`` costs what v1 does. Rounds are
interleaved (N=1, 2, 4, 8, v1, N=1, ...). Every receiver's byte count and
status and the PUT's answer (``delivered`` = N) are checked on every
transfer; the first round (also the warm-up) checks every receiver's
sha256. Nothing asserts a timing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import statistics
import sys
import time
import uuid
from typing import Any

from . import record, servers
from .clients import (
    Endpoint,
    Received,
    get_head,
    put_head,
    random_file,
    read_response,
    reap,
    send_file,
)
from .record import IntegrityError
from .resume import PATHS, cpu_ns, environment, read_head, recv_exact

MIB = 1024 * 1024
GIB = 1024 * MIB


# --- mint with v2 fields ---------------------------------------------------------------


def mint_v2(ep: Endpoint, **fields: Any) -> tuple[str, dict[str, Any]]:
    """Mint a ticket with v2 fields (``receivers``, ``max_rate``, ...), on a
    connection of its own; checks the 201 echoes every field asked for and
    returns (ticket, answer)."""
    doc = {"workspace_id": "bench", "source_exe_id": "s", "dest_exe_id": "d", **fields}
    body = json.dumps(doc).encode()
    req = (
        f"POST /api/exec-gateway/relay/create HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n"
        f"Authorization: Bearer {servers.SECRET}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    with ep.connect() as sock:
        sock.sendall(req)
        status, headers, rest = read_head(sock)
        answer: dict[str, Any] = json.loads(recv_exact(sock, int(headers["content-length"]), rest))
    if status not in (200, 201) or any(answer.get(k) != v for k, v in fields.items()):
        raise IntegrityError(f"mint {fields} answered {status} {answer}")
    return str(answer["ticket"]), answer


def put_doc(sock: Any) -> tuple[int, dict[str, Any]]:
    """fastrelay's PUT answer: status and JSON body (any status)."""
    status, headers, rest = read_head(sock)
    body = recv_exact(sock, int(headers.get("content-length", "0")), rest)
    try:
        return status, json.loads(body)
    except ValueError:
        return status, {"raw": body[:200].decode("latin-1")}


# --- one fan-out transfer --------------------------------------------------------------


@dataclasses.dataclass
class Fan:
    receivers: int
    seconds: float
    """upload start -> the last receiver's last byte"""
    cpu_s: float
    peak_rss_growth: int


def fan_transfer(
    server: servers.Server,
    n: int,
    path: str,
    size: int,
    sha: str,
    verify: bool,
    fields: dict[str, Any] | None,
    timeout: float,
) -> Fan:
    """One upload of ``path`` to ``n`` receivers through ``server``.

    fastrelay: minted with ``fields`` (``None``: a v1 ticket, no v2 field);
    piping-server: ``?n=N`` on every request. The receivers start first and
    say when their GET head is sent; then the upload starts (and the clock).
    Raises IntegrityError on any short, failed or (``verify``) corrupted
    body, on a PUT answer other than 200 with ``delivered`` = N, and when
    the transfer takes longer than ``timeout`` s (a hang)."""
    ep = server.endpoint
    is_fr = server.name.startswith("fastrelay")
    if is_fr:
        ticket: str | None
        ticket, _ = mint_v2(ep, **fields) if fields is not None else mint_v2(ep)
        url = f"/relay/{ticket}"
    else:
        ticket, url = None, f"/bench-{uuid.uuid4().hex}?n={n}"
    ctx = multiprocessing.get_context("fork")
    results: Any = ctx.Queue()

    def receive(i: int) -> None:
        try:
            with ep.connect() as sock:
                sock.sendall(get_head(url, ticket))
                results.put(("ready", i, None, 0.0))
                rec = read_response(sock, verify=verify)
                results.put(("get", i, rec, time.monotonic()))
        except OSError as exc:
            results.put(("get", i, repr(exc), time.monotonic()))

    def upload() -> None:
        try:
            with ep.connect() as sock:
                sock.sendall(put_head(url, ticket, size))
                send_file(sock, path, chunked=False)
                if is_fr:
                    answer: Any = put_doc(sock)
                else:
                    answer = read_response(sock, verify=False).status
                results.put(("put", 0, answer, time.monotonic()))
        except (OSError, IntegrityError) as exc:
            results.put(("put", 0, repr(exc), time.monotonic()))

    recv_procs = [ctx.Process(target=receive, args=(i,)) for i in range(n)]
    put_proc = ctx.Process(target=upload)
    procs = [*recv_procs, put_proc]
    got: dict[tuple[str, int], tuple[Any, float]] = {}
    deadline = time.monotonic() + timeout
    c0 = cpu_ns(server)
    try:
        with servers.PeakRSS(server) as rss:
            for p in recv_procs:
                p.start()
            while sum(1 for k in got if k[0] == "ready") < n:
                kind, i, value, t = results.get(timeout=max(0.1, deadline - time.monotonic()))
                got[kind, i] = (value, t)
            t0 = time.monotonic()
            put_proc.start()
            while len(got) < 2 * n + 1:
                kind, i, value, t = results.get(timeout=max(0.1, deadline - time.monotonic()))
                got[kind, i] = (value, t)
        cpu = (cpu_ns(server) - c0) / 1e9
    except Exception as exc:  # queue.Empty: a hang
        missing = [
            f"{k}{i}"
            for k in ("get", "put")
            for i in range(n if k == "get" else 1)
            if (k, i) not in got
        ]
        raise IntegrityError(
            f"{server.name}: N={n} {size} B: no result after {timeout:.0f} s from {missing} "
            f"(got {[(k, v[0]) for k, v in got.items() if k[0] != 'ready']}) [{exc!r}]"
        ) from None
    finally:
        reap(procs, results)
    label = f"{server.name}: N={n} {size} B"
    for i in range(n):
        rec, _ = got["get", i]
        if not isinstance(rec, Received) or rec.status != 200 or rec.body_bytes != size:
            raise IntegrityError(f"{label}: receiver {i} bad transfer {rec}")
        if verify and rec.sha256 != sha:
            raise IntegrityError(f"{label}: receiver {i} sha256 mismatch")
    answer, _ = got["put", 0]
    if is_fr:
        ok = (
            isinstance(answer, tuple)
            and answer[0] == 200
            and answer[1].get("bytes") == size
            and answer[1].get("status") == "ok"
            # fan-out (N > 1) answers say receivers/delivered; N = 1 gets the v1 answer
            and (n == 1 or (answer[1].get("delivered"), answer[1].get("receivers")) == (n, n))
        )
    else:
        ok = answer == 200
    if not ok:
        raise IntegrityError(f"{label}: PUT answered {answer}")
    end = max(t for (kind, _), (_, t) in got.items() if kind == "get")
    return Fan(n, end - t0, cpu, rss.peak - rss.start)


# --- the scenario ----------------------------------------------------------------------


@dataclasses.dataclass
class Row:
    server: str
    path: str
    receivers: int
    """N; 0 is the v1 ticket (no v2 field, one receiver)"""
    size: int
    rounds: int
    cpu_s_per_gib: float
    """server CPU per GiB delivered (size x N), median over rounds"""
    ratio_vs_n_singles: float | None
    """CPU of this relay / (N x CPU of the receivers=1 relay), medians"""
    mb_s_per_receiver: float
    peak_rss_growth_mib: float
    per_round_cpu_s: list[float]
    per_round_seconds: list[float]


def rows_for(
    server: servers.Server,
    path_name: str,
    a: argparse.Namespace,
    payload: str,
    sha: str,
) -> list[Row]:
    is_fr = server.name.startswith("fastrelay")
    kinds: list[int] = list(a.ns) + ([0] if is_fr and not a.quick else [])
    timeout = 60 + 8 * a.size / 50e6  # generous: 50 MB/s per receiver for N=8
    runs: dict[int, list[Fan]] = {k: [] for k in kinds}

    def one(k: int, verify: bool) -> Fan:
        fields = None if k == 0 else {"receivers": k}
        return fan_transfer(server, max(k, 1), payload, a.size, sha, verify, fields, timeout)

    for k in kinds:  # the sha256-checked round, also the warm-up
        one(k, verify=True)
    for _ in range(a.rounds):
        for k in kinds:
            runs[k].append(one(k, verify=a.quick))
    cpu1 = statistics.median(f.cpu_s for f in runs[1]) if 1 in runs else None
    rows = []
    for k in kinds:
        n = max(k, 1)
        cpu = statistics.median(f.cpu_s for f in runs[k])
        rows.append(
            Row(
                server.name,
                path_name,
                k,
                a.size,
                a.rounds,
                cpu / (a.size * n / GIB),
                cpu / (n * cpu1) if cpu1 else None,
                a.size / statistics.median(f.seconds for f in runs[k]) / 1e6,
                max(f.peak_rss_growth for f in runs[k]) / MIB,
                [round(f.cpu_s, 4) for f in runs[k]],
                [round(f.seconds, 4) for f in runs[k]],
            )
        )
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="16 MiB, 1 round: integrity only (CI)")
    p.add_argument("--size", type=int, help="bytes per upload (256 MiB; quick 16 MiB)")
    p.add_argument("--receivers", default="1,2,4,8", help="comma-separated N (1,2,4,8)")
    p.add_argument("--rounds", type=int, help="timed rounds, median kept (3; quick 1)")
    p.add_argument(
        "--paths", default="splice,buffered", help="fastrelay data paths: splice, buffered"
    )
    p.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    p.add_argument("--no-piping", action="store_true", help="skip the piping-server baseline")
    p.add_argument("--json", default="bench/results/fanout.json", help="where to write results")
    a = p.parse_args(argv)
    a.size = a.size or (16 * MIB if a.quick else 256 * MIB)
    a.rounds = a.rounds or (1 if a.quick else 3)
    a.ns = [int(x) for x in a.receivers.split(",")]
    if 1 not in a.ns:
        a.ns.insert(0, 1)  # the ratio needs the single relay
    a.path_list = [x for x in a.paths.split(",") if x]
    return a


def run(argv: list[str] | None = None) -> list[Row]:
    a = parse_args(argv)
    t_start = time.perf_counter()
    rows: list[Row] = []
    with environment(a) as env:
        payload = str(env.workdir / f"payload-{a.size}.bin")
        sha = random_file(payload, a.size)
        for name in a.path_list:
            with servers.fastrelay(None, None, a.loop, PATHS[name]) as fr:
                rows += rows_for(fr, name, a, payload, sha)
        if not a.no_piping:
            with servers.piping_server(None, None) as pp:
                if pp is not None:
                    rows += rows_for(pp, "-", a, payload, sha)
    report(rows, a, argv, time.perf_counter() - t_start)
    return rows


def report(rows: list[Row], a: argparse.Namespace, argv: list[str] | None, secs: float) -> None:
    lines: list[str] = []
    if a.quick:
        lines += ["--quick: small sizes, integrity checked; the figures below mean nothing", ""]
    lines += [
        f"Fan-out: one {a.size // MIB} MiB Content-Length upload to N receivers; "
        f"median of {a.rounds} interleaved rounds; {secs:.0f} s",
        "",
        "| server | data path | N | CPU s/GiB delivered | CPU(N) / (N x CPU(1)) | MB/s per receiver | "
        "peak RSS growth MiB | CPU s per relay, rounds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = "-" if r.ratio_vs_n_singles is None else f"{r.ratio_vs_n_singles:.2f}"
        if r.receivers > 1 and r.ratio_vs_n_singles is not None:
            ratio = f"**{ratio}**"
        n = "1 (v1 ticket)" if r.receivers == 0 else str(r.receivers)
        lines.append(
            f"| {r.server} | {r.path} | {n} | {r.cpu_s_per_gib:.3f} | {ratio} | "
            f"{r.mb_s_per_receiver:.0f} | {r.peak_rss_growth_mib:.1f} | "
            f"{', '.join(f'{c:.3f}' for c in r.per_round_cpu_s)} |"
        )
    record.publish(
        lines,
        f"loop {a.loop}",
        a.json,
        "bench.fanout",
        argv,
        quick=a.quick,
        seconds=secs,
        rows=[dataclasses.asdict(r) for r in rows],
    )


if __name__ == "__main__":
    sys.exit(record.main(run))
