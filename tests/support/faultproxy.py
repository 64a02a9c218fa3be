"""A fault-injecting TCP proxy for breaking real connections at an exact byte.

`FaultProxy` listens on 127.0.0.1 (an ephemeral port) and forwards each
accepted connection to a target ``(host, port)``. Every connection gets a
`Fault` plan, chosen when it is accepted: from a queue (a sequence, consumed
in accept order, then ``default``) or from a callable ``plan(index)``. The
proxy works on TCP bytes, so TLS passes through untouched::

    with FaultProxy(relay.address, [reset_after(100_000, "up"), NO_FAULT]) as proxy:
        put(proxy.url, body)               # connection 0: broken after 100000 bytes
        proxy.wait_faulted(0, timeout=10)
        assert proxy.connection(0).up_bytes == 100_000
        put(proxy.url, body, resume=True)  # connection 1: forwarded untouched

Faults, counted per direction ("up" is client -> target, "down" is
target -> client):

- `reset_after`: forward exactly n bytes, wait until the receiver's kernel
  has acknowledged them, then reset both sides (SO_LINGER 0 + close: each
  peer sees ECONNRESET, not a FIN).
- `close_after`: forward exactly n bytes, then a clean close of both sides
  (a FIN each way; what the peers still send is read and discarded so that
  the close stays clean instead of turning into a reset).
- `silence_after`: forward exactly n bytes, then forward nothing more either
  way and keep both sockets open (a dead network: no FIN, no RST) until
  `FaultProxy.release` or `FaultProxy.close`. To the applications it is a
  dead network; to the peers' TCP it is not quite one: the proxy's kernel
  still acknowledges what fits in its receive buffer, then advertises a
  zero window and answers window probes and keepalives. So an application
  deadline fires, but TCP-level timers (TCP_USER_TIMEOUT, retransmission
  give-up, keepalive) do not. For a link that drops every packet, use
  tests/support/netns.py.

The proxy runs one asyncio selector loop in a background thread. Each
direction reads at most ``bufsize`` bytes, and never more than what remains
before its fault point (so the bytes past it are never even consumed), and
writes them out completely before it reads again: memory stays bounded and
a slow reader slows the writer down through TCP flow control.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import fcntl
import socket
import struct
import termios
import threading
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Literal, Self

Direction = Literal["up", "down"]
FaultKind = Literal["none", "reset", "close", "silence"]
ReleaseHow = Literal["reset", "close"]

_DIRECTIONS: tuple[Direction, Direction] = ("up", "down")


@dataclasses.dataclass(frozen=True)
class Fault:
    """What to do to one connection: ``kind`` after ``after`` bytes went ``direction``."""

    kind: FaultKind = "none"
    after: int = 0
    direction: Direction = "up"

    def __post_init__(self) -> None:
        if self.kind not in ("none", "reset", "close", "silence"):
            raise ValueError(f"unknown fault kind {self.kind!r}")
        if self.direction not in _DIRECTIONS:
            raise ValueError(f"direction must be 'up' or 'down', not {self.direction!r}")
        if self.after < 0:
            raise ValueError(f"byte count must be >= 0, not {self.after}")

    def __str__(self) -> str:
        if self.kind == "none":
            return "no fault"
        return f"{self.kind} after {self.after} bytes {self.direction}"


NO_FAULT = Fault()


def reset_after(n: int, direction: Direction = "up") -> Fault:
    """Forward exactly ``n`` bytes in ``direction``, then reset both sides."""
    return Fault("reset", n, direction)


def close_after(n: int, direction: Direction = "up") -> Fault:
    """Forward exactly ``n`` bytes in ``direction``, then close both sides cleanly (FIN)."""
    return Fault("close", n, direction)


def silence_after(n: int, direction: Direction = "up") -> Fault:
    """Forward exactly ``n`` bytes in ``direction``, then nothing either way; sockets stay open."""
    return Fault("silence", n, direction)


FaultPlans = Iterable[Fault] | Callable[[int], Fault]


class ProxyWaitError(AssertionError):
    """A `FaultProxy` wait did not see its condition (deadline passed, or it can no longer happen)."""


class ProxiedConnection:
    """One accepted connection: its plan, byte counters and state.

    Counters are bytes handed to the receiving socket (``up_bytes``: to the
    target; ``down_bytes``: to the client). The loop thread updates them under
    the proxy's lock; reading one from another thread is safe.
    """

    def __init__(self, index: int, fault: Fault, client: socket.socket) -> None:
        self.index = index
        self.fault = fault
        self.up_bytes = 0
        self.down_bytes = 0
        # Bytes read and thrown away after a clean close (see `close_after`).
        self.discarded_bytes = 0
        self.faulted = False
        self.closed = False
        # Why the connection ended abnormally, when it was not the planned fault
        # (upstream connect refused, a peer's own reset, an undelivered reset...).
        self.error: str | None = None
        self._client = client
        self._upstream: socket.socket | None = None
        self._pumps: dict[Direction, asyncio.Task[str]] = {}
        self._release = asyncio.Event()
        self._release_how: ReleaseHow = "reset"

    def forwarded(self, direction: Direction) -> int:
        return self.up_bytes if direction == "up" else self.down_bytes

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return (
            f"<connection {self.index} [{self.fault}] up={self.up_bytes} down={self.down_bytes}"
            f" faulted={self.faulted} {state} error={self.error!r}>"
        )


def _unacked_bytes(sock: socket.socket) -> int:
    """Bytes in the socket's send queue not yet acknowledged by the peer (Linux SIOCOUTQ)."""
    try:
        raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    except OSError:
        return 0
    return int(struct.unpack("i", raw)[0])


class FaultProxy:
    """A TCP proxy on 127.0.0.1 that breaks connections according to per-connection plans.

    ``plans``: a sequence of `Fault` (connection 0 gets the first, and so
    on; connections past the end get ``default``) or a callable taking the
    0-based accept index and returning the `Fault`. More plans can be queued
    with `enqueue`.
    """

    def __init__(
        self,
        target: tuple[str, int],
        plans: FaultPlans = (),
        *,
        default: Fault = NO_FAULT,
        bufsize: int = 64 * 1024,
        connect_timeout: float = 5.0,
        deliver_timeout: float = 5.0,
        linger_timeout: float = 5.0,
    ) -> None:
        if bufsize <= 0:
            raise ValueError("bufsize must be positive")
        self.target = target
        self._plan_fn: Callable[[int], Fault] | None = None
        self._queue: collections.deque[Fault] = collections.deque()
        if callable(plans):
            self._plan_fn = plans
        else:
            self._queue.extend(plans)
        self._default = default
        self._bufsize = bufsize
        self._connect_timeout = connect_timeout
        self._deliver_timeout = deliver_timeout
        self._linger_timeout = linger_timeout

        # One lock for all state shared with the test thread; its condition is
        # notified on every change (accept, bytes, fault, close) so waits poll nothing.
        self._cond = threading.Condition()
        self._conns: list[ProxiedConnection] = []
        self._closed = False

        # Bind before the thread starts so `port` is valid as soon as we return.
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.setblocking(False)
        self.port: int = self._listener.getsockname()[1]
        self.address: tuple[str, int] = ("127.0.0.1", self.port)
        self.url = f"http://127.0.0.1:{self.port}"

        # The plain selector loop, not uvloop: its sock_* calls and add_writer
        # behave the same everywhere, and no event loop policy leaks in.
        self._loop = asyncio.SelectorEventLoop()
        self._tasks: set[asyncio.Task[None]] = set()
        self._accept_task: asyncio.Task[None] | None = None
        started = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(started,), name=f"faultproxy:{self.port}", daemon=True
        )
        self._thread.start()
        started.wait()

    # --- the test thread's side ------------------------------------------------

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def enqueue(self, *faults: Fault) -> None:
        """Append plans for the connections not yet accepted (queue mode only)."""
        if self._plan_fn is not None:
            raise TypeError("this proxy chooses plans with a callable; it has no queue")
        with self._cond:
            self._queue.extend(faults)

    @property
    def connections(self) -> list[ProxiedConnection]:
        """The connections accepted so far, in accept order."""
        with self._cond:
            return list(self._conns)

    def connection(self, index: int) -> ProxiedConnection:
        with self._cond:
            return self._conns[index]

    def wait_connection(self, index: int, timeout: float) -> ProxiedConnection:
        """Wait until connection ``index`` (0-based, accept order) has been accepted."""
        return self._wait(index, timeout, "accepted", lambda c: True)

    def wait_bytes(
        self, index: int, direction: Direction, n: int, timeout: float
    ) -> ProxiedConnection:
        """Wait until connection ``index`` has forwarded at least ``n`` bytes ``direction``."""
        return self._wait(
            index, timeout, f"{n} bytes {direction}", lambda c: c.forwarded(direction) >= n
        )

    def wait_faulted(self, index: int, timeout: float) -> ProxiedConnection:
        """Wait until connection ``index`` has hit its fault.

        For a reset, both resets have been sent; for a close, both FINs; for a
        silence, forwarding has stopped. Raises `ProxyWaitError` at the
        deadline, or as soon as the connection ends without faulting.
        """
        conn = self._wait(index, timeout, "its fault", lambda c: c.faulted or c.closed)
        if not conn.faulted:
            raise ProxyWaitError(f"connection ended without hitting its fault: {conn!r}")
        return conn

    def wait_closed(self, index: int, timeout: float) -> ProxiedConnection:
        """Wait until connection ``index`` is over (both sockets closed; counters final)."""
        return self._wait(index, timeout, "closed", lambda c: c.closed)

    def release(self, index: int | None = None, how: ReleaseHow = "reset") -> None:
        """End silenced connections (``index``, or all of them): a reset, or a clean close.

        A reset is the default because that is what a peer meets when a dead
        link comes back after the other end has given up.
        """
        with self._cond:
            if index is None:
                targets = [c for c in self._conns if c.fault.kind == "silence" and c.faulted]
            else:
                conn = self._conns[index]
                if not (conn.fault.kind == "silence" and conn.faulted):
                    raise ValueError(f"connection {index} is not silenced: {conn!r}")
                targets = [conn]
        for conn in targets:
            self._loop.call_soon_threadsafe(self._do_release, conn, how)

    def close(self, timeout: float = 10.0) -> None:
        """Close the listener and every connection still open (with a reset); stop the thread."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
        if self._thread.is_alive():
            future = asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop)
            future.result(timeout)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout)
        with self._cond:
            self._cond.notify_all()

    def _wait(
        self,
        index: int,
        timeout: float,
        what: str,
        predicate: Callable[[ProxiedConnection], bool],
    ) -> ProxiedConnection:
        def ready() -> bool:
            return index < len(self._conns) and predicate(self._conns[index])

        with self._cond:
            if not self._cond.wait_for(ready, timeout):
                seen = repr(self._conns[index]) if index < len(self._conns) else "not accepted"
                raise ProxyWaitError(
                    f"connection {index}: {what} not reached within {timeout}s (saw: {seen})"
                )
            return self._conns[index]

    # --- the loop thread's side --------------------------------------------------

    def _run(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        self._accept_task = self._loop.create_task(self._accept_loop())
        self._loop.call_soon(started.set)
        try:
            self._loop.run_forever()
        finally:
            self._loop.close()

    def _update(self, conn: ProxiedConnection, **changes: object) -> None:
        with self._cond:
            for name, value in changes.items():
                setattr(conn, name, value)
            self._cond.notify_all()

    def _count(self, conn: ProxiedConnection, direction: Direction, n: int) -> None:
        with self._cond:
            if direction == "up":
                conn.up_bytes += n
            else:
                conn.down_bytes += n
            self._cond.notify_all()

    def _next_fault(self, index: int) -> Fault:
        with self._cond:
            if self._plan_fn is not None:
                fault = self._plan_fn(index)
            elif self._queue:
                fault = self._queue.popleft()
            else:
                fault = self._default
        if not isinstance(fault, Fault):
            raise TypeError(f"plan for connection {index} is not a Fault: {fault!r}")
        return fault

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                client, _ = await loop.sock_accept(self._listener)
            except OSError:
                # Out of descriptors or a connection aborted before accept:
                # keep serving the ones that come next, without spinning on
                # an error that repeats (EMFILE) until a descriptor frees up.
                await asyncio.sleep(0.01)
                continue
            client.setblocking(False)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._cond:
                index = len(self._conns)
            try:
                fault = self._next_fault(index)
            except Exception as exc:
                # A broken plan must show up in the test, not kill the proxy.
                fault = NO_FAULT
                error: str | None = f"plan failed: {exc!r}"
            else:
                error = None
            conn = ProxiedConnection(index, fault, client)
            conn.error = error
            with self._cond:
                self._conns.append(conn)
                self._cond.notify_all()
            if error is not None:
                self._abort(client)
                self._update(conn, closed=True)
                continue
            task = loop.create_task(self._serve(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _shutdown(self) -> None:
        if self._accept_task is not None:
            self._accept_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accept_task
        self._listener.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _serve(self, conn: ProxiedConnection) -> None:
        loop = asyncio.get_running_loop()
        try:
            try:
                host, port = self.target
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
                family, _, proto, _, addr = infos[0]
                upstream = socket.socket(family, socket.SOCK_STREAM, proto)
                conn._upstream = upstream
                upstream.setblocking(False)
                await asyncio.wait_for(loop.sock_connect(upstream, addr), self._connect_timeout)
            except (OSError, TimeoutError) as exc:
                # The client sees what it would see from a dead target: a reset.
                self._update(conn, error=f"connect to {self.target} failed: {exc!r}")
                return
            upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await self._relay(conn)
        finally:
            # Normal ends have closed both sockets already; this resets whatever
            # is still open (connect failure, proxy closing, a bug).
            self._abort(conn._client)
            if conn._upstream is not None:
                self._abort(conn._upstream)
            self._update(conn, closed=True)

    async def _relay(self, conn: ProxiedConnection) -> None:
        fault = conn.fault
        if fault.kind != "none" and fault.after == 0:
            # Fault before any byte: start no pump, so not one byte moves either way.
            await self._apply_fault(conn)
            return
        loop = asyncio.get_running_loop()
        pumps = conn._pumps
        for direction in _DIRECTIONS:
            pumps[direction] = loop.create_task(self._pump(conn, direction))
        try:
            pending: set[asyncio.Task[str]] = set(pumps.values())
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                outcomes = {t.result() for t in done if not t.cancelled()}
                if "fault" in outcomes:
                    # The faulting pump has cancelled the other one already.
                    await asyncio.gather(*pending, return_exceptions=True)
                    await self._apply_fault(conn)
                    return
                if "error" in outcomes:
                    # A peer reset us or vanished: pass that on as a reset.
                    for task in pending:
                        task.cancel()
                    await asyncio.gather(*pending, return_exceptions=True)
                    return
            # Both directions ended with a FIN, each passed on: a normal end.
            self._close(conn._client)
            assert conn._upstream is not None
            self._close(conn._upstream)
        finally:
            for task in pumps.values():
                task.cancel()
            await asyncio.gather(*pumps.values(), return_exceptions=True)

    def _ends(self, conn: ProxiedConnection, direction: Direction) -> tuple[socket.socket, ...]:
        assert conn._upstream is not None
        if direction == "up":
            return conn._client, conn._upstream
        return conn._upstream, conn._client

    async def _pump(self, conn: ProxiedConnection, direction: Direction) -> str:
        """Forward one direction until EOF ("eof"), its fault point ("fault") or an error."""
        loop = asyncio.get_running_loop()
        src, dst = self._ends(conn, direction)
        fault = conn.fault
        limit = fault.after if fault.kind != "none" and fault.direction == direction else None
        # One fixed buffer per direction, reused: a read waits until the previous
        # one has been written out completely, so it is never overwritten early.
        buffer = memoryview(bytearray(self._bufsize))
        try:
            while True:
                size = self._bufsize
                if limit is not None:
                    # Never read past the fault point: the n-th byte ends a read,
                    # so exactly n bytes are forwarded, and the rest stays unread.
                    size = min(size, limit - conn.forwarded(direction))
                received = await loop.sock_recv_into(src, buffer[:size])
                if not received:
                    # Half-close: pass the FIN on, keep the other direction going.
                    with contextlib.suppress(OSError):
                        dst.shutdown(socket.SHUT_WR)
                    return "eof"
                await self._send_all(conn, dst, buffer[:received], direction)
                if limit is not None and conn.forwarded(direction) >= limit:
                    # Stop the other direction now, synchronously, so that not one
                    # more byte moves there between the fault point and the fault.
                    other = conn._pumps["down" if direction == "up" else "up"]
                    other.cancel()
                    return "fault"
        except OSError as exc:
            self._update(conn, error=f"{direction}: {exc!r}")
            return "error"

    async def _send_all(
        self, conn: ProxiedConnection, dst: socket.socket, view: memoryview, direction: Direction
    ) -> None:
        # Our own loop rather than loop.sock_sendall: it counts each partial
        # send, so the counters stay exact even when a pump is cancelled mid-write.
        while view:
            try:
                sent = dst.send(view)
            except (BlockingIOError, InterruptedError):
                await self._writable(dst)
                continue
            view = view[sent:]
            self._count(conn, direction, sent)

    async def _writable(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        fd = sock.fileno()

        def wake() -> None:
            if not waiter.done():
                waiter.set_result(None)

        loop.add_writer(fd, wake)
        try:
            await waiter
        finally:
            loop.remove_writer(fd)

    async def _apply_fault(self, conn: ProxiedConnection) -> None:
        fault = conn.fault
        upstream = conn._upstream
        assert upstream is not None
        if fault.kind == "reset":
            _, dst = self._ends(conn, fault.direction)
            await self._wait_delivered(conn, dst)
            self._abort(conn._client)
            self._abort(upstream)
            self._update(conn, faulted=True)
        elif fault.kind == "close":
            for sock in (conn._client, upstream):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_WR)
            self._update(conn, faulted=True)
            await self._drain_and_close(conn)
        elif fault.kind == "silence":
            self._update(conn, faulted=True)
            await conn._release.wait()
            if conn._release_how == "close":
                for sock in (conn._client, upstream):
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_WR)
                await self._drain_and_close(conn)
            else:
                self._abort(conn._client)
                self._abort(upstream)

    def _do_release(self, conn: ProxiedConnection, how: ReleaseHow) -> None:
        conn._release_how = how
        conn._release.set()

    async def _wait_delivered(self, conn: ProxiedConnection, sock: socket.socket) -> None:
        # A reset throws away whatever is still in our send queue, so "forward
        # exactly n bytes, then reset" must wait until the receiver's kernel has
        # acknowledged them. Linux offers no readiness event for "all acked":
        # poll SIOCOUTQ until it is 0, up to a deadline.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._deliver_timeout
        while (unacked := _unacked_bytes(sock)) > 0:
            if loop.time() >= deadline:
                self._update(conn, error=f"reset with {unacked} bytes not acknowledged")
                return
            await asyncio.sleep(0.001)

    async def _drain_and_close(self, conn: ProxiedConnection) -> None:
        # Closing a socket with unread data makes the kernel send a reset, not
        # a FIN. So after our FINs, read and discard until each peer closes too
        # (or the linger deadline passes), then close.
        loop = asyncio.get_running_loop()
        assert conn._upstream is not None
        socks = (conn._client, conn._upstream)

        async def discard(sock: socket.socket) -> None:
            buffer = bytearray(self._bufsize)
            while True:
                try:
                    received = await loop.sock_recv_into(sock, buffer)
                except OSError:
                    return
                if not received:
                    return
                with self._cond:
                    conn.discarded_bytes += received

        drains = [loop.create_task(discard(s)) for s in socks]
        try:
            await asyncio.wait(drains, timeout=self._linger_timeout)
        finally:
            for task in drains:
                task.cancel()
            await asyncio.gather(*drains, return_exceptions=True)
        for sock in socks:
            self._close(sock)

    def _forget(self, sock: socket.socket) -> None:
        # Drop any reader/writer the loop still holds for this descriptor before
        # it is closed, so a reused descriptor number never gets a stale callback.
        fd = sock.fileno()
        if fd >= 0:
            self._loop.remove_reader(fd)
            self._loop.remove_writer(fd)

    def _abort(self, sock: socket.socket) -> None:
        """Close with a reset: SO_LINGER on with a zero timeout makes close() send RST."""
        if sock.fileno() < 0:
            return
        self._forget(sock)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()

    def _close(self, sock: socket.socket) -> None:
        if sock.fileno() < 0:
            return
        self._forget(sock)
        sock.close()
