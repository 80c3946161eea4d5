"""What a load test measured, and the ways to print and save it.

Latency percentiles are over successful requests only: a fast rejection is not a fast answer, so
errors are counted by status code instead. The server-side split comes from the difference of two
``GetModelStatistics`` snapshots around each level, which attributes time to queueing and to
compute without trusting client clocks; what remains of the client's latency is transport and
serialization on both sides.
"""

from __future__ import annotations

import csv
import io
import json
import math
from array import array
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ferry.client._types import ModelStatistics

PERCENTILES = (50, 90, 95, 99)


class Recorder:
    """Collects one level's outcomes; appends are O(1) and allocation-free on the hot path."""

    def __init__(self) -> None:
        self.latencies = array("d")
        self.codes: dict[str, int] = {}
        self.ok = 0
        self.dropped = 0
        self.unsent = 0  # open loop: arrivals due before the level ended that were never sent

    def add(self, latency: float, code: str) -> None:
        if code == "OK":
            self.ok += 1
            self.latencies.append(latency)
        else:
            self.codes[code] = self.codes.get(code, 0) + 1

    @property
    def completed(self) -> int:
        return self.ok + sum(self.codes.values())


def latency_summary(latencies: Sequence[float] | array[float]) -> dict[str, float]:
    """Milliseconds: p50, p90, p95, p99, max and mean (NaN when nothing succeeded)."""
    if not len(latencies):
        return {**{f"p{p}": math.nan for p in PERCENTILES}, "max": math.nan, "mean": math.nan}
    arr = (
        np.frombuffer(latencies, dtype=np.float64)
        if isinstance(latencies, array)
        else (np.asarray(latencies, dtype=np.float64))
    )
    values = np.percentile(arr, PERCENTILES) * 1e3
    out = {f"p{p}": float(v) for p, v in zip(PERCENTILES, values, strict=True)}
    out["max"] = float(arr.max() * 1e3)
    out["mean"] = float(arr.mean() * 1e3)
    return out


@dataclass(frozen=True)
class ServerSplit:
    """Server-side averages per request over one level, from statistics deltas."""

    requests: int  # successful requests the server counted
    queue_ms: float  # waiting in the batcher's queue
    compute_ms: float  # input copy + model execution + output copy
    executions: int  # model executions (one per dynamic batch)
    mean_batch: float  # batch elements per execution
    rejected: int  # refused because the queue was full
    expired: int  # deadline passed while queued


def _sum(stats: Sequence[ModelStatistics], version: int | None) -> dict[str, int]:
    keys = (
        "success_count",
        "queue_ns",
        "compute_ns",
        "inferences",
        "executions",
        "rejected",
        "expired",
    )
    total = dict.fromkeys(keys, 0)
    for s in stats:
        if version is not None and s.version != version:
            continue
        total["success_count"] += s.success.count
        total["queue_ns"] += s.queue.ns
        total["compute_ns"] += s.compute_input.ns + s.compute_infer.ns + s.compute_output.ns
        total["inferences"] += s.inference_count
        total["executions"] += s.execution_count
        total["rejected"] += s.rejected_count
        total["expired"] += s.expired_count
    return total


def server_split(
    before: Sequence[ModelStatistics], after: Sequence[ModelStatistics], version: int | None = None
) -> ServerSplit:
    a, b = _sum(before, version), _sum(after, version)
    d = {k: b[k] - a[k] for k in a}
    n = max(d["success_count"], 1)
    return ServerSplit(
        requests=d["success_count"],
        queue_ms=d["queue_ns"] / n / 1e6,
        compute_ms=d["compute_ns"] / n / 1e6,
        executions=d["executions"],
        mean_batch=d["inferences"] / d["executions"] if d["executions"] else 0.0,
        rejected=d["rejected"],
        expired=d["expired"],
    )


@dataclass
class LevelResult:
    """One level of a run: a concurrency (closed loop) or an offered rate (open loop)."""

    loop: str  # "closed" or "open"
    level: float  # concurrency, or offered requests per second
    mode: str
    protocol: str
    batch_size: int
    elapsed: float  # seconds from the first request sent to the last answer
    ok: int
    errors: dict[str, int]
    latency_ms: dict[str, float]
    dropped: int = 0  # open loop: arrivals skipped because the in-flight cap was reached
    # open loop: arrivals due before the level ended that this generator never got to send
    # (it fell behind its schedule): the offered rate was not reached
    unsent: int = 0
    server: ServerSplit | None = None
    client_cpu: float = 0.0  # CPU seconds of this process per second of the level (1.0: a core)

    @property
    def throughput(self) -> float:
        """Successful requests per second."""
        return self.ok / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def client_cpu_per_request(self) -> float:
        """CPU seconds this process (the load generator, gRPC's threads included) spent per
        answered request: what it took from a CPU the server may have needed."""
        done = self.ok + self.error_count
        return self.client_cpu * self.elapsed / done if done else 0.0

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["throughput"] = self.throughput
        d["samples_per_s"] = self.throughput * self.batch_size
        d["client_cpu_us_per_request"] = self.client_cpu_per_request * 1e6
        return d


@dataclass
class LoadTestReport:
    model: str
    target: str
    levels: list[LevelResult] = field(default_factory=list)
    generator_note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "target": self.target,
            "levels": [lv.to_dict() for lv in self.levels],
        }

    def to_json(self) -> str:
        return json.dumps(clean_nans(self.to_dict()), indent=2, allow_nan=False)

    def to_csv(self) -> str:
        buf = io.StringIO()
        columns = [
            "loop",
            "level",
            "mode",
            "protocol",
            "batch_size",
            "elapsed_s",
            "ok",
            "errors",
            "throughput",
            "p50_ms",
            "p90_ms",
            "p95_ms",
            "p99_ms",
            "max_ms",
            "mean_ms",
            "server_queue_ms",
            "server_compute_ms",
            "server_mean_batch",
            "dropped",
            "unsent",
            "error_codes",
            "client_cpu",
            "client_cpu_us_per_request",
        ]
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(columns)
        for lv in self.levels:
            lat, srv = lv.latency_ms, lv.server
            writer.writerow(
                [
                    lv.loop,
                    f"{lv.level:g}",
                    lv.mode,
                    lv.protocol,
                    lv.batch_size,
                    f"{lv.elapsed:.3f}",
                    lv.ok,
                    lv.error_count,
                    f"{lv.throughput:.1f}",
                    *(f"{lat[k]:.3f}" for k in ("p50", "p90", "p95", "p99", "max", "mean")),
                    f"{srv.queue_ms:.3f}" if srv else "",
                    f"{srv.compute_ms:.3f}" if srv else "",
                    f"{srv.mean_batch:.2f}" if srv else "",
                    lv.dropped,
                    lv.unsent,
                    ";".join(f"{k}={v}" for k, v in sorted(lv.errors.items())),
                    f"{lv.client_cpu:.3f}",
                    f"{lv.client_cpu_per_request * 1e6:.1f}",
                ]
            )
        return buf.getvalue()

    def format_table(self) -> str:
        """The human report: one row per level, then errors and the server-side split."""
        if not self.levels:
            return "no levels were run"
        head = self.levels[0]
        key = "conc" if head.loop == "closed" else "rate"
        lines = [
            f"{self.model} @ {self.target} — {head.loop} loop, {head.mode}, {head.protocol} "
            f"protocol, batch {head.batch_size}",
            f"{key:>7} {'req/s':>10} {'ok':>9} {'err':>6} {'p50':>8} {'p90':>8} {'p95':>8} "
            f"{'p99':>8} {'max':>8}  {'queue':>7} {'compute':>8} {'batch':>6}  (ms)"
            f"  {'gen_cpu':>7} {'us/req':>7}",
        ]
        for lv in self.levels:
            lat, srv = lv.latency_ms, lv.server
            server_cols = (
                f"{srv.queue_ms:7.3f} {srv.compute_ms:8.3f} {srv.mean_batch:6.2f}"
                if srv
                else f"{'-':>7} {'-':>8} {'-':>6}"
            )
            lines.append(
                f"{lv.level:7g} {lv.throughput:10.1f} {lv.ok:9d} {lv.error_count:6d} "
                + " ".join(f"{lat[k]:8.3f}" for k in ("p50", "p90", "p95", "p99", "max"))
                + "  "
                + server_cols
                + f"        {lv.client_cpu:7.0%} {lv.client_cpu_per_request * 1e6:7.0f}"
            )
        for lv in self.levels:
            if lv.errors:
                codes = ", ".join(f"{k} x{v}" for k, v in sorted(lv.errors.items()))
                lines.append(f"errors at {key} {lv.level:g}: {codes}")
            if lv.client_cpu > 0.9:
                lines.append(
                    f"at {key} {lv.level:g} this process used {lv.client_cpu:.0%} of a CPU core: "
                    "the load generator may be the bottleneck (see bench/loadgen_ceiling.py)"
                )
            if lv.dropped:
                lines.append(
                    f"at rate {lv.level:g}: {lv.dropped} arrivals dropped (in-flight cap reached: "
                    "the server cannot keep up with this rate)"
                )
            if lv.unsent:
                lines.append(
                    f"at rate {lv.level:g}: {lv.unsent} arrivals were due but never sent: this "
                    "generator fell behind its schedule, so the rate was not offered and the "
                    "latest arrivals are missing from the percentiles (see "
                    "bench/loadgen_ceiling.py)"
                )
        lines.append(
            "queue/compute: server-side means per request (GetModelStatistics deltas); the rest of "
            "the latency is transport and serialization"
        )
        lines.append(
            "gen_cpu, us/req: this load generator's own CPU (share of one core, and microseconds "
            "per request); on a machine it shares with the server that CPU is the server's loss, "
            "so compare with perf_analyzer there (docs/benchmarking.md)"
        )
        if self.generator_note:
            lines.append(self.generator_note)
        return "\n".join(lines)


def clean_nans(obj: Any) -> Any:
    """JSON has no NaN: levels where nothing succeeded report null percentiles."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: clean_nans(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [clean_nans(v) for v in obj]
    return obj
