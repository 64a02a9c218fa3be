"""Tickets: minting random ones, the bearer check, and keys for logs and ledgers.

Theory of operation
-------------------
A ticket is the whole credential of one relay: 32 bytes from the OS CSPRNG,
unpadded URL-safe base64, prefixed ``rly_`` (47 characters, as the Go relay).
With ``--ticket-key-file`` tickets are signed instead
(`signed_tickets.py`). Live tickets are the registry's; what counts against
the caps is the ledger's (`ledger.py`).

No IO and no clock here.
"""

from __future__ import annotations

import base64
import hashlib
import secrets

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


def ticket_key(ticket: str) -> str:
    """A non-reversible 128-bit key for a ticket: what ledgers (and Redis)
    store instead of the credential itself."""
    return hashlib.sha256(ticket.encode()).hexdigest()[:32]


def ticket_id(ticket: str) -> str:
    """A short, non-reversible id for logs: never log the ticket itself.
    It is the start of `ticket_key`, so a log line and a ledger entry match."""
    return ticket_key(ticket)[:12]
