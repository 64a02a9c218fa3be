"""fastrelay.client and its CLI against the real server (conftest's ``relay``).

Tests whose names start with ``test_digest_passthrough_`` need the relay to
pass ``Repr-Digest`` headers and trailers from the PUT to the GET. Digest
verification itself is covered against a scripted h11 peer (``_FakeRelay``)
so it does not depend on that.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fcntl
import hashlib
import io
import json
import os
import pathlib
import pty
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import h11
import pytest
from conftest import SECRET, Relay

from fastrelay.client import (
    AsyncClient,
    Client,
    RelayRefused,
    TransferFailed,
    format_repr_digest,
)
from fastrelay.client.commands import (
    EXIT_DIGEST_MISMATCH,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_TRANSFER_FAILED,
    EXIT_USAGE,
)
from fastrelay.core import errors

# The CLI as the main fastrelay CLI will host it: our subcommands on a parser
# we build, dispatched by run_client_command.
CLI = """
import argparse, sys
from fastrelay.client.commands import add_client_commands, run_client_command
parser = argparse.ArgumentParser(prog="fastrelay")
add_client_commands(parser.add_subparsers(dest="command", required=True))
sys.exit(run_client_command(parser.parse_args()))
"""


def cli_cmd(*args: str) -> list[str]:
    return [sys.executable, "-c", CLI, *args]


def tls_args(relay: Relay) -> list[str]:
    return ["--cacert", relay.ca_file] if relay.ca_file else []


def run_cli(
    *args: str, input: bytes | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(cli_cmd(*args), input=input, capture_output=True, timeout=60, env=env)


def client(relay: Relay) -> Client:
    return Client(relay.base, secret=SECRET, verify=relay.ca_file or True, timeout=20)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def wait_for(cond: Callable[[], Any], timeout: float = 20, what: str = "condition") -> None:
    """Poll ``cond`` until true: order events by observed state, never by sleeping."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def chunks_of(data: bytes, size: int = 100_000) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


# --- round trips ----------------------------------------------------------------


def test_roundtrips_concurrent(
    any_relay: Relay, payload_file: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    data = payload_file.read_bytes()
    small = os.urandom(70_000)
    with client(any_relay) as c, concurrent.futures.ThreadPoolExecutor(8) as pool:
        tickets = [c.mint("ws", "src", "dst") for _ in range(4)]
        out_path, out_obj = tmp_path / "a.bin", io.BytesIO()
        jobs = [
            # (upload, download): path->path, stream->file object, bytes, BytesIO
            (pool.submit(c.put, tickets[0].upload_url, str(payload_file)),
             pool.submit(c.get, tickets[0].download_url, out_path)),
            (pool.submit(c.put, tickets[1].upload_url, chunks_of(data)),
             pool.submit(c.get, tickets[1].download_url, out_obj)),
            (pool.submit(c.put, tickets[2].upload_url, small),
             pool.submit(c.get, tickets[2].download_url, tmp_path / "c.bin")),
            (pool.submit(c.put, tickets[3].upload_url, io.BytesIO(small)),
             pool.submit(c.get, tickets[3].download_url, tmp_path / "d.bin")),
        ]  # fmt: skip
        results = [(p.result(timeout=60), g.result(timeout=60)) for p, g in jobs]
    expected = [data, data, small, small]
    for (put, got), want in zip(results, expected, strict=True):
        assert put.bytes == got.bytes == len(want)
        assert put.digest == got.digest == sha(want)
    assert out_path.read_bytes() == data and out_obj.getvalue() == data
    assert (tmp_path / "c.bin").read_bytes() == small
    assert not list(tmp_path.glob("*.partial"))


def test_cli_roundtrip_file_and_stdin(
    any_relay: Relay, payload_file: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    data = payload_file.read_bytes()
    file_relay, pipe_relay = any_relay.create(), any_relay.create()
    out = tmp_path / "out.bin"
    tls = tls_args(any_relay)
    procs = [
        subprocess.Popen(cli_cmd("get", any_relay.url(file_relay.ticket), "-o", str(out), *tls)),
        subprocess.Popen(cli_cmd("put", any_relay.url(file_relay.ticket), str(payload_file), *tls)),
        subprocess.Popen(cli_cmd("put", any_relay.url(pipe_relay.ticket), "-", *tls), stdin=subprocess.PIPE),
    ]  # fmt: skip
    with subprocess.Popen(
        cli_cmd("get", any_relay.url(pipe_relay.ticket), *tls), stdout=subprocess.PIPE
    ) as to_stdout:
        assert procs[2].stdin is not None
        procs[2].stdin.write(data)
        procs[2].stdin.close()
        received = to_stdout.stdout.read() if to_stdout.stdout else b""
    assert [p.wait(60) for p in procs] == [EXIT_OK] * 3
    assert to_stdout.returncode == EXIT_OK
    assert sha(out.read_bytes()) == sha(received) == sha(data)
    assert not out.with_name("out.bin.partial").exists()


def test_async_client_roundtrip(any_relay: Relay, tmp_path: pathlib.Path) -> None:
    data = os.urandom(2 * 1024 * 1024 + 7)

    async def main() -> None:
        async with AsyncClient(
            any_relay.base, secret=SECRET, verify=any_relay.ca_file or True, timeout=20
        ) as c:
            first, second = await asyncio.gather(c.mint("ws", "s", "d"), c.mint("ws", "s", "d"))
            put1, get1, put2, get2 = await asyncio.gather(
                c.put(first.upload_url, data),
                c.get(first.download_url, tmp_path / "a.bin"),
                c.put(second.upload_url, chunks_of(data)),
                c.get(second.download_url, tmp_path / "b.bin"),
            )
            assert put1.digest == get1.digest == put2.digest == get2.digest == sha(data)
            with pytest.raises(errors.TicketNotFound):
                await c.get(first.download_url, tmp_path / "gone.bin")

    asyncio.run(main())
    assert (tmp_path / "a.bin").read_bytes() == (tmp_path / "b.bin").read_bytes() == data
    assert not (tmp_path / "gone.bin").exists()


# --- mint ---------------------------------------------------------------------


def test_cli_mint(relay: Relay, tmp_path: pathlib.Path) -> None:
    env = {**os.environ, "FASTRELAY_SHARED_SECRET": SECRET}
    args = ("mint", relay.base, "--workspace", "w", "--source", "a", "--dest", "b")
    done = run_cli(*args, "--ttl", "30", "--max-bytes", "100", env=env)
    assert done.returncode == EXIT_OK, done.stderr
    (line,) = done.stdout.decode().splitlines()
    answer = json.loads(line)
    assert answer["upload_url"] == answer["download_url"] == relay.url(answer["ticket"])
    minted = relay.call(lambda: relay.registry.lookup(answer["ticket"]))
    assert minted.max_bytes == 100 and minted.workspace_id == "w"

    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET + "\n")
    no_env = {k: v for k, v in os.environ.items() if k != "FASTRELAY_SHARED_SECRET"}
    assert run_cli(*args, "--shared-secret-file", str(secret_file), env=no_env).returncode == 0
    assert run_cli(*args, env=no_env).returncode == EXIT_USAGE  # no secret at all
    wrong = run_cli(*args, env={**no_env, "FASTRELAY_SHARED_SECRET": "nope"})
    assert wrong.returncode == EXIT_REFUSED and b"401" in wrong.stderr


# --- exit codes ---------------------------------------------------------------


def test_exit_usage(relay: Relay) -> None:
    assert run_cli("get").returncode == EXIT_USAGE  # argparse: missing URL
    assert run_cli("put", relay.url("x"), "--bogus").returncode == EXIT_USAGE
    assert run_cli("get", "ftp://example/relay/x").returncode == EXIT_USAGE
    assert run_cli("mint", relay.base).returncode == EXIT_USAGE  # --workspace required


def test_exit_refused_unknown_ticket(any_relay: Relay, tmp_path: pathlib.Path) -> None:
    out = tmp_path / "out.bin"
    url = any_relay.url("rly_doesnotexist")
    tls = tls_args(any_relay)
    got = run_cli("get", url, "-o", str(out), *tls)
    assert got.returncode == EXIT_REFUSED and b"410" in got.stderr
    assert not out.exists() and not out.with_name("out.bin.partial").exists()
    assert run_cli("put", url, "-", *tls, input=b"abc").returncode == EXIT_REFUSED


def test_exit_transfer_failed_uploader_killed(relay: Relay, tmp_path: pathlib.Path) -> None:
    r = relay.create()
    out = tmp_path / "out.bin"
    getter = subprocess.Popen(
        cli_cmd("get", relay.url(r.ticket), "-o", str(out)), stderr=subprocess.PIPE
    )
    wait_for(lambda: relay.call(lambda: r.get_party is not None), what="GET waiting")
    putter = subprocess.Popen(cli_cmd("put", relay.url(r.ticket), "-"), stdin=subprocess.PIPE)
    assert putter.stdin is not None
    putter.stdin.write(os.urandom(512 * 1024))  # blocks until the paired PUT reads it
    putter.stdin.flush()
    partial = out.with_name("out.bin.partial")
    # The destination holding bytes is the state we need (the relay's own
    # byte count is only settled when the relay ends).
    wait_for(lambda: partial.exists() and partial.stat().st_size > 0, what="bytes at the GET")
    putter.kill()
    putter.wait(20)
    with contextlib.suppress(BrokenPipeError):
        putter.stdin.close()
    _, err = getter.communicate(timeout=30)
    assert getter.returncode == EXIT_TRANSFER_FAILED, err
    assert not out.exists() and not out.with_name("out.bin.partial").exists()


def test_exit_digest_mismatch(tmp_path: pathlib.Path) -> None:
    """Verification against a peer that sends a wrong digest: exit 5, no file."""
    body = b"hello world"
    wrong = format_repr_digest(hashlib.sha256(b"something else").digest())
    for headers, trailers in [
        ([("Content-Length", str(len(body))), ("Repr-Digest", wrong)], []),
        ([("Transfer-Encoding", "chunked")], [("Repr-Digest", wrong)]),
    ]:
        with _FakeRelay(_answer_get(body, headers, trailers)) as fake:
            out = tmp_path / "out.bin"
            done = run_cli("get", fake.url, "-o", str(out))
            assert done.returncode == EXIT_DIGEST_MISMATCH, done.stderr
            assert not out.exists() and not out.with_name("out.bin.partial").exists()


# --- the Python API's errors --------------------------------------------------


def test_api_error_mapping(relay_factory: Callable[..., Relay], tmp_path: pathlib.Path) -> None:
    relay = relay_factory(max_per_workspace=2)
    with client(relay) as c:
        with pytest.raises(errors.TicketNotFound) as gone:
            c.get(relay.url("rly_nope"), tmp_path / "x")
        assert gone.value.status == 410
        with (
            Client(relay.base, secret="wrong") as wrong,
            pytest.raises(errors.Unauthorized) as unauth,
        ):
            wrong.mint("ws", "a", "b")
        assert unauth.value.status == 401
        with pytest.raises(RelayRefused) as bad:
            c.mint("", "a", "b")
        assert bad.value.status == 400 and "required" in bad.value.message
        limited = c.mint("ws", "a", "b", max_bytes=10)
        with pytest.raises(errors.PayloadTooLarge) as big:
            c.put(limited.upload_url, b"x" * 100)  # Content-Length over the limit
        assert big.value.status == 413 and big.value.limit == 10
        c.mint("ws", "a", "b")
        c.mint("ws", "a", "b")  # the limited ticket has ended: these two are live
        with pytest.raises(errors.WorkspaceCapReached) as cap:
            c.mint("ws", "a", "b")
        assert cap.value.status == 429

        r = relay.create(workspace_id="other")
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            first = pool.submit(c.get, relay.url(r.ticket), io.BytesIO())
            wait_for(lambda: relay.call(lambda: r.get_party is not None), what="first GET")
            with pytest.raises(errors.SideAlreadyClaimed) as claimed:
                c.get(relay.url(r.ticket), io.BytesIO())
            assert claimed.value.status == 423
            c.put(relay.url(r.ticket), b"done")
            assert first.result(30).bytes == 4

        short = c.mint("other", "a", "b", ttl=1)
        with pytest.raises(errors.PairingTimeout) as late:
            c.get(short.download_url, tmp_path / "late")  # nobody uploads
        assert late.value.status == 408
        assert not (tmp_path / "late").exists()


def test_api_transfer_failed(relay: Relay, tmp_path: pathlib.Path) -> None:
    """A source that breaks mid-stream: the GET sees TransferFailed, no file."""
    r = relay.create()

    def broken() -> Iterator[bytes]:
        yield os.urandom(300_000)
        wait_for(lambda: partial.exists() and partial.stat().st_size > 0, what="bytes at the GET")
        raise RuntimeError("source broke")

    out = tmp_path / "out.bin"
    partial = out.with_name("out.bin.partial")
    with client(relay) as c, concurrent.futures.ThreadPoolExecutor(1) as pool:
        got = pool.submit(c.get, relay.url(r.ticket), out)
        with pytest.raises(RuntimeError):
            c.put(relay.url(r.ticket), broken())
        with pytest.raises(TransferFailed):
            got.result(30)
    assert not out.exists() and not out.with_name("out.bin.partial").exists()


def test_put_sends_digest_header_and_trailer(tmp_path: pathlib.Path) -> None:
    """RFC 9530 on the wire: header for a regular file, trailer for a stream."""
    data = os.urandom(300_000)
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    want = format_repr_digest(hashlib.sha256(data).digest())
    for source, where in [(str(src), "header"), (chunks_of(data), "trailer")]:
        seen: dict[str, Any] = {}
        with _FakeRelay(_accept_put(seen)) as fake, Client() as c:
            assert c.put(fake.url, source).bytes == len(data)
        assert seen["body"] == data and seen["authorization"] == "Bearer rly_fake"
        if where == "header":
            assert seen["headers"]["content-length"] == str(len(data))
            assert seen["headers"]["repr-digest"] == want and not seen["trailers"]
        else:
            assert seen["headers"]["transfer-encoding"] == "chunked"
            assert seen["headers"]["trailer"].lower() == "repr-digest"
            assert seen["trailers"] == {"repr-digest": want}


# --- digest passthrough (needs the relay to forward Repr-Digest) ---------------


def test_digest_passthrough_header_verified(relay: Relay, payload_file: pathlib.Path) -> None:
    r = relay.create()
    with client(relay) as c, concurrent.futures.ThreadPoolExecutor(1) as pool:
        got = pool.submit(c.get, relay.url(r.ticket), io.BytesIO())
        c.put(relay.url(r.ticket), str(payload_file))
        assert got.result(30).verified, "the GET carried no Repr-Digest header"


def test_digest_passthrough_trailer_verified(relay: Relay) -> None:
    r = relay.create()
    data = os.urandom(500_000)
    with client(relay) as c, concurrent.futures.ThreadPoolExecutor(1) as pool:
        got = pool.submit(c.get, relay.url(r.ticket), io.BytesIO())
        c.put(relay.url(r.ticket), chunks_of(data))
        assert got.result(30).verified, "the GET carried no Repr-Digest trailer"


def test_digest_passthrough_wrong_header_exit_5(relay: Relay, tmp_path: pathlib.Path) -> None:
    r = relay.create()
    body = os.urandom(100_000)
    wrong = format_repr_digest(hashlib.sha256(b"not the body").digest())
    out = tmp_path / "out.bin"
    getter = subprocess.Popen(cli_cmd("get", relay.url(r.ticket), "-o", str(out)))
    wait_for(lambda: relay.call(lambda: r.get_party is not None), what="GET waiting")
    status, _, _ = relay.raw(
        (
            f"PUT /relay/{r.ticket} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {r.ticket}\r\n"
            f"Content-Length: {len(body)}\r\nRepr-Digest: {wrong}\r\nConnection: close\r\n\r\n"
        ).encode()
        + body
    )
    assert status == 200
    assert getter.wait(30) == EXIT_DIGEST_MISMATCH
    assert not out.exists() and not out.with_name("out.bin.partial").exists()


# --- progress -----------------------------------------------------------------


def test_progress_bar_on_a_terminal(
    relay: Relay, payload_file: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    r = relay.create()
    master, slave = pty.openpty()
    # A fresh pty is 0x0; a real terminal has a size, and tqdm needs one.
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    getter = subprocess.Popen(
        cli_cmd("get", relay.url(r.ticket), "-o", str(tmp_path / "out.bin")), stderr=slave
    )
    os.close(slave)
    drained: list[bytes] = []

    def drain() -> None:  # a full pty would block the child's writes
        with contextlib.suppress(OSError):  # EIO once the child's side closes
            while chunk := os.read(master, 4096):
                drained.append(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    try:
        with client(relay) as c:
            c.put(relay.url(r.ticket), str(payload_file))
        assert getter.wait(30) == EXIT_OK
        reader.join(10)
    finally:
        os.close(master)
    text = b"".join(drained).decode("utf-8", "replace")
    assert "B/s" in text and "100%" in text, text

    # Not a terminal (a pipe): quiet unless --progress forces it.
    r2 = relay.create()
    with concurrent.futures.ThreadPoolExecutor(1) as pool, client(relay) as c:
        put = pool.submit(c.put, relay.url(r2.ticket), b"z" * 1000)
        quiet = run_cli("get", relay.url(r2.ticket))
        put.result(30)
    assert quiet.returncode == 0 and quiet.stdout == b"z" * 1000 and quiet.stderr == b""
    r3 = relay.create()
    with concurrent.futures.ThreadPoolExecutor(1) as pool, client(relay) as c:
        put = pool.submit(c.put, relay.url(r3.ticket), b"z" * 1000)
        forced = run_cli("get", relay.url(r3.ticket), "--progress")
        put.result(30)
    assert forced.returncode == 0 and b"B/s" in forced.stderr


# --- a scripted h11 peer, for what the real relay does not do (yet) -------------


Script = Callable[[h11.Connection, socket.socket], None]


class _FakeRelay:
    """One connection on 127.0.0.1, handled by ``script`` with an h11 server."""

    def __init__(self, script: Script) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}/relay/rly_fake"
        self._script = script
        self._thread = threading.Thread(target=self._serve)
        self.error: BaseException | None = None

    def _serve(self) -> None:
        sock, _ = self._listener.accept()
        with sock:
            try:
                self._script(h11.Connection(h11.SERVER), sock)
            except BaseException as exc:
                self.error = exc

    def __enter__(self) -> _FakeRelay:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._thread.join(20)
        self._listener.close()
        if self.error is not None:
            raise self.error


def _next(conn: h11.Connection, sock: socket.socket) -> Any:
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(sock.recv(65536))
            continue
        return event


def _answer_get(
    body: bytes, headers: list[tuple[str, str]], trailers: list[tuple[str, str]]
) -> Script:
    def script(conn: h11.Connection, sock: socket.socket) -> None:
        assert isinstance(_next(conn, sock), h11.Request)
        out = conn.send(h11.Response(status_code=200, headers=headers))
        out += conn.send(h11.Data(data=body))
        out += conn.send(h11.EndOfMessage(headers=trailers))
        sock.sendall(out)

    return script


def _accept_put(seen: dict[str, Any]) -> Script:
    def script(conn: h11.Connection, sock: socket.socket) -> None:
        request = _next(conn, sock)
        assert isinstance(request, h11.Request)
        headers = {k.decode(): v.decode() for k, v in request.headers}
        seen["headers"], seen["authorization"] = headers, headers["authorization"]
        assert headers["expect"] == "100-continue"
        sock.sendall(conn.send(h11.InformationalResponse(status_code=100, headers=[])))
        body = bytearray()
        while not isinstance(event := _next(conn, sock), h11.EndOfMessage):
            body += event.data
        seen["body"] = bytes(body)
        seen["trailers"] = {k.decode(): v.decode() for k, v in event.headers}
        answer = json.dumps({"bytes": len(body), "status": "ok"}).encode()
        out = conn.send(
            h11.Response(status_code=200, headers=[("Content-Length", str(len(answer)))])
        )
        sock.sendall(out + conn.send(h11.Data(data=answer)) + conn.send(h11.EndOfMessage()))

    return script
