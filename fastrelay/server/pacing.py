"""Paced relays on the event loop: one `Pacer` per paced upload, and the
`PacingBoard` that gives each active relay its rate.

A `Pacer` wraps one `core.pacing.TokenBucket` with the server's timer. The
data path asks it how much a read may take (`allowance`) and tells it what
moved (`spent`); when the bucket is low, `spent` says "pause", and the pacer
holds exactly one timer until the bucket is refilled, then calls its
``on_ready``. So a paced relay costs one timer per pause, never one per read.

The `PacingBoard` knows every paced upload on this node by workspace. A
relay's own rate is the lower of its ``max_rate`` and the server's
``--max-rate``; with ``--workspace-rate`` set, the relays of one workspace
share it (`core.pacing.share`) and every arrival or departure sets the
others' rates anew. Without any of the three a relay gets no pacer at all,
and its data path is exactly the unpaced one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from ..core.deadlines import Deadline
from ..core.observe import Metrics
from ..core.pacing import TokenBucket, lowest, share
from .flow import PACING, BufferPool, ReadGate
from .timer import LoopTimer

UNLIMITED = 1 << 62
"""What `Pacer.allowance` says while no rate applies (a workspace share
only, and the workspace's rate was lifted)."""


class Pacer:
    """The pace of one upload. ``on_ready`` runs when a pause is over."""

    __slots__ = (
        "_board",
        "_bucket",
        "_deadline",
        "_metrics",
        "_paused_at",
        "_timer",
        "on_ready",
        "own",
        "workspace",
    )

    def __init__(
        self,
        board: PacingBoard,
        workspace: str,
        own: int,
        timer: LoopTimer,
        metrics: Metrics,
    ) -> None:
        self._board = board
        self.workspace = workspace
        self.own = own
        """This relay's own rate (0: none), before any workspace share."""
        self._timer = timer
        self._metrics = metrics
        self._bucket: TokenBucket | None = None
        self._deadline: Deadline | None = None
        self._paused_at: float | None = None
        self.on_ready: Callable[[], None] = _nothing

    @property
    def rate(self) -> int:
        """Bytes/s this upload moves at now; 0 while unlimited."""
        return 0 if self._bucket is None else self._bucket.rate

    @property
    def paused(self) -> bool:
        return self._paused_at is not None

    def set_rate(self, rate: int) -> None:
        now = self._timer.clock()
        bucket = self._bucket
        if rate <= 0:
            self._bucket = None
        elif bucket is None:
            self._bucket = TokenBucket(rate, now)
        else:
            bucket.set_rate(rate, now)
        if self._paused_at is not None:
            # The pause was for the old rate: end it when the new one says.
            self._cancel()
            delay = 0.0 if self._bucket is None else self._bucket.delay(now)
            self._deadline = self._timer.at(now + delay, self._ready)

    def allowance(self) -> int:
        """Bytes the next read (or splice) may take."""
        bucket = self._bucket
        if bucket is None:
            return UNLIMITED
        return bucket.allowance(self._timer.clock())

    def cap(self, want: int) -> int:
        """``want`` bytes, or fewer if the bucket holds fewer. 0 when it is
        in debt (bytes read before the pacer could cap them): the pause is
        then armed, and ``on_ready`` says when to go on."""
        allowed = self.allowance()
        if allowed <= 0:
            self.spent(0)
            return 0
        return min(want, allowed)

    def spent(self, nbytes: int) -> bool:
        """``nbytes`` moved. True: pause reading; ``on_ready`` says when to
        go on (one timer)."""
        bucket = self._bucket
        if bucket is None:
            return False
        now = self._timer.clock()
        delay = bucket.spend(nbytes, now)
        if not delay:
            return False
        if self._paused_at is None:
            self._paused_at = now
            self._deadline = self._timer.at(now + delay, self._ready)
        return True

    def _ready(self) -> None:
        self._deadline = None
        self._account()
        self.on_ready()

    def _account(self) -> None:
        if self._paused_at is not None:
            self._metrics.paced_s += self._timer.clock() - self._paused_at
            self._paused_at = None

    def _cancel(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def close(self) -> None:
        """The upload is over: no more callbacks; leave the board. Idempotent."""
        self._cancel()
        self._account()
        self.on_ready = _nothing
        self._board.leave(self)

    def __repr__(self) -> str:
        return f"<Pacer rate={self.rate} {'paused' if self.paused else 'reading'}>"


def _nothing() -> None:
    pass


class PacingBoard:
    """Every paced upload of this node, by workspace; gives each its rate."""

    __slots__ = ("_by_workspace", "max_rate", "metrics", "timer", "workspace_rate")

    def __init__(self, timer: LoopTimer, metrics: Metrics) -> None:
        self.timer = timer
        self.metrics = metrics
        self.max_rate = 0
        """``--max-rate``: caps every relay (0: none)."""
        self.workspace_rate = 0
        """``--workspace-rate``: caps the sum of one workspace's relays (0: none)."""
        self._by_workspace: dict[str, list[Pacer]] = {}

    def configure(self, max_rate: int, workspace_rate: int) -> None:
        self.max_rate = max(0, max_rate)
        self.workspace_rate = max(0, workspace_rate)

    def join(self, workspace: str, max_rate: int) -> Pacer | None:
        """The pacer of an upload that starts now in ``workspace``, with its
        relay's own ``max_rate``; None when nothing paces it."""
        own = lowest(max_rate, self.max_rate)
        if not own and not self.workspace_rate:
            return None
        pacer = Pacer(self, workspace, own, self.timer, self.metrics)
        if self.workspace_rate:
            self._by_workspace.setdefault(workspace, []).append(pacer)
            self._reshare(workspace)
        else:
            pacer.set_rate(own)
        return pacer

    def leave(self, pacer: Pacer) -> None:
        pacers = self._by_workspace.get(pacer.workspace)
        if pacers is None or pacer not in pacers:
            return
        pacers.remove(pacer)
        if pacers:
            self._reshare(pacer.workspace)
        else:
            del self._by_workspace[pacer.workspace]

    def _reshare(self, workspace: str) -> None:
        pacers = self._by_workspace[workspace]
        for pacer, rate in zip(
            pacers, share(self.workspace_rate, [p.own for p in pacers]), strict=True
        ):
            if rate != pacer.rate:
                pacer.set_rate(rate)

    def active(self, workspace: str) -> int:
        """Paced uploads of ``workspace`` sharing its rate now."""
        return len(self._by_workspace.get(workspace, ()))


class _KernelPath(Protocol):
    def pace_ready(self) -> None: ...


class PacedSource:
    """The source side of a data path (`transfer.Transfer`, `fanout.FanOut`):
    its receive buffers, and its pace when it has a `Pacer`. One read never
    takes more than the pacer allows (`upload_buffer` hands out a shorter
    view of the buffer), and a read that empties the bucket holds the
    source's gate (`flow.PACING`, apart from backpressure's `flow.FLOW`)
    until the pacer's one timer calls `_pace_ready`. On the kernel path the
    pipe asks the pacer itself and is told when to go on."""

    __slots__ = (
        "_buf",
        "_finished",
        "_kernel",
        "_last_progress",
        "_pacer",
        "_timer",
        "pool",
        "up_gate",
    )

    _buf: memoryview | None
    _finished: bool
    _kernel: _KernelPath | None
    _last_progress: float
    """The source's last progress (a read, or the end of a pause)."""
    _pacer: Pacer | None
    _timer: LoopTimer
    pool: BufferPool
    up_gate: ReadGate

    def upload_buffer(self) -> memoryview:
        """The buffer for the next upload read: never a pinned one; on a
        paced relay no longer than the pacer allows (a prefix of it)."""
        buf = self._buf
        if buf is None:
            buf = self._buf = self.pool.acquire()
        if self._pacer is not None:
            allowed = self._pacer.allowance()
            if allowed < len(buf):
                return buf[: max(1, allowed)]
        return buf

    def _paced(self, nbytes: int) -> None:
        """``nbytes`` were read: hold the source if the pacer says so."""
        pacer = self._pacer
        if pacer is not None and not self._finished and pacer.spent(nbytes):
            self.up_gate.pause(PACING)

    def _pace_ready(self) -> None:
        """The pacer's pause is over (its timer): read again."""
        if self._finished:
            return
        self._last_progress = self._timer.clock()  # held, not idle
        if self._kernel is not None:
            self._kernel.pace_ready()
        else:
            self.up_gate.resume(PACING)
