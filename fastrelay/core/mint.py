"""The mint endpoint: ``POST /api/exec-gateway/relay/create``.

Request parsing follows the Go handler's decoder: the first JSON value must
be an object; fields of the wrong type (a string ``ttl_seconds``, a float
``max_bytes``) are "invalid JSON"; unknown fields are ignored; duplicate keys
keep the last value; ``null`` is the empty object; the three ids must be
non-empty strings. ``ttl_seconds``/``max_bytes`` of 0, negative or absent
mean "default" and "unlimited" (Go's meaning, so they are accepted).

Every 400 says what is wrong: an `InvalidJSON` keeps Go's ``invalid JSON``
as the prefix of its message (clients written against the Go relay match
that) and adds a detail after it: the field and the type it must have, or
the decoder's own short message and position.

On top of Go's rules the body is bounded before it can hurt us (see
docs/operations.md, "Input limits (mint)"): it must be UTF-8 without a BOM,
nest at most `MAX_DEPTH` levels, carry ids of at most `MAX_ID_BYTES` bytes of
printable text, and a ``ttl_seconds`` of at most ``max_ttl_s``. Whatever the
bytes, `parse_mint_request` returns a `MintRequest` or raises a `RelayError`
(400): nothing else can escape it.

The answer is the Go JSON encoder's: compact, newline-terminated.
"""

from __future__ import annotations

import dataclasses
import hmac
import json
import re
from typing import Any, NoReturn

from .errors import COMPACT_JSON, InvalidField, InvalidJSON, MintUnauthorized, MissingIds
from .tickets import extract_bearer_ticket

# Go decodes ttl_seconds and max_bytes into int64: outside this range its
# decode fails, so ours does too.
_MIN_INT64 = -(2**63)
_MAX_INT64 = 2**63 - 1

# A detail taken from the json module stays one short line of printable
# ASCII (the JSON encoder then escapes quotes and backslashes).
_DETAIL_LIMIT = 100
_NOT_PLAIN = re.compile("[^\x20-\x7e]")

# What each integer field counts, for "must be a whole number of <unit>".
_INT_FIELDS = (("ttl_seconds", "seconds"), ("max_bytes", "bytes"))

MAX_DEPTH = 32
"""Deepest ``[``/``{`` nesting accepted. A mint request needs 1; the bound
exists so json.loads never recurses deep enough to raise RecursionError."""

MAX_ID_BYTES = 256
"""Longest workspace/source/dest id, in UTF-8 bytes. Ids go into logs and
map keys: they must stay small."""

DEFAULT_MAX_RECEIVERS = 16
"""Largest ``receivers`` a mint may ask for unless the server says otherwise."""

MAX_RECEIVERS = 1024
"""Largest ``--max-receivers`` a server may allow: each receiver is a
connection written to on every read of the source."""

DEFAULT_MAX_TTL_S = 86400.0
"""Largest ``ttl_seconds`` accepted unless the server says otherwise (1 day)."""

ID_FIELDS = ("workspace_id", "source_exe_id", "dest_exe_id")
V2_FIELDS = ("resumable", "receivers", "max_rate")
"""The v2 mint options this server knows (the wire contract's v2 section)."""

# A JSON string (with its escapes) or one bracket. Strings are matched whole
# so brackets inside them are skipped; the unrolled form is linear time. An
# unterminated string leaves its quote unmatched and the rest is scanned as
# structure, which can only turn already-invalid JSON into InvalidJSON.
_STRUCTURE = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]', re.DOTALL)
_OPEN = frozenset(b"[{")

# C0, DEL, C1 and the two Unicode line/paragraph separators: anything that
# can split or recolour a log line, or hide in a terminal.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclasses.dataclass(frozen=True, slots=True)
class RelayOptions:
    """The v2 options of one relay (wire contract, v2): all default to v1."""

    resumable: bool = False
    """The relay survives broken connections."""
    receivers: int = 1
    """GETs that each receive the whole upload (fan-out when > 1)."""
    max_rate: int = 0
    """Bytes/s this relay moves at most; 0: none of its own."""

    @classmethod
    def checked(cls, resumable: bool, receivers: int, max_rate: int) -> RelayOptions:
        """The options, or `ValueError` saying what is out of range."""
        if isinstance(receivers, bool) or not isinstance(receivers, int):
            raise ValueError("relay: receivers must be a whole number")
        if not 1 <= receivers <= MAX_RECEIVERS:
            raise ValueError(f"relay: receivers must be from 1 to {MAX_RECEIVERS}")
        if isinstance(max_rate, bool) or not isinstance(max_rate, int) or max_rate < 0:
            raise ValueError("relay: max_rate must be a whole number of bytes/s, 0 or more")
        if max_rate > _MAX_INT64:
            raise ValueError("relay: max_rate must fit in a signed 64-bit integer")
        if resumable and receivers > 1:
            raise ValueError("relay: resumable and receivers > 1 cannot be combined")
        return cls(bool(resumable), receivers, max_rate)


@dataclasses.dataclass(frozen=True, slots=True)
class MintRequest:
    workspace_id: str
    source_exe_id: str
    dest_exe_id: str
    ttl_seconds: int
    max_bytes: int
    options: RelayOptions = RelayOptions()
    v2_fields: frozenset[str] = frozenset()
    """The v2 options the request named: the answer echoes their values."""

    @property
    def resumable(self) -> bool:
        return self.options.resumable

    def echoed(self, max_rate: int | None = None) -> dict[str, object]:
        """The effective v2 options for the answer (``max_rate``: the rate
        the server will apply). A request that named none of them gets
        none, so a v1 answer stays byte-for-byte the seed's."""
        if not self.v2_fields:
            return {}
        options = self.options
        return {
            "resumable": options.resumable,
            "receivers": options.receivers,
            "max_rate": options.max_rate if max_rate is None else max_rate,
        }


def check_secret(authorization: str | None, secret: str) -> None:
    """Raise 401 unless the header is ``Bearer <secret>`` (constant time)."""
    token = extract_bearer_ticket(authorization)
    if token is None or not hmac.compare_digest(token.encode(), secret.encode()):
        raise MintUnauthorized()


def _too_deep(body: bytes) -> bool:
    """Whether brackets outside strings nest deeper than MAX_DEPTH. One
    iterative pass, so its cost is linear and it cannot recurse itself."""
    depth = 0
    for match in _STRUCTURE.finditer(body):
        token = match.group()
        if len(token) != 1:
            continue  # a whole string: brackets inside it are text
        if token[0] in _OPEN:
            depth += 1
            if depth > MAX_DEPTH:
                return True
        else:
            depth -= 1
    return False


class _NotJSONConstant(ValueError):
    """NaN, Infinity or -Infinity: Python's extensions, which JSON lacks."""


def _reject_constant(name: str) -> NoReturn:
    # Python accepts NaN/Infinity/-Infinity; Go's decoder (and JSON) do not.
    raise _NotJSONConstant(name)


def _kind(value: object) -> str:
    """The JSON type of a decoded value, for "must be X, not <kind>". One of
    a fixed few words: a detail never echoes what the client sent."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


# One decoder for every mint: json.loads with options builds one per call
# (measurable on small relays).
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def _decode(body: bytes) -> Any:
    if body.startswith(b"\xef\xbb\xbf"):
        # Go rejects a BOM as an invalid character.
        raise InvalidJSON("body starts with a byte order mark")
    try:
        # Decode explicitly: json.loads(bytes) would guess UTF-16/32 and
        # accept what Go refuses. Strict UTF-8 turns those into NULs and
        # stray bytes, which json.loads then rejects.
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        # ``reason`` is the codec's fixed phrase ("invalid start byte").
        raise InvalidJSON(f"body is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    if not text.strip(" \t\r\n"):  # JSON's whitespace only
        raise InvalidJSON("empty body")
    # Fewer brackets than the limit cannot nest past it: skip the scan (the
    # usual mint has exactly one).
    if body.count(b"[") + body.count(b"{") > MAX_DEPTH and _too_deep(body):
        raise InvalidJSON(f"nested deeper than {MAX_DEPTH} levels")
    try:
        return _DECODER.decode(text)
    except json.JSONDecodeError as exc:
        # ``msg`` is the json module's own fixed text ("Expecting value",
        # "Unterminated string starting at"), never a copy of the body; the
        # position tells the client where.
        where = f"{exc.msg.removesuffix(' at')} at line {exc.lineno} column {exc.colno}"
        raise InvalidJSON(_NOT_PLAIN.sub("?", where)[:_DETAIL_LIMIT]) from None
    except _NotJSONConstant as exc:
        raise InvalidJSON(f"{exc} is not valid JSON") from None
    except ValueError:
        # What is left of ValueError: an int of more digits than
        # sys.get_int_max_str_digits.
        raise InvalidJSON("a number has too many digits") from None
    except RecursionError:
        # Unreachable after the depth scan; caught as a last line of defence.
        raise InvalidJSON(f"nested deeper than {MAX_DEPTH} levels") from None


def _clean_id(key: str, value: str) -> str:
    # Lone surrogates (from "\ud800" escapes) are what Go turns into U+FFFD;
    # doing the same keeps them from breaking UTF-8 log streams later.
    value = _SURROGATE.sub("\ufffd", value)
    if len(value.encode("utf-8")) > MAX_ID_BYTES or _UNPRINTABLE.search(value):
        raise InvalidField(key, f"{key} must be at most {MAX_ID_BYTES} bytes of printable text")
    return value


def _seconds(value: float) -> str:
    value = float(value)
    return str(int(value)) if value.is_integer() else f"{value:g}"


def parse_mint_request(
    body: bytes,
    max_ttl_s: float = DEFAULT_MAX_TTL_S,
    max_receivers: int = DEFAULT_MAX_RECEIVERS,
) -> MintRequest:
    """Parse a mint body as the Go handler does, within the input limits.

    Raises `InvalidJSON`, `MissingIds` or `InvalidField` (all 400) and nothing
    else, whatever ``body`` holds."""
    doc = _decode(body)
    if doc is None:  # Go decodes null into the zero struct
        doc = {}
    if not isinstance(doc, dict):
        raise InvalidJSON(f"body must be a JSON object, not {_kind(doc)}")
    ids: list[str] = []
    for key in ID_FIELDS:
        value = doc.get(key)  # null: Go leaves the field empty
        if value is not None and not isinstance(value, str):
            raise InvalidJSON(f"{key} must be a string, not {_kind(value)}", key)
        ids.append(value or "")
    ints: list[int] = []
    for key, unit in _INT_FIELDS:
        value = doc.get(key)
        if value is None:
            value = 0
        # Go: not an int64, so the decode fails. A float is refused even
        # when whole (1.0, 1e3), as Go refuses it.
        if isinstance(value, bool) or not isinstance(value, int):
            number = isinstance(value, float)
            detail = f"{key} must be a whole number of {unit}"
            raise InvalidJSON(detail if number else f"{detail}, not {_kind(value)}", key)
        if not _MIN_INT64 <= value <= _MAX_INT64:
            raise InvalidJSON(f"{key} must fit in a signed 64-bit integer", key)
        ints.append(value)
    if not all(ids):
        raise MissingIds()
    ids = [_clean_id(key, value) for key, value in zip(ID_FIELDS, ids, strict=True)]
    ttl_seconds, max_bytes = ints
    # Compared as int against float, which Python does exactly: no float()
    # of a huge int, so no OverflowError and no rounding at the boundary.
    if ttl_seconds > max_ttl_s:
        raise InvalidField("ttl_seconds", f"ttl_seconds must be at most {_seconds(max_ttl_s)}")
    named = frozenset(key for key in V2_FIELDS if key in doc)
    options = _options(doc, max_receivers) if named else RelayOptions()
    return MintRequest(ids[0], ids[1], ids[2], ttl_seconds, max_bytes, options, named)


def _options(doc: dict[str, Any], max_receivers: int) -> RelayOptions:
    """The v2 fields (each optional; ``null`` is its default). Each wrong one
    is a 400 naming it and what it accepts."""
    resumable = doc.get("resumable")
    if resumable is None:
        resumable = False
    if not isinstance(resumable, bool):
        raise InvalidField("resumable", "resumable must be true or false")
    receivers = doc.get("receivers")
    if receivers is None:
        receivers = 1
    if (
        isinstance(receivers, bool)
        or not isinstance(receivers, int)
        or not 1 <= receivers <= max_receivers
    ):
        raise InvalidField(
            "receivers", f"receivers must be a whole number from 1 to {max_receivers}"
        )
    max_rate = doc.get("max_rate")
    if max_rate is None:
        max_rate = 0
    if (
        isinstance(max_rate, bool)
        or not isinstance(max_rate, int)
        or not 0 <= max_rate <= _MAX_INT64
    ):
        raise InvalidField(
            "max_rate", "max_rate must be a whole number of bytes per second, 0 or more"
        )
    if resumable and receivers > 1:
        raise InvalidField("receivers", "resumable and receivers > 1 cannot be combined")
    return RelayOptions(resumable, receivers, max_rate)


def mint_response_body(
    ticket: str, base_url: str, expires_at_rfc3339: str, options: dict[str, object] | None = None
) -> bytes:
    url = f"{base_url}/relay/{ticket}"
    doc: dict[str, object] = {
        "ticket": ticket,
        "upload_url": url,
        "download_url": url,
        "expires_at": expires_at_rfc3339,
    }
    if options:
        doc.update(options)
    return COMPACT_JSON.encode(doc).encode() + b"\n"
