"""A transport double that records what the relay does to it."""

from __future__ import annotations

from typing import Any


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
        for p in parts:
            self.write(p)

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
