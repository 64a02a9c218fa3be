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

Resumable relays (`core/resume.py`): a transfer may start mid-body. Its
`Resumed` plan says where the destination is (``start``), how many upload
payload bytes to read and drop first (``skip``), whether the destination's
answer head is still to be sent (a new GET: ``200``/``206``) or already went
(the same response continues), and the upload's framer when the upload
itself is carried over. A break (one end lost, EOF, idle, superseded) on a
resumable relay does not fail it: `_break` tells `Relay.broke`, hands the
surviving end back to the relay (`TransferEnd.transfer_suspended`) with the
offset it is at, and this transfer is over. Success on a resumable relay
waits until the destination's TCP acknowledged the last byte (its socket's
send queue is empty, ``SIOCOUTQ``), so a break inside the last socket
buffer's worth stays resumable.

Paced relays (`pacing.Pacer`, when the relay has a rate): each upload read
takes at most what the pacer allows (`upload_buffer` hands out a shorter
view of the buffer), and after each read the pacer may hold the upload's
gate (`flow.PACING`, separate from backpressure's `flow.FLOW`) until its one
timer says go on. The splice(2) path asks the same pacer per call.

Endings: every way out goes through `_succeed`, `_fail` or `_break`, which
call `Relay.finish` (or `Relay.broke`) exactly once and then tell both ends. A failed transfer is
made visible to the receiver by its connection (`TransferEnd.transfer_ended`
with ``ok=False``): a TCP reset, never a clean close, so no client can take a
short body for a whole one.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import hashlib
import socket
import struct
import termios
from typing import TYPE_CHECKING, Literal, Protocol

from ..core import observe
from ..core.chunked import ChunkError
from ..core.config import RelayConfig
from ..core.deadlines import Deadline
from ..core.errors import (
    COMPACT_JSON,
    DownloadAborted,
    IdleTimeout,
    PayloadTooLarge,
    Superseded,
    TransferError,
    TransferShutDown,
    UploadAborted,
)
from ..core.framing import BodyFramer, Runs
from ..core.heads import (
    CONTINUE_100,
    RequestHead,
    download_head,
    last_chunk,
    simple_response,
)
from ..core.resume import copied_headers
from ..core.session import Input
from .flow import FLOW, BufferPool, ReadGate
from .kernel_splice import AVAILABLE as KERNEL_SPLICE_AVAILABLE
from .kernel_splice import KernelPipe, dup_transport_socket
from .pacing import PacedSource, Pacer
from .registry import WaitingEnd
from .timer import LoopTimer

if TYPE_CHECKING:
    from .registry import Relay

_CRLF = b"\r\n"

# How often a finished resumable transfer looks whether the destination's
# TCP acknowledged the tail (SIOCOUTQ). A loopback or LAN peer acks within
# a poll or two; the idle timeout bounds the wait.
ACK_POLL_S = 0.005


@dataclasses.dataclass(frozen=True, slots=True)
class Resumed:
    """How a transfer of a resumable relay starts (see the module docstring)."""

    start: int
    """The destination's offset: the first byte it receives from us now."""
    skip: int
    """Upload payload bytes to read and drop before forwarding."""
    length: int
    """``L``, the whole body's length."""
    copied: list[tuple[str, str]]
    """Headers of the destination's answer (the first PUT's)."""
    send_head: bool
    """The destination is a new GET: its answer's head goes first."""
    partial: bool
    """That GET asked for a Range: ``206`` with ``Content-Range``."""
    framer: BodyFramer | None
    """The upload's framer when the upload is carried over (else a new one)."""


class TransferEnd(WaitingEnd, Protocol):
    """One side of a transfer, as the transfer sees it (a connection; after
    a break of a resumable relay it waits again, hence `WaitingEnd`)."""

    @property
    def transport(self) -> asyncio.Transport: ...

    @property
    def gate(self) -> ReadGate: ...

    def transfer_ended(self, answer: bytes | None, ok: bool) -> None:
        """The transfer is over. The source gets ``answer`` (its whole HTTP
        response; ``ok`` means its body was read to the end); the destination
        gets ``answer=None`` and must reset its connection unless ``ok``."""

    def transfer_suspended(self, at: int, framer: BodyFramer | None) -> None:
        """A resumable relay broke on the other side: this end waits for a
        new partner, at offset ``at`` (the upload keeps its ``framer``)."""


class Transfer(PacedSource):
    __slots__ = (
        "_deadline",
        "_download_close",
        "_draining_tail",
        "_framer",
        "_hasher",
        "_head",
        "_kernel_pending",
        "_payload_at_start",
        "_pinned",
        "_reframe",
        "_resumed",
        "_skip",
        "_start",
        "_tail_sock",
        "down",
        "down_transport",
        "idle_timeout_s",
        "pins_buffers",
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
        down: TransferEnd,
        *,
        download_http10: bool,
        download_close: bool = False,
        pool: BufferPool,
        timer: LoopTimer,
        config: RelayConfig,
        resumed: Resumed | None = None,
        pacer: Pacer | None = None,
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
        self._resumed = resumed
        if resumed is None:
            self._framer = BodyFramer(up_head.content_length, up_head.chunked, relay.max_bytes)
            self._start = self._skip = 0
        else:
            # A resumable body's length was checked against max_bytes when
            # the PUT claimed its side; the framer only counts.
            self._framer = resumed.framer or BodyFramer(up_head.content_length, False)
            self._start, self._skip = resumed.start, resumed.skip
        self._payload_at_start = self._framer.payload
        self._tail_sock: socket.socket | None = None
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
        self._pacer = pacer
        if pacer is not None:
            pacer.on_ready = self._pace_ready
        # TLS transports copy (encrypt) inside write(); plain TCP ones pin.
        self.pins_buffers = self.down_transport.get_extra_info("sslcontext") is None
        up_plain = self.up_transport.get_extra_info("sslcontext") is None
        self._kernel: KernelPipe | None = None
        # --audit-digest: every payload run is hashed on its way out, so the
        # bytes must pass through Python (no splice(2)).
        self._hasher = hashlib.sha256() if config.audit_digest else None
        remaining = self._framer.remaining
        # splice(2) needs plain sockets on both ends and a known length (and
        # no bytes to drop first: those go through the buffered path).
        self._kernel_pending = (
            KERNEL_SPLICE_AVAILABLE
            and self._hasher is None
            and self._skip == 0
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
        """Payload bytes handed to the download transport so far; on a
        resumable relay, the destination's offset (bytes it had before this
        transfer included)."""
        return self._start + self._framer.payload - self._payload_at_start - self._skipped

    @property
    def _skipped(self) -> int:
        resumed = self._resumed
        return 0 if resumed is None else resumed.skip - self._skip

    def start(self, body_prefix: bytes) -> None:
        """Send the download's head and whatever body arrived while the PUT waited."""
        head = self.up_head
        resumed = self._resumed
        if resumed is not None:
            if resumed.send_head:
                self._head = download_head(
                    resumed.copied,
                    resumed.length - resumed.start,
                    close=self._download_close,
                    content_range=(resumed.start, resumed.length) if resumed.partial else None,
                )
        else:
            # A PUT with neither Content-Length nor chunked framing has an
            # empty body (RFC 9112 §6.3): the GET must then say
            # Content-Length: 0, not promise chunks that never come.
            length = None if head.chunked else (head.content_length or 0)
            copied = copied_headers(head)
            # The head leaves with the first payload bytes when they are
            # already here (a small upload often is whole): one write.
            self._head = download_head(
                copied,
                length,
                close_delimited=head.chunked and not self._reframe,
                close=self._download_close,
            )
        if head.expect_continue and not body_prefix and (resumed is None or resumed.framer is None):
            self.up_transport.write(CONTINUE_100)
        self._arm_idle()
        if body_prefix:
            self._forward(memoryview(body_prefix))
            self._paced(len(body_prefix))
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
            self._pacer,
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

    def upload_received(self, nbytes: int) -> None:
        buf = self._buf
        assert buf is not None
        self._last_progress = self._timer.clock()
        self._forward(buf[:nbytes])
        if self._pacer is not None:
            self._paced(nbytes)
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
        if self._finished:
            return
        if self._break("PUT", "the upload ended before the body was complete"):
            err = UploadAborted("relay: upload ended before the body was complete", self.forwarded)
            self.up.transfer_ended(_error_answer(err), False)
            return
        if not self._finished:
            self._fail(
                Input.UPLOAD_ABORTED,
                UploadAborted("relay: upload ended before the body was complete", self.forwarded),
            )

    def upload_lost(self, exc: Exception | None) -> None:
        if not self._finished:
            why = f": {exc}" if exc else ""
            if self._break("PUT", f"upload connection lost{why}"):
                return
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
        if self._skip:
            # Resumed: the destination has these bytes already. Drop them.
            dropped = min(self._skip, total)
            self._skip -= dropped
            runs = _drop(runs, dropped)
            total -= dropped
        if not self._write_payload(view, runs, total):
            return  # the destination was gone (`_send`)
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

    def _write_payload(self, view: memoryview, runs: Runs, total: int) -> bool:
        """One write (or one outgoing chunk) for all payload runs of one read.
        False if the destination turned out to be gone (`_send`)."""
        if not total:
            return True
        hasher = self._hasher
        if hasher is not None:
            for start, end in runs:
                hasher.update(view[start:end])
        if len(runs) == 1 and not self._reframe:
            start, end = runs[0]
            return self._send(view[start:end])
        parts: list[bytes | memoryview] = [b"%x\r\n" % total] if self._reframe else []
        parts.extend(view[start:end] for start, end in runs)
        if self._reframe:
            parts.append(_CRLF)
        return self._send(*parts)

    def _send(self, *parts: bytes | memoryview) -> bool:
        """Write ``parts`` to the download, after the head if it is still ours.
        False if the destination is gone (then it has been handled as lost)."""
        if self.down_transport.is_closing():
            # The destination's connection is gone, and its protocol has not
            # heard yet (a TLS transport learns of a reset first, discards
            # what it is given with a warning, and tells us a loop turn or
            # more later): without this, a fast source could finish into the
            # void and be told "ok". It is a loss, now.
            self.download_lost(None)
            return False
        head = self._head
        if head is not None:
            self._head = None
            parts = (head, *parts)
        if len(parts) == 1:
            self.down_transport.write(parts[0])
        elif parts:
            self.down_transport.writelines(parts)
        return True

    def _upload_complete(self) -> None:
        if not self._send():  # an empty body still has its head
            return
        self.up_gate.pause()
        if self.pins_buffers and self.down_transport.get_write_buffer_size():
            self._draining_tail = True  # resume_writing finishes it
        else:
            self._tail_handed_over()

    def _tail_handed_over(self) -> None:
        """Every byte is with the download's transport (or its socket)."""
        if self._resumed is None:
            self._succeed()  # v1: handed over is done
            return
        # Resumable: done once the destination's TCP acknowledged the tail.
        # We look through a dup of its socket: a peer that read everything
        # and then resets (HAProxy closing its server side does) must count
        # as done, and after the reset only a dup can still tell what was
        # acknowledged (the reset purges the queue, not the count).
        self._draining_tail = True
        if self._tail_sock is None:
            self._tail_sock = dup_transport_socket(self.down_transport)
        self._check_acked()

    def _check_acked(self) -> None:
        if self._finished:
            return
        if self.down_transport.get_write_buffer_size() == 0 and self._tail_acked():
            self._succeed()
            return
        self._timer.after(ACK_POLL_S, self._check_acked)

    def _tail_acked(self) -> bool:
        if self.down_transport.is_closing():
            return False  # gone: download_lost decides (through the dup)
        sock = self._tail_sock
        return sock is None or _unacked(sock) == 0

    def download_eof(self) -> None:
        """The destination half-closed. After the last byte that is how a
        client that read everything may say goodbye: its FIN comes after its
        acknowledgements, so look now rather than at the next poll."""
        if self._draining_tail and self._resumed is not None and not self._finished:
            self._check_acked()

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
            self._tail_handed_over()
        elif self._kernel_pending:
            self._engage_kernel()
        elif self._kernel is None:
            self.up_gate.resume()

    def download_lost(self, exc: Exception | None) -> None:
        if (
            self._draining_tail
            and self._resumed is not None
            and self._tail_sock is not None
            and not self._finished
            and _unacked(self._tail_sock) == 0
        ):
            self._succeed()  # it had every byte, then left
            return
        if not self._finished:
            why = str(exc) if exc else "connection closed by peer"
            if self._break("GET", f"download connection lost: {why}"):
                return
            self._fail(
                Input.DOWNLOAD_ABORTED,
                DownloadAborted(f"relay: download connection lost: {why}", self.forwarded),
            )

    def supersede(self, side: Literal["PUT", "GET"]) -> None:
        """A newer request takes ``side`` of this resumable relay over: that
        end breaks now, and its connection is closed."""
        if self._finished:
            return
        gone = self.up if side == "PUT" else self.down
        err = Superseded(f"relay: {side} side taken over by a newer request", self.forwarded)
        if not self._break(side, "superseded by a newer request"):
            self._fail(Input.UPLOAD_ABORTED if side == "PUT" else Input.DOWNLOAD_ABORTED, err)
            return
        gone.transfer_ended(None if side == "GET" else _error_answer(err), False)

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
        pacer = self._pacer
        if pacer is not None and pacer.paused:
            # Held by pacing, not stalled (a debt can outlast the timeout).
            self._last_progress = self._timer.clock()
        if self._timer.clock() - self._last_progress >= self.idle_timeout_s:
            # A resumable relay: the stalled side (the destination when it
            # holds us paused or has not acked the tail, else the source)
            # broke; the other waits for its return.
            stalled: Literal["PUT", "GET"] = (
                "GET" if self._draining_tail or self.up_gate.held(FLOW) else "PUT"
            )
            if self._break(stalled, "idle timeout"):
                if stalled == "PUT":
                    err = IdleTimeout("relay: idle timeout", self.forwarded)
                    self.up.transfer_ended(_error_answer(err), False)
                else:
                    self.down.transfer_ended(None, False)
                return
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

    def _break(self, side: Literal["PUT", "GET"], why: str) -> bool:
        """A resumable relay lost ``side``: hand the surviving end back to the
        relay to wait for a new partner. False if the relay cannot resume
        (not resumable, or out of breaks): the caller fails it as v1 does."""
        relay = self.relay
        if self._resumed is None or self._finished or not relay.can_resume():
            return False
        kernel = self._kernel
        in_pipe = kernel.in_pipe if kernel is not None else 0
        self._end()
        self._pinned.clear()  # the lost transport may still reference them
        self._buf = None
        survivor = self.down if side == "PUT" else self.up
        framer = self._framer
        if side == "GET" and in_pipe:
            # Taken from the source inside the kernel pipe, then lost with
            # the destination: the upload is past them.
            framer.skip_known_length(in_pipe)
        upload_at = self._upload_base + framer.payload
        at = self.forwarded if side == "PUT" else upload_at
        record = relay.record
        if record is not None and side == "PUT":
            record.point = at
        alive = not survivor.transport.is_closing()
        relay.broke(side, survivor if alive else None)
        observe.log_break(relay, side, at, why)
        if alive:
            survivor.transfer_suspended(at, framer if side == "GET" else None)
        return True

    @property
    def _upload_base(self) -> int:
        """The offset of the upload's first body byte (its Content-Range)."""
        resumed = self._resumed
        if resumed is None:
            return 0
        return resumed.length - (self._framer.payload + (self._framer.remaining or 0))

    def _end(self) -> None:
        self._finished = True
        if self._pacer is not None:
            self._pacer.close()
        if self._tail_sock is not None:
            self._tail_sock.close()
            self._tail_sock = None
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
        if self._resumed is not None:
            answer["resumes"] = self.relay.breaks
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


def _drop(runs: Runs, count: int) -> Runs:
    """``runs`` without their first ``count`` payload bytes."""
    kept: Runs = []
    for start, end in runs:
        if count >= end - start:
            count -= end - start
            continue
        kept.append((start + count, end))
        count = 0
    return kept


def _unacked(sock: socket.socket) -> int:
    """Bytes the destination's TCP has not acknowledged (``SIOCOUTQ``); 0
    when the socket cannot tell (then handed over is the best we know)."""
    with contextlib.suppress(OSError, TypeError, AttributeError, ValueError):
        raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
        return int(struct.unpack("i", raw)[0])
    return 0


def _error_answer(err: TransferError) -> bytes:
    return simple_response(err.status, err.content_type, err.body(), close=True)
