"""RelayConfig validation: every number finite and in range, errors name the field."""

from __future__ import annotations

import argparse
import dataclasses
import math

import pytest

from fastrelay import cli
from fastrelay.core.config import MAX_BUFFER_BYTES, MAX_DURATION_S, ConfigValueError, RelayConfig

FLOAT_FIELDS = ["ticket_ttl_s", "max_ttl_s", "idle_timeout_s", "header_timeout_s", "linger_s"]


def test_defaults_are_valid_and_frozen() -> None:
    config = RelayConfig()
    assert config.max_ttl_s == 86400.0 and config.ticket_ttl_s <= config.max_ttl_s
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.max_ttl_s = 1.0  # type: ignore[misc]


@pytest.mark.parametrize("field", FLOAT_FIELDS)
@pytest.mark.parametrize(
    "value", [math.nan, math.inf, -math.inf, 0.0, -1.0, MAX_DURATION_S * 2, True, "5"]
)
def test_durations_must_be_finite_positive_and_bounded(field: str, value: object) -> None:
    with pytest.raises(ConfigValueError) as info:
        RelayConfig(**{field: value})  # type: ignore[arg-type]
    assert info.value.field == field
    assert isinstance(info.value, ValueError)
    assert str(info.value).startswith(f"{field} must be")


def test_error_shape() -> None:
    with pytest.raises(ConfigValueError) as info:
        RelayConfig(ticket_ttl_s=math.nan)
    exc = info.value
    assert (exc.field, exc.requirement, exc.got) == (
        "ticket_ttl_s",
        "must be a positive number of seconds",
        "nan",
    )
    assert str(exc) == "ticket_ttl_s must be a positive number of seconds (got nan)"


def test_ticket_ttl_may_not_exceed_max_ttl() -> None:
    RelayConfig(ticket_ttl_s=100, max_ttl_s=100)
    with pytest.raises(ConfigValueError) as info:
        RelayConfig(ticket_ttl_s=301, max_ttl_s=300)
    assert info.value.field == "ticket_ttl_s"
    assert str(info.value) == "ticket_ttl_s must be at most max_ttl_s (300) (got 301)"


@pytest.mark.parametrize(
    ("field", "bad"),
    [
        ("port", -1),
        ("port", 65536),
        ("port", 80.0),
        ("port", True),
        ("max_per_workspace", 0),
        ("max_connections", 0),
        ("max_pending", 0),
        ("tcp_keepalive_s", 0),
        ("tcp_keepalive_s", 32768),
        ("max_head_bytes", 1023),
        ("max_head_bytes", MAX_BUFFER_BYTES + 1),
        ("max_mint_body_bytes", 0),
        ("read_buffer_bytes", 4095),
        ("read_buffer_bytes", 10**12),
        ("kernel_splice_min_bytes", -1),
        ("tls_write_high_bytes", 0),
        ("tls_write_low_bytes", 0),
        ("tls_write_low_bytes", RelayConfig().tls_write_high_bytes + 1),
    ],
)
def test_int_fields_in_range(field: str, bad: object) -> None:
    with pytest.raises(ConfigValueError) as info:
        RelayConfig(**{field: bad})  # type: ignore[arg-type]
    assert info.value.field == field


def test_edges_that_are_allowed() -> None:
    RelayConfig(port=0, kernel_splice_min_bytes=0, read_buffer_bytes=4096, max_head_bytes=1024)
    RelayConfig(port=65535, tcp_keepalive_s=32767, ticket_ttl_s=1, idle_timeout_s=0.05)
    RelayConfig(ticket_ttl_s=MAX_DURATION_S, max_ttl_s=MAX_DURATION_S)


def test_other_errors_name_their_field_and_never_the_secret() -> None:
    with pytest.raises(ConfigValueError) as info:
        RelayConfig(certfile="c.pem")
    assert info.value.field == "keyfile"
    with pytest.raises(ConfigValueError) as info:
        RelayConfig(shared_secret="")
    assert info.value.field == "shared_secret" and info.value.got is None


# --- the CLI's translation of these errors (pure: no process, no socket) --------------


def args_for(*argv: str) -> argparse.Namespace:
    return cli.build_parser().parse_args(["serve", *argv])


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (["--ttl", "nan"], "--ttl must be a positive number of seconds (got nan)"),
        (["--ttl", "inf"], "--ttl must be a positive number of seconds (got inf)"),
        (["--ttl", "-1"], "--ttl must be a positive number of seconds (got -1)"),
        (["--idle-timeout", "0"], "--idle-timeout must be a positive number of seconds (got 0)"),
        (["--port", "70000"], "--port must be a whole number 0-65535 (got 70000)"),
        (["--max-connections", "0"], "--max-connections must be a whole number >= 1 (got 0)"),
        (["--ttl", "600", "--max-ttl", "300"], "--ttl must be at most --max-ttl (300) (got 600)"),
        (["--buffer-size", "10"], "--buffer-size must be a whole number of bytes"),
    ],
)
def test_config_errors_name_the_flag(argv: list[str], line: str) -> None:
    with pytest.raises(cli.ConfigError) as info:
        cli.config_from_args(args_for(*argv), "secret")
    assert str(info.value).startswith(line)


def test_max_ttl_flag_passes_through() -> None:
    assert cli.config_from_args(args_for("--max-ttl", "120", "--ttl", "60"), "s").max_ttl_s == 120
    assert cli.config_from_args(args_for(), "s").max_ttl_s == 86400


def test_argparse_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        args_for("--port", "abc\nforged")
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err == "fastrelay: error: --port must be a whole number (got abc\\x0aforged)\n"
