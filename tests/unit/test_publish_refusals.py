"""A conversion's publish that the repository refuses says why, with the status that fits."""

from __future__ import annotations

import asyncio
import errno
import os
from pathlib import Path

import pytest

from ferry.server.convert.publish import publish
from ferry.server.core.registry import ModelRegistry
from ferry.server.core.repository import ModelRepository
from ferry.server.errors import ErrorKind, FerryError
from ferry.server.examples import seed_model, write_model
from ferry.server.runtime.session import open_session


@pytest.mark.parametrize(
    ("code", "kind", "said"),
    [
        (errno.ENOSPC, ErrorKind.LIMIT_EXCEEDED, "disk is full"),
        (errno.EACCES, ErrorKind.FAILED_PRECONDITION, "Permission denied"),
        (errno.EROFS, ErrorKind.FAILED_PRECONDITION, "Read-only file system"),
    ],
)
def test_a_rename_the_repository_refuses_is_not_called_a_model_that_does_not_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, kind: ErrorKind, said: str
) -> None:
    """The rename that makes the staged folder a version failed (a full disk, a read-only
    mount, a permission): the job said the converted model "does not load in this server's
    onnxruntime", or failed INTERNAL with a traceback, though the model had loaded."""
    repo = ModelRepository(tmp_path / "repo")
    write_model(repo, "m", seed_model(seed=1))

    def refused(src: object, dst: object) -> None:
        raise OSError(code, os.strerror(code))

    async def scenario() -> None:
        registry = ModelRegistry(repo, open_session, warm_up=False)
        await registry.refresh()
        with repo.staging("m") as staged:
            (staged / "model.onnx").write_bytes(seed_model(seed=2).SerializeToString())
            monkeypatch.setattr(os, "rename", refused)
            with pytest.raises(FerryError) as caught:
                await publish(repo, registry, "m", staged, {})
            monkeypatch.undo()
        assert caught.value.kind is kind
        assert said in caught.value.message and "does not load" not in caught.value.message
        assert repo.list_versions("m") == [1]
        assert [s.version for s in registry.statuses("m")] == [1]
        await registry.close()

    asyncio.run(scenario())


def test_a_model_that_does_not_load_is_still_said_so(tmp_path: Path) -> None:
    repo = ModelRepository(tmp_path / "repo")
    write_model(repo, "m", seed_model(seed=1))

    async def scenario() -> None:
        registry = ModelRegistry(repo, open_session, warm_up=False)
        with repo.staging("m") as staged:
            (staged / "model.onnx").write_bytes(b"not a model")
            with pytest.raises(FerryError) as caught:
                await publish(repo, registry, "m", staged, {})
        assert caught.value.kind is ErrorKind.CONVERSION_FAILED
        assert "does not load in this server's onnxruntime" in caught.value.message
        assert repo.list_versions("m") == [1]
        await registry.close()

    asyncio.run(scenario())
