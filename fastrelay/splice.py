"""The data path: one paired upload spliced into one download.

Theory of operation
-------------------
Once a relay pairs, the upload connection's receive buffer comes from
`Splice.upload_buffer` and every read lands in `Splice.upload_received`,
which writes the payload (a memoryview slice of that buffer, no copy) to the
download transport. ``max_bytes``, the Content-Length count and the chunked
framing are all checked inline, on those same bytes.

Backpressure: the download's ``pause_writing`` pauses the upload's reading
(`ReadGate`), ``resume_writing`` resumes it. Nothing else buffers payload, so
memory per transfer is bounded by the receive buffers still referenced by the
download transport.

Buffer ownership (runtime-facts §1, the rule this module exists to keep):
uvloop's ``write()`` of a memoryview does not copy; whatever the kernel did
not take at once stays a view of *our* buffer until libuv flushes it. So:

* plain-TCP download: write limits are ``high=0``. If, after a write, the
  transport still holds bytes, the buffer is *pinned*: we stop using it
  (the next read gets a fresh one from the pool) and give it back to the pool
  only in ``resume_writing``, which with ``high=0`` fires exactly when the
  transport's buffer is empty again. ``pause_writing`` has already paused the
  upload by then, so at most one or two buffers are pinned per transfer.
* TLS download: ``write()`` encrypts synchronously, so the buffer is free as
  soon as it returns; limits must be non-zero there (``high=0`` deadlocks SSL
  transports) and are taken from the config.

Endings: every way out goes through `_succeed` or `_fail`, which call
`Relay.finish` exactly once. A failure *aborts* the download transport (RST,
no terminating chunk, short of Content-Length), so a receiving curl exits
18 or 56 and never keeps a silently short file.
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING

from .chunked import ChunkedDecoder, ChunkError
from .errors import (
    DownloadAborted,
    IdleTimeout,
    PayloadTooLarge,
    TransferError,
    TransferShutDown,
    UploadAborted,
)
from .flow import BufferPool, ReadGate
from .heads import CONTINUE_100, download_head, simple_response
from .kernel_splice import AVAILABLE as KERNEL_SPLICE_AVAILABLE
from .kernel_splice import KernelPipe, dup_transport_socket
from .session import Input

if TYPE_CHECKING:
    from .protocol import HttpConnection
    from .registry import Relay

_LAST_CHUNK = b"0\r\n\r\n"
_CRLF = b"\r\n"


class Splice:
    __slots__ = (
        "_buf",
        "_decoder",
        "_draining_tail",
        "_finished",
        "_idle_seen",
        "_idle_timer",
        "_kernel",
        "_kernel_pending",
        "_pinned",
        "_progress",
        "_remaining",
        "down",
        "down_transport",
        "forwarded",
        "idle_timeout_s",
        "loop",
        "max_bytes",
        "pins_buffers",
        "pool",
        "relay",
        "up",
        "up_gate",
        "up_transport",
    )

    def __init__(
        self,
        relay: Relay,
        up: HttpConnection,
        down: HttpConnection,
        pool: BufferPool,
        idle_timeout_s: float,
        tls_write_limits: tuple[int, int],
        kernel_splice_min_bytes: int = 0,
    ) -> None:
        self.relay = relay
        self.up = up
        self.down = down
        self.up_transport = up.transport
        self.down_transport = down.transport
        self.up_gate: ReadGate = up.gate
        self.pool = pool
        self.loop = asyncio.get_running_loop()
        self.idle_timeout_s = idle_timeout_s
        self.max_bytes = relay.max_bytes
        head = up.head
        assert head is not None
        self._remaining = head.content_length or 0
        self._decoder = ChunkedDecoder() if head.chunked else None
        self.forwarded = 0
        self._buf: memoryview | None = None
        self._pinned: list[memoryview] = []
        self._finished = False
        self._draining_tail = False
        self._progress = 0
        self._idle_seen = -1
        self._idle_timer: asyncio.TimerHandle | None = None
        # TLS transports copy (encrypt) inside write(); plain TCP ones pin.
        self.pins_buffers = down.transport.get_extra_info("sslcontext") is None
        up_plain = up.transport.get_extra_info("sslcontext") is None
        self._kernel: KernelPipe | None = None
        # splice(2) needs plain sockets on both ends and a known length.
        self._kernel_pending = (
            KERNEL_SPLICE_AVAILABLE
            and kernel_splice_min_bytes > 0
            and self.pins_buffers
            and up_plain
            and self._decoder is None
            and self._remaining >= kernel_splice_min_bytes
        )
        if self.pins_buffers:
            self.down_transport.set_write_buffer_limits(high=0)
        else:
            high, low = tls_write_limits
            self.down_transport.set_write_buffer_limits(high=high, low=low)

    def start(self, body_prefix: bytes) -> None:
        """Send both heads and whatever body arrived while the PUT waited."""
        up_head = self.up.head
        assert up_head is not None
        # A PUT with neither Content-Length nor chunked framing has an empty
        # body (RFC 9112 §6.3): the GET must then say Content-Length: 0, not
        # promise chunks that never come.
        length = None if up_head.chunked else (up_head.content_length or 0)
        self.down_transport.write(
            download_head(
                up_head.header("content-type"), up_head.header("content-disposition"), length
            )
        )
        if up_head.expect_continue and not body_prefix:
            self.up_transport.write(CONTINUE_100)
        self._arm_idle()
        if body_prefix:
            self._forward(memoryview(body_prefix))
        elif self._decoder is None and self._remaining == 0:
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
        if up_sock is None or down_sock is None:  # fall back to the buffered path
            for sock in (up_sock, down_sock):
                if sock is not None:
                    sock.close()
            self.up_gate.resume()
            return
        self._kernel = KernelPipe(
            up_sock,
            down_sock,
            self._remaining,
            self._kernel_progress,
            self._succeed,
            self._kernel_src_error,
            self._kernel_dst_error,
        )
        self._kernel.start()

    def _kernel_progress(self, nbytes: int) -> None:
        self._progress += 1
        self.forwarded += nbytes
        self._remaining -= nbytes

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
        self._progress += 1
        self._forward(buf[:nbytes])
        if self.pins_buffers and self.down_transport.get_write_buffer_size():
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
        decoder = self._decoder
        if decoder is None:
            remaining = self._remaining
            if len(view) >= remaining:
                view = view[:remaining]  # anything after the body is not ours
            self.down_transport.write(view)
            self._remaining -= len(view)
            self.forwarded += len(view)
            if self._remaining == 0:
                self._upload_complete()
            return
        try:
            runs, _ = decoder.feed(view)
        except ChunkError as exc:
            self._fail(Input.UPLOAD_ABORTED, UploadAborted(f"relay: {exc}", self.forwarded))
            return
        total = 0
        for start, end in runs:
            total += end - start
        limit = self.max_bytes
        if limit and self.forwarded + total > limit:
            # Forward exactly up to max_bytes, then cut: never one byte more.
            allowed = limit - self.forwarded
            kept: list[tuple[int, int]] = []
            for start, end in runs:
                if allowed <= 0:
                    break
                take = min(end - start, allowed)
                kept.append((start, start + take))
                allowed -= take
            self._write_chunk(view, kept, limit - self.forwarded)
            self.forwarded = limit
            self._fail(Input.CUT_TOO_LARGE, PayloadTooLarge(decoder.payload, limit, self.forwarded))
            return
        self._write_chunk(view, runs, total)
        self.forwarded += total
        if decoder.done:
            self.down_transport.write(_LAST_CHUNK)
            self._upload_complete()

    def _write_chunk(self, view: memoryview, runs: list[tuple[int, int]], total: int) -> None:
        """One outgoing chunk for all payload runs of one read."""
        if total:
            parts: list[bytes | memoryview] = [b"%x\r\n" % total]
            parts.extend(view[start:end] for start, end in runs)
            parts.append(_CRLF)
            self.down_transport.writelines(parts)

    def _upload_complete(self) -> None:
        self.up_gate.pause()
        if self.pins_buffers and self.down_transport.get_write_buffer_size():
            self._draining_tail = True  # resume_writing finishes it
        else:
            self._succeed()

    # --- download side (called by the download connection) ------------------------

    def download_paused(self) -> None:
        self.up_gate.pause()

    def download_resumed(self) -> None:
        self._progress += 1
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
        self._idle_seen = self._progress
        self._idle_timer = self.loop.call_later(self.idle_timeout_s, self._idle_check)

    def _idle_check(self) -> None:
        self._idle_timer = None
        if self._finished:
            return
        if self._progress == self._idle_seen:
            self._fail(
                Input.IDLE_TIMEOUT,
                IdleTimeout(
                    f"relay: idle timeout: no bytes moved for {self.idle_timeout_s:g}s",
                    self.forwarded,
                ),
            )
        else:
            self._arm_idle()

    # --- endings -------------------------------------------------------------------

    def _end(self) -> None:
        self._finished = True
        if self._kernel is not None:
            # The dup'd sockets go first: only then do the transports own
            # the connections again (and an abort really ends them).
            self._kernel.close()
        self.relay.bytes = self.forwarded
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def _succeed(self) -> None:
        self._end()
        self.relay.finish(Input.UPLOAD_COMPLETE, None)
        self.down.finish_download()
        body = json.dumps({"bytes": self.forwarded, "status": "ok"}, separators=(",", ":"))
        self.up.finish_upload(
            simple_response(200, "application/json", body.encode(), close=True), body_read=True
        )

    def _fail(self, event: Input, err: TransferError) -> None:
        self._end()
        # Pinned buffers may still be referenced by the aborted transport
        # until libuv cancels its writes: drop them rather than reuse them.
        self._pinned.clear()
        self._buf = None
        self.relay.finish(event, err)
        self.down.abort_download()
        # A source that is already gone ignores this; one that is still
        # there (download lost, too large, idle, bad framing) reads why.
        self.up.finish_upload(
            simple_response(err.status, err.content_type, err.body(), close=True),
            body_read=False,
        )

    def __repr__(self) -> str:
        state = "finished" if self._finished else "streaming"
        return f"<Splice {state} forwarded={self.forwarded} pinned={len(self._pinned)}>"
