"""The mint endpoint: ``POST /api/exec-gateway/relay/create``.

Request parsing follows the Go handler's decoder: the first JSON value must
be an object; fields of the wrong type (a string ``ttl_seconds``, a float
``max_bytes``) are "invalid JSON"; unknown fields are ignored; the three ids
must be non-empty strings. ``ttl_seconds``/``max_bytes`` of 0, negative or
absent mean "default" and "unlimited".

The answer is the Go JSON encoder's: compact, newline-terminated.
"""

from __future__ import annotations

import dataclasses
import hmac
import json
from typing import Any

from .errors import InvalidJSON, MintUnauthorized, MissingIds
from .tickets import extract_bearer_ticket

_MAX_INT64 = 2**63 - 1


@dataclasses.dataclass(frozen=True, slots=True)
class MintRequest:
    workspace_id: str
    source_exe_id: str
    dest_exe_id: str
    ttl_seconds: int
    max_bytes: int


def check_secret(authorization: str | None, secret: str) -> None:
    """Raise 401 unless the header is ``Bearer <secret>`` (constant time)."""
    token = extract_bearer_ticket(authorization)
    if token is None or not hmac.compare_digest(token.encode(), secret.encode()):
        raise MintUnauthorized()


def parse_mint_request(body: bytes) -> MintRequest:
    try:
        doc: Any = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise InvalidJSON() from None
    if doc is None:  # Go decodes null into the zero struct
        doc = {}
    if not isinstance(doc, dict):
        raise InvalidJSON()
    ids = []
    for key in ("workspace_id", "source_exe_id", "dest_exe_id"):
        value = doc.get(key)
        if value is not None and not isinstance(value, str):
            raise InvalidJSON()
        ids.append(value or "")
    ints = []
    for key in ("ttl_seconds", "max_bytes"):
        value = doc.get(key)
        if value is None:
            value = 0
        if isinstance(value, bool) or not isinstance(value, int) or abs(value) > _MAX_INT64:
            raise InvalidJSON()
        ints.append(value)
    if not all(ids):
        raise MissingIds()
    return MintRequest(ids[0], ids[1], ids[2], ints[0], ints[1])


def mint_response_body(ticket: str, base_url: str, expires_at_rfc3339: str) -> bytes:
    url = f"{base_url}/relay/{ticket}"
    doc = {
        "ticket": ticket,
        "upload_url": url,
        "download_url": url,
        "expires_at": expires_at_rfc3339,
    }
    return json.dumps(doc, separators=(",", ":")).encode() + b"\n"
