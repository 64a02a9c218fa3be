"""The one event-loop timer of a server, armed at the earliest `Deadline`.

`LoopTimer` wraps a `deadlines.Deadlines` heap: `at(when, callback)`
schedules, and whenever the earliest deadline changes the single
``loop.call_later`` handle is moved to it. When it fires, every due callback
runs (in deadline order) and the handle is re-armed for what is left.

Time comes from the injected ``clock`` (``time.monotonic`` by default, the
same clock asyncio and uvloop use), so deadlines fire within the loop's own
timer resolution of when they are due; nothing polls. Without a running
loop (unit tests that drive a fake clock) nothing is armed, and the test
calls `run_due()` itself after moving the clock.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from ..core.deadlines import Deadline, Deadlines


class LoopTimer:
    __slots__ = ("_armed_at", "_handle", "clock", "deadlines")

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.deadlines = Deadlines()
        self._handle: asyncio.TimerHandle | None = None
        self._armed_at: float | None = None

    def at(self, when: float, callback: Callable[[], None]) -> Deadline:
        """Run ``callback`` once ``clock()`` reaches ``when`` (unless cancelled)."""
        deadline = self.deadlines.add(when, callback)
        if self._armed_at is None or when < self._armed_at:
            self._rearm()
        return deadline

    def after(self, delay_s: float, callback: Callable[[], None]) -> Deadline:
        return self.at(self.clock() + delay_s, callback)

    def run_due(self) -> None:
        """Run every callback that is due now, then re-arm."""
        for deadline in self.deadlines.pop_due(self.clock()):
            deadline.callback()
        self._rearm()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._armed_at = None

    def _fire(self) -> None:
        self._handle = None
        self._armed_at = None
        self.run_due()

    def _rearm(self) -> None:
        when = self.deadlines.next_at()
        if when == self._armed_at:
            return
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._armed_at = None
        if when is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # off-loop (unit tests): the caller drives run_due()
        self._armed_at = when
        self._handle = loop.call_later(max(0.0, when - self.clock()), self._fire)
