"""The in-place chunked decoder: splits, limits, garbage."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastrelay.core.chunked import MAX_LINE_BYTES, ChunkedDecoder, ChunkError


def encode(parts: list[bytes], ext: bool = False, trailers: bool = False) -> bytes:
    out = b""
    for p in parts:
        out += b"%x" % len(p) + (b";name=value" if ext else b"") + b"\r\n" + p + b"\r\n"
    out += b"0\r\n" + (b"X-Sum: 1\r\n" if trailers else b"") + b"\r\n"
    return out


def decode(pieces: list[bytes]) -> tuple[bytes, bool, int]:
    d = ChunkedDecoder()
    payload = b""
    leftover = 0
    for piece in pieces:
        runs, consumed = d.feed(memoryview(piece))
        payload += b"".join(piece[a:b] for a, b in runs)
        leftover += len(piece) - consumed
    return payload, d.done, leftover


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for p in points:
        pieces.append(data[last:p])
        last = p
    pieces.append(data[last:])
    return pieces


@settings(max_examples=300, deadline=None)
@given(
    parts=st.lists(st.binary(min_size=1, max_size=300), max_size=8),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=12),
    ext=st.booleans(),
    trailers=st.booleans(),
)
def test_valid_stream_split_anywhere_decodes_the_same(
    parts: list[bytes], cuts: list[int], ext: bool, trailers: bool
) -> None:
    wire = encode(parts, ext, trailers)
    payload, done, leftover = decode(split_at(wire, cuts))
    assert payload == b"".join(parts)
    assert done
    assert leftover == 0


def test_one_byte_at_a_time() -> None:
    wire = encode([b"hello", b" ", b"world" * 100], ext=True, trailers=True)
    payload, done, _ = decode([wire[i : i + 1] for i in range(len(wire))])
    assert payload == b"hello world" + b"world" * 99 and done


def test_bytes_after_the_body_are_not_consumed() -> None:
    wire = encode([b"abc"]) + b"GET / HTTP/1.1\r\n"
    payload, done, leftover = decode([wire])
    assert payload == b"abc" and done and leftover == len(b"GET / HTTP/1.1\r\n")


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200))
def test_garbage_is_a_decision_or_a_chunk_error_never_anything_else(data: bytes) -> None:
    d = ChunkedDecoder()
    try:
        runs, consumed = d.feed(data)
    except ChunkError:
        return
    assert 0 <= consumed <= len(data)
    assert all(0 <= a <= b <= len(data) for a, b in runs)


@pytest.mark.parametrize(
    "wire",
    [
        b"zz\r\n",  # not hex
        b"\r\n",  # size missing
        b"5\nhello\r\n",  # bare LF after size
        b"5\r\nhelloXX",  # no CRLF after data
        b"1" * 17 + b"\r\n",  # size over 64 bits
        b"-5\r\n",
        b"5;" + b"a" * MAX_LINE_BYTES + b"\r\n",  # extension too long
        b"0\r\nbad\ntrailer\r\n\r\n",
    ],
)
def test_bad_framing_is_refused(wire: bytes) -> None:
    with pytest.raises(ChunkError):
        ChunkedDecoder().feed(wire)


def test_payload_count_tracks_runs() -> None:
    d = ChunkedDecoder()
    d.feed(b"a\r\n0123456789\r\n3\r\nabc")
    assert d.payload == 13 and not d.done
