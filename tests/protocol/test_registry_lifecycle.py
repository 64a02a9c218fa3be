"""Registry lifecycle with an injected clock: pairing deadlines, caps, logs."""

from __future__ import annotations

import asyncio
import logging

import pytest
from fakes import FakeClock
from test_transfer_buffers import connect, get_head, make_server, put_head, put_then_get

from fastrelay import Outcome, Registry, WorkspaceCapReached
from fastrelay.core.errors import ShuttingDown


def test_deadline_answers_the_waiting_side_408_and_forgets_the_ticket() -> None:
    async def main() -> None:
        clock = FakeClock()
        server = make_server(Registry(default_ttl=30.0, clock=clock))
        registry = server.registry
        relay = registry.create("w", "s", "d")
        get, gt = connect(server)
        gt.feed(get_head(relay.ticket))
        clock.now += 29.999
        registry.timer.run_due()
        assert not relay.done() and not gt.closed
        clock.now += 0.001  # expires at exactly the TTL
        registry.timer.run_due()
        assert relay.outcome is Outcome.EXPIRED
        assert b"HTTP/1.1 408 " in gt.data
        assert gt.data.endswith(b'{"error":"timed out waiting for PUT side"}')
        assert registry.lookup(relay.ticket) is None and registry.active_count == 0
        # a late PUT now gets 410
        put, pt = connect(server)
        pt.feed(put_head(relay.ticket, 3))
        assert b"HTTP/1.1 410 " in pt.data and pt.data.endswith(b"ticket not found or expired\n")

    asyncio.run(main())


def test_pairing_stops_the_deadline() -> None:
    async def main() -> None:
        clock = FakeClock()
        # An idle timeout past the jump, so only the TTL could end the relay.
        server = make_server(Registry(default_ttl=5.0, clock=clock), idle_timeout_s=7200.0)
        registry = server.registry
        relay = registry.create("w", "s", "d")
        put, pt, get, gt = put_then_get(server, relay.ticket, 10)
        clock.now += 3600  # far past expires_at: the transfer may run on
        registry.timer.run_due()
        assert not relay.done()
        pt.feed(b"0123456789")
        assert relay.outcome is Outcome.OK

    asyncio.run(main())


def test_workspace_cap_counts_until_cleanup() -> None:
    async def main() -> None:
        registry = Registry(max_per_workspace=2)
        a = registry.create("w", "s", "d", ttl=1)
        registry.create("w", "s", "d")
        with pytest.raises(WorkspaceCapReached):
            registry.create("w", "s", "d")
        registry.create("other", "s", "d")
        await asyncio.wait_for(a.wait(), 5)  # the real timer expires it
        assert a.outcome is Outcome.EXPIRED
        registry.create("w", "s", "d")
        assert registry.active_count == 3

    asyncio.run(main())


def test_shutdown_fails_waiting_sides_with_503() -> None:
    async def main() -> None:
        server = make_server()
        relay = server.registry.create("w", "s", "d")
        put, pt = connect(server)
        pt.feed(put_head(relay.ticket, 10))
        server.registry.shutdown_waiting()
        assert relay.outcome is Outcome.SHUTDOWN
        assert pt.data.startswith(b"HTTP/1.1 503 ")
        assert pt.data.endswith(b'{"error":"server shutting down"}')
        with pytest.raises(ShuttingDown):
            server.registry.create("w", "s", "d")

    asyncio.run(main())


def test_logs_never_carry_the_ticket_or_secret(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="fastrelay")

    async def main() -> None:
        server = make_server()
        relay = server.registry.create("w", "s", "d")
        get, gt = connect(server)
        gt.feed(get_head(relay.ticket))
        put, pt = connect(server)
        pt.feed(put_head(relay.ticket, 4) + b"data")
        assert relay.outcome is Outcome.OK
        text = caplog.text
        assert "relay ended" in text and "outcome=ok" in text
        assert relay.ticket not in text and relay.ticket[4:20] not in text

    asyncio.run(main())


def test_mint_over_http_on_a_fake_transport_keeps_the_connection() -> None:
    async def main() -> None:
        server = make_server()
        conn, t = connect(server)
        body = b'{"workspace_id":"w","source_exe_id":"s","dest_exe_id":"d"}'
        req = (
            b"POST /api/exec-gateway/relay/create HTTP/1.1\r\nHost: h\r\n"
            b"Authorization: Bearer s\r\nContent-Length: %d\r\n\r\n" % len(body)
        ) + body
        t.feed(req + req + b"GET /healthz HTTP/1.1\r\nHost: h\r\n\r\n")
        assert t.data.count(b"HTTP/1.1 201 ") == 2
        assert t.data.endswith(b"ok\n") and not t.closed
        assert server.registry.active_count == 2

    asyncio.run(main())
