"""Request heads in, typed intents out; response heads built by hand.

Theory of operation
-------------------
h11 parses request heads and nothing else (docs/runtime-facts.md §6): its body
decoding copies every byte, and its size limit only holds when a head arrives
in pieces. So the protocol finds the end of the head itself with
`find_head_end` (answering 431 when it is not within ``max_head_bytes``),
gives h11 exactly the head bytes, and takes the body from its own buffer.

There is exactly one framing: `find_head_end` cuts a head where h11 would
(the first ``\n\r?\n``), and `parse_head` checks that h11 consumed exactly
those bytes. Wherever the two could disagree the request is refused, and
the caller closes the connection (a property test in tests/unit feeds
arbitrary byte streams, split anywhere, and compares with h11).

`parse_head` turns the h11 `Request` into a `RequestHead`, and `route` maps
it to what the server should do, raising the `RelayError` the client should
see. Rules we enforce beyond h11, each a 400 (nginx-style):

* obsolete line folding anywhere in a head (h11 joins folded lines);
* a second ``Authorization``, ``Content-Length``, ``Transfer-Encoding``,
  ``Host``, ``Content-Type``, ``Content-Disposition`` or ``Expect`` field,
  or a Content-Length list (h11 merges ``5, 5``);
* ``Content-Length`` together with ``Transfer-Encoding`` (h11 would frame
  as chunked, a front proxy may not);
* ``Transfer-Encoding`` in an HTTP/1.0 request (RFC 9112 §6.1);
* (also a singleton: ``Repr-Digest``, which is copied to the GET);
* control characters in a field value.

Only ``Transfer-Encoding: chunked`` is accepted (501 for others). Copied
headers (``Content-Type``, ``Content-Disposition``, ``Repr-Digest``) that are
not visible ASCII are dropped, and their names reported in
``RequestHead.dropped``.

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
    ConnectRefused,
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
# §5.5); h11 lets some through (its field-vchar is "not NUL, not white
# space"), and they are a classic injection vector. Of the controls, only
# the ones h11 accepts can be in a head it parsed: one scan of the whole head
# finds them (CR and LF end lines; names and the target admit none).
_CONTROL_BYTES = re.compile(rb"[\x00-\x08\x0e-\x1f\x7f]")

# h11's own end-of-head rule (see find_head_end).
_HEAD_END = re.compile(rb"\n\r?\n")

# A header line that starts with SP or HTAB continues the previous one
# (obs-fold, RFC 9112 §5.2). h11 joins such lines; we refuse them outright,
# as nginx does: a folded Transfer-Encoding or Content-Length is read
# differently by different parsers.
_OBS_FOLD = re.compile(rb"\n[ \t]")

# Fields that must appear at most once. Two Authorization headers let a
# proxy check one and us use the other; two framing or Host fields are the
# classic smuggling pair.
_SINGLETONS = frozenset(
    {
        b"authorization",
        b"content-length",
        b"transfer-encoding",
        b"host",
        b"content-type",
        b"content-disposition",
        b"repr-digest",
        b"expect",
    }
)

_SINGLETON_LINE = re.compile(
    rb"\n(" + b"|".join(sorted(_SINGLETONS)) + rb"):([^\n]*)", re.IGNORECASE
)

# Headers copied from the PUT onto the GET's answer must be visible ASCII
# (VCHAR and SP): anything else is dropped rather than relayed to a client
# that may interpret it differently.
_VISIBLE_ASCII = re.compile(rb"[\x20-\x7e]*")
COPIED_HEADERS = ("content-type", "content-disposition", "repr-digest")
# Of a chunked upload's trailer fields, only these reach the chunked GET:
# the end-to-end digest (RFC 9530) that `fastrelay put` sends for a stream.
COPIED_TRAILERS = ("repr-digest",)

# Bodies bigger than this cannot be a real Content-Length (2**63 - 1, Go's int64).
MAX_CONTENT_LENGTH = 2**63 - 1


def find_head_end(buf: bytes | bytearray, max_head_bytes: int) -> int | None:
    """Index just past the blank line ending the head, or None if not yet seen.

    The end of a head is exactly where h11 puts it: just past the first
    ``\n\r?\n`` (h11 ``_receivebuffer.blank_line_regex``). Any other rule
    (say, ``\r\n\r\n`` or ``\n\n`` only) disagrees with h11 on a head whose
    last line ends in a bare LF followed by CRLF, and two parsers that
    disagree on where a request ends are a request-smuggling hole.
    `parse_head` then checks that h11 consumed exactly these bytes.

    Raises `HeadTooLarge` once ``max_head_bytes`` have arrived without one.
    """
    match = _HEAD_END.search(buf, 0, max_head_bytes)
    if match is None:
        if len(buf) >= max_head_bytes:
            raise HeadTooLarge()
        return None
    return match.end()


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
    """Lower-cased names; every name appears once (see `_SINGLETONS`), or,
    for a repeatable field, its first value."""
    content_length: int | None
    chunked: bool
    expect_continue: bool
    keep_alive: bool
    http10: bool = False
    """An HTTP/1.0 request: its answer must not be chunked."""
    dropped: tuple[str, ...] = ()
    """Names of `COPIED_HEADERS` refused for not being visible ASCII."""

    def header(self, name: str) -> str | None:
        return self.headers.get(name)

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)


def parse_head(raw: bytes) -> RequestHead:
    """Parse one complete request head (through its blank line, as cut by
    `find_head_end`).

    Raises a `RelayError` (400, 431, 501, 505) for anything malformed or
    ambiguous; a caller must then close the connection, since the request's
    extent is in doubt.
    """
    if _OBS_FOLD.search(raw):
        raise BadRequest("obsolete line folding")
    _refuse_repeated_singletons(raw)
    try:
        event, left_over = h11_request(raw)
    except h11.ProtocolError as exc:
        raise _map_h11_error(exc) from exc
    if event is None:  # NEED_DATA: the caller cut the head wrong
        raise BadRequest()
    if left_over:
        # h11 ended the head before our cut: the two framings disagree.
        raise BadRequest("ambiguous request framing")
    if event.http_version not in (b"1.0", b"1.1"):
        raise VersionNotSupported()
    if _CONTROL_BYTES.search(raw):
        raise BadRequest("invalid header value")
    http10 = event.http_version == b"1.0"

    headers: dict[str, str] = {}
    content_length: int | None = None
    transfer_encoding: bytes | None = None
    connection_tokens: list[bytes] = []
    dropped: list[str] = []
    expect = False
    for name, value in event.headers:
        key = name.decode("ascii")
        if key in headers:
            continue  # a repeatable field: keep the first value
        if name == b"content-length":
            # h11 refused non-digits and conflicting values.
            content_length = int(value)
            if content_length > MAX_CONTENT_LENGTH:
                raise BadRequest("Content-Length too large")
        elif name == b"transfer-encoding":
            transfer_encoding = value.lower()
        elif name == b"connection":
            connection_tokens.extend(t.strip().lower() for t in value.split(b","))
        elif name == b"expect":
            expect = value.lower() == b"100-continue"
        elif key in COPIED_HEADERS and _VISIBLE_ASCII.fullmatch(value) is None:
            dropped.append(key)
            continue
        headers[key] = value.decode("latin-1")

    chunked = False
    if transfer_encoding is not None:
        if content_length is not None:
            # h11 would frame this as chunked; a front proxy may use the
            # length. Refuse rather than pick one (RFC 9112 §6.3).
            raise BadRequest("both Content-Length and Transfer-Encoding")
        if http10:
            # RFC 9112 §6.1: Transfer-Encoding in a 1.0 request is faulty framing.
            raise BadRequest("Transfer-Encoding in an HTTP/1.0 request")
        if transfer_encoding != b"chunked":
            raise NotImplementedFraming()
        chunked = True

    # HTTP/1.0 closes unless asked not to; 1.1 keeps unless asked to close.
    keep_alive = b"keep-alive" in connection_tokens if http10 else b"close" not in connection_tokens
    path = _target_path(event.target.decode("ascii", "replace"))
    return RequestHead(
        method=event.method.decode("ascii"),
        path=path,
        headers=headers,
        content_length=content_length,
        chunked=chunked,
        expect_continue=expect and not http10,
        keep_alive=keep_alive,
        http10=http10,
        dropped=tuple(dropped),
    )


# An absolute-form target (RFC 9112 §3.2.2): scheme, "://", authority. A
# server MUST accept it; we route on its path and ignore the authority (the
# ticket in the path is the whole credential, wherever the request says it
# is going).
_ABSOLUTE_FORM = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*")


def _target_path(target: str) -> str:
    """The path of a request target, without its query: origin-form as is,
    absolute-form without its scheme and authority (``/`` if it has no path)."""
    match = _ABSOLUTE_FORM.match(target)
    if match is not None:
        target = target[match.end() :]
        if not target.startswith("/"):
            target = "/" + target
    return target.split("?", 1)[0]


def _refuse_repeated_singletons(raw: bytes) -> None:
    """400 if a `_SINGLETONS` field appears twice, or Content-Length is a list.

    Done on the raw lines because h11 silently merges equal Content-Length
    fields and answers 501 (not 400) for a second Transfer-Encoding. One
    regex pass finds every singleton line (a name is what precedes the
    line's first colon, as h11 reads it).
    """
    found = _SINGLETON_LINE.findall(raw)
    if not found:
        return
    seen: set[bytes] = set()
    for name, value in found:
        name = name.lower()
        if name == b"content-length" and b"," in value:
            # h11 reads "5, 5" as 5; a list is as ambiguous as two fields.
            raise BadRequest("Content-Length is a list")
        if name in seen:
            raise BadRequest(f"repeated {name.decode('ascii')} header")
        seen.add(name)


def h11_request_via_connection(raw: bytes) -> tuple[h11.Request | None, bool]:
    """h11's public API: a server `h11.Connection` fed ``raw``. Returns the
    request (None if h11 wants more bytes) and whether bytes were left over."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=len(raw) + 1)
    conn.receive_data(raw)
    event = conn.next_event()
    request = event if isinstance(event, h11.Request) else None
    return request, bool(conn.trailing_data[0])


def _h11_request_via_reader(raw: bytes) -> tuple[h11.Request | None, bool]:
    """The same, through the request reader that `h11.Connection` itself runs
    for a new client request, without the connection and its state machine
    around it: ~20 us instead of ~28 us a head (three heads per relay).
    tests/unit/test_head_framing.py checks both agree on every input."""
    buf = _ReceiveBuffer()
    buf += raw
    event = _read_request(buf)
    return (event if isinstance(event, h11.Request) else None), len(buf) > 0


try:  # h11 internals: fall back to the public API if a release moves them
    from h11._readers import maybe_read_from_IDLE_client as _read_request
    from h11._receivebuffer import ReceiveBuffer as _ReceiveBuffer
except ImportError:  # pragma: no cover - depends on the installed h11
    h11_request = h11_request_via_connection
else:
    h11_request = _h11_request_via_reader


def _map_h11_error(exc: h11.ProtocolError) -> RelayError:
    hint = exc.error_status_hint
    if hint == 431:
        return HeadTooLarge()
    if hint == 501:
        return NotImplementedFraming()
    return BadRequest()


def route(head: RequestHead) -> tuple[Route, str | None]:
    """What the request asks for, and the URL ticket for relay routes."""
    path, method = head.path, head.method
    if method == "CONNECT":
        raise ConnectRefused()
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
    head_only: bool = False,
) -> bytes:
    """A whole response with a fixed-length body (just the head for HEAD)."""
    headers = [("Content-Type", content_type), ("Content-Length", str(len(body)))]
    if content_type.startswith("text/plain"):
        headers.append(("X-Content-Type-Options", "nosniff"))
    if extra:
        headers.extend(extra)
    head = response_head(status, headers, close=close)
    # A HEAD answer never has a body (RFC 9110 §9.3.2): bytes after its head
    # would be read as the start of the next response.
    return head if head_only else head + body


def error_response(err: RelayError, *, close: bool, head_only: bool = False) -> bytes:
    extra = err.headers() or None
    return simple_response(
        err.status, err.content_type, err.body(), close=close, extra=extra, head_only=head_only
    )


def download_head(
    copied: list[tuple[str, str]],
    content_length: int | None,
    *,
    close_delimited: bool = False,
    close: bool = False,
    content_range: tuple[int, int] | None = None,
) -> bytes:
    """The GET's 200 head: the PUT's `COPIED_HEADERS` (``copied``), and the
    PUT's length when known, else chunked.

    A close-delimited body (``close_delimited``: only for an HTTP/1.0 client,
    which cannot read chunks) ends at our close; its failure is a reset. It
    is never used otherwise: a client cannot tell a truncated close-delimited
    body from a complete one unless the connection is reset (docs/runtime-facts.md
    §7). Success answers announce ``Connection: close`` only when the
    connection will not take another request (``close``: the GET's own body
    was not read, or it asked to close); otherwise it stays open.

    ``content_range`` ``(first, complete_length)`` makes it a ``206`` for a
    resumed download (``Content-Range: bytes first-(L-1)/L``).
    """
    given = dict(copied)
    headers = [("Content-Type", given.pop("content-type", None) or "application/octet-stream")]
    headers.extend((_HEADER_CASE.get(name, name), value) for name, value in given.items())
    if close_delimited:
        pass
    elif content_length is None:
        headers.append(("Transfer-Encoding", "chunked"))
    else:
        headers.append(("Content-Length", str(content_length)))
    status = 200
    if content_range is not None:
        first, whole = content_range
        headers.append(("Content-Range", f"bytes {first}-{whole - 1}/{whole}"))
        status = 206
    return response_head(status, headers, close=close_delimited or close)


_HEADER_CASE = {"content-disposition": "Content-Disposition", "repr-digest": "Repr-Digest"}


def last_chunk(trailers: list[tuple[str, bytes]]) -> bytes:
    """The end of a chunked body, with the `COPIED_TRAILERS` among ``trailers``
    that are visible ASCII."""
    lines = [
        _HEADER_CASE.get(name, name).encode() + b": " + value + b"\r\n"
        for name, value in trailers
        if name in COPIED_TRAILERS and _VISIBLE_ASCII.fullmatch(value)
    ]
    return b"0\r\n" + b"".join(lines) + b"\r\n"
