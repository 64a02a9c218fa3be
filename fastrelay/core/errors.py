"""One small error tree, translated to HTTP in exactly one place.

Every error a client can see is a `RelayError` subclass that carries its HTTP
status and the exact response body. The bodies are byte-for-byte those of the
Go relay we are compatible with (README "Wire contract"), which is why there are
three body shapes:

* Go's ``http.Error`` text: ``text/plain; charset=utf-8``, ends in a newline;
* the relay's literal JSON (``{"error":"..."}``, no newline), used on
  ``/relay/{ticket}``;
* the mint endpoint's JSON encoder output (``{"error":"..."}`` + newline).

Core code raises; `server.connection` catches `RelayError` once and writes
``error.status`` and ``error.body()``. Errors that end a transfer after
pairing (upload aborted, download aborted, idle) are also `RelayError`s so a
library user sees one hierarchy on ``Relay.error``.
"""

from __future__ import annotations

import json

TEXT = "text/plain; charset=utf-8"
JSON = "application/json"

COMPACT_JSON = json.JSONEncoder(separators=(",", ":"))
"""Go's encoding/json shape (no spaces). One encoder for every answer:
json.dumps with options builds a new one per call."""


class RelayError(Exception):
    """Root of every error fastrelay reports. ``status`` is the HTTP meaning."""

    status = 500
    content_type = JSON
    closes = False
    """True when the connection must close after this answer whatever the
    request said: the stream is at an unknown place (a timed-out head) or
    the client may go on sending bytes that are not requests (CONNECT)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def body(self) -> bytes:
        """The exact response body for this error."""
        return COMPACT_JSON.encode({"error": self.message}).encode()

    def headers(self) -> list[tuple[str, str]]:
        """Header fields this answer needs beyond the content ones."""
        return []


class TextError(RelayError):
    """An error answered like Go's ``http.Error``: plain text plus a newline."""

    content_type = TEXT

    def body(self) -> bytes:
        return self.message.encode() + b"\n"


class MintError(RelayError):
    """An error of the mint endpoint: JSON encoder output, newline-terminated."""

    def body(self) -> bytes:
        return super().body() + b"\n"


# --- request-level errors (any path) -------------------------------------------


class BadRequest(TextError):
    status = 400

    def __init__(self, message: str = "bad request") -> None:
        super().__init__(message)


class NotFound(TextError):
    status = 404

    def __init__(self) -> None:
        super().__init__("404 page not found")


class MethodNotAllowed(TextError):
    status = 405

    def __init__(self, allow: str = "GET, PUT") -> None:
        super().__init__("method not allowed")
        self.allow = allow

    def headers(self) -> list[tuple[str, str]]:
        return [("Allow", self.allow)]


class ConnectRefused(BadRequest):
    """CONNECT asks for a tunnel, which a relay does not offer. The client may
    start its tunnel bytes right behind the head, so the connection closes
    after the answer rather than read them as requests."""

    closes = True

    def __init__(self) -> None:
        super().__init__("CONNECT is not supported")


class HeadTooLarge(TextError):
    status = 431

    def __init__(self) -> None:
        super().__init__("request header fields too large")


class RequestTimeout(TextError):
    """The request head did not arrive within ``header_timeout_s``."""

    status = 408
    closes = True

    def __init__(self) -> None:
        super().__init__("request timeout")


class NotImplementedFraming(TextError):
    status = 501

    def __init__(self) -> None:
        super().__init__("unsupported transfer-encoding")


class VersionNotSupported(TextError):
    status = 505

    def __init__(self) -> None:
        super().__init__("HTTP version not supported")


class InternalError(TextError):
    """A bug on our side; the client sees a plain 500, the log one line."""

    status = 500

    def __init__(self) -> None:
        super().__init__("internal server error")


# --- ticket errors (/relay/{ticket}, checks 1-4 of the wire contract) ------------------


class Unauthorized(TextError):
    status = 401

    def __init__(self) -> None:
        super().__init__("unauthorized")


class TicketNotFound(TextError):
    """Unknown, expired or already finished ticket (check 2)."""

    status = 410

    def __init__(self) -> None:
        super().__init__("ticket not found or expired")


class SideAlreadyClaimed(RelayError):
    """This side is held by a live request (check 3)."""

    status = 423

    def __init__(self, side: str) -> None:
        super().__init__(f"{side} side already claimed")
        self.side = side


class PairingTimeout(RelayError):
    """``expires_at`` passed while this side waited (check 4)."""

    status = 408

    def __init__(self, waiting_for: str) -> None:
        super().__init__(f"timed out waiting for {waiting_for} side")
        self.waiting_for = waiting_for


class Expired(RelayError):
    """``Relay.error`` of a ticket whose pairing deadline passed (Go ErrTimeout)."""

    status = 408

    def __init__(self) -> None:
        super().__init__("relay: timed out waiting for the other side")


class ShuttingDown(RelayError):
    status = 503

    def __init__(self) -> None:
        super().__init__("server shutting down")


# --- transfer errors: they end a paired relay ------------------------------------


class TransferError(RelayError):
    """A paired transfer failed. ``bytes`` is what reached the destination."""

    def __init__(self, message: str, forwarded: int = 0) -> None:
        super().__init__(message)
        self.forwarded = forwarded

    def body(self) -> bytes:
        # The seed formats this by hand ({"bytes":N,"error":%q}); a JSON
        # encoder gives the same bytes for our ASCII messages.
        return COMPACT_JSON.encode({"bytes": self.forwarded, "error": self.message}).encode()


class PayloadTooLarge(TransferError):
    """More than ``max_bytes`` was (or would be) uploaded."""

    status = 413

    def __init__(self, seen: int, limit: int, forwarded: int = 0) -> None:
        super().__init__(f"relay: payload exceeded MaxBytes ({seen} > {limit})", forwarded)
        self.seen = seen
        self.limit = limit


class UploadAborted(TransferError):
    """The source went away or sent a broken body mid-stream."""

    status = 400


class DownloadAborted(TransferError):
    """The destination went away mid-stream; the source gets a 500."""

    status = 500


class IdleTimeout(TransferError):
    """No byte moved for ``idle_timeout_s``."""

    status = 500


class ReceiversFailed(TransferError):
    """Fan-out: the upload is whole, but ``failed`` of ``receivers`` were
    dropped on the way (stalled or gone); the others got every byte."""

    status = 502

    def __init__(self, failed: int, receivers: int, forwarded: int) -> None:
        super().__init__(f"{failed} of {receivers} receivers failed", forwarded)
        self.receivers = receivers
        self.delivered = receivers - failed

    def body(self) -> bytes:
        return COMPACT_JSON.encode(
            {
                "bytes": self.forwarded,
                "error": self.message,
                "receivers": self.receivers,
                "delivered": self.delivered,
            }
        ).encode()


class TransferShutDown(TransferError):
    """The server stopped (drain timeout passed, or a second signal)."""

    status = 503


class UpstreamFailed(RelayError):
    """Told to a waiting GET whose upload was refused before any byte moved."""

    status = 502

    def __init__(self, cause: RelayError) -> None:
        reason = cause.message.removeprefix("relay: ")
        super().__init__(f"upload failed: {reason}")


# --- mint errors (POST /api/exec-gateway/relay/create) ---------------------------


class MintUnauthorized(Unauthorized):
    pass


class InvalidJSON(MintError):
    """A mint body Go's decoder would refuse: not JSON, not an object, or a
    known field of the wrong type.

    The message starts with Go's text, ``invalid JSON``, which byte-compatible
    clients match; ``detail`` follows it (``invalid JSON: ttl_seconds must be
    a whole number of seconds``) so the orchestrator learns what to fix.
    Details are our own fixed phrases, field names and positions, or the json
    module's own message: never text copied from the body. ``field`` is the
    JSON key at fault, or None when the body as a whole is."""

    status = 400

    PREFIX = "invalid JSON"

    def __init__(self, detail: str | None = None, field: str | None = None) -> None:
        super().__init__(f"{self.PREFIX}: {detail}" if detail else self.PREFIX)
        self.detail = detail
        self.field = field


class MissingIds(MintError):
    status = 400

    def __init__(self) -> None:
        super().__init__("workspace_id, source_exe_id, dest_exe_id required")


class WorkspaceCapReached(MintError):
    status = 429

    def __init__(self) -> None:
        super().__init__("relay: workspace concurrent relay cap reached")


class MintBodyTooLarge(MintError):
    status = 413

    def __init__(self) -> None:
        super().__init__("request body too large")


class MintDisabled(MintError):
    status = 503

    def __init__(self, why: str = "relay minting disabled") -> None:
        super().__init__(why)


class InvalidField(MintError):
    """A well-formed mint request with a field out of bounds. The message names
    the field so the orchestrator knows what to fix; ``field`` is its JSON key."""

    status = 400

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


# --- cluster errors (--redis-url, --ticket-key-file) -----------------------------


class ClusterUnavailable(MintError):
    """The shared cluster state (Redis) cannot be reached: nothing is decided
    without it. Transfers already paired are not affected."""

    status = 503

    def __init__(self) -> None:
        super().__init__("cluster state unavailable")


class ServedElsewhere(RelayError):
    """A signed ticket whose relay another live node is serving: the two
    sides of this ticket reached different nodes (a routing change)."""

    status = 421

    def __init__(self) -> None:
        super().__init__("relay: ticket is being served by another node")


# --- resumable relays (v2: "resumable": true) -------------------------------------


class LengthRequired(RelayError):
    """A resumable relay's PUT must declare its length (no chunked body)."""

    status = 411

    def __init__(self) -> None:
        super().__init__("resumable relay: the upload needs a Content-Length")


class RangeNotSatisfiable(RelayError):
    """A GET's ``Range`` starts at or past the end of the body."""

    status = 416

    def __init__(self, length: int) -> None:
        super().__init__(f"range not satisfiable: the body has {length} bytes")
        self.length = length

    def headers(self) -> list[tuple[str, str]]:
        return [("Content-Range", f"bytes */{self.length}")]


class ResumeFrom(RelayError):
    """This upload cannot give the destination the byte it needs next: send
    again from ``offset`` (``Upload-Offset``)."""

    status = 409

    def __init__(self, offset: int) -> None:
        super().__init__(f"resume from {offset}")
        self.offset = offset

    def body(self) -> bytes:
        return COMPACT_JSON.encode({"error": self.message, "offset": self.offset}).encode()

    def headers(self) -> list[tuple[str, str]]:
        return [("Upload-Offset", str(self.offset))]


class ResumeMismatch(RelayError):
    """A resumed upload does not describe the same body as the first."""

    status = 409

    def __init__(self, what: str) -> None:
        super().__init__(f"resumable relay: {what}")


class Superseded(TransferError):
    """A newer request took this side of a resumable relay over."""

    status = 409
