"""Every (phase, event) pair of the connection lifecycle, walked.

For each pair of `phases.LIFECYCLE` a real `HttpConnection` on fake
transports and a fake clock is brought into the phase, given the event, and
must end in one of the phases the table allows, with no internal error.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import pytest
from fakes import FakeClock, FakeSharedLedger, FakeTransport
from test_transfer_buffers import connect, get_head, make_server, put_head

from fastrelay import Registry
from fastrelay.core.phases import LIFECYCLE, Event, Phase
from fastrelay.server.connection import HttpConnection
from fastrelay.server.listener import RelayServer

Setup = Callable[[RelayServer], tuple[HttpConnection, FakeTransport, Callable[[], None]]]

MINT_HEAD = (
    b"POST /api/exec-gateway/relay/create HTTP/1.1\r\nHost: h\r\n"
    b"Authorization: Bearer s\r\nContent-Length: 100\r\n\r\n{"
)


def _in_reading_head(server: RelayServer) -> tuple[HttpConnection, FakeTransport]:
    return connect(server)


def _in_reading_body(server: RelayServer) -> tuple[HttpConnection, FakeTransport]:
    conn, t = connect(server)
    t.feed(MINT_HEAD)
    return conn, t


def _in_answering(server: RelayServer) -> tuple[HttpConnection, FakeTransport]:
    conn, t = connect(server)
    t.pending = 10**6  # the client reads nothing
    t.feed(b"GET /healthz HTTP/1.1\r\nHost: h\r\n\r\n")
    conn.pause_writing()
    return conn, t


def _in_consulting(server: RelayServer) -> tuple[HttpConnection, FakeTransport]:
    # A mint whose slot the (fake) shared ledger has not granted yet.
    server.registry.attach(FakeSharedLedger())
    conn, t = connect(server)
    body = b'{"workspace_id":"w","source_exe_id":"s","dest_exe_id":"d"}'
    t.feed(MINT_HEAD.replace(b"100", str(len(body)).encode()).removesuffix(b"{") + body)
    return conn, t


def _in_waiting(server: RelayServer) -> tuple[HttpConnection, FakeTransport]:
    relay = server.registry.create("w", "s", "d")
    conn, t = connect(server)
    t.feed(get_head(relay.ticket))
    return conn, t


def _paired(server: RelayServer, side: str) -> tuple[HttpConnection, FakeTransport]:
    relay = server.registry.create("w", "s", "d")
    put, pt = connect(server)
    pt.feed(put_head(relay.ticket, 10))
    get, gt = connect(server)
    gt.feed(get_head(relay.ticket))
    return (put, pt) if side == "PUT" else (get, gt)


def _in_lingering(server: RelayServer) -> tuple[HttpConnection, FakeTransport]:
    conn, t = connect(server)
    t.feed(put_head("rly_unknown", 100))  # 410 with the body unread
    return conn, t


def _in_closed(server: RelayServer) -> tuple[HttpConnection, FakeTransport]:
    conn, t = connect(server)
    conn.connection_lost(None)
    return conn, t


SETUPS: dict[Phase, Callable[[RelayServer], tuple[HttpConnection, FakeTransport]]] = {
    Phase.READING_HEAD: _in_reading_head,
    Phase.READING_BODY: _in_reading_body,
    Phase.ANSWERING: _in_answering,
    Phase.CONSULTING: _in_consulting,
    Phase.WAITING: _in_waiting,
    Phase.UPLOADING: lambda s: _paired(s, "PUT"),
    Phase.DOWNLOADING: lambda s: _paired(s, "GET"),
    Phase.LINGERING: _in_lingering,
    Phase.CLOSED: _in_closed,
}


def fire(
    server: RelayServer, clock: FakeClock, conn: HttpConnection, t: FakeTransport, event: Event
) -> None:
    """Deliver ``event`` the way the loop, the relay or the transfer would."""
    if event is Event.DATA:
        t.feed(b"x")
    elif event is Event.EOF:
        conn.eof_received()
    elif event is Event.LOST:
        conn.connection_lost(None)
    elif event is Event.WRITE_PAUSED:
        conn.pause_writing()
    elif event is Event.WRITE_RESUMED:
        t.pending = 0
        conn.resume_writing()
    elif event is Event.TIMER:
        # This connection's own deadline (header, answering, linger) fires;
        # other actors' deadlines (TTL, idle) reach it as PARTNER_GONE.
        conn._timer_fired()
    elif event is Event.PAIRED:
        if conn.phase is Phase.WAITING:
            relay = conn.relay
            assert relay is not None
            put, pt = connect(server)
            pt.feed(put_head(relay.ticket, 10))  # completes the pair
        else:
            conn._dispatch(Event.PAIRED)
    elif event is Event.CONSULTED:
        shared = server.registry.shared
        if conn.phase is Phase.CONSULTING:
            assert isinstance(shared, FakeSharedLedger)
            shared.answer(None)  # the slot is granted; the answer follows on the loop
        else:
            conn._dispatch(Event.CONSULTED)
    elif event is Event.PARTNER_GONE:
        if conn.phase is Phase.UPLOADING:
            conn.transfer_ended(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", True)
        elif conn.phase is Phase.DOWNLOADING:
            conn.transfer_ended(None, True)
        elif conn.phase is Phase.WAITING:
            server.registry.shutdown_waiting()  # the relay ends: 503
        else:
            conn._dispatch(Event.PARTNER_GONE)
    elif event is Event.DRAIN:
        conn.drain()
    elif event is Event.SUSPENDED:
        if conn.phase in (Phase.UPLOADING, Phase.DOWNLOADING):
            conn.transfer_suspended(0, None)  # a resumable relay lost the other end
        else:
            conn._dispatch(Event.SUSPENDED)
    elif event is Event.SUPERSEDED:
        if conn.phase is Phase.WAITING:
            conn.superseded()  # a newer request took the side over
        else:
            conn._dispatch(Event.SUPERSEDED)
    else:
        conn.shut_down()


def test_the_table_has_every_pair_and_every_handler() -> None:
    for phase in Phase:
        for event in Event:
            step = LIFECYCLE[(phase, event)]
            assert callable(getattr(HttpConnection, step.handler)), step.handler
            assert step.to, (phase, event)


@pytest.mark.parametrize("event", list(Event), ids=lambda e: e.value)
@pytest.mark.parametrize("phase", list(Phase), ids=lambda p: p.value)
def test_each_event_moves_each_phase_only_where_the_table_says(
    phase: Phase, event: Event, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        clock = FakeClock()
        server = make_server(Registry(clock=clock))
        conn, t = SETUPS[phase](server)
        await asyncio.sleep(0)  # a consultation starts on the loop
        assert conn.phase is phase
        with caplog.at_level(logging.ERROR, logger="fastrelay"):
            fire(server, clock, conn, t, event)
            for _ in range(3):  # a consultation's answer arrives through the loop
                await asyncio.sleep(0)
        allowed = LIFECYCLE[(phase, event)].to
        assert conn.phase in allowed, (phase, event, conn.phase)
        assert not [r for r in caplog.records if "internal error" in r.getMessage()]

    asyncio.run(main())
