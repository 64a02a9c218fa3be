"""``fastrelay``: the command line (``serve``, and the client's ``mint``, ``put``, ``get``).

``serve``: command line -> RelayConfig -> a running server. ``mint``,
``put`` and ``get`` come from `client.commands` (their exit codes are documented
there).

Configuration errors (port in use, unreadable certificate, bad flag values)
exit with status 2 and one line on stderr, never a traceback or usage block:
``fastrelay: error: --ttl must be a positive number of seconds (got nan)``.
Every message names the flag as the user types it, not the config field.

With ``--log-format json`` every line ``serve`` writes is one JSON object
(`say`): the ready line on stdout, the generated secret, start-up notes,
these errors, log records, warnings and an unexpected traceback alike.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import importlib.metadata
import itertools
import logging
import math
import os
import re
import resource
import secrets
import signal
import ssl
import stat
import sys
import urllib.parse
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, NoReturn, cast

from ._version import __version__
from .client.commands import COMMANDS as CLIENT_COMMANDS
from .client.commands import add_client_commands, parse_client_args, run_client_command
from .cluster.signed_tickets import KeyFileError
from .core.config import MAX_DURATION_S, ConfigValueError, RelayConfig, format_number
from .core.logsafe import safe
from .core.pacing import RATE_FORMAT, parse_rate
from .server.listener import RelayServer
from .server.logformat import JsonFormatter
from .server.tls import CertificateError, server_ssl_context

SECRET_ENV = "FASTRELAY_SHARED_SECRET"
REDIS_URL_ENV = "FASTRELAY_REDIS_URL"
DESCRIPTION = (
    "fastrelay is a one-use-ticket HTTP byte relay: an orchestrator mints a ticket, "
    "the source PUTs and the destination GETs, and the bytes stream from one socket "
    "to the other without being stored."
)
# Descriptors kept free of --max-connections: listening sockets, the log,
# splice(2) pipes and dup'd sockets of transfers in flight, certificate reloads.
RESERVED_FDS = 64
log = logging.getLogger("fastrelay")


class ConfigError(Exception):
    """A problem with the command line or the files it names."""


# The format of the lines `serve` writes itself (set by `setup_logging`).
_json_lines = False


def say(
    message: str,
    event: str,
    *,
    level: int = logging.INFO,
    stdout: bool = False,
    fields: Mapping[str, Any] | None = None,
) -> None:
    """Write one line of ours (not a log record: shown at any --log-level):
    ``fastrelay: <message>``, or with ``--log-format json`` one JSON object
    like a log record's (``event`` names it, ``fields`` are added to it)."""
    if _json_lines:
        record = logging.LogRecord(log.name, level, __file__, 0, message, None, None)
        record.event = event
        record.fields = fields
        line = JsonFormatter().format(record)
    else:
        line = f"fastrelay: {message}"
    print(line, file=sys.stdout if stdout else sys.stderr, flush=True)


# RelayConfig field -> the flag that sets it, so errors speak the user's words.
FLAGS = {
    "port": "--port",
    "certfile": "--certfile",
    "keyfile": "--keyfile",
    "ticket_ttl_s": "--ttl",
    "max_ttl_s": "--max-ttl",
    "max_per_workspace": "--max-per-workspace",
    "idle_timeout_s": "--idle-timeout",
    "header_timeout_s": "--header-timeout",
    "max_connections": "--max-connections",
    "max_pending": "--max-pending",
    "max_resumes": "--max-resumes",
    "max_receivers": "--max-receivers",
    "max_rate": "--max-rate",
    "workspace_rate": "--workspace-rate",
    "read_buffer_bytes": "--buffer-size",
    "kernel_splice_min_bytes": "--kernel-splice-min-bytes",
    "ticket_key_file": "--ticket-key-file",
    "redis_url": "--redis-url",
    "node_id": "--node-id",
    "cluster_lease_s": "--cluster-lease",
    "redis_timeout_s": "--redis-timeout",
}
_FIELD_NAME = re.compile(r"\b(" + "|".join(FLAGS) + r")\b")
_ARGUMENT = re.compile(r"^argument (\S+): (must .*)$", re.DOTALL)


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line, like every other error we print."""

    def error(self, message: str) -> NoReturn:
        # argparse says "argument --port: must be ..." for our type errors;
        # drop the prefix so they read like the config errors.
        m = _ARGUMENT.match(message)
        if m is not None:
            message = f"{m.group(1)} {m.group(2)}"
        if self._json_errors:
            global _json_lines
            _json_lines = True
            say(f"error: {safe(message, 512)}", "config_error", level=logging.ERROR)
            self.exit(2)
        # The message may quote what the user typed, newlines and all.
        self.exit(2, f"{self.prog.split()[0]}: error: {safe(message, 512)}\n")

    _json_errors = False

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        # `serve --log-format json --port abc`: the error is one JSON line
        # too. It comes before the parse is done, so the words are looked at
        # first (the spelled-out flag only, not an abbreviation).
        if args is not None and self.prog.endswith(" serve"):
            words = list(args)
            self._json_errors = "--log-format=json" in words or any(
                pair == ("--log-format", "json") for pair in itertools.pairwise(words)
            )
        return super().parse_known_args(args, namespace)


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds (got {text})") from None


def _whole(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number (got {text})") from None


def _rate(text: str) -> int:
    try:
        return parse_rate(text)
    except ValueError as exc:
        # One line, with what was given (ids and flags are not secrets).
        raise argparse.ArgumentTypeError(f"must be {RATE_FORMAT} (got {safe(text, 64)})") from (exc)


def _public_url(text: str) -> str:
    # Checked at start: a bad base would only show in every mint answer.
    try:
        url = urllib.parse.urlsplit(text)
        url.port  # noqa: B018 - raises ValueError for a port that is not one
    except ValueError:
        url = None
    if (
        url is None
        or url.scheme not in ("http", "https")
        or not url.hostname
        or url.query
        or url.fragment
        or not text.isprintable()
        or " " in text
    ):
        raise argparse.ArgumentTypeError(
            "must be an http:// or https:// URL with a host, like https://relay.example.com "
            f"(got {text})"
        )
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="fastrelay", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"fastrelay {version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the relay server", description=DESCRIPTION)
    d = RelayConfig()
    serve.add_argument("--host", default=d.host, help="address to listen on (%(default)s)")
    serve.add_argument("--port", type=_whole, default=d.port, help="port, 0 for any (%(default)s)")
    serve.add_argument(
        "--public-url",
        type=_public_url,
        help="base of upload_url/download_url in mint answers, an http(s) URL "
        "(default: scheme://host:port this server listens on)",
    )
    serve.add_argument(
        "--certfile", help="PEM certificate chain: serve HTTPS (default: none, plain HTTP)"
    )
    serve.add_argument("--keyfile", help="PEM private key for --certfile (default: none)")
    serve.add_argument(
        "--shared-secret-file",
        help=f"file holding the mint secret (default: none; then ${SECRET_ENV}; "
        "else one is generated and printed once)",
    )
    serve.add_argument(
        "--ttl", type=_number, default=d.ticket_ttl_s, help="default pairing TTL, s (%(default)s)"
    )
    serve.add_argument(
        "--max-ttl",
        type=_number,
        default=d.max_ttl_s,
        help="largest ttl_seconds a mint request may ask for, s (%(default)s)",
    )
    serve.add_argument(
        "--max-per-workspace",
        type=_whole,
        default=d.max_per_workspace,
        help="live tickets per workspace (%(default)s)",
    )
    serve.add_argument(
        "--idle-timeout",
        type=_number,
        default=d.idle_timeout_s,
        help="abort a paired transfer after this long without progress, s (%(default)s)",
    )
    serve.add_argument(
        "--header-timeout",
        type=_number,
        default=d.header_timeout_s,
        help="a request head must arrive within this, s (%(default)s)",
    )
    serve.add_argument(
        "--max-connections",
        type=_whole,
        default=d.max_connections,
        help="open connections at most; more are closed at once; lowered to the "
        f"open-file limit minus {RESERVED_FDS} if above it (%(default)s)",
    )
    serve.add_argument(
        "--max-pending",
        type=_whole,
        default=d.max_pending,
        help="minted but unpaired tickets at most; more get 503 at mint (%(default)s)",
    )
    serve.add_argument(
        "--max-resumes",
        type=_whole,
        default=d.max_resumes,
        help="breaks a resumable relay survives; one more ends it (%(default)s)",
    )
    serve.add_argument(
        "--max-receivers",
        type=_whole,
        default=d.max_receivers,
        help="largest fan-out a mint may ask for (receivers) (%(default)s)",
    )
    serve.add_argument(
        "--max-rate",
        type=_rate,
        default=d.max_rate,
        metavar="RATE",
        help="bytes/s every relay moves at most, K/M/G suffixes (x1024) as curl's "
        "--limit-rate; a mint's max_rate above it is lowered to it; 0: none (%(default)s)",
    )
    serve.add_argument(
        "--workspace-rate",
        type=_rate,
        default=d.workspace_rate,
        metavar="RATE",
        help="bytes/s one workspace's relays on this node move at most together, shared "
        "evenly among them; K/M/G suffixes; 0: none (%(default)s)",
    )
    serve.add_argument(
        "--drain-timeout",
        type=_number,
        default=30.0,
        help="on SIGTERM/SIGINT, let paired transfers run this long, s (%(default)s)",
    )
    serve.add_argument(
        "--drain-grace",
        type=_number,
        default=0.0,
        help="on SIGTERM/SIGINT, first keep serving relay requests this long while "
        "/healthz answers 503, so a load balancer takes the node out before its port "
        "closes (docs/cluster.md), s (%(default)s)",
    )
    serve.add_argument(
        "--buffer-size",
        type=_whole,
        default=d.read_buffer_bytes,
        help="upload receive buffer, bytes (%(default)s)",
    )
    serve.add_argument(
        "--kernel-splice-min-bytes",
        type=_whole,
        default=d.kernel_splice_min_bytes,
        help="plain Content-Length uploads with at least this many bytes left at pairing "
        "move through splice(2); 0 disables (%(default)s)",
    )
    serve.add_argument(
        "--audit-digest",
        action="store_true",
        default=d.audit_digest,
        help="compute the SHA-256 of every relayed body: logged with the outcome and "
        'added to the PUT\'s answer as "sha256"; turns splice(2) off (%(default)s)',
    )
    cluster = serve.add_argument_group(
        "cluster", "several nodes behind one load balancer (docs/cluster.md)"
    )
    cluster.add_argument(
        "--ticket-key-file",
        help="file of ticket keys, one per line: mint signed tickets with the first, serve "
        "signed tickets minted by any node holding one of them; SIGHUP reloads it "
        "(default: none, random tickets served only by the node that minted them)",
    )
    cluster.add_argument(
        "--redis-url",
        help=f"count caps and spent tickets for every node sharing this Redis, "
        f"redis://host:port/db (default: ${REDIS_URL_ENV}, else none: limits per node)",
    )
    cluster.add_argument(
        "--node-id",
        help="this node's name in Redis (default: hostname:port)",
    )
    cluster.add_argument(
        "--cluster-lease",
        type=_number,
        default=d.cluster_lease_s,
        help="a dead node's claims in Redis free themselves this long after its last "
        "heartbeat, s (%(default)s)",
    )
    cluster.add_argument(
        "--redis-timeout",
        type=_number,
        default=d.redis_timeout_s,
        help="longest wait for Redis on a mint or a first arrival before 503, s (%(default)s)",
    )
    serve.add_argument(
        "--loop",
        choices=("auto", "uvloop", "asyncio"),
        default="auto",
        help="event loop; auto is uvloop when installed (%(default)s)",
    )
    serve.add_argument(
        "--log-level",
        default="INFO",
        type=str.upper,  # `debug` as well as `DEBUG`
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="log threshold, in any case; INFO logs one line per relay created and ended "
        "(%(default)s)",
    )
    serve.add_argument(
        "--log-format",
        default="text",
        choices=("text", "json"),
        help="text lines, or one JSON object per line (%(default)s)",
    )
    # The client's commands are Parsers too (one-line errors, exit 2); the
    # cast is only because _SubParsersAction is invariant in its parser type.
    add_client_commands(cast("argparse._SubParsersAction[argparse.ArgumentParser]", sub))
    return parser


def version() -> str:
    """The installed distribution's version (the source tree's if not installed)."""
    try:
        return importlib.metadata.version("fastrelay")
    except importlib.metadata.PackageNotFoundError:
        return __version__


def read_secret(path: str | None) -> tuple[str, bool]:
    """The mint secret and whether we generated it."""
    if path is not None:
        try:
            with open(path, encoding="utf-8") as f:
                secret = f.read().strip()
            mode = os.stat(path).st_mode
        except OSError as exc:
            raise ConfigError(f"cannot read --shared-secret-file: {exc.strerror}: {path}") from None
        if not secret:
            raise ConfigError(f"--shared-secret-file is empty: {path}")
        if mode & (stat.S_IRGRP | stat.S_IROTH):
            log.warning("shared secret file %s is readable by other users (chmod 600 it)", path)
        return secret, False
    env = os.environ.get(SECRET_ENV)
    if env:
        return env, False
    return secrets.token_urlsafe(32), True


def config_from_args(args: argparse.Namespace, secret: str) -> RelayConfig:
    try:
        return RelayConfig(
            host=args.host,
            port=args.port,
            public_url=args.public_url,
            shared_secret=secret,
            certfile=args.certfile,
            keyfile=args.keyfile,
            ticket_ttl_s=args.ttl,
            max_ttl_s=args.max_ttl,
            max_per_workspace=args.max_per_workspace,
            idle_timeout_s=args.idle_timeout,
            header_timeout_s=args.header_timeout,
            max_connections=args.max_connections,
            max_pending=args.max_pending,
            max_resumes=args.max_resumes,
            max_receivers=args.max_receivers,
            max_rate=args.max_rate,
            workspace_rate=args.workspace_rate,
            read_buffer_bytes=args.buffer_size,
            kernel_splice_min_bytes=args.kernel_splice_min_bytes,
            audit_digest=args.audit_digest,
            ticket_key_file=args.ticket_key_file,
            redis_url=args.redis_url or os.environ.get(REDIS_URL_ENV) or None,
            node_id=args.node_id,
            cluster_lease_s=args.cluster_lease,
            redis_timeout_s=args.redis_timeout,
        )
    except ConfigValueError as exc:
        raise ConfigError(flag_message(exc)) from None
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def flag_message(exc: ConfigValueError) -> str:
    """``exc`` reworded with flag names: "--ttl must be ... (got nan)"."""
    if exc.field not in FLAGS:
        return str(exc)

    def flag(m: re.Match[str]) -> str:
        return FLAGS[m.group(1)]

    got = f" (got {exc.got})" if exc.got is not None else ""
    return f"{FLAGS[exc.field]} {_FIELD_NAME.sub(flag, exc.requirement)}{got}"


def check_drain_timeout(value: float, flag: str) -> None:
    # Not RelayConfig fields (serve() uses them), so they are checked here.
    if not (math.isfinite(value) and 0 <= value <= MAX_DURATION_S):
        raise ConfigError(
            f"{flag} must be a number of seconds 0-{MAX_DURATION_S:.0f} "
            f"(got {format_number(value)})"
        )


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; returns the soft limit
    now in force (unchanged if it cannot be raised)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and (soft == resource.RLIM_INFINITY or soft < hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass
        else:
            soft = hard
    return soft


def fit_max_connections(config: RelayConfig, fd_limit: int) -> RelayConfig:
    """``config`` with --max-connections lowered to what ``fd_limit`` allows,
    saying so on stderr once."""
    if fd_limit == resource.RLIM_INFINITY:
        return config
    allowed = max(fd_limit - RESERVED_FDS, 1)
    if config.max_connections <= allowed:
        return config
    say(
        f"--max-connections lowered from {config.max_connections} to {allowed} "
        f"(open-file limit {fd_limit})",
        "max_connections_lowered",
        level=logging.WARNING,
        fields={"max_connections": allowed, "requested": config.max_connections},
    )
    return dataclasses.replace(config, max_connections=allowed)


def setup_logging(level: str, fmt: str) -> None:
    global _json_lines
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        _json_lines = True
        handler.setFormatter(JsonFormatter())
        # What Python itself would print as text goes through the log instead:
        # warnings (a ResourceWarning, a DeprecationWarning) and a traceback
        # that nothing caught.
        logging.captureWarnings(True)
        sys.excepthook = _log_uncaught
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])


def _log_uncaught(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, exc, tb)
        return
    log.critical("uncaught %s", kind.__name__, exc_info=(kind, exc, tb))


def make_ssl(config: RelayConfig) -> ssl.SSLContext | None:
    if config.certfile is None:
        return None
    try:
        return server_ssl_context(config.certfile, config.keyfile)
    except CertificateError as exc:
        raise ConfigError(f"cannot load --{exc.role} {exc.path}: {exc.reason}") from None
    except (OSError, ssl.SSLError) as exc:  # not expected: tls.py words its errors
        reason = getattr(exc, "strerror", None) or str(exc)
        raise ConfigError(f"cannot load --certfile/--keyfile: {reason}") from None


async def serve(
    config: RelayConfig,
    ssl_ctx: ssl.SSLContext | None,
    drain_timeout_s: float,
    drain_grace_s: float = 0.0,
    generated_secret: bool = False,
) -> None:
    try:
        server = RelayServer(config, ssl=ssl_ctx)
    except KeyFileError as exc:
        raise ConfigError(f"--ticket-key-file {exc}") from None
    try:
        await server.start()
    except OSError as exc:
        raise ConfigError(
            f"cannot listen on {config.host}:{config.port}: {exc.strerror or exc}"
        ) from None
    if generated_secret:
        # Only once the port is ours: a start that fails prints no secret
        # nobody will ever be able to use.
        say(
            f"generated mint secret (set {SECRET_ENV} to choose one): {config.shared_secret}",
            "secret_generated",
            fields={"secret": config.shared_secret},
        )
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = 0

    def on_signal() -> None:
        nonlocal signals
        signals += 1
        stop.set()
        if signals > 1:  # a second signal: stop waiting for transfers
            server.cut_drain()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    loop.add_signal_handler(signal.SIGHUP, server.reload)
    if config.wildcard_host and not config.public_url:
        # No single address of ours is the public one: a mint answer points
        # at the address its minter used (its Host header).
        say(
            f"listening on every address ({config.host or '*'}) without "
            "--public-url: mint answers take their URLs from each mint request's Host header",
            "urls_from_host_header",
            level=logging.WARNING,
        )
    # Everything loaded so far lives as long as the process: keep it out of
    # the cyclic collector's full passes (each one walked ~30,000 start-up
    # objects, ~5 ms, for nothing).
    gc.freeze()
    # Ready only once the handlers are in: a SIGTERM sent as soon as this
    # line is read must drain, not kill the process.
    say(f"listening on {server.url}", "listening", stdout=True, fields={"url": server.url})
    await stop.wait()
    if drain_grace_s > 0:
        log.info(
            "draining: /healthz answers 503; serving relay requests %gs more, then no new "
            "connections and up to %gs for transfers",
            drain_grace_s,
            drain_timeout_s,
        )
    else:
        log.info("draining: no new connections; waiting up to %gs for transfers", drain_timeout_s)
    await server.drain(drain_timeout_s, drain_grace_s)
    await server.close()


def main(argv: Sequence[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    # Client commands take their options anywhere (`put URL --cacert CA FILE`).
    args = parse_client_args(parser, words)
    if args is None:
        args = parser.parse_args(words)
    if args.command in CLIENT_COMMANDS:
        return run_client_command(args)
    setup_logging(args.log_level, args.log_format)
    try:
        check_drain_timeout(args.drain_timeout, "--drain-timeout")
        check_drain_timeout(args.drain_grace, "--drain-grace")
        secret, generated = read_secret(args.shared_secret_file)
        config = config_from_args(args, secret)
        config = fit_max_connections(config, raise_fd_limit())
        ssl_ctx = make_ssl(config)
        run = _runner(args.loop)
        run(serve(config, ssl_ctx, args.drain_timeout, args.drain_grace, generated))
    except ConfigError as exc:
        # One escaping point for every message: whatever a flag or a file
        # name held, the error stays one line.
        say(f"error: {safe(exc, 2048)}", "config_error", level=logging.ERROR)
        return 2
    except KeyboardInterrupt:
        return 0
    return 0


def _runner(choice: str):  # type: ignore[no-untyped-def]
    if choice in ("auto", "uvloop"):
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise ConfigError("uvloop is not installed") from None
        else:
            return uvloop.run
    return asyncio.run
