"""Batching numpy tensors: which requests may share an execution, and concat/split along axis 0."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


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
