"""The Python client and the ``fastrelay mint|put|get`` commands: `api`
(`Client`, `AsyncClient`, the drivers that touch sockets, retries), `flows`
(the sans-IO PUT/GET exchanges on h11, sources and sinks), `answers` (what
the relay's answers mean: results, errors, digests), `commands` (the CLI).

May import: `fastrelay.core`. Never `fastrelay.server` or
`fastrelay.cluster`: a client needs nothing of the server to talk to it.
"""

from .answers import (
    DigestMismatch,
    GetResult,
    MintResult,
    Progress,
    PutResult,
    RelayRefused,
    RelayUnreachable,
    RetryNotice,
    TransferFailed,
    format_repr_digest,
    parse_repr_digest,
)
from .api import AsyncClient, Client

__all__ = [
    "AsyncClient",
    "Client",
    "DigestMismatch",
    "GetResult",
    "MintResult",
    "Progress",
    "PutResult",
    "RelayRefused",
    "RelayUnreachable",
    "RetryNotice",
    "TransferFailed",
    "format_repr_digest",
    "parse_repr_digest",
]
