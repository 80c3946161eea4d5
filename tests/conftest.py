from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from serverutil import ServerThread  # noqa: E402

from ferry.server.core.repository import ModelRepository  # noqa: E402
from ferry.server.examples import identity_model, mlp_model, two_io_model, write_model  # noqa: E402


@pytest.fixture
def repo_path(tmp_path: Path) -> Path:
    """A repository with: mlp (64->256->256->10), two_io (FP32+INT64 in, two out),
    identity_fp32 with a fixed shape and no batch dim."""
    repo = ModelRepository(tmp_path / "repo")
    write_model(repo, "mlp", mlp_model())
    write_model(repo, "two_io", two_io_model())
    write_model(repo, "fixed", identity_model("FP32", dims=(3,)))
    return repo.root


@pytest.fixture
def server(repo_path: Path) -> Iterator[ServerThread]:
    with ServerThread(repo_path) as srv:
        yield srv
