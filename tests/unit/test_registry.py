"""The registry mirrors the repository folder: what it loads, unloads, retries and reports.

Real ONNX models in ``tmp_path`` and real onnxruntime sessions; no sockets. Each test runs its
own event loop with ``asyncio.run``.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from asyncutil import LOAD_GUARD_S, WatchedLock, arun

from ferry.server.core import versions
from ferry.server.core.dataplane import DataPlane, InferenceRequest
from ferry.server.core.registry import ModelRegistry
from ferry.server.core.repository import ModelRepository
from ferry.server.core.types import State
from ferry.server.errors import FailedPrecondition, ModelNotFound, ModelNotReady, VersionNotFound
from ferry.server.examples import identity_model, mlp_model, seed_model, write_model
from ferry.server.runtime.session import open_session


def _registry(repo: ModelRepository) -> ModelRegistry:
    return ModelRegistry(repo, open_session, warm_up=False)


def _states(registry: ModelRegistry) -> dict[str, str]:
    return {f"{s.name}/{s.version}": s.state.value for s in registry.statuses()}


def _config(repo: ModelRepository, name: str, config: dict[str, Any]) -> None:
    path = repo.model_dir(name) / "config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config))
    # A rewrite within the same mtime tick must still count as a change.
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


async def _infer(registry: ModelRegistry, model: str, version: int | None = None) -> int:
    result = await DataPlane(registry).infer(
        InferenceRequest(model, {"input": np.zeros((1, 3), np.float32)}, version=version)
    )
    return result.version


def test_refresh_loads_every_model(repo: ModelRepository) -> None:
    write_model(repo, "seed", seed_model())
    write_model(repo, "fixed", identity_model("FP32", dims=(3,)))

    async def main() -> None:
        registry = _registry(repo)
        result = await registry.refresh()
        assert sorted(result.loaded) == ["fixed/1", "seed/1"]
        assert result.failed == result.unloaded == []
        assert _states(registry) == {"fixed/1": "READY", "seed/1": "READY"}
        assert registry.all_ready()
        # The batch dimension is derived from the graph when the config is silent.
        assert registry.get("seed").max_batch_size == 32
        assert registry.get("fixed").max_batch_size == 0
        assert await _infer(registry, "seed") == 1
        await registry.close()
        assert registry.models == {}

    arun(main, LOAD_GUARD_S)


def test_lookup_errors(repo: ModelRepository) -> None:
    write_model(repo, "seed", seed_model())

    async def main() -> None:
        registry = _registry(repo)
        assert not registry.all_ready()  # nothing loaded yet
        await registry.refresh()
        with pytest.raises(ModelNotFound, match="'ghost'"):
            registry.get("ghost")
        with pytest.raises(VersionNotFound, match="version 3"):
            registry.get("seed", 3)
        with pytest.raises(ModelNotFound):
            registry.statuses("ghost")
        await registry.close()

    arun(main, LOAD_GUARD_S)


def test_corrupt_model_fails_and_others_serve(repo: ModelRepository) -> None:
    write_model(repo, "seed", seed_model())
    (repo.root / "broken" / "1").mkdir(parents=True)
    (repo.root / "broken" / "1" / "model.onnx").write_bytes(b"\x08\x01garbage")

    async def main() -> None:
        registry = _registry(repo)
        result = await registry.refresh()
        assert result.loaded == ["seed/1"]
        assert len(result.failed) == 1
        assert result.failed[0].startswith("broken/1: ")
        (status,) = registry.statuses("broken")
        assert status.state is State.FAILED
        assert status.reason
        assert "\n" not in status.reason
        assert registry.all_ready()  # a failure does not hide the ready models
        with pytest.raises(ModelNotReady, match="FAILED"):
            registry.get("broken")
        assert await _infer(registry, "seed") == 1
        await registry.close()

    arun(main, LOAD_GUARD_S)


def test_failed_version_is_retried_when_its_file_changes(repo: ModelRepository) -> None:
    vdir = repo.root / "m" / "1"
    vdir.mkdir(parents=True)
    (vdir / "model.onnx").write_bytes(b"not yet")

    async def main() -> None:
        registry = _registry(repo)
        await registry.refresh()
        assert _states(registry) == {"m/1": "FAILED"}
        # A poll (retry_failed=False) leaves an unchanged failure alone...
        assert (await registry.refresh(retry_failed=False)).failed == []
        # ...and retries it once the file changed.
        (vdir / "model.onnx").write_bytes(seed_model().SerializeToString())
        result = await registry.refresh(retry_failed=False)
        assert result.loaded == ["m/1"]
        assert _states(registry) == {"m/1": "READY"}
        await registry.close()

    arun(main, LOAD_GUARD_S)


def test_config_error_fails_the_model_with_the_key_and_a_fix_recovers_it(
    repo: ModelRepository,
) -> None:
    write_model(repo, "seed", seed_model())
    write_model(repo, "other", seed_model())
    _config(repo, "seed", {"batching": {"max_batch_sise": 4}})

    async def main() -> None:
        registry = _registry(repo)
        await registry.refresh()
        assert _states(registry) == {"other/1": "READY", "seed/1": "FAILED"}
        (status,) = registry.statuses("seed")
        assert "max_batch_sise" in status.reason
        assert "config.json" in status.reason
        # Fixing the config is picked up by a poll, without an explicit retry.
        _config(repo, "seed", {"batching": {"max_batch_size": 4}})
        result = await registry.refresh(retry_failed=False)
        assert result.loaded == ["seed/1"]
        assert _states(registry) == {"other/1": "READY", "seed/1": "READY"}
        assert registry.get("seed").max_batch_size == 4
        await registry.close()

    arun(main, LOAD_GUARD_S)


def test_a_broken_config_edit_leaves_a_served_model_serving(repo: ModelRepository) -> None:
    """A typo in a served model's config took it down (unloaded, FAILED) on the next refresh;
    as in Triton, a reload that fails leaves what was loaded serving, and says why."""
    write_model(repo, "seed", seed_model())
    _config(repo, "seed", {"batching": {"max_batch_size": 4}})

    async def main() -> None:
        registry = _registry(repo)
        await registry.refresh()
        served = registry.get("seed")
        _config(repo, "seed", {"batching": {"max_batch_sise": 8}})
        result = await registry.refresh(retry_failed=False)
        assert result.failed == ["seed/1: " + registry.models["seed"].config_error]
        assert "max_batch_sise" in result.failed[0]
        assert result.unloaded == [] and registry.get("seed") is served
        (status,) = registry.statuses("seed")
        assert status.state is State.READY
        assert status.reason.startswith("reload failed, still serving previous load:")
        assert served.max_batch_size == 4 and not served.batcher.closed
        # Polls that find the same broken file say nothing new; an explicit retry does.
        assert (await registry.refresh(retry_failed=False)).failed == []
        assert len((await registry.load_model("seed")).failed) == 1
        _config(repo, "seed", {"batching": {"max_batch_size": 8}})
        assert (await registry.refresh(retry_failed=False)).loaded == ["seed/1"]
        assert registry.get("seed").max_batch_size == 8
        assert registry.statuses("seed")[0].reason == ""
        await registry.close()

    arun(main, LOAD_GUARD_S)


def test_a_policy_that_selects_nothing_on_disk_keeps_serving_and_says_so(
    repo: ModelRepository,
) -> None:
    """version_policy specific [3] with only version 1 on disk unloaded the live model, which
    then said it had "no version folders"."""
    write_model(repo, "seed", seed_model())
    write_model(repo, "fresh", seed_model())
    _config(repo, "fresh", {"version_policy": {"specific": [3]}})

    async def main() -> None:
        registry = _registry(repo)
        await registry.refresh()
        served = registry.get("seed")
        _config(repo, "seed", {"version_policy": {"specific": [3]}})
        result = await registry.refresh(retry_failed=False)
        assert result.unloaded == [] and registry.get("seed") is served
        assert "selects none of the versions on disk [1]" in result.failed[0]
        (status,) = registry.statuses("seed")
        assert status.reason.startswith("reload failed, still serving previous load: its version")
        # Never served: the reason says what is wrong, not that there are no version folders.
        with pytest.raises(ModelNotReady, match=r"version_policy \(specific \[3\]\) selects none"):
            registry.get("fresh")
        await registry.close()

    arun(main, LOAD_GUARD_S)


def test_an_edit_of_a_versions_own_config_reloads_it(repo: ModelRepository) -> None:
    """A version's config.json is part of what it serves; an edit of it was ignored ("nothing
    changed") until the model's own config changed. So was a config.json added beside
    config.toml."""
    write_model(repo, "seed", seed_model())

    async def main() -> None:
        registry = _registry(repo)
        await registry.refresh()
        assert registry.get("seed").max_batch_size != 2
        version_dir = repo.root / "seed" / "1"
        (version_dir / "config.json").write_text(json.dumps({"batching": {"max_batch_size": 2}}))
        assert (await registry.refresh(retry_failed=False)).loaded == ["seed/1"]
        assert registry.get("seed").max_batch_size == 2
        assert (await registry.refresh(retry_failed=False)).loaded == []  # once, not per poll
        (repo.root / "seed" / "config.toml").write_text("[batching]\nmax_queue_size = 64\n")
        await registry.refresh(retry_failed=False)
        (repo.root / "seed" / "config.json").write_text("{}")  # beside config.toml
        result = await registry.refresh(retry_failed=False)
        assert "has both config.toml and config.json" in " ".join(result.failed), result
        await registry.close()

    arun(main, LOAD_GUARD_S)


def test_config_change_reloads_a_ready_version(repo: ModelRepository) -> None:
    write_model(repo, "seed", seed_model())

    async def main() -> None:
        registry = _registry(repo)
        await registry.refresh()
        first = registry.get("seed")
        _config(repo, "seed", {"batching": {"max_batch_size": 8}})
        result = await registry.refresh(retry_failed=False)
        assert result.loaded == ["seed/1"]
        second = registry.get("seed")
        assert second is not first
        assert second.max_batch_size == 8
        assert first.batcher.closed
        await registry.close()

    arun(main, LOAD_GUARD_S)


def test_model_folder_that_is_empty_at_first(repo: ModelRepository) -> None:
    """A refresh can see a model folder before its first version is published (staging
    creates the folder first): the model must load once the version appears."""
    repo.model_dir("late").mkdir()

    async def main() -> None:
        registry = _registry(repo)
        await registry.refresh()
        assert _states(registry) == {}
        with pytest.raises(ModelNotReady, match="no version"):
            registry.get("late")
        write_model(repo, "late", seed_model())
        result = await registry.refresh(retry_failed=False)
        assert result.loaded == ["late/1"]
        assert _states(registry) == {"late/1": "READY"}
        await registry.close()

    arun(main, LOAD_GUARD_S)


@pytest.mark.parametrize(
    ("policy", "served", "default"),
    [
        (None, [3], 3),
        ({"latest": 2}, [2, 3], 3),
        ({"all": True}, [1, 2, 3], 3),
        ({"specific": [1, 3]}, [1, 3], 3),
        ({"specific": [2]}, [2], 2),
    ],
)
def test_version_policy(
    repo: ModelRepository, policy: dict[str, Any] | None, served: list[int], default: int
) -> None:
    for v in (1, 2, 3):
        write_model(repo, "seed", seed_model(seed=v), version=v)
    if policy is not None:
        _config(repo, "seed", {"version_policy": policy})

    async def main() -> None:
        registry = _registry(repo)
        await registry.refresh()
        statuses = registry.statuses("seed")
        assert [s.version for s in statuses] == served
        assert [s.version for s in statuses if s.is_default] == [default]
        assert await _infer(registry, "seed") == default
        for v in served:
            assert await _infer(registry, "seed", v) == v
        await registry.close()

    arun(main, LOAD_GUARD_S)


def test_default_version_from_config(repo: ModelRepository) -> None:
    for v in (1, 2):
        write_model(repo, "seed", seed_model(seed=v), version=v)
    _config(repo, "seed", {"version_policy": {"all": True}, "default_version": 1})

    async def main() -> None:
        registry = _registry(repo)
        await registry.refresh()
        assert [s.version for s in registry.statuses("seed") if s.is_default] == [1]
        assert await _infer(registry, "seed") == 1
        assert await _infer(registry, "seed", 2) == 2
        await registry.close()

    arun(main, LOAD_GUARD_S)


def test_the_configured_default_is_served_beside_the_policys_versions(
    repo: ModelRepository,
) -> None:
    """default_version = 1 under the default policy (the newest only) failed every request
    that named no version; and a default that is not on disk says so when asked."""
    for v in (1, 2):
        write_model(repo, "seed", seed_model(seed=v), version=v)
    _config(repo, "seed", {"default_version": 1})

    async def main() -> None:
        registry = _registry(repo)
        await registry.refresh()
        assert sorted(s.version for s in registry.statuses("seed")) == [1, 2]
        assert await _infer(registry, "seed") == 1
        assert await _infer(registry, "seed", 2) == 2
        _config(repo, "seed", {"default_version": 5})
        await registry.refresh()
        with pytest.raises(VersionNotFound, match="configured default_version 5 is not served"):
            await _infer(registry, "seed")
        assert await _infer(registry, "seed", 2) == 2
        await registry.close()

    arun(main, LOAD_GUARD_S)


def test_new_version_replaces_the_old_under_latest_1(repo: ModelRepository) -> None:
    write_model(repo, "seed", seed_model(seed=1))

    async def main() -> None:
        registry = _registry(repo)
        await registry.refresh()
        old = registry.get("seed")
        write_model(repo, "seed", seed_model(seed=2), version=2)
        result = await registry.refresh()
        assert (result.loaded, result.unloaded) == (["seed/2"], ["seed/1"])
        assert _states(registry) == {"seed/2": "READY"}
        assert old.batcher.closed
        with pytest.raises(VersionNotFound):
            registry.get("seed", 1)
        await registry.close()

    arun(main, LOAD_GUARD_S)


def test_removed_model_folder_is_unloaded(repo: ModelRepository) -> None:
    write_model(repo, "seed", seed_model())
    write_model(repo, "keep", seed_model())

    async def main() -> None:
        registry = _registry(repo)
        await registry.refresh()
        shutil.rmtree(repo.model_dir("seed"))
        result = await registry.refresh()
        assert result.unloaded == ["seed/1"]
        with pytest.raises(ModelNotFound):
            registry.get("seed")
        assert _states(registry) == {"keep/1": "READY"}
        await registry.close()

    arun(main, LOAD_GUARD_S)


def test_a_repository_link_swapped_to_a_new_tree_is_followed(tmp_path: Path) -> None:
    """git-sync (and `ln -sfn release-N repo`) swaps a link to a new checkout and removes the
    old one. The root was resolved once at start: a refresh saw none of the new tree, and once
    the old tree was gone every refresh failed INTERNAL (FileNotFoundError)."""
    old, new, link = tmp_path / "tree1", tmp_path / "tree2", tmp_path / "repo"
    write_model(ModelRepository(old), "seed", seed_model(1))
    write_model(ModelRepository(new), "seed", seed_model(1))
    write_model(ModelRepository(new), "seed", seed_model(2), version=2)
    write_model(ModelRepository(new), "added", seed_model())
    link.symlink_to(old, target_is_directory=True)

    async def main() -> None:
        registry = _registry(ModelRepository(link))
        await registry.refresh()
        assert _states(registry) == {"seed/1": "READY"}
        (tmp_path / "swap").symlink_to(new, target_is_directory=True)
        os.replace(tmp_path / "swap", link)
        shutil.rmtree(old)
        result = await registry.refresh()
        assert sorted(result.loaded) == ["added/1", "seed/2"]
        assert _states(registry) == {"added/1": "READY", "seed/2": "READY"}
        # The repository gone altogether: the refresh is refused, precisely, and what is
        # loaded keeps serving (an unmounted volume is not "every model deleted").
        link.unlink()
        with pytest.raises(FailedPrecondition, match=r"cannot be read.*keeps serving"):
            await registry.refresh()
        assert _states(registry) == {"added/1": "READY", "seed/2": "READY"}
        # The repository index still lists what is served (it was INTERNAL).
        assert [(r.name, r.version) for r in await registry.index()] == [("added", 1), ("seed", 2)]
        await registry.close()

    arun(main, LOAD_GUARD_S)


def test_unload_and_load_by_request(repo: ModelRepository) -> None:
    write_model(repo, "seed", seed_model())

    async def main() -> None:
        registry = _registry(repo)
        await registry.refresh()
        await registry.unload_model("seed")
        with pytest.raises(ModelNotFound):
            registry.get("seed")
        # A refresh does not bring back what was unloaded on purpose...
        assert (await registry.refresh()).loaded == []
        assert _states(registry) == {}
        # ...an explicit load does.
        assert (await registry.load_model("seed")).loaded == ["seed/1"]
        assert await _infer(registry, "seed") == 1
        with pytest.raises(ModelNotFound):
            await registry.unload_model("ghost")
        with pytest.raises(ModelNotFound):
            await registry.load_model("ghost")
        await registry.close()

    arun(main, LOAD_GUARD_S)


def test_batching_config_that_the_graph_cannot_honour(repo: ModelRepository) -> None:
    write_model(repo, "fixed", identity_model("FP32", dims=(3,)))
    _config(repo, "fixed", {"batching": {"max_batch_size": 8}})

    async def main() -> None:
        registry = _registry(repo)
        await registry.refresh()
        (status,) = registry.statuses("fixed")
        assert status.state is State.FAILED
        assert "max_batch_size" in status.reason
        await registry.close()

    arun(main, LOAD_GUARD_S)


def test_per_version_config_overrides_the_model_config(repo: ModelRepository) -> None:
    write_model(repo, "m", mlp_model(), version=1)
    write_model(repo, "m", mlp_model(), version=2)
    _config(repo, "m", {"version_policy": {"all": True}, "batching": {"max_batch_size": 16}})
    (repo.version_dir("m", 2) / "config.json").write_text(
        json.dumps({"batching": {"max_batch_size": 4}, "instances": {"count": 2}})
    )

    async def main() -> None:
        registry = _registry(repo)
        await registry.refresh()
        v1, v2 = registry.get("m", 1), registry.get("m", 2)
        assert (v1.max_batch_size, v1.config.instances.count) == (16, 1)
        assert (v2.max_batch_size, v2.config.instances.count) == (4, 2)
        await registry.close()

    arun(main, LOAD_GUARD_S)


def test_listeners_follow_every_change(repo: ModelRepository) -> None:
    write_model(repo, "seed", seed_model())
    seen: list[dict[str, str]] = []

    async def main() -> None:
        registry = _registry(repo)
        registry.add_listener(lambda: seen.append(_states(registry)))
        registry.add_listener(lambda: 1 / 0)  # a failing listener does not stop the others
        await registry.refresh()
        assert {"seed/1": "LOADING"} in seen
        assert seen[-1] == {"seed/1": "READY"}
        await registry.close()

    arun(main, LOAD_GUARD_S)


def test_warm_up_runs_without_breaking_load(repo: ModelRepository) -> None:
    write_model(repo, "seed", seed_model())
    write_model(repo, "text", identity_model("BYTES"))
    write_model(repo, "dyn", identity_model("FP32", dims=("batch", "n", "m")))

    async def main() -> None:
        registry = ModelRegistry(repo, open_session, warm_up=True)
        await registry.refresh()
        assert set(_states(registry).values()) == {"READY"}
        await registry.close()

    arun(main, LOAD_GUARD_S)


def test_health_is_all_ready_and_each_models_readiness_in_one_pass(repo: ModelRepository) -> None:
    """registry.health() answers what all_ready() and the per-model states do, through every
    state the registry passes: nothing loaded, loading, ready, failed, settled, unloaded."""
    write_model(repo, "seed", seed_model())
    (repo.root / "broken" / "1").mkdir(parents=True)
    (repo.root / "broken" / "1" / "model.onnx").write_bytes(b"\x08\x01garbage")

    async def main() -> None:
        registry = _registry(repo)
        seen: list[tuple[bool, dict[str, bool]]] = []

        def check() -> None:
            # What health() must say, worked out here from the slots, not by the code under test.
            slots = {
                e.name: [s.state for s in e.versions.values()] for e in registry.models.values()
            }
            states = {name: State.READY in st for name, st in slots.items()}
            if registry._required is None:  # before settle: all loaded and one is READY
                replica = any(states.values()) and not any(
                    State.LOADING in st for st in slots.values()
                )
            elif registry._required:  # after it: the models it must serve are READY
                replica = all(states.get(name, False) for name in registry._required)
            else:  # ... or, when none is required any more, one model is
                replica = any(states.values())
            assert registry.health() == (replica, states)
            assert registry.all_ready() is replica
            seen.append(registry.health())

        registry.add_listener(check)
        check()
        await registry.refresh()  # LOADING then READY / FAILED, checked at each change
        assert registry.health() == (True, {"seed": True, "broken": False})
        registry.settle()
        check()
        await registry.unload_model("seed")
        check()
        assert registry.health() == (False, {"broken": False})
        assert len(seen) >= 6  # every change was checked, not only the end states
        await registry.close()

    arun(main, LOAD_GUARD_S)


def test_loading_a_model_beside_the_served_ones_never_makes_the_replica_not_ready(
    repo: ModelRepository,
) -> None:
    """An explicit load added the model to the required set before it loaded: the replica went
    NOT_SERVING for the length of every load (a probe pulled a serving replica on every
    deploy), and stayed so after a load that failed."""
    write_model(repo, "seed", seed_model())
    write_model(repo, "other", seed_model(seed=2))
    (repo.root / "broken" / "1").mkdir(parents=True)
    (repo.root / "broken" / "1" / "model.onnx").write_bytes(b"\x08\x01garbage")

    async def main() -> None:
        registry = _registry(repo)
        await registry.refresh()
        registry.settle(["seed"])
        replica: list[bool] = []
        registry.add_listener(lambda: replica.append(registry.all_ready()))
        await registry.unload_model("other")
        await registry.load_model("other")  # LOADING, then READY: every change is recorded
        await registry.load_model("broken")  # fails to load (the management call says so)
        assert [s.state for s in registry.statuses("broken")] == [State.FAILED]
        assert replica and all(replica), replica
        assert registry.all_ready()
        await registry.unload_model("seed")  # required no more, and another model serves
        await registry.load_model("seed")
        assert registry.all_ready()
        await registry.close()

    arun(main, LOAD_GUARD_S)


def test_default_version_is_the_newest_ready_else_the_newest_known() -> None:
    from ferry.server.core.config import parse_config
    from ferry.server.core.registry import ModelEntry, VersionSlot

    entry = ModelEntry("m")
    assert entry.default_version() is None
    entry.versions = {
        v: VersionSlot(v, state)
        for v, state in [(2, State.READY), (5, State.FAILED), (3, State.READY), (1, State.READY)]
    }
    assert entry.default_version() == 3  # 5 is newer but not serving
    for slot in entry.versions.values():
        slot.state = State.LOADING
    assert entry.default_version() == 5  # none ready: the newest, so the refusal names it
    entry.config = parse_config({"default_version": 2})
    assert entry.default_version() == 2


def test_text_inputs_are_decoded_for_the_model_and_left_as_sent_in_the_request(
    repo: ModelRepository,
) -> None:
    write_model(repo, "text", identity_model("BYTES"))
    registry = _registry(repo)
    sent = np.array([[b"caf\xc3\xa9", b"x"]], dtype=object)
    request = InferenceRequest("text", {"input": sent})

    async def go() -> None:
        await registry.refresh()
        result = await DataPlane(registry).infer(request)
        assert result.outputs["output"].tolist() == [["café", "x"]]
        assert request.inputs["input"] is sent and sent.tolist() == [[b"caf\xc3\xa9", b"x"]]

    arun(go, LOAD_GUARD_S)


@pytest.mark.parametrize("requests", [1, 3])
def test_an_output_that_is_not_batched_fails_instead_of_being_split(
    repo: ModelRepository, requests: int
) -> None:
    """The graph's output has a dynamic first dimension but keeps only the batch's first row:
    that row belongs to no one request, so no request is ever answered from it (sliced into
    wrong answers): the configured max_batch_size is refused at load, naming the output, and
    every request, alone or with company, is told why. (A model that does not run on zeros is
    caught when a batch returns, with INTERNAL.)"""
    from onnx import TensorProto, helper

    from ferry.server.errors import ModelNotReady
    from ferry.server.examples import IR_VERSION, OPSET

    graph = helper.make_graph(
        [helper.make_node("Compress", ["input", "first"], ["output"], axis=0)],
        "first_row",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["rows", 3])],
        [helper.make_tensor("first", TensorProto.BOOL, [1], [True])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    write_model(repo, "sums", model)
    _config(repo, "sums", {"batching": {"max_batch_size": 8, "max_queue_delay_ms": 50}})
    registry = _registry(repo)

    async def go() -> None:
        await registry.refresh()
        plane = DataPlane(registry)
        calls = [
            plane.infer(InferenceRequest("sums", {"input": np.ones((2, 3), np.float32)}))
            for _ in range(requests)
        ]
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        assert all(isinstance(o, ModelNotReady) for o in outcomes), outcomes
        assert "output 'output' is [1, 3] for a batch of 2" in str(outcomes[0])

    arun(go, LOAD_GUARD_S)


class HeldFiles(ThreadPoolExecutor):
    """The registry's files thread, holding every task until released; ``all_submitted`` is
    set (on the loop, which is where run_in_executor submits) once ``expected`` have arrived."""

    def __init__(self, expected: int) -> None:
        super().__init__(max_workers=1)
        self.expected = expected
        self.all_submitted = asyncio.Event()
        self.released = threading.Event()

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        self.expected -= 1
        if self.expected <= 0:
            self.all_submitted.set()

        def held() -> Any:
            assert self.released.wait(LOAD_GUARD_S), "the test never released the files thread"
            return fn(*args, **kwargs)

        return super().submit(held)


def test_a_model_between_its_scan_and_its_load_is_loading_not_empty(
    repo: ModelRepository,
) -> None:
    """A request that arrives while a new model's folder is read (before any version is in
    place) was told the folder had no versions; it is told the model is loading."""
    write_model(repo, "m", mlp_model())
    repo.model_dir("e").mkdir(parents=True)

    async def scenario() -> None:
        registry = _registry(repo)
        files = registry.pools.files = HeldFiles(expected=2)
        refresh = asyncio.create_task(registry.refresh())
        await files.all_submitted.wait()  # the refresh has reached both models' scans
        with pytest.raises(ModelNotReady, match="model 'm' is loading; retry shortly"):
            registry.get("m")
        files.released.set()
        await refresh
        assert registry.get("m").version == 1
        # A model whose folder has no versions still says so, once it has been read.
        with pytest.raises(ModelNotReady, match="no version folders"):
            registry.get("e")
        await registry.close()
        files.shutdown()

    arun(scenario, LOAD_GUARD_S)


def test_a_published_version_is_opened_once(repo: ModelRepository) -> None:
    """publish() signed the slot with the model file alone while the sync after it compared
    (model file, version config): every published version was opened a second time."""
    import onnx

    write_model(repo, "m", seed_model(seed=1))

    opened: list[str] = []

    def counting(path: Any, *args: Any, **kwargs: Any) -> Any:
        opened.append(Path(path).parent.name)
        return open_session(path, *args, **kwargs)

    async def main() -> None:
        registry = ModelRegistry(repo, counting, warm_up=False)
        await registry.refresh()
        with repo.staging("m") as staged:
            onnx.save(seed_model(seed=2), str(staged / "model.onnx"))
            version, status = await registry.publish("m", staged, lambda: repo.publish("m", staged))
        assert version == 2 and status is not None and status.state is State.READY
        await registry.refresh()
        assert len(opened) == 2, opened  # version 1 at the refresh, the staged one once
        await registry.close()

    asyncio.run(main())


def test_a_version_asked_for_while_its_model_loads_is_not_ready_not_missing(
    repo: ModelRepository,
) -> None:
    """During a LoadModel right after an unload, requests got NOT_FOUND ("default_version 2 is
    not served"), which clients do not retry, for a version on its way."""
    write_model(repo, "m", seed_model(seed=1))

    async def main() -> None:
        registry = _registry(repo)
        await registry.refresh()
        entry = registry.models["m"]
        entry.changing = "loading"  # as _sync_model marks it while the folder is read
        with pytest.raises(ModelNotReady, match="is loading; retry shortly"):
            registry.get("m", 2)
        entry.changing = ""
        with pytest.raises(VersionNotFound):
            registry.get("m", 2)
        await registry.close()

    asyncio.run(main())


def test_a_load_is_answered_by_its_own_outcome_not_by_an_unload_queued_behind_it(
    repo: ModelRepository,
) -> None:
    """A LoadModel that loaded the model was answered FAILED_PRECONDITION 'it has no version
    folder the version policy selects' when an UnloadModel queued behind it ran before the
    answer was written: the load was judged on the state the unload left."""
    write_model(repo, "seed", seed_model())
    entered, gate = threading.Event(), threading.Event()

    def held(path: Path, config: Any) -> Any:
        entered.set()
        gate.wait(LOAD_GUARD_S)
        return open_session(path, config)

    async def main() -> None:
        registry = ModelRegistry(repo, held, warm_up=False)
        dataplane = DataPlane(registry)
        lock = registry._locks["seed"] = WatchedLock()
        load = asyncio.ensure_future(dataplane.load("seed"))
        await asyncio.to_thread(entered.wait, LOAD_GUARD_S)
        unload = asyncio.ensure_future(registry.unload_model("seed"))
        await lock.queued.wait()  # the unload waits on the model's lock, behind the load
        gate.set()
        outcome = await load
        assert outcome.loaded == ["seed/1"] and outcome.failed == []
        assert (await unload).unloaded == ["seed/1"]
        with pytest.raises(ModelNotFound):
            registry.get("seed")
        await registry.close()

    arun(main, LOAD_GUARD_S)


def test_a_model_folder_that_cannot_be_read_fails_that_model_only(
    repo: ModelRepository, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model folder the server's user cannot list (another user's, mode 0700) raised its
    PermissionError out of the refresh: Refresh answered INTERNAL, and at start no model was
    loaded at all. (The tests run as root, which reads anything: the listing is made to fail.)"""
    write_model(repo, "locked", seed_model())
    write_model(repo, "open", seed_model())
    listed = Path.iterdir
    locked: set[str] = set()

    def iterdir(self: Path) -> Any:
        if self.name in locked:
            raise PermissionError(13, "Permission denied", str(self))
        return listed(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)

    async def main() -> None:
        registry = _registry(repo)
        locked.add("locked")
        result = await registry.refresh()
        assert result.loaded == ["open/1"]
        assert result.failed == [
            "locked: the folder of model 'locked' cannot be read (Permission denied): give the "
            "server's user read and search permission on it, then refresh"
        ]
        with pytest.raises(ModelNotReady, match="cannot be read"):
            registry.get("locked")
        # The management calls that list its versions say so too (they answered INTERNAL).
        for call in (
            lambda: versions.describe(repo, registry, "locked"),
            lambda: versions.set_default_version(repo, registry, "locked", 1),
            lambda: versions.delete_version(repo, registry, "locked", 1),
        ):
            with pytest.raises(FailedPrecondition, match="'locked' cannot be read"):
                outcome = call()
                if asyncio.iscoroutine(outcome):
                    await outcome
        locked.clear()
        assert (await registry.refresh()).loaded == ["locked/1"]
        # Served, then unreadable (a stale mount): it keeps serving, and says why.
        locked.add("locked")
        assert len((await registry.refresh()).failed) == 1
        assert _states(registry) == {"locked/1": "READY", "open/1": "READY"}
        assert registry.statuses("locked")[0].reason.startswith("reload failed, still serving")
        locked.clear()  # readable again: nothing to reload, nothing left to say
        assert (await registry.refresh(retry_failed=False)).loaded == []
        assert registry.statuses("locked")[0].reason == ""
        await registry.close()

    arun(main, LOAD_GUARD_S)


class CountedLock(asyncio.Lock):
    """A model's edit lock that counts the edits that came to wait behind its holder."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting = 0
        self._queued = asyncio.Event()

    async def acquire(self) -> bool:
        if self.locked():
            self.waiting += 1
            self._queued.set()
        return await super().acquire()

    async def reach(self, count: int) -> None:
        """Until ``count`` edits have come to wait. Spinning the loop a bounded number of times
        (``until``) was not enough where an edit first looks at the folder on a thread: on a
        loaded machine that thread had not run after 1,000 spins, and the test failed."""
        while self.waiting < count:
            self._queued.clear()
            await self._queued.wait()


@pytest.mark.parametrize("via", ["load", "publish"])
def test_a_refresh_does_not_unload_a_model_loaded_again_while_it_waited(
    repo: ModelRepository, via: str
) -> None:
    """A refresh that listed the repository while an UnloadModel was draining the model queued
    its removal behind it; a LoadModel (or a conversion's publish) queued in between served the
    model again and answered OK, and the refresh's removal then unloaded it: nothing served a
    model the repository holds and nobody unloaded, until something loaded it again."""
    import onnx

    write_model(repo, "seed", seed_model())

    async def main() -> None:
        registry = _registry(repo)
        await registry.refresh()
        held = HeldFiles(expected=1)  # the unload's release of its session waits on it
        registry.pools.loading = held
        lock = registry._locks["seed"] = CountedLock()
        unload = asyncio.ensure_future(registry.unload_model("seed"))
        await held.all_submitted.wait()  # draining, the model's lock held
        with repo.staging("seed") as staged:
            onnx.save(seed_model(seed=2), str(staged / "model.onnx"))
            again: Any = (
                registry.load_model("seed")
                if via == "load"
                else registry.publish("seed", staged, lambda: repo.publish("seed", staged))
            )
            load = asyncio.ensure_future(again)
            await lock.reach(1)
            refresh = asyncio.ensure_future(registry.refresh())
            await lock.reach(2)  # its removal waits behind the load
            held.released.set()
            assert (await unload).unloaded == ["seed/1"]
            await load
            await refresh
        served = 1 if via == "load" else 2
        assert registry.get("seed").version == served
        assert _states(registry) == {f"seed/{served}": "READY"}
        await registry.close()
        held.shutdown()

    arun(main, LOAD_GUARD_S)


def test_a_version_deleted_on_a_disk_too_full_for_its_mark_is_not_served(
    repo: ModelRepository, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DeleteModelVersion that removed the version's files but could not write the mark of
    its number (the disk still full) answered RESOURCE_EXHAUSTED and left the deleted version
    served until the next refresh."""
    import errno

    from ferry.server.core import repository as repository_module
    from ferry.server.errors import LimitExceeded

    write_model(repo, "m", seed_model(seed=1))
    write_model(repo, "m", seed_model(seed=2), version=2)

    def full(path: Path, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    async def main() -> None:
        registry = _registry(repo)
        await registry.refresh()
        assert registry.get("m").version == 2
        monkeypatch.setattr(repository_module, "write_file_atomic", full)
        with pytest.raises(LimitExceeded, match="version 2 of 'm' was deleted"):
            await versions.delete_version(repo, registry, "m", 2)
        assert registry.get("m").version == 1
        assert _states(registry) == {"m/1": "READY"}
        await registry.close()

    arun(main, LOAD_GUARD_S)


@pytest.mark.parametrize(
    ("file", "text"),
    [
        ("config.json", "[" * 100_000),
        ("config.toml", "a = " + "[" * 100_000),
        ("1/config.json", '{"batching": ' * 100_000),
        ("config.json", "{" + " " * (1 << 20) + "}"),  # over the bound: not read whole
    ],
)
def test_a_config_nested_past_the_parser_or_too_big_fails_that_model_only(
    repo: ModelRepository, file: str, text: str
) -> None:
    """A hand-edited config nested thousands deep raised RecursionError out of the refresh:
    Refresh and LoadModel answered INTERNAL and, at start, no model was loaded at all."""
    write_model(repo, "odd", seed_model())
    write_model(repo, "fine", seed_model())
    (repo.root / "odd" / file).write_text(text)

    async def main() -> None:
        registry = _registry(repo)
        result = await registry.refresh()
        assert result.loaded == ["fine/1"]
        assert len(result.failed) == 1
        assert f"odd/{file} cannot be parsed: it is " in result.failed[0]
        await registry.close()

    arun(main, LOAD_GUARD_S)


def test_a_publish_that_fails_leaves_a_model_unloaded_on_request_unloaded(
    repo: ModelRepository,
) -> None:
    """A conversion whose model did not open (or whose rename failed) for a model unloaded on
    request took it off the unloaded list all the same: nothing was published, and the next
    refresh (or --poll-interval scan) served the model the operator had unloaded."""
    write_model(repo, "m", seed_model())

    async def main() -> None:
        registry = _registry(repo)
        await registry.refresh()
        await registry.unload_model("m")
        with repo.staging("m") as staged:
            (staged / "model.onnx").write_bytes(b"\x08\x01not a graph")
            with pytest.raises(Exception, match="INVALID_PROTOBUF"):  # onnxruntime's own
                await registry.publish("m", staged, lambda: repo.publish("m", staged))
        await registry.refresh()
        assert "m" not in registry.models
        assert registry.unloaded_by_request == ["m"]
        await registry.close()

    arun(main, LOAD_GUARD_S)


def test_a_model_file_that_is_no_regular_file_is_named_as_such(repo: ModelRepository) -> None:
    """A folder named model.onnx (an unpacked export), a FIFO or a dangling link failed the
    version as "model.onnx is missing", which a look at the folder contradicted."""
    for name in ("folder", "fifo", "dangling"):
        write_model(repo, name, seed_model())
        path = repo.model_file(name, 1)
        path.unlink()
        if name == "folder":
            path.mkdir()
        elif name == "fifo":
            os.mkfifo(path)
        else:
            path.symlink_to(path.parent / "gone.onnx")

    async def main() -> None:
        registry = _registry(repo)
        result = await registry.refresh()
        assert len(result.failed) == 3
        assert all("model.onnx is not a regular file" in f for f in result.failed), result.failed
        await registry.close()

    arun(main, LOAD_GUARD_S)


def test_a_version_not_served_says_why_not_always_the_policy(repo: ModelRepository) -> None:
    """GetModel said every version on disk that is not served was "not selected by the version
    policy": also those of a model unloaded on request (which the policy selects), and a
    version copied in since the last refresh."""
    write_model(repo, "m", seed_model(seed=1))
    write_model(repo, "m", seed_model(seed=2), version=2)

    async def reasons() -> dict[int, str]:
        view = await versions.describe(repo, registry, "m")
        return {v.version: v.reason for v in view.versions}

    registry = _registry(repo)

    async def main() -> None:
        not_yet = "not loaded yet: a refresh (or LoadModel) loads it"
        assert set((await reasons()).values()) == {not_yet}
        await registry.refresh()
        assert await reasons() == {1: "not selected by the version policy", 2: ""}
        write_model(repo, "m", seed_model(seed=3), version=3)  # by hand, no refresh yet
        assert (await reasons())[3] == not_yet
        await registry.unload_model("m")
        why = await reasons()
        assert all("unloaded on request" in reason for reason in why.values()), why
        await registry.close()

    arun(main, LOAD_GUARD_S)


def test_many_distinct_models_loaded_unloaded_and_removed_leave_nothing_behind(
    repo: ModelRepository,
) -> None:
    """The per-model locks and the names unloaded on request were kept for every name ever
    used: a client cycling through fresh model names (load, unload, the folder removed) grew
    the server's memory for good."""

    async def main() -> None:
        registry = _registry(repo)
        for i in range(8):
            name = f"m{i}"
            write_model(repo, name, seed_model())
            await registry.load_model(name)
            await versions.set_default_version(repo, registry, name, 1)
            await registry.unload_model(name)
            shutil.rmtree(repo.model_dir(name))
            await registry.refresh()
        assert registry._locks == {} and registry._lock_users == {}
        assert registry.unloaded_by_request == []
        write_model(repo, "m0", seed_model())  # made again: a new model, served
        await registry.refresh()
        assert _states(registry) == {"m0/1": "READY"}
        await registry.close()

    arun(main, LOAD_GUARD_S)


def test_a_refresh_reloads_external_weights_under_any_name(repo: ModelRepository) -> None:
    """Only model.onnx.data was watched of a version's external weights: a model saved with
    its weights in a file of another name (``onnx.save(..., location="weights.bin")``, a
    torch export's per-tensor files) whose weights alone were replaced was never reloaded,
    and the old weights kept answering. Every file of the version folder is watched; a hidden
    one (an rsync's temporary copy) is not, or each poll during a copy reloaded the version."""
    import onnx

    vdir = repo.model_dir("m") / "1"
    vdir.mkdir(parents=True)

    def save(folder: Path, seed: int) -> None:
        onnx.save_model(
            seed_model(seed),
            str(folder / "model.onnx"),
            save_as_external_data=True,
            location="weights.bin",
            size_threshold=0,
        )

    save(vdir, 0)
    x = {"input": np.ones((1, 3), np.float32)}

    async def answer(registry: ModelRegistry) -> Any:
        result = await DataPlane(registry).infer(InferenceRequest("m", x))
        return result.outputs["logits"]

    async def main() -> None:
        registry = _registry(repo)
        assert (await registry.refresh()).loaded == ["m/1"]
        before = await answer(registry)
        (vdir / ".weights.bin.tmp").write_bytes(b"an rsync copying")
        assert (await registry.refresh(retry_failed=False)).loaded == []
        other = repo.root.parent / "elsewhere"
        other.mkdir()
        save(other, 1)
        os.replace(other / "weights.bin", vdir / "weights.bin")  # the weights alone
        assert (await registry.refresh(retry_failed=False)).loaded == ["m/1"]
        assert not np.allclose(await answer(registry), before)
        await registry.close()

    arun(main, LOAD_GUARD_S)


def test_a_failed_reload_keeps_the_signature_of_the_files_served(repo: ModelRepository) -> None:
    """A reload that failed recorded the new files' signature as the served one: a shadow
    comparison (keyed on it) threw its figures away though the same files still served. The
    served signature stays; the failed files are still not tried again at every poll."""
    write_model(repo, "seed", seed_model())

    async def main() -> None:
        registry = _registry(repo)
        await registry.refresh()
        served = registry.get("seed")
        before = registry.models["seed"].versions[1].signature
        model = repo.version_dir("seed", 1) / "model.onnx"
        model.write_bytes(b"not an onnx model")
        os.utime(model, ns=(1, 1))  # a rewrite within the same mtime tick still counts
        assert len((await registry.refresh(retry_failed=False)).failed) == 1
        slot = registry.models["seed"].versions[1]
        assert registry.get("seed") is served and slot.signature == before
        assert (await registry.refresh(retry_failed=False)).failed == []  # not tried again
        (row,) = registry.failed_loads()  # workers are told the files that failed
        assert row[3] != json.loads(json.dumps(before))
        await registry.close()

    arun(main, LOAD_GUARD_S)


def _save_external(folder: Path, seed: int, location: str) -> None:
    """``seed_model(seed)`` saved in ``folder`` with its weights at ``location``."""
    import onnx

    (folder / location).parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(
        seed_model(seed),
        str(folder / "model.onnx"),
        save_as_external_data=True,
        location=location,
        size_threshold=0,
    )


def _replace_keeping_stat(new: Path, old: Path) -> None:
    """Rename ``new`` over ``old`` with the old file's mtime (``rsync -t``), sizes equal."""
    st = old.stat()
    assert new.stat().st_size == st.st_size
    os.utime(new, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(new, old)


async def _logits(registry: ModelRegistry, model: str) -> Any:
    x = {"input": np.ones((1, 3), np.float32)}
    return (await DataPlane(registry).infer(InferenceRequest(model, x))).outputs["logits"]


def test_weights_in_a_subfolder_or_behind_a_link_are_watched(repo: ModelRepository) -> None:
    """Only the version folder's own files were watched: weights saved in a subfolder
    (``location="weights/w.bin"``) and replaced there (same size and mtime) were never
    reloaded by a refresh or a poll, and the old weights kept answering. So were weights
    reached through a link whose target was replaced (a Kubernetes volume's ``..data``)."""
    vdir = repo.model_dir("m") / "1"
    _save_external(vdir, 0, "weights/w.bin")
    other = repo.root.parent / "elsewhere"
    # A link inside the folder to a hidden blob: hidden entries are not walked (an rsync's
    # temporary copy), so only the link, followed, sees the blob replaced.
    ldir = repo.model_dir("linked") / "1"
    _save_external(ldir, 0, "weights/w.bin")
    (ldir / ".blobs").mkdir()
    os.replace(ldir / "weights" / "w.bin", ldir / ".blobs" / "w0")
    (ldir / "weights" / "w.bin").symlink_to("../.blobs/w0")

    async def main() -> None:
        registry = _registry(repo)
        assert sorted((await registry.refresh()).loaded) == ["linked/1", "m/1"]
        before = await _logits(registry, "m")
        (vdir / "weights" / ".w.bin.tmp").write_bytes(b"an rsync copying")
        assert (await registry.refresh(retry_failed=False)).loaded == []
        _save_external(other, 1, "weights/w.bin")
        _replace_keeping_stat(other / "weights" / "w.bin", vdir / "weights" / "w.bin")
        assert (await registry.refresh(retry_failed=False)).loaded == ["m/1"]
        assert not np.allclose(await _logits(registry, "m"), before)

        linked = await _logits(registry, "linked")
        _save_external(other, 1, "weights/w.bin")
        _replace_keeping_stat(other / "weights" / "w.bin", ldir / ".blobs" / "w0")
        assert (await registry.refresh(retry_failed=False)).loaded == ["linked/1"]
        assert not np.allclose(await _logits(registry, "linked"), linked)
        await registry.close()

    arun(main, LOAD_GUARD_S)


def _write_in_place(path: Path, data: bytes) -> None:
    """Overwrite ``path``'s bytes in its own inode, its mtime a second on (one tick or less
    since it was written must still count as a change)."""
    with open(path, "r+b") as fh:
        fh.write(data)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def test_a_hard_linked_data_file_is_a_file_of_the_folder(repo: ModelRepository) -> None:
    """The rule for hard links, made explicit: a version's ``model.onnx.data`` hard-linked to a
    file outside the repository is served (onnxruntime cannot tell a hard link from the file,
    and neither can anyone: it is a name in the folder, of an inode with another name too).
    The repository is the operator's (SECURITY.md), the kernel lets only who may read a file
    link it (fs.protected_hardlinks), and such links are how rsync --link-dest and ``cp -al``
    releases share weights. What is served is that inode: written through the other name, the
    version reloads; the other name replaced by another file, the version keeps its own."""
    vdir = repo.model_dir("m") / "1"
    _save_external(vdir, 0, "model.onnx.data")
    outside = repo.root.parent / "elsewhere"
    _save_external(outside, 1, "model.onnx.data")
    shared = outside / "w.bin"
    os.replace(vdir / "model.onnx.data", shared)
    os.link(shared, vdir / "model.onnx.data")
    other = (outside / "model.onnx.data").read_bytes()

    async def main() -> None:
        registry = _registry(repo)
        assert (await registry.refresh()).loaded == ["m/1"]
        first = await _logits(registry, "m")
        _write_in_place(shared, other)  # through the name outside
        assert (await registry.refresh(retry_failed=False)).loaded == ["m/1"]
        second = await _logits(registry, "m")
        assert not np.allclose(second, first)
        os.replace(outside / "model.onnx.data", shared)  # a new file under the name outside
        # The inode lost a name, which changes its ctime: one reload (as a chmod's), of the
        # same bytes, and none after it.
        await registry.refresh(retry_failed=False)
        assert (await registry.refresh(retry_failed=False)).loaded == []
        assert np.allclose(await _logits(registry, "m"), second)
        await registry.close()

    arun(main, LOAD_GUARD_S)


# A served version whose data file is rewritten in place, in a process of its own: the crash
# (SIGBUS) this guards against would end the test run.
REWRITTEN_IN_PLACE = """
import sys
import numpy as np
from pathlib import Path
from ferry.server.core.config import OnnxRuntimeConfig
from ferry.server.runtime.session import OrtSession
folder = Path(sys.argv[1])
session = OrtSession(folder / "model.onnx", OnnxRuntimeConfig())
x = {"input": np.ones((1, 3), np.float32)}
before = session.session.run(None, x)[0]
data = folder / "model.onnx.data"
new = data.with_name("new.data").read_bytes()
with open(data, "r+b") as fh:  # as cp does: cut to nothing, then written
    fh.truncate(0)
    after_cut = session.session.run(None, x)[0]
    fh.write(new)
after = session.session.run(None, x)[0]
assert np.array_equal(before, after_cut) and np.array_equal(before, after)
print("served its own copy")
"""


def test_a_data_file_rewritten_in_place_does_not_crash_the_server(tmp_path: Path) -> None:
    """onnxruntime mapped ``model.onnx.data`` and served its pages: a data file rewritten in
    place while its version served (``cp`` truncates first) made the next inference read past
    the file's end, SIGBUS, and the server died with every model it served. The version now
    answers from the bytes it read at load until the change reloads it."""
    folder = tmp_path / "m" / "1"
    _save_external(folder, 0, "model.onnx.data")
    _save_external(tmp_path / "other", 1, "model.onnx.data")
    os.replace(tmp_path / "other" / "model.onnx.data", folder / "new.data")
    proc = subprocess.run(
        [sys.executable, "-c", REWRITTEN_IN_PLACE, str(folder)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert (proc.returncode, proc.stdout.strip()) == (0, "served its own copy"), proc.stderr


# Two sessions of a version whose weights are an embedding table in a data file, in a process
# of its own (a crash would end the run; its memory is its own to measure).
MAPPED_FROM_A_COPY = """
import resource, sys
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from pathlib import Path
from ferry.server.core.config import OnnxRuntimeConfig
from ferry.server.runtime import shared_weights
from ferry.server.runtime.session import OrtSession
folder, state = Path(sys.argv[1]), Path(sys.argv[2])
def save(seed):
    table = np.random.default_rng(seed).standard_normal((8192, 1024), dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["rows"])], "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"])],
        [helper.make_tensor_value_info("rows", TensorProto.FLOAT, ["n", 1024])],
        [numpy_helper.from_array(table, "table")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save_model(model, str(folder / "model.onnx"), save_as_external_data=True,
                    location="model.onnx.data", size_threshold=0)
    return table
folder.mkdir(parents=True)
old = save(0)
shared_weights.set_cache_dir(state)
x = {"ids": np.array([0, 8191], np.int64)}
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
before = rss()
sessions = [OrtSession(folder / "model.onnx", OnnxRuntimeConfig(intra_op_threads=1)) for _ in range(2)]
grown = rss() - before
data = folder / "model.onnx.data"
new_bytes = data.read_bytes()
with open(data, "r+b") as fh:  # as cp does: cut to nothing, then written
    fh.truncate(0)
    cut = sessions[0].session.run(None, x)[0]
    fh.write(new_bytes[::-1])
after = sessions[1].session.run(None, x)[0]
reloaded = OrtSession(folder / "model.onnx", OnnxRuntimeConfig(intra_op_threads=1))
print(grown < 32 * 2**20, np.array_equal(cut, old[[0, 8191]]), np.array_equal(after, old[[0, 8191]]),
      not np.array_equal(reloaded.session.run(None, x)[0], old[[0, 8191]]), grown // 2**20)
"""


def test_a_data_file_is_mapped_from_a_copy_the_sessions_share(tmp_path: Path) -> None:
    """Read into memory (so that a ``cp`` over it could not crash the server), a data file
    cost each session its own copy of the weights: each worker's, each planned size's, three
    times the file at the load's peak (an embedding table of 256 MiB, three workers: 873 MiB
    PSS, 96 MiB mapped). Mapped from Ferry's own copy in the weights cache, never rewritten,
    two sessions of a 32 MiB table hold none of it but the rows they read, a rewrite in place
    changes nothing they answer, and the reload it triggers maps a copy of the new file."""
    proc = subprocess.run(
        [sys.executable, "-c", MAPPED_FROM_A_COPY, str(tmp_path / "m" / "1"), str(tmp_path / "s")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[:4] == ["True", "True", "True", "True"], proc.stdout


def test_a_version_folder_linked_from_outside_is_served_and_followed(
    repo: ModelRepository,
) -> None:
    """A version folder that is a link (a volume mounted elsewhere, Triton follows links too)
    is served from its target: weights replaced there, or the link pointed at another folder,
    reload it. A link back up the tree is walked once."""
    store = repo.root.parent / "store"
    _save_external(store / "a", 0, "weights/w.bin")
    _save_external(store / "b", 2, "weights/w.bin")
    (store / "a" / "weights" / "loop").symlink_to("..")
    repo.model_dir("m").mkdir(parents=True)
    link = repo.model_dir("m") / "1"
    link.symlink_to(store / "a")

    async def main() -> None:
        registry = _registry(repo)
        assert (await registry.refresh()).loaded == ["m/1"]
        first = await _logits(registry, "m")
        _save_external(repo.root.parent / "new", 1, "weights/w.bin")
        new = repo.root.parent / "new" / "weights" / "w.bin"
        _replace_keeping_stat(new, store / "a" / "weights" / "w.bin")
        assert (await registry.refresh(retry_failed=False)).loaded == ["m/1"]
        second = await _logits(registry, "m")
        assert not np.allclose(second, first)
        swapped = repo.model_dir("m") / ".1.new"
        swapped.symlink_to(store / "b")
        os.replace(swapped, link)  # ln -sfn
        assert (await registry.refresh(retry_failed=False)).loaded == ["m/1"]
        assert not np.allclose(await _logits(registry, "m"), second)
        await registry.close()

    arun(main, LOAD_GUARD_S)


def test_the_watched_tree_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A poll of a version folder with a huge tree stats a bounded number of entries."""
    from ferry.server.core import watched

    monkeypatch.setattr(watched, "MAX_WATCHED", 3)
    for i in range(5):
        (tmp_path / "sub").mkdir(exist_ok=True)
        (tmp_path / "sub" / f"f{i}").write_bytes(b"x")
    signature = watched.tree_signature(tmp_path)
    assert signature is not None and signature[0] == 3
    assert watched.tree_signature(tmp_path / "missing") is None


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="no /proc on this system")
def test_a_link_to_proc_in_a_version_folder_reloads_nothing_by_itself(
    repo: ModelRepository,
) -> None:
    """A link to /proc under a version folder was walked like weights: its entries (processes,
    their files) come and go on their own, so every refresh and every poll reloaded the version
    though nothing it serves changed."""
    vdir = repo.model_dir("m") / "1"
    write_model(repo, "m", seed_model(0))
    (vdir / "proc").symlink_to("/proc")

    async def main() -> None:
        registry = _registry(repo)
        assert (await registry.refresh()).loaded == ["m/1"]
        for _ in range(3):
            assert (await registry.refresh(retry_failed=False)).loaded == []
        await registry.close()

    arun(main, LOAD_GUARD_S)
