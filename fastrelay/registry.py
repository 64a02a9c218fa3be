"""The public registry of relays: mint, look up, pair, expire, finish.

This is the Python mirror of the Go package's ``Registry``/``Relay``: a
gateway that embeds fastrelay mints with `Registry.create` and serves the
transfers with `fastrelay.start_server` on the same registry.

Theory of operation
-------------------
Each `Relay` owns one `RelaySession` (the state machine) and, while a side
waits, a reference to that side's connection (a `Party`). The registry keeps
live relays in a `TicketTable` and runs exactly one timer, armed at the
table's earliest pairing deadline. Every path that ends a relay goes through
`Relay.finish`, which applies the final input to the session (so the outcome
is recorded once), removes the ticket, tells a still-waiting side, records
metrics and the log line, and resolves ``await relay.wait()``.

Everything runs on the event loop thread; nothing here blocks.
"""

from __future__ import annotations

import asyncio
import datetime
import time
from collections.abc import Callable
from typing import Protocol

from . import observe
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

DEFAULT_TTL_S = 300.0
DEFAULT_MAX_PER_WORKSPACE = 16


class Party(Protocol):
    """A connection that claimed one side of a relay."""

    head: RequestHead | None

    def reject(self, err: RelayError) -> None:
        """Answer ``err`` and close; the side is no longer ours."""


PairHandler = Callable[["Relay", Party, Party], None]


class Relay:
    """One ticket: its metadata, its session, and its waiting sides."""

    __slots__ = (
        "_future",
        "_registry",
        "bytes",
        "deadline",
        "dest_exe_id",
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
        """Payload bytes handed to the destination."""
        self.error: RelayError | None = None
        self.put_party: Party | None = None
        self.get_party: Party | None = None
        self._future: asyncio.Future[None] | None = None

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

    def attach_put(self, party: Party) -> None:
        """A source arrived. Raises the error it must be answered with."""
        if self.session.put_claimed:
            raise SideAlreadyClaimed("PUT")
        self._registry.check_open()
        assert party.head is not None
        length = party.head.content_length
        if self.max_bytes > 0 and length is not None and length > self.max_bytes:
            # Refused before a single byte is read: the ticket is spent, and
            # a GET that is already waiting learns why at once.
            err = PayloadTooLarge(length, self.max_bytes)
            self.finish(Input.REFUSED_TOO_LARGE, err)
            raise err
        self.put_party = party
        self._arrive(Input.PUT_ARRIVES)

    def attach_get(self, party: Party) -> None:
        if self.session.get_claimed:
            raise SideAlreadyClaimed("GET")
        self._registry.check_open()
        self.get_party = party
        self._arrive(Input.GET_ARRIVES)

    def _arrive(self, event: Input) -> None:
        registry = self._registry
        if self.session.handle(event, registry.clock()) is State.STREAMING:
            registry._paired += 1
            put, get = self.put_party, self.get_party
            assert put is not None and get is not None
            self.put_party = self.get_party = None
            registry.pair_handler(self, put, get)

    def detach(self, party: Party) -> None:
        """A waiting side's client went away: free the side for a retry."""
        if self.put_party is party:
            self.put_party = None
            self.session.handle(Input.PUT_LEAVES, self._registry.clock())
        elif self.get_party is party:
            self.get_party = None
            self.session.handle(Input.GET_LEAVES, self._registry.clock())

    # --- the end -------------------------------------------------------------------

    def finish(self, event: Input, error: RelayError | None) -> None:
        """End the relay with the outcome ``event`` leads to. Idempotent."""
        if self.session.done:
            return
        registry = self._registry
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
                party.reject(PairingTimeout(waiting_for))
            elif isinstance(error, PayloadTooLarge):
                party.reject(UpstreamFailed(error))
            elif error is not None:
                party.reject(error)
        self.put_party = self.get_party = None
        registry._finished(self)
        if self._future is not None and not self._future.done():
            self._future.set_result(None)

    def __repr__(self) -> str:
        return f"<Relay {self.session.state.value} bytes={self.bytes}>"


class Registry:
    """Live relays, the per-workspace cap, and the single TTL timer."""

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
        self.pair_handler: PairHandler = _no_server
        self.draining = False
        self._table: TicketTable[Relay] = TicketTable(max_per_workspace)
        self._paired = 0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

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
        self._rearm()
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

    def expire_due(self) -> None:
        """Finish every unpaired relay whose deadline has passed."""
        for relay in self._table.due(self.clock()):
            relay.finish(Input.DEADLINE, Expired())

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
        self._rearm()

    def _rearm(self) -> None:
        """Keep the one timer at the earliest pairing deadline."""
        deadline = self._table.next_deadline()
        if deadline == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = deadline
        if deadline is None:
            return
        if self._loop is None:
            try:
                self._loop = asyncio.get_running_loop()
            except RuntimeError:
                # Used off-loop (unit tests with a fake clock drive
                # expire_due themselves); the timer is armed on first use
                # from the loop.
                self._timer_at = None
                return
        delay = max(0.0, deadline - self.clock())
        self._timer = self._loop.call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        self.expire_due()
        self._rearm()


def _no_server(relay: Relay, put: Party, get: Party) -> None:
    raise RuntimeError("no server is serving this registry")
