"""Conversion results a user can act on (issue 13): published files that upload again, reports
that compare with PyTorch, slower variants that never replace a faster version, speed figures
with their spread, recurrent layers quantized or said not to be, weights that find their
architecture.

Jobs that need no torch export run the child in this process (``convert_here``); those that
export are marked slow.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_convert_child import assert_failed, convert_here, onnx_mlp, succeeded

from ferry.client._conversion_types import parse_report
from ferry.server.convert import onnx_safety, uploads
from ferry.server.convert.worker import graph, parity
from ferry.server.errors import InvalidArgument
from ferry.server.grpc.conversion import report_message

# ---- item 6: a published file uploads again; domains are judged by the nodes using them ----


def _with_opsets(path: Path, *domains: str) -> Path:
    model = onnx.load(str(path))
    model.opset_import.extend(helper.make_opsetid(d, 1) for d in domains)
    onnx.save(model, str(path))
    return path


def test_unused_opset_domains_are_accepted_at_upload_and_in_the_child(tmp_path: Path) -> None:
    """onnxruntime's optimizer declares every domain it knows; none of them has a node here."""
    path = _with_opsets(
        onnx_mlp(tmp_path / "declared.onnx"), "ai.onnx.training", "com.microsoft.nchwc"
    )
    uploads.check_format("onnx", path)
    graph.check_source_model(onnx.load(str(path)))
    result = succeeded(convert_here(tmp_path / "job", path, "onnx"))
    published = onnx.load(str(result.model))
    declared = {o.domain for o in published.opset_import}
    assert declared == onnx_safety.used_domains(published) | {""}
    assert declared <= onnx_safety.SAFE_DOMAINS
    uploads.check_format("onnx", result.model)  # what Ferry published, Ferry takes back


def test_a_custom_domain_node_is_refused_at_upload(tmp_path: Path) -> None:
    path = onnx_mlp(tmp_path / "custom.onnx", custom_domain=True)
    with pytest.raises(InvalidArgument) as info:
        uploads.check_format("onnx", path)
    assert "com.example.ops::FancyRelu" in info.value.message
    assert "custom-op domain" in info.value.message


def test_a_local_function_may_define_its_domain(tmp_path: Path) -> None:
    body = [helper.make_node("Relu", ["a"], ["b"])]
    function = helper.make_function(
        "local.fn", "MyRelu", ["a"], ["b"], body, [helper.make_opsetid("", 17)]
    )
    node = helper.make_node("MyRelu", ["x"], ["y"], domain="local.fn")
    graph_proto = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
    )
    model = helper.make_model(
        graph_proto,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local.fn", 1)],
        functions=[function],
    )
    onnx_safety.check_domains(model)
    assert onnx_safety.unused_opset_imports(model) == []


def test_drop_unused_opsets_keeps_what_nodes_use(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), "w")
    nodes = [helper.make_node("FusedMatMul", ["x", "w"], ["y"], domain="com.microsoft")]
    model = helper.make_model(
        helper.make_graph(
            nodes,
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
            initializer=[weight],
        ),
        opset_imports=[
            helper.make_opsetid("", 17),
            helper.make_opsetid("com.microsoft", 1),
            helper.make_opsetid("ai.onnx.training", 1),
            helper.make_opsetid("org.pytorch.aten", 1),
        ],
    )
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    assert sorted(graph.drop_unused_opsets(path)) == ["ai.onnx.training", "org.pytorch.aten"]
    assert [o.domain for o in onnx.load(str(path)).opset_import] == ["", "com.microsoft"]
    assert graph.drop_unused_opsets(path) == []


def test_a_custom_domain_is_still_refused_by_the_child(tmp_path: Path) -> None:
    source = onnx_mlp(tmp_path / "custom.onnx", custom_domain=True)
    result = convert_here(tmp_path / "job", source, "onnx")
    assert_failed(result, "INVALID_ARGUMENT", "load", "com.example.ops::FancyRelu")


# ---- item 3: parity against PyTorch's outputs, in typed fields ----


def test_an_onnx_upload_with_reference_outputs_reports_parity_against_pytorch(
    tmp_path: Path,
) -> None:
    """What an SDK module upload sends: the ONNX export, samples and the module's outputs."""
    import onnxruntime as ort

    source = onnx_mlp(tmp_path / "m.onnx")
    x = np.random.default_rng(3).standard_normal((10, 8)).astype(np.float32)
    (y,) = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.savez(tmp_path / "samples.npz", x=x)
    np.savez(tmp_path / "ref.npz", y=y + 1e-6)  # PyTorch's figures differ from ORT's by noise
    spec = {
        "quantization": {"mode": "dynamic_int8"},
        "validation": {
            "sample_file": str(tmp_path / "samples.npz"),
            "reference_file": str(tmp_path / "ref.npz"),
        },
    }
    result = succeeded(convert_here(tmp_path / "job", source, "onnx", spec=spec))
    text = (result.work / "report.json").read_text()
    report = parse_report(report_message(text), text)
    assert report is not None and report.parity is not None and report.reference is not None
    assert report.parity.against == "pytorch (reference_outputs)"
    assert report.parity.samples == 10
    assert 0 < report.parity.max_abs < 1e-4
    for name in ("fp32", "dynamic_int8"):
        variant = report.variant(name)
        assert variant is not None and variant.vs_pytorch is not None, name
        assert variant.vs_reference == variant.vs_pytorch
    int8 = report.variant("dynamic_int8")
    assert int8 is not None and int8.vs_pytorch is not None
    assert 0.99 < int8.vs_pytorch.cosine < 1.0
    assert int8.vs_pytorch.top1_agreement is not None  # y is [N, 4] floats: class scores


def test_an_onnx_upload_without_reference_has_no_pytorch_figures(tmp_path: Path) -> None:
    result = succeeded(convert_here(tmp_path / "job", onnx_mlp(tmp_path / "m.onnx"), "onnx"))
    assert result.report["parity"]["against"] == "onnx_source"
    assert result.variant("fp32")["vs_pytorch"] is None


@pytest.mark.parametrize(
    ("output", "has_top1"),
    [
        (np.zeros((4, 3), np.float32), True),  # [N, C] class scores
        (np.zeros((4, 1), np.float32), False),  # one regression value
        (np.zeros((4, 3), np.int64), False),  # ids, not scores
        (np.zeros((4, 5, 3), np.float32), False),  # a sequence of hidden states
        (np.zeros((4,), np.float32), False),
    ],
)
def test_top1_agreement_only_for_class_scores(output: np.ndarray, has_top1: bool) -> None:
    figures = parity.compare([output], [output])
    assert (figures.top1_agreement is not None) is has_top1
    assert parity.is_class_scores(output) is has_top1
