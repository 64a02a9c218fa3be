"""Request heads in, typed intents out; response heads built by hand.

Theory of operation
-------------------
h11 parses request heads and nothing else (runtime-facts §6): its body
decoding copies every byte, and its size limit only holds when a head arrives
in pieces. So the protocol finds the end of the head itself with
`find_head_end` (answering 431 when it is not within ``max_head_bytes``),
gives h11 exactly the head bytes, and takes the body from its own buffer.

`parse_head` turns the h11 `Request` into a `RequestHead`, and `route` maps
it to what the server should do, raising the `RelayError` the client should
see. Framing rules we enforce beyond h11:

* ``Content-Length`` together with ``Transfer-Encoding`` is refused (400):
  h11 would accept it and frame as chunked, a request-smuggling risk;
* only ``Transfer-Encoding: chunked`` is accepted (h11 answers 501 for others).

Responses are small and fixed in shape, so we format their heads directly
rather than drive h11's writer: a relay answers one request per connection
and never needs h11's state for that.

No IO here.
"""

from __future__ import annotations

import dataclasses
import enum
import http
import re

import h11

from .errors import (
    BadRequest,
    HeadTooLarge,
    MethodNotAllowed,
    NotFound,
    NotImplementedFraming,
    RelayError,
    VersionNotSupported,
)

RELAY_PREFIX = "/relay/"
MINT_PATH = "/api/exec-gateway/relay/create"
HEALTH_PATH = "/healthz"
METRICS_PATH = "/metrics"

# Control characters other than HTAB never belong in a field value (RFC 9110
# §5.5); h11 lets some through, and they are a classic injection vector.
_CONTROL_BYTES = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")

# Bodies bigger than this cannot be a real Content-Length (2**63 - 1, Go's int64).
MAX_CONTENT_LENGTH = 2**63 - 1


def find_head_end(buf: bytes | bytearray, max_head_bytes: int) -> int | None:
    """Index just past the blank line ending the head, or None if not yet seen.

    Raises `HeadTooLarge` once ``max_head_bytes`` have arrived without one.
    Bare-LF line ends are accepted, as h11 accepts them.
    """
    limit = max_head_bytes + 4
    crlf = buf.find(b"\r\n\r\n", 0, limit)
    lf = buf.find(b"\n\n", 0, limit)
    ends = [i + 4 for i in (crlf,) if i >= 0] + [i + 2 for i in (lf,) if i >= 0]
    end = min(ends) if ends else None
    if end is None or end > max_head_bytes:
        if end is not None or len(buf) >= max_head_bytes:
            raise HeadTooLarge()
        return None
    return end


class Route(enum.Enum):
    RELAY_PUT = "relay_put"
    RELAY_GET = "relay_get"
    MINT = "mint"
    HEALTH = "health"
    METRICS = "metrics"


@dataclasses.dataclass(frozen=True, slots=True)
class RequestHead:
    method: str
    path: str
    headers: dict[str, str]
    """Lower-cased names; the first value of a repeated field."""
    content_length: int | None
    chunked: bool
    expect_continue: bool
    keep_alive: bool

    def header(self, name: str) -> str | None:
        return self.headers.get(name)

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)


def parse_head(raw: bytes) -> RequestHead:
    """Parse one complete request head (through its blank line).

    Raises a `RelayError` (400, 431, 501) for anything malformed.
    """
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=len(raw) + 1)
    try:
        conn.receive_data(raw)
        event = conn.next_event()
    except h11.RemoteProtocolError as exc:
        raise _map_h11_error(exc) from exc
    if not isinstance(event, h11.Request):  # NEED_DATA: the caller cut the head wrong
        raise BadRequest()
    if event.http_version not in (b"1.0", b"1.1"):
        raise VersionNotSupported()

    headers: dict[str, str] = {}
    content_lengths: list[bytes] = []
    transfer_encodings: list[bytes] = []
    connection_tokens: list[bytes] = []
    expect = False
    for name, value in event.headers:
        if _CONTROL_BYTES.search(value):
            raise BadRequest("invalid header value")
        if name == b"content-length":
            content_lengths.append(value)
        elif name == b"transfer-encoding":
            transfer_encodings.append(value.lower())
        elif name == b"connection":
            connection_tokens.extend(t.strip().lower() for t in value.split(b","))
        elif name == b"expect" and value.lower() == b"100-continue":
            expect = True
        key = name.decode("ascii")
        if key not in headers:
            headers[key] = value.decode("latin-1")

    if content_lengths and transfer_encodings:
        raise BadRequest("both Content-Length and Transfer-Encoding")
    chunked = False
    if transfer_encodings:
        if transfer_encodings != [b"chunked"]:
            raise NotImplementedFraming()
        chunked = True
    content_length: int | None = None
    if content_lengths:
        # h11 already refused non-digits and conflicting duplicates.
        content_length = int(content_lengths[0])
        if content_length > MAX_CONTENT_LENGTH:
            raise BadRequest("Content-Length too large")

    version = event.http_version
    if version == b"1.0":
        keep_alive = b"keep-alive" in connection_tokens
    else:
        keep_alive = b"close" not in connection_tokens
    target = event.target.decode("ascii", "replace")
    path = target.split("?", 1)[0]
    return RequestHead(
        method=event.method.decode("ascii"),
        path=path,
        headers=headers,
        content_length=content_length,
        chunked=chunked,
        expect_continue=expect and version == b"1.1",
        keep_alive=keep_alive,
    )


def _map_h11_error(exc: h11.RemoteProtocolError) -> RelayError:
    hint = exc.error_status_hint
    if hint == 431:
        return HeadTooLarge()
    if hint == 501:
        return NotImplementedFraming()
    return BadRequest()


def route(head: RequestHead) -> tuple[Route, str | None]:
    """What the request asks for, and the URL ticket for relay routes."""
    path, method = head.path, head.method
    if path.startswith(RELAY_PREFIX):
        ticket = path[len(RELAY_PREFIX) :]
        if not ticket or "/" in ticket:
            raise NotFound()
        if method == "PUT":
            return Route.RELAY_PUT, ticket
        if method == "GET":
            return Route.RELAY_GET, ticket
        raise MethodNotAllowed("GET, PUT")
    if path == MINT_PATH:
        if method != "POST":
            raise MethodNotAllowed("POST")
        return Route.MINT, None
    if path in (HEALTH_PATH, METRICS_PATH):
        if method != "GET":
            raise MethodNotAllowed("GET")
        return (Route.HEALTH if path == HEALTH_PATH else Route.METRICS), None
    raise NotFound()


# --- responses ---------------------------------------------------------------------

_REASONS = {s.value: s.phrase for s in http.HTTPStatus}
_REASONS[423] = "Locked"

CONTINUE_100 = b"HTTP/1.1 100 Continue\r\n\r\n"


def response_head(
    status: int,
    headers: list[tuple[str, str]],
    *,
    close: bool,
) -> bytes:
    """An HTTP/1.1 status line and header block, blank line included."""
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, '')}"]
    lines.extend(f"{k}: {v}" for k, v in headers)
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def simple_response(
    status: int,
    content_type: str,
    body: bytes,
    *,
    close: bool,
    extra: list[tuple[str, str]] | None = None,
) -> bytes:
    """A whole response with a fixed-length body."""
    headers = [("Content-Type", content_type), ("Content-Length", str(len(body)))]
    if content_type.startswith("text/plain"):
        headers.append(("X-Content-Type-Options", "nosniff"))
    if extra:
        headers.extend(extra)
    return response_head(status, headers, close=close) + body


def error_response(err: RelayError, *, close: bool) -> bytes:
    extra = [("Allow", err.allow)] if isinstance(err, MethodNotAllowed) else None
    return simple_response(err.status, err.content_type, err.body(), close=close, extra=extra)


def download_head(
    content_type: str | None, content_disposition: str | None, content_length: int | None
) -> bytes:
    """The GET's 200 head. A known length is passed on; otherwise chunked.

    Never a close-delimited body: curl cannot tell a truncated one from a
    complete one (runtime-facts §7).
    """
    headers = [("Content-Type", content_type or "application/octet-stream")]
    if content_disposition:
        headers.append(("Content-Disposition", content_disposition))
    if content_length is None:
        headers.append(("Transfer-Encoding", "chunked"))
    else:
        headers.append(("Content-Length", str(content_length)))
    return response_head(200, headers, close=True)
