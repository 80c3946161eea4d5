"""What a user's type checker sees of the SDK: the types the docs promise, not ``Any``.

grpcio ships no stubs; without types-grpcio every ``grpc.StatusCode`` in the SDK's signatures
silently became ``Any`` under mypy, so a user's ``err.code == "NOT_FOUND"`` type-checked."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

api = pytest.importorskip("mypy.api")

USER_CODE = textwrap.dedent(
    """
    from ferry.client import FerryError, InferenceClient

    def handle(err: FerryError, client: InferenceClient) -> None:
        reveal_type(err.code)
        reveal_type(err.kind)
        err.code == 1  # a StatusCode is not an int: mypy --strict-equality says so
    """
)


def test_a_users_type_checker_sees_status_codes_not_any(tmp_path: Path) -> None:
    user = tmp_path / "user_code.py"
    user.write_text(USER_CODE)
    stdout, stderr, _ = api.run(
        [
            "--no-incremental",
            "--cache-dir=/dev/null",
            "--strict-equality",
            "--config-file=",
            "--python-version=3.11",
            "--follow-imports=silent",
            f"--python-executable={sys.executable}",
            str(user),
        ],
    )
    assert stderr == ""
    assert 'Revealed type is "grpc.StatusCode | None"' in stdout, stdout
    assert 'Revealed type is "str"' in stdout, stdout
    assert "Non-overlapping equality check" in stdout, stdout
