"""The GPU check of issue 16, one same-run table; runs on CPU too (``--provider cpu``):

    flock /work/notes/bench.lock .venv/bin/python bench/gpu_check.py --provider cpu --model cnn
    python bench/gpu_check.py --provider cuda --model resnet18     # on a GPU host (gpu.md)

1. the plain floor (bench/plain_server.py: sync grpcio, no batching) and Ferry, unary and
   streaming, perf_analyzer at c=1/16/64, each server alone;
2. the in-process ceiling: onnxruntime alone, batch 32, images (rows) per second;
3. Ferry's execution path without gRPC: a random mix of batch sizes 1..16 through the planned
   sessions (runtime.plans) against a fixed batch of 8, time per row, and the plan changes seen;
4. memory: the process's RSS with one session and with every planned size loaded.

Ferry's model config sets the provider (``providers = [{ name = "CUDAExecutionProvider" }]``
for cuda) and, on cpu, planned sizes explicitly (a GPU provider plans them by default).
Figures, not assertions.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from models import SHAPES, build
from perf_floor import input_data, perf, start_ferry, start_floor, write_repo
from serving import stop

HERE = Path(__file__).parent
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def in_process(path: Path, name: str, provider: str, seconds: float) -> dict[str, Any]:
    from ferry.server.core.config import parse_config
    from ferry.server.runtime.session import OrtSession, open_session

    shape = SHAPES[name]
    cfg = parse_config(
        {
            "onnxruntime": {"providers": [{"name": PROVIDERS[provider]}]},
            "batching": {"planned_batch_sizes": [1, 2, 4, 8, 16], "max_batch_size": 16},
        }
    )
    before = _rss_mib()
    single = OrtSession(path, cfg.onnxruntime)
    one = _rss_mib() - before
    x32 = np.random.default_rng(0).standard_normal((32, *shape)).astype(np.float32)
    single.run({"input": x32})
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        single.run({"input": x32})
        n += 32
    ceiling = n / (time.perf_counter() - start)
    single.release()
    before = _rss_mib()
    planned = open_session(path, cfg)
    planned.warm_up(1)
    all_sizes = _rss_mib() - before
    rng = np.random.default_rng(1)
    rows = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        b = int(rng.integers(1, 17))
        planned.run({"input": rng.standard_normal((b, *shape)).astype(np.float32)})
        rows += b
    mixed = (time.perf_counter() - start) / rows
    x8 = rng.standard_normal((8, *shape)).astype(np.float32)
    rows, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        planned.run({"input": x8})
        rows += 8
    fixed = (time.perf_counter() - start) / rows
    changes = getattr(planned, "plan_changes", None)
    planned.release()
    return {
        "ceiling_rows_per_s": ceiling,
        "mixed_over_fixed_time_per_row": mixed / fixed,
        "plan_changes": changes,
        "rss_one_session_mib": one,
        "rss_all_planned_sizes_mib": all_sizes,
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--provider", choices=sorted(PROVIDERS), default="cpu")
    ap.add_argument("--model", default="cnn", choices=sorted(SHAPES))
    ap.add_argument("--concurrency", default="1,16,64")
    ap.add_argument("--window-ms", type=int, default=3000)
    ap.add_argument("--seconds", type=float, default=3.0, help="in-process phases")
    ap.add_argument("--cache", type=Path, default=HERE / "results" / "models")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "gpu_check.json")
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    path = build(args.model, args.cache / f"{args.model}.onnx")
    config: dict[str, Any] = {"onnxruntime": {"providers": [{"name": PROVIDERS[args.provider]}]}}
    if args.provider == "cpu":
        config["batching"] = {"planned_batch_sizes": [1, 2, 4, 8, 16, 32]}
    table: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        data = input_data(folder, args.model)
        proc, port = start_floor(path, args.model)
        try:
            table["floor unary"] = {
                c: perf(port, args.model, data, c, streaming=False, window_ms=args.window_ms)
                for c in levels
            }
        finally:
            stop(proc)
        repo = write_repo(folder / "repo", args.model, path, config)
        proc, port = start_ferry(repo)
        try:
            for label, streaming in (("ferry unary", False), ("ferry streaming", True)):
                table[label] = {
                    c: perf(
                        port, args.model, data, c, streaming=streaming, window_ms=args.window_ms
                    )
                    for c in levels
                }
        finally:
            stop(proc)
    table["in process"] = in_process(path, args.model, args.provider, args.seconds)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(table, indent=2, default=str))
    print(f"\n{args.model} on {args.provider} ({os.cpu_count()} cpus): req/s (p50 ms) [x floor]")
    print("| server | " + " | ".join(f"c={c}" for c in levels) + " |")
    print("|---|" + "---|" * len(levels))
    floor = table["floor unary"]
    for label in ("floor unary", "ferry unary", "ferry streaming"):
        cells = [
            f"{table[label][c]['rps']:,.0f} ({table[label][c]['p50']:.2f}) [{table[label][c]['rps'] / floor[c]['rps']:.2f}x]"
            for c in levels
        ]
        print(f"| {label} | " + " | ".join(cells) + " |")
    ip = table["in process"]
    print(f"in-process ceiling, batch 32: {ip['ceiling_rows_per_s']:,.0f} rows/s")
    print(
        f"random batch sizes 1..16 through planned sessions: {ip['mixed_over_fixed_time_per_row']:.2f}x a fixed batch of 8's time per row; plan changes {ip['plan_changes']}"
    )
    print(
        f"memory: one session +{ip['rss_one_session_mib']:.0f} MiB; every planned size +{ip['rss_all_planned_sizes_mib']:.0f} MiB"
    )
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
