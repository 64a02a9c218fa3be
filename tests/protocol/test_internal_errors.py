"""A bug in a handler: the client gets 500, the log one line naming where, the server lives."""

from __future__ import annotations

import asyncio
import logging

import pytest
from test_transfer_buffers import connect, make_server

from fastrelay.core.heads import RequestHead, Route
from fastrelay.core.phases import Phase


def test_a_bug_is_answered_500_and_logged_with_its_place(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def main() -> None:
        server = make_server()

        def broken(route: Route, head: RequestHead) -> tuple[int, str, bytes]:
            raise KeyError("surprise\nsecond line")

        monkeypatch.setattr(server, "answer_small", broken)
        conn, t = connect(server)
        with caplog.at_level(logging.DEBUG, logger="fastrelay"):
            t.feed(b"GET /healthz HTTP/1.1\r\nHost: h\r\n\r\n")
        assert t.data.startswith(b"HTTP/1.1 500 ")
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1
        line = errors[0].getMessage()
        assert (
            "internal error in GET while reading_head: KeyError at test_internal_errors.py:" in line
        )
        assert "\n" not in line  # the client-influenced text is escaped
        debug = [r for r in caplog.records if r.levelno == logging.DEBUG and r.exc_info]
        assert debug and debug[0].exc_info[0] is KeyError  # type: ignore[index]
        # The server lives on: the next connection is served.
        monkeypatch.undo()
        other, ot = connect(server)
        ot.feed(b"GET /healthz HTTP/1.1\r\nHost: h\r\n\r\n")
        assert ot.data.startswith(b"HTTP/1.1 200 ") and other.phase is Phase.READING_HEAD

    asyncio.run(main())
