"""What every bench module ends with: the machine line, the JSON record and
the exit status. Imports nothing of fastrelay (bench/tee_probe.py must run
while the package is mid-change)."""

from __future__ import annotations

import json
import pathlib
import platform
import shlex
import sys
import time
from collections.abc import Callable
from typing import Any

import psutil


class IntegrityError(AssertionError):
    """A bench transfer delivered wrong, short or failed bytes."""


def machine(detail: str) -> str:
    """One line saying what ran the bench (``detail``: the loop, the kernel)."""
    return (
        f"{platform.machine()}, {psutil.cpu_count()} CPUs, "
        f"{psutil.virtual_memory().total // 2**30} GiB, Python {platform.python_version()}, "
        f"{detail}"
    )


def write_json(path: str, module: str, argv: list[str] | None, **record: Any) -> None:
    """The run's JSON record at ``path``: ``record`` plus the command that
    made it and when."""
    out = pathlib.Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "command": f"python -m {module} " + shlex.join(argv or []),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **record,
    }
    out.write_text(json.dumps(doc, indent=2))


def publish(
    lines: list[str], detail: str, path: str, module: str, argv: list[str] | None, **record: Any
) -> None:
    """Print the run's table ``lines`` with the machine line under them, and
    write its JSON record (with the same machine line)."""
    where = machine(detail)
    print("\n".join([*lines, "", f"machine: {where}"]))
    write_json(path, module, argv, machine=where, **record)


def main(run: Callable[[list[str]], Any]) -> int:
    """Run a bench from the command line: exit 1 (one line) when the bytes
    were not delivered intact, else 0."""
    try:
        run(sys.argv[1:])
    except IntegrityError as exc:
        print(f"bench: INTEGRITY FAILURE: {exc}", file=sys.stderr)
        return 1
    return 0
