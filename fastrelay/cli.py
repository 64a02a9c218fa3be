"""``fastrelay serve``: command line -> RelayConfig -> a running server.

Configuration errors (port in use, unreadable certificate, bad flag values)
exit with status 2 and one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import secrets
import signal
import ssl
import stat
import sys
from collections.abc import Sequence

from .config import RelayConfig
from .server import RelayServer
from .tls import server_ssl_context

SECRET_ENV = "FASTRELAY_SHARED_SECRET"
log = logging.getLogger("fastrelay")


class ConfigError(Exception):
    """A problem with the command line or the files it names."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastrelay", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the relay server")
    d = RelayConfig()
    serve.add_argument("--host", default=d.host, help="address to listen on (%(default)s)")
    serve.add_argument("--port", type=int, default=d.port, help="port, 0 for any (%(default)s)")
    serve.add_argument(
        "--public-url",
        help="base of upload_url/download_url in mint answers "
        "(default: scheme://host:port this server listens on)",
    )
    serve.add_argument("--certfile", help="PEM certificate chain: serve HTTPS")
    serve.add_argument("--keyfile", help="PEM private key for --certfile")
    serve.add_argument(
        "--shared-secret-file",
        help=f"file holding the mint secret (else ${SECRET_ENV}; else one is generated)",
    )
    serve.add_argument(
        "--ttl", type=float, default=d.ticket_ttl_s, help="default pairing TTL, s (%(default)s)"
    )
    serve.add_argument(
        "--max-per-workspace",
        type=int,
        default=d.max_per_workspace,
        help="live tickets per workspace (%(default)s)",
    )
    serve.add_argument(
        "--idle-timeout",
        type=float,
        default=d.idle_timeout_s,
        help="abort a paired transfer after this long without progress, s (%(default)s)",
    )
    serve.add_argument(
        "--header-timeout",
        type=float,
        default=d.header_timeout_s,
        help="a request head must arrive within this, s (%(default)s)",
    )
    serve.add_argument(
        "--max-connections",
        type=int,
        default=d.max_connections,
        help="open connections at most; more are closed at once (%(default)s)",
    )
    serve.add_argument(
        "--max-pending",
        type=int,
        default=d.max_pending,
        help="minted but unpaired tickets at most; more get 503 at mint (%(default)s)",
    )
    serve.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        help="on SIGTERM/SIGINT, let paired transfers run this long, s (%(default)s)",
    )
    serve.add_argument(
        "--buffer-size",
        type=int,
        default=d.read_buffer_bytes,
        help="upload receive buffer, bytes (%(default)s)",
    )
    serve.add_argument(
        "--kernel-splice-min-bytes",
        type=int,
        default=d.kernel_splice_min_bytes,
        help="plain Content-Length uploads with at least this many bytes left at pairing "
        "move through splice(2); 0 disables (%(default)s)",
    )
    serve.add_argument(
        "--loop", choices=("auto", "uvloop", "asyncio"), default="auto", help="event loop"
    )
    serve.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    return parser


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
            max_per_workspace=args.max_per_workspace,
            idle_timeout_s=args.idle_timeout,
            header_timeout_s=args.header_timeout,
            max_connections=args.max_connections,
            max_pending=args.max_pending,
            read_buffer_bytes=args.buffer_size,
            kernel_splice_min_bytes=args.kernel_splice_min_bytes,
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def make_ssl(config: RelayConfig) -> ssl.SSLContext | None:
    if config.certfile is None:
        return None
    try:
        return server_ssl_context(config.certfile, config.keyfile)
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise ConfigError(f"cannot load certificate/key: {reason}") from None


async def serve(
    config: RelayConfig, ssl_ctx: ssl.SSLContext | None, drain_timeout_s: float
) -> None:
    server = RelayServer(config, ssl=ssl_ctx)
    try:
        await server.start()
    except OSError as exc:
        raise ConfigError(
            f"cannot listen on {config.host}:{config.port}: {exc.strerror or exc}"
        ) from None
    print(f"fastrelay: listening on {server.url}", flush=True)

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
    loop.add_signal_handler(signal.SIGHUP, server.reload_tls)
    await stop.wait()
    log.info("draining: no new connections; waiting up to %gs for transfers", drain_timeout_s)
    await server.drain(drain_timeout_s)
    await server.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        secret, generated = read_secret(args.shared_secret_file)
        config = config_from_args(args, secret)
        ssl_ctx = make_ssl(config)
        if generated:
            print(
                f"fastrelay: generated mint secret (set {SECRET_ENV} to choose one): {secret}",
                file=sys.stderr,
                flush=True,
            )
        run = _runner(args.loop)
        run(serve(config, ssl_ctx, args.drain_timeout))
    except ConfigError as exc:
        print(f"fastrelay: error: {exc}", file=sys.stderr)
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
