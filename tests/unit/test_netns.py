"""tests/support/netns.py: a veth pair between two namespaces, a real link loss.

Skipped, with `skip_reason`'s reason, where namespaces cannot be made (not
root, no iproute2, a container that forbids them). "The connection
stalls" is checked the only way an absence can be: a recv that times out.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.support import netns
from tests.support.netns import NetnsPair, skip_reason

TIMEOUT = 10.0
QUIET = 0.5


def test_skip_reason_is_a_reason_or_none() -> None:
    reason = skip_reason()
    assert reason is None or (isinstance(reason, str) and reason)


def test_skip_reason_names_the_missing_piece(monkeypatch: pytest.MonkeyPatch) -> None:
    # skip_reason is cached; test the uncached function under faked conditions.
    probe = skip_reason.__wrapped__
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert probe() == "network namespaces need root (effective uid is 1000)"
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert probe() == "iproute2's `ip` is not installed"


@pytest.fixture
def pair() -> Iterator[NetnsPair]:
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    with NetnsPair() as p:
        yield p


def test_pair_is_wired_and_cleaned_up() -> None:
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    with NetnsPair() as pair:
        assert {pair.ns_a, pair.ns_b} <= set(netns.list_namespaces())
        shown = pair.run("a", ["ip", "-o", "-4", "addr", "show", "dev", pair.veth_a], text=True)
        assert f"{pair.addr_a}/30" in shown.stdout
        assert pair.link_state("a") == "UP" and pair.link_state("b") == "UP"
        # The veth lives only inside the namespaces, never in ours.
        assert subprocess.run(["ip", "link", "show", pair.veth_a], capture_output=True).returncode
    left = set(netns.list_namespaces())
    assert pair.ns_a not in left and pair.ns_b not in left
    for dev in (pair.veth_a, pair.veth_b):
        assert subprocess.run(["ip", "link", "show", dev], capture_output=True).returncode != 0
    pair.close()  # idempotent


def test_link_down_stalls_a_connection_and_link_up_resumes_it(pair: NetnsPair) -> None:
    server = pair.call("b", lambda: socket.create_server((pair.addr_b, 0)))
    with server:
        port = server.getsockname()[1]
        client = pair.call("a", lambda: socket.create_connection((pair.addr_b, port), TIMEOUT))
        server.settimeout(TIMEOUT)
        conn, (peer, _) = server.accept()
        with client, conn:
            assert peer == pair.addr_a
            conn.settimeout(TIMEOUT)
            client.sendall(b"ping")
            assert conn.recv(4) == b"ping"

            pair.link_down("b")
            # Side "a" is administratively up but has lost its carrier.
            assert pair.link_state("a") == "DOWN" and pair.link_state("b") == "DOWN"
            # The send succeeds (it only fills our buffer); nothing arrives, and
            # neither side sees a FIN or a reset: the connection just stalls.
            client.sendall(b"lost?")
            conn.settimeout(QUIET)
            client.settimeout(QUIET)
            with pytest.raises(TimeoutError):
                conn.recv(5)
            with pytest.raises(TimeoutError):
                client.recv(5)
            # A new connection is not refused either: its SYNs vanish.
            with pytest.raises(TimeoutError):
                pair.call("a", lambda: socket.create_connection((pair.addr_b, port), QUIET))

            pair.link_up("b")
            # TCP retransmits the stalled bytes once the link is back.
            conn.settimeout(TIMEOUT)
            assert conn.recv(5) == b"lost?"
            conn.sendall(b"pong")
            client.settimeout(TIMEOUT)
            assert client.recv(4) == b"pong"


def test_popen_runs_a_process_inside_a_namespace(pair: NetnsPair) -> None:
    echo = (
        "import socket, sys\n"
        f"srv = socket.create_server(({pair.addr_b!r}, 0))\n"
        "print(srv.getsockname()[1], flush=True)\n"
        "conn, _ = srv.accept()\n"
        "conn.sendall(conn.recv(100).upper())\n"
    )
    proc = pair.popen("b", [sys.executable, "-c", echo], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    port = int(proc.stdout.readline())
    with pair.call("a", lambda: socket.create_connection((pair.addr_b, port), TIMEOUT)) as client:
        client.sendall(b"hello")
        assert client.recv(100) == b"HELLO"
    assert proc.wait(TIMEOUT) == 0
    proc.stdout.close()
    # Our own namespace cannot reach the pair's addresses at all.
    with pytest.raises(OSError):
        socket.create_connection((pair.addr_b, port), QUIET).close()


def test_remove_stale_deletes_namespaces_of_dead_processes() -> None:
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    name = f"{netns.PREFIX}-{dead.pid}-abc123-a"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        assert name in netns.remove_stale()
        assert name not in netns.list_namespaces()
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
