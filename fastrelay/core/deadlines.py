"""Every deadline of a server in one heap: pairing TTLs, head and idle timeouts.

Theory of operation
-------------------
A relay server has many deadlines (a ticket's pairing TTL, each
connection's header timeout, each transfer's idle timeout, each lingering
close) but needs only one event-loop timer: the one for the earliest. This
module is the sans-IO half: `Deadlines` keeps `Deadline` entries in a heap,
says when the earliest is due (`next_at`), and hands back the due ones
(`pop_due(now)`). The asyncio half (`timer.LoopTimer`) keeps one
``call_later`` armed at `next_at` and runs the callbacks.

Cancelling is O(1): the entry is marked and skipped when it surfaces. A
heap that is mostly cancelled entries is compacted, so a busy server that
arms and cancels a header timer per request does not grow without bound.

Time is always an argument here; tests drive it with a fake clock.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable

# Compact when cancelled entries outnumber live ones by this factor (and
# there are enough of them to be worth the O(n) rebuild).
_COMPACT_FACTOR = 2
_COMPACT_MIN = 1024


def _nothing() -> None:
    pass


class Deadline:
    """One scheduled callback. ``cancel()`` is idempotent."""

    __slots__ = ("_owner", "callback", "cancelled", "when")

    def __init__(self, owner: Deadlines, when: float, callback: Callable[[], None]) -> None:
        self._owner = owner
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        if not self.cancelled:
            self.cancelled = True
            self._owner._cancelled += 1
            # The entry stays in the heap until it surfaces or the heap is
            # compacted; without its callback it no longer keeps the
            # connection (or relay) it would have called alive meanwhile.
            self.callback = _nothing

    def __repr__(self) -> str:
        state = "cancelled" if self.cancelled else f"at {self.when:.3f}"
        return f"<Deadline {state}>"


class Deadlines:
    __slots__ = ("_cancelled", "_heap", "_seq")

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Deadline]] = []
        self._seq = itertools.count()
        self._cancelled = 0

    def add(self, when: float, callback: Callable[[], None]) -> Deadline:
        deadline = Deadline(self, when, callback)
        heapq.heappush(self._heap, (when, next(self._seq), deadline))
        if self._cancelled > _COMPACT_MIN and self._cancelled > _COMPACT_FACTOR * (
            len(self._heap) - self._cancelled
        ):
            self._compact()
        return deadline

    def next_at(self) -> float | None:
        """When the earliest live deadline is due, or None."""
        heap = self._heap
        while heap and heap[0][2].cancelled:
            heapq.heappop(heap)
            self._cancelled -= 1
        return heap[0][0] if heap else None

    def pop_due(self, now: float) -> list[Deadline]:
        """Remove and return the live deadlines due at ``now``, earliest first.

        Each is marked cancelled, so a callback that cancels it is harmless.
        """
        due: list[Deadline] = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, _, deadline = heapq.heappop(heap)
            if deadline.cancelled:
                self._cancelled -= 1
                continue
            deadline.cancelled = True  # fired: nothing left to cancel
            due.append(deadline)
        return due

    def __len__(self) -> int:
        """Live (not cancelled) deadlines."""
        return len(self._heap) - self._cancelled

    def _compact(self) -> None:
        self._heap = [item for item in self._heap if not item[2].cancelled]
        heapq.heapify(self._heap)
        self._cancelled = 0
