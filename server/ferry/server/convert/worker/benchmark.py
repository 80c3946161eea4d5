"""The benchmark stage: what each variant costs to store and to run, as the server will run it.

Latency is measured with serving's session settings (ENABLE_ALL, sequential, one inter-op thread)
as the median of a few runs after warm-up, capped in time so a variant costs about a second. The
figures compare variants on this machine; they are not a load test.
"""

from __future__ import annotations

import statistics
import time
import zlib
from pathlib import Path

import onnx
import onnxruntime as ort

from ferry.server.convert.spec import InputSpec
from ferry.server.convert.worker.graph import weight_sparsity
from ferry.server.convert.worker.parity import generate
from ferry.server.convert.worker.placement import CPU_ONLY
from ferry.server.convert.worker.report import BenchmarkRecord

WARMUP = 2
MIN_RUNS, MAX_RUNS = 3, 25
TIME_PER_BATCH_S = 0.4
GZIP_LEVEL = 6


def gzip_size(path: Path) -> int:
    """Size of the file gzip-compressed at level 6, streamed so a large model stays out of memory."""
    compressor = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31)  # wbits 31: the gzip container
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            size += len(compressor.compress(chunk))
    return size + len(compressor.flush())


def _session(
    path: Path, threads: int, providers: list[tuple[str, dict[str, str]]] | None = None
) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=providers or CPU_ONLY)


def latencies_ms(
    paths: dict[str, Path],
    inputs: list[InputSpec],
    batched: bool,
    batches: list[int],
    threads: int,
    *,
    providers: list[tuple[str, dict[str, str]]] | None = None,
) -> dict[str, dict[str, float]]:
    """Median latency per variant and batch size, variants timed in alternation, so that a
    burst of load from elsewhere on the machine slows all of them rather than one."""
    sessions = {name: _session(path, threads, providers) for name, path in paths.items()}
    result: dict[str, dict[str, float]] = {name: {} for name in paths}
    for batch in batches if batched else [1]:
        feed = next(generate(inputs, batch, batched).batches(batch))
        for session in sessions.values():
            for _ in range(WARMUP):
                session.run(None, feed)
        times: dict[str, list[float]] = {name: [] for name in sessions}
        deadline = time.perf_counter() + TIME_PER_BATCH_S * len(sessions)
        for round_ in range(MAX_RUNS):
            if round_ >= MIN_RUNS and time.perf_counter() > deadline:
                break
            for name, session in sessions.items():
                start = time.perf_counter()
                session.run(None, feed)
                times[name].append(time.perf_counter() - start)
        for name, samples in times.items():
            result[name][str(batch)] = statistics.median(samples) * 1000.0
    return result


def measure(
    paths: dict[str, Path],
    inputs: list[InputSpec],
    batched: bool,
    max_batch: int,
    threads: int,
    *,
    providers: list[tuple[str, dict[str, str]]] | None = None,
) -> dict[str, BenchmarkRecord]:
    """Per variant: size, gzip size, weight sparsity, latency and speed-up against "fp32", on
    the providers the version will serve with."""
    latency = latencies_ms(
        paths, inputs, batched, sorted({1, max_batch}), threads, providers=providers
    )
    fp32 = latency["fp32"]
    return {
        name: BenchmarkRecord(
            size_bytes=path.stat().st_size,
            gzip_bytes=gzip_size(path),
            sparsity=weight_sparsity(onnx.load(str(path))),
            latency_ms=latency[name],
            speedup_vs_fp32={b: fp32[b] / ms for b, ms in latency[name].items() if ms > 0},
        )
        for name, path in paths.items()
    }
