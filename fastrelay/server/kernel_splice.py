"""The Linux ``splice(2)`` fast path for plain-TCP Content-Length uploads.

Theory of operation
-------------------
For a plaintext upload of known length to a plaintext download, the bytes
need not enter Python at all: ``splice(upload socket -> pipe)`` then
``splice(pipe -> download socket)`` moves pages inside the kernel. Measured
on the 2-core box (docs/runtime-facts.md §2, §4): relay CPU drops from ~0.33-0.43 to
~0.25 s/GiB; end-to-end MB/s is about the same because the clients saturate
the cores.

The hand-over from the transports (docs/runtime-facts.md §4, verified on uvloop and
asyncio) is strictly sequential, and `transfer.Transfer` drives it:

1. the upload transport's reading is paused (from a callback, never from
   ``get_buffer``), so no byte is read by the transport after this point;
2. everything already received has been written to the download transport,
   and we wait until its write buffer is empty (``resume_writing`` with
   ``high=0``): transport writes and raw-fd writes must never interleave;
3. both sockets are ``dup()``-ed; the dups are what we poll and splice. The
   transports stay open and paused, untouched, until the end;
4. at the end the dups are closed first, then the transports are used again
   to answer the source and close (or abort) the destination as usual.

Readiness uses ``loop.add_reader``/``add_writer`` on the dup'd descriptors
(the transports' own fds are refused by both loops). The pipe is sized to
1 MiB when the system allows it; each ``splice`` is capped at the bytes the
Content-Length still allows, so the byte count and ``max_bytes`` hold
exactly as on the buffered path.

A paced relay (`pacing.Pacer`) caps each ``splice`` from the source at what
its bucket allows; when the bucket is low the pipe is drained and then
neither socket is polled until the pacer's one timer calls `pace_ready`.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .pacing import Pacer

PIPE_BYTES = 1024 * 1024
_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)

AVAILABLE = hasattr(os, "splice") and hasattr(fcntl, "F_SETPIPE_SZ")


def dup_transport_socket(transport: asyncio.BaseTransport) -> socket.socket | None:
    """A real, non-blocking socket on a new fd for the transport's connection."""
    sock: Any = transport.get_extra_info("socket")
    if sock is None or not hasattr(sock, "dup"):
        return None
    try:
        dup: socket.socket = sock.dup()
    except (OSError, TypeError):
        return None
    dup.setblocking(False)
    return dup


class KernelPipe:
    """Moves exactly ``length`` bytes from ``src`` to ``dst`` with splice(2).

    Calls ``on_progress(n)`` as bytes reach ``dst``, then exactly one of
    ``on_done()``, ``on_src_error(exc | None)`` (EOF or reset on the upload),
    ``on_dst_error(exc)``.
    """

    __slots__ = (
        "_closed",
        "_in_pipe",
        "_loop",
        "_on_done",
        "_on_dst_error",
        "_on_progress",
        "_on_src_error",
        "_paced",
        "_pacer",
        "_pipe_r",
        "_pipe_w",
        "_reading",
        "_remaining",
        "_writing",
        "dst",
        "src",
    )

    def __init__(
        self,
        src: socket.socket,
        dst: socket.socket,
        length: int,
        on_progress: Callable[[int], None],
        on_done: Callable[[], None],
        on_src_error: Callable[[OSError | None], None],
        on_dst_error: Callable[[OSError], None],
        pacer: Pacer | None = None,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self.src = src
        self.dst = dst
        self._remaining = length  # bytes still to read from src
        self._in_pipe = 0
        self._on_progress = on_progress
        self._on_done = on_done
        self._on_src_error = on_src_error
        self._on_dst_error = on_dst_error
        self._pipe_r, self._pipe_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        with contextlib.suppress(OSError):  # keep the default size if refused
            fcntl.fcntl(self._pipe_w, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        self._reading = False
        self._writing = False
        self._closed = False
        self._pacer = pacer
        self._paced = False  # the pacer said stop reading: wait for pace_ready

    def start(self) -> None:
        self._want_read()

    @property
    def in_pipe(self) -> int:
        """Bytes read from ``src`` that have not reached ``dst`` (lost if we
        close now): a resumable relay counts them as taken from the source."""
        return self._in_pipe

    def close(self) -> None:
        """Stop polling, close the pipe and both dup'd sockets. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._reading:
            self._loop.remove_reader(self.src.fileno())
        if self._writing:
            self._loop.remove_writer(self.dst.fileno())
        self._reading = self._writing = False
        os.close(self._pipe_r)
        os.close(self._pipe_w)
        self.src.close()
        self.dst.close()

    def pace_ready(self) -> None:
        """The pacer's pause is over: read again (after any write under way)."""
        self._paced = False
        if not self._closed and not self._writing:
            self._want_read()

    def _stop_polling(self) -> None:
        """Paced: neither socket is polled until `pace_ready`."""
        if self._reading:
            self._loop.remove_reader(self.src.fileno())
            self._reading = False
        if self._writing:
            self._loop.remove_writer(self.dst.fileno())
            self._writing = False

    def _want_read(self) -> None:
        if self._writing:
            self._loop.remove_writer(self.dst.fileno())
            self._writing = False
        if not self._reading:
            self._loop.add_reader(self.src.fileno(), self._on_readable)
            self._reading = True

    def _want_write(self) -> None:
        if self._reading:
            self._loop.remove_reader(self.src.fileno())
            self._reading = False
        if not self._writing:
            self._loop.add_writer(self.dst.fileno(), self._on_writable)
            self._writing = True

    def _on_readable(self) -> None:
        src_fd = self.src.fileno()
        pacer = self._pacer
        while self._remaining and not self._paced:
            want = min(self._remaining, PIPE_BYTES)
            if pacer is not None:
                want = min(want, pacer.allowance())
                if want <= 0:
                    # In debt (bytes read before the splice began): the
                    # pacer's timer says when to go on.
                    pacer.spent(0)
                    self._paced = True
                    break
            try:
                n = os.splice(src_fd, self._pipe_w, want, flags=_FLAGS)
            except BlockingIOError:
                # Either the socket has nothing more or the pipe is full.
                break
            except OSError as exc:
                self._fail_src(exc)
                return
            if n == 0:  # EOF before Content-Length: the upload was cut
                self._fail_src(None)
                return
            self._remaining -= n
            self._in_pipe += n
            if pacer is not None and pacer.spent(n):
                self._paced = True  # pacer.on_ready -> pace_ready
            if not self._drain():
                return
        if self._closed:
            return
        if self._in_pipe:
            self._want_write()
        elif self._remaining == 0:
            self._finish()
        elif self._paced:
            self._stop_polling()

    def _on_writable(self) -> None:
        if self._drain():
            if self._remaining == 0:
                self._finish()
            elif self._paced:
                self._stop_polling()
            else:
                self._want_read()

    def _drain(self) -> bool:
        """Empty the pipe into dst. False if dst is full (now polled) or failed."""
        dst_fd = self.dst.fileno()
        while self._in_pipe:
            try:
                n = os.splice(self._pipe_r, dst_fd, self._in_pipe, flags=_FLAGS)
            except BlockingIOError:
                self._want_write()
                return False
            except OSError as exc:
                self.close()
                self._on_dst_error(exc)
                return False
            self._in_pipe -= n
            self._on_progress(n)
        return True

    def _fail_src(self, exc: OSError | None) -> None:
        self.close()
        self._on_src_error(exc)

    def _finish(self) -> None:
        self.close()
        self._on_done()
