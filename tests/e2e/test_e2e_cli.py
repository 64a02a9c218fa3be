"""`fastrelay serve` as a user runs it: ready line, secret, errors, signals."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
import urllib.error
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


def test_wildcard_host_mints_urls_from_the_host_header() -> None:
    proc = serve("--port", "0", "--host", "0.0.0.0", env={"FASTRELAY_SHARED_SECRET": "wild"})
    try:
        url = ready_url(proc)
        port = int(url.rsplit(":", 1)[1])
        body = b'{"workspace_id":"w","source_exe_id":"s","dest_exe_id":"d"}'
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(
                b"POST /api/exec-gateway/relay/create HTTP/1.1\r\nHost: relay.example:8443\r\n"
                b"Authorization: Bearer wild\r\nConnection: close\r\n"
                b"Content-Length: %d\r\n\r\n" % len(body) + body
            )
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        doc = json.loads(data.split(b"\r\n\r\n", 1)[1])
        assert doc["upload_url"] == "http://relay.example:8443/relay/" + doc["ticket"]
    finally:
        rc, err = stop(proc)
    assert rc == 0
    assert "Host header" in err  # said once at start


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


# --- open-file limit, version, client subcommands, JSON logs ---------------------


def test_max_connections_lowered_to_the_open_file_limit() -> None:
    import resource

    full_env = {**os.environ, "FASTRELAY_SHARED_SECRET": "x"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastrelay", "serve", "--host", "127.0.0.1", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=full_env,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256)),
    )
    try:
        ready_url(proc)
    finally:
        rc, err = stop(proc)
    assert rc == 0, err
    expected = "fastrelay: --max-connections lowered from 10000 to 192 (open-file limit 256)"
    assert err.splitlines().count(expected) == 1, err


def test_max_connections_within_the_limit_is_left_alone() -> None:
    proc = serve("--port", "0", "--max-connections", "100", env={"FASTRELAY_SHARED_SECRET": "x"})
    try:
        ready_url(proc)
    finally:
        rc, err = stop(proc)
    assert rc == 0 and "lowered" not in err, err


@pytest.mark.parametrize("entry", ["script", "module"])
def test_version(entry: str) -> None:
    from importlib.metadata import version

    cmd = [sys.executable, "-m", "fastrelay"]
    if entry == "script":
        cmd = [str(pathlib.Path(sys.executable).with_name("fastrelay"))]
    out = subprocess.run([*cmd, "--version"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"fastrelay {version('fastrelay')}\n"


def test_help_describes_and_lists_every_command() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "fastrelay", "--help"], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0
    assert "byte relay" in out.stdout
    for command in ("serve", "mint", "put", "get"):
        assert command in out.stdout


def test_every_serve_flag_shows_its_default() -> None:
    import re

    out = subprocess.run(
        [sys.executable, "-m", "fastrelay", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "COLUMNS": "1000"},  # one line per flag
    )
    assert out.returncode == 0
    options = out.stdout.split("options:\n", 1)[1]
    # One entry per flag: "  --flag VALUE  help" plus indented continuation lines.
    entries = [" ".join(e.split()) for e in re.split(r"\n(?=  -)", options)]
    flags = [e for e in entries if not e.startswith("-h, --help")]
    assert len(flags) >= 18
    for entry in flags:
        assert re.search(r"\((default: )?[^()]+\)$", entry), entry


def test_client_commands_run_through_the_main_cli(tmp_path: pathlib.Path) -> None:
    proc = serve("--port", "0", env={"FASTRELAY_SHARED_SECRET": "s3cret"})
    try:
        url = ready_url(proc)
        env = {**os.environ, "FASTRELAY_SHARED_SECRET": "s3cret"}
        fastrelay = [sys.executable, "-m", "fastrelay"]
        mint = subprocess.run(
            [*fastrelay, "mint", url, "--workspace", "w", "--source", "s", "--dest", "d"],
            capture_output=True,
            text=True,
            timeout=30,
            env=env,
        )
        assert mint.returncode == 0, mint.stderr
        upload_url = json.loads(mint.stdout)["upload_url"]
        data = os.urandom(200_000)
        (tmp_path / "in.bin").write_bytes(data)
        get = subprocess.Popen(
            [*fastrelay, "get", upload_url, "-o", str(tmp_path / "out.bin")],
            stderr=subprocess.PIPE,
        )
        put = subprocess.run(
            [*fastrelay, "put", upload_url, str(tmp_path / "in.bin")],
            capture_output=True,
            timeout=60,
        )
        _, get_err = get.communicate(timeout=60)
        assert put.returncode == 0, put.stderr
        assert get.returncode == 0, get_err
        assert (tmp_path / "out.bin").read_bytes() == data
        # A refusal exits 3 (client.commands' EXIT_REFUSED): the ticket is used up.
        again = subprocess.run(
            [*fastrelay, "get", upload_url, "-o", str(tmp_path / "again.bin")],
            capture_output=True,
            timeout=60,
        )
        assert again.returncode == 3, again.stderr
    finally:
        stop(proc)


FASTRELAY = [sys.executable, "-m", "fastrelay"]


def test_client_usage_errors_exit_2() -> None:
    env = {k: v for k, v in os.environ.items() if k != "FASTRELAY_SHARED_SECRET"}
    out = subprocess.run(
        [
            *FASTRELAY,
            "mint",
            "http://127.0.0.1:9",
            "--workspace",
            "w",
            "--source",
            "s",
            "--dest",
            "d",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )
    assert out.returncode == 2 and "no mint secret" in out.stderr


def test_json_log_format() -> None:
    proc = serve("--port", "0", "--log-format", "json", env={"FASTRELAY_SHARED_SECRET": "s"})
    try:
        assert proc.stdout is not None
        url = json.loads(proc.stdout.readline())["url"]  # the ready line is JSON too
        req = urllib.request.Request(
            url + "/api/exec-gateway/relay/create",
            data='{"workspace_id":"w\u00e9","source_exe_id":"s","dest_exe_id":"d"}'.encode(),
            headers={"Authorization": "Bearer s"},
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            ticket = json.loads(resp.read())["ticket"]
    finally:
        rc, err = stop(proc)
    assert rc == 0, err
    assert ticket not in err
    records = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert records, err
    for rec in records:
        assert {"time", "level", "logger", "event", "message"} <= rec.keys()
    [created] = [r for r in records if r["event"] == "relay_created"]
    assert created["workspace"] == "w\u00e9" and len(created["id"]) == 12
    assert err.isascii()  # non-ASCII ids come out as JSON escapes


# --- ticket keys (--ticket-key-file) -------------------------------------------------

KEY_A = "key-a-" + "a" * 40
KEY_B = "key-b-" + "b" * 40

KEY_FILE_CASES = {
    "missing": (None, "cannot read {path}: No such file or directory"),
    "empty": ("# only a comment\n\n", "{path} holds no key"),
    "short": ("too-short\n", "{path} key 1 is 9 bytes; keys must be at least 32"),
}


@pytest.mark.parametrize("case", KEY_FILE_CASES)
def test_bad_ticket_key_file_is_one_line_and_exit_2(tmp_path: pathlib.Path, case: str) -> None:
    content, expected = KEY_FILE_CASES[case]
    path = tmp_path / "keys"
    if content is not None:
        path.write_text(content)
    proc = serve(
        "--port", "0", "--ticket-key-file", str(path), env={"FASTRELAY_SHARED_SECRET": "x"}
    )
    line = one_error_line(proc)
    assert line.startswith(f"fastrelay: error: --ticket-key-file {expected.format(path=path)}")
    assert KEY_A not in line


def _mint(url: str) -> str:
    req = urllib.request.Request(
        url + "/api/exec-gateway/relay/create",
        data=b'{"workspace_id":"w","source_exe_id":"s","dest_exe_id":"d"}',
        headers={"Authorization": "Bearer x"},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return str(json.loads(resp.read())["ticket"])


def _waiting_sides(url: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith("fastrelay_waiting_sides "):
                return float(line.split()[1])
    raise AssertionError("no fastrelay_waiting_sides in /metrics")


def _accepted(url: str, ticket: str) -> bool:
    """Whether a GET of ``ticket`` is taken (it waits for its PUT) rather than refused."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            f"GET /relay/{ticket} HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {ticket}\r\n\r\n".encode()
        )
        sock.setblocking(False)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if _waiting_sides(url) == 1:
                accepted = True
                break
            try:
                if sock.recv(100):
                    accepted = False  # answered at once: refused
                    break
            except BlockingIOError:
                pass
            time.sleep(0.01)  # a poll interval, not an ordering
        else:
            raise AssertionError("the GET was neither refused nor waiting")
    while _waiting_sides(url) != 0:  # it leaves once we hang up
        time.sleep(0.01)
    return accepted


def _wait_log(proc: subprocess.Popen[str], needle: str) -> str:
    assert proc.stderr is not None
    seen = []
    for line in proc.stderr:  # blocks until the line comes (or the process dies)
        seen.append(line)
        if needle in line:
            return line
    raise AssertionError(f"{needle!r} never logged: {seen}")


def test_sighup_rotates_ticket_keys_without_downtime(tmp_path: pathlib.Path) -> None:
    from fastrelay.cluster.signed_tickets import TicketClaims, TicketKeys

    keys = tmp_path / "keys"
    keys.write_text(KEY_A + "\n")
    keys.chmod(0o600)
    proc = serve(
        "--port", "0", "--ticket-key-file", str(keys), env={"FASTRELAY_SHARED_SECRET": "x"}
    )
    try:
        url = ready_url(proc)
        old = _mint(url)
        assert TicketKeys.parse(KEY_A).verify(old) is not None
        # 1. the new key verifies too; 2. it signs; the old one still verifies.
        keys.write_text(f"{KEY_B}\n{KEY_A}\n")
        proc.send_signal(signal.SIGHUP)
        assert "(2 key(s))" in _wait_log(proc, "ticket keys reloaded")
        new = _mint(url)
        assert TicketKeys.parse(KEY_B).verify(new) is not None
        assert TicketKeys.parse(KEY_A).verify(new) is None
        assert _accepted(url, old)  # still served: the GET waits for its PUT
        # A broken file is refused; the keys in force stay.
        keys.write_text("short\n")
        proc.send_signal(signal.SIGHUP)
        assert "keeping the old keys" in _wait_log(proc, "ticket key reload failed")
        assert TicketKeys.parse(KEY_B).verify(_mint(url)) is not None
        # 3. the old key is dropped: its tickets are refused.
        keys.write_text(KEY_B + "\n")
        proc.send_signal(signal.SIGHUP)
        assert "(1 key(s))" in _wait_log(proc, "ticket keys reloaded")
        assert _accepted(url, _mint(url))
        signed_by_old_key = TicketKeys.parse(KEY_A).sign(
            TicketClaims.new("w", "s", "d", max_bytes=0, expires_ms=2**62)
        )
        assert not _accepted(url, signed_by_old_key)
    finally:
        rc, err = stop(proc)
    assert rc == 0
    assert KEY_A not in err and KEY_B not in err
