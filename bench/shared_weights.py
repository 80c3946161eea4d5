"""Do K worker processes that open the same model share its weights, or hold K copies?

Each child opens an onnxruntime session the way Ferry's ``OrtSession`` does (CPU provider,
one intra-op thread, the memory arena on) and runs one inference; while all K are alive the
parent reads RSS and PSS from /proc/PID/smaps_rollup. PSS splits a shared page between the
processes mapping it, so the PSS total is ~one copy when the weights are shared and ~K copies
when each process holds its own.

    PYTHONPATH=server:client python bench/shared_weights.py [--k 3] [--mib 128] [--runs 200]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def build(folder: Path, mib: int) -> tuple[Path, Path]:
    """An MLP of MatMul+Add layers holding ``mib`` MiB of FP32 weights, saved twice:
    embedded, and with every weight in one external file at 64 KiB-aligned offsets."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from ferry.server.runtime.shared_weights import write_aligned

    width = 2048
    layers = max(1, mib * 2**20 // (width * width * 4))
    rng = np.random.default_rng(0)
    nodes, inits = [], []
    prev = "x"
    for i in range(layers):
        w = (rng.standard_normal((width, width), dtype=np.float32) / np.sqrt(width)).astype(
            np.float32
        )
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        inits.append(numpy_helper.from_array(np.zeros(width, np.float32), f"b{i}"))
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"]))
        nodes.append(helper.make_node("Add", [f"m{i}", f"b{i}"], [f"y{i}"]))
        prev = f"y{i}"
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", width])],
        [helper.make_tensor_value_info(prev, TensorProto.FLOAT, ["n", width])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    embedded = folder / "embedded" / "model.onnx"
    embedded.parent.mkdir()
    onnx.save_model(model, os.fspath(embedded))

    external = folder / "external" / "model.onnx"
    external.parent.mkdir()
    write_aligned(model, external.parent)  # the layout share_weights serves, byte for byte
    return embedded, external


def child(path: str, config: str, runs: int, batch: int = 1) -> None:
    """Open the session like Ferry, run, report timing, then wait so the parent can read PSS."""
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.enable_cpu_mem_arena = True
    for pair in filter(None, "" if config.startswith("ferry:") else config.split(",")):
        key, value = pair.split("=", 1)
        options.add_session_config_entry(key, value)
    if config.startswith("ferry:"):  # Ferry's own loader, share_weights on, cache in config
        from ferry.server.core.config import OnnxRuntimeConfig
        from ferry.server.runtime import shared_weights
        from ferry.server.runtime.session import OrtSession

        shared_weights.set_cache_dir(Path(config.split(":", 1)[1]))
        ferry = OrtSession(Path(path), OnnxRuntimeConfig(intra_op_threads=1, share_weights=True))
        assert ferry.weights_shared
        session = ferry.session
    else:
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    width = session.get_inputs()[0].shape[1]
    x = np.ones((batch, width), np.float32)
    session.run(None, {name: x})
    took = 0.0
    if runs:
        start = time.perf_counter()
        for _ in range(runs):
            session.run(None, {name: x})
        took = (time.perf_counter() - start) / runs * 1e6
    print(f"ready {took:.1f}", flush=True)
    sys.stdin.readline()


def measure(
    path: Path, config: str, k: int, runs: int, batch: int = 1
) -> tuple[list[tuple[float, float]], float]:
    from serving import memory_mib  # here, not at the top: the children stay lean

    procs = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--child",
                os.fspath(path),
                "--config",
                config,
                "--runs",
                str(runs if i == 0 else 0),
                "--batch",
                str(batch),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(k)
    ]
    try:
        times = [float(p.stdout.readline().split()[1]) for p in procs]  # type: ignore[union-attr]
        mem = [memory_mib(p.pid) for p in procs]
    finally:
        for p in procs:
            p.communicate("\n", timeout=60)
    return mem, times[0]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--mib", type=int, default=128)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--batch", type=int, default=1, help="rows per timed run")
    parser.add_argument("--child")
    parser.add_argument("--config", default="")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.config, args.runs, args.batch)
        return
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        embedded, external = build(Path(tmp), args.mib)
        size = sum(p.stat().st_size for p in external.parent.iterdir())
        print(f"onnxruntime {ort.__version__}, weights {size / 2**20:.0f} MiB, K={args.k}\n")
        print(
            "| configuration | RSS MiB per process | PSS MiB per process "
            f"| PSS total for K={args.k} | batch-{args.batch} run us |"
        )
        print("|---|---|---|---|---|")
        nopack = "session.disable_prepacking=1"
        for label, path, config in (
            ("a. embedded", embedded, ""),
            ("a'. embedded, prepacking off", embedded, nopack),
            ("b. external data, 64 KiB aligned", external, ""),
            ("c. b + prepacking off", external, nopack),
            (
                "e. Ferry, share_weights = true, cache cold (all K write)",
                embedded,
                f"ferry:{tmp}/s",
            ),
            ("f. Ferry, share_weights = true, cache warm", embedded, f"ferry:{tmp}/s"),
        ):
            mem, us = measure(path, config, args.k, args.runs, args.batch)
            rss = "/".join(f"{r:.0f}" for r, _ in mem)
            pss = "/".join(f"{p:.0f}" for _, p in mem)
            total = sum(p for _, p in mem)
            print(f"| {label} | {rss} | {pss} | {total:.0f} | {us:.0f} |", flush=True)


if __name__ == "__main__":
    main()
