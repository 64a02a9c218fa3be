"""The sans-IO core: what a relay *decides*, with no socket, loop or clock.

Relay states and outcomes (`session`), connection phases (`phases`), request
heads and framing (`heads`, `chunked`, `framing`), mint requests (`mint`),
tickets (`tickets`), deadlines with ``now`` passed in (`deadlines`), the error
tree (`errors`), the frozen config (`config`), and what a log line or metric
says of a relay (`observe`, `logsafe`).

May import: the standard library's pure parts and h11. Never `asyncio`,
`uvloop`, `socket`, `ssl`, `threading` or `time`, nor any other fastrelay
layer (import-linter contracts in pyproject.toml, run by the test suite).
"""
