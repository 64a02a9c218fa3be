"""Signed tickets: format, verification, key rotation, hostile input."""

from __future__ import annotations

import base64
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fastrelay.cluster.signed_tickets import (
    MAX_KEYS,
    MAX_TICKET_CHARS,
    KeyFileError,
    TicketClaims,
    TicketKeys,
    looks_signed,
)

K1 = b"k" * 32
K2 = b"0123456789abcdef0123456789abcdef-second"


def claims(**kw: object) -> TicketClaims:
    args: dict[str, object] = {
        "workspace_id": "ws-1",
        "source_exe_id": "exe-a",
        "dest_exe_id": "exe-b",
        "max_bytes": 1000,
        "expires_ms": 1_800_000_000_000,
    }
    args.update(kw)
    return TicketClaims.new(**args)  # type: ignore[arg-type]


def test_round_trip_and_format() -> None:
    keys = TicketKeys([K1])
    c = claims()
    ticket = keys.sign(c)
    assert re.fullmatch(r"rly_[A-Za-z0-9_-]+", ticket)
    assert looks_signed(ticket) and len(ticket) > 47
    assert keys.verify(ticket) == c
    # 71 fixed bytes + ids, base64: the length the docs state for these ids.
    ids = len("ws-1") + len("exe-a") + len("exe-b")
    assert len(ticket) == 4 + -(-(71 + ids) * 4 // 3)


def test_two_tickets_with_the_same_claims_differ() -> None:
    keys = TicketKeys([K1])
    a, b = claims(), claims()
    assert a.nonce != b.nonce
    assert keys.sign(a) != keys.sign(b)


def test_unicode_ids_and_limits_survive() -> None:
    keys = TicketKeys([K1])
    c = claims(workspace_id="wörkspace-☃", max_bytes=0, expires_ms=2**63 - 1)
    assert keys.verify(keys.sign(c)) == c


def test_other_key_does_not_verify_and_rotation_does() -> None:
    old, new = TicketKeys([K1]), TicketKeys([K2])
    t_old = old.sign(claims())
    assert new.verify(t_old) is None
    rotated = TicketKeys([K2, K1])  # the new key signs, the old one still verifies
    assert rotated.verify(t_old) is not None
    t_new = rotated.sign(claims())
    assert new.verify(t_new) is not None and old.verify(t_new) is None


def test_any_flipped_bit_is_refused() -> None:
    keys = TicketKeys([K1])
    ticket = keys.sign(claims())
    raw = bytearray(base64.urlsafe_b64decode(ticket[4:] + "=" * (-len(ticket[4:]) % 4)))
    for i in range(len(raw)):
        for bit in (0x01, 0x80):
            raw[i] ^= bit
            forged = "rly_" + base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()
            assert keys.verify(forged) is None, i
            raw[i] ^= bit


def test_non_canonical_spellings_are_refused() -> None:
    keys = TicketKeys([K1])
    ticket = keys.sign(claims())
    assert keys.verify(ticket) is not None
    for variant in (
        ticket + "=",  # padding
        ticket + "==",
        ticket.replace("-", "+").replace("_", "/") if ("-" in ticket or "_" in ticket) else "x",
        ticket[:-1] + chr(ord(ticket[-1]) ^ 1),  # other trailing bits or another byte
        ticket + "\n",
        " " + ticket,
        ticket.upper(),
    ):
        assert keys.verify(variant) is None, variant


def test_expiry_is_the_callers_to_check() -> None:
    c = claims(expires_ms=5000)
    assert not c.expired(4999)
    assert c.expired(5000)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "# only a comment\n\n",
        "short\n",
        "\n".join(["x" * 40] * (MAX_KEYS + 1)),
    ],
)
def test_bad_key_files(text: str) -> None:
    with pytest.raises(KeyFileError):
        TicketKeys.parse(text)


def test_key_file_lines_comments_and_spaces() -> None:
    keys = TicketKeys.parse(
        "# rotated 2026-12-01\n  " + K2.decode() + "  \n\n" + K1.decode() + "\n"
    )
    assert len(keys) == 2
    ticket = keys.sign(claims())
    assert TicketKeys([K2]).verify(ticket) is not None  # the first key signs
    assert K1.decode() not in repr(keys) and K2.decode() not in repr(keys)


def test_ids_too_long_for_a_ticket() -> None:
    with pytest.raises(ValueError):
        TicketKeys([K1]).sign(claims(workspace_id="w" * 1025))


@given(st.text(max_size=200))
def test_arbitrary_text_is_never_accepted_and_never_raises(text: str) -> None:
    keys = TicketKeys([K1])
    assert keys.verify("rly_" + text) is None
    assert keys.verify(text) is None


@given(st.binary(min_size=0, max_size=900))
def test_arbitrary_bodies_are_never_accepted(raw: bytes) -> None:
    keys = TicketKeys([K1])
    ticket = "rly_" + base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
    assert keys.verify(ticket) is None


def test_longest_ticket_fits_the_bound() -> None:
    keys = TicketKeys([K1])
    ticket = keys.sign(
        claims(workspace_id="w" * 1024, source_exe_id="s" * 1024, dest_exe_id="d" * 1024)
    )
    assert len(ticket) <= MAX_TICKET_CHARS
    assert keys.verify(ticket) is not None
    assert keys.verify(ticket + "A" * (MAX_TICKET_CHARS + 1 - len(ticket))) is None
