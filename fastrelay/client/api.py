"""A typed client for a fastrelay server: mint, upload (PUT), download (GET).

``Client`` (blocking) and ``AsyncClient`` (asyncio) have the same methods and
share everything but socket I/O:

* **mint** goes through httpx (a small JSON request/response, where httpx's
  connection pooling and TLS settings are what we want);
* **put/get** are written as *sans-IO flows* on h11: generators that yield
  "send these bytes" / "give me the next bytes" / "set the idle timeout" and
  receive the results. ``_drive_sync`` and ``_drive_async`` are the only two
  pieces of code that touch a socket. httpx cannot be used here because it
  neither sends request trailers nor exposes response trailers (both carry
  the RFC 9530 digest of a streamed body), and it does not wait for
  ``100 Continue``, which we need to tell a refusal from a failed transfer.

Integrity (RFC 9530): ``put`` sends ``Repr-Digest: sha-256=:<b64>:`` as a
header when the size is known up front (regular file, bytes), or as a trailer
of the chunked body when it is a stream. ``get`` verifies a sha-256
``Repr-Digest`` found in the response headers or trailers and raises
`DigestMismatch` (leaving no destination file) when it does not match.

Errors: every failure is a `fastrelay.errors.RelayError` whose ``status`` is
an HTTP status. The relay's answers map onto the server's own error classes;
failures only the client can see are `TransferFailed`
(`RelayUnreachable` when no connection was made) and `DigestMismatch`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import logging
import math
import os
import random
import re
import socket
import ssl
import stat
import time
import urllib.parse
from collections.abc import Callable, Generator, Iterable, Iterator
from typing import IO, Any, NamedTuple, TypeAlias, TypeVar

import h11
import httpx

from ..core import errors
from .answers import (
    DigestMismatch,
    GetResult,
    MintResult,
    NoProgress,
    Progress,
    PutResult,
    RelayRefused,
    RelayUnreachable,
    RetryNotice,
    TransferFailed,
    answer_error,
    describe_os_error,
    format_repr_digest,
    parse_repr_digest,
)

__all__ = [
    "AsyncClient",
    "Client",
    "DigestMismatch",
    "GetResult",
    "MintResult",
    "Progress",
    "PutResult",
    "RelayRefused",
    "RelayUnreachable",
    "RetryNotice",
    "TransferFailed",
]

MINT_PATH = "/api/exec-gateway/relay/create"
CHUNK_SIZE = 256 * 1024
# Error answers are small; never buffer more than this of one.
_MAX_ERROR_BODY = 64 * 1024
_USER_AGENT = "fastrelay-client"
BACKOFF = 0.5
"""First wait before a retry, seconds; each retry that follows an attempt
that moved no byte waits twice as long, up to `BACKOFF_CAP`."""
BACKOFF_CAP = 8.0
# How far back a resumed upload can restart without re-reading its source
# to rebuild the running sha-256: one hasher copy per chunk sent (a few
# hundred bytes each), the last 64 chunks (16 MiB). The relay's resume point
# trails what was sent by socket buffers, well under that.
_HASH_SNAPSHOTS = 64
_log = logging.getLogger("fastrelay.client")

Source: TypeAlias = "str | os.PathLike[str] | bytes | IO[bytes] | Iterable[bytes]"
Dest: TypeAlias = "str | os.PathLike[str] | IO[bytes]"
T = TypeVar("T")


# --- URLs, TLS, digests ------------------------------------------------------------


class _Target(NamedTuple):
    tls: bool
    host: str
    port: int
    target: str
    host_header: str
    ticket: str


_RELAY_URL_FORM = "expected http(s)://HOST[:PORT]/relay/TICKET, as the mint answer gives it"


def _parse_relay_url(url: str) -> _Target:
    """Split ``http(s)://host[:port]/relay/<ticket>``; the ticket is the last segment."""
    try:
        parts = urllib.parse.urlsplit(url)
        port_number = parts.port  # raises on a port out of range or not a number
    except ValueError as exc:
        raise ValueError(f"not a relay URL ({exc}): {url}; {_RELAY_URL_FORM}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not a relay URL: {url}; {_RELAY_URL_FORM}")
    ticket = urllib.parse.unquote(parts.path.rstrip("/").rpartition("/")[2])
    if not ticket:
        raise ValueError(f"no ticket in the URL: {url}; {_RELAY_URL_FORM}")
    tls = parts.scheme == "https"
    port = port_number or (443 if tls else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return _Target(tls, parts.hostname, port, target, parts.netloc.rpartition("@")[2], ticket)


def _ssl_context(verify: ssl.SSLContext | str | bool) -> ssl.SSLContext:
    """One context for httpx and our own sockets (a str is a CA bundle file)."""
    if isinstance(verify, ssl.SSLContext):
        return verify
    if isinstance(verify, str):
        ctx = ssl.create_default_context(cafile=verify)
    else:
        ctx = ssl.create_default_context()
        if not verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def _header_values(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> list[str]:
    return [v.decode("latin-1") for k, v in headers if k.lower() == name]


# --- upload sources and download sinks (file I/O, shared by sync and async) -------


@dataclasses.dataclass
class _Body:
    chunks: Iterator[bytes]
    length: int | None  # None: chunked, digest in a trailer
    digest: bytes | None  # known up front: sent as a header
    close: Callable[[], None]
    reader: Callable[[int], Iterator[bytes]] | None = None
    """The body's chunks from an offset on: a body that can be sent again
    (a regular file, bytes). None for a stream, read once."""
    consumed: bool = False
    """A byte was taken from a stream: it cannot be sent again."""
    snapshots: collections.deque[tuple[int, Any]] = dataclasses.field(
        default_factory=lambda: collections.deque(maxlen=_HASH_SNAPSHOTS)
    )
    """(offset, sha-256 of the bytes before it) at recent chunk ends."""

    def chunks_from(self, offset: int) -> Iterator[bytes]:
        if self.reader is None:
            assert offset == 0
            return self.chunks
        return self.reader(offset)

    def hasher_at(self, offset: int) -> Any:
        """A sha-256 over the body's first ``offset`` bytes, so a resumed
        upload still checks the whole body against its digest: from the
        nearest snapshot at or before ``offset``, else from the start."""
        at, hasher = 0, hashlib.sha256()
        for pos, snap in reversed(self.snapshots):
            if pos <= offset:
                at, hasher = pos, snap.copy()
                break
        if at < offset:
            assert self.reader is not None
            for chunk in self.reader(at):
                take = chunk[: offset - at]
                hasher.update(take)
                at += len(take)
                if at >= offset:
                    break
        return hasher


def _read_chunks(f: IO[bytes]) -> Iterator[bytes]:
    while chunk := f.read(CHUNK_SIZE):
        yield chunk


def _file_body(f: IO[bytes], close: Callable[[], None]) -> _Body:
    """A regular file is hashed first so the digest can go in the head."""
    try:
        st = os.fstat(f.fileno())
        regular = stat.S_ISREG(st.st_mode) and f.seekable()
    except (OSError, AttributeError, ValueError):
        regular = False  # io.BytesIO and friends have no fileno
    if not regular:
        return _Body(_read_chunks(f), None, None, close)
    start = f.tell()
    hasher = hashlib.sha256()
    for chunk in _read_chunks(f):
        hasher.update(chunk)
    length = f.tell() - start

    def reader(offset: int) -> Iterator[bytes]:
        f.seek(start + offset)  # now, not at the first next(): see hasher_at
        return _read_chunks(f)

    return _Body(reader(0), length, hasher.digest(), close, reader)


def _open_source(source: Source) -> _Body:
    if isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source)
        digest = hashlib.sha256(data).digest()
        return _Body(iter([data]), len(data), digest, lambda: None, lambda at: iter([data[at:]]))
    if isinstance(source, str | os.PathLike):
        f = open(source, "rb")  # noqa: SIM115 - closed by _Body.close
        try:
            return _file_body(f, f.close)
        except BaseException:
            f.close()
            raise
    if hasattr(source, "read"):
        return _file_body(source, lambda: None)  # type: ignore[arg-type]
    return _Body(iter(source), None, None, lambda: None)


class _Sink:
    """Where a download goes; a path gets ``<path>.partial`` renamed on success."""

    def __init__(self, dest: Dest) -> None:
        self._path: str | None = None
        self._file: IO[bytes] | None = None
        if isinstance(dest, str | os.PathLike):
            self._path = os.fspath(dest)
        else:
            self._file = dest
        # Over every byte written, across attempts: a resumed download
        # appends exactly where the last one stopped.
        self._hasher = hashlib.sha256()
        self.written = 0
        # Bytes in the .partial came from an earlier attempt: the digest is
        # checked over the file as it is on disk, re-read whole.
        self._appended = False

    @property
    def partial(self) -> str | None:
        return None if self._path is None else self._path + ".partial"

    def open(self) -> None:
        """Open ``<path>.partial`` now, before the GET is sent: a download
        that cannot be written fails here, locally, without spending the
        single-use ticket. A refusal later removes it again (`abort`)."""
        self._opened()

    def _opened(self) -> IO[bytes]:
        if self._file is None:
            assert self.partial is not None
            self._file = open(self.partial, "wb")  # noqa: SIM115 - closed by commit/abort
        return self._file

    def write(self, data: bytes) -> None:
        self._opened().write(data)
        self._hasher.update(data)
        self.written += len(data)

    def position(self) -> int:
        """Where a resumed download continues: the size of ``<path>.partial``
        (what is really there), or the bytes written to a stream."""
        if self._path is None:
            return self.written
        f = self._opened()
        f.flush()
        return os.fstat(f.fileno()).st_size

    def continue_at(self, offset: int) -> None:
        """A ``206`` from ``offset``: append to what earlier attempts wrote."""
        if self._path is not None:
            self._opened().seek(offset)
            self._appended = self._appended or offset > 0

    def restart(self) -> None:
        """A ``200`` to a resumed request: the whole body comes again."""
        if self._path is None:
            if self.written:
                raise TransferFailed(
                    "the relay sent the body again from its start, and a stream "
                    "cannot be rewound: download to a file (-o FILE) to resume"
                )
            return
        f = self._opened()
        f.seek(0)
        f.truncate()
        self._hasher, self.written, self._appended = hashlib.sha256(), 0, False

    def digest(self) -> bytes:
        """The sha-256 of the whole download: the running hash, or after a
        resume the file re-read from disk (its first part came from an
        earlier attempt, and what counts is what the file holds)."""
        if not self._appended or self.partial is None:
            return self._hasher.digest()
        self._opened().flush()
        hasher = hashlib.sha256()
        with open(self.partial, "rb") as f:
            for chunk in _read_chunks(f):
                hasher.update(chunk)
        return hasher.digest()

    def commit(self) -> None:
        f = self._opened()
        f.flush()
        if self._path is not None and self.partial is not None:
            os.fsync(f.fileno())
            f.close()
            os.replace(self.partial, self._path)

    def abort(self) -> None:
        if self._path is not None and self.partial is not None:
            if self._file is not None:
                self._file.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.partial)


# --- sans-IO flows ---------------------------------------------------------------


class _Send(NamedTuple):
    data: bytes


class _Recv(NamedTuple):
    pass


class _Idle(NamedTuple):
    """From now on, fail a send or receive that waits longer than ``seconds``."""

    seconds: float | None


_Op: TypeAlias = _Send | _Recv | _Idle
# A flow yields operations, is sent received bytes (b"" at EOF, and b"" after
# a send), and has socket errors thrown into it.
_Flow: TypeAlias = Generator[_Op, bytes, T]


def _next_event(conn: h11.Connection) -> _Flow[h11.Event]:
    """The next event from the relay, receiving as needed."""
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            if conn.trailing_data[1]:
                # h11 raises this too when the connection ends (EOF) before
                # the answer does: a break, as a reset would be.
                raise TransferFailed(
                    "the relay closed the connection without a complete answer", broke=True
                ) from exc
            raise TransferFailed(f"incomplete or malformed answer from the relay: {exc}") from exc
        if event is h11.NEED_DATA:
            try:
                data = yield _Recv()
            except OSError as exc:
                reason = describe_os_error(exc)
                raise TransferFailed(
                    f"the connection to the relay broke ({reason})", broke=True
                ) from exc
            conn.receive_data(data)
            continue
        if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
            raise TransferFailed(
                "the relay closed the connection without a complete answer", broke=True
            )
        assert isinstance(event, h11.Event)
        return event


def _final_response(conn: h11.Connection) -> _Flow[h11.Response | h11.InformationalResponse]:
    event = yield from _next_event(conn)
    assert isinstance(event, h11.Response | h11.InformationalResponse)
    return event


def _small_body(conn: h11.Connection) -> _Flow[bytes]:
    """An answer's body (error or PUT result), bounded."""
    body = bytearray()
    while True:
        event = yield from _next_event(conn)
        if isinstance(event, h11.EndOfMessage):
            return bytes(body)
        if isinstance(event, h11.Data) and len(body) < _MAX_ERROR_BODY:
            body += event.data


def _request(method: str, t: _Target, extra: list[tuple[str, str]]) -> h11.Request:
    headers = [
        ("Host", t.host_header),
        ("Authorization", f"Bearer {t.ticket}"),
        ("User-Agent", _USER_AGENT),
        *extra,
    ]
    return h11.Request(method=method, target=t.target, headers=headers)


@dataclasses.dataclass
class _Tally:
    """One attempt of a transfer, as the retry plan sees it afterwards."""

    offset: int = 0
    """Where in the body this attempt starts."""
    moved: int = 0
    """Body bytes this attempt sent (put) or received (get)."""
    paired: bool = False
    """The relay accepted the request (``100``, ``200`` or ``206``)."""


class _Carry:
    """One progress bar over all attempts: started once, and never going
    back (bytes sent again after a resume move it only past its mark)."""

    def __init__(self, progress: Progress) -> None:
        self._progress = progress
        self._started = False
        self._shown = 0

    def start(self, total: int | None) -> None:
        if not self._started:
            self._started = True
            self._progress.start(total)

    def reach(self, position: int) -> None:
        if position > self._shown:
            self._progress.advance(position - self._shown)
            self._shown = position


_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+)")


def _put_flow(
    t: _Target, body: _Body, carry: _Carry, idle: float | None, tally: _Tally
) -> _Flow[PutResult]:
    conn = h11.Connection(h11.CLIENT)
    offset = tally.offset
    if body.length is not None:
        assert body.digest is not None
        framing = [
            ("Content-Length", str(body.length - offset)),
            # The whole body's digest, on every attempt: a resumable relay
            # checks that a resumed upload describes the same body.
            ("Repr-Digest", format_repr_digest(body.digest)),
        ]
        if offset:
            framing.append(("Content-Range", f"bytes {offset}-{body.length - 1}/{body.length}"))
    else:
        framing = [("Transfer-Encoding", "chunked"), ("Trailer", "Repr-Digest")]
    # Expect: the relay answers 100 at pairing, or a final status if it
    # refuses. Not reading the source before then keeps a refusal clean (no
    # byte consumed from a pipe) and tells "refused" from "failed".
    head = [("Content-Type", "application/octet-stream"), ("Expect", "100-continue"), *framing]
    yield _Send(conn.send(_request("PUT", t, head)))
    event = yield from _final_response(conn)  # no idle limit: the relay times pairing
    if isinstance(event, h11.Response):
        answer = yield from _small_body(conn)
        raise answer_error(event.status_code, answer)
    tally.paired = True
    yield _Idle(idle)
    carry.start(body.length)
    hasher = body.hasher_at(offset) if offset else hashlib.sha256()
    try:
        for chunk in body.chunks_from(offset):
            if chunk:
                body.consumed = True
                hasher.update(chunk)
                yield _Send(conn.send(h11.Data(data=chunk)))
                # Counted once the socket took it: a resume never starts
                # past what really went out.
                tally.moved += len(chunk)
                if body.reader is not None:
                    body.snapshots.append((offset + tally.moved, hasher.copy()))
                carry.reach(offset + tally.moved)
        if body.length is not None and body.digest != hasher.digest():
            raise TransferFailed("the source changed while it was being sent")
        trailers = (
            []
            if body.length is not None
            else [("Repr-Digest", format_repr_digest(hasher.digest()))]
        )
        yield _Send(conn.send(h11.EndOfMessage(headers=trailers)))
    except h11.LocalProtocolError as exc:
        raise TransferFailed(f"the source does not match its size: {exc}") from exc
    except OSError:
        pass  # the relay may have answered early (413, idle, 409...) and closed: read it
    event = yield from _final_response(conn)
    while isinstance(event, h11.InformationalResponse):
        event = yield from _final_response(conn)
    answer = yield from _small_body(conn)
    if event.status_code != 200:
        cause = answer_error(event.status_code, answer)
        raise TransferFailed(
            f"the relay ended the upload: {event.status_code} {cause.message}", event.status_code
        ) from cause
    try:
        doc = json.loads(answer)
        relayed = int(doc["bytes"])
    except (ValueError, KeyError, TypeError) as exc:
        raise TransferFailed(f"unexpected answer from the relay: {_quote(answer)}") from exc
    # A resumed relay reports the whole body; this attempt sent its tail.
    if relayed != offset + tally.moved:
        raise TransferFailed(f"the relay delivered {relayed} of {offset + tally.moved} bytes")
    return PutResult(bytes=relayed, digest=hasher.hexdigest(), answer=doc)


def _get_flow(
    t: _Target, sink: _Sink, carry: _Carry, idle: float | None, tally: _Tally
) -> _Flow[GetResult]:
    conn = h11.Connection(h11.CLIENT)
    offset = tally.offset
    extra = [("Accept-Encoding", "identity")]
    if offset:
        extra.append(("Range", f"bytes={offset}-"))
    yield _Send(conn.send(_request("GET", t, extra)))
    event = yield from _final_response(conn)  # waits for pairing, which the relay times
    while isinstance(event, h11.InformationalResponse):
        event = yield from _final_response(conn)
    if event.status_code not in (200, 206) or (event.status_code == 206 and not offset):
        answer = yield from _small_body(conn)
        raise answer_error(event.status_code, answer)
    tally.paired = True
    yield _Idle(idle)
    expected = parse_repr_digest(_header_values(event.headers, b"repr-digest"))
    length = _header_values(event.headers, b"content-length")
    total = int(length[0]) if length else None
    if event.status_code == 206:
        ranges = _header_values(event.headers, b"content-range")
        match = _CONTENT_RANGE.fullmatch(ranges[0].strip()) if ranges else None
        if match is None or int(match.group(1)) != offset:
            raise TransferFailed(
                f"the relay resumed at {ranges[0] if ranges else 'no Content-Range'}, "
                f"not at byte {offset}"
            )
        total = int(match.group(3))
        sink.continue_at(offset)
    elif offset:
        sink.restart()  # no Range honoured: the whole body comes again
        offset = 0
    carry.start(total)
    while True:
        part = yield from _next_event(conn)
        if isinstance(part, h11.Data):
            sink.write(part.data)
            tally.moved += len(part.data)
            carry.reach(offset + tally.moved)
        elif isinstance(part, h11.EndOfMessage):
            trailer = parse_repr_digest(_header_values(part.headers, b"repr-digest"))
            expected = trailer if trailer is not None else expected
            break
    digest = sink.digest()
    if expected is not None and expected != digest:
        raise DigestMismatch(expected.hex(), digest.hex())
    return GetResult(bytes=offset + tally.moved, digest=digest.hex(), verified=expected is not None)


def _quote(body: bytes) -> str:
    """The start of an unexpected answer as text (a bytes repr reads as code)."""
    return body[:200].decode("utf-8", "replace").strip() or "(empty)"


# --- the two drivers: the only code that touches a socket --------------------------


def _unreachable(t: _Target, exc: OSError) -> RelayUnreachable:
    untrusted = isinstance(exc, ssl.SSLCertVerificationError)
    return RelayUnreachable(f"{t.host}:{t.port}", describe_os_error(exc), untrusted=untrusted)


def _drive_sync(t: _Target, ctx: ssl.SSLContext, timeout: float | None, flow: _Flow[T]) -> T:
    try:
        sock = socket.create_connection((t.host, t.port), timeout=timeout)
        if t.tls:
            try:
                sock = ctx.wrap_socket(sock, server_hostname=t.host)
            except BaseException:
                sock.close()  # a failed handshake must not leak the TCP socket
                raise
    except OSError as exc:
        flow.close()
        raise _unreachable(t, exc) from exc
    with sock:
        sock.settimeout(None)
        op = next(flow)
        while True:
            reply, error = b"", None
            try:
                if isinstance(op, _Send):
                    sock.sendall(op.data)
                elif isinstance(op, _Recv):
                    reply = sock.recv(CHUNK_SIZE)
                else:
                    sock.settimeout(op.seconds)
            except OSError as exc:
                error = exc
            try:
                op = flow.throw(error) if error is not None else flow.send(reply)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]


async def _drive_async(t: _Target, ctx: ssl.SSLContext, timeout: float | None, flow: _Flow[T]) -> T:
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(
                t.host,
                t.port,
                ssl=ctx if t.tls else None,
                server_hostname=t.host if t.tls else None,
            ),
            timeout,
        )
    except OSError as exc:
        flow.close()
        raise _unreachable(t, exc) from exc
    idle: float | None = None
    try:
        op = next(flow)
        while True:
            reply, error = b"", None
            try:
                if isinstance(op, _Send):
                    writer.write(op.data)
                    await asyncio.wait_for(writer.drain(), idle)
                elif isinstance(op, _Recv):
                    reply = await asyncio.wait_for(reader.read(CHUNK_SIZE), idle)
                else:
                    idle = op.seconds
            except OSError as exc:  # TimeoutError is an OSError too
                error = exc
            try:
                op = flow.throw(error) if error is not None else flow.send(reply)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


# --- retries: plans of attempts, shared by sync and async ---------------------------


class _Attempt(NamedTuple):
    flow: _Flow[Any]


class _Sleep(NamedTuple):
    seconds: float


# A plan yields attempts (run by a driver: their result is sent back, their
# RelayError thrown in) and waits, and returns the transfer's result. Like
# the flows, it is the same code for Client and AsyncClient.
_Plan: TypeAlias = Generator[_Attempt | _Sleep, Any, T]


def _run_sync(t: _Target, ctx: ssl.SSLContext, timeout: float | None, plan: _Plan[T]) -> T:
    try:
        op = next(plan)
        while True:
            if isinstance(op, _Sleep):
                time.sleep(op.seconds)
                op = plan.send(None)
                continue
            try:
                result = _drive_sync(t, ctx, timeout, op.flow)
            except errors.RelayError as exc:
                op = plan.throw(exc)
            else:
                op = plan.send(result)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
    finally:
        plan.close()


async def _run_async(t: _Target, ctx: ssl.SSLContext, timeout: float | None, plan: _Plan[T]) -> T:
    try:
        op = next(plan)
        while True:
            if isinstance(op, _Sleep):
                await asyncio.sleep(op.seconds)
                op = plan.send(None)
                continue
            try:
                result = await _drive_async(t, ctx, timeout, op.flow)
            except errors.RelayError as exc:
                op = plan.throw(exc)
            else:
                op = plan.send(result)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
    finally:
        plan.close()


def _log_retry(notice: RetryNotice) -> None:
    _log.warning(
        "transfer broke at %d bytes (%s); retry %d of %d in %.1f s",
        notice.at,
        notice.error.message,
        notice.retry,
        notice.retries,
        notice.delay,
    )


def _noted(exc: TransferFailed, note: str) -> TransferFailed:
    """``exc`` (the failure to report) with why it was not mended."""
    exc.message = f"{exc.message}; {note}"
    exc.args = (exc.message,)
    return exc


class _Retrier:
    """Decides, after a failed attempt, whether and when to try again.

    ``retries`` bounds consecutive attempts that moved no byte: an attempt
    that moved some resets the count, so a long transfer on a flaky link
    keeps going while a relay that is gone is given up on. Waits double from
    ``backoff`` up to `BACKOFF_CAP`, with jitter (clients cut by one failure
    do not all come back at once); the default 10 retries wait about a
    minute in all, longer than a cluster node's lease (15 s).
    """

    def __init__(
        self, retries: int, backoff: float, on_retry: Callable[[RetryNotice], None] | None
    ) -> None:
        if retries < 0:
            raise ValueError(f"retries must be 0 or more (got {retries})")
        if not (math.isfinite(backoff) and backoff >= 0):
            raise ValueError(f"backoff must be a number of seconds >= 0 (got {backoff})")
        self.retries = retries
        self._backoff = backoff
        self._on_retry = on_retry or _log_retry
        self._streak = 0
        self.attempts = 0
        self.broken: TransferFailed | None = None
        """The break being retried: what is reported if retrying fails."""
        self.resumed = False
        """An attempt after a break mid-transfer was accepted: the ticket is
        resumable (a non-resumable one takes a retry only before pairing)."""
        self._midway = False

    def after(self, exc: errors.RelayError, tally: _Tally, at: int, cannot: str | None) -> float:
        """Seconds to wait before the next attempt after ``exc``; raises the
        failure to report when there is none. ``at``: the body's bytes moved
        so far; ``cannot``: why this transfer cannot be sent again, if so."""
        self.attempts += 1
        if tally.paired and self.broken is not None and self._midway:
            self.resumed = True
        if tally.moved:
            self._streak = 0
        first = self.attempts == 1
        if (
            isinstance(exc, TransferFailed)
            and exc.broke
            and not (first and tally.offset == 0 and isinstance(exc, RelayUnreachable))
        ):
            # A relay that cannot be reached at all is a wrong URL or a
            # relay that is down: reported at once, as without retries. Once
            # the transfer has started, it is a relay coming back: retried.
            if not self.retries:
                raise exc
            if cannot is not None:
                raise _noted(exc, cannot)
            self.broken, self._midway = exc, tally.paired
        elif self.broken is None or isinstance(exc, DigestMismatch | TransferFailed):
            raise exc  # not a break, and none being retried: as without retries
        elif exc.status == 423 or exc.status >= 500:
            pass  # a stale claim not yet released, a relay restarting: try again
        elif isinstance(exc, errors.TicketNotFound) and not self.resumed:
            raise _noted(
                self.broken,
                "the ticket is not resumable (or the relay has ended it), so it cannot be "
                "retried; mint it resumable to resume after a break",
            )
        elif isinstance(exc, errors.TicketNotFound):
            raise _noted(
                self.broken, "the relay no longer has the ticket (it expired or ran out of resumes)"
            )
        else:
            raise _noted(self.broken, f"the retry was refused: {exc.status} {exc.message}")
        if self._streak >= self.retries:
            raise _noted(self.broken, f"gave up after {self.retries} retries")
        self._streak += 1
        delay = min(BACKOFF_CAP, self._backoff * 2.0 ** (self._streak - 1))
        delay *= random.uniform(0.8, 1.2)
        self._on_retry(RetryNotice(self.broken, at, self._streak, self.retries, delay))
        return delay


def _put_plan(
    t: _Target, body: _Body, progress: Progress, idle: float | None, retrier: _Retrier
) -> _Plan[PutResult]:
    carry = _Carry(progress)
    offset = 0
    while True:
        tally = _Tally(offset)
        try:
            result: PutResult = yield _Attempt(_put_flow(t, body, carry, idle, tally))
            return result
        except errors.RelayError as exc:
            failure = exc
        at = offset + tally.moved
        resume = _resume_from(failure)
        if (
            resume is not None
            and retrier.retries
            and body.reader is not None
            and (tally.moved or resume < offset)
        ):
            # The relay named the byte the destination needs (409 with
            # Upload-Offset): send from there at once. Not a break, no
            # wait; it can only repeat after bytes moved or with a lower
            # offset, so it cannot loop.
            if isinstance(failure, TransferFailed):
                retrier.broken = failure
            retrier.attempts += 1
            retrier.resumed = True  # only a resumable relay answers Upload-Offset
            offset = resume
            continue
        cannot = None
        if body.reader is None and body.consumed:
            cannot = "a stream (stdin, a pipe) cannot be sent again: retries need a regular file"
        delay = retrier.after(failure, tally, at, cannot)
        if body.reader is not None and body.length:
            # Ask to continue from what went out; a relay holding less
            # answers 409 with its offset before any byte moves (above).
            offset = min(at, body.length - 1)
        yield _Sleep(delay)


def _resume_from(exc: errors.RelayError) -> int | None:
    """The offset of a 409 ``Upload-Offset``: refused, or after the body."""
    cause = exc.__cause__ if isinstance(exc, TransferFailed) else exc
    return cause.offset if isinstance(cause, errors.ResumeFrom) else None


def _get_plan(
    t: _Target, sink: _Sink, progress: Progress, idle: float | None, retrier: _Retrier
) -> _Plan[GetResult]:
    carry = _Carry(progress)
    while True:
        # After a break: ask for the rest of what the file holds.
        tally = _Tally(sink.position() if retrier.broken is not None else 0)
        try:
            result: GetResult = yield _Attempt(_get_flow(t, sink, carry, idle, tally))
            return result
        except errors.RelayError as exc:
            failure = exc
        delay = retrier.after(failure, tally, sink.position(), None)
        yield _Sleep(delay)


# --- the public clients --------------------------------------------------------------


def _mint_request(
    secret: str | None,
    workspace_id: str,
    source_exe_id: str,
    dest_exe_id: str,
    ttl: float | None,
    max_bytes: int,
    resumable: bool = False,
) -> tuple[dict[str, str], dict[str, Any]]:
    if secret is None:
        raise ValueError("minting needs the relay's shared secret (secret=...)")
    payload: dict[str, Any] = {
        "workspace_id": workspace_id,
        "source_exe_id": source_exe_id,
        "dest_exe_id": dest_exe_id,
    }
    if ttl is not None:
        payload["ttl_seconds"] = math.ceil(ttl)  # the wire field is whole seconds
    if max_bytes:
        payload["max_bytes"] = max_bytes
    if resumable:
        payload["resumable"] = True  # absent otherwise: a v1 mint, byte for byte
    return {"Authorization": f"Bearer {secret}"}, payload


def _parse_expires_at(text: str) -> dt.datetime:
    # RFC 3339 UTC; Go sends nanoseconds, which fromisoformat may not take.
    text = re.sub(r"(\.\d{6})\d+", r"\1", text)
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


def _mint_result(status: int, body: bytes) -> MintResult:
    if status != 201:
        raise answer_error(status, body, mint=True)
    try:
        doc = json.loads(body)
        return MintResult(
            ticket=str(doc["ticket"]),
            upload_url=str(doc["upload_url"]),
            download_url=str(doc["download_url"]),
            expires_at=_parse_expires_at(str(doc["expires_at"])),
            resumable=doc.get("resumable") is True,
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise RelayRefused(status, f"unexpected mint answer: {_quote(body)}") from exc


def _mint_url(base_url: str | None) -> str:
    if base_url is None:
        raise ValueError("minting needs the relay's base_url")
    try:
        parts = urllib.parse.urlsplit(base_url)
        parts.port  # noqa: B018 - raises on a bad port, as httpx would later
    except ValueError as exc:
        raise ValueError(f"not a relay base URL ({exc}): {base_url}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not a relay base URL: {base_url}; expected http(s)://HOST[:PORT]")
    return base_url.rstrip("/") + MINT_PATH


def _mint_failed(url: str, exc: httpx.TransportError) -> TransferFailed:
    """httpx's error, worded: the socket or TLS error it wraps says what happened."""
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__ or cause.__context__
    address = httpx.URL(url).netloc.decode("ascii", "replace")
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
        if isinstance(cause, OSError):
            untrusted = isinstance(cause, ssl.SSLCertVerificationError)
            return RelayUnreachable(address, describe_os_error(cause), untrusted=untrusted)
        return RelayUnreachable(address, describe_os_error(exc))
    reason = describe_os_error(cause) if cause is not None else describe_os_error(exc)
    return TransferFailed(f"the mint request to {address} failed ({reason})")


def _put_parts(url: str, source: Source) -> tuple[_Target, _Body]:
    target = _parse_relay_url(url)  # before opening: a bad URL leaks no file
    return target, _open_source(source)


def _get_parts(url: str, dest: Dest) -> tuple[_Target, _Sink]:
    return _parse_relay_url(url), _Sink(dest)


class _Base:
    def __init__(
        self,
        base_url: str | None,
        secret: str | None,
        verify: ssl.SSLContext | str | bool,
        timeout: float | None,
    ) -> None:
        self.base_url = base_url
        self._secret = secret
        self._ssl = _ssl_context(verify)
        self._timeout = timeout


class Client(_Base):
    """Blocking client.

    ``timeout`` bounds connecting and, once a transfer moves, each send or
    receive (idle time). Waiting to be paired is not bounded here: the
    relay answers 408 when the ticket's deadline passes.
    """

    def __init__(
        self,
        base_url: str | None = None,
        *,
        secret: str | None = None,
        verify: ssl.SSLContext | str | bool = True,
        timeout: float | None = 60.0,
    ) -> None:
        super().__init__(base_url, secret, verify, timeout)
        self._http = httpx.Client(verify=self._ssl, timeout=timeout)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def mint(
        self,
        workspace_id: str,
        source_exe_id: str,
        dest_exe_id: str,
        *,
        ttl: float | None = None,
        max_bytes: int = 0,
        resumable: bool = False,
    ) -> MintResult:
        url = _mint_url(self.base_url)
        headers, payload = _mint_request(
            self._secret, workspace_id, source_exe_id, dest_exe_id, ttl, max_bytes, resumable
        )
        try:
            resp = self._http.post(url, headers=headers, json=payload)
        except httpx.TransportError as exc:
            raise _mint_failed(url, exc) from exc
        return _mint_result(resp.status_code, resp.content)

    def put(
        self,
        upload_url: str,
        source: Source,
        *,
        progress: Progress | None = None,
        retries: int = 0,
        backoff: float = BACKOFF,
        on_retry: Callable[[RetryNotice], None] | None = None,
    ) -> PutResult:
        """Upload ``source``. With ``retries``, a broken connection is
        retried (see `_Retrier`): on a resumable ticket the upload goes on
        from the byte the destination needs (a regular file or bytes; a
        stream can be retried only before its first byte was read).
        ``on_retry`` hears of each retry (default: a log warning)."""
        retrier = _Retrier(retries, backoff, on_retry)
        target, body = _put_parts(upload_url, source)
        try:
            plan = _put_plan(target, body, progress or NoProgress(), self._timeout, retrier)
            return _run_sync(target, self._ssl, self._timeout, plan)
        finally:
            body.close()

    def get(
        self,
        download_url: str,
        dest: Dest,
        *,
        progress: Progress | None = None,
        retries: int = 0,
        backoff: float = BACKOFF,
        on_retry: Callable[[RetryNotice], None] | None = None,
    ) -> GetResult:
        """Download to ``dest``. With ``retries``, a broken connection is
        retried with ``Range: bytes=<what dest holds>-`` (see `put`); the
        digest is checked over the whole file at the end."""
        retrier = _Retrier(retries, backoff, on_retry)
        target, sink = _get_parts(download_url, dest)
        sink.open()  # before the GET: see _Sink.open
        plan = _get_plan(target, sink, progress or NoProgress(), self._timeout, retrier)
        try:
            result = _run_sync(target, self._ssl, self._timeout, plan)
            sink.commit()
        except BaseException:
            sink.abort()
            raise
        return result


class AsyncClient(_Base):
    """The asyncio twin of `Client`: same arguments, methods are coroutines.

    File reads and writes stay blocking (local disk); only the network waits.
    """

    def __init__(
        self,
        base_url: str | None = None,
        *,
        secret: str | None = None,
        verify: ssl.SSLContext | str | bool = True,
        timeout: float | None = 60.0,
    ) -> None:
        super().__init__(base_url, secret, verify, timeout)
        self._http = httpx.AsyncClient(verify=self._ssl, timeout=timeout)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def mint(
        self,
        workspace_id: str,
        source_exe_id: str,
        dest_exe_id: str,
        *,
        ttl: float | None = None,
        max_bytes: int = 0,
        resumable: bool = False,
    ) -> MintResult:
        url = _mint_url(self.base_url)
        headers, payload = _mint_request(
            self._secret, workspace_id, source_exe_id, dest_exe_id, ttl, max_bytes, resumable
        )
        try:
            resp = await self._http.post(url, headers=headers, json=payload)
        except httpx.TransportError as exc:
            raise _mint_failed(url, exc) from exc
        return _mint_result(resp.status_code, resp.content)

    async def put(
        self,
        upload_url: str,
        source: Source,
        *,
        progress: Progress | None = None,
        retries: int = 0,
        backoff: float = BACKOFF,
        on_retry: Callable[[RetryNotice], None] | None = None,
    ) -> PutResult:
        retrier = _Retrier(retries, backoff, on_retry)
        target, body = _put_parts(upload_url, source)
        try:
            plan = _put_plan(target, body, progress or NoProgress(), self._timeout, retrier)
            return await _run_async(target, self._ssl, self._timeout, plan)
        finally:
            body.close()

    async def get(
        self,
        download_url: str,
        dest: Dest,
        *,
        progress: Progress | None = None,
        retries: int = 0,
        backoff: float = BACKOFF,
        on_retry: Callable[[RetryNotice], None] | None = None,
    ) -> GetResult:
        retrier = _Retrier(retries, backoff, on_retry)
        target, sink = _get_parts(download_url, dest)
        sink.open()  # before the GET: see _Sink.open
        plan = _get_plan(target, sink, progress or NoProgress(), self._timeout, retrier)
        try:
            result = await _run_async(target, self._ssl, self._timeout, plan)
            sink.commit()
        except BaseException:
            sink.abort()
            raise
        return result
