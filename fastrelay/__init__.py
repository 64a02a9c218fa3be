"""fastrelay: a fast, trustworthy ticket-paired HTTP byte relay.

Library surface (the Python mirror of the Go ``relay`` package)::

    registry = fastrelay.Registry(max_per_workspace=16, default_ttl=300.0)
    server = await fastrelay.start_server(registry, "127.0.0.1", 8080)
    relay = registry.create("ws", "src-exe", "dst-exe")
    ...  # curl PUT/GET {server.url}/relay/{relay.ticket}
    await relay.wait(); relay.outcome, relay.bytes, relay.error
"""

from ._version import __version__
from .core.config import RelayConfig
from .core.errors import (
    DownloadAborted,
    Expired,
    IdleTimeout,
    PairingTimeout,
    PayloadTooLarge,
    RelayError,
    ShuttingDown,
    SideAlreadyClaimed,
    TicketNotFound,
    TransferError,
    Unauthorized,
    UploadAborted,
    WorkspaceCapReached,
)
from .core.session import Outcome
from .core.tickets import extract_bearer_ticket
from .server.listener import RelayServer, start_server
from .server.registry import Registry, Relay
from .server.tls import server_ssl_context

__all__ = [
    "DownloadAborted",
    "Expired",
    "IdleTimeout",
    "Outcome",
    "PairingTimeout",
    "PayloadTooLarge",
    "Registry",
    "Relay",
    "RelayConfig",
    "RelayError",
    "RelayServer",
    "ShuttingDown",
    "SideAlreadyClaimed",
    "TicketNotFound",
    "TransferError",
    "Unauthorized",
    "UploadAborted",
    "WorkspaceCapReached",
    "__version__",
    "extract_bearer_ticket",
    "server_ssl_context",
    "start_server",
]
