from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastrelay.core.errors import (
    InvalidField,
    InvalidJSON,
    MintUnauthorized,
    MissingIds,
    RelayError,
)
from fastrelay.core.mint import (
    MAX_DEPTH,
    MintRequest,
    check_secret,
    mint_response_body,
    parse_mint_request,
)

IDS = '"workspace_id":"w","source_exe_id":"s","dest_exe_id":"d"'
ID_DOC = {"workspace_id": "w", "source_exe_id": "s", "dest_exe_id": "d"}


def body(**fields: Any) -> bytes:
    return json.dumps({**ID_DOC, **fields}).encode()


def test_valid_request_and_ignored_fields() -> None:
    r = parse_mint_request(("{" + IDS + ',"ttl_seconds":30,"max_bytes":5,"x":[1]}').encode())
    assert (r.workspace_id, r.ttl_seconds, r.max_bytes) == ("w", 30, 5)
    r = parse_mint_request(("{" + IDS + "}").encode())
    assert (r.ttl_seconds, r.max_bytes) == (0, 0)


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b"", InvalidJSON),
        (b"{", InvalidJSON),
        (b"[]", InvalidJSON),
        (b"\xff", InvalidJSON),
        (("{" + IDS + ',"ttl_seconds":"5"}').encode(), InvalidJSON),
        (("{" + IDS + ',"max_bytes":1.5}').encode(), InvalidJSON),
        (("{" + IDS + ',"max_bytes":true}').encode(), InvalidJSON),
        (b'{"workspace_id":1,"source_exe_id":"s","dest_exe_id":"d"}', InvalidJSON),
        (b'{"workspace_id":"w","source_exe_id":"s"}', MissingIds),
        (b'{"workspace_id":"","source_exe_id":"s","dest_exe_id":"d"}', MissingIds),
        (b"null", MissingIds),
    ],
)
def test_bad_requests(body: bytes, error: type[RelayError]) -> None:
    with pytest.raises(error):
        parse_mint_request(body)


def test_error_bodies_are_go_encoder_output() -> None:
    assert InvalidJSON().body() == b'{"error":"invalid JSON"}\n'
    assert MissingIds().status == 400
    err = InvalidJSON("ttl_seconds must be a whole number of seconds", "ttl_seconds")
    assert (
        err.body() == b'{"error":"invalid JSON: ttl_seconds must be a whole number of seconds"}\n'
    )
    assert (err.status, err.field, err.detail) == (
        400,
        "ttl_seconds",
        "ttl_seconds must be a whole number of seconds",
    )


# --- every 400 says what is wrong, after Go's text ---------------------------------


def detail_of(raw: bytes) -> tuple[str, str | None]:
    """The message after "invalid JSON: ", and the field named."""
    with pytest.raises(InvalidJSON) as info:
        parse_mint_request(raw)
    err = info.value
    assert err.status == 400
    body = err.body()
    # Clients matching Go's text keep matching: the body starts with it.
    assert body.startswith(b'{"error":"invalid JSON: ') and body.endswith(b'"}\n')
    assert json.loads(body)["error"] == f"invalid JSON: {err.detail}"
    assert err.detail is not None
    return err.detail, err.field


@pytest.mark.parametrize(
    ("fields", "detail"),
    [
        ({"ttl_seconds": 1.5}, "ttl_seconds must be a whole number of seconds"),
        ({"ttl_seconds": 1.0}, "ttl_seconds must be a whole number of seconds"),  # Go too
        ({"ttl_seconds": "5"}, "ttl_seconds must be a whole number of seconds, not a string"),
        ({"ttl_seconds": True}, "ttl_seconds must be a whole number of seconds, not a boolean"),
        ({"ttl_seconds": [5]}, "ttl_seconds must be a whole number of seconds, not an array"),
        ({"max_bytes": 1.5}, "max_bytes must be a whole number of bytes"),
        ({"max_bytes": {"n": 1}}, "max_bytes must be a whole number of bytes, not an object"),
        ({"max_bytes": 2**63}, "max_bytes must fit in a signed 64-bit integer"),
        ({"max_bytes": -(2**63) - 1}, "max_bytes must fit in a signed 64-bit integer"),
        ({"ttl_seconds": -(2**64)}, "ttl_seconds must fit in a signed 64-bit integer"),
        ({"workspace_id": 1}, "workspace_id must be a string, not a number"),
        ({"source_exe_id": ["s"]}, "source_exe_id must be a string, not an array"),
        ({"dest_exe_id": False}, "dest_exe_id must be a string, not a boolean"),
        ({"dest_exe_id": {}}, "dest_exe_id must be a string, not an object"),
    ],
)
def test_wrong_types_name_the_field(fields: dict[str, Any], detail: str) -> None:
    got, field = detail_of(json.dumps({**ID_DOC, **fields}).encode())
    assert got == detail
    assert field == next(iter(fields))


@pytest.mark.parametrize(
    ("raw", "detail"),
    [
        (b"", "empty body"),
        (b" \r\n\t", "empty body"),
        (b"[]", "body must be a JSON object, not an array"),
        (b'"w"', "body must be a JSON object, not a string"),
        (b"5", "body must be a JSON object, not a number"),
        (b"true", "body must be a JSON object, not a boolean"),
        (b"{", "Expecting property name enclosed in double quotes at line 1 column 2"),
        (b"{nope", "Expecting property name enclosed in double quotes at line 1 column 2"),
        (b'{"a":}', "Expecting value at line 1 column 6"),
        (b'{"a":1,\n"b"}', "Expecting ':' delimiter at line 2 column 4"),
        (b'{"a":"x', "Unterminated string starting at line 1 column 6"),
        (b'{"a":"\x01"}', "Invalid control character at line 1 column 7"),
        (b'{"a":"\\q"}', "Invalid \\escape at line 1 column 7"),
        (b'{"a":1} {}', "Extra data at line 1 column 9"),
        (b'{"a":NaN}', "NaN is not valid JSON"),
        (b'{"a":-Infinity}', "-Infinity is not valid JSON"),
        (b'{"a":' + b"1" * 5000 + b"}", "a number has too many digits"),
        (b"\xff{}", "body is not UTF-8 (invalid start byte at byte 0)"),
        (b'{"a":"\xc3"}', "body is not UTF-8 (invalid continuation byte at byte 6)"),
        (b"\xef\xbb\xbf{}", "body starts with a byte order mark"),
        (b"[" * 33 + b"]" * 33, "nested deeper than 32 levels"),
    ],
)
def test_body_errors_say_what_and_where(raw: bytes, detail: str) -> None:
    assert detail_of(raw) == (detail, None)


def test_exponent_numbers_are_not_whole_numbers() -> None:
    # 1e3 and 1e400 (inf to Python) are floats: Go's int64 decode refuses them too.
    for number in (b"1e3", b"1e400"):
        raw = b"{" + IDS.encode() + b',"ttl_seconds":' + number + b"}"
        assert detail_of(raw) == ("ttl_seconds must be a whole number of seconds", "ttl_seconds")


def test_syntax_details_never_echo_the_body() -> None:
    # The detail is the json module's fixed text and a position: nothing the
    # client sent, however it tries (quotes, newlines, a long string).
    hostile = b'{"a":"' + b"\\u2028" + b"x" * 5000 + b'", "b":"\n\x1b[31m" ' + b"z" * 500
    detail, _ = detail_of(hostile)
    assert "x" * 10 not in detail and "z" not in detail and "\x1b" not in detail
    assert len(detail) <= 100 and detail.isascii() and detail.isprintable()


def test_existing_texts_are_unchanged() -> None:
    # Fixed by the wire contract (README) and the e2e contract tests.
    with pytest.raises(MissingIds) as missing:
        parse_mint_request(b'{"workspace_id":"w","source_exe_id":"s"}')
    assert missing.value.body() == (
        b'{"error":"workspace_id, source_exe_id, dest_exe_id required"}\n'
    )
    with pytest.raises(InvalidField) as field:
        parse_mint_request(body(ttl_seconds=86401))
    assert field.value.body() == b'{"error":"ttl_seconds must be at most 86400"}\n'


def test_int64_bounds_are_gos() -> None:
    # Go decodes into int64: its whole range is accepted (negative: default/unlimited).
    r = parse_mint_request(body(ttl_seconds=-(2**63), max_bytes=2**63 - 1))
    assert (r.ttl_seconds, r.max_bytes) == (-(2**63), 2**63 - 1)


def test_secret_check() -> None:
    check_secret("Bearer s3cret", "s3cret")
    for bad in (None, "Bearer s3cre", "bearer s3cret", "Bearer s3cret "):
        with pytest.raises(MintUnauthorized):
            check_secret(bad, "s3cret")


def test_response_body() -> None:
    body = mint_response_body("rly_t", "https://r.example", "2026-01-01T00:00:00.000000Z")
    assert body.endswith(b"}\n")
    doc = json.loads(body)
    assert doc["upload_url"] == doc["download_url"] == "https://r.example/relay/rly_t"


# --- input hygiene ---------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b"\xef\xbb\xbf" + body(),  # UTF-8 BOM
        json.dumps(ID_DOC).encode("utf-16"),  # with its BOM
        json.dumps(ID_DOC).encode("utf-16-le"),
        json.dumps(ID_DOC).encode("utf-16-be"),
        json.dumps(ID_DOC).encode("utf-32"),
        json.dumps(ID_DOC, ensure_ascii=False).replace("w", "\xe9").encode("latin-1"),
        b'{"workspace_id":"w","source_exe_id":"s","dest_exe_id":"d","x":NaN}',
        b'{"workspace_id":"w","source_exe_id":"s","dest_exe_id":"d","x":-Infinity}',
        body(max_bytes=2**63),  # not an int64: Go's decode fails
    ],
)
def test_non_utf8_json_is_invalid(raw: bytes) -> None:
    with pytest.raises(InvalidJSON):
        parse_mint_request(raw)


def test_depth_limit_is_32_and_never_reaches_recursion() -> None:
    ok = b'{"workspace_id":"w","source_exe_id":"s","dest_exe_id":"d","x":'
    inner = MAX_DEPTH - 1  # the object itself is one level
    assert parse_mint_request(ok + b"[" * inner + b"]" * inner + b"}").workspace_id == "w"
    with pytest.raises(InvalidJSON):
        parse_mint_request(ok + b"[" * (inner + 1) + b"]" * (inner + 1) + b"}")
    # Far past Python's recursion limit: rejected by the scan, not json.loads.
    for hostile in (
        b"[" * 30000 + b"]" * 30000,
        b'{"a":' * 6000 + b"1" + b"}" * 6000,
        ok + b"[" * 30000 + b"]" * 30000 + b"}",
        b"[" * 30000,  # unterminated
    ):
        with pytest.raises(InvalidJSON):
            parse_mint_request(hostile)


def test_brackets_inside_strings_do_not_count() -> None:
    deep_text = "[" * 100 + '\\"{' * 50  # escaped quotes must not end the string
    r = parse_mint_request(body(note=deep_text, workspace_id="w[{"))
    assert r.workspace_id == "w[{"


@pytest.mark.parametrize("ttl", [86401, 10**12, 2**63 - 1])
def test_ttl_above_max_is_400_naming_the_field(ttl: int) -> None:
    with pytest.raises(InvalidField) as info:
        parse_mint_request(body(ttl_seconds=ttl))
    assert info.value.status == 400 and info.value.field == "ttl_seconds"
    assert info.value.body() == b'{"error":"ttl_seconds must be at most 86400"}\n'


def test_ttl_bounds_and_go_meanings() -> None:
    assert parse_mint_request(body(ttl_seconds=86400)).ttl_seconds == 86400
    assert parse_mint_request(body(ttl_seconds=-(2**63 - 1))).ttl_seconds < 0  # = default
    assert parse_mint_request(body(ttl_seconds=100), max_ttl_s=100).ttl_seconds == 100
    with pytest.raises(InvalidField, match=r"at most 100$"):
        parse_mint_request(body(ttl_seconds=101), max_ttl_s=100.0)
    with pytest.raises(InvalidField, match=r"at most 0\.5$"):
        parse_mint_request(body(ttl_seconds=1), max_ttl_s=0.5)
    assert parse_mint_request(body(max_bytes=-5)).max_bytes == -5  # unlimited
    # duplicate keys: the last one wins, as in Go
    raw = b'{"workspace_id":"a","workspace_id":"b","source_exe_id":"s","dest_exe_id":"d"}'
    assert parse_mint_request(raw).workspace_id == "b"


@pytest.mark.parametrize("field", ["workspace_id", "source_exe_id", "dest_exe_id"])
@pytest.mark.parametrize(
    "value",
    ["a" * 257, "\xe9" * 129, "a\nb", "a\rb", "\x1b[31m", "a\x00", "a\x7f", "a\x85", "a\u2028"],
)
def test_bad_ids_are_400_naming_the_field(field: str, value: str) -> None:
    with pytest.raises(InvalidField) as info:
        parse_mint_request(body(**{field: value}))
    assert info.value.field == field
    assert json.loads(info.value.body()) == {
        "error": f"{field} must be at most 256 bytes of printable text"
    }


def test_longest_and_unicode_ids_are_accepted() -> None:
    r = parse_mint_request(body(workspace_id="a" * 256, source_exe_id="\xe9" * 128))
    assert (len(r.workspace_id), r.source_exe_id) == (256, "\xe9" * 128)
    # A lone surrogate escape becomes U+FFFD, as Go decodes it.
    r = parse_mint_request(b'{"workspace_id":"a\\ud800","source_exe_id":"s","dest_exe_id":"d"}')
    assert r.workspace_id == "a\ufffd"


# --- fuzz: nothing but a MintRequest or a 400 RelayError, whatever the bytes -----------

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)
KEYS = st.sampled_from(["workspace_id", "source_exe_id", "dest_exe_id", "ttl_seconds", "max_bytes"])
MINT_DOCS = st.dictionaries(KEYS, JSON_VALUES | st.text(min_size=1), max_size=5)


def assert_parses_or_400(raw: bytes) -> None:
    try:
        result = parse_mint_request(raw)
    except RelayError as exc:
        assert exc.status == 400, exc
    else:
        assert isinstance(result, MintRequest)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_fuzz_arbitrary_bytes(raw: bytes) -> None:
    assert_parses_or_400(raw)


@settings(max_examples=300, deadline=None)
@given(JSON_VALUES)
def test_fuzz_arbitrary_json(doc: object) -> None:
    assert_parses_or_400(json.dumps(doc).encode())


@settings(max_examples=300, deadline=None)
@given(MINT_DOCS, st.booleans())
def test_fuzz_mint_shaped_documents(doc: dict[str, object], ascii_only: bool) -> None:
    assert_parses_or_400(json.dumps(doc, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass"))


# --- v2 options: resumable, receivers, max_rate ---------------------------------------

from fastrelay.core.mint import RelayOptions  # noqa: E402

_IDS = {"workspace_id": "w", "source_exe_id": "s", "dest_exe_id": "d"}


def _v2(**fields: Any) -> bytes:
    return json.dumps({**_IDS, **fields}).encode()


def test_v2_fields_default_and_are_echoed_only_when_named() -> None:
    plain = parse_mint_request(_v2())
    assert plain.options == RelayOptions() and plain.echoed() == {}
    named = parse_mint_request(_v2(receivers=3))
    assert named.options == RelayOptions(False, 3, 0)
    assert named.echoed() == {"resumable": False, "receivers": 3, "max_rate": 0}
    # The server's --max-rate lowers what is echoed.
    assert parse_mint_request(_v2(max_rate=10)).echoed(5)["max_rate"] == 5
    assert parse_mint_request(_v2(receivers=None, max_rate=None)).options == RelayOptions()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"receivers": 0}, "receivers must be a whole number from 1 to 16"),
        ({"receivers": 17}, "receivers must be a whole number from 1 to 16"),
        ({"receivers": "3"}, "receivers must be a whole number from 1 to 16"),
        ({"receivers": 2.5}, "receivers must be a whole number from 1 to 16"),
        ({"receivers": True}, "receivers must be a whole number from 1 to 16"),
        ({"max_rate": -1}, "max_rate must be a whole number of bytes per second, 0 or more"),
        ({"max_rate": 1.5}, "max_rate must be a whole number of bytes per second, 0 or more"),
        ({"max_rate": "1M"}, "max_rate must be a whole number of bytes per second, 0 or more"),
        ({"max_rate": 2**63}, "max_rate must be a whole number of bytes per second, 0 or more"),
        ({"resumable": "yes"}, "resumable must be true or false"),
        ({"resumable": True, "receivers": 2}, "resumable and receivers > 1 cannot be combined"),
    ],
)
def test_v2_fields_out_of_range_name_the_field(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidField) as info:
        parse_mint_request(_v2(**fields))
    assert info.value.message == message
    assert json.loads(info.value.body()) == {"error": message}


def test_max_receivers_is_the_servers() -> None:
    assert parse_mint_request(_v2(receivers=64), max_receivers=64).options.receivers == 64
    with pytest.raises(InvalidField, match="from 1 to 4"):
        parse_mint_request(_v2(receivers=5), max_receivers=4)


def test_relay_options_checked_for_the_library_api() -> None:
    assert RelayOptions.checked(False, 4, 100) == RelayOptions(False, 4, 100)
    for args in ((False, 0, 0), (False, 2000, 0), (False, 2, -1), (True, 2, 0), (False, True, 0)):
        with pytest.raises(ValueError):
            RelayOptions.checked(*args)  # type: ignore[arg-type]
