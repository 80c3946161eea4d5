"""The batcher's own counters (planned sizes, plan changes, executions per GPU) on the ferry.v1
wire and back into the SDK's ModelStatistics: the device counts cannot be produced on a CPU-only
box through a real server, so the adapter and the parser are checked against each other here."""

from __future__ import annotations

from ferry.client._requests import parse_statistics
from ferry.proto.v1 import inference_pb2 as pb
from ferry.server.core.types import Duration, VersionStatistics
from ferry.server.grpc.inference import statistics_of


def _version(
    planned: tuple[tuple[int, int], ...] = (),
    changes: int = 0,
    devices: tuple[tuple[int, int], ...] = (),
) -> VersionStatistics:
    zero = Duration()
    return VersionStatistics(
        name="m",
        version=3,
        last_inference_ms=0,
        inference_count=12,
        execution_count=5,
        success=zero,
        fail=zero,
        queue=zero,
        compute_input=zero,
        compute_infer=zero,
        compute_output=zero,
        batches=(),
        rejected=0,
        expired=0,
        queue_depth=0,
        planned_executions=planned,
        plan_changes=changes,
        device_executions=devices,
    )


def test_planned_sizes_plan_changes_and_devices_reach_the_sdk() -> None:
    wire = statistics_of(
        _version(planned=((1, 0), (4, 2), (8, 3)), changes=1, devices=((0, 2), (3, 3)))
    )
    assert [(p.batch_size, p.execution_count) for p in wire.planned] == [(1, 0), (4, 2), (8, 3)]
    (s,) = parse_statistics(pb.GetModelStatisticsResponse(models=[wire]))
    assert s.planned_executions == {1: 0, 4: 2, 8: 3}
    assert s.plan_changes == 1
    assert s.device_executions == {0: 2, 3: 3}


def test_a_version_without_plan_or_devices_reports_none() -> None:
    (s,) = parse_statistics(pb.GetModelStatisticsResponse(models=[statistics_of(_version())]))
    assert (s.planned_executions, s.plan_changes, s.device_executions) == ({}, 0, {})


def test_last_inference_moves_with_every_execution() -> None:
    """Triton sets last_inference on every execution; it was set only when a request
    succeeded, so a rollout candidate that ran only shadow work read 0."""
    from ferry.server.core.stats import VersionStats

    stats = VersionStats()
    stats.record_execution(4, 2, 10, 20, 30)
    assert stats.last_inference_ms > 0
