"""One body framer for Content-Length, chunked and max_bytes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastrelay.core.chunked import ChunkError
from fastrelay.core.framing import BodyFramer


def frame(framer: BodyFramer, pieces: list[bytes]) -> tuple[bytes, bytes]:
    """Payload and leftover (unconsumed) bytes, feeding piece by piece."""
    payload, left = bytearray(), bytearray()
    for piece in pieces:
        runs, consumed = framer.feed(piece)
        for start, end in runs:
            payload += piece[start:end]
        left += piece[consumed:]
    return bytes(payload), bytes(left)


def test_content_length_stops_at_the_length_and_leaves_the_rest() -> None:
    framer = BodyFramer(5, False)
    assert frame(framer, [b"abc", b"defGET /"]) == (b"abcde", b"fGET /")
    assert framer.done and framer.payload == 5 and framer.remaining == 0


def test_no_framing_is_an_empty_body() -> None:
    assert BodyFramer(None, False).done


def test_chunked_with_limit_cuts_at_exactly_the_limit() -> None:
    framer = BodyFramer(None, True, limit=7)
    payload, _ = frame(framer, [b"5\r\nhello\r\n5\r\nworld\r\n0\r\n\r\n"])
    assert payload == b"hellowo" and framer.over_limit and framer.done
    assert framer.payload == 7 and framer.seen == 10
    assert framer.feed(b"more") == ([], 0)


def test_chunked_errors_raise() -> None:
    with pytest.raises(ChunkError):
        BodyFramer(None, True).feed(b"zz\r\n")


@settings(max_examples=300, deadline=None)
@given(
    body=st.binary(max_size=300),
    chunk=st.integers(1, 64),
    cuts=st.lists(st.integers(0, 400), max_size=5),
    limit=st.integers(0, 400),
)
def test_chunked_payload_is_the_body_up_to_the_limit_however_split(
    body: bytes, chunk: int, cuts: list[int], limit: int
) -> None:
    wire = b"".join(
        b"%x\r\n" % len(body[i : i + chunk]) + body[i : i + chunk] + b"\r\n"
        for i in range(0, len(body), chunk)
    )
    wire += b"0\r\n\r\nNEXT"
    pieces, start = [], 0
    for cut in sorted(c for c in cuts if c <= len(wire)):
        pieces.append(wire[start:cut])
        start = cut
    pieces.append(wire[start:])
    framer = BodyFramer(None, True, limit=limit)
    payload, left = frame(framer, pieces)
    if limit and len(body) > limit:
        assert payload == body[:limit] and framer.over_limit
    else:
        assert payload == body and left == b"NEXT" and framer.done
