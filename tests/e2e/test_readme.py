"""The README's walkthroughs, run as a user would paste them.

Each block marked ``<!-- readme-test: NAME -->`` in README.md is run with
``bash -euo pipefail -c`` in a temporary directory against a real
``fastrelay serve --port 0`` subprocess. Only two things are rewritten: the
address ``127.0.0.1:8080`` becomes the server's real one, and the
placeholder secret of the block's ``export SECRET=...`` line becomes the
server's. The blocks create their own input (``data.bin``) and download
``received.bin``; the test checks both exist and are equal.
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
SECRET = "readme-test-secret"
README_ADDRESS = "127.0.0.1:8080"
MARKER = re.compile(r"^<!-- readme-test: ([\w-]+) -->\n```sh\n(.*?)^```$", re.M | re.S)
EXPORT_SECRET = re.compile(r"^export SECRET='[^'\n]*'$", re.M)
BIN = pathlib.Path(sys.executable).parent  # .venv/bin: fastrelay, python3


def readme_blocks() -> dict[str, str]:
    blocks: dict[str, str] = {}
    for name, body in MARKER.findall(README.read_text(encoding="utf-8")):
        assert name not in blocks, f"two README blocks named {name}"
        blocks[name] = body
    return blocks


def test_readme_has_the_marked_walkthroughs() -> None:
    blocks = readme_blocks()
    assert set(blocks) == {"curl-walkthrough", "client-walkthrough"}
    for body in blocks.values():
        assert README_ADDRESS in body
        assert len(EXPORT_SECRET.findall(body)) == 1


@pytest.fixture(scope="module")
def relay_address() -> Iterator[str]:
    """``host:port`` of a real ``fastrelay serve`` subprocess."""
    env = {**os.environ, "FASTRELAY_SHARED_SECRET": SECRET}
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastrelay", "serve", "--host", "127.0.0.1", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # blocks until the ready line (or exit)
        assert line.startswith("fastrelay: listening on http://"), (
            line + proc.stderr.read() if proc.stderr else line
        )
        yield line.split()[-1].removeprefix("http://")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert SECRET not in err


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
@pytest.mark.parametrize("name", ["curl-walkthrough", "client-walkthrough"])
def test_readme_walkthrough_runs(name: str, relay_address: str, tmp_path: pathlib.Path) -> None:
    script = readme_blocks()[name]
    script = EXPORT_SECRET.sub(f"export SECRET='{SECRET}'", script)
    script = script.replace(README_ADDRESS, relay_address)
    # The script gets the secret only through its own export line.
    env = {k: v for k, v in os.environ.items() if k != "FASTRELAY_SHARED_SECRET"}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    out = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, f"stdout:\n{out.stdout}\nstderr:\n{out.stderr}"
    sent, received = tmp_path / "data.bin", tmp_path / "received.bin"
    assert sent.stat().st_size == 1_000_000
    assert received.read_bytes() == sent.read_bytes()
    assert not (tmp_path / "received.bin.partial").exists()
