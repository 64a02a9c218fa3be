"""The one frozen configuration of a relay server.

Built once (by the CLI or an embedding program), validated in
``__post_init__``, passed down. Units are in the field names.
"""

from __future__ import annotations

import dataclasses

KIB = 1024
MIB = 1024 * KIB


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

    max_per_workspace: int = 16
    """Live tickets one workspace may hold, mint to cleanup (Go default)."""

    idle_timeout_s: float = 60.0
    """A paired transfer with no byte moving for this long is aborted."""

    max_connections: int = 10_000
    """Open client connections at most; beyond it new ones are closed at once."""

    max_pending: int = 4096
    """Minted-but-unpaired tickets at most, all workspaces together; beyond it
    the mint endpoint answers 503."""

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
    (runtime-facts §2); buffers are pooled and only held while the download
    transport still references them, so memory follows the bytes in flight."""

    kernel_splice_min_bytes: int = 1 * MIB
    """Plain-TCP Content-Length uploads with at least this many body bytes
    left at pairing move through splice(2) instead of Python (Linux only).
    0 disables the fast path."""

    tls_write_high_bytes: int = 256 * KIB
    """Write high-water mark of a TLS download. Must be > 0: ``high=0``
    deadlocks asyncio/uvloop SSL transports (runtime-facts §3)."""

    tls_write_low_bytes: int = 64 * KIB

    linger_s: float = 2.0
    """After an early error answer to a request whose body we did not read,
    keep reading and discarding for up to this long before closing, so the
    client reads our answer instead of a reset."""

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be 0-65535, got {self.port}")
        if (self.certfile is None) != (self.keyfile is None):
            raise ValueError("certfile and keyfile go together")
        for name in ("ticket_ttl_s", "idle_timeout_s", "header_timeout_s", "linger_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")
        if self.max_connections < 1 or self.max_pending < 1 or self.tcp_keepalive_s < 1:
            raise ValueError("max_connections, max_pending and tcp_keepalive_s must be >= 1")
        if self.max_per_workspace < 1:
            raise ValueError("max_per_workspace must be >= 1")
        if self.max_head_bytes < 1024:
            raise ValueError("max_head_bytes must be >= 1024")
        if self.read_buffer_bytes < 4 * KIB:
            raise ValueError("read_buffer_bytes must be >= 4096")
        if not 0 < self.tls_write_low_bytes <= self.tls_write_high_bytes:
            raise ValueError("need 0 < tls_write_low_bytes <= tls_write_high_bytes")
        if self.shared_secret is not None and not self.shared_secret:
            raise ValueError("shared_secret must not be empty")

    @property
    def tls(self) -> bool:
        return self.certfile is not None

    def base_url(self, bound_port: int, tls: bool) -> str:
        """The public base URL, without a trailing slash. A wildcard listen
        address is no address a client can use: we say 127.0.0.1 and expect
        ``public_url`` to be set for anything but local use."""
        if self.public_url:
            return self.public_url.rstrip("/")
        scheme = "https" if tls else "http"
        host = self.host
        if host in ("", "0.0.0.0", "::"):
            host = "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"{scheme}://{host}:{bound_port}"
