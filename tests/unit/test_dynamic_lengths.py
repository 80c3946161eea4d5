"""Variants are judged at other sizes of each declared dynamic axis, not only the samples'.

A text classifier whose static int8 variant was calibrated and judged at sequence length 12 was
published within budget and answered cosine 0.93 at length 1 (server/ferry/server/convert/worker/
lengths.py). These run the conversion child in this process on hand-written ONNX graphs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from onnx import TensorProto, helper
from test_convert_child import assert_failed, convert_here, save_graph, succeeded

from ferry.server.convert.spec import DynamicAxis, InputSpec
from ferry.server.convert.worker import lengths
from ferry.server.convert.worker.parity import Samples

VOCAB, WIDTH, CLASSES, LENGTH = 200, 16, 4, 12
SEQUENCE = {"axis": 1, "name": "sequence", "min": 1, "max": 64}


def _embedding_mean(path: Path) -> Path:
    """logits = mean(emb[ids]) @ w: the mean of one embedding spans about sqrt(12) times the
    range of a mean of twelve, which a calibration at length 12 clips."""
    rng = np.random.default_rng(0)
    inits = {
        "emb": rng.standard_normal((VOCAB, WIDTH)).astype(np.float32),
        "w": (rng.standard_normal((WIDTH, CLASSES)) / 4).astype(np.float32),
    }
    nodes = [
        helper.make_node("Gather", ["emb", "ids"], ["e"]),
        helper.make_node("ReduceMean", ["e"], ["m"], axes=[1], keepdims=0),
        helper.make_node("MatMul", ["m", "w"], ["out"]),
    ]
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", "S"])
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", CLASSES])
    return save_graph(path, nodes, [ids], [out], inits)


def _spec(tmp_path: Path, mode: str, axis: dict[str, Any] | None = SEQUENCE) -> dict[str, Any]:
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "s.npz", ids=rng.integers(0, VOCAB, (16, LENGTH)))
    np.savez(tmp_path / "c.npz", ids=rng.integers(0, VOCAB, (32, LENGTH)))
    return {
        "inputs": [
            {
                "name": "ids",
                "datatype": "INT64",
                "shape": [-1, LENGTH],
                "dynamic_axes": [axis] if axis else [],
            }
        ],
        "quantization": {"mode": mode}
        | ({"calibration_file": str(tmp_path / "c.npz")} if mode == "static_int8" else {}),
        "benchmark": "off",
        "validation": {"sample_file": str(tmp_path / "s.npz")},
    }


def test_a_variant_within_budget_at_the_samples_length_but_not_at_the_lower_bound_is_refused(
    tmp_path: Path,
) -> None:
    source = _embedding_mean(tmp_path / "m.onnx")
    result = convert_here(tmp_path / "job", source, "onnx", spec=_spec(tmp_path, "static_int8"))
    assert_failed(
        result,
        "CONVERSION_FAILED",
        "validate",
        "the static_int8 variant is below the accuracy budget",
        "at sequence=1 (48 rows, 32 of them the calibration file's: the samples' 12 positions, "
        "their first positions), a size the served version accepts",
    )


def test_the_same_variant_is_judged_at_the_samples_length_alone_without_a_dynamic_axis(
    tmp_path: Path,
) -> None:
    """What the samples alone say of it: within budget (the axis is what adds the sizes)."""
    source = _embedding_mean(tmp_path / "m.onnx")
    spec = _spec(tmp_path, "static_int8", axis=None)
    result = succeeded(convert_here(tmp_path / "job", source, "onnx", spec=spec))
    assert result.variant("static_int8")["within_budget"] is True
    assert "lengths" not in result.report["validation"]


def test_a_variant_good_at_every_length_is_published_and_the_report_names_the_sizes(
    tmp_path: Path,
) -> None:
    source = _embedding_mean(tmp_path / "m.onnx")
    spec = _spec(tmp_path, "dynamic_int8")
    result = succeeded(convert_here(tmp_path / "job", source, "onnx", spec=spec))
    assert result.variant("dynamic_int8")["within_budget"] is True
    assert result.report["validation"]["lengths"] == {"sequence": [1, 6, 24]}


def test_lengths_stay_within_the_bounds_and_twice_the_samples() -> None:
    def spec(low: int, high: int) -> list[InputSpec]:
        return [InputSpec("ids", "INT64", [-1, 12], [DynamicAxis(1, "s", low, high)])]

    rows = Samples({"ids": np.zeros((2, 12), np.int64)}, batched=True)
    assert lengths.sizes(spec(1, 512), rows) == [("s", 1, 12), ("s", 6, 12), ("s", 24, 12)]
    assert lengths.sizes(spec(1, 0), rows) == [("s", 1, 12), ("s", 6, 12), ("s", 24, 12)]
    assert lengths.sizes(spec(12, 16), rows) == [("s", 16, 12)]
    assert lengths.sizes(spec(11, 12), rows) == [("s", 11, 12)]


def test_inputs_sharing_an_axis_are_cropped_and_repeated_together() -> None:
    inputs = [
        InputSpec("ids", "INT64", [-1, 4], [DynamicAxis(1, "seq", 1, 8)]),
        InputSpec("mask", "INT64", [-1, 4], [DynamicAxis(1, "seq", 1, 8)]),
        InputSpec("scale", "FP32", [-1, 1]),
    ]
    ids = np.array([[5, 6, 7, 0]])
    rows = Samples(
        {"ids": ids, "mask": (ids != 0).astype(np.int64), "scale": np.ones((1, 1), np.float32)},
        batched=True,
    )
    short = lengths.resized(inputs, rows, "seq", 2).arrays
    assert short["ids"].tolist() == [[5, 6]] and short["mask"].tolist() == [[1, 1]]
    long = lengths.resized(inputs, rows, "seq", 8).arrays
    assert long["ids"].tolist() == [[5, 6, 7, 0, 5, 6, 7, 0]]
    assert long["mask"].tolist() == [[1, 1, 1, 0, 1, 1, 1, 0]]
    assert long["scale"].shape == (1, 1)
    # Unbatched: the spec's axis 0 is the arrays' axis 1 (they lead with the samples).
    unbatched = [InputSpec("x", "FP32", [4, 3], [DynamicAxis(0, "t", 1, 8)])]
    x = Samples({"x": np.arange(24, dtype=np.float32).reshape(2, 4, 3)}, batched=False)
    assert lengths.resized(unbatched, x, "t", 2).arrays["x"].shape == (2, 2, 3)


def test_a_length_the_source_cannot_answer_is_skipped_with_a_note() -> None:
    inputs = [InputSpec("ids", "INT64", [-1, 4], [DynamicAxis(1, "seq", 1, 8)])]
    # Row 0 is left-padded: its prefix of length 1 is padding only, where the model says NaN.
    rows = Samples({"ids": np.array([[0, 0, 3, 4], [1, 2, 3, 4]])}, batched=True)

    def source(samples: Samples) -> list[np.ndarray]:
        ids = samples.arrays["ids"]
        if ids.shape[1] == 8:
            raise RuntimeError("Gather index 7 out of range\nstack")
        with np.errstate(invalid="ignore"):
            return [(ids.sum(1) / (ids != 0).sum(1)).astype(np.float32)]

    notes: list[str] = []
    probes = lengths.probes(inputs, rows, 16, source, notes)
    assert [(p.size, len(p.rows)) for p in probes] == [(1, 1), (2, 1)]
    assert probes[0].rows.arrays["ids"].tolist() == [[1]]
    assert notes == [
        "variants not judged at seq=8 (rows made from the samples' 4): the source model fails "
        "there (Gather index 7 out of range)"
    ]


def test_calibration_rows_join_the_samples_at_each_size_up_to_the_most_rows() -> None:
    """Sixteen one-token rows missed an int8 bag of words that was off on one-token texts."""
    inputs = [InputSpec("ids", "INT64", [-1, 4], [DynamicAxis(1, "seq", 1, 8)])]
    rows = Samples({"ids": np.ones((16, 4), np.int64)}, batched=True)
    # Calibrated at another length: cropped or repeated like the samples, to the same size.
    calibration = Samples({"ids": np.full((100, 6), 2, np.int64)}, batched=True)

    def source(samples: Samples) -> list[np.ndarray]:
        return [samples.arrays["ids"].sum(1, keepdims=True).astype(np.float32)]

    probes = lengths.probes(inputs, rows, 16, source, [], calibration=calibration)
    assert [(p.size, len(p.rows), p.calibration) for p in probes] == [
        (1, 64, 48),
        (2, 64, 48),
        (8, 64, 48),
    ]
    assert probes[0].reference[0][:, 0].tolist() == [1.0] * 16 + [2.0] * 48
    assert "64 rows, 48 of them the calibration file's" in probes[0].describe()
    # A calibration file whose other inputs differ in shape cannot join: the samples alone.
    two = [*inputs, InputSpec("x", "FP32", [-1, 3])]
    rows.arrays["x"] = np.zeros((16, 3), np.float32)
    other = Samples({"ids": calibration.arrays["ids"], "x": np.zeros((100, 5), np.float32)}, True)
    (first, *_) = lengths.probes(two, rows, 16, source, [], calibration=other)
    assert (len(first.rows), first.calibration) == (16, 0)
