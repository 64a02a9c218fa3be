"""The local ledger: slots, the pending count and spent tickets, on a fake clock."""

from __future__ import annotations

import pytest

from fastrelay.cluster.ledger import LocalLedger
from fastrelay.core.errors import MintDisabled, WorkspaceCapReached


def test_cap_counts_from_reserve_to_release() -> None:
    ledger = LocalLedger(max_per_workspace=2, max_pending=100)
    ledger.reserve("a", "w", until=10, now=0)
    ledger.reserve("b", "w", until=10, now=0)
    ledger.reserve("c", "other", until=10, now=0)
    with pytest.raises(WorkspaceCapReached):
        ledger.reserve("d", "w", until=10, now=0)
    assert ledger.workspace_count("w", now=0) == 2
    ledger.release("a")
    ledger.reserve("d", "w", until=10, now=0)
    ledger.release("nope")  # not ours: nothing happens
    assert ledger.slot_count(now=0) == 3


def test_pending_cap_and_pairing() -> None:
    ledger = LocalLedger(max_per_workspace=100, max_pending=2)
    ledger.reserve("a", "w", until=10, now=0)
    ledger.reserve("b", "w", until=10, now=0)
    with pytest.raises(MintDisabled) as exc:
        ledger.reserve("c", "w", until=10, now=0)
    assert exc.value.message == "relay: too many pending relays"
    ledger.paired("a")
    ledger.paired("a")  # idempotent
    assert ledger.pending_count(now=0) == 1
    ledger.reserve("c", "w", until=10, now=0)
    ledger.release("a")  # a paired slot leaves the pending count alone
    assert ledger.pending_count(now=0) == 2


def test_an_unserved_slot_frees_itself_at_its_deadline() -> None:
    ledger = LocalLedger(max_per_workspace=1, max_pending=10)
    ledger.reserve("a", "w", until=10, now=0)
    with pytest.raises(WorkspaceCapReached):
        ledger.check("w", now=9.999)
    ledger.check("w", now=10)  # exactly at the deadline it is free
    assert ledger.pending_count(now=10) == 0


def test_a_paired_slot_is_held_past_its_deadline_until_released() -> None:
    ledger = LocalLedger(max_per_workspace=1, max_pending=10)
    ledger.reserve("a", "w", until=10, now=0)
    ledger.paired("a")
    with pytest.raises(WorkspaceCapReached):
        ledger.check("w", now=10_000)  # a long transfer keeps its slot
    ledger.release("a")
    ledger.check("w", now=10_000)


def test_spent_tickets_are_remembered_until_their_deadline() -> None:
    ledger = LocalLedger(max_per_workspace=1, max_pending=1)
    ledger.spend("a", until=10, now=0)
    ledger.spend("old", until=5, now=6)  # already past: not kept
    assert ledger.is_spent("a", now=9.9)
    assert not ledger.is_spent("old", now=6)
    assert not ledger.is_spent("a", now=10)
    assert ledger.spent_count(now=10) == 0


def test_many_expired_entries_are_pruned() -> None:
    ledger = LocalLedger(max_per_workspace=10**6, max_pending=10**6)
    for i in range(10_000):
        ledger.reserve(f"k{i}", f"w{i % 7}", until=i / 100, now=0)
        ledger.spend(f"s{i}", until=i / 100 + 1, now=0)
    assert ledger.slot_count(now=200) == 0
    assert ledger.spent_count(now=200) == 0
    assert ledger.workspace_count("w3", now=200) == 0


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError):
        LocalLedger(0, 1)
