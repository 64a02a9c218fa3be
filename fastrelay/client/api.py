"""A typed client for a fastrelay server: mint, upload (PUT), download (GET).

``Client`` (blocking) and ``AsyncClient`` (asyncio) have the same methods and
share everything but socket I/O:

* **mint** goes through httpx (a small JSON request/response, where httpx's
  connection pooling and TLS settings are what we want);
* **put/get** are written as *sans-IO flows* on h11 (`flows`): generators
  that yield "send these bytes" / "give me the next bytes" / "set the idle
  timeout" and receive the results. ``_drive_sync`` and ``_drive_async``
  here are the only two pieces of code that touch a socket. httpx cannot be used here because it
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
import contextlib
import datetime as dt
import json
import logging
import math
import random
import re
import socket
import ssl
import time
import urllib.parse
from collections.abc import Callable, Generator
from typing import Any, NamedTuple, TypeAlias, TypeVar

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
)
from .flows import (
    CHUNK_SIZE,
    Body,
    Carry,
    Dest,
    Flow,
    Recv,
    Send,
    Sink,
    Source,
    Tally,
    Target,
    get_flow,
    open_source,
    parse_relay_url,
    put_flow,
    quote,
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
BACKOFF = 0.5
"""First wait before a retry, seconds; each retry that follows an attempt
that moved no byte waits twice as long, up to `BACKOFF_CAP`."""
BACKOFF_CAP = 8.0
_log = logging.getLogger("fastrelay.client")

T = TypeVar("T")


# --- TLS ---------------------------------------------------------------------------


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


# --- the two drivers: the only code that touches a socket --------------------------


def _unreachable(t: Target, exc: OSError) -> RelayUnreachable:
    untrusted = isinstance(exc, ssl.SSLCertVerificationError)
    return RelayUnreachable(f"{t.host}:{t.port}", describe_os_error(exc), untrusted=untrusted)


def _drive_sync(t: Target, ctx: ssl.SSLContext, timeout: float | None, flow: Flow[T]) -> T:
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
                if isinstance(op, Send):
                    sock.sendall(op.data)
                elif isinstance(op, Recv):
                    reply = sock.recv(CHUNK_SIZE)
                else:
                    sock.settimeout(op.seconds)
            except OSError as exc:
                error = exc
            try:
                op = flow.throw(error) if error is not None else flow.send(reply)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]


async def _drive_async(t: Target, ctx: ssl.SSLContext, timeout: float | None, flow: Flow[T]) -> T:
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
                if isinstance(op, Send):
                    writer.write(op.data)
                    await asyncio.wait_for(writer.drain(), idle)
                elif isinstance(op, Recv):
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
    flow: Flow[Any]


class _Sleep(NamedTuple):
    seconds: float


# A plan yields attempts (run by a driver: their result is sent back, their
# RelayError thrown in) and waits, and returns the transfer's result. Like
# the flows, it is the same code for Client and AsyncClient.
_Plan: TypeAlias = Generator[_Attempt | _Sleep, Any, T]


def _run_sync(t: Target, ctx: ssl.SSLContext, timeout: float | None, plan: _Plan[T]) -> T:
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


async def _run_async(t: Target, ctx: ssl.SSLContext, timeout: float | None, plan: _Plan[T]) -> T:
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

    def after(self, exc: errors.RelayError, tally: Tally, at: int, cannot: str | None) -> float:
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
    t: Target, body: Body, progress: Progress, idle: float | None, retrier: _Retrier
) -> _Plan[PutResult]:
    carry = Carry(progress)
    offset = 0
    while True:
        tally = Tally(offset)
        try:
            result: PutResult = yield _Attempt(put_flow(t, body, carry, idle, tally))
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
    t: Target, sink: Sink, progress: Progress, idle: float | None, retrier: _Retrier
) -> _Plan[GetResult]:
    carry = Carry(progress)
    while True:
        # After a break: ask for the rest of what the file holds.
        tally = Tally(sink.position() if retrier.broken is not None else 0)
        try:
            result: GetResult = yield _Attempt(get_flow(t, sink, carry, idle, tally))
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
    receivers: int = 1,
    max_rate: int = 0,
) -> tuple[dict[str, str], dict[str, Any]]:
    # Checked here, before any request: the relay would answer 400 anyway.
    if isinstance(receivers, bool) or not isinstance(receivers, int) or receivers < 1:
        raise ValueError(f"receivers must be a whole number, at least 1 (got {receivers!r})")
    if isinstance(max_rate, bool) or not isinstance(max_rate, int) or max_rate < 0:
        raise ValueError(
            f"max_rate must be a whole number of bytes per second, 0 or more (got {max_rate!r})"
        )
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
    # The v2 options go only when not their default: a plain mint stays a
    # v1 request (and gets the v1 answer), byte for byte.
    if resumable:
        payload["resumable"] = True
    if receivers != 1:
        payload["receivers"] = receivers
    if max_rate:
        payload["max_rate"] = max_rate
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
            receivers=_echoed(doc, "receivers", 1),
            max_rate=_echoed(doc, "max_rate", 0),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise RelayRefused(status, f"unexpected mint answer: {quote(body)}") from exc


def _echoed(doc: dict[str, Any], field: str, default: int) -> int:
    """A v2 option as the mint answer echoed it; ``default`` when it did not
    (a mint that asked for no option, a relay that does not know it)."""
    value = doc.get(field, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{field}: {value!r}")  # an answer we cannot read
    return value


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


def _put_parts(url: str, source: Source) -> tuple[Target, Body]:
    target = parse_relay_url(url)  # before opening: a bad URL leaks no file
    return target, open_source(source)


def _get_parts(url: str, dest: Dest) -> tuple[Target, Sink]:
    return parse_relay_url(url), Sink(dest)


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
        receivers: int = 1,
        max_rate: int = 0,
    ) -> MintResult:
        """Mint a ticket. ``resumable``: it survives broken connections;
        ``receivers``: that many GETs each receive the whole upload (1..the
        relay's ``--max-receivers``); ``max_rate``: its pace in bytes per
        second (0: the relay's ``--max-rate``, else unlimited). Options left
        at their default are not sent: the request is then a v1 mint."""
        url = _mint_url(self.base_url)
        headers, payload = _mint_request(
            self._secret,
            workspace_id,
            source_exe_id,
            dest_exe_id,
            ttl,
            max_bytes,
            resumable,
            receivers,
            max_rate,
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
        sink.open()  # before the GET: see Sink.open
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
        receivers: int = 1,
        max_rate: int = 0,
    ) -> MintResult:
        """Mint a ticket. ``resumable``: it survives broken connections;
        ``receivers``: that many GETs each receive the whole upload (1..the
        relay's ``--max-receivers``); ``max_rate``: its pace in bytes per
        second (0: the relay's ``--max-rate``, else unlimited). Options left
        at their default are not sent: the request is then a v1 mint."""
        url = _mint_url(self.base_url)
        headers, payload = _mint_request(
            self._secret,
            workspace_id,
            source_exe_id,
            dest_exe_id,
            ttl,
            max_bytes,
            resumable,
            receivers,
            max_rate,
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
        sink.open()  # before the GET: see Sink.open
        plan = _get_plan(target, sink, progress or NoProgress(), self._timeout, retrier)
        try:
            result = await _run_async(target, self._ssl, self._timeout, plan)
            sink.commit()
        except BaseException:
            sink.abort()
            raise
        return result
