"""The conversion child, run as the server runs it: a real subprocess per job, real torch export,
real onnxruntime, and a progress file (or fd 1) read back as JSON lines.

Jobs that export are marked slow and shared through module-scoped fixtures, so each export happens
once and several tests read its outputs. Parity is checked here, independently of the child's own
report: model.onnx is run by onnxruntime on fresh inputs and compared with the PyTorch model.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, external_data_helper, helper, numpy_helper
from safetensors.torch import save_file

from ferry.server.convert.spec import STAGES, job_from_json
from ferry.server.convert.worker import child, nets, parity, quantize
from ferry.server.convert.worker.pipeline import FINAL_FRACTION
from ferry.server.convert.worker.report import BenchmarkRecord, VariantRecord

PIPELINE = ["load", "prune", "export", "check", "optimize", "quantize", "validate", "benchmark"]
MLP_KWARGS = {"in_features": 16, "hidden": [64, 64], "out_features": 10}
CNN_KWARGS = {"in_channels": 3, "num_classes": 10, "width": 8, "depth": 2}
CNN_INPUT = {"name": "input", "datatype": "FP32", "shape": [-1, 3, 16, 16]}
CHILD = [sys.executable, "-m", "ferry.server.convert.worker.child"]
CHILD_TIMEOUT_S = 240
# The first test of a module fixture pays for all of its jobs (run in parallel): allow for that on
# a loaded machine; each child also has its own CHILD_TIMEOUT_S.
pytestmark = pytest.mark.timeout(600)


# ---- running the child ----


@dataclass
class Result:
    rc: int
    events: list[dict[str, Any]]
    work: Path
    stdout: str = ""
    stderr: str = ""

    @property
    def last(self) -> dict[str, Any]:
        return self.events[-1]

    @property
    def report(self) -> dict[str, Any]:
        report: dict[str, Any] = json.loads((self.work / "report.json").read_text())
        return report

    @property
    def model(self) -> Path:
        return self.work / "model.onnx"

    def variant(self, name: str) -> dict[str, Any]:
        return next(v for v in self.report["variants"] if v["name"] == name)


def write_job(
    root: Path,
    source: Path,
    fmt: str,
    *,
    architecture: str = "",
    kwargs: dict[str, Any] | None = None,
    spec: dict[str, Any] | None = None,
    allow_code_formats: bool = False,
) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    job = {
        "job_id": root.name,
        "model": "m",
        "source_path": str(source),
        "source_format": fmt,
        "source_sha256": hashlib.sha256(source.read_bytes()).hexdigest(),
        "architecture": architecture,
        "architecture_kwargs": kwargs or {},
        "spec": spec or {},
        "work_dir": str(root / "work"),
        "allow_code_formats": allow_code_formats,
    }
    (root / "job.json").write_text(json.dumps(job))
    return root / "job.json"


def convert(
    root: Path,
    source: Path,
    fmt: str,
    *,
    progress_on_stdout: bool = False,
    env: dict[str, str] | None = None,
    **fields: Any,
) -> Result:
    """The child as the server runs it: a subprocess, progress on a file (or on fd 1)."""
    job = write_job(root, source, fmt, **fields)
    progress = root / "progress.jsonl"
    channel = ["--progress-fd", "1"] if progress_on_stdout else ["--progress-file", str(progress)]
    proc = subprocess.run(
        [*CHILD, "--job", str(job), *channel],
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT_S,
        env={**os.environ, **(env or {})},
        check=False,
    )
    lines = proc.stdout if progress_on_stdout else progress.read_text()
    events = [json.loads(line) for line in lines.splitlines()]
    return Result(proc.returncode, events, root / "work", proc.stdout, proc.stderr)


def convert_here(root: Path, source: Path, fmt: str, **fields: Any) -> Result:
    """The same entry (child.run) in this process: for refusals, which would otherwise spend most
    of their time importing torch in a fresh interpreter. From a folder of its own under
    ``root``, as the real child works in its scratch folder (``child._confine_temp``): the
    quantizer's symbolic shape inference writes sym_shape_infer_temp.onnx into the current
    folder when it cannot finish, which left it in the folder pytest was started from."""
    job = job_from_json(write_job(root, source, fmt, **fields).read_text())
    progress = root / "progress.jsonl"
    here = root / "cwd"
    here.mkdir(exist_ok=True)
    with progress.open("w") as stream, contextlib.chdir(here):
        rc = child.run(job, child.Progress(stream))
    events = [json.loads(line) for line in progress.read_text().splitlines()]
    return Result(rc, events, root / "work")


def assert_failed(result: Result, kind: str, stage: str, *phrases: str) -> None:
    assert result.rc == 2, result.stderr[-3000:]
    assert result.last["error_kind"] == kind, result.last
    assert result.last["stage"] == stage, result.last
    for phrase in phrases:
        assert phrase in result.last["message"], result.last["message"]
    assert not result.model.exists()
    assert result.report["error"] == {
        "stage": stage,
        "kind": kind,
        "message": result.last["message"],
    }


def assert_matches_torch(model_path: Path, module: torch.nn.Module, shape: list[int]) -> None:
    """Fresh inputs, batch sizes the child never tried: 1 and 7."""
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    rng = np.random.default_rng(1234)
    for batch in (1, 7):
        x = rng.standard_normal([batch, *shape]).astype(np.float32)
        (got,) = session.run(None, {name: x})
        with torch.no_grad():
            want = module.eval()(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


# ---- sources ----


def seeded(build: Any, **kwargs: Any) -> torch.nn.Module:
    torch.manual_seed(0)
    module: torch.nn.Module = build(**kwargs)
    return module.eval()


TRACE = 'File "/home/someone/private/train.py", line 42, in forward\n'


def onnx_mlp(path: Path, *, custom_domain: bool = False) -> Path:
    """A 8 -> 16 -> 4 MLP written with onnx.helper, batch dim symbolic ("N")."""
    rng = np.random.default_rng(0)
    weights = {
        "w1": rng.standard_normal((8, 16)).astype(np.float32),
        "b1": rng.standard_normal(16).astype(np.float32),
        "w2": rng.standard_normal((16, 4)).astype(np.float32),
        "b2": rng.standard_normal(4).astype(np.float32),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h0"]),
        helper.make_node("Add", ["h0", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h2"]),
        helper.make_node("MatMul", ["h2", "w2"], ["y0"]),
        helper.make_node("Add", ["y0", "b2"], ["y"]),
    ]
    # What torch's exporter records on each node: a stack trace naming the exporter's files.
    for node in nodes:
        node.metadata_props.add(key="pkg.torch.onnx.stack_trace", value=TRACE * 20)
    opsets = [helper.make_opsetid("", 17)]
    if custom_domain:
        nodes[2] = helper.make_node("FancyRelu", ["h1"], ["h2"], domain="com.example.ops")
        opsets.append(helper.make_opsetid("com.example.ops", 1))
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        initializer=[numpy_helper.from_array(a, n) for n, a in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


def save_graph(
    path: Path,
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    inits: dict[str, np.ndarray],
) -> Path:
    """``nodes`` as a model at opset 17 (IR 8), saved to ``path``: the hand-written ONNX
    sources the budget tests convert."""
    graph = helper.make_graph(
        nodes, "g", inputs, outputs, [numpy_helper.from_array(v, n) for n, v in inits.items()]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


class CreatesFile:
    """Unpickling calls open(path, "w"): a payload that would leave a file behind."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (str(self.path), "w"))


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sources")
    paths = {name: root / name for name in ("seed.pt", "mlp.pt", "mlp.safetensors", "cnn.pt")}
    paths["mlp.onnx"] = onnx_mlp(root / "mlp.onnx")
    torch.save(seeded(nets.seed).state_dict(), paths["seed.pt"])
    mlp = seeded(nets.mlp, **MLP_KWARGS)
    torch.save(mlp.state_dict(), paths["mlp.pt"])
    save_file(mlp.state_dict(), str(paths["mlp.safetensors"]))
    torch.save(seeded(nets.small_cnn, **CNN_KWARGS).state_dict(), paths["cnn.pt"])

    paths["mlp.ts"] = root / "mlp.ts"
    torch.jit.script(mlp).save(str(paths["mlp.ts"]))
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(mlp, (torch.randn(2, 16),), dynamic_shapes=({0: batch},))
    paths["mlp.pt2"] = root / "mlp.pt2"
    torch.export.save(program, str(paths["mlp.pt2"]))
    seq = torch.export.Dim("seq", min=2, max=64)
    program = torch.export.export(
        SumOverSequence(), (torch.randn(2, 5, 4),), dynamic_shapes=({0: batch, 1: seq},)
    )
    paths["seq.pt2"] = root / "seq.pt2"
    torch.export.save(program, str(paths["seq.pt2"]))

    paths["evil.pt"] = root / "evil.pt"
    paths["pwned"] = root / "pwned.txt"
    torch.save({"weights": CreatesFile(paths["pwned"])}, paths["evil.pt"])

    rng = np.random.default_rng(7)
    paths["calibration.npz"] = root / "calibration.npz"
    np.savez(
        paths["calibration.npz"], input=rng.standard_normal((64, 3, 16, 16)).astype(np.float32)
    )
    x = rng.standard_normal((12, 8)).astype(np.float32)
    session = ort.InferenceSession(str(paths["mlp.onnx"]), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"x": x})
    for name, arrays in {
        "samples": {"x": x},
        "good_ref": {"y": y},
        "bad_ref": {"y": y + 1.0},
        "nan_ref": {"y": np.full_like(y, np.nan)},
    }.items():
        paths[f"{name}.npz"] = root / f"{name}.npz"
        np.savez(paths[f"{name}.npz"], **arrays)
    return paths


# ---- the jobs that run the child as a subprocess, all started at once ----


def job_table(root: Path, src: dict[str, Path]) -> dict[str, tuple[Path, str, dict[str, Any]]]:
    """Every subprocess job: name -> (source, format, convert() keywords)."""
    (root / "seed" / "home").mkdir(parents=True)
    (root / "seed" / "tmp").mkdir()
    isolated = {"HOME": str(root / "seed" / "home"), "TMPDIR": str(root / "seed" / "tmp")}

    def pruned(method: str) -> dict[str, Any]:
        return {"pruning": {"method": method, "amount": 0.5}, "validation": {"min_cosine": 0.0}}

    def reference(name: str) -> dict[str, Any]:
        files = {"sample_file": str(src["samples.npz"]), "reference_file": str(src[f"{name}.npz"])}
        return {"validation": files}

    mlp = {"architecture": "mlp", "kwargs": MLP_KWARGS}
    cnn = {"architecture": "small_cnn", "kwargs": CNN_KWARGS}
    cnn_static = {
        "inputs": [CNN_INPUT],
        "quantization": {
            "mode": "static_int8",
            "calibration_file": str(src["calibration.npz"]),
            "keep_slower": True,  # a graph this small may run slower quantized
        },
        "validation": {"min_cosine": 0.9},
    }
    overpruned = {
        "inputs": [CNN_INPUT],
        "pruning": {"method": "l1_unstructured", "amount": 0.9},
        "validation": {"min_cosine": 0.999, "keep_failed": True},
    }
    ts_inputs = {"inputs": [{"name": "features", "datatype": "FP32", "shape": [-1, 16]}]}
    auto = {"quantization": {"mode": "auto"}}
    return {
        "seed": (
            src["seed.pt"],
            "state_dict",
            {"architecture": "seed", "progress_on_stdout": True, "env": isolated},
        ),
        "mlp_auto": (src["mlp.safetensors"], "safetensors", {**mlp, "spec": auto}),
        "l1_unstructured": (
            src["mlp.pt"],
            "state_dict",
            {**mlp, "spec": pruned("l1_unstructured")},
        ),
        "global_unstructured": (
            src["mlp.pt"],
            "state_dict",
            {**mlp, "spec": pruned("global_unstructured")},
        ),
        "structured": (src["mlp.pt"], "state_dict", {**mlp, "spec": pruned("structured")}),
        "cnn_static": (src["cnn.pt"], "state_dict", {**cnn, "spec": cnn_static}),
        "cnn_keep_failed": (src["cnn.pt"], "state_dict", {**cnn, "spec": overpruned}),
        "pt2": (src["mlp.pt2"], "exported_program", {"allow_code_formats": True}),
        "torchscript": (
            src["mlp.ts"],
            "torchscript",
            {"allow_code_formats": True, "spec": ts_inputs},
        ),
        "evil": (src["evil.pt"], "state_dict", {"architecture": "seed"}),
        "pt2_refused": (src["mlp.pt2"], "exported_program", {}),
        "pt2_seq": (src["seq.pt2"], "exported_program", {"allow_code_formats": True}),
        # keep_slower: quantized, a graph this small is usually slower than fp32.
        "onnx_fp16": (
            src["mlp.onnx"],
            "onnx",
            {"spec": {"quantization": {"mode": "fp16", "keep_slower": True}}},
        ),
        "onnx_dynamic_int8": (
            src["mlp.onnx"],
            "onnx",
            {"spec": {"quantization": {"mode": "dynamic_int8", "keep_slower": True}}},
        ),
        "onnx_good_ref": (src["mlp.onnx"], "onnx", {"spec": reference("good_ref")}),
        "onnx_bad_ref": (src["mlp.onnx"], "onnx", {"spec": reference("bad_ref")}),
        "onnx_nan_ref": (src["mlp.onnx"], "onnx", {"spec": reference("nan_ref")}),
    }


EXPORTING = (
    "seed", "mlp_auto", "l1_unstructured", "global_unstructured", "structured", "cnn_static",
    "cnn_keep_failed", "pt2", "pt2_seq", "torchscript",
)  # fmt: skip
QUICK = (
    "evil", "pt2_refused", "onnx_fp16", "onnx_dynamic_int8", "onnx_good_ref", "onnx_bad_ref",
    "onnx_nan_ref",
)  # fmt: skip


def run_all(root: Path, src: dict[str, Path], names: list[str]) -> dict[str, Result]:
    """Run jobs in parallel (each child is its own process), at most 4 at a time for memory."""
    table = job_table(root, src)
    workers = max(2, min(4, os.cpu_count() or 2))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {
            name: pool.submit(
                convert, root / name / "job", table[name][0], table[name][1], **table[name][2]
            )
            for name in names
        }
        return {name: future.result() for name, future in futures.items()}


# Runs jobs one after another through the child's own entry (child.main, what ``python -m`` runs),
# each with its own job file, progress file and work folder; argv: (job, progress, rc file)...
SHARED_CHILD = """
import sys
from ferry.server.convert.worker import child
args = sys.argv[1:]
for job, progress, rc in zip(args[::3], args[1::3], args[2::3]):
    code = child.main(["--job", job, "--progress-file", progress])
    open(rc, "w").write(str(code))
"""


def convert_shared(
    root: Path, table: dict[str, tuple[Path, str, dict[str, Any]]], names: list[str]
) -> dict[str, Result]:
    """Jobs in one child process, one after another: the torch import and the exporter's
    first-use cost (most of a small job's 20 s) are paid once instead of once per job. For jobs
    whose tests read only their outputs; what only a fresh process shows (progress on fd 1,
    nothing written into HOME or TMPDIR) is the seed job's, which runs alone (``convert``)."""
    argv: list[str] = []
    for name in names:
        source, fmt, fields = table[name]
        job = write_job(root / name / "job", source, fmt, **fields)
        argv += [str(job), str(job.parent / "progress.jsonl"), str(job.parent / "rc")]
    proc = subprocess.run(
        [sys.executable, "-c", SHARED_CHILD, *argv],
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT_S * len(names),
        check=False,
    )
    results = {}
    for name in names:
        folder = root / name / "job"
        rc_file, progress = folder / "rc", folder / "progress.jsonl"
        rc = int(rc_file.read_text()) if rc_file.exists() else proc.returncode
        lines = progress.read_text().splitlines() if progress.exists() else []
        events = [json.loads(line) for line in lines]
        results[name] = Result(rc, events, folder / "work", proc.stdout, proc.stderr)
    return results


@pytest.fixture(scope="module")
def jobs(tmp_path_factory: pytest.TempPathFactory, sources: dict[str, Path]) -> dict[str, Result]:
    """The exporting jobs, each run once; tests read their outputs. The seed job runs in a
    process of its own, the others in two shared ones (``convert_shared``), all at once."""
    root = tmp_path_factory.mktemp("jobs")
    table = job_table(root, sources)
    shared = [name for name in EXPORTING if name != "seed"]
    with ThreadPoolExecutor(max_workers=3) as pool:
        seed = pool.submit(convert, root / "seed" / "job", *table["seed"][:2], **table["seed"][2])
        groups = [pool.submit(convert_shared, root, table, shared[i::2]) for i in range(2)]
        results = {"seed": seed.result()}
        for group in groups:
            results.update(group.result())
    return results


@pytest.fixture(scope="module")
def quick_jobs(
    tmp_path_factory: pytest.TempPathFactory, sources: dict[str, Path]
) -> dict[str, Result]:
    """Subprocess jobs that never export: refusals and ONNX sources."""
    return run_all(tmp_path_factory.mktemp("quick"), sources, list(QUICK))


def succeeded(result: Result) -> Result:
    assert result.rc == 0, result.stderr[-3000:]
    assert result.last["fraction"] == FINAL_FRACTION and result.last["error_kind"] == ""
    return result


# ---- state_dict / safetensors, fp32 ----


@pytest.mark.slow
def test_state_dict_seed_matches_pytorch(jobs: dict[str, Result]) -> None:
    seed = succeeded(jobs["seed"])
    assert_matches_torch(seed.model, seeded(nets.seed), [3])
    model = onnx.load(str(seed.model))
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch dim
    assert all(init.data_location == TensorProto.DEFAULT for init in model.graph.initializer)


@pytest.mark.slow
def test_progress_in_order_and_clean_stdout(jobs: dict[str, Result]) -> None:
    # Progress went to fd 1 and every stdout line parsed as an event: the exporter's chatter,
    # printed on stdout, went elsewhere.
    seed = succeeded(jobs["seed"])
    stages = [e["stage"] for e in seed.events]
    assert stages == [*PIPELINE, "benchmark"] and set(stages) <= set(STAGES)
    fractions = [e["fraction"] for e in seed.events]
    assert fractions == sorted(fractions)
    assert all(e["error_kind"] == "" for e in seed.events)
    assert seed.events[1]["message"] == "skipped: no pruning requested"
    assert "[torch.onnx]" in seed.stderr


@pytest.mark.slow
def test_report_and_work_dir(jobs: dict[str, Result], sources: dict[str, Path]) -> None:
    seed = succeeded(jobs["seed"])
    report = seed.report
    assert sorted(p.name for p in seed.work.iterdir()) == ["model.onnx", "report.json"]
    assert report["published"] == "fp32" and report["within_budget"] is True
    assert report["exporter"] == "torch.onnx.export(dynamo=True)" and report["opset"] == 20
    assert report["torch"].startswith("2.") and report["onnxruntime"] and report["onnx"]
    assert report["source_sha256"] == hashlib.sha256(sources["seed.pt"].read_bytes()).hexdigest()
    assert report["inputs"] == [
        {"name": "input", "datatype": "FP32", "shape": [-1, 3], "dynamic_axes": []}
    ]
    assert report["parity"]["against"] == "pytorch" and report["parity"]["max_abs"] < 1e-4
    assert set(PIPELINE) - {"prune", "quantize"} == set(report["stages"])
    fp32 = seed.variant("fp32")
    assert fp32["published"] and set(fp32["latency_ms"]) == {"1", "32"}
    # The published file's size (the candidate's was a few hundred bytes off)
    assert fp32["size_bytes"] == seed.model.stat().st_size and fp32["gzip_bytes"] > 0


@pytest.mark.slow
def test_nothing_written_outside_work_dir(jobs: dict[str, Result]) -> None:
    succeeded(jobs["seed"])
    root = jobs["seed"].work.parent.parent
    assert list((root / "home").iterdir()) == [] and list((root / "tmp").iterdir()) == []


@pytest.mark.slow
def test_safetensors_auto_reports_every_candidate(jobs: dict[str, Result]) -> None:
    result = succeeded(jobs["mlp_auto"])
    report = result.report
    assert [v["name"] for v in report["variants"]] == ["fp32", "dynamic_int8", "fp16"]
    assert report["quantization"]["skipped"] == {
        "static_int8": "no quantization.calibration_file was given"
    }
    assert [v["name"] for v in report["variants"] if v["published"]] == [report["published"]]
    for variant in report["variants"][1:]:
        assert variant["vs_fp32"]["cosine"] > 0.99 and variant["within_budget"]
        # Both batch sizes, unless the benchmark stopped timing a clearly slower variant.
        expected = {"1"} if "stopped timing" in variant["note"] else {"1", "32"}
        assert set(variant["speedup_vs_fp32"]) == expected
    assert result.variant("dynamic_int8")["size_bytes"] < result.variant("fp32")["size_bytes"] * 0.6
    assert "fp32 1.00x" in report["quantization"]["selection"]
    if report["published"] == "fp32":
        assert_matches_torch(result.model, seeded(nets.mlp, **MLP_KWARGS), [16])
    else:  # never one slower than fp32 over both batch sizes
        speedups = list(result.variant(report["published"])["speedup_vs_fp32"].values())
        assert float(np.prod(speedups)) ** (1 / len(speedups)) >= quantize.AUTO_MIN_SPEEDUP


# ---- pruning ----


@pytest.mark.slow
@pytest.mark.parametrize("method", ["l1_unstructured", "global_unstructured"])
def test_unstructured_pruning_reports_sparsity(jobs: dict[str, Result], method: str) -> None:
    result = succeeded(jobs[method])
    pruning = result.report["pruning"]
    assert pruning["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert pruning["fine_tuned"] is False and "no fine-tuning" in pruning["note"]
    assert pruning["params_after"] == pruning["params_before"]
    fp32 = result.variant("fp32")
    assert fp32["sparsity"] == pytest.approx(0.5, abs=0.02)
    # Same dense shapes, but the zeros compress.
    assert fp32["gzip_bytes"] < jobs["mlp_auto"].variant("fp32")["gzip_bytes"] * 0.85
    assert result.report["parity"]["against"] == "pytorch (pruned)"
    assert result.report["parity"]["max_abs"] < 1e-4


@pytest.mark.slow
def test_structured_pruning_shrinks_the_model(jobs: dict[str, Result]) -> None:
    result = succeeded(jobs["structured"])
    pruning = result.report["pruning"]
    assert pruning["params_after"] < pruning["params_before"] * 0.6
    unpruned = jobs["mlp_auto"].variant("fp32")["size_bytes"]
    assert result.variant("fp32")["size_bytes"] < unpruned * 0.6
    session = ort.InferenceSession(str(result.model), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"input": np.ones((5, 16), np.float32)})
    assert out.shape == (5, 10)  # the classifier was not pruned


def test_accuracy_budget_rejects_overpruned_model(tmp_path: Path, sources: dict[str, Path]) -> None:
    spec = {
        "inputs": [CNN_INPUT],
        "pruning": {"method": "l1_unstructured", "amount": 0.9},
        "validation": {"min_cosine": 0.999},
    }
    result = convert_here(
        tmp_path,
        sources["cnn.pt"],
        "state_dict",
        architecture="small_cnn",
        kwargs=CNN_KWARGS,
        spec=spec,
    )
    assert_failed(result, "CONVERSION_FAILED", "prune", "min_cosine 0.999", "keep_failed")
    assert result.report["pruning"]["vs_unpruned"]["cosine"] < 0.999


@pytest.mark.slow
def test_keep_failed_publishes_below_budget(jobs: dict[str, Result]) -> None:
    result = succeeded(jobs["cnn_keep_failed"])
    assert result.report["within_budget"] is False
    fp32 = result.variant("fp32")
    assert fp32["published"] and not fp32["within_budget"] and "below budget" in fp32["note"]
    assert fp32["vs_pytorch"]["cosine"] < 0.999
    assert fp32["budget_against"] == "pytorch"


# ---- quantization ----


@pytest.mark.slow
def test_static_int8_cnn_with_calibration(jobs: dict[str, Result]) -> None:
    result = succeeded(jobs["cnn_static"])
    assert result.report["published"] == "static_int8"
    ops = {node.op_type for node in onnx.load(str(result.model)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    variant = result.variant("static_int8")
    assert variant["within_budget"] and variant["vs_fp32"]["top1_agreement"] is not None
    assert "calibrated on 64 samples" in variant["note"]  # fewer than recommended: said so


def test_static_int8_needs_calibration(tmp_path: Path, sources: dict[str, Path]) -> None:
    spec = {"quantization": {"mode": "static_int8"}}
    result = convert_here(tmp_path, sources["mlp.onnx"], "onnx", spec=spec)
    assert_failed(result, "INVALID_ARGUMENT", "load", "calibration_file")


@pytest.mark.parametrize("mode", ["fp16", "dynamic_int8"])
def test_onnx_source_quantized(
    quick_jobs: dict[str, Result], sources: dict[str, Path], mode: str
) -> None:
    result = succeeded(quick_jobs[f"onnx_{mode}"])
    report = result.report
    assert report["published"] == mode and report["exporter"] is None
    assert report["parity"]["against"] == "onnx_source"
    assert report["inputs"] == [
        {"name": "x", "datatype": "FP32", "shape": [-1, 8], "dynamic_axes": []}
    ]
    assert [e["stage"] for e in result.events] == [*PIPELINE, "benchmark"]
    assert result.variant(mode)["vs_fp32"]["cosine"] > 0.99
    source = ort.InferenceSession(str(sources["mlp.onnx"]), providers=["CPUExecutionProvider"])
    served = ort.InferenceSession(str(result.model), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(5).standard_normal((9, 8)).astype(np.float32)
    (want,), (got,) = source.run(None, {"x": x}), served.run(None, {"x": x})
    cosine = float(np.sum(got * want) / (np.linalg.norm(got) * np.linalg.norm(want)))
    assert cosine > 0.99
    # The source's per-node provenance (stack traces naming the exporter's files) is neither
    # published nor counted in the variants' sizes.
    assert "private/train.py" not in result.model.read_bytes().decode("latin-1")
    if mode == "fp16":  # (int8's scales outweigh its savings on a model this small)
        assert result.variant(mode)["size_bytes"] < result.variant("fp32")["size_bytes"]


def test_onnx_source_with_client_reference(quick_jobs: dict[str, Result]) -> None:
    good = succeeded(quick_jobs["onnx_good_ref"])
    assert good.report["reference"]["max_abs"] < 1e-5
    assert good.variant("fp32")["budget_against"] == "reference"
    # The reference outputs are PyTorch's: parity states it, not the ONNX graph against itself.
    assert good.report["parity"]["against"] == "pytorch (reference_outputs)"
    assert good.variant("fp32")["vs_pytorch"] == good.report["reference"]
    assert_failed(quick_jobs["onnx_bad_ref"], "CONVERSION_FAILED", "validate", "reference_file")
    # A reference of NaN is the client's file, not a model that disagrees with it.
    assert_failed(
        quick_jobs["onnx_nan_ref"], "INVALID_ARGUMENT", "load", "reference_file", "is NaN in"
    )


# ---- refusals ----


def test_pickle_payload_refused_and_never_runs(
    quick_jobs: dict[str, Result], sources: dict[str, Path]
) -> None:
    message = ("the file is not a plain state_dict", "open", "could run code")
    assert_failed(quick_jobs["evil"], "INVALID_ARGUMENT", "load", *message)
    assert not sources["pwned"].exists()


def test_whole_module_refused_with_formats(tmp_path: Path) -> None:
    source = tmp_path / "whole.pt"
    torch.save(seeded(nets.seed), source)
    result = convert_here(tmp_path / "job", source, "state_dict", architecture="seed")
    assert_failed(
        result, "INVALID_ARGUMENT", "load", "not a plain state_dict", "torch.save(model.state_dict()",
        "safetensors", "ONNX",
    )  # fmt: skip


def test_unknown_architecture(tmp_path: Path, sources: dict[str, Path]) -> None:
    result = convert_here(tmp_path, sources["seed.pt"], "state_dict", architecture="vgg99")
    assert_failed(result, "INVALID_ARGUMENT", "load", "unknown architecture 'vgg99'", "seed, mlp")


def test_weights_that_do_not_fit_the_architecture(tmp_path: Path, sources: dict[str, Path]) -> None:
    kwargs = {**MLP_KWARGS, "hidden": [32, 64]}
    result = convert_here(
        tmp_path, sources["mlp.pt"], "state_dict", architecture="mlp", kwargs=kwargs
    )
    assert_failed(
        result,
        "INVALID_ARGUMENT",
        "load",
        "shape mismatches",
        "0.weight: file [64, 16] vs model [32, 16]",
    )


def test_code_formats_refused_by_default(quick_jobs: dict[str, Result], tmp_path: Path) -> None:
    assert_failed(quick_jobs["pt2_refused"], "FAILED_PRECONDITION", "load", "--allow-code-formats")
    source = tmp_path / "model.ts"
    source.write_bytes(b"never opened")
    result = convert_here(tmp_path / "job", source, "torchscript")
    assert_failed(result, "FAILED_PRECONDITION", "load", "--allow-code-formats", "executes code")


def test_missing_input_specs(tmp_path: Path, sources: dict[str, Path]) -> None:
    result = convert_here(tmp_path, sources["mlp.ts"], "torchscript", allow_code_formats=True)
    assert_failed(result, "INVALID_ARGUMENT", "load", "spec.inputs is required", '"shape": [-1')


def test_onnx_custom_domain_refused(tmp_path: Path) -> None:
    source = onnx_mlp(tmp_path / "custom.onnx", custom_domain=True)
    result = convert_here(tmp_path / "job", source, "onnx")
    assert_failed(result, "INVALID_ARGUMENT", "load", "com.example.ops", "custom-op domain")


def test_an_onnx_file_onnxruntime_refuses_is_invalid_argument(tmp_path: Path) -> None:
    """A hostile tensor that only onnxruntime judges (dims claiming 16 TiB over 16 bytes, a
    negative dim): the session never opened, yet the job was FAILED_PRECONDITION saying the
    model failed on the validation samples, advising to check spec.inputs and the batch."""
    for name, dims in (("huge", [1 << 40, 4]), ("negative", [-1, 4])):
        model = onnx.load(str(onnx_mlp(tmp_path / f"{name}.onnx")))
        (w,) = [t for t in model.graph.initializer if t.name == "b2"]
        del w.dims[:]
        w.dims.extend(dims)
        onnx.save(model, str(tmp_path / f"{name}.onnx"))
        result = convert_here(tmp_path / name, tmp_path / f"{name}.onnx", "onnx")
        assert_failed(result, "INVALID_ARGUMENT", "load", "onnxruntime cannot load")
        assert "refuses the uploaded ONNX file itself" in result.last["message"]
        assert "spec.inputs" not in result.last["message"]


@pytest.mark.parametrize("pruned", [False, True])
def test_an_onnx_file_the_checker_refuses_is_invalid_argument(tmp_path: Path, pruned: bool) -> None:
    """A graph onnxruntime opens (it sorts nodes itself) but onnx.checker refuses (nodes out
    of order) is the client's file at fault: it was CONVERSION_FAILED (FAILED_PRECONDITION),
    and the checker's words were cut at their first line, before the node they name. Pruned,
    the refusal blamed the pruning ("report this graph") for the client's graph."""
    w = numpy_helper.from_array(np.arange(16, dtype=np.float32).reshape(4, 4), "w")
    graph = helper.make_graph(
        [helper.make_node("Relu", ["t"], ["y"]), helper.make_node("MatMul", ["x", "w"], ["t"])],
        "unsorted",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        initializer=[w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, str(tmp_path / "unsorted.onnx"))
    spec = {"pruning": {"method": "l1_unstructured", "amount": 0.3}} if pruned else None
    result = convert_here(tmp_path / "job", tmp_path / "unsorted.onnx", "onnx", spec=spec)
    assert_failed(
        result,
        "INVALID_ARGUMENT",
        "prune" if pruned else "check",
        "the uploaded ONNX graph fails onnx.checker: Nodes in a graph must be topologically",
        "OpType: Relu is not output of any previous nodes",
        "upload it again",
    )


def test_libraries_write_nothing_beside_the_source_or_into_home(tmp_path: Path) -> None:
    """onnxruntime's quantizer writes ``<model>-inferred.onnx`` beside its input and its telemetry
    writes under the cache and temp folders. The child reads the source through a link in its
    scratch space: the uploads folder is not even touched (its mtime would change on any entry
    created or removed), and the home, cache and temp folders it was given stay empty."""
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    source = onnx_mlp(uploads / "0123.onnx")
    os.utime(uploads, ns=(1_000_000_000, 1_000_000_000))
    env = {name: str(tmp_path / name.lower()) for name in ("HOME", "TMPDIR", "XDG_CACHE_HOME")}
    for folder in env.values():
        Path(folder).mkdir()
    spec = {"quantization": {"mode": "dynamic_int8", "keep_slower": True}}
    result = succeeded(convert(tmp_path / "job", source, "onnx", spec=spec, env=env))
    assert result.report["published"] == "dynamic_int8"
    assert sorted(p.name for p in result.work.iterdir()) == ["model.onnx", "report.json"]
    assert [p.name for p in uploads.iterdir()] == ["0123.onnx"]
    assert uploads.stat().st_mtime_ns == 1_000_000_000
    assert all(list(Path(folder).iterdir()) == [] for folder in env.values())


def test_the_child_switches_telemetry_off_and_runs_in_scratch(tmp_path: Path) -> None:
    """What the confinement leaves once onnxruntime has run: nothing but the scratch folders."""
    model = onnx_mlp(tmp_path / "m.onnx")
    work = tmp_path / "work"
    probe = f"""
import json, os, sys
from pathlib import Path
from ferry.server.convert.worker import child
child._confine_temp(Path({str(work)!r}))
import onnxruntime
onnxruntime.InferenceSession({str(model)!r}, providers=["CPUExecutionProvider"])
files = sorted(str(p.relative_to({str(work)!r})) for p in Path({str(work)!r}).rglob("*"))
print(json.dumps({{"cwd": os.getcwd(), "files": files}}))
"""
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    env.pop("ORT_DISABLE_TELEMETRY", None)
    out = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout.splitlines()[-1])
    assert seen == {"cwd": str(work / ".scratch" / "tmp"), "files": [".scratch", ".scratch/tmp"]}
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("location", ["weights.bin", "/etc/passwd", "../outside.bin"])
def test_onnx_external_data_refused(
    tmp_path: Path, sources: dict[str, Path], location: str
) -> None:
    model = onnx.load(str(sources["mlp.onnx"]))
    external_data_helper.convert_model_to_external_data(model, location="w.bin", size_threshold=0)
    for init in model.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                entry.value = location
    source = tmp_path / "external.onnx"
    source.write_bytes(model.SerializeToString())
    result = convert_here(tmp_path / "job", source, "onnx")
    assert_failed(result, "INVALID_ARGUMENT", "load", "external data", location, "self-contained")


def test_pruning_refuses_code_formats(tmp_path: Path, sources: dict[str, Path]) -> None:
    """TorchScript has no class to prune and no graph yet: ONNX or a state_dict can be pruned."""
    spec = {"pruning": {"method": "l1_unstructured", "amount": 0.3}}
    result = convert_here(
        tmp_path, sources["mlp.ts"], "torchscript", spec=spec, allow_code_formats=True
    )
    assert_failed(
        result, "INVALID_ARGUMENT", "load", "a torchscript source cannot be pruned", "as ONNX"
    )


def test_truncated_upload(tmp_path: Path, sources: dict[str, Path]) -> None:
    source = tmp_path / "truncated.pt"
    source.write_bytes(sources["seed.pt"].read_bytes()[:200])
    result = convert_here(tmp_path / "job", source, "state_dict", architecture="seed")
    assert_failed(result, "INVALID_ARGUMENT", "load", "corrupt or truncated")


def test_unreadable_job_is_a_crash(tmp_path: Path) -> None:
    (tmp_path / "job.json").write_text('{"job_id": "x"')
    progress = tmp_path / "progress.jsonl"
    proc = subprocess.run(
        [*CHILD, "--job", str(tmp_path / "job.json"), "--progress-file", str(progress)],
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT_S,
        check=False,
    )
    assert proc.returncode == 1 and "Traceback" in proc.stderr
    (event,) = [json.loads(line) for line in progress.read_text().splitlines()]
    assert event["error_kind"] == "INTERNAL" and "could not read its job" in event["message"]


# ---- code-bearing formats, when the operator allows them ----


@pytest.mark.slow
def test_exported_program_allowed(jobs: dict[str, Result]) -> None:
    result = succeeded(jobs["pt2"])
    assert result.report["inputs"][0]["shape"] == [-1, 16]  # read from the program
    assert result.report["exporter"] == "torch.onnx.export(dynamo=True)"
    assert_matches_torch(result.model, seeded(nets.mlp, **MLP_KWARGS), [16])


class SumOverSequence(torch.nn.Module):
    """[batch, seq, 4] -> [batch, 4]: a program whose sequence dim torch.export keeps dynamic."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.linear = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x).sum(dim=1)


@pytest.mark.slow
def test_an_exported_programs_own_dynamic_axes_are_kept(jobs: dict[str, Result]) -> None:
    """The program's symbolic dims besides the batch become its dynamic axes, with the range
    torch.export proved: exported symbolic, run at both bounds, carried by the file."""
    result = succeeded(jobs["pt2_seq"])
    (spec,) = result.report["inputs"]
    assert spec["shape"] == [-1, 8, 4]  # sampled at 8, within the program's 2..64
    (axis,) = spec["dynamic_axes"]
    assert (axis["axis"], axis["min"], axis["max"]) == (1, 2, 64)
    assert any("dynamic axes verified" in n and "=64" in n for n in result.report["notes"])
    props = {p.key: p.value for p in onnx.load(str(result.model)).metadata_props}
    assert json.loads(props["ferry.dynamic_axes"])["x"]["1"][1:] == [2, 64]
    session = ort.InferenceSession(str(result.model), providers=["CPUExecutionProvider"])
    module = SumOverSequence().eval()
    for length in (2, 17, 64):
        x = np.random.default_rng(length).standard_normal([3, length, 4]).astype(np.float32)
        (got,) = session.run(None, {"x": x})
        with torch.no_grad():
            np.testing.assert_allclose(got, module(torch.from_numpy(x)).numpy(), atol=1e-5)


@pytest.mark.slow
def test_torchscript_allowed_uses_the_legacy_exporter(jobs: dict[str, Result]) -> None:
    result = succeeded(jobs["torchscript"])
    assert result.report["exporter"] == "torch.onnx.export(dynamo=False)"
    assert result.report["inputs"][0]["name"] == "features"
    assert_matches_torch(result.model, seeded(nets.mlp, **MLP_KWARGS), [16])


# ---- pure functions ----


def test_export_errors_name_the_unsupported_operator() -> None:
    from ferry.server.convert.worker.export import _export_error

    legacy = torch.onnx.errors.UnsupportedOperatorError("aten::special_bessel_j0", 20, None)
    dynamo = RuntimeError(
        "No ONNX function found for <OpOverload(op='prims.bessel_j0', overload='default')>"
    )
    error = _export_error(dynamo, legacy, 20)
    assert error.kind.value == "UNIMPLEMENTED" and "aten::special_bessel_j0" in error.message
    other = _export_error(RuntimeError("guard failed"), RuntimeError("shape mismatch"), 20)
    assert other.kind.value == "CONVERSION_FAILED" and "shape mismatch" in other.message


def test_figures() -> None:
    ref = np.array([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    same = parity.compare([ref], [ref])
    assert same.max_abs == 0.0 and same.cosine == pytest.approx(1.0)
    assert same.top1_agreement == 1.0
    flipped = parity.compare([ref[::-1].copy()], [ref])
    assert flipped.top1_agreement == 0.0 and flipped.max_abs == 2.0
    assert parity.tolerance_failure([ref + 1e-6], [ref], 1e-3, 1e-4) == ""
    off_by_one = ref + np.array([[0, 0, 1], [1, 0, 0]])
    assert "2 of 6" in parity.tolerance_failure([off_by_one], [ref], 1e-3, 1e-4)
    assert "min_top1_agreement" in parity.budget_failure(flipped, 0.0, 0.5)
    assert parity.budget_failure(same, 0.99, 0.9) == ""


@pytest.mark.parametrize(
    ("candidate", "reference", "words"),
    [
        # A NaN in the reference made the largest excess NaN (not > 0): a model that disagreed
        # was published. An all-NaN one crashed the child (nanargmax of all NaN).
        ([-2.5, -2.5], [np.nan, 1000.0], "2 of 2 elements"),
        ([1.0, 2.0], [np.nan, np.nan], "2 of 2 elements"),
        ([np.nan, 1.0], [np.nan, 1.0], "1 of 2 elements"),  # NaN is never close, as in allclose
        ([1.0, 2.0], [np.inf, np.inf], "worst 1 vs inf"),
        ([np.inf, 2.0], [-np.inf, 2.0], "worst inf vs -inf"),
    ],
)
def test_tolerance_with_non_finite_values_is_allclose(
    candidate: list[float], reference: list[float], words: str
) -> None:
    failure = parity.tolerance_failure([np.array(candidate)], [np.array(reference)], 1e-3, 1e-4)
    assert words in failure


def test_tolerance_accepts_matching_infinities() -> None:
    same = np.array([np.inf, -np.inf, 1.0])
    assert parity.tolerance_failure([same], [same.copy()], 1e-3, 1e-4) == ""


def test_report_json_stays_strict_json_with_nan_figures() -> None:
    """A cosine of NaN outputs was written as the NaN literal, which JSON readers refuse."""
    from ferry.server.convert.worker import report

    assert report._finite({"cosine": float("nan"), "l": [1.0, float("inf")], "n": 2}) == {
        "cosine": None,
        "l": [1.0, None],
        "n": 2,
    }


def test_auto_choice() -> None:
    def entry(name: str, speedup: float, within: bool = True) -> VariantRecord:
        figures = {"1": speedup, "32": speedup}
        bench = BenchmarkRecord(1, 1, 0.0, {"1": 1.0, "32": 1.0}, figures)
        return VariantRecord(name, within_budget=within, benchmark=bench)

    def chosen(variants: list[VariantRecord], keep_slower: bool = False) -> str:
        return quantize.choose(variants, keep_slower=keep_slower)[0].name

    fp32 = entry("fp32", 1.0)
    assert chosen([fp32, entry("dynamic_int8", 1.6)]) == "dynamic_int8"
    assert chosen([fp32, entry("dynamic_int8", 1.05)]) == "fp32"
    assert chosen([fp32, entry("dynamic_int8", 2.0, False)]) == "fp32"
    slower = [fp32, entry("dynamic_int8", 0.7), entry("fp16", 0.9)]
    assert chosen(slower) == "fp32"
    assert chosen(slower, keep_slower=True) == "fp16"


def test_a_model_whose_own_outputs_are_nan_says_so(tmp_path: Path) -> None:
    """Log of the generated samples (half of them negative) is NaN in PyTorch and in ONNX alike:
    every variant failed as if the exporter disagreed ("worst nan vs nan")."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Log", ["x"], ["y"])],
        "log",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    source = tmp_path / "log.onnx"
    onnx.save(model, str(source))
    result = convert_here(tmp_path / "job", source, "onnx")
    assert result.rc == 2
    message = result.last["message"]
    assert "source ONNX model's own output 'y' is NaN" in message, message
    assert "validation.sample_file" in message and "exporter" not in message


def test_a_torch_model_failing_on_the_sample_file_names_the_file(tmp_path: Path) -> None:
    """A torch source that ran on generated samples but not on the client's file (sequences
    of 6 through a positional table of 4) was told "the model fails on inputs shaped like
    spec.inputs ...; check spec.inputs and architecture_kwargs": the ONNX route named
    validation.sample_file, the torch route sent the client to the wrong fields."""
    kwargs = {"d_model": 8, "nhead": 2, "num_layers": 1, "dim_feedforward": 16}
    kwargs |= {"seq_len": 4, "num_classes": 3}
    source = tmp_path / "encoder.pt"
    torch.save(seeded(nets.TransformerEncoderNet, **kwargs).state_dict(), source)
    samples = tmp_path / "samples.npz"
    np.savez(samples, x=np.zeros((8, 6, 8), np.float32))
    seq = {"axis": 1, "name": "seq", "min": 1, "max": 8}
    spec = {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4, 8], "dynamic_axes": [seq]}],
        "validation": {"sample_file": str(samples)},
        "benchmark": "off",
    }
    result = convert_here(
        tmp_path / "job",
        source,
        "state_dict",
        architecture="transformer_encoder",
        kwargs=kwargs,
        spec=spec,
    )
    phrases = ("the model fails on validation.sample_file in PyTorch", "runs on samples generated")
    assert_failed(result, "INVALID_ARGUMENT", "load", *phrases)
    assert "architecture_kwargs" not in result.last["message"]


@pytest.mark.parametrize("field", ["sample_file", "reference_file", "calibration_file"])
def test_strings_in_a_clients_file_are_refused_naming_the_file(tmp_path: Path, field: str) -> None:
    """An .npz of strings for a float input or output crashed the child (INTERNAL, "could
    not convert string to float") in the load or validate stage."""
    source = onnx_mlp(tmp_path / "m.onnx")
    words = tmp_path / "words.npz"
    np.savez(words, x=np.array([["a"] * 8] * 8), y=np.array([["a"] * 4] * 8))
    numbers = tmp_path / "numbers.npz"
    np.savez(numbers, x=np.zeros((8, 8), np.float32))
    validation: dict[str, Any] = {"sample_file": str(words)}
    spec: dict[str, Any] = {"validation": validation, "benchmark": "off"}
    if field == "reference_file":
        validation.update(sample_file=str(numbers), reference_file=str(words))
    elif field == "calibration_file":
        validation["sample_file"] = str(numbers)
        spec["quantization"] = {"mode": "static_int8", "calibration_file": str(words)}
    result = convert_here(tmp_path / "job", source, "onnx", spec=spec)
    assert result.rc == 2, result.last
    assert result.last["error_kind"] == "INVALID_ARGUMENT", result.last
    assert f"{field}: " in result.last["message"] and "<U1" in result.last["message"]


def test_in_process_jobs_leave_nothing_in_the_callers_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two batch dims of different names (N, M) stop onnxruntime's symbolic shape inference,
    which then saves sym_shape_infer_temp.onnx into the current folder before the quantizer
    retries without it: convert_here left it wherever pytest ran. The real child works in
    its scratch folder (test_libraries_write_nothing_beside_the_source_or_into_home)."""
    caller = tmp_path / "caller"
    caller.mkdir()
    monkeypatch.chdir(caller)
    rng = np.random.default_rng(0)
    source = save_graph(
        tmp_path / "two.onnx",
        [
            helper.make_node("Add", ["x", "x2"], ["s"]),
            helper.make_node("MatMul", ["s", "w"], ["y"]),
        ],
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8]),
            helper.make_tensor_value_info("x2", TensorProto.FLOAT, ["M", 8]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        {"w": rng.standard_normal((8, 4)).astype(np.float32)},
    )
    calibration = tmp_path / "calibration.npz"
    rows = {name: rng.standard_normal((32, 8)).astype(np.float32) for name in ("x", "x2")}
    np.savez(calibration, **rows)
    quantization = {"mode": "static_int8", "calibration_file": str(calibration)}
    spec = {"quantization": quantization, "benchmark": "off"}
    succeeded(convert_here(tmp_path / "job", source, "onnx", spec=spec))
    assert list(caller.iterdir()) == []


def _lookup_model(path: Path) -> None:
    """ids [N, 3] -> a 10-row table -> sum -> [N, 4] @ W: a bag of words in four nodes."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    table = numpy_helper.from_array(rng.standard_normal((10, 4)).astype(np.float32), "table")
    weight = numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "weight")
    axes = numpy_helper.from_array(np.array([1], np.int64), "axes")
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["table", "ids"], ["rows"]),
            helper.make_node("ReduceSum", ["rows", "axes"], ["bag"], keepdims=0),
            helper.make_node("Add", ["bag", "scale"], ["shifted"]),
            helper.make_node("MatMul", ["shifted", "weight"], ["y"]),
        ],
        "bag",
        [
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 3]),
            helper.make_tensor_value_info("scale", TensorProto.FLOAT, ["batch", 4]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        [table, weight, axes],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


@pytest.mark.parametrize(
    "bad, phrase",
    [
        ("ids", "the fp32 model fails on these samples in onnxruntime"),
        ("scale", "'scale' holds NaN or infinity in 256 of 256 values"),
    ],
)
def test_calibration_samples_the_model_cannot_take_are_the_clients_error(
    tmp_path: Path, bad: str, phrase: str
) -> None:
    """ids past the embedding table failed the job FAILED_PRECONDITION as "could not build the
    static_int8 variant (... out of data bounds); convert with another quantization mode", and
    NaN samples as "(scale issue)": the calibration data was at fault, and the advice fixed
    neither."""
    source = tmp_path / "bag.onnx"
    _lookup_model(source)
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 10, (64, 3)) + (100 if bad == "ids" else 0)
    scale = rng.standard_normal((64, 4)).astype(np.float32)
    if bad == "scale":
        scale[:] = np.nan
    calibration = tmp_path / "calibration.npz"
    np.savez(calibration, ids=ids, scale=scale)
    spec = {
        "inputs": [
            {"name": "ids", "datatype": "INT64", "shape": [-1, 3]},
            {"name": "scale", "datatype": "FP32", "shape": [-1, 4]},
        ],
        "quantization": {"mode": "static_int8", "calibration_file": str(calibration)},
        "benchmark": "off",
    }
    result = convert_here(tmp_path / "job", source, "onnx", spec=spec)
    assert_failed(result, "INVALID_ARGUMENT", "quantize", "quantization.calibration_file: ", phrase)
    assert "another quantization mode" not in result.last["message"]


# ---- fill values, non-finite outputs, batch sizes the samples do not have ----


def _masked_logits(fill: float, seed: int) -> np.ndarray:
    """[64, 8] logits with the same fifth of the classes masked out with ``fill`` in every copy."""
    logits = np.random.default_rng(seed).standard_normal((64, 8))
    mask = np.random.default_rng(99).random((64, 8)) < 0.2
    return np.where(mask, fill, logits)


@pytest.mark.parametrize("fill", [-1e9, -1e4, -100.0])
def test_fill_values_cannot_hide_a_wrong_model(fill: float) -> None:
    """A 90%-pruned classifier masked with -1e9 scored cosine 0.9999999999 (the fill dominated
    the dot product) while its top-1 agreement was 0.66, and was published within budget."""
    unrelated = parity.compare([_masked_logits(fill, 1)], [_masked_logits(fill, 2)])
    assert unrelated.cosine < 0.5, unrelated
    assert "< min_cosine 0.99" in parity.budget_failure(unrelated, 0.99, 0.0)
    reference = _masked_logits(fill, 1)
    noisy = reference + np.where(reference == fill, 0.0, 1e-5)
    close = parity.compare([noisy], [reference])
    assert close.cosine > 0.999999 and parity.budget_failure(close, 0.99, 0.0) == ""


def test_an_additive_mask_cannot_hide_a_wrong_model() -> None:
    """logits + (1 - mask) * -1e4: the masked positions differ in their last bits between
    variants, so no fill rule sees them, and they outweighed the computed ones (a 90%-pruned
    classifier scored 0.9999999995 with a top-1 agreement of 0.03)."""
    rng = np.random.default_rng(5)
    mask = np.zeros(16)
    mask[rng.permutation(16)[:10]] = -1e4  # the same positions for every sample
    reference = rng.standard_normal((32, 16)) + mask
    wrong = rng.standard_normal((32, 16)) + mask  # what a broken variant computes
    figures = parity.compare([wrong.astype(np.float32)], [reference.astype(np.float32)])
    assert figures.cosine < 0.5 and "< min_cosine" in parity.budget_failure(figures, 0.99, 0.0)
    faithful = reference + rng.standard_normal((32, 16)) * 1e-4
    assert parity.compare([faithful], [reference]).cosine > 0.9999
    # An output that hardly varies between samples is not judged on its noise.
    flat = np.full((32, 4), 7.0) + rng.standard_normal((32, 4)) * 1e-7
    assert parity.compare([flat + 1e-6], [flat]).cosine > 0.9999
    # Nor are samples that are nearly alike: a variant 1.6% off on every sample (int8) was
    # refused once what varies between samples alone was judged (cosine 0.81 at eps 0.01).
    base = rng.standard_normal(16)
    alike = base + rng.standard_normal((16, 16)) * 0.01
    int8 = alike * (1 + rng.standard_normal((16, 16)) * 0.016)
    assert parity.compare([int8], [alike]).cosine > 0.999
    # A large regression output with a bias: no fill beside computed values, judged as it is.
    biased = 1000.0 + rng.standard_normal((16, 1))
    assert parity.compare([biased + 0.01], [biased]).cosine > 0.999


def test_a_mask_over_each_samples_own_padding_cannot_hide_a_wrong_model() -> None:
    """logits + (1 - mask) * -1e4 with each sample's own padding: neither fill rule saw it (the
    fills differ in their last bits and sit elsewhere in every sample), and a static int8
    variant whose computed logits came back as multiples of 39 was published with cosine
    1.000000; an unrelated variant scored 0.99999998."""
    rng = np.random.default_rng(5)
    fill = np.where(rng.random((32, 16)) < 0.5, -1e4, 0.0)
    logits = rng.standard_normal((32, 16))
    reference = (logits + fill).astype(np.float32)
    for wrong in (rng.standard_normal((32, 16)) + fill, np.round(logits / 39.0) * 39.0 + fill):
        figures = parity.compare([wrong.astype(np.float32)], [reference])
        assert figures.cosine < 0.5, figures
        assert "< min_cosine 0.99" in parity.budget_failure(figures, 0.99, 0.0)
    # What a faithful int8 variant does (2% on every computed logit) stays within budget, and
    # so does a -1e9 padding beside the -1e4 mask (two tiers of fill).
    int8 = logits * (1 + rng.standard_normal((32, 16)) * 0.02)
    padded = np.where(rng.random((32, 16)) < 0.2, -1e9, fill)
    for faithful, ref in ((int8 + fill, reference), (int8 + padded, logits + padded)):
        figures = parity.compare([faithful.astype(np.float32)], [ref.astype(np.float32)])
        assert figures.cosine > 0.999 and parity.budget_failure(figures, 0.99, 0.0) == ""
    unrelated = rng.standard_normal((32, 16)) + padded
    figures = parity.compare([unrelated.astype(np.float32)], [(logits + padded).astype(np.float32)])
    assert figures.cosine < 0.5, figures


def test_small_values_beside_large_ones_in_one_output_are_judged_apart() -> None:
    """A detection head's one tensor: boxes in pixels (~300) beside probabilities (~0.5).
    Static int8 quantized it over the boxes' range and served every probability as 0.0; the
    cosine, the boxes' alone, read 0.999995 and the variant was published."""
    rng = np.random.default_rng(0)
    boxes = 640.0 / (1.0 + np.exp(-rng.standard_normal((16, 4))))
    probs = 1.0 / (1.0 + np.exp(-0.3 * rng.standard_normal((16, 4))))
    reference = np.concatenate([boxes, probs], axis=1).astype(np.float32)
    noisy_boxes = boxes + rng.standard_normal((16, 4)) * 0.5
    crushed = np.concatenate([noisy_boxes, np.zeros((16, 4))], axis=1).astype(np.float32)
    figures = parity.compare([crushed], [reference])
    assert figures.cosine < 0.5, figures
    assert "< min_cosine 0.99" in parity.budget_failure(figures, 0.99, 0.0)
    # Faithful to each scale (0.5% everywhere, as int8 per tensor of one unit): within budget.
    faithful = reference * (1 + rng.standard_normal(reference.shape) * 0.005)
    assert parity.budget_failure(parity.compare([faithful], [reference]), 0.99, 0.0) == ""
    # One scale throughout, and positions beneath every variant's resolution, are not split.
    logits = rng.standard_normal((16, 10)) * rng.uniform(0.5, 4.0, 10)
    assert parity._scale_groups(logits) == []
    tiny = np.concatenate([logits, rng.random((16, 2)) * 1e-9], axis=1)
    assert len(parity._scale_groups(tiny)) == 1  # the logits alone: the 1e-9s are left out
    assert parity._scale_groups(reference[:3]) == []  # too few samples to tell sizes apart


def test_a_near_dead_channel_of_an_embedding_is_not_judged_as_another_quantity() -> None:
    """One post-ReLU channel of a 32-wide embedding at RMS 4e-4 beside 0.37: judged apart, static
    int8 (which serves it as 0, under its step) scored cosine 0 and relative error 1.0 there and
    was refused, although its largest error was 0.005 and the embedding kept cosine 0.9999."""
    rng = np.random.default_rng(3)
    embedding = np.abs(rng.standard_normal((16, 32))) * 0.37
    embedding[:, 7] = np.abs(rng.standard_normal(16)) * 4e-4
    int8 = np.round(embedding / (embedding.max() / 255)) * (embedding.max() / 255)
    figures = parity.compare([int8.astype(np.float32)], [embedding.astype(np.float32)])
    assert parity.budget_failure(figures, 0.99, 0.0) == "", figures
    # Several such channels are another quantity again, and are judged apart.
    embedding[:, :4] = np.abs(rng.standard_normal((16, 4))) * 4e-4
    int8 = np.round(embedding / (embedding.max() / 255)) * (embedding.max() / 255)
    figures = parity.compare([int8.astype(np.float32)], [embedding.astype(np.float32)])
    assert "< min_cosine 0.99" in parity.budget_failure(figures, 0.99, 0.0)


def test_a_change_of_size_or_of_labels_cannot_hide_behind_the_cosine() -> None:
    """The cosine sees directions only: a variant halving every output scored 1.0, and so did
    one shifting [N, 1] predictions that all lie near one value; labels drawn from 900-999
    scored 0.9999 with half of them changed. All three were published within budget."""
    rng = np.random.default_rng(7)
    logits = rng.standard_normal((32, 10))
    halved = parity.compare([logits * 0.5], [logits])
    assert halved.cosine == pytest.approx(1.0) and halved.rel_error == pytest.approx(0.5)
    assert "relative error 0.5000 > 0.1414" in parity.budget_failure(halved, 0.99, 0.0)
    assert parity.budget_failure(halved, 0.0, 0.0) == ""  # a budget of 0 is off, size too
    prices = 200.0 + rng.standard_normal((32, 1))
    shifted = parity.compare([prices - 40.0], [prices])
    assert shifted.cosine > 0.999 and shifted.rel_error == pytest.approx(0.2, rel=0.01)
    assert "relative error" in parity.budget_failure(shifted, 0.99, 0.0)
    faithful = logits * (1 + rng.standard_normal((32, 10)) * 0.02)  # what int8 does
    assert parity.budget_failure(parity.compare([faithful], [logits]), 0.99, 0.0) == ""
    labels = rng.integers(900, 1000, 64)
    changed = labels.copy()
    changed[::2] = (changed[::2] - 900 + 1) % 100 + 900  # every other label another one
    figures = parity.compare([changed], [labels])
    assert figures.cosine == pytest.approx(0.5) and figures.rel_error == 0.0
    assert "< min_cosine" in parity.budget_failure(figures, 0.99, 0.0)
    mask = rng.random((8, 16)) < 0.5
    assert parity.compare([mask.copy()], [mask]).cosine == 1.0
    assert parity.compare([~mask], [mask]).cosine == 0.0
    # The figure travels in report.json, through the adapter, to the SDK.
    from ferry.client._conversion_types import _parity
    from ferry.server.grpc.conversion import report_message

    message = report_message(json.dumps({"parity": halved.to_dict()}))
    assert _parity(message.parity).rel_error == pytest.approx(0.5)


def test_a_regressor_that_lost_its_signal_cannot_hide_behind_its_mean() -> None:
    """Predictions near one large value (300 +- 1.5): a 90%-pruned regressor whose predictions
    kept 0.19 correlation with the model's scored cosine 0.99998 and relative error 0.006, and
    was published within budget; so would one predicting the mean for every sample."""
    from ferry.client._conversion_types import _parity
    from ferry.server.grpc.conversion import report_message

    rng = np.random.default_rng(11)
    kelvin = 300.0 + 1.5 * rng.standard_normal((64, 1))
    constant = np.full_like(kelvin, kelvin.mean())
    for wrong in (constant, 2 * kelvin.mean() - kelvin):  # the mean; the spread turned over
        figures = parity.compare([wrong.astype(np.float32)], [kelvin.astype(np.float32)])
        assert figures.cosine > 0.9999 and figures.rel_error < 0.01, figures  # as documented
        assert figures.spread_error >= 1.0 and figures.to_dict()["spread_error"] >= 1.0
        message = report_message(json.dumps({"parity": figures.to_dict()}))
        assert _parity(message.parity).spread_error == pytest.approx(figures.spread_error)
        assert "of the spread of a one-value output" in parity.budget_failure(figures, 0.99, 0.0)
    faithful = kelvin + rng.standard_normal((64, 1)) * 0.05  # 3% of the spread: int8-like
    figures = parity.compare([faithful.ravel()], [kelvin.ravel()])  # [N] as [N, 1]
    assert figures.spread_error < 0.05 and parity.budget_failure(figures, 0.99, 0.0) == ""
    # Outputs that hardly vary between samples, and others than one value per sample, are
    # judged as before: on their size.
    flat = 300.0 + 1e-6 * rng.standard_normal((64, 1))
    assert parity.compare([flat + 1e-5], [flat]).spread_error == 0.0
    wide = 300.0 + 1.5 * rng.standard_normal((64, 2))
    assert parity.compare([np.full_like(wide, 300.0)], [wide]).spread_error == 0.0
    assert "spread_error" not in parity.compare([wide], [wide]).to_dict()


def test_matching_infinities_agree_and_others_fail_the_budget() -> None:
    """-inf masks made every cosine NaN, which passed `cosine < min_cosine`: the model was
    published, and the job then crashed on the null figure."""
    reference = _masked_logits(-np.inf, 1)
    same = parity.compare([reference + np.where(np.isinf(reference), 0, 1e-6)], [reference])
    assert same.nonfinite_mismatch == 0 and same.cosine > 0.999999
    assert parity.budget_failure(same, 0.99, 0.5) == ""
    assert "nonfinite_mismatch" not in same.to_dict()
    unrelated = parity.compare([_masked_logits(-np.inf, 2)], [reference])
    assert np.isfinite(unrelated.cosine) and unrelated.cosine < 0.5
    assert parity.budget_failure(unrelated, 0.99, 0.0) != ""
    broken = reference.copy()
    broken[0, np.isfinite(reference[0])] = np.nan  # NaN where the reference is finite
    failed = parity.compare([broken], [reference])
    assert failed.nonfinite_mismatch == int(np.isfinite(reference[0]).sum())
    assert failed.max_abs == np.inf and failed.to_dict()["nonfinite_mismatch"] > 0
    assert "NaN or infinite where the reference is not" in parity.budget_failure(failed, 0.0, 0.0)
    nan = parity.Figures(0.0, 0.0, float("nan"), None)
    assert "min_cosine" in parity.budget_failure(nan, 0.99, 0.0)  # NaN is not >= 0.99


def test_the_jobs_line_tolerates_missing_figures() -> None:
    """report.json writes a non-finite figure as null; the line formatted it with :.6f, and the
    job said FAILED (INTERNAL) for a version that was already serving."""
    from ferry.server.convert.summary import published_line

    report = {
        "published": "fp32",
        "benchmark": "off",
        "variants": [{"name": "fp32", "vs_pytorch": {"cosine": None}, "within_budget": True}],
    }
    assert published_line(json.dumps(report)) == (
        "fp32, not benchmarked, cosine not measurable vs PyTorch"
    )
    report["variants"] = [{"name": "fp32"}]
    report["parity"] = {"max_abs": None, "against": "onnx_source"}
    assert published_line(json.dumps(report)).endswith("max_abs not measurable vs onnx_source")
    assert published_line(json.dumps({"published": "fp32", "variants": [7]})) == ""


def _fixed_reshape_onnx(path: Path) -> Path:
    """x [N, 3] -> Reshape to the literal [4, 3]: runs at N = 4 only, as a seq-first LSTM's
    export does at any length but the example's."""
    graph = helper.make_graph(
        [
            helper.make_node("Reshape", ["x", "shape"], ["r"]),
            helper.make_node("Relu", ["r"], ["y"]),
        ],
        "frozen",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 3])],
        initializer=[numpy_helper.from_array(np.array([4, 3], np.int64), "shape")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


def _mixing_onnx(path: Path) -> Path:
    """y = x + mean over dim 0: every sample depends on the rest of its batch."""
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["x"], ["m"], axes=[0], keepdims=1),
            helper.make_node("Add", ["x", "m"], ["y"]),
        ],
        "mixing",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


def test_an_onnx_source_runs_at_batch_1_and_max_batch(tmp_path: Path) -> None:
    from ferry.server.convert.jobs import batching_of_published

    """Validation ran only the samples' batch: a graph fixed to 4 inside was published with a
    symbolic input and failed every other size with INTERNAL."""
    spec = {"validation": {"samples": 4}, "max_batch_size": 4}
    frozen = convert_here(tmp_path / "frozen", _fixed_reshape_onnx(tmp_path / "f.onnx"), "onnx")
    assert frozen.rc == 2 and frozen.last["error_kind"] == "CONVERSION_FAILED", frozen.last
    assert "fails on the validation samples" in frozen.last["message"], frozen.last
    assert "symbolic batch that is dim 0" in frozen.last["message"]
    at_four = convert_here(tmp_path / "at4", tmp_path / "f.onnx", "onnx", spec=spec)
    assert at_four.rc == 2 and "fails at batch 1" in at_four.last["message"], at_four.last
    # A graph whose samples depend on each other is faithful: it converts, with a note, and
    # the load-time probe serves it unbatched; a serving config that merges requests is refused.
    mixing = convert_here(tmp_path / "mixing", _mixing_onnx(tmp_path / "m.onnx"), "onnx")
    assert mixing.rc == 0, mixing.last
    report = json.loads((mixing.work / "report.json").read_text())
    assert report["rows_apart"] is False  # the server publishes it unbatched
    config = {"batching": {"max_queue_delay_ms": 2}}
    assert batching_of_published(config, json.dumps(report)) == {
        "batching": {"max_queue_delay_ms": 2, "max_batch_size": 0}
    }
    stated = {"batching": {"max_batch_size": 1}}
    assert batching_of_published(stated, json.dumps(report)) == stated  # the user's word
    assert batching_of_published(config, json.dumps({"rows_apart": True})) == config
    assert batching_of_published(config, "") == config
    # A dynamically quantized variant shares one quantization scale per run, so batched with
    # others a caller's answer moved with what they sent: each request runs alone, with the
    # batch dimension (and the rows a request may carry) of the version it is split with.
    int8 = json.dumps({"rows_apart": True, "published": "dynamic_int8"})
    assert batching_of_published(config, int8, job_batch=32) == {
        "batching": {"max_queue_delay_ms": 2, "combine_requests": False, "max_batch_size": 32}
    }
    assert batching_of_published(config, int8, job_batch=32, model_states_batch=True) == {
        "batching": {"max_queue_delay_ms": 2, "combine_requests": False}
    }
    assert batching_of_published(stated, int8, job_batch=32) == {
        "batching": {"max_batch_size": 1, "combine_requests": False}
    }
    combined = {"batching": {"combine_requests": True}}  # the job's own word
    assert batching_of_published(combined, int8, job_batch=32) == {
        "batching": {"combine_requests": True, "max_batch_size": 32}
    }
    merged = {"serving_config": {"batching": {"max_batch_size": 8}}}
    refused = convert_here(tmp_path / "merged", tmp_path / "m.onnx", "onnx", spec=merged)
    assert refused.rc == 2, refused.last
    assert "differently alone (batch 1) than in a batch of 32" in refused.last["message"]
    assert "merges requests" in refused.last["message"]


def test_a_sample_file_an_onnx_source_cannot_take_is_invalid_argument(tmp_path: Path) -> None:
    """Ids past an ONNX source's embedding table in the client's sample file failed the job
    FAILED_PRECONDITION (the torch route says INVALID_ARGUMENT): the file is at fault, since the
    graph runs generated samples; a graph that fails on those too stays CONVERSION_FAILED."""
    table = np.random.default_rng(0).standard_normal((10, 4)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["table", "ids"], ["e"]),
            helper.make_node("ReduceMean", ["e"], ["y"], axes=[1], keepdims=0),
        ],
        "embedding",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        initializer=[numpy_helper.from_array(table, "table")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(tmp_path / "e.onnx"))
    np.savez(tmp_path / "s.npz", ids=np.full((4, 3), 50, np.int64))
    spec = {
        "inputs": [{"name": "ids", "datatype": "INT64", "shape": [-1, 3]}],
        "validation": {"sample_file": str(tmp_path / "s.npz")},
    }
    result = convert_here(tmp_path / "ids", tmp_path / "e.onnx", "onnx", spec=spec)
    assert_failed(result, "INVALID_ARGUMENT", "load", "validation.sample_file", "idx=50")
    np.savez(tmp_path / "x.npz", x=np.ones((3, 3), np.float32))  # the graph fixes 4
    spec = {"validation": {"sample_file": str(tmp_path / "x.npz")}}
    frozen = convert_here(
        tmp_path / "fr", _fixed_reshape_onnx(tmp_path / "f.onnx"), "onnx", spec=spec
    )
    assert_failed(frozen, "CONVERSION_FAILED", "load", "fails on the validation samples")


def test_an_export_must_answer_like_pytorch_at_batch_1(tmp_path: Path) -> None:
    """The server's own export ran the graph at batch 1 without comparing: a branch on the
    batch size frozen at export answered batch-1 requests from the other branch."""
    from ferry.server.convert.spec import InputSpec
    from ferry.server.convert.worker import dims
    from ferry.server.errors import ConversionFailed

    inputs = [InputSpec("x", "FP32", [-1, 8])]

    def graph_plus_one(feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        return [feed["x"] + 1.0]  # the export's frozen branch

    def module(feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        return [feed["x"] + (1.0 if len(feed["x"]) > 1 else 0.0)]

    seen: list[list[tuple[int, ...]]] = []
    dims.verify_batch(inputs, graph_plus_one, 8, seen, rtol=1e-3, atol=1e-4)  # no reference
    assert seen == [[(8, 8)], [(1, 8)]]
    with pytest.raises(ConversionFailed, match="disagrees with the PyTorch model at batch 1"):
        dims.verify_batch(inputs, graph_plus_one, 8, None, rtol=1e-3, atol=1e-4, reference=module)


def test_a_reshape_fixed_to_the_examples_length_is_named_at_the_bounds(tmp_path: Path) -> None:
    """A Reshape to the literal {9,-1,12} (the example's length, 9, written in by the export)
    failed at t=1 with the hint "check the dynamic axes' bounds ... or lower max", which no
    bound fixes: the failure says the export fixed the length, and what to change."""
    from ferry.server.convert.spec import DynamicAxis, InputSpec
    from ferry.server.convert.worker import dims
    from ferry.server.errors import ConversionFailed

    shape = numpy_helper.from_array(np.array([9, -1, 12], np.int64), "shape")
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])],
        "fixed_length",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "t", 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [shape],
    )
    path = tmp_path / "fixed.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    run = parity.onnx_runner(path, 1)
    inputs = [InputSpec("x", "FP32", [-1, 9, 12], [DynamicAxis(1, "t", 1, 64)])]
    with pytest.raises(ConversionFailed) as info:
        dims.verify(inputs, run)
    message = str(info.value)
    assert "fails at t=1" in message and "lower max" not in message, message
    assert "asks for shape {9,-1,12}, with 9, the example's size of t" in message, message
    assert "batch_first=True" in message and "leave t fixed at 9" in message, message
    # A bound the model cannot take (no literal of the example's) keeps the bounds' hint.
    wide = [InputSpec("x", "FP32", [-1, 3, 12], [DynamicAxis(1, "t", 3, 64)])]
    with pytest.raises(ConversionFailed, match="lower max"):
        dims.verify(wide, run)


def test_a_graph_that_leaves_its_first_row_alone_still_mixes_rows() -> None:
    """Only the first sample was run alone: a cumulative sum over the batch (row 0 is its own
    sum) was found to keep its rows apart, and its dynamic int8 variant was published with
    max_batch_size 32, answering concurrent single-row requests with other callers' sums."""
    from ferry.server.convert.spec import InputSpec
    from ferry.server.convert.worker import dims
    from ferry.server.errors import ConversionFailed

    inputs = [InputSpec("x", "FP32", [-1, 4])]
    samples = {"x": np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)}

    def cumsum(feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        return [np.cumsum(feed["x"], axis=0)]

    notes = dims.verify_batch(inputs, cumsum, 32, None, rtol=1e-3, atol=1e-4, samples=samples)
    assert len(notes) == 1 and notes[0].startswith(dims.ROWS_DEPEND), notes
    assert "published with batching.max_batch_size 0" in notes[0]
    with pytest.raises(ConversionFailed, match="merges requests"):
        dims.verify_batch(
            inputs, cumsum, 32, None, rtol=1e-3, atol=1e-4, samples=samples, merges=True
        )

    def rows(feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        return [feed["x"] * 2.0]

    assert dims.verify_batch(inputs, rows, 32, None, rtol=1e-3, atol=1e-4, samples=samples) == []


def onnx_transpose_matmul(path: Path) -> Path:
    """[N, 4, 8] -> Transpose -> MatMul [8, 7] -> Transpose -> [N, 4, 7]: a Transpose feeding a
    MatMul, as torch exports a GRU's states into a Linear, or the keys of an attention block."""
    w = np.random.default_rng(0).standard_normal((8, 7)).astype(np.float32)
    nodes = [
        helper.make_node("Transpose", ["x"], ["t"], perm=[1, 0, 2]),
        helper.make_node("MatMul", ["t", "w"], ["m"]),
        helper.make_node("Transpose", ["m"], ["y"], perm=[1, 0, 2]),
    ]
    graph = helper.make_graph(
        nodes,
        "transpose_matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 7])],
        initializer=[numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


# The published file opened as the server opens it, in a process of its own: onnxruntime's crash
# (SIGSEGV) would otherwise end the test run.
SERVE_ONE = """
import sys
import numpy as np
from pathlib import Path
from ferry.server.core.config import OnnxRuntimeConfig
from ferry.server.runtime.session import OrtSession
session = OrtSession(Path(sys.argv[1]), OnnxRuntimeConfig())
x = np.random.default_rng(3).standard_normal((3, 4, 8)).astype(np.float32)
np.save(sys.argv[2], session.session.run(None, {"x": x})[0])
"""


def test_fp16_of_a_transpose_fed_matmul_converts_and_serves(tmp_path: Path) -> None:
    """onnxruntime crashed (SIGSEGV) opening the fp16 variant of such a graph at ORT_ENABLE_ALL:
    every fp16 conversion of a GRU tagger or a causal attention block ended INTERNAL ("the
    conversion process crashed"), and a server loading the file would have crashed too."""
    source = onnx_transpose_matmul(tmp_path / "tm.onnx")
    spec = {"quantization": {"mode": "fp16", "keep_slower": True}, "benchmark": "quick"}
    result = succeeded(convert(tmp_path / "job", source, "onnx", spec=spec))
    assert result.report["published"] == "fp16"
    out = tmp_path / "served.npy"
    proc = subprocess.run(
        [sys.executable, "-c", SERVE_ONE, str(result.model), str(out)],
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT_S,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    x = np.random.default_rng(3).standard_normal((3, 4, 8)).astype(np.float32)
    w = numpy_helper.to_array(onnx.load(str(source)).graph.initializer[0])
    np.testing.assert_allclose(np.load(out), x @ w, rtol=1e-2, atol=1e-2)


def test_batch_parity_within_float_rounding_blames_the_tolerances_not_a_branch() -> None:
    """--rtol 0 --atol 0 failed a float-noise difference (-0.0759071 vs -0.0759072) saying the
    model takes another path at this batch size; the message now points at the tolerances."""
    from ferry.server.convert.worker import dims
    from ferry.server.errors import ConversionFailed

    ref = [np.array([[-0.0759072, 1.5]], dtype=np.float32)]
    noisy = [np.nextafter(ref[0], np.float32(0))]
    with pytest.raises(ConversionFailed) as noise:
        dims._match_reference(noisy, ref, 3, 0.0, 0.0)
    assert "float rounding" in str(noise.value) and "--rtol/--atol" in str(noise.value)
    assert "another path" not in str(noise.value)
    with pytest.raises(ConversionFailed) as branch:
        dims._match_reference([ref[0] * 2], ref, 3, 0.0, 0.0)
    assert "another path" in str(branch.value)
