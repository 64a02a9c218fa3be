"""The data path: one paired upload streamed into one download.

Theory of operation
-------------------
When a relay pairs, the connection that completed the pair builds a
`Transfer` from the relay and its two ends (`TransferEnd`: the source's and
the destination's connections). From then on every upload read lands in a
buffer from `Transfer.upload_buffer` and is handed to
`Transfer.upload_received`, which frames it (`framing.BodyFramer`: the
Content-Length count, the chunked framing and ``max_bytes``, all in one
place) and writes the payload, a memoryview slice of that same buffer, to
the download transport. No payload byte is copied in Python.

Who pauses the uploader: this module, and only it, through the upload's
`ReadGate`: the download's ``pause_writing`` pauses the upload's reading,
``resume_writing`` resumes it. Nothing else buffers payload, so memory per
transfer is bounded by the receive buffers the download transport still
references.

Buffer ownership (the rule this module exists to keep): uvloop's
``write()`` of a memoryview does not copy; whatever the kernel did not take
at once stays a view of *our* buffer until libuv flushes it. So:

* plain-TCP download: write limits are ``high=0``. If, after a write, the
  transport still holds bytes, the buffer is *pinned*: we stop using it
  (the next read gets a fresh one from the pool) and give it back to the pool
  only in ``resume_writing``, which with ``high=0`` fires exactly when the
  transport's buffer is empty again. ``pause_writing`` has already paused the
  upload by then, so at most one or two buffers are pinned per transfer.
* TLS download: ``write()`` encrypts synchronously, so the buffer is free as
  soon as it returns; limits must be non-zero there (``high=0`` deadlocks SSL
  transports) and are taken from the config.

Plain Content-Length uploads of at least ``kernel_splice_min_bytes`` leave
Python altogether through `kernel_splice.KernelPipe` once the transports are
paused and drained.

Where the idle timeout fires: `_idle_check`, at the server timer's deadline
``last progress + idle_timeout_s`` (re-armed from the last progress when it
fires early), so it is late by at most the loop's timer resolution.

Endings: every way out goes through `_succeed` or `_fail`, which call
`Relay.finish` exactly once and then tell both ends. A failed transfer is
made visible to the receiver by its connection (`TransferEnd.transfer_ended`
with ``ok=False``): a TCP reset, never a clean close, so no client can take a
short body for a whole one.
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import TYPE_CHECKING, Protocol

from ..core.chunked import ChunkError
from ..core.config import RelayConfig
from ..core.deadlines import Deadline
from ..core.errors import (
    COMPACT_JSON,
    DownloadAborted,
    IdleTimeout,
    PayloadTooLarge,
    TransferError,
    TransferShutDown,
    UploadAborted,
)
from ..core.framing import BodyFramer, Runs
from ..core.heads import (
    CONTINUE_100,
    COPIED_HEADERS,
    RequestHead,
    download_head,
    last_chunk,
    simple_response,
)
from ..core.session import Input
from .flow import BufferPool, ReadGate
from .kernel_splice import AVAILABLE as KERNEL_SPLICE_AVAILABLE
from .kernel_splice import KernelPipe, dup_transport_socket
from .timer import LoopTimer

if TYPE_CHECKING:
    from .registry import Relay

_CRLF = b"\r\n"


class TransferEnd(Protocol):
    """One side of a transfer, as the transfer sees it (a connection)."""

    @property
    def transport(self) -> asyncio.Transport: ...

    @property
    def gate(self) -> ReadGate: ...

    def transfer_ended(self, answer: bytes | None, ok: bool) -> None:
        """The transfer is over. The source gets ``answer`` (its whole HTTP
        response; ``ok`` means its body was read to the end); the destination
        gets ``answer=None`` and must reset its connection unless ``ok``."""


class Transfer:
    __slots__ = (
        "_buf",
        "_deadline",
        "_download_close",
        "_draining_tail",
        "_finished",
        "_framer",
        "_hasher",
        "_head",
        "_kernel",
        "_kernel_pending",
        "_last_progress",
        "_pinned",
        "_reframe",
        "_timer",
        "down",
        "down_transport",
        "idle_timeout_s",
        "pins_buffers",
        "pool",
        "relay",
        "up",
        "up_gate",
        "up_head",
        "up_transport",
    )

    def __init__(
        self,
        relay: Relay,
        up: TransferEnd,
        up_head: RequestHead,
        down: TransferEnd,
        *,
        download_http10: bool,
        download_close: bool = False,
        pool: BufferPool,
        timer: LoopTimer,
        config: RelayConfig,
    ) -> None:
        self.relay = relay
        self.up = up
        self.up_head = up_head
        self.down = down
        self.up_transport = up.transport
        self.down_transport = down.transport
        self.up_gate = up.gate
        self.pool = pool
        self._timer = timer
        self.idle_timeout_s = config.idle_timeout_s
        self._framer = BodyFramer(up_head.content_length, up_head.chunked, relay.max_bytes)
        # A chunked upload is re-framed as chunked for an HTTP/1.1 download;
        # an HTTP/1.0 client cannot read chunks, so it gets a close-delimited
        # body whose failure is a reset (RFC 9112 §6.3 rule 8).
        self._reframe = up_head.chunked and not download_http10
        self._download_close = download_close
        self._buf: memoryview | None = None
        self._head: bytes | None = None
        """The download's response head until it is written (`_send`)."""
        self._pinned: list[memoryview] = []
        self._finished = False
        self._draining_tail = False
        self._last_progress = timer.clock()
        self._deadline: Deadline | None = None
        # TLS transports copy (encrypt) inside write(); plain TCP ones pin.
        self.pins_buffers = self.down_transport.get_extra_info("sslcontext") is None
        up_plain = self.up_transport.get_extra_info("sslcontext") is None
        self._kernel: KernelPipe | None = None
        # --audit-digest: every payload run is hashed on its way out, so the
        # bytes must pass through Python (no splice(2)).
        self._hasher = hashlib.sha256() if config.audit_digest else None
        remaining = self._framer.remaining
        # splice(2) needs plain sockets on both ends and a known length.
        self._kernel_pending = (
            KERNEL_SPLICE_AVAILABLE
            and self._hasher is None
            and config.kernel_splice_min_bytes > 0
            and self.pins_buffers
            and up_plain
            and remaining is not None
            and remaining >= config.kernel_splice_min_bytes
        )
        if self.pins_buffers:
            self.down_transport.set_write_buffer_limits(high=0)
        else:
            self.down_transport.set_write_buffer_limits(
                high=config.tls_write_high_bytes, low=config.tls_write_low_bytes
            )

    @property
    def forwarded(self) -> int:
        """Payload bytes handed to the download transport so far."""
        return self._framer.payload

    def start(self, body_prefix: bytes) -> None:
        """Send the download's head and whatever body arrived while the PUT waited."""
        head = self.up_head
        # A PUT with neither Content-Length nor chunked framing has an empty
        # body (RFC 9112 §6.3): the GET must then say Content-Length: 0, not
        # promise chunks that never come.
        length = None if head.chunked else (head.content_length or 0)
        copied = [(name, value) for name in COPIED_HEADERS if (value := head.header(name))]
        # The head leaves with the first payload bytes when they are already
        # here (a small upload often is whole): one write, one segment.
        self._head = download_head(
            copied,
            length,
            close_delimited=head.chunked and not self._reframe,
            close=self._download_close,
        )
        if head.expect_continue and not body_prefix:
            self.up_transport.write(CONTINUE_100)
        self._arm_idle()
        if body_prefix:
            self._forward(memoryview(body_prefix))
        if not self._finished:
            self._send()  # the head alone, if no payload took it along
        if not body_prefix and self._framer.done:
            self._upload_complete()
        if self._finished or self._draining_tail:
            return
        if self._kernel_pending:
            # The upload stays paused from here on; the transports are only
            # used again at the end (kernel_splice.py, steps 1-4).
            self.up_gate.pause()
            if not self.down_transport.get_write_buffer_size():
                self._engage_kernel()
            return  # else download_resumed() engages once the transport is empty
        self._kernel_pending = False
        self.up_gate.resume()

    def _engage_kernel(self) -> None:
        self._kernel_pending = False
        up_sock = dup_transport_socket(self.up_transport)
        down_sock = dup_transport_socket(self.down_transport)
        remaining = self._framer.remaining
        if up_sock is None or down_sock is None or remaining is None:
            for sock in (up_sock, down_sock):
                if sock is not None:
                    sock.close()
            self.up_gate.resume()  # fall back to the buffered path
            return
        self._kernel = KernelPipe(
            up_sock,
            down_sock,
            remaining,
            self._kernel_progress,
            self._succeed,
            self._kernel_src_error,
            self._kernel_dst_error,
        )
        self._kernel.start()

    def _kernel_progress(self, nbytes: int) -> None:
        self._last_progress = self._timer.clock()
        self._framer.skip_known_length(nbytes)

    def _kernel_src_error(self, exc: OSError | None) -> None:
        if exc is None:
            self.upload_eof()
        else:
            self.upload_lost(exc)

    def _kernel_dst_error(self, exc: OSError) -> None:
        self.download_lost(exc)

    # --- upload side (called by the upload connection) ----------------------------

    def upload_buffer(self) -> memoryview:
        """The buffer for the next upload read. Never one that is pinned."""
        buf = self._buf
        if buf is None:
            buf = self._buf = self.pool.acquire()
        return buf

    def upload_received(self, nbytes: int) -> None:
        buf = self._buf
        assert buf is not None
        self._last_progress = self._timer.clock()
        self._forward(buf[:nbytes])
        if (
            self.pins_buffers
            and self._buf is not None
            and self.down_transport.get_write_buffer_size()
        ):
            # The download transport still references this buffer: retire it
            # until resume_writing says the transport is empty.
            self._pinned.append(buf)
            self._buf = None

    def upload_eof(self) -> None:
        if not self._finished:
            self._fail(
                Input.UPLOAD_ABORTED,
                UploadAborted("relay: upload ended before the body was complete", self.forwarded),
            )

    def upload_lost(self, exc: Exception | None) -> None:
        if not self._finished:
            why = f": {exc}" if exc else ""
            self._fail(
                Input.UPLOAD_ABORTED,
                UploadAborted(f"relay: upload connection lost{why}", self.forwarded),
            )

    def _forward(self, view: memoryview) -> None:
        if self._finished or self._draining_tail:
            return  # the body is complete: later bytes are not ours
        framer = self._framer
        before = framer.payload
        try:
            runs, _ = framer.feed(view)
        except ChunkError as exc:
            self._fail(Input.UPLOAD_ABORTED, UploadAborted(f"relay: {exc}", self.forwarded))
            return
        self._write_payload(view, runs, framer.payload - before)
        if framer.over_limit:
            # Exactly max_bytes went out; never one byte more.
            self._fail(
                Input.CUT_TOO_LARGE,
                PayloadTooLarge(framer.seen, framer.limit, self.forwarded),
            )
        elif framer.done:
            if self._reframe:
                self._send(last_chunk(framer.trailer_fields()))
            self._upload_complete()

    def _write_payload(self, view: memoryview, runs: Runs, total: int) -> None:
        """One write (or one outgoing chunk) for all payload runs of one read."""
        if not total:
            return
        hasher = self._hasher
        if hasher is not None:
            for start, end in runs:
                hasher.update(view[start:end])
        if len(runs) == 1 and not self._reframe:
            start, end = runs[0]
            self._send(view[start:end])
            return
        parts: list[bytes | memoryview] = [b"%x\r\n" % total] if self._reframe else []
        parts.extend(view[start:end] for start, end in runs)
        if self._reframe:
            parts.append(_CRLF)
        self._send(*parts)

    def _send(self, *parts: bytes | memoryview) -> None:
        """Write ``parts`` to the download, after the head if it is still ours."""
        head = self._head
        if head is not None:
            self._head = None
            parts = (head, *parts)
        if len(parts) == 1:
            self.down_transport.write(parts[0])
        elif parts:
            self.down_transport.writelines(parts)

    def _upload_complete(self) -> None:
        self._send()  # an empty body still has its head
        self.up_gate.pause()
        if self.pins_buffers and self.down_transport.get_write_buffer_size():
            self._draining_tail = True  # resume_writing finishes it
        else:
            self._succeed()

    # --- download side (called by the download connection) ------------------------

    def download_paused(self) -> None:
        self.up_gate.pause()

    def download_resumed(self) -> None:
        self._last_progress = self._timer.clock()
        pinned = self._pinned
        if pinned:
            for buf in pinned:
                self.pool.release(buf)
            pinned.clear()
        if self._finished:
            return
        if self._draining_tail:
            self._succeed()
        elif self._kernel_pending:
            self._engage_kernel()
        elif self._kernel is None:
            self.up_gate.resume()

    def download_lost(self, exc: Exception | None) -> None:
        if not self._finished:
            why = str(exc) if exc else "connection closed by peer"
            self._fail(
                Input.DOWNLOAD_ABORTED,
                DownloadAborted(f"relay: download connection lost: {why}", self.forwarded),
            )

    def shut_down(self) -> None:
        """The server is stopping: abort visibly, outcome SHUTDOWN."""
        if not self._finished:
            self._fail(
                Input.SHUTDOWN, TransferShutDown("relay: server shutting down", self.forwarded)
            )

    # --- idle detection ------------------------------------------------------------

    def _arm_idle(self) -> None:
        self._deadline = self._timer.at(self._last_progress + self.idle_timeout_s, self._idle_check)

    def _idle_check(self) -> None:
        self._deadline = None
        if self._finished:
            return
        if self._timer.clock() - self._last_progress >= self.idle_timeout_s:
            self._fail(
                Input.IDLE_TIMEOUT,
                IdleTimeout(
                    f"relay: idle timeout: no bytes moved for {self.idle_timeout_s:g}s",
                    self.forwarded,
                ),
            )
        else:
            self._arm_idle()  # bytes moved since: the deadline follows them

    # --- endings -------------------------------------------------------------------

    def _end(self) -> None:
        self._finished = True
        if self._kernel is not None:
            # The dup'd sockets go first: only then do the transports own
            # the connections again (and a reset really ends them).
            self._kernel.close()
        self.relay.bytes = self.forwarded
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _succeed(self) -> None:
        self._end()
        answer: dict[str, object] = {"bytes": self.forwarded, "status": "ok"}
        if self._hasher is not None:
            answer["sha256"] = self.relay.digest = self._hasher.hexdigest()
        self.relay.finish(Input.UPLOAD_COMPLETE, None)
        self.down.transfer_ended(None, True)
        body = COMPACT_JSON.encode(answer)
        self.up.transfer_ended(
            simple_response(200, "application/json", body.encode(), close=True), True
        )

    def _fail(self, event: Input, err: TransferError) -> None:
        self._end()
        # Pinned buffers may still be referenced by the aborted transport
        # until libuv cancels its writes: drop them rather than reuse them.
        self._pinned.clear()
        self._buf = None
        self.relay.finish(event, err)
        self.down.transfer_ended(None, False)
        # A source that is already gone ignores this; one that is still
        # there (download lost, too large, idle, bad framing) reads why.
        self.up.transfer_ended(
            simple_response(err.status, err.content_type, err.body(), close=True), False
        )

    def __repr__(self) -> str:
        state = "finished" if self._finished else "streaming"
        return f"<Transfer {state} forwarded={self.forwarded} pinned={len(self._pinned)}>"
