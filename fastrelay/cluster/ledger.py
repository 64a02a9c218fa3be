"""Who holds what: workspace slots, the pending count, and spent tickets.

Theory of operation
-------------------
Two limits guard minting: a workspace may hold ``max_per_workspace`` live
tickets, and all workspaces together ``max_pending`` minted-but-unpaired
ones. Both are counted in *slots*. A slot is taken when a ticket is minted,
stops counting as pending when its relay pairs, and is given back when its
relay ends. A ticket that is never served here (a signed ticket served by
another node, or never served at all) gives its slot back by itself when its
pairing deadline passes; once paired here, a slot is held until the relay
ends, however long the transfer runs (the Go relay counts "from mint until
cleanup").

A *spent* ticket is one whose relay ended. It is remembered until its
pairing deadline, so that the ticket answers 410 even where it is not in the
live table (signed tickets are re-created from their own text: without this
memory a finished one could be served again). After the deadline the
ticket's own expiry refuses it.

`LocalLedger` counts in this process: with several nodes, each counts what
it minted and what it served (the "per node" limits of docs/cluster.md).
`redis_ledger.RedisLedger` counts the same things for the whole cluster in
Redis and keeps a `LocalLedger` for what this node itself has seen spent.

Slots and spent tickets are keyed by `tickets.ticket_key`, never by the
ticket: a ledger (or a Redis dump) holds no credential.

Time is monotonic seconds, passed in; expired entries are dropped lazily
when the ledger is next used, so nothing here needs a timer.
"""

from __future__ import annotations

import dataclasses
import enum
import heapq
import math
from typing import Protocol

from ..core.errors import MintDisabled, WorkspaceCapReached

TOO_MANY_PENDING = "relay: too many pending relays"


@dataclasses.dataclass(slots=True)
class _Slot:
    workspace_id: str
    until: float
    """Monotonic time the slot frees itself at; inf once paired here."""
    paired: bool = False


class LocalLedger:
    """Slots and spent tickets of one process. No IO, no clock."""

    __slots__ = (
        "_expiry",
        "_pending",
        "_per_workspace",
        "_slots",
        "_spent",
        "_spent_expiry",
        "max_pending",
        "max_per_workspace",
    )

    def __init__(self, max_per_workspace: int, max_pending: int) -> None:
        if max_per_workspace < 1 or max_pending < 1:
            raise ValueError("ledger limits must be >= 1")
        self.max_per_workspace = max_per_workspace
        self.max_pending = max_pending
        self._slots: dict[str, _Slot] = {}
        self._per_workspace: dict[str, int] = {}
        self._pending = 0
        self._expiry: list[tuple[float, str]] = []  # (until, key), lazily pruned
        self._spent: dict[str, float] = {}
        self._spent_expiry: list[tuple[float, str]] = []

    # --- slots ---------------------------------------------------------------------

    def check(self, workspace_id: str, now: float) -> None:
        """Raise what minting one more ticket for ``workspace_id`` would hit."""
        self._prune(now)
        if self._per_workspace.get(workspace_id, 0) >= self.max_per_workspace:
            raise WorkspaceCapReached()
        if self._pending >= self.max_pending:
            raise MintDisabled(TOO_MANY_PENDING)

    def reserve(self, key: str, workspace_id: str, until: float, now: float) -> None:
        """Take a slot for a new ticket, pending until ``until`` (its pairing
        deadline). Raises `WorkspaceCapReached` or `MintDisabled` (503)."""
        self.check(workspace_id, now)
        if key in self._slots:
            raise ValueError("duplicate ticket")  # 128-bit keys: never, but be sure
        self._slots[key] = _Slot(workspace_id, until)
        self._per_workspace[workspace_id] = self._per_workspace.get(workspace_id, 0) + 1
        self._pending += 1
        heapq.heappush(self._expiry, (until, key))

    def paired(self, key: str) -> None:
        """The ticket's relay paired here: no longer pending; held until `release`."""
        slot = self._slots.get(key)
        if slot is not None and not slot.paired:
            slot.paired = True
            slot.until = math.inf
            self._pending -= 1

    def release(self, key: str) -> None:
        """The ticket's relay ended: its slot is free (no-op if not ours)."""
        slot = self._slots.pop(key, None)
        if slot is None:
            return
        ws = slot.workspace_id
        left = self._per_workspace[ws] - 1
        if left:
            self._per_workspace[ws] = left
        else:
            del self._per_workspace[ws]
        if not slot.paired:
            self._pending -= 1

    def workspace_count(self, workspace_id: str, now: float) -> int:
        self._prune(now)
        return self._per_workspace.get(workspace_id, 0)

    def pending_count(self, now: float) -> int:
        self._prune(now)
        return self._pending

    def slot_count(self, now: float) -> int:
        self._prune(now)
        return len(self._slots)

    # --- spent tickets ---------------------------------------------------------------

    def spend(self, key: str, until: float, now: float) -> None:
        """Remember that ``key``'s relay ended, until ``until``."""
        self._prune(now)
        if until > now and key not in self._spent:
            self._spent[key] = until
            heapq.heappush(self._spent_expiry, (until, key))

    def is_spent(self, key: str, now: float) -> bool:
        self._prune(now)
        return key in self._spent

    def spent_count(self, now: float) -> int:
        self._prune(now)
        return len(self._spent)

    # --- housekeeping ----------------------------------------------------------------

    def _prune(self, now: float) -> None:
        expiry = self._expiry
        while expiry and expiry[0][0] <= now:
            until, key = heapq.heappop(expiry)
            slot = self._slots.get(key)
            # A paired slot's ``until`` became inf: its heap entry is stale.
            if slot is not None and slot.until == until:
                self.release(key)
        spent = self._spent_expiry
        while spent and spent[0][0] <= now:
            _, key = heapq.heappop(spent)
            self._spent.pop(key, None)

    def __repr__(self) -> str:
        return f"<LocalLedger slots={len(self._slots)} spent={len(self._spent)}>"


class Admission(enum.Enum):
    """What the cluster says of a signed ticket on its first arrival at a node."""

    OK = "ok"  # this node serves it (it now holds the ticket's lease)
    SPENT = "spent"  # its relay already ended somewhere: 410
    ELSEWHERE = "elsewhere"  # another live node serves it: 421


@dataclasses.dataclass(frozen=True, slots=True)
class Holding:
    """A relay this node serves, as the cluster heartbeat sees it."""

    key: str
    workspace_id: str
    paired: bool
    signed: bool


class SharedLedger(Protocol):
    """Slots and spent tickets counted for a whole cluster (`redis_ledger`).

    Methods that decide (``reserve``, ``admit``) are awaited and raise
    `errors.ClusterUnavailable` when the shared state cannot be reached;
    the others only record and never fail their caller: they are retried
    in the background (``refresh`` runs them again) and, failing that,
    every entry frees itself at its deadline or lease.
    """

    async def reserve(self, key: str, workspace_id: str, expires_ms: int) -> None:
        """Take a slot; raise `WorkspaceCapReached`, `MintDisabled` (pending)."""

    async def admit(self, key: str) -> Admission:
        """A signed ticket reaches this node and is not live here."""

    def paired(self, key: str, workspace_id: str, expires_ms: int, single_use: bool) -> None:
        """The ticket's relay paired: its slot is held by a lease from now on.
        A ``single_use`` ticket is also spent (until ``expires_ms``) at once,
        so that losing this node mid-transfer cannot make it fresh again."""

    def ended(self, key: str, workspace_id: str, expires_ms: int, signed: bool) -> None:
        """Free the slot; for a signed ticket, mark it spent until ``expires_ms``."""

    def refresh(self, holdings: list[Holding]) -> None:
        """Heartbeat: keep this node's leases and running slots alive."""

    @property
    def refresh_interval_s(self) -> float: ...

    async def close(self) -> None: ...
