"""Fan-out: one upload streamed into N downloads (a ticket minted with
``"receivers": N``).

Theory of operation
-------------------
The connection that completes a fan-out relay (the PUT and all N GETs
present) builds one `FanOut` from the relay, the source and the N
destinations. Each destination's connection gets a `Receiver` as its data
path; the source's gets the `FanOut` itself.

One read of the source feeds N writes of the same buffer: every upload read
lands in a pooled buffer (`upload_buffer`), is framed once
(`framing.BodyFramer`: Content-Length or chunked, ``max_bytes``), and the
payload, memoryview slices of that one buffer, is written to every live
receiver's transport. No payload byte is copied in Python, whatever N.

Flow control: the slowest receiver sets the pace. A receiver's transport
over its write mark holds the upload's gate (`flow.FLOW`); the upload reads
again only when no receiver holds it. Buffer ownership is `transfer.py`'s
rule, for N transports: plain-TCP receivers have ``high=0``; after a read,
if any of them still holds bytes the buffer is *pinned*, and pinned buffers
go back to the pool only once every live receiver's transport is empty.
So memory per fan-out is a few buffers, as for one relay.

A receiver that makes no progress for the idle timeout (its transport stays
over the mark), or that disconnects, is dropped: its response is cut (a
reset, `TransferEnd.transfer_ended` with ``ok=False``), one log line says
so, and the others go on. The source's answer says how many receivers got
every byte: ``200`` with ``"delivered": N``, or ``502`` "k of N receivers
failed" (`errors.ReceiversFailed`); with none left the transfer ends at
once.

The kernel path: a plain-TCP Content-Length upload of at least
``kernel_splice_min_bytes`` to plain-TCP receivers leaves Python
(`kernel_splice.KernelTee`: ``splice`` into an intake pipe, ``tee`` into one
pipe per receiver, ``splice`` out), handed over as in `transfer.py` once the
upload is paused and every receiver's transport is empty. bench/tee_probe.py
measured it against this buffered path (README, "Fan-out"): it wins at
every N, so it is used wherever it can be.

Pacing (`pacing.Pacer`) applies to the one upload, as in `transfer.py`.
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import TYPE_CHECKING

from ..core import observe
from ..core.chunked import ChunkError
from ..core.config import RelayConfig
from ..core.deadlines import Deadline
from ..core.errors import (
    COMPACT_JSON,
    IdleTimeout,
    PayloadTooLarge,
    ReceiversFailed,
    TransferError,
    TransferShutDown,
    UploadAborted,
)
from ..core.framing import BodyFramer
from ..core.heads import CONTINUE_100, RequestHead, download_head, last_chunk, simple_response
from ..core.observe import Metrics
from ..core.resume import copied_headers
from ..core.session import Input
from .flow import FLOW, BufferPool
from .kernel_splice import TEE_AVAILABLE, KernelTee, dup_transport_socket
from .pacing import PacedSource, Pacer
from .timer import LoopTimer

if TYPE_CHECKING:
    from .registry import Relay
    from .transfer import TransferEnd

_CRLF = b"\r\n"


class Receiver:
    """One destination of a fan-out: its connection's data path."""

    __slots__ = (
        "close",
        "delivered",
        "end",
        "fanout",
        "gone",
        "head",
        "index",
        "last_progress",
        "paused",
        "pins",
        "reframe",
        "slot",
        "transport",
    )

    def __init__(
        self, fanout: FanOut, index: int, end: TransferEnd, http10: bool, close: bool
    ) -> None:
        self.fanout = fanout
        self.index = index
        """1-based, in arrival order (for the log line)."""
        self.end = end
        self.transport: asyncio.Transport = end.transport
        self.close = close
        # A chunked upload is re-framed as chunks for HTTP/1.1 receivers; an
        # HTTP/1.0 one gets a close-delimited body (as in transfer.py).
        self.reframe = fanout.up_head.chunked and not http10
        self.pins = self.transport.get_extra_info("sslcontext") is None
        self.head: bytes | None = None
        self.delivered = 0
        self.paused = False
        self.gone = False
        self.last_progress = 0.0
        self.slot = -1
        """Its index in the kernel path's receivers (-1: not on it)."""

    @property
    def relay(self) -> Relay:
        return self.fanout.relay

    # The download connection's calls.

    def download_paused(self) -> None:
        self.fanout.receiver_paused(self)

    def download_resumed(self) -> None:
        self.fanout.receiver_resumed(self)

    def download_lost(self, exc: Exception | None) -> None:
        why = str(exc) if exc else "connection closed by peer"
        self.fanout.drop(self, f"connection lost: {why}", "lost")

    def download_eof(self) -> None:
        pass  # a half-closed receiver can still read the body

    def shut_down(self) -> None:
        self.fanout.shut_down()

    # Never called on a destination (its connection is not UPLOADING); here
    # so every data path has one shape for the connection.

    def upload_buffer(self) -> memoryview:
        raise AssertionError("a fan-out receiver does not upload")

    def upload_received(self, nbytes: int) -> None:
        raise AssertionError("a fan-out receiver does not upload")

    def upload_eof(self) -> None:
        raise AssertionError("a fan-out receiver does not upload")

    def upload_lost(self, exc: Exception | None) -> None:
        raise AssertionError("a fan-out receiver does not upload")

    def __repr__(self) -> str:
        state = "gone" if self.gone else "paused" if self.paused else "taking"
        return f"<Receiver {self.index} {state} delivered={self.delivered}>"


class FanOut(PacedSource):
    """One upload, N receivers (see the module docstring)."""

    __slots__ = (
        "_deadline",
        "_draining_tail",
        "_framer",
        "_hasher",
        "_kernel_pending",
        "_metrics",
        "_pinned",
        "_pins",
        "_reframes",
        "_slots",
        "idle_timeout_s",
        "live",
        "receivers",
        "relay",
        "up",
        "up_head",
        "up_transport",
    )

    def __init__(
        self,
        relay: Relay,
        up: TransferEnd,
        up_head: RequestHead,
        downs: list[tuple[TransferEnd, bool, bool]],
        *,
        pool: BufferPool,
        timer: LoopTimer,
        config: RelayConfig,
        metrics: Metrics,
        pacer: Pacer | None = None,
    ) -> None:
        """``downs``: each destination with its ``http10`` and whether its
        answer must say ``Connection: close``, in arrival order."""
        self.relay = relay
        self.up = up
        self.up_head = up_head
        self.up_transport = up.transport
        self.up_gate = up.gate
        self.pool = pool
        self._timer = timer
        self._metrics = metrics
        self.idle_timeout_s = config.idle_timeout_s
        self._framer = BodyFramer(up_head.content_length, up_head.chunked, relay.max_bytes)
        self._hasher = hashlib.sha256() if config.audit_digest else None
        self._buf: memoryview | None = None
        self._pinned: list[memoryview] = []
        self._finished = False
        self._draining_tail = False
        self._deadline: Deadline | None = None
        now = timer.clock()
        self._last_progress = now
        self.receivers = [
            Receiver(self, index, end, http10, close)
            for index, (end, http10, close) in enumerate(downs, 1)
        ]
        self.live = list(self.receivers)
        for receiver in self.receivers:
            receiver.last_progress = now
            if receiver.pins:
                receiver.transport.set_write_buffer_limits(high=0)
            else:
                receiver.transport.set_write_buffer_limits(
                    high=config.tls_write_high_bytes, low=config.tls_write_low_bytes
                )
        self._pins = any(receiver.pins for receiver in self.receivers)
        self._reframes = any(receiver.reframe for receiver in self.receivers)
        self._pacer = pacer
        if pacer is not None:
            pacer.on_ready = self._pace_ready
        self._kernel: KernelTee | None = None
        self._slots: list[Receiver] = []
        """The kernel path's receivers, by slot (``Receiver.slot``)."""
        remaining = self._framer.remaining
        # splice(2)+tee(2) need plain sockets everywhere and a known length.
        self._kernel_pending = (
            TEE_AVAILABLE
            and self._hasher is None
            and config.kernel_splice_min_bytes > 0
            and all(receiver.pins for receiver in self.receivers)
            and up.transport.get_extra_info("sslcontext") is None
            and remaining is not None
            and remaining >= config.kernel_splice_min_bytes
        )

    @property
    def forwarded(self) -> int:
        """Upload payload bytes read and handed on: written to the live
        receivers' transports, or (kernel path) put into their pipes."""
        return self._framer.payload

    def start(self, body_prefix: bytes) -> None:
        """Each receiver's head, then whatever body arrived while the PUT waited."""
        head = self.up_head
        length = None if head.chunked else (head.content_length or 0)
        copied = copied_headers(head)
        for receiver in self.receivers:
            receiver.head = download_head(
                copied,
                length,
                close_delimited=head.chunked and not receiver.reframe,
                close=receiver.close,
            )
        if head.expect_continue and not body_prefix:
            self.up_transport.write(CONTINUE_100)
        self._arm_idle()
        if body_prefix:
            self._forward(memoryview(body_prefix))
            self._paced(len(body_prefix))
        if not self._finished:
            for receiver in tuple(self.live):
                self._send(receiver)  # the head alone, if no payload took it along
        if not body_prefix and self._framer.done:
            self._upload_complete()
        if self._finished or self._draining_tail:
            return
        if self._kernel_pending:
            # The upload stays paused from here on (kernel_splice.py, steps 1-4).
            self.up_gate.pause(FLOW)
            if not self._receivers_hold_bytes():
                self._engage_kernel()
            return  # else receiver_resumed engages once every transport is empty
        if not any(receiver.paused for receiver in self.live):
            self._resume_upload()

    def _receivers_hold_bytes(self) -> bool:
        return any(r.transport.get_write_buffer_size() for r in self.live)

    def _engage_kernel(self) -> None:
        self._kernel_pending = False
        up_sock = dup_transport_socket(self.up_transport)
        socks = [dup_transport_socket(r.transport) for r in self.live]
        remaining = self._framer.remaining
        if up_sock is None or None in socks or remaining is None:
            for sock in (up_sock, *socks):
                if sock is not None:
                    sock.close()
            self._resume_upload()  # fall back to the buffered path
            return
        for slot, receiver in enumerate(self.live):
            receiver.slot = slot
        self._slots = list(self.live)
        self._kernel = KernelTee(
            up_sock,
            [sock for sock in socks if sock is not None],
            remaining,
            self._kernel_read,
            self._kernel_sent,
            self._succeed,
            self._kernel_src_error,
            self._kernel_dst_error,
            self._pacer,
        )
        self._kernel.start()

    def _kernel_read(self, nbytes: int) -> None:
        now = self._timer.clock()
        self._last_progress = now
        self._framer.skip_known_length(nbytes)
        for receiver in self.live:
            receiver.last_progress = now  # a new batch: each has the idle timeout to take it

    def _kernel_sent(self, slot: int, nbytes: int) -> None:
        receiver = self._slots[slot]
        receiver.delivered += nbytes
        receiver.last_progress = self._timer.clock()
        self._metrics.receiver_bytes += nbytes

    def _kernel_src_error(self, exc: OSError | None) -> None:
        if exc is None:
            self.upload_eof()
        else:
            self.upload_lost(exc)

    def _kernel_dst_error(self, slot: int, exc: OSError) -> None:
        self.drop(self._slots[slot], f"connection lost: {exc}", "lost")

    def _lagging(self, receiver: Receiver) -> bool:
        """The receiver holds the upload back (bytes it has not taken)."""
        kernel = self._kernel
        if kernel is not None and receiver.slot >= 0:
            return kernel.pending(receiver.slot) > 0
        return receiver.paused

    # --- the upload ------------------------------------------------------------------

    def upload_received(self, nbytes: int) -> None:
        buf = self._buf
        assert buf is not None
        self._last_progress = self._timer.clock()
        self._forward(buf[:nbytes])
        if (
            self._pins
            and self._buf is not None
            and any(r.pins and r.transport.get_write_buffer_size() for r in self.live)
        ):
            # A receiver's transport still references this buffer: retire it
            # until every receiver's transport is empty.
            self._pinned.append(buf)
            self._buf = None
        if self._pacer is not None:
            self._paced(nbytes)

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
        total = framer.payload - before
        if total:
            raw = [view[start:end] for start, end in runs]
            if self._hasher is not None:
                for part in raw:
                    self._hasher.update(part)
            # One list of parts for raw receivers, one (only if needed) for
            # re-chunking ones; both are views of the same buffer.
            chunked = [b"%x\r\n" % total, *raw, _CRLF] if self._reframes else raw
            for receiver in tuple(self.live):
                if self._send(receiver, *(chunked if receiver.reframe else raw)):
                    receiver.delivered += total
            self._metrics.receiver_bytes += total * len(self.live)
            if not self.live:
                return  # every receiver was gone: the transfer has failed
        if framer.over_limit:
            # Exactly max_bytes went out; never one byte more.
            self._fail(
                Input.CUT_TOO_LARGE, PayloadTooLarge(framer.seen, framer.limit, self.forwarded)
            )
        elif framer.done:
            trailer = last_chunk(framer.trailer_fields())
            for receiver in tuple(self.live):
                if receiver.reframe:
                    self._send(receiver, trailer)
            if not self._finished:
                self._upload_complete()

    def _send(self, receiver: Receiver, *parts: bytes | memoryview) -> bool:
        """Write ``parts`` to one receiver, after its head if still unsent.
        False if it turned out to be gone (then it has been dropped)."""
        transport = receiver.transport
        if transport.is_closing():
            # Gone, and its protocol has not heard yet (transfer.py `_send`).
            self.drop(receiver, "connection lost: connection closed by peer", "lost")
            return False
        head = receiver.head
        if head is not None:
            receiver.head = None
            parts = (head, *parts)
        if len(parts) == 1:
            transport.write(parts[0])
        elif parts:
            transport.writelines(parts)
        return True

    def _upload_complete(self) -> None:
        for receiver in tuple(self.live):
            self._send(receiver)  # an empty body still has its head
        if self._finished:
            return
        self.up_gate.pause(FLOW)
        self._draining_tail = True
        self._check_tail()

    def _check_tail(self) -> None:
        """Done once every live receiver's transport has taken every byte."""
        if self._finished:
            return
        for receiver in self.live:
            if receiver.paused or (receiver.pins and receiver.transport.get_write_buffer_size()):
                return  # its resume_writing (or its drop) looks again
        self._succeed()

    # Never called on the source (its connection is not DOWNLOADING); here
    # so every data path has one shape for the connection.

    def download_eof(self) -> None:
        raise AssertionError("a fan-out source does not download")

    def download_paused(self) -> None:
        raise AssertionError("a fan-out source does not download")

    def download_resumed(self) -> None:
        raise AssertionError("a fan-out source does not download")

    def download_lost(self, exc: Exception | None) -> None:
        raise AssertionError("a fan-out source does not download")

    # --- the receivers ---------------------------------------------------------------

    def receiver_paused(self, receiver: Receiver) -> None:
        if receiver.gone or self._finished:
            return
        receiver.paused = True
        receiver.last_progress = self._timer.clock()
        self.up_gate.pause(FLOW)

    def receiver_resumed(self, receiver: Receiver) -> None:
        if receiver.gone:
            return
        receiver.paused = False
        receiver.last_progress = self._timer.clock()
        self._release_pinned()
        if self._finished or self._kernel is not None:
            return
        if self._draining_tail:
            self._check_tail()
        elif self._kernel_pending:
            if not self._receivers_hold_bytes():
                self._engage_kernel()
        elif not any(r.paused for r in self.live):
            self._resume_upload()

    def _resume_upload(self) -> None:
        """No receiver holds the upload any more: read it again. Its idle
        clock starts now (it was not stalled, we held it)."""
        self._last_progress = self._timer.clock()
        self.up_gate.resume(FLOW)

    def _release_pinned(self) -> None:
        pinned = self._pinned
        if pinned and not any(r.pins and r.transport.get_write_buffer_size() for r in self.live):
            for buf in pinned:
                self.pool.release(buf)
            pinned.clear()

    def drop(self, receiver: Receiver, why: str, kind: str) -> None:
        """Cut one receiver (stalled or gone); the others go on."""
        if receiver.gone or self._finished:
            return
        receiver.gone = True
        receiver.paused = False
        self.live.remove(receiver)
        # The upload may have been held by this one: its idle clock starts now.
        self._last_progress = self._timer.clock()
        self._metrics.dropped_receivers[kind] += 1
        self._metrics.receivers_delivered.observe(receiver.delivered)
        observe.log_dropped(
            self.relay, receiver.index, len(self.receivers), receiver.delivered, why
        )
        if self._kernel is not None and receiver.slot >= 0:
            # Its dup'd socket goes first: only then does the reset below
            # really end its connection. (If it was the receiver the others
            # waited for and the body is whole, this ends the transfer.)
            self._kernel.drop(receiver.slot)
        # Its aborted transport may still reference pinned buffers: never
        # reuse them (the others' views keep them alive until written).
        self._pinned.clear()
        receiver.end.transfer_ended(None, False)  # a reset: visibly cut
        if self._ended():
            return
        if not self.live:
            failed = ReceiversFailed(len(self.receivers), len(self.receivers), self.forwarded)
            self._fail(Input.DOWNLOAD_ABORTED, failed)
        elif self._kernel is not None:
            pass  # the kernel path goes on with the others
        elif self._draining_tail:
            self._check_tail()
        elif self._kernel_pending:
            if not self._receivers_hold_bytes():
                self._engage_kernel()
        elif not any(r.paused for r in self.live):
            self._resume_upload()

    def _ended(self) -> bool:
        """Whether the transfer is over (a call above may have ended it)."""
        return self._finished

    def shut_down(self) -> None:
        """The server is stopping: abort visibly, outcome SHUTDOWN."""
        if not self._finished:
            self._fail(
                Input.SHUTDOWN, TransferShutDown("relay: server shutting down", self.forwarded)
            )

    # --- idle detection --------------------------------------------------------------

    def _arm_idle(self) -> None:
        paused = [r.last_progress for r in self.live if self._lagging(r)]
        since = min(paused) if paused else self._last_progress
        self._deadline = self._timer.at(since + self.idle_timeout_s, self._idle_check)

    def _idle_check(self) -> None:
        self._deadline = None
        if self._finished:
            return
        now = self._timer.clock()
        for receiver in tuple(self.live):
            if self._lagging(receiver) and now - receiver.last_progress >= self.idle_timeout_s:
                self.drop(receiver, "idle timeout", "idle")
        if not self.live:
            return  # the last one went: the transfer has failed
        if self._pacer is not None and self._pacer.paused:
            self._last_progress = now  # held by pacing, not stalled
        holding = self._draining_tail or any(self._lagging(r) for r in self.live)
        if not holding and now - self._last_progress >= self.idle_timeout_s:
            self._fail(
                Input.IDLE_TIMEOUT,
                IdleTimeout(
                    f"relay: idle timeout: no bytes moved for {self.idle_timeout_s:g}s",
                    self.forwarded,
                ),
            )
            return
        self._arm_idle()

    # --- endings ---------------------------------------------------------------------

    def _end(self) -> None:
        self._finished = True
        for receiver in self.live:  # the dropped ones were observed then
            self._metrics.receivers_delivered.observe(receiver.delivered)
        if self._kernel is not None:
            # The dup'd sockets go first: only then do the transports own
            # the connections again (and a reset really ends them).
            self._kernel.close()
        if self._pacer is not None:
            self._pacer.close()
        self.relay.bytes = self.forwarded
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _succeed(self) -> None:
        self._end()
        total = len(self.receivers)
        delivered = len(self.live)
        if self._hasher is not None:
            self.relay.digest = self._hasher.hexdigest()
        for receiver in self.live:
            receiver.end.transfer_ended(None, True)
        if delivered == total:
            answer: dict[str, object] = {
                "bytes": self.forwarded,
                "status": "ok",
                "receivers": total,
                "delivered": delivered,
            }
            if self.relay.digest is not None:
                answer["sha256"] = self.relay.digest
            self.relay.finish(Input.UPLOAD_COMPLETE, None)
            body = COMPACT_JSON.encode(answer).encode()
            response = simple_response(200, "application/json", body, close=True)
        else:
            err = ReceiversFailed(total - delivered, total, self.forwarded)
            self.relay.finish(Input.DOWNLOAD_ABORTED, err)
            response = simple_response(err.status, err.content_type, err.body(), close=True)
        self.up.transfer_ended(response, True)

    def _fail(self, event: Input, err: TransferError) -> None:
        self._end()
        self._pinned.clear()  # aborted transports may still reference them
        self._buf = None
        self.relay.finish(event, err)
        for receiver in self.live:
            receiver.end.transfer_ended(None, False)
        self.up.transfer_ended(
            simple_response(err.status, err.content_type, err.body(), close=True), False
        )

    def __repr__(self) -> str:
        state = "finished" if self._finished else "streaming"
        return (
            f"<FanOut {state} forwarded={self.forwarded} "
            f"live={len(self.live)}/{len(self.receivers)} pinned={len(self._pinned)}>"
        )
