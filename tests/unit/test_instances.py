"""A version served on several devices (issue 16, part 4), on CPU: one session per device, opened
with that device's id; batches spread over the instances and never more at once on a device than
its count; planned batch sizes per device; the placement in the version's metadata."""

from __future__ import annotations

import asyncio
import functools
import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ferry.cli.models import describe_text
from ferry.client._requests import parse_metadata
from ferry.proto.kserve.v2 import model_config_pb2 as mc
from ferry.server.core.config import ModelConfig, parse_config
from ferry.server.core.dataplane import DataPlane, InferenceRequest
from ferry.server.core.pools import ThreadPools
from ferry.server.core.registry import ModelRegistry
from ferry.server.core.repository import ModelRepository
from ferry.server.core.stats_merge import merge
from ferry.server.core.types import State
from ferry.server.examples import mlp_model, write_model
from ferry.server.grpc import inference as ferry_v1
from ferry.server.grpc import kserve_model
from ferry.server.metrics import Metrics
from ferry.server.runtime.instances import DeviceSessions
from ferry.server.runtime.placement import Device
from ferry.server.runtime.plans import PlannedSession
from ferry.server.runtime.session import open_one, open_session
from ferry.server.workers.control import decode, encode, stats_from_json, stats_to_json

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
WAIT = 30.0  # seconds a gate waits at most: a bound on a broken test, never a synchronisation


class Gate:
    """Holds every run until opened, and records what ran where at once."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.lock = threading.Lock()
        self.running: dict[int, int] = {}
        self.peak: dict[int, int] = {}
        self.ran: dict[int, int] = {}
        self.arrived = threading.Event()  # ``expected`` runs are held at once
        self.open = threading.Event()

    def hold(self, device: int) -> None:
        with self.lock:
            self.running[device] = self.running.get(device, 0) + 1
            self.ran[device] = self.ran.get(device, 0) + 1
            self.peak[device] = max(self.peak.get(device, 0), self.running[device])
            if sum(self.running.values()) == self.expected:
                self.arrived.set()
        try:
            assert self.open.wait(WAIT), "the test never opened the gate"
        finally:
            with self.lock:
                self.running[device] -= 1


class GpuLike:
    """A real CPU session standing in for one device's GPU session: runs wait at the gate."""

    def __init__(self, real: Any, device: int, gate: Gate | None) -> None:
        self.real, self.device, self.gate = real, device, gate
        self.inputs, self.outputs = real.inputs, real.outputs
        self.providers = [CUDA, CPU]
        self.device_kind = "gpu"
        self.inline_allowed = False  # a GPU's batches never run on the event loop

    def batchable(self) -> bool:
        return bool(self.real.batchable())

    def run(self, feeds: dict[str, np.ndarray], names: list[str] | None = None) -> Any:
        if self.gate is not None:
            self.gate.hold(self.device)
        return self.real.run(feeds, names)

    def gather(self, parts: Any, order: Any) -> Any:
        return self.real.gather(parts, order)

    def run_gathered(self, gathered: Any, names: list[str] | None = None) -> Any:
        if self.gate is not None:
            self.gate.hold(self.device)
        return self.real.run_gathered(gathered, names)

    def warm_up(self, batch_size: int) -> None:
        self.real.warm_up(batch_size)

    def release(self) -> None:
        self.real.release()


def _device_of(config: ModelConfig) -> int:
    (cuda,) = [p for p in config.onnxruntime.providers if p.name == CUDA]
    device = cuda.options_dict()["device_id"]
    assert isinstance(device, int)
    return device


def _opener(opened: list[tuple[int, ModelConfig]], gate: Gate | None) -> Any:
    def open_device(path: Path, config: ModelConfig) -> Any:
        device = _device_of(config)
        opened.append((device, config))
        cpu = parse_config({"onnxruntime": {"providers": [CPU]}, "batching": {}})
        return GpuLike(open_one(path, cpu), device, gate)

    return functools.partial(open_session, open_device=open_device)


def _repo(tmp_path: Path, instances: dict[str, Any]) -> ModelRepository:
    repo = ModelRepository(tmp_path / "repo", create=True)
    write_model(repo, "m", mlp_model((6, 5, 3)))
    config = {
        "batching": {"max_batch_size": 1},
        "instances": instances,
        "onnxruntime": {"providers": [{"name": CUDA}, {"name": CPU}]},
    }
    (repo.model_dir("m") / "config.json").write_text(json.dumps(config))
    return repo


async def _held_calls(dataplane: DataPlane, gate: Gate, n: int) -> list[asyncio.Task[Any]]:
    """``n`` requests started; returns once the gate holds ``gate.expected`` of them at once."""
    x = np.ones((1, 6), np.float32)
    calls = [
        asyncio.create_task(dataplane.infer(InferenceRequest("m", {"input": x}))) for _ in range(n)
    ]
    assert await asyncio.to_thread(gate.arrived.wait, WAIT)
    return calls


def test_each_device_gets_a_session_opened_with_its_id_and_batches_spread_within_count(
    tmp_path: Path,
) -> None:
    opened: list[tuple[int, ModelConfig]] = []
    gate = Gate(expected=4)  # 2 devices x count 2
    pools = ThreadPools(execution_threads=8)  # more threads than instances: the bound is theirs
    repo = _repo(tmp_path, {"count": 2, "device_ids": [0, 1]})
    registry = ModelRegistry(repo, _opener(opened, gate), warm_up=False, pools=pools)
    dataplane = DataPlane(registry)

    async def scenario() -> None:
        await registry.refresh()
        # One session per device, not per instance, each opened for its device alone.
        assert [device for device, _ in opened] == [0, 1]
        assert all(config.instances.count == 2 for _, config in opened)
        lv = registry.get("m", None)
        assert isinstance(lv.session, DeviceSessions)
        calls = await _held_calls(dataplane, gate, 6)
        with gate.lock:
            assert gate.running == {0: 2, 1: 2}  # spread: both instances of both devices
        gate.open.set()
        results = await asyncio.gather(*calls)
        assert all(r.outputs["logits"].shape == (1, 3) for r in results)
        # Never more than count at once on one device, and no run was lost.
        assert gate.peak == {0: 2, 1: 2}
        assert sum(gate.ran.values()) == 6
        assert lv.session.peak == [2, 2] and sum(lv.session.executions) == 6
        # Statistics count executions per device; summed over worker processes; as metrics.
        (stats,) = dataplane.statistics("m")
        assert dict(stats.device_executions) == gate.ran
        twice = merge([stats, stats_from_json(decode(encode(stats_to_json(stats))))])
        assert dict(twice[0].device_executions) == {d: 2 * n for d, n in gate.ran.items()}
        text = Metrics(dataplane).render().decode()
        for device, n in gate.ran.items():
            assert (
                f'ferry_device_executions_total{{model="m",version="1",device="{device}"}} {n}'
                in text
            )
        await registry.close()

    try:
        asyncio.run(scenario())
    finally:
        gate.open.set()
        pools.shutdown()


def test_two_devices_with_one_instance_each_run_two_batches_at_once(tmp_path: Path) -> None:
    opened: list[tuple[int, ModelConfig]] = []
    gate = Gate(expected=2)
    pools = ThreadPools(execution_threads=4)
    repo = _repo(tmp_path, {"device_ids": [1, 0]})
    registry = ModelRegistry(repo, _opener(opened, gate), warm_up=False, pools=pools)
    dataplane = DataPlane(registry)

    async def scenario() -> None:
        await registry.refresh()
        assert [device for device, _ in opened] == [1, 0]
        calls = await _held_calls(dataplane, gate, 3)
        with gate.lock:
            assert gate.running == {0: 1, 1: 1}
        gate.open.set()
        await asyncio.gather(*calls)
        assert gate.peak == {0: 1, 1: 1}
        # Metadata says where the instances are, in every form a client reads.
        meta = dataplane.metadata("m")
        assert (meta.instance_count, meta.device_ids, meta.device_kind) == (1, (1, 0), "gpu")
        group = kserve_model.config_of(meta).instance_group[0]
        assert (group.count, list(group.gpus), group.kind) == (
            1,
            [1, 0],
            mc.ModelInstanceGroup.KIND_GPU,
        )
        seen = parse_metadata(ferry_v1.metadata_of(meta))
        assert seen.batching.device_ids == (1, 0) and seen.batching.instance_count == 1
        assert "1 instance(s) on each of GPUs [1, 0]" in describe_text(seen)
        await registry.close()

    try:
        asyncio.run(scenario())
    finally:
        gate.open.set()
        pools.shutdown()


def test_sequential_batches_take_turns_over_the_devices() -> None:
    class Counting:
        inputs: list[Any] = []
        outputs: list[Any] = []
        providers = [CUDA]
        device_kind = "gpu"
        inline_allowed = False

        def __init__(self) -> None:
            self.runs = 0

        def run(self, feeds: Any, names: Any = None) -> list[np.ndarray]:
            self.runs += 1
            return []

    a, b = Counting(), Counting()
    sessions = DeviceSessions(
        [(Device(0, (), 2), a), (Device(1, (), 2), b)]  # type: ignore[list-item]
    )
    for _ in range(4):
        sessions.run({})
    assert (a.runs, b.runs) == (2, 2) and sessions.device_ids == (0, 1)


def test_planned_batch_sizes_get_a_planned_session_per_device(tmp_path: Path) -> None:
    """The real opener: on this CPU-only host CUDA is skipped (with a warning) and each device's
    session runs on CPU, planned as configured."""
    path = tmp_path / "1" / "model.onnx"
    path.parent.mkdir(parents=True)
    onnx.save(mlp_model((6, 5, 3)), str(path))
    config = parse_config(
        {
            "batching": {"max_batch_size": 4, "planned_batch_sizes": [2]},
            "instances": {"device_ids": [0, 1]},
            "onnxruntime": {"providers": [{"name": CUDA}, {"name": CPU}]},
        }
    )
    session = open_session(path, config)
    assert isinstance(session, DeviceSessions)
    assert [d.device_id for d in session.devices] == [0, 1]
    assert all(isinstance(s, PlannedSession) for s in session._sessions)
    x = np.ones((3, 6), np.float32)
    for _ in range(2):
        (out,) = session.run({"input": x})
        assert out.shape == (3, 3)
    assert session.plan_statistics() == (((2, 0), (4, 2)), 0)
    assert session.executions == [1, 1]
    session.release()


def test_a_version_whose_placement_means_nothing_fails_to_load_saying_why(
    tmp_path: Path,
) -> None:
    repo = ModelRepository(tmp_path / "repo", create=True)
    write_model(repo, "m", mlp_model((6, 5, 3)))
    (repo.model_dir("m") / "config.json").write_text(
        json.dumps({"instances": {"device_ids": [0]}})  # CPU only: no GPU to place on
    )
    registry = ModelRegistry(repo, open_session, warm_up=False)

    async def scenario() -> None:
        outcome = await registry.refresh()
        assert outcome.loaded == []
        (status,) = registry.statuses("m")
        assert status.state is State.FAILED
        assert "none of onnxruntime.providers ['CPUExecutionProvider'] runs on a GPU" in (
            status.reason
        )
        await registry.close()

    asyncio.run(scenario())
