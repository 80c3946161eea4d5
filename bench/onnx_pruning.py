"""Structured pruning on the ONNX graph (issue #13 item 4): what 50% buys in speed.

The benchmark MLP (64 -> 256 -> 256 -> 10) and small CNN (four 16-channel Conv-BN-ReLU at 32x32)
are seeded, exported to ONNX as the SDK exports a module (torch.onnx.export, dynamo, symbolic
batch), and each ONNX file is converted by the real conversion child twice: unpruned, and with
``pruning: structured 0.5`` (``keep_failed``: untrained weights, no fine-tuning, so the accuracy
budget is not the question here; ``benchmark: off``: this script measures). Then the two
*published* model.onnx files are timed with onnxruntime at batch 1 and 32: rounds alternate the
two files (one thread each, the same inputs), and the speed-up is the ratio of the medians, with
the quartiles of the per-round ratios to show the noise.

    flock /work/notes/bench.lock .venv/bin/python bench/onnx_pruning.py [--rounds 30]

Figures, not assertions: a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

import timing

ROOT = Path(__file__).resolve().parents[1]
CASES: dict[str, tuple[str, dict[str, Any], list[int]]] = {
    "mlp": ("mlp", {"in_features": 64, "hidden": [256, 256], "out_features": 10}, [64]),
    "cnn": ("small_cnn", {}, [3, 32, 32]),
}


def export(name: str, folder: Path) -> Path:
    import torch

    from ferry.server.convert.worker import architectures

    architecture, kwargs, shape = CASES[name]
    torch.manual_seed(0)
    module = architectures.build(architecture, kwargs)
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.onnx.export(
        module, (torch.randn(2, *shape),), dynamo=True, dynamic_shapes=({0: batch},),
        opset_version=18, verbose=False,
    )  # fmt: skip
    path = folder / f"{name}.onnx"
    program.save(str(path), external_data=False)
    return path


def convert(source: Path, folder: Path, pruning: dict[str, Any] | None) -> Path:
    """Run the conversion child on ``source``; returns the published model.onnx."""
    folder.mkdir(parents=True)
    spec: dict[str, Any] = {"benchmark": "off", "validation": {"keep_failed": True}}
    if pruning:
        spec["pruning"] = pruning
    job = {
        "job_id": folder.name, "model": "m", "source_path": str(source), "source_format": "onnx",
        "source_sha256": hashlib.sha256(source.read_bytes()).hexdigest(),
        "architecture": "", "architecture_kwargs": {}, "spec": spec,
        "work_dir": str(folder / "work"), "allow_code_formats": False,
    }  # fmt: skip
    (folder / "job.json").write_text(json.dumps(job))
    subprocess.run(
        [sys.executable, "-m", "ferry.server.convert.worker.child", "--job",
         str(folder / "job.json"), "--progress-file", str(folder / "progress.jsonl")],
        check=True, timeout=600, env={**os.environ},
    )  # fmt: skip
    report = json.loads((folder / "work" / "report.json").read_text())
    if pruning:
        print(f"  {source.stem}: {report['pruning']['note'].split('; no fine-tuning')[0]}")
        print(
            f"  params {report['pruning']['params_before']} -> "
            f"{report['pruning']['params_after']}, cosine vs unpruned "
            f"{report['pruning']['vs_unpruned']['cosine']:.4f} (untrained, not fine-tuned)"
        )
    return folder / "work" / "model.onnx"


def session(path: Path) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def measure(
    unpruned: Path, pruned: Path, shape: list[int], batch: int, rounds: int
) -> dict[str, float]:
    sessions = [session(unpruned), session(pruned)]
    name = sessions[0].get_inputs()[0].name
    x = np.random.default_rng(1).standard_normal([batch, *shape]).astype(np.float32)
    figures = timing.compare((sessions[0], {name: x}), (sessions[1], {name: x}), rounds)
    return {
        "unpruned_ms": figures["reference_ms"],
        "pruned_ms": figures["other_ms"],
        "speedup": figures["speedup"],
        "q1": figures["q1"],
        "q3": figures["q3"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name, (_, _, shape) in CASES.items():
            source = export(name, folder)
            unpruned = convert(source, folder / f"{name}-fp32", None)
            pruned = convert(
                source, folder / f"{name}-pruned", {"method": "structured", "amount": 0.5}
            )
            sizes = (unpruned.stat().st_size, pruned.stat().st_size)
            for batch in (1, 32):
                figures = measure(unpruned, pruned, shape, batch, args.rounds)
                rows.append((name, batch, sizes, figures))
    print()
    print(
        "| model | batch | unpruned ms | pruned 50% ms | speed-up | per-round ratio q1-q3 | file KB |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, batch, sizes, f in rows:
        print(
            f"| {name} | {batch} | {f['unpruned_ms']:.4f} | {f['pruned_ms']:.4f} | "
            f"{f['speedup']:.2f}x | {f['q1']:.2f}-{f['q3']:.2f} | "
            f"{sizes[0] // 1024} -> {sizes[1] // 1024} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
