"""Ticket format, bearer parsing, the live-ticket table (fake clock)."""

from __future__ import annotations

import dataclasses
import re

import pytest

from fastrelay.tickets import (
    TICKET_LENGTH,
    CapReached,
    TicketTable,
    extract_bearer_ticket,
    new_ticket,
    ticket_id,
)


@dataclasses.dataclass
class E:
    ticket: str
    workspace_id: str
    deadline: float
    paired: bool = False


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


def test_cap_counts_from_add_to_remove() -> None:
    table: TicketTable[E] = TicketTable(max_per_workspace=2)
    table.add(E("a", "w", 10))
    table.add(E("b", "w", 10))
    table.add(E("c", "other", 10))
    with pytest.raises(CapReached):
        table.add(E("d", "w", 10))
    assert table.workspace_count("w") == 2
    table.remove("a")
    table.add(E("d", "w", 10))
    assert len(table) == 3 + 0
    assert table.remove("nope") is None
