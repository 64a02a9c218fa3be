"""``fastrelay mint|put|get`` as a user types them: the real ``python -m
fastrelay`` command line against the real server (conftest's ``relay``).

Options anywhere on the line, local checks before the single-use ticket is
touched, Ctrl-C, one-line errors, the PUT's answer on stdout, and the mint
flags' validation.
"""

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
from typing import Any

import pytest
from conftest import SECRET, Relay

import fastrelay
from fastrelay.client.commands import (
    EXIT_INTERRUPTED,
    EXIT_LOCAL,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_TRANSFER_FAILED,
    EXIT_USAGE,
)

ENV = {**os.environ, "FASTRELAY_SHARED_SECRET": SECRET}


def fastrelay_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "fastrelay", *args]


def run(*args: str, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        fastrelay_cmd(*args), input=input, capture_output=True, timeout=60, env=ENV
    )


def popen(*args: str, **kw: Any) -> subprocess.Popen[bytes]:
    # SIGINT back to its default in the child, so Python installs its
    # KeyboardInterrupt handler even when this test runs as a background job
    # (which a non-interactive shell starts with SIGINT ignored).
    return subprocess.Popen(
        fastrelay_cmd(*args),
        env=ENV,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        **kw,
    )


def wait_for(cond: Callable[[], Any], timeout: float = 20, what: str = "condition") -> None:
    """Poll ``cond`` until true: order events by observed state, never by sleeping."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def one_line_error(stderr: bytes) -> str:
    """The single ``fastrelay: error: ...`` line of ``stderr``; no Python repr in it."""
    text = stderr.decode()
    lines = text.splitlines()
    assert len(lines) == 1, text
    line = lines[0]
    assert line.startswith("fastrelay: error: "), line
    for repr_marker in ("Traceback", "Errno", "Error(", "{'", "b'", "_ssl.c"):
        assert repr_marker not in line, line
    return line


def transfer_works(relay: Relay, ticket: str, tmp_path: pathlib.Path) -> None:
    """A normal PUT/GET pair with ``ticket`` completes: it was never spent."""
    data = os.urandom(100_000)
    src, out = tmp_path / "src.bin", tmp_path / "ok.bin"
    src.write_bytes(data)
    tls = ["--cacert", relay.ca_file] if relay.ca_file else []
    getter = popen("get", relay.url(ticket), "-o", str(out), *tls)
    put = run("put", relay.url(ticket), str(src), *tls)
    assert put.returncode == EXIT_OK, put.stderr
    assert getter.wait(30) == EXIT_OK
    assert out.read_bytes() == data


def claimed(relay: Relay, r: fastrelay.Relay, side: str) -> bool:
    return bool(relay.call(lambda: getattr(r, f"{side}_party") is not None))


# --- options anywhere -------------------------------------------------------------


def test_options_between_positionals(
    relay_factory: Callable[..., Relay], tmp_path: pathlib.Path
) -> None:
    relay = relay_factory(tls=True)
    assert relay.ca_file is not None
    data = os.urandom(200_000)
    src, out = tmp_path / "src.bin", tmp_path / "out.bin"
    src.write_bytes(data)
    r = relay.create()
    getter = popen("get", "--cacert", relay.ca_file, relay.url(r.ticket), "-o", str(out))
    put = run("put", relay.url(r.ticket), "--cacert", relay.ca_file, str(src))
    assert put.returncode == EXIT_OK, put.stderr
    assert getter.wait(30) == EXIT_OK
    assert out.read_bytes() == data

    minted = run(
        "mint", "--ttl", "30", relay.base, "--workspace", "w", "--cacert", relay.ca_file,
        "--source", "a", "--dest", "b",
    )  # fmt: skip
    assert minted.returncode == EXIT_OK, minted.stderr
    assert json.loads(minted.stdout)["upload_url"].startswith(relay.base)


# --- local checks before the ticket is used ---------------------------------------


def test_get_unwritable_output_fails_before_the_ticket(
    relay: Relay, tmp_path: pathlib.Path
) -> None:
    r = relay.create()
    out = tmp_path / "no" / "such" / "dir" / "f"
    done = run("get", relay.url(r.ticket), "-o", str(out))
    assert done.returncode == EXIT_LOCAL, done.stderr
    line = one_line_error(done.stderr)
    assert f"{out}.partial" in line and "No such file or directory" in line
    assert not claimed(relay, r, "get")
    transfer_works(relay, r.ticket, tmp_path)


def test_put_missing_file_fails_before_the_ticket(relay: Relay, tmp_path: pathlib.Path) -> None:
    r = relay.create()
    missing = tmp_path / "missing.bin"
    done = run("put", relay.url(r.ticket), str(missing))
    assert done.returncode == EXIT_LOCAL, done.stderr
    line = one_line_error(done.stderr)
    assert f"cannot open {missing}: No such file or directory" in line
    assert not claimed(relay, r, "put")
    transfer_works(relay, r.ticket, tmp_path)


# --- Ctrl-C -----------------------------------------------------------------------


@pytest.mark.parametrize("side", ["get", "put"])
def test_sigint_while_waiting_exits_130(side: str, relay: Relay, tmp_path: pathlib.Path) -> None:
    r = relay.create()
    src = tmp_path / "src.bin"
    src.write_bytes(b"x" * 1000)
    args = ("-o", str(tmp_path / "out.bin")) if side == "get" else (str(src),)
    proc = popen(side, relay.url(r.ticket), *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: claimed(relay, r, side), what=f"the {side} waiting")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == EXIT_INTERRUPTED, err
    assert "interrupted" in one_line_error(err) and out == b""
    assert not (tmp_path / "out.bin.partial").exists()
    # Its connection closed, so the relay released the side: the ticket works.
    wait_for(lambda: not claimed(relay, r, side), what=f"the {side} side released")
    transfer_works(relay, r.ticket, tmp_path)


# --- one-line errors ----------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_error_connection_refused() -> None:
    port = free_port()
    got = run("get", f"http://127.0.0.1:{port}/relay/rly_x")
    assert got.returncode == EXIT_TRANSFER_FAILED
    line = one_line_error(got.stderr)
    assert f"127.0.0.1:{port}" in line and "connection refused" in line
    assert "check the URL and that the relay is running" in line
    minted = run(
        "mint", f"http://127.0.0.1:{port}", "--workspace", "w", "--source", "a", "--dest", "b"
    )
    assert minted.returncode == EXIT_TRANSFER_FAILED
    line = one_line_error(minted.stderr)
    assert f"127.0.0.1:{port}" in line and "connection refused" in line


def test_error_bad_url() -> None:
    for url in ("ftp://example/relay/x", "http://127.0.0.1:99999/relay/x", "relay/x"):
        got = run("put", url, "-", input=b"")
        assert got.returncode == EXIT_USAGE, got.stderr
        line = one_line_error(got.stderr)
        assert url in line and "http(s)://HOST[:PORT]/relay/TICKET" in line


def test_error_ticket_gone(relay: Relay, tmp_path: pathlib.Path) -> None:
    ticket = "rly_" + "A" * 43
    got = run("get", relay.url(ticket), "-o", str(tmp_path / "out.bin"))
    assert got.returncode == EXIT_REFUSED
    line = one_line_error(got.stderr)
    assert "410 ticket not found or expired" in line and "mint a new one" in line
    # The URL is named, its ticket (a credential) shortened.
    assert f"{relay.base}/relay/rly_AAAA…" in line and ticket not in line
    assert not list(tmp_path.iterdir())  # not even the .partial is left


def test_error_wrong_mint_secret(relay: Relay) -> None:
    got = subprocess.run(
        fastrelay_cmd("mint", relay.base, "--workspace", "w", "--source", "a", "--dest", "b"),
        env={**ENV, "FASTRELAY_SHARED_SECRET": "wrong"},
        capture_output=True,
        timeout=60,
    )
    assert got.returncode == EXIT_REFUSED
    line = one_line_error(got.stderr)
    assert "401" in line and "FASTRELAY_SHARED_SECRET" in line and relay.base in line


def test_error_tls_not_trusted(relay_factory: Callable[..., Relay]) -> None:
    relay = relay_factory(tls=True)
    r = relay.create()
    got = run("put", relay.url(r.ticket), "-", input=b"abc")  # no --cacert
    assert got.returncode == EXIT_TRANSFER_FAILED
    line = one_line_error(got.stderr)
    assert "TLS certificate is not trusted" in line and "--cacert" in line
    assert f"127.0.0.1:{relay.server.port}" in line


# --- put prints the relay's answer ------------------------------------------------


@pytest.mark.parametrize("audit", [False, True], ids=["plain", "audit-digest"])
def test_put_prints_the_relay_answer(
    audit: bool, relay_factory: Callable[..., Relay], tmp_path: pathlib.Path
) -> None:
    relay = relay_factory(audit_digest=audit)
    data = os.urandom(300_000)
    r = relay.create()
    getter = popen("get", relay.url(r.ticket), "-o", str(tmp_path / "out.bin"))
    put = run("put", relay.url(r.ticket), "-", input=data)
    assert put.returncode == EXIT_OK, put.stderr
    assert getter.wait(30) == EXIT_OK
    (line,) = put.stdout.decode().splitlines()
    answer = json.loads(line)
    assert answer["bytes"] == len(data) and answer["status"] == "ok"
    if audit:
        import hashlib

        assert answer["sha256"] == hashlib.sha256(data).hexdigest()
    else:
        assert line == f'{{"bytes":{len(data)},"status":"ok"}}'


# --- mint flags -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--ttl", "-5"), ("--ttl", "0.5"), ("--ttl", "0"), ("--max-bytes", "1.5"),
     ("--max-bytes", "-1"), ("--max-bytes", "ten")],
)  # fmt: skip
def test_mint_rejects_bad_numbers(flag: str, value: str, relay: Relay) -> None:
    before = relay.call(lambda: relay.registry.active_count)
    got = run(
        "mint", relay.base, "--workspace", "w", "--source", "a", "--dest", "b", f"{flag}={value}"
    )
    assert got.returncode == EXIT_USAGE
    line = one_line_error(got.stderr)
    assert line == f"fastrelay: error: {flag} must be a whole number, at least 1 (got {value})"
    assert relay.call(lambda: relay.registry.active_count) == before  # nothing minted
