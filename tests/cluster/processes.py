"""Real processes for cluster tests and benchmarks: redis-server, fastrelay, HAProxy.

Dependency-free (the standard library; psutil is not needed). Each class
starts one real process on loopback, waits until it is ready by polling a
condition with a deadline, and stops it again; each is a context manager,
and every process still alive when the interpreter exits is killed (an
``atexit`` hook), so a test or a benchmark script that fails half-way leaves
nothing behind::

    with RedisServer() as redis, Node(["--log-level", "DEBUG"]) as node:
        ...
    with HAProxy([n.address for n in nodes], check_inter="200ms") as proxy:
        proxy.wait_server_state("relay", "node2", "DOWN", timeout=5)

Waits never sleep to order events: `wait_for` polls a condition until a
deadline and raises `WaitTimeout` saying what it waited for and what it saw
last.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Self, TypeVar

REPO = pathlib.Path(__file__).resolve().parents[2]
HAPROXY_CFG = REPO / "deploy" / "haproxy.cfg"
DEFAULT_SECRET = "cluster-test-secret"
READY_PREFIX = "fastrelay: listening on "

T = TypeVar("T")


class ProcessError(RuntimeError):
    """A process did not start, or ended when it should not have."""


class WaitTimeout(AssertionError):
    """A polled condition did not become true before its deadline."""


def wait_for(
    condition: Callable[[], T | None],
    timeout: float,
    what: str,
    *,
    interval: float = 0.01,
    describe: Callable[[], str] | None = None,
) -> T:
    """Poll ``condition`` until it returns a truthy value; return that value.

    Raises `WaitTimeout` after ``timeout`` seconds naming ``what`` was awaited
    and, if given, ``describe()`` (the state seen last).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            seen = f"; last seen: {describe()}" if describe is not None else ""
            raise WaitTimeout(f"timed out after {timeout:g}s waiting for {what}{seen}")
        time.sleep(interval)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free right now on ``host`` (another process may take it later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def which(name: str) -> str | None:
    """``shutil.which`` that also looks in the sbin directories (haproxy lives there)."""
    path = os.environ.get("PATH", os.defpath) + os.pathsep + "/usr/sbin:/sbin:/usr/local/sbin"
    return shutil.which(name, path=path)


# --- every child, killed at exit ---------------------------------------------------

_LIVE: set[subprocess.Popen[bytes]] = set()
_LIVE_LOCK = threading.Lock()


def _track(proc: subprocess.Popen[bytes]) -> None:
    with _LIVE_LOCK:
        _LIVE.add(proc)


def _untrack(proc: subprocess.Popen[bytes]) -> None:
    with _LIVE_LOCK:
        _LIVE.discard(proc)


@atexit.register
def _kill_leftovers() -> None:
    with _LIVE_LOCK:
        procs = list(_LIVE)
        _LIVE.clear()
    for proc in procs:
        with contextlib.suppress(OSError):
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)


class _Process:
    """One child process with its output in files under ``workdir``."""

    name = "process"

    def __init__(self, workdir: str | os.PathLike[str] | None) -> None:
        self._own_workdir = workdir is None
        self.workdir = pathlib.Path(workdir or tempfile.mkdtemp(prefix=f"fr-{self.name}-"))
        self.proc: subprocess.Popen[bytes] | None = None
        self.stdout_path = self.workdir / f"{self.name}.stdout"
        self.stderr_path = self.workdir / f"{self.name}.stderr"
        self.starts = 0

    def _spawn(self, argv: Sequence[str], env: Mapping[str, str] | None = None) -> None:
        if self.running:
            raise ProcessError(f"{self.name} is already running (pid {self.pid})")
        self.starts += 1
        # Append: output of an earlier run of this object stays readable.
        with open(self.stdout_path, "ab") as out, open(self.stderr_path, "ab") as err:
            self.proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=dict(env) if env is not None else None,
                cwd=self.workdir,
            )
        _track(self.proc)

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise ProcessError(f"{self.name} was never started")
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def stdout_text(self) -> str:
        return _read(self.stdout_path)

    def stderr_text(self) -> str:
        return _read(self.stderr_path)

    def signal(self, sig: int) -> None:
        if self.running:
            assert self.proc is not None
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)

    def terminate(self) -> None:
        """SIGTERM (does not wait)."""
        self.signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL and reap (a killed process is gone at once)."""
        if self.proc is None:
            return
        self.signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
        _untrack(self.proc)

    def wait_exit(self, timeout: float) -> int:
        """Wait for the process to end; its exit status (negative: killed by a signal)."""
        if self.proc is None:
            raise ProcessError(f"{self.name} was never started")
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise WaitTimeout(
                f"{self.name} (pid {self.proc.pid}) still running {timeout:g}s after it "
                f"was asked to stop; stderr tail: {self.stderr_text()[-2000:]!r}"
            ) from None
        _untrack(self.proc)
        return code

    def stop(self, timeout: float = 10) -> int | None:
        """SIGTERM and wait; SIGKILL if it does not end within ``timeout``."""
        if self.proc is None:
            return None
        if self.running:
            self.terminate()
            try:
                return self.wait_exit(timeout)
            except WaitTimeout:
                self.kill()
        _untrack(self.proc)
        return self.proc.poll()

    def close(self) -> None:
        """Stop the process (kill it if it does not stop) and remove an own workdir."""
        try:
            self.stop()
        finally:
            if self.proc is not None and self.proc.poll() is None:
                self.kill()
            if self._own_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)

    def _died(self, what: str) -> ProcessError:
        return ProcessError(
            f"{self.name} exited with status {self.returncode} {what}; "
            f"stderr: {self.stderr_text()[-4000:]!r}; stdout: {self.stdout_text()[-2000:]!r}"
        )

    def _check_alive(self, what: str) -> None:
        if not self.running:
            raise self._died(what)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read(path: pathlib.Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


# --- redis-server ------------------------------------------------------------------


class RedisServer(_Process):
    """``redis-server`` on a loopback port, no persistence.

    Starts in the constructor (``start=False`` to defer). ``stop()``,
    ``kill()``, then ``start()`` again serves on the same port, empty.
    """

    name = "redis"

    def __init__(
        self,
        port: int | None = None,
        *,
        workdir: str | os.PathLike[str] | None = None,
        binary: str | None = None,
        extra_args: Sequence[str] = (),
        start: bool = True,
        timeout: float = 10,
    ) -> None:
        super().__init__(workdir)
        binary = binary or which("redis-server")
        if binary is None:
            raise ProcessError("redis-server is not installed (apt-get install redis-server)")
        self.binary = binary
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.extra_args = list(extra_args)
        if start:
            try:
                self.start(timeout)
            except BaseException:
                self.close()
                raise

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}"

    def start(self, timeout: float = 10) -> Self:
        argv = [
            self.binary,
            "--bind", self.host,
            "--port", str(self.port),
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.workdir),
            "--daemonize", "no",
            "--protected-mode", "no",
            "--logfile", "",
            *self.extra_args,
        ]  # fmt: skip
        self._spawn(argv)
        wait_for(
            lambda: self._check_alive("while starting") or self.ping(),
            timeout,
            f"redis-server to answer PING on {self.host}:{self.port}",
        )
        return self

    def command(self, *args: str, timeout: float = 2) -> bytes:
        """Send one command (RESP array), return the raw first reply line."""
        payload = f"*{len(args)}\r\n".encode()
        for arg in args:
            data = arg.encode()
            payload += b"$%d\r\n%s\r\n" % (len(data), data)
        with socket.create_connection((self.host, self.port), timeout=timeout) as sock:
            sock.sendall(payload)
            reply = b""
            while not reply.endswith(b"\r\n"):
                chunk = sock.recv(4096)
                if not chunk:
                    break
                reply += chunk
        return reply

    def ping(self) -> bool:
        try:
            return self.command("PING", timeout=0.5).startswith(b"+PONG")
        except OSError:
            return False

    def wait_down(self, timeout: float = 10) -> None:
        wait_for(lambda: not self.ping(), timeout, f"redis on port {self.port} to stop answering")


# --- fastrelay serve ---------------------------------------------------------------


class Node(_Process):
    """``python -m fastrelay serve --host 127.0.0.1 --port PORT *extra_args``.

    Waits for the ready line on stdout (``fastrelay: listening on URL``);
    stderr (the log) goes to ``stderr_path`` for assertions. ``port=0`` lets
    the node pick; `Node.addressed` starts one whose ``--public-url`` is its
    own URL. The mint secret is ``FASTRELAY_SHARED_SECRET`` in its env.
    """

    name = "node"

    def __init__(
        self,
        extra_args: Sequence[str] = (),
        *,
        port: int = 0,
        secret: str = DEFAULT_SECRET,
        env: Mapping[str, str] | None = None,
        workdir: str | os.PathLike[str] | None = None,
        python: str = sys.executable,
        start: bool = True,
        timeout: float = 15,
    ) -> None:
        super().__init__(workdir)
        self.extra_args = list(extra_args)
        self.requested_port = port
        self.secret = secret
        self.env = {**os.environ, **(env or {}), "FASTRELAY_SHARED_SECRET": secret}
        self.python = python
        self.url = ""
        self.port = 0
        if start:
            try:
                self.start(timeout)
            except BaseException:
                self.close()
                raise

    @classmethod
    def addressed(cls, extra_args: Sequence[str] = (), attempts: int = 3, **kw: Any) -> Node:
        """A node on a free port whose ``--public-url`` is its own URL.

        The port is picked before the node binds it: if another process takes
        it in between (exit status 2, "cannot listen"), try another one.
        """
        for attempt in range(attempts):
            port = free_port()
            node = cls(
                ["--public-url", f"http://127.0.0.1:{port}", *extra_args],
                port=port,
                start=False,
                **kw,
            )
            try:
                return node.start()
            except ProcessError:
                busy = "cannot listen" in node.stderr_text()
                node.close()
                if not busy or attempt == attempts - 1:
                    raise
        raise AssertionError("unreachable")

    @property
    def address(self) -> str:
        """``host:port`` (for HAProxy's server lines)."""
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 15) -> Self:
        argv = [
            self.python, "-m", "fastrelay", "serve",
            "--host", "127.0.0.1",
            "--port", str(self.port or self.requested_port),
            *self.extra_args,
        ]  # fmt: skip
        offset = self.stdout_path.stat().st_size if self.stdout_path.exists() else 0
        self._spawn(argv, self.env)

        def ready() -> str | None:
            text = _read(self.stdout_path)[offset:]
            for line in text.splitlines(keepends=True):
                if line.startswith(READY_PREFIX) and line.endswith("\n"):
                    return line[len(READY_PREFIX) :].strip()
            self._check_alive("before its ready line")
            return None

        self.url = wait_for(
            ready,
            timeout,
            f"fastrelay's ready line ({READY_PREFIX}...)",
            describe=lambda: repr(self.stderr_text()[-2000:]),
        )
        self.port = int(self.url.rsplit(":", 1)[1])
        return self

    def healthz(self, timeout: float = 2) -> int:
        """Status of ``GET /healthz`` (0: no answer)."""
        return http_status(f"{self.url}/healthz", timeout=timeout)

    def mint(self, **kw: Any) -> dict[str, Any]:
        return mint(self.url, self.secret, **kw)

    def metric(self, name: str, timeout: float = 2) -> float | None:
        """One unlabelled sample of ``GET /metrics`` (None: absent or no answer)."""
        try:
            with urllib.request.urlopen(f"{self.url}/metrics", timeout=timeout) as resp:
                text = resp.read().decode()
        except OSError:
            return None
        for line in text.splitlines():
            if line.startswith(f"{name} "):
                return float(line.split()[1])
        return None


# --- HAProxy -----------------------------------------------------------------------


class HAProxy(_Process):
    """``haproxy -f deploy/haproxy.cfg -db`` in front of ``nodes`` (``host:port``).

    Sets the environment the config reads (deploy/README.md): the listen
    address (a free loopback port), the stats socket (a unix socket in the
    workdir), ``FASTRELAY_NODE1..N``, the check interval, and ``env`` for
    anything else. `command` talks to the runtime API, `wait_server_state`
    polls ``show stat``.
    """

    name = "haproxy"

    def __init__(
        self,
        nodes: Iterable[str],
        *,
        config: str | os.PathLike[str] = HAPROXY_CFG,
        check_inter: str = "200ms",
        check_fall: int = 2,
        check_rise: int = 1,
        env: Mapping[str, str] | None = None,
        tls_pem: str | os.PathLike[str] | None = None,
        port: int | None = None,
        workdir: str | os.PathLike[str] | None = None,
        binary: str | None = None,
        start: bool = True,
        timeout: float = 10,
    ) -> None:
        super().__init__(workdir)
        binary = binary or which("haproxy")
        if binary is None:
            raise ProcessError("haproxy is not installed (apt-get install haproxy)")
        self.binary = binary
        self.config = pathlib.Path(config)
        self.nodes = list(nodes)
        if len(self.nodes) > 8:
            raise ValueError("deploy/haproxy.cfg has server lines for 8 nodes")
        # ``port``: chosen beforehand, e.g. to be the nodes' --public-url.
        self.port = port or free_port()
        self.tls_port = free_port() if tls_pem else None
        # A unix socket path must stay under 108 bytes: keep it short.
        self._sockdir = tempfile.mkdtemp(prefix="frhx-")
        self.stats_socket = os.path.join(self._sockdir, "stats.sock")
        self.env: dict[str, str] = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("FASTRELAY_") or k == "FASTRELAY_SHARED_SECRET"
        }
        self.env.update(
            FASTRELAY_BIND=f"127.0.0.1:{self.port}",
            FASTRELAY_HAPROXY_STATS_SOCKET=self.stats_socket,
            FASTRELAY_CHECK_INTER=check_inter,
            FASTRELAY_CHECK_FALL=str(check_fall),
            FASTRELAY_CHECK_RISE=str(check_rise),
        )
        for i, address in enumerate(self.nodes, 1):
            self.env[f"FASTRELAY_NODE{i}"] = address
        if tls_pem is not None:
            self.env["FASTRELAY_TLS_PEM"] = str(tls_pem)
            self.env["FASTRELAY_TLS_BIND"] = f"127.0.0.1:{self.tls_port}"
        self.env.update(env or {})
        if start:
            try:
                self.start(timeout)
            except BaseException:
                self.close()
                raise

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def tls_url(self) -> str:
        if self.tls_port is None:
            raise ProcessError("HAProxy was started without tls_pem")
        return f"https://127.0.0.1:{self.tls_port}"

    def check_config(self) -> str:
        """``haproxy -c``: raises `ProcessError` with HAProxy's words if invalid."""
        done = subprocess.run(
            [self.binary, "-c", "-f", str(self.config)],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        if done.returncode != 0:
            raise ProcessError(f"haproxy -c failed: {done.stdout}{done.stderr}")
        return done.stdout + done.stderr

    def start(self, timeout: float = 10) -> Self:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.stats_socket)
        self._spawn([self.binary, "-f", str(self.config), "-db"], self.env)

        def ready() -> bool:
            self._check_alive("while starting")
            return self.socket_ready() and port_open("127.0.0.1", self.port)

        wait_for(
            ready,
            timeout,
            f"haproxy's stats socket and port {self.port}",
            describe=lambda: repr(self.stderr_text()[-2000:]),
        )
        return self

    def close(self) -> None:
        try:
            super().close()
        finally:
            shutil.rmtree(self._sockdir, ignore_errors=True)

    # --- runtime API ---

    def command(self, line: str, timeout: float = 2) -> str:
        """One runtime API command on the stats socket; its whole answer."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(self.stats_socket)
            sock.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace")

    def socket_ready(self) -> bool:
        try:
            return "Name: HAProxy" in self.command("show info", timeout=0.5)
        except OSError:
            return False

    def show_stat(self) -> list[dict[str, str]]:
        """``show stat`` as one dict per row (``pxname``, ``svname``, ``status`` ...)."""
        lines = [line for line in self.command("show stat").splitlines() if line]
        if not lines or not lines[0].startswith("# "):
            raise ProcessError(f"unexpected show stat answer: {lines[:3]!r}")
        fields = lines[0][2:].split(",")
        return [dict(zip(fields, line.split(","), strict=False)) for line in lines[1:]]

    def server_stat(self, backend: str, server: str) -> dict[str, str]:
        for row in self.show_stat():
            if row["pxname"] == backend and row["svname"] == server:
                return row
        raise ProcessError(f"no server {backend}/{server} in show stat")

    def server_state(self, backend: str, server: str) -> str:
        """The ``status`` column: ``UP``, ``DOWN``, ``UP 1/2`` (failing), ``MAINT`` ..."""
        return self.server_stat(backend, server)["status"]

    def wait_server_state(self, backend: str, server: str, state: str, timeout: float) -> str:
        """Poll until ``backend/server`` is ``state`` (``UP``, ``DOWN``, ``MAINT``, ...).

        A transitional status counts by its first word: ``UP 1/2`` (still in
        the balancing, one check failed) is ``UP``, ``DOWN 1/2`` is ``DOWN``.
        Returns the full status seen.
        """
        seen: list[str] = []

        def check() -> str | None:
            status = self.server_state(backend, server)
            seen[:] = [status]
            return status if status.split(" ")[0] == state else None

        return wait_for(
            check,
            timeout,
            f"haproxy server {backend}/{server} to be {state}",
            describe=lambda: seen[0] if seen else "nothing",
            interval=0.02,
        )

    def wait_all_up(self, timeout: float = 10) -> None:
        for i in range(1, len(self.nodes) + 1):
            self.wait_server_state("relay", f"node{i}", "UP", timeout)

    def server_sessions(self, backend: str = "relay") -> dict[str, int]:
        """Requests sent so far to each server of ``backend`` (``stot``)."""
        return {
            row["svname"]: int(row["stot"] or 0)
            for row in self.show_stat()
            if row["pxname"] == backend and row["svname"] not in ("FRONTEND", "BACKEND")
        }


# --- small HTTP helpers (stdlib) ---------------------------------------------------


def http_status(url: str, timeout: float = 2) -> int:
    """Status of a GET (0 when there is no HTTP answer)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        exc.close()
        return int(exc.code)
    except OSError:
        return 0


def mint(
    base_url: str,
    secret: str = DEFAULT_SECRET,
    *,
    workspace_id: str = "ws",
    source_exe_id: str = "src",
    dest_exe_id: str = "dst",
    timeout: float = 10,
    **fields: Any,
) -> dict[str, Any]:
    """``POST /api/exec-gateway/relay/create``; the JSON answer (raises on non-201)."""
    body = {
        "workspace_id": workspace_id,
        "source_exe_id": source_exe_id,
        "dest_exe_id": dest_exe_id,
        **fields,
    }
    req = urllib.request.Request(
        f"{base_url}/api/exec-gateway/relay/create",
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {secret}", "Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        if resp.status != 201:
            raise ProcessError(f"mint answered {resp.status}")
        answer: dict[str, Any] = json.loads(resp.read())
        return answer
