"""`fastrelay serve` start-up and shutdown as a user sees them: JSON lines all
the way, case-insensitive --log-level, --public-url checked at start, and a
generated secret printed only once the port is ours."""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import urllib.request
from typing import Any

import pytest
from test_e2e_cli import one_error_line, serve, stop

from fastrelay.cli import build_parser

RECORD_KEYS = {"time", "level", "logger", "event", "message"}
JSON = ("--log-format", "json")


def json_lines(text: str) -> list[dict[str, Any]]:
    """Every line of ``text`` as a JSON object (fails on the first that is not)."""
    records = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            raise AssertionError(f"not a JSON line: {line!r}\n{text}") from None
        assert isinstance(record, dict) and record.keys() >= RECORD_KEYS, line
        records.append(record)
    return records


def test_json_log_format_covers_every_line_start_to_shutdown() -> None:
    # Every line of ours at once: a generated secret, the wildcard-host note,
    # --max-connections lowered to a small open-file limit, the ready line,
    # relay logs, the drain, and the exit.
    def small_fd_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (512, 512))

    env = {k: v for k, v in os.environ.items() if k != "FASTRELAY_SHARED_SECRET"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastrelay", "serve", "--host", "0.0.0.0", "--port", "0", *JSON],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        preexec_fn=small_fd_limit,
    )
    assert proc.stdout is not None and proc.stderr is not None
    try:
        [ready] = json_lines(proc.stdout.readline())
        assert ready["event"] == "listening"
        port = int(ready["url"].rsplit(":", 1)[1])
        start: list[dict[str, Any]] = []
        while not start or start[-1]["event"] != "secret_generated":
            start += json_lines(proc.stderr.readline())  # written before the ready line
        secret = start[-1]["secret"]
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/exec-gateway/relay/create",
            data=b'{"workspace_id":"w","source_exe_id":"s","dest_exe_id":"d"}',
            headers={"Authorization": f"Bearer {secret}"},
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 201
    finally:
        proc.send_signal(signal.SIGTERM)
        # Read to the end through the same buffered files the start was read
        # from (communicate() would bypass, and lose, what they buffered).
        out, err = proc.stdout.read(), proc.stderr.read()
        proc.stdout.close()
        proc.stderr.close()
        proc.wait(30)
    assert proc.returncode == 0, err
    assert json_lines(out) == []  # nothing after the ready line
    events = [r["event"] for r in start + json_lines(err)]
    for event in ("max_connections_lowered", "urls_from_host_header", "relay_created"):
        assert event in events, err
    drained = [r for r in json_lines(err) if r["message"].startswith("draining")]
    assert drained, err


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--public-url", "ftp://x"], "--public-url"),
        (["--port", "abc"], "--port"),  # refused by the parser itself
        (["--ttl", "nan"], "--ttl"),  # refused by the configuration
    ],
)
def test_json_log_format_errors_are_json_too(argv: list[str], flag: str) -> None:
    proc = serve("--port", "0", "--log-format", "json", *argv)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2, err
    [record] = json_lines(err)
    assert record["level"] == "ERROR" and record["event"] == "config_error"
    assert record["message"].startswith(f"error: {flag} must be"), record


@pytest.mark.parametrize("level", ["debug", "Debug", "DEBUG"])
def test_log_level_is_case_insensitive(level: str) -> None:
    # asyncio logs the selector it picked at DEBUG: proof the level took.
    proc = serve("--port", "0", "--loop", "asyncio", "--log-level", level)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("fastrelay: listening on http"), proc.stderr
    finally:
        rc, err = stop(proc)
    assert rc == 0, err
    assert "DEBUG asyncio: Using selector" in err


BAD_PUBLIC_URLS = [
    "ftp://x",
    "http://",
    "localhost:8080",
    "relay.example.com",
    "https://:8443",
    "http://relay.example.com:http",
    "https://relay.example.com/?a=1",
    "https://relay.example.com/#top",
    "",
]


@pytest.mark.parametrize("url", BAD_PUBLIC_URLS)
def test_public_url_must_be_http_with_a_host(url: str) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["serve", "--public-url", url])
    assert exc.value.code == 2


@pytest.mark.parametrize(
    "url",
    [
        "https://relay.example.com",
        "http://relay.example.com/",
        "HTTPS://Relay.Example.com:8443/base/",
        "http://10.0.0.11:8080",
        "http://[::1]:8080",
    ],
)
def test_public_url_accepts_http_urls(url: str) -> None:
    assert build_parser().parse_args(["serve", "--public-url", url]).public_url == url


@pytest.mark.parametrize("url", ["ftp://x", "http://", "localhost:8080"])
def test_bad_public_url_is_one_line_and_exit_2(url: str) -> None:
    proc = serve("--port", "0", "--public-url", url)
    try:
        line = one_error_line(proc)
    finally:
        proc.kill()  # the old code served on: do not leave it running
    assert line.startswith("fastrelay: error: --public-url must be an http:// or https:// URL")
    assert f"(got {url})" in line


def test_a_taken_port_is_one_line_and_prints_no_secret() -> None:
    # No FASTRELAY_SHARED_SECRET: one is generated, and must not be printed
    # by a server that never served (its secret is of no use to anyone).
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = serve("--port", str(port))
        line = one_error_line(proc)
    assert line.startswith(f"fastrelay: error: cannot listen on 127.0.0.1:{port}: "), line
    assert "secret" not in line
