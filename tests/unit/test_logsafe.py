"""`logsafe.safe` and the log records of `observe` built with it."""

from __future__ import annotations

import dataclasses
import logging

import pytest

from fastrelay.core import observe
from fastrelay.core.errors import UploadAborted
from fastrelay.core.logsafe import safe
from fastrelay.core.session import Input, RelaySession

FORGED = "a\nrelay ended id=000 outcome=ok\r\x1b[31mred\u2028" + "x" * (60 * 1024)
RAW_CONTROLS = {chr(c) for c in (*range(0x20), *range(0x7F, 0xA0))} | {"\u2028", "\u2029"}


def test_forged_value_becomes_one_short_line() -> None:
    out = safe(FORGED)
    assert not RAW_CONTROLS & set(out)
    assert out.splitlines() == [out]
    assert len(out) <= 128 + len("…(+61440 chars)")
    assert out.startswith("a\\x0arelay ended id=000 outcome=ok\\x0d\\x1b[31mred\\u2028")
    head, _, marker = out.partition("…(+")
    assert len(head) <= 128 and marker.endswith(" chars)")
    assert int(marker.removesuffix(" chars)")) > 60 * 1024 - 128


def test_cut_marker_counts_the_characters_left_out() -> None:
    assert safe("x" * 200, limit=10) == "x" * 10 + "…(+190 chars)"
    # An escape is never split: the one that does not fit is left out whole.
    assert safe("abcdefghi\n", limit=10) == "abcdefghi…(+1 chars)"
    assert safe("\n" * 5, limit=9) == "\\x0a\\x0a…(+3 chars)"


@pytest.mark.parametrize(
    ("raw", "escaped"),
    [
        ("plain text", "plain text"),
        ("tab\there", "tab\\x09here"),
        ("del\x7f c1\x85 csi\x9b", "del\\x7f c1\\x85 csi\\x9b"),
        ("ls\u2028ps\u2029", "ls\\u2028ps\\u2029"),
        ("bidi\u202e", "bidi\\u202e"),
        ("lone \ud800", "lone \\ud800"),
        # The backslash is doubled, so a typed "\x0a" cannot pass for an escape.
        ("typed \\x0a", "typed \\\\x0a"),
        ("unicode é ü 😀", "unicode é ü 😀"),
    ],
)
def test_escapes(raw: str, escaped: str) -> None:
    assert safe(raw) == escaped


def test_non_strings_and_broken_str() -> None:
    class Broken:
        def __str__(self) -> str:
            raise RuntimeError("no")

    assert safe(42) == "42"
    assert safe(UploadAborted("relay: bad\nchunk")) == "relay: bad\\x0achunk"
    assert safe(Broken()) == "<unprintable Broken>"


@dataclasses.dataclass
class FakeRelay:
    """Just what observe.Finished asks for."""

    ticket: str
    workspace_id: str
    source_exe_id: str
    dest_exe_id: str
    bytes: int
    session: RelaySession
    error: Exception | None
    digest: str | None = None


def finished_relay() -> FakeRelay:
    session = RelaySession(now=0.0)
    session.handle(Input.PUT_ARRIVES, 1.0)
    session.handle(Input.GET_ARRIVES, 2.0)
    session.handle(Input.UPLOAD_ABORTED, 3.0)
    return FakeRelay(
        ticket="rly_t",
        workspace_id=FORGED,
        source_exe_id="src\r\nrelay created id=1",
        dest_exe_id="\x1b]0;title\x07",
        bytes=5,
        session=session,
        error=UploadAborted("relay: upload failed\n" + FORGED),
    )


@pytest.mark.parametrize("which", ["created", "finished"])
def test_observe_logs_forged_ids_as_one_bounded_line(
    caplog: pytest.LogCaptureFixture, which: str
) -> None:
    caplog.set_level(logging.INFO, logger="fastrelay")
    relay = finished_relay()
    if which == "created":
        observe.log_created(relay, 300.0, 0)
    else:
        observe.log_finished(relay)
    [record] = caplog.records
    message = record.getMessage()
    assert not {"\n", "\r", "\x1b"} & set(message)
    assert not RAW_CONTROLS & set(message)
    assert len(message) < 2048
    assert "workspace=a\\x0arelay ended" in message
