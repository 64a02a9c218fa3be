"""tests/support/faultproxy.py on real loopback sockets: each fault at an exact byte.

A plain listening socket plays the target; the test thread (or a worker
thread, where a side must block in a long send) plays each peer. Every
socket has a timeout, so a broken proxy fails a test instead of hanging it.
Absence checks ("nothing more arrives") are the one place a test waits a
fixed time: a recv with a short timeout, since "no byte ever comes" has no
event to wait for.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import random
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import trustme

from tests.support.faultproxy import (
    NO_FAULT,
    Fault,
    FaultProxy,
    ProxyWaitError,
    close_after,
    reset_after,
    silence_after,
)

TIMEOUT = 10.0
# "Nothing more arrives" is checked by a recv that must time out after this long.
QUIET = 0.3
MiB = 1024 * 1024


def payload(size: int, seed: int = 7) -> bytes:
    return random.Random(seed).randbytes(size)


def read_to_end(sock: socket.socket, limit: int | None = None) -> tuple[bytes, str]:
    """Read until EOF ("eof"), a reset ("reset"), ``limit`` bytes ("limit") or a timeout."""
    chunks = bytearray()
    while limit is None or len(chunks) < limit:
        want = 65536 if limit is None else min(65536, limit - len(chunks))
        try:
            data = sock.recv(want)
        except ConnectionResetError:
            return bytes(chunks), "reset"
        except TimeoutError:
            return bytes(chunks), "timeout"
        if not data:
            return bytes(chunks), "eof"
        chunks += data
    return bytes(chunks), "limit"


def send_until_error(sock: socket.socket, total: int) -> str:
    """Send up to ``total`` bytes; name how it ended ("sent", or the error class)."""
    chunk = payload(256 * 1024)
    sent = 0
    try:
        while sent < total:
            sock.sendall(chunk)
            sent += len(chunk)
    except OSError as exc:
        return type(exc).__name__
    return "sent"


class Target:
    """A listening socket on loopback that the proxy forwards to."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(TIMEOUT)
        self.address: tuple[str, int] = self.listener.getsockname()
        self.accepted: list[socket.socket] = []

    def accept(self) -> socket.socket:
        conn, _ = self.listener.accept()
        conn.settimeout(TIMEOUT)
        self.accepted.append(conn)
        return conn

    def close(self) -> None:
        for conn in self.accepted:
            conn.close()
        self.listener.close()


@pytest.fixture
def target() -> Iterator[Target]:
    t = Target()
    yield t
    t.close()


@pytest.fixture
def pool() -> Iterator[concurrent.futures.ThreadPoolExecutor]:
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as executor:
        yield executor


@pytest.fixture
def sockets() -> Iterator[Callable[[tuple[str, int]], socket.socket]]:
    """Client connections, closed after the test whatever happens."""
    opened: list[socket.socket] = []

    def connect(address: tuple[str, int]) -> socket.socket:
        sock = socket.create_connection(address, timeout=TIMEOUT)
        opened.append(sock)
        return sock

    yield connect
    for sock in opened:
        sock.close()


def connect_pair(
    proxy: FaultProxy, target: Target, sockets: Callable[[tuple[str, int]], socket.socket]
) -> tuple[socket.socket, socket.socket]:
    client = sockets(proxy.address)
    server = target.accept()
    return client, server


def connect_expecting_reset(
    sockets: Callable[[tuple[str, int]], socket.socket], address: tuple[str, int]
) -> str:
    """Connect and read, where the proxy resets at once: the reset can beat connect() itself."""
    try:
        client = sockets(address)
    except ConnectionResetError:
        return "reset at connect"
    data, end = read_to_end(client)
    assert data == b""
    return end


# --- plans and plain forwarding ------------------------------------------------


def test_fault_constructors_validate() -> None:
    assert reset_after(5, "down") == Fault("reset", 5, "down")
    assert str(close_after(3)) == "close after 3 bytes up"
    assert str(NO_FAULT) == "no fault"
    with pytest.raises(ValueError):
        reset_after(-1)
    with pytest.raises(ValueError):
        silence_after(1, "sideways")  # type: ignore[arg-type]


def test_no_fault_forwards_both_ways_with_half_close(
    target: Target, pool: concurrent.futures.ThreadPoolExecutor, sockets: Any
) -> None:
    up, down = payload(3 * MiB + 17, seed=1), payload(2 * MiB + 5, seed=2)
    with FaultProxy(target.address) as proxy:
        assert proxy.url == f"http://127.0.0.1:{proxy.port}"
        client, server = connect_pair(proxy, target, sockets)

        def serve() -> tuple[bytes, str]:
            got = read_to_end(server)
            server.sendall(down)
            server.close()
            return got

        served = pool.submit(serve)
        client.sendall(up)
        # The client's FIN must reach the target while the other direction goes on.
        client.shutdown(socket.SHUT_WR)
        assert read_to_end(client) == (down, "eof")
        assert served.result(TIMEOUT) == (up, "eof")
        conn = proxy.wait_closed(0, TIMEOUT)
        assert (conn.up_bytes, conn.down_bytes) == (len(up), len(down))
        assert not conn.faulted and conn.error is None
        with pytest.raises(ProxyWaitError, match="without hitting its fault"):
            proxy.wait_faulted(0, TIMEOUT)


# --- reset ---------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 10, 65535, 65536, 100_003])
def test_reset_after_down_gives_client_exactly_n_bytes_then_reset(
    n: int, target: Target, pool: concurrent.futures.ThreadPoolExecutor, sockets: Any
) -> None:
    data = payload(4 * MiB)
    with FaultProxy(target.address, [reset_after(n, "down")]) as proxy:
        client, server = connect_pair(proxy, target, sockets)
        sent = pool.submit(send_until_error, server, 64 * MiB)
        assert read_to_end(client) == (data[:n], "reset")
        conn = proxy.wait_faulted(0, TIMEOUT)
        assert (conn.up_bytes, conn.down_bytes) == (0, n)
        # The target is reset too, so its send fails instead of blocking forever.
        assert sent.result(TIMEOUT) in ("ConnectionResetError", "BrokenPipeError")
        assert proxy.wait_closed(0, TIMEOUT).error is None


def test_reset_mid_read_forwards_only_the_first_n_bytes_of_it(target: Target, sockets: Any) -> None:
    data = payload(1000)
    with FaultProxy(target.address, [reset_after(10, "down")]) as proxy:
        client, server = connect_pair(proxy, target, sockets)
        server.sendall(data)  # one write, typically one read for the proxy
        assert read_to_end(client) == (data[:10], "reset")
        proxy.wait_faulted(0, TIMEOUT)
        # The target sees the reset on its next read, not an EOF.
        assert read_to_end(server) == (b"", "reset")
        assert proxy.connection(0).down_bytes == 10


def test_reset_after_up_gives_target_exactly_n_bytes_then_reset(
    target: Target, pool: concurrent.futures.ThreadPoolExecutor, sockets: Any
) -> None:
    n = 250_001
    with FaultProxy(target.address, [reset_after(n, "up")]) as proxy:
        client, server = connect_pair(proxy, target, sockets)
        sent = pool.submit(send_until_error, client, 256 * MiB)
        got, end = read_to_end(server)
        assert (len(got), end) == (n, "reset")
        assert got == (payload(256 * 1024) * 2)[:n]
        assert sent.result(TIMEOUT) in ("ConnectionResetError", "BrokenPipeError")
        conn = proxy.wait_faulted(0, TIMEOUT)
        assert (conn.up_bytes, conn.down_bytes) == (n, 0)


def test_reset_at_zero_bytes_forwards_nothing(target: Target, sockets: Any) -> None:
    with FaultProxy(target.address, [reset_after(0, "up")]) as proxy:
        client_end = connect_expecting_reset(sockets, proxy.address)
        server = target.accept()
        proxy.wait_faulted(0, TIMEOUT)
        assert client_end in ("reset", "reset at connect")
        assert read_to_end(server) == (b"", "reset")
        conn = proxy.wait_closed(0, TIMEOUT)
        assert (conn.up_bytes, conn.down_bytes) == (0, 0)


# --- clean close -----------------------------------------------------------------


def test_close_after_down_gives_client_n_bytes_then_eof(
    target: Target, pool: concurrent.futures.ThreadPoolExecutor, sockets: Any
) -> None:
    n, size = 70_000, 1 * MiB
    data = payload(size)
    with FaultProxy(target.address, [close_after(n, "down")]) as proxy:
        client, server = connect_pair(proxy, target, sockets)

        def serve() -> tuple[bytes, str]:
            server.sendall(data)
            return read_to_end(server)

        served = pool.submit(serve)
        assert read_to_end(client) == (data[:n], "eof")
        # The target finishes its send (the proxy drains it) and reads a FIN.
        assert served.result(TIMEOUT) == (b"", "eof")
        proxy.wait_faulted(0, TIMEOUT)
        server.close()
        client.close()
        conn = proxy.wait_closed(0, TIMEOUT)
        assert (conn.up_bytes, conn.down_bytes) == (0, n)
        assert conn.discarded_bytes == size - n
        assert conn.error is None


def test_close_after_up_gives_target_n_bytes_then_eof(target: Target, sockets: Any) -> None:
    n = 4097
    data = payload(3 * n)
    with FaultProxy(target.address, [close_after(n, "up")]) as proxy:
        client, server = connect_pair(proxy, target, sockets)
        client.sendall(data)
        assert read_to_end(server) == (data[:n], "eof")
        assert read_to_end(client) == (b"", "eof")
        conn = proxy.wait_faulted(0, TIMEOUT)
        assert (conn.up_bytes, conn.down_bytes) == (n, 0)


# --- silence ---------------------------------------------------------------------


def test_silence_forwards_nothing_more_and_keeps_sockets_open(target: Target, sockets: Any) -> None:
    n = 1000
    data = payload(2 * n)
    with FaultProxy(target.address, [silence_after(n, "up")]) as proxy:
        client, server = connect_pair(proxy, target, sockets)
        client.sendall(data)
        assert read_to_end(server, limit=n) == (data[:n], "limit")
        proxy.wait_faulted(0, TIMEOUT)
        server.sendall(b"answer")
        server.settimeout(QUIET)
        client.settimeout(QUIET)
        # No byte, no FIN, no reset either way: the recv just times out.
        assert read_to_end(server) == (b"", "timeout")
        assert read_to_end(client) == (b"", "timeout")
        conn = proxy.connection(0)
        assert (conn.up_bytes, conn.down_bytes, conn.closed) == (n, 0, False)

        # Releasing resets both (the default).
        proxy.release(0)
        server.settimeout(TIMEOUT)
        client.settimeout(TIMEOUT)
        assert read_to_end(client) == (b"", "reset")
        assert read_to_end(server) == (b"", "reset")
        assert proxy.wait_closed(0, TIMEOUT).up_bytes == n


def test_silence_down_then_release_with_clean_close(target: Target, sockets: Any) -> None:
    with FaultProxy(target.address, [silence_after(5, "down")]) as proxy:
        client, server = connect_pair(proxy, target, sockets)
        server.sendall(b"0123456789")
        assert read_to_end(client, limit=5) == (b"01234", "limit")
        proxy.wait_faulted(0, TIMEOUT)
        client.sendall(b"late")
        with pytest.raises(IndexError):
            proxy.release(1)
        proxy.release(0, how="close")
        assert read_to_end(client) == (b"", "eof")
        assert read_to_end(server) == (b"", "eof")
        client.close()
        server.close()
        conn = proxy.wait_closed(0, TIMEOUT)
        assert (conn.up_bytes, conn.down_bytes) == (0, 5)
        # What sat unread in the proxy ("56789", "late") was drained, not reset.
        assert conn.discarded_bytes == len(b"56789late")


# --- plans, waits and lifecycle ----------------------------------------------------


def test_plans_queue_then_default_then_enqueue(target: Target, sockets: Any) -> None:
    data = payload(300_000)
    with FaultProxy(target.address, [reset_after(100, "down")]) as proxy:
        for index, expect in [(0, (data[:100], "reset")), (1, (data, "eof"))]:
            client, server = connect_pair(proxy, target, sockets)
            server.sendall(data)
            server.close()
            assert read_to_end(client) == expect
            client.close()
            proxy.wait_closed(index, TIMEOUT)
        proxy.enqueue(close_after(7, "down"))
        client, server = connect_pair(proxy, target, sockets)
        server.sendall(data)
        server.close()
        assert read_to_end(client) == (data[:7], "eof")
        assert [c.fault for c in proxy.connections] == [
            reset_after(100, "down"),
            NO_FAULT,
            close_after(7, "down"),
        ]
        assert [c.down_bytes for c in proxy.connections] == [100, len(data), 7]


def test_plans_from_a_callable(target: Target, sockets: Any) -> None:
    def plan(index: int) -> Fault:
        return reset_after(index + 1, "down") if index % 2 == 0 else NO_FAULT

    with FaultProxy(target.address, plan) as proxy:
        for index in range(4):
            client, server = connect_pair(proxy, target, sockets)
            server.sendall(b"abcdef")
            server.close()
            got = read_to_end(client)
            expect = (b"abcdef"[: index + 1], "reset") if index % 2 == 0 else (b"abcdef", "eof")
            assert got == expect
        with pytest.raises(TypeError):
            proxy.enqueue(NO_FAULT)


def test_wait_times_out_with_what_it_saw(target: Target) -> None:
    with FaultProxy(target.address) as proxy:
        start = time.monotonic()
        with pytest.raises(ProxyWaitError, match="not accepted"):
            proxy.wait_faulted(0, timeout=0.05)
        assert time.monotonic() - start < 5


def test_unreachable_target_resets_the_client(sockets: Any) -> None:
    placeholder = socket.create_server(("127.0.0.1", 0))
    address = placeholder.getsockname()
    placeholder.close()  # nothing listens there now: connect is refused
    with FaultProxy(address) as proxy:
        assert connect_expecting_reset(sockets, proxy.address) in ("reset", "reset at connect")
        conn = proxy.wait_closed(0, TIMEOUT)
        assert conn.error is not None and "connect" in conn.error


def test_close_resets_open_connections_and_stops_listening(target: Target, sockets: Any) -> None:
    proxy = FaultProxy(target.address)
    with proxy:
        client, server = connect_pair(proxy, target, sockets)
        client.sendall(b"x")
        assert read_to_end(server, limit=1) == (b"x", "limit")
    assert read_to_end(client) == (b"", "reset")
    assert read_to_end(server) == (b"", "reset")
    assert proxy.connection(0).closed
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(proxy.address, timeout=TIMEOUT).close()
    proxy.close()  # idempotent


def test_backpressure_bounds_what_the_proxy_takes(
    target: Target, pool: concurrent.futures.ThreadPoolExecutor, sockets: Any
) -> None:
    total = 256 * MiB
    with FaultProxy(target.address) as proxy:
        client, server = connect_pair(proxy, target, sockets)
        sent = pool.submit(send_until_error, server, total)
        # The client never reads: forwarding must stall at what the kernel
        # buffers hold. Poll until the counter stops moving (a stall has no event).
        seen, stable_since = -1, time.monotonic()
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            now = proxy.connection(0).down_bytes
            if now != seen:
                seen, stable_since = now, time.monotonic()
            elif now > 0 and time.monotonic() - stable_since > QUIET:
                break
            time.sleep(0.01)
        assert 0 < seen < 16 * MiB
        assert not sent.done()
        client.close()
        assert sent.result(TIMEOUT) in ("ConnectionResetError", "BrokenPipeError")


# --- TLS passes through --------------------------------------------------------------


@pytest.fixture(scope="module")
def tls() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    return server_ctx, client_ctx


def test_tls_passes_through_and_breaks_on_plan(
    target: Target,
    pool: concurrent.futures.ThreadPoolExecutor,
    tls: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    server_ctx, client_ctx = tls
    data = payload(MiB)

    def serve() -> None:
        with server_ctx.wrap_socket(target.accept(), server_side=True) as conn:
            assert conn.recv(5) == b"hello"
            with contextlib.suppress(OSError):
                conn.sendall(data)

    with FaultProxy(target.address, [NO_FAULT, reset_after(200_000, "down")]) as proxy:
        for index in range(2):
            served = pool.submit(serve)
            raw = socket.create_connection(proxy.address, timeout=TIMEOUT)
            with client_ctx.wrap_socket(raw, server_hostname="127.0.0.1") as client:
                client.sendall(b"hello")
                got = bytearray()
                try:
                    while len(got) < len(data):
                        chunk = client.recv(65536)
                        if not chunk:
                            break
                        got += chunk
                except ConnectionResetError:
                    pass
            served.result(TIMEOUT)
            if index == 0:
                assert bytes(got) == data
            else:
                assert len(got) < len(data) and data.startswith(bytes(got))
                assert proxy.wait_faulted(1, TIMEOUT).down_bytes == 200_000
