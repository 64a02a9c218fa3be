"""The one frozen configuration of a relay server.

Built once (by the CLI or an embedding program), validated in
``__post_init__``, passed down. Units are in the field names.
"""

from __future__ import annotations

import dataclasses
import math
import re

from .mint import MAX_RECEIVERS
from .pacing import MAX_RATE

# A Host header we are willing to put into URLs: a DNS name or IPv4 address,
# or a bracketed IPv6 literal, and an optional port. Nothing else (no
# userinfo, paths or odd bytes) reaches a mint answer.
_HOST_HEADER = re.compile(
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252})|\[[0-9A-Fa-f:.]{2,45}\])(?::[0-9]{1,5})?"
)

_REDIS_URL = re.compile(r"(?:redis|rediss|unix)://", re.IGNORECASE)
_NODE_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")

KIB = 1024
MIB = 1024 * KIB

MAX_DURATION_S = 365 * 86400.0
"""Longest duration any setting accepts (a year). Far beyond any real use,
and far below where a deadline overflows datetime or an event loop's
millisecond timers."""

MAX_BUFFER_BYTES = 64 * MIB
"""Largest buffer or size limit: each one is allocated per connection, so a
typo must not become an out-of-memory at the first request."""

_DURATIONS = (
    "ticket_ttl_s",
    "max_ttl_s",
    "idle_timeout_s",
    "header_timeout_s",
    "linger_s",
    "cluster_lease_s",
    "redis_timeout_s",
)


class ConfigValueError(ValueError):
    """A `RelayConfig` field with a value out of range.

    ``field`` is the field name, ``requirement`` says what is allowed
    ("must be ..."), ``got`` is the offending value as text (None when it must
    not be shown, e.g. a secret). ``str()`` is ``"<field> <requirement> (got
    <got>)"``; the CLI rebuilds the line with its flag names instead.
    """

    def __init__(self, field: str, requirement: str, got: str | None = None) -> None:
        self.field = field
        self.requirement = requirement
        self.got = got
        suffix = f" (got {got})" if got is not None else ""
        super().__init__(f"{field} {requirement}{suffix}")


def format_number(value: object) -> str:
    """A number as a user would have typed it: 300 not 300.0, nan, inf."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e16:
        return str(int(value))
    return str(value) if isinstance(value, int | float) else repr(value)


def _bytes_range(low: int) -> str:
    return f"must be a whole number of bytes {low}-{MAX_BUFFER_BYTES}"


def _check_seconds(config: RelayConfig, name: str) -> None:
    value = getattr(config, name)
    # bool is an int subclass but never a meant duration; nan compares false
    # with everything, so finiteness is checked explicitly.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigValueError(name, "must be a positive number of seconds", format_number(value))
    if not math.isfinite(value) or value <= 0:
        raise ConfigValueError(name, "must be a positive number of seconds", format_number(value))
    if value > MAX_DURATION_S:
        raise ConfigValueError(
            name, f"must be at most {format_number(MAX_DURATION_S)} seconds", format_number(value)
        )


def _check_int(
    config: RelayConfig, name: str, low: int, high: int | None, requirement: str
) -> None:
    value = getattr(config, name)
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < low
        or (high is not None and value > high)
    ):
        raise ConfigValueError(name, requirement, format_number(value))


@dataclasses.dataclass(frozen=True, slots=True)
class RelayConfig:
    host: str = "127.0.0.1"
    """Address to listen on."""

    port: int = 8080
    """TCP port; 0 picks a free one (the ready line says which)."""

    public_url: str | None = None
    """Base of ``upload_url``/``download_url`` in mint answers. None: derived
    from scheme, host and the bound port."""

    shared_secret: str | None = None
    """Bearer secret of the mint endpoint. None disables HTTP minting (503);
    in-process minting through `Registry.create` always works."""

    certfile: str | None = None
    """PEM certificate chain; with ``keyfile``, serve HTTPS."""

    keyfile: str | None = None

    ticket_ttl_s: float = 300.0
    """Default pairing deadline of a minted ticket (Go DefaultRelayTTL)."""

    max_ttl_s: float = 86400.0
    """Largest ``ttl_seconds`` a mint request may ask for; more gets 400.
    ``ticket_ttl_s`` must not exceed it."""

    max_per_workspace: int = 16
    """Live tickets one workspace may hold, mint to cleanup (Go default)."""

    idle_timeout_s: float = 60.0
    """A paired transfer with no byte moving for this long is aborted."""

    max_connections: int = 10_000
    """Open client connections at most; beyond it new ones are closed at once."""

    max_pending: int = 4096
    """Minted-but-unpaired tickets at most, all workspaces together; beyond it
    the mint endpoint answers 503."""

    max_resumes: int = 16
    """Breaks a resumable relay survives; one more ends it as a failure."""

    max_receivers: int = 16
    """Largest ``receivers`` a mint may ask for (fan-out: GETs that each get
    the whole upload)."""

    max_rate: int = 0
    """Bytes/s every relay moves at most; a mint's ``max_rate`` above it is
    lowered to it. 0: no server-wide cap."""

    workspace_rate: int = 0
    """Bytes/s one workspace's relays on this node move at most together,
    shared evenly among them. 0: no workspace cap."""

    tcp_keepalive_s: int = 15
    """TCP keepalive idle time and probe interval on accepted sockets (the Go
    gateway's listener uses 15 s)."""

    header_timeout_s: float = 10.0
    """A request head must arrive whole within this (Go ReadHeaderTimeout)."""

    max_head_bytes: int = 16 * KIB
    """Largest request head accepted; larger gets 431 (h11's default)."""

    max_mint_body_bytes: int = 64 * KIB
    """Largest mint request body; larger gets 413."""

    read_buffer_bytes: int = 256 * KIB
    """Size of each upload receive buffer. 256 KiB-1 MiB measured best
    (docs/runtime-facts.md §2); buffers are pooled and only held while the download
    transport still references them, so memory follows the bytes in flight."""

    kernel_splice_min_bytes: int = 1 * MIB
    """Plain-TCP Content-Length uploads with at least this many body bytes
    left at pairing move through splice(2) instead of Python (Linux only).
    0 disables the fast path."""

    tls_write_high_bytes: int = 256 * KIB
    """Write high-water mark of a TLS download. Must be > 0: ``high=0``
    deadlocks asyncio/uvloop SSL transports (docs/runtime-facts.md §3)."""

    tls_write_low_bytes: int = 64 * KIB

    audit_digest: bool = False
    """Compute the SHA-256 of every relayed body, log it with the relay's
    outcome and add ``"sha256"`` to the PUT's answer. Costs a hash pass over
    every byte and turns the splice(2) fast path off (bench/README.md)."""

    waiting_body_bytes: int = 256 * KIB
    """Body bytes of a waiting upload read and held until it pairs. Reading
    them is what shows a killed uploader (its FIN queues behind every byte
    we have not read: a body that fits in this plus the socket's receive
    buffer, ~128 KiB, is seen to die; a larger one is not, and the GET that
    pairs with it fails visibly instead)."""

    max_waiting_body_total: int = 64 * MIB
    """All waiting uploads together hold at most this much; past it, new
    waiting uploads are not read until they pair."""

    linger_s: float = 2.0
    """After an early error answer to a request whose body we did not read,
    keep reading and discarding for up to this long before closing, so the
    client reads our answer instead of a reset."""

    ticket_key_file: str | None = None
    """File of ticket keys, one per line (docs/cluster.md): mint signs tickets
    with the first, and signed tickets from any node holding one of them are
    served here. None: random tickets, served only by the node that minted them."""

    redis_url: str | None = None
    """Count workspace and pending caps, and spent tickets, across every node
    sharing this Redis (``redis://host:port/db``). None: each node counts alone."""

    node_id: str | None = None
    """This node's name in the shared ledger (who serves a ticket). None:
    ``<hostname>:<port>``."""

    cluster_lease_s: float = 15.0
    """How long a node's claims in Redis outlive its last heartbeat (sent
    every third of this): a dead node's running slots and tickets free
    themselves this long after it died."""

    redis_timeout_s: float = 1.0
    """Longest wait for Redis on a mint or a first arrival; past it the
    request answers 503 "cluster state unavailable"."""

    def __post_init__(self) -> None:
        _check_int(self, "port", 0, 65535, "must be a whole number 0-65535")
        if (self.certfile is None) != (self.keyfile is None):
            missing = "keyfile" if self.keyfile is None else "certfile"
            other = "certfile" if missing == "keyfile" else "keyfile"
            raise ConfigValueError(missing, f"is required with {other}")
        for name in _DURATIONS:
            _check_seconds(self, name)
        if self.ticket_ttl_s > self.max_ttl_s:
            raise ConfigValueError(
                "ticket_ttl_s",
                f"must be at most max_ttl_s ({format_number(self.max_ttl_s)})",
                format_number(self.ticket_ttl_s),
            )
        for name in ("max_per_workspace", "max_connections", "max_pending"):
            _check_int(self, name, 1, None, "must be a whole number >= 1")
        _check_int(self, "max_resumes", 0, 1_000_000, "must be a whole number 0-1000000")
        _check_int(
            self, "max_receivers", 1, MAX_RECEIVERS, f"must be a whole number 1-{MAX_RECEIVERS}"
        )
        for name in ("max_rate", "workspace_rate"):
            _check_int(self, name, 0, MAX_RATE, "must be a whole number of bytes/s >= 0")
        # Linux refuses TCP_KEEPIDLE/TCP_KEEPINTVL above 32767 s at accept time.
        _check_int(self, "tcp_keepalive_s", 1, 32767, "must be a whole number of seconds 1-32767")
        _check_int(self, "max_head_bytes", 1024, MAX_BUFFER_BYTES, _bytes_range(1024))
        _check_int(self, "max_mint_body_bytes", 1, MAX_BUFFER_BYTES, _bytes_range(1))
        _check_int(self, "read_buffer_bytes", 4 * KIB, MAX_BUFFER_BYTES, _bytes_range(4 * KIB))
        _check_int(self, "kernel_splice_min_bytes", 0, None, "must be a whole number of bytes >= 0")
        _check_int(self, "tls_write_high_bytes", 1, MAX_BUFFER_BYTES, _bytes_range(1))
        _check_int(self, "waiting_body_bytes", 1, MAX_BUFFER_BYTES, _bytes_range(1))
        _check_int(self, "max_waiting_body_total", 0, None, "must be a whole number of bytes >= 0")
        _check_int(
            self,
            "tls_write_low_bytes",
            1,
            self.tls_write_high_bytes,
            "must be a whole number of bytes, > 0 and <= tls_write_high_bytes",
        )
        if self.shared_secret is not None and not self.shared_secret:
            raise ConfigValueError("shared_secret", "must not be empty")  # never echo secrets
        if self.redis_url is not None and not _REDIS_URL.match(self.redis_url):
            # Only the scheme is shown: the URL may carry a password.
            raise ConfigValueError("redis_url", "must start with redis://, rediss:// or unix://")
        if self.node_id is not None and not _NODE_ID.fullmatch(self.node_id):
            raise ConfigValueError(
                "node_id", "must be 1-64 characters of A-Z a-z 0-9 . _ : -", repr(self.node_id)
            )
        if self.redis_timeout_s >= self.cluster_lease_s / 3:
            raise ConfigValueError(
                "redis_timeout_s",
                "must be less than a third of cluster_lease_s (the heartbeat interval)",
                format_number(self.redis_timeout_s),
            )

    @property
    def tls(self) -> bool:
        return self.certfile is not None

    @property
    def wildcard_host(self) -> bool:
        """Listening on every address: no one address is *the* public one."""
        return self.host in ("", "0.0.0.0", "::")

    def base_url(self, bound_port: int, tls: bool, request_host: str | None = None) -> str:
        """The public base URL, without a trailing slash.

        ``public_url`` wins. Otherwise, on a wildcard listen address, the
        mint request's ``Host`` (``request_host``) is the address the minter
        reached us at, so the URLs point there; without one (in-process
        minting) we say 127.0.0.1.
        """
        if self.public_url:
            return self.public_url.rstrip("/")
        scheme = "https" if tls else "http"
        if self.wildcard_host:
            if request_host is not None and _HOST_HEADER.fullmatch(request_host):
                return f"{scheme}://{request_host}"
            host = "127.0.0.1"
        else:
            host = self.host
        if ":" in host:
            host = f"[{host}]"
        return f"{scheme}://{host}:{bound_port}"
