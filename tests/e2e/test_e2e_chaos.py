"""Chaos and soak against a real `fastrelay serve` process.

Chaos: a few hundred transfers whose uploader or downloader is killed at a
random moment or stalls past the idle timeout. Every receiver of an
incomplete transfer must be able to tell (short of Content-Length, missing
last chunk, or reset); every complete one must be byte-identical; afterwards
nothing is left: no live relay, descriptors back at their baseline.

Soak: 10,000 sequential small relays and 1,000 concurrently waiting GETs;
descriptors and RSS must not grow.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import psutil
import pytest

SECRET = "chaos-secret"


class Server:
    def __init__(self, proc: subprocess.Popen[str], port: int) -> None:
        self.proc = proc
        self.port = port
        self.ps = psutil.Process(proc.pid)

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=30)

    def mint(self, sock: socket.socket | None = None, ttl: int = 60) -> str:
        body = json.dumps(
            {"workspace_id": "w", "source_exe_id": "s", "dest_exe_id": "d", "ttl_seconds": ttl}
        ).encode()
        req = (
            f"POST /api/exec-gateway/relay/create HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {SECRET}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        own = sock is None
        s = sock or self.connect()
        try:
            s.sendall(req)
            data = b""
            while b"}\n" not in data:
                chunk = s.recv(4096)
                assert chunk, "mint connection closed"
                data += chunk
            return str(json.loads(data.split(b"\r\n\r\n", 1)[1])["ticket"])
        finally:
            if own:
                s.close()

    def metric(self, name: str) -> int:
        with self.connect() as s:
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = recv_all(s)
        # prometheus_client writes every value as a float ("3.0").
        m = re.search(rb"^" + name.encode() + rb" ([0-9.e+]+)$", data, re.M)
        assert m, name
        return int(float(m.group(1)))


def recv_all(sock: socket.socket) -> bytes:
    out = []
    while True:
        try:
            b = sock.recv(1 << 16)
        except (ConnectionResetError, TimeoutError):
            break
        if not b:
            break
        out.append(b)
    return b"".join(out)


@pytest.fixture
def server() -> Iterator[Server]:
    env = {**os.environ, "FASTRELAY_SHARED_SECRET": SECRET}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fastrelay",
            "serve",
            "--port",
            "0",
            "--idle-timeout",
            "1",
            "--max-per-workspace",
            "5000",
            "--log-level",
            "ERROR",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("fastrelay: listening on"), line
    try:
        yield Server(proc, int(line.rsplit(":", 1)[1]))
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert "Traceback" not in err, err


def settle(server: Server, baseline_fds: int) -> None:
    """Wait until no relay is live and descriptors are back to the baseline."""
    deadline = time.monotonic() + 30
    while True:
        active, fds = server.metric("fastrelay_active_relays"), server.ps.num_fds()
        if active == 0 and fds <= baseline_fds:
            return
        assert time.monotonic() < deadline, f"active={active} fds={fds} baseline={baseline_fds}"
        time.sleep(0.1)


def parse_body(data: bytes) -> tuple[bytes, bool]:
    """(payload, complete?) of a raw GET response: Content-Length or chunked."""
    head, _, rest = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        return b"", False
    m = re.search(rb"(?i)content-length: (\d+)", head)
    if m:
        length = int(m.group(1))
        return rest[:length], len(rest) >= length
    payload, i = b"", 0
    while True:
        j = rest.find(b"\r\n", i)
        if j < 0:
            return payload, False
        size = int(rest[i:j], 16)
        if size == 0:
            return payload, rest[j + 2 : j + 4] == b"\r\n"
        chunk = rest[j + 2 : j + 2 + size]
        payload += chunk
        if len(chunk) < size or rest[j + 2 + size : j + 4 + size] != b"\r\n":
            return payload, False
        i = j + 4 + size


def one_chaos_transfer(server: Server, rng: random.Random) -> str:
    size = rng.randrange(1, 3 * 1024 * 1024)
    data = rng.randbytes(size)
    chunked = rng.random() < 0.5
    fate = rng.choice(["ok", "ok", "kill_upload", "kill_download", "stall_upload"])
    cut = rng.randrange(0, size)
    t = server.mint()
    get = server.connect()
    get.sendall(
        f"GET /relay/{t} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {t}\r\nConnection: close\r\n\r\n".encode()
    )
    put = server.connect()
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {size}"
    put.sendall(
        f"PUT /relay/{t} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {t}\r\n{framing}\r\n\r\n".encode()
    )

    def body(part: bytes) -> bytes:
        return b"%x\r\n%s\r\n" % (len(part), part) if chunked and part else part

    received: dict[str, bytes] = {}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        reader = pool.submit(recv_all, get)
        try:
            if fate == "ok":
                for i in range(0, size, 256 * 1024):
                    put.sendall(body(data[i : i + 256 * 1024]))
                if chunked:
                    put.sendall(b"0\r\n\r\n")
                recv_all(put)
            elif fate == "kill_upload":
                put.sendall(body(data[:cut]))
                put.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                )
            elif fate == "stall_upload":
                put.sendall(body(data[:cut]))
                recv_all(put)  # the idle timeout answers and closes
            else:  # kill_download: the reader is reset under the upload
                get.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                )
                get.shutdown(socket.SHUT_RD)
                get.close()
                put.settimeout(30)
                with contextlib.suppress(OSError):
                    put.sendall(body(data))
                recv_all(put)
        finally:
            put.close()
        if fate != "kill_download":
            received["get"] = reader.result(timeout=60)
            get.close()
    if fate == "kill_download":
        return fate
    payload, complete = parse_body(received["get"])
    assert data.startswith(payload), "received bytes differ from the uploaded ones"
    if fate == "ok":
        assert complete and hashlib.sha256(payload).digest() == hashlib.sha256(data).digest()
    else:
        assert not complete, f"{fate}: an incomplete transfer looked complete"
    return fate


@pytest.mark.slow
def test_chaos(server: Server) -> None:
    rng = random.Random(20261124)
    assert server.metric("fastrelay_active_relays") == 0  # a round trip: the server is up
    baseline = server.ps.num_fds()
    fates: dict[str, int] = {}
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        seeds = [rng.randrange(2**32) for _ in range(200)]
        for fate in pool.map(lambda s: one_chaos_transfer(server, random.Random(s)), seeds):
            fates[fate] = fates.get(fate, 0) + 1
    print(f"\nchaos fates: {fates}")
    settle(server, baseline)


@pytest.mark.slow
def test_soak(server: Server) -> None:
    payload = os.urandom(4096)
    assert server.metric("fastrelay_active_relays") == 0  # a round trip: the server is up
    mint_sock = server.connect()
    first_fds = server.ps.num_fds()
    rss: list[int] = []
    n = 10_000
    for i in range(n):
        t = server.mint(mint_sock)
        with server.connect() as g, server.connect() as p:
            g.sendall(
                f"GET /relay/{t} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {t}\r\nConnection: close\r\n\r\n".encode()
            )
            p.sendall(
                f"PUT /relay/{t} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {t}\r\nContent-Length: 4096\r\n\r\n".encode()
                + payload
            )
            assert recv_all(g).endswith(payload)
            recv_all(p)
        if i % 1000 == 999:
            rss.append(server.ps.memory_info().rss)
    mint_sock.close()
    # 1,000 GETs waiting at once, then released by pairing
    tickets = [server.mint(ttl=120) for _ in range(1000)]
    gets: list[socket.socket] = []
    try:
        for t in tickets:
            g = server.connect()
            g.sendall(
                f"GET /relay/{t} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {t}\r\nConnection: close\r\n\r\n".encode()
            )
            gets.append(g)
        # every GET is parked on the server (one descriptor each)
        deadline = time.monotonic() + 60
        while server.ps.num_fds() < first_fds + 990:
            assert time.monotonic() < deadline, server.ps.num_fds()
            time.sleep(0.1)
        waiting_fds = server.ps.num_fds()
        for t, g in zip(tickets, gets, strict=True):
            with server.connect() as p:
                p.sendall(
                    f"PUT /relay/{t} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {t}\r\nContent-Length: 1\r\n\r\nz".encode()
                )
                recv_all(p)
            assert recv_all(g).endswith(b"z")
    finally:
        for g in gets:
            g.close()
    settle(server, first_fds)
    end_fds = server.ps.num_fds()
    mib = [r / 2**20 for r in rss]
    print(
        f"\nsoak: {n} relays; fds start {first_fds} with-1000-waiting {waiting_fds} end {end_fds}; "
        f"RSS per 1000 relays (MiB): {', '.join(f'{m:.1f}' for m in mib)}"
    )
    assert end_fds <= first_fds
    assert mib[-1] - mib[0] < 20, mib
