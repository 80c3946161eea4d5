"""Per-version statistics with Triton's semantics (what ModelStatistics reports).

Updated only on the event loop thread, so no locks: the batch handler records after its worker
thread returns. Counters are cumulative since the version was loaded.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ferry.server.core import types


@dataclass(slots=True)
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns


@dataclass(slots=True)
class BatchStats:
    batch_size: int
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass(slots=True)
class VersionStats:
    inference_count: int = 0  # batch elements
    execution_count: int = 0  # executions
    last_inference_ms: int = 0
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    batches: dict[int, BatchStats] = field(default_factory=dict)

    def record_execution(
        self, batch_size: int, requests: int, input_ns: int, infer_ns: int, output_ns: int
    ) -> None:
        """One execution of ``batch_size`` elements serving ``requests`` requests. Per-request
        compute counters grow by one per request (Triton's semantics); batch_stats by one per
        execution. ``last_inference`` moves with every execution, as Triton's does: a candidate
        served only shadow runs read 0."""
        self.last_inference_ms = time.time_ns() // 1_000_000
        self.execution_count += 1
        self.inference_count += batch_size
        self.compute_input.add(input_ns * requests, requests)
        self.compute_infer.add(infer_ns * requests, requests)
        self.compute_output.add(output_ns * requests, requests)
        b = self.batches.get(batch_size)
        if b is None:
            b = self.batches[batch_size] = BatchStats(batch_size)
        b.compute_input.add(input_ns)
        b.compute_infer.add(infer_ns)
        b.compute_output.add(output_ns)

    def record_queue(self, queue_ns: list[int]) -> None:
        self.queue.add(sum(queue_ns), len(queue_ns))

    def record_success(self, ns: int) -> None:
        self.success.add(ns)
        self.last_inference_ms = time.time_ns() // 1_000_000

    def record_failure(self, ns: int) -> None:
        self.fail.add(ns)

    def snapshot(
        self, name: str, version: int, *, rejected: int, expired: int, queue_depth: int
    ) -> types.VersionStatistics:
        def d(x: Duration) -> types.Duration:
            return types.Duration(x.count, x.ns)

        return types.VersionStatistics(
            name=name,
            version=version,
            last_inference_ms=self.last_inference_ms,
            inference_count=self.inference_count,
            execution_count=self.execution_count,
            success=d(self.success),
            fail=d(self.fail),
            queue=d(self.queue),
            compute_input=d(self.compute_input),
            compute_infer=d(self.compute_infer),
            compute_output=d(self.compute_output),
            batches=tuple(
                types.BatchStatistics(
                    b.batch_size, d(b.compute_input), d(b.compute_infer), d(b.compute_output)
                )
                for _, b in sorted(self.batches.items())
            ),
            rejected=rejected,
            expired=expired,
            queue_depth=queue_depth,
        )
