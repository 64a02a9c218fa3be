"""`fastrelay serve` as a user runs it: ready line, secret, errors, signals."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import urllib.request

import pytest


def serve(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    full_env = {k: v for k, v in os.environ.items() if k != "FASTRELAY_SHARED_SECRET"}
    full_env.update(env or {})
    return subprocess.Popen(
        [sys.executable, "-m", "fastrelay", "serve", "--host", "127.0.0.1", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=full_env,
    )


def ready_url(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("fastrelay: listening on http"), line
    return line.split()[-1]


def stop(proc: subprocess.Popen[str]) -> tuple[int, str]:
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    return proc.returncode, err


def test_serve_generates_a_secret_and_mints_with_it() -> None:
    proc = serve("--port", "0")
    try:
        url = ready_url(proc)
        assert proc.stderr is not None
        line = proc.stderr.readline()
        assert "generated mint secret" in line
        secret = line.split()[-1]
        req = urllib.request.Request(
            url + "/api/exec-gateway/relay/create",
            data=json.dumps(
                {"workspace_id": "w", "source_exe_id": "s", "dest_exe_id": "d"}
            ).encode(),
            headers={"Authorization": f"Bearer {secret}"},
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 201
            ticket = json.loads(resp.read())["ticket"]
    finally:
        rc, err = stop(proc)
    assert rc == 0
    assert ticket not in err and secret not in err  # never logged


def test_secret_file_and_public_url(tmp_path: pathlib.Path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text("from-file\n")
    secret_file.chmod(0o644)
    proc = serve(
        "--port",
        "0",
        "--shared-secret-file",
        str(secret_file),
        "--public-url",
        "https://relay.example/",
    )
    try:
        url = ready_url(proc)
        req = urllib.request.Request(
            url + "/api/exec-gateway/relay/create",
            data=b'{"workspace_id":"w","source_exe_id":"s","dest_exe_id":"d"}',
            headers={"Authorization": "Bearer from-file"},
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            doc = json.loads(resp.read())
        assert doc["upload_url"] == "https://relay.example/relay/" + doc["ticket"]
    finally:
        rc, err = stop(proc)
    assert rc == 0
    assert "readable by other users" in err


def test_port_in_use_is_one_line_and_exit_2() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = serve("--port", str(port), env={"FASTRELAY_SHARED_SECRET": "x"})
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 2
    assert err.strip().count("\n") == 0 and "cannot listen" in err and "Traceback" not in err


@pytest.mark.parametrize("which", ["missing", "garbage"])
def test_unreadable_certificate_is_one_line_and_exit_2(tmp_path: pathlib.Path, which: str) -> None:
    cert = tmp_path / "cert.pem"
    if which == "garbage":
        cert.write_text("not a certificate")
    proc = serve(
        "--port",
        "0",
        "--certfile",
        str(cert),
        "--keyfile",
        str(cert),
        env={"FASTRELAY_SHARED_SECRET": "x"},
    )
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 2
    assert err.strip().count("\n") == 0 and "certificate" in err and "Traceback" not in err


def test_bad_flag_values_exit_2() -> None:
    proc = serve("--port", "0", "--ttl", "-1", env={"FASTRELAY_SHARED_SECRET": "x"})
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2 and "ticket_ttl_s" in err and "Traceback" not in err
