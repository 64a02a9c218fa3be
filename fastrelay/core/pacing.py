"""Paced relays, the pure part: the token bucket, rates and how a workspace
shares its rate. No IO, no clock: every time is passed in.

Theory of operation
-------------------
A paced relay reads its source no faster than its rate (wire contract, v2
"Paced relays"): over any window of 5 s or more at most ``rate x window +
burst`` bytes reach the destination, with the burst at most max(1 s of rate,
256 KiB), and, when the network allows, no more than 10% below the rate.

`TokenBucket` keeps that promise for one upload. Tokens accrue at ``rate``
up to ``capacity``; every byte read from the source spends one. The server
asks `allowance` how much a read (or one ``splice(2)`` call) may take, so a
read never takes more than the tokens there are, and after each read
`spend` says whether to stop reading and for how long. Bytes sent in any
window are then at most the tokens at its start (``<= capacity``) plus
``rate x window``; a read that spends more than there is (the body that
arrived while the PUT waited, read before pacing could cap it) leaves a
debt that the next pause pays back, so the average holds.

Why pause until the bucket is full again, not until one token is back:
each pause costs a timer, a ``pause_reading``/``resume_reading`` pair and
wake-ups of both processes, a fixed cost that a small batch would turn into
a large cost per byte (bench/pacing.py measured 2-9x an unpaced relay's CPU
per GiB with batches of 1/8 s of rate). So the bucket holds half a second
of rate (within the contract's burst of one second) and a pause lasts until
it is full: about two pauses a second at any rate, each moving half a
second's bytes at full speed. Tiny rates (under 128 KiB/s) keep a 64 KiB
bucket but still wake every half second, so a slow relay trickles.

`share` splits a workspace's rate among its active relays (``--workspace-rate``):
evenly, except that a relay whose own rate is lower keeps its own and what
it leaves is shared by the others ("water-filling").
"""

from __future__ import annotations

import math
import re

KIB = 1024

MIN_CAPACITY = 64 * KIB
MIN_READ = 16 * KIB
"""Reading goes on while at least this many tokens (or ``wake``, if smaller)
are left: fewer would mean many tiny reads."""

_RATE = re.compile(r"(?P<number>[0-9]+(?:\.[0-9]+)?)(?P<suffix>[kKmMgG]?)")
_SUFFIX = {"": 1, "k": KIB, "m": KIB**2, "g": KIB**3}
MAX_RATE = 2**63 - 1
RATE_FORMAT = "bytes/s, a number with an optional K, M or G suffix (x1024), e.g. 512K or 10M"


def parse_rate(text: str) -> int:
    """Bytes per second from ``text``: a number with an optional ``K``,
    ``M`` or ``G`` suffix (x1024, as curl's ``--limit-rate``); ``0`` means
    no limit. Raises `ValueError` with a message saying what is wrong."""
    match = _RATE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not a rate: {RATE_FORMAT}")
    value = float(match["number"]) * _SUFFIX[match["suffix"].lower()]
    if not math.isfinite(value) or value > MAX_RATE:
        raise ValueError(f"{text!r} is too large a rate")
    if 0 < value < 1:
        raise ValueError(f"{text!r} is less than one byte per second: not a rate")
    return int(value)


def format_rate(rate: int) -> str:
    """``rate`` in the largest unit that divides it (for logs and help)."""
    if rate <= 0:
        return "unlimited"
    for suffix, unit in (("G", KIB**3), ("M", KIB**2), ("K", KIB)):
        if rate % unit == 0:
            return f"{rate // unit}{suffix}/s"
    return f"{rate}/s"


def lowest(*rates: int) -> int:
    """The lowest of ``rates`` that set a limit (0 = none); 0 if none does."""
    limits = [rate for rate in rates if rate > 0]
    return min(limits) if limits else 0


def share(total: int, own: list[int]) -> list[int]:
    """Each relay's rate when relays whose own rates are ``own`` (0: none)
    share ``total`` bytes/s (0: no shared cap): evenly, a relay whose own
    rate is lower than its share keeping its own, the rest going to the
    others. The result sums to at most ``total``; every rate is >= 1."""
    if total <= 0:
        return list(own)
    result = [0] * len(own)
    left = total
    # Lowest own rates first: each either fits in an even share of what is
    # left (and keeps its own) or caps every relay after it at that share.
    order = sorted(range(len(own)), key=lambda i: own[i] if own[i] > 0 else math.inf)
    for place, index in enumerate(order):
        even = left // (len(own) - place)
        rate = own[index] if 0 < own[index] <= even else even
        result[index] = max(1, rate)
        left -= rate
    return result


def capacity_for(rate: int) -> int:
    """The bucket's size: half a second of rate, at least 64 KiB; always
    within the burst the contract allows, max(1 s of rate, 256 KiB)."""
    return max(MIN_CAPACITY, rate // 2)


class TokenBucket:
    """One upload's pace. ``rate`` in bytes/s (> 0); times in seconds."""

    __slots__ = ("_at", "capacity", "low", "rate", "tokens", "wake")

    def __init__(self, rate: int, now: float) -> None:
        self._at = now
        self.tokens = 0.0
        self.rate = 0
        self.capacity = self.wake = self.low = 0
        self.set_rate(rate, now)
        # Start at the wake mark (full, but for tiny rates): the body that
        # arrived while the PUT waited is spent from it, or is a debt.
        self.tokens = float(self.wake)

    def set_rate(self, rate: int, now: float) -> None:
        """A new rate from ``now`` on (a workspace's share changed)."""
        if rate <= 0:
            raise ValueError("a token bucket needs a rate > 0")
        self._refill(now)
        self.rate = rate
        self.capacity = capacity_for(rate)
        # Wake with a full bucket, or with half a second of a tiny rate.
        self.wake = max(1, min(self.capacity, rate // 2))
        self.low = min(self.wake, MIN_READ)
        self.tokens = min(self.tokens, float(self.capacity))

    def _refill(self, now: float) -> None:
        if now > self._at:
            self.tokens = min(float(self.capacity), self.tokens + (now - self._at) * self.rate)
        self._at = max(self._at, now)

    def allowance(self, now: float) -> int:
        """Bytes that may move now (0 when the upload should be paused)."""
        self._refill(now)
        return max(0, int(self.tokens))

    def spend(self, nbytes: int, now: float) -> float:
        """``nbytes`` moved. Returns 0 to go on reading, else the seconds to
        pause for (until ``wake`` tokens are back)."""
        self._refill(now)
        self.tokens -= nbytes
        if self.tokens >= self.low:
            return 0.0
        return self.delay(now)

    def delay(self, now: float) -> float:
        """Seconds until ``wake`` tokens are there (0 if they are)."""
        self._refill(now)
        missing = self.wake - self.tokens
        return 0.0 if missing <= 0 else missing / self.rate

    def __repr__(self) -> str:
        return f"<TokenBucket {format_rate(self.rate)} tokens={self.tokens:.0f}>"
