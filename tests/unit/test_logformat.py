"""`logformat.JsonFormatter` and the structured fields `observe` passes it."""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
import json
import logging
from collections.abc import Iterator

import pytest

from fastrelay.core import observe
from fastrelay.core.errors import UploadAborted
from fastrelay.core.session import Outcome
from fastrelay.core.tickets import ticket_id
from fastrelay.server.logformat import JsonFormatter

TICKET = "rly_" + "A" * 43
FORGED = "a\nrelay ended id=000 outcome=ok\r\x1b[31mred\u2028\u202e\ud800"


@dataclasses.dataclass
class FakeSession:
    outcome: Outcome | None = Outcome.OK
    paired: bool = True

    def waited_s(self) -> float:
        return 1.25

    def transfer_s(self) -> float:
        return 2.5


@dataclasses.dataclass
class FakeRelay:
    """Just what observe.Finished asks for."""

    ticket: str = TICKET
    workspace_id: str = "ws1"
    source_exe_id: str = "exe-a"
    dest_exe_id: str = "exe-b"
    bytes: int = 1000
    session: FakeSession = dataclasses.field(default_factory=FakeSession)
    error: Exception | None = None
    digest: str | None = None


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    """The ``fastrelay`` logger writing through a JsonFormatter into a buffer."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("fastrelay")
    old_level, old_propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield out
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        logger.propagate = old_propagate


def records(out: io.StringIO) -> list[dict[str, object]]:
    text = out.getvalue()
    assert text.endswith("\n")
    lines = text.splitlines()
    assert text.count("\n") == len(lines)  # no line broken inside a record
    return [json.loads(line) for line in lines]


def test_one_json_object_per_record(json_log: io.StringIO) -> None:
    relay = FakeRelay()
    observe.log_created(relay, 300.0, 0)  # type: ignore[arg-type]
    observe.log_finished(relay)  # type: ignore[arg-type]
    created, ended = records(json_log)

    assert created["event"] == "relay_created"
    assert created["level"] == "INFO" and created["logger"] == "fastrelay"
    assert created["id"] == ticket_id(TICKET)
    assert len(str(created["id"])) == 12
    assert (created["workspace"], created["source"], created["dest"]) == ("ws1", "exe-a", "exe-b")
    assert created["ttl_s"] == 300.0 and created["max_bytes"] == 0
    assert created["message"] == (
        f"relay created id={ticket_id(TICKET)} workspace=ws1 source=exe-a dest=exe-b "
        "ttl_s=300 max_bytes=0"
    )

    assert ended["event"] == "relay_ended"
    assert ended["outcome"] == "ok" and ended["bytes"] == 1000
    assert ended["wait_s"] == 1.25 and ended["transfer_s"] == 2.5
    assert ended["error"] is None
    assert str(ended["message"]).startswith(f"relay ended id={ticket_id(TICKET)} outcome=ok ")


def test_time_is_rfc3339_utc(json_log: io.StringIO) -> None:
    observe.log_created(FakeRelay(), 1.0, 5)  # type: ignore[arg-type]
    [rec] = records(json_log)
    stamp = str(rec["time"])
    assert stamp.endswith("Z")
    parsed = dt.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    assert parsed.utcoffset() == dt.timedelta(0)
    assert abs((dt.datetime.now(dt.UTC) - parsed).total_seconds()) < 60


def test_never_the_ticket(json_log: io.StringIO) -> None:
    relay = FakeRelay(
        session=FakeSession(outcome=Outcome.UPLOAD_ABORTED),
        error=UploadAborted("upload aborted"),
    )
    observe.log_created(relay, 300.0, 0)  # type: ignore[arg-type]
    observe.log_finished(relay)  # type: ignore[arg-type]
    text = json_log.getvalue()
    assert TICKET not in text and TICKET[4:] not in text
    _, ended = records(json_log)
    assert ended["level"] == "WARNING"
    assert ended["outcome"] == "upload_aborted" and ended["error"] == "upload aborted"


def test_control_characters_come_out_as_json_escapes(json_log: io.StringIO) -> None:
    relay = FakeRelay(
        workspace_id=FORGED,
        source_exe_id="src\x00",
        session=FakeSession(outcome=Outcome.UPLOAD_ABORTED),
        error=UploadAborted("bad\nchunk"),
    )
    observe.log_created(relay, 300.0, 0)  # type: ignore[arg-type]
    observe.log_finished(relay)  # type: ignore[arg-type]
    text = json_log.getvalue()
    # ASCII only: every control, separator, bidi override and lone surrogate
    # is a JSON escape, so the output cannot break lines or fool a terminal.
    assert text.isascii()
    assert text.count("\n") == 2
    assert "\\n" in text and "\\r" in text and "\\u001b" in text
    assert "\\u2028" in text and "\\u202e" in text and "\\ud800" in text and "\\u0000" in text
    created, ended = records(json_log)
    # Fields hold the value itself (the JSON encoding escapes it) ...
    assert created["workspace"] == FORGED and created["source"] == "src\x00"
    assert ended["error"] == "bad\nchunk"
    # ... the message holds the text line, escaped by logsafe as before.
    assert "workspace=a\\x0arelay ended" in str(created["message"])


def test_huge_values_are_bounded(json_log: io.StringIO) -> None:
    observe.log_created(FakeRelay(workspace_id="w" * 100_000), 300.0, 0)  # type: ignore[arg-type]
    [rec] = records(json_log)
    assert len(json_log.getvalue()) < 4096
    assert str(rec["workspace"]).endswith(" chars)")


def test_plain_records_and_exceptions() -> None:
    logger = logging.getLogger("fastrelay.test")
    record = logger.makeRecord("fastrelay.test", logging.ERROR, __file__, 1, "a %s", ("b",), None)
    doc = json.loads(JsonFormatter().format(record))
    assert doc["event"] == "log" and doc["message"] == "a b" and doc["level"] == "ERROR"

    try:
        raise ValueError("boom\nline two")
    except ValueError:
        import sys

        record = logger.makeRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    line = JsonFormatter().format(record)
    assert "\n" not in line
    assert "ValueError: boom" in json.loads(line)["exc_info"]


def test_fields_cannot_replace_the_envelope() -> None:
    record = logging.getLogger("x").makeRecord(
        "x",
        logging.INFO,
        __file__,
        1,
        "msg",
        (),
        None,
        extra={"event": "custom", "fields": {"message": "forged", "n": 1, "obj": object()}},
    )
    doc = json.loads(JsonFormatter().format(record))
    assert doc["message"] == "msg" and doc["field_message"] == "forged"
    assert doc["event"] == "custom" and doc["n"] == 1 and doc["obj"].startswith("<object")
