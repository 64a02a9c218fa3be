"""``serve --log-format json``: one JSON object per log record, one per line.

Each line holds ``time`` (RFC 3339, UTC), ``level``, ``logger``, ``event``,
``message`` and the structured fields a call passes as
``extra={"event": "relay_ended", "fields": {...}}``; records without them
get ``"event": "log"``. The output is ASCII (``ensure_ascii``): a newline,
an ESC or a bidi override in a client-supplied value comes out as a JSON
escape, so a record can never break into two lines or forge another.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Mapping
from typing import Any

__all__ = ["DEFAULT_EVENT", "JsonFormatter"]

DEFAULT_EVENT = "log"
# Keys the formatter writes itself; a field may not replace them.
_RESERVED = frozenset({"time", "level", "logger", "event", "message", "exc_info"})


def _rfc3339(created: float) -> str:
    stamp = dt.datetime.fromtimestamp(created, dt.UTC)
    return stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JsonFormatter(logging.Formatter):
    """A `logging.Formatter` writing one JSON object per record."""

    def format(self, record: logging.LogRecord) -> str:
        event = getattr(record, "event", None)
        doc: dict[str, Any] = {
            "time": _rfc3339(record.created),
            "level": record.levelname,
            "logger": record.name,
            "event": event if isinstance(event, str) else DEFAULT_EVENT,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, Mapping):
            for key, value in fields.items():
                name = str(key)
                doc[name if name not in _RESERVED else f"field_{name}"] = value
        if record.exc_info:
            doc["exc_info"] = self.formatException(record.exc_info)
        elif record.exc_text:
            doc["exc_info"] = record.exc_text
        if record.stack_info:
            doc["stack_info"] = self.formatStack(record.stack_info)
        # default=str: a field that is not JSON (an exception, a path) is
        # written as its text rather than failing the log call.
        return json.dumps(doc, ensure_ascii=True, separators=(",", ":"), default=str)
