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
import trustme


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


def one_error_line(proc: subprocess.Popen[str]) -> str:
    """The process's only stderr line, after checking it exited 2 with no traceback."""
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2, err
    assert "Traceback" not in err and "usage:" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1 and err.endswith("\n"), err
    assert lines[0].startswith("fastrelay: error: "), err
    return lines[0]


def write_cert_files(tmp_path: pathlib.Path, ca: trustme.CA, which: str) -> tuple[str, str]:
    """(certfile, keyfile) broken the way ``which`` says."""
    leaf = ca.issue_cert("localhost")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    if which == "missing-cert":
        cert.unlink()
    elif which == "missing-key":
        key.unlink()
    elif which == "garbage-cert":
        cert.write_text("not a certificate")
    elif which == "garbage-key":
        key.write_text("not a key either")
    elif which == "other-key":
        ca.issue_cert("elsewhere").private_key_pem.write_to_path(str(key))
    return str(cert), str(key)


CERT_CASES = {
    "missing-cert": ("--certfile cert.pem", "No such file or directory"),
    "missing-key": ("--keyfile key.pem", "No such file or directory"),
    "garbage-cert": ("--certfile cert.pem", "not a PEM certificate"),
    "garbage-key": ("--keyfile key.pem", "not a PEM private key"),
    "other-key": ("--keyfile key.pem", "the key does not match the certificate"),
}


@pytest.mark.parametrize("which", CERT_CASES)
def test_certificate_errors_name_the_file_and_the_problem(
    tmp_path: pathlib.Path, ca: trustme.CA, which: str
) -> None:
    certfile, keyfile = write_cert_files(tmp_path, ca, which)
    proc = serve(
        "--port",
        "0",
        "--certfile",
        certfile,
        "--keyfile",
        keyfile,
        env={"FASTRELAY_SHARED_SECRET": "x"},
    )
    line = one_error_line(proc)
    flag_and_file, problem = CERT_CASES[which]
    flag, name = flag_and_file.split()
    assert line == f"fastrelay: error: cannot load {flag} {tmp_path / name}: {problem}"
    assert "PEM lib" not in line


BAD_FLAGS = {
    "ttl-nan": (["--ttl", "nan"], "--ttl must be a positive number of seconds (got nan)"),
    "ttl-inf": (["--ttl", "inf"], "--ttl must be a positive number of seconds (got inf)"),
    "ttl-negative": (["--ttl", "-1"], "--ttl must be a positive number of seconds (got -1)"),
    "ttl-above-max": (["--ttl", "90000"], "--ttl must be at most --max-ttl (86400) (got 90000)"),
    "max-ttl-nan": (["--max-ttl", "nan"], "--max-ttl must be a positive number of seconds"),
    "idle-timeout-0": (
        ["--idle-timeout", "0"],
        "--idle-timeout must be a positive number of seconds (got 0)",
    ),
    "port-70000": (["--port", "70000"], "--port must be a whole number 0-65535 (got 70000)"),
    "port-abc": (["--port", "abc"], "--port must be a whole number (got abc)"),
    "max-connections-0": (
        ["--max-connections", "0"],
        "--max-connections must be a whole number >= 1 (got 0)",
    ),
    "drain-timeout-nan": (["--drain-timeout", "nan"], "--drain-timeout must be a number"),
}


@pytest.mark.parametrize("case", BAD_FLAGS)
def test_bad_flag_values_are_one_line_naming_the_flag(case: str) -> None:
    argv, expected = BAD_FLAGS[case]
    # The flag comes after --port 0 so that its own value is the one judged.
    proc = serve("--port", "0", *argv, env={"FASTRELAY_SHARED_SECRET": "x"})
    assert one_error_line(proc).startswith(f"fastrelay: error: {expected}")
