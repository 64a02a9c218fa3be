"""The servers under test: fastrelay (CLI subprocess) and piping-server (npm).

Each runs in its own process so its CPU time and RSS can be read with
psutil, and is stopped (and killed if need be) on exit.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import psutil

from .clients import Endpoint

SECRET = "bench-secret"
CACHE = pathlib.Path(
    os.environ.get("FASTRELAY_BENCH_CACHE", pathlib.Path.home() / ".cache" / "fastrelay-bench")
)


@contextlib.contextmanager
def _process(args: list[str], env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env
    )
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


class Server:
    """A running relay: where it listens and which process to measure."""

    def __init__(self, name: str, endpoint: Endpoint, pid: int) -> None:
        self.name = name
        self.endpoint = endpoint
        self.process = psutil.Process(pid)

    def cpu_s(self) -> float:
        t = self.process.cpu_times()
        return float(t.user + t.system)

    def rss(self) -> int:
        return int(self.process.memory_info().rss)


@contextlib.contextmanager
def fastrelay(
    tls: tuple[str, str] | None,
    client_ssl: ssl.SSLContext | None,
    loop: str = "uvloop",
    extra: list[str] | None = None,
) -> Iterator[Server]:
    args = [
        sys.executable,
        "-m",
        "fastrelay",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--max-per-workspace",
        "100000",
        "--max-pending",
        "100000",
        "--log-level",
        "WARNING",
        "--loop",
        loop,
        *(extra or []),
    ]
    if tls:
        args += ["--certfile", tls[0], "--keyfile", tls[1]]
    env = {**os.environ, "FASTRELAY_SHARED_SECRET": SECRET}
    with _process(args, env) as proc:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("fastrelay: listening on"):
            raise RuntimeError(f"fastrelay did not start: {line!r}")
        port = int(line.rsplit(":", 1)[1])
        yield Server(f"fastrelay-{loop}", Endpoint("127.0.0.1", port, client_ssl), proc.pid)


def piping_server_bin() -> str | None:
    """Install npm `piping-server` into the cache once; None if node/npm are missing."""
    exe = CACHE / "piping" / "node_modules" / ".bin" / "piping-server"
    if exe.exists():
        return str(exe)
    if not (shutil.which("node") and shutil.which("npm")):
        return None
    (CACHE / "piping").mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        [
            "npm",
            "install",
            "--prefix",
            str(CACHE / "piping"),
            "piping-server@1",
            "--no-audit",
            "--no-fund",
        ],
        capture_output=True,
        timeout=600,
    )
    return str(exe) if result.returncode == 0 and exe.exists() else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def piping_server(
    tls: tuple[str, str] | None, client_ssl: ssl.SSLContext | None
) -> Iterator[Server | None]:
    exe = piping_server_bin()
    if exe is None:
        yield None
        return
    http_port = free_port()
    args = [exe, "--host", "127.0.0.1", "--http-port", str(http_port)]
    port = http_port
    if tls:
        port = free_port()
        args += [
            "--enable-https",
            "--https-port",
            str(port),
            "--key-path",
            tls[1],
            "--crt-path",
            tls[0],
        ]
    with _process(args) as proc:
        deadline = time.monotonic() + 30
        while True:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", port), timeout=1),
            ):
                break
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("piping-server did not start")
            time.sleep(0.1)
        # node may be a child of a wrapper script: measure the process that listens
        pid = proc.pid
        for child in psutil.Process(proc.pid).children(recursive=True):
            pid = child.pid
        yield Server("piping-server", Endpoint("127.0.0.1", port, client_ssl), pid)


class PeakRSS:
    """Samples a process's RSS every 20 ms in a thread."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.start = server.rss()
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            with contextlib.suppress(psutil.Error):
                self.peak = max(self.peak, self.server.rss())

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.server.rss())
