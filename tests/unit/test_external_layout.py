"""The child's external-data helpers: what a published version folder holds, and that moving
or inspecting a model reads its graph, not its weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from ferry.server.convert import onnx_safety
from ferry.server.convert.worker import external, graph

W = np.arange(1024, dtype=np.float32).reshape(32, 32) / 1024.0  # 4 KiB: stored externally


def model(*, zeros: int = 0) -> onnx.ModelProto:
    w = W.copy()
    w.reshape(-1)[:zeros] = 0.0
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 32])],
        initializer=[numpy_helper.from_array(w, "w"), numpy_helper.from_array(w * 2, "w2")],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.training", 1)]
    return helper.make_model(g, opset_imports=opsets)


def run(path: Path) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": np.eye(32, dtype=np.float32)})[0]


@pytest.mark.parametrize("one_file", [True, False])
def test_publish_leaves_model_and_one_data_file_with_relative_locations(
    tmp_path: Path, one_file: bool
) -> None:
    scratch, work = tmp_path / "scratch", tmp_path / "work"
    scratch.mkdir()
    work.mkdir()
    source = scratch / "fp16.onnx"
    onnx.save_model(
        model(),
        str(source),
        save_as_external_data=True,
        all_tensors_to_one_file=one_file,
        location="fp16.onnx.data" if one_file else None,
        size_threshold=0,
    )
    external.publish(source, work, lambda m: graph.prepare_model(m, {"k": "v"}))
    assert sorted(p.name for p in work.iterdir()) == ["model.onnx", "model.onnx.data"]
    published = onnx.load(str(work / "model.onnx"), load_external_data=False)
    assert [o.domain for o in published.opset_import] == [""]  # the unused one dropped
    assert {p.key: p.value for p in published.metadata_props} == {"k": "v"}
    assert {r.location for r in onnx_safety.external_refs(published)} == {"model.onnx.data"}
    assert np.allclose(run(work / "model.onnx"), W)
    assert not source.exists()


def test_publish_moves_a_self_contained_variant_as_it_is(tmp_path: Path) -> None:
    source = tmp_path / "fp32.onnx"
    m = model()
    del m.opset_import[1:]
    onnx.save_model(m, str(source))
    data = source.read_bytes()
    (tmp_path / "work").mkdir()
    external.publish(source, tmp_path / "work", lambda m: graph.prepare_model(m, {}))
    assert (tmp_path / "work" / "model.onnx").read_bytes() == data
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["model.onnx"]


def test_size_sparsity_and_check_read_the_graph_not_the_weights(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save_model(
        model(zeros=16),
        str(path),
        save_as_external_data=True,
        location="m.onnx.data",
        size_threshold=0,
    )
    assert [p.name for p in external.files(path)] == ["m.onnx", "m.onnx.data"]
    assert external.size(path) == path.stat().st_size + (tmp_path / "m.onnx.data").stat().st_size
    assert external.weight_sparsity(path) == pytest.approx(32 / 2048)  # 16 zeros in each
    graph.check(path, external=True)
    loaded = onnx.load(str(path), load_external_data=False)
    assert graph.weight_bytes(loaded) == 2 * W.nbytes


def test_copy_gathers_several_data_files_into_one(tmp_path: Path) -> None:
    source = tmp_path / "src" / "model.onnx"
    source.parent.mkdir()
    onnx.save_model(
        model(), str(source), save_as_external_data=True, all_tensors_to_one_file=False,
        size_threshold=0,
    )  # fmt: skip
    target = tmp_path / "fp32.onnx"
    external.copy(source, target, external=True)
    assert [p.name for p in external.files(target)] == ["fp32.onnx", "fp32.onnx.data"]
    assert np.allclose(run(target), W)


def test_provenance_is_stripped_at_every_depth_but_the_model_keeps_its_own() -> None:
    """torch's exporter writes stack traces naming the exporter's files into node metadata: a
    published model must not carry them, in its main graph, a branch's subgraph or a function."""
    trace = onnx.StringStringEntryProto(key="pkg.torch.onnx.stack_trace", value="/home/me/x.py")
    then = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["t"])],
        "then",
        [],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, [1])],
    )
    then.node[0].metadata_props.append(trace)
    branch = helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=then)
    branch.metadata_props.append(trace)
    local = helper.make_function(
        "local", "f", ["a"], ["b"], [helper.make_node("Neg", ["a"], ["b"])], []
    )
    local.node[0].metadata_props.append(trace)
    model = helper.make_model(
        helper.make_graph(
            [branch],
            "g",
            [
                helper.make_tensor_value_info("c", TensorProto.BOOL, []),
                helper.make_tensor_value_info("x", TensorProto.FLOAT, [1]),
            ],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        ),
        functions=[local],
    )
    model.metadata_props.add(key="ferry.dynamic_axes", value="{}")
    assert graph.strip_provenance(model)
    assert b"/home/me/x.py" not in model.SerializeToString()
    assert [(p.key, p.value) for p in model.metadata_props] == [("ferry.dynamic_axes", "{}")]
    assert not graph.strip_provenance(model)  # nothing left to strip


def test_output_dims_that_varied_between_runs_are_published_symbolic() -> None:
    from ferry.server.convert.worker import dims

    seen = [[(1, 2, 6), (1, 6)], [(1, 30, 6), (1, 6)], [(8, 12, 6), (8, 6)]]
    varying = dims.varying_axes(seen)
    assert varying == {0: {0, 1}, 1: {0}}
    graph_ = helper.make_graph(
        [
            helper.make_node("Identity", ["x"], ["states"]),
            helper.make_node("Identity", ["h"], ["last"]),
        ],
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "T", 6]),
            helper.make_tensor_value_info("h", TensorProto.FLOAT, ["N", 6]),
        ],
        [
            helper.make_tensor_value_info("states", TensorProto.FLOAT, ["N", 12, 6]),
            helper.make_tensor_value_info("last", TensorProto.FLOAT, ["N", 6]),
        ],
    )
    assert graph.relax_outputs(graph_, varying)
    dims_of = [
        [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in graph_.output
    ]
    assert dims_of == [["N", "states_dim1", 6], ["N", 6]]  # a named dim keeps its name
    assert not graph.relax_outputs(graph_, varying)
