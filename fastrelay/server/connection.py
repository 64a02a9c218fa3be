"""One client connection: the asyncio shell around `phases.LIFECYCLE`.

`HttpConnection` turns every transport callback into one `phases.Event`
and runs the handler the lifecycle table names for (phase, event). Handlers
are the methods below named in the table; they are the only code that
changes ``self.phase``.

Requests: heads are cut and parsed by `core.heads` (one framing, the same as
h11's), mint bodies framed by `framing.BodyFramer`, answers written here by
`_answer`, which keeps the connection for the next request when the request
was read to its end and HTTP allows it, and otherwise closes (lingering when
a body is left unread).

Relays: a ``/relay/{ticket}`` request claims its side (`Relay.claim`). The
claim that completes a pair builds the `transfer.Transfer` from the relay
and the two connections and tells both ``PAIRED``; from then on the data
path is the transfer's, and this object only forwards callbacks to it. A
fan-out relay (``receivers > 1``) pairs when the PUT and all its GETs are
here: its data path is a `fanout.FanOut` for the source and one
`fanout.Receiver` per destination (`DataPath`: one shape for all three).

Receive buffers (`get_buffer`): an upload's reads go into the transfer's
pooled buffers. Every other read lands in one server-wide scratch buffer and
`buffer_updated` copies what arrived into the connection's ``inbuf`` at
once. That is safe because both loops call ``get_buffer`` and
``buffer_updated`` back to back on the loop thread, and no view of the
scratch buffer outlives the call.

Memory per connection is bounded whatever the client does:

* ``inbuf`` holds at most one request head plus one read (64 KiB) while
  heads are read; more without a complete head is a 431;
* answers the client does not read: at most ``CONTROL_WRITE_HIGH`` plus one
  answer; past it the connection stops reading (``ANSWERING``) until the
  transport drains;
* a waiting upload: at most ``config.waiting_body_bytes`` of its body (and
  all waiting uploads together at most ``config.max_waiting_body_total``);
* input pipelined behind a GET: ``max_head_bytes`` plus one read.

Errors: a `RelayError` raised while handling a request is answered by
`_refuse`, the one place that turns errors into responses. Any other
exception is a bug: `_dispatch` answers 500 if nothing was sent yet (else
aborts), logs one line with the exception type, and the server lives on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
import traceback
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Literal, Protocol, cast

from ..core import logsafe, observe, resume
from ..core.chunked import ChunkError
from ..core.config import RelayConfig
from ..core.deadlines import Deadline
from ..core.errors import (
    BadRequest,
    InternalError,
    MintBodyTooLarge,
    RelayError,
    RequestTimeout,
    Unauthorized,
)
from ..core.framing import BodyFramer
from ..core.heads import (
    CONTINUE_100,
    RequestHead,
    Route,
    error_response,
    find_head_end,
    parse_head,
    route,
    simple_response,
)
from ..core.phases import LIFECYCLE, Event, Phase
from ..core.resume import ResumeRecord
from ..core.tickets import extract_bearer_ticket
from .fanout import FanOut
from .flow import BufferPool, ReadGate
from .timer import LoopTimer
from .transfer import Resumed, Transfer

if TYPE_CHECKING:
    from .registry import Registry, Relay, WaitingEnd

log = logging.getLogger("fastrelay")

# Answers are small; past this much unsent, the client is not reading and
# we stop reading its requests (ANSWERING). uvloop's default low mark is 16
# *bytes* (docs/runtime-facts.md §3): always set both.
CONTROL_WRITE_HIGH = 64 * 1024
CONTROL_WRITE_LOW = 16 * 1024

# SO_LINGER on, timeout 0: close() sends a TCP reset instead of a FIN. That
# is how a failed download is told apart from a complete one by every client
# (a close-delimited or keep-alive answer cut by a FIN looks complete to
# some of them).
_RESET_ON_CLOSE = struct.pack("ii", 1, 0)

# Over TLS a reset is not enough: Python's ssl (and others) report a TCP
# reset without close_notify as a "ragged EOF" and, by default, as a clean
# end of stream, so a Content-Length download cut short reads as complete
# to urllib. Instead we put this record on the wire: a plaintext
# alert where only encrypted records may come, which every TLS client
# rejects with an error (OpenSSL: "bad record type"). It goes through a dup
# of the socket because asyncio's TLS layer cannot send an alert.
_TLS_POISON_RECORD = b"\x15\x03\x03\x00\x02\x02\x28"


Answer = tuple[int, str, bytes]
"""Status, content type and body of a small answer."""


class DataPath(Protocol):
    """What a paired connection forwards its callbacks to: a `Transfer`
    (either end), a `FanOut` (its source) or a `fanout.Receiver`."""

    @property
    def relay(self) -> Relay: ...

    def upload_buffer(self) -> memoryview: ...
    def upload_received(self, nbytes: int) -> None: ...
    def upload_eof(self) -> None: ...
    def upload_lost(self, exc: Exception | None) -> None: ...
    def download_eof(self) -> None: ...
    def download_paused(self) -> None: ...
    def download_resumed(self) -> None: ...
    def download_lost(self, exc: Exception | None) -> None: ...
    def shut_down(self) -> None: ...


class ConnectionHost(Protocol):
    """What a connection needs from the server that accepted it."""

    @property
    def config(self) -> RelayConfig: ...
    @property
    def registry(self) -> Registry: ...
    @property
    def timer(self) -> LoopTimer: ...
    @property
    def pool(self) -> BufferPool: ...
    @property
    def scratch(self) -> memoryview: ...
    @property
    def draining(self) -> bool: ...

    def connection_opened(self, conn: HttpConnection) -> bool:
        """Count a new connection in; False if it must be refused."""

    def connection_closed(self, conn: HttpConnection) -> None: ...

    def hold_waiting_bytes(self, delta: int) -> bool:
        """Account ``delta`` bytes held for waiting uploads; False when the
        server-wide bound is reached (the upload must stop being read)."""

    def answer_small(self, route: Route, head: RequestHead) -> Answer:
        """Status, content type and body for health or metrics."""

    def answer_mint(self, head: RequestHead, body: bytes) -> Answer | Awaitable[Answer]:
        """The mint's answer, or what to await for it (a shared ledger)."""

    def check_mint(self, head: RequestHead) -> None: ...


class HttpConnection(asyncio.BufferedProtocol):
    __slots__ = (
        "_body",
        "_body_framer",
        "_body_then",
        "_body_wanted",
        "_carried_framer",
        "_consultation",
        "_deadline",
        "_ended",
        "_eof_seen",
        "_held",
        "_pending_error",
        "_side",
        "_unread_body",
        "gate",
        "head",
        "inbuf",
        "lost_exc",
        "phase",
        "relay",
        "resume_at",
        "server",
        "transfer",
        "transport",
        "write_paused",
    )

    def __init__(self, server: ConnectionHost) -> None:
        self.server = server
        self.phase = Phase.CLOSED  # until connection_made
        self.inbuf = bytearray()
        self.head: RequestHead | None = None
        self.relay: Relay | None = None
        self.transfer: DataPath | None = None
        self.write_paused = False
        self.lost_exc: Exception | None = None
        self._side: Literal["PUT", "GET"] = "GET"
        self._body_framer: BodyFramer | None = None
        self._body = bytearray()
        self._body_wanted = False  # keep the body being read (a mint's), or drop it
        self._body_then: Callable[[bytes], None] | None = None  # runs when it is read
        self._pending_error: RelayError | None = None
        self._ended: tuple[bytes | None, bool] = (None, False)  # what transfer_ended said
        self._deadline: Deadline | None = None
        self._held = 0  # bytes of a waiting upload counted by the server
        self._eof_seen = False
        self._unread_body = False  # the current request has body bytes we did not read
        # A resumable relay's end carried over from a broken transfer: the
        # offset it is at, and (an upload) its body framer; None otherwise.
        self.resume_at: int | None = None
        self._carried_framer: BodyFramer | None = None
        # What we await from the shared ledger, and what to do with its answer.
        self._consultation: tuple[asyncio.Future[Any], Callable[[Any], None]] | None = None

    # --- asyncio callbacks: each is one Event ---------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        self.gate = ReadGate(transport)
        transport.set_write_buffer_limits(high=CONTROL_WRITE_HIGH, low=CONTROL_WRITE_LOW)
        # TCP keepalive is set once on the listening socket (listener.py) and
        # inherited by every accepted one: no per-connection syscalls here.
        if not self.server.connection_opened(self):
            transport.abort()
            return
        self.phase = Phase.READING_HEAD
        self._arm(self.server.config.header_timeout_s)

    def get_buffer(self, sizehint: int) -> memoryview:
        # WARNING: never pause, close or abort in here (uvloop segfaults).
        if self.phase is Phase.UPLOADING:
            assert self.transfer is not None
            return self.transfer.upload_buffer()
        return self.server.scratch

    def buffer_updated(self, nbytes: int) -> None:
        if self.phase is Phase.UPLOADING:
            # The hot path: LIFECYCLE[(UPLOADING, DATA)] is feed_transfer,
            # inlined here to save the table lookup on every read.
            assert self.transfer is not None
            self.transfer.upload_received(nbytes)
            return
        self.inbuf += self.server.scratch[:nbytes]
        self._dispatch(Event.DATA)

    def eof_received(self) -> bool | None:
        self._eof_seen = True
        self._dispatch(Event.EOF)
        # Keep the transport half-open while a transfer still writes to it
        # (TLS transports cannot half-close, and warn if asked to).
        if self.phase in (Phase.DOWNLOADING, Phase.UPLOADING):
            return self.transport.get_extra_info("sslcontext") is None or None
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost_exc = exc
        self._dispatch(Event.LOST)

    def pause_writing(self) -> None:
        self.write_paused = True
        self._dispatch(Event.WRITE_PAUSED)

    def resume_writing(self) -> None:
        self.write_paused = False
        self._dispatch(Event.WRITE_RESUMED)

    # --- calls from the server, the relay and the transfer -------------------------

    def shut_down(self) -> None:
        """The server is closing."""
        self._dispatch(Event.SHUTDOWN)

    def drain(self) -> None:
        """The server stopped accepting; requests under way go on."""
        self._dispatch(Event.DRAIN)

    def paired(self, transfer: DataPath) -> None:
        """`Relay.claim` paired us: ``transfer`` is the data path from now on."""
        self.transfer = transfer
        self._dispatch(Event.PAIRED)

    def relay_ended(self, err: RelayError) -> None:
        """`registry.WaitingEnd`: the relay ended while we waited."""
        self._pending_error = err
        self._dispatch(Event.PARTNER_GONE)

    def transfer_ended(self, answer: bytes | None, ok: bool) -> None:
        """`transfer.TransferEnd`: the transfer is over."""
        self._ended = (answer, ok)
        self._dispatch(Event.PARTNER_GONE)

    def transfer_suspended(self, at: int, framer: BodyFramer | None) -> None:
        """`transfer.TransferEnd`: our resumable relay lost the other side;
        we wait for a new partner at offset ``at``."""
        self.resume_at = at
        self._carried_framer = framer
        self._dispatch(Event.SUSPENDED)

    def superseded(self) -> None:
        """`registry.WaitingEnd`: a newer request took our side over."""
        self._dispatch(Event.SUPERSEDED)

    def resume_refused(self, err: RelayError) -> None:
        """`registry.WaitingEnd`: we cannot serve the relay's new partner;
        answer ``err`` (409 + Upload-Offset, or 416) and go."""
        self.relay_ended(err)

    # --- the dispatcher ------------------------------------------------------------

    def _dispatch(self, event: Event) -> None:
        handler = LIFECYCLE[(self.phase, event)].handler
        try:
            getattr(self, handler)()
        except Exception as exc:  # a bug: answer it, log one line, keep serving
            self._internal_error(exc)

    def _internal_error(self, exc: Exception) -> None:
        # One line names the bug's place (the innermost frame); the whole
        # traceback goes to DEBUG, so a bug is findable without flooding logs.
        frames = traceback.extract_tb(exc.__traceback__)
        where = f"{os.path.basename(frames[-1].filename)}:{frames[-1].lineno}" if frames else "?"
        log.error(
            "internal error in %s while %s: %s at %s: %s",
            self.head.method if self.head else "connection",
            self.phase.value,
            type(exc).__name__,
            where,
            logsafe.safe(exc),
        )
        log.debug("internal error traceback", exc_info=exc)
        if self.phase in (Phase.READING_HEAD, Phase.READING_BODY, Phase.WAITING, Phase.CONSULTING):
            self._cancel_deadline()
            self._drop_consultation()
            if self.relay is not None:
                relay, self.relay = self.relay, None
                relay.leave(self)
            self._refuse(InternalError())
        elif self.phase is not Phase.CLOSED:
            self._reset()

    # --- handlers named in LIFECYCLE ----------------------------------------------

    def ignore(self) -> None:
        pass

    def note_write_state(self) -> None:
        pass  # pause_writing/resume_writing already recorded it

    def note_eof(self) -> None:
        pass  # eof_received recorded it; a download finishes first

    def discard_input(self) -> None:
        self.inbuf.clear()

    def hold_input(self) -> None:
        # Pipelined input behind a GET or a held answer: keep it for later,
        # but never more than a head and a read.
        if len(self.inbuf) > self.server.config.max_head_bytes:
            self.gate.pause()

    def forget(self) -> None:
        self.phase = Phase.CLOSED
        self._cancel_deadline()
        self._release_held()
        self._drop_consultation()
        self.server.connection_closed(self)

    def close(self) -> None:
        self.phase = Phase.CLOSED
        self._cancel_deadline()
        self._release_held()
        self._drop_consultation()
        self.transport.close()

    def close_if_idle(self) -> None:
        if not self.inbuf:
            self.close()

    def abort(self) -> None:
        self.phase = Phase.CLOSED
        self._cancel_deadline()
        self.transport.abort()

    def read_requests(self) -> None:
        """Handle every complete request in ``inbuf``, in order."""
        while not self.write_paused:
            try:
                if self.phase is Phase.READING_HEAD:
                    if not self._read_head():
                        return
                elif self.phase is Phase.READING_BODY:
                    if not self._read_body():
                        return
                else:
                    return
            except RelayError as err:
                # Answered, and on a kept connection the next pipelined
                # request (already in inbuf) is read at once, not when more
                # bytes happen to arrive.
                self._refuse(err)
        if self.write_paused and self.phase is Phase.READING_HEAD:
            self.hold_answers()

    def hold_answers(self, deadline_s: float | None = None) -> None:
        """The client is not reading our answers: stop reading its requests
        until it does; abort if it has not within ``deadline_s`` (default:
        the header timeout)."""
        self.phase = Phase.ANSWERING
        self.gate.pause()
        self._arm(self.server.config.header_timeout_s if deadline_s is None else deadline_s)

    def resume_requests(self) -> None:
        self.phase = Phase.READING_HEAD
        self.gate.resume()
        self._arm(self.server.config.header_timeout_s)
        self.read_requests()

    def head_timed_out(self) -> None:
        self._deadline = None
        if self.phase is Phase.READING_HEAD and not self.inbuf:
            self.close()  # an idle keep-alive connection: just close it
        else:
            self._refuse(RequestTimeout())

    # waiting for the shared ledger

    def _consult(self, work: Awaitable[Any], then: Callable[[Any], None]) -> None:
        """Wait for ``work`` (a shared-ledger call) without reading; then run
        ``then`` with its result (a `RelayError` it raises is answered)."""
        self.phase = Phase.CONSULTING
        self._cancel_deadline()  # the shared ledger bounds its own time
        self.gate.pause()
        future = asyncio.ensure_future(work)
        self._consultation = (future, then)
        future.add_done_callback(self._consulted)

    def _consulted(self, future: asyncio.Future[Any]) -> None:
        if self._consultation is None or self._consultation[0] is not future:
            if not future.cancelled():
                future.exception()  # dropped: mark it retrieved
            return
        self._dispatch(Event.CONSULTED)

    def resume_after_consult(self) -> None:
        assert self._consultation is not None
        future, then = self._consultation
        self._consultation = None
        self.phase = Phase.READING_HEAD  # until `then` says otherwise
        self.gate.resume()
        try:
            then(future.result())
        except RelayError as err:
            self._refuse(err)
        if self._eof_seen and self.phase is Phase.WAITING:
            self.leave_relay()  # the client half-closed while we consulted
        elif self._eof_seen and self.phase is Phase.READING_HEAD:
            self.close()
        elif self.phase is Phase.READING_HEAD and self.inbuf:
            self.read_requests()  # requests pipelined behind this one

    def _drop_consultation(self) -> None:
        if self._consultation is not None:
            future, _ = self._consultation
            self._consultation = None
            future.cancel()

    # waiting for a partner

    def hold_waiting_input(self) -> None:
        if self._side == "GET":
            self.hold_input()
            return
        # A waiting upload's body: keep reading a bounded part of it, since
        # only a read can show that its client died (a dead client's FIN
        # waits behind every byte we have not read: docs/runtime-facts.md §8).
        grown = len(self.inbuf) - self._held
        self._held = len(self.inbuf)
        fits = self.server.hold_waiting_bytes(grown)
        if not fits or self._held >= self.server.config.waiting_body_bytes:
            self.gate.pause()

    def leave_relay(self) -> None:
        """The waiting client half-closed: it is gone for our purposes."""
        self._leave()
        self.close()

    def leave_relay_lost(self) -> None:
        self._leave()
        self.forget()

    def _leave(self) -> None:
        relay, self.relay = self.relay, None
        if relay is not None:
            relay.leave(self)  # the claim is free for a retry; our bytes go

    def answer_relay_ended(self) -> None:
        self.relay = None
        err = self._pending_error
        self._pending_error = None
        assert err is not None
        if self._side == "GET" and self.resume_at is not None:
            # Our answer's head went out in an earlier pairing: the body can
            # only end visibly short.
            self._reset()
            return
        self._refuse(err)

    def wait_again(self) -> None:
        """A resumable relay broke on the other side: we hold our side and
        wait, as a request that just claimed it would (`transfer_suspended`)."""
        transfer, self.transfer = self.transfer, None
        assert transfer is not None
        self.relay = transfer.relay
        self.phase = Phase.WAITING
        if self._side == "PUT":
            self.gate.pause()  # not one body byte more until a destination is back

    def leave_superseded(self) -> None:
        """A newer request took our side of a resumable relay over."""
        self.relay = None
        # A download mid-body must end visibly short; a request whose body
        # we did not read is reset rather than left to linger.
        mid_body = self._side == "GET" and self.resume_at is not None
        if mid_body or self._unread_body:
            self._reset()
        else:
            self.close()

    def join_transfer(self) -> None:
        assert self.transfer is not None
        self.relay = None
        self.resume_at = None
        self._carried_framer = None
        if self._side == "PUT":
            self._release_held()
            self.phase = Phase.UPLOADING
        else:
            self.phase = Phase.DOWNLOADING

    # the two ends of a transfer

    def feed_transfer(self) -> None:
        # Reached only through the table walk: buffer_updated inlines it.
        pass

    def upload_eof(self) -> None:
        assert self.transfer is not None
        self.transfer.upload_eof()

    def download_eof(self) -> None:
        assert self.transfer is not None
        self.transfer.download_eof()

    def upload_lost(self) -> None:
        transfer, self.transfer = self.transfer, None
        self.forget()
        if transfer is not None:
            transfer.upload_lost(self.lost_exc)

    def download_lost(self) -> None:
        transfer, self.transfer = self.transfer, None
        self.forget()
        if transfer is not None:
            transfer.download_lost(self.lost_exc)

    def download_paused(self) -> None:
        assert self.transfer is not None
        self.transfer.download_paused()

    def download_resumed(self) -> None:
        assert self.transfer is not None
        self.transfer.download_resumed()

    def cut_transfer(self) -> None:
        assert self.transfer is not None
        self.transfer.shut_down()

    def answer_upload(self) -> None:
        """The transfer is over: the source reads its answer; we close."""
        answer, ok = self._ended
        self.transfer = None
        if self.transport.is_closing():
            self.phase = Phase.CLOSED
            return
        assert answer is not None
        self.transport.write(answer)
        self._close_after_answer(body_read=ok)

    def end_download(self) -> None:
        """Where a failure becomes visible to the receiver: a reset."""
        _, ok = self._ended
        self.transfer = None
        if not ok:
            self._reset()
            return
        head = self.head
        if not self._keeps_connection() or head is None or head.http10 or self._eof_seen:
            # HTTP/1.0: the body was close-delimited. A GET that came with a
            # body of its own: that body was never read.
            self.close()  # close() sends what is queued, then the FIN
            return
        # The body is complete: the connection is the client's again.
        self.head = None
        self.phase = Phase.READING_HEAD
        # Only now, out of DOWNLOADING: on a TLS transport this call runs
        # pause_writing()/resume_writing() at once when the ciphertext still
        # queued is past the new marks (up to the transfer's 256 KiB usually
        # is), and those must reach the phase that owns the connection now,
        # not a transfer that is gone.
        self.transport.set_write_buffer_limits(high=CONTROL_WRITE_HIGH, low=CONTROL_WRITE_LOW)
        if self.write_paused:
            # The client has not read the end of the body yet (TLS: up to the
            # transfer's write mark is still queued). It gets the transfer's
            # idle timeout to do so; past it the connection is aborted, and
            # the body it did not read is visibly incomplete.
            self.hold_answers(self.server.config.idle_timeout_s)
            return
        self.gate.resume()
        self._arm(self.server.config.header_timeout_s)
        if self.inbuf:
            self.read_requests()

    # --- requests ------------------------------------------------------------------

    def _read_head(self) -> bool:
        """Parse and dispatch one head if it is all here. True to go on."""
        end = find_head_end(self.inbuf, self.server.config.max_head_bytes)
        if end is None:
            return False
        raw = bytes(self.inbuf[:end])
        del self.inbuf[:end]
        self._cancel_deadline()
        self.head = None
        head = self.head = parse_head(raw)
        self._unread_body = head.has_body
        if head.dropped:
            log.warning(
                "dropped non-ASCII header(s) %s from %s %s",
                ",".join(head.dropped),
                head.method,
                logsafe.safe(head.path, 64),
            )
        try:
            kind, ticket = route(head)
        except RelayError as err:
            # 404, 405: answered once the body is read, like any answer.
            self._read_body_then(head, keep=False, then=self._refusal(err))
            return True
        if kind is Route.RELAY_PUT or kind is Route.RELAY_GET:
            assert ticket is not None
            self._claim("PUT" if kind is Route.RELAY_PUT else "GET", ticket, head)
        elif kind is Route.MINT:
            self._start_mint(head)
        else:
            self._read_body_then(
                head, keep=False, then=lambda _: self._answer(*self.server.answer_small(kind, head))
            )
        return True

    def _claim(self, side: Literal["PUT", "GET"], ticket: str, head: RequestHead) -> None:
        # Checks 1-3 of the wire contract (README), in order; check 4 (408) is the relay's
        # pairing deadline, which ends it while we wait.
        if extract_bearer_ticket(head.header("authorization")) != ticket:
            raise Unauthorized()
        registry = self.server.registry
        self._side = side
        relay = registry.lookup(ticket)
        if relay is not None:
            self._claim_relay(relay)
            return
        # Not live here: a signed ticket opens its relay on its first arrival.
        claims = registry.verify(ticket)  # 410 unless signed, unexpired, unspent
        if registry.shared is None:
            self._claim_relay(registry.open_signed(ticket, claims))
        else:
            self._consult(registry.admit(ticket, claims), self._claim_relay)

    def _claim_relay(self, relay: Relay) -> None:
        side = self._side
        partner = relay.claim(side, self)
        self.relay = relay
        self.phase = Phase.WAITING
        if partner is None:
            if side == "PUT" and self.inbuf:
                self.hold_waiting_input()
            return
        if relay.receivers > 1:
            self._start_fanout(relay, partner)
            return
        # We completed the pair: build the transfer from the two ends.
        up, down = (self, partner) if side == "PUT" else (partner, self)
        assert isinstance(up, HttpConnection) and isinstance(down, HttpConnection)
        assert up.head is not None and down.head is not None
        server = self.server
        resumed = _resumed(relay, up, down) if relay.resumable else None
        transfer = Transfer(
            relay,
            up,
            up.head,
            down,
            download_http10=down.head.http10,
            # The answer says it when the connection will not be kept (the
            # GET's own body unread, or Connection: close asked for).
            download_close=not down._keeps_connection(),
            pool=server.pool,
            timer=server.timer,
            config=server.config,
            resumed=resumed,
            pacer=server.registry.pacing.join(relay.workspace_id, relay.max_rate),
        )
        relay.stream = transfer
        prefix = bytes(up.inbuf)
        up.inbuf.clear()
        up.paired(transfer)
        down.paired(transfer)
        transfer.start(prefix)

    def _start_fanout(self, relay: Relay, partner: WaitingEnd) -> None:
        """We completed a fan-out relay: one source, ``relay.receivers`` GETs."""
        up = self if self._side == "PUT" else partner
        downs = relay.take_receivers()
        assert isinstance(up, HttpConnection) and up.head is not None
        ends: list[tuple[HttpConnection, bool, bool]] = []
        for down in downs:
            assert isinstance(down, HttpConnection) and down.head is not None
            ends.append((down, down.head.http10, not down._keeps_connection()))
        server = self.server
        registry = server.registry
        fanout = FanOut(
            relay,
            up,
            up.head,
            list(ends),
            pool=server.pool,
            timer=server.timer,
            config=server.config,
            metrics=registry.metrics,
            pacer=registry.pacing.join(relay.workspace_id, relay.max_rate),
        )
        prefix = bytes(up.inbuf)
        up.inbuf.clear()
        up.paired(fanout)
        for (down, _, _), receiver in zip(ends, fanout.receivers, strict=True):
            down.paired(receiver)
        fanout.start(prefix)

    def _start_mint(self, head: RequestHead) -> None:
        if head.content_length is not None and head.content_length > self._body_limit():
            raise MintBodyTooLarge()
        try:
            self.server.check_mint(head)
        except RelayError as err:
            if head.expect_continue:
                raise  # the client waits for our word: answer now, and close
            # Read (and drop) the body, then answer on a connection that
            # stays usable: refusing a well-framed mint is no framing error.
            self._read_body_then(head, keep=False, then=self._refusal(err))
            return
        if head.expect_continue:
            self.transport.write(CONTINUE_100)
        self._read_body_then(head, keep=True, then=self._mint)

    def _refusal(self, err: RelayError) -> Callable[[bytes], None]:
        """``then`` for `_read_body_then`: refuse with ``err``."""
        return lambda _body: self._refuse(err)

    def _body_limit(self) -> int:
        return self.server.config.max_mint_body_bytes

    def _read_body_then(
        self, head: RequestHead, *, keep: bool, then: Callable[[bytes], None]
    ) -> None:
        """Read the request's body to its end, then run ``then`` with it (an
        empty body unless ``keep``).

        Every answer outside a relay goes through here, because a body left
        unread would be parsed as the next request: bytes a client (or a
        proxy's other client) sent as a body would run as a request
        (smuggling). A body we do not want is read and dropped when it is
        small; one over ``max_body_bytes``, or one a client holds back
        for ``100 Continue``, is not read: the answer comes at once, says
        ``Connection: close`` and the connection closes (`_keeps_connection`).
        """
        if not head.has_body:
            then(b"")
            return
        limit = self._body_limit()
        too_large = head.content_length is not None and head.content_length > limit
        if not keep and (too_large or head.expect_continue):
            then(b"")  # _unread_body is still set: the answer closes
            return
        self._body_framer = BodyFramer(head.content_length, head.chunked, limit)
        self._body.clear()
        self._body_wanted = keep
        self._body_then = then
        self.phase = Phase.READING_BODY
        # A slow-dripped body is no better than a slow head.
        self._arm(self.server.config.header_timeout_s)

    def _read_body(self) -> bool:
        framer, inbuf = self._body_framer, self.inbuf
        assert framer is not None and self.head is not None and self._body_then is not None
        try:
            runs, consumed = framer.feed(inbuf)
        except ChunkError as exc:
            raise BadRequest(str(exc)) from None
        if framer.over_limit:
            if self._body_wanted:
                raise MintBodyTooLarge()
            # A dropped body past the limit: answer now, and close.
            self._body_framer = None
            self._cancel_deadline()
            then, self._body_then = self._body_then, None
            then(b"")
            return True
        if self._body_wanted:
            for start, end in runs:
                self._body += inbuf[start:end]
        del inbuf[:consumed]
        if not framer.done:
            return False
        self._body_framer = None
        self._unread_body = False
        self._cancel_deadline()
        then, self._body_then = self._body_then, None
        body = bytes(self._body)
        self._body.clear()
        then(body)
        # A consultation (the shared ledger) stops read_requests; it goes on
        # in resume_after_consult.
        return self.phase is not Phase.CONSULTING

    def _mint(self, body: bytes) -> None:
        assert self.head is not None
        try:
            answer = self.server.answer_mint(self.head, body)
        except RelayError as exc:
            self._refuse(exc)
            return
        if isinstance(answer, tuple):
            self._answer(*answer)
            return
        self._consult(answer, self._answer_consulted)

    def _answer_consulted(self, answer: Answer) -> None:
        self._answer(*answer)

    # --- answers -------------------------------------------------------------------

    def _keeps_connection(self, err: RelayError | None = None) -> bool:
        """Whether the connection reads another request after this answer.

        The one place that decides it, for every answer (small answers,
        refusals, a finished download): only when the request was framed and
        its body read to its end, HTTP allows keep-alive, the answer does not
        close by nature (``err.closes``), and we are not draining. Anything
        else closes, since unread body bytes would be read as a request.
        """
        head = self.head
        return (
            head is not None
            and not self._unread_body
            and head.keep_alive
            and not (err is not None and err.closes)
            and not self.server.draining
        )

    def _answer(self, status: int, content_type: str, body: bytes) -> None:
        """Answer the current request."""
        head = self.head
        assert head is not None
        keep = self._keeps_connection()
        self.transport.write(
            simple_response(
                status, content_type, body, close=not keep, head_only=head.method == "HEAD"
            )
        )
        self._next_request(keep)

    def _refuse(self, err: RelayError) -> None:
        """The one place where a `RelayError` becomes a response."""
        if self.phase in (Phase.CLOSED, Phase.LINGERING) or self.transport.is_closing():
            return
        head = self.head
        self.server.registry.metrics.refused(err, head)  # counted once, where it is written
        keep = self._keeps_connection(err)
        self.transport.write(
            error_response(
                err, close=not keep, head_only=head is not None and head.method == "HEAD"
            )
        )
        self._next_request(keep)

    def _next_request(self, keep: bool) -> None:
        if not keep:
            # A head that failed to parse leaves the stream at an unknown
            # place: linger as for an unread body.
            self._close_after_answer(body_read=self.head is not None and not self._unread_body)
            return
        self.phase = Phase.READING_HEAD
        self.head = None
        self._arm(self.server.config.header_timeout_s)
        if self.write_paused:
            self.hold_answers()

    def _close_after_answer(self, *, body_read: bool) -> None:
        self._cancel_deadline()
        self._release_held()
        if body_read:
            self.phase = Phase.CLOSED
            self.transport.close()
            return
        # Lingering close: the client may still be sending a body we will
        # never read. Closing now would reset the connection and could
        # destroy our answer in flight; read and discard for a while instead.
        self.phase = Phase.LINGERING
        self.inbuf.clear()
        if self.transport.can_write_eof():
            # The peer may have reset already; the linger deadline still closes.
            with contextlib.suppress(OSError):
                self.transport.write_eof()
        self.gate.resume()
        self._arm(self.server.config.linger_s)

    def _reset(self) -> None:
        """End the connection so that the receiver sees a failure.

        Plain TCP: a reset (SO_LINGER 0). TLS: an invalid record, then a
        plain close; a reset there could discard that record before the
        client reads it, leaving only a "ragged EOF" that TLS clients may
        take for the end of the stream.
        """
        self.phase = Phase.CLOSED
        self._cancel_deadline()
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError, TypeError, AttributeError):
                if self.transport.get_extra_info("sslcontext") is not None:
                    raw = sock.dup()
                    try:
                        raw.setblocking(False)
                        raw.send(_TLS_POISON_RECORD)
                    finally:
                        raw.close()
                else:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET_ON_CLOSE)
        self.transport.abort()

    # --- this connection's one deadline --------------------------------------------

    def _arm(self, delay_s: float) -> None:
        self._cancel_deadline()
        self._deadline = self.server.timer.after(delay_s, self._timer_fired)

    def _timer_fired(self) -> None:
        self._deadline = None
        self._dispatch(Event.TIMER)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _release_held(self) -> None:
        if self._held:
            self.server.hold_waiting_bytes(-self._held)
            self._held = 0

    def __repr__(self) -> str:
        return f"<HttpConnection {self.phase.value}>"


def _resumed(relay: Relay, up: HttpConnection, down: HttpConnection) -> Resumed:
    """How a resumable relay's transfer starts (re)paired: where each end is.
    `Relay.claim` has checked that the upload can serve the destination."""
    assert up.head is not None and down.head is not None
    record = relay.record
    if up.resume_at is not None:
        assert record is not None
        upload_at = up.resume_at
    else:
        upload_at, length = resume.put_offset(up.head)
        if record is None:
            record = relay.record = ResumeRecord(length, resume.copied_headers(up.head))
        else:
            observe.log_resume(relay, "PUT", upload_at)
    if down.resume_at is not None:
        start, send_head, partial = down.resume_at, False, False
    else:
        offset = resume.get_offset(down.head)
        start, send_head, partial = offset or 0, True, offset is not None
        if relay.breaks:
            observe.log_resume(relay, "GET", start)
    plan = resume.pairing(upload_at, start)
    record.point = start
    return Resumed(
        start=start,
        skip=plan.skip,
        length=record.length,
        copied=record.copied,
        send_head=send_head,
        partial=partial,
        framer=up._carried_framer,
    )
