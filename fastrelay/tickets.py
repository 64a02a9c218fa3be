"""Tickets: minting, the bearer check, and the table of live tickets.

Theory of operation
-------------------
A ticket is the whole credential of one relay: 32 bytes from the OS CSPRNG,
unpadded URL-safe base64, prefixed ``rly_`` (47 characters, as the Go relay).
`TicketTable` maps live tickets to their entries, counts them per workspace
(the cap runs from mint until the entry is removed, like the seed's), and
keeps a heap of pairing deadlines so the server needs exactly one timer:
after any change it re-arms that timer at `next_deadline()` and, when it
fires, calls `due(now)`.

Entries leave the table only through `remove`; the heap is cleaned lazily
(a removed or paired ticket's heap item is skipped when it surfaces), which
keeps mint and remove O(log n) without a heap delete.

No IO and no clock here: ``now`` is always an argument.
"""

from __future__ import annotations

import base64
import hashlib
import heapq
import secrets
from collections.abc import Iterator
from typing import Generic, Protocol, TypeVar

TICKET_PREFIX = "rly_"
TICKET_RANDOM_BYTES = 32
TICKET_LENGTH = len(TICKET_PREFIX) + 43  # 32 bytes -> 43 unpadded base64 chars

_BEARER = "Bearer "


def new_ticket() -> str:
    """A fresh ticket: ``rly_`` + unpadded URL-safe base64 of 32 random bytes."""
    raw = secrets.token_bytes(TICKET_RANDOM_BYTES)
    return TICKET_PREFIX + base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def extract_bearer_ticket(authorization: str | None) -> str | None:
    """The token of ``Authorization: Bearer <token>``, or None.

    Exactly the seed's rule: the scheme is case-sensitive ``Bearer`` and one
    space, nothing is trimmed, an empty token is no token.
    """
    if authorization is None or not authorization.startswith(_BEARER):
        return None
    token = authorization[len(_BEARER) :]
    return token or None


def ticket_id(ticket: str) -> str:
    """A short, non-reversible id for logs: never log the ticket itself."""
    return hashlib.sha256(ticket.encode()).hexdigest()[:12]


class Entry(Protocol):
    """What the table needs to know of an entry."""

    @property
    def ticket(self) -> str: ...
    @property
    def workspace_id(self) -> str: ...
    @property
    def deadline(self) -> float: ...
    @property
    def paired(self) -> bool: ...


E = TypeVar("E", bound=Entry)


class CapReached(Exception):
    """The workspace already holds ``max_per_workspace`` live tickets."""


class TicketTable(Generic[E]):
    """Live tickets, per-workspace counts, and the pairing-deadline heap."""

    __slots__ = ("_by_ticket", "_heap", "_per_workspace", "max_per_workspace")

    def __init__(self, max_per_workspace: int) -> None:
        if max_per_workspace < 1:
            raise ValueError("max_per_workspace must be >= 1")
        self.max_per_workspace = max_per_workspace
        self._by_ticket: dict[str, E] = {}
        self._per_workspace: dict[str, int] = {}
        self._heap: list[tuple[float, str]] = []

    def check_cap(self, workspace_id: str) -> None:
        """Raise `CapReached` if one more ticket would exceed the workspace cap."""
        if self._per_workspace.get(workspace_id, 0) >= self.max_per_workspace:
            raise CapReached(workspace_id)

    def add(self, entry: E) -> None:
        self.check_cap(entry.workspace_id)
        if entry.ticket in self._by_ticket:  # 256 bits of entropy: never, but be sure
            raise ValueError("duplicate ticket")
        self._by_ticket[entry.ticket] = entry
        ws = entry.workspace_id
        self._per_workspace[ws] = self._per_workspace.get(ws, 0) + 1
        heapq.heappush(self._heap, (entry.deadline, entry.ticket))

    def get(self, ticket: str) -> E | None:
        return self._by_ticket.get(ticket)

    def remove(self, ticket: str) -> E | None:
        entry = self._by_ticket.pop(ticket, None)
        if entry is not None:
            ws = entry.workspace_id
            left = self._per_workspace[ws] - 1
            if left:
                self._per_workspace[ws] = left
            else:
                del self._per_workspace[ws]
        return entry

    def next_deadline(self) -> float | None:
        """The earliest pairing deadline still relevant, or None."""
        heap = self._heap
        while heap:
            _, ticket = heap[0]
            entry = self._by_ticket.get(ticket)
            if entry is not None and not entry.paired:
                return heap[0][0]
            heapq.heappop(heap)  # removed or paired: its deadline no longer matters
        return None

    def due(self, now: float) -> list[E]:
        """Unpaired entries whose deadline is at or before ``now`` (not removed)."""
        expired: list[E] = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, ticket = heapq.heappop(heap)
            entry = self._by_ticket.get(ticket)
            if entry is not None and not entry.paired:
                expired.append(entry)
        return expired

    def workspace_count(self, workspace_id: str) -> int:
        return self._per_workspace.get(workspace_id, 0)

    def __len__(self) -> int:
        return len(self._by_ticket)

    def __iter__(self) -> Iterator[E]:
        return iter(list(self._by_ticket.values()))
