"""``python -m ferry.server.probe``, the container's readiness and liveness probe, against real
servers: readiness follows the replica's health, liveness only asks that the listener answers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import make_repo
from serverutil import ServerThread

from ferry.server.examples import seed_model
from ferry.server.probe import main


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_readiness_and_liveness_pass_on_a_ready_replica(
    server: ServerThread, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--address", server.target]) == 0
    assert "SERVING" in capsys.readouterr().out
    assert main(["--address", server.target, "--alive"]) == 0
    assert main(["--address", server.target, "--service", "mlp"]) == 0
    assert main(["--address", server.target, "--service", "inference.GRPCInferenceService"]) == 0


def test_a_replica_missing_a_required_model_is_alive_but_not_ready(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = make_repo(tmp_path / "repo", {"seed": seed_model()})
    with ServerThread(root, require_models="seed,absent") as srv:
        assert main(["--address", srv.target]) == 1
        assert "NOT_SERVING" in capsys.readouterr().err
        assert main(["--address", srv.target, "--alive"]) == 0


def test_an_unknown_service_and_a_closed_port_fail_even_for_liveness(
    server: ServerThread, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--address", server.target, "--service", "no-such-model", "--alive"]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err
    closed = f"127.0.0.1:{_free_port()}"
    assert main(["--address", closed, "--alive", "--timeout", "2"]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err


def test_the_management_health_needs_the_token_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    token = tmp_path / "management-token"
    token.write_text("s3cret-management\n")
    root = make_repo(tmp_path / "repo", {"seed": seed_model()})
    with ServerThread(root, management_token_file=str(token)) as srv:
        assert main(["--address", srv.management_target, "--alive"]) == 1
        assert "UNAUTHENTICATED" in capsys.readouterr().err
        assert main(["--address", srv.management_target, "--token-file", str(token)]) == 0
        missing = tmp_path / "nothing-here"
        assert main(["--address", srv.management_target, "--token-file", str(missing)]) == 1
        assert "cannot read the token file" in capsys.readouterr().err


def test_readiness_fails_once_the_server_is_draining(server: ServerThread) -> None:
    """SIGTERM's first step (health NOT_SERVING) must fail the readiness probe."""
    assert server.app is not None
    app = server.app
    server.call(app.health.enter_graceful_shutdown)
    assert main(["--address", server.target]) == 1
    assert main(["--address", server.target, "--alive"]) == 0


def test_the_module_runs_as_a_command(server: ServerThread) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "ferry.server.probe", "--address", server.target],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("SERVING")
    # A probe must stay light: it never imports numpy or onnxruntime.
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, ferry.server.probe; "
            "print(sorted(m for m in ('numpy', 'onnxruntime', 'torch') if m in sys.modules))",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert r.stdout.strip() == "[]"


@pytest.mark.parametrize("timeout", ["0", "-1", "nan", "inf", "1e10", "soon"])
def test_a_timeout_that_could_never_pass_is_a_usage_error(
    server: ServerThread, timeout: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """grpc made 0, negative and huge deadlines an immediate DEADLINE_EXCEEDED against a
    SERVING server: a liveness probe that restarted a healthy pod for ever."""
    with pytest.raises(SystemExit) as info:
        main(["--address", server.target, "--timeout", timeout])
    assert info.value.code == 2
    assert "argument --timeout" in capsys.readouterr().err


def test_the_largest_timeout_still_answers(server: ServerThread) -> None:
    assert main(["--address", server.target, "--timeout", "3600"]) == 0


@pytest.mark.parametrize(
    "content",
    [b"\xff\xfe\x00", "tok\u00e9n\n".encode(), b"one\ntwo\n", b"\n"],
    ids=["binary", "non-ascii", "two-lines", "empty"],
)
def test_a_token_file_that_holds_no_sendable_token_says_so(
    server: ServerThread, tmp_path: Path, content: bytes, capsys: pytest.CaptureFixture[str]
) -> None:
    """A binary file raised a UnicodeDecodeError traceback out of the probe; a token gRPC
    cannot send failed as "INTERNAL: Invalid metadata", which blamed nobody."""
    token = tmp_path / "token"
    token.write_bytes(content)
    assert main(["--address", server.target, "--token-file", str(token)]) == 1
    err = capsys.readouterr().err
    assert "the token file" in err and "INTERNAL" not in err
