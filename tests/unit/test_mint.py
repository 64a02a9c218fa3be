from __future__ import annotations

import json

import pytest

from fastrelay.errors import InvalidJSON, MintUnauthorized, MissingIds, RelayError
from fastrelay.mint import check_secret, mint_response_body, parse_mint_request

IDS = '"workspace_id":"w","source_exe_id":"s","dest_exe_id":"d"'


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
