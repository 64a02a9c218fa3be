"""pytest-benchmark fixtures: a running fastrelay and test payloads.

`pytest bench/` runs these; the main suite (`testpaths = tests`) does not.
"""

from __future__ import annotations

import os
import pathlib
import sys
from collections.abc import Iterator

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from bench import servers
from bench.clients import random_file

SIZE = int(os.environ.get("FASTRELAY_BENCH_BYTES", 64 * 1024 * 1024))


@pytest.fixture(scope="session")
def relay_server() -> Iterator[servers.Server]:
    with servers.fastrelay(None, None) as server:
        yield server


@pytest.fixture(scope="session")
def payload(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, int, str]:
    path = str(tmp_path_factory.mktemp("bench") / "payload.bin")
    return path, SIZE, random_file(path, SIZE)
