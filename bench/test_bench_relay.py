"""Meso benchmarks, each beside its baseline in the same session.

    .venv/bin/python -m pytest bench/ --benchmark-only
    # compare: the relay_* rows against direct_* rows (pytest-benchmark table)

FASTRELAY_BENCH_BYTES sets the transfer size (default 64 MiB).
"""

from __future__ import annotations

from typing import Any

from bench import servers
from bench.load import direct_pair, one_transfer, small_relays


def test_direct_pair_baseline(benchmark: Any, payload: tuple[str, int, str]) -> None:
    path, size, sha = payload
    benchmark.group = "transfer"
    benchmark.extra_info["bytes"] = size
    benchmark.pedantic(direct_pair, args=(path, size, sha), rounds=3, iterations=1)


def test_relay_content_length(
    benchmark: Any, relay_server: servers.Server, payload: tuple[str, int, str]
) -> None:
    path, size, sha = payload
    benchmark.group = "transfer"
    benchmark.extra_info["bytes"] = size
    benchmark.pedantic(
        one_transfer, args=(relay_server, path, size, sha, False), rounds=3, iterations=1
    )


def test_relay_chunked(
    benchmark: Any, relay_server: servers.Server, payload: tuple[str, int, str]
) -> None:
    path, size, sha = payload
    benchmark.group = "transfer"
    benchmark.extra_info["bytes"] = size
    benchmark.pedantic(
        one_transfer, args=(relay_server, path, size, sha, True), rounds=3, iterations=1
    )


def test_relay_small_pairs(benchmark: Any, relay_server: servers.Server) -> None:
    benchmark.group = "small relays (64 pairs, 32 at a time, mint included)"
    benchmark.pedantic(small_relays, args=(relay_server, 64, 32), rounds=3, iterations=1)
