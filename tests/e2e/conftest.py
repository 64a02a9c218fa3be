"""A real fastrelay server on a background-thread event loop, and real curl.

The ``relay`` fixture runs the server on 127.0.0.1:0 in its own thread and
loop (uvloop or stdlib asyncio), plain or TLS with a CA made at run time by
trustme. Tests talk to it with real curl processes and raw sockets.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json
import os
import pathlib
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import trustme
import uvloop

import fastrelay

SECRET = "test-secret"
CURL = shutil.which("curl")


@dataclasses.dataclass
class Relay:
    """Handle on a running server: URLs, minting, curl."""

    loop: asyncio.AbstractEventLoop
    server: fastrelay.RelayServer
    registry: fastrelay.Registry
    tls: bool
    ca_file: str | None
    client_ctx: ssl.SSLContext | None
    tmp: pathlib.Path

    @property
    def base(self) -> str:
        return self.server.url

    def url(self, ticket: str) -> str:
        return f"{self.base}/relay/{ticket}"

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the server's loop thread and return its result."""
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def run() -> None:
            try:
                fut.set_result(fn())
            except BaseException as exc:
                fut.set_exception(exc)

        self.loop.call_soon_threadsafe(run)
        return fut.result(timeout=10)

    def create(self, **kw: Any) -> fastrelay.Relay:
        """Mint in-process (the library API)."""
        args = {"workspace_id": "ws", "source_exe_id": "src", "dest_exe_id": "dst", **kw}
        return self.call(lambda: self.registry.create(**args))  # type: ignore[no-any-return]

    def wait_done(self, relay: fastrelay.Relay, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while not self.call(relay.done):
            if time.monotonic() > deadline:
                raise AssertionError(f"relay not done: {relay!r}")
            time.sleep(0.01)

    def curl_args(self) -> list[str]:
        assert CURL is not None
        args = [CURL, "-sS"]
        if self.ca_file:
            args += ["--cacert", self.ca_file]
        return args

    def curl(
        self, *args: str, input: bytes | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [*self.curl_args(), *args], input=input, capture_output=True, timeout=timeout
        )

    def popen(self, *args: str, **kw: Any) -> subprocess.Popen[bytes]:
        return subprocess.Popen([*self.curl_args(), *args], **kw)

    def mint_http(
        self, body: dict[str, Any] | bytes | None = None, secret: str = SECRET
    ) -> tuple[int, bytes]:
        """POST the mint endpoint; returns (status, body)."""
        if body is None:
            body = {"workspace_id": "ws", "source_exe_id": "src", "dest_exe_id": "dst"}
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        head = (
            f"POST /api/exec-gateway/relay/create HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {secret}\r\nContent-Length: {len(data)}\r\n"
            f"Connection: close\r\n\r\n"
        ).encode()
        status, _, resp = self.raw(head + data)
        return status, resp

    def connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.server.port), timeout=20)
        if self.client_ctx is not None:
            try:
                sock = self.client_ctx.wrap_socket(sock, server_hostname="localhost")
            except BaseException:
                sock.close()
                raise
        return sock

    def raw(self, data: bytes) -> tuple[int, dict[str, str], bytes]:
        """Send raw bytes, read until close; parse one response."""
        with self.connect() as sock:
            sock.sendall(data)
            return parse_response(read_all(sock))


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        try:
            b = sock.recv(65536)
        except (ConnectionResetError, ssl.SSLError):
            break
        if not b:
            break
        chunks.append(b)
    return b"".join(chunks)


def parse_response(data: bytes) -> tuple[int, dict[str, str], bytes]:
    while data.startswith(b"HTTP/1.1 100"):
        data = data.split(b"\r\n\r\n", 1)[1]
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1]) if lines and lines[0] else 0
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return status, headers, body


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


def _start(
    loop_kind: str, tls: bool, ca: trustme.CA, tmp: pathlib.Path, **config: Any
) -> Iterator[Relay]:
    loop = uvloop.new_event_loop() if loop_kind == "uvloop" else asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server_ctx = client_ctx = None
    ca_file = None
    if tls:
        cert = ca.issue_cert("localhost", "127.0.0.1")
        server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        cert.configure_cert(server_ctx)
        ca_file = str(tmp / "ca.pem")
        ca.cert_pem.write_to_path(ca_file)
        client_ctx = ssl.create_default_context(cafile=ca_file)
    registry = fastrelay.Registry(max_per_workspace=config.pop("max_per_workspace", 64))
    cfg = fastrelay.RelayConfig(**config)
    server = asyncio.run_coroutine_threadsafe(
        fastrelay.start_server(
            registry, "127.0.0.1", 0, ssl=server_ctx, shared_secret=SECRET, config=cfg
        ),
        loop,
    ).result(10)
    try:
        yield Relay(loop, server, registry, tls, ca_file, client_ctx, tmp)
    finally:
        asyncio.run_coroutine_threadsafe(server.close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@pytest.fixture(params=["uvloop", "asyncio"])
def loop_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=[False, True], ids=["plain", "tls"])
def any_relay(
    loop_kind: str, request: pytest.FixtureRequest, ca: trustme.CA, tmp_path: pathlib.Path
) -> Iterator[Relay]:
    """The core matrix: uvloop and asyncio, plain and TLS."""
    yield from _start(loop_kind, bool(request.param), ca, tmp_path)


@pytest.fixture
def relay(ca: trustme.CA, tmp_path: pathlib.Path) -> Iterator[Relay]:
    """uvloop, plain: for rows whose behaviour does not depend on loop or TLS."""
    yield from _start("uvloop", False, ca, tmp_path)


@pytest.fixture
def relay_factory(ca: trustme.CA, tmp_path: pathlib.Path) -> Iterator[Callable[..., Relay]]:
    gens: list[Iterator[Relay]] = []

    def make(loop_kind: str = "uvloop", tls: bool = False, **config: Any) -> Relay:
        gen = _start(loop_kind, tls, ca, tmp_path, **config)
        gens.append(gen)
        return next(gen)

    yield make
    for gen in gens:
        with __import__("contextlib").suppress(StopIteration):
            next(gen)


@pytest.fixture(scope="session")
def payload_file(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    path = tmp_path_factory.mktemp("data") / "payload.bin"
    path.write_bytes(os.urandom(3 * 1024 * 1024 + 12345))
    return path


if CURL is None:
    raise RuntimeError("these tests need curl on the PATH (apt-get install curl)")
