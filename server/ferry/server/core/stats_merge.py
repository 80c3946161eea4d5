"""Statistics of one model version served by several processes, added up.

With ``--workers N`` every worker process keeps its own counters; what a user reads (ModelStatistics,
/metrics) is their sum, as if one process had served every request."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ferry.server.core.types import BatchStatistics, Duration, VersionStatistics


def _add(a: Duration, b: Duration) -> Duration:
    return Duration(a.count + b.count, a.ns + b.ns)


def _merge_batches(
    a: tuple[BatchStatistics, ...], b: tuple[BatchStatistics, ...]
) -> tuple[BatchStatistics, ...]:
    by_size = {x.batch_size: x for x in a}
    for y in b:
        x = by_size.get(y.batch_size)
        by_size[y.batch_size] = (
            y
            if x is None
            else BatchStatistics(
                y.batch_size,
                _add(x.compute_input, y.compute_input),
                _add(x.compute_infer, y.compute_infer),
                _add(x.compute_output, y.compute_output),
            )
        )
    return tuple(by_size[k] for k in sorted(by_size))


def _merge_two(a: VersionStatistics, b: VersionStatistics) -> VersionStatistics:
    return VersionStatistics(
        name=a.name,
        version=a.version,
        last_inference_ms=max(a.last_inference_ms, b.last_inference_ms),
        inference_count=a.inference_count + b.inference_count,
        execution_count=a.execution_count + b.execution_count,
        success=_add(a.success, b.success),
        fail=_add(a.fail, b.fail),
        queue=_add(a.queue, b.queue),
        compute_input=_add(a.compute_input, b.compute_input),
        compute_infer=_add(a.compute_infer, b.compute_infer),
        compute_output=_add(a.compute_output, b.compute_output),
        batches=_merge_batches(a.batches, b.batches),
        rejected=a.rejected + b.rejected,
        expired=a.expired + b.expired,
        queue_depth=a.queue_depth + b.queue_depth,
        planned_executions=_merge_counts(a.planned_executions, b.planned_executions),
        plan_changes=a.plan_changes + b.plan_changes,
        device_executions=_merge_counts(a.device_executions, b.device_executions),
        load=a.load if a.load == b.load else "",
    )


def _merge_counts(
    a: tuple[tuple[int, int], ...], b: tuple[tuple[int, int], ...]
) -> tuple[tuple[int, int], ...]:
    total = dict(a)
    for size, n in b:
        total[size] = total.get(size, 0) + n
    return tuple(sorted(total.items()))


def merge(snapshots: Iterable[VersionStatistics]) -> list[VersionStatistics]:
    """One snapshot per (model, version), in the order each first appears."""
    out: dict[tuple[str, int], VersionStatistics] = {}
    for s in snapshots:
        key = (s.name, s.version)
        prior = out.get(key)
        out[key] = s if prior is None else _merge_two(prior, s)
    return list(out.values())


def sum_request_rows(rows: Iterable[Any]) -> list[list[Any]]:
    """Request counter rows ``[model, version, {code: n}, [bucket counts], seconds]`` (one per
    model version and process, as metrics keeps them and workers send them) added up per model
    version, in the same form: the sums of a scrape and what the first worker keeps of a dead
    one are the one addition."""
    total: dict[tuple[str, int], list[Any]] = {}
    for model, version, codes, buckets, seconds in rows:
        key = (str(model), int(version))
        mine = total.get(key)
        if mine is None:
            fresh = {c: int(n) for c, n in codes.items()}
            total[key] = [*key, fresh, [int(b) for b in buckets], float(seconds)]
            continue
        for code, n in codes.items():
            mine[2][code] = mine[2].get(code, 0) + int(n)
        mine[3] = [a + int(b) for a, b in zip(mine[3], buckets, strict=True)]
        mine[4] += float(seconds)
    return list(total.values())
