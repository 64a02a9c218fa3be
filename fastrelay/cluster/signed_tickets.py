"""Signed, self-contained tickets: any node with the key serves any node's ticket.

Theory of operation
-------------------
A random ticket (`tickets.new_ticket`) means something only to the process
that minted it. To run several nodes behind one address, a ticket must carry
what a node needs to serve it, and prove that a minter holding the shared
key made it. With ``--ticket-key-file`` a ticket is

    ``rly_`` + unpadded URL-safe base64 of ``body || tag``

where ``body`` is (all integers big-endian)::

    version      1 byte    1
    expires_ms   8 bytes   the pairing deadline, Unix time in milliseconds
    max_bytes    8 bytes   0: unlimited
    nonce       16 bytes   from the OS CSPRNG: two tickets never coincide
    3 x (length 2 bytes, UTF-8 bytes): workspace_id, source_exe_id, dest_exe_id

Version 2 (a ticket minted with the v2 options) puts the mint options every
node must know between the nonce and the ids::

    flags        1 byte    bit 0: resumable
    receivers    2 bytes   fan-out receivers (1: one)
    max_rate     8 bytes   bytes/s, 0: unlimited
    ttl_ms       4 bytes   the pairing window a break opens again (resumable)

A ticket without those options is signed as version 1 (15 bytes shorter),
so existing tickets and their lengths stay as they were.

and ``tag`` is HMAC-SHA256(key, ``DOMAIN || body``), 32 bytes. The first key
of a `TicketKeys` signs; every key verifies (so keys rotate without
downtime: add the new key second, reload every node, move it first, reload,
drop the old one once its tickets have expired). Tags are compared with
`hmac.compare_digest`.

What a ticket reveals to whoever holds it: its expiry, its byte limit and
the three ids, in clear (they are signed, not encrypted). Nothing about the
key or other tickets. Clients must treat tickets as opaque strings.

Only the canonical encoding is accepted (re-encoding the decoded bytes must
give the same text): otherwise one ticket would have several spellings, and
single use, which is keyed on the text, could be dodged by re-spelling a
spent ticket.

No IO and no clock here: times are passed in.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import hmac
import secrets
import struct
from collections.abc import Sequence

from ..core.tickets import TICKET_PREFIX

VERSION = 1
VERSION_OPTIONS = 2
DOMAIN = b"fastrelay ticket v1\x00"
TAG_BYTES = 32
NONCE_BYTES = 16
MIN_KEY_BYTES = 32
"""A key shorter than this is refused: ``openssl rand -base64 32`` gives 44."""
MAX_KEYS = 16
"""Verifying a forged ticket costs one HMAC per key: keep that bounded."""
MAX_ID_BYTES = 1024
"""Ids longer than this never come from a mint (which allows 256 bytes); the
bound keeps a decoded ticket small whatever the minter embedding us does."""

_FIXED = struct.Struct(">BQQ16s")
_OPTIONS = struct.Struct(">BHQI")
_LEN = struct.Struct(">H")
_RESUMABLE = 0x01
MIN_BODY_BYTES = _FIXED.size + 3 * _LEN.size
MAX_TICKET_CHARS = (
    len(TICKET_PREFIX)
    + (MIN_BODY_BYTES + _OPTIONS.size + 3 * MAX_ID_BYTES + TAG_BYTES) * 4 // 3
    + 4
)


class KeyFileError(ValueError):
    """The key file's content cannot be used; the message says why."""


@dataclasses.dataclass(frozen=True, slots=True)
class TicketClaims:
    """What a signed ticket says."""

    workspace_id: str
    source_exe_id: str
    dest_exe_id: str
    max_bytes: int
    expires_ms: int
    """The pairing deadline, Unix time in milliseconds."""
    nonce: bytes
    resumable: bool = False
    receivers: int = 1
    max_rate: int = 0
    ttl_ms: int = 0
    """The ticket's pairing window, for a resumable ticket (0 otherwise)."""

    @property
    def has_options(self) -> bool:
        return self.resumable or self.receivers != 1 or self.max_rate != 0

    @classmethod
    def new(
        cls,
        workspace_id: str,
        source_exe_id: str,
        dest_exe_id: str,
        *,
        max_bytes: int,
        expires_ms: int,
        resumable: bool = False,
        receivers: int = 1,
        max_rate: int = 0,
        ttl_ms: int = 0,
    ) -> TicketClaims:
        return cls(
            workspace_id,
            source_exe_id,
            dest_exe_id,
            max(0, max_bytes),
            expires_ms,
            secrets.token_bytes(NONCE_BYTES),
            resumable,
            receivers,
            max_rate,
            ttl_ms if resumable else 0,
        )

    def expired(self, now_ms: int) -> bool:
        return now_ms >= self.expires_ms


class TicketKeys:
    """The keys of a key file: the first signs, all verify."""

    __slots__ = ("_keys",)

    def __init__(self, keys: Sequence[bytes]) -> None:
        if not keys:
            raise KeyFileError("holds no key")
        if len(keys) > MAX_KEYS:
            raise KeyFileError(f"holds {len(keys)} keys; at most {MAX_KEYS} are allowed")
        for number, key in enumerate(keys, 1):
            if len(key) < MIN_KEY_BYTES:
                raise KeyFileError(
                    f"key {number} is {len(key)} bytes; keys must be at least {MIN_KEY_BYTES} "
                    "(make one with: openssl rand -base64 32)"
                )
        self._keys = tuple(keys)

    @classmethod
    def parse(cls, text: str) -> TicketKeys:
        """One key per line; blank lines and lines starting with ``#`` are skipped;
        surrounding white space is not part of a key."""
        keys = [
            line.strip().encode("utf-8")
            for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")
        ]
        return cls(keys)

    def __len__(self) -> int:
        return len(self._keys)

    def sign(self, claims: TicketClaims) -> str:
        body = _encode_body(claims)
        raw = body + _tag(self._keys[0], body)
        return TICKET_PREFIX + base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")

    def verify(self, ticket: str) -> TicketClaims | None:
        """The claims of ``ticket`` if one of our keys signed it, else None.
        Expiry is the caller's to check (`TicketClaims.expired`)."""
        raw = _decode(ticket)
        if raw is None:
            return None
        body, tag = raw[:-TAG_BYTES], raw[-TAG_BYTES:]
        # Every key is tried even after a match, so the time taken does not
        # tell which key (if any) signed.
        good = False
        for key in self._keys:
            good |= hmac.compare_digest(_tag(key, body), tag)
        return _decode_body(body) if good else None

    def __repr__(self) -> str:
        return f"<TicketKeys {len(self._keys)} key(s)>"  # never the keys


def looks_signed(ticket: str) -> bool:
    """Cheap pre-check: a random ticket is exactly 47 characters, a signed one longer."""
    return len(ticket) > 47 and ticket.startswith(TICKET_PREFIX)


def _tag(key: bytes, body: bytes) -> bytes:
    return hmac.new(key, DOMAIN + body, hashlib.sha256).digest()


def _encode_body(claims: TicketClaims) -> bytes:
    options = claims.has_options
    version = VERSION_OPTIONS if options else VERSION
    parts = [_FIXED.pack(version, claims.expires_ms, claims.max_bytes, claims.nonce)]
    if options:
        flags = _RESUMABLE if claims.resumable else 0
        ttl_ms = min(claims.ttl_ms, 0xFFFFFFFF)
        parts.append(_OPTIONS.pack(flags, claims.receivers, claims.max_rate, ttl_ms))
    for text in (claims.workspace_id, claims.source_exe_id, claims.dest_exe_id):
        data = text.encode("utf-8")
        if len(data) > MAX_ID_BYTES:
            raise ValueError(f"ids must be at most {MAX_ID_BYTES} bytes in a signed ticket")
        parts += (_LEN.pack(len(data)), data)
    return b"".join(parts)


def _decode(ticket: str) -> bytes | None:
    if not ticket.startswith(TICKET_PREFIX) or len(ticket) > MAX_TICKET_CHARS:
        return None
    text = ticket[len(TICKET_PREFIX) :]
    try:
        encoded = text.encode("ascii")
        raw = base64.b64decode(encoded + b"=" * (-len(encoded) % 4), altchars=b"-_", validate=True)
    except (UnicodeEncodeError, binascii.Error, ValueError):
        return None
    # Canonical spelling only (see the module docstring).
    if base64.urlsafe_b64encode(raw).rstrip(b"=") != encoded:
        return None
    if len(raw) < MIN_BODY_BYTES + TAG_BYTES:
        return None
    return raw


def _decode_body(body: bytes) -> TicketClaims | None:
    """Parse a body whose tag checked out. None if it is not a body we would
    have written (a future version, bad lengths or UTF-8)."""
    try:
        version, expires_ms, max_bytes, nonce = _FIXED.unpack_from(body)
        at = _FIXED.size
        flags, receivers, max_rate, ttl_ms = 0, 1, 0, 0
        if version == VERSION_OPTIONS:
            flags, receivers, max_rate, ttl_ms = _OPTIONS.unpack_from(body, at)
            at += _OPTIONS.size
            if flags & ~_RESUMABLE or receivers < 1:
                return None
        elif version != VERSION:
            return None
        ids: list[str] = []
        for _ in range(3):
            (length,) = _LEN.unpack_from(body, at)
            at += _LEN.size
            if length > MAX_ID_BYTES or at + length > len(body):
                return None
            ids.append(body[at : at + length].decode("utf-8"))
            at += length
    except (struct.error, UnicodeDecodeError):
        return None
    if at != len(body):
        return None
    claims = TicketClaims(
        ids[0],
        ids[1],
        ids[2],
        max_bytes,
        expires_ms,
        nonce,
        bool(flags & _RESUMABLE),
        receivers,
        max_rate,
        ttl_ms,
    )
    if version == VERSION_OPTIONS and not claims.has_options:
        return None  # canonical: a ticket without options is version 1
    return claims
