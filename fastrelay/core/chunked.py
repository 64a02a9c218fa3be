"""An in-place decoder for ``Transfer-Encoding: chunked`` request bodies.

Theory of operation
-------------------
h11 can decode chunked bodies, but it copies every byte into its own buffer
and then into one bytearray per event: at curl's 64 KiB chunks that costs as
much CPU as the whole relay (docs/runtime-facts.md §6). We only need to know *where*
the payload is, so `ChunkedDecoder.feed` walks the framing of the bytes just
received and returns ``(start, end)`` offsets of payload runs inside them. The
caller forwards those slices of its own receive buffer; no payload byte is
copied here.

The decoder is a byte-level state machine that keeps its state between calls,
so framing split at any byte boundary decodes the same (a property test feeds
every split). Only the framing bytes (a few per chunk) are visited one by one;
a payload run is skipped in O(1).

RFC 9112 §7.1 grammar, with these deliberate limits:

* chunk-size is 1-16 hex digits (a 64-bit size; more is an attack);
* a chunk-size line, extensions included, is at most `MAX_LINE_BYTES`;
* extensions are skipped; the trailer section is kept (at most
  `MAX_TRAILER_BYTES` in all) in ``trailer_section`` so the caller can pass
  chosen fields (``Repr-Digest``) on; its bytes are only ever visited one by
  one, like the rest of the framing;
* line ends must be CRLF: a bare LF inside framing is a smuggling vector.

Errors raise `ChunkError`; the caller turns that into a 400 or an aborted
transfer. This module does no IO.
"""

from __future__ import annotations

import enum

MAX_SIZE_DIGITS = 16
# Extensions are legal but nobody sends long ones; 4 KiB matches common
# servers' limits on a chunk-size line.
MAX_LINE_BYTES = 4096
MAX_TRAILER_BYTES = 16384

_CR = 0x0D
_LF = 0x0A
_SEMI = 0x3B
_SP = 0x20
_TAB = 0x09

# hex digit byte -> value
_HEX = {**{c: c - 0x30 for c in range(0x30, 0x3A)}}
_HEX.update({c: c - 0x61 + 10 for c in range(0x61, 0x67)})
_HEX.update({c: c - 0x41 + 10 for c in range(0x41, 0x47)})


class ChunkError(ValueError):
    """The chunked framing is invalid."""


class _S(enum.Enum):
    SIZE = 0  # reading hex digits of chunk-size
    SIZE_WS = 1  # whitespace after the digits (BWS before ';' or CR)
    EXT = 2  # skipping chunk extensions up to CR
    SIZE_LF = 3  # after CR of the size line
    DATA = 4  # inside chunk payload
    DATA_CR = 5  # expect CR after payload
    DATA_LF = 6  # expect LF after payload
    TRAILER = 7  # at the start of a trailer line (or the final CRLF)
    TRAILER_LINE = 8  # inside a trailer field line
    TRAILER_LINE_LF = 9
    END_LF = 10  # final CR seen, expect LF
    DONE = 11


class ChunkedDecoder:
    """Incremental, non-copying decoder of one chunked body."""

    __slots__ = (
        "_digits",
        "_line",
        "_remaining",
        "_size",
        "_state",
        "_trailer",
        "payload",
        "trailer_section",
    )

    def __init__(self) -> None:
        self._state = _S.SIZE
        self._size = 0
        self._digits = 0
        self._line = 0
        self._remaining = 0
        self._trailer = 0
        self.payload = 0
        """Payload bytes found so far."""
        self.trailer_section = bytearray()
        """The trailer field lines, each ending in LF (CR dropped)."""

    @property
    def done(self) -> bool:
        """True once the last chunk and trailer section have been read."""
        return self._state is _S.DONE

    def feed(self, data: bytes | bytearray | memoryview) -> tuple[list[tuple[int, int]], int]:
        """Decode ``data``; return (payload runs as (start, end), bytes consumed).

        ``consumed`` is less than ``len(data)`` only when the body ended inside
        ``data``: what follows it is not ours (a pipelined request).
        """
        runs: list[tuple[int, int]] = []
        i = 0
        n = len(data)
        state = self._state
        S = _S
        while i < n:
            if state is S.DATA:
                take = min(self._remaining, n - i)
                runs.append((i, i + take))
                i += take
                self._remaining -= take
                self.payload += take
                if self._remaining == 0:
                    state = S.DATA_CR
                continue
            if state is S.DONE:
                break
            c = data[i]
            i += 1
            if state is S.SIZE:
                self._line += 1
                v = _HEX.get(c)
                if v is not None:
                    self._digits += 1
                    if self._digits > MAX_SIZE_DIGITS:
                        raise ChunkError("chunk size too long")
                    self._size = self._size * 16 + v
                    continue
                if self._digits == 0:
                    raise ChunkError("chunk size missing")
                if c == _CR:
                    state = S.SIZE_LF
                elif c == _SEMI:
                    state = S.EXT
                elif c in (_SP, _TAB):
                    state = S.SIZE_WS
                else:
                    raise ChunkError("invalid chunk size")
            elif state is S.SIZE_WS:
                self._line += 1
                if c == _CR:
                    state = S.SIZE_LF
                elif c == _SEMI:
                    state = S.EXT
                elif c not in (_SP, _TAB):
                    raise ChunkError("invalid chunk size")
            elif state is S.EXT:
                self._line += 1
                if self._line > MAX_LINE_BYTES:
                    raise ChunkError("chunk extension too long")
                if c == _CR:
                    state = S.SIZE_LF
                elif c == _LF or (c < _SP and c != _TAB) or c == 0x7F:
                    raise ChunkError("invalid byte in chunk extension")
            elif state is S.SIZE_LF:
                if c != _LF:
                    raise ChunkError("expected LF after chunk size")
                if self._size == 0:
                    state = S.TRAILER
                else:
                    self._remaining = self._size
                    state = S.DATA
                self._size = self._digits = self._line = 0
            elif state is S.DATA_CR:
                if c != _CR:
                    raise ChunkError("expected CRLF after chunk data")
                state = S.DATA_LF
            elif state is S.DATA_LF:
                if c != _LF:
                    raise ChunkError("expected CRLF after chunk data")
                state = S.SIZE
            elif state is S.TRAILER:
                self._trailer += 1
                if c == _CR:
                    state = S.END_LF
                elif c == _LF or c < _SP:
                    raise ChunkError("invalid trailer")
                else:
                    self.trailer_section.append(c)
                    state = S.TRAILER_LINE
            elif state is S.TRAILER_LINE:
                self._trailer += 1
                if self._trailer > MAX_TRAILER_BYTES:
                    raise ChunkError("trailer section too long")
                if c == _CR:
                    state = S.TRAILER_LINE_LF
                elif c == _LF:
                    raise ChunkError("bare LF in trailer")
                else:
                    self.trailer_section.append(c)
            elif state is S.TRAILER_LINE_LF:
                if c != _LF:
                    raise ChunkError("expected LF in trailer")
                self.trailer_section.append(_LF)
                state = S.TRAILER
            else:  # S.END_LF
                if c != _LF:
                    raise ChunkError("expected final LF")
                state = S.DONE
        self._state = state
        return runs, i
