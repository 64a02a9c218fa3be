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
import contextlib
import dataclasses
import errno
import functools
import logging
import socket
import ssl as ssl_module
import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

from ..cluster.keyfile import read_ticket_keys
from ..cluster.ledger import TOO_MANY_PENDING
from ..cluster.signed_tickets import KeyFileError
from ..core import logsafe, mint
from ..core.config import RelayConfig
from ..core.deadlines import Deadline
from ..core.errors import MintDisabled, ShuttingDown
from ..core.heads import RequestHead, Route
from ..core.observe import Metrics
from ..core.phases import Phase
from .connection import Answer, HttpConnection
from .flow import BufferPool
from .metrics import make_registry, render_metrics
from .registry import Minted, Registry
from .timer import LoopTimer
from .tls import server_ssl_context

if TYPE_CHECKING:
    from ..cluster.redis_ledger import RedisLedger

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
        if registry is None:
            registry = Registry(
                config.max_per_workspace,
                config.ticket_ttl_s,
                max_pending=config.max_pending,
                max_resumes=config.max_resumes,
                keys=read_ticket_keys(config.ticket_key_file) if config.ticket_key_file else None,
            )
        elif config.ticket_key_file:
            registry.keys = read_ticket_keys(config.ticket_key_file)
        self.registry = registry
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
        """Set at drain: /healthz and mint answer 503, answers close their connection."""
        self.accepting = True
        """Cleared when the listener closes: a connection accepted after that
        (already in the backlog) is closed at once."""
        self.refused_connections = 0
        self.failed_handshakes = 0
        self._accept_error_logged_at = -ACCEPT_ERROR_LOG_INTERVAL_S
        self._metrics_registry = make_registry(self)
        self._drain_cut = asyncio.Event()
        self._server: asyncio.Server | None = None
        self.shared: RedisLedger | None = None
        """The shared ledger this server attached to its registry (--redis-url)."""
        self.port = 0
        self.url = ""
        self.node_id = config.node_id or ""

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
        for sock in self._server.sockets:
            _keep_alive(sock, self.config.tcp_keepalive_s)
        sockname = self._server.sockets[0].getsockname()
        self.port = int(sockname[1])
        scheme = "https" if self.ssl is not None else "http"
        host = self.config.host
        shown = f"[{host}]" if ":" in host else host
        self.url = f"{scheme}://{shown}:{self.port}"
        self.node_id = self.config.node_id or f"{socket.gethostname()}:{self.port}"
        if self.config.redis_url:
            # Imported here: redis-py costs ~0.1 s of start-up to every node
            # that does not use it.
            from ..cluster.redis_ledger import RedisLedger

            self.shared = RedisLedger(
                self.config.redis_url,
                node_id=self.node_id,
                max_per_workspace=self.config.max_per_workspace,
                max_pending=self.config.max_pending,
                lease_s=self.config.cluster_lease_s,
                timeout_s=self.config.redis_timeout_s,
            )
            self.registry.attach(self.shared)

    @property
    def base_url(self) -> str:
        """Base of the URLs handed out at mint (``--public-url`` or derived)."""
        return self.config.base_url(self.port, tls=self.ssl is not None)

    async def drain(self, timeout_s: float, grace_s: float = 0.0) -> None:
        """Leave gracefully: /healthz and mint answer 503 at once and idle
        connections close; for ``grace_s`` relay requests are still served
        (a load balancer's health checks take the node out meanwhile, so no
        request finds its port closed); then stop accepting, fail waiting
        sides (503) and let paired transfers finish, for up to ``timeout_s``."""
        self.draining = True
        for conn in list(self.connections):
            conn.drain()
        if grace_s > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drain_cut.wait(), grace_s)
        self._stop_accepting()
        self.registry.shutdown_waiting()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        cut = self._drain_cut
        while self.registry.active_count and loop.time() < deadline and not cut.is_set():
            await asyncio.sleep(0.05)

    def _stop_accepting(self) -> None:
        self.accepting = False
        if self._server is not None:
            self._server.close()

    def cut_drain(self) -> None:
        """Stop waiting in `drain`, grace and transfers alike (a second signal)."""
        self._drain_cut.set()

    async def close(self) -> None:
        """Stop listening, fail waiting sides with 503, close every connection."""
        self.draining = True
        self._stop_accepting()
        self.registry.shutdown_waiting()
        for conn in list(self.connections):
            conn.shut_down()
        for conn in list(self.connections):
            if not conn.transport.is_closing():
                conn.transport.abort()
        if self._server is not None:
            await self._server.wait_closed()
        await asyncio.sleep(0)  # let connection_lost callbacks run
        shared = self.registry.detach()
        if shared is not None:
            await shared.close()
        self.timer.close()

    def reload(self) -> None:
        """SIGHUP: reload the TLS certificate and the ticket keys from their files."""
        self.reload_tls()
        self.reload_ticket_keys()

    def reload_ticket_keys(self) -> bool:
        """Re-read ``--ticket-key-file``: its first key signs from now on,
        all verify. A bad file leaves the keys in force untouched."""
        path = self.config.ticket_key_file
        if path is None:
            return False
        try:
            keys = read_ticket_keys(path)
        except KeyFileError as exc:
            log.error("ticket key reload failed, keeping the old keys: %s", exc)
            return False
        self.registry.keys = keys
        log.info("ticket keys reloaded from %s (%d key(s))", path, len(keys))
        return True

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
        if not self.accepting or self.open_connections >= self.config.max_connections:
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

    def answer_small(self, route: Route, head: RequestHead) -> Answer:
        if route is Route.HEALTH:
            if self.draining:
                return 503, "text/plain; charset=utf-8", b"draining\n"
            return 200, "text/plain; charset=utf-8", b"ok\n"
        assert route is Route.METRICS
        content_type, text = render_metrics(self._metrics_registry, head.header("accept"))
        return 200, content_type, text

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

    @property
    def waiting_sides(self) -> int:
        # Read at scrape time only: one pass over the open connections.
        return sum(1 for conn in self.connections if conn.phase is Phase.WAITING)

    @property
    def cluster_health(self) -> tuple[bool, int] | None:
        shared = self.shared
        return None if shared is None else (shared.up, shared.errors)

    # --- the mint endpoint ---------------------------------------------------------

    def check_mint(self, head: RequestHead) -> None:
        """Mint preconditions checked on the head alone, before any body."""
        secret = self.config.shared_secret
        if secret is None:
            raise MintDisabled("relay minting disabled (no shared secret configured)")
        mint.check_secret(head.header("authorization"), secret)
        if self.draining:
            raise MintDisabled(ShuttingDown().message)
        # The local count; with a shared ledger the cluster's is checked at reserve.
        if self.registry.pending_count() >= self.config.max_pending:
            raise MintDisabled(TOO_MANY_PENDING)

    def answer_mint(self, head: RequestHead | None, body: bytes) -> Answer | Awaitable[Answer]:
        """The mint's answer; with a shared ledger, a coroutine that reserves
        the slot first."""
        request = mint.parse_mint_request(body, max_ttl_s=self.config.max_ttl_s)
        ttl = float(request.ttl_seconds) if request.ttl_seconds > 0 else None
        args = (request.workspace_id, request.source_exe_id, request.dest_exe_id, ttl)
        host = head.header("host") if head else None
        if self.registry.shared is None:
            minted = self.registry.mint_now(*args, request.max_bytes, resumable=request.resumable)
            return self._mint_answer(minted, request, host)
        return self._mint_later(args, request, host)

    async def _mint_later(
        self, args: tuple[str, str, str, float | None], request: mint.MintRequest, host: str | None
    ) -> Answer:
        minted = await self.registry.mint(*args, request.max_bytes, resumable=request.resumable)
        return self._mint_answer(minted, request, host)

    def _mint_answer(
        self, minted: Minted, request: mint.MintRequest, request_host: str | None
    ) -> Answer:
        expires = minted.expires_at.isoformat(timespec="microseconds").replace("+00:00", "Z")
        base = self.config.base_url(self.port, tls=self.ssl is not None, request_host=request_host)
        body = mint.mint_response_body(minted.ticket, base, expires, request.echoed())
        return 201, "application/json", body


def _keep_alive(listener: Any, idle_s: int) -> None:
    """TCP keepalive on a listening socket. Linux copies these options into
    every socket accepted from it, which saves three setsockopt calls per
    connection (measured: ~10% of a small relay's server CPU with the
    per-connection get_extra_info("socket") they need)."""
    with contextlib.suppress(OSError, AttributeError):
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle_s)
        listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, idle_s)


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
