"""Signed tickets through the connection and registry, on fake transports and a fake clock.

Two registries with the same key stand for two nodes. The shared ledger is
a `FakeSharedLedger` answered by the test (the Redis one runs against a real
redis-server in tests/cluster); here the point is what a connection does
with each answer.
"""

from __future__ import annotations

import asyncio
import datetime
import json

from fakes import FakeSharedLedger
from test_transfer_buffers import connect, get_head, make_server, put_head

from fastrelay import Outcome, Registry
from fastrelay.cluster.ledger import Admission
from fastrelay.cluster.signed_tickets import TicketKeys
from fastrelay.core.errors import ClusterUnavailable, WorkspaceCapReached
from fastrelay.core.phases import Phase

KEYS = TicketKeys([b"a-test-key-of-thirty-two-bytes!!"])
T0 = datetime.datetime(2026, 12, 4, 12, 0, tzinfo=datetime.UTC)


class Clocks:
    """One monotonic and one wall clock, moved together."""

    def __init__(self) -> None:
        self.mono = 1000.0
        self.wall = T0

    def monotonic(self) -> float:
        return self.mono

    def now(self) -> datetime.datetime:
        return self.wall

    def advance(self, seconds: float) -> None:
        self.mono += seconds
        self.wall += datetime.timedelta(seconds=seconds)


def node(clocks: Clocks, **kw: object) -> Registry:
    return Registry(keys=KEYS, clock=clocks.monotonic, wall_clock=clocks.now, **kw)  # type: ignore[arg-type]


def mint_request(body: dict[str, object]) -> bytes:
    data = json.dumps(body).encode()
    return (
        b"POST /api/exec-gateway/relay/create HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer s\r\n"
        b"Content-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data
    )


MINT = {"workspace_id": "w", "source_exe_id": "s", "dest_exe_id": "d", "ttl_seconds": 60}


def status(data: bytes) -> int:
    return int(data.split(b" ", 2)[1])


def test_a_ticket_minted_on_one_node_is_served_by_another() -> None:
    async def main() -> None:
        clocks = Clocks()
        a, b = make_server(node(clocks)), make_server(node(clocks))
        conn, t = connect(a)
        t.feed(mint_request(MINT))
        assert status(t.data) == 201
        answer = json.loads(t.data.split(b"\r\n\r\n", 1)[1])
        ticket = answer["ticket"]
        assert len(ticket) > 47 and a.registry.lookup(ticket) is None  # no relay at mint
        assert answer["expires_at"] == "2026-12-04T12:01:00.000000Z"
        # Both sides reach node b, which has never seen the ticket.
        put, pt = connect(b)
        pt.feed(put_head(ticket, 5))
        relay = b.registry.lookup(ticket)
        assert relay is not None and relay.workspace_id == "w" and put.phase is Phase.WAITING
        get, gt = connect(b)
        gt.feed(get_head(ticket))
        pt.feed(b"hello")
        assert relay.outcome is Outcome.OK and gt.data.endswith(b"hello")
        # Used: 410 on b (remembered as spent), though the ticket itself is valid.
        again, at = connect(b)
        at.feed(get_head(ticket))
        assert status(at.data) == 410
        # Node a never saw the transfer: without a shared ledger it would
        # serve the ticket again. That is the documented per-node limit.
        assert a.registry.lookup(ticket) is None

    asyncio.run(main())


def test_a_signed_fan_out_paced_ticket_carries_its_options_to_another_node() -> None:
    async def main() -> None:
        clocks = Clocks()
        a = make_server(node(clocks), max_rate=1000)
        b = make_server(node(clocks))
        conn, t = connect(a)
        t.feed(mint_request({**MINT, "receivers": 2, "max_rate": 5000}))
        assert status(t.data) == 201
        answer = json.loads(t.data.split(b"\r\n\r\n", 1)[1])
        # Lowered to node a's --max-rate at mint: the ticket carries 1000.
        assert (answer["receivers"], answer["max_rate"], answer["resumable"]) == (2, 1000, False)
        ticket = answer["ticket"]
        first, ft = connect(b)
        ft.feed(get_head(ticket))
        relay = b.registry.lookup(ticket)
        assert relay is not None and (relay.receivers, relay.max_rate) == (2, 1000)
        second, st = connect(b)
        st.feed(get_head(ticket))
        put, pt = connect(b)
        pt.feed(put_head(ticket, 5) + b"hello")
        assert relay.outcome is Outcome.OK
        assert ft.data.endswith(b"hello") and st.data.endswith(b"hello")
        third, tt = connect(b)
        tt.feed(get_head(ticket))
        assert status(tt.data) == 410

    asyncio.run(main())


def test_expired_forged_and_foreign_tickets_get_410() -> None:
    async def main() -> None:
        clocks = Clocks()
        a = make_server(node(clocks))
        ticket = a.registry.mint_now("w", "s", "d", ttl=10).ticket
        other = Registry(keys=TicketKeys([b"another-key-of-thirty-two-bytes!"]))
        foreign = other.mint_now("w", "s", "d").ticket
        for bad in (foreign, ticket[:-2] + ("AA" if ticket[-2:] != "AA" else "BB")):
            c, t = connect(a)
            t.feed(get_head(bad))
            assert status(t.data) == 410, bad
        clocks.advance(10)
        c, t = connect(a)
        t.feed(get_head(ticket))
        assert status(t.data) == 410

    asyncio.run(main())


def test_the_pairing_deadline_of_a_signed_relay_is_the_tickets() -> None:
    async def main() -> None:
        clocks = Clocks()
        a = make_server(node(clocks))
        ticket = a.registry.mint_now("w", "s", "d", ttl=30).ticket
        clocks.advance(20)  # the GET comes late: 10 s are left
        get, gt = connect(a)
        gt.feed(get_head(ticket))
        clocks.advance(9.999)
        a.registry.timer.run_due()
        assert get.phase is Phase.WAITING
        clocks.advance(0.001)
        a.registry.timer.run_due()
        assert status(gt.data) == 408

    asyncio.run(main())


def test_per_node_cap_counts_minted_tickets_until_their_deadline() -> None:
    async def main() -> None:
        clocks = Clocks()
        a = make_server(node(clocks, max_per_workspace=2))
        first = a.registry.mint_now("w", "s", "d", ttl=30).ticket
        a.registry.mint_now("w", "s", "d", ttl=30)
        try:
            a.registry.mint_now("w", "s", "d", ttl=30)
        except WorkspaceCapReached:
            pass
        else:
            raise AssertionError("cap not enforced")
        # Served here: the slot is given back at the end of the relay.
        put, pt = connect(a)
        pt.feed(put_head(first, 0))
        get, gt = connect(a)
        gt.feed(get_head(first))
        assert status(gt.data) == 200
        a.registry.mint_now("w", "s", "d", ttl=30)
        # Served elsewhere (or never): the slot frees itself at the deadline.
        clocks.advance(30)
        assert a.registry.ledger.workspace_count("w", clocks.mono) == 0

    asyncio.run(main())


def test_admission_answers_from_the_shared_ledger() -> None:
    async def main() -> None:
        clocks = Clocks()
        a = make_server(node(clocks))
        shared = FakeSharedLedger()
        a.registry.attach(shared)
        minter = Registry(keys=KEYS, clock=clocks.monotonic, wall_clock=clocks.now)
        tickets = [minter.mint_now("w", "s", "d", ttl=60).ticket for _ in range(4)]
        results = {}
        for verdict, ticket in zip(
            (Admission.SPENT, Admission.ELSEWHERE, ClusterUnavailable(), Admission.OK),
            tickets,
            strict=True,
        ):
            conn, t = connect(a)
            t.feed(get_head(ticket))
            assert conn.phase is Phase.CONSULTING and not t.reading
            await asyncio.sleep(0)
            if isinstance(verdict, Exception):
                shared.answer(error=verdict)
            else:
                shared.answer(verdict)
            for _ in range(3):
                await asyncio.sleep(0)
            results[ticket] = (conn, t)
        statuses = [status(t.data) if t.data else None for _, t in results.values()]
        assert statuses[:3] == [410, 421, 503]
        conn, t = results[tickets[3]]
        assert conn.phase is Phase.WAITING and t.reading
        assert a.registry.lookup(tickets[3]) is not None
        assert json.loads(results[tickets[1]][1].data.split(b"\r\n\r\n", 1)[1]) == {
            "error": "relay: ticket is being served by another node"
        }

    asyncio.run(main())


def test_a_mint_waits_for_its_slot_and_answers_503_without_the_cluster() -> None:
    async def main() -> None:
        clocks = Clocks()
        a = make_server(node(clocks))
        shared = FakeSharedLedger()
        a.registry.attach(shared)
        ok, okt = connect(a)
        okt.feed(mint_request(MINT) + b"GET /healthz HTTP/1.1\r\nHost: h\r\n\r\n")
        assert ok.phase is Phase.CONSULTING and not okt.data
        down, downt = connect(a)
        downt.feed(mint_request(MINT))
        await asyncio.sleep(0)
        shared.answer(None)
        shared.answer(error=ClusterUnavailable())
        for _ in range(3):
            await asyncio.sleep(0)
        # The granted mint is answered, then the request pipelined behind it.
        assert status(okt.data) == 201 and okt.data.endswith(b"ok\n")
        assert ok.phase is Phase.READING_HEAD
        assert status(downt.data) == 503
        assert downt.data.endswith(b'{"error":"cluster state unavailable"}\n')
        assert ("reserve", shared.asked[0][1]) == shared.asked[0]

    asyncio.run(main())


def test_the_shared_ledger_hears_of_pairing_and_the_end() -> None:
    async def main() -> None:
        clocks = Clocks()
        a = make_server(node(clocks))
        shared = FakeSharedLedger()
        a.registry.attach(shared)
        ticket = (
            Registry(keys=KEYS, clock=clocks.monotonic, wall_clock=clocks.now)
            .mint_now("w", "s", "d", ttl=60)
            .ticket
        )
        put, pt = connect(a)
        pt.feed(put_head(ticket, 2))
        await asyncio.sleep(0)
        shared.answer(Admission.OK)
        for _ in range(3):
            await asyncio.sleep(0)
        get, gt = connect(a)
        gt.feed(get_head(ticket))  # live here now: no second question
        pt.feed(b"hi")
        assert [what for what, _ in shared.recorded] == ["paired", "ended"]
        _, (key, ws, expires_ms, signed) = shared.recorded[1]
        assert ws == "w" and signed and expires_ms == int((T0.timestamp() + 60) * 1000)
        assert len(shared.asked) == 1

    asyncio.run(main())
