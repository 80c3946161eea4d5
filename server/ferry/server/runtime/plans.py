"""Planned batch sizes: batches run only at a fixed set of sizes, each on a session of its own.

On a GPU, onnxruntime's CUDA convolutions keep the plan of the last input shape only: every
change of batch size searched cuDNN again (132-137 ms per run with the default exhaustive
search, against 1.7 ms for a fixed batch of 8; ../shared/reference/gpu.md), so dynamic batching
ran ten times slower than no batching. Here a batch of ``n`` rows runs at the smallest planned
size ``>= n``: its inputs are padded with copies of their last row, the outputs sliced back to
``n``, and each planned size has a session that only ever sees that size. In steady state no
execution re-plans, and ``plan_changes`` (executions whose shape differed from that session's
previous one; only dynamic non-batch dimensions can cause them) says so. A batch's requests are
gathered once, straight into a buffer that size keeps (bound on a device; staging.py counts the
copies on each path), not concatenated and then copied again to pad.

Used by default for GPU providers (powers of two up to ``max_batch_size``) and wherever a model's
config lists ``batching.planned_batch_sizes``; CPU sessions do not need it and do not get it.
"""

from __future__ import annotations

import logging
from bisect import bisect_left
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ferry.server.batching.tensors import concat, real_rows
from ferry.server.core.types import TensorSpec
from ferry.server.errors import InternalError
from ferry.server.runtime.staging import Buffers, Stager, bindable

log = logging.getLogger(__name__)


def plan_sizes(
    configured: tuple[int, ...] | None, device_kind: str, max_batch: int
) -> tuple[int, ...]:
    """The sizes batches run at; () for no plan. ``max_batch_size`` is always one of them (so
    every batch has a size), and sizes above it are dropped."""
    if max_batch <= 0:
        return ()
    if configured is None:
        if device_kind == "cpu":
            return ()
        sizes = {1 << k for k in range(max_batch.bit_length()) if (1 << k) < max_batch}
    elif not configured:
        return ()
    else:
        sizes = {s for s in configured if s < max_batch}
    return tuple(sorted({*sizes, max_batch}))


def pad_rows(array: np.ndarray, rows: int) -> np.ndarray:
    """``array`` with copies of its last row appended up to ``rows`` rows (a real row, never
    zeros: a zero row can be out of a model's domain, e.g. an embedding index)."""
    missing = rows - array.shape[0]
    if missing <= 0:
        return array
    return np.concatenate([array, np.repeat(array[-1:], missing, axis=0)], axis=0)


@dataclass(slots=True)
class Gathered:
    """A batch ready to run at a planned size: in a staged buffer set, or as plain feeds (a
    model with string tensors; one request that is exactly a planned size)."""

    rows: int
    size: int
    buffers: Buffers | None = None
    feeds: dict[str, np.ndarray] | None = None


class PlannedSession:
    """A version served at planned batch sizes: one session per size, used as one session."""

    def __init__(self, sessions: dict[int, Any]) -> None:
        self.sizes = tuple(sorted(sessions))
        self._sessions = sessions
        first = sessions[self.sizes[0]]
        self.inputs: list[TensorSpec] = first.inputs
        self.outputs: list[TensorSpec] = first.outputs
        self.providers: list[str] = first.providers
        self.device_kind: str = first.device_kind
        self.inline_allowed: bool = first.inline_allowed
        self.batch_checked: bool = getattr(first, "batch_checked", True)
        self.rows_unproven: bool = getattr(first, "rows_unproven", False)
        self.output_names = [s.name for s in self.outputs]
        self.executions = dict.fromkeys(self.sizes, 0)
        self.plan_changes = 0
        self._last_shape: dict[int, tuple[tuple[int, ...], ...]] = {}
        # One stager per size (staging.py): its inputs gathered once into reused buffers.
        self.stagers: dict[int, Stager] = (
            {size: Stager(s, size) for size, s in sessions.items()} if bindable(first) else {}
        )

    def batchable(self) -> bool:
        return True

    def check_rows(self, row: dict[str, np.ndarray], max_batch: int) -> tuple[bool, str]:
        """The smallest size's session checks, unpadded: a planned run pads the rows and cuts
        the outputs back to them, which would hide a first dimension that is not the rows'."""
        result: tuple[bool, str] = self._sessions[self.sizes[0]].check_rows(row, max_batch)
        return result

    def size_for(self, rows: int) -> int:
        i = bisect_left(self.sizes, rows)
        if i == len(self.sizes):
            raise InternalError(
                f"a batch of {rows} is over the largest planned size {self.sizes[-1]}"
            )
        return self.sizes[i]

    def gather(self, parts: Sequence[dict[str, np.ndarray]], order: Sequence[str]) -> Gathered:
        """The requests' rows in one tensor per input of a planned size: one copy per row."""
        first = order[0]
        rows = sum([part[first].shape[0] for part in parts])
        size = self.size_for(rows)
        stager = self.stagers.get(size)
        if stager is None:  # string tensors: concatenated, then padded (two copies)
            feeds = concat(parts, order)
            return Gathered(rows, size, feeds={n: pad_rows(a, size) for n, a in feeds.items()})
        if len(parts) == 1 and rows == size:  # fits exactly: onnxruntime reads it in place
            return Gathered(rows, size, feeds=parts[0])
        return Gathered(rows, size, buffers=stager.gather(parts, rows))

    def run_gathered(
        self, batch: Gathered, output_names: list[str] | None = None
    ) -> list[np.ndarray]:
        names = output_names or self.output_names
        size = batch.size
        if batch.buffers is not None:
            shape = tuple(a.shape for a in batch.buffers.arrays.values())
        else:
            assert batch.feeds is not None
            shape = tuple(a.shape for a in batch.feeds.values())
        last = self._last_shape.get(size)
        if last is not None and last != shape:
            self.plan_changes += 1
        self._last_shape[size] = shape
        self.executions[size] += 1
        if batch.buffers is not None:
            return self.stagers[size].run(batch.buffers, batch.rows, names)
        assert batch.feeds is not None
        outputs = self._sessions[size].run(batch.feeds, names)
        return real_rows(outputs, names, size, batch.rows)

    def run(
        self, feeds: dict[str, np.ndarray], output_names: list[str] | None = None
    ) -> list[np.ndarray]:
        return self.run_gathered(self.gather([feeds], list(feeds)), output_names)

    def warm_up(self, batch_size: int) -> None:
        """Every planned size, before the version reports ready: the first run of a shape is
        where a GPU provider plans it; the staged path's buffers and binding are made here too."""
        for size in self.sizes:
            session = self._sessions[size]
            stager = self.stagers.get(size)
            if stager is None:
                session.warm_up(size)
            else:  # one run, through the path requests take: it warms the session as well
                stager.warm_up(session.zero_feeds(size), self.output_names)

    def plan_statistics(self) -> tuple[tuple[tuple[int, int], ...], int]:
        return tuple(self.executions.items()), self.plan_changes

    def release(self) -> None:
        for stager in self.stagers.values():
            stager.release()
        for session in self._sessions.values():
            session.release()


def open_planned(open_one: Callable[[], Any], first: Any, sizes: tuple[int, ...]) -> PlannedSession:
    """``first`` serves the smallest size; ``open_one`` opens each of the others."""
    sessions = {sizes[0]: first}
    try:
        for size in sizes[1:]:
            sessions[size] = open_one()
    except BaseException:
        for session in sessions.values():
            session.release()
        raise
    log.info("planned batch sizes %s: one session each", list(sizes))
    return PlannedSession(sessions)
