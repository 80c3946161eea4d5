"""Planned batches gathered once into reused, bound buffers (issue 16, item 3), on CPU: every
dtype exact with padding and slicing, no batch's data ever visible in another's outputs, two
batches of one size at once, bounded buffers, and the plain path for string tensors."""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
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
from ferry.server.errors import Unavailable
from ferry.server.examples import ONNX_TYPES, identity_model, two_io_model, write_model
from ferry.server.runtime import session as session_module
from ferry.server.runtime import staging
from ferry.server.runtime.plans import PlannedSession


@pytest.fixture(params=[False, True], ids=["plain-run", "iobinding"])
def bind(request: pytest.FixtureRequest) -> bool:
    """Both ways a gathered batch runs: a plain run over the buffers (CPU's default) and the
    IOBinding a device uses, forced on CPU."""
    return bool(request.param)


def _open(
    tmp_path: Path, model: onnx.ModelProto, sizes: list[int], max_batch: int, bind: bool = False
) -> Any:
    path = tmp_path / "1" / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    config = {"batching": {"planned_batch_sizes": sizes, "max_batch_size": max_batch}}
    planned = session_module.open_session(path, parse_config(config))
    assert isinstance(planned, PlannedSession)
    for stager in planned.stagers.values():
        stager.bind = bind
    return planned


def _rows(datatype: str, n: int, start: int = 0, width: int = 2) -> np.ndarray:
    if datatype == "BYTES":
        return np.array([[f"r{start + i}"] * width for i in range(n)], dtype=object)
    values = (np.arange(start * width, (start + n) * width) % 97).reshape(n, width)
    return values.astype(numpy_dtype(datatype_from_name(datatype)))


def _batch(planned: PlannedSession, parts: list[dict[str, np.ndarray]], names: Any = None) -> Any:
    return planned.run_gathered(planned.gather(parts, list(parts[0])), names)


@pytest.mark.parametrize("datatype", sorted(set(ONNX_TYPES) - {"BYTES"}))
def test_gathered_batches_are_exact_for_every_dtype(
    tmp_path: Path, bind: bool, datatype: str
) -> None:
    planned = _open(tmp_path, identity_model(datatype), [2, 4], 8, bind)
    assert set(planned.stagers) == {2, 4, 8}
    start = 0
    for split in ([1], [1, 2], [2, 2], [3, 1, 1], [1, 1, 1, 1, 1, 1, 2], [7]):
        parts = []
        for n in split:
            parts.append({"input": _rows(datatype, n, start)})
            start += n
        gathered = planned.gather(parts, ["input"])
        rows = sum(split)
        if gathered.buffers is not None:  # padded with the last real row, inside the buffer
            buffer = gathered.buffers.arrays["input"]
            assert buffer.dtype == np.dtype(numpy_dtype(datatype_from_name(datatype)))
            assert (buffer[rows:] == parts[-1]["input"][-1]).all()
        (out,) = planned.run_gathered(gathered, None)
        expected = np.concatenate([p["input"] for p in parts])
        assert out.dtype == expected.dtype and out.shape == expected.shape
        assert np.array_equal(out.view(np.uint8), expected.view(np.uint8))  # bit for bit
    planned.release()


def test_a_held_output_never_changes_when_the_buffers_are_reused(
    tmp_path: Path, bind: bool
) -> None:
    planned = _open(tmp_path, identity_model("FP32"), [4], 4, bind)
    a = np.full((3, 2), 1.0, np.float32)
    b = np.full((3, 2), 2.0, np.float32)
    (out_a,) = _batch(planned, [{"input": a[:1]}, {"input": a[1:]}])
    (out_b,) = _batch(planned, [{"input": b[:2]}, {"input": b[2:]}])
    assert planned.stagers[4].created == 1  # the second batch reused the first one's buffer
    assert np.array_equal(out_a, a) and np.array_equal(out_b, b)
    assert not np.shares_memory(out_a, out_b)
    planned.release()


def test_an_output_one_batch_did_not_ask_for_is_not_written_under_another(
    tmp_path: Path, bind: bool
) -> None:
    """An output left bound from batch A would be written in place by batch B's run."""
    planned = _open(tmp_path, two_io_model(), [4], 4, bind)
    part = {"a": np.ones((3, 4), np.float32), "b": np.ones((3, 4), np.int64)}
    total_a, scaled_a = _batch(planned, [part], ["sum", "scaled"])
    other = {"a": np.zeros((3, 4), np.float32), "b": np.full((3, 4), 5, np.int64)}
    (total_b,) = _batch(planned, [other], ["sum"])
    assert (scaled_a == 3).all() and (total_a == 2).all() and (total_b == 5).all()
    planned.release()


def test_two_batches_of_one_size_at_once_take_two_buffer_sets(tmp_path: Path) -> None:
    planned = _open(tmp_path, identity_model("INT64"), [4], 4)
    first = planned.gather([{"input": _rows("INT64", 3, 0)}], ["input"])
    second = planned.gather([{"input": _rows("INT64", 2, 10)}], ["input"])
    assert first.buffers is not second.buffers
    (out_second,) = planned.run_gathered(second, None)
    (out_first,) = planned.run_gathered(first, None)
    assert np.array_equal(out_first, _rows("INT64", 3, 0))
    assert np.array_equal(out_second, _rows("INT64", 2, 10))
    assert planned.stagers[4].created == 2
    planned.release()


def test_concurrent_batches_each_get_their_own_rows(tmp_path: Path) -> None:
    planned = _open(tmp_path, identity_model("INT32"), [2, 4, 8], 8)

    def one(i: int) -> bool:
        n = 1 + i % 7
        parts = [{"input": _rows("INT32", 1, 100 * i + k)} for k in range(n)]
        (out,) = _batch(planned, parts)
        return np.array_equal(out, np.concatenate([p["input"] for p in parts]))

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(one, range(200)))
    for stager in planned.stagers.values():
        assert stager.created <= 4  # at most one set per thread running at once
        assert all(len(free) <= staging.KEEP_PER_SHAPE for free in stager._free.values())
    planned.release()


def test_dynamic_non_batch_dims_keep_a_bounded_number_of_shapes(tmp_path: Path) -> None:
    planned = _open(tmp_path, identity_model("FP16", ("batch", "n")), [4], 4)
    for width in range(1, 2 * staging.KEEP_SHAPES + 2):
        parts = [{"input": _rows("FP16", 2, width, width)}, {"input": _rows("FP16", 1, 0, width)}]
        (out,) = _batch(planned, parts)
        assert np.array_equal(out, np.concatenate([p["input"] for p in parts]))
        assert len(planned.stagers[4]._free) <= staging.KEEP_SHAPES
    planned.release()


def test_one_request_of_exactly_a_planned_size_is_fed_as_is(tmp_path: Path) -> None:
    planned = _open(tmp_path, identity_model("FP32"), [4], 4)
    x = np.arange(8, dtype=np.float32).reshape(4, 2)
    gathered = planned.gather([{"input": x}], ["input"])
    assert gathered.buffers is None and gathered.feeds is not None
    assert gathered.feeds["input"] is x
    assert np.array_equal(planned.run_gathered(gathered, None)[0], x)
    planned.release()


def test_string_tensors_take_the_plain_path(tmp_path: Path) -> None:
    planned = _open(tmp_path, identity_model("BYTES"), [4], 4)
    assert planned.stagers == {}
    parts = [{"input": _rows("BYTES", 1, 0)}, {"input": _rows("BYTES", 2, 1)}]
    gathered = planned.gather(parts, ["input"])
    assert gathered.buffers is None
    (out,) = planned.run_gathered(gathered, None)
    assert out.tolist() == np.concatenate([p["input"] for p in parts]).tolist()
    planned.release()


def test_buffers_are_made_at_warm_up_and_dropped_at_release(tmp_path: Path) -> None:
    planned = _open(tmp_path, identity_model("FP32"), [2, 4], 4)
    planned.warm_up(1)
    assert all(s.created == 1 for s in planned.stagers.values())
    (out,) = _batch(planned, [{"input": np.ones((1, 1), np.float32)}])  # the warm-up's shape
    assert out.tolist() == [[1.0]] and planned.stagers[2].created == 1
    gathered = planned.gather([{"input": np.ones((1, 1), np.float32)}], ["input"])
    planned.release()
    assert all(not s._free for s in planned.stagers.values())
    with pytest.raises(Unavailable):
        planned.run_gathered(gathered, None)
    assert all(not s._free for s in planned.stagers.values())  # the set in hand was dropped


def test_batched_requests_through_the_core_get_their_own_rows(tmp_path: Path) -> None:
    repo = ModelRepository(tmp_path / "repo", create=True)
    write_model(repo, "m", identity_model("INT64"))
    config = {"batching": {"planned_batch_sizes": [2, 4], "max_batch_size": 8}}
    config["instances"] = {"count": 2}  # type: ignore[dict-item]
    (repo.model_dir("m") / "config.json").write_text(json.dumps(config))
    registry = ModelRegistry(repo, session_module.open_session, warm_up=True)
    dataplane = DataPlane(registry)

    async def scenario() -> None:
        await registry.refresh()
        inputs = [_rows("INT64", 1 + i % 3, 10 * i) for i in range(24)]
        results = await asyncio.gather(
            *(dataplane.infer(InferenceRequest("m", {"input": x})) for x in inputs)
        )
        for x, result in zip(inputs, results, strict=True):
            assert np.array_equal(next(iter(result.outputs.values())), x)
        await registry.close()

    asyncio.run(scenario())


def test_inputs_bound_again_after_each_gather_stay_exact(tmp_path: Path) -> None:
    """The device path binds its buffers again after every gather (onnxruntime copies a bound
    input to the device when it is bound): the same code on CPU, where it is no copy."""
    planned = _open(tmp_path, two_io_model(), [2, 4], 4)
    for stager in planned.stagers.values():
        stager.bind = True
    for i in range(4):
        parts = [
            {"a": np.full((1, 4), i, np.float32), "b": np.full((1, 4), i, np.int64)}
            for _ in range(1 + i % 3)
        ]
        total, scaled = _batch(planned, parts, ["sum", "scaled"])
        assert (total == 2 * i).all() and (scaled == 3 * i).all() and len(total) == len(parts)
    planned.release()
