"""Fixtures shared by the unit tests (helpers in asyncutil.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ferry.server.core.repository import ModelRepository


@pytest.fixture
def repo(tmp_path: Path) -> ModelRepository:
    """An empty model repository of the test's own."""
    return ModelRepository(tmp_path / "repo")
