"""The shared ledger against a real redis-server: caps, leases, single use, outages.

Two `RedisLedger`s on one Redis stand for two nodes. Every wait polls a
condition with a deadline (`wait_until`); nothing is ordered by sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest

from fastrelay.cluster.ledger import Admission, Holding
from fastrelay.cluster.redis_ledger import PREFIX, RedisLedger
from fastrelay.core.errors import ClusterUnavailable, MintDisabled, WorkspaceCapReached
from tests.cluster.processes import ProcessError, RedisServer, which

pytestmark = pytest.mark.skipif(
    which("redis-server") is None, reason="redis-server is not installed (.ci/run installs it)"
)

LEASE_S = 0.9  # heartbeat every 0.3 s
TIMEOUT_S = 0.25


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    try:
        server = RedisServer()
    except ProcessError as exc:
        pytest.fail(f"redis-server did not start: {exc}")
    with server:
        yield server


def ledger(redis: RedisServer, node: str, cap: int = 2, pending: int = 100) -> RedisLedger:
    return RedisLedger(
        redis.url,
        node_id=node,
        max_per_workspace=cap,
        max_pending=pending,
        lease_s=LEASE_S,
        timeout_s=TIMEOUT_S,
    )


async def now_ms(led: RedisLedger) -> int:
    seconds, micros = await led.client.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def live_slots(led: RedisLedger, workspace: str) -> int:
    return int(await led.client.zcount(PREFIX + "ws:" + workspace, f"({await now_ms(led)}", "+inf"))


async def wait_until(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)  # a poll interval, not an ordering


@contextlib.asynccontextmanager
async def nodes(redis: RedisServer, **kw: int) -> AsyncIterator[tuple[RedisLedger, RedisLedger]]:
    a, b = ledger(redis, "node-a", **kw), ledger(redis, "node-b", **kw)
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()


def run(coro: Awaitable[None]) -> None:
    asyncio.run(coro)  # type: ignore[arg-type]


def test_the_workspace_cap_holds_across_nodes(redis_server: RedisServer) -> None:
    async def main() -> None:
        async with nodes(redis_server, cap=2) as (a, b):
            far = await now_ms(a) + 60_000
            await a.reserve("k1", "ws", far)
            await b.reserve("k2", "ws", far)
            with pytest.raises(WorkspaceCapReached):
                await a.reserve("k3", "ws", far)
            await b.reserve("k3", "other-ws", far)
            b.ended("k1", "ws", far, signed=True)  # k1's relay ended on node b
            await wait_until(lambda: _fits(a, "k4", "ws", far), 5, "k1's slot to be freed")

    run(main())


async def _fits(led: RedisLedger, key: str, ws: str, until: int) -> bool:
    try:
        await led.reserve(key, ws, until)
    except (WorkspaceCapReached, MintDisabled):
        return False
    return True


def test_the_pending_cap_counts_unpaired_tickets_of_all_workspaces(
    redis_server: RedisServer,
) -> None:
    async def main() -> None:
        async with nodes(redis_server, cap=10, pending=2) as (a, b):
            far = await now_ms(a) + 60_000
            await a.reserve("k1", "w1", far)
            await b.reserve("k2", "w2", far)
            with pytest.raises(MintDisabled):
                await a.reserve("k3", "w3", far)
            a.paired("k1", "w1", far, single_use=False)
            await wait_until(lambda: _fits(b, "k3", "w3", far), 5, "k1 to stop being pending")

    run(main())


def test_an_unserved_slot_frees_itself_at_the_tickets_deadline(redis_server: RedisServer) -> None:
    async def main() -> None:
        async with nodes(redis_server, cap=1) as (a, b):
            soon = await now_ms(a) + 400
            await a.reserve("k1", "ws", soon)
            with pytest.raises(WorkspaceCapReached):
                await a.reserve("k2", "ws", soon + 60_000)
            await wait_until(lambda: _fits(a, "k2", "ws", soon + 60_000), 5, "the deadline")
            assert await now_ms(a) >= soon

    run(main())


def test_a_running_transfer_keeps_its_slot_while_its_node_beats(redis_server: RedisServer) -> None:
    async def main() -> None:
        async with nodes(redis_server, cap=1) as (a, b):
            soon = await now_ms(a) + 300
            await a.reserve("k1", "ws", soon)
            a.paired("k1", "ws", soon, single_use=True)
            held = Holding("k1", "ws", paired=True, signed=True)
            # Beat until well past the ticket's deadline: the slot stays.
            until = await now_ms(a) + 3 * int(LEASE_S * 1000)
            while await now_ms(a) < until:
                a.refresh([held])
                await asyncio.sleep(a.refresh_interval_s)  # the heartbeat's own period
                assert await live_slots(b, "ws") == 1
            # The node dies (no more beats): the slot frees itself within a lease.
            died = await now_ms(a)
            await wait_until(lambda: _fits(b, "k2", "ws", died + 60_000), 5, "the lease to end")
            assert await now_ms(a) - died <= int(LEASE_S * 1000) + 300

    run(main())


def test_single_use_and_one_owner_across_nodes(redis_server: RedisServer) -> None:
    async def main() -> None:
        async with nodes(redis_server) as (a, b):
            expires = await now_ms(a) + 60_000
            assert await a.admit("t1") is Admission.OK
            assert await a.admit("t1") is Admission.OK  # a second arrival on the owner
            assert await b.admit("t1") is Admission.ELSEWHERE
            a.ended("t1", "ws", expires, signed=True)

            async def spent_on_b() -> bool:
                return await b.admit("t1") is Admission.SPENT

            await wait_until(spent_on_b, 5, "t1 to be spent everywhere")
            assert await a.admit("t1") is Admission.SPENT
            # A random (unsigned) ticket is never marked spent: nobody else knows it.
            a.ended("t2", "ws", expires, signed=False)
            await wait_until(lambda: _no_key(a, "spent:t2"), 5, "the end of t2 to be recorded")

    run(main())


async def _no_key(led: RedisLedger, name: str) -> bool:
    await led.client.ping()
    return not await led.client.exists(PREFIX + name)


def test_a_single_use_ticket_whose_node_died_mid_transfer_stays_spent(
    redis_server: RedisServer,
) -> None:
    """The hole: a ticket paired on node a, a dies (no end is ever recorded,
    no more heartbeats). Once a's owner lease lapses, b must not take the
    ticket afresh: it was spent when it paired."""

    async def main() -> None:
        async with nodes(redis_server) as (a, b):
            expires = await now_ms(a) + 60_000
            assert await a.admit("t1") is Admission.OK
            a.paired("t1", "ws", expires, single_use=True)
            assert await b.admit("t1") is Admission.ELSEWHERE  # a still owns it

            async def b_hears_spent() -> bool:
                return await b.admit("t1") is Admission.SPENT

            started = time.monotonic()
            await wait_until(b_hears_spent, 5, "a's lease on t1 to lapse")
            assert time.monotonic() - started >= LEASE_S - 0.2
            # And it stays spent: b never became its owner.
            assert await b.admit("t1") is Admission.SPENT
            assert not await b.client.exists(PREFIX + "owner:t1")

    run(main())


def test_a_dead_owners_lease_lapses(redis_server: RedisServer) -> None:
    async def main() -> None:
        async with nodes(redis_server) as (a, b):
            assert await a.admit("t1") is Admission.OK

            async def b_may_take_it() -> bool:
                return await b.admit("t1") is Admission.OK

            started = time.monotonic()
            await wait_until(b_may_take_it, 5, "a's lease on t1 to lapse")
            assert time.monotonic() - started >= LEASE_S - 0.2

    run(main())


def test_without_redis_decisions_fail_fast_and_recover(redis_server: RedisServer) -> None:
    async def main() -> None:
        async with nodes(redis_server) as (a, b):
            far = await now_ms(a) + 60_000
            await a.reserve("k1", "ws", far)
            assert a.up
            redis_server.stop()
            redis_server.wait_down()
            started = time.monotonic()
            with pytest.raises(ClusterUnavailable):
                await a.reserve("k2", "ws", far)
            with pytest.raises(ClusterUnavailable):
                await a.admit("t1")
            assert time.monotonic() - started < 4 * TIMEOUT_S + 1
            assert not a.up and a.errors >= 2
            a.ended("k1", "ws", far, signed=True)  # lost now, kept for the next beat

            async def recorded() -> bool:
                return a.errors >= 3  # the background end failed too

            await wait_until(recorded, 5, "the background end to fail")
            redis_server.start()
            a.refresh([])  # the heartbeat sends the end Redis missed

            async def delivered() -> bool:
                try:
                    return await a.admit("k1") is Admission.SPENT
                except ClusterUnavailable:
                    return False

            await wait_until(delivered, 5, "the missed end to reach Redis")
            assert a.up

    run(main())
