"""The client's side of fan-out and pacing (issue #19): ``fastrelay mint
--receivers N --max-rate RATE``, ``Client.mint``/``AsyncClient.mint(receivers=,
max_rate=)``, ``fastrelay put`` and ``get`` on a fan-out ticket, against the
real server (conftest's ``relay``) with the real ``python -m fastrelay``
command line.

Nothing is ordered with a sleep: the downloads and the upload may reach the
relay in any order (the transfer starts when all are there), and a test that
needs "N receivers are waiting" waits for the server's own count of waiting
connections.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import http.server
import json
import os
import pathlib
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, ClassVar

import pytest
from conftest import SECRET, Relay

from fastrelay.client import AsyncClient, Client, MintResult, TransferFailed
from fastrelay.client.api import _mint_request
from fastrelay.client.commands import EXIT_OK, EXIT_REFUSED, EXIT_TRANSFER_FAILED, EXIT_USAGE
from fastrelay.core.phases import Phase

ENV = {**os.environ, "FASTRELAY_SHARED_SECRET": SECRET}
MIB = 1024 * 1024
MINT = ("--workspace", "w", "--source", "a", "--dest", "b")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fastrelay_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "fastrelay", *args]


def run(
    *args: str, input: bytes | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """The command's exit code, and its stdout and stderr as text."""
    done = subprocess.run(
        fastrelay_cmd(*args), input=input, capture_output=True, timeout=timeout, env=ENV
    )
    return subprocess.CompletedProcess(
        done.args, done.returncode, done.stdout.decode(), done.stderr.decode()
    )


def popen(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        fastrelay_cmd(*args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )


def finish(proc: subprocess.Popen[str], timeout: float = 60) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
    return proc.returncode, out, err


def one_line_error(stderr: str) -> str:
    """The single ``fastrelay: error: ...`` line of ``stderr``."""
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("fastrelay: error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


def wait_for(cond: Callable[[], Any], what: str, timeout: float = 20) -> None:
    """Poll ``cond`` until true: order events by observed state, never by sleeping."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def waiting(relay: Relay) -> int:
    """Requests holding a side of a relay and waiting for the transfer to start."""
    return int(
        relay.call(lambda: sum(1 for c in relay.server.connections if c.phase is Phase.WAITING))
    )


def minted(relay: Relay, ticket: str) -> Any:
    found = relay.call(lambda: relay.registry.lookup(ticket))
    assert found is not None, "the ticket was not minted"
    return found


def active(relay: Relay) -> int:
    return int(relay.call(lambda: relay.registry.active_count))


@pytest.fixture(scope="module")
def big_file(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """Over 1 MiB, with a Content-Length: the relay's splice-eligible size."""
    path = tmp_path_factory.mktemp("fanout") / "big.bin"
    path.write_bytes(os.urandom(6 * MIB + 4321))
    return path


@pytest.fixture(scope="module")
def huge_file(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """Far more than the socket buffers between the relay and a receiver
    that stops reading hold (a few MiB): while such a receiver is there,
    the upload cannot be over."""
    path = tmp_path_factory.mktemp("fanout") / "huge.bin"
    path.write_bytes(os.urandom(32 * MIB + 4321))
    return path


# --- mint: the flags, their echo, and their validation ---------------------------------


def test_cli_mint_receivers_and_max_rate_echo(relay: Relay) -> None:
    done = run("mint", relay.base, *MINT, "--receivers", "3", "--max-rate", "2M")
    assert done.returncode == EXIT_OK, done.stderr
    assert done.stderr == ""  # confirmed: no warning
    (line,) = done.stdout.splitlines()
    answer = json.loads(line)
    assert answer["receivers"] == 3 and answer["max_rate"] == 2 * MIB
    assert "resumable" not in answer  # only the echo of what was asked
    r = minted(relay, answer["ticket"])
    assert r.receivers == 3 and r.max_rate == 2 * MIB


def test_cli_mint_echoes_only_what_was_asked(relay: Relay) -> None:
    plain = run("mint", relay.base, *MINT)
    assert plain.returncode == EXIT_OK, plain.stderr
    answer = json.loads(plain.stdout)
    assert set(answer) == {"ticket", "upload_url", "download_url", "expires_at"}
    # The defaults, spelled out, are not sent: a v1 mint and a v1 answer.
    defaults = run("mint", relay.base, *MINT, "--receivers", "1", "--max-rate", "0")
    assert defaults.returncode == EXIT_OK, defaults.stderr
    assert set(json.loads(defaults.stdout)) == set(answer)
    rate = run("mint", relay.base, *MINT, "--max-rate", "1.5M")
    assert rate.returncode == EXIT_OK, rate.stderr
    echo = json.loads(rate.stdout)
    assert echo["max_rate"] == 1536 * 1024 and "receivers" not in echo
    assert minted(relay, echo["ticket"]).receivers == 1


def test_cli_mint_rate_above_the_relay_cap_is_lowered(
    relay_factory: Callable[..., Relay],
) -> None:
    relay = relay_factory(max_rate=1 * MIB)
    done = run("mint", relay.base, *MINT, "--max-rate", "2M")
    assert done.returncode == EXIT_OK, done.stderr
    answer = json.loads(done.stdout)
    assert answer["max_rate"] == MIB  # the relay's echo: the rate in force
    assert done.stderr == ""  # lowered is confirmed, not ignored
    assert minted(relay, answer["ticket"]).max_rate == MIB


def test_cli_mint_receivers_beyond_the_relay_limit_is_refused(relay: Relay) -> None:
    done = run("mint", relay.base, *MINT, "--receivers", "17")
    assert done.returncode == EXIT_REFUSED
    line = one_line_error(done.stderr)
    assert "400" in line and "receivers must be a whole number from 1 to 16" in line


def test_cli_mint_resumable_fanout_is_refused_by_the_relay(relay: Relay) -> None:
    done = run("mint", relay.base, *MINT, "--receivers", "2", "--resumable")
    assert done.returncode == EXIT_REFUSED
    line = one_line_error(done.stderr)
    assert "400" in line and "resumable and receivers > 1 cannot be combined" in line


class _OldRelay(http.server.BaseHTTPRequestHandler):
    """A relay older than fan-out and pacing: it ignores the v2 fields and
    answers the v1 mint answer; the requests it saw are kept."""

    seen: ClassVar[list[dict[str, Any]]] = []

    def do_POST(self) -> None:
        length = int(self.headers["Content-Length"])
        self.seen.append(json.loads(self.rfile.read(length)))
        base = f"http://127.0.0.1:{self.server.server_address[1]}"
        body = json.dumps(
            {
                "ticket": "rly_" + "A" * 43,
                "upload_url": f"{base}/relay/rly_{'A' * 43}",
                "download_url": f"{base}/relay/rly_{'A' * 43}",
                "expires_at": "2030-01-01T00:00:00.000000Z",
            }
        ).encode()
        self.send_response(201)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_cli_mint_warns_when_an_older_relay_does_not_confirm() -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _OldRelay)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        done = run("mint", base, *MINT, "--receivers", "3", "--max-rate", "10M")
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
    assert done.returncode == EXIT_OK, done.stderr  # the ticket exists and works
    assert _OldRelay.seen[-1]["receivers"] == 3
    assert _OldRelay.seen[-1]["max_rate"] == 10 * MIB
    answer = json.loads(done.stdout)
    assert answer["receivers"] == 1 and answer["max_rate"] == 0  # as the relay has it
    warnings = done.stderr.splitlines()
    assert warnings == [
        'fastrelay: warning: the relay did not confirm "receivers":3 (it is older than '
        "fan-out relays): the ticket takes one GET",
        'fastrelay: warning: the relay did not confirm "max_rate" (it is older than paced '
        "relays): the ticket is not paced",
    ], done.stderr


BAD_FLAGS = [
    ("--receivers", "0", "--receivers must be a whole number, at least 1 (got 0)"),
    ("--receivers", "-2", "--receivers must be a whole number, at least 1 (got -2)"),
    ("--receivers", "1.5", "--receivers must be a whole number, at least 1 (got 1.5)"),
    ("--receivers", "three", "--receivers must be a whole number, at least 1 (got three)"),
    ("--receivers", "", "--receivers must be a whole number, at least 1 (got )"),
    ("--max-rate", "-1", "--max-rate must be bytes/s"),
    ("--max-rate", "2X", "--max-rate must be bytes/s"),
    ("--max-rate", "fast", "--max-rate must be bytes/s"),
    ("--max-rate", "", "--max-rate must be bytes/s"),
    ("--max-rate", "1e6", "--max-rate must be bytes/s"),
]


@pytest.mark.parametrize(("flag", "value", "message"), BAD_FLAGS)
def test_cli_mint_bad_flags_exit_2_before_any_request(
    flag: str, value: str, message: str, relay: Relay
) -> None:
    before = active(relay)
    got = run("mint", relay.base, *MINT, f"{flag}={value}")
    assert got.returncode == EXIT_USAGE, got.stderr
    line = one_line_error(got.stderr)
    assert line.startswith(f"fastrelay: error: {message}"), line
    assert got.stdout == ""
    assert active(relay) == before  # nothing minted
    # No request at all: a relay that cannot be reached is never tried
    # (that would be exit 4), and no secret is needed to say so.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    unreachable = subprocess.run(
        fastrelay_cmd("mint", f"http://127.0.0.1:{port}", *MINT, f"{flag}={value}"),
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in ENV.items() if k != "FASTRELAY_SHARED_SECRET"},
    )
    assert unreachable.returncode == EXIT_USAGE, unreachable.stderr
    assert one_line_error(unreachable.stderr) == line


# --- put and get on a fan-out ticket ---------------------------------------------------


@pytest.mark.parametrize("source", ["file", "stdin"])
def test_cli_put_and_three_gets_deliver_identical_files(
    source: str, relay: Relay, big_file: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    """A file (Content-Length) and stdin (chunked): each receiver's file is
    the upload, and ``put`` prints the relay's fan-out answer."""
    data = big_file.read_bytes()
    mint = run("mint", relay.base, *MINT, "--receivers", "3")
    assert mint.returncode == EXIT_OK, mint.stderr
    answer = json.loads(mint.stdout)
    assert answer["receivers"] == 3
    outs = [tmp_path / f"out{i}.bin" for i in range(3)]
    getters = [popen("get", answer["download_url"], "-o", str(out)) for out in outs]
    if source == "file":
        put = run("put", answer["upload_url"], str(big_file))
    else:
        put = run("put", answer["upload_url"], "-", input=data)
    assert put.returncode == EXIT_OK, put.stderr
    for getter in getters:
        code, _, err = finish(getter)
        assert code == EXIT_OK, err
    for out in outs:
        assert sha(out.read_bytes()) == sha(data)
        assert not out.with_name(out.name + ".partial").exists()
    (line,) = put.stdout.splitlines()
    assert json.loads(line) == {
        "bytes": len(data), "status": "ok", "receivers": 3, "delivered": 3,
    }  # fmt: skip


def test_cli_a_fourth_get_is_refused_with_423(relay: Relay, tmp_path: pathlib.Path) -> None:
    mint = run("mint", relay.base, *MINT, "--receivers", "3")
    url = json.loads(mint.stdout)["download_url"]
    getters = [popen("get", url, "-o", str(tmp_path / f"out{i}.bin")) for i in range(3)]
    try:
        wait_for(lambda: waiting(relay) == 3, "three receivers waiting")
        fourth = run("get", url, "-o", str(tmp_path / "fourth.bin"))
        assert fourth.returncode == EXIT_REFUSED, fourth.stderr
        line = one_line_error(fourth.stderr)
        assert "423 GET side already claimed" in line and "--receivers" in line
        assert not (tmp_path / "fourth.bin.partial").exists()
    finally:
        for getter in getters:
            getter.kill()
            finish(getter)


def reset_on_close(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def test_cli_put_prints_the_502_answer_and_exits_4(
    relay: Relay, huge_file: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    """One receiver of three leaves mid-body: the two others get the whole
    file, and ``put`` prints the relay's 502 answer before it exits 4."""
    data = huge_file.read_bytes()
    mint = run("mint", relay.base, *MINT, "--receivers", "3")
    answer = json.loads(mint.stdout)
    ticket = answer["ticket"]
    outs = [tmp_path / f"out{i}.bin" for i in range(2)]
    getters = [popen("get", answer["download_url"], "-o", str(out)) for out in outs]
    # The third receiver: a raw GET that reads the head and a little of the
    # body, then resets. The relay reads the source no faster than the
    # slowest receiver, so the upload cannot be over before it leaves.
    leaver = socket.create_connection(("127.0.0.1", relay.server.port), timeout=30)
    leaver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    leaver.sendall(
        f"GET /relay/{ticket} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ticket}\r\n\r\n".encode()
    )
    put = popen("put", answer["upload_url"], str(huge_file))
    got = b""
    while b"\r\n\r\n" not in got or len(got) < 200_000:
        chunk = leaver.recv(65536)
        assert chunk, got[:200]
        got += chunk
    assert got.startswith(b"HTTP/1.1 200 "), got[:200]
    reset_on_close(leaver)
    code, out, err = finish(put)
    assert code == EXIT_TRANSFER_FAILED, err
    (line,) = out.splitlines()
    assert json.loads(line) == {
        "bytes": len(data), "error": "1 of 3 receivers failed", "receivers": 3, "delivered": 2,
    }  # fmt: skip
    error = one_line_error(err)
    assert "502" in error and "2 of 3 receivers got the whole upload" in error, error
    for getter, path in zip(getters, outs, strict=True):
        gcode, _, gerr = finish(getter)
        assert gcode == EXIT_OK, gerr
        assert sha(path.read_bytes()) == sha(data)


def test_cli_paced_transfer_takes_its_time(
    relay: Relay, big_file: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    """``--max-rate`` reaches the relay: 6 MiB at 2 MiB/s, with a burst of at
    most one second's worth, cannot take less than about 2 s."""
    data = big_file.read_bytes()
    mint = run("mint", relay.base, *MINT, "--max-rate", "2M", "--receivers", "2")
    answer = json.loads(mint.stdout)
    assert answer["max_rate"] == 2 * MIB and answer["receivers"] == 2
    outs = [tmp_path / f"out{i}.bin" for i in range(2)]
    getters = [popen("get", answer["download_url"], "-o", str(out)) for out in outs]
    wait_for(lambda: waiting(relay) == 2, "both receivers waiting")
    start = time.monotonic()
    put = run("put", answer["upload_url"], str(big_file))
    took = time.monotonic() - start
    assert put.returncode == EXIT_OK, put.stderr
    for getter, out in zip(getters, outs, strict=True):
        code, _, err = finish(getter)
        assert code == EXIT_OK, err
        assert sha(out.read_bytes()) == sha(data)
    floor = (len(data) - 2 * MIB) / (2 * MIB)  # all but one burst at the rate
    assert took >= floor * 0.95, took
    assert took < floor * 4 + 10, took  # not stalled (a loose bound: CI machines vary)


# --- the Python API --------------------------------------------------------------------


def test_api_mint_receivers_and_max_rate(relay: Relay) -> None:
    with Client(relay.base, secret=SECRET) as c:
        fan = c.mint("ws", "a", "b", receivers=3, max_rate=2 * MIB)
        plain = c.mint("ws", "a", "b")
    assert fan.receivers == 3 and fan.max_rate == 2 * MIB and not fan.resumable
    assert plain.receivers == 1 and plain.max_rate == 0
    r = minted(relay, fan.ticket)
    assert r.receivers == 3 and r.max_rate == 2 * MIB
    r = minted(relay, plain.ticket)
    assert r.receivers == 1 and r.max_rate == 0


def test_api_async_mint_receivers_and_max_rate(relay: Relay) -> None:
    async def main() -> tuple[MintResult, MintResult]:
        async with AsyncClient(relay.base, secret=SECRET) as c:
            fan = await c.mint("ws", "a", "b", receivers=2)
            paced = await c.mint("ws", "a", "b", max_rate=512 * 1024)
            return fan, paced

    fan, paced = asyncio.run(main())
    assert fan.receivers == 2 and fan.max_rate == 0  # echoed: no relay --max-rate
    assert paced.receivers == 1 and paced.max_rate == 512 * 1024
    assert minted(relay, fan.ticket).receivers == 2
    assert minted(relay, paced.ticket).max_rate == 512 * 1024


def test_api_mint_echoes_the_relay_rate_in_force(relay_factory: Callable[..., Relay]) -> None:
    relay = relay_factory(max_rate=MIB)
    with Client(relay.base, secret=SECRET) as c:
        lowered = c.mint("ws", "a", "b", max_rate=4 * MIB)
        default = c.mint("ws", "a", "b", receivers=2)  # a v2 mint: the echo says the rate
        plain = c.mint("ws", "a", "b")  # a v1 mint: no echo
    assert lowered.max_rate == MIB and default.max_rate == MIB
    assert plain.max_rate == 0 and plain.receivers == 1


def test_api_plain_mint_is_a_v1_request() -> None:
    """Options at their default are not sent: the request is a v1 mint."""
    _, payload = _mint_request(SECRET, "ws", "a", "b", None, 0)
    assert payload == {"workspace_id": "ws", "source_exe_id": "a", "dest_exe_id": "b"}
    _, payload = _mint_request(SECRET, "ws", "a", "b", None, 0, False, 1, 0)
    assert set(payload) == {"workspace_id", "source_exe_id", "dest_exe_id"}
    _, payload = _mint_request(SECRET, "ws", "a", "b", None, 0, False, 4, 100)
    assert payload["receivers"] == 4 and payload["max_rate"] == 100
    assert "resumable" not in payload


@pytest.mark.parametrize(
    "kw",
    [{"receivers": 0}, {"receivers": -1}, {"receivers": 1.5}, {"receivers": True},
     {"receivers": "3"}, {"max_rate": -1}, {"max_rate": 1.5}, {"max_rate": "2M"}],
)  # fmt: skip
def test_api_mint_bad_values_raise_before_any_request(kw: dict[str, Any]) -> None:
    # Nothing listens there: a request would fail as RelayUnreachable.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with (
        Client(f"http://127.0.0.1:{port}", secret=SECRET) as c,
        pytest.raises(ValueError, match=next(iter(kw))),
    ):
        c.mint("ws", "a", "b", **kw)


def test_api_put_and_gets_on_a_fanout_ticket(relay: Relay, tmp_path: pathlib.Path) -> None:
    data = os.urandom(3 * MIB + 17)
    with Client(relay.base, secret=SECRET, timeout=30) as c:
        ticket = c.mint("ws", "a", "b", receivers=3)
        outs = [tmp_path / f"out{i}.bin" for i in range(3)]
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            gets = [pool.submit(c.get, ticket.download_url, out) for out in outs]
            put = pool.submit(c.put, ticket.upload_url, data)
            result = put.result(60)
            got = [g.result(60) for g in gets]
    assert result.bytes == len(data)
    assert result.answer == {"bytes": len(data), "status": "ok", "receivers": 3, "delivered": 3}
    for g, out in zip(got, outs, strict=True):
        assert g.verified and g.digest == sha(data) == result.digest
        assert out.read_bytes() == data


def test_api_put_502_carries_the_relay_answer(relay: Relay, tmp_path: pathlib.Path) -> None:
    """Every receiver dropped: the transfer ends at once with 502, and
    `TransferFailed` holds the relay's JSON."""
    data = os.urandom(32 * MIB)
    with Client(relay.base, secret=SECRET, timeout=30) as c:
        ticket = c.mint("ws", "a", "b", receivers=2)
        path = ticket.download_url.partition("://")[2].partition("/")[2]
        leavers = []
        for _ in range(2):
            sock = socket.create_connection(("127.0.0.1", relay.server.port), timeout=30)
            sock.sendall(
                f"GET /{path} HTTP/1.1\r\nHost: x\r\n"
                f"Authorization: Bearer {ticket.ticket}\r\n\r\n".encode()
            )
            leavers.append(sock)
        wait_for(lambda: waiting(relay) == 2, "both receivers waiting")
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            put = pool.submit(c.put, ticket.upload_url, data)
            for sock in leavers:
                assert sock.recv(1024).startswith(b"HTTP/1.1 200 ")
                reset_on_close(sock)
            with pytest.raises(TransferFailed) as failed:
                put.result(60)
    assert failed.value.status == 502 and not failed.value.broke
    answer = failed.value.answer
    assert answer is not None
    assert answer["receivers"] == 2 and answer["delivered"] == 0
    assert answer["error"] == "2 of 2 receivers failed"
