"""The pure pacing core (core/pacing.py) and the server's pacers
(server/pacing.py), driven by a fake clock: no sleeps, no loop."""

from __future__ import annotations

import pytest

from fastrelay.core.observe import Metrics
from fastrelay.core.pacing import (
    MIN_CAPACITY,
    TokenBucket,
    capacity_for,
    format_rate,
    lowest,
    parse_rate,
    share,
)
from fastrelay.server.pacing import UNLIMITED, PacingBoard
from fastrelay.server.timer import LoopTimer

KIB = 1024
MIB = 1024 * KIB


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- rates --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "rate"),
    [
        ("0", 0),
        ("1", 1),
        ("1000", 1000),
        ("512K", 512 * KIB),
        ("512k", 512 * KIB),
        ("10M", 10 * MIB),
        ("1G", 1024 * MIB),
        ("1.5M", 3 * MIB // 2),
        (" 2M ", 2 * MIB),
    ],
)
def test_parse_rate(text: str, rate: int) -> None:
    assert parse_rate(text) == rate


@pytest.mark.parametrize("text", ["", "M", "10X", "-5", "1e3", "10 M", "0.5", "1MB", "nan", "inf"])
def test_parse_rate_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="rate"):
        parse_rate(text)


def test_parse_rate_refuses_huge() -> None:
    with pytest.raises(ValueError, match="too large"):
        parse_rate("9" * 30 + "G")


def test_format_rate() -> None:
    assert format_rate(0) == "unlimited"
    assert format_rate(10 * MIB) == "10M/s"
    assert format_rate(512 * KIB) == "512K/s"
    assert format_rate(1000) == "1000/s"


def test_lowest() -> None:
    assert lowest(0, 0) == 0
    assert lowest(5, 0) == 5
    assert lowest(0, 7) == 7
    assert lowest(9, 7) == 7


@pytest.mark.parametrize(
    ("total", "own", "expected"),
    [
        (0, [0, 5], [0, 5]),  # no workspace cap: own rates stand
        (100, [0], [100]),
        (100, [0, 0], [50, 50]),
        (100, [0, 0, 0], [33, 33, 34]),
        (100, [10, 0], [10, 90]),  # a lower own rate is kept; the rest goes to the other
        (100, [80, 0], [50, 50]),
        (100, [10, 20, 0], [10, 20, 70]),
        (100, [60, 70], [50, 50]),
        (100, [30, 30], [30, 30]),  # both below their share: the rest stays unused
        (3, [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]),  # never 0 (0 would mean unlimited)
    ],
)
def test_share(total: int, own: list[int], expected: list[int]) -> None:
    assert share(total, own) == expected


def test_share_never_exceeds_total_when_it_can_hold() -> None:
    for n in range(1, 20):
        for total in (n, 1000, 10 * MIB + 7):
            own = [0 if i % 3 else 1 + i * 997 for i in range(n)]
            rates = share(total, own)
            assert sum(rates) <= total
            for mine, rate in zip(own, rates, strict=True):
                if mine:
                    assert rate <= mine


# --- the bucket ---------------------------------------------------------------------


@pytest.mark.parametrize("rate", [1, 100, 64 * KIB, MIB, 32 * MIB, 10 * 1024 * MIB])
def test_capacity_within_the_contracts_burst(rate: int) -> None:
    capacity = capacity_for(rate)
    assert capacity >= MIN_CAPACITY
    assert capacity <= max(rate, 256 * KIB)


def simulate(rate: int, seconds: float, read_size: int) -> list[tuple[float, int]]:
    """Drive a bucket the way the data path does: each read takes at most
    the allowance (and at most ``read_size``), then spends it; a pause lasts
    exactly the delay the bucket asked for. Returns (time, bytes) per read."""
    clock = Clock()
    start = clock.now
    bucket = TokenBucket(rate, clock.now)
    sent: list[tuple[float, int]] = []
    while clock.now - start < seconds:
        n = min(read_size, max(1, bucket.allowance(clock.now)))
        sent.append((clock.now - start, n))
        delay = bucket.spend(n, clock.now)
        clock.now += delay if delay else 0.0001  # the next read comes a little later
    return sent


def max_in_window(sent: list[tuple[float, int]], window: float) -> int:
    best = 0
    j = 0
    total = 0
    for i, (t, n) in enumerate(sent):
        total += n
        while sent[j][0] < t - window:
            total -= sent[j][1]
            j += 1
        best = max(best, total)
        del i
    return best


@pytest.mark.parametrize("rate", [100, 10 * KIB, MIB, 32 * MIB])
@pytest.mark.parametrize("read_size", [4 * KIB, 256 * KIB])
def test_bucket_keeps_the_contract(rate: int, read_size: int) -> None:
    seconds = 12.0
    sent = simulate(rate, seconds, read_size)
    total = sum(n for _, n in sent)
    burst = max(rate, 256 * KIB)
    for window in (5.0, 7.5):
        assert max_in_window(sent, window) <= rate * window + burst
    # Not more than 10% below the rate (the network here is infinitely fast).
    assert total >= 0.9 * rate * seconds


@pytest.mark.parametrize("rate", [200 * KIB, MIB, 100 * MIB, 10 * 1024 * MIB])
def test_a_pause_buys_half_a_second(rate: int) -> None:
    """About two pauses a second at any rate: a pause has a fixed cost
    (a timer, wake-ups), so paced CPU per byte stays an unpaced relay's."""
    clock = Clock()
    bucket = TokenBucket(rate, clock.now)
    pauses = 0
    while clock.now - 1000.0 < 10.0:
        delay = bucket.spend(bucket.allowance(clock.now), clock.now)
        assert delay > 0
        clock.now += delay
        pauses += 1
    assert pauses / 10.0 <= 3.5


def test_tiny_rates_wake_within_half_a_second() -> None:
    clock = Clock()
    bucket = TokenBucket(100, clock.now)
    assert bucket.spend(bucket.allowance(clock.now), clock.now) > 0
    assert bucket.delay(clock.now) <= 0.5 + 1e-9


def test_a_debt_is_paid_back() -> None:
    """Spending more than there is (the body that arrived while the PUT
    waited) pauses until the debt is paid and ``wake`` tokens are back."""
    clock = Clock()
    bucket = TokenBucket(MIB, clock.now)
    delay = bucket.spend(4 * MIB, clock.now)
    assert delay == pytest.approx((4 * MIB - bucket.wake + bucket.wake) / MIB, rel=0.01)
    clock.now += delay
    assert bucket.allowance(clock.now) >= bucket.wake - 1


def test_set_rate_keeps_tokens_within_the_new_capacity() -> None:
    clock = Clock()
    bucket = TokenBucket(32 * MIB, clock.now)
    clock.now += 10
    assert bucket.allowance(clock.now) == capacity_for(32 * MIB)
    bucket.set_rate(KIB, clock.now)
    assert bucket.allowance(clock.now) <= capacity_for(KIB)
    with pytest.raises(ValueError):
        bucket.set_rate(0, clock.now)


def test_the_clock_going_back_adds_nothing() -> None:
    clock = Clock()
    bucket = TokenBucket(MIB, clock.now)
    before = bucket.allowance(clock.now)
    clock.now -= 5
    assert bucket.allowance(clock.now) == before


# --- pacers and the board -------------------------------------------------------------


def board(clock: Clock, max_rate: int = 0, workspace_rate: int = 0) -> PacingBoard:
    b = PacingBoard(LoopTimer(clock), Metrics())
    b.configure(max_rate, workspace_rate)
    return b


def test_no_rate_no_pacer() -> None:
    assert board(Clock()).join("ws", 0) is None


def test_own_rate_and_server_cap() -> None:
    clock = Clock()
    b = board(clock, max_rate=MIB)
    own = b.join("ws", 0)
    assert own is not None and own.rate == MIB
    lower = b.join("ws", 10 * KIB)
    assert lower is not None and lower.rate == 10 * KIB
    higher = b.join("ws", 8 * MIB)
    assert higher is not None and higher.rate == MIB


def test_one_timer_per_pause_and_paused_seconds_counted() -> None:
    clock = Clock()
    b = board(clock)
    pacer = b.join("ws", MIB)
    assert pacer is not None
    ready: list[float] = []
    pacer.on_ready = lambda: ready.append(clock.now)
    assert pacer.spent(pacer.allowance())
    assert pacer.paused
    assert pacer.spent(1)  # still paused: no second timer
    assert len(b.timer.deadlines) == 1
    clock.now += 1.0
    b.timer.run_due()
    assert ready == [clock.now] and not pacer.paused
    assert b.metrics.paced_s == pytest.approx(1.0)
    pacer.close()
    assert b.timer.deadlines.next_at() is None


def test_workspace_rate_is_shared_and_given_back() -> None:
    clock = Clock()
    b = board(clock, workspace_rate=4 * MIB)
    first = b.join("ws", 0)
    assert first is not None and first.rate == 4 * MIB
    second = b.join("ws", 0)
    assert second is not None
    assert (first.rate, second.rate) == (2 * MIB, 2 * MIB)
    slow = b.join("ws", MIB // 2)
    assert slow is not None and slow.rate == MIB // 2
    assert first.rate + second.rate + slow.rate <= 4 * MIB
    other = b.join("other", 0)
    assert other is not None and other.rate == 4 * MIB  # another workspace is not slowed
    assert b.active("ws") == 3
    slow.close()
    second.close()
    assert first.rate == 4 * MIB
    assert b.active("ws") == 1
    first.close()
    first.close()  # idempotent
    assert b.active("ws") == 0


def test_a_paused_pacer_follows_a_new_rate() -> None:
    """A relay paused at a low share wakes earlier when the share grows."""
    clock = Clock()
    b = board(clock, workspace_rate=2 * MIB)
    first = b.join("ws", 0)
    second = b.join("ws", 0)
    assert first is not None and second is not None
    woke: list[float] = []
    first.on_ready = lambda: woke.append(clock.now)
    first.spent(first.allowance() + 4 * MIB)  # a debt of 4 MiB at 1 MiB/s: ~4 s
    old = b.timer.deadlines.next_at()
    assert old is not None
    second.close()  # first now has 2 MiB/s
    new = b.timer.deadlines.next_at()
    assert new is not None and new < old


def test_unlimited_after_the_workspace_rate_is_lifted() -> None:
    clock = Clock()
    b = board(clock, workspace_rate=MIB)
    pacer = b.join("ws", 0)
    assert pacer is not None
    pacer.set_rate(0)
    assert pacer.allowance() == UNLIMITED
    assert not pacer.spent(10 * MIB)
