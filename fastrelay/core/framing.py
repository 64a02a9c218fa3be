"""Request body framing: Content-Length, chunked, and a byte limit, in one place.

Theory of operation
-------------------
A request body is delimited either by ``Content-Length`` or by chunked
framing; a PUT with neither has an empty body (RFC 9112 §6.3). `BodyFramer`
is fed the bytes of each read as they arrive and says which of them are
payload, how many it consumed, and whether the body is complete or has
crossed ``limit`` payload bytes. It never copies: payload comes back as
``(start, end)`` runs inside the caller's own buffer, which the caller
forwards (the transfer) or appends (the mint body reader).

Both users share this one framer, so the two can never disagree on where a
body ends, and ``max_bytes`` is enforced where the bytes are framed: when a
body crosses ``limit`` the runs stop at exactly ``limit`` payload bytes and
``over_limit`` is set.

Bytes after the end of the body are not consumed: they belong to the next
request on the connection (or, on a relay upload, to nobody).

No IO here.
"""

from __future__ import annotations

from .chunked import ChunkedDecoder

Runs = list[tuple[int, int]]


class BodyFramer:
    """Incremental framer of one request body."""

    __slots__ = ("_decoder", "_remaining", "limit", "over_limit", "payload", "seen")

    def __init__(self, content_length: int | None, chunked: bool, limit: int = 0) -> None:
        """``limit`` > 0 caps the payload bytes; 0 means no cap."""
        self._decoder = ChunkedDecoder() if chunked else None
        self._remaining = 0 if chunked else (content_length or 0)
        self.limit = limit
        self.payload = 0
        """Payload bytes returned in runs so far (never more than ``limit``)."""
        self.seen = 0
        """Payload bytes framed, including any past ``limit`` (for the 413)."""
        self.over_limit = False
        """True once the body had more than ``limit`` payload bytes."""

    @property
    def chunked(self) -> bool:
        return self._decoder is not None

    @property
    def done(self) -> bool:
        """The whole body has been framed (or cut at the limit)."""
        if self.over_limit:
            return True
        if self._decoder is not None:
            return self._decoder.done
        return self._remaining == 0

    @property
    def remaining(self) -> int | None:
        """Content-Length bytes still to come; None for a chunked body."""
        return None if self._decoder is not None else self._remaining

    def trailer_fields(self) -> list[tuple[str, bytes]]:
        """The chunked body's trailer fields: (lower-cased name, value)."""
        if self._decoder is None:
            return []
        fields = []
        for line in bytes(self._decoder.trailer_section).split(b"\n"):
            name, sep, value = line.partition(b":")
            if sep and name and name == name.strip():
                fields.append((name.decode("latin-1").lower(), value.strip(b" \t")))
        return fields

    def feed(self, data: bytes | bytearray | memoryview) -> tuple[Runs, int]:
        """Frame ``data``; return (payload runs, bytes consumed).

        Raises `chunked.ChunkError` for broken chunked framing. After the
        body is done (or over the limit) every call returns ``([], 0)``.
        """
        if self.done:
            return [], 0
        decoder = self._decoder
        if decoder is None:
            take = min(self._remaining, len(data))
            self._remaining -= take
            runs = [(0, take)] if take else []
            consumed = take
        else:
            runs, consumed = decoder.feed(data)
        total = 0
        for start, end in runs:
            total += end - start
        self.seen += total
        limit = self.limit
        if limit and self.payload + total > limit:
            runs = _cut(runs, limit - self.payload)
            total = limit - self.payload
            self.over_limit = True
        self.payload += total
        return runs, consumed

    def skip_known_length(self, nbytes: int) -> None:
        """Account for ``nbytes`` of a Content-Length body moved without
        `feed` (the splice(2) fast path moves them inside the kernel)."""
        assert self._decoder is None and 0 <= nbytes <= self._remaining
        self._remaining -= nbytes
        self.payload += nbytes
        self.seen += nbytes


def _cut(runs: Runs, allowed: int) -> Runs:
    """The first ``allowed`` payload bytes of ``runs``."""
    kept: Runs = []
    for start, end in runs:
        if allowed <= 0:
            break
        take = min(end - start, allowed)
        kept.append((start, start + take))
        allowed -= take
    return kept
