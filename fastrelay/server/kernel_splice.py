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
import ctypes
import ctypes.util
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
        self._pipe_r, self._pipe_w = _sized_pipe()
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
        self._stop_polling()
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
        """Neither socket is polled (paced: until `pace_ready`)."""
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
                want = pacer.cap(want)
                if not want:
                    self._paced = True  # in debt: pacer.on_ready -> pace_ready
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


# --- fan-out: splice(2) + tee(2) -------------------------------------------------------
#
# Python's os module has splice but no tee: it is called from libc through
# ctypes (one foreign call per receiver per batch of up to PIPE_BYTES, never
# per byte). Where libc has no tee the fan-out stays on the buffered path.


def _load_tee() -> Callable[[int, int, int, int], int] | None:
    if not AVAILABLE:
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.tee
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_size_t, ctypes.c_uint)
    fn.restype = ctypes.c_ssize_t
    return fn


_libc_tee = _load_tee()
TEE_AVAILABLE = _libc_tee is not None
_NONBLOCK = getattr(os, "SPLICE_F_NONBLOCK", 2)


def tee(fd_in: int, fd_out: int, count: int) -> int:
    """tee(2), non-blocking: duplicate up to ``count`` bytes at the head of
    pipe ``fd_in`` into pipe ``fd_out`` without consuming them."""
    assert _libc_tee is not None
    n = _libc_tee(fd_in, fd_out, count, _NONBLOCK)
    if n < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))  # EAGAIN: a BlockingIOError
    return n


class KernelTee:
    """Moves exactly ``length`` bytes from ``src`` to every one of ``dsts``.

    One batch at a time: ``splice`` up to a pipe's worth from ``src`` into
    the intake pipe, ``tee`` it into the pipe of every live receiver but
    the last and ``splice`` (move) it into the last one's, then ``splice``
    each receiver's pipe into its socket as the socket takes it. The next
    batch is read once every receiver's pipe is empty: the slowest
    receiver sets the pace, and memory is one batch of pages, shared by
    all pipes (tee copies page references, not bytes).

    Calls ``on_read(n)`` as bytes leave ``src``, ``on_sent(i, n)`` as they
    reach ``dsts[i]``, ``on_dst_error(i, exc)`` when receiver ``i`` fails
    (the owner then calls `drop`), and at the end exactly one of
    ``on_done()`` or ``on_src_error(exc | None)`` (EOF or reset).
    """

    __slots__ = (
        "_batch",
        "_closed",
        "_in_r",
        "_in_w",
        "_live",
        "_loop",
        "_on_done",
        "_on_dst_error",
        "_on_read",
        "_on_sent",
        "_on_src_error",
        "_paced",
        "_pacer",
        "_pending",
        "_pipes",
        "_reading",
        "_remaining",
        "_writing",
        "dsts",
        "src",
    )

    def __init__(
        self,
        src: socket.socket,
        dsts: list[socket.socket],
        length: int,
        on_read: Callable[[int], None],
        on_sent: Callable[[int, int], None],
        on_done: Callable[[], None],
        on_src_error: Callable[[OSError | None], None],
        on_dst_error: Callable[[int, OSError], None],
        pacer: Pacer | None = None,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self.src = src
        self.dsts = dsts
        self._remaining = length
        self._on_read = on_read
        self._on_sent = on_sent
        self._on_done = on_done
        self._on_src_error = on_src_error
        self._on_dst_error = on_dst_error
        self._pacer = pacer
        self._paced = False
        self._closed = False
        self._reading = False
        self._writing: set[int] = set()
        self._live = list(range(len(dsts)))
        self._pending = [0] * len(dsts)
        self._in_r, self._in_w = _sized_pipe()
        self._pipes = [_sized_pipe() for _ in dsts]
        # tee(2) must take a whole batch into an empty pipe: every pipe gets
        # the size the intake got, or the batch is the smallest of them.
        self._batch = min(
            fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ) for fd in (self._in_w, *(w for _, w in self._pipes))
        )

    def start(self) -> None:
        self._want_read()

    def pending(self, index: int) -> int:
        """Bytes of the current batch receiver ``index`` has not taken yet."""
        return self._pending[index]

    def drop(self, index: int) -> None:
        """Receiver ``index`` is out: close its pipe and socket; the others
        go on (its share of the batch no longer holds the next read)."""
        if self._closed or index not in self._live:
            return
        self._live.remove(index)
        if index in self._writing:
            self._writing.discard(index)
            self._loop.remove_writer(self.dsts[index].fileno())
        self._pending[index] = 0
        r, w = self._pipes[index]
        os.close(r)
        os.close(w)
        self.dsts[index].close()
        if self._live:
            self._batch_done()  # it may have been the one the others waited for

    def pace_ready(self) -> None:
        """The pacer's pause is over: read again once the batch is out."""
        self._paced = False
        if not self._closed and not self._reading:
            self._batch_done()

    def close(self) -> None:
        """Stop polling; close every pipe and dup'd socket. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._reading:
            self._loop.remove_reader(self.src.fileno())
            self._reading = False
        for index in self._writing:
            self._loop.remove_writer(self.dsts[index].fileno())
        self._writing.clear()
        os.close(self._in_r)
        os.close(self._in_w)
        for index in self._live:
            r, w = self._pipes[index]
            os.close(r)
            os.close(w)
            self.dsts[index].close()
        self._live.clear()
        self.src.close()

    def _want_read(self) -> None:
        if not self._reading:
            self._loop.add_reader(self.src.fileno(), self._on_readable)
            self._reading = True

    def _stop_reading(self) -> None:
        if self._reading:
            self._loop.remove_reader(self.src.fileno())
            self._reading = False

    def _on_readable(self) -> None:
        want = min(self._remaining, self._batch)
        pacer = self._pacer
        if pacer is not None:
            want = pacer.cap(want)
            if not want:
                self._paced = True  # in debt: pacer.on_ready -> pace_ready
                self._stop_reading()
                return
        try:
            n = os.splice(self.src.fileno(), self._in_w, want, flags=_FLAGS)
        except BlockingIOError:
            return
        except OSError as exc:
            self._fail_src(exc)
            return
        if n == 0:  # EOF before Content-Length: the upload was cut
            self._fail_src(None)
            return
        self._remaining -= n
        self._stop_reading()
        self._on_read(n)
        if pacer is not None and pacer.spent(n):
            self._paced = True
        if self._closed:
            return
        self._distribute(n)

    def _distribute(self, n: int) -> None:
        """The batch of ``n`` bytes in the intake goes to every live pipe."""
        live = self._live
        for index in live[:-1]:
            if tee(self._in_r, self._pipes[index][1], n) != n:
                raise OSError("tee(2) took part of a batch into an empty pipe")
            self._pending[index] = n
        last = live[-1]
        moved = 0
        while moved < n:  # the intake pipe is empty again after this
            moved += os.splice(self._in_r, self._pipes[last][1], n - moved, flags=_FLAGS)
        self._pending[last] = n
        for index in tuple(live):
            if index in self._live:
                self._drain(index)
        if not self._closed and not self._writing:
            self._batch_done()

    def _drain(self, index: int) -> None:
        """Move receiver ``index``'s pipe into its socket as far as it takes."""
        fd = self.dsts[index].fileno()
        pipe_r = self._pipes[index][0]
        while self._pending[index]:
            try:
                n = os.splice(pipe_r, fd, self._pending[index], flags=_FLAGS)
            except BlockingIOError:
                if index not in self._writing:
                    self._writing.add(index)
                    self._loop.add_writer(fd, self._on_writable, index)
                return
            except OSError as exc:
                self._on_dst_error(index, exc)  # the owner drops it
                return
            self._pending[index] -= n
            self._on_sent(index, n)
            if self._closed or index not in self._live:
                return
        if index in self._writing:
            self._writing.discard(index)
            self._loop.remove_writer(fd)

    def _on_writable(self, index: int) -> None:
        if self._closed or index not in self._live:
            return
        self._drain(index)
        if not self._closed and not self._writing:
            self._batch_done()

    def _batch_done(self) -> None:
        """Every live receiver has the batch: the next one, or the end."""
        if self._closed or self._writing or any(self._pending[i] for i in self._live):
            return  # a receiver still holds part of this batch
        if self._remaining == 0:
            self._finish()
        elif not self._paced:
            self._want_read()

    def _fail_src(self, exc: OSError | None) -> None:
        self.close()
        self._on_src_error(exc)

    def _finish(self) -> None:
        self.close()
        self._on_done()


def _sized_pipe() -> tuple[int, int]:
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    with contextlib.suppress(OSError):  # keep the default size if refused
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
    return r, w
