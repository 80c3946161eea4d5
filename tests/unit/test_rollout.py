"""A model's rollout (issue 14, first part): a weighted, sticky split of live traffic between
versions, kept with the repository so that it survives a restart and every process applies it."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import threading
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from asyncutil import WatchedLock
from onnx import TensorProto, helper, numpy_helper

from ferry.server.core import rollout as rollouts
from ferry.server.core.dataplane import DataPlane, InferenceRequest
from ferry.server.core.registry import ModelRegistry
from ferry.server.core.repository import ModelRepository
from ferry.server.core.shadow import Shadows, ShadowStatistics, comparison_key
from ferry.server.core.types import RepositoryOutcome, State
from ferry.server.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    FerryError,
    InvalidArgument,
    InvalidInput,
    QueueFull,
    Unavailable,
    VersionNotFound,
)
from ferry.server.examples import seed_model, write_model
from ferry.server.runtime.session import open_session

KEYS = [f"request-{i}" for i in range(10_000)]


def _failing_model() -> onnx.ModelProto:
    """seed_model's interface (input [batch, 3] -> logits [batch, 1]) whose run fails unless
    the batch holds a multiple of 4 rows (a Reshape to [-1, 12]): a version a split or a shadow
    may name that fails these tests' requests at run time."""
    shape = numpy_helper.from_array(np.array([-1, 12], np.int64), "shape")
    graph = helper.make_graph(
        [
            helper.make_node("Reshape", ["input", "shape"], ["r"]),
            helper.make_node("ReduceSum", ["r"], ["logits"], keepdims=1, axes=[1]),
        ],
        "fails",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 1])],
        [shape],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)], ir_version=8)


def test_the_split_follows_the_weights_and_a_key_always_gets_the_same_version() -> None:
    split = rollouts.parse_split({1: 9, 2: 1})
    picks = Counter(split.pick("m", k) for k in KEYS)
    assert abs(picks[2] / len(KEYS) - 0.1) < 0.02, picks
    assert all(split.pick("m", k) == split.pick("m", k) for k in KEYS[:500])
    # Giving the last version more weight only moves keys towards it: none leaves it.
    wider = rollouts.parse_split({1: 1, 2: 1})
    assert all(wider.pick("m", k) == 2 for k in KEYS if split.pick("m", k) == 2)


@pytest.mark.parametrize("scale", [1e-320, 1e-300, 1.0, 1e8])
def test_the_shares_are_the_weights_whatever_their_scale(scale: float) -> None:
    """Weights too small for ``-ln(point) / weight`` to stay finite (two of 1e-320) made
    every score inf, and every request went to the first version instead of half of them."""
    split = rollouts.parse_split({1: scale, 2: scale, 3: 2 * scale})
    for picks in (
        Counter(split.pick("m", k) for k in KEYS),
        Counter(split.pick("m", "") for _ in KEYS),  # no id: a weighted draw
    ):
        for version, share in ((1, 0.25), (2, 0.25), (3, 0.5)):
            assert abs(picks[version] / len(KEYS) - share) < 0.03, picks


@pytest.mark.parametrize(
    ("before", "after", "changed"),
    [
        ({1: 8, 2: 1, 3: 1}, {1: 8, 2: 1, 3: 3}, 3),  # the last of three grows
        ({1: 8, 2: 1, 3: 1}, {1: 8, 2: 3, 3: 1}, 2),  # one in the middle grows
        ({1: 1, 2: 1, 3: 8}, {1: 4, 2: 1, 3: 8}, 1),  # the first grows
        ({1: 8, 2: 1, 3: 1}, {1: 5, 2: 1, 3: 1}, 1),  # the first shrinks
    ],
)
def test_changing_one_versions_weight_moves_keys_only_to_or_from_it(
    before: dict[int, float], after: dict[int, float], changed: int
) -> None:
    """Cumulative intervals kept that promise only for the last of two versions: growing 3 in
    {1: 8, 2: 1, 3: 1} shifted the interval of 2, whose weight had not changed, so keys of 2
    moved to 1 and 3, and sticky clients flipped between versions nobody had touched."""
    old, new = rollouts.parse_split(before), rollouts.parse_split(after)
    moves = Counter((old.pick("m", k), new.pick("m", k)) for k in KEYS)
    assert all(changed in (was, to) for (was, to) in moves if was != to), moves
    total = sum(after.values())
    shares = Counter(new.pick("m", k) for k in KEYS)
    for version, weight in after.items():
        assert abs(shares[version] / len(KEYS) - weight / total) < 0.02, shares


@pytest.mark.parametrize(
    "bad",
    [
        {},
        {"x": 1},
        {0: 1},
        {1: 0},
        {1: -1},
        {1: "1"},
        {1: True},
        {1: float("inf")},
        {1: float("nan")},
        {2**60: 1},
        {float("inf"): 1},
        # Weights summing to inf sent every request to the last version.
        {1: 1e308, 2: 1e308},
    ],
)
def test_a_split_that_means_nothing_is_refused(bad: dict[object, object]) -> None:
    with pytest.raises(InvalidArgument):
        rollouts.parse_split(bad)


@pytest.mark.parametrize("key", ["01", "1_0", "\u0663", " 1", "+1", "1.0", "9" * 5000])
def test_a_hand_edited_version_is_read_by_the_repositorys_rule(key: str, tmp_path: Path) -> None:
    """The repository serves no folder '01', '1_0' or '\u0663' (an Arabic-Indic 3), but a
    rollout.json naming them routed to versions 1, 10 and 3 (int() reads them all): the file is
    now unusable, and says why, as any other that names no version."""
    mdir = tmp_path / "m"
    mdir.mkdir()
    (mdir / rollouts.ROLLOUT_FILE).write_text(json.dumps({"split": {key: 1}}))
    rollout, error = rollouts.read(mdir)
    assert rollout is None and ("not a version number" in error or "out of range" in error)
    (mdir / rollouts.ROLLOUT_FILE).write_text(
        json.dumps({"split": {"1": 1}, "shadow": {"version": key, "fraction": 0.5}})
    )
    rollout, error = rollouts.read(mdir)
    assert rollout is None and ("shadow needs a version" in error or "out of range" in error)
    (mdir / rollouts.ROLLOUT_FILE).write_text(
        json.dumps({"split": {"1": 1}, "shadow": {"version": 2.7, "fraction": 0.5}})
    )
    assert rollouts.read(mdir)[0] is None  # not version 2


@pytest.mark.parametrize(
    "rules",
    [
        {"promote_after": float("inf")},
        {"promote_after": float("nan")},
        {"min_cosine": float("nan")},
        {"max_latency_ratio": float("inf")},
    ],
)
def test_rules_that_are_not_finite_numbers_are_refused(rules: dict[str, float]) -> None:
    with pytest.raises(InvalidArgument):
        rollouts.parse_rules(rules)


def test_a_shadow_version_that_is_not_finite_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="shadow needs a version"):
        rollouts.parse_shadow(float("inf"), 0.1)


def test_every_version_the_repository_serves_can_be_rolled_out(tmp_path: Path) -> None:
    """Versions are 1..2**53 in the repository and every RPC: a folder named 2**53 was served,
    and a split or shadow naming it refused as 'out of range (1..2^53)'."""
    top = 2**53
    assert rollouts.parse_split({1: 1, top: 1}).split == ((1, 1.0), (top, 1.0))
    assert rollouts.parse_shadow(top, 0.5) == (top, 0.5)
    with pytest.raises(InvalidArgument, match=f"out of range \\(1..{top}\\)"):
        rollouts.parse_split({top + 1: 1})
    with pytest.raises(InvalidArgument, match=f"out of range \\(1..{top}\\)"):
        rollouts.parse_shadow(top + 1, 0.5)
    repo = ModelRepository(tmp_path / "repo", create=True)
    write_model(repo, "m", seed_model(seed=1))
    write_model(repo, "m", seed_model(seed=2), version=top)
    rollouts.write(repo.model_dir("m"), rollouts.parse_split({1: 1, top: 1}), by="t", why="")
    assert rollouts.read(repo.model_dir("m")) == (rollouts.parse_split({1: 1, top: 1}), "")


def _repo(tmp_path: Path) -> ModelRepository:
    repo = ModelRepository(tmp_path / "repo", create=True)
    write_model(repo, "m", seed_model(seed=1))
    write_model(repo, "m", seed_model(seed=2), version=2)  # the default policy serves only 2
    return repo


async def _serving(repo: ModelRepository) -> tuple[ModelRegistry, DataPlane]:
    """The repository's models loaded, and the core over them."""
    registry = ModelRegistry(repo, open_session, warm_up=False)
    await registry.refresh()
    return registry, DataPlane(registry)


# A test's scenario: what it does with the repository's models loaded, and the core over them.
Scenario = Callable[[ModelRegistry, DataPlane], Awaitable[None]]


def _run(repo: ModelRepository, scenario: Scenario) -> None:
    """Run ``scenario`` in a loop of its own over ``_serving(repo)``; the registry is closed
    after it, whether it passed or not."""

    async def main() -> None:
        registry, dataplane = await _serving(repo)
        try:
            await scenario(registry, dataplane)
        finally:
            await registry.close()

    asyncio.run(main())


async def _version(dataplane: DataPlane, key: str, version: int | None = None) -> int:
    x = {"input": np.ones((1, 3), np.float32)}
    result = await dataplane.infer(InferenceRequest("m", x, version=version, id=key))
    return result.version


def test_a_split_is_served_recorded_and_survives_a_restart(tmp_path: Path) -> None:
    repo = _repo(tmp_path)

    async def scenario() -> None:
        registry, dataplane = await _serving(repo)
        assert [s.version for s in registry.statuses("m")] == [2]
        view = await dataplane.set_rollout("m", {1: 1, 2: 1}, by="test", why="canary")
        assert view.split == ((1, 1.0), (2, 1.0))
        assert {s.version: s.state for s in registry.statuses("m")} == {
            1: State.READY,
            2: State.READY,
        }
        split = rollouts.parse_split({1: 1, 2: 1})
        for key in KEYS[:200]:
            assert await _version(dataplane, key) == split.pick("m", key)
        assert {await _version(dataplane, k, version=1) for k in KEYS[:20]} == {1}  # bypass
        await registry.close()

        restarted = ModelRegistry(repo, open_session, warm_up=False)
        again = DataPlane(restarted)
        await restarted.refresh()
        assert [await _version(again, k) for k in KEYS[:200]] == [
            split.pick("m", k) for k in KEYS[:200]
        ]
        ended = await again.set_rollout("m", None, by="test", why="done")
        assert ended.split == ()
        assert [s.version for s in restarted.statuses("m")] == [2]
        assert [(h["by"], h["why"]) for h in ended.history] == [
            ("test", "canary"),
            ("test", "done"),
        ]
        await restarted.close()

    asyncio.run(scenario())


def test_a_split_naming_a_missing_version_is_refused_and_nothing_is_written(
    tmp_path: Path,
) -> None:
    repo = _repo(tmp_path)

    async def scenario(registry: ModelRegistry, dataplane: DataPlane) -> None:
        with pytest.raises(VersionNotFound, match=r"no version \[7\]"):
            await dataplane.set_rollout("m", {2: 1, 7: 1}, by="test", why="")
        assert not (repo.model_dir("m") / rollouts.ROLLOUT_FILE).exists()

    _run(repo, scenario)


def test_a_broken_rollout_file_serves_the_default_and_says_why(tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    (repo.model_dir("m") / rollouts.ROLLOUT_FILE).write_text(json.dumps({"split": {"1": -3}}))

    async def scenario(registry: ModelRegistry, dataplane: DataPlane) -> None:
        assert await _version(dataplane, "any") == 2
        assert "must be within (0, 1e+09]" in dataplane.rollout("m").error

    _run(repo, scenario)


def test_a_broken_edit_over_a_live_split_keeps_the_split_and_says_why(tmp_path: Path) -> None:
    """A live split 1=9 2=1 (version 2 the canary, the newest), then rollout.json edited by
    hand with a typo (or caught half copied): every request went to the default version, the
    canary the operator gave 10% (40 of 40). The split served before goes on, as one that
    names versions that differ does, and GetRollout says why; a usable file is served again."""
    repo = _repo(tmp_path)
    rollout_file = repo.model_dir("m") / rollouts.ROLLOUT_FILE

    async def scenario(registry: ModelRegistry, dataplane: DataPlane) -> None:
        await dataplane.set_rollout("m", {1: 9, 2: 1}, by="t", why="canary")
        split = rollouts.parse_split({1: 9, 2: 1})
        expected = [split.pick("m", k) for k in KEYS[:40]]
        rollout_file.write_text('{"split": {"1": 9, "2": 1}')  # the closing brace missing
        await registry.refresh(retry_failed=False)
        view = dataplane.rollout("m")
        assert view.split == split.split
        assert view.error.startswith("rollout.json as edited is not served: ")
        assert "not valid JSON" in view.error
        assert [await _version(dataplane, k) for k in KEYS[:40]] == expected
        assert [s.version for s in registry.statuses("m")] == [1, 2]  # 1 stays loaded
        rollout_file.write_text(json.dumps({"split": {"2": 1}}))
        await registry.refresh(retry_failed=False)
        assert dataplane.rollout("m").split == ((2, 1.0),) and not dataplane.rollout("m").error
        rollout_file.unlink()  # no file: no rollout, as ever
        await registry.refresh(retry_failed=False)
        assert dataplane.rollout("m").split == () and not dataplane.rollout("m").error

    _run(repo, scenario)


def test_a_rollout_file_nested_past_the_parser_serves_the_default_and_says_why(
    tmp_path: Path,
) -> None:
    """Nested thousands deep (a hand edit), it raised RecursionError out of the refresh:
    Refresh, LoadModel and the version edits answered INTERNAL, and at start no model loaded."""
    repo = _repo(tmp_path)
    (repo.model_dir("m") / rollouts.ROLLOUT_FILE).write_text('{"split": ' * 100_000)

    async def scenario(registry: ModelRegistry, dataplane: DataPlane) -> None:
        assert await _version(dataplane, "any") == 2
        assert "nested deeper than the JSON parser allows" in dataplane.rollout("m").error
        assert rollouts.history(repo.model_dir("m")) == []

    _run(repo, scenario)


def test_a_rollout_file_that_is_no_regular_file_is_refused_without_reading_it(
    tmp_path: Path,
) -> None:
    """A FIFO named rollout.json held the refresh (and with it every management call) until a
    writer came; a link to /dev/zero (or a huge file) was read whole before being cut to the
    bound. The FIFO is opened for writing now and then here, so the test ends either way."""
    import os
    import threading

    repo = _repo(tmp_path)
    path = repo.model_dir("m") / rollouts.ROLLOUT_FILE

    done = threading.Event()

    def unblock() -> None:  # a writer now and then, which a reader stuck in open() sees end
        while not done.wait(2.0):
            with contextlib.suppress(OSError):
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))

    async def scenario(registry: ModelRegistry, dataplane: DataPlane) -> None:
        os.mkfifo(path)
        valve = threading.Thread(target=unblock, daemon=True)
        valve.start()
        try:
            await registry.refresh()
            assert "not a regular file" in dataplane.rollout("m").error
            assert await _version(dataplane, "any") == 2  # the default serves
            with pytest.raises(FailedPrecondition, match=r"cannot be read .*regular file"):
                await dataplane.set_rollout("m", {1: 1.0}, by="test", why="")
        finally:
            done.set()
        path.unlink()
        path.symlink_to("/dev/zero")
        await registry.refresh()
        assert "not a regular file" in dataplane.rollout("m").error

    _run(repo, scenario)


def _served_outputs(version_seed: int, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    model = seed_model(seed=version_seed)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


def test_shadow_compares_the_candidate_and_never_changes_the_callers_answer(
    tmp_path: Path,
) -> None:
    repo = _repo(tmp_path)
    x = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)

    async def scenario(registry: ModelRegistry, dataplane: DataPlane) -> None:
        await dataplane.set_rollout("m", None, by="test", why="shadow", shadow_of=(1, 1.0))
        for i in range(10):
            result = await dataplane.infer(InferenceRequest("m", {"input": x}, id=f"r{i}"))
            assert result.version == 2  # the default serves; the candidate only shadows
            np.testing.assert_allclose(result.outputs["logits"], _served_outputs(2, x), rtol=1e-6)
            await asyncio.gather(*dataplane._shadows._tasks)  # one at a time: none is shed
        stats = dataplane.rollout("m").shadow_statistics
        assert (stats.compared, stats.errors, stats.shed) == (10, 0, 0)
        expected = float(np.max(np.abs(_served_outputs(1, x) - _served_outputs(2, x))))
        assert stats.max_abs_diff == pytest.approx(expected, rel=1e-5)
        assert stats.mean_cosine < 1.0
        await dataplane.close_shadows()

    _run(repo, scenario)


def test_a_failing_or_busy_candidate_is_counted_never_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = _repo(tmp_path)
    write_model(repo, "m", _failing_model(), version=3)  # fails these requests

    async def scenario(registry: ModelRegistry, dataplane: DataPlane) -> None:
        await dataplane.set_rollout("m", {2: 1}, by="test", why="", shadow_of=(3, 1.0))
        x = {"input": np.ones((1, 3), np.float32)}
        for i in range(5):
            assert (await dataplane.infer(InferenceRequest("m", x, id=str(i)))).version == 2
            await asyncio.gather(*dataplane._shadows._tasks)  # the candidate's run failed
        assert dataplane.rollout("m").shadow_statistics.errors == 5
        from ferry.server.core import shadow

        monkeypatch.setattr(shadow, "MAX_IN_FLIGHT", 0)  # as if the candidate were saturated
        await dataplane.set_rollout("m", {2: 1}, by="test", why="", shadow_of=(1, 1.0))
        for i in range(5):
            assert (await dataplane.infer(InferenceRequest("m", x, id=str(i)))).version == 2
        assert dataplane.rollout("m").shadow_statistics.shed == 5
        await dataplane.close_shadows()

    _run(repo, scenario)


async def _shadowed(dataplane: DataPlane, n: int) -> None:
    x = {"input": np.random.default_rng(1).standard_normal((2, 3)).astype(np.float32)}
    for i in range(n):
        await dataplane.infer(InferenceRequest("m", x, id=f"r{i}"))
        await asyncio.gather(*dataplane._shadows._tasks)  # each outcome seen before the next
    await asyncio.gather(*dataplane._decisions)


async def _route_until_the_rule_acts(dataplane: DataPlane) -> int:
    """200 requests over the split, each one's shadow and the rule's decision awaited; how
    many of them failed."""
    x = {"input": np.ones((1, 3), np.float32)}
    failed = 0
    for key in KEYS[:200]:
        try:
            await dataplane.infer(InferenceRequest("m", x, id=key))
        except FerryError:
            failed += 1
        await asyncio.gather(*dataplane._shadows._tasks)
        await asyncio.gather(*dataplane._decisions)
    return failed


def test_rules_roll_back_a_divergent_candidate_and_promote_a_good_one(tmp_path: Path) -> None:
    repo = _repo(tmp_path)  # v1 and v2 differ in weights
    write_model(repo, "m", seed_model(seed=2), version=3)  # v3 computes what v2 does

    async def scenario(registry: ModelRegistry, dataplane: DataPlane) -> None:
        rules = {"promote_after": 5, "min_cosine": 0.9999}
        await dataplane.set_rollout("m", {2: 1}, by="t", why="", shadow_of=(1, 1.0), rules=rules)
        await _shadowed(dataplane, 3)
        view = dataplane.rollout("m")
        assert view.shadow is None and view.split == ((2, 1.0),)  # v1 rolled back at once
        assert view.history[-1]["by"] == "rollout rules"
        assert view.history[-1]["why"].startswith("rolled back by rule")

        await dataplane.set_rollout("m", {2: 1}, by="t", why="", shadow_of=(3, 1.0), rules=rules)
        await _shadowed(dataplane, 4)
        assert dataplane.rollout("m").shadow == (3, 1.0)  # 4 of 5: not yet
        await _shadowed(dataplane, 1)
        view = dataplane.rollout("m")
        # Promoted: v3 is the newest, which requests that name none get, so the split ends
        # (a pin left behind kept every later version off traffic).
        assert view.split == () and view.shadow is None
        assert view.history[-1]["why"].startswith("promoted by rule")
        x = {"input": np.ones((1, 3), np.float32)}
        assert (await dataplane.infer(InferenceRequest("m", x, id="after"))).version == 3
        await dataplane.close_shadows()

    _run(repo, scenario)


def test_rules_need_a_shadow(tmp_path: Path) -> None:
    repo = _repo(tmp_path)

    async def scenario(registry: ModelRegistry, dataplane: DataPlane) -> None:
        with pytest.raises(InvalidArgument, match="act on a shadow"):
            await dataplane.set_rollout("m", {2: 1}, by="t", why="", rules={"promote_after": 3})
        # An empty rules message (every rule 0, as a client that always sends one does) asks
        # for no rule: ending the rollout with it was refused as if it named promote_after.
        await dataplane.set_rollout("m", {1: 1, 2: 1}, by="t", why="")
        none = {"promote_after": 0, "min_cosine": 0.0, "max_error_rate": 0.0}
        view = await dataplane.set_rollout("m", None, by="t", why="end", rules=none)
        assert view.split == () and view.rules == {}

    _run(repo, scenario)


def test_a_failing_version_in_a_split_is_rolled_out_of_it(tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    write_model(repo, "m", _failing_model(), version=3)  # fails these requests

    async def scenario(registry: ModelRegistry, dataplane: DataPlane) -> None:
        await dataplane.set_rollout(
            "m", {2: 1, 3: 1}, by="t", why="", rules={"max_error_rate": 0.2}
        )
        failed = await _route_until_the_rule_acts(dataplane)
        view = dataplane.rollout("m")
        assert view.split == ((2, 1.0),) and failed == 10  # out after its 10th failure
        assert view.history[-1]["why"].startswith("rolled back by rule: version 3 failed 10")

    _run(repo, scenario)


def test_a_failing_rollout_step_never_changes_the_callers_outcome(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The model can go between the answer and the shadow step (an unload): the caller still
    gets its answer, and a failed request keeps its own error."""
    repo = _repo(tmp_path)

    async def scenario(registry: ModelRegistry, dataplane: DataPlane) -> None:

        def gone(name: str) -> None:
            raise RuntimeError("unloaded meanwhile")

        monkeypatch.setattr(registry, "rollout_of", gone)
        x = {"input": np.ones((1, 3), np.float32)}
        assert (await dataplane.infer(InferenceRequest("m", x, id="a"))).version == 2
        with pytest.raises(FerryError, match="shape"):
            await dataplane.infer(InferenceRequest("m", {"input": np.ones((1, 4), np.float32)}))

    _run(repo, scenario)


def test_a_shadow_candidate_that_fails_to_publish_leaves_no_pin(tmp_path: Path) -> None:
    """A conversion with rollout = "shadow" pins the serving version before it publishes; a
    candidate that did not load left that pin, and every later version (published without a
    shadow) then never took traffic."""
    from ferry.server.convert.publish import publish
    from ferry.server.errors import ConversionFailed

    repo = _repo(tmp_path)

    async def scenario(registry: ModelRegistry, dataplane: DataPlane) -> None:
        with repo.staging("m") as staged:
            (staged / "model.onnx").write_bytes(b"not a model")
            with pytest.raises(ConversionFailed, match="does not load"):
                await publish(repo, registry, "m", staged, {}, rollout="shadow")
        assert registry.rollout_of("m")[0] is None
        assert repo.list_versions("m") == [1, 2]  # nothing published

    _run(repo, scenario)


def test_a_version_in_the_rollout_cannot_be_deleted(tmp_path: Path) -> None:
    """Deleted, it left the split naming a version that was gone (and a later publish under
    the freed number took its share of the traffic unapproved)."""
    from ferry.server.core.versions import delete_version
    from ferry.server.errors import FailedPrecondition

    repo = _repo(tmp_path)

    async def scenario(registry: ModelRegistry, dataplane: DataPlane) -> None:
        await dataplane.set_rollout("m", {1: 1, 2: 1}, by="test", why="canary")
        for version in (1, 2):
            with pytest.raises(FailedPrecondition, match=f"version {version} is in 'm'"):
                await delete_version(repo, registry, "m", version)
        assert repo.list_versions("m") == [1, 2]
        await dataplane.set_rollout("m", None, by="test", why="done")
        await delete_version(repo, registry, "m", 1)
        assert repo.list_versions("m") == [2]

    _run(repo, scenario)


def test_a_shadow_published_during_a_split_keeps_the_split(tmp_path: Path) -> None:
    """The publish pinned only the default version: a live {1: 9, 2: 1} canary became {2: 1}
    (the default's whole share) the moment a shadow candidate was converted."""
    from ferry.server.convert.publish import publish

    repo = _repo(tmp_path)

    async def scenario(registry: ModelRegistry, dataplane: DataPlane) -> None:
        rules = {"max_error_rate": 0.05}
        await dataplane.set_rollout("m", {1: 9, 2: 1}, by="test", why="canary", rules=rules)
        with repo.staging("m") as staged:
            (staged / "model.onnx").write_bytes(seed_model(seed=3).SerializeToString())
            version, note = await publish(repo, registry, "m", staged, {}, rollout="shadow")
        assert version == 3 and "the split 1: 9, 2: 1 keep serving" in note
        rollout = registry.rollout_of("m")[0]
        assert rollout is not None
        assert rollout.split == ((1, 9.0), (2, 1.0)) and rollout.shadow == (3, 0.1)
        # The canary's rule stays (it was dropped: a failing version stayed in the split).
        assert rollout.rules == rollouts.Rules(max_error_rate=0.05)
        x = {"input": np.ones((1, 3), np.float32)}
        served = Counter(
            [(await dataplane.infer(InferenceRequest("m", x, id=k))).version for k in KEYS[:400]]
        )
        assert set(served) == {1, 2} and served[1] > served[2]

    _run(repo, scenario)


def test_a_failed_version_the_rollout_does_not_name_does_not_fail_the_change(
    tmp_path: Path,
) -> None:
    """Setting a rollout retries the model's failed versions; one that failed again, though the
    rollout does not name it, made SetRollout answer FAILED_PRECONDITION for a change that was
    applied. A version the rollout names that does not load is still refused."""
    from ferry.server.errors import FailedPrecondition

    repo = _repo(tmp_path)
    broken = repo.model_dir("m") / "3"
    broken.mkdir()
    (broken / "model.onnx").write_bytes(b"not a model")

    async def scenario(registry: ModelRegistry, dataplane: DataPlane) -> None:
        view = await dataplane.set_rollout("m", {1: 1, 2: 1}, by="test", why="canary")
        assert view.split == ((1, 1.0), (2, 1.0))
        assert {await _version(dataplane, k) for k in KEYS[:200]} == {1, 2}
        with pytest.raises(FailedPrecondition, match="m/3"):
            await dataplane.set_rollout("m", {2: 1, 3: 1}, by="test", why="the broken one")

    _run(repo, scenario)


def test_a_rule_counts_only_the_comparisons_made_under_it(tmp_path: Path) -> None:
    """promote_after counted the comparisons the candidate had before the rule was set: a
    shadow compared 10 times and then given promote_after = 5 was promoted by the next one."""
    repo = _repo(tmp_path)
    write_model(repo, "m", seed_model(seed=2), version=3)  # v3 computes what v2 does

    async def scenario(registry: ModelRegistry, dataplane: DataPlane) -> None:
        await dataplane.set_rollout("m", {2: 1}, by="t", why="", shadow_of=(3, 1.0))
        await _shadowed(dataplane, 10)
        assert dataplane.rollout("m").shadow_statistics.compared == 10
        rules = {"promote_after": 5}
        await dataplane.set_rollout("m", {2: 1}, by="t", why="", shadow_of=(3, 1.0), rules=rules)
        assert dataplane.rollout("m").shadow_statistics.compared == 0
        await _shadowed(dataplane, 4)
        assert dataplane.rollout("m").shadow == (3, 1.0)  # 4 under the rule: not yet
        await _shadowed(dataplane, 1)
        assert dataplane.rollout("m").history[-1]["why"].startswith("promoted by rule")
        await dataplane.close_shadows()

    _run(repo, scenario)


def test_a_candidate_answering_nan_is_a_disagreement_not_a_blind_spot() -> None:
    """NaN made the cosine NaN, which min() skips: min_cosine never saw the candidate."""
    from ferry.server.core.shadow import ShadowStatistics

    served = {"y": np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)}
    stats = ShadowStatistics(3)
    stats.record(served, {"y": np.array([[1.0, np.nan], [3.0, 4.0]], np.float32)})
    assert stats.cosine_min == 0.0 and stats.mean_cosine == 0.0
    assert stats.max_abs_diff == float("inf")
    same = ShadowStatistics(3)  # the same NaN on both sides is not a difference
    both = {"y": np.array([[1.0, np.nan], [3.0, 4.0]], np.float32)}
    same.record(both, both)
    assert same.cosine_min == pytest.approx(1.0) and same.max_abs_diff == 0.0


def test_a_shadow_answering_other_labels_or_other_sizes_is_rolled_back() -> None:
    """The cosine of one value against another is 1: a candidate answering a regression's
    value halved, or another class id, kept min_cosine 1.0 and was promoted by the rules."""
    from ferry.server.core.shadow import ShadowStatistics

    rules = rollouts.parse_rules({"min_cosine": 0.99, "promote_after": 20})
    halved = ShadowStatistics(3)
    for value in range(1, 21):
        served = {"price": np.array([[float(value)]], np.float32)}
        halved.record(served, {"price": served["price"] * 0.5})
        assert halved.verdict(rules) == ("rollback" if value >= 10 else "")
    assert halved.cosine_min == pytest.approx(1.0) and halved.rel_error == pytest.approx(0.5)
    assert "relative error 0.5" in halved.summary()
    # Ids: counted over the comparisons, not per request (one changed id in a request of one
    # is not a cosine of 0 that rolls back at once).
    labels = ShadowStatistics(3)
    for i in range(10):
        label = {"id": np.array([7], np.int64)}
        labels.record(label, {"id": np.array([3 if i == 0 else 7], np.int64)})
        assert labels.verdict(rules) == ("rollback" if i == 9 else "")
    assert labels.cosine_min == 1.0 and labels.label_agreement == pytest.approx(0.9)
    rare = ShadowStatistics(3)
    for i in range(200):
        label = {"id": np.array([i % 5], np.int64)}
        rare.record(label, {"id": np.array([9 if i == 0 else i % 5], np.int64)})
    assert rare.label_agreement == pytest.approx(0.995) and rare.verdict(rules) == "promote"
    # Near one large value, a candidate answering the mean is 0.5% off and 100% wrong.
    mean = ShadowStatistics(3)
    rng = np.random.default_rng(3)
    for i in range(12):
        served = {"kelvin": np.array([300.0 + 1.5 * rng.standard_normal()], np.float32)}
        mean.record(served, {"kelvin": np.array([300.0], np.float32)})
        assert mean.verdict(rules) == ("rollback" if i >= 9 else "")
    assert mean.rel_error < 0.01 and mean.spread_error > 0.5
    assert "of the spread" in mean.summary()
    faithful = ShadowStatistics(3)
    for value in range(1, 21):
        served = {"price": np.array([[float(value)]], np.float32), "id": np.array([value])}
        faithful.record(served, {"price": served["price"] * 1.001, "id": np.array([value])})
    assert faithful.verdict(rules) == "promote" and faithful.spread_error < 0.01


def test_a_shadow_of_the_version_that_answers_every_request_is_refused(tmp_path: Path) -> None:
    """It was accepted and compared nothing: the candidate answered every request itself."""
    repo = _repo(tmp_path)

    async def scenario(registry: ModelRegistry, dataplane: DataPlane) -> None:
        with pytest.raises(FailedPrecondition, match="compared with itself"):
            await dataplane.set_rollout("m", None, by="t", why="", shadow_of=(2, 1.0))
        with pytest.raises(FailedPrecondition, match="only version in the split"):
            await dataplane.set_rollout("m", {1: 1}, by="t", why="", shadow_of=(1, 0.5))
        # Pinned to the serving version, the candidate is compared; a canary may be shadowed.
        await dataplane.set_rollout("m", {1: 1}, by="t", why="", shadow_of=(2, 1.0))
        await dataplane.set_rollout("m", {1: 9, 2: 1}, by="t", why="", shadow_of=(2, 1.0))

    _run(repo, scenario)


def test_a_shadow_set_beside_a_new_default_version_is_refused(tmp_path: Path) -> None:
    """SetRollout judged "a shadow of the version answering everything" before the edit lock,
    from the default served: a SetDefaultVersion that had written the config but not yet been
    followed made the shadow candidate the default version, unpromoted and unjudged."""
    from ferry.server.core.versions import set_default_version

    repo = _repo(tmp_path)

    async def scenario(registry: ModelRegistry, dataplane: DataPlane) -> None:
        written, release = asyncio.Event(), asyncio.Event()
        follow = registry.follow_edit

        async def held_follow(name: str):  # type: ignore[no-untyped-def]
            written.set()
            await release.wait()
            return await follow(name)

        registry.follow_edit = held_follow  # type: ignore[method-assign]
        edit = asyncio.create_task(set_default_version(repo, registry, "m", 1))
        await written.wait()  # the config names 1; the registry still serves 2
        with pytest.raises(FailedPrecondition, match="compared with itself"):
            await dataplane.set_rollout("m", None, by="t", why="", shadow_of=(1, 0.5))
        release.set()
        await edit
        assert registry.default_version("m") == 1 and registry.rollout_of("m")[0] is None

    _run(repo, scenario)


def test_a_model_unloaded_on_request_takes_no_rollout(tmp_path: Path) -> None:
    """SetRollout loaded it again here (and, with workers, only in some of them)."""
    repo = _repo(tmp_path)

    async def scenario(registry: ModelRegistry, dataplane: DataPlane) -> None:
        await dataplane.unload("m")
        with pytest.raises(FailedPrecondition, match="unloaded on request: load it first"):
            await dataplane.set_rollout("m", {1: 1}, by="t", why="")
        assert "m" not in registry.models and not (repo.model_dir("m") / "rollout.json").exists()

    _run(repo, scenario)


def test_the_rollout_of_a_model_unloaded_on_request_is_shown(tmp_path: Path) -> None:
    """GetRollout of a model unloaded on request was NOT_FOUND ("not served here"), though
    its split and history are kept with it and resume at its next load."""
    from ferry.server.errors import ModelNotFound

    repo = _repo(tmp_path)

    async def scenario(registry: ModelRegistry, dataplane: DataPlane) -> None:
        await dataplane.set_rollout("m", {1: 9, 2: 1}, by="t", why="canary")
        await dataplane.unload("m")
        view = dataplane.rollout("m")
        assert view.split == ((1, 9.0), (2, 1.0)) and view.history[-1]["why"] == "canary"
        with pytest.raises(ModelNotFound):
            dataplane.rollout("absent")

    _run(repo, scenario)


def test_versions_with_different_interfaces_take_no_split_and_no_shadow(tmp_path: Path) -> None:
    """A client cannot tell which version answers it: 12 of 20 requests failed at random."""
    repo = _repo(tmp_path)
    from ferry.server.examples import mlp_model

    write_model(repo, "m", mlp_model((5, 2)), version=3)  # takes 5 features, gives 2

    async def scenario(registry: ModelRegistry, dataplane: DataPlane) -> None:
        await dataplane.set_rollout("m", {2: 1}, by="t", why="kept")
        before = (repo.model_dir("m") / "rollout.json").read_bytes()
        for split, shadow_of in (({2: 1, 3: 1}, None), ({2: 1}, (3, 1.0))):
            with pytest.raises(FailedPrecondition, match=r"versions 2 and 3 of 'm' differ") as e:
                await dataplane.set_rollout("m", split, by="t", why="", shadow_of=shadow_of)
            assert "FP32 [-1, 3] against FP32 [-1, 5]" in e.value.message
            # Refused without a trace: the file (history too) is as it was, and 2 serves.
            assert (repo.model_dir("m") / "rollout.json").read_bytes() == before
            assert dataplane.rollout("m").split == ((2, 1.0),)
            assert {await _version(dataplane, k) for k in KEYS[:20]} == {2}

    _run(repo, scenario)


def test_a_candidate_missing_an_output_is_a_disagreement() -> None:
    """Skipped, the missing output left a cosine of 1 and the candidate was promoted."""
    from ferry.server.core.shadow import ShadowStatistics

    stats = ShadowStatistics(candidate=2)
    a = np.ones((2, 3), np.float32)
    stats.record({"output": a, "probs": a}, {"output": a})
    assert stats.compared == 1 and stats.cosine_min == 0.0 and stats.mismatched == 1
    stats.record({"output": a}, {"output": a.astype(np.float16)})  # another type
    assert stats.mismatched == 2
    rules = rollouts.parse_rules({"promote_after": 1, "min_cosine": 0.99})
    assert stats.verdict(rules) == "rollback" and "2 outputs missing" in stats.summary()
    same = ShadowStatistics(candidate=2)
    text = np.array([b"a", b"b"], dtype=object)
    same.record({"output": a, "label": text}, {"output": a, "label": text.copy()})
    assert same.cosine_min == pytest.approx(1.0) and same.mismatched == 0


def test_the_rollout_file_never_grows_past_what_is_read(tmp_path: Path) -> None:
    """500 emoji a reason, escaped to 12 bytes each: on the 169th change the file passed 1 MiB,
    read() refused it, the split was dropped and traffic moved to the default version."""
    mdir = tmp_path / "m"
    mdir.mkdir()
    split = rollouts.parse_split({1: 1})
    for _ in range(200):
        rollouts.write(mdir, split, by="t", why="\U0001f600" * rollouts.MAX_REASON)
    assert (mdir / rollouts.ROLLOUT_FILE).stat().st_size <= rollouts.MAX_FILE
    assert rollouts.read(mdir) == (split, "")
    assert rollouts.history(mdir)[-1]["why"] == "\U0001f600" * rollouts.MAX_REASON
    for _ in range(300):  # past what fits in 1 MiB at 4 UTF-8 bytes a character
        rollouts.write(mdir, split, by="t" * 4000, why="\U0001f600" * rollouts.MAX_REASON)
    assert (mdir / rollouts.ROLLOUT_FILE).stat().st_size <= rollouts.MAX_FILE
    assert rollouts.read(mdir) == (split, "") and 1 < len(rollouts.history(mdir)) < 200


def _split_rule_repo(tmp_path: Path) -> ModelRepository:
    """Model m: version 2 serves, 3 fails every request (for a split ruled by max_error_rate),
    4 is a shadow candidate."""
    repo = _repo(tmp_path)
    write_model(repo, "m", _failing_model(), version=3)
    write_model(repo, "m", seed_model(seed=4), version=4)
    return repo


SPLIT_RULES = {"max_error_rate": 0.2, "promote_after": 100_000}


def test_a_split_rule_keeps_the_shadow_and_the_rules(tmp_path: Path) -> None:
    """A version rolled out of the split by max_error_rate ended a live shadow beside it, and
    every rule."""
    repo = _split_rule_repo(tmp_path)

    async def scenario(registry: ModelRegistry, dataplane: DataPlane) -> None:
        await dataplane.set_rollout(
            "m", {2: 1, 3: 1}, by="t", why="", shadow_of=(4, 0.01), rules=SPLIT_RULES
        )
        comparison = registry.rollout_of("m")[0].comparison  # every worker's figures key to it
        await _route_until_the_rule_acts(dataplane)
        view = dataplane.rollout("m")
        assert view.split == ((2, 1.0),)
        assert view.history[-1]["why"].startswith("rolled back by rule: version 3")
        assert view.shadow == (4, 0.01)
        assert view.rules["max_error_rate"] == 0.2 and view.rules["promote_after"] == 100_000
        assert registry.rollout_of("m")[0].comparison == comparison  # the comparison goes on
        await dataplane.close_shadows()

    _run(repo, scenario)


def test_a_shadow_rolled_back_keeps_the_splits_rule(tmp_path: Path) -> None:
    """A shadow candidate rolled back by a rule ended every rule with it: the split it left
    (a canary) lost its max_error_rate, and a failing canary version kept its share."""
    repo = _split_rule_repo(tmp_path)

    async def scenario(registry: ModelRegistry, dataplane: DataPlane) -> None:
        rules = {"max_error_rate": 0.2, "min_cosine": 0.9999}
        # Version 4 computes otherwise than 2: rolled back at its first comparison.
        await dataplane.set_rollout(
            "m", {2: 1, 3: 1}, by="t", why="", shadow_of=(4, 1.0), rules=rules
        )
        await _route_until_the_rule_acts(dataplane)
        view = dataplane.rollout("m")
        whys = [entry["why"] for entry in view.history[-2:]]
        assert whys[0].startswith("rolled back by rule: 1 compared"), whys
        assert whys[1].startswith("rolled back by rule: version 3"), whys
        assert view.split == ((2, 1.0),) and view.shadow is None
        assert view.rules["max_error_rate"] == 0.2 and not view.rules["min_cosine"]
        await dataplane.close_shadows()

    _run(repo, scenario)


def test_metadata_and_the_default_flag_describe_the_version_a_split_serves(tmp_path: Path) -> None:
    """A pin {1: 1} sent every request to 1 while metadata, the default flag and ListModels
    described 2, the newest."""
    repo = _repo(tmp_path)

    async def scenario(registry: ModelRegistry, dataplane: DataPlane) -> None:
        assert dataplane.metadata("m").version == 2
        await dataplane.set_rollout("m", {1: 1}, by="t", why="pin")
        meta = dataplane.metadata("m")
        assert (meta.version, meta.default_version) == (1, 1)
        assert [(s.version, s.is_default) for s in registry.statuses("m")] == [
            (1, True),
            (2, False),
        ]
        assert dataplane.metadata("m", 2).version == 2  # a version named is that version
        await dataplane.set_rollout("m", {1: 1, 2: 3}, by="t", why="canary")
        assert dataplane.metadata("m").version == 2  # the largest share

    _run(repo, scenario)


def test_a_promoted_candidate_that_is_not_the_default_is_pinned(tmp_path: Path) -> None:
    repo = _repo(tmp_path)

    async def scenario(registry: ModelRegistry, dataplane: DataPlane) -> None:
        rules = {"promote_after": 2, "min_cosine": 0.0001}
        await dataplane.set_rollout("m", {2: 1}, by="t", why="", shadow_of=(1, 1.0), rules=rules)
        await _shadowed(dataplane, 2)
        view = dataplane.rollout("m")
        assert view.split == ((1, 1.0),) and view.history[-1]["why"].startswith("promoted")
        assert {await _version(dataplane, k) for k in KEYS[:10]} == {1}
        await dataplane.close_shadows()

    _run(repo, scenario)


def test_a_publish_says_when_a_live_split_keeps_it_off_traffic(tmp_path: Path) -> None:
    """The job said "published" while the split sent every request elsewhere; a shadow
    candidate whose interface differs is published but not shadowed, and says so."""
    import onnx

    from ferry.server.convert.publish import publish
    from ferry.server.examples import mlp_model

    repo = _repo(tmp_path)

    async def scenario(registry: ModelRegistry, dataplane: DataPlane) -> None:
        await dataplane.set_rollout("m", {1: 1}, by="t", why="pin")
        with repo.staging("m") as staged:
            onnx.save(seed_model(seed=3), str(staged / "model.onnx"))
            version, note = await publish(repo, registry, "m", staged, {})
        assert version == 3 and "takes no traffic yet: the live split 1=1" in note
        with repo.staging("m") as staged:
            onnx.save(mlp_model((5, 2)), str(staged / "model.onnx"))
            version, note = await publish(repo, registry, "m", staged, {}, rollout="shadow")
        assert version == 4 and "but not as a shadow candidate (versions 1 and 4" in note
        assert dataplane.rollout("m").split == ((1, 1.0),) and dataplane.rollout("m").shadow is None
        assert {await _version(dataplane, k) for k in KEYS[:10]} == {1}

    _run(repo, scenario)


def test_a_pin_left_by_a_stopped_shadow_publish_is_named_at_start(tmp_path: Path) -> None:
    """A restart between the pin and the shadow left the pin with nothing said: every later
    version then took no traffic."""
    from ferry.server.convert.publish import PIN_REASON, interrupted_pin

    repo = _repo(tmp_path)
    assert interrupted_pin(repo, "m") == ""
    rollouts.write(repo.model_dir("m"), rollouts.parse_split({2: 1}), by="job", why=PIN_REASON)
    warning = interrupted_pin(repo, "m")
    assert "left its pin (2=1.0)" in warning and "ferry models rollout m --end" in warning
    rollouts.write(repo.model_dir("m"), None, by="person", why="ended")
    assert interrupted_pin(repo, "m") == "" and interrupted_pin(repo, "nope") == ""


def test_requests_naming_a_version_do_not_count_for_the_split_rule(tmp_path: Path) -> None:
    """A client sending bad requests to version 3 by name rolled it out of the split: the rule
    counted the version's lifetime figures, not what the split routed."""
    repo = _repo(tmp_path)
    write_model(repo, "m", _failing_model(), version=3)

    async def scenario(registry: ModelRegistry, dataplane: DataPlane) -> None:
        await dataplane.set_rollout(
            "m", {2: 1, 3: 1}, by="t", why="", rules={"max_error_rate": 0.2}
        )
        x = {"input": np.ones((1, 3), np.float32)}
        for key in KEYS[:30]:
            with contextlib.suppress(FerryError):
                await dataplane.infer(InferenceRequest("m", x, version=3, id=key))
            await asyncio.gather(*dataplane._decisions)
        assert dataplane.rollout("m").split == ((2, 1.0), (3, 1.0))  # untouched
        routed_failures = await _route_until_the_rule_acts(dataplane)
        assert dataplane.rollout("m").split == ((2, 1.0),) and routed_failures == 10

    _run(repo, scenario)


def test_a_clients_bad_retries_under_one_id_do_not_count_for_the_split_rule(
    tmp_path: Path,
) -> None:
    """A request's id sticks to one version, so a client retrying one malformed request under
    its id sent every failure to one version, and an identical version was rolled out of the
    split: inputs the interface refuses fail on every version, and count for none."""
    repo = _repo(tmp_path)
    write_model(repo, "m", seed_model(seed=2), version=3)  # computes what 2 does

    async def scenario(registry: ModelRegistry, dataplane: DataPlane) -> None:
        await dataplane.set_rollout(
            "m", {2: 1, 3: 1}, by="t", why="", rules={"max_error_rate": 0.2}
        )
        good = {"input": np.ones((1, 3), np.float32)}
        bad = {"input": np.ones((1, 4), np.float32)}  # the wrong shape: refused by every version
        for key in KEYS[:40]:
            await dataplane.infer(InferenceRequest("m", good, id=key))
            with pytest.raises(FerryError, match="shape"):
                await dataplane.infer(InferenceRequest("m", bad, id="the-same-retry"))
            await asyncio.gather(*dataplane._decisions)
        view = dataplane.rollout("m")
        assert view.split == ((2, 1.0), (3, 1.0)), view.history[-1]

    _run(repo, scenario)


def test_shapes_must_match_exactly_and_a_version_loaded_later_is_checked(tmp_path: Path) -> None:
    """[batch, n] took requests [batch, 4] refused (a fixed size matched a dynamic one), and a
    version that loaded only after the split was set was never compared: requests split onto
    it failed at random."""
    from ferry.server.examples import identity_model

    repo = ModelRepository(tmp_path / "repo", create=True)
    write_model(repo, "m", identity_model("FP32", dims=(-1,)), version=1)
    write_model(repo, "m", identity_model("FP32", dims=(4,)), version=2)
    write_model(repo, "m", identity_model("FP32", dims=(-1,)), version=3)

    async def scenario(registry: ModelRegistry, dataplane: DataPlane) -> None:
        with pytest.raises(FailedPrecondition, match="versions 1 and 2 of 'm' differ"):
            await dataplane.set_rollout("m", {1: 1, 2: 1}, by="t", why="")
        await dataplane.set_rollout("m", {1: 1, 3: 1}, by="t", why="same interface")
        # Version 3's file replaced by another interface, then picked up by a refresh.
        (repo.version_dir("m", 3) / "model.onnx").unlink()
        onnx.save(identity_model("INT64", dims=(-1,)), str(repo.version_dir("m", 3) / "model.onnx"))
        await registry.refresh()
        view = dataplane.rollout("m")
        # The split goes on, version 3 serving its previous files (test below), and says why.
        assert view.split == ((1, 1.0), (3, 1.0)) and "versions 1 and 3 of 'm' differ" in view.error

    _run(repo, scenario)


@pytest.mark.parametrize("replaced", [1, 2])
def test_a_split_version_reloaded_from_files_that_differ_keeps_the_split(
    tmp_path: Path, replaced: int
) -> None:
    """A split version's files replaced by a model that takes other tensors, then a refresh:
    the split was dropped, and every request went to the default version, version 2, the
    canary the operator gave 10% (20 of 20). The reload is refused as a failed reload is: the
    version serves its previous files, the split goes on as set, and GetRollout and the
    refresh say why. Files that fit again are served at the next change."""
    from ferry.server.examples import mlp_model

    repo = _repo(tmp_path)
    model_file = repo.version_dir("m", replaced) / "model.onnx"

    async def scenario(registry: ModelRegistry, dataplane: DataPlane) -> None:
        await dataplane.set_rollout("m", {1: 9, 2: 1}, by="t", why="canary")
        split = rollouts.parse_split({1: 9, 2: 1})
        expected = [split.pick("m", k) for k in KEYS[:200]]
        assert set(expected) == {1, 2}
        model_file.unlink()
        onnx.save(mlp_model((5, 2)), str(model_file))  # takes 5 features, not 3
        outcome = await registry.refresh()
        assert len(outcome.failed) == 1 and not outcome.loaded
        assert outcome.failed[0].startswith(f"m/{replaced}: its files do not fit the rollout")
        view = dataplane.rollout("m")
        assert view.split == split.split
        assert f"version {replaced}: " in view.error and "differ" in view.error
        assert [await _version(dataplane, k) for k in KEYS[:200]] == expected
        assert (
            await registry.refresh(retry_failed=False) == RepositoryOutcome()
        )  # a poll: not again
        # Files that fit again (the previous model's) are served, and the error goes.
        model_file.unlink()
        onnx.save(seed_model(seed=5), str(model_file))
        outcome = await registry.refresh()
        assert list(outcome.loaded) == [f"m/{replaced}"] and not outcome.failed
        assert dataplane.rollout("m").error == ""
        # Ending the split serves what its versions' files are, without a load asked for.
        model_file.unlink()
        onnx.save(mlp_model((5, 2)), str(model_file))
        await registry.refresh()
        await dataplane.set_rollout("m", None, by="t", why="end")
        assert {s.version: s.reason for s in registry.statuses("m")} == {2: ""}
        assert tuple(registry.get("m", 2).inputs[0].shape) == (
            (-1, 5) if replaced == 2 else (-1, 3)
        )

    _run(repo, scenario)


@pytest.mark.parametrize("weights", [{1: 1, 2: 9}, {1: 9, 2: 1}])
def test_at_a_start_a_split_whose_versions_differ_serves_its_largest_share(
    tmp_path: Path, weights: dict[int, int]
) -> None:
    """A restart with no load to keep (version 1's files replaced while it was down) between
    versions that differ: the version with the largest share is served and the other refused,
    so its share joins the largest (version 1 was kept by its number, and 2=9 sent every
    request to version 1, the 10% share)."""
    from ferry.server.examples import mlp_model

    repo = _repo(tmp_path)
    rollouts.write(repo.model_dir("m"), rollouts.parse_split(weights), by="t", why="")
    (repo.version_dir("m", 1) / "model.onnx").unlink()
    onnx.save(mlp_model((5, 2)), str(repo.version_dir("m", 1) / "model.onnx"))
    largest = max(weights, key=lambda v: weights[v])

    async def scenario(registry: ModelRegistry, dataplane: DataPlane) -> None:
        states = {s.version: s.state for s in registry.statuses("m")}
        assert states == {largest: State.READY, 3 - largest: State.FAILED}
        assert (
            f"version {3 - largest}: its files do not fit the rollout"
            in dataplane.rollout("m").error
        )
        assert {registry.route("m", None, k).version for k in KEYS[:40]} == {largest}

    _run(repo, scenario)


def test_a_shadows_served_version_reloaded_from_files_that_differ_is_said_in_get_rollout(
    tmp_path: Path,
) -> None:
    """A shadow alone compares its candidate with the default version: that version's files
    replaced by ones that differ are refused as a split version's are, but GetRollout said
    nothing (it named only the rollout's own versions' refusals)."""
    from ferry.server.examples import mlp_model

    repo = _repo(tmp_path)
    model_file = repo.version_dir("m", 2) / "model.onnx"

    async def scenario(registry: ModelRegistry, dataplane: DataPlane) -> None:
        await dataplane.set_rollout("m", None, shadow_of=(1, 0.5), by="t", why="shadow")
        model_file.unlink()
        onnx.save(mlp_model((5, 2)), str(model_file))
        outcome = await registry.refresh()
        assert outcome.failed[0].startswith("m/2: its files do not fit the rollout")
        view = dataplane.rollout("m")
        assert view.shadow == (1, 0.5)
        assert view.error.startswith("version 2: reload failed, still serving previous load")

    _run(repo, scenario)


def test_a_splits_versions_replaced_alike_at_once_are_served_together(tmp_path: Path) -> None:
    """Both versions of a split replaced by files of another interface, read by one refresh:
    they fit each other, so both are served (each judged alone against the other's previous
    files would be refused)."""
    from ferry.server.examples import mlp_model

    repo = _repo(tmp_path)

    async def scenario(registry: ModelRegistry, dataplane: DataPlane) -> None:
        await dataplane.set_rollout("m", {1: 1, 2: 1}, by="t", why="half")
        for v, seed in ((1, 7), (2, 8)):
            (repo.version_dir("m", v) / "model.onnx").unlink()
            onnx.save(mlp_model((5, 2), seed=seed), str(repo.version_dir("m", v) / "model.onnx"))
        outcome = await registry.refresh()
        assert sorted(outcome.loaded) == ["m/1", "m/2"] and not outcome.failed
        assert dataplane.rollout("m").split == ((1, 1.0), (2, 1.0))
        assert dataplane.rollout("m").error == ""

    _run(repo, scenario)


@pytest.mark.parametrize("differs", ["interface", "batches"])
def test_a_rollout_file_edited_between_loaded_versions_that_differ_is_not_served(
    tmp_path: Path, differs: str
) -> None:
    """A rollout.json written by hand (or copied in) naming versions that were all loaded
    already was served without the check a SetRollout makes: only a sync that loaded a version
    compared them, and requests split between versions that take other tensors (or batches)
    failed at random (13 of 20). It serves the rollout served before (here none: the default
    version) now, and says why."""
    from ferry.server.examples import mlp_model

    repo = ModelRepository(tmp_path / "repo", create=True)
    write_model(repo, "m", seed_model(seed=1), version=1)
    if differs == "interface":
        write_model(repo, "m", mlp_model((5, 2)), version=2)  # takes 5 features, gives 2
    else:
        write_model(repo, "m", seed_model(seed=2), version=2)
        (repo.version_dir("m", 2) / "config.json").write_text('{"batching": {"max_batch_size": 2}}')
    write_model(repo, "m", seed_model(seed=3), version=3)
    (repo.model_dir("m") / "config.json").write_text('{"version_policy": {"all": true}}')
    rollout_file = repo.model_dir("m") / rollouts.ROLLOUT_FILE

    async def scenario(registry: ModelRegistry, dataplane: DataPlane) -> None:
        assert [s.version for s in registry.statuses("m")] == [1, 2, 3]
        rollout_file.write_text(json.dumps({"split": {"1": 1, "2": 1}}))
        await registry.refresh()
        view = dataplane.rollout("m")
        assert view.split == ()
        assert "versions 1 and 2 of 'm' differ" in view.error or "max_batch_size" in view.error
        assert {await _version(dataplane, k) for k in KEYS[:40]} == {3}  # the default
        # A usable edit is served as before.
        rollout_file.write_text(json.dumps({"split": {"1": 1, "3": 1}}))
        await registry.refresh()
        split = rollouts.parse_split({1: 1, 3: 1})
        assert dataplane.rollout("m").split == split.split
        assert [await _version(dataplane, k) for k in KEYS[:40]] == [
            split.pick("m", k) for k in KEYS[:40]
        ]
        # An edit that cannot be served over a live split keeps that split (as a version's
        # files that do not fit it do), rather than handing every request to the default.
        rollout_file.write_text(json.dumps({"split": {"1": 9, "2": 1}}))
        await registry.refresh()
        view = dataplane.rollout("m")
        assert view.split == split.split
        assert view.error.startswith("rollout.json as edited is not served: ")
        assert [await _version(dataplane, k) for k in KEYS[:40]] == [
            split.pick("m", k) for k in KEYS[:40]
        ]

    _run(repo, scenario)


def test_a_split_share_not_ready_goes_to_the_split_and_readiness_follows_it(
    tmp_path: Path,
) -> None:
    """A split version that is not ready sent its share to the default version, which the
    split never named; ModelReady asked the configured default, which a pin keeps off."""
    repo = _repo(tmp_path)
    write_model(repo, "m", seed_model(seed=3), version=3)  # the newest: the default

    async def scenario(registry: ModelRegistry, dataplane: DataPlane) -> None:
        await dataplane.set_rollout("m", {1: 9, 2: 1}, by="t", why="")
        registry.models["m"].versions[1].state = State.FAILED  # as if it failed to reload
        assert {await _version(dataplane, k) for k in KEYS[:40]} == {2}
        assert dataplane.model_ready("m")
        (repo.model_dir("m") / "config.json").write_text('{"default_version": 1}')
        await registry.refresh()  # the configured default (1) is off traffic behind a pin
        await dataplane.set_rollout("m", {2: 1}, by="t", why="pin")
        registry.models["m"].versions[1].state = State.FAILED
        assert dataplane.model_ready("m") and dataplane.metadata("m").version == 2

    _run(repo, scenario)


def test_a_shadow_candidate_never_answers_for_a_pinned_version_that_failed(
    tmp_path: Path,
) -> None:
    """The pin {1: 1} beside the shadow candidate 2 (what a conversion's --rollout shadow
    leaves): version 1 failed (to load at a restart, say) and its share gave way to the
    default, the candidate, which then answered every request unpromoted while GetRollout
    showed the pin and the shadow. Such requests fail UNAVAILABLE now, saying why; a version
    still loading still gives way (the candidate served before the pin was set)."""
    from ferry.server.errors import ModelNotReady

    repo = _repo(tmp_path)

    async def scenario(registry: ModelRegistry, dataplane: DataPlane) -> None:
        await dataplane.set_rollout("m", {1: 1}, by="t", why="pin", shadow_of=(2, 0.5))
        assert {await _version(dataplane, k) for k in KEYS[:20]} == {1}
        slot = registry.models["m"].versions[1]
        slot.state = State.FAILED  # as if it failed to load
        with pytest.raises(ModelNotReady, match="the shadow candidate 2 is not promoted"):
            await _version(dataplane, "any")
        assert not dataplane.model_ready("m")
        assert await _version(dataplane, "any", version=2) == 2  # named: that version
        slot.state = State.LOADING  # on its way in: the version that served meanwhile
        assert await _version(dataplane, "any") == 2
        slot.state = State.READY
        assert {await _version(dataplane, k) for k in KEYS[:20]} == {1}
        await dataplane.close_shadows()

    _run(repo, scenario)


def test_a_shadow_that_became_the_default_says_it_compares_nothing(tmp_path: Path) -> None:
    """Shadow 2 while 1 was the configured default, then the default cleared: every request
    went to 2 and nothing was compared, with nothing said. Through management the edit is
    refused; by hand it cannot be, and GetRollout says what it did."""
    from ferry.server.core.versions import set_default_version

    repo = _repo(tmp_path)
    (repo.model_dir("m") / "config.json").write_text(
        '{"default_version": 1, "version_policy": {"all": true}}'
    )

    async def scenario(registry: ModelRegistry, dataplane: DataPlane) -> None:
        await dataplane.set_rollout("m", None, by="t", why="", shadow_of=(2, 1.0))
        assert dataplane.rollout("m").error == ""
        with pytest.raises(FailedPrecondition, match="shadow candidate"):
            await set_default_version(repo, registry, "m", 0)
        assert dataplane.rollout("m").error == ""
        (repo.model_dir("m") / "config.json").write_text('{"version_policy": {"all": true}}')
        await registry.refresh()
        assert "is now the version every request" in dataplane.rollout("m").error

    _run(repo, scenario)


def test_a_change_that_starts_afresh_gets_a_new_comparison_id(tmp_path: Path) -> None:
    """A person setting the same shadow and rules again restarts the comparison in the process
    that answered; keyed on (shadow, rules) alone, the other workers' older figures matched."""
    mdir = tmp_path / "m"
    mdir.mkdir()
    wanted = rollouts.Rollout(((1, 1.0),), (2, 0.5), rollouts.Rules(promote_after=9))
    rollouts.write(mdir, wanted, by="t", why="")
    first, _ = rollouts.read(mdir)
    rollouts.write(mdir, wanted, by="t", why="again")
    again, _ = rollouts.read(mdir)
    assert first is not None and again is not None and first == again
    assert first.comparison and again.comparison != first.comparison
    assert comparison_key(first) != comparison_key(again)
    kept = rollouts.going_on(again, wanted)  # a rule's change keeping the shadow and rules
    rollouts.write(mdir, kept, by="rollout rules", why="")
    assert comparison_key(rollouts.read(mdir)[0]) == comparison_key(again)
    other = rollouts.Rollout(((1, 1.0),), (2, 0.25))
    assert rollouts.going_on(again, other).comparison is None  # another shadow: afresh
    doc = json.loads((mdir / rollouts.ROLLOUT_FILE).read_text())
    doc["shadow"]["comparison"] = ["not", "an", "id"]  # edited by hand
    (mdir / rollouts.ROLLOUT_FILE).write_text(json.dumps(doc))
    edited, error = rollouts.read(mdir)
    assert error == "" and edited is not None and edited.comparison == ""


def test_a_shadow_run_the_server_stops_before_it_starts_is_closed(
    recwarn: pytest.WarningsRecorder,
) -> None:
    """A shadow task cancelled before its first step (the server stopping right after an
    answer) never awaited the candidate's run: Python reported a coroutine never awaited."""

    async def candidate() -> dict[str, object]:
        return {}

    async def run() -> None:
        shadows = Shadows()
        shadows.start(ShadowStatistics(2, "m"), candidate(), {}, 0)
        await shadows.close()

    asyncio.run(run())
    gc.collect()
    assert not [w for w in recwarn if "never awaited" in str(w.message)]


def test_a_split_rule_keeps_the_comparison_of_a_hand_edited_file(tmp_path: Path) -> None:
    """A rollout.json written by hand has no comparison id, and its comparison is keyed to the
    shadow and rules alone (docs/rollout.md): a split's rule that kept them wrote a new id, so
    every worker's comparison started afresh and promote_after counted from zero again."""
    repo = _split_rule_repo(tmp_path)

    async def scenario(registry: ModelRegistry, dataplane: DataPlane) -> None:
        await dataplane.set_rollout(
            "m", {2: 1, 3: 1}, by="t", why="", shadow_of=(4, 0.5), rules=SPLIT_RULES
        )
        path = repo.model_dir("m") / rollouts.ROLLOUT_FILE
        doc = json.loads(path.read_text())
        del doc["shadow"]["comparison"]  # as a person writes it
        path.write_text(json.dumps(doc))
        await registry.refresh()
        (ro, _) = registry.rollout_of("m")
        assert ro is not None and ro.comparison == ""
        key = comparison_key(ro)
        await _route_until_the_rule_acts(dataplane)
        view = dataplane.rollout("m")
        assert view.history[-1]["why"].startswith("rolled back by rule: version 3")
        assert view.shadow == (4, 0.5)
        assert comparison_key(registry.rollout_of("m")[0]) == key  # the comparison goes on
        assert rollouts.read(repo.model_dir("m"))[0] == registry.rollout_of("m")[0]
        await dataplane.close_shadows()

    _run(repo, scenario)


@pytest.mark.parametrize("promote_after", [1, 3, 9])
def test_a_promotion_under_ten_comparisons_still_judges_sizes_and_ids(promote_after: int) -> None:
    """The size and id checks waited for 10 comparisons, and a promote_after under 10 promoted
    a candidate whose ids all differed (or whose outputs were half the size) without them."""
    rules = rollouts.Rules(promote_after=promote_after, min_cosine=0.99)
    wrong_ids = ShadowStatistics(2, "m", compared=promote_after)
    wrong_ids.labels_total, wrong_ids.labels_equal = promote_after, 0
    assert wrong_ids.verdict(rules) == "rollback"
    halved = ShadowStatistics(2, "m", compared=promote_after)
    halved.squares["y"] = [0.25 * promote_after, 1.0 * promote_after, 0.0, 0.0]  # ||d|| = 0.5
    assert halved.verdict(rules) == "rollback"
    right = ShadowStatistics(2, "m", compared=promote_after)
    right.labels_total = right.labels_equal = promote_after
    right.squares["y"] = [0.0, 1.0 * promote_after, 0.0, 0.0]
    assert right.verdict(rules) == "promote"
    assert ShadowStatistics(2, "m", compared=promote_after - 1).verdict(rules) == ""


def test_a_rules_decision_never_undoes_a_change_made_while_it_waited(tmp_path: Path) -> None:
    """A rule judged the rollout in force, but a person's change (which holds the model while
    it loads a version) went in first: the rule's verdict on the old candidate overwrote it,
    and the new shadow ended unjudged. The verdict is now dropped, and the comparison it was
    made on may be judged again."""
    repo = _repo(tmp_path)
    write_model(repo, "m", seed_model(seed=2), version=3)

    async def scenario(registry: ModelRegistry, dataplane: DataPlane) -> None:
        rules = {"promote_after": 1000, "min_cosine": 0.9}
        await dataplane.set_rollout("m", {2: 1}, by="t", why="", shadow_of=(1, 1.0), rules=rules)
        judged, _ = registry.rollout_of("m")
        assert judged is not None
        stats = dataplane._shadows.statistics("m", judged)
        lock = registry._locks["m"] = WatchedLock()
        await lock.acquire()  # a change in progress
        person = asyncio.create_task(
            dataplane.set_rollout(
                "m", {2: 1}, by="person", why="try 3", shadow_of=(3, 0.5), rules=rules
            )
        )
        async with asyncio.timeout(30):
            await lock.queued.wait()  # the person's change waits behind it
        stats.decided = True
        dataplane._decide("m", {2: 1.0}, "rolled back by rule: stale", judged, stats=stats)
        lock.release()
        await person
        await asyncio.gather(*dataplane._decisions)
        view = dataplane.rollout("m")
        assert view.split == ((2, 1.0),) and view.shadow == (3, 0.5)
        assert [h["why"] for h in view.history] == ["", "try 3"]
        assert not stats.decided

    _run(repo, scenario)


def test_an_edit_of_a_model_whose_config_does_not_parse_is_a_failed_precondition(
    tmp_path: Path,
) -> None:
    """DeleteModelVersion and SetDefaultVersion were INVALID_ARGUMENT when the model's config
    file did not parse: the call was fine, the repository was not. Clearing the default
    (version 0) read the file only to edit it, and answered INTERNAL (JSONDecodeError,
    UnicodeDecodeError)."""
    from ferry.server.core import versions

    repo = _repo(tmp_path)
    mdir = repo.model_dir("m")

    async def scenario() -> None:
        registry = ModelRegistry(repo, open_session, warm_up=False)
        for name, content in (("config.json", b"{bad"), ("config.toml", b"\xff\xfe[batching]")):
            for other in ("config.json", "config.toml"):
                (mdir / other).unlink(missing_ok=True)
            (mdir / name).write_bytes(content)
            for edit in (
                versions.delete_version(repo, registry, "m", 1),
                versions.set_default_version(repo, registry, "m", 1),
                versions.set_default_version(repo, registry, "m", 0),
            ):
                with pytest.raises(FailedPrecondition, match=rf"{name} cannot be parsed.*fix"):
                    await edit
            assert (mdir / name).read_bytes() == content
        assert repo.list_versions("m") == [1, 2]
        await registry.close()

    asyncio.run(scenario())


def test_an_edit_the_repository_disk_cannot_take_says_so_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SetRollout and SetDefaultVersion on a full repository disk were INTERNAL, and each try
    left a partial .tmp-rollout.json-<pid> / .tmp-config.json-<pid> beside the model."""
    import errno
    import os

    from ferry.server.core import repository as repository_module
    from ferry.server.core import versions
    from ferry.server.errors import LimitExceeded

    repo = _repo(tmp_path)
    mdir = repo.model_dir("m")

    def fails(code: int) -> object:
        def call(*args: object) -> None:
            raise OSError(code, os.strerror(code))

        return call

    async def scenario(registry: ModelRegistry, dataplane: DataPlane) -> None:
        monkeypatch.setattr(repository_module.os, "fsync", fails(errno.ENOSPC))
        with pytest.raises(LimitExceeded, match=r"disk is full: m/rollout\.json"):
            await dataplane.set_rollout("m", {1: 1, 2: 1}, by="t", why="")
        with pytest.raises(LimitExceeded, match=r"disk is full: m/config\.json"):
            await versions.set_default_version(repo, registry, "m", 1)
        monkeypatch.undo()
        monkeypatch.setattr(repository_module.os, "replace", fails(errno.EROFS))
        with pytest.raises(FailedPrecondition, match=r"m/rollout\.json could not be written"):
            await dataplane.set_rollout("m", {1: 1, 2: 1}, by="t", why="")
        monkeypatch.undo()
        assert sorted(p.name for p in mdir.iterdir()) == ["1", "2"]
        assert dataplane.rollout("m").split == ()

    _run(repo, scenario)


@pytest.mark.parametrize("promote_after", [1, 5, 9])
def test_a_promotion_under_ten_runs_still_judges_the_error_rate(promote_after: int) -> None:
    """The error rate waited for 10 runs, and a promote_after under 10 promoted a candidate
    that failed most of its shadow runs, over a max_error_rate the rules set."""
    rules = rollouts.Rules(promote_after=promote_after, max_error_rate=0.01)
    failing = ShadowStatistics(2, "m", compared=promote_after, errors=1)
    assert failing.verdict(rules) == "rollback"
    assert ShadowStatistics(2, "m", compared=promote_after).verdict(rules) == "promote"
    # Short of a promotion, a few failures still wait for 10 runs.
    assert ShadowStatistics(2, "m", compared=promote_after - 1, errors=0).verdict(rules) == ""


def _two_outputs() -> onnx.ModelProto:
    """input [batch, 3] -> a (Relu) and b (Neg): a model whose clients may ask for one output."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["input"], ["a"]), helper.make_node("Neg", ["input"], ["b"])],
        "two",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3])],
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["batch", 3]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, ["batch", 3]),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def test_a_shadow_compares_the_outputs_the_request_asked_for(tmp_path: Path) -> None:
    """Batched with a request for another output, a request's served answer held the batch's
    outputs (both), its shadow run only the one it asked for: an identical candidate counted
    a missing output, a cosine of 0, and a min_cosine rule would roll it back."""
    repo = ModelRepository(tmp_path / "repo", create=True)
    # Two requests fill a batch at once; the shadow's run alone waits the delay (under 5 s).
    config = {"batching": {"max_batch_size": 2, "max_queue_delay_ms": 1000}}
    for version in (1, 2):
        write_model(repo, "m", _two_outputs(), version=version, config=config)

    async def scenario(registry: ModelRegistry, dataplane: DataPlane) -> None:
        await dataplane.set_rollout("m", {2: 1}, by="t", why="", shadow_of=(1, 1.0))
        x = {"input": np.ones((1, 3), np.float32)}
        for i in range(2):
            routed, named = await asyncio.gather(
                dataplane.infer(InferenceRequest("m", x, id=f"a{i}", outputs=("a",))),
                # Names its version: served in the same batch, never shadowed.
                dataplane.infer(InferenceRequest("m", x, version=2, id=f"b{i}", outputs=("b",))),
            )
            assert (sorted(routed.outputs), sorted(named.outputs)) == (["a"], ["b"])
            await asyncio.gather(*dataplane._shadows._tasks)
        stats = dataplane.rollout("m").shadow_statistics
        assert (stats.compared, stats.errors, stats.mismatched) == (2, 0, 0)
        assert stats.cosine_min == pytest.approx(1.0)
        await dataplane.close_shadows()

    _run(repo, scenario)


@pytest.mark.parametrize(
    ("failure", "shed", "errors"),
    [
        (QueueFull("predicted wait over the deadline"), 1, 0),
        (DeadlineExceeded("expired while queued"), 1, 0),
        (Unavailable("closed before the request ran"), 1, 0),  # unloaded or replaced under it
        (InvalidInput("the candidate failed"), 0, 1),
    ],
)
def test_a_shadow_the_candidates_queue_never_ran_is_shed_not_an_error(
    failure: Exception, shed: int, errors: int
) -> None:
    """A shadow refused at the candidate's door or expired in its queue (queued last, behind
    the live requests a load sends it) was counted as the candidate's error: under load an
    identical candidate was rolled back by max_error_rate."""

    async def refused() -> dict[str, np.ndarray]:
        raise failure

    async def scenario() -> ShadowStatistics:
        shadows = Shadows()
        stats = ShadowStatistics(2, "m")
        for _ in range(10):
            shadows.start(stats, refused(), {"y": np.ones(2, np.float32)}, 1)
            await asyncio.gather(*shadows._tasks)
        return stats

    stats = asyncio.run(scenario())
    assert (stats.shed, stats.errors, stats.compared) == (10 * shed, 10 * errors, 0)
    verdict = stats.verdict(rollouts.Rules(max_error_rate=0.05))
    assert verdict == ("rollback" if errors else "")


def test_bfloat16_outputs_are_compared_as_numbers() -> None:
    """A BF16 output (numpy kind 'V') was compared as text, equal or not: a candidate 1% off
    had a cosine of 0 (rolled back by any min_cosine) and no size of error at all."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bf16 = np.dtype(ml_dtypes.bfloat16)
    served = np.random.default_rng(0).standard_normal((4, 10)).astype(bf16)
    near = (served.astype(np.float32) * 1.01).astype(bf16)
    stats = ShadowStatistics(2, "m")
    stats.record({"y": served}, {"y": near})
    assert stats.cosine_min > 0.999 and 0.0 < stats.rel_error < 0.02
    assert 0.0 < stats.max_abs_diff < 0.1 and stats.top1_agreement == 1.0


def _held_open(
    entered: threading.Event, gate: threading.Event, holds: Callable[[str], bool]
) -> Callable[[Path, object], object]:
    """A session opener that, for a version folder ``holds`` picks, says it ``entered`` and
    waits for ``gate`` (30 s at most: a bound on a broken test) before opening it."""

    def held(path: Path, config: object) -> object:
        if holds(path.parent.name):
            entered.set()
            gate.wait(30)
        return open_session(path, config)  # type: ignore[arg-type]

    return held


def test_shadows_while_the_candidate_loads_are_shed_not_errors(tmp_path: Path) -> None:
    """A worker or a polling replica reads the rollout, then loads the candidate: the shadows
    of those seconds were counted as the candidate's errors, and an identical candidate was
    rolled back by max_error_rate at its first comparison."""
    repo = ModelRepository(tmp_path / "repo", create=True)
    write_model(repo, "m", seed_model(seed=2))
    write_model(repo, "m", seed_model(seed=2), version=2)  # the policy serves only 2
    entered, gate = threading.Event(), threading.Event()
    held = _held_open(entered, gate, lambda version: version == "1")

    async def scenario() -> None:
        registry = ModelRegistry(repo, held, warm_up=False)  # type: ignore[arg-type]
        await registry.refresh()
        dataplane = DataPlane(registry)
        rules = rollouts.Rules(max_error_rate=0.1)
        shadowed = rollouts.Rollout(((2, 1.0),), (1, 1.0), rules)
        rollouts.write(repo.model_dir("m"), shadowed, by="t", why="")  # another process's
        refresh = asyncio.create_task(registry.refresh())
        try:
            assert await asyncio.to_thread(entered.wait, 30)
            x = {"input": np.ones((1, 3), np.float32)}
            for i in range(20):  # served by 2 while 1 loads
                assert (await dataplane.infer(InferenceRequest("m", x, id=f"a{i}"))).version == 2
        finally:
            gate.set()
        await refresh
        await _shadowed(dataplane, 3)
        view = dataplane.rollout("m")
        assert view.shadow == (1, 1.0), view.history[-1]
        stats = view.shadow_statistics
        assert (stats.compared, stats.errors, stats.shed) == (3, 0, 20)
        await dataplane.close_shadows()
        await registry.close()

    asyncio.run(scenario())


def test_a_shadow_publish_never_undoes_a_change_made_while_it_loaded(tmp_path: Path) -> None:
    """A conversion published with rollout = "shadow" read the live split, loaded the new
    version (seconds), then wrote that split back with its shadow: a person who ended the
    canary meanwhile was answered OK, and the canary came back. The person's change stands."""
    from ferry.server.convert.publish import publish

    repo = _repo(tmp_path)
    entered, gate = threading.Event(), threading.Event()
    held = _held_open(entered, gate, lambda version: version not in ("1", "2"))  # the new one

    async def scenario() -> None:
        registry = ModelRegistry(repo, held, warm_up=False)  # type: ignore[arg-type]
        await registry.refresh()
        dataplane = DataPlane(registry)
        await dataplane.set_rollout("m", {1: 9, 2: 1}, by="person", why="canary")
        lock = registry._locks["m"] = WatchedLock()
        with repo.staging("m") as staged:
            (staged / "model.onnx").write_bytes(seed_model(seed=3).SerializeToString())
            published = asyncio.create_task(
                publish(repo, registry, "m", staged, {}, rollout="shadow")
            )
            try:
                assert await asyncio.to_thread(entered.wait, 30)
                ended = asyncio.create_task(
                    dataplane.set_rollout("m", None, by="person", why="end the canary")
                )
                async with asyncio.timeout(30):
                    await lock.queued.wait()  # the person's change waits behind the publish
            finally:
                gate.set()
            version, note = await published
            assert (await ended).split == ()
        assert version == 3 and "not as a shadow candidate" in note
        view = dataplane.rollout("m")
        assert view.split == () and view.shadow is None
        assert view.history[-1]["why"] == "end the canary"
        await registry.close()

    asyncio.run(scenario())


def test_versions_taking_different_batches_take_no_split(tmp_path: Path) -> None:
    """Versions of a split with max_batch_size 32 and 2 were accepted: a request of 4 rows was
    answered by one and failed by the other, at random (18 of 40). A shadow candidate may take
    more rows than the versions it is compared with, never fewer."""
    repo = _repo(tmp_path)
    write_model(repo, "m", seed_model(seed=2), version=3)
    (repo.version_dir("m", 3) / "config.json").write_text('{"batching": {"max_batch_size": 2}}')

    async def scenario(registry: ModelRegistry, dataplane: DataPlane) -> None:
        for split, shadow_of in (({2: 1, 3: 1}, None), ({2: 1}, (3, 0.5))):
            with pytest.raises(FailedPrecondition, match="max_batch_size"):
                await dataplane.set_rollout("m", split, by="t", why="", shadow_of=shadow_of)
            assert rollouts.read(repo.model_dir("m"))[0] is None  # nothing written
        await dataplane.set_rollout("m", {3: 1}, by="t", why="", shadow_of=(2, 0.5))  # more rows
        x = {"input": np.ones((2, 3), np.float32)}
        assert (await dataplane.infer(InferenceRequest("m", x, id="k"))).version == 3
        await dataplane.close_shadows()

    _run(repo, scenario)


def test_batch_difference_reads_zero_as_any_number_of_rows() -> None:
    split = rollouts.parse_split({1: 1, 2: 1})
    assert rollouts.batch_difference(split, {1: 0, 2: 0}, None) == ""
    assert "max_batch_size 0" in rollouts.batch_difference(split, {1: 0, 2: 8}, None)
    shadow = rollouts.Rollout((), (2, 0.1))
    assert rollouts.batch_difference(shadow, {1: 8, 2: 0}, 1) == ""  # takes any number
    assert "takes at most 8" in rollouts.batch_difference(shadow, {1: 0, 2: 8}, 1)
    assert rollouts.batch_difference(shadow, {2: 8}, 1) == ""  # the default is not loaded


def test_a_late_outcome_of_a_replaced_comparison_is_not_judged_by_the_new_rules(
    tmp_path: Path,
) -> None:
    """A shadow run still in flight when a person set rules on the same candidate ended after
    the change and was judged under the new rules with the old comparison's figures: a
    promote_after set once 3 comparisons were in promoted the candidate with none made under
    it."""
    repo = ModelRepository(tmp_path / "repo", create=True)
    write_model(repo, "m", seed_model(seed=2))
    write_model(repo, "m", seed_model(seed=2), version=2)  # v1 computes what v2 does

    async def scenario(registry: ModelRegistry, dataplane: DataPlane) -> None:
        await dataplane.set_rollout("m", {2: 1}, by="t", why="watch", shadow_of=(1, 1.0))
        await _shadowed(dataplane, 2)
        candidate = registry.get("m", 1)
        gate, submit = asyncio.Event(), candidate.batcher.submit

        async def held(*args: object, **kwargs: object) -> object:
            await gate.wait()
            return await submit(*args, **kwargs)  # type: ignore[arg-type]

        candidate.batcher.submit = held  # type: ignore[method-assign]
        x = {"input": np.ones((1, 3), np.float32)}
        await dataplane.infer(InferenceRequest("m", x, id="late"))  # its shadow waits
        rules = {"promote_after": 3}
        await dataplane.set_rollout(
            "m", {2: 1}, by="t", why="judge it", shadow_of=(1, 1.0), rules=rules
        )
        candidate.batcher.submit = submit  # type: ignore[method-assign]
        gate.set()
        await asyncio.gather(*dataplane._shadows._tasks)
        await asyncio.gather(*dataplane._decisions)
        view = dataplane.rollout("m")
        assert view.shadow == (1, 1.0) and view.history[-1]["why"] == "judge it"
        assert view.shadow_statistics.compared == 0
        await dataplane.close_shadows()

    _run(repo, scenario)


def test_a_clients_request_failing_at_run_time_counts_once_for_the_split_rule(
    tmp_path: Path,
) -> None:
    """A request the interface takes but the model refuses at run time (here: rows not a
    multiple of 4) fails on every version alike; retried under one id it sticks to one
    version, and each retry counted a failure of that version: an identical version was rolled
    out of the split. The same request (id and inputs) failing again counts once."""
    table = numpy_helper.from_array(np.arange(5, dtype=np.float32), "table")
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["input"], ["index"], to=TensorProto.INT64),
            helper.make_node("Gather", ["table", "index"], ["output"]),
        ],
        "looks_up",  # an index past the table's 5 values is refused at run time
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 3])],
        [table],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    repo = ModelRepository(tmp_path / "repo", create=True)
    for version in (2, 3):  # identical versions
        write_model(repo, "m", model, version=version)

    async def scenario(registry: ModelRegistry, dataplane: DataPlane) -> None:
        await dataplane.set_rollout(
            "m", {2: 1, 3: 1}, by="t", why="", rules={"max_error_rate": 0.2}
        )
        good = {"input": np.ones((1, 3), np.float32)}
        bad = {"input": np.full((1, 3), 9.0, np.float32)}
        for key in KEYS[:40]:
            await dataplane.infer(InferenceRequest("m", good, id=key))
            with pytest.raises(InvalidInput):
                await dataplane.infer(InferenceRequest("m", bad, id="the-same-retry"))
            await asyncio.gather(*dataplane._decisions)
        view = dataplane.rollout("m")
        assert view.split == ((2, 1.0), (3, 1.0)), view.history[-1]
        # Other requests failing on one version only still roll it out.
        for key in KEYS[:60]:
            with contextlib.suppress(InvalidInput):
                await dataplane.infer(InferenceRequest("m", bad, id=key, version=None))
            await asyncio.gather(*dataplane._decisions)
        assert dataplane.rollout("m").split == ((2, 1.0), (3, 1.0))  # both fail them alike

    _run(repo, scenario)


def test_a_rules_decision_the_disk_refuses_is_tried_again_and_said(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rollback whose rollout.json write failed (a full or read-only disk) was logged once and
    dropped: the failing version kept its share for good, and GetRollout said nothing. It is
    tried again (backing off) until it is written, and GetRollout says it is pending."""
    import errno
    import os

    from ferry.server.core import repository as repository_module
    from ferry.server.core import rule_decisions

    monkeypatch.setattr(rule_decisions, "DECISION_RETRY", (0.0, 0.0))
    repo = _split_rule_repo(tmp_path)
    replace = os.replace
    seen: list[str] = []
    pending: list[list[str]] = []

    async def scenario(registry: ModelRegistry, dataplane: DataPlane) -> None:
        await dataplane.set_rollout(
            "m", {2: 1, 3: 1}, by="t", why="", rules={"max_error_rate": 0.2}
        )

        def read_only(src: object, dst: object) -> None:
            seen.append(dataplane.rollout("m").error)
            pending.append(sorted(dataplane.unapplied_decisions()))  # /metrics' gauge
            if len(seen) < 3:
                raise OSError(errno.EROFS, os.strerror(errno.EROFS))
            replace(src, dst)  # type: ignore[arg-type]

        monkeypatch.setattr(repository_module.os, "replace", read_only)
        await _route_until_the_rule_acts(dataplane)  # no shadow: the decisions alone
        assert len(seen) == 3 and seen[0] == "" and pending == [[], ["m"], ["m"]]
        assert dataplane.unapplied_decisions() == {}
        assert "a rule's decision is not in force yet (rolled back by rule" in seen[2], seen
        view = dataplane.rollout("m")
        assert view.split == ((2, 1.0),) and view.error == ""
        assert view.history[-1]["by"] == "rollout rules"

    _run(repo, scenario)


def test_an_edit_of_the_rollout_file_of_the_same_size_and_time_is_seen(tmp_path: Path) -> None:
    """The file's change was seen by its (mtime, size): an edit of the same size within the
    file system's mtime granularity (a hand edit of one weight, a copy keeping times) was
    never applied, and every refresh kept serving the old split. Its content decides."""
    import os

    repo = _repo(tmp_path)
    path = repo.model_dir("m") / rollouts.ROLLOUT_FILE

    async def scenario(registry: ModelRegistry, dataplane: DataPlane) -> None:
        path.write_text('{"split": {"1": 1, "2": 3}}')
        await registry.refresh()
        assert dataplane.rollout("m").split == ((1, 1.0), (2, 3.0))
        stat = path.stat()
        path.write_text('{"split": {"1": 3, "2": 1}}')  # the same size
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and the same time
        await registry.refresh()
        assert dataplane.rollout("m").split == ((1, 3.0), (2, 1.0))

    _run(repo, scenario)


def test_one_rule_says_which_shadows_were_shed() -> None:
    """What a shed shadow is was decided in two places (the candidate's state before it was
    queued, the error of its run), each its own list: one rule now answers both."""
    from ferry.server.core.shadow import shed
    from ferry.server.errors import ModelNotReady

    for not_run in (QueueFull("q"), DeadlineExceeded("d"), Unavailable("u")):
        assert shed(not_run) and shed(not_run, State.READY)
    assert shed(ModelNotReady("loading"), State.LOADING)
    assert shed(ModelNotReady("unloading"), State.UNLOADING)
    assert not shed(ModelNotReady("failed"), State.FAILED)
    assert not shed(InvalidInput("its own inputs"), State.READY)
    assert not shed(RuntimeError("a crash"))


def test_a_shadow_is_compared_afresh_with_a_new_default_version(tmp_path: Path) -> None:
    """A shadow with no split compares its candidate with the default version. A publish made
    version 3 the default; the comparison went on with the 20 figures against version 2, and
    a promote_after of 25 promoted the candidate over version 3 after 5 comparisons with it."""
    repo = _repo(tmp_path)
    rules = {"promote_after": 25}

    async def scenario(registry: ModelRegistry, dataplane: DataPlane) -> None:
        await dataplane.set_rollout("m", None, by="t", why="", shadow_of=(1, 1.0), rules=rules)
        await _shadowed(dataplane, 20)
        stats = dataplane.rollout("m").shadow_statistics
        assert stats is not None and stats.compared + stats.shed == 20
        write_model(repo, "m", seed_model(seed=3), version=3)  # published: the default now
        await registry.refresh()
        assert (
            await dataplane.infer(
                InferenceRequest("m", {"input": np.ones((1, 3), np.float32)}, id="x")
            )
        ).version == 3
        await asyncio.gather(*dataplane._shadows._tasks)
        await _shadowed(dataplane, 5)
        view = dataplane.rollout("m")
        assert view.shadow == (1, 1.0), view.history[-1]  # not promoted on version 2's figures
        stats = view.shadow_statistics
        assert stats is not None and stats.compared + stats.shed <= 6
        await dataplane.close_shadows()

    _run(repo, scenario)


def test_a_candidate_reloaded_with_other_files_is_compared_afresh(tmp_path: Path) -> None:
    """The comparison was keyed to the rollout alone: a candidate whose files were replaced
    (and reloaded by a refresh) went on with the figures of the model it replaced, which
    diluted the new one's difference, and a candidate 50% off was promoted on them."""
    import os

    repo = _repo(tmp_path)
    write_model(repo, "m", seed_model(seed=2), version=3)  # computes what 2 does
    off = seed_model(seed=2)
    for init in off.graph.initializer:  # the last layer x 1.5: every answer 50% larger
        if init.name in ("w1", "b1"):
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1.5, init.name))
    rules = {"promote_after": 105, "min_cosine": 0.99}

    async def scenario(registry: ModelRegistry, dataplane: DataPlane) -> None:
        await dataplane.set_rollout("m", {2: 1}, by="t", why="", shadow_of=(3, 1.0), rules=rules)
        x = {"input": np.ones((1, 3), np.float32)}

        async def requests(n: int) -> None:
            for i in range(n):
                await dataplane.infer(InferenceRequest("m", x, id=f"r{i}"))
                await asyncio.gather(*dataplane._shadows._tasks)
                await asyncio.gather(*dataplane._decisions)

        await requests(100)
        model_file = repo.model_dir("m") / "3" / "model.onnx"
        before = model_file.stat().st_mtime_ns
        onnx.save(off, str(model_file))  # replaced in place
        os.utime(model_file, ns=(before + 10**9, before + 10**9))
        await registry.refresh()
        await requests(10)
        view = dataplane.rollout("m")
        assert view.shadow is None and view.history[-1]["why"].startswith("rolled back"), view
        await dataplane.close_shadows()

    _run(repo, scenario)


@pytest.mark.parametrize(
    "why", ["ok\n  2026-12-05T06:20:11Z  1=1  by admin: approved", "\x1b[2J", "a\tb"]
)
def test_a_reason_that_is_not_one_printable_line_is_refused(tmp_path: Path, why: str) -> None:
    """A line break in a reason forged a history entry that `ferry models rollout` printed as
    if another person had made it; a terminal escape rewrote the operator's screen."""
    repo = _repo(tmp_path)

    async def scenario(registry: ModelRegistry, dataplane: DataPlane) -> None:
        with pytest.raises(InvalidArgument, match="one line of printable text"):
            await dataplane.set_rollout("m", {1: 1, 2: 1}, by="t", why=why)
        assert dataplane.rollout("m").split == () and dataplane.rollout("m").history == ()

    _run(repo, scenario)


def _odd_failing_model() -> onnx.ModelProto:
    """seed_model's interface, each row's sum, whose run fails on a batch of an odd number of
    rows (a Reshape to [-1, 6] and back, a Relu between so that no optimizer folds them)."""
    pairs = numpy_helper.from_array(np.array([-1, 6], np.int64), "pairs")
    rows = numpy_helper.from_array(np.array([-1, 3], np.int64), "rows")
    graph = helper.make_graph(
        [
            helper.make_node("Reshape", ["input", "pairs"], ["p"]),
            helper.make_node("Relu", ["p"], ["q"]),
            helper.make_node("Reshape", ["q", "rows"], ["r"]),
            helper.make_node("ReduceSum", ["r"], ["logits"], keepdims=1, axes=[1]),
        ],
        "odd_fails",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 1])],
        [pairs, rows],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)], ir_version=8)


def test_a_split_version_reloaded_from_new_files_is_judged_afresh(tmp_path: Path) -> None:
    """The split rule's failure counts belonged to the rollout, not to the files: version 3
    failed 9 of 9 requests, its model file was replaced by one that fails 1 request in 11 (under
    the rule's 20%), and its first failure rolled the new files out of the split on the old
    files' failures (10 of 20). Its counts now start afresh when a split version's files change."""
    repo = _repo(tmp_path)
    write_model(repo, "m", _failing_model(), version=3)

    async def scenario(registry: ModelRegistry, dataplane: DataPlane) -> None:
        await dataplane.set_rollout(
            "m", {2: 1, 3: 1}, by="t", why="", rules={"max_error_rate": 0.2}
        )
        split = rollouts.parse_split({2: 1, 3: 1})
        on_3 = iter(k for k in KEYS if split.pick("m", k) == 3)
        on_2 = [k for k in KEYS if split.pick("m", k) == 2]
        one, two = np.ones((1, 3), np.float32), np.ones((2, 3), np.float32)
        for key in on_2[:10]:
            await dataplane.infer(InferenceRequest("m", {"input": one}, id=key))
        for _ in range(9):  # the old files fail: 9 of 9, one short of being judged
            with pytest.raises(FerryError):
                await dataplane.infer(InferenceRequest("m", {"input": one}, id=next(on_3)))
        new = repo.model_dir("m") / "3" / "model.new"
        new.write_bytes(_odd_failing_model().SerializeToString())
        new.replace(new.with_name("model.onnx"))
        assert "m/3" in (await registry.refresh(retry_failed=False)).loaded
        for _ in range(10):
            await dataplane.infer(InferenceRequest("m", {"input": two}, id=next(on_3)))
        with pytest.raises(FerryError):
            await dataplane.infer(InferenceRequest("m", {"input": one}, id=next(on_3)))
        await asyncio.gather(*dataplane._decisions)
        assert dataplane.rollout("m").split == ((2, 1.0), (3, 1.0))  # 1 of 11: kept

    _run(repo, scenario)


def test_a_rules_decision_that_fails_unexpectedly_is_tried_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The decision's task caught only FerryError: any other exception (a fault of the
    server's own while writing rollout.json) ended it, the decision was lost, and the version
    the rule took out stayed marked decided, so it was never judged again and kept its share of
    the split for good. It is logged with its traceback once and tried again like a disk's."""
    import logging
    import os

    from ferry.server.core import repository as repository_module
    from ferry.server.core import rule_decisions

    monkeypatch.setattr(rule_decisions, "DECISION_RETRY", (0.0, 0.0))
    repo = _split_rule_repo(tmp_path)
    replace = os.replace
    calls: list[int] = []

    async def scenario(registry: ModelRegistry, dataplane: DataPlane) -> None:
        await dataplane.set_rollout(
            "m", {2: 1, 3: 1}, by="t", why="", rules={"max_error_rate": 0.2}
        )

        def faulty(src: object, dst: object) -> None:
            calls.append(1)
            if len(calls) < 3:
                raise ValueError("a fault of the server's own")
            replace(src, dst)  # type: ignore[arg-type]

        monkeypatch.setattr(repository_module.os, "replace", faulty)
        await _route_until_the_rule_acts(dataplane)  # no shadow: the decisions alone
        view = dataplane.rollout("m")
        assert view.split == ((2, 1.0),) and view.history[-1]["by"] == "rollout rules"
        assert dataplane.unapplied_decisions() == {}

    with caplog.at_level(logging.WARNING, logger="ferry.server.core.dataplane"):
        _run(repo, scenario)
    assert len(calls) == 3
    traced = [r for r in caplog.records if r.exc_info and "a fault" in str(r.exc_info[1])]
    assert len(traced) == 1  # the traceback once, not at every try


def test_get_rollout_reads_the_file_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GetRollout (and SetRollout's answer) read and parsed rollout.json's history, up to
    1 MiB of JSON, on the event loop at every call: each stalled every request the process
    was serving, and a repository on a hung mount stalled them for good. Read in a thread."""
    repo = _repo(tmp_path)
    write_model(repo, "gone", seed_model())
    on_loop: list[str] = []

    def watched(read: Any) -> Any:
        def on(model_dir: Path) -> Any:
            try:
                asyncio.get_running_loop()
                on_loop.append(read.__name__)
            except RuntimeError:
                pass
            return read(model_dir)

        return on

    monkeypatch.setattr(rollouts, "history", watched(rollouts.history))
    monkeypatch.setattr(rollouts, "read", watched(rollouts.read))

    async def scenario(registry: ModelRegistry, dataplane: DataPlane) -> None:
        view = await dataplane.set_rollout("m", {1: 1, 2: 1}, by="t", why="canary")
        assert view.history[-1]["why"] == "canary"
        assert (await dataplane.total_rollout("m")).history[-1]["why"] == "canary"
        await dataplane.set_rollout("gone", {1: 1}, by="t", why="kept")
        await dataplane.unload("gone")
        view = await dataplane.total_rollout("gone")  # not served: as the file holds it
        assert view.split == ((1, 1.0),) and view.history[-1]["why"] == "kept"

    _run(repo, scenario)
    assert on_loop == []
