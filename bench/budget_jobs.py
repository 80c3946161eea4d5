"""One conversion job run in this process for the accuracy-budget benchmarks
(``few_rows_budget.py``, ``dynamic_lengths_budget.py``): the conversion child's entry, an ONNX
source, its samples and calibration rows written as the .npz files a job names."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from ferry.server.convert.spec import job_from_json
from ferry.server.convert.worker import child


def spec(
    root: Path,
    feeds: dict[str, np.ndarray],
    cal: dict[str, np.ndarray],
    mode: str,
    *,
    validation: dict[str, Any] | None = None,
    dynamic_axes: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A job spec with ``feeds`` as its sample file and, for static int8, ``cal`` as its
    calibration file (both written under ``root``); ``benchmark: off``: the budget is measured."""
    root.mkdir(parents=True, exist_ok=True)
    np.savez(root / "s.npz", **feeds)
    np.savez(root / "c.npz", **cal)
    inputs = [
        {
            "name": name,
            "datatype": "INT64" if array.dtype == np.int64 else "FP32",
            "shape": [-1, *array.shape[1:]],
            "dynamic_axes": dynamic_axes or [],
        }
        for name, array in feeds.items()
    ]
    return {
        "inputs": inputs,
        "quantization": {"mode": mode}
        | ({"calibration_file": str(root / "c.npz")} if mode == "static_int8" else {}),
        "validation": {"sample_file": str(root / "s.npz"), **(validation or {})},
        "benchmark": "off",
    }


def run(root: Path, source: Path, job_spec: dict[str, Any]) -> dict[str, Any] | None:
    """The job's report.json when it publishes, None when it is refused."""
    root.mkdir(parents=True)
    job = {
        "job_id": root.name, "model": "m", "source_path": str(source), "source_format": "onnx",
        "source_sha256": hashlib.sha256(source.read_bytes()).hexdigest(),
        "spec": job_spec, "work_dir": str(root / "work"),
    }  # fmt: skip
    with (root / "progress.jsonl").open("w") as stream:
        rc = child.run(job_from_json(json.dumps(job)), child.Progress(stream))
    if rc != 0:
        return None
    report: dict[str, Any] = json.loads((root / "work" / "report.json").read_text())
    return report
