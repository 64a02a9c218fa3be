"""Small idempotent flow-control pieces: a read gate and a buffer pool.

`ReadGate` wraps one transport's reading. ``pause()``/``resume()`` are safe
to call any number of times; the gate remembers what it asked for so a
resume never fires twice and a closed transport is never touched. The transfer
pauses the upload's gate from the download's ``pause_writing`` and resumes it
from ``resume_writing``: that coupling is the relay's whole backpressure.

WARNING: never call ``pause()`` from inside ``get_buffer()``: uvloop
segfaults when reading stops between its alloc and read (docs/runtime-facts.md §2).
Pause from ``buffer_updated`` or another callback.

`BufferPool` hands out fixed-size receive buffers. A buffer goes back to the
pool only when nothing references it any more; see `transfer.py` for the rule
that decides when that is.
"""

from __future__ import annotations

from typing import Protocol


class Readable(Protocol):
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def is_closing(self) -> bool: ...


FLOW = 1
"""A hold on reading: the destination is not taking bytes (backpressure)."""
PACING = 2
"""A hold on reading: a paced relay has moved its share for now."""


class ReadGate:
    """Reading of one transport, paused while any hold is on. Each hold
    (`FLOW`, `PACING`) is idempotent on its own: backpressure and pacing
    pause and resume independently, and reading resumes only when neither
    holds it."""

    __slots__ = ("_holds", "_transport")

    def __init__(self, transport: Readable) -> None:
        self._transport = transport
        self._holds = 0

    @property
    def paused(self) -> bool:
        return self._holds != 0

    def held(self, why: int) -> bool:
        return bool(self._holds & why)

    def pause(self, why: int = FLOW) -> None:
        if not self._holds:
            self._holds = why
            if not self._transport.is_closing():
                self._transport.pause_reading()
        else:
            self._holds |= why

    def resume(self, why: int = FLOW) -> None:
        if self._holds & why:
            self._holds &= ~why
            if not self._holds and not self._transport.is_closing():
                self._transport.resume_reading()

    def __repr__(self) -> str:
        return f"<ReadGate {'paused' if self._holds else 'reading'}>"


class BufferPool:
    """Free receive buffers of one size; keeps at most ``max_free`` of them."""

    __slots__ = ("_free", "max_free", "size")

    def __init__(self, size: int, max_free: int = 32) -> None:
        self.size = size
        self.max_free = max_free
        self._free: list[memoryview] = []

    def acquire(self) -> memoryview:
        if self._free:
            return self._free.pop()
        return memoryview(bytearray(self.size))

    def release(self, buf: memoryview) -> None:
        if len(self._free) < self.max_free:
            self._free.append(buf)

    @property
    def free(self) -> int:
        return len(self._free)
