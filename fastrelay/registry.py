"""The public registry of relays: mint, look up, pair, expire, finish.

This is the Python mirror of the Go package's ``Registry``/``Relay``: a
gateway that embeds fastrelay mints with `Registry.create` and serves the
transfers with `fastrelay.start_server` on the same registry.

Theory of operation
-------------------
Each `Relay` owns one `RelaySession` (the state machine) and, while a side
waits, a reference to that side's connection (a `WaitingEnd`). The registry
keeps live relays in a `TicketTable` (lookup and the per-workspace cap) and
schedules each relay's pairing deadline on the server's one timer
(`timer.LoopTimer`, shared with every connection deadline): that is where
the TTL fires (`Relay._expire`).

Pairing happens in one place: `Relay.claim` records a side and, when it
completes the pair, returns the waiting partner. The connection that made
the claim then builds the transfer from the relay and the two ends; nothing
here knows what a connection or a transfer is.

Every path that ends a relay goes through `Relay.finish`, which applies the
final input to the session (so the outcome is recorded once), removes the
ticket, tells a still-waiting side (`WaitingEnd.relay_ended`), records
metrics and the log line, and resolves ``await relay.wait()``.

Everything runs on the event loop thread; nothing here blocks.
"""

from __future__ import annotations

import asyncio
import datetime
import math
import time
from collections.abc import Callable
from typing import Literal, Protocol

from . import observe
from .config import MAX_DURATION_S
from .deadlines import Deadline
from .errors import (
    Expired,
    PairingTimeout,
    PayloadTooLarge,
    RelayError,
    ShuttingDown,
    SideAlreadyClaimed,
    UpstreamFailed,
    WorkspaceCapReached,
)
from .heads import RequestHead
from .session import Input, Outcome, RelaySession, State
from .tickets import CapReached, TicketTable, new_ticket
from .timer import LoopTimer

DEFAULT_TTL_S = 300.0
DEFAULT_MAX_PER_WORKSPACE = 16


Side = Literal["PUT", "GET"]


class WaitingEnd(Protocol):
    """A connection that claimed one side of a relay and waits for the other."""

    @property
    def head(self) -> RequestHead | None: ...

    def relay_ended(self, err: RelayError) -> None:
        """The relay ended while we waited: answer ``err``; the side is gone."""


class Relay:
    """One ticket: its metadata, its session, and its waiting sides."""

    __slots__ = (
        "_expiry",
        "_future",
        "_registry",
        "bytes",
        "deadline",
        "dest_exe_id",
        "digest",
        "error",
        "expires_at",
        "get_party",
        "max_bytes",
        "put_party",
        "session",
        "source_exe_id",
        "ticket",
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
        ttl_s: float,
    ) -> None:
        self._registry = registry
        self.ticket = ticket
        self.workspace_id = workspace_id
        self.source_exe_id = source_exe_id
        self.dest_exe_id = dest_exe_id
        self.max_bytes = max_bytes
        self.deadline = now + ttl_s
        self.expires_at = registry.wall_clock() + datetime.timedelta(seconds=ttl_s)
        self.session = RelaySession(now)
        self.bytes = 0
        self.digest: str | None = None
        """Hex SHA-256 of the bytes handed to the destination (--audit-digest)."""
        """Payload bytes handed to the destination."""
        self.error: RelayError | None = None
        self.put_party: WaitingEnd | None = None
        self.get_party: WaitingEnd | None = None
        self._future: asyncio.Future[None] | None = None
        self._expiry: Deadline | None = None

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
        503 (draining), 413 (a Content-Length over ``max_bytes``).
        """
        session = self.session
        if session.put_claimed if side == "PUT" else session.get_claimed:
            raise SideAlreadyClaimed(side)
        self._registry.check_open()
        if side == "PUT":
            assert end.head is not None
            length = end.head.content_length
            if self.max_bytes > 0 and length is not None and length > self.max_bytes:
                # Refused before a single byte is read: the ticket is spent,
                # and a GET that is already waiting learns why at once.
                err = PayloadTooLarge(length, self.max_bytes)
                self.finish(Input.REFUSED_TOO_LARGE, err)
                raise err
            self.put_party = end
            event = Input.PUT_ARRIVES
        else:
            self.get_party = end
            event = Input.GET_ARRIVES
        registry = self._registry
        if session.handle(event, registry.clock()) is not State.STREAMING:
            return None
        registry._paired += 1
        if self._expiry is not None:  # the TTL bounds pairing only
            self._expiry.cancel()
            self._expiry = None
        partner = self.get_party if side == "PUT" else self.put_party
        self.put_party = self.get_party = None
        assert partner is not None
        return partner

    def leave(self, end: WaitingEnd) -> None:
        """A waiting side's client went away: free the side for a retry."""
        if self.put_party is end:
            self.put_party = None
            self.session.handle(Input.PUT_LEAVES, self._registry.clock())
        elif self.get_party is end:
            self.get_party = None
            self.session.handle(Input.GET_LEAVES, self._registry.clock())

    def _expire(self) -> None:
        """The pairing deadline passed (called by the server's timer)."""
        self._expiry = None
        if not self.session.done and not self.session.paired:
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
        if self.session.paired:
            registry._paired -= 1
        self.session.handle(event, registry.clock())
        self.error = error
        registry._remove(self)
        # Tell any side still waiting; which answer depends on why we ended.
        for party, waiting_for in ((self.put_party, "GET"), (self.get_party, "PUT")):
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
    """Live relays, the per-workspace cap, and the timer their TTLs run on."""

    def __init__(
        self,
        max_per_workspace: int = DEFAULT_MAX_PER_WORKSPACE,
        default_ttl: float = DEFAULT_TTL_S,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], datetime.datetime] | None = None,
    ) -> None:
        if max_per_workspace <= 0:
            max_per_workspace = DEFAULT_MAX_PER_WORKSPACE
        if default_ttl <= 0:
            default_ttl = DEFAULT_TTL_S
        self.default_ttl = default_ttl
        self.clock = clock
        self.wall_clock = wall_clock or (lambda: datetime.datetime.now(datetime.UTC))
        self.metrics = observe.Metrics()
        self.timer = LoopTimer(clock)
        """The one timer of the server serving this registry: pairing TTLs
        here, header, idle and linger deadlines in the connections."""
        self.draining = False
        self._table: TicketTable[Relay] = TicketTable(max_per_workspace)
        self._paired = 0

    @property
    def max_per_workspace(self) -> int:
        return self._table.max_per_workspace

    # --- Go-compatible surface -----------------------------------------------------

    def create(
        self,
        workspace_id: str,
        source_exe_id: str,
        dest_exe_id: str,
        ttl: float | None = None,
        max_bytes: int = 0,
    ) -> Relay:
        """Mint a ticket. Call on the event loop that serves it.

        ``ttl`` None or <= 0 means the default; ``max_bytes`` <= 0 means no
        limit. Raises `WorkspaceCapReached` or `ShuttingDown`.
        """
        if not (workspace_id and source_exe_id and dest_exe_id):
            raise ValueError("relay: workspace_id, source_exe_id, dest_exe_id required")
        self.check_open()
        ttl_s = ttl if ttl is not None and ttl > 0 else self.default_ttl
        if not math.isfinite(ttl_s) or ttl_s > MAX_DURATION_S:
            # Far past any real pairing wait, and where expires_at overflows.
            raise ValueError(f"relay: ttl must be at most {MAX_DURATION_S:g} seconds")
        try:
            self._table.check_cap(workspace_id)
        except CapReached:
            raise WorkspaceCapReached() from None
        relay = Relay(
            self,
            new_ticket(),
            workspace_id,
            source_exe_id,
            dest_exe_id,
            max(0, max_bytes),
            self.clock(),
            ttl_s,
        )
        self._table.add(relay)
        relay._expiry = self.timer.at(relay.deadline, relay._expire)
        observe.log_created(relay, ttl_s, relay.max_bytes)
        return relay

    def lookup(self, ticket: str) -> Relay | None:
        return self._table.get(ticket)

    @property
    def active_count(self) -> int:
        """Live tickets in any state (Go ActiveCount)."""
        return len(self._table)

    @property
    def waiting_count(self) -> int:
        """Live tickets not yet paired."""
        return len(self._table) - self._paired

    def check_open(self) -> None:
        if self.draining:
            raise ShuttingDown()

    # --- lifecycle -----------------------------------------------------------------

    def shutdown_waiting(self) -> None:
        """Drain: refuse new work, fail every unpaired relay with 503."""
        self.draining = True
        for relay in self._table:
            if not relay.paired:
                relay.finish(Input.SHUTDOWN, ShuttingDown())

    def _remove(self, relay: Relay) -> None:
        self._table.remove(relay.ticket)

    def _finished(self, relay: Relay) -> None:
        self.metrics.record(relay)
        observe.log_finished(relay)
