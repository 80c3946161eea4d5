"""The accuracy budget on sample files of 1, 2 and 16 rows, against the verdict on many rows.

A file shorter than ``validation.samples`` is topped up with calibration rows, then rows drawn
like the given ones, and an output judged by agreement (integer labels, ids) is judged on the rows
counting a change of the budget's size needs (``server/ferry/server/convert/worker/drawn.py``).
This measures what the verdicts miss: hand-written ONNX models (top-k and argmax heads, class
logits, a small CNN, a bag of words over Zipf token ids, a tabular regression with features of
very different scales), each with seeded weights, converted by the real conversion child (in this
process) with an explicit quantization mode and ``benchmark: off``. The truth is the verdict on
``--truth-rows`` (1024) rows of the data's own distribution, judged on those alone; each file is
judged with the default ``samples`` (16). Static int8 gets a 32-row calibration file of the same
distribution. Run it on two checkouts (``PYTHONPATH``) to compare rules.

    .venv/bin/python bench/few_rows_budget.py [--seeds 3] [--modes dynamic_int8,static_int8]

Figures, not assertions: one JSON line per model and mode, then the tally.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper, numpy_helper

sys.path.insert(0, str(Path(__file__).parent))
import budget_jobs

F32 = np.float32


def init(rng, *shape, scale=None):
    a = rng.standard_normal(shape).astype(F32)
    return a / F32(np.sqrt(shape[0])) if scale is None else a * F32(scale)


def save(path, nodes, inputs, outputs, inits):
    g = helper.make_graph(
        nodes, "m", inputs, outputs, [numpy_helper.from_array(v, n) for n, v in inits.items()]
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, path)


def mlp(path, seed, head):
    rng = np.random.default_rng(seed)
    inits = {
        "w1": init(rng, 32, 64),
        "b1": init(rng, 64, scale=0.1),
        "w2": init(rng, 64, 10),
        "b2": init(rng, 10, scale=0.1),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h0"]),
        helper.make_node("Add", ["h0", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h2"]),
        helper.make_node("MatMul", ["h2", "w2"], ["y0"]),
        helper.make_node("Add", ["y0", "b2"], ["logits"]),
    ]
    if head == "topk":
        inits["k"] = np.array([3], dtype=np.int64)
        nodes.append(helper.make_node("TopK", ["logits", "k"], ["vals", "out"], axis=1))
        out = helper.make_tensor_value_info("out", T.INT64, ["N", 3])
    else:
        nodes.append(helper.make_node("Identity", ["logits"], ["out"]))
        out = helper.make_tensor_value_info("out", T.FLOAT, ["N", 10])
    save(path, nodes, [helper.make_tensor_value_info("x", T.FLOAT, ["N", 32])], [out], inits)
    return {"x": ("normal", [32])}


def cnn(path, seed, head):
    rng = np.random.default_rng(seed)
    inits = {
        "c1": init(rng, 8, 3, 3, 3, scale=0.3),
        "c2": init(rng, 16, 8, 3, 3, scale=0.2),
        "w": init(rng, 16, 10),
        "b": init(rng, 10, scale=0.1),
    }
    nodes = [
        helper.make_node("Conv", ["x", "c1"], ["a"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["a1"]),
        helper.make_node("Conv", ["a1", "c2"], ["b0"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["b0"], ["b1"]),
        helper.make_node("GlobalAveragePool", ["b1"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("MatMul", ["f", "w"], ["l0"]),
        helper.make_node("Add", ["l0", "b"], ["out"]),
    ]
    save(
        path,
        nodes,
        [helper.make_tensor_value_info("x", T.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("out", T.FLOAT, ["N", 10])],
        inits,
    )
    return {"x": ("smooth", [3, 16, 16])}


def text(path, seed, head):
    rng = np.random.default_rng(seed)
    inits = {
        "emb": init(rng, 1000, 32, scale=1.0),
        "w": init(rng, 32, 10),
        "b": init(rng, 10, scale=0.1),
    }
    nodes = [
        helper.make_node("Gather", ["emb", "ids"], ["e"]),
        helper.make_node("ReduceMean", ["e"], ["m"], axes=[1], keepdims=0),
        helper.make_node("MatMul", ["m", "w"], ["l0"]),
        helper.make_node("Add", ["l0", "b"], ["logits"]),
    ]
    if head == "argmax":
        nodes.append(helper.make_node("ArgMax", ["logits"], ["out"], axis=1, keepdims=0))
        out = helper.make_tensor_value_info("out", T.INT64, ["N"])
    else:
        nodes.append(helper.make_node("Identity", ["logits"], ["out"]))
        out = helper.make_tensor_value_info("out", T.FLOAT, ["N", 10])
    save(path, nodes, [helper.make_tensor_value_info("ids", T.INT64, ["N", 12])], [out], inits)
    return {"ids": ("zipf", [12])}


MU = np.array([40, 5e4, 3, 0.5, 120, 1e3, 0.01, 7], F32)
SD = np.array([10, 2e4, 1.5, 0.2, 15, 400, 0.005, 2], F32)


def tab(path, seed, head):
    rng = np.random.default_rng(seed)
    inits = {
        "mu": MU,
        "sd": SD,
        "w1": init(rng, 8, 32),
        "b1": init(rng, 32, scale=0.1),
        "w2": init(rng, 32, 1),
        "b2": init(rng, 1, scale=0.1),
    }
    nodes = [
        helper.make_node("Sub", ["x", "mu"], ["z0"]),
        helper.make_node("Div", ["z0", "sd"], ["z"]),
        helper.make_node("MatMul", ["z", "w1"], ["h0"]),
        helper.make_node("Add", ["h0", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h2"]),
        helper.make_node("MatMul", ["h2", "w2"], ["y0"]),
        helper.make_node("Add", ["y0", "b2"], ["out"]),
    ]
    save(
        path,
        nodes,
        [helper.make_tensor_value_info("x", T.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("out", T.FLOAT, ["N", 1])],
        inits,
    )
    return {"x": ("tab", [8])}


def data(kind, shape, n, rng):
    if kind == "normal":
        return rng.standard_normal((n, *shape)).astype(F32)
    if kind == "smooth":
        low = rng.standard_normal((n, shape[0], 4, 4)).astype(F32)
        return np.kron(low, np.ones((1, 1, 4, 4), F32)) + F32(0.1) * rng.standard_normal(
            (n, *shape)
        ).astype(F32)
    if kind == "tab":
        return (MU + SD * rng.standard_normal((n, 8))).astype(F32)
    if kind == "zipf":
        return np.minimum(rng.zipf(1.3, (n, *shape)), 999).astype(np.int64)


def verdict(
    root: Path, source: Path, feeds: dict, *, rows: int, samples: int, mode: str, cal: dict
) -> bool:
    """Whether the job publishes with the first ``rows`` of ``feeds`` as its sample file."""
    first = {k: v[:rows] for k, v in feeds.items()}
    job_spec = budget_jobs.spec(root, first, cal, mode, validation={"samples": samples})
    return budget_jobs.run(root / "job", source, job_spec) is not None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--modes", default="dynamic_int8,static_int8")
    parser.add_argument("--files", default="1,2,16", help="sample files of these many rows")
    parser.add_argument("--truth-rows", type=int, default=1024)
    args = parser.parse_args()
    files = [int(n) for n in args.files.split(",")]
    cases = [
        (mlp, "topk"),
        (mlp, "logits"),
        (cnn, "logits"),
        (text, "logits"),
        (text, "argmax"),
        (tab, "reg"),
    ]
    tally: dict[str, Any] = {"bad": 0, "good": 0}
    for rows in files:
        tally[f"caught ({rows} rows)"] = tally[f"refused good ({rows} rows)"] = 0
    # The quantizer's shape inference writes beside the working folder (the real child works
    # in its scratch folder: child._confine_temp), so the jobs run from the temporary one.
    with tempfile.TemporaryDirectory(prefix="few-rows-") as tmp, contextlib.chdir(tmp):
        for (build, head), seed in itertools.product(cases, range(args.seeds)):
            base = Path(tmp) / f"{build.__name__}-{head}-{seed}"
            base.mkdir()
            source = base / "src.onnx"
            kinds = build(source, seed, head)
            rng = np.random.default_rng(100 + seed)
            truth_rows = args.truth_rows
            feeds = {k: data(kind, shape, truth_rows, rng) for k, (kind, shape) in kinds.items()}
            cal = {k: data(kind, shape, 32, rng) for k, (kind, shape) in kinds.items()}
            for mode in args.modes.split(","):
                # The truth: the budget on many rows of the data's own distribution, alone.
                truth = verdict(
                    base / f"{mode}-truth",
                    source,
                    feeds,
                    rows=truth_rows,
                    samples=truth_rows,
                    mode=mode,
                    cal=cal,
                )
                tally["good" if truth else "bad"] += 1
                row: dict[str, Any] = {"model": base.name, "mode": mode, "truth": truth}
                for rows in files:
                    published = verdict(
                        base / f"{mode}-{rows}",
                        source,
                        feeds,
                        rows=rows,
                        samples=16,
                        mode=mode,
                        cal=cal,
                    )
                    row[f"{rows} rows"] = published
                    if truth:
                        tally[f"refused good ({rows} rows)"] += not published
                    else:
                        tally[f"caught ({rows} rows)"] += not published
                print(json.dumps(row), flush=True)
    print(json.dumps(tally))


if __name__ == "__main__":
    main()
