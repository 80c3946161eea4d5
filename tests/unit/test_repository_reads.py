"""Management calls read the repository's folders off the event loop, and not for ever."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ferry.server.core import registry as registry_module
from ferry.server.core import versions
from ferry.server.core.dataplane import DataPlane, InferenceRequest
from ferry.server.core.registry import ModelRegistry
from ferry.server.core.repository import ModelRepository
from ferry.server.errors import Unavailable
from ferry.server.examples import seed_model, write_model
from ferry.server.runtime.session import open_session

GUARD_S = 20.0  # how long a hung look waits before giving up (a hang guard, not a check)

Call = Callable[[ModelRepository, ModelRegistry], Awaitable[Any]]
CALLS: dict[str, tuple[str, Call]] = {
    "RepositoryIndex": ("list_models", lambda repo, reg: reg.index()),
    "GetModel": ("list_versions", lambda repo, reg: versions.describe(repo, reg, "m")),
    "DeleteModelVersion": (
        "has_model",
        lambda repo, reg: versions.delete_version(repo, reg, "m", 1),
    ),
    "SetRollout": ("model_dir", lambda repo, reg: reg.set_rollout("m", None, by="t", why="t")),
}


def _hung(
    monkeypatch: pytest.MonkeyPatch, method: str, order: list[str]
) -> tuple[threading.Event, threading.Event]:
    """Make ``ModelRepository.<method>`` hang (a hung network mount) until released."""
    entered, gate = threading.Event(), threading.Event()
    real = getattr(ModelRepository, method)

    def hung(self: ModelRepository, *args: Any) -> Any:
        entered.set()
        order.append("read" if gate.wait(GUARD_S) else "read gave up")
        return real(self, *args)

    monkeypatch.setattr(ModelRepository, method, hung)
    return entered, gate


@pytest.mark.parametrize("call", sorted(CALLS))
def test_a_hung_repository_read_does_not_stall_inference(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, call: str
) -> None:
    """RepositoryIndex, GetModel and an edit's lookup listed the folder on the event loop: a
    slow or hung network mount stalled every inference request meanwhile."""
    repo = ModelRepository(tmp_path / "repo")
    write_model(repo, "m", seed_model(seed=1))
    write_model(repo, "m", seed_model(seed=2), version=2)
    method, run = CALLS[call]
    order: list[str] = []

    async def scenario() -> None:
        registry = ModelRegistry(repo, open_session, warm_up=False)
        await registry.refresh()
        entered, gate = _hung(monkeypatch, method, order)
        pending = asyncio.ensure_future(run(repo, registry))
        await asyncio.to_thread(entered.wait, GUARD_S)
        x = {"input": np.ones((1, 3), np.float32)}
        assert (await DataPlane(registry).infer(InferenceRequest("m", x))).version == 2
        order.append("inference")
        gate.set()
        await pending
        await registry.close()

    asyncio.run(scenario())
    assert order[:2] == ["inference", "read"]


def test_a_repository_read_that_never_answers_is_unavailable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hung mount held the call (and, on the loop, the server) for good; it answers
    UNAVAILABLE, saying what to check, once the bound has passed."""
    repo = ModelRepository(tmp_path / "repo")
    write_model(repo, "m", seed_model())
    order: list[str] = []

    async def scenario() -> None:
        registry = ModelRegistry(repo, open_session, warm_up=False)
        await registry.refresh()
        _entered, gate = _hung(monkeypatch, "list_models", order)
        monkeypatch.setattr(registry_module, "READ_TIMEOUT_S", 0.01)
        try:
            with pytest.raises(Unavailable, match=r"did not answer within .*mount"):
                await registry.index()
            with pytest.raises(Unavailable):
                await registry.refresh()
            assert [s.version for s in registry.statuses("m")] == [1]  # still served
        finally:
            gate.set()
        await registry.close()

    asyncio.run(scenario())


def test_a_publish_reads_the_model_folder_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A conversion's publish resolved the model's folder and read its config on the loop."""
    repo = ModelRepository(tmp_path / "repo")
    write_model(repo, "m", seed_model(seed=1))
    order: list[str] = []

    async def scenario() -> None:
        registry = ModelRegistry(repo, open_session, warm_up=False)
        await registry.refresh()
        with repo.staging("m") as staged:
            (staged / "model.onnx").write_bytes(seed_model(seed=2).SerializeToString())
            entered, gate = _hung(monkeypatch, "model_dir", order)
            pending = asyncio.ensure_future(
                registry.publish("m", staged, lambda: repo.publish("m", staged))
            )
            await asyncio.to_thread(entered.wait, GUARD_S)
            x = {"input": np.ones((1, 3), np.float32)}
            assert (await DataPlane(registry).infer(InferenceRequest("m", x))).version == 1
            order.append("inference")
            gate.set()
            assert (await pending)[0] == 2
        await registry.close()

    asyncio.run(scenario())
    assert order[:2] == ["inference", "read"]
