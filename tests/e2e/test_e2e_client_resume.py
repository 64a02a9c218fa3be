"""``fastrelay put/get --retries`` and ``Client.put/get(retries=...)`` resuming
a broken transfer, against the real server (conftest's ``relay``), with the
connections cut for real by a `FaultProxy` between client and relay: each
proxy breaks its first connection at a byte count and forwards the next
ones untouched.

The Python API runs with a small ``backoff`` so retries come quickly; the
CLI tests use the real default backoff (one retry each: about half a second).
Nothing is ordered with a sleep: either side may reach the relay first, and
each test waits on processes and threads with deadlines.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import json
import os
import pathlib
import re
import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest
from conftest import SECRET, Relay

from fastrelay.client import AsyncClient, Client, RetryNotice, TransferFailed
from fastrelay.client.commands import EXIT_OK, EXIT_TRANSFER_FAILED
from tests.support.faultproxy import NO_FAULT, Fault, FaultProxy, reset_after

ENV = {**os.environ, "FASTRELAY_SHARED_SECRET": SECRET}
BACKOFF = 0.01  # API tests: retries without a noticeable wait
K_DOWN = 1_000_000  # where a GET's first connection is cut (bytes to the client)
K_UP = 2_000_000  # where a PUT's first connection is cut (bytes to the relay)
# Far larger than what socket buffers hold past a cut: the proxy's kernel
# acknowledges what fits in its receive buffer (up to a few MiB) although
# the proxy never forwards it, and a relay that sees its last byte
# acknowledged has finished. The break must land while the body still moves.
SIZE = 24 * 1024 * 1024 + 4321
BREAK_LINE = re.compile(
    r"^fastrelay: (upload|download) broke at \d+ bytes \(.+\); retry 1 of 3 in "
)


# How a break reads: a reset, or the relay's end closed before its answer
# (after a failed send, a reset can surface as a plain end of stream).
BROKE = re.compile(
    r"the connection to the relay broke|the relay closed the connection without a complete answer"
)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def big_file(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    path = tmp_path_factory.mktemp("resume") / "big.bin"
    path.write_bytes(os.urandom(SIZE))
    return path


@pytest.fixture
def proxies(relay: Relay) -> Iterator[Callable[..., FaultProxy]]:
    """Proxies to ``relay``, each cutting its first connection once; closed
    after the test (before the relay stops)."""
    made: list[FaultProxy] = []

    def make(first: Fault) -> FaultProxy:
        proxy = FaultProxy(("127.0.0.1", relay.server.port), [first, NO_FAULT])
        made.append(proxy)
        return proxy

    yield make
    for proxy in made:
        proxy.close()


def is_resumable(relay: Relay, ticket: str) -> bool:
    found = relay.call(lambda: relay.registry.lookup(ticket))
    assert found is not None, "the ticket was not minted"
    return bool(found.resumable)


def via(proxy: FaultProxy, ticket: str) -> str:
    return f"{proxy.url}/relay/{ticket}"


class Recorder:
    """A `Progress` that remembers what it was told."""

    def __init__(self) -> None:
        self.starts: list[int | None] = []
        self.position = 0

    def start(self, total: int | None) -> None:
        self.starts.append(total)

    def advance(self, n: int) -> None:
        assert n > 0, "the bar never goes back"
        self.position += n


def fastrelay_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "fastrelay", *args]


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        fastrelay_cmd(*args), capture_output=True, text=True, timeout=timeout, env=ENV
    )


# --- the Python API ----------------------------------------------------------------


def test_api_both_sides_break_and_resume(
    relay: Relay,
    proxies: Callable[..., FaultProxy],
    big_file: pathlib.Path,
    tmp_path: pathlib.Path,
) -> None:
    data = big_file.read_bytes()
    r = relay.create(resumable=True)
    down, up = proxies(reset_after(K_DOWN, "down")), proxies(reset_after(K_UP, "up"))
    out = tmp_path / "out.bin"
    get_progress, put_progress = Recorder(), Recorder()
    notices: dict[str, list[RetryNotice]] = {"get": [], "put": []}
    with (
        Client(timeout=20) as c,
        concurrent.futures.ThreadPoolExecutor(2) as pool,
    ):
        got = pool.submit(
            c.get, via(down, r.ticket), out, progress=get_progress, retries=3,
            backoff=BACKOFF, on_retry=notices["get"].append,
        )  # fmt: skip
        put = pool.submit(
            c.put, via(up, r.ticket), str(big_file), progress=put_progress, retries=3,
            backoff=BACKOFF, on_retry=notices["put"].append,
        )  # fmt: skip
        put_result, get_result = put.result(60), got.result(60)
    down.wait_faulted(0, 10)
    up.wait_faulted(0, 10)
    assert sha(out.read_bytes()) == sha(data) == get_result.digest == put_result.digest
    assert get_result.verified and get_result.bytes == put_result.bytes == len(data)
    assert put_result.answer["status"] == "ok" and put_result.answer["resumes"] >= 1
    assert not out.with_name("out.bin.partial").exists()
    # Each side saw its own break, and the relay's answer sent it from the
    # byte it needed: the bar went on to the whole size, started once.
    assert notices["get"] and notices["put"]
    assert notices["get"][0].retry == 1 and notices["get"][0].at > 0
    for progress in (get_progress, put_progress):
        assert progress.starts == [len(data)] and progress.position == len(data)


def test_api_get_resumes_with_range_and_checks_the_whole_file(
    relay: Relay,
    proxies: Callable[..., FaultProxy],
    big_file: pathlib.Path,
    tmp_path: pathlib.Path,
) -> None:
    data = big_file.read_bytes()
    r = relay.create(resumable=True)
    down = proxies(reset_after(K_DOWN, "down"))
    out = tmp_path / "out.bin"
    notices: list[RetryNotice] = []
    with Client(timeout=20) as c, concurrent.futures.ThreadPoolExecutor(1) as pool:
        got = pool.submit(
            c.get, via(down, r.ticket), out, retries=3, backoff=BACKOFF, on_retry=notices.append
        )
        # The source needs retries too: a destination that comes back
        # behind what the open PUT has sent makes the relay answer that PUT
        # 409 + Upload-Offset, and the source sends again from there.
        put = c.put(relay.url(r.ticket), str(big_file), retries=3, backoff=BACKOFF)
        result = got.result(60)
    assert out.read_bytes() == data and result.verified
    (notice,) = notices
    # The first connection carried the response head and part of the body;
    # the second one asked for the rest (Range) and got it (206).
    assert 0 < notice.at < K_DOWN
    assert down.wait_closed(1, 10).down_bytes < len(data)
    assert put.answer == {"bytes": len(data), "status": "ok", "resumes": 1}


def test_api_put_resumes_from_the_relays_offset(
    relay: Relay,
    proxies: Callable[..., FaultProxy],
    big_file: pathlib.Path,
    tmp_path: pathlib.Path,
) -> None:
    data = big_file.read_bytes()
    r = relay.create(resumable=True)
    up = proxies(reset_after(K_UP, "up"))
    notices: list[RetryNotice] = []
    out = tmp_path / "out.bin"
    with Client(timeout=20) as c, concurrent.futures.ThreadPoolExecutor(1) as pool:
        got = pool.submit(c.get, relay.url(r.ticket), out)
        put = c.put(
            via(up, r.ticket), str(big_file), retries=3, backoff=BACKOFF,
            on_retry=notices.append,
        )  # fmt: skip
        assert got.result(60).verified
    assert out.read_bytes() == data
    assert put.answer == {"bytes": len(data), "status": "ok", "resumes": 1}
    (notice,) = notices
    assert notice.retry == 1 and 0 < notice.at <= len(data)
    # Not sent again from 0: the retries together carried the rest and a
    # little more, never the whole body twice.
    sent_again = sum(c.up_bytes for c in up.connections[1:])
    assert sent_again < len(data) - K_UP // 2


def test_async_client_resumes_both_sides(
    relay: Relay, proxies: Callable[..., FaultProxy], tmp_path: pathlib.Path
) -> None:
    data = os.urandom(SIZE)
    r = relay.create(resumable=True)
    down, up = proxies(reset_after(K_DOWN, "down")), proxies(reset_after(K_UP, "up"))
    out = tmp_path / "out.bin"

    async def main() -> None:
        async with AsyncClient(timeout=20) as c:
            put, got = await asyncio.gather(
                c.put(via(up, r.ticket), data, retries=3, backoff=BACKOFF),
                c.get(via(down, r.ticket), out, retries=3, backoff=BACKOFF),
            )
        assert put.answer["resumes"] >= 1 and got.verified and got.bytes == len(data)

    asyncio.run(main())
    assert out.read_bytes() == data


def test_api_mint_resumable(relay: Relay) -> None:
    with Client(relay.base, secret=SECRET) as c:
        minted = c.mint("ws", "a", "b", resumable=True)
        plain = c.mint("ws", "a", "b")
    assert minted.resumable and not plain.resumable
    assert is_resumable(relay, minted.ticket)
    assert not is_resumable(relay, plain.ticket)


def test_api_without_retries_a_break_fails_as_before(
    relay: Relay,
    proxies: Callable[..., FaultProxy],
    big_file: pathlib.Path,
    tmp_path: pathlib.Path,
) -> None:
    r = relay.create(resumable=True)
    down = proxies(reset_after(K_DOWN, "down"))
    out = tmp_path / "out.bin"
    with Client(timeout=20) as c, concurrent.futures.ThreadPoolExecutor(2) as pool:
        got = pool.submit(c.get, via(down, r.ticket), out)
        put = pool.submit(c.put, relay.url(r.ticket), str(big_file), retries=3, backoff=BACKOFF)
        with pytest.raises(TransferFailed) as broke:
            got.result(60)
        # The relay holds the PUT for a GET that comes back: a new one
        # (whole body) finishes the ticket, the source sending again.
        assert c.get(relay.url(r.ticket), tmp_path / "again.bin").verified
        assert put.result(60).answer["resumes"] == 1
    assert broke.value.broke
    assert not out.exists() and not out.with_name("out.bin.partial").exists()


# --- the command line ------------------------------------------------------------------


def test_cli_mint_resumable_echoes(relay: Relay) -> None:
    done = run(
        "mint", relay.base, "--workspace", "w", "--source", "a", "--dest", "b", "--resumable"
    )
    assert done.returncode == EXIT_OK, done.stderr
    answer = json.loads(done.stdout)
    assert answer["resumable"] is True and done.stderr == ""
    assert is_resumable(relay, answer["ticket"])
    plain = run("mint", relay.base, "--workspace", "w", "--source", "a", "--dest", "b")
    assert "resumable" not in json.loads(plain.stdout)


def test_cli_put_and_get_resume_after_breaks(
    relay: Relay,
    proxies: Callable[..., FaultProxy],
    big_file: pathlib.Path,
    tmp_path: pathlib.Path,
) -> None:
    data = big_file.read_bytes()
    minted = run(
        "mint", relay.base, "--workspace", "w", "--source", "a", "--dest", "b", "--resumable"
    )
    ticket = json.loads(minted.stdout)["ticket"]
    down, up = proxies(reset_after(K_DOWN, "down")), proxies(reset_after(K_UP, "up"))
    out = tmp_path / "out.bin"
    getter = subprocess.Popen(
        fastrelay_cmd("get", via(down, ticket), "-o", str(out), "--retries", "3"),
        stderr=subprocess.PIPE, text=True, env=ENV,
    )  # fmt: skip
    put = run("put", via(up, ticket), str(big_file), "--retries", "3")
    _, get_err = getter.communicate(timeout=60)
    assert put.returncode == EXIT_OK, put.stderr
    assert getter.returncode == EXIT_OK, get_err
    assert sha(out.read_bytes()) == sha(data)
    answer = json.loads(put.stdout)
    assert answer["bytes"] == len(data) and answer["resumes"] >= 1
    # One line per break on stderr, naming where it broke and the retry.
    for side, err in (("upload", put.stderr), ("download", get_err)):
        lines = err.splitlines()
        assert lines and all(BREAK_LINE.match(line) for line in lines), err
        assert all(side in line for line in lines), err


def test_cli_non_resumable_ticket_reports_the_original_break(
    relay: Relay,
    proxies: Callable[..., FaultProxy],
    big_file: pathlib.Path,
    tmp_path: pathlib.Path,
) -> None:
    r = relay.create()  # not resumable
    down = proxies(reset_after(K_DOWN, "down"))
    out = tmp_path / "out.bin"
    getter = subprocess.Popen(
        fastrelay_cmd("get", via(down, r.ticket), "-o", str(out), "--retries", "3"),
        stderr=subprocess.PIPE, text=True, env=ENV,
    )  # fmt: skip
    # The source may well be told "ok": a plain ticket's relay answers once
    # the last byte is in the destination connection's socket buffers.
    run("put", relay.url(r.ticket), str(big_file), "--retries", "3")
    _, err = getter.communicate(timeout=60)
    assert getter.returncode == EXIT_TRANSFER_FAILED, err
    *retries, last = err.splitlines()
    assert retries and all(BREAK_LINE.match(line) for line in retries), err
    # The break itself, not the retry's 410, with why it was not resumed.
    assert last.startswith("fastrelay: error: download from "), err
    assert BROKE.search(last) and "not resumable" in last, err
    assert "410" not in last and "ticket not found" not in last, err
    assert not out.exists() and not out.with_name("out.bin.partial").exists()


def test_cli_put_from_stdin_cannot_be_resumed(
    relay: Relay, proxies: Callable[..., FaultProxy], tmp_path: pathlib.Path
) -> None:
    r = relay.create()  # a stream is chunked: only a plain ticket takes it
    up = proxies(reset_after(K_UP, "up"))
    getter = subprocess.Popen(
        fastrelay_cmd("get", relay.url(r.ticket), "-o", str(tmp_path / "out.bin"), "--retries", "0"),
        stderr=subprocess.DEVNULL, env=ENV,
    )  # fmt: skip
    put = subprocess.run(
        fastrelay_cmd("put", via(up, r.ticket), "-", "--retries", "3"),
        input=os.urandom(3 * 1024 * 1024),
        capture_output=True,
        timeout=60,
        env=ENV,
    )
    getter.wait(60)
    err = put.stderr.decode()
    assert put.returncode == EXIT_TRANSFER_FAILED, err
    (line,) = err.splitlines()  # no retry was attempted
    assert BROKE.search(line) and "retries need a regular file" in line, line
