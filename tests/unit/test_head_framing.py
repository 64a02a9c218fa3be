"""One framing: fastrelay cuts request heads exactly where h11 does, or refuses.

The property: for any byte stream, split at any points, fastrelay's head
reader (`find_head_end` + `parse_head`, fed piece by piece as the
connection feeds it) either frames each request head exactly as h11 does
(same end offset, same method and target) or refuses with a `RelayError`
(the connection then answers 4xx and closes). A third outcome (a different
cut, a request h11 never saw, any other exception) is a smuggling hole.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import h11
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fastrelay.core import heads
from fastrelay.core.errors import RelayError
from fastrelay.core.heads import find_head_end, parse_head

MAX_HEAD = 16 * 1024


@dataclass(frozen=True)
class Framed:
    end: int  # absolute offset just past the head
    method: bytes
    target: bytes


def frame_like_fastrelay(pieces: list[bytes]) -> tuple[list[Framed], bool]:
    """Feed ``pieces`` like HttpConnection does; return heads and whether refused."""
    buf = bytearray()
    consumed = 0
    out: list[Framed] = []
    for piece in pieces:
        buf += piece
        while True:
            try:
                end = find_head_end(buf, MAX_HEAD)
                if end is None:
                    break
                head = parse_head(bytes(buf[:end]))
            except RelayError:
                return out, True
            consumed += end
            del buf[:end]
            out.append(Framed(consumed, head.method.encode(), _target(head.path, buf)))
            if head.has_body or not head.keep_alive:
                # Past a body our head reader is not in charge; stop comparing.
                return out, False
    return out, False


def _target(path: str, _buf: bytearray) -> bytes:
    return path.encode("ascii", "replace")


def frame_like_h11(stream: bytes) -> list[Framed]:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
    conn.receive_data(stream)
    out: list[Framed] = []
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError:
            return out
        if not isinstance(event, h11.Request):
            return out
        end = len(stream) - len(conn.trailing_data[0])
        out.append(Framed(end, event.method, event.target.split(b"?", 1)[0]))
        try:
            nxt = conn.next_event()
        except h11.RemoteProtocolError:
            return out
        if not isinstance(nxt, h11.EndOfMessage) or conn.our_state is h11.MUST_CLOSE:
            return out
        conn.send(h11.Response(status_code=200, headers=[("Content-Length", "0")]))
        conn.send(h11.EndOfMessage())
        if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
            return out
        conn.start_next_cycle()


# --- generators: heads that are almost right, in every way that matters --------

EOLS = [b"\r\n", b"\n", b"\r", b"\n\r", b""]
NAMES = [
    b"Host",
    b"Content-Length",
    b"Transfer-Encoding",
    b"Authorization",
    b"Connection",
    b"Expect",
    b"X-A",
    b"Content-Type",
    b"host ",
]
VALUES = [b"x", b"0", b"5", b"chunked", b"close", b"keep-alive", b"Bearer t", b"", b" a", b"\t"]


@st.composite
def near_heads(draw: st.DrawFn) -> bytes:
    method = draw(st.sampled_from([b"GET", b"PUT", b"POST", b"HEAD", b"G\xffT"]))
    target = draw(st.sampled_from([b"/healthz", b"/metrics", b"/relay/t", b"/", b"/a b"]))
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.1 "]))
    out = method + b" " + target + b" " + version + draw(st.sampled_from(EOLS))
    for _ in range(draw(st.integers(0, 5))):
        lead = draw(st.sampled_from([b"", b"", b"", b" ", b"\t"]))
        name = draw(st.sampled_from(NAMES))
        value = draw(st.sampled_from(VALUES))
        out += lead + name + b":" + draw(st.sampled_from([b" ", b""])) + value
        out += draw(st.sampled_from(EOLS))
    out += draw(st.sampled_from(EOLS))
    return out


streams = st.one_of(
    st.lists(near_heads(), min_size=1, max_size=4).map(b"".join),
    st.tuples(st.lists(near_heads(), max_size=3).map(b"".join), st.binary(max_size=200)).map(
        b"".join
    ),
    st.binary(max_size=300),
)


@st.composite
def split_stream(draw: st.DrawFn) -> tuple[bytes, list[bytes]]:
    stream = draw(streams)
    cuts = sorted(draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    pieces, start = [], 0
    for cut in [*cuts, len(stream)]:
        pieces.append(stream[start:cut])
        start = cut
    return stream, pieces


@settings(max_examples=1500, deadline=None)
@given(split_stream())
@example(
    (
        b"GET /healthz HTTP/1.1\r\nHost: x\n\r\nGET /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
        [b"GET /healthz HTTP/1.1\r\nHost: x\n\r\nGET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"],
    )
)
@example(
    (
        b"PUT /relay/t HTTP/1.1\r\nHost: x\r\nContent-Length: 10\n\r\n0123456789",
        [b"PUT /relay/t HTTP/1.1\r\nHost: x\r\nContent-Length: 10\n\r\n0123456789"],
    )
)
def test_fastrelay_frames_heads_exactly_as_h11_or_refuses(
    case: tuple[bytes, list[bytes]],
) -> None:
    stream, pieces = case
    ours, _refused = frame_like_fastrelay(pieces)
    reference = frame_like_h11(stream)
    # Every head we accepted is h11's head at the same position, cut at the
    # same byte; after a refusal the connection is closed, so nothing follows.
    assert len(ours) <= len(reference), (ours, reference)
    for mine, theirs in zip(ours, reference, strict=False):
        assert mine.end == theirs.end
        assert mine.method == theirs.method
        assert mine.target == theirs.target.decode("ascii", "replace").encode("ascii", "replace")


def test_the_observed_smuggling_streams_are_framed_like_h11() -> None:
    # The two attacks from the edge issue, byte for byte.
    pipelined = b"GET /healthz HTTP/1.1\r\nHost: x\n\r\nGET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
    ours, refused = frame_like_fastrelay([pipelined])
    assert not refused
    assert [f.target for f in ours] == [b"/healthz", b"/metrics"]
    put = (
        b"PUT /relay/t HTTP/1.1\r\nHost: x\r\nContent-Length: 10\n\r\n0123456789\r\n\r\nABCDEFGHIJ"
    )
    end = find_head_end(put, MAX_HEAD)
    assert end is not None and put[end : end + 10] == b"0123456789"


def _outcome(read: Callable[[bytes], tuple[h11.Request | None, bool]], raw: bytes) -> object:
    try:
        request, left_over = read(raw)
    except h11.ProtocolError as exc:
        return ("error", exc.error_status_hint)
    if request is None:
        return ("need data", left_over)
    return (request.method, request.target, request.http_version, list(request.headers), left_over)


@settings(max_examples=1500, deadline=None)
@given(streams)
def test_h11s_request_reader_and_its_connection_agree_on_every_head(stream: bytes) -> None:
    # parse_head runs h11's request reader without the Connection around it
    # (faster); on any bytes it must give what the public API gives.
    assert heads.h11_request is not heads.h11_request_via_connection  # the fast path is in use
    assert _outcome(heads.h11_request, stream) == _outcome(heads.h11_request_via_connection, stream)
