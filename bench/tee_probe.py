"""Fan-out copy cost without a relay: a Python buffer sent N times vs splice(2)+tee(2).

    python -m bench.tee_probe            # 256 MiB per N, N in 1,2,4,8, 5 rounds (~10 s)
    python -m bench.tee_probe --quick    # 32 MiB, 1 round: integrity only

Over loopback TCP, one forked sender streams ``--size`` bytes into a socket;
this process (the copier) forwards every byte to N sockets, each read by a
forked receiver that ``recv_into``s one reused 1 MiB buffer and counts. Two
ways of copying, interleaved in the same run:

* ``buffered`` (``--chunk``, default 256 KiB, the server's ``--buffer-size``;
  repeat the flag for more sizes): ``recv_into`` one reused buffer, then
  ``send`` of the same memoryview to each of the N non-blocking sockets,
  waiting on epoll (edge-triggered, registered once) for the ones that
  cannot take it all: an asyncio relay's way, no per-receiver copy in
  Python. The next read waits until every receiver has the chunk.
* ``tee``: ``splice(src -> pipe0)``, ``tee(pipe0 -> pipe_i)`` for i in
  1..N-1, then ``splice(pipe_i -> dst_i)`` and ``splice(pipe0 -> dst0)``,
  all non-blocking on the same epoll; every pipe is 1 MiB (F_SETPIPE_SZ).
  tee(2) always copies from the head of pipe0, so a round tees pipe0's
  whole content into empty pipes and the next splice from the source waits
  until every pipe is drained (lockstep, like ``buffered``).

Measured for the copier only: CPU seconds (user+sys from
``getrusage(RUSAGE_SELF)``, the copy loop alone) per GiB delivered
(size x N), and wall throughput (copy start to the last receiver's last
byte). Every receiver's byte count is checked; a first round at N=2 per
mode checks sha256 too. Nothing asserts a timing.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import dataclasses
import fcntl
import hashlib
import multiprocessing
import os
import platform
import resource
import select
import socket
import statistics
import sys
import time
from collections.abc import Iterator
from typing import Any

from . import record
from .record import IntegrityError

# No relay here: this module imports nothing of fastrelay (nor bench.load,
# which does), so it runs while the package is mid-change.


MIB = 1024 * 1024
GIB = 1024 * MIB
PIPE_BYTES = MIB
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
ET_IN = select.EPOLLIN | select.EPOLLET
ET_OUT = select.EPOLLOUT | select.EPOLLET

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.tee.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_size_t, ctypes.c_uint)
_libc.tee.restype = ctypes.c_ssize_t


def tee(fd_in: int, fd_out: int, count: int, flags: int) -> int:
    """tee(2) from libc through ctypes (Python's ``os`` has splice but no
    tee); raises OSError."""
    n = _libc.tee(fd_in, fd_out, count, flags)
    if n < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return int(n)


# --- the two peers (forked) ----------------------------------------------------------


def block_of(seed: int = 19) -> bytes:
    """The sender's 1 MiB pattern, sent over and over (deterministic)."""
    out = bytearray()
    h = hashlib.sha256(seed.to_bytes(4, "big")).digest()
    while len(out) < MIB:
        h = hashlib.sha256(h).digest()
        out += h * 64
    return bytes(out[:MIB])


def expected_sha(size: int) -> str:
    block = block_of()
    digest = hashlib.sha256()
    left = size
    while left:
        digest.update(block[: min(left, MIB)])
        left -= min(left, MIB)
    return digest.hexdigest()


def sender(port: int, size: int) -> None:
    block = memoryview(block_of())
    with socket.create_connection(("127.0.0.1", port)) as s:
        left = size
        while left:
            n = min(left, MIB)
            s.sendall(block[:n])
            left -= n


def receiver(port: int, index: int, verify: bool, results: Any) -> None:
    buf = bytearray(MIB)
    view = memoryview(buf)
    digest = hashlib.sha256() if verify else None
    total = 0
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(index.to_bytes(4, "big"))  # which dst this is
        while n := s.recv_into(buf):
            total += n
            if digest is not None:
                digest.update(view[:n])
    results.put((index, total, time.monotonic(), digest.hexdigest() if digest else None))


# --- the copier ------------------------------------------------------------------------


class Readiness:
    """Edge-triggered epoll over every fd, registered once; ``ready[fd]``
    is cleared on EAGAIN and set again by an event."""

    def __init__(self, src: int, dsts: list[int]) -> None:
        self.ep = select.epoll()
        self.ready: dict[int, bool] = {}
        self.ep.register(src, ET_IN)
        self.ready[src] = True
        for fd in dsts:
            self.ep.register(fd, ET_OUT)
            self.ready[fd] = True
        self.waits = 0

    def wait(self) -> None:
        self.waits += 1
        for fd, ev in self.ep.poll(30):
            if ev & (select.EPOLLIN | select.EPOLLOUT | select.EPOLLERR | select.EPOLLHUP):
                self.ready[fd] = True

    def close(self) -> None:
        self.ep.close()


def copy_buffered(src: socket.socket, dsts: list[socket.socket], size: int, chunk: int) -> int:
    """recv_into one buffer, send the same view to every dst; returns epoll waits."""
    buf = bytearray(chunk)
    view = memoryview(buf)
    sfd = src.fileno()
    dfds = [d.fileno() for d in dsts]
    rd = Readiness(sfd, dfds)
    ready = rd.ready
    moved = 0
    try:
        while moved < size:
            if not ready[sfd]:
                rd.wait()
                continue
            try:
                n = src.recv_into(buf)
            except BlockingIOError:
                ready[sfd] = False
                continue
            if not n:
                raise IntegrityError(f"source EOF after {moved} of {size} bytes")
            chunk_view = view[:n]
            offsets = [0] * len(dsts)
            left = len(dsts)
            while left:
                for i, d in enumerate(dsts):
                    off = offsets[i]
                    if off == n or not ready[dfds[i]]:
                        continue
                    try:
                        off += d.send(chunk_view[off:])
                    except BlockingIOError:
                        ready[dfds[i]] = False
                        continue
                    offsets[i] = off
                    if off == n:
                        left -= 1
                    else:
                        ready[dfds[i]] = False  # a short send: the socket is full
                if left:
                    rd.wait()
            moved += n
        return rd.waits
    finally:
        rd.close()


def make_pipe() -> tuple[int, int]:
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    fcntl.fcntl(w, F_SETPIPE_SZ, PIPE_BYTES)
    return r, w


def copy_tee(src: socket.socket, dsts: list[socket.socket], size: int) -> int:
    """splice src -> pipe0, tee pipe0 -> pipe_i, splice pipe_i -> dst_i; returns epoll waits."""
    sfd = src.fileno()
    dfds = [d.fileno() for d in dsts]
    pipes = [make_pipe() for _ in dsts]
    rd = Readiness(sfd, dfds)
    ready = rd.ready
    moved = 0
    try:
        while moved < size:
            if not ready[sfd]:
                rd.wait()
                continue
            try:
                k = os.splice(sfd, pipes[0][1], min(PIPE_BYTES, size - moved), flags=SPLICE_FLAGS)
            except BlockingIOError:
                ready[sfd] = False
                continue
            if not k:
                raise IntegrityError(f"source EOF after {moved} of {size} bytes")
            for _r, w in pipes[1:]:  # empty pipes as large as pipe0: one tee copies it all
                t = tee(pipes[0][0], w, k, os.SPLICE_F_NONBLOCK)
                if t != k:
                    raise IntegrityError(f"tee copied {t} of {k} bytes")
            # every pipe now holds the k bytes: drain each into its dst
            left = [k] * len(dsts)
            todo = len(dsts)
            while todo:
                for i in range(len(dsts) - 1, -1, -1):
                    if not left[i] or not ready[dfds[i]]:
                        continue
                    try:
                        m = os.splice(pipes[i][0], dfds[i], left[i], flags=SPLICE_FLAGS)
                    except BlockingIOError:
                        ready[dfds[i]] = False
                        continue
                    left[i] -= m
                    if not left[i]:
                        todo -= 1
                    else:
                        ready[dfds[i]] = False
                if todo:
                    rd.wait()
            moved += k
        return rd.waits
    finally:
        rd.close()
        for r, w in pipes:
            os.close(r)
            os.close(w)


@dataclasses.dataclass
class Run:
    mode: str
    receivers: int
    size: int
    cpu_s: float
    user_s: float
    sys_s: float
    wall_s: float
    epoll_waits: int
    verified: bool

    @property
    def cpu_s_per_gib(self) -> float:
        return self.cpu_s / (self.size * self.receivers / GIB)

    @property
    def mb_s_per_receiver(self) -> float:
        return self.size / self.wall_s / 1e6


@contextlib.contextmanager
def listener() -> Iterator[socket.socket]:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(64)
    try:
        yield s
    finally:
        s.close()


def one_run(mode: str, n: int, size: int, verify: bool, want_sha: str | None) -> Run:
    ctx = multiprocessing.get_context("fork")
    results: Any = ctx.SimpleQueue()  # no feeder thread in this process
    with listener() as src_l, listener() as dst_l:
        procs = [
            ctx.Process(target=receiver, args=(dst_l.getsockname()[1], i, verify, results))
            for i in range(n)
        ]
        procs.append(ctx.Process(target=sender, args=(src_l.getsockname()[1], size)))
        for p in procs:
            p.start()
        dsts: list[socket.socket | None] = [None] * n
        src: socket.socket | None = None
        try:
            for _ in range(n):
                conn, _ = dst_l.accept()
                idx = int.from_bytes(conn.recv(4, socket.MSG_WAITALL), "big")
                dsts[idx] = conn
            src, _ = src_l.accept()
            socks = [d for d in dsts if d is not None]
            for s in (src, *socks):
                s.setblocking(False)
            r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
            if mode == "tee":
                waits = copy_tee(src, socks, size)
            else:
                waits = copy_buffered(src, socks, size, int(mode.split("-")[1][:-1]) * 1024)
            r1 = resource.getrusage(resource.RUSAGE_SELF)
            for d in socks:
                d.setblocking(True)
                d.shutdown(socket.SHUT_WR)
            got = [results.get() for _ in range(n)]
        finally:
            if src is not None:
                src.close()
            for conn_ in dsts:
                if conn_ is not None:
                    conn_.close()
            for p in procs:
                p.join(30)
                if p.is_alive():
                    p.kill()
                    p.join()
    for idx, total, _, sha in got:
        if total != size:
            raise IntegrityError(f"{mode} N={n}: receiver {idx} got {total} of {size} bytes")
        if verify and sha != want_sha:
            raise IntegrityError(f"{mode} N={n}: receiver {idx} sha256 mismatch")
    user, sys_ = r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime
    wall = max(t for _, _, t, _ in got) - t0
    return Run(mode, n, size, user + sys_, user, sys_, wall, waits, verify)


# --- driver ----------------------------------------------------------------------------


@dataclasses.dataclass
class Row:
    receivers: int
    size: int
    rounds: int
    cpu_s_per_gib: dict[str, float]
    """median over rounds, per mode"""
    sys_share: dict[str, float]
    """sys / (user+sys), per mode"""
    mb_s_per_receiver: dict[str, float]
    tee_vs_buffered_cpu: dict[str, float]
    """tee CPU/GiB divided by each buffered mode's (lower than 1: tee cheaper)"""
    per_round_cpu_s_per_gib: dict[str, list[float]]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="32 MiB, 1 round: integrity only (CI)")
    p.add_argument("--size", type=int, help="bytes from the sender per run (256 MiB; quick 32 MiB)")
    p.add_argument("--receivers", default="1,2,4,8", help="comma-separated N (1,2,4,8)")
    p.add_argument("--rounds", type=int, help="runs per mode and N, median kept (5; quick 1)")
    p.add_argument(
        "--chunk",
        type=int,
        action="append",
        help="buffered mode's buffer, KiB (repeatable; default 256 and 1024)",
    )
    p.add_argument("--json", default="bench/results/tee_probe.json", help="where to write results")
    a = p.parse_args(argv)
    a.size = a.size or (32 * MIB if a.quick else 256 * MIB)
    a.rounds = a.rounds or (1 if a.quick else 5)
    a.chunk = a.chunk or [256, 1024]
    a.ns = [int(x) for x in a.receivers.split(",")]
    return a


def run(argv: list[str] | None = None) -> list[Row]:
    a = parse_args(argv)
    modes = [f"buffered-{c}K" for c in a.chunk] + ["tee"]
    t_start = time.perf_counter()
    check = min(a.size, 32 * MIB)
    want = expected_sha(check)
    for mode in modes:  # the checked round (and warm-up)
        one_run(mode, 2, check, True, want)
    rows: list[Row] = []
    for n in a.ns:
        runs: dict[str, list[Run]] = {m: [] for m in modes}
        for _ in range(a.rounds):
            for mode in modes:  # interleaved
                runs[mode].append(one_run(mode, n, a.size, False, None))
        med = {m: statistics.median(r.cpu_s_per_gib for r in rs) for m, rs in runs.items()}
        rows.append(
            Row(
                n,
                a.size,
                a.rounds,
                med,
                {m: sum(r.sys_s for r in rs) / sum(r.cpu_s for r in rs) for m, rs in runs.items()},
                {m: statistics.median(r.mb_s_per_receiver for r in rs) for m, rs in runs.items()},
                {m: med["tee"] / med[m] for m in modes if m != "tee"},
                {m: [round(r.cpu_s_per_gib, 4) for r in rs] for m, rs in runs.items()},
            )
        )
    report(rows, modes, a, argv, time.perf_counter() - t_start)
    return rows


def report(
    rows: list[Row], modes: list[str], a: argparse.Namespace, argv: list[str] | None, secs: float
) -> None:
    lines: list[str] = []
    if a.quick:
        lines += ["--quick: small sizes, integrity checked; the figures below mean nothing", ""]
    lines += [
        f"Copier CPU s per GiB delivered (size x N), {a.size // MIB} MiB from the sender, "
        f"median of {a.rounds}; MB/s per receiver (wall); {secs:.0f} s",
        "",
        "| N | "
        + " | ".join(f"{m} s/GiB (sys%)" for m in modes)
        + " | "
        + " | ".join(f"tee / {m}" for m in modes if m != "tee")
        + " | "
        + " | ".join(f"{m} MB/s" for m in modes)
        + " |",
        "|---" * (2 * len(modes) + len(modes) - 1 + 1) + "|",
    ]
    for r in rows:
        lines.append(
            f"| {r.receivers} | "
            + " | ".join(f"{r.cpu_s_per_gib[m]:.3f} ({100 * r.sys_share[m]:.0f}%)" for m in modes)
            + " | "
            + " | ".join(f"**{r.tee_vs_buffered_cpu[m]:.2f}x**" for m in modes if m != "tee")
            + " | "
            + " | ".join(f"{r.mb_s_per_receiver[m]:.0f}" for m in modes)
            + " |"
        )
    record.publish(
        lines,
        f"Linux {platform.release()}",
        a.json,
        "bench.tee_probe",
        argv,
        quick=a.quick,
        seconds=secs,
        rows=[dataclasses.asdict(r) for r in rows],
    )


if __name__ == "__main__":
    sys.exit(record.main(run))
