"""Outcome records: one log line and a few counters per finished relay.

Everything here runs once per relay, never per chunk. Tickets never appear:
only `tickets.ticket_id`, a short hash that cannot be turned back into the
ticket. Every client-supplied value (ids, error messages) goes through
`logsafe.safe`, so a record is always one bounded line whatever the client
sent.
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


def _ids(relay: Finished) -> tuple[str, str, str]:
    return (
        safe(relay.workspace_id, _LOG_LIMIT),
        safe(relay.source_exe_id, _LOG_LIMIT),
        safe(relay.dest_exe_id, _LOG_LIMIT),
    )


class Finished(Protocol):
    @property
    def ticket(self) -> str: ...
    @property
    def workspace_id(self) -> str: ...
    @property
    def source_exe_id(self) -> str: ...
    @property
    def dest_exe_id(self) -> str: ...
    @property
    def bytes(self) -> int: ...
    @property
    def session(self) -> RelaySession: ...
    @property
    def error(self) -> Exception | None: ...


class Metrics:
    """Counters derived from outcomes; rendered as Prometheus text."""

    __slots__ = ("bytes_total", "outcomes", "paired", "pairing_s_sum", "transfer_s_sum")

    def __init__(self) -> None:
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

    def render(self, active: int, waiting: int, connections: int) -> bytes:
        lines = [
            "# HELP fastrelay_relays_total Relays finished, by outcome.",
            "# TYPE fastrelay_relays_total counter",
        ]
        for outcome, n in self.outcomes.items():
            lines.append(f'fastrelay_relays_total{{outcome="{outcome.value}"}} {n}')
        lines += [
            "# HELP fastrelay_bytes_total Payload bytes delivered to destinations.",
            "# TYPE fastrelay_bytes_total counter",
            f"fastrelay_bytes_total {self.bytes_total}",
            "# HELP fastrelay_active_relays Live tickets (any state).",
            "# TYPE fastrelay_active_relays gauge",
            f"fastrelay_active_relays {active}",
            "# HELP fastrelay_waiting_relays Live tickets not yet paired.",
            "# TYPE fastrelay_waiting_relays gauge",
            f"fastrelay_waiting_relays {waiting}",
            "# HELP fastrelay_connections Open client connections.",
            "# TYPE fastrelay_connections gauge",
            f"fastrelay_connections {connections}",
            "# HELP fastrelay_pairing_seconds Mint-to-pairing time of paired relays.",
            "# TYPE fastrelay_pairing_seconds summary",
            f"fastrelay_pairing_seconds_sum {self.pairing_s_sum:.6f}",
            f"fastrelay_pairing_seconds_count {self.paired}",
            "# HELP fastrelay_transfer_seconds Pairing-to-end time of paired relays.",
            "# TYPE fastrelay_transfer_seconds summary",
            f"fastrelay_transfer_seconds_sum {self.transfer_s_sum:.6f}",
            f"fastrelay_transfer_seconds_count {self.paired}",
        ]
        return ("\n".join(lines) + "\n").encode()


def log_created(relay: Finished, ttl_s: float, max_bytes: int) -> None:
    if log.isEnabledFor(logging.INFO):
        log.info(
            "relay created id=%s workspace=%s source=%s dest=%s ttl_s=%g max_bytes=%d",
            ticket_id(relay.ticket),
            *_ids(relay),
            ttl_s,
            max_bytes,
        )


def log_finished(relay: Finished) -> None:
    session = relay.session
    assert session.outcome is not None
    level = logging.INFO if session.outcome is Outcome.OK else logging.WARNING
    if log.isEnabledFor(level):
        err = relay.error
        log.log(
            level,
            "relay ended id=%s outcome=%s workspace=%s source=%s dest=%s bytes=%d "
            "wait_s=%.3f transfer_s=%.3f%s",
            ticket_id(relay.ticket),
            session.outcome.value,
            *_ids(relay),
            relay.bytes,
            session.waited_s(),
            session.transfer_s(),
            f" error={safe(err, _LOG_LIMIT)}" if err is not None else "",
        )
