"""Fan-out and pacing through fake transports, with an injected clock.

What loopback tests cannot provoke at will: a buffer pinned by one receiver
of three is never reused until every receiver's transport is empty; the
upload waits for the slowest receiver; a receiver stalled for exactly the
idle timeout is dropped while the others go on; a paced upload is held by
one timer and never counts as idle.
"""

from __future__ import annotations

import json
import os

from fakes import FakeClock, FakeTransport
from test_transfer_buffers import BUF, body_of, connect, get_head, make_server, put_head, run

from fastrelay import Outcome, Registry
from fastrelay.core.phases import Phase
from fastrelay.server.connection import HttpConnection
from fastrelay.server.listener import RelayServer


def receivers(
    server: RelayServer, ticket: str, n: int
) -> list[tuple[HttpConnection, FakeTransport]]:
    ends = []
    for _ in range(n):
        conn, t = connect(server)
        t.feed(get_head(ticket))
        ends.append((conn, t))
    return ends


def answer_json(t: FakeTransport) -> dict[str, object]:
    return json.loads(body_of(t))  # type: ignore[no-any-return]


def test_pairs_when_the_put_and_all_receivers_are_here_and_refuses_one_more() -> None:
    async def main() -> None:
        server = make_server()
        relay = server.registry.create("w", "s", "d", receivers=3)
        ends = receivers(server, relay.ticket, 2)
        put, pt = connect(server)
        pt.feed(put_head(relay.ticket, 10))
        assert put.phase is Phase.WAITING
        assert all(conn.phase is Phase.WAITING for conn, _ in ends)
        ends += receivers(server, relay.ticket, 1)
        assert put.phase is Phase.UPLOADING
        assert all(conn.phase is Phase.DOWNLOADING for conn, _ in ends)
        fourth = receivers(server, relay.ticket, 1)[0][1]
        assert b"HTTP/1.1 423 " in fourth.data
        assert fourth.data.endswith(b'{"error":"GET side already claimed"}')
        pt.feed(b"0123456789")
        for _, t in ends:
            assert body_of(t) == b"0123456789"
        assert relay.outcome is Outcome.OK
        assert answer_json(pt) == {"bytes": 10, "status": "ok", "receivers": 3, "delivered": 3}

    run(main)


def test_a_receiver_that_leaves_before_the_start_frees_its_slot() -> None:
    async def main() -> None:
        server = make_server()
        relay = server.registry.create("w", "s", "d", receivers=2)
        (first, ft), (second, st) = receivers(server, relay.ticket, 2)
        assert relay.session.get_claimed  # both slots taken
        st.closed = True
        second.connection_lost(None)
        assert not relay.session.get_claimed
        assert relay.waiting_receivers == [first]
        third, tt = receivers(server, relay.ticket, 1)[0]
        assert b"423" not in tt.data
        put, pt = connect(server)
        pt.feed(put_head(relay.ticket, 3) + b"abc")
        assert body_of(ft) == body_of(tt) == b"abc"
        assert relay.outcome is Outcome.OK

    run(main)


def test_not_all_receivers_arriving_is_408_for_every_waiting_request() -> None:
    async def main() -> None:
        clock = FakeClock()
        server = make_server(Registry(default_ttl=30.0, clock=clock))
        relay = server.registry.create("w", "s", "d", receivers=3)
        ends = receivers(server, relay.ticket, 2)
        put, pt = connect(server)
        pt.feed(put_head(relay.ticket, 3))
        clock.now += 30
        server.registry.timer.run_due()
        assert relay.outcome is Outcome.EXPIRED
        for t in (pt, *(t for _, t in ends)):
            assert b"HTTP/1.1 408 " in t.data
        assert ends[0][1].data.endswith(b'{"error":"timed out waiting for GET side"}')

    run(main)


def test_the_slowest_receiver_holds_the_upload_and_pins_the_buffer() -> None:
    async def main() -> None:
        server = make_server()
        relay = server.registry.create("w", "s", "d", receivers=3)
        payload = os.urandom(BUF * 5)
        ends = receivers(server, relay.ticket, 3)
        put, pt = connect(server)
        pt.feed(put_head(relay.ticket, len(payload)))
        assert all(t.limits == (0, 0) for _, t in ends)  # plain TCP: high=0

        first = put.get_buffer(-1)
        pt.feed(payload[:BUF])
        assert put.get_buffer(-1) is first  # every receiver took it all: still ours

        slow_conn, slow = ends[1]
        slow.pending = 100  # one receiver keeps part of the next read
        pt.feed(payload[BUF : 2 * BUF])
        slow_conn.pause_writing()
        assert not pt.reading  # the slowest receiver holds the upload
        pinned = slow.views[-1]
        copy = bytes(pinned)
        assert put.get_buffer(-1).obj is not first.obj  # never the pinned one

        # Another receiver draining does not free it, nor resume the upload.
        ends[0][0].pause_writing()
        ends[0][0].resume_writing()
        assert not pt.reading
        assert bytes(pinned) == copy

        free = server.pool.free
        slow.pending = 0
        slow_conn.resume_writing()
        assert pt.reading and server.pool.free > free

        pt.feed(payload[2 * BUF :])
        for _, t in ends:
            assert body_of(t) == payload
        assert answer_json(pt)["delivered"] == 3

    run(main)


def test_a_stalled_receiver_is_dropped_at_the_idle_timeout_and_the_others_go_on() -> None:
    async def main() -> None:
        clock = FakeClock()
        server = make_server(Registry(clock=clock), idle_timeout_s=10.0)
        relay = server.registry.create("w", "s", "d", receivers=3)
        ends = receivers(server, relay.ticket, 3)
        put, pt = connect(server)
        pt.feed(put_head(relay.ticket, 2 * BUF))
        stalled_conn, stalled = ends[2]
        stalled.pending = 1
        pt.feed(b"a" * BUF)
        stalled_conn.pause_writing()
        assert not pt.reading
        clock.now += 9.999
        server.registry.timer.run_due()
        assert not stalled.aborted
        clock.now += 0.001
        server.registry.timer.run_due()
        assert stalled.aborted  # cut: its client sees a reset
        assert pt.reading  # the others go on
        pt.feed(b"b" * BUF)
        for _, t in ends[:2]:
            assert body_of(t) == b"a" * BUF + b"b" * BUF
            assert not t.aborted
        assert relay.outcome is Outcome.DOWNLOAD_ABORTED
        assert b"HTTP/1.1 502 " in pt.data
        assert answer_json(pt) == {
            "bytes": 2 * BUF,
            "error": "1 of 3 receivers failed",
            "receivers": 3,
            "delivered": 2,
        }
        assert server.registry.metrics.dropped_receivers == {"idle": 1, "lost": 0}
        # One observation per receiver: the dropped one's BUF, the others' 2 x BUF.
        delivered = server.registry.metrics.receivers_delivered
        assert delivered.count == 3 and delivered.sum == 5 * BUF

    run(main)


def test_every_receiver_gone_ends_the_transfer_at_once() -> None:
    async def main() -> None:
        server = make_server()
        relay = server.registry.create("w", "s", "d", receivers=2)
        ends = receivers(server, relay.ticket, 2)
        put, pt = connect(server)
        pt.feed(put_head(relay.ticket, 100) + b"x" * 10)
        for conn, t in ends:
            t.closed = True
            conn.connection_lost(ConnectionResetError("reset"))
        assert relay.outcome is Outcome.DOWNLOAD_ABORTED
        assert answer_json(pt) == {
            "bytes": 10,
            "error": "2 of 2 receivers failed",
            "receivers": 2,
            "delivered": 0,
        }
        assert server.registry.metrics.dropped_receivers["lost"] == 2

    run(main)


def test_chunked_upload_to_an_http10_and_an_http11_receiver() -> None:
    async def main() -> None:
        server = make_server()
        relay = server.registry.create("w", "s", "d", receivers=2)
        old, ot = connect(server)
        ot.feed(get_head(relay.ticket).replace(b"HTTP/1.1", b"HTTP/1.0"))
        new, nt = receivers(server, relay.ticket, 1)[0]
        put, pt = connect(server)
        pt.feed(put_head(relay.ticket, None) + b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
        assert body_of(ot) == b"abcde"  # close-delimited
        assert body_of(nt) == b"5\r\nabcde\r\n0\r\n\r\n"  # one chunk per read
        assert relay.outcome is Outcome.OK
        assert old.phase is Phase.CLOSED and not ot.aborted

    run(main)


def test_max_bytes_cuts_every_receiver() -> None:
    async def main() -> None:
        server = make_server()
        relay = server.registry.create("w", "s", "d", receivers=2, max_bytes=4)
        ends = receivers(server, relay.ticket, 2)
        put, pt = connect(server)
        pt.feed(put_head(relay.ticket, None) + b"6\r\nabcdef\r\n")
        assert relay.outcome is Outcome.TOO_LARGE
        assert b"HTTP/1.1 413 " in pt.data
        for _, t in ends:
            assert t.aborted

    run(main)


def test_a_paced_upload_is_held_by_one_timer_and_is_never_idle() -> None:
    async def main() -> None:
        clock = FakeClock()
        server = make_server(Registry(clock=clock), idle_timeout_s=1.0, max_rate=64 * 1024)
        relay = server.registry.create("w", "s", "d", receivers=2)
        ends = receivers(server, relay.ticket, 2)
        put, pt = connect(server)
        size = 1024 * 1024
        pt.feed(put_head(relay.ticket, size))
        moved = 0
        pauses = 0
        while moved < size:
            if not pt.reading:
                pauses += 1
                assert len(server.registry.timer.deadlines) <= 2  # the pause + the idle check
                next_at = server.registry.timer.deadlines.next_at()
                assert next_at is not None
                clock.now = max(clock.now, next_at)
                server.registry.timer.run_due()
                continue
            n = min(len(put.get_buffer(-1)), size - moved)
            pt.feed(b"z" * n)
            moved += n
        assert relay.outcome is Outcome.OK  # 16 s of pacing, idle timeout 1 s
        for _, t in ends:
            assert len(body_of(t)) == size
        assert pauses >= 8
        assert server.registry.metrics.paced_s > 10

    run(main)


def test_a_paced_single_relay_reads_no_more_than_its_allowance() -> None:
    async def main() -> None:
        clock = FakeClock()
        server = make_server(Registry(clock=clock))
        relay = server.registry.create("w", "s", "d", max_rate=100 * 1024)
        put, pt = connect(server)
        pt.feed(put_head(relay.ticket, 10 * BUF))
        get, gt = receivers(server, relay.ticket, 1)[0]
        assert len(put.get_buffer(-1)) <= BUF
        moved = 0
        start = clock.now
        while moved < 10 * BUF:
            if not pt.reading:
                next_at = server.registry.timer.deadlines.next_at()
                assert next_at is not None
                clock.now = max(clock.now, next_at)
                server.registry.timer.run_due()
                continue
            n = len(put.get_buffer(-1))
            pt.feed(b"y" * n)
            moved += n
        assert relay.outcome is Outcome.OK
        # 40 KiB at 100 KiB/s, started half a bucket full: under half a second.
        assert clock.now - start < 0.5

    run(main)
