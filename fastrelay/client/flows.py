"""The client's sans-IO half: relay URLs, upload sources and download sinks
(file I/O shared by the blocking and the asyncio client), and the PUT and
GET exchanges written as *flows* on h11: generators that yield "send these
bytes" / "give me the next bytes" / "set the idle timeout" and receive the
results. `api` drives them over a socket (`_drive_sync`, `_drive_async`),
the only code that touches one.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import json
import os
import re
import stat
import urllib.parse
from collections.abc import Callable, Generator, Iterable, Iterator
from typing import IO, Any, NamedTuple, TypeAlias, TypeVar

import h11

from .answers import (
    DigestMismatch,
    GetResult,
    Progress,
    PutResult,
    TransferFailed,
    answer_error,
    describe_os_error,
    format_repr_digest,
    parse_repr_digest,
)

CHUNK_SIZE = 256 * 1024
# Error answers are small; never buffer more than this of one.
_MAX_ERROR_BODY = 64 * 1024
_USER_AGENT = "fastrelay-client"
# How far back a resumed upload can restart without re-reading its source
# to rebuild the running sha-256: one hasher copy per chunk sent (a few
# hundred bytes each), the last 64 chunks (16 MiB). The relay's resume point
# trails what was sent by socket buffers, well under that.
_HASH_SNAPSHOTS = 64

Source: TypeAlias = "str | os.PathLike[str] | bytes | IO[bytes] | Iterable[bytes]"
Dest: TypeAlias = "str | os.PathLike[str] | IO[bytes]"
T = TypeVar("T")


# --- relay URLs ------------------------------------------------------------------


class Target(NamedTuple):
    tls: bool
    host: str
    port: int
    target: str
    host_header: str
    ticket: str


_RELAY_URL_FORM = "expected http(s)://HOST[:PORT]/relay/TICKET, as the mint answer gives it"


def parse_relay_url(url: str) -> Target:
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
    return Target(tls, parts.hostname, port, target, parts.netloc.rpartition("@")[2], ticket)


def _header_values(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> list[str]:
    return [v.decode("latin-1") for k, v in headers if k.lower() == name]


# --- upload sources and download sinks (file I/O, shared by sync and async) -------


@dataclasses.dataclass
class Body:
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


def _file_body(f: IO[bytes], close: Callable[[], None]) -> Body:
    """A regular file is hashed first so the digest can go in the head."""
    try:
        st = os.fstat(f.fileno())
        regular = stat.S_ISREG(st.st_mode) and f.seekable()
    except (OSError, AttributeError, ValueError):
        regular = False  # io.BytesIO and friends have no fileno
    if not regular:
        return Body(_read_chunks(f), None, None, close)
    start = f.tell()
    hasher = hashlib.sha256()
    for chunk in _read_chunks(f):
        hasher.update(chunk)
    length = f.tell() - start

    def reader(offset: int) -> Iterator[bytes]:
        f.seek(start + offset)  # now, not at the first next(): see hasher_at
        return _read_chunks(f)

    return Body(reader(0), length, hasher.digest(), close, reader)


def open_source(source: Source) -> Body:
    if isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source)
        digest = hashlib.sha256(data).digest()
        return Body(iter([data]), len(data), digest, lambda: None, lambda at: iter([data[at:]]))
    if isinstance(source, str | os.PathLike):
        f = open(source, "rb")  # noqa: SIM115 - closed by Body.close
        try:
            return _file_body(f, f.close)
        except BaseException:
            f.close()
            raise
    if hasattr(source, "read"):
        return _file_body(source, lambda: None)  # type: ignore[arg-type]
    return Body(iter(source), None, None, lambda: None)


class Sink:
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


class Send(NamedTuple):
    data: bytes


class Recv(NamedTuple):
    pass


class Idle(NamedTuple):
    """From now on, fail a send or receive that waits longer than ``seconds``."""

    seconds: float | None


Op: TypeAlias = Send | Recv | Idle
# A flow yields operations, is sent received bytes (b"" at EOF, and b"" after
# a send), and has socket errors thrown into it.
Flow: TypeAlias = Generator[Op, bytes, T]


def _next_event(conn: h11.Connection) -> Flow[h11.Event]:
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
                data = yield Recv()
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


def _final_response(conn: h11.Connection) -> Flow[h11.Response | h11.InformationalResponse]:
    event = yield from _next_event(conn)
    assert isinstance(event, h11.Response | h11.InformationalResponse)
    return event


def _small_body(conn: h11.Connection) -> Flow[bytes]:
    """An answer's body (error or PUT result), bounded."""
    body = bytearray()
    while True:
        event = yield from _next_event(conn)
        if isinstance(event, h11.EndOfMessage):
            return bytes(body)
        if isinstance(event, h11.Data) and len(body) < _MAX_ERROR_BODY:
            body += event.data


def _request(method: str, t: Target, extra: list[tuple[str, str]]) -> h11.Request:
    headers = [
        ("Host", t.host_header),
        ("Authorization", f"Bearer {t.ticket}"),
        ("User-Agent", _USER_AGENT),
        *extra,
    ]
    return h11.Request(method=method, target=t.target, headers=headers)


@dataclasses.dataclass
class Tally:
    """One attempt of a transfer, as the retry plan sees it afterwards."""

    offset: int = 0
    """Where in the body this attempt starts."""
    moved: int = 0
    """Body bytes this attempt sent (put) or received (get)."""
    paired: bool = False
    """The relay accepted the request (``100``, ``200`` or ``206``)."""


class Carry:
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


def put_flow(
    t: Target, body: Body, carry: Carry, idle: float | None, tally: Tally
) -> Flow[PutResult]:
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
    yield Send(conn.send(_request("PUT", t, head)))
    event = yield from _final_response(conn)  # no idle limit: the relay times pairing
    if isinstance(event, h11.Response):
        answer = yield from _small_body(conn)
        raise answer_error(event.status_code, answer)
    tally.paired = True
    yield Idle(idle)
    carry.start(body.length)
    hasher = body.hasher_at(offset) if offset else hashlib.sha256()
    try:
        for chunk in body.chunks_from(offset):
            if chunk:
                body.consumed = True
                hasher.update(chunk)
                yield Send(conn.send(h11.Data(data=chunk)))
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
        yield Send(conn.send(h11.EndOfMessage(headers=trailers)))
    except h11.LocalProtocolError as exc:
        raise TransferFailed(f"the source does not match its size: {exc}") from exc
    except OSError:
        pass  # the relay may have answered early (413, idle, 409...) and closed: read it
    event = yield from _final_response(conn)
    while isinstance(event, h11.InformationalResponse):
        event = yield from _final_response(conn)
    answer = yield from _small_body(conn)
    if event.status_code != 200:
        # E.g. 502 from a fan-out ticket some receivers did not get whole:
        # {"bytes":B,"error":"k of N receivers failed","receivers":N,"delivered":N-k}.
        cause = answer_error(event.status_code, answer)
        raise TransferFailed(
            f"the relay ended the upload: {event.status_code} {cause.message}",
            event.status_code,
            answer=_json_object(answer),
        ) from cause
    try:
        doc = json.loads(answer)
        relayed = int(doc["bytes"])
    except (ValueError, KeyError, TypeError) as exc:
        raise TransferFailed(f"unexpected answer from the relay: {quote(answer)}") from exc
    # A resumed relay reports the whole body; this attempt sent its tail.
    if relayed != offset + tally.moved:
        raise TransferFailed(f"the relay delivered {relayed} of {offset + tally.moved} bytes")
    return PutResult(bytes=relayed, digest=hasher.hexdigest(), answer=doc)


def get_flow(
    t: Target, sink: Sink, carry: Carry, idle: float | None, tally: Tally
) -> Flow[GetResult]:
    conn = h11.Connection(h11.CLIENT)
    offset = tally.offset
    extra = [("Accept-Encoding", "identity")]
    if offset:
        extra.append(("Range", f"bytes={offset}-"))
    yield Send(conn.send(_request("GET", t, extra)))
    event = yield from _final_response(conn)  # waits for pairing, which the relay times
    while isinstance(event, h11.InformationalResponse):
        event = yield from _final_response(conn)
    if event.status_code not in (200, 206) or (event.status_code == 206 and not offset):
        answer = yield from _small_body(conn)
        raise answer_error(event.status_code, answer)
    tally.paired = True
    yield Idle(idle)
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


def _json_object(body: bytes) -> dict[str, Any] | None:
    """``body`` as a JSON object, or None when it is not one."""
    try:
        doc = json.loads(body)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def quote(body: bytes) -> str:
    """The start of an unexpected answer as text (a bytes repr reads as code)."""
    return body[:200].decode("utf-8", "replace").strip() or "(empty)"
