"""What the relay's answers mean to a client: the results of mint, put and
get, the errors an answer maps to (`answer_error`, the one place HTTP
answers become exceptions), and the RFC 9530 ``Repr-Digest`` field.

Pure: no socket and no file; `api` does the talking.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import datetime as dt
import json
import re
import socket
import ssl
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from ..core import errors

# The HTTP meaning of a failure the relay never answered (reset, truncated
# body, corrupt bytes): the upstream (the relay) gave an invalid response.
BAD_GATEWAY = 502


# --- results and errors -----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MintResult:
    ticket: str
    upload_url: str
    download_url: str
    expires_at: dt.datetime
    resumable: bool = False
    """True when the relay confirmed ``"resumable": true`` (asked with
    ``mint(..., resumable=True)``): a break of either side can be resumed.
    False from a relay that does not know the option (it ignores it)."""
    receivers: int = 1
    """How many GETs each receive the whole upload, as the relay echoed it
    (asked with ``mint(..., receivers=N)``). 1 when the mint asked for no v2
    option (the relay then answers as v1 and echoes nothing), and from a
    relay that does not know fan-out (it ignores the field)."""
    max_rate: int = 0
    """The ticket's pace in bytes per second as the relay echoed it: the
    rate asked for, lowered to the relay's ``--max-rate`` if above it, or
    that ``--max-rate`` when none was asked. 0: unlimited, and also when the
    mint asked for no v2 option (no echo) or the relay does not know pacing."""


@dataclasses.dataclass(frozen=True)
class PutResult:
    bytes: int
    """Bytes the relay reports handed to the destination."""
    digest: str
    """Hex sha-256 of what was sent."""
    answer: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    """The relay's JSON answer as sent (``{"bytes":N,"status":"ok"}``, plus
    ``"sha256"`` from a relay run with ``--audit-digest``, ``"resumes"`` on
    a resumable ticket, ``"receivers"`` and ``"delivered"`` on a fan-out
    ticket)."""


@dataclasses.dataclass(frozen=True)
class GetResult:
    bytes: int
    digest: str
    """Hex sha-256 of what was received."""
    verified: bool
    """True when the response carried a sha-256 ``Repr-Digest`` and it matched."""


class RelayRefused(errors.RelayError):
    """An error answer with no more specific class; ``status`` is the answer's."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class TransferFailed(errors.RelayError):
    """The transfer started but did not complete.

    The connection broke, the body ended short, or (for ``put``) the relay
    answered an error after body bytes were sent; then ``status`` is that
    answer's status and ``__cause__`` the mapped relay error. Otherwise
    ``status`` is 502.

    ``broke`` is True when the connection broke (reset, closed early, timed
    out, or could not be made again): what ``retries`` retries, since on a
    resumable ticket the relay keeps the other side waiting. It is False
    for a failure a retry cannot mend (an error answer, a local check).

    ``answer`` is the relay's JSON answer to an upload it had accepted
    (``{"bytes":N,"error":"..."}``; on a fan-out ticket that some receivers
    did not get whole, ``{"bytes":N,"error":"k of N receivers failed",
    "receivers":N,"delivered":N-k}``), None when there was none.
    """

    def __init__(
        self,
        message: str,
        status: int = BAD_GATEWAY,
        *,
        broke: bool = False,
        answer: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.broke = broke
        self.answer = answer


class RelayUnreachable(TransferFailed):
    """No connection to the relay: refused, unknown host, timed out, or the
    TLS handshake failed. Nothing was sent on the ticket's behalf."""

    def __init__(self, address: str, reason: str, *, untrusted: bool = False) -> None:
        super().__init__(f"cannot reach the relay at {address}: {reason}", broke=True)
        self.address = address
        self.reason = reason
        self.untrusted = untrusted
        """True when the relay's TLS certificate failed verification."""


def describe_os_error(exc: BaseException) -> str:
    """A socket or TLS error in words, without its Python repr.

    ``str(ConnectionRefusedError(...))`` is ``[Errno 111] Connection refused``
    and an ``ssl`` error carries ``(_ssl.c:1000)``: neither helps a user.
    """
    if isinstance(exc, ssl.SSLCertVerificationError):
        detail = exc.verify_message or exc.reason or "verification failed"
        return f"its TLS certificate is not trusted ({detail})"
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed ({exc.reason or exc.__class__.__name__})"
    if isinstance(exc, socket.gaierror):
        return f"unknown host ({exc.strerror})" if exc.strerror else "unknown host"
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror[:1].lower() + exc.strerror[1:]
    text = str(exc)
    return text if text else exc.__class__.__name__


class DigestMismatch(errors.RelayError):
    """The bytes received do not match the ``Repr-Digest`` sent with them."""

    status = BAD_GATEWAY

    def __init__(self, expected: str, actual: str) -> None:
        super().__init__(f"sha-256 mismatch: expected {expected}, received {actual}")
        self.expected = expected
        self.actual = actual


@dataclasses.dataclass(frozen=True)
class RetryNotice:
    """A broken transfer about to be retried (``put``/``get`` with
    ``retries``, reported to ``on_retry`` before the wait)."""

    error: TransferFailed
    """What broke."""
    at: int
    """Bytes of the body moved when it broke (sent by ``put``; in the file,
    or written, for ``get``)."""
    retry: int
    """This retry's number among consecutive attempts that moved no byte
    (1 after an attempt that moved bytes)."""
    retries: int
    """The most such retries (the ``retries`` argument)."""
    delay: float
    """Seconds waited before the retry."""


class Progress(Protocol):
    """Receives transfer progress (the CLI draws a bar with it)."""

    def start(self, total: int | None) -> None:
        """The body starts moving; ``total`` is its size when known."""

    def advance(self, n: int) -> None:
        """``n`` more bytes moved."""


class NoProgress:
    def start(self, total: int | None) -> None:
        pass

    def advance(self, n: int) -> None:
        pass


# --- error mapping: the one place HTTP answers become exceptions -----------------


def _answer_message(body: bytes) -> str:
    text = body.decode("utf-8", "replace").strip()
    try:
        doc = json.loads(text)
    except ValueError:
        return text
    if isinstance(doc, dict) and isinstance(doc.get("error"), str):
        return str(doc["error"])
    return text


def _forwarded(body: bytes) -> int:
    """The ``bytes`` field of a transfer error body, else 0."""
    with contextlib.suppress(ValueError):
        doc = json.loads(body)
        if isinstance(doc, dict) and isinstance(doc.get("bytes"), int):
            return int(doc["bytes"])
    return 0


def _resume_offset(body: bytes) -> int | None:
    """The ``offset`` of a resumable relay's 409 ``{"error":"resume from P","offset":P}``."""
    with contextlib.suppress(ValueError):
        doc = json.loads(body)
        if isinstance(doc, dict) and type(doc.get("offset")) is int and doc["offset"] >= 0:
            return int(doc["offset"])
    return None


def answer_error(status: int, body: bytes, *, mint: bool = False) -> errors.RelayError:
    """The exception for an error answer of the relay (status, body)."""
    message = _answer_message(body)
    err: errors.RelayError
    if status == 401:
        err = errors.MintUnauthorized() if mint else errors.Unauthorized()
    elif status == 410:
        err = errors.TicketNotFound()
    elif status == 423:
        m = re.match(r"(\w+) side already claimed", message)
        err = errors.SideAlreadyClaimed(m.group(1) if m else "this")
    elif status == 408:
        m = re.search(r"waiting for (\w+) side", message)
        err = errors.PairingTimeout(m.group(1) if m else "other")
    elif status == 413 and mint:
        err = errors.MintBodyTooLarge()
    elif status == 413:
        m = re.search(r"\((\d+) > (\d+)\)", message)
        seen, limit = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
        err = errors.PayloadTooLarge(seen, limit, _forwarded(body))
    elif status == 429:
        err = errors.WorkspaceCapReached()
    elif status == 409 and (offset := _resume_offset(body)) is not None:
        # A resumable relay: "send again from offset" (Upload-Offset; the
        # body carries the same number).
        err = errors.ResumeFrom(offset)
    else:
        return RelayRefused(status, message or f"HTTP {status}")
    if message and message != err.message:
        # Keep the relay's own words; the class gives the meaning.
        err.message = message
        err.args = (message,)
    return err


# --- digests ------------------------------------------------------------------


def format_repr_digest(sha256: bytes) -> str:
    """RFC 9530 ``Repr-Digest`` field value for a sha-256 digest."""
    return f"sha-256=:{base64.b64encode(sha256).decode()}:"


def parse_repr_digest(values: Iterable[str]) -> bytes | None:
    """The sha-256 of ``Repr-Digest`` field values, or None if none is sha-256.

    Other algorithms are ignored; a malformed sha-256 member fails as a
    mismatch would, because we cannot vouch for the bytes.
    """
    for value in values:
        for member in value.split(","):
            name, _, rest = member.partition("=")
            if name.strip().lower() != "sha-256":
                continue
            item = rest.split(";", 1)[0].strip()
            try:
                if not (len(item) >= 2 and item[0] == item[-1] == ":"):
                    raise ValueError(item)
                digest = base64.b64decode(item[1:-1], validate=True)
            except (ValueError, binascii.Error):
                raise DigestMismatch(f"a malformed value {item!r}", "?") from None
            if len(digest) != 32:
                raise DigestMismatch(f"a {len(digest)}-byte value", "?")
            return digest
    return None
