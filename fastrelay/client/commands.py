"""Command-line client: ``mint``, ``put`` and ``get`` subcommands.

The main ``fastrelay`` CLI registers them with `add_client_commands`, parses
them with `parse_client_args` (options may come anywhere, before, between or
after the positionals) and dispatches with `run_client_command`;
``python -m fastrelay.client.commands`` runs them standalone.

Errors are one line on stderr, ``fastrelay: error: <what failed>: <why>;
<what to do>``, never a Python repr. ``put`` prints the relay's JSON answer
(``{"bytes":N,"status":"ok"}``) on stdout, as curl does; ``mint`` prints the
mint answer. Exit codes, distinct so a script can tell a retryable failure
from a refusal:

====  =========================  =================================================
code  constant                   meaning
====  =========================  =================================================
0     ``EXIT_OK``                done: minted, uploaded (relay said ``200 ok``) or
                                 downloaded and verified
1     ``EXIT_LOCAL``             a local file could not be read or written (``put``
                                 opens its file and ``get -o`` its ``.partial``
                                 before the ticket is used, so failing to open
                                 them leaves the ticket good)
2     ``EXIT_USAGE``             bad arguments (argparse errors too, a bad URL,
                                 ``--ttl``/``--max-bytes``/``--receivers`` not a
                                 whole number >= 1, ``--max-rate`` not a
                                 rate), no secret
3     ``EXIT_REFUSED``           the relay answered an error before any byte
                                 moved (401, 408, 410, 413, 423, 429, 5xx ...)
4     ``EXIT_TRANSFER_FAILED``   the relay could not be reached, or the transfer
                                 started and did not complete (reset, truncated
                                 body, error answer after the upload began)
5     ``EXIT_DIGEST_MISMATCH``   the bytes received do not match their
                                 ``Repr-Digest``
130   ``EXIT_INTERRUPTED``       interrupted (SIGINT, Ctrl-C); a side that was
                                 still waiting to be paired is released
====  =========================  =================================================

``get -o FILE`` writes ``FILE.partial`` and renames it only when the body is
complete and verified, so on any non-zero exit there is no FILE.

``put`` prints the relay's JSON answer whenever the relay answered the upload
it had accepted, also with an error: a fan-out ticket whose receivers did not
all get the whole upload answers ``502`` with ``"receivers"`` and
``"delivered"``, printed before ``put`` exits 4.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import ssl
import sys
from collections.abc import Callable, Sequence
from typing import IO, Never

from tqdm import tqdm

from ..core import errors
from ..core.logsafe import safe
from ..core.pacing import RATE_FORMAT, parse_rate
from .answers import DigestMismatch, MintResult, RelayUnreachable, RetryNotice, TransferFailed
from .api import Client

DEFAULT_RETRIES = 10
"""``put``/``get --retries``: consecutive attempts that move no byte before
giving up. With waits doubling from 0.5 s to 8 s that is about a minute,
longer than a cluster node's lease (15 s) and a relay's restart."""

EXIT_OK = 0
EXIT_LOCAL = 1
EXIT_USAGE = 2
EXIT_REFUSED = 3
EXIT_TRANSFER_FAILED = 4
EXIT_DIGEST_MISMATCH = 5
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C

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

    def write(self, line: str) -> None:
        """A line above the bar, which is redrawn below it."""
        if self._bar is not None:
            self._bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _positive_whole(text: str) -> int:
    # Whole and >= 1: the wire's ttl_seconds and max_bytes are integers, and
    # 0 or a negative value would mean "the server's default" or nonsense
    # rather than what was typed. Omit the flag for the default.
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number, at least 1 (got {text})")
    return value


def _whole(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number, 0 or more (got {text})")
    return value


def _rate(text: str) -> int:
    # Spelled as the relay's own --max-rate (curl's --limit-rate), and the
    # same error. 0 is a valid rate: the relay's default (then not sent).
    try:
        return parse_rate(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {RATE_FORMAT} (got {safe(text, 64)})") from None


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0 (got {text})")
    return value


def add_client_commands(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> dict[str, argparse.ArgumentParser]:
    """Add ``mint``, ``put`` and ``get`` to a parser's subcommands; returns
    their parsers by name."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--cacert", metavar="FILE", help="PEM CA bundle to verify the relay's TLS certificate"
    )
    common.add_argument(
        "--timeout",
        type=_positive_seconds,
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
    mint.add_argument(
        "--ttl",
        type=_positive_whole,
        metavar="SECONDS",
        help="pairing deadline, whole seconds (default: the relay's --ttl)",
    )
    mint.add_argument(
        "--max-bytes",
        type=_positive_whole,
        default=0,
        metavar="N",
        help="largest upload the ticket takes (default: no limit)",
    )
    mint.add_argument(
        "--shared-secret-file", metavar="FILE", help=f"mint secret (default: ${SECRET_ENV})"
    )
    mint.add_argument(
        "--resumable",
        action="store_true",
        help="a ticket whose transfer survives a broken connection (put/get --retries resume it)",
    )
    mint.add_argument(
        "--receivers",
        type=_positive_whole,
        default=1,
        metavar="N",
        help="fan-out: N downloads (GETs) each receive the whole upload (default 1)",
    )
    mint.add_argument(
        "--max-rate",
        type=_rate,
        default=0,
        metavar="RATE",
        help="pace the transfer at RATE bytes/s at most, K/M/G suffixes x1024, e.g. 10M "
        "(default: the relay's --max-rate, else unlimited)",
    )

    transfer = argparse.ArgumentParser(add_help=False, parents=[common])
    transfer.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar on stderr (default: when stderr is a terminal)",
    )
    transfer.add_argument(
        "--retries",
        type=_whole,
        default=DEFAULT_RETRIES,
        metavar="N",
        help="after a broken connection, retry (resuming on a resumable ticket) until N "
        f"attempts in a row moved no byte; 0: never (default {DEFAULT_RETRIES})",
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
    return {"mint": mint, "put": put, "get": get}


def parse_client_args(
    parser: argparse.ArgumentParser, argv: Sequence[str]
) -> argparse.Namespace | None:
    """``argv`` parsed when it is a client command (``argv[0]`` is ``mint``,
    ``put`` or ``get`` of ``parser``'s subcommands), else None.

    A subparser run by its parent takes its positionals in one greedy pass,
    so ``put URL --cacert CA FILE`` leaves FILE "unrecognized". The
    subcommand's own parser is therefore run with ``parse_intermixed_args``
    (which refuses the parent: it has subparsers) on the words after the
    command.
    """
    if not argv or argv[0] not in COMMANDS:
        return None
    for action in parser._actions:  # argparse has no public way back to a subparser
        if isinstance(action, argparse._SubParsersAction) and argv[0] in action.choices:
            sub: argparse.ArgumentParser = action.choices[argv[0]]
            args = argparse.Namespace(command=argv[0])
            sub.parse_intermixed_args(argv[1:], args)  # fills args in place
            return args
    return None


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
    except KeyboardInterrupt:
        # Ctrl-C is an answer, not a crash: no traceback. Unwinding closed
        # the socket, which releases a side still waiting to be paired.
        return _fail(EXIT_INTERRUPTED, f"{_doing(args)} interrupted")
    except DigestMismatch as exc:
        return _fail(
            EXIT_DIGEST_MISMATCH,
            f"{_doing(args)} failed: {exc}",
            "the bytes were corrupted on the way and no file was kept; "
            "mint a new ticket and send again",
        )
    except RelayUnreachable as exc:
        hint = (
            "pass --cacert FILE with the CA that signed the relay's certificate"
            if exc.untrusted
            else "check the URL and that the relay is running"
        )
        return _fail(EXIT_TRANSFER_FAILED, f"{_doing(args)} failed: {exc}", hint)
    except TransferFailed as exc:
        return _fail(EXIT_TRANSFER_FAILED, f"{_doing(args)} failed: {exc}", _failed_hint(exc))
    except errors.RelayError as exc:
        return _fail(
            EXIT_REFUSED,
            f"{_doing(args)} refused by the relay: {exc.status} {exc.message}",
            _refusal_hint(args, exc),
        )
    except ValueError as exc:
        return _fail(EXIT_USAGE, str(exc))
    except OSError as exc:
        return _fail(EXIT_LOCAL, _local_error(exc), _local_hint(args, exc))


def _fail(code: int, message: str, hint: str = "") -> int:
    # safe(): one line whatever a URL, file name or relay answer held.
    line = f"{message}; {hint}" if hint else message
    print(f"fastrelay: error: {safe(line, 2048)}", file=sys.stderr, flush=True)
    return code


def _shown_url(url: str) -> str:
    """``url`` with its ticket cut to its first characters: a ticket is the
    whole credential of a transfer, and stderr often ends up in CI logs."""
    head, sep, ticket = url.rstrip("/").rpartition("/")
    if not sep or len(ticket) <= 12 or "://" not in head:
        return url
    return f"{head}/{ticket[:8]}…"


def _doing(args: argparse.Namespace) -> str:
    """What the command was doing, naming the URL: "upload to http://…"."""
    if args.command == "mint":
        return f"mint at {args.base_url}"
    if args.command == "put":
        return f"upload to {_shown_url(args.url)}"
    return f"download from {_shown_url(args.url)}"


def _refusal_hint(args: argparse.Namespace, exc: errors.RelayError) -> str:
    if isinstance(exc, errors.MintUnauthorized) or (args.command == "mint" and exc.status == 401):
        return f"check the mint secret (${SECRET_ENV} or --shared-secret-file)"
    if exc.status == 401:
        return "use the upload_url/download_url exactly as the mint answer gave it"
    if isinstance(exc, errors.TicketNotFound):
        return "the ticket is unknown, already used or expired: mint a new one"
    if isinstance(exc, errors.SideAlreadyClaimed):
        return (
            f"another {exc.side} is using this ticket; a ticket takes one PUT and one GET "
            "(a fan-out ticket as many GETs as it was minted with --receivers)"
        )
    if isinstance(exc, errors.PairingTimeout):
        return (
            "the other side did not arrive before the ticket expired; "
            "mint a new ticket (a longer --ttl gives it more time)"
        )
    if isinstance(exc, errors.PayloadTooLarge):
        return "the upload is larger than the ticket's --max-bytes"
    if isinstance(exc, errors.WorkspaceCapReached):
        return "the workspace holds too many live tickets; retry when transfers end"
    if exc.status >= 500:
        return "the relay is busy or shutting down; retry later"
    return ""


def _failed_hint(exc: TransferFailed) -> str:
    answer = exc.answer or {}
    receivers, delivered = answer.get("receivers"), answer.get("delivered")
    if isinstance(receivers, int) and isinstance(delivered, int):
        return (
            f"{delivered} of {receivers} receivers got the whole upload (the relay's answer "
            "is on stdout); mint a new ticket to send it to the others"
        )
    return "the transfer did not complete; mint a new ticket and send again"


def _local_error(exc: OSError) -> str:
    reason = exc.strerror or str(exc) or exc.__class__.__name__
    if exc.filename is None:
        return f"local I/O failed: {reason}"
    return f"cannot open {exc.filename}: {reason}"


def _local_hint(args: argparse.Namespace, exc: OSError) -> str:
    if exc.filename is None:
        return ""
    if exc.filename == getattr(args, "cacert", None):
        return "--cacert takes a readable PEM file of CA certificates"
    if args.command == "put" and exc.filename == args.file:
        return "check the file to upload"
    if args.command == "get" and exc.filename == f"{args.output}.partial":
        return "check that the output's directory exists and is writable"
    return ""


def _wants_progress(flag: bool | None) -> bool:
    if flag is not None:
        return flag
    return sys.stderr.isatty()


def _client(args: argparse.Namespace, secret: str | None = None) -> Client:
    verify: str | bool = args.cacert if args.cacert else True
    try:
        return Client(
            getattr(args, "base_url", None), secret=secret, verify=verify, timeout=args.timeout
        )
    except OSError as exc:  # only --cacert is read here; ssl.SSLError: not PEM
        reason = (
            f"no CA certificate in it ({exc.reason})"
            if isinstance(exc, ssl.SSLError)
            else exc.strerror
        )
        raise OSError(exc.errno or 0, reason, args.cacert) from exc


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
            args.workspace,
            args.source,
            args.dest,
            ttl=args.ttl,
            max_bytes=args.max_bytes,
            resumable=args.resumable,
            receivers=args.receivers,
            max_rate=args.max_rate,
        )
    print(json.dumps(_mint_json(result, args), separators=(",", ":")))
    # The ticket exists and works, but not as asked: say so rather than let
    # a later --retries, or a second receiver's 423, find out.
    if args.resumable and not result.resumable:
        _warn(
            'the relay did not confirm "resumable" (it is older than resumable relays): '
            "the ticket is not resumable"
        )
    if args.receivers != 1 and result.receivers != args.receivers:
        takes = "one GET" if result.receivers == 1 else f"{result.receivers} GETs"
        _warn(
            f'the relay did not confirm "receivers":{args.receivers} (it is older than '
            f"fan-out relays): the ticket takes {takes}"
        )
    if args.max_rate and not result.max_rate:
        _warn(
            'the relay did not confirm "max_rate" (it is older than paced relays): '
            "the ticket is not paced"
        )
    return EXIT_OK


def _warn(message: str) -> None:
    print(f"fastrelay: warning: {message}", file=sys.stderr)


def _mint_json(result: MintResult, args: argparse.Namespace) -> dict[str, object]:
    answer: dict[str, object] = {
        "ticket": result.ticket,
        "upload_url": result.upload_url,
        "download_url": result.download_url,
        "expires_at": result.expires_at.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
    }
    # The relay's echo of each option the mint sent, as its answer has it
    # (an option left at its default is not sent: a v1 mint, a v1 answer).
    if args.resumable:
        answer["resumable"] = result.resumable
    if args.receivers != 1:
        answer["receivers"] = result.receivers
    if args.max_rate:
        answer["max_rate"] = result.max_rate
    return answer


def _retry_notice(args: argparse.Namespace, bar: _Bar | None) -> Callable[[RetryNotice], None]:
    """One stderr line per break: where it broke and which retry comes when."""

    def notice(n: RetryNotice) -> None:
        what = "upload" if args.command == "put" else "download"
        line = safe(
            f"fastrelay: {what} broke at {n.at} bytes ({n.error.message}); "
            f"retry {n.retry} of {n.retries} in {n.delay:.1f} s",
            2048,
        )
        if bar is not None:
            bar.write(line)
        else:
            print(line, file=sys.stderr, flush=True)

    return notice


def _put(args: argparse.Namespace, bar: _Bar | None) -> int:
    source: str | IO[bytes] = sys.stdin.buffer if args.file == "-" else args.file
    with _client(args) as client:
        try:
            result = client.put(
                args.url,
                source,
                progress=bar,
                retries=args.retries,
                on_retry=_retry_notice(args, bar),
            )
        except TransferFailed as exc:
            # The relay answered the upload with an error (e.g. a fan-out
            # ticket's 502, "k of N receivers failed"): its answer too, as
            # curl prints it, then the exit code says it failed.
            if exc.answer is not None:
                print(json.dumps(dict(exc.answer), separators=(",", ":")), flush=True)
            raise
    # Like curl: the relay's answer, so a script gets the byte count (and the
    # sha256 of a relay run with --audit-digest, receivers/delivered of a
    # fan-out ticket).
    print(json.dumps(dict(result.answer), separators=(",", ":")))
    return EXIT_OK


def _get(args: argparse.Namespace, bar: _Bar | None) -> int:
    dest: str | IO[bytes] = args.output if args.output else sys.stdout.buffer
    with _client(args) as client:
        client.get(
            args.url, dest, progress=bar, retries=args.retries, on_retry=_retry_notice(args, bar)
        )
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry point: ``python -m fastrelay.client.commands {mint,put,get} ...``."""
    parser = argparse.ArgumentParser(prog="fastrelay-client", description=__doc__.split("\n")[0])
    add_client_commands(parser.add_subparsers(dest="command", required=True))
    words = sys.argv[1:] if argv is None else list(argv)
    args = parse_client_args(parser, words)
    return run_client_command(args if args is not None else parser.parse_args(words))


if __name__ == "__main__":
    sys.exit(main())
