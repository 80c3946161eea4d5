"""Conversion benchmark (issue 3): what the conversion child costs, and what its variants buy.

For an MLP, a small CNN, a transformer encoder and a Linear-heavy model (14.6M parameters), a
seeded state_dict is converted by the real child (``python -m ferry.server.convert.worker.child``, one
subprocess per job, one job at a time) into fp32, dynamic int8, static int8 (QDQ, calibrated on
128 samples), fp16 and, for the MLP, CNN and Linear-heavy model, 50% structured pruning (fp32,
no fine-tuning, ``keep_failed`` so it publishes below the accuracy budget).

    .venv/bin/python bench/conversion.py                        # everything (~5 min on 2 cores)
    .venv/bin/python bench/conversion.py --quick                # fp32 + one int8 + pruning
    .venv/bin/python bench/conversion.py --models mlp,linear_heavy

Dynamic int8 is not run on the CNN unless ``--cnn-dynamic-int8``: it turns every Conv into
DynamicQuantizeLinear + ConvInteger, which onnxruntime's CPU provider runs several times slower
than fp32 (the "trap" in docs/conversion.md); static QDQ is the CNN's int8 variant.

Figures come from two places, because the child's own benchmark is a quick check (median of 3-25
runs, ~0.4 s per variant) meant to pick a variant, not to settle a 1.5x question:
- the child's report.json: per-stage seconds, sizes, accuracy on its 16 validation samples and
  its latency figures (``child x``);
- this script, on the produced model files: accuracy against the fp32 model on 512 fresh inputs,
  and latency with many more runs, variants alternated round by round (``bench x``: the ratio of
  medians, with the quartiles of the per-round ratios to show the noise).
Plus diagnostics for the targets: the CPU's int8 instructions and a single-MatMul fp32-vs-int8
microbenchmark at growing batch sizes. Figures, not assertions: a markdown report on stdout and
everything in bench/results/conversion.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import QuantType, quantize_dynamic

from ferry.server.convert import architectures
from ferry.server.convert.spec import InputSpec
from ferry.server.convert.worker import parity
from ferry.server.convert.worker.architectures import build as build_architecture
from ferry.server.convert.worker.benchmark import BUDGETS
from ferry.server.convert.worker.pipeline import default_threads

HERE = Path(__file__).parent
CHILD = [sys.executable, "-m", "ferry.server.convert.worker.child"]
CHILD_TIMEOUT_S = 600
MAX_BATCH = 32
BATCHES = (1, MAX_BATCH)
CALIBRATION_SAMPLES = 128  # the pipeline notes fewer than 100 as unsteady
EVAL_SAMPLES = 512
EVAL_SEED, CALIBRATION_SEED = 1, 2  # the child validates on seed 0: these are fresh inputs
PRUNE_AMOUNT = 0.5
STAGE_ORDER = ("load", "prune", "export", "check", "optimize", "quantize", "validate", "benchmark")
# The targets.
SMALL_E2E_S = 10.0
INT8_SPEEDUP, INT8_COSINE = 1.5, 0.999
PRUNE_SPEEDUP = 1.5
# Bench-side latency: at least MIN_ROUNDS alternated rounds, more while time allows.
MIN_ROUNDS, MAX_ROUNDS, SECONDS_PER_VARIANT_BATCH = 15, 400, 2.0
WARMUP = 3


@dataclass
class ModelCase:
    key: str  # the --models name
    architecture: str
    kwargs: dict[str, Any]
    prune: bool
    dynamic_int8: bool  # False for convolutional models (see the module docstring)
    note: str = ""


CASES = {
    "mlp": ModelCase(
        "mlp", "mlp", {"in_features": 64, "hidden": [256, 256], "out_features": 10}, True, True
    ),
    "cnn": ModelCase(
        "cnn", "small_cnn", {}, True, False,
        "dynamic_int8 skipped: ConvInteger is several times slower than fp32 on CPU "
        "(--cnn-dynamic-int8 to measure it)",
    ),
    "transformer": ModelCase(
        "transformer",
        "transformer_encoder",
        {"d_model": 64, "nhead": 4, "num_layers": 2, "dim_feedforward": 128, "seq_len": 16,
         "num_classes": 10},
        False,
        True,
    ),
    "linear_heavy": ModelCase("linear_heavy", "linear_heavy", {}, True, True),
}  # fmt: skip


@dataclass
class JobResult:
    model: str
    variant: str  # fp32, dynamic_int8, static_int8, fp16, pruned50
    rc: int
    wall_s: float
    work: Path
    report: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    other_cpu_s: float = 0.0  # CPU seconds used on the machine by anything but the child

    @property
    def model_path(self) -> Path:
        return self.work / "model.onnx"

    @property
    def entry(self) -> dict[str, Any]:
        """The published variant's row of the report."""
        published = self.report.get("published")
        return next((v for v in self.report.get("variants", []) if v["name"] == published), {})

    def fp32_entry(self) -> dict[str, Any]:
        return next((v for v in self.report.get("variants", []) if v["name"] == "fp32"), {})


# ---- jobs ----


def variants_for(case: ModelCase, quick: bool, cnn_dynamic: bool) -> list[str]:
    """Job variants in run order; fp32 first, since every ratio is against its model file."""
    dynamic = case.dynamic_int8 or cnn_dynamic
    if quick:
        names = ["fp32", "dynamic_int8" if dynamic else "static_int8"]
    else:
        names = ["fp32", *(["dynamic_int8"] if dynamic else []), "static_int8", "fp16"]
    return [*names, *(["pruned50"] if case.prune else [])]


def save_source(case: ModelCase, root: Path) -> tuple[Path, list[InputSpec]]:
    """A seeded state_dict of the built-in (the upload a client would send) and its inputs."""
    torch.manual_seed(0)
    module = build_architecture(case.architecture, case.kwargs)
    path = root / f"{case.key}.pt"
    torch.save(module.state_dict(), path)
    return path, architectures.default_input_specs(case.architecture, case.kwargs)


def random_inputs(inputs: list[InputSpec], count: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        spec.name: rng.standard_normal([count, *spec.shape[1:]]).astype(np.float32)
        for spec in inputs
    }


def job_spec(variant: str, inputs: list[InputSpec], calibration: Path) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "inputs": [vars(i) for i in inputs],
        "max_batch_size": MAX_BATCH,
        "quantization": {"mode": "none"},
    }
    if variant in ("dynamic_int8", "static_int8", "fp16"):
        # keep_slower: a variant slower than fp32 still gets its figures (the report's "speed"
        # says whether the server would have published it).
        spec["quantization"] = {"mode": variant, "keep_slower": True}
    if variant == "static_int8":
        spec["quantization"]["calibration_file"] = str(calibration)
    if variant == "pruned50":
        spec["pruning"] = {"method": "structured", "amount": PRUNE_AMOUNT}
    if variant != "fp32":
        # Publish below the accuracy budget too: a refused variant would leave no figures. The
        # report's within_budget still says whether the server would have served it.
        spec["validation"] = {"keep_failed": True}
    return spec


def machine_busy_s() -> float:
    """CPU seconds the whole machine has been busy (all CPUs, /proc/stat); 0 where unknown."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_job(
    case: ModelCase, variant: str, source: Path, spec: dict[str, Any], root: Path
) -> JobResult:
    """One job as the server runs it: a fresh child process; wall time includes its start-up."""
    folder = root / f"{case.key}-{variant}"
    folder.mkdir(parents=True)
    job = {
        "job_id": folder.name,
        "model": case.key,
        "source_path": str(source),
        "source_format": "state_dict",
        "source_sha256": hashlib.sha256(source.read_bytes()).hexdigest(),
        "architecture": case.architecture,
        "architecture_kwargs": case.kwargs,
        "spec": spec,
        "work_dir": str(folder / "work"),
        "allow_code_formats": False,
    }
    (folder / "job.json").write_text(json.dumps(job))
    command = [*CHILD, "--job", str(folder / "job.json"), "--progress-file", str(folder / "p")]
    busy_before, child_before = machine_busy_s(), children_cpu_s()
    start = time.perf_counter()
    proc = subprocess.run(
        command, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S, check=False
    )
    wall = time.perf_counter() - start
    result = JobResult(case.key, variant, proc.returncode, wall, folder / "work")
    child_cpu = children_cpu_s() - child_before
    result.other_cpu_s = max(0.0, machine_busy_s() - busy_before - child_cpu)
    report_path = result.work / "report.json"
    if report_path.exists():
        result.report = json.loads(report_path.read_text())
    if proc.returncode != 0:
        error = result.report.get("error", {}).get("message") or proc.stderr[-1500:]
        result.error = str(error)
    return result


# ---- measurements on the produced files ----


def session(path: Path, threads: int, *, x64_precision: bool = False) -> ort.InferenceSession:
    """The child's (and serving's) settings: ENABLE_ALL, sequential, one inter-op thread.

    ``x64_precision``: onnxruntime's ``session.x64quantprecision``, which runs u8s8 int8 GEMMs
    as u8u8 on x86 CPUs without VNNI, where the u8s8 kernel's 16-bit intermediate sums saturate.
    """
    options = ort.SessionOptions()
    if x64_precision:
        options.add_session_config_entry("session.x64quantprecision", "1")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_all(sess: ort.InferenceSession, feed: dict[str, np.ndarray], batch: int = 64) -> list[Any]:
    count = len(next(iter(feed.values())))
    parts = [
        sess.run(None, {k: v[i : i + batch] for k, v in feed.items()})
        for i in range(0, count, batch)
    ]
    return [np.concatenate([p[j] for p in parts]) for j in range(len(parts[0]))]


def accuracy(paths: dict[str, Path], inputs: list[InputSpec], threads: int) -> dict[str, Any]:
    """Each variant against the fp32 model on EVAL_SAMPLES inputs the child never saw."""
    feed = random_inputs(inputs, EVAL_SAMPLES, EVAL_SEED)
    outputs = {name: run_all(session(path, threads), feed) for name, path in paths.items()}
    result: dict[str, Any] = {
        name: parity.compare(out, outputs["fp32"])
        for name, out in outputs.items()
        if name != "fp32"
    }
    for name in ("dynamic_int8", "static_int8"):
        if name not in paths:
            continue
        try:  # the same file, with the saturation-free int8 kernel
            precise = run_all(session(paths[name], threads, x64_precision=True), feed)
        except Exception as exc:  # the option's graph rewrite fails on some graphs
            result[name]["x64quantprecision"] = {"error": str(exc).strip().splitlines()[-1][:300]}
            continue
        result[name]["x64quantprecision"] = parity.compare(precise, outputs["fp32"])
    return result


def latency(
    paths: dict[str, Path], inputs: list[InputSpec], threads: int, batches: tuple[int, ...]
) -> dict[str, Any]:
    """Median ms per variant and batch, variants alternated (order rotated) in every round, so a
    burst of load elsewhere slows all of them; per-round ratios to fp32 show the noise."""
    sessions = {name: session(path, threads) for name, path in paths.items()}
    names = list(sessions)
    result: dict[str, Any] = {name: {} for name in names}
    for batch in batches:
        feed = random_inputs(inputs, batch, EVAL_SEED)
        for sess in sessions.values():
            for _ in range(WARMUP):
                sess.run(None, feed)
        times: dict[str, list[float]] = {name: [] for name in names}
        deadline = time.perf_counter() + SECONDS_PER_VARIANT_BATCH * len(names)
        rounds = 0
        while rounds < MAX_ROUNDS and (rounds < MIN_ROUNDS or time.perf_counter() < deadline):
            order = names[rounds % len(names) :] + names[: rounds % len(names)]
            for name in order:
                start = time.perf_counter()
                sessions[name].run(None, feed)
                times[name].append(time.perf_counter() - start)
            rounds += 1
        base = statistics.median(times["fp32"])
        for name in names:
            ratios = sorted(f / t for f, t in zip(times["fp32"], times[name], strict=True))
            q1, _, q3 = statistics.quantiles(ratios, n=4)
            result[name][str(batch)] = {
                "median_ms": statistics.median(times[name]) * 1e3,
                "speedup_vs_fp32": base / statistics.median(times[name]),
                "round_ratio_q1": q1,
                "round_ratio_q3": q3,
                "spread": (np.percentile(times[name], 75) - np.percentile(times[name], 25))
                / statistics.median(times[name]),
                "runs": rounds,
            }
    return result


# ---- diagnostics ----


def cpu_info() -> dict[str, Any]:
    flags: set[str] = set()
    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    wanted = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8")
    return {
        "model": model,
        "cpus": os.cpu_count(),
        "int8_flags": {flag: flag in flags for flag in wanted},
        "onnxruntime": ort.__version__,
        "torch": torch.__version__,
    }


def matmul_microbench(threads: int, quick: bool) -> list[dict[str, Any]]:
    """One MatMul [B, K] x [K, N] (the Linear-heavy model's first layer), fp32 against
    onnxruntime's dynamic int8 (DynamicQuantizeLinear + MatMulInteger, fused by the optimizer):
    whether this CPU's int8 GEMM beats its fp32 GEMM at all, independent of the rest of a model."""
    k, n = 1024, 4096
    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", n])],
        [numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    rows: list[dict[str, Any]] = []
    logging.getLogger().setLevel(logging.ERROR)  # quantize_dynamic's pre-processing advice
    with tempfile.TemporaryDirectory() as tmp:
        fp32, int8 = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        onnx.save(model, fp32)
        quantize_dynamic(fp32, int8, weight_type=QuantType.QInt8)
        sessions = {
            "fp32": session(fp32, threads),
            "int8": session(int8, threads),
            "int8_x64prec": session(int8, threads, x64_precision=True),
        }
        for batch in (1, 32, 128) if quick else (1, 32, 128, 512):
            feed = {"x": rng.standard_normal((batch, k)).astype(np.float32)}
            times: dict[str, list[float]] = {name: [] for name in sessions}
            for sess in sessions.values():
                sess.run(None, feed)
            deadline = time.perf_counter() + 1.5
            while len(times["fp32"]) < 10 or time.perf_counter() < deadline:
                for name, sess in sessions.items():
                    start = time.perf_counter()
                    sess.run(None, feed)
                    times[name].append(time.perf_counter() - start)
            fp32_ms, int8_ms, prec_ms = (statistics.median(times[name]) * 1e3 for name in sessions)
            ops = 2.0 * batch * k * n
            rows.append({
                "batch": batch,
                "fp32_ms": fp32_ms,
                "int8_ms": int8_ms,
                "fp32_gflops": ops / fp32_ms / 1e6,
                "int8_gops": ops / int8_ms / 1e6,
                "int8_speedup": fp32_ms / int8_ms,
                "int8_x64prec_speedup": fp32_ms / prec_ms,
                "runs": len(times["fp32"]),
            })  # fmt: skip
    return rows


EXPORT_PROBE = r"""
import contextlib, io, json, sys, tempfile, time, warnings
from pathlib import Path
warnings.simplefilter("ignore")
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
import onnx, onnxruntime
t2 = time.perf_counter()
from ferry.server.convert import architectures
from ferry.server.convert.worker.architectures import build as build_architecture
figures = {"import torch": t1 - t0, "import onnx + onnxruntime": t2 - t1}

def export(label, name, shape, dynamo):
    torch.manual_seed(0)
    module, x = build_architecture(name, {}), torch.randn(2, *shape)
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        path, start = str(Path(tmp) / "m.onnx"), time.perf_counter()
        if dynamo:
            batch = torch.export.Dim("batch", min=1, max=4096)
            program = torch.onnx.export(
                module, (x,), dynamo=True, dynamic_shapes=({0: batch},), opset_version=20
            )
            program.save(path, external_data=False)
        else:
            torch.onnx.export(module, (x,), path, dynamo=False, input_names=["input"],
                              dynamic_axes={"input": {0: "batch"}}, opset_version=20)
        figures[label] = time.perf_counter() - start

export("small_cnn, dynamo exporter, first export in the process", "small_cnn", (3, 32, 32), True)
export("small_cnn, dynamo exporter, second export", "small_cnn", (3, 32, 32), True)
export("mlp, dynamo exporter, third export", "mlp", (64,), True)
export("small_cnn, legacy exporter", "small_cnn", (3, 32, 32), False)
print(json.dumps(figures))
"""


def export_breakdown() -> dict[str, float]:
    """Where a small job's seconds go, in a fresh interpreter like the child's: importing torch,
    and the torch.export-based exporter's one-time cost on its first export in a process."""
    proc = subprocess.run(
        [sys.executable, "-c", EXPORT_PROBE],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if proc.returncode != 0:
        return {"error": proc.stderr[-500:]}  # type: ignore[dict-item]
    figures: dict[str, float] = json.loads(proc.stdout.strip().splitlines()[-1])
    return figures


# ---- the run ----


def bench_model(
    case: ModelCase, root: Path, args: argparse.Namespace, threads: int
) -> dict[str, Any]:
    source, inputs = save_source(case, root)
    calibration = root / f"{case.key}-calibration.npz"
    np.savez(calibration, **random_inputs(inputs, CALIBRATION_SAMPLES, CALIBRATION_SEED))
    jobs: list[JobResult] = []
    for variant in variants_for(case, args.quick, args.cnn_dynamic_int8):
        result = run_job(case, variant, source, job_spec(variant, inputs, calibration), root)
        status = "ok" if result.rc == 0 else f"FAILED rc={result.rc}: {result.error[:200]}"
        print(
            f"  {case.key:<12} {variant:<13} {result.wall_s:6.1f} s  {status}  "
            f"(others used {result.other_cpu_s:.1f} CPU s meanwhile)",
            file=sys.stderr,
        )
        jobs.append(result)
    done = {j.variant: j for j in jobs if j.rc == 0}
    out: dict[str, Any] = {
        "architecture": case.architecture,
        "kwargs": case.kwargs,
        "inputs": [vars(i) for i in inputs],
        "note": case.note if not args.cnn_dynamic_int8 else "",
        "jobs": [],
    }
    for job in jobs:
        out["jobs"].append({
            "variant": job.variant,
            "rc": job.rc,
            "wall_s": job.wall_s,
            "other_cpu_s": job.other_cpu_s,
            "error": job.error,
            "stages": job.report.get("stages", {}),
            "published": job.entry,
            "fp32_in_job": job.fp32_entry() if job.variant != "fp32" else None,
            "pruning": job.report.get("pruning"),
            "notes": job.report.get("notes", []),
        })  # fmt: skip
    if "fp32" not in done:
        return out
    paths = {name: job.model_path for name, job in done.items()}
    print(f"  {case.key:<12} measuring {len(paths)} model files", file=sys.stderr)
    out["bench_accuracy"] = accuracy(paths, inputs, threads)
    batches = (*BATCHES, 128) if case.key == "linear_heavy" and not args.quick else BATCHES
    out["bench_latency"] = latency(paths, inputs, threads, batches)
    out["sizes"] = {name: path.stat().st_size for name, path in paths.items()}
    return out


# ---- the report ----


def _f(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _accuracy_cells(acc: dict[str, Any] | None) -> list[str]:
    if not acc:
        return ["-", "-", "-"]
    return [f"{acc['cosine']:.6f}", f"{acc['max_abs']:.3g}", _f(acc.get("top1_agreement"), 3)]


def stage_table(results: dict[str, Any]) -> list[str]:
    lines = [
        "| model | job | end-to-end s | outside stages | "
        + " | ".join(STAGE_ORDER)
        + " | others' CPU s |",
        "|---|---|---:|---:|" + "---:|" * len(STAGE_ORDER) + "---:|",
    ]
    for key, model in results["models"].items():
        for job in model["jobs"]:
            stages = [_f(job["stages"].get(s)) for s in STAGE_ORDER]
            status = "" if job["rc"] == 0 else f" (failed rc {job['rc']})"
            outside = job["wall_s"] - sum(job["stages"].values())
            lines.append(
                f"| {key} | {job['variant']}{status} | {job['wall_s']:.1f} | {outside:.2f} | "
                + " | ".join(stages)
                + f" | {job['other_cpu_s']:.1f} |"
            )
    return lines


def variant_table(results: dict[str, Any]) -> list[str]:
    lines = [
        "| model | variant | size MB | size ratio | gzip ratio | child x b1 | child x b32 "
        "| bench x b1 | bench x b32 | b32 round-ratio IQR | cosine | max_abs | top-1 | "
        "child cosine (16) | within budget |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---|",
    ]
    for key, model in results["models"].items():
        jobs = {j["variant"]: j for j in model["jobs"] if j["rc"] == 0}
        if "fp32" not in jobs:
            continue
        fp32 = jobs["fp32"]["published"]
        for name, job in jobs.items():
            row = job["published"]
            lat = model.get("bench_latency", {}).get(name, {})
            b1, b32 = lat.get("1", {}), lat.get(str(MAX_BATCH), {})
            if name == "pruned50":
                # The pruned job's own fp32 IS the pruned model: compare with the fp32 job.
                child = {b: fp32["latency_ms"][b] / row["latency_ms"][b] for b in row["latency_ms"]}
                child_cos = row["vs_pytorch"]["cosine"]
            elif name == "fp32":
                child, child_cos = {"1": 1.0, str(MAX_BATCH): 1.0}, None
            else:
                child, child_cos = row["speedup_vs_fp32"], row["vs_fp32"]["cosine"]
            iqr = (
                f"{b32['round_ratio_q1']:.2f}-{b32['round_ratio_q3']:.2f}"
                if b32 and name != "fp32"
                else "-"
            )
            cells = [
                key,
                name,
                f"{row['size_bytes'] / 1e6:.2f}",
                f"{row['size_bytes'] / fp32['size_bytes']:.2f}",
                f"{row['gzip_bytes'] / fp32['gzip_bytes']:.2f}",
                _f(child.get("1")),
                _f(child.get(str(MAX_BATCH))),
                _f(b1.get("speedup_vs_fp32")),
                _f(b32.get("speedup_vs_fp32")),
                iqr,
                *_accuracy_cells(model.get("bench_accuracy", {}).get(name)),
                _f(child_cos, 6),
                "yes" if row.get("within_budget") else "**no**",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def latency_table(results: dict[str, Any]) -> list[str]:
    lines = [
        "| model | variant | batch | bench median ms | runs | IQR/median | child median ms |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for key, model in results["models"].items():
        jobs = {j["variant"]: j for j in model["jobs"] if j["rc"] == 0}
        for name, per_batch in model.get("bench_latency", {}).items():
            child = jobs[name]["published"]["latency_ms"]
            for batch, fig in per_batch.items():
                lines.append(
                    f"| {key} | {name} | {batch} | {fig['median_ms']:.3f} | {fig['runs']} | "
                    f"{fig['spread']:.2f} | {_f(child.get(batch), 3)} |"
                )
    return lines


def child_noise_table(results: dict[str, Any]) -> list[str]:
    """The fp32 model is benchmarked again in every job of a model: its spread across jobs is
    the child benchmark's own noise on this machine."""
    lines = [
        "| model | fp32 b32 ms across jobs (child) | max/min | fp32 b1 ms across jobs | max/min |",
        "|---|---|---:|---|---:|",
    ]
    for key, model in results["models"].items():
        seen: dict[str, list[float]] = {"1": [], str(MAX_BATCH): []}
        for job in model["jobs"]:
            entry = job["published"] if job["variant"] == "fp32" else job["fp32_in_job"]
            if job["rc"] != 0 or job["variant"] == "pruned50" or not entry:
                continue
            for batch, values in seen.items():
                values.append(entry["latency_ms"][batch])
        if not seen["1"]:
            continue
        b1, b32 = seen["1"], seen[str(MAX_BATCH)]
        lines.append(
            f"| {key} | {', '.join(f'{v:.3f}' for v in b32)} | {max(b32) / min(b32):.2f} | "
            f"{', '.join(f'{v:.3f}' for v in b1)} | {max(b1) / min(b1):.2f} |"
        )
    return lines


def saturation_table(results: dict[str, Any]) -> list[str]:
    """Same int8 files, default session vs x64quantprecision: how much of the int8 error is the
    u8s8 kernel saturating on a CPU without VNNI rather than 8-bit rounding."""
    lines = [
        "| model | variant | cosine (default) | top-1 (default) | cosine (x64quantprecision) "
        "| top-1 (x64quantprecision) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for key, model in results["models"].items():
        for name, acc in model.get("bench_accuracy", {}).items():
            precise = acc.get("x64quantprecision")
            if precise and "error" in precise:
                lines.append(
                    f"| {key} | {name} | {acc['cosine']:.6f} | {_f(acc['top1_agreement'], 3)} | "
                    "session fails to load | - |"
                )
            elif precise:
                lines.append(
                    f"| {key} | {name} | {acc['cosine']:.6f} | {_f(acc['top1_agreement'], 3)} | "
                    f"{precise['cosine']:.6f} | {_f(precise['top1_agreement'], 3)} |"
                )
    return lines


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    models = results["models"]
    checks: list[dict[str, Any]] = []
    for key in ("mlp", "cnn"):
        job = next((j for j in models.get(key, {}).get("jobs", []) if j["variant"] == "fp32"), None)
        if job:
            checks.append({
                "target": f"{key}: converts end to end (fp32 job) in < {SMALL_E2E_S:.0f} s",
                "value": f"{job['wall_s']:.1f} s",
                "met": job["rc"] == 0 and job["wall_s"] < SMALL_E2E_S,
            })  # fmt: skip
    heavy = models.get("linear_heavy", {})
    for variant in ("dynamic_int8", "static_int8"):
        lat = heavy.get("bench_latency", {}).get(variant)
        acc = heavy.get("bench_accuracy", {}).get(variant)
        if lat and acc:
            speed = lat[str(MAX_BATCH)]["speedup_vs_fp32"]
            checks.append({
                "target": f"linear_heavy {variant}: >= {INT8_SPEEDUP}x fp32 at batch {MAX_BATCH}, "
                f"cosine >= {INT8_COSINE}",
                "value": f"{speed:.2f}x, cosine {acc['cosine']:.6f}",
                "met": speed >= INT8_SPEEDUP and acc["cosine"] >= INT8_COSINE,
            })  # fmt: skip
    for key in ("mlp", "cnn", "linear_heavy"):
        lat = models.get(key, {}).get("bench_latency", {}).get("pruned50")
        if lat:
            speed = lat[str(MAX_BATCH)]["speedup_vs_fp32"]
            checks.append({
                "target": f"{key} structured 50%: >= {PRUNE_SPEEDUP}x fp32 at batch {MAX_BATCH}",
                "value": f"{speed:.2f}x (batch 1: {lat['1']['speedup_vs_fp32']:.2f}x)",
                "met": speed >= PRUNE_SPEEDUP,
            })  # fmt: skip
    return checks


def markdown(results: dict[str, Any]) -> str:
    cpu = results["cpu"]
    flags = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in cpu["int8_flags"].items())
    out = [
        f"## Conversion benchmark ({results['mode']}, {results['total_s']:.0f} s)",
        "",
        f"{cpu['model']}, {cpu['cpus']} CPUs; {flags}. onnxruntime {cpu['onnxruntime']}, "
        f"torch {cpu['torch']}; child and bench sessions use {results['threads']} intra-op "
        "thread(s) (the child's default: half the CPUs).",
        "",
        "### Jobs: seconds per stage (report.json) and end to end (child process wall time)",
        "",
        *stage_table(results),
        "",
        "outside stages: the child's wall time not in any stage (interpreter start, imports "
        "before the load stage, writing the report, exit). others' CPU s: CPU time the rest of "
        "the machine used during the job (this script's own is ~0); much more than ~1 s means "
        "the job shared the CPUs and its times are inflated.",
        "",
        "### Variants (ratios against the fp32 job's model; x = times faster than fp32)",
        "",
        *variant_table(results),
        "",
        f"cosine / max_abs / top-1: this script, vs the fp32 model on {EVAL_SAMPLES} fresh "
        "inputs (for pruned50: the accuracy drop, no fine-tuning). child cosine: the report's, on "
        "its 16 validation samples (pruned50: vs the unpruned PyTorch model). child x: the "
        f"report's speed-up (median of {BUDGETS['full'].min_rounds}-"
        f"{BUDGETS['full'].max_rounds} interleaved rounds, ~{BUDGETS['full'].per_variant_s} s per "
        "variant); bench x: this script's, variants alternated, many more runs.",
        "",
    ]
    notes = [f"- {k}: {m['note']}" for k, m in results["models"].items() if m.get("note")]
    if notes:
        out += ["Notes:", "", *notes, ""]
    out += [
        "### Latency detail (this script)",
        "",
        *latency_table(results),
        "",
        "### The child's benchmark noise (fp32 re-measured in every job of a model)",
        "",
        *child_noise_table(results),
        "",
        "### int8 accuracy with onnxruntime's u8u8 kernel (session.x64quantprecision=1)",
        "",
        *saturation_table(results),
        "",
        "### Single MatMul [B,1024]x[1024,4096]: fp32 vs dynamic int8 (onnxruntime)",
        "",
        "| batch | fp32 ms | int8 ms | fp32 GFLOP/s | int8 GOP/s | int8 speed-up "
        "| int8 speed-up (x64quantprecision) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        *[
            f"| {r['batch']} | {r['fp32_ms']:.3f} | {r['int8_ms']:.3f} | {r['fp32_gflops']:.1f} | "
            f"{r['int8_gops']:.1f} | {r['int8_speedup']:.2f}x | {r['int8_x64prec_speedup']:.2f}x |"
            for r in results["matmul"]
        ],
        "",
        "### Where a small job's time goes (a fresh interpreter, like the child)",
        "",
        "| step | seconds |",
        "|---|---:|",
        *[
            f"| {k} | {v:.2f} |" if isinstance(v, float) else f"| {k} | {v} |"
            for k, v in results["export_breakdown"].items()
        ],
        "",
        "### Targets",
        "",
        "| target | measured | met |",
        "|---|---|---|",
        *[
            f"| {t['target']} | {t['value']} | {'yes' if t['met'] else '**no**'} |"
            for t in results["targets"]
        ],
    ]
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(CASES), help=f"of {', '.join(CASES)}")
    parser.add_argument(
        "--quick", action="store_true", help="fp32, one int8 variant and pruning per model"
    )
    parser.add_argument(
        "--cnn-dynamic-int8", action="store_true", help="also run dynamic int8 on the CNN (slow)"
    )
    parser.add_argument(
        "--threads", type=int, default=default_threads(), help="intra-op threads (bench side)"
    )
    parser.add_argument("--out", type=Path, default=HERE / "results" / "conversion.json")
    args = parser.parse_args()
    keys = [k.strip() for k in args.models.split(",") if k.strip()]
    unknown = [k for k in keys if k not in CASES]
    if unknown:
        parser.error(f"unknown models {unknown}: choose from {', '.join(CASES)}")

    start = time.perf_counter()
    results: dict[str, Any] = {
        "mode": "quick" if args.quick else "full",
        "threads": args.threads,
        "cpu": cpu_info(),
        "models": {},
    }
    with tempfile.TemporaryDirectory(prefix="ferry-bench-conversion-") as tmp:
        for key in keys:
            results["models"][key] = bench_model(CASES[key], Path(tmp), args, args.threads)
    print("  matmul microbenchmark", file=sys.stderr)
    results["matmul"] = matmul_microbench(args.threads, args.quick)
    print("  export breakdown", file=sys.stderr)
    results["export_breakdown"] = export_breakdown()
    results["targets"] = targets(results)
    results["total_s"] = time.perf_counter() - start
    print(markdown(results))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"\n(written to {args.out})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
