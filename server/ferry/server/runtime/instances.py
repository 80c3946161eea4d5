"""A version placed on several devices: one session per device, each batch on a free instance.

The batcher runs at most ``instances.total`` batches at once (its ``max_concurrency``); this
class decides which device each one runs on. A device takes at most its ``count`` batches at
once, so the concurrency a user configured per GPU is the concurrency that GPU sees, and ties go
round-robin, so a lightly loaded version still uses every device rather than always the first
(a GPU that is never used is never warm in its caches, and hides a broken device until load).
The instance is chosen on the worker thread that runs the batch, under a lock held only for the
choice; since the batcher never runs more batches than there are instances, one is always free.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ferry.server.core.config import ModelConfig
from ferry.server.core.types import Session, TensorSpec
from ferry.server.errors import InternalError
from ferry.server.runtime import placement
from ferry.server.runtime.placement import Device

log = logging.getLogger(__name__)


class DeviceSessions:
    """Several devices' sessions used as one session (the core's ``Session``)."""

    def __init__(self, placed: list[tuple[Device, Session]]) -> None:
        self.devices = [device for device, _ in placed]
        self._sessions = [session for _, session in placed]
        first = self._sessions[0]
        self.inputs: list[TensorSpec] = first.inputs
        self.outputs: list[TensorSpec] = first.outputs
        self.providers: list[str] = first.providers
        self.device_kind: str = first.device_kind
        self.inline_allowed: bool = all(s.inline_allowed for s in self._sessions)
        self.batch_checked = all(getattr(s, "batch_checked", True) for s in self._sessions)
        self.rows_unproven = any(getattr(s, "rows_unproven", False) for s in self._sessions)
        self.device_ids = tuple(d.device_id for d in self.devices if d.device_id is not None)
        self._free = [d.count for d in self.devices]
        self._running = [0] * len(self.devices)
        self.executions = [0] * len(self.devices)
        self.peak = [0] * len(self.devices)  # most batches one device ran at once
        self._next = 0
        self._lock = threading.Lock()

    def batchable(self) -> bool:
        return self._sessions[0].batchable()

    def check_rows(self, row: dict[str, np.ndarray], max_batch: int) -> tuple[bool, str]:
        """Every device runs the same graph: the first one's session checks."""
        return self._sessions[0].check_rows(row, max_batch)

    def run(
        self, feeds: dict[str, np.ndarray], output_names: list[str] | None = None
    ) -> list[np.ndarray]:
        i = self._acquire()
        try:
            return self._sessions[i].run(feeds, output_names)
        finally:
            self._release(i)

    def gather(self, parts: Sequence[dict[str, np.ndarray]], order: Sequence[str]) -> Any:
        """The instance is taken here, not at the run: a planned session gathers into buffers
        of its own device's session, so the batch must run on the device that gathered it."""
        i = self._acquire()
        try:
            return i, self._sessions[i].gather(parts, order)
        except BaseException:
            self._release(i)
            raise

    def run_gathered(
        self, gathered: Any, output_names: list[str] | None = None
    ) -> list[np.ndarray]:
        i, inner = gathered
        try:
            return self._sessions[i].run_gathered(inner, output_names)
        finally:
            self._release(i)

    def _release(self, i: int) -> None:
        with self._lock:
            self._free[i] += 1
            self._running[i] -= 1

    def _acquire(self) -> int:
        with self._lock:
            n = len(self._free)
            # The device with the most free instances; among equals, the one after the last
            # chosen (max keeps the first of equals, and the order starts at that one).
            best = max(((self._next + k) % n for k in range(n)), key=self._free.__getitem__)
            if not self._free[best]:
                raise InternalError(
                    f"every instance of this version is busy ({sum(self._running)} batches "
                    "running): the batcher ran more batches than instances.count allows"
                )
            self._free[best] -= 1
            self._running[best] += 1
            self.executions[best] += 1
            self.peak[best] = max(self.peak[best], self._running[best])
            self._next = (best + 1) % n
            return best

    def warm_up(self, batch_size: int) -> None:
        """Every device before the version reports ready: a device's first run is where its
        provider allocates and plans."""
        for session in self._sessions:
            session.warm_up(batch_size)

    def plan_statistics(self) -> tuple[tuple[tuple[int, int], ...], int]:
        """Planned batch sizes (runtime.plans) summed over the devices: () when none plans."""
        executions: dict[int, int] = {}
        changes = 0
        for session in self._sessions:
            plan = getattr(session, "plan_statistics", None)
            if plan is None:
                continue
            sizes, changed = plan()
            changes += changed
            for size, count in sizes:
                executions[size] = executions.get(size, 0) + count
        return tuple(sorted(executions.items())), changes

    def device_statistics(self) -> tuple[tuple[int, int], ...]:
        """Executions per placed device id (the version's statistics)."""
        return tuple(
            (d.device_id, n)
            for d, n in zip(self.devices, self.executions, strict=True)
            if d.device_id is not None
        )

    def release(self) -> None:
        for session in self._sessions:
            session.release()


def open_placed(config: ModelConfig, open_device: Callable[[ModelConfig], Any]) -> DeviceSessions:
    """One session per device of the config's placement, each opened by ``open_device`` with
    that device's config (its providers given the device id); those opened are released if a
    later one fails, so a failed load holds no GPU memory."""
    devices = placement.place(config.onnxruntime.providers, config.instances)
    opened: list[tuple[Device, Session]] = []
    try:
        for device in devices:
            opened.append((device, open_device(placement.device_config(config, device))))
    except BaseException:
        for _, session in opened:
            session.release()
        raise
    log.info(
        "instances: %s",
        ", ".join(f"{d.count} on device {d.device_id}" for d in devices),
    )
    return DeviceSessions(opened)
