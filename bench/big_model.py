"""The conversion child's memory on a model over 2 GiB, per quantization mode.

Builds an MLP of a few square Linear layers (MatMul + Add) with numpy, ``--gib`` of fp32 weights
in all, saved as model.onnx + model.onnx.data (ONNX external data: a file over 2 GiB cannot be
one protobuf message), the layout an onnx_archive upload is extracted to. Then runs the real
conversion child (``python -m ferry.server.convert.worker.child``) once per mode, as the server
runs it but without the server's address-space limit, and polls its /proc status every 0.1 s
for its peak resident memory (VmHWM, a high-water mark kept by the kernel, so no peak is missed
between polls) and its peak virtual size (VmPeak: what ``--conversion-memory-bytes``, RLIMIT_AS,
must allow). wait4's ru_maxrss is not used: it reported the largest earlier child's peak for
every later one.

    flock /work/notes/bench.lock python bench/big_model.py --gib 2.5

Prints a table: mode, worked, peak RSS, peak RSS / weights, VmPeak, job time, published files.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

CHILD = [sys.executable, "-m", "ferry.server.convert.worker.child"]
GiB = 1 << 30


def build(folder: Path, gib: float, layers: int) -> tuple[int, int]:
    """model.onnx + model.onnx.data in ``folder``; returns (width, weight bytes)."""
    width = int((gib * GiB / layers / 4) ** 0.5) // 64 * 64
    rng = np.random.default_rng(0)
    nodes, inits, current = [], [], "input"
    for i in range(layers):
        w = rng.standard_normal((width, width), dtype=np.float32)
        w *= np.float32(1.0 / np.sqrt(width))
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        del w
        inits.append(numpy_helper.from_array(np.zeros(width, np.float32), f"b{i}"))
        out = "output" if i == layers - 1 else f"h{i}"
        nodes.append(helper.make_node("MatMul", [current, f"w{i}"], [f"m{i}"]))
        nodes.append(helper.make_node("Add", [f"m{i}", f"b{i}"], [out]))
        current = out
    graph = helper.make_graph(
        nodes,
        "big_mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", width])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save_model(
        model,
        str(folder / "model.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="model.onnx.data",
    )
    return width, (folder / "model.onnx.data").stat().st_size


def job(root: Path, source: Path, mode: str, width: int, benchmark: str) -> Path:
    work = root / f"work-{mode}"
    spec: dict[str, object] = {
        "quantization": {"mode": mode},
        "max_batch_size": 4,
        "benchmark": benchmark,
        "validation": {"samples": 8, "keep_failed": True},
    }
    if mode == "static_int8":
        calib = root / f"calib-{mode}.npz"
        rng = np.random.default_rng(1)
        np.savez(calib, input=rng.standard_normal((16, width), dtype=np.float32))
        spec["quantization"] = {"mode": mode, "calibration_file": str(calib)}
    path = root / f"job-{mode}.json"
    path.write_text(
        json.dumps(
            {
                "job_id": f"bench{mode.replace('_', '')}",
                "model": "big",
                "source_path": str(source),
                "source_format": "onnx_archive",
                "source_sha256": "",
                "spec": spec,
                "work_dir": str(work),
            }
        )
    )
    return path


def run(job_path: Path, progress: Path) -> tuple[int, int, int, float]:
    """(exit status, peak RSS bytes, peak virtual bytes, seconds) of one child."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        [*CHILD, "--job", str(job_path), "--progress-file", str(progress)],
        stdout=subprocess.DEVNULL,
        stderr=open(progress.with_suffix(".err"), "w"),  # noqa: SIM115
    )
    peaks = {"VmHWM:": 0, "VmPeak:": 0}
    done = threading.Event()

    def poll() -> None:
        status = Path(f"/proc/{proc.pid}/status")
        while not done.is_set():
            try:
                for line in status.read_text().splitlines():
                    key = line.split(":", 1)[0] + ":"
                    if key in peaks:
                        peaks[key] = max(peaks[key], int(line.split()[1]) * 1024)
            except (OSError, ValueError, IndexError):
                pass
            done.wait(0.1)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    rc = proc.wait()  # the zombie's status stays readable until it is reaped here
    done.set()
    poller.join()
    return rc, peaks["VmHWM:"], peaks["VmPeak:"], time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gib", type=float, default=2.5, help="fp32 weights, GiB")
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument(
        "--modes", default="none,fp16,dynamic_int8,static_int8", help="comma-separated"
    )
    parser.add_argument("--benchmark", default="quick", choices=["full", "quick", "off"])
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="ferry-big-", dir=os.environ.get("BENCH_TMP")))
    try:
        source = root / "upload"
        source.mkdir()
        t0 = time.perf_counter()
        width, weights = build(source, args.gib, args.layers)
        print(
            f"model: {args.layers} x MatMul {width}x{width}, weights {weights / GiB:.2f} GiB "
            f"(built in {time.perf_counter() - t0:.0f} s); CPUs {os.cpu_count()}",
            flush=True,
        )
        rows = []
        for mode in args.modes.split(","):
            path = job(root, source / "model.onnx", mode, width, args.benchmark)
            rc, rss, virtual, seconds = run(path, root / f"progress-{mode}.jsonl")
            work = root / f"work-{mode}"
            files = sorted(
                f"{p.name} {p.stat().st_size / GiB:.2f}G" for p in work.iterdir() if p.is_file()
            )
            last = (root / f"progress-{mode}.jsonl").read_text().splitlines()[-1:]
            message = json.loads(last[0])["message"] if last and rc else ""
            rows.append((mode, rc == 0, rss, virtual, seconds, files, message))
            print(
                f"{mode:13s} {'yes' if rc == 0 else 'NO':4s} peak RSS {rss / GiB:6.2f} GiB "
                f"({rss / weights:.2f}x weights)  VmPeak {virtual / GiB:6.2f} GiB  "
                f"{seconds:6.0f} s  {', '.join(files)} {message[:300]}",
                flush=True,
            )
            shutil.rmtree(work, ignore_errors=True)
        print("\n| mode | worked | peak RSS | RSS / weights | VmPeak | job time |")
        print("|---|---|---|---|---|---|")
        for mode, ok, rss, virtual, seconds, _, _ in rows:
            print(
                f"| {mode} | {'yes' if ok else 'no'} | {rss / GiB:.2f} GiB | "
                f"{rss / weights:.2f}x | {virtual / GiB:.2f} GiB | {seconds:.0f} s |"
            )
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
