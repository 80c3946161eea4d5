"""Batching numpy tensors: which requests may share an execution, and concat/split along axis 0."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ferry.server.errors import FailedPrecondition


def batch_key(
    inputs: Mapping[str, np.ndarray], order: Sequence[str]
) -> tuple[tuple[int, ...], ...]:
    """Requests batch together when every input has the same non-batch dims (dtypes are already
    checked against the model's signature, so they are equal)."""
    return tuple(inputs[name].shape[1:] for name in order)


def concat(batch: Sequence[dict[str, np.ndarray]], order: Sequence[str]) -> dict[str, np.ndarray]:
    if len(batch) == 1:
        return batch[0]
    return {name: np.concatenate([item[name] for item in batch], axis=0) for name in order}


def split(
    outputs: Sequence[np.ndarray], names: Sequence[str], sizes: Sequence[int]
) -> list[dict[str, np.ndarray]]:
    """Slice each output back into per-request views (no copies)."""
    if len(sizes) == 1:
        return [dict(zip(names, outputs, strict=True))]
    results: list[dict[str, np.ndarray]] = [{} for _ in sizes]
    for name, out in zip(names, outputs, strict=True):
        start = 0
        for i, size in enumerate(sizes):
            results[i][name] = out[start : start + size]
            start += size
    return results


def real_rows(
    outputs: Sequence[np.ndarray], names: Sequence[str], size: int, rows: int
) -> list[np.ndarray]:
    """A planned run's outputs cut back to the batch's ``rows`` of its ``size``. Cutting an
    output whose first dimension is not the batch's kept that dimension's first entries and
    served them as the answer (a transpose [k, batch] at max_batch_size 1 answered [[1]] for
    [[1, 2, 3]]), where an unplanned run is refused: refused here alike."""
    for name, out in zip(names, outputs, strict=True):
        if np.ndim(out) == 0 or out.shape[0] != size:
            raise FailedPrecondition(
                f"output {name!r} has shape {list(np.shape(out))} for a planned batch of {size} "
                "rows: its first dimension is not a batch dimension; set "
                "batching.max_batch_size = 0 in its config"
            )
    return [out[:rows] for out in outputs]


# onnxruntime may pick other kernels (or another summation order) for another batch size: a
# ulp or two apart is the same answer, a model working across its rows is off by far more.
_RTOL = 1e-3
_RTOL_HALF = 1e-2


def same_answer(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether ``a`` (a row's answer run beside other rows) is ``b`` (its answer run alone),
    up to what another batch size's kernels change."""
    if a.shape != b.shape:
        return False
    if a.dtype.kind == "f" or a.dtype.name == "bfloat16":
        rtol = _RTOL if a.dtype.itemsize >= 4 else _RTOL_HALF
        x, y = a.astype(np.float64), b.astype(np.float64)
        finite = np.abs(y[np.isfinite(y)])
        scale = max(1.0, float(finite.max(initial=0.0)))
        return bool(np.allclose(x, y, rtol=rtol, atol=rtol * 1e-2 * scale, equal_nan=True))
    return bool(np.array_equal(a, b))
