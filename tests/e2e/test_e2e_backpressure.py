"""A stalled or slow reader holds the uploader back; server memory stays flat."""

from __future__ import annotations

import threading
import time

from conftest import Relay
from test_e2e_transfer import wait_waiting

from fastrelay.core.phases import Phase

MIB = 1024 * 1024


def server_buffered_bytes(relay: Relay) -> int:
    """Bytes the server holds for its clients: transport write buffers + pinned buffers."""

    def measure() -> int:
        total = 0
        for conn in relay.server.connections:
            if conn.phase is not Phase.CLOSED:
                total += conn.transport.get_write_buffer_size()
            if conn.transfer is not None:
                total += len(conn.transfer._pinned) * relay.server.pool.size
        return total

    return int(relay.call(measure))


def test_stalled_reader_pauses_the_uploader(any_relay: Relay) -> None:
    relay = any_relay
    r = relay.create()
    size = 256 * MIB
    get = relay.connect()
    get.sendall(
        f"GET /relay/{r.ticket} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {r.ticket}\r\n\r\n".encode()
    )
    wait_waiting(relay, r, "GET")
    put = relay.connect()
    put.sendall(
        f"PUT /relay/{r.ticket} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {r.ticket}\r\nContent-Length: {size}\r\n\r\n".encode()
    )
    sent = [0]
    stop = threading.Event()

    def upload() -> None:
        block = b"\x5a" * MIB
        put.settimeout(0.2)
        while not stop.is_set() and sent[0] < size:
            try:
                sent[0] += put.send(block)
            except TimeoutError:
                continue
            except OSError:
                return

    thread = threading.Thread(target=upload, daemon=True)
    thread.start()
    get.recv(65536)  # read a little, then stop reading entirely
    # wait until the uploader is stuck (no progress for a while)
    last, still = -1, 0
    deadline = time.monotonic() + 30
    while still < 5:
        assert time.monotonic() < deadline, "uploader never stalled"
        time.sleep(0.1)
        still = still + 1 if sent[0] == last else 0
        last = sent[0]
    try:
        # TCP buffers on both sides hold some MiB; the relay itself holds little
        assert sent[0] < 64 * MIB, sent[0]
        assert server_buffered_bytes(relay) <= 2 * MIB
        assert relay.call(lambda: len(relay.server.pool._free)) <= relay.server.pool.max_free
    finally:
        stop.set()
        put.close()
        get.close()
        thread.join(5)
    relay.wait_done(r)
