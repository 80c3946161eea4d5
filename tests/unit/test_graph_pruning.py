"""Pruning on the ONNX graph (issue #13 item 4): real onnx graphs, real onnx.checker and
onnxruntime, and the conversion child's pipeline run in this process on ONNX sources.

Graphs are written with onnx.helper in the shapes torch's exporters give: Gemm with transB, MatMul
with a plain or Transposed initializer, Conv with BatchNormalization. Hidden units that matter
little (scaled down) make "within the budget at small amounts" a property of the model, not luck.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_convert_child import assert_failed, convert_here, succeeded

from ferry.server.convert.strategies import graph_weights, pruning
from ferry.server.errors import ConversionFailed

RNG = np.random.default_rng(0)


def _init(name: str, array: np.ndarray) -> Any:
    return numpy_helper.from_array(array.astype(np.float32), name)


def _model(nodes: list[Any], inits: list[Any], x: list[Any], y: list[Any]) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y)],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model, full_check=True)
    return model


def _weak(weight: np.ndarray, axis: int, fraction: float = 0.5) -> np.ndarray:
    """Scale the first ``fraction`` of the channels on ``axis`` down: they matter little."""
    count = int(weight.shape[axis] * fraction)
    index = [slice(None)] * weight.ndim
    index[axis] = slice(0, count)
    weight = weight.copy()
    weight[tuple(index)] *= 1e-4
    return weight


def mlp(hidden: int = 32) -> onnx.ModelProto:
    """8 -> hidden -> hidden -> 4: a Gemm(transB) with GELU (Erf chain), a MatMul behind a
    Transpose, a Gemm output layer; half of each hidden layer's units nearly silent."""
    w1 = _weak(RNG.standard_normal((hidden, 8)), 0)  # Gemm transB=1: [out, in]
    w2t = _weak(RNG.standard_normal((hidden, hidden)) / 4, 0)  # [out, in], Transposed
    w3 = RNG.standard_normal((4, hidden))
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h1"], transB=1),
        helper.make_node("Div", ["h1", "sqrt2"], ["g0"]),  # exact GELU: x * 0.5 * (1 + erf(x/√2))
        helper.make_node("Erf", ["g0"], ["g1"]),
        helper.make_node("Add", ["g1", "one"], ["g2"]),
        helper.make_node("Mul", ["h1", "g2"], ["g3"]),
        helper.make_node("Mul", ["g3", "half"], ["a1"]),
        helper.make_node("Transpose", ["w2t"], ["w2"], perm=[1, 0]),
        helper.make_node("MatMul", ["a1", "w2"], ["h2"]),
        helper.make_node("Add", ["h2", "b2"], ["h3"]),
        helper.make_node("Relu", ["h3"], ["a2"]),
        helper.make_node("Gemm", ["a2", "w3", "b3"], ["y"], transB=1),
    ]
    inits = [
        _init("w1", w1), _init("b1", RNG.standard_normal(hidden) * 0.1),
        _init("w2t", w2t), _init("b2", _weak(RNG.standard_normal((1, hidden)) * 0.1, 1)),
        _init("w3", w3), _init("b3", RNG.standard_normal(4)),
        _init("sqrt2", np.array(np.sqrt(2.0))), _init("one", np.array(1.0)),
        _init("half", np.array([0.5])),
    ]  # fmt: skip
    return _model(nodes, inits, ["N", 8], ["N", 4])


def cnn(width: int = 16, head: str = "pool") -> onnx.ModelProto:
    """Conv -> BN -> ReLU -> Conv -> ReLU, then a classifier head: GlobalAveragePool + Flatten
    ("pool"), ReduceMean(keepdims) + Reshape([-1, C]) as torch's dynamo exporter writes it
    ("reduce"), or a Flatten of the whole feature map ("flatten": features are C*H*W)."""
    c1 = _weak(RNG.standard_normal((width, 3, 3, 3)), 0)
    c2 = _weak(RNG.standard_normal((8, width, 3, 3)) / 8, 0)
    nodes = [
        helper.make_node("Conv", ["x", "c1", "c1b"], ["f1"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["f1", "s", "b", "m", "v"], ["f2"]),
        helper.make_node("Relu", ["f2"], ["f3"]),
        helper.make_node("Conv", ["f3", "c2"], ["f4"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["f4"], ["f5"]),
    ]
    features = 8
    inits = [
        _init("c1", c1), _init("c1b", RNG.standard_normal(width) * 0.1),
        _init("s", RNG.uniform(0.5, 1.5, width)), _init("b", RNG.standard_normal(width) * 0.1),
        _init("m", RNG.standard_normal(width) * 0.1), _init("v", RNG.uniform(0.5, 1.5, width)),
        _init("c2", c2),
    ]  # fmt: skip
    if head == "pool":
        nodes += [
            helper.make_node("GlobalAveragePool", ["f5"], ["p"]),
            helper.make_node("Flatten", ["p"], ["p2"]),
        ]
    elif head == "reduce":
        nodes += [
            helper.make_node("ReduceMean", ["f5"], ["p"], axes=[-1, -2], keepdims=1),
            helper.make_node("Reshape", ["p", "shape"], ["p2"], allowzero=1),
        ]
        inits.append(numpy_helper.from_array(np.array([-1, 8], np.int64), "shape"))
    else:
        nodes.append(helper.make_node("Flatten", ["f5"], ["p2"]))
        features = 8 * 8 * 8
    nodes.append(helper.make_node("Gemm", ["p2", "fc", "fcb"], ["y"], transB=1))
    inits += [_init("fc", RNG.standard_normal((10, features))), _init("fcb", np.zeros(10))]
    return _model(nodes, inits, ["N", 3, 8, 8], ["N", 10])


def transformer_block(d: int = 16, ff: int = 32) -> onnx.ModelProto:
    """x [N, S, d]: a head-split projection (Reshape), a residual FFN, an output projection."""
    nodes = [
        helper.make_node("MatMul", ["x", "wq"], ["q"]),
        helper.make_node("Reshape", ["q", "heads"], ["qh"]),  # [N, S, 2, d/2]
        helper.make_node("Transpose", ["qh"], ["qt"], perm=[0, 2, 1, 3]),  # [N, 2, S, d/2]
        helper.make_node("Transpose", ["qt"], ["kt"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["qt", "kt"], ["scores"]),  # a stand-in for attention
        helper.make_node("ReduceMean", ["scores"], ["att0"], axes=[1, 3], keepdims=0),  # [N, S]
        helper.make_node("Unsqueeze", ["att0", "last"], ["att"]),
        helper.make_node("Add", ["x", "att"], ["h"]),
        helper.make_node("MatMul", ["h", "w1"], ["f1"]),
        helper.make_node("Add", ["f1", "b1"], ["f2"]),
        helper.make_node("Relu", ["f2"], ["f3"]),
        helper.make_node("MatMul", ["f3", "w2"], ["f4"]),
        helper.make_node("Add", ["h", "f4"], ["r"]),  # the residual: w2's output stays whole
        helper.make_node("MatMul", ["r", "wo"], ["y"]),
    ]
    inits = [
        _init("wq", RNG.standard_normal((d, d))),
        numpy_helper.from_array(np.array([0, 0, 2, d // 2], np.int64), "heads"),
        numpy_helper.from_array(np.array([2], np.int64), "last"),
        _init("w1", _weak(RNG.standard_normal((d, ff)), 1)), _init("b1", np.zeros(ff)),
        _init("w2", _weak(RNG.standard_normal((ff, d)), 0)), _init("wo", RNG.standard_normal((d, 3))),
    ]  # fmt: skip
    return _model(nodes, inits, ["N", 5, d], ["N", 5, 3])


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"x": x})
    return np.asarray(y)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def _dims(model: onnx.ModelProto) -> dict[str, list[int]]:
    return {t.name: list(t.dims) for t in model.graph.initializer}


def _pruned(model: onnx.ModelProto, method: str, amount: float) -> tuple[onnx.ModelProto, str]:
    pruned = onnx.ModelProto()
    pruned.CopyFrom(model)
    build = pruning.method(method).build_graph
    assert build is not None
    account = build(pruning.GraphPruneInputs(pruned, amount))
    onnx.checker.check_model(pruned, full_check=True)
    return pruned, account


# ---- unstructured ----


@pytest.mark.parametrize("method", ["l1_unstructured", "global_unstructured"])
def test_unstructured_reaches_the_requested_sparsity(method: str) -> None:
    model = mlp()
    pruned, account = _pruned(model, method, 0.6)
    weights = ["w1", "w2t", "w3"]
    total, nonzero = graph_weights.initializer_counts(pruned, weights)
    assert (total - nonzero) / total == pytest.approx(0.6, abs=0.01)
    if method == "l1_unstructured":  # each layer on its own
        for name in weights:
            layer_total, layer_nonzero = graph_weights.initializer_counts(pruned, [name])
            assert (layer_total - layer_nonzero) / layer_total == pytest.approx(0.6, abs=0.02)
    assert _dims(pruned) == _dims(model)  # shapes unchanged
    assert graph_weights.initializer_counts(pruned, ["b1", "b2"]) == (
        graph_weights.initializer_counts(model, ["b1", "b2"])
    )  # biases untouched
    assert "3 weight layers" in account
    x = RNG.standard_normal((4, 8)).astype(np.float32)
    assert _run(pruned, x).shape == (4, 4)


def test_unstructured_zeroes_the_smallest_magnitudes() -> None:
    model = mlp()
    pruned, _ = _pruned(model, "l1_unstructured", 0.5)
    original = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "w3"))
    kept = numpy_helper.to_array(next(t for t in pruned.graph.initializer if t.name == "w3"))
    zeroed = np.abs(original[kept == 0])
    assert zeroed.max() <= np.abs(original[kept != 0]).min()


# ---- structured ----


def test_structured_mlp_shrinks_hidden_layers_and_keeps_outputs() -> None:
    model = mlp(hidden=32)
    pruned, account = _pruned(model, "structured", 0.5)
    dims = _dims(pruned)
    assert dims["w1"] == [16, 8] and dims["b1"] == [16]
    assert dims["w2t"] == [16, 16] and dims["b2"] == [1, 16]
    assert dims["w3"] == [4, 16] and dims["b3"] == [4]  # the output layer keeps its outputs
    assert "2 of 3 weight layers pruned (64 -> 32 hidden channels)" in account
    assert "1 left whole: 1 because it reaches a graph output" in account
    x = RNG.standard_normal((7, 8)).astype(np.float32)
    got, want = _run(pruned, x), _run(model, x)
    assert got.shape == want.shape
    assert _cosine(got, want) > 0.999  # the silent half went, the loud half stayed


@pytest.mark.parametrize("head", ["pool", "reduce"])
def test_structured_cnn_prunes_through_batchnorm_and_the_pooling(head: str) -> None:
    model = cnn(width=16, head=head)
    pruned, account = _pruned(model, "structured", 0.5)
    dims = _dims(pruned)
    assert dims["c1"] == [8, 3, 3, 3] and dims["c1b"] == [8]
    assert all(dims[p] == [8] for p in ("s", "b", "m", "v"))
    assert dims["c2"] == [4, 8, 3, 3]  # both convs lose half their output channels
    assert dims["fc"] == [10, 4]  # the classifier its inputs, not its outputs
    if head == "reduce":
        assert numpy_helper.to_array(
            next(t for t in pruned.graph.initializer if t.name == "shape")
        ).tolist() == [-1, 4]
    assert "2 of 3 weight layers pruned (24 -> 12 hidden channels)" in account
    assert "1 left whole: 1 because it reaches a graph output" in account
    x = RNG.standard_normal((3, 3, 8, 8)).astype(np.float32)
    got, want = _run(pruned, x), _run(model, x)
    assert got.shape == want.shape == (3, 10)
    assert _cosine(got, want) > 0.999


def test_a_flatten_of_the_feature_map_keeps_the_last_conv_whole() -> None:
    """Flatten of [N, C, H, W] interleaves channels with positions: not a local dependency."""
    model = cnn(width=16, head="flatten")
    pruned, account = _pruned(model, "structured", 0.5)
    assert _dims(pruned)["c2"] == [8, 8, 3, 3] and _dims(pruned)["c1"] == [8, 3, 3, 3]
    assert "1 because it feeds Flatten" in account
    x = RNG.standard_normal((2, 3, 8, 8)).astype(np.float32)
    assert _run(pruned, x).shape == (2, 10)


def test_transformer_block_prunes_only_the_feed_forward() -> None:
    model = transformer_block(d=16, ff=32)
    pruned, account = _pruned(model, "structured", 0.5)
    dims = _dims(pruned)
    assert dims["w1"] == [16, 16] and dims["b1"] == [16] and dims["w2"] == [16, 16]
    assert dims["wq"] == [16, 16] and dims["wo"] == [16, 3]  # the embedding width stays
    assert "1 of 4 weight layers pruned (32 -> 16 hidden channels)" in account
    for why in (
        "it feeds a Reshape that moves its channels",
        "it meets another branch in Add",
        "reaches a graph output",
    ):
        assert why in account, account
    x = RNG.standard_normal((2, 5, 16)).astype(np.float32)
    got, want = _run(pruned, x), _run(model, x)
    assert got.shape == want.shape and _cosine(got, want) > 0.999


def test_structured_refuses_a_graph_with_no_hidden_layer() -> None:
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)]
    model = _model(
        nodes, [_init("w", np.ones((4, 8))), _init("b", np.zeros(4))], ["N", 8], ["N", 4]
    )
    with pytest.raises(ConversionFailed) as info:
        _pruned(model, "structured", 0.5)
    message = info.value.message
    assert "no hidden layer whose channels only feed another weight layer" in message
    assert "1 because it reaches a graph output" in message
    assert "l1_unstructured" in message and "global_unstructured" in message


def test_weights_computed_at_run_time_are_left_alone() -> None:
    nodes = [
        helper.make_node("Mul", ["w", "two"], ["w2"]),
        helper.make_node("Relu", ["w2"], ["w3"]),  # not a Transpose/Identity: computed
        helper.make_node("MatMul", ["x", "w3"], ["y"]),
    ]
    inits = [_init("w", np.ones((8, 4))), _init("two", np.array(2.0))]
    model = _model(nodes, inits, ["N", 8], ["N", 4])
    with pytest.raises(ConversionFailed, match="has no MatMul, Gemm or Conv node whose weight"):
        _pruned(model, "l1_unstructured", 0.5)


# ---- in the conversion pipeline ----


def _samples(
    tmp: Path, model: onnx.ModelProto, x: np.ndarray, noise: float = 0.0
) -> dict[str, Any]:
    """What an SDK module upload sends: samples and the original model's outputs on them."""
    np.savez(tmp / "samples.npz", x=x)
    np.savez(tmp / "ref.npz", y=_run(model, x) + noise)
    return {"sample_file": str(tmp / "samples.npz"), "reference_file": str(tmp / "ref.npz")}


def test_an_onnx_upload_is_pruned_and_judged_against_pytorch_outputs(tmp_path: Path) -> None:
    model = mlp(hidden=32)
    onnx.save(model, str(tmp_path / "m.onnx"))
    x = RNG.standard_normal((12, 8)).astype(np.float32)
    spec = {
        "pruning": {"method": "structured", "amount": 0.5},
        "benchmark": "off",
        "validation": _samples(tmp_path, model, x, noise=1e-6),
    }
    result = succeeded(convert_here(tmp_path / "job", tmp_path / "m.onnx", "onnx", spec=spec))
    report = result.report
    section = report["pruning"]
    assert section["method"] == "structured" and section["fine_tuned"] is False
    assert section["params_after"] < section["params_before"]
    assert "2 of 3 weight layers pruned" in section["note"] and "no fine-tuning" in section["note"]
    assert section["vs_unpruned"]["cosine"] > 0.999
    assert report["parity"]["against"] == "pytorch (reference_outputs)"
    fp32 = result.variant("fp32")
    assert fp32["within_budget"] and fp32["vs_pytorch"] == fp32["vs_reference"]
    served = onnx.load(str(result.model))
    assert {t.name: list(t.dims) for t in served.graph.initializer}.get("w1") in ([16, 8], None)
    assert _run(served, x).shape == (12, 4)


def test_a_pruned_onnx_upload_below_the_budget_is_refused(tmp_path: Path) -> None:
    model = mlp(hidden=32)
    onnx.save(model, str(tmp_path / "m.onnx"))
    x = RNG.standard_normal((12, 8)).astype(np.float32)
    spec = {
        "pruning": {"method": "structured", "amount": 0.9},
        "benchmark": "off",
        "validation": {**_samples(tmp_path, model, x), "min_cosine": 0.999},
    }
    result = convert_here(tmp_path / "job", tmp_path / "m.onnx", "onnx", spec=spec)
    assert_failed(
        result,
        "CONVERSION_FAILED",
        "prune",
        "structured pruning at amount 0.9",
        "against the PyTorch model's reference outputs",
        "< min_cosine 0.999",
        "use a smaller pruning.amount",
    )
    assert result.report["pruning"]["vs_unpruned"]["cosine"] < 0.999


def test_an_onnx_upload_without_a_prunable_layer_fails_in_the_prune_stage(tmp_path: Path) -> None:
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)]
    inits = [_init("w", np.ones((4, 8))), _init("b", np.zeros(4))]
    onnx.save(_model(nodes, inits, ["N", 8], ["N", 4]), str(tmp_path / "m.onnx"))
    spec = {"pruning": {"method": "structured", "amount": 0.5}, "benchmark": "off"}
    result = convert_here(tmp_path / "job", tmp_path / "m.onnx", "onnx", spec=spec)
    assert_failed(result, "CONVERSION_FAILED", "prune", "l1_unstructured", "no hidden layer")


def test_a_bias_two_layers_share_is_copied_before_it_is_cut() -> None:
    """Exporters deduplicate equal tensors (the copies of a TransformerEncoder layer share their
    biases): each pruned layer gets its own slice, the other reader keeps the whole tensor."""
    w1, w2 = _weak(RNG.standard_normal((8, 16)), 1), _weak(RNG.standard_normal((16, 16)), 1)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h1"]),
        helper.make_node("Add", ["h1", "b"], ["h2"]),
        helper.make_node("Relu", ["h2"], ["a1"]),
        helper.make_node("MatMul", ["a1", "w2"], ["h3"]),
        helper.make_node("Add", ["h3", "b"], ["h4"]),
        helper.make_node("MatMul", ["h4", "w3"], ["y"]),  # h4's channels reach no output whole
    ]
    inits = [
        _init("w1", w1), _init("w2", w2), _init("b", _weak(RNG.standard_normal(16), 0)),
        _init("w3", RNG.standard_normal((16, 4))),
    ]  # fmt: skip
    model = _model(nodes, inits, ["N", 8], ["N", 4])
    pruned, account = _pruned(model, "structured", 0.5)
    assert "2 of 3 weight layers pruned (32 -> 16 hidden channels)" in account
    adds = [n for n in pruned.graph.node if n.op_type == "Add"]
    biases = [adds[0].input[1], adds[1].input[1]]
    assert len(set(biases)) == 2 and all(_dims(pruned)[b] == [8] for b in biases)
    x = RNG.standard_normal((5, 8)).astype(np.float32)
    assert _cosine(_run(pruned, x), _run(model, x)) > 0.999


@pytest.mark.slow
@pytest.mark.parametrize(
    ("architecture", "kwargs", "shape", "phrases"),
    [
        (
            "transformer_encoder",
            {},
            [16, 64],
            ["2 of 8 weight layers pruned (256 -> 128",
             "because it feeds a Reshape that moves its channels off the last axis",
             "because it feeds LayerNormalization"],
        ),
        (
            "resnet",
            {"widths": [8, 16, 32, 64], "num_classes": 10},
            [3, 32, 32],
            ["8 of 21 weight layers pruned", "because it meets another branch in Add"],
        ),
    ],
)  # fmt: skip
def test_real_exports_prune_only_what_is_local(
    architecture: str, kwargs: dict[str, Any], shape: list[int], phrases: list[str]
) -> None:
    """torch's own exports: a transformer keeps attention and the embedding width and loses
    half its feed-forward units; a ResNet keeps every channel a residual Add reads."""
    import torch

    from ferry.server.convert.worker import architectures

    torch.manual_seed(0)
    module = architectures.build(architecture, kwargs)
    x = torch.randn(3, *shape)
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.onnx.export(
        module, (x,), dynamo=True, dynamic_shapes=({0: batch},), opset_version=18, verbose=False
    )
    model = program.model_proto
    pruned, account = _pruned(model, "structured", 0.5)
    for phrase in phrases:
        assert phrase in account, account
    assert pruned.ByteSize() < model.ByteSize()
    session = ort.InferenceSession(pruned.SerializeToString(), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        assert got.shape == tuple(module(x).shape)


def test_gpt2_conv1d_feed_forward_is_pruned_through_its_reshapes() -> None:
    """GPT-2's Conv1D flattens [N, T, C] to [N*T, C] for its Gemm and reshapes back through a
    Concat of run-time dims ending in C: structured pruning refused every layer ("8 because it
    feeds Reshape"). Now the feed-forward's hidden units go, the Concat (shared by both blocks)
    copied for each, and units that carry nothing leave the answers as they were, at sizes the
    export never saw."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=100, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    gpt2 = transformers.GPT2Model(config).eval()
    with torch.no_grad():
        for block in gpt2.h:  # half the hidden units silent: GELU(0) = 0 reaches c_proj
            block.mlp.c_fc.bias.normal_()
            block.mlp.c_fc.weight[:, ::2] = 0
            block.mlp.c_fc.bias[::2] = 0

    class Hidden(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gpt2 = gpt2

        def forward(self, input_ids: Any) -> Any:
            return self.gpt2(input_ids=input_ids, use_cache=False).last_hidden_state

    ids = torch.randint(0, 100, (2, 8))
    dims = {0: torch.export.Dim("batch", max=64), 1: torch.export.Dim("seq", max=32)}
    with torch.no_grad():
        program = torch.onnx.export(
            Hidden().eval(), (ids,), dynamo=True, dynamic_shapes=(dims,), opset_version=18
        )
    model = program.model_proto
    pruned, account = _pruned(model, "structured", 0.5)
    assert "2 of 8 weight layers pruned (256 -> 128 hidden channels)" in account, account
    widths = _dims(pruned)
    assert widths["gpt2.h.0.mlp.c_fc.weight"] == [32, 64], widths
    assert widths["gpt2.h.1.mlp.c_proj.weight"] == [64, 32], widths
    fresh = np.random.default_rng(1).integers(0, 100, (3, 11)).astype(np.int64)
    answers = []
    for graph in (model, pruned):
        session = ort.InferenceSession(
            graph.SerializeToString(), providers=["CPUExecutionProvider"]
        )
        answers.append(session.run(None, {"input_ids": fresh})[0])
    np.testing.assert_allclose(answers[1], answers[0], rtol=1e-4, atol=1e-5)


def test_a_tensor_a_subgraph_reads_is_never_cut() -> None:
    """An If branch reads the hidden activation from the outer scope: its width must stay."""
    then = helper.make_graph(
        [helper.make_node("Identity", ["a1"], ["t"])],
        "then",
        [],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)],
    )
    other = helper.make_graph(
        [helper.make_node("Neg", ["a1"], ["e"])],
        "else",
        [],
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)],
    )
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h1"], transB=1),
        helper.make_node("Relu", ["h1"], ["a1"]),
        helper.make_node("If", ["flag"], ["branch"], then_branch=then, else_branch=other),
        helper.make_node("Gemm", ["a1", "w2"], ["h2"], transB=1),
        helper.make_node("ReduceSum", ["branch"], ["s"], keepdims=0),
        helper.make_node("Add", ["h2", "s"], ["y"]),
    ]
    inits = [
        _init("w1", RNG.standard_normal((16, 8))), _init("b1", np.zeros(16)),
        _init("w2", RNG.standard_normal((4, 16))),
        numpy_helper.from_array(np.array(True), "flag"),
    ]  # fmt: skip
    model = _model(nodes, inits, ["N", 8], ["N", 4])
    with pytest.raises(ConversionFailed, match="1 because an If/Loop/Scan body reads it"):
        _pruned(model, "structured", 0.5)


def test_every_method_prunes_both_kinds_of_source() -> None:
    """One registry decides: each method has a builder for torch modules and for ONNX graphs."""
    for method in pruning.METHODS.values():
        assert method.build is not None and method.build_graph is not None, method.name
    assert pruning.NONE.build is None and pruning.NONE.build_graph is None


def test_a_torch_only_method_says_so_for_an_onnx_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch_only = pruning.Method("torch_only", "x", "y", False, build=lambda job: None)
    monkeypatch.setitem(pruning.METHODS, torch_only.name, torch_only)
    onnx.save(mlp(), str(tmp_path / "m.onnx"))
    spec = {"pruning": {"method": "torch_only", "amount": 0.5}, "benchmark": "off"}
    result = convert_here(tmp_path / "job", tmp_path / "m.onnx", "onnx", spec=spec)
    assert_failed(result, "INVALID_ARGUMENT", "prune", "works on PyTorch models only", "structured")
