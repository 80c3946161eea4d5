"""A sample file of one or two rows: variants are judged on rows drawn like them as well; and
an integer output, on as many rows as counting a change of the budget's size needs.

One row let a quantized top-k model through on three agreeing indices while it named other
indices for 4% of fresh rows, and 16 rows an argmax head that named another class for 4% of them
(server/ferry/server/convert/worker/drawn.py). These run the conversion child in this process on
hand-written ONNX graphs, so no torch export is needed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from test_convert_child import assert_failed, convert_here, save_graph, succeeded

from ferry.server.convert.worker import drawn, parity
from ferry.server.convert.worker.parity import Samples

WIDTH = 8


def _graph(path: Path, nodes: list[onnx.NodeProto], inits: dict[str, np.ndarray]) -> Path:
    """x [N, WIDTH] -> y [N, WIDTH]."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", WIDTH])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", WIDTH])
    return save_graph(path, nodes, [x], [y], inits)


def _identity_matmul(path: Path) -> Path:
    """y = x @ I: static int8 calibrated on one row clips whatever lies beyond that row's range."""
    nodes = [helper.make_node("MatMul", ["x", "eye"], ["y"])]
    return _graph(path, nodes, {"eye": np.eye(WIDTH, dtype=np.float32)})


def _sqrt_of_distance_from_one(path: Path) -> Path:
    """y = sqrt(x - 1): NaN wherever an element is below 1."""
    nodes = [helper.make_node("Sub", ["x", "one"], ["d"]), helper.make_node("Sqrt", ["d"], ["y"])]
    return _graph(path, nodes, {"one": np.array(1.0, dtype=np.float32)})


def _job(tmp_path: Path, row: np.ndarray, mode: str, **validation: object) -> dict[str, object]:
    one_row = tmp_path / "one_row.npz"
    np.savez(one_row, x=row.reshape(1, WIDTH).astype(np.float32))
    return {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, WIDTH]}],
        "quantization": {"mode": mode}
        | ({"calibration_file": str(one_row)} if mode == "static_int8" else {}),
        "benchmark": "off",
        "validation": {"sample_file": str(one_row), **validation},
    }


ALTERNATING = np.array([1.0, -1.0] * (WIDTH // 2))


def test_a_variant_within_budget_on_one_row_but_not_on_rows_like_it_is_refused(
    tmp_path: Path,
) -> None:
    """Calibrated on the one row it is judged on, static int8 is exact there and clips every
    value beyond +-1 anywhere else."""
    source = _identity_matmul(tmp_path / "m.onnx")
    spec = _job(tmp_path, ALTERNATING, "static_int8")
    result = convert_here(tmp_path / "job", source, "onnx", spec=spec)
    assert_failed(
        result,
        "CONVERSION_FAILED",
        "validate",
        "the static_int8 variant is below the accuracy budget",
        "on 15 rows beside the sample file's 1 (1 of the calibration file's, 14 drawn like "
        "them), validation.samples 16",
    )


def test_validation_samples_as_many_as_the_file_holds_judges_on_the_file_alone(
    tmp_path: Path,
) -> None:
    """The way out for a user whose rows cannot be drawn like: say how many to judge on."""
    source = _identity_matmul(tmp_path / "m.onnx")
    spec = _job(tmp_path, ALTERNATING, "static_int8", samples=1)
    result = succeeded(convert_here(tmp_path / "job", source, "onnx", spec=spec))
    assert result.variant("static_int8")["within_budget"] is True
    assert "top_up" not in result.report["validation"]


def test_rows_the_model_answers_nan_on_are_not_judged_and_the_report_says_so(
    tmp_path: Path,
) -> None:
    source = _sqrt_of_distance_from_one(tmp_path / "m.onnx")
    spec = _job(tmp_path, np.ones(WIDTH), "none")
    result = succeeded(convert_here(tmp_path / "job", source, "onnx", spec=spec))
    assert "top_up" not in result.report["validation"]
    assert any(
        "judged on the sample file's 1 rows only: the model answers NaN on every row" in note
        for note in result.report["notes"]
    ), result.report["notes"]


def test_rows_that_cannot_be_run_leave_the_budget_to_the_given_rows_and_the_report_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model that refuses the added rows (an index past its table, which onnxruntime
    refuses), or a drawing that fails, is not a reason to refuse a job its own rows pass."""

    def refused(*args: object) -> drawn.TopUp:
        raise ValueError("indices element out of data bounds")

    monkeypatch.setattr(drawn, "top_up", refused)
    source = _identity_matmul(tmp_path / "m.onnx")
    spec = _job(tmp_path, ALTERNATING, "none")
    result = succeeded(convert_here(tmp_path / "job", source, "onnx", spec=spec))
    assert "top_up" not in result.report["validation"]
    assert any(
        "judged on the sample file's 1 rows only: rows added to them could not be run "
        "(indices element out of data bounds)" in note
        for note in result.report["notes"]
    ), result.report["notes"]


def _top_up(
    arrays: dict[str, np.ndarray], count: int, calibration: Samples | None = None
) -> Samples:
    top = drawn.top_up(Samples(arrays, batched=True), count, calibration)
    assert top is not None
    return top.rows


def test_a_sample_file_with_enough_rows_is_judged_as_it_is() -> None:
    rows = np.random.default_rng(0).standard_normal((16, WIDTH)).astype(np.float32)
    assert drawn.top_up(Samples({"x": rows}, batched=True), 16, None) is None


def test_drawn_floats_keep_each_elements_scale_and_what_the_file_holds_constant() -> None:
    rows = np.stack(
        [
            np.array([0.0, 40.0, 50_000.0, np.nan, -np.inf], dtype=np.float32),
            np.array([0.0, 30.0, 70_000.0, np.nan, -np.inf], dtype=np.float32),
        ]
    )
    x = _top_up({"x": rows}, 200).arrays["x"]
    assert x.shape == (198, 5) and x.dtype == np.float32
    assert np.all(x[:, 0] == 0.0)  # the same in every row: padding stays padding
    assert np.all(np.isnan(x[:, 3])) and np.all(x[:, 4] == -np.inf)  # fill values stay put
    assert x[:, 1].min() > 15 and x[:, 1].max() < 55  # an age stays an age,
    assert x[:, 1].std() > 1  # yet varies,
    assert x[:, 2].min() > 30_000 and x[:, 2].max() < 90_000  # and an income an income
    again = _top_up({"x": rows}, 200).arrays["x"]
    assert np.array_equal(again, x, equal_nan=True)  # a rerun judges on the same rows


def test_one_row_draws_at_each_elements_own_size_and_fp16_stays_finite() -> None:
    row = np.array([[0.0, 2.0, -300.0, 60_000.0]], dtype=np.float16)
    x = _top_up({"x": row}, 64).arrays["x"]
    assert x.dtype == np.float16 and np.all(np.isfinite(x))
    assert np.all(x[:, 0] == 0)
    assert len(np.unique(x[:, 1])) > 10 and np.all(np.abs(x[:, 1] - 2) < 4)


def test_ids_stay_within_the_range_held_and_masks_take_only_the_values_held() -> None:
    ids = np.array([[101, 7592, 2088, 102, 0, 0]], dtype=np.int64)
    mask = np.array([[1, 1, 1, 1, 0, 0]], dtype=np.int64)
    flags = np.array([[True, False]])
    out = _top_up({"ids": ids, "mask": mask, "flags": flags}, 50).arrays
    assert out["ids"].shape == (49, 6) and out["ids"].dtype == np.int64
    assert out["ids"].min() >= 0 and out["ids"].max() <= 7592
    assert len(np.unique(out["ids"])) > 50  # ids the file does not hold, as fresh texts have
    assert set(np.unique(out["mask"])) == {0, 1} and out["flags"].dtype == np.bool_


def test_the_calibration_files_rows_come_first_and_drawing_only_fills_the_rest() -> None:
    given = np.zeros((1, 2), dtype=np.float32)
    calibration = Samples({"x": np.arange(1, 11, dtype=np.float32).reshape(5, 2)}, True)
    top = drawn.top_up(Samples({"x": given}, batched=True), 16, calibration)
    assert top is not None and (top.calibration, top.drawn) == (5, 10)
    x = top.rows.arrays["x"]
    assert sorted(x[:5, 0].tolist()) == [1, 3, 5, 7, 9]
    assert (
        top.describe("the sample file's 1")
        == "15 rows beside the sample file's 1 (5 of the calibration "
        "file's, 10 drawn like them)"
    )
    enough = drawn.top_up(Samples({"x": given}, batched=True), 3, calibration)
    assert enough is not None and (enough.calibration, enough.drawn) == (2, 0)


def test_a_calibration_file_shaped_otherwise_is_not_mixed_with_the_samples() -> None:
    """Another sequence length (a dynamic axis): the same data, but not one batch."""
    given = {"ids": np.array([[5, 6, 7]], dtype=np.int64)}
    calibration = Samples({"ids": np.arange(20, dtype=np.int64).reshape(4, 5)}, True)
    top = drawn.top_up(Samples(given, batched=True), 4, calibration)
    assert top is not None and (top.calibration, top.drawn) == (0, 3)
    assert top.rows.arrays["ids"].shape == (3, 3)


def test_usable_drops_the_rows_the_reference_answers_nan_on() -> None:
    rows = Samples({"x": np.arange(4, dtype=np.float32).reshape(4, 1)}, batched=True)
    top = drawn.TopUp(rows, calibration=2, drawn=2)
    reference = [
        np.array([[1.0], [np.nan], [3.0], [-np.inf]]),
        np.array([1, 2, 3, 4], dtype=np.int64),
    ]
    kept, outputs = drawn.usable(top, reference)
    assert kept.rows.arrays["x"].ravel().tolist() == [0.0, 2.0, 3.0]
    assert (kept.calibration, kept.drawn) == (1, 2)
    assert outputs[1].tolist() == [1, 3, 4]
    assert outputs[0][2, 0] == -np.inf  # an infinite answer is the model's, and is judged


def _argmax_with_two_close_classes(path: Path) -> Path:
    """y = argmax(x @ w) over 10 classes, two of them nearly the same: where those two lead,
    dynamic int8's rounding names the other one, for 4% of rows of N(0, 1) (measured on 8,192)."""
    rng = np.random.default_rng(2)
    w = rng.standard_normal((WIDTH, 10)).astype(np.float32)
    w[:, 1] = w[:, 0] + 0.02 * rng.standard_normal(WIDTH).astype(np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", WIDTH])
    y = helper.make_tensor_value_info("y", TensorProto.INT64, ["N"])
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["logits"]),
        helper.make_node("ArgMax", ["logits"], ["y"], axis=1, keepdims=0),
    ]
    return save_graph(path, nodes, [x], [y], {"w": w})


def test_an_integer_output_is_judged_on_the_rows_counting_a_change_of_the_budgets_size_needs(
    tmp_path: Path,
) -> None:
    """16 sample rows agree (a change of 4% shows on none of 16 rows half the time); on 500 it
    shows, and the variant is refused, naming the rows."""
    source = _argmax_with_two_close_classes(tmp_path / "m.onnx")
    rows = tmp_path / "rows.npz"
    np.savez(rows, x=np.random.default_rng(52).standard_normal((16, WIDTH)).astype(np.float32))
    spec = {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, WIDTH]}],
        "quantization": {"mode": "dynamic_int8"},
        "benchmark": "off",
        "validation": {"sample_file": str(rows), "keep_failed": True},
    }
    result = succeeded(convert_here(tmp_path / "job", source, "onnx", spec=spec))
    variant = result.variant("dynamic_int8")
    assert variant["within_budget"] is False
    assert variant["vs_fp32"]["cosine"] == 1.0  # the 16 rows alone saw no change
    assert (
        "on 484 rows beside the sample file's 16 (484 drawn like them), to judge 500 rows: an "
        "output judged by the share of equal elements needs 500" in variant["note"]
    ), variant["note"]
    assert result.report["validation"]["top_up"] == {"calibration": 0, "drawn": 484}


def test_rows_for_counting_changes_follow_the_budget_and_the_output() -> None:
    """5 / (1 - limit) elements: on the rule of three's 300 (3 / (1 - limit)) a variant within
    budget at 0.5% changed labels was refused 23% of the time; on 500, judged by the same
    share, 17%, and one past it is refused more often at every rate (``drawn``)."""
    labels = np.zeros(16, dtype=np.int64)
    top3 = np.zeros((16, 3), dtype=np.int64)
    logits = np.zeros((16, 10), dtype=np.float32)
    mask = np.zeros((16, 600), dtype=np.bool_)
    assert drawn.agreement_rows([labels], 16, 0.99, 0.0) == 500
    assert drawn.agreement_rows([top3], 16, 0.99, 0.0) == 167
    assert drawn.agreement_rows([labels, top3], 16, 0.999, 0.0) == drawn.AGREEMENT_MOST_ROWS
    assert drawn.agreement_rows([logits], 16, 0.99, 0.0) == 0  # judged by its cosine
    assert drawn.agreement_rows([logits], 16, 0.99, 0.95) == 100  # top-1 is a share of rows
    assert drawn.agreement_rows([mask], 16, 0.99, 0.0) == 1  # 600 elements in each row
    assert drawn.agreement_rows([labels], 16, 1.0, 0.0) == drawn.AGREEMENT_MOST_ROWS


def test_a_run_over_rows_stops_where_asked_and_covers_the_rows_that_ran() -> None:
    """How rows past validation.samples are bounded in time (pipeline._run_for)."""
    rows = Samples({"x": np.arange(10, dtype=np.float32).reshape(10, 1)}, batched=True)
    asked: list[int] = []

    def stop(done: int) -> bool:
        asked.append(done)
        return done >= 4

    (out,) = parity.run_batches(lambda feed: [feed["x"] * 2], rows, 2, stop=stop)
    assert out.ravel().tolist() == [0, 2, 4, 6]
    assert asked == [2, 4]  # asked before each batch after the first
