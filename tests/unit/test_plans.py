"""Planned batch sizes (issue 16, part 1), tested on CPU: which sizes, padding and slicing exact
for every dtype, one session per size that only ever sees its shape, every size warmed before
the version is served, and the statistics that show steady state never re-plans."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from ferry.codec import datatype_from_name, numpy_dtype
from ferry.server.core.config import parse_config
from ferry.server.core.dataplane import DataPlane, InferenceRequest
from ferry.server.core.registry import ModelRegistry
from ferry.server.core.repository import ModelRepository
from ferry.server.errors import InvalidArgument
from ferry.server.examples import ONNX_TYPES, identity_model, mlp_model, write_model
from ferry.server.runtime import session as session_module
from ferry.server.runtime.plans import PlannedSession, pad_rows, plan_sizes


@pytest.mark.parametrize(
    ("configured", "kind", "max_batch", "expected"),
    [
        (None, "gpu", 32, (1, 2, 4, 8, 16, 32)),
        (None, "gpu", 24, (1, 2, 4, 8, 16, 24)),
        (None, "cpu", 32, ()),
        ((4, 8, 64), "cpu", 32, (4, 8, 32)),
        ((), "gpu", 32, ()),
        (None, "gpu", 0, ()),
    ],
)
def test_which_sizes_are_planned(
    configured: tuple[int, ...] | None, kind: str, max_batch: int, expected: tuple[int, ...]
) -> None:
    assert plan_sizes(configured, kind, max_batch) == expected


def test_the_config_takes_a_list_of_sizes_and_refuses_anything_else() -> None:
    cfg = parse_config({"batching": {"planned_batch_sizes": [8, 2, 4, 2]}})
    assert cfg.batching.planned_batch_sizes == (2, 4, 8)
    for bad in ([0], ["8"], 8, [True], [1 << 20]):
        with pytest.raises(InvalidArgument, match="planned_batch_sizes must be a list"):
            parse_config({"batching": {"planned_batch_sizes": bad}})


def _open(tmp_path: Path, model: onnx.ModelProto, sizes: list[int], max_batch: int) -> Any:
    path = tmp_path / "1" / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    config = {"batching": {"planned_batch_sizes": sizes, "max_batch_size": max_batch}}
    return session_module.open_session(path, parse_config(config))


def _rows(datatype: str, n: int) -> np.ndarray:
    if datatype == "BYTES":
        # the core feeds BYTES elements as str (core/inputs.py): so does this test
        return np.array([[f"r{i}", "x"] for i in range(n)], dtype=object)
    dtype = numpy_dtype(datatype_from_name(datatype))
    return (np.arange(n * 2) % 7).reshape(n, 2).astype(dtype)


@pytest.mark.parametrize("datatype", sorted(ONNX_TYPES))
def test_padding_and_slicing_are_exact_for_every_dtype(tmp_path: Path, datatype: str) -> None:
    planned = _open(tmp_path, identity_model(datatype), [2, 4], 8)
    assert isinstance(planned, PlannedSession) and planned.sizes == (2, 4, 8)
    for n in (1, 3, 4, 5, 8):
        x = _rows(datatype, n)
        (out,) = planned.run({"input": x})
        assert out.shape == x.shape and out.dtype == x.dtype
        assert out.tolist() == x.tolist() if datatype == "BYTES" else np.array_equal(out, x)
    assert planned.executions == {2: 1, 4: 2, 8: 2}
    planned.release()


def test_each_size_has_a_session_that_sees_one_shape_only(tmp_path: Path) -> None:
    planned = _open(tmp_path, mlp_model((6, 5, 3)), [1, 2, 4], 8)
    seen: dict[int, set[tuple[int, ...]]] = {}
    for size, inner in planned._sessions.items():
        real = inner.run

        def spy(
            feeds: dict[str, np.ndarray], names: Any = None, *, _s: int = size, _r: Any = real
        ) -> Any:
            seen.setdefault(_s, set()).add(feeds["input"].shape)
            return _r(feeds, names)

        inner.run = spy
    for size, stager in planned.stagers.items():  # batches gathered into a size's buffers
        gather = stager.gather

        def spy_gather(parts: Any, rows: int, *, _s: int = size, _g: Any = gather) -> Any:
            buffers = _g(parts, rows)
            seen.setdefault(_s, set()).add(buffers.arrays["input"].shape)
            return buffers

        stager.gather = spy_gather  # type: ignore[method-assign]
    rng = np.random.default_rng(0)
    for n in rng.integers(1, 9, size=60):
        x = rng.standard_normal((int(n), 6)).astype(np.float32)
        out = planned.run({"input": x})[0]
        assert out.shape == (n, 3)
    assert set(seen) == {1, 2, 4, 8}
    assert all(shapes == {(size, 6)} for size, shapes in seen.items()), seen
    assert planned.plan_changes == 0
    planned.release()


def test_padding_repeats_a_real_row_not_zeros() -> None:
    x = np.array([[5], [7]], np.int64)
    assert pad_rows(x, 4).tolist() == [[5], [7], [7], [7]]


def test_every_size_is_warmed_before_the_version_serves_and_statistics_count_sizes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What warming is for: every planned size's session has run at its size before the first
    # request (whichever path ran it: a plain warm-up, or a staged one through its buffers).
    warmed: list[int] = []
    real = session_module.OrtSession.run

    def record(self: Any, feeds: dict[str, np.ndarray], names: Any = None) -> Any:
        warmed.append(next(iter(feeds.values())).shape[0])
        return real(self, feeds, names)

    monkeypatch.setattr(session_module.OrtSession, "run", record)
    repo = ModelRepository(tmp_path / "repo", create=True)
    write_model(repo, "m", mlp_model((6, 5, 3)))
    (repo.model_dir("m") / "config.json").write_text(
        json.dumps({"batching": {"planned_batch_sizes": [1, 4], "max_batch_size": 8}})
    )
    registry = ModelRegistry(repo, session_module.open_session, warm_up=True)
    dataplane = DataPlane(registry)

    async def scenario() -> None:
        await registry.refresh()
        # (2: the check at load that the outputs' first dimension is the batch's)
        assert sorted(set(warmed)) == [1, 2, 4, 8]
        warmed.clear()
        x = np.ones((3, 6), np.float32)
        result = await dataplane.infer(InferenceRequest("m", {"input": x}))
        assert next(iter(result.outputs.values())).shape == (3, 3)
        (stats,) = dataplane.statistics("m")
        assert dict(stats.planned_executions)[4] == 1 and stats.plan_changes == 0
        assert warmed == [4]  # the request ran at its planned size, on the warmed session
        await registry.close()

    asyncio.run(scenario())
