"""The transfer through fake transports: buffer ownership and backpressure.

These are the rules of docs/runtime-facts.md §1 and §3 that a loopback test cannot
reliably provoke: a pinned receive buffer must never be handed out again,
and the download's pause/resume must pause/resume the upload.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from typing import Any

from fakes import FakeClock, FakeTLSTransport, FakeTransport

from fastrelay import Outcome, Registry, RelayConfig
from fastrelay.core.phases import Phase
from fastrelay.server.connection import HttpConnection
from fastrelay.server.listener import RelayServer

BUF = 4096


def run(coro_fn: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(coro_fn())


def make_server(registry: Registry | None = None, **config: Any) -> RelayServer:
    cfg = RelayConfig(port=0, read_buffer_bytes=BUF, shared_secret="s", **config)
    return RelayServer(cfg, registry or Registry())


def connect(server: RelayServer) -> tuple[HttpConnection, FakeTransport]:
    conn = HttpConnection(server)
    t = FakeTransport(conn)
    conn.connection_made(t)  # type: ignore[arg-type]
    return conn, t


def connect_tls(server: RelayServer) -> tuple[HttpConnection, FakeTLSTransport]:
    """A connection on a transport that behaves like an SSL one (fakes.py)."""
    conn = HttpConnection(server)
    t = FakeTLSTransport(conn)
    conn.connection_made(t)  # type: ignore[arg-type]
    return conn, t


def put_head(ticket: str, length: int | None, expect: bool = False) -> bytes:
    framing = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    extra = "Expect: 100-continue\r\n" if expect else ""
    return (
        f"PUT /relay/{ticket} HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer {ticket}\r\n"
        f"{framing}\r\n{extra}\r\n"
    ).encode()


def get_head(ticket: str) -> bytes:
    return f"GET /relay/{ticket} HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer {ticket}\r\n\r\n".encode()


def put_then_get(
    server: RelayServer, ticket: str, length: int | None
) -> tuple[HttpConnection, FakeTransport, HttpConnection, FakeTransport]:
    """A PUT head arrives, then the GET that pairs with it."""
    put, pt = connect(server)
    pt.feed(put_head(ticket, length))
    get, gt = connect(server)
    gt.feed(get_head(ticket))
    return put, pt, get, gt


def body_of(download: FakeTransport) -> bytes:
    data = download.data
    return data.split(b"\r\n\r\n", 1)[1]


def test_pinned_buffer_is_never_reused_until_the_download_drains() -> None:
    async def main() -> None:
        server = make_server()
        relay = server.registry.create("w", "s", "d")
        payload = os.urandom(BUF * 6)
        get, gt = connect(server)
        gt.feed(get_head(relay.ticket))
        put, pt = connect(server)
        pt.feed(put_head(relay.ticket, len(payload), expect=True))
        assert put.phase is Phase.UPLOADING and get.phase is Phase.DOWNLOADING
        assert pt.data == b"HTTP/1.1 100 Continue\r\n\r\n"  # at once: GET was waiting
        assert gt.limits == (0, 0)  # plain TCP download: high=0

        # First read: the kernel takes everything -> the buffer stays ours.
        first = put.get_buffer(-1)
        pt.feed(payload[:BUF])
        assert put.get_buffer(-1) is first

        # Second read: the download keeps some bytes -> that buffer is pinned.
        gt.pending = 100
        pt.feed(payload[BUF : 2 * BUF])
        get.pause_writing()
        assert not pt.reading  # the download's pause paused the upload
        pinned_view = gt.views[-1]
        pinned_copy = bytes(pinned_view)
        fresh = put.get_buffer(-1)
        assert fresh.obj is not first.obj  # a new buffer, never the pinned one

        # Even if the loop keeps delivering, the pinned bytes stay intact.
        pt.feed(payload[2 * BUF : 3 * BUF])
        assert bytes(pinned_view) == pinned_copy

        # Drained: the pinned buffers go back to the pool, reading resumes.
        gt.pending = 0
        free_before = server.pool.free
        get.resume_writing()
        assert pt.reading
        assert server.pool.free > free_before

        pt.feed(payload[3 * BUF :])
        assert body_of(gt) == payload
        assert get.phase is Phase.READING_HEAD and not gt.aborted  # kept for the next request
        assert relay.outcome is Outcome.OK
        assert pt.data.endswith(b'{"bytes":%d,"status":"ok"}' % len(payload))

    run(main)


def test_success_waits_for_the_download_to_drain() -> None:
    async def main() -> None:
        server = make_server()
        relay = server.registry.create("w", "s", "d")
        put, pt = connect(server)
        pt.feed(put_head(relay.ticket, 10))
        get, gt = connect(server)
        gt.pending = 5  # the head is still queued when the body completes
        gt.feed(get_head(relay.ticket))
        pt.feed(b"0123456789")
        get.pause_writing()
        assert not relay.done() and not gt.closed  # not yet handed over
        gt.pending = 0
        get.resume_writing()
        assert relay.outcome is Outcome.OK and get.phase is Phase.READING_HEAD
        assert b'"status":"ok"' in pt.data

    run(main)


def test_upload_lost_mid_stream_aborts_the_download() -> None:
    async def main() -> None:
        server = make_server()
        relay = server.registry.create("w", "s", "d")
        put, pt, get, gt = put_then_get(server, relay.ticket, 1000)
        pt.feed(b"x" * 10)
        put.connection_lost(ConnectionResetError())
        assert gt.aborted  # a reset: the receiver sees an error, never a clean end
        assert relay.outcome is Outcome.UPLOAD_ABORTED
        assert relay.bytes == 10
        assert server.registry.lookup(relay.ticket) is None

    run(main)


def test_upload_eof_mid_chunked_body_aborts_without_last_chunk() -> None:
    async def main() -> None:
        server = make_server()
        relay = server.registry.create("w", "s", "d")
        get, gt = connect(server)
        gt.feed(get_head(relay.ticket))
        put, pt = connect(server)
        pt.feed(put_head(relay.ticket, None) + b"5\r\nhello\r\n")
        put.eof_received()
        assert gt.aborted and b"0\r\n\r\n" not in gt.data
        assert relay.outcome is Outcome.UPLOAD_ABORTED

    run(main)


def test_download_lost_tells_the_source_500() -> None:
    async def main() -> None:
        server = make_server()
        relay = server.registry.create("w", "s", "d")
        put, pt, get, gt = put_then_get(server, relay.ticket, 1000)
        pt.feed(b"x" * 10)
        get.connection_lost(BrokenPipeError("broken pipe"))
        assert relay.outcome is Outcome.DOWNLOAD_ABORTED
        assert b"HTTP/1.1 500 " in pt.data and b'{"bytes":10,"error":' in pt.data

    run(main)


def test_chunked_over_max_bytes_forwards_exactly_max_bytes() -> None:
    async def main() -> None:
        server = make_server()
        relay = server.registry.create("w", "s", "d", max_bytes=7)
        get, gt = connect(server)
        gt.feed(get_head(relay.ticket))
        put, pt = connect(server)
        pt.feed(put_head(relay.ticket, None) + b"5\r\nhello\r\n5\r\nworld\r\n")
        body = body_of(gt)
        assert body == b"7\r\nhellowo\r\n"  # 7 payload bytes, then cut
        assert gt.aborted
        assert relay.outcome is Outcome.TOO_LARGE
        assert b"HTTP/1.1 413 " in pt.data
        assert b'{"bytes":7,"error":"relay: payload exceeded MaxBytes (10 > 7)"}' in pt.data

    run(main)


def test_waiting_put_that_leaves_can_be_retried() -> None:
    async def main() -> None:
        server = make_server()
        relay = server.registry.create("w", "s", "d")
        put, pt = connect(server)
        pt.feed(put_head(relay.ticket, 3))
        assert relay.session.put_claimed
        put.connection_lost(None)
        assert not relay.session.put_claimed
        put2, pt2 = connect(server)
        pt2.feed(put_head(relay.ticket, 3) + b"abc")
        get, gt = connect(server)
        gt.feed(get_head(relay.ticket))
        assert body_of(gt) == b"abc" and relay.outcome is Outcome.OK

    run(main)


def test_idle_transfer_is_aborted_visibly() -> None:
    async def main() -> None:
        config = RelayConfig(port=0, read_buffer_bytes=BUF, idle_timeout_s=0.05)
        server = RelayServer(config, Registry())
        relay = server.registry.create("w", "s", "d")
        put, pt, get, gt = put_then_get(server, relay.ticket, 100)
        await asyncio.wait_for(relay.wait(), 5)
        assert relay.outcome is Outcome.IDLE_TIMEOUT
        assert gt.aborted and b"HTTP/1.1 500 " in pt.data

    run(main)


def test_idle_timeout_fires_exactly_idle_after_the_last_progress() -> None:
    """On a fake clock: never early, and not late (the deadline follows progress)."""

    async def main() -> None:
        now = [1000.0]
        server = make_server(Registry(clock=lambda: now[0]), idle_timeout_s=10.0)
        relay = server.registry.create("w", "s", "d")
        put, pt, get, gt = put_then_get(server, relay.ticket, 100)
        now[0] += 6.0
        pt.feed(b"x" * 10)  # progress at t+6: the deadline moves to t+16
        now[0] += 9.999  # t+15.999: 10 s after pairing, 9.999 s after progress
        server.timer.run_due()
        assert not relay.done()
        now[0] += 0.001  # exactly 10 s after the last progress
        server.timer.run_due()
        assert relay.outcome is Outcome.IDLE_TIMEOUT
        assert gt.aborted

    run(main)


def test_put_without_any_framing_is_an_empty_body_and_a_complete_get() -> None:
    async def main() -> None:
        server = make_server()
        relay = server.registry.create("w", "s", "d")
        get, gt = connect(server)
        gt.feed(get_head(relay.ticket))
        put, pt = connect(server)
        pt.feed(
            f"PUT /relay/{relay.ticket} HTTP/1.1\r\nHost: h\r\n"
            f"Authorization: Bearer {relay.ticket}\r\n\r\n".encode()
        )
        assert b"Content-Length: 0\r\n" in gt.data and b"chunked" not in gt.data
        assert relay.outcome is Outcome.OK and not gt.aborted
        assert get.phase is Phase.READING_HEAD

    run(main)


def test_tls_download_ends_cleanly_with_ciphertext_still_queued() -> None:
    # The last byte is handed to a TLS download that still queues ~200 KiB
    # of ciphertext. Restoring the connection's own write marks then calls
    # pause_writing() synchronously; that must not look like an error (it
    # once reset the GET after the PUT had been told "ok").
    async def main() -> None:
        server = make_server()
        relay = server.registry.create("w", "s", "d")
        get, gt = connect_tls(server)
        gt.feed(get_head(relay.ticket))
        put, pt = connect(server)
        pt.feed(put_head(relay.ticket, 10))
        assert not put.transfer.pins_buffers  # type: ignore[union-attr]
        gt.pending = 200 * 1024
        pt.feed(b"0123456789")
        assert relay.outcome is Outcome.OK
        assert not gt.aborted and not gt.closed
        assert get.phase is Phase.ANSWERING and not gt.reading  # waits for the client
        assert body_of(gt) == b"0123456789"
        # The client reads the rest: the connection is ready for its next request.
        gt.pending = 0
        gt.paused = False
        get.resume_writing()
        assert get.phase is Phase.READING_HEAD and gt.reading

    run(main)


def test_tls_download_tail_unread_past_the_idle_timeout_is_aborted() -> None:
    async def main() -> None:
        clock = FakeClock()
        server = make_server(Registry(clock=clock), idle_timeout_s=30.0)
        relay = server.registry.create("w", "s", "d")
        get, gt = connect_tls(server)
        gt.feed(get_head(relay.ticket))
        put, pt = connect(server)
        pt.feed(put_head(relay.ticket, 3))
        gt.pending = 200 * 1024
        pt.feed(b"abc")
        clock.now += 29.9
        server.timer.run_due()
        assert not gt.aborted
        clock.now += 0.1
        server.timer.run_due()
        assert gt.aborted

    run(main)


def test_a_whole_small_upload_leaves_in_one_write_with_the_head() -> None:
    async def main() -> None:
        server = make_server()
        relay = server.registry.create("w", "s", "d")
        get, gt = connect(server)
        gt.feed(get_head(relay.ticket))
        put, pt = connect(server)
        pt.feed(put_head(relay.ticket, 5) + b"hello")
        assert relay.outcome is Outcome.OK
        [only] = gt.written  # head and body together
        assert only.startswith(b"HTTP/1.1 200 OK\r\n") and only.endswith(b"\r\n\r\nhello")

    run(main)


def test_an_empty_body_still_gets_its_head() -> None:
    async def main() -> None:
        server = make_server()
        for length, extra in ((0, b"pipelined junk"), (None, b"0\r\n\r\n")):
            relay = server.registry.create("w", "s", "d")
            get, gt = connect(server)
            gt.feed(get_head(relay.ticket))
            put, pt = connect(server)
            pt.feed(put_head(relay.ticket, length) + extra)
            assert relay.outcome is Outcome.OK
            assert gt.data.startswith(b"HTTP/1.1 200 OK\r\n"), gt.data
            if length is None:
                assert gt.data.endswith(b"\r\n\r\n0\r\n\r\n")
            else:
                assert b"Content-Length: 0\r\n" in gt.data and gt.data.endswith(b"\r\n\r\n")

    run(main)
