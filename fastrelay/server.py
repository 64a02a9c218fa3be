"""The composition root: listener, shared state, lifecycle.

`RelayServer` holds what every connection shares (config, registry, the one
timer, the buffer pool and scratch buffer, the open-connection set, the
bytes held for waiting uploads) and the few decisions that need all of it:
admitting connections (``--max-connections``, counting TLS handshakes from
accept), answering the mint, health and metrics endpoints, and a graceful
close. Pairing is not here: the connection that completes a pair builds the
transfer (connection.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import functools
import logging
import ssl as ssl_module
import time
from typing import Any

from . import logsafe, mint
from .config import RelayConfig
from .connection import HttpConnection
from .deadlines import Deadline
from .errors import MintDisabled, ShuttingDown
from .flow import BufferPool
from .heads import RequestHead, Route
from .metrics import make_registry, render_metrics
from .observe import Metrics
from .registry import Registry
from .timer import LoopTimer
from .tls import server_ssl_context

log = logging.getLogger("fastrelay")

# One server-wide buffer for request heads and small bodies; bytes are copied
# out of it in the same callback (see connection.py). 64 KiB is libuv's read
# size hint.
SCRATCH_BYTES = 64 * 1024

# The loop cuts a TLS handshake at header_timeout_s; we count it as failed
# this much later, once the loop has certainly given up on it.
HANDSHAKE_COUNT_SLACK_S = 1.0

# At most one "cannot accept" log line per this many seconds (EMFILE storms).
ACCEPT_ERROR_LOG_INTERVAL_S = 10.0


class RelayServer:
    def __init__(
        self,
        config: RelayConfig,
        registry: Registry | None = None,
        ssl: ssl_module.SSLContext | None = None,
    ) -> None:
        self.config = config
        self.registry = registry or Registry(config.max_per_workspace, config.ticket_ttl_s)
        self.timer: LoopTimer = self.registry.timer
        if ssl is None and config.tls:
            assert config.certfile is not None and config.keyfile is not None
            ssl = server_ssl_context(config.certfile, config.keyfile)
        self.ssl = ssl
        self.pool = BufferPool(config.read_buffer_bytes)
        self.scratch = memoryview(bytearray(SCRATCH_BYTES))
        self.connections: set[HttpConnection] = set()
        self.handshaking: dict[HttpConnection, Deadline] = {}
        """TLS connections accepted whose handshake has not finished."""
        self.waiting_body_bytes = 0
        """Body bytes held for waiting uploads, all connections together."""
        self.draining = False
        self.refused_connections = 0
        self.failed_handshakes = 0
        self._accept_error_logged_at = -ACCEPT_ERROR_LOG_INTERVAL_S
        self._metrics_registry = make_registry(self)
        self._drain_cut = False
        self._server: asyncio.Server | None = None
        self.port = 0
        self.url = ""

    # --- lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._install_accept_error_log(loop)
        self._server = await loop.create_server(
            self._accept,
            self.config.host,
            self.config.port,
            ssl=self.ssl,
            # A handshake is part of getting a request head in: same bound.
            ssl_handshake_timeout=self.config.header_timeout_s if self.ssl else None,
            reuse_address=True,
            backlog=1024,
        )
        sockname = self._server.sockets[0].getsockname()
        self.port = int(sockname[1])
        scheme = "https" if self.ssl is not None else "http"
        host = self.config.host
        shown = f"[{host}]" if ":" in host else host
        self.url = f"{scheme}://{shown}:{self.port}"

    @property
    def base_url(self) -> str:
        """Base of the URLs handed out at mint (``--public-url`` or derived)."""
        return self.config.base_url(self.port, tls=self.ssl is not None)

    async def drain(self, timeout_s: float) -> None:
        """Stop accepting; fail waiting sides (503); let paired transfers finish."""
        self.draining = True
        if self._server is not None:
            self._server.close()
        self.registry.shutdown_waiting()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self.registry.active_count and loop.time() < deadline and not self._drain_cut:
            await asyncio.sleep(0.05)

    def cut_drain(self) -> None:
        """Stop waiting for transfers in `drain` (a second signal)."""
        self._drain_cut = True

    async def close(self) -> None:
        """Stop listening, fail waiting sides with 503, close every connection."""
        self.draining = True
        if self._server is not None:
            self._server.close()
        self.registry.shutdown_waiting()
        for conn in list(self.connections):
            conn.shut_down()
        for conn in list(self.connections):
            if not conn.transport.is_closing():
                conn.transport.abort()
        if self._server is not None:
            await self._server.wait_closed()
        await asyncio.sleep(0)  # let connection_lost callbacks run
        self.timer.close()

    def reload_tls(self) -> bool:
        """Reload certificate and key from their files (SIGHUP).

        New connections get the new certificate, connections in flight keep
        theirs. The files are loaded into a scratch context first, so a bad
        file leaves the serving certificate untouched.
        """
        config = self.config
        if self.ssl is None or config.certfile is None:
            log.info("SIGHUP: not serving TLS, nothing to reload")
            return False
        try:
            server_ssl_context(config.certfile, config.keyfile)
            self.ssl.load_cert_chain(config.certfile, config.keyfile)
        except (OSError, ssl_module.SSLError) as exc:
            log.error("TLS reload failed, keeping the old certificate: %s", exc)
            return False
        log.info("TLS certificate reloaded from %s", config.certfile)
        return True

    # --- connections ---------------------------------------------------------------

    def _accept(self) -> HttpConnection:
        """The protocol factory: called at accept, before any TLS handshake."""
        conn = HttpConnection(self)
        if self.ssl is not None:
            # Until connection_made we hold no transport, and the loop tells
            # nobody when a handshake fails: count it from accept, and count
            # it failed once the loop's handshake timeout has passed.
            self.handshaking[conn] = self.timer.after(
                self.config.header_timeout_s + HANDSHAKE_COUNT_SLACK_S,
                functools.partial(self._handshake_gone, conn),
            )
        return conn

    def _handshake_gone(self, conn: HttpConnection) -> None:
        if self.handshaking.pop(conn, None) is not None:
            self.failed_handshakes += 1

    @property
    def open_connections(self) -> int:
        """Connections counted against ``max_connections`` (handshakes too)."""
        return len(self.connections) + len(self.handshaking)

    def connection_opened(self, conn: HttpConnection) -> bool:
        deadline = self.handshaking.pop(conn, None)
        if deadline is not None:
            deadline.cancel()
        if self.draining or self.open_connections >= self.config.max_connections:
            self.refused_connections += 1
            return False
        self.connections.add(conn)
        return True

    def connection_closed(self, conn: HttpConnection) -> None:
        self.connections.discard(conn)

    def hold_waiting_bytes(self, delta: int) -> bool:
        self.waiting_body_bytes += delta
        return self.waiting_body_bytes <= self.config.max_waiting_body_total

    def _install_accept_error_log(self, loop: asyncio.AbstractEventLoop) -> None:
        """Out of descriptors at accept (EMFILE): one log line per interval,
        not a traceback per attempt; the loop retries and open connections
        are served on."""
        previous = loop.get_exception_handler()

        def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
            exc = context.get("exception")
            message = str(context.get("message", ""))
            if "accept" in message or (isinstance(exc, OSError) and exc.errno in _ACCEPT_ERRNOS):
                now = time.monotonic()
                if now - self._accept_error_logged_at >= ACCEPT_ERROR_LOG_INTERVAL_S:
                    self._accept_error_logged_at = now
                    log.error(
                        "cannot accept connections: %s (open connections: %d)",
                        logsafe.safe(exc or message),
                        self.open_connections,
                    )
                return
            if previous is not None:
                previous(loop, context)
            else:
                loop.default_exception_handler(context)

        loop.set_exception_handler(handler)

    # --- small endpoints -----------------------------------------------------------

    def answer_small(
        self, route: Route, head: RequestHead, body: bytes | None
    ) -> tuple[int, str, bytes]:
        if route is Route.HEALTH:
            if self.draining:
                return 503, "text/plain; charset=utf-8", b"draining\n"
            return 200, "text/plain; charset=utf-8", b"ok\n"
        if route is Route.METRICS:
            content_type, text = render_metrics(self._metrics_registry, head.header("accept"))
            return 200, content_type, text
        assert route is Route.MINT and body is not None
        return self.mint(body, head)

    # --- what /metrics reads (metrics.MetricsSource) -------------------------------

    @property
    def metrics(self) -> Metrics:
        return self.registry.metrics

    @property
    def active_count(self) -> int:
        return self.registry.active_count

    @property
    def waiting_count(self) -> int:
        return self.registry.waiting_count

    def check_mint(self, head: RequestHead) -> None:
        """Mint preconditions checked on the head alone, before any body."""
        secret = self.config.shared_secret
        if secret is None:
            raise MintDisabled("relay minting disabled (no shared secret configured)")
        mint.check_secret(head.header("authorization"), secret)
        if self.draining:
            raise MintDisabled(ShuttingDown().message)
        if self.registry.waiting_count >= self.config.max_pending:
            raise MintDisabled("relay: too many pending relays")

    def mint(self, body: bytes, head: RequestHead | None = None) -> tuple[int, str, bytes]:
        request = mint.parse_mint_request(body, max_ttl_s=self.config.max_ttl_s)
        relay = self.registry.create(
            request.workspace_id,
            request.source_exe_id,
            request.dest_exe_id,
            ttl=float(request.ttl_seconds) if request.ttl_seconds > 0 else None,
            max_bytes=request.max_bytes,
        )
        expires = relay.expires_at.isoformat(timespec="microseconds").replace("+00:00", "Z")
        base = self.config.base_url(
            self.port, tls=self.ssl is not None, request_host=head.header("host") if head else None
        )
        return 201, "application/json", mint.mint_response_body(relay.ticket, base, expires)


_ACCEPT_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


async def start_server(
    registry: Registry | None = None,
    host: str = "127.0.0.1",
    port: int = 8080,
    *,
    ssl: ssl_module.SSLContext | None = None,
    shared_secret: str | None = None,
    public_url: str | None = None,
    idle_timeout: float | None = None,
    config: RelayConfig | None = None,
) -> RelayServer:
    """Start serving ``registry`` on the running loop; returns the server.

    Keyword arguments override the matching fields of ``config``.
    """
    base = config or RelayConfig()
    changes: dict[str, object] = {"host": host, "port": port}
    if shared_secret is not None:
        changes["shared_secret"] = shared_secret
    if public_url is not None:
        changes["public_url"] = public_url
    if idle_timeout is not None:
        changes["idle_timeout_s"] = idle_timeout
    cfg = dataclasses.replace(base, **changes)  # type: ignore[arg-type]
    server = RelayServer(cfg, registry, ssl)
    await server.start()
    return server
