"""One client connection: read a request head, dispatch, then hand over.

`HttpConnection` is the asyncio shell around the core: it owns the
connection's phase, finds and parses request heads (`heads.py`), answers the
small endpoints itself, and for ``/relay/{ticket}`` claims a side of the
relay. Once both sides are present the server builds a `Splice`, and from
then on this object only forwards transport callbacks to it.

Receive buffers (see `get_buffer`): until a connection is an upload, every
read lands in one server-wide scratch buffer and `buffer_updated` copies what
arrived into the connection's small ``inbuf``. That is safe because asyncio
and uvloop always call ``get_buffer`` and ``buffer_updated`` back to back on
the loop thread, and no view of the scratch buffer ever outlives the call.
An upload's reads go into pooled buffers that the splice owns.

Errors: every `RelayError` raised while handling a request is caught in
`_advance` and written by `_reject`, the one place that turns errors into
responses.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import socket
from typing import TYPE_CHECKING, cast

from .chunked import ChunkedDecoder, ChunkError
from .errors import (
    BadRequest,
    MintBodyTooLarge,
    RelayError,
    RequestTimeout,
    TicketNotFound,
    Unauthorized,
)
from .flow import ReadGate
from .heads import (
    CONTINUE_100,
    RequestHead,
    Route,
    error_response,
    find_head_end,
    parse_head,
    route,
    simple_response,
)
from .tickets import extract_bearer_ticket

if TYPE_CHECKING:
    from .registry import Relay
    from .server import RelayServer
    from .splice import Splice

# Body bytes a waiting PUT may send before we stop reading it. curl waits
# for "100 Continue" (sent at pairing) for up to 1 s and then sends anyway;
# what arrives meanwhile is kept here and forwarded at pairing, and past this
# much TCP backpressure holds the client.
WAITING_STASH_BYTES = 64 * 1024

# Plain (non-download) responses are small; these limits only matter for
# uvloop, whose default low-water mark is 16 bytes (runtime-facts §3).
_CONTROL_WRITE_HIGH = 64 * 1024
_CONTROL_WRITE_LOW = 16 * 1024


class Phase(enum.Enum):
    HEAD = "head"  # reading a request head
    MINT_BODY = "mint_body"  # reading a mint request's JSON body
    WAITING = "waiting"  # holds one side of a relay, partner not here yet
    UPLOAD = "upload"  # paired source: reads go to the splice
    DOWNLOAD = "download"  # paired destination: the splice writes to us
    LINGER = "linger"  # answered early; discarding the unread body before close
    CLOSED = "closed"


class HttpConnection(asyncio.BufferedProtocol):
    __slots__ = (
        "_head_timer",
        "_linger_timer",
        "_mint_body",
        "_mint_decoder",
        "gate",
        "head",
        "inbuf",
        "phase",
        "relay",
        "server",
        "splice",
        "transport",
    )

    transport: asyncio.Transport

    def __init__(self, server: RelayServer) -> None:
        self.server = server

    def __del__(self) -> None:
        # With TLS, asyncio builds this object at accept time but calls
        # connection_made only after the handshake. An object that dies
        # without ever being connected is a handshake that failed (or a
        # client that left mid-handshake): nothing else tells us.
        if not hasattr(self, "transport"):
            self.server.failed_handshakes += 1

    # --- asyncio callbacks ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        self.gate = ReadGate(transport)
        self.phase = Phase.HEAD
        self.inbuf = bytearray()
        self.head: RequestHead | None = None
        self.relay: Relay | None = None
        self.splice: Splice | None = None
        self._mint_body: bytearray | None = None
        self._mint_decoder: ChunkedDecoder | None = None
        self._linger_timer: asyncio.TimerHandle | None = None
        self._head_timer: asyncio.TimerHandle | None = None
        transport.set_write_buffer_limits(high=_CONTROL_WRITE_HIGH, low=_CONTROL_WRITE_LOW)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # Not a TCP socket (tests), or already gone: nothing to keep alive.
            with contextlib.suppress(OSError, TypeError, AttributeError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                keepalive_s = self.server.config.tcp_keepalive_s
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, keepalive_s)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, keepalive_s)
        if not self.server.connection_opened(self):
            self.phase = Phase.CLOSED
            transport.abort()
            return
        self._arm_head_timer()

    def get_buffer(self, sizehint: int) -> memoryview:
        # WARNING: never pause, close or abort in here (uvloop segfaults).
        if self.phase is Phase.UPLOAD:
            assert self.splice is not None
            return self.splice.upload_buffer()
        return self.server.scratch

    def buffer_updated(self, nbytes: int) -> None:
        phase = self.phase
        if phase is Phase.UPLOAD:
            assert self.splice is not None
            self.splice.upload_received(nbytes)
        elif phase in (Phase.HEAD, Phase.MINT_BODY, Phase.WAITING):
            self.inbuf += self.server.scratch[:nbytes]
            self._advance()
        # DOWNLOAD, LINGER: whatever the client sends now is discarded.

    def eof_received(self) -> bool | None:
        phase = self.phase
        if phase is Phase.UPLOAD:
            assert self.splice is not None
            self.splice.upload_eof()
            return True  # the splice has answered and closed
        if phase is Phase.DOWNLOAD:
            return True  # a half-closed receiver can still read
        if phase is Phase.WAITING and self.relay is not None:
            self.relay.detach(self)
            self.relay = None
        return None  # close

    def connection_lost(self, exc: Exception | None) -> None:
        phase = self.phase
        self.phase = Phase.CLOSED
        self._cancel_timers()
        self.server.connection_closed(self)
        splice, self.splice = self.splice, None
        if phase is Phase.WAITING and self.relay is not None:
            self.relay.detach(self)
        elif phase is Phase.UPLOAD and splice is not None:
            splice.upload_lost(exc)
        elif phase is Phase.DOWNLOAD and splice is not None:
            splice.download_lost(exc)
        self.relay = None

    def pause_writing(self) -> None:
        if self.phase is Phase.DOWNLOAD and self.splice is not None:
            self.splice.download_paused()

    def resume_writing(self) -> None:
        if self.phase is Phase.DOWNLOAD and self.splice is not None:
            self.splice.download_resumed()

    # --- request handling ----------------------------------------------------------

    def _advance(self) -> None:
        try:
            while True:
                phase = self.phase
                if phase is Phase.HEAD:
                    if not self._read_head():
                        return
                elif phase is Phase.MINT_BODY:
                    if not self._read_mint_body():
                        return
                elif phase is Phase.WAITING:
                    self._stash_while_waiting()
                    return
                else:
                    return
        except RelayError as err:
            self._reject(err)

    def _read_head(self) -> bool:
        """Parse and dispatch one head if it is all here. True to go on."""
        end = find_head_end(self.inbuf, self.server.config.max_head_bytes)
        if end is None:
            return False
        raw = bytes(self.inbuf[:end])
        del self.inbuf[:end]
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        head = self.head = parse_head(raw)
        kind, ticket = route(head)
        if kind is Route.RELAY_PUT or kind is Route.RELAY_GET:
            assert ticket is not None
            self._claim(kind, ticket, head)
        elif kind is Route.MINT:
            self._start_mint(head)
        elif kind is Route.HEALTH:
            self._respond_small(*self.server.health(), head)
        else:
            self._respond_small(*self.server.metrics_text(), head)
        return True

    def _claim(self, kind: Route, ticket: str, head: RequestHead) -> None:
        # Checks 1-3 of PROTOCOL.md, in order; check 4 (408) fires from the
        # registry's timer while we wait.
        if extract_bearer_ticket(head.header("authorization")) != ticket:
            raise Unauthorized()
        relay = self.server.registry.lookup(ticket)
        if relay is None:
            raise TicketNotFound()
        self.phase = Phase.WAITING
        self.relay = relay
        try:
            if kind is Route.RELAY_PUT:
                relay.attach_put(self)
            else:
                relay.attach_get(self)
        except RelayError:
            self.relay = None
            raise

    def _stash_while_waiting(self) -> None:
        assert self.head is not None
        if self.head.method == "GET":
            self.inbuf.clear()  # a GET has no body; ignore pipelined bytes
        elif len(self.inbuf) >= WAITING_STASH_BYTES:
            self.gate.pause()

    def _start_mint(self, head: RequestHead) -> None:
        server = self.server
        server.check_mint(head)
        if head.content_length is not None and (
            head.content_length > server.config.max_mint_body_bytes
        ):
            raise MintBodyTooLarge()
        self._mint_body = bytearray()
        self._mint_decoder = ChunkedDecoder() if head.chunked else None
        self.phase = Phase.MINT_BODY
        self._arm_head_timer()  # a slow-dripped body is no better than a slow head
        if head.expect_continue:
            self.transport.write(CONTINUE_100)

    def _read_mint_body(self) -> bool:
        head, body, inbuf = self.head, self._mint_body, self.inbuf
        assert head is not None and body is not None
        decoder = self._mint_decoder
        if decoder is None:
            need = head.content_length or 0
            if len(inbuf) < need:
                return False
            body += inbuf[:need]
            del inbuf[:need]
        else:
            try:
                runs, consumed = decoder.feed(inbuf)
            except ChunkError as exc:
                raise BadRequest(str(exc)) from None
            for start, end in runs:
                body += inbuf[start:end]
            del inbuf[:consumed]
            if len(body) > self.server.config.max_mint_body_bytes:
                raise MintBodyTooLarge()
            if not decoder.done:
                return False
        self._mint_body = self._mint_decoder = None
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        status, payload = self.server.mint(bytes(body))
        self._respond_small(status, "application/json", payload, head, body_read=True)
        return True

    def _respond_small(
        self,
        status: int,
        content_type: str,
        body: bytes,
        head: RequestHead,
        *,
        body_read: bool = False,
    ) -> None:
        """Answer a small request; keep the connection if HTTP allows it."""
        keep = head.keep_alive and (body_read or not head.has_body) and not self.server.draining
        self.transport.write(simple_response(status, content_type, body, close=not keep))
        if keep:
            self.phase = Phase.HEAD
            self.head = None
            self._arm_head_timer()
        else:
            self._close(body_read=body_read or not head.has_body)

    # --- endings -------------------------------------------------------------------

    def reject(self, err: RelayError) -> None:
        """`registry.Party`: the relay ended while we waited for a partner."""
        self.relay = None
        self._reject(err)

    def _reject(self, err: RelayError) -> None:
        """The one place where a `RelayError` becomes a response."""
        if self.phase in (Phase.CLOSED, Phase.LINGER) or self.transport.is_closing():
            return
        head = self.head
        body_read = head is None or not head.has_body
        self.transport.write(error_response(err, close=True))
        self._close(body_read=body_read)

    def finish_upload(self, response: bytes, *, body_read: bool) -> None:
        """The splice is done with this source: answer it and close."""
        if self.phase is Phase.CLOSED or self.transport.is_closing():
            return
        self.splice = None
        self.transport.write(response)
        self._close(body_read=body_read)

    def finish_download(self) -> None:
        """The body is complete: flush and close."""
        self.splice = None
        self.phase = Phase.CLOSED
        self.transport.close()

    def abort_download(self) -> None:
        """The transfer failed: reset, so the receiver can never see a whole body."""
        self.splice = None
        self.phase = Phase.CLOSED
        self.transport.abort()

    def _close(self, *, body_read: bool) -> None:
        self._cancel_timers()
        if body_read:
            self.phase = Phase.CLOSED
            self.transport.close()
            return
        # Lingering close: the client may still be sending a body we will
        # never read. Closing now would reset the connection and could
        # destroy our answer in flight; read and discard for a while instead.
        self.phase = Phase.LINGER
        self.inbuf = bytearray()
        if self.transport.can_write_eof():
            # The peer may have reset already; the linger timer still closes.
            with contextlib.suppress(OSError):
                self.transport.write_eof()
        self.gate.resume()
        loop = asyncio.get_running_loop()
        self._linger_timer = loop.call_later(self.server.config.linger_s, self.transport.close)

    def _arm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        loop = asyncio.get_running_loop()
        self._head_timer = loop.call_later(
            self.server.config.header_timeout_s, self._head_timed_out
        )

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.phase is Phase.MINT_BODY:
            self._reject(RequestTimeout())
            return
        if self.phase is not Phase.HEAD:
            return
        if self.inbuf:
            self._reject(RequestTimeout())
        else:  # an idle keep-alive connection: just close it
            self.phase = Phase.CLOSED
            self.transport.close()

    def _cancel_timers(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None

    def __repr__(self) -> str:
        return f"<HttpConnection {self.phase.value}>"
