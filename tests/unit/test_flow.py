"""ReadGate idempotence and BufferPool bounds."""

from __future__ import annotations

from fastrelay.server.flow import BufferPool, ReadGate


class Reader:
    def __init__(self) -> None:
        self.calls: list[str] = []
        self.closing = False

    def pause_reading(self) -> None:
        self.calls.append("pause")

    def resume_reading(self) -> None:
        self.calls.append("resume")

    def is_closing(self) -> bool:
        return self.closing


def test_gate_is_idempotent() -> None:
    r = Reader()
    gate = ReadGate(r)
    gate.resume()  # not paused: nothing to do
    gate.pause()
    gate.pause()
    gate.resume()
    gate.resume()
    assert r.calls == ["pause", "resume"]


def test_gate_never_touches_a_closing_transport() -> None:
    r = Reader()
    gate = ReadGate(r)
    r.closing = True
    gate.pause()
    gate.resume()
    assert r.calls == [] and not gate.paused


def test_pool_reuses_and_bounds_free_buffers() -> None:
    pool = BufferPool(4096, max_free=2)
    bufs = [pool.acquire() for _ in range(3)]
    assert all(len(b) == 4096 for b in bufs)
    assert len({id(b.obj) for b in bufs}) == 3
    for b in bufs:
        pool.release(b)
    assert pool.free == 2  # the third is dropped, not hoarded
    again = pool.acquire()
    assert again.obj is bufs[1].obj
