"""Outcome records: one log line and a few counters per finished relay.

Everything here runs once per relay, never per chunk. Tickets never appear:
only `tickets.ticket_id`, a short hash that cannot be turned back into the
ticket. Every client-supplied value (ids, error messages) goes through
`logsafe.safe` in the text message, so a record is always one bounded line
whatever the client sent. The same values also travel as structured fields
(``extra={"event": ..., "fields": {...}}``, bounded but not escaped) for
`logformat.JsonFormatter`, whose JSON encoding escapes them.
"""

from __future__ import annotations

import logging
from typing import Protocol

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


class Metrics:
    """Counters derived from outcomes; `metrics.RelayCollector` exposes them."""

    __slots__ = (
        "bytes_total",
        "outcomes",
        "paired",
        "pairing_s_sum",
        "resumes",
        "superseded",
        "transfer_s_sum",
    )

    def __init__(self) -> None:
        self.resumes = {"PUT": 0, "GET": 0}
        """Requests that continued a resumable relay after a break, by side."""
        self.superseded = 0
        """Connections of resumable relays taken over by a newer request."""
        self.outcomes: dict[Outcome, int] = dict.fromkeys(Outcome, 0)
        self.bytes_total = 0
        self.paired = 0
        self.pairing_s_sum = 0.0
        self.transfer_s_sum = 0.0

    def record(self, relay: Finished) -> None:
        session = relay.session
        assert session.outcome is not None
        self.outcomes[session.outcome] += 1
        self.bytes_total += relay.bytes
        if session.paired:
            self.paired += 1
            self.pairing_s_sum += session.waited_s()
            self.transfer_s_sum += session.transfer_s()


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
