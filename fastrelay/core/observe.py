"""Outcome records: one log line and a few counters per finished relay, and
counters of mint answers and relay-path refusals (`Metrics`).

Everything here runs once per relay or per answer, never per chunk. Tickets never appear:
only `tickets.ticket_id`, a short hash that cannot be turned back into the
ticket. Every client-supplied value (ids, error messages) goes through
`logsafe.safe` in the text message, so a record is always one bounded line
whatever the client sent. The same values also travel as structured fields
(``extra={"event": ..., "fields": {...}}``, bounded but not escaped) for
`logformat.JsonFormatter`, whose JSON encoding escapes them.
"""

from __future__ import annotations

import bisect
import logging
from typing import Protocol

from .errors import (
    ClusterUnavailable,
    MintBodyTooLarge,
    MintDisabled,
    RelayError,
    RequestTimeout,
    Unauthorized,
    WorkspaceCapReached,
)
from .heads import MINT_PATH, RELAY_PREFIX, RequestHead
from .logsafe import safe
from .mint import MAX_ID_BYTES
from .session import Outcome, RelaySession
from .tickets import ticket_id

log = logging.getLogger("fastrelay")

# A minted id is at most MAX_ID_BYTES, so it is logged whole; ids given
# in-process (Registry.create) and error texts are cut at the same size.
_LOG_LIMIT = MAX_ID_BYTES


def _ids(relay: TicketIds) -> tuple[str, str, str]:
    return (
        safe(relay.workspace_id, _LOG_LIMIT),
        safe(relay.source_exe_id, _LOG_LIMIT),
        safe(relay.dest_exe_id, _LOG_LIMIT),
    )


class TicketIds(Protocol):
    """What the log says of any ticket: its id and the three ids it serves."""

    @property
    def ticket(self) -> str: ...
    @property
    def workspace_id(self) -> str: ...
    @property
    def source_exe_id(self) -> str: ...
    @property
    def dest_exe_id(self) -> str: ...


class Finished(TicketIds, Protocol):
    @property
    def bytes(self) -> int: ...
    @property
    def digest(self) -> str | None: ...
    @property
    def session(self) -> RelaySession: ...
    @property
    def error(self) -> Exception | None: ...


# Histogram buckets (upper bounds, seconds). Histograms, not summaries: a
# summary's quantiles cannot be added up across nodes, and one with only
# _sum/_count gives a mean and nothing else; per-bucket counts sum across
# nodes and give any quantile (histogram_quantile) and the share under a
# threshold (an SLO). Each bucket is one more series per node, so the bounds
# are few, chosen for where these durations actually fall:
#
# Pairing (mint to the second side's arrival): both curls usually start right
# after the mint, so most pairings take milliseconds; a slow executor start
# takes seconds to minutes; past that a ticket waits towards its TTL (default
# 300 s, at most --max-ttl, default 86400 s), the region that tells
# "executor never came" apart from "executor was slow".
PAIRING_BUCKETS_S: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30,
    60, 120, 300, 600, 1800, 3600, 21600, 86400,
)  # fmt: skip
# Transfer (pairing to end): a small file on a fast link ends in about a
# millisecond, 1 GiB on loopback in under a second, a large file over a WAN
# in minutes to hours; the TTL does not bound it (only the idle timeout does).
TRANSFER_BUCKETS_S: tuple[float, ...] = (
    0.001, 0.005, 0.025, 0.1, 0.25, 1, 2.5, 10, 30, 60, 300, 900,
    1800, 3600, 7200, 14400, 43200,
)  # fmt: skip

# Bytes each fan-out receiver got (one observation per receiver, when it is
# done or dropped): powers of 16 from 64 KiB to 1 TiB, few series per node,
# enough to tell a receiver cut early from one that got a large body whole.
RECEIVER_BYTES_BUCKETS: tuple[float, ...] = (
    2**16, 2**20, 2**24, 2**28, 2**32, 2**36, 2**40,
)  # fmt: skip

MINT_OUTCOMES = (
    "created",
    "unauthorized",
    "invalid",
    "too_large",
    "cap_reached",
    "disabled",
    "cluster_unavailable",
    "timeout",
    "error",
)
"""Every label of ``fastrelay_mints_total``: a fixed set, decided by the
error's class (`mint_outcome`), never by anything the client sent."""

RELAY_REFUSAL_STATUSES = (401, 408, 410, 413, 421, 423, 502, 503)
"""Statuses of relay-path refusals shown at 0 before their first occurrence,
so a rate() or increase() alert sees the first burst (a series that appears
at 1 has no earlier sample to increase from). Other statuses of the error
tree (400, 404, 405, 500 ...) appear when they first happen."""


class Histogram:
    """Counts per bucket plus a sum: one `observe` per finished relay (a
    bisect over ~20 bounds), read whole at scrape time."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        assert list(bounds) == sorted(set(bounds)), "bounds must increase"
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one: above every bound (+Inf)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # bisect_left: a value equal to a bound belongs to that bucket (le).
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[float, int]]:
        """``(upper bound, observations <= it)`` for each bound and +Inf, as
        Prometheus buckets are cumulative."""
        out: list[tuple[float, int]] = []
        total = 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += n
            out.append((bound, total))
        return out


def mint_outcome(err: RelayError) -> str:
    """The ``fastrelay_mints_total`` label of a refused mint request."""
    if isinstance(err, Unauthorized):
        return "unauthorized"
    if isinstance(err, MintBodyTooLarge):
        return "too_large"
    if isinstance(err, WorkspaceCapReached):
        return "cap_reached"
    if isinstance(err, ClusterUnavailable):
        return "cluster_unavailable"
    if isinstance(err, MintDisabled):
        return "disabled"  # no secret, draining, or --max-pending reached
    if isinstance(err, RequestTimeout):
        return "timeout"  # the body did not arrive within --header-timeout
    if err.status == 400:
        return "invalid"  # InvalidJSON, MissingIds, InvalidField, bad chunk framing
    return "error"  # a bug (500) or an answer not foreseen here


class Metrics:
    """Counters derived from outcomes and refusals; `metrics.RelayCollector`
    exposes them. Plain ints, no locks: everything runs on the loop thread."""

    __slots__ = (
        "bytes_total",
        "dropped_receivers",
        "mints",
        "outcomes",
        "paced_s",
        "pairing",
        "receiver_bytes",
        "receivers_delivered",
        "relay_refusals",
        "resumes",
        "superseded",
        "transfer",
    )

    def __init__(self) -> None:
        self.dropped_receivers = {"idle": 0, "lost": 0}
        """Fan-out receivers cut while the others went on, by why."""
        self.receiver_bytes = 0
        """Payload bytes written to fan-out receivers (each counts its own)."""
        self.receivers_delivered = Histogram(RECEIVER_BYTES_BUCKETS)
        """Bytes each fan-out receiver got, observed when it is done or dropped."""
        self.paced_s = 0.0
        """Seconds uploads spent paused by pacing."""
        self.resumes = {"PUT": 0, "GET": 0}
        """Requests that continued a resumable relay after a break, by side."""
        self.superseded = 0
        """Connections of resumable relays taken over by a newer request."""
        self.outcomes: dict[Outcome, int] = dict.fromkeys(Outcome, 0)
        self.bytes_total = 0
        self.pairing = Histogram(PAIRING_BUCKETS_S)
        self.transfer = Histogram(TRANSFER_BUCKETS_S)
        self.mints: dict[str, int] = dict.fromkeys(MINT_OUTCOMES, 0)
        self.relay_refusals: dict[int, int] = dict.fromkeys(RELAY_REFUSAL_STATUSES, 0)

    @property
    def paired(self) -> int:
        """Relays that paired (both histograms count each once)."""
        return self.pairing.count

    @property
    def pairing_s_sum(self) -> float:
        return self.pairing.sum

    @property
    def transfer_s_sum(self) -> float:
        return self.transfer.sum

    def record(self, relay: Finished) -> None:
        session = relay.session
        assert session.outcome is not None
        self.outcomes[session.outcome] += 1
        self.bytes_total += relay.bytes
        if session.paired:
            self.pairing.observe(session.waited_s())
            self.transfer.observe(session.transfer_s())

    def minted(self) -> None:
        """A mint request answered 201."""
        self.mints["created"] += 1

    def refused(self, err: RelayError, head: RequestHead | None) -> None:
        """An error answer written for ``head`` (None: no head was parsed).

        Counted once per answer, where it is written. The labels come from
        the error's class (its status, or `mint_outcome`) and the route's
        fixed path, so their number is bounded by the error tree whatever
        the client sends; a request with no parsed head is on no route."""
        if head is None:
            return
        path = head.path
        if path.startswith(RELAY_PREFIX):
            status = err.status
            self.relay_refusals[status] = self.relay_refusals.get(status, 0) + 1
        elif path == MINT_PATH and head.method == "POST":
            self.mints[mint_outcome(err)] += 1


def _cut(value: object) -> str:
    """A client-supplied value for a structured field: bounded, but not
    escaped (the JSON encoder escapes; `logsafe.safe` is for the text line)."""
    try:
        text = value if isinstance(value, str) else str(value)
    except Exception:  # a broken __str__ must not break the log call
        text = f"<unprintable {type(value).__name__}>"
    if len(text) <= _LOG_LIMIT:
        return text
    return f"{text[:_LOG_LIMIT]}…(+{len(text) - _LOG_LIMIT} chars)"


def _id_fields(relay: TicketIds) -> dict[str, object]:
    return {
        "id": ticket_id(relay.ticket),
        "workspace": _cut(relay.workspace_id),
        "source": _cut(relay.source_exe_id),
        "dest": _cut(relay.dest_exe_id),
    }


def log_created(relay: TicketIds, ttl_s: float, max_bytes: int) -> None:
    """One line per ticket minted (a signed ticket's relay opens later,
    wherever its first side arrives)."""
    if log.isEnabledFor(logging.INFO):
        fields = _id_fields(relay)
        fields["ttl_s"] = ttl_s
        fields["max_bytes"] = max_bytes
        log.info(
            "relay created id=%s workspace=%s source=%s dest=%s ttl_s=%g max_bytes=%d",
            fields["id"],
            *_ids(relay),
            ttl_s,
            max_bytes,
            extra={"event": "relay_created", "fields": fields},
        )


def log_finished(relay: Finished) -> None:
    session = relay.session
    assert session.outcome is not None
    level = logging.INFO if session.outcome is Outcome.OK else logging.WARNING
    if log.isEnabledFor(level):
        err = relay.error
        wait_s = session.waited_s()
        transfer_s = session.transfer_s()
        fields = _id_fields(relay)
        fields.update(
            outcome=session.outcome.value,
            bytes=relay.bytes,
            wait_s=round(wait_s, 6),
            transfer_s=round(transfer_s, 6),
            error=_cut(err) if err is not None else None,
            sha256=relay.digest,
        )
        log.log(
            level,
            "relay ended id=%s outcome=%s workspace=%s source=%s dest=%s bytes=%d "
            "wait_s=%.3f transfer_s=%.3f%s%s",
            fields["id"],
            session.outcome.value,
            *_ids(relay),
            relay.bytes,
            wait_s,
            transfer_s,
            f" sha256={relay.digest}" if relay.digest is not None else "",
            f" error={safe(err, _LOG_LIMIT)}" if err is not None else "",
            extra={"event": "relay_ended", "fields": fields},
        )


def log_break(relay: TicketIds, side: str, offset: int, why: str) -> None:
    """One line per break of a resumable relay: which side, where it was."""
    if log.isEnabledFor(logging.INFO):
        fields = _id_fields(relay)
        fields.update(side=side, offset=offset, why=_cut(why))
        log.info(
            "relay break id=%s side=%s offset=%d why=%s",
            fields["id"],
            side,
            offset,
            safe(why, _LOG_LIMIT),
            extra={"event": "relay_break", "fields": fields},
        )


def log_dropped(relay: TicketIds, receiver: int, receivers: int, offset: int, why: str) -> None:
    """One line per fan-out receiver dropped while the others go on."""
    if log.isEnabledFor(logging.INFO):
        fields = _id_fields(relay)
        fields.update(receiver=receiver, receivers=receivers, offset=offset, why=_cut(why))
        log.info(
            "relay receiver dropped id=%s receiver=%d/%d offset=%d why=%s",
            fields["id"],
            receiver,
            receivers,
            offset,
            safe(why, _LOG_LIMIT),
            extra={"event": "relay_receiver_dropped", "fields": fields},
        )


def log_resume(relay: TicketIds, side: str, offset: int) -> None:
    """One line per request that continues a resumable relay after a break."""
    if log.isEnabledFor(logging.INFO):
        fields = _id_fields(relay)
        fields.update(side=side, offset=offset)
        log.info(
            "relay resume id=%s side=%s offset=%d",
            fields["id"],
            side,
            offset,
            extra={"event": "relay_resume", "fields": fields},
        )
