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
