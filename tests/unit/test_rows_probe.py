"""A model whose config does not set max_batch_size is batched only when its rows stay apart
(runtime.rows): a set-level model (a Softmax, mean, sort or cumulative sum across its first
dimension) served batched answered each client with a result mixed with another's request."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from ferry.server.core.dataplane import DataPlane, InferenceRequest
from ferry.server.core.registry import ModelRegistry
from ferry.server.core.repository import ModelRepository
from ferry.server.examples import (
    IR_VERSION,
    ONNX_TYPES,
    OPSET,
    identity_model,
    mlp_model,
    write_model,
)
from ferry.server.runtime import session as session_module


def _graph(
    nodes: list[onnx.NodeProto], dims: list[int | str], *inits: onnx.TensorProto
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "across_rows",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, dims)],
        initializer=list(inits),
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def _softmax_over_the_set() -> onnx.ModelProto:
    return _graph([helper.make_node("Softmax", ["x"], ["y"], axis=0)], ["n"])


def _minus_the_mean_of_the_rows() -> onnx.ModelProto:
    return _minus_the_mean_of_the_rows_of(4)


def _minus_the_mean_of_the_rows_of(width: int) -> onnx.ModelProto:
    return _graph(
        [
            helper.make_node("ReduceMean", ["x"], ["m"], axes=[0], keepdims=1),
            helper.make_node("Sub", ["x", "m"], ["y"]),
        ],
        ["batch", width],
    )


def _cumulative_sum_down_the_rows() -> onnx.ModelProto:
    axis = helper.make_tensor("axis", TensorProto.INT64, [], [0])
    return _graph([helper.make_node("CumSum", ["x", "axis"], ["y"])], ["batch", 3], axis)


def _peak_normalised() -> onnx.ModelProto:
    """x / (max|x| + eps) over the whole batch: with rows of 1s and 0s the peak is 1 either way,
    so the first probe let it through and batched clients were scaled by each other's peaks."""
    eps = helper.make_tensor("eps", TensorProto.FLOAT, [], [1e-6])
    return _graph(
        [
            helper.make_node("Abs", ["x"], ["a"]),
            helper.make_node("ReduceMax", ["a"], ["peak"], keepdims=0),
            helper.make_node("Add", ["peak", "eps"], ["d"]),
            helper.make_node("Div", ["x", "d"], ["y"]),
        ],
        ["batch", 4],
        eps,
    )


def _suffix_sum_up_the_rows() -> onnx.ModelProto:
    """A reversed cumulative sum: a row of 0s below adds nothing to the row above."""
    axis = helper.make_tensor("axis", TensorProto.INT64, [], [0])
    return _graph([helper.make_node("CumSum", ["x", "axis"], ["y"], reverse=1)], ["batch", 3], axis)


def _max_batch_size(tmp_path: Path, model: onnx.ModelProto, config: dict | None = None) -> int:
    """The max_batch_size the model is served with, as a refresh loads it."""
    repo = ModelRepository(tmp_path / "repo", create=True)
    write_model(repo, "m", model)
    if config is not None:
        (repo.model_dir("m") / "config.json").write_text(json.dumps(config))
    registry = ModelRegistry(repo, session_module.open_session, warm_up=True)

    async def served() -> int:
        await registry.refresh()
        try:
            return registry.get("m").config.batching.max_batch_size or 0
        finally:
            await registry.close()

    return asyncio.run(served())


@pytest.mark.parametrize(
    "model",
    [
        _softmax_over_the_set,
        _minus_the_mean_of_the_rows,
        _cumulative_sum_down_the_rows,
        _peak_normalised,
        _suffix_sum_up_the_rows,
    ],
)
def test_a_model_that_works_across_its_rows_is_not_batched(
    tmp_path: Path, model: object, caplog: pytest.LogCaptureFixture
) -> None:
    assert _max_batch_size(tmp_path, model()) == 0  # type: ignore[operator]
    assert "differs when another row runs beside it" in caplog.text
    assert "batching.max_batch_size" in caplog.text  # the log says how to decide otherwise


@pytest.mark.parametrize("datatype", sorted(ONNX_TYPES))
def test_models_whose_rows_stay_apart_are_batched_for_every_dtype(
    tmp_path: Path, datatype: str
) -> None:
    assert _max_batch_size(tmp_path, identity_model(datatype)) == 32


def test_an_mlp_is_batched(tmp_path: Path) -> None:
    assert _max_batch_size(tmp_path, mlp_model((6, 5, 3))) == 32


def test_a_set_max_batch_size_is_the_users_word(tmp_path: Path) -> None:
    config = {"batching": {"max_batch_size": 8}}
    assert _max_batch_size(tmp_path, _softmax_over_the_set(), config) == 8


def test_each_client_gets_the_softmax_of_its_own_set_under_concurrency(tmp_path: Path) -> None:
    repo = ModelRepository(tmp_path / "repo", create=True)
    write_model(repo, "sets", _softmax_over_the_set())
    registry = ModelRegistry(repo, session_module.open_session, warm_up=True)
    dataplane = DataPlane(registry)
    rng = np.random.default_rng(0)
    sets = [rng.standard_normal(int(n)).astype(np.float32) for n in rng.integers(1, 6, size=40)]

    async def scenario() -> list[np.ndarray]:
        await registry.refresh()
        assert registry.get("sets").config.batching.max_batch_size == 0
        results = await asyncio.gather(
            *(dataplane.infer(InferenceRequest("sets", {"x": s})) for s in sets)
        )
        await registry.close()
        return [r.outputs["y"] for r in results]

    for x, y in zip(sets, asyncio.run(scenario()), strict=True):
        expected = np.exp(x - x.max()) / np.exp(x - x.max()).sum()
        np.testing.assert_allclose(y, expected, rtol=1e-5)


def test_each_client_gets_its_own_peak_normalisation_under_concurrency(tmp_path: Path) -> None:
    repo = ModelRepository(tmp_path / "repo", create=True)
    write_model(repo, "peak", _peak_normalised())
    registry = ModelRegistry(repo, session_module.open_session, warm_up=True)
    dataplane = DataPlane(registry)
    rng = np.random.default_rng(1)
    requests = [(rng.standard_normal((1, 4)) * (i + 1)).astype(np.float32) for i in range(32)]

    async def scenario() -> list[np.ndarray]:
        await registry.refresh()
        assert registry.get("peak").config.batching.max_batch_size == 0
        results = await asyncio.gather(
            *(dataplane.infer(InferenceRequest("peak", {"x": x})) for x in requests)
        )
        await registry.close()
        return [r.outputs["y"] for r in results]

    for x, y in zip(requests, asyncio.run(scenario()), strict=True):
        np.testing.assert_allclose(y, x / (np.abs(x).max() + 1e-6), rtol=1e-5)


def test_a_model_the_probe_rows_cannot_run_on_is_batched_on_its_shapes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A table of one row: the probe's index 1 is past it. Nothing can be told, so the shapes
    decide, as they did before the probe (the core runs its requests alone until a real batch
    proves its rows apart: core.loaded), and the log says how to turn batching off."""
    table = helper.make_tensor("table", TensorProto.FLOAT, [1, 2], [0.5, 1.5])
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["y"], axis=0)],
        "lookup",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])],
        initializer=[table],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    assert _max_batch_size(tmp_path, model) == 32
    assert "on its shapes alone" in caplog.text and "max_batch_size = 0" in caplog.text


def test_a_model_refusing_dynamic_dims_of_one_is_probed_at_a_larger_size(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A 3x3 convolution without padding over dynamic H and W runs on no row of size 1: it was
    batched on its shapes alone, unprobed. At a larger size the probe runs and sees its rows
    stay apart (an explicit check, not the shapes' guess)."""
    weight = helper.make_tensor("w", TensorProto.FLOAT, [2, 1, 3, 3], np.linspace(-1, 1, 18))
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"])],
        "valid_conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1, "H", "W"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2, "h", "w"])],
        initializer=[weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    assert _max_batch_size(tmp_path, model) == 32
    assert "on its shapes alone" not in caplog.text
    # Its warm-up ran the dynamic dims at 1 only: it failed with a WARNING at every load.
    assert "warm-up of" not in caplog.text


def test_a_model_whose_rows_are_too_large_to_probe_is_batched_on_its_shapes_unproven(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Eight made-up rows of an 81 MiB UINT8 input took 11 GB and minutes at every load (a
    server start timed out). Past the probe's bound nothing is made up: the shapes decide, and
    the core runs different callers' requests alone until a real batch proves the rows apart
    (core.loaded), so a model that works across its rows still never mixes callers."""
    from ferry.server.runtime import rows

    monkeypatch.setattr(rows, "PROBE_MAX_BYTES", 8 * 4 * 16 - 1)  # 8 rows of 16 floats, less 1
    assert _max_batch_size(tmp_path, _minus_the_mean_of_the_rows_of(16)) == 32
    assert "too large to probe at load (8 rows take 0 MiB" in caplog.text
    assert "on its shapes alone" in caplog.text


def test_made_up_rows_cost_about_their_own_bytes() -> None:
    """made_up_rows built eight int64 (or float64) rows of each input, stacked and cast them,
    to keep the first: a row of 1 MiB of UINT8 took 128 MiB at its peak. Measured with
    tracemalloc, which numpy reports its buffers to."""
    import tracemalloc

    from ferry.server.runtime import rows

    row = 1 << 20

    class Template:
        def zero_feeds(self, batch: int) -> dict[str, np.ndarray]:
            return {"x": np.zeros((batch, row), np.uint8)}

    tracemalloc.start()
    try:
        made = rows.made_up_rows(Template())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [m["x"].shape for m in made] == [(1, row)] * len(made)
    assert made[0]["x"].dtype == np.uint8 and int(made[0]["x"][0, 0]) == 2  # the integer tier's
    assert peak < 8 * row, f"peak {peak / row:.1f} rows' bytes"
