"""A transport double that records what the relay does to it."""

from __future__ import annotations

from typing import Any


class FakeClock:
    """A monotonic clock the test moves by hand (``clock.now += 5``)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeTransport:
    """Records writes; ``pending`` simulates bytes the kernel did not take."""

    def __init__(self, protocol: Any = None) -> None:
        self.protocol = protocol
        self.written: list[bytes] = []  # copies at write() time
        self.views: list[memoryview] = []  # what we were handed (to detect reuse)
        self.pending = 0
        self.reading = True
        self.closed = False
        self.aborted = False
        self.eof_written = False
        self.limits: tuple[int, int] | None = None

    # --- transport API the relay uses ---
    def write(self, data: bytes | memoryview) -> None:
        assert not self.closed, "write after close"
        self.written.append(bytes(data))
        if isinstance(data, memoryview):
            self.views.append(data)

    def writelines(self, parts: list[bytes | memoryview]) -> None:
        # One entry, like the one writev it is.
        assert not self.closed, "write after close"
        self.written.append(b"".join(bytes(p) for p in parts))
        self.views.extend(p for p in parts if isinstance(p, memoryview))

    def get_write_buffer_size(self) -> int:
        return self.pending

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.limits = (high or 0, low or 0)

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = self.aborted = True

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof_written = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    # --- helpers for tests ---
    @property
    def data(self) -> bytes:
        return b"".join(self.written)

    def feed(self, data: bytes) -> None:
        """Deliver ``data`` through get_buffer/buffer_updated, like the loop."""
        view = memoryview(data)
        while view:
            buf = self.protocol.get_buffer(-1)
            n = min(len(buf), len(view))
            buf[:n] = view[:n]
            view = view[n:]
            self.protocol.buffer_updated(n)


class FakeSharedLedger:
    """A `ledger.SharedLedger` whose decisions wait until the test answers them.

    Stands in for our own interface (the Redis one is tested against a real
    redis-server in tests/cluster): here only the connection's CONSULTING
    phase is under test.
    """

    refresh_interval_s = 3600.0

    def __init__(self) -> None:
        import asyncio

        self.asked: list[tuple[str, Any]] = []
        self._answers: list[asyncio.Future[Any]] = []
        self.recorded: list[tuple[str, tuple[Any, ...]]] = []

    async def _ask(self, what: str, arg: Any) -> Any:
        import asyncio

        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.asked.append((what, arg))
        self._answers.append(fut)
        return await fut

    async def reserve(self, key: str, workspace_id: str, expires_ms: int) -> None:
        await self._ask("reserve", key)

    async def admit(self, key: str) -> Any:
        return await self._ask("admit", key)

    def answer(self, value: Any = None, error: BaseException | None = None) -> None:
        """Answer the oldest open question."""
        fut = self._answers.pop(0)
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(value)

    def paired(self, key: str, workspace_id: str, expires_ms: int, single_use: bool) -> None:
        self.recorded.append(("paired", (key, workspace_id)))

    def ended(self, key: str, workspace_id: str, expires_ms: int, signed: bool) -> None:
        self.recorded.append(("ended", (key, workspace_id, expires_ms, signed)))

    def refresh(self, holdings: list[Any]) -> None:
        self.recorded.append(("refresh", (len(holdings),)))

    async def close(self) -> None:
        pass


class FakeTLSTransport(FakeTransport):
    """Like an asyncio/uvloop SSL transport where it matters to the relay:
    write() never pins the caller's buffer (it encrypts at once), and
    set_write_buffer_limits() re-checks the marks on the spot, calling
    pause_writing() or resume_writing() synchronously (uvloop sslproto.pyx,
    asyncio/sslproto.py ``_control_app_writing``)."""

    def __init__(self, protocol: Any = None) -> None:
        super().__init__(protocol)
        self.paused = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "sslcontext":
            return object()
        return default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        super().set_write_buffer_limits(high, low)
        high, low = self.limits or (0, 0)
        if not self.paused and self.pending >= high:
            self.paused = True
            self.protocol.pause_writing()
        elif self.paused and self.pending <= low:
            self.paused = False
            self.protocol.resume_writing()
