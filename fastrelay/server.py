"""The composition root: listener, shared state, pairing, lifecycle.

`RelayServer` holds what every connection shares (config, registry, the
buffer pool and scratch buffer, the open-connection set) and the few
decisions that need all of it: building a `Splice` when a relay pairs,
answering the mint, health and metrics endpoints, and a graceful close.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import ssl as ssl_module
from typing import TYPE_CHECKING

from . import mint
from .config import RelayConfig
from .errors import MintDisabled, ShuttingDown
from .flow import BufferPool
from .heads import RequestHead
from .protocol import HttpConnection, Phase
from .registry import Party, Registry
from .splice import Splice
from .tls import server_ssl_context

if TYPE_CHECKING:
    from .registry import Relay

log = logging.getLogger("fastrelay")

# One server-wide buffer for request heads and small bodies; bytes are copied
# out of it in the same callback (see protocol.py). 64 KiB is libuv's read
# size hint.
SCRATCH_BYTES = 64 * 1024


class RelayServer:
    def __init__(
        self,
        config: RelayConfig,
        registry: Registry | None = None,
        ssl: ssl_module.SSLContext | None = None,
    ) -> None:
        self.config = config
        self.registry = registry or Registry(config.max_per_workspace, config.ticket_ttl_s)
        self.registry.pair_handler = self._pair
        if ssl is None and config.tls:
            assert config.certfile is not None and config.keyfile is not None
            ssl = server_ssl_context(config.certfile, config.keyfile)
        self.ssl = ssl
        self.pool = BufferPool(config.read_buffer_bytes)
        self.scratch = memoryview(bytearray(SCRATCH_BYTES))
        self.connections: set[HttpConnection] = set()
        self.draining = False
        self.refused_connections = 0
        self.failed_handshakes = 0
        self._drain_cut = False
        self._server: asyncio.Server | None = None
        self.port = 0
        self.url = ""

    # --- lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: HttpConnection(self),
            self.config.host,
            self.config.port,
            ssl=self.ssl,
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
            if conn.phase is Phase.UPLOAD and conn.splice is not None:
                conn.splice.shut_down()
        for conn in list(self.connections):
            if conn.phase is not Phase.CLOSED:
                conn.transport.abort()
        if self._server is not None:
            await self._server.wait_closed()
        await asyncio.sleep(0)  # let connection_lost callbacks run

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

    def connection_opened(self, conn: HttpConnection) -> bool:
        if self.draining or len(self.connections) >= self.config.max_connections:
            self.refused_connections += 1
            return False
        self.connections.add(conn)
        return True

    def connection_closed(self, conn: HttpConnection) -> None:
        self.connections.discard(conn)

    def _pair(self, relay: Relay, put: Party, get: Party) -> None:
        """Both sides are here: hand the sockets to a splice."""
        assert isinstance(put, HttpConnection) and isinstance(get, HttpConnection)
        config = self.config
        splice = Splice(
            relay,
            put,
            get,
            self.pool,
            config.idle_timeout_s,
            (config.tls_write_high_bytes, config.tls_write_low_bytes),
            config.kernel_splice_min_bytes,
        )
        put.phase = Phase.UPLOAD
        get.phase = Phase.DOWNLOAD
        put.splice = get.splice = splice
        put.relay = get.relay = None
        prefix = bytes(put.inbuf)
        put.inbuf = bytearray()
        get.inbuf = bytearray()
        splice.start(prefix)

    # --- small endpoints -----------------------------------------------------------

    def health(self) -> tuple[int, str, bytes]:
        if self.draining:
            return 503, "text/plain; charset=utf-8", b"draining\n"
        return 200, "text/plain; charset=utf-8", b"ok\n"

    def metrics_text(self) -> tuple[int, str, bytes]:
        registry = self.registry
        body = registry.metrics.render(
            registry.active_count, registry.waiting_count, len(self.connections)
        )
        body += (
            "# HELP fastrelay_refused_connections_total Connections closed at once "
            "(--max-connections or draining).\n"
            "# TYPE fastrelay_refused_connections_total counter\n"
            f"fastrelay_refused_connections_total {self.refused_connections}\n"
            "# HELP fastrelay_tls_handshake_failures_total TLS handshakes that failed.\n"
            "# TYPE fastrelay_tls_handshake_failures_total counter\n"
            f"fastrelay_tls_handshake_failures_total {self.failed_handshakes}\n"
        ).encode()
        return 200, "text/plain; version=0.0.4; charset=utf-8", body

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

    def mint(self, body: bytes) -> tuple[int, bytes]:
        request = mint.parse_mint_request(body, max_ttl_s=self.config.max_ttl_s)
        relay = self.registry.create(
            request.workspace_id,
            request.source_exe_id,
            request.dest_exe_id,
            ttl=float(request.ttl_seconds) if request.ttl_seconds > 0 else None,
            max_bytes=request.max_bytes,
        )
        expires = relay.expires_at.isoformat(timespec="microseconds").replace("+00:00", "Z")
        return 201, mint.mint_response_body(relay.ticket, self.base_url, expires)


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
