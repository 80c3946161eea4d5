"""Server settings: defaults, then ``FERRY_*`` environment variables, then flags (flags win)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ferry.cli import main as ferry_main
from ferry.server.cli import build_parser
from ferry.server.cli import main as serve_main
from ferry.server.settings import Settings, SettingsError, from_args


def test_defaults() -> None:
    s = Settings.from_env({})
    assert s == Settings()
    assert (s.port, s.management_host, s.management_port, s.metrics_port) == (
        8001,
        "127.0.0.1",
        8003,
        8002,
    )
    assert (s.http_port, s.management_http_port) == (8000, 8004)  # Triton's HTTP port
    assert s.poll_interval == 0.0
    assert s.warm_up is True


def test_environment_is_parsed_by_field_type() -> None:
    s = Settings.from_env(
        {
            "FERRY_REPOSITORY": "/srv/models",
            "FERRY_HOST": "127.0.0.2",
            "FERRY_PORT": "9001",
            "FERRY_MANAGEMENT_PORT": "-1",
            "FERRY_METRICS_PORT": "0",
            "FERRY_POLL_INTERVAL": "2.5",
            "FERRY_GRACE_PERIOD": "3",
            "FERRY_MAX_MESSAGE_BYTES": "1048576",
            "FERRY_WARM_UP": "false",
            "FERRY_LOG_LEVEL": "DEBUG",
            "UNRELATED": "x",
        }
    )
    assert s.repository == Path("/srv/models")
    assert s.host == "127.0.0.2"
    assert (s.port, s.management_port, s.metrics_port) == (9001, -1, 0)
    assert (s.poll_interval, s.grace_period) == (2.5, 3.0)
    assert s.max_message_bytes == 1 << 20
    assert s.warm_up is False
    assert s.log_level == "DEBUG"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("1", True), ("true", True), ("YES", True), ("on", True), ("0", False), ("Off", False)],
)
def test_boolean_spellings(raw: str, expected: bool) -> None:
    assert Settings.from_env({"FERRY_WARM_UP": raw}).warm_up is expected


@pytest.mark.parametrize(
    ("key", "raw"),
    [
        ("FERRY_PORT", "eighty"),
        ("FERRY_PORT", ""),
        ("FERRY_POLL_INTERVAL", "1s"),
        ("FERRY_WARM_UP", "maybe"),
        ("FERRY_REPOSITORY", ""),  # was the working directory, its folders served as models
        ("FERRY_REPOSITORY", " "),
    ],
)
def test_invalid_environment_values_raise_one_line(key: str, raw: str) -> None:
    """Library code raises (a ValueError, catchable), never exits the caller's process."""
    with pytest.raises(SettingsError) as info:
        Settings.from_env({key: raw})
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert key in message
    assert repr(raw) in message
    assert "\n" not in message


@pytest.mark.parametrize("name", ["host", "management_host", "metrics_host"])
def test_an_empty_address_is_refused_naming_the_setting(name: str) -> None:
    """grpc read "" as no address: the start failed with "cannot listen on :8001: in use or
    not permitted"."""
    with pytest.raises(SettingsError, match=f"^{name} is empty: use an address"):
        Settings.from_env({f"FERRY_{name.upper()}": ""})


def test_an_empty_repository_flag_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["--repository", ""])
    assert info.value.code == 2
    assert "argument --repository: is empty" in capsys.readouterr().err


def test_a_broken_settings_rule_raises_settings_error() -> None:
    with pytest.raises(SettingsError, match="FERRY_MANAGEMENT_TOKEN"):
        Settings.from_env({"FERRY_MANAGEMENT_HOST": "0.0.0.0"})


def test_a_negative_pending_call_bound_is_refused() -> None:
    with pytest.raises(SettingsError, match="max_pending_calls -1"):
        Settings.from_env({"FERRY_MAX_PENDING_CALLS": "-1"})


def test_the_pending_call_bound_sets_grpcs_random_and_hard_limits() -> None:
    from ferry.server.grpc.app import pending_call_limits

    assert pending_call_limits(0) == []  # grpc's own defaults
    assert dict(pending_call_limits(64)) == {
        "grpc.server.max_pending_requests": 32,
        "grpc.server.max_pending_requests_hard_limit": 64,
    }


@pytest.mark.parametrize("entry", ["python -m ferry.server", "ferry serve"])
def test_the_cli_turns_a_settings_error_into_one_line_and_status_1(
    entry: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setenv("FERRY_PORT", "eighty")
    argv = ["--repository", str(tmp_path)]
    status = serve_main(argv) if entry == "python -m ferry.server" else ferry_main(["serve", *argv])
    assert status == 1
    err = capsys.readouterr().err
    assert err.splitlines() == ["ferry serve: FERRY_PORT='eighty' is not a valid int"]


def test_flags_override_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FERRY_PORT", "9001")
    monkeypatch.setenv("FERRY_POLL_INTERVAL", "5")
    monkeypatch.setenv("FERRY_WARM_UP", "true")
    args = build_parser().parse_args(["--port", "9002", "--no-warm-up", "--repository", "/m"])
    s = from_args(args)
    assert s.port == 9002  # the flag
    assert s.poll_interval == 5.0  # the environment, no flag given
    assert s.warm_up is False
    assert s.repository == Path("/m")


def test_every_flag_has_help_that_names_its_variable() -> None:
    text = build_parser().format_help()
    for flag, env in [
        ("--repository", "FERRY_REPOSITORY"),
        ("--port", "FERRY_PORT"),
        ("--poll-interval", "FERRY_POLL_INTERVAL"),
        ("--warm-up", "FERRY_WARM_UP"),
    ]:
        assert flag in text
        assert env in text
