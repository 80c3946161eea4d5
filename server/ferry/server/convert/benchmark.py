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
from typing import Any

import onnx
import onnxruntime as ort

from ferry.server.convert.graph import weight_sparsity
from ferry.server.convert.spec import InputSpec
from ferry.server.convert.validate import generate

WARMUP = 2
MIN_RUNS, MAX_RUNS = 3, 20
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


def latency_ms(
    path: Path, inputs: list[InputSpec], batched: bool, batches: list[int], threads: int
) -> dict[str, float]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    result = {}
    for batch in batches if batched else [1]:
        samples = generate(inputs, batch, batched)
        feed = next(samples.batches(batch))
        for _ in range(WARMUP):
            session.run(None, feed)
        times: list[float] = []
        deadline = time.perf_counter() + TIME_PER_BATCH_S
        while len(times) < MIN_RUNS or (len(times) < MAX_RUNS and time.perf_counter() < deadline):
            start = time.perf_counter()
            session.run(None, feed)
            times.append(time.perf_counter() - start)
        result[str(batch)] = statistics.median(times) * 1000.0
    return result


def measure(
    path: Path, inputs: list[InputSpec], batched: bool, max_batch: int, threads: int
) -> dict[str, Any]:
    return {
        "size_bytes": path.stat().st_size,
        "gzip_bytes": gzip_size(path),
        "sparsity": weight_sparsity(onnx.load(str(path))),
        "latency_ms": latency_ms(path, inputs, batched, sorted({1, max_batch}), threads),
    }


def speedups(latency: dict[str, float], fp32: dict[str, float]) -> dict[str, float]:
    return {batch: fp32[batch] / ms for batch, ms in latency.items() if batch in fp32 and ms > 0}
