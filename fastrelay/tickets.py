"""Tickets: minting, the bearer check, and the table of live tickets.

Theory of operation
-------------------
A ticket is the whole credential of one relay: 32 bytes from the OS CSPRNG,
unpadded URL-safe base64, prefixed ``rly_`` (47 characters, as the Go relay).
`TicketTable` maps live tickets to their entries and counts them per
workspace (the cap runs from mint until the entry is removed, like the
seed's). Pairing deadlines are not kept here: each relay schedules its own on
the server's one timer (`deadlines.py`).

No IO and no clock here.
"""

from __future__ import annotations

import base64
import hashlib
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


E = TypeVar("E", bound=Entry)


class CapReached(Exception):
    """The workspace already holds ``max_per_workspace`` live tickets."""


class TicketTable(Generic[E]):
    """Live tickets and per-workspace counts."""

    __slots__ = ("_by_ticket", "_per_workspace", "max_per_workspace")

    def __init__(self, max_per_workspace: int) -> None:
        if max_per_workspace < 1:
            raise ValueError("max_per_workspace must be >= 1")
        self.max_per_workspace = max_per_workspace
        self._by_ticket: dict[str, E] = {}
        self._per_workspace: dict[str, int] = {}

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

    def workspace_count(self, workspace_id: str) -> int:
        return self._per_workspace.get(workspace_id, 0)

    def __len__(self) -> int:
        return len(self._by_ticket)

    def __iter__(self) -> Iterator[E]:
        return iter(list(self._by_ticket.values()))
