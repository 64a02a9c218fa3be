"""Bad input, limits, drain and reload: the server answers and lives on."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable

import pytest
import trustme
from conftest import Relay, parse_response, read_all
from test_e2e_transfer import AUTH, finish, waiting_get

H = "Host: x\r\n"


def healthy(relay: Relay) -> bool:
    status, _, body = relay.raw(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    return status == 200 and body == b"ok\n"


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET\r\n\r\n", 400),
        (b"GET / HTTP/9.9\r\nHost: x\r\n\r\n", 505),
        (b"BREW /relay/x HTTP/1.1\r\nHost: x\r\n\r\n", 405),
        (b"PUT /relay/x HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n", 400),
        (
            b"PUT /relay/x HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999999\r\n\r\n",
            400,
        ),
        (
            b"PUT /relay/x HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            400,
        ),
        (b"PUT /relay/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
        (b"GET /relay/x HTTP/1.1\r\nHost: x\r\nX-Bad: \x01\x02\r\n\r\n", 400),
        (b"GET /relay/\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 431),
        (b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: " + b"a" * 17000 + b"\r\n\r\n", 431),
        (b"GET /relay/x HTTP/1.1\r\n\r\n", 400),  # HTTP/1.1 without Host
    ],
)
def test_bad_requests_get_their_status_and_the_server_lives_on(
    relay: Relay, raw: bytes, status: int
) -> None:
    got, _, _ = relay.raw(raw)
    assert got == status
    assert healthy(relay)


def test_http10_client(relay: Relay) -> None:
    status, headers, body = relay.raw(b"GET /healthz HTTP/1.0\r\n\r\n")
    assert status == 200 and body == b"ok\n" and headers.get("connection") == "close"


def test_pipelined_requests_each_get_an_answer(relay: Relay) -> None:
    with relay.connect() as sock:
        sock.sendall(
            b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" * 2
            + b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        data = read_all(sock)
    assert data.count(b"HTTP/1.1 200 OK") == 3


def test_head_one_byte_at_a_time(relay: Relay) -> None:
    with relay.connect() as sock:
        for b in b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n":
            sock.sendall(bytes([b]))
        assert parse_response(read_all(sock))[0] == 200


def test_half_closed_client_still_gets_its_answer(relay: Relay) -> None:
    with socket.create_connection(("127.0.0.1", relay.server.port)) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.shutdown(socket.SHUT_WR)
        assert parse_response(read_all(sock))[0] == 200


def test_bad_chunk_framing_on_a_paired_upload(relay: Relay) -> None:
    r = relay.create()
    get = waiting_get(relay, r, stdout=subprocess.PIPE)
    with relay.connect() as sock:
        sock.sendall(
            f"PUT /relay/{r.ticket} HTTP/1.1\r\n{H}Authorization: Bearer {r.ticket}\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n".encode()
        )
        status, _, body = parse_response(read_all(sock))
    assert status == 400 and b"chunk size" in body
    rc, out, _ = finish(get)
    assert rc in (18, 56) and b"hello".startswith(out)  # the GET is cut, never completed


def test_slowloris_head_is_cut_off(relay_factory: Callable[..., Relay]) -> None:
    relay = relay_factory(header_timeout_s=0.5)
    with relay.connect() as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # never finished
        status, _, _ = parse_response(read_all(sock))
    assert status == 408
    assert healthy(relay)


def test_max_connections(relay_factory: Callable[..., Relay]) -> None:
    relay = relay_factory(max_connections=3)
    held = [relay.connect() for _ in range(3)]
    try:
        time.sleep(0.2)
        with relay.connect() as extra:
            extra.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_all(extra) == b""  # closed at once, no answer
    finally:
        for s in held:
            s.close()
    deadline = time.monotonic() + 5
    while not healthy(relay):
        assert time.monotonic() < deadline


def test_max_pending_refuses_mint(relay_factory: Callable[..., Relay]) -> None:
    relay = relay_factory(max_pending=2)
    assert relay.mint_http()[0] == 201
    assert relay.mint_http()[0] == 201
    status, body = relay.mint_http()
    assert status == 503 and b"too many pending" in body


# --- real signals to a real `fastrelay serve` ------------------------------------------


def start_serve(tmp: pathlib.Path, *args: str) -> tuple[subprocess.Popen[str], str]:
    env = {**os.environ, "FASTRELAY_SHARED_SECRET": "sig-secret"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastrelay", "serve", "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("fastrelay: listening on"), line
    return proc, line.split()[-1]


def wait_for_metrics(base: str, *lines: str, timeout: float = 10) -> None:
    """Poll /metrics until every one of ``lines`` is in it."""
    deadline = time.monotonic() + timeout
    while True:
        text = subprocess.run(
            ["curl", "-sS", base + "/metrics"], capture_output=True, check=True
        ).stdout.decode()
        values = {}
        for row in text.splitlines():
            name, _, value = row.partition(" ")
            if value and not row.startswith("#"):
                values[name] = float(value)  # prometheus_client writes "2.0"
        wanted = (line.split(" ") for line in lines)
        if all(values.get(name) == float(value) for name, value in wanted):
            return
        assert time.monotonic() < deadline, text
        time.sleep(0.02)


def mint_ticket(base: str, cafile: str | None = None) -> str:
    args = [
        "curl",
        "-sS",
        "-H",
        "Authorization: Bearer sig-secret",
        "-d",
        '{"workspace_id":"w","source_exe_id":"s","dest_exe_id":"d"}',
        base + "/api/exec-gateway/relay/create",
    ]
    if cafile:
        args[1:1] = ["--cacert", cafile]
    return str(json.loads(subprocess.run(args, capture_output=True, check=True).stdout)["ticket"])


def test_sigterm_drains(tmp_path: pathlib.Path) -> None:
    proc, base = start_serve(tmp_path, "--drain-timeout", "20")
    try:
        paired, waiting = mint_ticket(base), mint_ticket(base)
        data = os.urandom(4 * 1024 * 1024)
        got_path = tmp_path / "got.bin"
        # The download goes to a file, not a pipe we read only at the end: a
        # full pipe would stall the transfer (and the drain) on the test.
        get = subprocess.Popen(
            [
                "curl",
                "-sS",
                "-o",
                str(got_path),
                "-H",
                AUTH.format(paired),
                base + f"/relay/{paired}",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        put = subprocess.Popen(
            [
                "curl",
                "-sS",
                "-H",
                AUTH.format(paired),
                "-T",
                "-",
                "--limit-rate",
                "4M",
                base + f"/relay/{paired}",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        lonely = subprocess.Popen(
            [
                "curl",
                "-sS",
                "-H",
                AUTH.format(waiting),
                "-w",
                "\n%{http_code}",
                base + f"/relay/{waiting}",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert put.stdin is not None
        put.stdin.write(data[:65536])
        put.stdin.flush()
        # Both relays under way before the signal: one paired, one with its
        # GET in and waiting (a minted ticket counts as waiting before that).
        wait_for_metrics(
            base,
            "fastrelay_active_relays 2",
            "fastrelay_waiting_relays 1",
            "fastrelay_waiting_sides 1",
        )
        proc.send_signal(signal.SIGTERM)
        out, _ = lonely.communicate(timeout=20)
        assert out == b'{"error":"server shutting down"}\n503'
        put.stdin.write(data[65536:])
        put.stdin.close()
        put.stdin = None
        assert finish(put)[0] == 0
        rc, _, err = finish(get)
        assert rc == 0, err
        assert got_path.read_bytes() == data
        assert proc.wait(30) == 0
    finally:
        proc.kill()
        proc.communicate()


def test_second_signal_aborts_visibly(tmp_path: pathlib.Path) -> None:
    proc, base = start_serve(tmp_path, "--drain-timeout", "60")
    try:
        t = mint_ticket(base)
        get = subprocess.Popen(
            ["curl", "-sS", "-H", AUTH.format(t), "-o", "/dev/null", base + f"/relay/{t}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        put = subprocess.Popen(
            ["curl", "-sS", "-H", AUTH.format(t), "-T", "-", base + f"/relay/{t}"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert put.stdin is not None
        put.stdin.write(b"x" * 100_000)
        put.stdin.flush()
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        assert finish(get)[0] in (18, 56)
        put.kill()
        put.stdin.close()
        put.stdin = None
        finish(put)
    finally:
        proc.kill()
        proc.communicate()


def test_sighup_reloads_the_certificate(tmp_path: pathlib.Path) -> None:
    def issue(name: str) -> tuple[trustme.CA, pathlib.Path]:
        ca = trustme.CA()
        leaf = ca.issue_cert("localhost", "127.0.0.1")
        ca_file = tmp_path / f"{name}-ca.pem"
        ca.cert_pem.write_to_path(str(ca_file))
        leaf.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
        leaf.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
        return ca, ca_file

    _, old_ca = issue("old")
    proc, base = start_serve(
        tmp_path, "--certfile", str(tmp_path / "cert.pem"), "--keyfile", str(tmp_path / "key.pem")
    )

    def ok_with(ca_file: pathlib.Path) -> bool:
        r = subprocess.run(
            ["curl", "-sS", "--cacert", str(ca_file), base + "/healthz"], capture_output=True
        )
        return r.returncode == 0 and r.stdout == b"ok\n"

    try:
        assert ok_with(old_ca)
        _, new_ca = issue("new")
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while not ok_with(new_ca):
            assert time.monotonic() < deadline, "new certificate not served"
            time.sleep(0.1)
        assert not ok_with(old_ca)
        (tmp_path / "cert.pem").write_text("broken")
        proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        assert ok_with(new_ca)  # a failed reload keeps the old certificate
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert "TLS reload failed" in err and proc.returncode == 0


@pytest.mark.parametrize("loop_kind", ["uvloop", "asyncio"])
def test_failed_tls_handshakes_are_counted_and_harmless(
    relay_factory: Callable[..., Relay], loop_kind: str
) -> None:
    # The loop cuts a handshake at the header timeout; the server counts it
    # failed a second later, on its own timer (no garbage collection).
    relay = relay_factory(loop_kind, tls=True, header_timeout_s=1.0)
    for payload in (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"\x16\x03\x01\x00\x05hello"):
        with socket.create_connection(("127.0.0.1", relay.server.port)) as raw:
            raw.sendall(payload)  # plaintext (or a broken record) to a TLS port
            read_all(raw)
    deadline = time.monotonic() + 10

    def failed_handshakes() -> int:
        return relay.server.failed_handshakes

    while relay.call(failed_handshakes) < 2:
        assert time.monotonic() < deadline, relay.call(failed_handshakes)
        time.sleep(0.05)
    assert healthy(relay)
    _, _, body = relay.raw(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert b"fastrelay_tls_handshake_failures_total 2.0" in body


def test_slow_mint_body_is_cut_off(relay_factory: Callable[..., Relay]) -> None:
    relay = relay_factory(header_timeout_s=0.5)
    with relay.connect() as sock:
        sock.sendall(
            b"POST /api/exec-gateway/relay/create HTTP/1.1\r\nHost: x\r\n"
            b"Authorization: Bearer test-secret\r\nContent-Length: 100\r\n\r\n{"
        )
        status, _, _ = parse_response(read_all(sock))
    assert status == 408
    assert healthy(relay)


@pytest.mark.parametrize("loop_kind", ["uvloop", "asyncio"])
def test_accepted_connections_inherit_tcp_keepalive(
    relay_factory: Callable[..., Relay], loop_kind: str
) -> None:
    # Keepalive (what ends a transfer whose peer vanished without FIN or RST)
    # is set on the listener only; every accepted socket must carry it.
    relay = relay_factory(loop_kind, tcp_keepalive_s=17)
    with relay.connect():

        def options() -> list[tuple[int, int, int]]:
            out = []
            for conn in relay.server.connections:
                sock = conn.transport.get_extra_info("socket")
                out.append(
                    (
                        sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
                        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
                    )
                )
            return out

        deadline = time.monotonic() + 10
        while not relay.call(options):
            assert time.monotonic() < deadline, "the connection was never accepted"
            time.sleep(0.01)
        assert relay.call(options) == [(1, 17, 17)]
