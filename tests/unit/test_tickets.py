"""Ticket format, bearer parsing, the keys logs and ledgers use."""

from __future__ import annotations

import re

import pytest

from fastrelay.core.tickets import (
    TICKET_LENGTH,
    extract_bearer_ticket,
    new_ticket,
    ticket_id,
    ticket_key,
)


def test_ticket_format() -> None:
    tickets = {new_ticket() for _ in range(200)}
    assert len(tickets) == 200
    for t in tickets:
        assert len(t) == TICKET_LENGTH == 47
        assert re.fullmatch(r"rly_[A-Za-z0-9_-]{43}", t)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("Bearer abc", "abc"),
        ("Bearer  abc", " abc"),  # no trimming, like the seed
        ("Bearer ", None),
        ("bearer abc", None),
        ("Token abc", None),
        ("Bearer", None),
        ("", None),
        (None, None),
    ],
)
def test_extract_bearer_ticket(header: str | None, expected: str | None) -> None:
    assert extract_bearer_ticket(header) == expected


def test_ticket_id_is_short_and_not_the_ticket() -> None:
    t = new_ticket()
    assert len(ticket_id(t)) == 12
    assert ticket_id(t) not in t
    assert ticket_id(t) == ticket_id(t)


def test_ticket_key_is_128_bits_and_starts_with_the_log_id() -> None:
    t = new_ticket()
    key = ticket_key(t)
    assert re.fullmatch(r"[0-9a-f]{32}", key)
    assert key.startswith(ticket_id(t))
    assert key not in t
