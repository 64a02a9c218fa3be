"""The deadline heap behind the server's one timer, on a fake clock."""

from __future__ import annotations

from fastrelay.core.deadlines import Deadlines
from fastrelay.server.timer import LoopTimer


def test_due_fires_at_exactly_the_deadline_in_order_and_skips_cancelled() -> None:
    heap = Deadlines()
    fired: list[str] = []
    heap.add(5.0, lambda: fired.append("early"))
    cancelled = heap.add(6.0, lambda: fired.append("cancelled"))
    heap.add(9.0, lambda: fired.append("late"))
    cancelled.cancel()
    cancelled.cancel()  # idempotent
    assert heap.next_at() == 5.0 and len(heap) == 2
    assert heap.pop_due(4.999) == []
    for d in heap.pop_due(5.0):  # at exactly the deadline
        d.callback()
    assert fired == ["early"]
    assert heap.next_at() == 9.0  # the cancelled entry is skipped
    for d in heap.pop_due(100.0):
        d.cancel()  # cancelling a fired deadline is harmless
        d.callback()
    assert fired == ["early", "late"] and heap.next_at() is None and len(heap) == 0


def test_a_heap_of_mostly_cancelled_entries_is_compacted() -> None:
    heap = Deadlines()
    for i in range(10_000):
        heap.add(float(i), lambda: None).cancel()
    heap.add(1e9, lambda: None)
    assert len(heap._heap) < 5_000  # rebuilt, not grown without bound
    assert heap.next_at() == 1e9


def test_loop_timer_runs_due_callbacks_on_a_fake_clock() -> None:
    now = [0.0]
    timer = LoopTimer(lambda: now[0])
    fired: list[float] = []
    timer.after(10.0, lambda: fired.append(now[0]))
    timer.at(3.0, lambda: timer.after(1.0, lambda: fired.append(now[0])))
    now[0] = 3.0
    timer.run_due()
    assert fired == []
    now[0] = 4.0
    timer.run_due()
    assert fired == [4.0]
    now[0] = 10.0
    timer.run_due()
    assert fired == [4.0, 10.0]


def test_a_cancelled_deadline_no_longer_holds_its_callbacks_owner() -> None:
    import gc
    import weakref

    class Owner:
        def fire(self) -> None:
            raise AssertionError("cancelled")

    heap = Deadlines()
    owner = Owner()
    ref = weakref.ref(owner)
    heap.add(10.0, owner.fire).cancel()  # still in the heap, not yet compacted
    del owner
    gc.collect()
    assert ref() is None
    assert heap.pop_due(20.0) == []
