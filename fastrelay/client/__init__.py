"""The Python client (`api`: `Client`, `AsyncClient`, their results and
errors) and the ``fastrelay mint|put|get`` commands (`commands`).

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
