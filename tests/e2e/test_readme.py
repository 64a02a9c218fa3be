"""The README's walkthroughs, run as a user would paste them.

The README's command blocks paste as is, in one shell, top to bottom. So
the test for a block marked ``<!-- readme-test: NAME -->`` runs every marked
block up to and including it, in README order, as one ``bash -euo pipefail``
script in a temporary directory, against a real ``fastrelay serve --port 0``
subprocess. The one rewrite is the address ``127.0.0.1:8080``, which
becomes the server's real one. The environment is what the quick start
leaves in its shell: ``$FASTRELAY_SHARED_SECRET`` exported and a ``.venv``
in the current directory (a link to the one running the tests), whose
``bin`` is *not* on the PATH: the client walkthrough must put it there
itself.

The blocks create their own input (``data.bin``, ``dir/``) and their
outputs; each ends with a check that echoes a line only when the bytes
arrived whole, and the test looks for those lines (under ``set -e`` a failed
``cmp ... && echo`` in mid-script would go unnoticed).
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
SH_BLOCK = re.compile(r"^```sh\n(.*?)^```$", re.M | re.S)
VENV = pathlib.Path(sys.prefix)  # the venv running the tests: bin/fastrelay
BIN = VENV / "bin"
# Block -> the lines its own final check echoes when the bytes arrived whole.
WALKTHROUGHS = {
    "curl-walkthrough": "received.bin is data.bin",
    "curl-stream": "unpacked/dir is dir",
    "client-walkthrough": "received.bin is data.bin",
    "resume-curl": "big.got is big.bin",
    "resume-client": "big.out is big.bin",
    "fanout-curl": "copy1.bin, copy2.bin and copy3.bin are big.bin",
    "fanout-client": "fan1.out, fan2.out and fan3.out are big.bin",
    "paced-curl": "paced.got is big.bin",
    "paced-client": "paced1.out and paced2.out are big.bin",
}


def readme_blocks() -> dict[str, str]:
    """The marked blocks, in README order (dicts keep insertion order)."""
    blocks: dict[str, str] = {}
    for name, body in MARKER.findall(README.read_text(encoding="utf-8")):
        assert name not in blocks, f"two README blocks named {name}"
        blocks[name] = body
    return blocks


def test_readme_has_the_marked_walkthroughs() -> None:
    blocks = readme_blocks()
    assert list(blocks) == list(WALKTHROUGHS)
    for body in blocks.values():
        assert not EXPORT_SECRET.findall(body), "a placeholder secret: not paste-able as is"
    assert README_ADDRESS in blocks["curl-walkthrough"]
    assert README_ADDRESS in blocks["client-walkthrough"]
    # The client walkthrough finds `fastrelay` by itself, not by a PATH the
    # prose told the reader to set.
    assert 'export PATH="$PWD/.venv/bin:$PATH"' in blocks["client-walkthrough"]


def test_readme_quick_start_leaves_the_shell_usable() -> None:
    """The quick start's first block, which the test cannot run (it installs
    the package and takes port 8080), is one command (the quick start has
    exactly two) and leaves what the walkthroughs use: the secret exported
    and the relay in the background; the first walkthrough waits for it."""
    text = README.read_text(encoding="utf-8")
    first, second = SH_BLOCK.findall(text)[:2]
    assert len(first.strip().splitlines()) == 1, first
    assert len(second.strip().splitlines()) == 1, second
    assert "export FASTRELAY_SHARED_SECRET=" in first
    assert re.search(r"fastrelay serve [^&]*& \}\s*$", first), first
    assert "pytest" in second
    assert "/healthz" in readme_blocks()["curl-walkthrough"].splitlines()[2]


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
@pytest.mark.parametrize("name", list(WALKTHROUGHS))
def test_readme_walkthrough_runs(name: str, relay_address: str, tmp_path: pathlib.Path) -> None:
    blocks = readme_blocks()
    names = list(blocks)[: list(blocks).index(name) + 1]  # this one and those above it
    script = "\n".join(blocks[n] for n in names).replace(README_ADDRESS, relay_address)
    # The quick start's shell: the secret it exported, its .venv here, and
    # that venv's bin not on the PATH (python3 and curl are the system's).
    (tmp_path / ".venv").symlink_to(VENV, target_is_directory=True)
    path = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p and pathlib.Path(p) != BIN]
    env = {**os.environ, "FASTRELAY_SHARED_SECRET": SECRET, "PATH": os.pathsep.join(path)}
    env.pop("VIRTUAL_ENV", None)
    out = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    report = f"stdout:\n{out.stdout}\nstderr:\n{out.stderr}"
    assert out.returncode == 0, report
    for n in names:  # each block's own check passed, in order
        assert WALKTHROUGHS[n] in out.stdout.splitlines(), report
    assert out.stdout.splitlines().count("received.bin is data.bin") == sum(
        WALKTHROUGHS[n] == "received.bin is data.bin" for n in names
    ), report
    sent, received = tmp_path / "data.bin", tmp_path / "received.bin"
    assert sent.stat().st_size == 1_000_000
    assert received.read_bytes() == sent.read_bytes()
    assert not (tmp_path / "received.bin.partial").exists()
    if name == "resume-client":
        # A resumable ticket's answer counts the resumes (none without a break).
        assert '{"bytes":3000000,"status":"ok","resumes":0}' in out.stdout.splitlines(), report
    if name == "client-walkthrough":
        # `fastrelay put` prints the relay's answer, as curl does (the curl
        # walkthrough's upload printed the first of these two lines).
        assert out.stdout.count('{"bytes":1000000,"status":"ok"}') == 2, report
