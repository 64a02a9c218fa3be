"""Command-line client: ``mint``, ``put`` and ``get`` subcommands.

The main ``fastrelay`` CLI registers them with `add_client_commands` and
dispatches with `run_client_command`; ``python -m fastrelay.client.commands``
runs them standalone. Exit codes, distinct so a script can tell a retryable
failure from a refusal:

====  =========================  =================================================
code  constant                   meaning
====  =========================  =================================================
0     ``EXIT_OK``                done: minted, uploaded (relay said ``200 ok``) or
                                 downloaded and verified
1     ``EXIT_LOCAL``             a local file could not be read or written
2     ``EXIT_USAGE``             bad arguments (argparse errors too), no secret
3     ``EXIT_REFUSED``           the relay answered an error before any byte
                                 moved (401, 408, 410, 413, 423, 429, 5xx ...)
4     ``EXIT_TRANSFER_FAILED``   the relay could not be reached, or the transfer
                                 started and did not complete (reset, truncated
                                 body, error answer after the upload began)
5     ``EXIT_DIGEST_MISMATCH``   the bytes received do not match their
                                 ``Repr-Digest``
====  =========================  =================================================

``get -o FILE`` writes ``FILE.partial`` and renames it only when the body is
complete and verified, so on any non-zero exit there is no FILE.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import IO, Never

from tqdm import tqdm

from ..client import Client, DigestMismatch, MintResult, TransferFailed
from ..core import errors

EXIT_OK = 0
EXIT_LOCAL = 1
EXIT_USAGE = 2
EXIT_REFUSED = 3
EXIT_TRANSFER_FAILED = 4
EXIT_DIGEST_MISMATCH = 5

COMMANDS = ("mint", "put", "get")
SECRET_ENV = "FASTRELAY_SHARED_SECRET"


class _Bar:
    """`fastrelay.client.Progress` drawn by tqdm on stderr."""

    def __init__(self, desc: str) -> None:
        self._desc = desc
        self._bar: tqdm[Never] | None = None

    def start(self, total: int | None) -> None:
        self._bar = tqdm(
            total=total,
            desc=self._desc,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            file=sys.stderr,
            dynamic_ncols=True,
        )

    def advance(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def add_client_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``mint``, ``put`` and ``get`` to a parser's subcommands."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--cacert", metavar="FILE", help="PEM CA bundle to verify the relay's TLS certificate"
    )
    common.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="connect timeout and, once bytes move, idle timeout (default 60)",
    )

    mint = subparsers.add_parser(
        "mint", parents=[common], help="mint a ticket; prints the answer as one JSON line"
    )
    mint.add_argument("base_url", metavar="BASE_URL", help="e.g. http://127.0.0.1:8080")
    mint.add_argument("--workspace", required=True)
    mint.add_argument("--source", required=True, help="source executor id")
    mint.add_argument("--dest", required=True, help="destination executor id")
    mint.add_argument("--ttl", type=float, metavar="SECONDS", help="pairing deadline")
    mint.add_argument("--max-bytes", type=int, default=0, metavar="N", help="0: no limit")
    mint.add_argument(
        "--shared-secret-file", metavar="FILE", help=f"mint secret (default: ${SECRET_ENV})"
    )

    transfer = argparse.ArgumentParser(add_help=False, parents=[common])
    transfer.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar on stderr (default: when stderr is a terminal)",
    )
    put = subparsers.add_parser(
        "put", parents=[transfer], help="upload FILE (or stdin) to an upload_url"
    )
    put.add_argument("url", metavar="URL")
    put.add_argument("file", metavar="FILE|-", nargs="?", default="-")
    get = subparsers.add_parser(
        "get", parents=[transfer], help="download a download_url to FILE (or stdout)"
    )
    get.add_argument("url", metavar="URL")
    get.add_argument("-o", "--output", metavar="FILE", help="default: stdout")


def run_client_command(args: argparse.Namespace) -> int:
    """Run a subcommand added by `add_client_commands`; returns the exit code."""
    try:
        if args.command == "mint":
            return _mint(args)
        bar = _Bar(args.command) if _wants_progress(args.progress) else None
        try:
            if args.command == "put":
                return _put(args, bar)
            return _get(args, bar)
        finally:
            if bar is not None:
                bar.close()
    except DigestMismatch as exc:
        return _fail(EXIT_DIGEST_MISMATCH, exc)
    except TransferFailed as exc:
        return _fail(EXIT_TRANSFER_FAILED, exc)
    except errors.RelayError as exc:
        return _fail(EXIT_REFUSED, exc, f"relay answered {exc.status}: ")
    except ValueError as exc:
        return _fail(EXIT_USAGE, exc)
    except OSError as exc:
        return _fail(EXIT_LOCAL, exc)


def _fail(code: int, exc: BaseException, prefix: str = "") -> int:
    print(f"fastrelay {prefix}{exc}", file=sys.stderr)
    return code


def _wants_progress(flag: bool | None) -> bool:
    if flag is not None:
        return flag
    return sys.stderr.isatty()


def _client(args: argparse.Namespace, secret: str | None = None) -> Client:
    verify: str | bool = args.cacert if args.cacert else True
    return Client(
        getattr(args, "base_url", None), secret=secret, verify=verify, timeout=args.timeout
    )


def _read_secret(args: argparse.Namespace) -> str:
    if args.shared_secret_file:
        with open(args.shared_secret_file, encoding="utf-8") as f:
            secret = f.read().strip()
    else:
        secret = os.environ.get(SECRET_ENV, "")
    if not secret:
        raise ValueError(f"no mint secret: set ${SECRET_ENV} or pass --shared-secret-file")
    return secret


def _mint(args: argparse.Namespace) -> int:
    with _client(args, _read_secret(args)) as client:
        result = client.mint(
            args.workspace, args.source, args.dest, ttl=args.ttl, max_bytes=args.max_bytes
        )
    print(json.dumps(_mint_json(result), separators=(",", ":")))
    return EXIT_OK


def _mint_json(result: MintResult) -> dict[str, str]:
    return {
        "ticket": result.ticket,
        "upload_url": result.upload_url,
        "download_url": result.download_url,
        "expires_at": result.expires_at.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
    }


def _put(args: argparse.Namespace, bar: _Bar | None) -> int:
    source: str | IO[bytes] = sys.stdin.buffer if args.file == "-" else args.file
    with _client(args) as client:
        client.put(args.url, source, progress=bar)
    return EXIT_OK


def _get(args: argparse.Namespace, bar: _Bar | None) -> int:
    dest: str | IO[bytes] = args.output if args.output else sys.stdout.buffer
    with _client(args) as client:
        client.get(args.url, dest, progress=bar)
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry point: ``python -m fastrelay.client.commands {mint,put,get} ...``."""
    parser = argparse.ArgumentParser(prog="fastrelay-client", description=__doc__.split("\n")[0])
    add_client_commands(parser.add_subparsers(dest="command", required=True))
    return run_client_command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
