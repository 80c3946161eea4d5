"""Threads sized for the node against threads sized for the CPU quota (ferry/server/cpus.py).

    sudo .venv/bin/python bench/cpu_quota.py                 # quota of 1 core, 600 runs each
    sudo .venv/bin/python bench/cpu_quota.py --quota 1.5 --runs 1000

Makes a cgroup with a CFS quota (cgroup v1's cpu controller or v2's cpu.max; needs root and a
writable cgroup tree, as a container or CI box as root has), and in it runs one onnxruntime
session of a compute-heavy MLP (batch 8, a few ms a run) one request at a time, twice: with one
intra-op thread per core the process may run on (its affinity: what Ferry used, and what a pod
with ``limits.cpu`` on a larger node still reports) and with the count ``cpus.usable_cores``
gives inside the cgroup. Prints latency per run (p50, p99, max) for both and removes the cgroup.
Figures, not assertions.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import onnx

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT / "client"), str(ROOT / "server")]

from ferry.server.examples import mlp_model  # noqa: E402

NAME = "ferry-bench-quota"
PERIOD_US = 100_000

CHILD = r"""
import json, os, sys, time
import numpy as np
import onnxruntime as ort
procs, model, threads, runs = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
with open(procs, "w") as f:  # into the cgroup before any thread exists
    f.write(str(os.getpid()))
sys.path[:0] = [sys.argv[5], sys.argv[6]]
from ferry.server import cpus
so = ort.SessionOptions()
so.intra_op_num_threads = threads
session = ort.InferenceSession(model, sess_options=so, providers=["CPUExecutionProvider"])
x = np.random.default_rng(0).standard_normal((8, 1024)).astype(np.float32)
for _ in range(20):
    session.run(None, {"input": x})
times = []
for _ in range(runs):
    t = time.perf_counter_ns()
    session.run(None, {"input": x})
    times.append((time.perf_counter_ns() - t) / 1e6)
times.sort()
print(json.dumps({"usable": cpus.usable_cores(), "p50": times[len(times) // 2],
                  "p99": times[int(len(times) * 0.99)], "max": times[-1]}))
"""


def make_cgroup(quota: float) -> tuple[Path, Path]:
    """(the cgroup's folder, the file a process writes its pid to)."""
    v1 = Path("/sys/fs/cgroup/cpu")
    v2 = Path("/sys/fs/cgroup")
    if (v1 / "cpu.cfs_quota_us").exists():
        folder = v1 / NAME
        folder.mkdir(exist_ok=True)
        (folder / "cpu.cfs_period_us").write_text(str(PERIOD_US))
        (folder / "cpu.cfs_quota_us").write_text(str(int(quota * PERIOD_US)))
    elif "cpu" in (v2 / "cgroup.subtree_control").read_text().split():
        folder = v2 / NAME
        folder.mkdir(exist_ok=True)
        (folder / "cpu.max").write_text(f"{int(quota * PERIOD_US)} {PERIOD_US}")
    else:
        raise SystemExit("no writable cgroup cpu controller here (run as root)")
    return folder, folder / "cgroup.procs"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quota", type=float, default=1.0, help="cores of CPU quota")
    p.add_argument("--runs", type=int, default=600)
    args = p.parse_args()
    folder, procs = make_cgroup(args.quota)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            model = Path(tmp) / "heavy.onnx"
            onnx.save(mlp_model(sizes=(1024, 2048, 2048, 1024)), model)
            affinity = len(os.sched_getaffinity(0))
            rows = []
            for label in ("affinity", "quota"):
                threads = affinity
                if label == "quota":
                    threads = rows[0]["usable"]
                out = subprocess.run(
                    [
                        sys.executable,
                        "-c",
                        CHILD,
                        str(procs),
                        str(model),
                        str(threads),
                        str(args.runs),
                        str(ROOT / "client"),
                        str(ROOT / "server"),
                    ],
                    check=True,
                    capture_output=True,
                    text=True,
                ).stdout
                rows.append({"threads from": label, "threads": threads, **json.loads(out)})
    finally:
        for pid in procs.read_text().split() if procs.exists() else []:
            Path(folder.parent / "cgroup.procs").write_text(pid)
        folder.rmdir()
    print(
        f"CPU quota {args.quota:g} cores, affinity {affinity} cores, {os.cpu_count()} CPUs; "
        f"MLP 1024-2048-2048-1024, batch 8, {args.runs} runs one at a time"
    )
    print("| intra-op threads | p50 ms | p99 ms | max ms |")
    print("|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['threads']} ({r['threads from']}) | {r['p50']:.2f} | {r['p99']:.2f} "
            f"| {r['max']:.2f} |"
        )


if __name__ == "__main__":
    main()
