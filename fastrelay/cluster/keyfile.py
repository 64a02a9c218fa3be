"""Reading ``--ticket-key-file`` (at start and on SIGHUP).

The parsing rules (one key per line, ``#`` comments, a minimum length) are
`signed_tickets.TicketKeys.parse`; this module only reads the file and words
its errors with the path, never with a key.
"""

from __future__ import annotations

import logging
import os
import stat

from .signed_tickets import KeyFileError, TicketKeys

log = logging.getLogger("fastrelay")


def read_ticket_keys(path: str) -> TicketKeys:
    """The keys in ``path``; raises `KeyFileError` naming the file and the problem."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise KeyFileError(f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise KeyFileError(f"{path} is not UTF-8 text") from None
    try:
        keys = TicketKeys.parse(text)
    except KeyFileError as exc:
        raise KeyFileError(f"{path} {exc}") from None
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        log.warning("ticket key file %s is readable by other users (chmod 600 it)", path)
    return keys
