"""Resumable relays: what a ticket minted with ``"resumable": true`` keeps,
and the rules that decide whether two sides can pair again after a break.

Theory of operation
-------------------
A resumable relay stores no byte. It keeps a few numbers per ticket (a
`ResumeRecord`): the body's length ``L`` (a resumable PUT must carry
``Content-Length``), the headers the destination's answer copies from the
first PUT, the first PUT's ``Repr-Digest``, and the **resume point** ``P``:
the offset of the first byte the destination still needs.

A *break* is the end of one side's connection before the body is complete
(reset, close, idle timeout, being superseded by a newer request). The other
side stays attached and waits:

* the source broke: the destination's response stays open, paused;
  ``P`` = the bytes handed to it so far. A new PUT at offset ``M``
  (``Content-Range: bytes M-(L-1)/L``, else 0) pairs if ``M <= P``: its first
  ``P - M`` payload bytes are read and dropped, the rest continues the very
  same response.
* the destination broke: the PUT is paused, unanswered. A new GET at offset
  ``N`` (``Range: bytes=N-``, else 0) sets ``P = N`` and gets ``206``
  (``200`` without a Range). The open PUT can go on if it has not read past
  ``N`` yet (the gap is read and dropped); otherwise it is answered ``409``
  with ``Upload-Offset: N`` and the source sends again from ``N`` (or 0).

`pairing` is that rule as one function of the two sides' offsets. Whoever
cannot be served gets the `ResumeFrom` error (409). Parsing of the offsets
(`put_offset`, `get_offset`) and the consistency of a new PUT with the first
one (`check_upload`) are here too.

No IO here, and no clock: the relay's deadlines are the registry's.
"""

from __future__ import annotations

import dataclasses
import re

from .errors import LengthRequired, RangeNotSatisfiable, ResumeFrom, ResumeMismatch
from .heads import COPIED_HEADERS, RequestHead

DEFAULT_MAX_RESUMES = 16
"""Breaks a resumable ticket survives (``--max-resumes``); one more ends it."""

# RFC 9110 §14.4: Content-Range: bytes first-last/complete. Whitespace is
# not allowed inside; we accept exactly this form (an unsatisfied-range
# form "bytes */L" in a request makes no sense).
_CONTENT_RANGE = re.compile(r"bytes (\d{1,19})-(\d{1,19})/(\d{1,19})")
# RFC 9110 §14.1.2: only the one open-ended range "bytes=N-" resumes; any
# other form (several ranges, a suffix range, an end) is ignored (N = 0).
_RANGE = re.compile(r"bytes=(\d{1,19})-")


@dataclasses.dataclass(slots=True)
class ResumeRecord:
    """What a resumable ticket keeps between connections: a few numbers and
    the copied headers, never a byte of the body."""

    length: int
    """``L``: the body's length, fixed by the first PUT that paired."""
    copied: list[tuple[str, str]]
    """The first PUT's `COPIED_HEADERS` (Content-Type, ..., Repr-Digest)."""
    point: int = 0
    """``P``: the first byte the destination still needs."""

    @property
    def repr_digest(self) -> str | None:
        return dict(self.copied).get("repr-digest")


def put_offset(head: RequestHead) -> tuple[int, int]:
    """``(M, L)`` of a resumable PUT: where its body starts and the whole
    body's length. Raises 411 without Content-Length (chunked), 400 for a
    Content-Range that is not ``bytes M-(L-1)/L`` with ``Content-Length: L-M``.
    """
    if head.chunked:
        raise LengthRequired()
    length = head.content_length or 0
    value = head.header("content-range")
    if value is None:
        return 0, length
    match = _CONTENT_RANGE.fullmatch(value.strip())
    if match is None:
        raise ResumeMismatch("Content-Range must be bytes M-(L-1)/L")
    first, last, whole = (int(g) for g in match.groups())
    if not first <= last < whole or length != whole - first or last != whole - 1:
        raise ResumeMismatch("Content-Range must be bytes M-(L-1)/L with Content-Length L-M")
    return first, whole


def get_offset(head: RequestHead) -> int | None:
    """``N`` of a GET's ``Range: bytes=N-``, or None without a usable Range
    (no header, or a form other than one open-ended range: ignored)."""
    value = head.header("range")
    if value is None:
        return None
    match = _RANGE.fullmatch(value.strip())
    return int(match.group(1)) if match else None


def check_get(record: ResumeRecord | None, offset: int | None) -> None:
    """416 for a Range at or past the end of a body whose length is known."""
    if record is not None and offset is not None and offset >= record.length:
        raise RangeNotSatisfiable(record.length)


def copied_headers(head: RequestHead) -> list[tuple[str, str]]:
    return [(name, value) for name in COPIED_HEADERS if (value := head.header(name))]


def check_upload(record: ResumeRecord | None, head: RequestHead, length: int) -> None:
    """A PUT after the first must describe the same body: the same ``L`` and,
    if the first carried one, the same ``Repr-Digest``. 409 otherwise."""
    if record is None:
        return
    if length != record.length:
        raise ResumeMismatch(f"length {length} differs from the first upload's {record.length}")
    digest = record.repr_digest
    if digest is not None and head.header("repr-digest") != digest:
        raise ResumeMismatch("Repr-Digest differs from the first upload's")


@dataclasses.dataclass(frozen=True, slots=True)
class Pairing:
    """How a (re)paired transfer runs."""

    start: int
    """Offset of the first byte the destination receives in this pairing."""
    skip: int
    """Payload bytes of the upload to read and drop before forwarding."""


def pairing(upload_at: int, download_at: int) -> Pairing:
    """The upload is at ``upload_at`` (the offset of the next byte it will
    send), the destination needs ``download_at`` next. The upload can serve
    it if it is not past it; otherwise `ResumeFrom` names where to send
    from."""
    if upload_at > download_at:
        raise ResumeFrom(download_at)
    return Pairing(start=download_at, skip=download_at - upload_at)
