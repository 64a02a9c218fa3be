"""The life of one ticket, as data.

Theory of operation
-------------------
A ticket is minted unpaired (``IDLE``). Each side (PUT = source, GET =
destination) may arrive in any order and wait for the other; a waiting side
whose client disconnects leaves again, so a retry with the same ticket can
still pair. When both are present the session is ``STREAMING`` and the
pairing deadline no longer applies.

A resumable relay (`resume.py`) survives a break: the source breaking takes
it from ``STREAMING`` back to ``GET_WAITING`` (the destination is still
attached, its answer paused), the destination breaking back to
``PUT_WAITING`` (the source attached, paused); the next arrival pairs again.
The registry counts the breaks and bounds them; v1 relays never see these
inputs. Every session ends in ``DONE`` with
exactly one `Outcome`, recorded by the transition that got it there; logs,
metrics and ``Relay.outcome`` all derive from that one value.

The table below is the whole machine. A (state, input) pair that is not in it
is a bug in the caller and raises `InvalidTransition`; `tests/unit` walks
every pair.

This module does no IO and reads no clock: times are passed in.
"""

from __future__ import annotations

import enum


class State(enum.Enum):
    IDLE = "idle"  # minted, nobody attached
    PUT_WAITING = "put_waiting"  # source attached, waiting for destination
    GET_WAITING = "get_waiting"  # destination attached, waiting for source
    STREAMING = "streaming"  # paired: bytes are moving
    DONE = "done"  # finished; the ticket is gone


class Input(enum.Enum):
    PUT_ARRIVES = "put_arrives"
    GET_ARRIVES = "get_arrives"
    PUT_LEAVES = "put_leaves"  # waiting source disconnected before pairing
    GET_LEAVES = "get_leaves"  # waiting destination disconnected before pairing
    DEADLINE = "deadline"  # expires_at passed before pairing
    REFUSED_TOO_LARGE = "refused_too_large"  # Content-Length > max_bytes, before any byte
    UPLOAD_COMPLETE = "upload_complete"
    UPLOAD_ABORTED = "upload_aborted"
    DOWNLOAD_ABORTED = "download_aborted"
    CUT_TOO_LARGE = "cut_too_large"  # chunked upload crossed max_bytes mid-stream
    IDLE_TIMEOUT = "idle_timeout"
    SHUTDOWN = "shutdown"
    UPLOAD_BROKE = "upload_broke"  # resumable: the source broke, the destination waits
    DOWNLOAD_BROKE = "download_broke"  # resumable: the destination broke, the source waits


class Outcome(enum.Enum):
    """How a relay ended. Exactly one per ticket."""

    OK = "ok"
    EXPIRED = "expired"
    TOO_LARGE = "too_large"
    UPLOAD_ABORTED = "upload_aborted"
    DOWNLOAD_ABORTED = "download_aborted"
    IDLE_TIMEOUT = "idle_timeout"
    SHUTDOWN = "shutdown"


class InvalidTransition(RuntimeError):
    def __init__(self, state: State, event: Input) -> None:
        super().__init__(f"no transition from {state.name} on {event.name}")
        self.state = state
        self.event = event


_WAITING = (State.IDLE, State.PUT_WAITING, State.GET_WAITING)

# (state, input) -> (next state, outcome recorded on entering DONE or None)
TRANSITIONS: dict[tuple[State, Input], tuple[State, Outcome | None]] = {
    (State.IDLE, Input.PUT_ARRIVES): (State.PUT_WAITING, None),
    (State.IDLE, Input.GET_ARRIVES): (State.GET_WAITING, None),
    (State.PUT_WAITING, Input.GET_ARRIVES): (State.STREAMING, None),
    (State.GET_WAITING, Input.PUT_ARRIVES): (State.STREAMING, None),
    (State.PUT_WAITING, Input.PUT_LEAVES): (State.IDLE, None),
    (State.GET_WAITING, Input.GET_LEAVES): (State.IDLE, None),
    # A Content-Length over max_bytes is refused before the PUT claims its
    # side, so it can only come while the PUT side is free.
    (State.IDLE, Input.REFUSED_TOO_LARGE): (State.DONE, Outcome.TOO_LARGE),
    (State.GET_WAITING, Input.REFUSED_TOO_LARGE): (State.DONE, Outcome.TOO_LARGE),
    **{(s, Input.DEADLINE): (State.DONE, Outcome.EXPIRED) for s in _WAITING},
    **{(s, Input.SHUTDOWN): (State.DONE, Outcome.SHUTDOWN) for s in (*_WAITING, State.STREAMING)},
    (State.STREAMING, Input.UPLOAD_COMPLETE): (State.DONE, Outcome.OK),
    (State.STREAMING, Input.UPLOAD_ABORTED): (State.DONE, Outcome.UPLOAD_ABORTED),
    (State.STREAMING, Input.DOWNLOAD_ABORTED): (State.DONE, Outcome.DOWNLOAD_ABORTED),
    (State.STREAMING, Input.CUT_TOO_LARGE): (State.DONE, Outcome.TOO_LARGE),
    (State.STREAMING, Input.IDLE_TIMEOUT): (State.DONE, Outcome.IDLE_TIMEOUT),
    # A resumable relay whose carried-over end left while it waited, one
    # break past its budget: the transfer failed after all.
    **{(s, Input.UPLOAD_ABORTED): (State.DONE, Outcome.UPLOAD_ABORTED) for s in _WAITING},
    **{(s, Input.DOWNLOAD_ABORTED): (State.DONE, Outcome.DOWNLOAD_ABORTED) for s in _WAITING},
    (State.STREAMING, Input.UPLOAD_BROKE): (State.GET_WAITING, None),
    (State.STREAMING, Input.DOWNLOAD_BROKE): (State.PUT_WAITING, None),
}


class RelaySession:
    """State, timestamps and the single outcome of one ticket."""

    __slots__ = ("created_at", "ended_at", "outcome", "paired_at", "state")

    def __init__(self, now: float) -> None:
        self.state = State.IDLE
        self.outcome: Outcome | None = None
        self.created_at = now
        self.paired_at: float | None = None
        self.ended_at: float | None = None

    def handle(self, event: Input, now: float) -> State:
        """Apply ``event``; return the new state. Raises `InvalidTransition`."""
        try:
            new_state, outcome = TRANSITIONS[(self.state, event)]
        except KeyError:
            raise InvalidTransition(self.state, event) from None
        self.state = new_state
        if new_state is State.STREAMING and self.paired_at is None:
            self.paired_at = now
        if outcome is not None:
            self.outcome = outcome
            self.ended_at = now
        return new_state

    @property
    def put_claimed(self) -> bool:
        return self.state in (State.PUT_WAITING, State.STREAMING)

    @property
    def get_claimed(self) -> bool:
        return self.state in (State.GET_WAITING, State.STREAMING)

    @property
    def paired(self) -> bool:
        return self.paired_at is not None

    @property
    def done(self) -> bool:
        return self.state is State.DONE

    def waited_s(self) -> float:
        """Seconds from mint to pairing (or to the end, if never paired)."""
        end = self.paired_at if self.paired_at is not None else self.ended_at
        return 0.0 if end is None else end - self.created_at

    def transfer_s(self) -> float:
        if self.paired_at is None or self.ended_at is None:
            return 0.0
        return self.ended_at - self.paired_at

    def __repr__(self) -> str:
        outcome = self.outcome.value if self.outcome else "-"
        return f"<RelaySession {self.state.value} outcome={outcome}>"
