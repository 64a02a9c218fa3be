"""The public registry of relays: mint, look up, pair, expire, finish.

This is the Python mirror of the Go package's ``Registry``/``Relay``: a
gateway that embeds fastrelay mints with `Registry.create` and serves the
transfers with `fastrelay.start_server` on the same registry.

Theory of operation
-------------------
Each `Relay` owns one `RelaySession` (the state machine) and, while a side
waits, a reference to that side's connection (a `WaitingEnd`). The registry
keeps live relays in a table by ticket and schedules each relay's pairing
deadline on the server's one timer (`timer.LoopTimer`, shared with every
connection deadline): that is where the TTL fires (`Relay._expire`). What
counts against the caps is the ledger's (`ledger.py`): a `LocalLedger`
for one node, plus a `SharedLedger` (Redis) when nodes share limits.

Tickets come in two kinds. A random ticket (`tickets.new_ticket`) is known
only here: minting creates its relay. A signed ticket (``keys`` set,
`signed_tickets.py`) carries its own expiry, ids and byte limit, so minting
only takes a slot and signs; the relay is created by the first side to
reach a node (`open_signed`, after `admit` asks the cluster whether the
ticket is spent or served elsewhere).

Pairing happens in one place: `Relay.claim` records a side and, when it
completes the pair, returns the waiting partner. The connection that made
the claim then builds the transfer from the relay and the two ends; nothing
here knows what a connection or a transfer is. A fan-out relay
(``receivers > 1``) keeps its GETs in ``waiting_receivers``; its GET side
counts as claimed (for the session) only once all of them are here, a GET
that leaves frees its place, one too many is a 423, and the connection
that completes the pair takes them all (`Relay.take_receivers`).

Every path that ends a relay goes through `Relay.finish`, which applies the
final input to the session (so the outcome is recorded once), removes the
ticket, frees its slot (and marks a signed ticket spent), tells a
still-waiting side (`WaitingEnd.relay_ended`), records metrics and the log
line, and resolves ``await relay.wait()``.

Everything runs on the event loop thread; nothing here blocks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import math
import sys
import time
from collections.abc import Callable
from typing import Literal, NamedTuple, Protocol

from ..cluster.ledger import Admission, Holding, LocalLedger, SharedLedger
from ..cluster.signed_tickets import TicketClaims, TicketKeys, looks_signed
from ..core import observe, resume
from ..core.config import MAX_DURATION_S
from ..core.deadlines import Deadline
from ..core.errors import (
    DownloadAborted,
    Expired,
    PairingTimeout,
    PayloadTooLarge,
    RangeNotSatisfiable,
    RelayError,
    ResumeFrom,
    ServedElsewhere,
    ShuttingDown,
    SideAlreadyClaimed,
    TicketNotFound,
    UploadAborted,
    UpstreamFailed,
)
from ..core.heads import RequestHead
from ..core.mint import RelayOptions
from ..core.resume import DEFAULT_MAX_RESUMES, ResumeRecord
from ..core.session import Input, Outcome, RelaySession, State
from ..core.tickets import new_ticket, ticket_key
from .pacing import PacingBoard
from .timer import LoopTimer

DEFAULT_TTL_S = 300.0
DEFAULT_MAX_PER_WORKSPACE = 16
DEFAULT_MAX_PENDING = 4096


Side = Literal["PUT", "GET"]


class WaitingEnd(Protocol):
    """A connection that claimed one side of a relay and waits for the other."""

    @property
    def head(self) -> RequestHead | None: ...

    def relay_ended(self, err: RelayError) -> None:
        """The relay ended while we waited: answer ``err``; the side is gone."""

    @property
    def resume_at(self) -> int | None:
        """A resumable relay's end that is carried over from a broken
        transfer: the offset it is at (the destination's next byte, the
        source's next byte). None for a fresh request."""

    def superseded(self) -> None:
        """A newer request took this side over: close; the side is gone."""

    def resume_refused(self, err: RelayError) -> None:
        """A carried-over source cannot serve the new destination: answer
        ``err`` (409 + Upload-Offset) and close; the side is gone."""


class Stream(Protocol):
    """The transfer of a paired relay, as the relay sees it."""

    def supersede(self, side: Side) -> None:
        """A newer request takes ``side`` over: that end breaks now."""


@dataclasses.dataclass(frozen=True, slots=True)
class Minted:
    """What a mint hands out."""

    ticket: str
    expires_at: datetime.datetime
    relay: Relay | None
    """The live relay, when this process serves the ticket (random tickets);
    None for a signed ticket, whose relay opens where its first side arrives."""


class Relay:
    """One ticket: its metadata, its session, and its waiting sides."""

    __slots__ = (
        "_expiry",
        "_future",
        "_registry",
        "breaks",
        "bytes",
        "deadline",
        "dest_exe_id",
        "digest",
        "error",
        "expires_at",
        "get_party",
        "key",
        "max_bytes",
        "max_rate",
        "max_resumes",
        "put_party",
        "receivers",
        "record",
        "resumable",
        "session",
        "signed",
        "source_exe_id",
        "stream",
        "ticket",
        "ttl_s",
        "waiting_receivers",
        "workspace_id",
    )

    def __init__(
        self,
        registry: Registry,
        ticket: str,
        workspace_id: str,
        source_exe_id: str,
        dest_exe_id: str,
        max_bytes: int,
        now: float,
        deadline: float,
        expires_at: datetime.datetime,
        *,
        signed: bool = False,
        resumable: bool = False,
        max_resumes: int = DEFAULT_MAX_RESUMES,
        receivers: int = 1,
        max_rate: int = 0,
    ) -> None:
        self._registry = registry
        self.ticket = ticket
        self.key = ticket_key(ticket)
        self.signed = signed
        self.workspace_id = workspace_id
        self.source_exe_id = source_exe_id
        self.dest_exe_id = dest_exe_id
        self.max_bytes = max_bytes
        self.deadline = deadline
        """Monotonic time the pairing deadline passes at."""
        self.expires_at = expires_at
        self.session = RelaySession(now)
        self.bytes = 0
        """Payload bytes handed to the destination."""
        self.digest: str | None = None
        """Hex SHA-256 of the bytes handed to the destination (--audit-digest)."""
        self.error: RelayError | None = None
        self.put_party: WaitingEnd | None = None
        self.get_party: WaitingEnd | None = None
        self._future: asyncio.Future[None] | None = None
        self._expiry: Deadline | None = None
        self.resumable = resumable
        self.max_resumes = max_resumes
        self.ttl_s = deadline - now
        """The pairing window, opened again after each break (resumable)."""
        self.record: ResumeRecord | None = None
        """A resumable relay's length, headers and resume point, from its
        first pairing on."""
        self.breaks = 0
        """Breaks survived so far (resumable)."""
        self.stream: Stream | None = None
        """The transfer while paired and streaming."""
        self.receivers = receivers
        """GETs that each receive the whole upload (fan-out when > 1)."""
        self.max_rate = max_rate
        """This relay's own pace in bytes/s (0: none of its own)."""
        self.waiting_receivers: list[WaitingEnd] = []
        """A fan-out relay's GETs waiting for the rest (``get_party`` is
        not used when ``receivers > 1``); handed to the transfer at pairing."""

    # --- queries -------------------------------------------------------------------

    @property
    def paired(self) -> bool:
        return self.session.paired

    @property
    def outcome(self) -> Outcome | None:
        return self.session.outcome

    def done(self) -> bool:
        return self.session.done

    async def wait(self) -> None:
        """Return once the relay has finished (success or failure)."""
        if self.session.done:
            return
        if self._future is None:
            self._future = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._future)

    def __await__(self):  # type: ignore[no-untyped-def]
        return self.wait().__await__()

    # --- sides arriving and leaving ------------------------------------------------

    def claim(self, side: Side, end: WaitingEnd) -> WaitingEnd | None:
        """``end`` takes ``side``. Returns the partner if this completes the
        pair (the session is then STREAMING), else None (``end`` waits).

        Raises the error ``end`` must be answered with: 423 (side taken),
        503 (draining), 413 (a Content-Length over ``max_bytes``); on a
        resumable relay also 411, 416 and 409 (`resume.py`).
        """
        if side == "GET" and self.receivers > 1:
            return self._claim_receiver(end)
        session = self.session
        if session.put_claimed if side == "PUT" else session.get_claimed:
            if not self.resumable:
                raise SideAlreadyClaimed(side)
            self._supersede(side)
            if session.done:
                raise TicketNotFound()  # that break was one too many
        self._registry.check_open()
        if side == "PUT":
            assert end.head is not None
            # A resumable PUT's length is the whole body's (its Content-Range's).
            length = (
                self._check_resumed_upload(end.head) if self.resumable else end.head.content_length
            )
            if self.max_bytes > 0 and length is not None and length > self.max_bytes:
                # Refused before a single byte is read: the ticket is spent,
                # and a GET that is already waiting learns why at once.
                err = PayloadTooLarge(length, self.max_bytes)
                self.finish(Input.REFUSED_TOO_LARGE, err)
                raise err
            if self.resumable and self.get_party is not None:
                self._check_pairing(end, self.get_party)
            self.put_party = end
            event = Input.PUT_ARRIVES
        else:
            if self.resumable:
                assert end.head is not None
                resume.check_get(self.record, resume.get_offset(end.head))
                if self.put_party is not None:
                    self._check_pairing(self.put_party, end)
            self.get_party = end
            event = Input.GET_ARRIVES
        registry = self._registry
        first = not session.paired
        if self.record is not None:
            registry.metrics.resumes[side] += 1  # a new request continues the relay
        if session.handle(event, registry.clock()) is not State.STREAMING:
            return None
        if first:
            registry._paired_relay(self)
        if self._expiry is not None:  # the TTL bounds pairing only
            self._expiry.cancel()
            self._expiry = None
        partner = self.get_party if side == "PUT" else self.put_party
        if self.receivers > 1 and side == "PUT":
            partner = self.waiting_receivers[0]
        self.put_party = self.get_party = None
        assert partner is not None
        return partner

    # --- fan-out: N GETs for one PUT --------------------------------------------

    def _claim_receiver(self, end: WaitingEnd) -> WaitingEnd | None:
        """One more GET of a fan-out relay. The GET side is claimed (for the
        session) once all ``receivers`` are here; one more is a 423."""
        waiting = self.waiting_receivers
        if len(waiting) >= self.receivers or self.session.get_claimed:
            raise SideAlreadyClaimed("GET")
        self._registry.check_open()
        waiting.append(end)
        if len(waiting) < self.receivers:
            return None
        registry = self._registry
        if self.session.handle(Input.GET_ARRIVES, registry.clock()) is not State.STREAMING:
            return None
        registry._paired_relay(self)
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        partner = self.put_party
        self.put_party = None
        assert partner is not None
        return partner

    def take_receivers(self) -> list[WaitingEnd]:
        """A paired fan-out relay's GETs, in arrival order, for its transfer."""
        taken, self.waiting_receivers = self.waiting_receivers, []
        return taken

    # --- resumable relays: superseding, pairing again, breaks -----------------------

    def _supersede(self, side: Side) -> None:
        """A new request for a claimed side of a resumable relay: the old
        connection goes (a dead network often leaves it open on our side)."""
        self._registry.metrics.superseded += 1
        if self.session.state is State.STREAMING:
            assert self.stream is not None
            self.stream.supersede(side)  # a break: `broke` runs, the side is free
            return
        old = self.put_party if side == "PUT" else self.get_party
        if old is None:
            return
        if side == "PUT":
            self.put_party = None
            self.session.handle(Input.PUT_LEAVES, self._registry.clock())
        else:
            self.get_party = None
            self.session.handle(Input.GET_LEAVES, self._registry.clock())
        carried = old.resume_at is not None
        old.superseded()
        if carried:
            self._lost_carried_end(side)

    def _check_resumed_upload(self, head: RequestHead) -> int:
        """The body's length ``L`` a resumable PUT declares; 411 for chunked,
        400 for a bad Content-Range, 409 if it is not the first PUT's body."""
        length = resume.put_offset(head)[1]
        resume.check_upload(self.record, head, length)
        return length

    def _check_pairing(self, up: WaitingEnd, down: WaitingEnd) -> None:
        """Can ``up`` serve what ``down`` needs next? 409 to whichever side
        cannot stay: a new PUT is refused (before its ``100 Continue``); a
        carried-over PUT is answered 409 and leaves, the GET then waits."""
        record = self.record
        down_at = down.resume_at
        if down_at is None:
            assert down.head is not None
            down_at = resume.get_offset(down.head) or 0
            if record is None and down_at:
                # A first pairing here with a Range (the ticket's node died,
                # its sides came back to us): the PUT says what L is.
                assert up.head is not None
                length = resume.put_offset(up.head)[1]
                if down_at >= length:
                    self._refuse_waiting(up, down, RangeNotSatisfiable(length))
                    return
        up_at = up.resume_at
        if up_at is None:
            assert up.head is not None
            up_at = resume.put_offset(up.head)[0]
            if up_at > down_at:
                self._refuse_waiting(down, up, ResumeFrom(down_at))
            return
        if record is None:
            return
        if up_at > down_at:
            # The open PUT is past the byte the new destination needs, and we
            # keep no byte: it must send again from there.
            self.put_party = None
            self.session.handle(Input.PUT_LEAVES, self._registry.clock())
            record.point = down_at
            up.resume_refused(ResumeFrom(down_at))

    def can_resume(self) -> bool:
        """Whether one more break leaves this relay alive (resumable, within
        ``max_resumes``); if not, a break ends it as a failure, as in v1."""
        return self.resumable and self.breaks < self.max_resumes and not self.session.done

    def _refuse_waiting(self, keep: WaitingEnd, refused: WaitingEnd, err: RelayError) -> None:
        """One of a pair that cannot pair: the arriving one is refused (the
        caller raises); a waiting one is answered and leaves."""
        if refused is not self.put_party and refused is not self.get_party:
            raise err
        if refused is self.put_party:
            self.put_party = None
            self.session.handle(Input.PUT_LEAVES, self._registry.clock())
        else:
            self.get_party = None
            self.session.handle(Input.GET_LEAVES, self._registry.clock())
        refused.resume_refused(err)

    def broke(self, side: Side, survivor: WaitingEnd | None) -> None:
        """The transfer lost ``side`` (a break; `can_resume` said it may):
        ``survivor`` (the other end, if still there) waits for a new
        ``side``, within a fresh pairing window."""
        assert self.can_resume()
        registry = self._registry
        self.stream = None
        self.session.handle(
            Input.UPLOAD_BROKE if side == "PUT" else Input.DOWNLOAD_BROKE, registry.clock()
        )
        self._count_break()
        if side == "PUT":
            self.get_party = survivor
        else:
            self.put_party = survivor
        if survivor is None:
            # Both gone at once (the superseded side's partner was gone too).
            if side == "PUT":
                self.session.handle(Input.GET_LEAVES, registry.clock())
            else:
                self.session.handle(Input.PUT_LEAVES, registry.clock())
        self._open_window()

    def _count_break(self) -> None:
        self.breaks += 1

    def _lost_carried_end(self, side: Side) -> None:
        """An end carried over from a broken transfer went while it waited:
        a break of its own; past ``max_resumes`` the relay fails."""
        if self.breaks >= self.max_resumes:
            why = f"relay: {'upload' if side == 'PUT' else 'download'} broke too often"
            if side == "PUT":
                self.finish(Input.UPLOAD_ABORTED, UploadAborted(why, self.bytes))
            else:
                self.finish(Input.DOWNLOAD_ABORTED, DownloadAborted(why, self.bytes))
            return
        self._count_break()

    def _open_window(self) -> None:
        """After a break, the pairing deadline is the break time plus the TTL."""
        registry = self._registry
        if self._expiry is not None:
            self._expiry.cancel()
        self.deadline = registry.clock() + self.ttl_s
        self._expiry = registry.timer.at(self.deadline, self._expire)

    def leave(self, end: WaitingEnd) -> None:
        """A waiting side's client went away: free the side for a retry."""
        side: Side
        if self.put_party is end:
            self.put_party, side = None, "PUT"
            self.session.handle(Input.PUT_LEAVES, self._registry.clock())
        elif self.get_party is end:
            self.get_party, side = None, "GET"
            self.session.handle(Input.GET_LEAVES, self._registry.clock())
        elif end in self.waiting_receivers:
            # A fan-out GET: its slot is free again; the GET side is no
            # longer complete if it was.
            if self.session.get_claimed:
                self.session.handle(Input.GET_LEAVES, self._registry.clock())
            self.waiting_receivers.remove(end)
            return
        else:
            return
        if end.resume_at is not None:
            self._lost_carried_end(side)

    def _expire(self) -> None:
        """The pairing deadline passed (called by the server's timer)."""
        self._expiry = None
        if not self.session.done and self.session.state is not State.STREAMING:
            self.finish(Input.DEADLINE, Expired())

    # --- the end -------------------------------------------------------------------

    def finish(self, event: Input, error: RelayError | None) -> None:
        """End the relay with the outcome ``event`` leads to. Idempotent."""
        if self.session.done:
            return
        registry = self._registry
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        was_paired = self.session.paired
        self.session.handle(event, registry.clock())
        self.error = error
        registry._remove(self, was_paired)
        # Tell any side still waiting; which answer depends on why we ended.
        parties = [(self.put_party, "GET"), (self.get_party, "PUT")]
        # A fan-out GET waits for the PUT, or, with it here, for the others.
        others = "PUT" if self.put_party is None else "GET"
        parties.extend((end, others) for end in self.take_receivers())
        for party, waiting_for in parties:
            if party is None:
                continue
            if event is Input.DEADLINE:
                party.relay_ended(PairingTimeout(waiting_for))
            elif isinstance(error, PayloadTooLarge):
                party.relay_ended(UpstreamFailed(error))
            elif error is not None:
                party.relay_ended(error)
        self.put_party = self.get_party = None
        registry._finished(self)
        if self._future is not None and not self._future.done():
            self._future.set_result(None)

    def __repr__(self) -> str:
        return f"<Relay {self.session.state.value} bytes={self.bytes}>"


class Registry:
    """Live relays, the ledgers their slots are counted in, and the timer
    their TTLs run on."""

    def __init__(
        self,
        max_per_workspace: int = DEFAULT_MAX_PER_WORKSPACE,
        default_ttl: float = DEFAULT_TTL_S,
        *,
        max_pending: int = DEFAULT_MAX_PENDING,
        keys: TicketKeys | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], datetime.datetime] | None = None,
        max_resumes: int = DEFAULT_MAX_RESUMES,
    ) -> None:
        if max_per_workspace <= 0:
            max_per_workspace = DEFAULT_MAX_PER_WORKSPACE
        if default_ttl <= 0:
            default_ttl = DEFAULT_TTL_S
        if max_pending <= 0:
            max_pending = DEFAULT_MAX_PENDING
        self.default_ttl = default_ttl
        self.max_resumes = max_resumes
        """Breaks a resumable relay survives; one more ends it."""
        self.clock = clock
        self.wall_clock = wall_clock or (lambda: datetime.datetime.now(datetime.UTC))
        self.metrics = observe.Metrics()
        self.timer = LoopTimer(clock)
        """The one timer of the server serving this registry: pairing TTLs
        here, header, idle and linger deadlines in the connections."""
        self.draining = False
        self.keys = keys
        """Set: mint signs tickets, and signed tickets from any minter with
        one of these keys are served (`open_signed`). Replace to rotate."""
        self.ledger = LocalLedger(max_per_workspace, max_pending)
        self.shared: SharedLedger | None = None
        self._refresh: Deadline | None = None
        self._table: dict[str, Relay] = {}
        self._paired = 0
        self.pacing = PacingBoard(self.timer, self.metrics)
        """The rates of paced uploads (``--max-rate``, ``--workspace-rate``)."""

    @property
    def max_per_workspace(self) -> int:
        return self.ledger.max_per_workspace

    # --- Go-compatible surface -----------------------------------------------------

    def create(
        self,
        workspace_id: str,
        source_exe_id: str,
        dest_exe_id: str,
        ttl: float | None = None,
        max_bytes: int = 0,
        *,
        resumable: bool = False,
        receivers: int = 1,
        max_rate: int = 0,
    ) -> Relay:
        """Mint a random ticket that this process serves. Call on the event
        loop that serves it.

        ``ttl`` None or <= 0 means the default; ``max_bytes`` <= 0 means no
        limit. Raises `WorkspaceCapReached`, `MintDisabled` (pending cap) or
        `ShuttingDown`. With a shared ledger use ``await mint(...)``.

        v2 options: ``resumable`` (survives broken connections),
        ``receivers`` (GETs that each get the whole upload, fan-out),
        ``max_rate`` (bytes/s, 0: none of its own). `ValueError` if they
        are out of range or combined as the contract does not allow.
        """
        options = RelayOptions.checked(resumable, receivers, max_rate)
        return self._create(workspace_id, source_exe_id, dest_exe_id, ttl, max_bytes, options)

    def _create(
        self,
        workspace_id: str,
        source_exe_id: str,
        dest_exe_id: str,
        ttl: float | None,
        max_bytes: int,
        options: RelayOptions,
    ) -> Relay:
        if self.shared is not None:
            raise RuntimeError("this registry counts slots in a shared ledger: await mint()")
        ttl_s = self._check_mint(workspace_id, source_exe_id, dest_exe_id, ttl)
        relay = self._new_relay(
            new_ticket(), workspace_id, source_exe_id, dest_exe_id, max_bytes, ttl_s, options
        )
        self.ledger.reserve(relay.key, workspace_id, relay.deadline, self.clock())
        self._add(relay)
        observe.log_created(relay, ttl_s, relay.max_bytes)
        return relay

    # --- minting in any mode -------------------------------------------------------

    def mint_now(
        self,
        workspace_id: str,
        source_exe_id: str,
        dest_exe_id: str,
        ttl: float | None = None,
        max_bytes: int = 0,
        *,
        resumable: bool = False,
        receivers: int = 1,
        max_rate: int = 0,
    ) -> Minted:
        """What the mint endpoint does, when no shared ledger is attached:
        a signed ticket with ``keys``, else a random one with its relay."""
        options = RelayOptions.checked(resumable, receivers, max_rate)
        return self._mint_now(workspace_id, source_exe_id, dest_exe_id, ttl, max_bytes, options)

    def _mint_now(
        self,
        workspace_id: str,
        source_exe_id: str,
        dest_exe_id: str,
        ttl: float | None,
        max_bytes: int,
        options: RelayOptions,
    ) -> Minted:
        if self.keys is None:
            relay = self._create(workspace_id, source_exe_id, dest_exe_id, ttl, max_bytes, options)
            return Minted(relay.ticket, relay.expires_at, relay)
        if self.shared is not None:
            raise RuntimeError("this registry counts slots in a shared ledger: await mint()")
        ttl_s = self._check_mint(workspace_id, source_exe_id, dest_exe_id, ttl)
        ticket, claims, expires_at = self._sign(
            workspace_id, source_exe_id, dest_exe_id, max_bytes, ttl_s, options
        )
        now = self.clock()
        self.ledger.reserve(ticket_key(ticket), workspace_id, now + ttl_s, now)
        observe.log_created(_Signed(ticket, claims), ttl_s, claims.max_bytes)
        return Minted(ticket, expires_at, None)

    async def mint(
        self,
        workspace_id: str,
        source_exe_id: str,
        dest_exe_id: str,
        ttl: float | None = None,
        max_bytes: int = 0,
        *,
        resumable: bool = False,
        receivers: int = 1,
        max_rate: int = 0,
    ) -> Minted:
        """`mint_now`, counting the slot in the shared ledger when one is
        attached (raises `ClusterUnavailable` when it cannot be reached)."""
        options = RelayOptions.checked(resumable, receivers, max_rate)
        shared = self.shared
        if shared is None:
            return self._mint_now(workspace_id, source_exe_id, dest_exe_id, ttl, max_bytes, options)
        ttl_s = self._check_mint(workspace_id, source_exe_id, dest_exe_id, ttl, local_caps=False)
        if self.keys is not None:
            ticket, claims, expires_at = self._sign(
                workspace_id, source_exe_id, dest_exe_id, max_bytes, ttl_s, options
            )
            await shared.reserve(ticket_key(ticket), workspace_id, claims.expires_ms)
            observe.log_created(_Signed(ticket, claims), ttl_s, claims.max_bytes)
            return Minted(ticket, expires_at, None)
        relay = self._new_relay(
            new_ticket(), workspace_id, source_exe_id, dest_exe_id, max_bytes, ttl_s, options
        )
        await shared.reserve(relay.key, workspace_id, _unix_ms(relay.expires_at))
        try:
            self.check_open()  # we may have started draining while Redis answered
        except ShuttingDown:
            shared.ended(relay.key, workspace_id, 0, signed=False)
            raise
        self._add(relay)
        observe.log_created(relay, ttl_s, relay.max_bytes)
        return Minted(relay.ticket, relay.expires_at, relay)

    def _check_mint(
        self,
        workspace_id: str,
        source_exe_id: str,
        dest_exe_id: str,
        ttl: float | None,
        *,
        local_caps: bool = True,
    ) -> float:
        if not (workspace_id and source_exe_id and dest_exe_id):
            raise ValueError("relay: workspace_id, source_exe_id, dest_exe_id required")
        self.check_open()
        ttl_s = ttl if ttl is not None and ttl > 0 else self.default_ttl
        if not math.isfinite(ttl_s) or ttl_s > MAX_DURATION_S:
            # Far past any real pairing wait, and where expires_at overflows.
            raise ValueError(f"relay: ttl must be at most {MAX_DURATION_S:g} seconds")
        if local_caps:
            self.ledger.check(workspace_id, self.clock())
        return ttl_s

    def _sign(
        self,
        workspace_id: str,
        source_exe_id: str,
        dest_exe_id: str,
        max_bytes: int,
        ttl_s: float,
        options: RelayOptions,
    ) -> tuple[str, TicketClaims, datetime.datetime]:
        assert self.keys is not None
        # A signed ticket's expiry is whole milliseconds: expires_at says
        # exactly what the ticket says.
        expires_ms = _unix_ms(self.wall_clock()) + math.ceil(ttl_s * 1000)
        claims = TicketClaims.new(
            workspace_id,
            source_exe_id,
            dest_exe_id,
            max_bytes=max_bytes,
            expires_ms=expires_ms,
            resumable=options.resumable,
            receivers=options.receivers,
            max_rate=options.max_rate,
            ttl_ms=math.ceil(ttl_s * 1000),
        )
        return self.keys.sign(claims), claims, _from_unix_ms(expires_ms)

    def _new_relay(
        self,
        ticket: str,
        workspace_id: str,
        source_exe_id: str,
        dest_exe_id: str,
        max_bytes: int,
        ttl_s: float,
        options: RelayOptions,
    ) -> Relay:
        now = self.clock()
        return Relay(
            self,
            ticket,
            workspace_id,
            source_exe_id,
            dest_exe_id,
            max(0, max_bytes),
            now,
            now + ttl_s,
            self.wall_clock() + datetime.timedelta(seconds=ttl_s),
            resumable=options.resumable,
            max_resumes=self.max_resumes,
            receivers=options.receivers,
            max_rate=options.max_rate,
        )

    def _add(self, relay: Relay) -> None:
        self._table[relay.ticket] = relay
        relay._expiry = self.timer.at(relay.deadline, relay._expire)

    # --- arrivals --------------------------------------------------------------------

    def lookup(self, ticket: str) -> Relay | None:
        """The live relay of ``ticket`` in this process, if any."""
        return self._table.get(ticket)

    def verify(self, ticket: str) -> TicketClaims:
        """The claims of a signed ticket not live here, if it may be served:
        signed by one of our keys, not expired, not spent here. Raises
        `TicketNotFound` (410) otherwise."""
        keys = self.keys
        if keys is None or not looks_signed(ticket):
            raise TicketNotFound()
        claims = keys.verify(ticket)
        if claims is None or claims.expired(_unix_ms(self.wall_clock())):
            raise TicketNotFound()
        if self.ledger.is_spent(ticket_key(ticket), self.clock()):
            raise TicketNotFound()
        return claims

    async def admit(self, ticket: str, claims: TicketClaims) -> Relay:
        """`open_signed`, once the shared ledger says the ticket is neither
        spent nor served by another node (this node then holds its lease)."""
        shared = self.shared
        if shared is not None:
            verdict = await shared.admit(ticket_key(ticket))
            if verdict is Admission.SPENT:
                raise TicketNotFound()
            if verdict is Admission.ELSEWHERE:
                raise ServedElsewhere()
        return self.open_signed(ticket, claims)

    def open_signed(self, ticket: str, claims: TicketClaims) -> Relay:
        """The relay of a verified signed ticket, created here on its first
        side's arrival (or the one a concurrent arrival just created)."""
        relay = self._table.get(ticket)
        if relay is not None:
            return relay
        self.check_open()
        now = self.clock()
        left_s = (claims.expires_ms - _unix_ms(self.wall_clock())) / 1000
        if left_s <= 0 or self.ledger.is_spent(ticket_key(ticket), now):
            raise TicketNotFound()  # expired or ended while the cluster answered
        relay = Relay(
            self,
            ticket,
            claims.workspace_id,
            claims.source_exe_id,
            claims.dest_exe_id,
            claims.max_bytes,
            now,
            now + left_s,
            _from_unix_ms(claims.expires_ms),
            signed=True,
            resumable=claims.resumable,
            max_resumes=self.max_resumes,
            receivers=claims.receivers,
            max_rate=claims.max_rate,
        )
        if claims.resumable and claims.ttl_ms:
            relay.ttl_s = claims.ttl_ms / 1000  # the pairing window after a break
        self._add(relay)
        return relay

    @property
    def active_count(self) -> int:
        """Live tickets in any state (Go ActiveCount)."""
        return len(self._table)

    @property
    def waiting_count(self) -> int:
        """Live relays not yet paired."""
        return len(self._table) - self._paired

    def pending_count(self) -> int:
        """Tickets minted here (or opened here) that have not paired."""
        return self.ledger.pending_count(self.clock())

    def check_open(self) -> None:
        if self.draining:
            raise ShuttingDown()

    # --- the shared ledger -------------------------------------------------------------

    def attach(self, shared: SharedLedger) -> None:
        """Count slots and spent tickets in ``shared`` (a cluster) from now on.
        Its heartbeat runs on this registry's timer."""
        self.shared = shared
        # Caps are the cluster's; the local ledger only remembers spent tickets.
        self.ledger = LocalLedger(sys.maxsize, sys.maxsize)
        self._refresh = self.timer.after(shared.refresh_interval_s, self._heartbeat)

    def detach(self) -> SharedLedger | None:
        shared, self.shared = self.shared, None
        if self._refresh is not None:
            self._refresh.cancel()
            self._refresh = None
        return shared

    def _heartbeat(self) -> None:
        shared = self.shared
        if shared is None:
            return
        shared.refresh(
            [Holding(r.key, r.workspace_id, r.paired, r.signed) for r in self._table.values()]
        )
        self._refresh = self.timer.after(shared.refresh_interval_s, self._heartbeat)

    # --- lifecycle -----------------------------------------------------------------

    def shutdown_waiting(self) -> None:
        """Drain: refuse new work, fail every unpaired relay with 503."""
        self.draining = True
        for relay in list(self._table.values()):
            if not relay.paired:
                relay.finish(Input.SHUTDOWN, ShuttingDown())

    def _paired_relay(self, relay: Relay) -> None:
        self._paired += 1
        self.ledger.paired(relay.key)
        if self.shared is not None:
            self.shared.paired(
                relay.key,
                relay.workspace_id,
                _unix_ms(relay.expires_at),
                single_use=relay.signed and not relay.resumable,
            )

    def _remove(self, relay: Relay, was_paired: bool) -> None:
        del self._table[relay.ticket]
        if was_paired:
            self._paired -= 1
        now = self.clock()
        self.ledger.release(relay.key)
        if relay.signed:
            # The ticket itself is still valid until its deadline: remember
            # that it is spent, so it answers 410 here meanwhile.
            self.ledger.spend(relay.key, relay.deadline, now)
        if self.shared is not None:
            self.shared.ended(
                relay.key, relay.workspace_id, _unix_ms(relay.expires_at), relay.signed
            )

    def _finished(self, relay: Relay) -> None:
        self.metrics.record(relay)
        observe.log_finished(relay)


class _Signed(NamedTuple):
    """A signed ticket as `observe.log_created` sees it."""

    ticket: str
    claims: TicketClaims

    @property
    def workspace_id(self) -> str:
        return self.claims.workspace_id

    @property
    def source_exe_id(self) -> str:
        return self.claims.source_exe_id

    @property
    def dest_exe_id(self) -> str:
        return self.claims.dest_exe_id


def _unix_ms(when: datetime.datetime) -> int:
    return math.floor(when.timestamp() * 1000)


def _from_unix_ms(ms: int) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC)
