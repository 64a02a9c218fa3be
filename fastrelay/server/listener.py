"""The composition root: listener, shared state, lifecycle.

`RelayServer` holds what every connection shares (config, registry, the one
timer, the buffer pool and scratch buffer, the open-connection set, the
bytes held for waiting uploads) and the few decisions that need all of it:
admitting connections (``--max-connections``), answering the mint, health
and metrics endpoints, and a graceful close. Pairing is not here: the
connection that completes a pair builds the transfer (connection.py).

Plain listeners are the loop's (``loop.create_server``): a plain connection
is ours from ``connection_made``, where `connection_opened` aborts one over
``--max-connections`` at once, and the loop's accept costs less than ours.

On a TLS port the accept path is ours: the listening sockets are
non-blocking and watched with ``loop.add_reader``; each readiness callback
accepts a batch and decides, per socket, before the loop knows of it:

1. over ``--max-connections`` (or no longer accepting): close it at once, so
   its descriptor is free again now and ``refused_connections`` counts it;
2. wait for its first byte (watched with ``add_reader``, bounded by
   ``--header-timeout`` from accept). ``0x16`` opens a TLS handshake record:
   hand it over with what is left of the timeout as the handshake's bound.
   Anything else is plain HTTP sent to the HTTPS port: a short ``400`` and
   close, as nginx does. A client that leaves before its first byte is
   closed and uncounted as soon as we see its EOF.

Why: handed to the loop at accept, a TLS connection is out of our hands
until its handshake completes (a protocol cannot close a transport it has
not been given), and the loop tells nobody when a handshake fails. Clients
that opened TCP and never sent a ClientHello then held one descriptor each
until the handshake timeout, however many over the limit, and the count of
handshakes could only be released by a timer after it. Now a connection is
counted from accept to close exactly: waiting for its first byte here
(`_Admission`), handshaking in the loop (``handshaking``, released when
``connect_accepted_socket`` returns or fails) or open (``connections``).
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
from collections.abc import Awaitable, Sequence
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
from ..core.pacing import lowest
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

_AddrInfo = tuple[socket.AddressFamily, socket.SocketKind, int, str, Any]
"""One ``getaddrinfo`` row."""

# One server-wide buffer for request heads and small bodies; bytes are copied
# out of it in the same callback (see connection.py). 64 KiB is libuv's read
# size hint.
SCRATCH_BYTES = 64 * 1024

# At most one "cannot accept" log line per this many seconds (EMFILE storms).
ACCEPT_ERROR_LOG_INTERVAL_S = 10.0

# Connections accepted per readiness callback of a listening socket: a burst
# is taken in a few callbacks, and a connect flood cannot hold the loop away
# from transfers already running for long.
ACCEPT_BATCH = 64

# Out of descriptors (or kernel memory) at accept: the listening socket stays
# readable, so retrying at once would spin the loop. Stop watching it this
# long; connections that close meanwhile free descriptors.
ACCEPT_RETRY_S = 0.1

# The kernel's queue of connections not yet accepted (listen(2) backlog).
LISTEN_BACKLOG = 1024

# The first byte of every TLS connection: a handshake record's content type.
TLS_HANDSHAKE_RECORD = 0x16

# Plain HTTP on the TLS port: a short 400 that says why, as nginx does.
_PLAIN_HTTP_BODY = b"400 Bad Request: a plain HTTP request was sent to the HTTPS port\n"
PLAIN_HTTP_ON_TLS_ANSWER = (
    b"HTTP/1.1 400 Bad Request\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: %d\r\n"
    b"Connection: close\r\n"
    b"\r\n" % len(_PLAIN_HTTP_BODY)
) + _PLAIN_HTTP_BODY

# Read (and dropped) per callback while a refused plain-HTTP request lingers.
_LINGER_READ_BYTES = 64 * 1024


class _Admission:
    """An accepted TLS socket that is still ours: waiting for its first byte
    (the loop has not been given it yet), or answered 400 (plain HTTP) and
    lingering until the client has read it."""

    __slots__ = ("accepted_at", "deadline", "fd", "lingering", "sock")

    def __init__(self, sock: socket.socket, accepted_at: float) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.accepted_at = accepted_at
        self.deadline: Deadline | None = None
        self.lingering = False


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
        registry.pacing.configure(config.max_rate, config.workspace_rate)
        self.timer: LoopTimer = self.registry.timer
        if ssl is None and config.tls:
            assert config.certfile is not None and config.keyfile is not None
            ssl = server_ssl_context(config.certfile, config.keyfile)
        self.ssl = ssl
        self.pool = BufferPool(config.read_buffer_bytes)
        self.scratch = memoryview(bytearray(SCRATCH_BYTES))
        self.connections: set[HttpConnection] = set()
        self.handshaking: set[HttpConnection] = set()
        """Connections handed to the loop whose ``connection_made`` has not
        come yet (TLS: the handshake is under way)."""
        self._admitting: dict[int, _Admission] = {}
        """TLS sockets accepted and not handed over yet, by descriptor."""
        self._handovers: set[asyncio.Future[Any]] = set()
        """``connect_accepted_socket`` calls under way (held: the loop keeps
        only weak references to tasks)."""
        self._listeners: list[socket.socket] = []
        """TLS listening sockets, accepted from by `_accept_ready`."""
        self._plain_servers: list[asyncio.AbstractServer] = []
        """Plain listeners: the loop accepts (`_plain_connection`)."""
        self._accept_retry: asyncio.TimerHandle | None = None
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
        self._loop: asyncio.AbstractEventLoop | None = None
        self.shared: RedisLedger | None = None
        """The shared ledger this server attached to its registry (--redis-url)."""
        self.port = 0
        self.url = ""
        self.node_id = config.node_id or ""

    # --- lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        host, port = self.config.host or None, self.config.port
        stream, passive = socket.SOCK_STREAM, socket.AI_PASSIVE
        try:
            # An address (or none: every address) resolves without a lookup.
            infos: Sequence[_AddrInfo] = socket.getaddrinfo(
                host, port, type=stream, flags=passive | socket.AI_NUMERICHOST
            )
        except socket.gaierror:
            # A name: resolved off the loop, as loop.create_server does.
            infos = await loop.getaddrinfo(host, port, type=stream, flags=passive)
        listeners = _listening_sockets(infos, self.config.host, port)
        for sock in listeners:
            _keep_alive(sock, self.config.tcp_keepalive_s)
        sockname = listeners[0].getsockname()
        if self.ssl is None:
            # Plain: the loop's own accept (in C on uvloop) is ~15 us per
            # connection cheaper than ours (a Python accept and a handover
            # task: +11% CPU per small relay, measured with bench.load
            # small_fresh). A plain connection is in our hands from
            # connection_made, where `connection_opened` closes one over the
            # limit at once, so it needs nothing of our accept path.
            self._install_accept_error_log(loop)
            for sock in listeners:
                self._plain_servers.append(
                    await loop.create_server(
                        self._plain_connection, sock=sock, backlog=LISTEN_BACKLOG
                    )
                )
        else:
            self._listeners = listeners
            self._watch_listeners()
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
        """Close the listening sockets: new clients are refused by the kernel.
        Sockets already accepted go on (a handshake completing from now on
        is refused in `connection_opened`)."""
        self.accepting = False
        if self._accept_retry is not None:
            self._accept_retry.cancel()
            self._accept_retry = None
        loop = self._loop
        for sock in self._listeners:
            if loop is not None:
                loop.remove_reader(sock.fileno())
            sock.close()
        self._listeners = []
        for server in self._plain_servers:
            server.close()  # it owns its socket
        self._plain_servers = []

    def cut_drain(self) -> None:
        """Stop waiting in `drain`, grace and transfers alike (a second signal)."""
        self._drain_cut.set()

    async def close(self) -> None:
        """Stop listening, fail waiting sides with 503, close every connection."""
        self.draining = True
        self._stop_accepting()
        self.registry.shutdown_waiting()
        for entry in list(self._admitting.values()):
            self._forget_admission(entry)
            entry.sock.close()
        for conn in list(self.connections):
            conn.shut_down()
        for conn in list(self.connections):
            if not conn.transport.is_closing():
                conn.transport.abort()
        # Handshakes under way: cancelling connect_accepted_socket closes
        # the transport it made (both loops).
        handovers = list(self._handovers)
        for fut in handovers:
            fut.cancel()
        if handovers:
            await asyncio.gather(*handovers, return_exceptions=True)
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

    # --- the accept path (see the module docstring) ---------------------------------

    def _watch_listeners(self) -> None:
        self._accept_retry = None
        loop = self._loop
        assert loop is not None
        for sock in self._listeners:
            loop.add_reader(sock.fileno(), self._accept_ready, sock)

    def _accept_ready(self, listener: socket.socket) -> None:
        """A listening socket is readable: accept what is queued, a batch at most."""
        for _ in range(ACCEPT_BATCH):
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return  # the queue is empty
            except OSError as exc:
                if exc.errno in _ACCEPT_ERRNOS:
                    self._accept_exhausted(exc)
                    return
                if exc.errno in _ACCEPT_GONE_ERRNOS:
                    continue  # that client left before we took it: take the next
                self._log_accept_error(exc)
                return
            self._admit(sock)

    def _admit(self, sock: socket.socket) -> None:
        # The one place --max-connections is enforced: before the loop or
        # a handshake holds the socket, so closing it frees its descriptor
        # now, TLS or not.
        if not self.accepting or self.open_connections >= self.config.max_connections:
            self.refused_connections += 1
            sock.close()
            return
        sock.setblocking(False)
        loop = self._loop
        assert loop is not None
        entry = _Admission(sock, self.timer.clock())
        entry.deadline = self.timer.after(
            self.config.header_timeout_s, functools.partial(self._admission_expired, entry)
        )
        self._admitting[entry.fd] = entry
        loop.add_reader(entry.fd, self._first_byte, entry)

    def _first_byte(self, entry: _Admission) -> None:
        """A TLS socket we hold is readable: what does its client speak?"""
        if entry.lingering:
            self._linger_read(entry)
            return
        try:
            # Peeked, not read: a handshake record stays for the TLS layer.
            first = entry.sock.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            first = b""  # reset by the client
        if first and first[0] == TLS_HANDSHAKE_RECORD:
            self._forget_admission(entry)
            # The handshake gets what is left of the header timeout: the
            # whole wait for a request head stays bounded by it from accept.
            elapsed = self.timer.clock() - entry.accepted_at
            left = max(self.config.header_timeout_s - elapsed, 0.001)
            self._hand_over(entry.sock, left)
        elif first:
            self._answer_plain_http(entry)
        else:
            # Gone before any byte: counted as a failed handshake, as the
            # loop's TLS layer would have; its descriptor is free now.
            self._forget_admission(entry)
            entry.sock.close()
            self.failed_handshakes += 1

    def _answer_plain_http(self, entry: _Admission) -> None:
        """Plain HTTP on the TLS port: a 400 that says so, then a lingering
        close (read and drop until the client closes, at most ``linger_s``):
        closing a socket with unread input sends a reset, which may destroy
        the answer before the client reads it."""
        self.failed_handshakes += 1
        entry.lingering = True
        sock = entry.sock
        with contextlib.suppress(OSError):
            # Drop what the request sent so far first; the answer is far
            # smaller than an empty send buffer, so one send takes it whole.
            sock.recv(_LINGER_READ_BYTES)
            sock.send(PLAIN_HTTP_ON_TLS_ANSWER)
            sock.shutdown(socket.SHUT_WR)
        if entry.deadline is not None:
            entry.deadline.cancel()
        entry.deadline = self.timer.after(
            self.config.linger_s, functools.partial(self._admission_expired, entry)
        )

    def _linger_read(self, entry: _Admission) -> None:
        try:
            data = entry.sock.recv(_LINGER_READ_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # the client closed: so do we
            self._forget_admission(entry)
            entry.sock.close()

    def _admission_expired(self, entry: _Admission) -> None:
        """No first byte within the header timeout (a failed handshake, as the
        loop would count it), or the lingering close of a 400 is over."""
        if self._admitting.get(entry.fd) is not entry:
            return
        if not entry.lingering:
            self.failed_handshakes += 1
        entry.deadline = None
        self._forget_admission(entry)
        entry.sock.close()

    def _forget_admission(self, entry: _Admission) -> None:
        """Stop holding ``entry``: uncount it, unwatch it, cancel its timer.
        The socket is left open: closed, or handed to the loop, by the caller."""
        if self._admitting.pop(entry.fd, None) is None:
            return
        if entry.deadline is not None:
            entry.deadline.cancel()
            entry.deadline = None
        if self._loop is not None:
            # Before the socket is closed (the descriptor number may be
            # reused at once) or the loop's transport watches it itself.
            self._loop.remove_reader(entry.fd)

    def _hand_over(self, sock: socket.socket, handshake_timeout_s: float | None) -> None:
        """Give an accepted socket to the loop; counted in ``handshaking`` until
        its ``connection_made`` (`connection_opened`) or its failure."""
        loop = self._loop
        assert loop is not None
        conn = HttpConnection(self)
        self.handshaking.add(conn)
        # Read at each handover: after a SIGHUP reload (which loads the new
        # certificate into this same context) new handshakes use it.
        fut = loop.create_task(
            loop.connect_accepted_socket(
                lambda: conn, sock, ssl=self.ssl, ssl_handshake_timeout=handshake_timeout_s
            )
        )
        self._handovers.add(fut)
        fut.add_done_callback(functools.partial(self._handed_over, conn))

    def _handed_over(self, conn: HttpConnection, fut: asyncio.Future[Any]) -> None:
        self._handovers.discard(fut)
        if not fut.cancelled():
            fut.exception()  # retrieved: a failed handshake is no loop error
        if conn in self.handshaking:
            # The loop gave up (the handshake failed, timed out, or the
            # client left) before connection_made; it has closed the socket.
            self.handshaking.discard(conn)
            if self.ssl is not None:
                self.failed_handshakes += 1

    def _install_accept_error_log(self, loop: asyncio.AbstractEventLoop) -> None:
        """Plain listeners: the loop accepts, and reports running out of
        descriptors (EMFILE) through its exception handler: one log line per
        interval there too, not a traceback per attempt."""
        previous = loop.get_exception_handler()

        def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
            exc = context.get("exception")
            message = str(context.get("message", ""))
            if "accept" in message or (isinstance(exc, OSError) and exc.errno in _ACCEPT_ERRNOS):
                self._log_accept_error(exc if isinstance(exc, OSError) else OSError(message))
                return
            if previous is not None:
                previous(loop, context)
            else:
                loop.default_exception_handler(context)

        loop.set_exception_handler(handler)

    def _accept_exhausted(self, exc: OSError) -> None:
        """Out of descriptors or memory at accept: one log line per interval,
        not one per attempt; stop watching the listeners for a moment so the
        loop does not spin on them, and serve open connections on."""
        self._log_accept_error(exc)
        loop = self._loop
        if loop is None or self._accept_retry is not None or not self.accepting:
            return
        for sock in self._listeners:
            loop.remove_reader(sock.fileno())
        self._accept_retry = loop.call_later(ACCEPT_RETRY_S, self._watch_listeners)

    def _log_accept_error(self, exc: OSError) -> None:
        now = time.monotonic()
        if now - self._accept_error_logged_at >= ACCEPT_ERROR_LOG_INTERVAL_S:
            self._accept_error_logged_at = now
            log.error(
                "cannot accept connections: %s (open connections: %d)",
                logsafe.safe(exc),
                self.open_connections,
            )

    # --- connections ---------------------------------------------------------------

    @property
    def open_connections(self) -> int:
        """Connections counted against ``max_connections``: from accept to close."""
        return len(self.connections) + len(self.handshaking) + len(self._admitting)

    def _plain_connection(self) -> HttpConnection:
        """The protocol factory of plain listeners (the loop accepted)."""
        return HttpConnection(self)

    def connection_opened(self, conn: HttpConnection) -> bool:
        # A TLS connection was admitted at accept (`_admit`), within
        # --max-connections: here it only moves from handshaking to open. A
        # plain one is counted here, where it is refused (aborted, so its
        # descriptor is free at once) over the limit. Either is refused once
        # the listener closed (drain).
        admitted = conn in self.handshaking
        self.handshaking.discard(conn)
        over = not admitted and self.open_connections >= self.config.max_connections
        if not self.accepting or over:
            self.refused_connections += 1
            return False
        self.connections.add(conn)
        return True

    def connection_closed(self, conn: HttpConnection) -> None:
        self.connections.discard(conn)

    def hold_waiting_bytes(self, delta: int) -> bool:
        self.waiting_body_bytes += delta
        return self.waiting_body_bytes <= self.config.max_waiting_body_total

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
        config = self.config
        request = mint.parse_mint_request(
            body, max_ttl_s=config.max_ttl_s, max_receivers=config.max_receivers
        )
        ttl = float(request.ttl_seconds) if request.ttl_seconds > 0 else None
        args = (request.workspace_id, request.source_exe_id, request.dest_exe_id, ttl)
        host = head.header("host") if head else None
        if self.registry.shared is None:
            minted = self.registry.mint_now(
                *args, request.max_bytes, **self._relay_options(request)
            )
            return self._mint_answer(minted, request, host)
        return self._mint_later(args, request, host)

    def _relay_options(self, request: mint.MintRequest) -> dict[str, Any]:
        """The relay's v2 options; its rate is lowered to --max-rate (0 there
        too: unlimited), and that is what the ticket carries and the answer says."""
        options = request.options
        return {
            "resumable": options.resumable,
            "receivers": options.receivers,
            "max_rate": lowest(options.max_rate, self.config.max_rate),
        }

    async def _mint_later(
        self, args: tuple[str, str, str, float | None], request: mint.MintRequest, host: str | None
    ) -> Answer:
        minted = await self.registry.mint(*args, request.max_bytes, **self._relay_options(request))
        return self._mint_answer(minted, request, host)

    def _mint_answer(
        self, minted: Minted, request: mint.MintRequest, request_host: str | None
    ) -> Answer:
        self.metrics.minted()  # fastrelay_mints_total{outcome="created"}
        expires = minted.expires_at.isoformat(timespec="microseconds").replace("+00:00", "Z")
        base = self.config.base_url(self.port, tls=self.ssl is not None, request_host=request_host)
        echoed = request.echoed(lowest(request.options.max_rate, self.config.max_rate))
        body = mint.mint_response_body(minted.ticket, base, expires, echoed)
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
# accept(2) failures that concern only the connection being taken (Linux
# passes on the new socket's pending network errors): skip it, take the next.
_ACCEPT_GONE_ERRNOS = frozenset(
    {
        errno.ECONNABORTED,
        errno.EPROTO,
        errno.EPERM,
        errno.ENETDOWN,
        errno.ENOPROTOOPT,
        errno.EHOSTDOWN,
        errno.ENONET,
        errno.EHOSTUNREACH,
        errno.EOPNOTSUPP,
        errno.ENETUNREACH,
    }
)


def _listening_sockets(infos: Sequence[_AddrInfo], host: str, port: int) -> list[socket.socket]:
    """Bound, listening, non-blocking sockets, one per address of ``infos``
    (``host``:``port`` resolved), made as ``loop.create_server`` makes them:
    an empty host is every address, IPv6 sockets are IPv6 only. With port 0
    the first socket's port is used for the others, so the server has one
    port. Raises `OSError` (nothing left open) if any cannot be bound."""
    seen: set[tuple[int, Any]] = set()
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, addr in infos:
            if (family, addr) in seen:
                continue
            seen.add((family, addr))
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and len(sockets) > 1:
                addr = (addr[0], sockets[0].getsockname()[1], *addr[2:])
            sock.bind(addr)
            sock.listen(LISTEN_BACKLOG)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    if not sockets:
        raise OSError(errno.EADDRNOTAVAIL, f"{host} resolves to no address")
    return sockets


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
