"""Transfers through a real server with real curl, on the full matrix:
uvloop and asyncio, plain and TLS."""

from __future__ import annotations

import hashlib
import json
import logging
import pathlib
import subprocess
import threading
import time
from collections.abc import Callable

import pytest
from conftest import Relay

import fastrelay

AUTH = "Authorization: Bearer {}"


def sha(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def start_get(relay: Relay, ticket: str, out: pathlib.Path, *extra: str) -> subprocess.Popen[bytes]:
    return relay.popen(
        "-f",
        "-H",
        AUTH.format(ticket),
        "-o",
        str(out),
        "-D",
        str(out) + ".head",
        *extra,
        relay.url(ticket),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def feed_stdin(proc: subprocess.Popen[bytes], data: bytes, close: bool = True) -> threading.Thread:
    """Write ``data`` to the process's stdin from a thread (curl blocks until paired)."""

    def run() -> None:
        assert proc.stdin is not None
        try:
            proc.stdin.write(data)
            if close:
                proc.stdin.close()
            else:
                proc.stdin.flush()
        except (BrokenPipeError, ValueError):
            pass

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def finish(proc: subprocess.Popen[bytes], timeout: float = 30) -> tuple[int, bytes, bytes]:
    """Wait for a curl process; (exit code, stdout, stderr). Closes its pipes."""
    if proc.stdin is not None and proc.stdin.closed:
        proc.stdin = None  # a feeder thread owned and closed it
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out or b"", err or b""


def wait_waiting(relay: Relay, r: fastrelay.Relay, side: str) -> None:
    """Poll until the given side has claimed the ticket."""
    deadline = time.monotonic() + 10
    attr = "put_claimed" if side == "PUT" else "get_claimed"
    while not relay.call(lambda: getattr(r.session, attr)):
        assert time.monotonic() < deadline, f"{side} never arrived"
        time.sleep(0.01)


def waiting_get(
    relay: Relay, r: fastrelay.Relay, *args: str, stdout: int = subprocess.PIPE
) -> subprocess.Popen[bytes]:
    """A curl GET on ``r``, returned once the relay holds its claim."""
    proc = relay.popen(
        *args,
        "-H",
        AUTH.format(r.ticket),
        relay.url(r.ticket),
        stdout=stdout,
        stderr=subprocess.PIPE,
    )
    wait_waiting(relay, r, "GET")
    return proc


def test_content_length_upload_get_first(
    any_relay: Relay, payload_file: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    relay = any_relay
    r = relay.create()
    out = tmp_path / "out.bin"
    get = start_get(relay, r.ticket, out)
    wait_waiting(relay, r, "GET")
    # curl waits up to --expect100-timeout for "100 Continue", then sends the
    # body anyway: at 30 s, a missing 100 cannot hide behind a fast machine.
    put = relay.curl(
        "-f",
        "-H",
        AUTH.format(r.ticket),
        "-T",
        str(payload_file),
        "--expect100-timeout",
        "30",
        "-w",
        "\n%{time_total}",
        relay.url(r.ticket),
    )
    assert put.returncode == 0, put.stderr
    body, _, total = put.stdout.rpartition(b"\n")
    size = payload_file.stat().st_size
    assert json.loads(body) == {"bytes": size, "status": "ok"}
    assert body == b'{"bytes":%d,"status":"ok"}' % size
    # 100 Continue was sent at once (the GET was waiting): no Expect stall.
    assert float(total) < 10, total
    rc, _, err = finish(get)
    assert rc == 0, err
    assert sha(out) == sha(payload_file)
    head = (tmp_path / "out.bin.head").read_text().lower()
    assert f"content-length: {size}" in head  # passed on from the PUT
    relay.wait_done(r)
    assert r.outcome is fastrelay.Outcome.OK and r.bytes == size
    assert relay.call(lambda: relay.registry.lookup(r.ticket)) is None


def test_chunked_upload_from_a_pipe_put_first(
    any_relay: Relay, payload_file: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    relay = any_relay
    r = relay.create()
    put = relay.popen(
        "-f",
        "-H",
        AUTH.format(r.ticket),
        "-T",
        "-",
        relay.url(r.ticket),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    feeder = feed_stdin(put, payload_file.read_bytes())
    wait_waiting(relay, r, "PUT")
    out = tmp_path / "out.bin"
    get = start_get(relay, r.ticket, out)
    rc, _, err = finish(get)
    assert rc == 0, err
    feeder.join(10)
    rc, put_out, err = finish(put)
    assert rc == 0, err
    assert json.loads(put_out) == {"bytes": payload_file.stat().st_size, "status": "ok"}
    assert sha(out) == sha(payload_file)
    head = (tmp_path / "out.bin.head").read_text().lower()
    assert "transfer-encoding: chunked" in head and "content-length" not in head


def kill_uploader_mid_stream(
    relay: Relay, payload_file: pathlib.Path, tmp_path: pathlib.Path, chunked: bool
) -> None:
    r = relay.create()
    out = tmp_path / "out.bin"
    get = start_get(relay, r.ticket, out)
    wait_waiting(relay, r, "GET")
    src = "-" if chunked else str(payload_file)
    put = relay.popen(
        "-H",
        AUTH.format(r.ticket),
        "-T",
        src,
        "--limit-rate",
        "1M",
        relay.url(r.ticket),
        stdin=subprocess.PIPE if chunked else subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    if chunked:
        feed_stdin(put, payload_file.read_bytes(), close=False)
    deadline = time.monotonic() + 20
    while relay.call(lambda: r.bytes) == 0 and not relay.call(r.done):
        # r.bytes is only final at the end; poll the received size instead
        if out.exists() and out.stat().st_size > 100_000:
            break
        assert time.monotonic() < deadline, "no bytes moved"
        time.sleep(0.02)
    put.kill()
    if put.stdin is not None:
        put.stdin.close()
    put.wait()
    rc, _, err = finish(get)
    assert rc in (18, 56), (rc, err)
    assert out.stat().st_size < payload_file.stat().st_size
    relay.wait_done(r)
    assert r.outcome is fastrelay.Outcome.UPLOAD_ABORTED


def test_killed_uploader_is_visible_to_the_receiver_content_length(
    any_relay: Relay, payload_file: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    kill_uploader_mid_stream(any_relay, payload_file, tmp_path, chunked=False)


def test_killed_uploader_is_visible_to_the_receiver_chunked(
    any_relay: Relay, payload_file: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    kill_uploader_mid_stream(any_relay, payload_file, tmp_path, chunked=True)


def test_max_bytes_content_length_refused_before_any_byte(
    any_relay: Relay, payload_file: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    relay = any_relay
    r = relay.create(max_bytes=1000)
    get = relay.popen(
        "-H",
        AUTH.format(r.ticket),
        "-w",
        "\n%{http_code}",
        relay.url(r.ticket),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    wait_waiting(relay, r, "GET")
    size = payload_file.stat().st_size
    put = relay.curl(
        "-H",
        AUTH.format(r.ticket),
        "-T",
        str(payload_file),
        "-w",
        "\n%{http_code}",
        relay.url(r.ticket),
    )
    body, _, code = put.stdout.rpartition(b"\n")
    assert code == b"413"
    assert body == b'{"bytes":0,"error":"relay: payload exceeded MaxBytes (%d > 1000)"}' % size
    out, _ = get.communicate(timeout=20)
    body, _, code = out.rpartition(b"\n")
    assert code == b"502"
    assert body == b'{"error":"upload failed: payload exceeded MaxBytes (%d > 1000)"}' % size
    relay.wait_done(r)
    assert r.outcome is fastrelay.Outcome.TOO_LARGE
    # the ticket is finished
    again = relay.curl("-H", AUTH.format(r.ticket), "-w", "%{http_code}", relay.url(r.ticket))
    assert again.stdout.endswith(b"410")


def test_max_bytes_chunked_is_cut_at_exactly_max_bytes(
    any_relay: Relay, payload_file: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    relay = any_relay
    limit = 200_000
    r = relay.create(max_bytes=limit)
    out = tmp_path / "out.bin"
    get = start_get(relay, r.ticket, out)
    wait_waiting(relay, r, "GET")
    put = relay.curl(
        "-H",
        AUTH.format(r.ticket),
        "-T",
        "-",
        "-w",
        "\n%{http_code}",
        relay.url(r.ticket),
        input=payload_file.read_bytes(),
    )
    body, _, code = put.stdout.rpartition(b"\n")
    assert code == b"413", put
    doc = json.loads(body)
    assert doc["bytes"] == limit and doc["error"].startswith("relay: payload exceeded MaxBytes (")
    assert finish(get)[0] != 0  # never a clean end
    assert out.stat().st_size <= limit
    assert out.read_bytes() == payload_file.read_bytes()[: out.stat().st_size]


def test_zero_byte_upload(any_relay: Relay, tmp_path: pathlib.Path) -> None:
    relay = any_relay
    r = relay.create()
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    out = tmp_path / "out.bin"
    get = start_get(relay, r.ticket, out)
    wait_waiting(relay, r, "GET")
    put = relay.curl("-f", "-H", AUTH.format(r.ticket), "-T", str(empty), relay.url(r.ticket))
    assert put.stdout == b'{"bytes":0,"status":"ok"}'
    assert finish(get)[0] == 0 and out.read_bytes() == b""


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_audit_digest_is_in_the_put_answer_and_the_log(
    relay_factory: Callable[..., Relay],
    payload_file: pathlib.Path,
    chunked: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    relay = relay_factory(audit_digest=True)
    r = relay.create()
    data = payload_file.read_bytes()
    get = waiting_get(relay, r)
    with caplog.at_level(logging.INFO, logger="fastrelay"):
        put = relay.curl(
            "-H",
            AUTH.format(r.ticket),
            "-T",
            "-" if chunked else str(payload_file),
            relay.url(r.ticket),
            input=data if chunked else None,
        )
        rc, got, _ = finish(get)
        relay.wait_done(r)
    want = hashlib.sha256(data).hexdigest()
    assert rc == 0 and got == data
    assert json.loads(put.stdout) == {"bytes": len(data), "status": "ok", "sha256": want}
    ended = [rec.getMessage() for rec in caplog.records if "relay ended" in rec.getMessage()]
    assert ended and f"sha256={want}" in ended[-1]
