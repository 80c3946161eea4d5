"""runtime.rows.probe on real onnxruntime sessions: each graph here works across its first
dimension in a way a probe of one row of 1s and one of 0s did not see (a peak normalisation, a
reversed cumulative sum, a product, a clip only a large or negative row trips), or keeps its
rows apart and must still be batched."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from ferry.server.core.config import OnnxRuntimeConfig
from ferry.server.examples import IR_VERSION, ONNX_TYPES, OPSET, identity_model, mlp_model
from ferry.server.runtime import rows
from ferry.server.runtime.session import OrtSession

F = TensorProto.FLOAT


def _model(
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    *inits: onnx.TensorProto,
) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "probed", inputs, outputs, initializer=list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def _x_to_y(
    nodes: list[onnx.NodeProto],
    *inits: onnx.TensorProto,
    dims: tuple[int | str, ...] = ("batch", 4),
    out: tuple[int | str, ...] | None = None,
    dtype: int = F,
) -> onnx.ModelProto:
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", dtype, list(dims))],
        [helper.make_tensor_value_info("y", dtype, list(out or dims))],
        *inits,
    )


def _const(name: str, value: object, dtype: npt.DTypeLike = np.float32) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)


def _node(op: str, inputs: list[str], output: str, **attrs: Any) -> onnx.NodeProto:
    return helper.make_node(op, inputs, [output], **attrs)


def _probe(tmp_path: Path, model: onnx.ModelProto) -> tuple[bool | None, str]:
    path = tmp_path / "model.onnx"
    onnx.save(model, path)
    return rows.probe(OrtSession(path, OnnxRuntimeConfig(intra_op_threads=1)))


# --- across the rows: each must be refused -------------------------------------------------


def peak_normalisation(dtype: int = F) -> onnx.ModelProto:
    """fc(x / (max|x| + eps)): the max over the whole tensor is 1 with or without a 0 row."""
    np_type = helper.tensor_dtype_to_np_dtype(dtype)
    rng = np.random.default_rng(1)
    return _x_to_y(
        [
            _node("Abs", ["x"], "a"),
            _node("ReduceMax", ["a"], "peak", keepdims=0),
            _node("Add", ["peak", "eps"], "d"),
            _node("Div", ["x", "d"], "n"),
            _node("MatMul", ["n", "w"], "m"),
            _node("Add", ["m", "b"], "y"),
        ],
        _const("eps", 1e-6, np_type),
        _const("w", rng.standard_normal((4, 3)), np_type),
        _const("b", rng.standard_normal(3), np_type),
        out=("batch", 3),
        dtype=dtype,
    )


def reversed_cumulative_sum() -> onnx.ModelProto:
    """A suffix sum over the rows: a 0 row below adds nothing to the row above it."""
    return _x_to_y([_node("CumSum", ["x", "axis"], "y", reverse=1)], _const("axis", 0, np.int64))


def cumulative_sum() -> onnx.ModelProto:
    return _x_to_y([_node("CumSum", ["x", "axis"], "y")], _const("axis", 0, np.int64))


def minus_the_max_of_everything() -> onnx.ModelProto:
    return _x_to_y([_node("ReduceMax", ["x"], "m", keepdims=1), _node("Sub", ["x", "m"], "y")])


def minus_the_mean_of_the_rows() -> onnx.ModelProto:
    return _x_to_y(
        [_node("ReduceMean", ["x"], "m", axes=[0], keepdims=1), _node("Sub", ["x", "m"], "y")]
    )


def times_the_product_of_the_rows() -> onnx.ModelProto:
    return _x_to_y(
        [_node("ReduceProd", ["x"], "p", axes=[0], keepdims=1), _node("Mul", ["x", "p"], "y")]
    )


def over_the_global_norm() -> onnx.ModelProto:
    """A global scalar statistic scales every row."""
    return _x_to_y([_node("ReduceL2", ["x"], "n", keepdims=0), _node("Div", ["x", "n"], "y")])


def softmax_over_the_rows() -> onnx.ModelProto:
    return _x_to_y([_node("Softmax", ["x"], "y", axis=0)], dims=("batch",))


def _sort_rows(largest: int) -> onnx.ModelProto:
    """TopK with k = the number of rows: a sort down each column."""
    return _x_to_y(
        [
            _node("Shape", ["x"], "shape"),
            _node("Slice", ["shape", "zero", "one"], "k"),
            helper.make_node("TopK", ["x", "k"], ["y", "i"], axis=0, largest=largest),
        ],
        _const("zero", [0], np.int64),
        _const("one", [1], np.int64),
    )


def sorted_descending() -> onnx.ModelProto:
    return _sort_rows(1)


def sorted_ascending() -> onnx.ModelProto:
    return _sort_rows(0)


def attention_between_rows() -> onnx.ModelProto:
    """softmax(x xᵀ) x: every row attends to every other."""
    return _x_to_y(
        [
            _node("Transpose", ["x"], "xt", perm=[1, 0]),
            _node("MatMul", ["x", "xt"], "s"),
            _node("Softmax", ["s"], "p", axis=1),
            _node("MatMul", ["p", "x"], "y"),
        ]
    )


def shifted_only_when_a_row_is_large() -> onnx.ModelProto:
    """x + relu(max(x) - 10): nothing moves until some value passes 10."""
    return _x_to_y(
        [
            _node("ReduceMax", ["x"], "m", keepdims=0),
            _node("Sub", ["m", "ten"], "over"),
            _node("Relu", ["over"], "r"),
            _node("Add", ["x", "r"], "y"),
        ],
        _const("ten", 10.0),
    )


def shifted_only_when_a_row_is_negative() -> onnx.ModelProto:
    """x + relu(-min(x)): nothing moves while every value is positive."""
    return _x_to_y(
        [
            _node("ReduceMin", ["x"], "m", keepdims=0),
            _node("Neg", ["m"], "n"),
            _node("Relu", ["n"], "r"),
            _node("Add", ["x", "r"], "y"),
        ]
    )


def times_the_batch_size() -> onnx.ModelProto:
    """Reads how many rows there are."""
    return _x_to_y(
        [
            _node("Shape", ["x"], "shape"),
            _node("Slice", ["shape", "zero", "one"], "n"),
            _node("Cast", ["n"], "nf", to=F),
            _node("Mul", ["x", "nf"], "y"),
        ],
        _const("zero", [0], np.int64),
        _const("one", [1], np.int64),
    )


def mean_over_rows_sharing_a_segment() -> onnx.ModelProto:
    """Each row (a graph node) gets the mean of the rows with its segment id (a GNN pooling):
    four probe rows all had different ids, so nothing was pooled."""
    return _model(
        [
            _node("OneHot", ["seg", "depth", "onoff"], "hot", axis=-1),  # [N, 4]
            _node("Transpose", ["hot"], "hot_t", perm=[1, 0]),
            _node("MatMul", ["hot_t", "x"], "sums"),  # [4, 3]
            _node("ReduceSum", ["hot", "axis0"], "counts", keepdims=0),  # [4]
            _node("Max", ["counts", "one_f"], "safe"),
            _node("Unsqueeze", ["safe", "axis1"], "per_seg"),
            _node("Div", ["sums", "per_seg"], "means"),
            _node("MatMul", ["hot", "means"], "y"),
        ],
        [
            helper.make_tensor_value_info("x", F, ["batch", 3]),
            helper.make_tensor_value_info("seg", TensorProto.INT64, ["batch"]),
        ],
        [helper.make_tensor_value_info("y", F, ["batch", 3])],
        _const("depth", 4, np.int64),
        _const("onoff", [0.0, 1.0]),
        _const("axis0", [0], np.int64),
        _const("axis1", [1], np.int64),
        _const("one_f", 1.0),
    )


def divided_by_its_equal_rows() -> onnx.ModelProto:
    """x / (how many rows equal x): different probe rows never met an equal one."""
    return _x_to_y(
        [
            _node("Unsqueeze", ["x", "axis1"], "a"),  # [N, 1, 4]
            _node("Unsqueeze", ["x", "axis0"], "b"),  # [1, N, 4]
            _node("Equal", ["a", "b"], "eq"),  # [N, N, 4]
            _node("Cast", ["eq"], "eqf", to=F),
            _node("ReduceMin", ["eqf"], "same", axes=[2], keepdims=0),  # [N, N] (opset 17)
            _node("ReduceSum", ["same", "axis1"], "count", keepdims=1),  # [N, 1]
            _node("Div", ["x", "count"], "y"),
        ],
        _const("axis0", [0], np.int64),
        _const("axis1", [1], np.int64),
    )


def shifted_by_four_rows() -> onnx.ModelProto:
    """x + x rolled by four rows: with four rows the roll is the identity."""
    return _x_to_y(
        [
            _node("Shape", ["x"], "shape"),
            _node("Slice", ["shape", "zero", "one"], "n1"),
            _node("Squeeze", ["n1"], "n"),
            _node("Range", ["zero_s", "n", "one_s"], "i"),
            _node("Add", ["i", "n"], "i_n"),
            _node("Sub", ["i_n", "four"], "j"),
            _node("Mod", ["j", "n"], "k"),
            _node("Gather", ["x", "k"], "rolled", axis=0),
            _node("Add", ["x", "rolled"], "y"),
        ],
        _const("zero", [0], np.int64),
        _const("one", [1], np.int64),
        _const("zero_s", 0, np.int64),
        _const("one_s", 1, np.int64),
        _const("four", 4, np.int64),
    )


def doubled_past_four_rows() -> onnx.ModelProto:
    """x * (1 + [rows > 4]): four rows looked the same as one."""
    return _x_to_y(
        [
            _node("Shape", ["x"], "shape"),
            _node("Slice", ["shape", "zero", "one"], "n"),
            _node("Greater", ["n", "four"], "more"),
            _node("Cast", ["more"], "m", to=F),
            _node("Add", ["m", "one_f"], "factor"),
            _node("Mul", ["x", "factor"], "y"),
        ],
        _const("zero", [0], np.int64),
        _const("one", [1], np.int64),
        _const("four", [4], np.int64),
        _const("one_f", [1.0]),
    )


def two_inputs_centred_on_their_difference() -> onnx.ModelProto:
    """(a - b) minus its mean over the rows: blind to probe rows that fill a and b alike."""
    return _model(
        [
            _node("Sub", ["a", "b"], "d"),
            _node("ReduceMean", ["d"], "m", axes=[0], keepdims=1),
            _node("Sub", ["d", "m"], "y"),
        ],
        [helper.make_tensor_value_info(n, F, ["batch", 3]) for n in ("a", "b")],
        [helper.make_tensor_value_info("y", F, ["batch", 3])],
    )


def embeddings_minus_their_mean() -> onnx.ModelProto:
    """An index input: the table's rows for the ids, centred over the batch."""
    table = np.arange(8, dtype=np.float32).reshape(4, 2)
    return _model(
        [
            _node("Gather", ["table", "ids"], "e", axis=0),
            _node("ReduceMean", ["e"], "m", axes=[0], keepdims=1),
            _node("Sub", ["e", "m"], "y"),
        ],
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch"])],
        [helper.make_tensor_value_info("y", F, ["batch", 2])],
        _const("table", table),
    )


def integers_over_their_max() -> onnx.ModelProto:
    return _model(
        [
            _node("Cast", ["x"], "f", to=F),
            _node("ReduceMax", ["f"], "m", keepdims=0),
            _node("Add", ["m", "one"], "d"),
            _node("Div", ["f", "d"], "y"),
        ],
        [helper.make_tensor_value_info("x", TensorProto.INT32, ["batch", 3])],
        [helper.make_tensor_value_info("y", F, ["batch", 3])],
        _const("one", 1.0),
    )


def bools_against_any_row() -> onnx.ModelProto:
    """x xor (any row true in the column)."""
    return _model(
        [
            _node("Cast", ["x"], "i", to=TensorProto.INT32),
            _node("ReduceMax", ["i"], "m", axes=[0], keepdims=1),
            _node("Cast", ["m"], "any", to=TensorProto.BOOL),
            _node("Xor", ["x", "any"], "y"),
        ],
        [helper.make_tensor_value_info("x", TensorProto.BOOL, ["batch", 3])],
        [helper.make_tensor_value_info("y", TensorProto.BOOL, ["batch", 3])],
    )


def half_peak_normalisation() -> onnx.ModelProto:
    return peak_normalisation(TensorProto.FLOAT16)


ACROSS: list[Callable[[], onnx.ModelProto]] = [
    peak_normalisation,
    half_peak_normalisation,
    reversed_cumulative_sum,
    cumulative_sum,
    minus_the_max_of_everything,
    minus_the_mean_of_the_rows,
    times_the_product_of_the_rows,
    over_the_global_norm,
    softmax_over_the_rows,
    sorted_descending,
    sorted_ascending,
    attention_between_rows,
    shifted_only_when_a_row_is_large,
    shifted_only_when_a_row_is_negative,
    times_the_batch_size,
    mean_over_rows_sharing_a_segment,
    divided_by_its_equal_rows,
    shifted_by_four_rows,
    doubled_past_four_rows,
    two_inputs_centred_on_their_difference,
    embeddings_minus_their_mean,
    integers_over_their_max,
    bools_against_any_row,
]


@pytest.mark.parametrize("build", ACROSS, ids=[f.__name__ for f in ACROSS])
def test_a_graph_that_works_across_its_rows_is_refused(
    tmp_path: Path, build: Callable[[], onnx.ModelProto]
) -> None:
    apart, why = _probe(tmp_path, build())
    assert apart is False
    assert "differs when another row runs beside it" in why


# --- rows apart: each must still be batched ------------------------------------------------


def relu() -> onnx.ModelProto:
    return _x_to_y([_node("Relu", ["x"], "y")])


def softmax_within_each_row() -> onnx.ModelProto:
    return _x_to_y([_node("Softmax", ["x"], "y", axis=1)])


def centred_within_each_row() -> onnx.ModelProto:
    return _x_to_y(
        [_node("ReduceMean", ["x"], "m", axes=[1], keepdims=1), _node("Sub", ["x", "m"], "y")]
    )


def argmax_within_each_row() -> onnx.ModelProto:
    return _model(
        [_node("ArgMax", ["x"], "y", axis=1, keepdims=0)],
        [helper.make_tensor_value_info("x", F, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.INT64, ["batch"])],
    )


def mlp() -> onnx.ModelProto:
    return mlp_model((6, 5, 3))


def _lookup(rows_in_table: int, ids: int = TensorProto.INT64) -> onnx.ModelProto:
    table = np.arange(rows_in_table * 2, dtype=np.float32).reshape(rows_in_table, 2)
    return _model(
        [_node("Gather", ["table", "ids"], "y", axis=0)],
        [helper.make_tensor_value_info("ids", ids, ["batch"])],
        [helper.make_tensor_value_info("y", F, ["batch", 2])],
        _const("table", table),
    )


def lookup_in_a_table_of_four() -> onnx.ModelProto:
    return _lookup(4)


def lookup_in_a_table_of_two() -> onnx.ModelProto:
    """Ids 2 and 3 are past it: the probe falls back to ids 0 and 1, and still tells."""
    return _lookup(2, TensorProto.INT32)


def a_float_used_as_an_index() -> onnx.ModelProto:
    """Random floats are no index: the probe falls back to 0s and 1s for floats too."""
    return _model(
        [_node("Cast", ["x"], "ids", to=TensorProto.INT64), _node("Gather", ["t", "ids"], "y")],
        [helper.make_tensor_value_info("x", F, ["batch"])],
        [helper.make_tensor_value_info("y", F, ["batch"])],
        _const("t", [0.25, 0.75]),
    )


def masked_embedding_sum() -> onnx.ModelProto:
    """Token ids and a float mask, summed along each row's sequence."""
    table = np.random.default_rng(2).standard_normal((6, 3)).astype(np.float32)
    return _model(
        [
            _node("Gather", ["table", "ids"], "e", axis=0),
            _node("Unsqueeze", ["mask", "last"], "m"),
            _node("Mul", ["e", "m"], "me"),
            _node("ReduceSum", ["me", "seq_axis"], "y", keepdims=0),
        ],
        [
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 5]),
            helper.make_tensor_value_info("mask", F, ["batch", 5]),
        ],
        [helper.make_tensor_value_info("y", F, ["batch", 3])],
        _const("table", table),
        _const("last", [2], np.int64),
        _const("seq_axis", [1], np.int64),
    )


def lstm_over_each_rows_sequence() -> onnx.ModelProto:
    """x [batch, seq, 3] through an LSTM (which wants [seq, batch, 3]); its last hidden state."""
    rng = np.random.default_rng(3)
    hidden = 4
    return _model(
        [
            _node("Transpose", ["x"], "xs", perm=[1, 0, 2]),
            helper.make_node(
                "LSTM", ["xs", "w", "r", "b"], ["", "h"], hidden_size=hidden, direction="forward"
            ),
            _node("Squeeze", ["h", "zero"], "y"),
        ],
        [helper.make_tensor_value_info("x", F, ["batch", 2, 3])],
        [helper.make_tensor_value_info("y", F, ["batch", hidden])],
        _const("w", rng.standard_normal((1, 4 * hidden, 3)) * 0.5),
        _const("r", rng.standard_normal((1, 4 * hidden, hidden)) * 0.5),
        _const("b", rng.standard_normal((1, 8 * hidden)) * 0.1),
        _const("zero", [0], np.int64),
    )


def strings_passed_through() -> onnx.ModelProto:
    return _model(
        [_node("Identity", ["x"], "y")],
        [helper.make_tensor_value_info("x", TensorProto.STRING, ["batch", 2])],
        [helper.make_tensor_value_info("y", TensorProto.STRING, ["batch", 2])],
    )


APART: list[Callable[[], onnx.ModelProto]] = [
    relu,
    softmax_within_each_row,
    centred_within_each_row,
    argmax_within_each_row,
    mlp,
    lookup_in_a_table_of_four,
    lookup_in_a_table_of_two,
    a_float_used_as_an_index,
    masked_embedding_sum,
    lstm_over_each_rows_sequence,
    strings_passed_through,
]


@pytest.mark.parametrize("build", APART, ids=[f.__name__ for f in APART])
def test_a_graph_that_keeps_its_rows_apart_is_batched(
    tmp_path: Path, build: Callable[[], onnx.ModelProto]
) -> None:
    assert _probe(tmp_path, build()) == (True, "")


@pytest.mark.parametrize("datatype", sorted(ONNX_TYPES))
def test_an_identity_of_every_dtype_is_batched(tmp_path: Path, datatype: str) -> None:
    assert _probe(tmp_path, identity_model(datatype)) == (True, "")


def test_a_table_too_small_for_any_probe_row_cannot_tell(tmp_path: Path) -> None:
    """Index 1 is past a table of one: the shapes decide (runtime.session logs a WARNING)."""
    apart, why = _probe(tmp_path, _lookup(1))
    assert apart is None
    assert why.startswith("it does not run on a probe row")
