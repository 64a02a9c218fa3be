"""The life of one client connection, as data.

Theory of operation
-------------------
A connection reads request heads (``READING_HEAD``), and a small body
(``READING_BODY``: a mint's, or any other request's, read to be dropped so
that no body byte is ever read as a request), answering each request in turn
on the same connection. An answer the client does not read is held by the transport; if
that grows past the write limit the connection stops reading
(``ANSWERING``) until the client catches up, so pipelined requests can never
make the server buffer more than a bounded amount per connection.

A request that needs the cluster's word first (a mint that takes a slot in
Redis, or a signed ticket's first arrival at this node) waits for it in
``CONSULTING``, not reading, until the answer (``CONSULTED``) lets it go on.

A ``/relay/{ticket}`` request claims one side of a relay and waits for the
other (``WAITING``); while it waits we keep reading (a bounded part of a
waiting upload's body), because only a read shows that its client died. When
the partner arrives both connections are told ``PAIRED`` and become the two
ends of one `transfer.Transfer`: ``UPLOADING`` (the source) and
``DOWNLOADING`` (the destination). When the transfer ends the source is
answered and closed, the destination either returns to ``READING_HEAD`` (a
complete body, keep-alive) or is reset. An answer that leaves part of a
request body unread ends in ``LINGERING``: we half-close and discard input
for a while so the client reads our answer instead of a reset.

Every callback the connection receives is one `Event`. `LIFECYCLE` maps each
(phase, event) pair to the name of the `HttpConnection` method that handles
it and the phases that method may leave the connection in. There is no pair
without an entry: a test walks all of them with a fake transport and a fake
clock and checks that each handler only ever moves to the phases listed.

No IO here.
"""

from __future__ import annotations

import dataclasses
import enum


class Phase(enum.Enum):
    READING_HEAD = "reading_head"  # waiting for (the rest of) a request head
    READING_BODY = "reading_body"  # reading a request body: a mint's, or one we drop
    ANSWERING = "answering"  # answers queued past the write limit: not reading
    CONSULTING = "consulting"  # the request waits for the shared ledger's answer
    WAITING = "waiting"  # holds one side of a relay, partner not here yet
    UPLOADING = "uploading"  # paired source: reads go to the transfer
    DOWNLOADING = "downloading"  # paired destination: the transfer writes to us
    LINGERING = "lingering"  # answered early; discarding unread input, then close
    CLOSED = "closed"  # we closed or aborted, or the peer is gone


class Event(enum.Enum):
    DATA = "data"  # bytes arrived (buffer_updated)
    EOF = "eof"  # the client half-closed (eof_received)
    LOST = "lost"  # the connection is gone (connection_lost)
    WRITE_PAUSED = "write_paused"  # the transport holds more than its high mark
    WRITE_RESUMED = "write_resumed"  # ... and is back under its low mark
    TIMER = "timer"  # this connection's deadline passed
    PAIRED = "paired"  # the relay we wait on has both sides: a transfer starts
    PARTNER_GONE = "partner_gone"  # our relay or transfer ended without us
    SHUTDOWN = "shutdown"  # the server is closing
    CONSULTED = "consulted"  # the shared ledger answered (or failed)
    DRAIN = "drain"  # the server stopped accepting: idle connections go
    SUSPENDED = "suspended"  # resumable relay: the other end broke; wait for a new one
    SUPERSEDED = "superseded"  # resumable relay: a newer request took our waiting side


@dataclasses.dataclass(frozen=True, slots=True)
class Step:
    handler: str
    """Name of the `HttpConnection` method that handles the event."""
    to: frozenset[Phase]
    """Phases the handler may leave the connection in."""


P = Phase
_ANY_REQUEST = frozenset(
    {
        P.READING_HEAD,
        P.READING_BODY,
        P.ANSWERING,
        P.CONSULTING,
        P.WAITING,
        P.UPLOADING,
        P.DOWNLOADING,
        P.LINGERING,
        P.CLOSED,
    }
)
_ENDED = frozenset({P.LINGERING, P.CLOSED})


def _step(handler: str, *to: Phase | frozenset[Phase]) -> Step:
    phases: set[Phase] = set()
    for item in to:
        phases |= item if isinstance(item, frozenset) else {item}
    return Step(handler, frozenset(phases))


def _same(phase: Phase, handler: str = "ignore") -> Step:
    return _step(handler, phase)


LIFECYCLE: dict[tuple[Phase, Event], Step] = {}

for _phase in P:
    # The connection is gone: forget it, whatever it was doing. In the
    # phases below LOST also tells the relay or transfer (overridden there).
    LIFECYCLE[(_phase, Event.LOST)] = _step("forget", P.CLOSED)
    for _event in (Event.WRITE_PAUSED, Event.WRITE_RESUMED):
        LIFECYCLE[(_phase, _event)] = _same(_phase, "note_write_state")
    LIFECYCLE[(_phase, Event.PAIRED)] = _same(_phase)  # only a WAITING side pairs
    LIFECYCLE[(_phase, Event.PARTNER_GONE)] = _same(_phase)
    LIFECYCLE[(_phase, Event.CONSULTED)] = _same(_phase)  # only CONSULTING consults
    # Drain leaves every request under way alone; only an idle connection closes.
    LIFECYCLE[(_phase, Event.DRAIN)] = _same(_phase)
    # Only a transfer's end is suspended, only a waiting side superseded.
    LIFECYCLE[(_phase, Event.SUSPENDED)] = _same(_phase)
    LIFECYCLE[(_phase, Event.SUPERSEDED)] = _same(_phase)

LIFECYCLE.update(
    {
        # --- requests ------------------------------------------------------------
        (P.READING_HEAD, Event.DATA): _step("read_requests", _ANY_REQUEST),
        (P.READING_HEAD, Event.EOF): _step("close", P.CLOSED),
        (P.READING_HEAD, Event.WRITE_PAUSED): _step("hold_answers", P.ANSWERING),
        (P.READING_HEAD, Event.TIMER): _step("head_timed_out", _ENDED),
        (P.READING_HEAD, Event.SHUTDOWN): _step("close", P.CLOSED),
        # A kept-alive connection with no request begun would only bring one
        # more request to a server that refuses it: close it (as Go's
        # Shutdown does), so a proxy opens its next connection elsewhere.
        (P.READING_HEAD, Event.DRAIN): _step("close_if_idle", P.READING_HEAD, P.CLOSED),
        (P.READING_BODY, Event.DATA): _step("read_requests", _ANY_REQUEST),
        (P.READING_BODY, Event.EOF): _step("close", P.CLOSED),
        (P.READING_BODY, Event.TIMER): _step("head_timed_out", _ENDED),
        # A mint already started is answered (503 while draining) and closed.
        (P.READING_BODY, Event.SHUTDOWN): _same(P.READING_BODY),
        (P.ANSWERING, Event.DATA): _same(P.ANSWERING, "hold_input"),
        (P.ANSWERING, Event.EOF): _step("close", P.CLOSED),
        (P.ANSWERING, Event.WRITE_RESUMED): _step("resume_requests", _ANY_REQUEST),
        (P.ANSWERING, Event.TIMER): _step("abort", P.CLOSED),
        (P.ANSWERING, Event.SHUTDOWN): _step("close", P.CLOSED),
        # --- waiting for the shared ledger ----------------------------------------
        (P.CONSULTING, Event.DATA): _same(P.CONSULTING, "hold_input"),
        (P.CONSULTING, Event.EOF): _same(P.CONSULTING, "note_eof"),
        # LOST: "forget" (above) also drops the consultation.
        (P.CONSULTING, Event.TIMER): _same(P.CONSULTING),  # the ledger bounds its own time
        (P.CONSULTING, Event.SHUTDOWN): _same(P.CONSULTING),  # the answer sees the drain
        (P.CONSULTING, Event.CONSULTED): _step("resume_after_consult", _ANY_REQUEST),
        # --- waiting for a partner -----------------------------------------------
        (P.WAITING, Event.DATA): _same(P.WAITING, "hold_waiting_input"),
        (P.WAITING, Event.EOF): _step("leave_relay", P.CLOSED),
        (P.WAITING, Event.LOST): _step("leave_relay_lost", P.CLOSED),
        (P.WAITING, Event.TIMER): _same(P.WAITING),  # the pairing TTL is the relay's
        (P.WAITING, Event.PAIRED): _step("join_transfer", P.UPLOADING, P.DOWNLOADING),
        (P.WAITING, Event.PARTNER_GONE): _step("answer_relay_ended", P.READING_HEAD, _ENDED),
        (P.WAITING, Event.SUPERSEDED): _step("leave_superseded", P.CLOSED),
        # registry.shutdown_waiting ends every waiting relay: PARTNER_GONE follows.
        (P.WAITING, Event.SHUTDOWN): _same(P.WAITING),
        # --- the two ends of a transfer ------------------------------------------
        (P.UPLOADING, Event.DATA): _step("feed_transfer", P.UPLOADING, _ENDED),
        (P.UPLOADING, Event.EOF): _step("upload_eof", P.UPLOADING, _ENDED),
        (P.UPLOADING, Event.LOST): _step("upload_lost", P.CLOSED),
        (P.UPLOADING, Event.TIMER): _same(P.UPLOADING),  # the idle timer is the transfer's
        (P.UPLOADING, Event.PARTNER_GONE): _step("answer_upload", _ENDED),
        (P.UPLOADING, Event.SHUTDOWN): _step("cut_transfer", _ENDED),
        (P.UPLOADING, Event.SUSPENDED): _step("wait_again", P.WAITING),
        (P.DOWNLOADING, Event.DATA): _same(P.DOWNLOADING, "hold_input"),
        # A half-closed receiver can still read the body (and, after the
        # last byte, it may be how a resumable relay learns it has all).
        (P.DOWNLOADING, Event.EOF): _step("download_eof", P.DOWNLOADING, _ENDED),
        (P.DOWNLOADING, Event.LOST): _step("download_lost", P.CLOSED),
        (P.DOWNLOADING, Event.WRITE_PAUSED): _same(P.DOWNLOADING, "download_paused"),
        (P.DOWNLOADING, Event.WRITE_RESUMED): _same(P.DOWNLOADING, "download_resumed"),
        (P.DOWNLOADING, Event.TIMER): _same(P.DOWNLOADING),
        (P.DOWNLOADING, Event.PARTNER_GONE): _step(
            "end_download", P.READING_HEAD, P.ANSWERING, P.CLOSED, _ANY_REQUEST
        ),
        (P.DOWNLOADING, Event.SHUTDOWN): _step("cut_transfer", P.CLOSED),
        (P.DOWNLOADING, Event.SUSPENDED): _step("wait_again", P.WAITING),
        # --- endings -------------------------------------------------------------
        (P.LINGERING, Event.DATA): _same(P.LINGERING, "discard_input"),
        (P.LINGERING, Event.EOF): _step("close", P.CLOSED),
        (P.LINGERING, Event.TIMER): _step("close", P.CLOSED),
        (P.LINGERING, Event.SHUTDOWN): _step("close", P.CLOSED),
        (P.CLOSED, Event.DATA): _same(P.CLOSED, "discard_input"),
        (P.CLOSED, Event.EOF): _same(P.CLOSED),
        (P.CLOSED, Event.TIMER): _same(P.CLOSED),
        (P.CLOSED, Event.SHUTDOWN): _same(P.CLOSED),
    }
)
