"""Lean benchmark clients: a sendfile sender and a recv_into receiver.

They cost as little CPU as a client can, so the figures measure the relay,
not the client. Both speak just enough HTTP/1.1 for the relay and for
piping-server.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import socket
import ssl
import time
from typing import Any

from fastrelay.core.chunked import ChunkedDecoder

RECV_BYTES = 1024 * 1024
CHUNK_BYTES = 65524  # what `curl -T -` sends per chunk


@dataclasses.dataclass
class Endpoint:
    host: str
    port: int
    ssl: ssl.SSLContext | None = None

    def connect(self) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), timeout=120)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.ssl is not None:
            sock = self.ssl.wrap_socket(sock, server_hostname="localhost")
        return sock


@dataclasses.dataclass
class Received:
    status: int
    body_bytes: int
    sha256: str | None
    seconds: float


def put_head(path: str, ticket: str | None, size: int | None) -> bytes:
    lines = [f"PUT {path} HTTP/1.1", "Host: bench", "Connection: close"]
    if ticket:
        lines.append(f"Authorization: Bearer {ticket}")
    lines.append(f"Content-Length: {size}" if size is not None else "Transfer-Encoding: chunked")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def get_head(path: str, ticket: str | None) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: bench", "Connection: close"]
    if ticket:
        lines.append(f"Authorization: Bearer {ticket}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def send_file(sock: socket.socket, path: str, chunked: bool) -> None:
    """Send a body: sendfile(2) for Content-Length, 64 KiB frames for chunked."""
    with open(path, "rb") as f:
        if not chunked:
            sock.sendfile(f)
            return
        buf = bytearray(CHUNK_BYTES)
        view = memoryview(buf)
        while True:
            n = f.readinto(buf)
            if not n:
                break
            sock.sendall(b"%x\r\n" % n)
            sock.sendall(view[:n])
            sock.sendall(b"\r\n")
        sock.sendall(b"0\r\n\r\n")


def read_response(sock: socket.socket, verify: bool, rate_bytes_s: float = 0.0) -> Received:
    """Read one response into a reused buffer; count (and hash) the body.

    With ``rate_bytes_s`` the reader paces itself (a slow consumer).
    """
    t0 = time.perf_counter()
    buf = bytearray(RECV_BYTES)
    view = memoryview(buf)
    head = b""
    digest = hashlib.sha256() if verify else None
    while b"\r\n\r\n" not in head:
        n = sock.recv_into(buf)
        if not n:
            return Received(0, 0, None, time.perf_counter() - t0)
        head += bytes(view[:n])
        while head.startswith(b"HTTP/1.1 100"):
            head = head.split(b"\r\n\r\n", 1)[1]
    raw_head, _, rest = head.partition(b"\r\n\r\n")
    lines = raw_head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {
        k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])
    }
    length = int(headers["content-length"]) if "content-length" in headers else None
    decoder = ChunkedDecoder() if headers.get("transfer-encoding") == "chunked" else None
    total = 0
    started = time.perf_counter()

    def take(data: memoryview) -> bool:
        nonlocal total
        if decoder is not None:
            runs, _ = decoder.feed(data)
            for a, b in runs:
                total += b - a
                if digest is not None:
                    digest.update(data[a:b])
            return decoder.done
        if digest is not None:
            digest.update(data)
        total += len(data)
        return length is not None and total >= length

    done = take(memoryview(rest)) if rest else (length == 0)
    while not done:
        try:
            n = sock.recv_into(buf)
        except (ConnectionResetError, ssl.SSLError):
            break
        if not n:
            break
        done = take(view[:n])
        if rate_bytes_s:
            ahead = total / rate_bytes_s - (time.perf_counter() - started)
            if ahead > 0:
                time.sleep(ahead)
    complete = done or (length is None and decoder is None)
    return Received(
        status if complete else -status,
        total,
        digest.hexdigest() if digest is not None else None,
        time.perf_counter() - t0,
    )


def mint(
    ep: Endpoint, secret: str, workspace: str = "bench", sock: socket.socket | None = None
) -> str:
    """Mint a ticket (reusing ``sock`` when given: the mint endpoint keeps alive)."""
    body = json.dumps(
        {"workspace_id": workspace, "source_exe_id": "s", "dest_exe_id": "d"}
    ).encode()
    req = (
        f"POST /api/exec-gateway/relay/create HTTP/1.1\r\nHost: bench\r\n"
        f"Authorization: Bearer {secret}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    own = sock is None
    s = sock or ep.connect()
    try:
        s.sendall(req)
        data = b""
        while True:
            data += s.recv(65536)
            head, sep, rest = data.partition(b"\r\n\r\n")
            if sep:
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                if len(rest) >= length:
                    return str(json.loads(rest[:length])["ticket"])
    finally:
        if own:
            s.close()


def random_file(path: str, size: int) -> str:
    """A file of random bytes, written once and reused; returns its sha256."""
    digest = hashlib.sha256()
    if os.path.exists(path) and os.path.getsize(path) == size:
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
        return digest.hexdigest()
    with open(path, "wb") as f:
        left = size
        while left:
            block = os.urandom(min(left, 1 << 20))
            f.write(block)
            digest.update(block)
            left -= len(block)
    return digest.hexdigest()


def reap(procs: list[Any], results: Any) -> None:
    """Join forked clients (killing any still alive after 5 s) and close
    their results queue: what every bench does once its transfer is over."""
    for p in procs:
        if p.pid is not None:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join()
    results.close()
    results.join_thread()
