"""The relay state machine, walked exhaustively."""

from __future__ import annotations

import itertools

import pytest

from fastrelay.core.session import (
    TRANSITIONS,
    Input,
    InvalidTransition,
    Outcome,
    RelaySession,
    State,
)


def session_in(state: State) -> RelaySession:
    s = RelaySession(now=100.0)
    s.state = state
    return s


@pytest.mark.parametrize(("state", "event"), list(itertools.product(State, Input)))
def test_every_pair_is_either_in_the_table_or_refused(state: State, event: Input) -> None:
    s = session_in(state)
    if (state, event) in TRANSITIONS:
        new_state, outcome = TRANSITIONS[(state, event)]
        assert s.handle(event, now=105.0) is new_state
        assert s.outcome is outcome
        assert (outcome is not None) == (new_state is State.DONE)
        if outcome is not None:
            assert s.ended_at == 105.0
    else:
        with pytest.raises(InvalidTransition):
            s.handle(event, now=105.0)
        assert s.state is state  # a refused input changes nothing


def test_done_is_terminal() -> None:
    assert not any(state is State.DONE for state, _ in TRANSITIONS)


def test_every_outcome_is_reachable() -> None:
    reachable = {outcome for _, outcome in TRANSITIONS.values() if outcome}
    assert reachable == set(Outcome)


def test_either_order_pairs_and_times_are_derived_from_now() -> None:
    for first, second in (
        (Input.PUT_ARRIVES, Input.GET_ARRIVES),
        (Input.GET_ARRIVES, Input.PUT_ARRIVES),
    ):
        s = RelaySession(now=10.0)
        s.handle(first, 11.0)
        assert s.handle(second, 12.5) is State.STREAMING
        assert s.put_claimed and s.get_claimed and s.paired
        s.handle(Input.UPLOAD_COMPLETE, 20.0)
        assert s.outcome is Outcome.OK
        assert s.waited_s() == 2.5
        assert s.transfer_s() == 7.5


def test_a_waiting_side_that_leaves_frees_its_claim() -> None:
    s = RelaySession(now=0.0)
    s.handle(Input.PUT_ARRIVES, 1.0)
    assert s.put_claimed
    s.handle(Input.PUT_LEAVES, 2.0)
    assert not s.put_claimed
    assert s.handle(Input.PUT_ARRIVES, 3.0) is State.PUT_WAITING


def test_unpaired_expiry_records_wait_until_end() -> None:
    s = RelaySession(now=0.0)
    s.handle(Input.GET_ARRIVES, 1.0)
    s.handle(Input.DEADLINE, 300.0)
    assert s.outcome is Outcome.EXPIRED
    assert s.waited_s() == 300.0
    assert s.transfer_s() == 0.0
