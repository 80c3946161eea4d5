"""Declared dynamic axes: the CLI's syntax, the server's refusals, the door's bounds (issue 13
item 8). The end-to-end path (export, verification at both bounds, serving) is in
tests/integration/test_dynamic_axes.py."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from ferry.cli.conversion import _input_spec
from ferry.client import DynamicAxis, InputSpec
from ferry.server.convert import validation
from ferry.server.convert.spec import ConversionSpec, spec_from_dict, to_json
from ferry.server.convert.spec import DynamicAxis as ServerAxis
from ferry.server.convert.spec import InputSpec as ServerSpec
from ferry.server.core.config import OnnxRuntimeConfig
from ferry.server.errors import InvalidArgument
from ferry.server.runtime.session import OrtSession


def test_the_cli_reads_a_dynamic_axis_with_and_without_bounds() -> None:
    spec = _input_spec("input_ids:int64:-1,128@sequence=1..512")
    assert spec == InputSpec("input_ids", "INT64", [-1, 128], {1: DynamicAxis("sequence", 1, 512)})
    assert _input_spec("x:FP32:-1,3,32@side,32@side").dynamic_axes == {
        2: DynamicAxis("side"),
        3: DynamicAxis("side"),
    }
    assert _input_spec("x:FP32:-1,8@n=4..").dynamic_axes == {1: DynamicAxis("n", 4, None)}
    for bad in ("x:FP32:-1,8@", "x:FP32:-1,8@n=4", "x:FP32:-1,8@=1..2", "x:FP32:-1,a@n"):
        with pytest.raises(argparse.ArgumentTypeError, match=r"SIZE@AXIS=MIN\.\.MAX"):
            _input_spec(bad)


def _check(*inputs: ServerSpec) -> None:
    validation.validate_spec(
        ConversionSpec(inputs=list(inputs)), validation.SpecTensors(), source_format="onnx"
    )


@pytest.mark.parametrize(
    ("axes", "shape", "match"),
    [
        ([ServerAxis(0, "b")], [-1, 8], "dim 0 is the batch dim"),
        ([ServerAxis(2, "s")], [-1, 8], r"the shape \[-1, 8\] has no dim 2"),
        ([ServerAxis(1, "s"), ServerAxis(1, "t")], [-1, 8], "is given twice"),
        ([ServerAxis(1, "not a name")], [-1, 8], "must be an identifier"),
        ([ServerAxis(1, "s", 4, 2)], [-1, 8], "1 <= min <= max"),
        ([ServerAxis(1, "s", 1, 4)], [-1, 8], "size 8, outside its bounds 1..4"),
    ],
)
def test_the_server_refuses_a_malformed_declaration(
    axes: list[ServerAxis], shape: list[int], match: str
) -> None:
    with pytest.raises(InvalidArgument, match=match):
        _check(ServerSpec("x", "FP32", shape, axes))


def test_a_shape_too_large_to_build_samples_of_is_refused_at_convert() -> None:
    """The child builds samples of the declared shape: [-1, 2**62] crashed it (INTERNAL)."""
    with pytest.raises(InvalidArgument, match="elements per sample, over the"):
        _check(ServerSpec("x", "FP32", [-1, 2**62]))
    _check(ServerSpec("x", "FP32", [-1, 3, 224, 224]))


def test_axes_sharing_a_name_must_agree() -> None:
    a = ServerSpec("ids", "INT64", [-1, 8], [ServerAxis(1, "sequence", 1, 16)])
    b = ServerSpec("mask", "INT64", [-1, 8], [ServerAxis(1, "sequence", 1, 32)])
    with pytest.raises(InvalidArgument, match="axes sharing a name must agree"):
        _check(a, b)
    _check(a, ServerSpec("mask", "INT64", [-1, 8], [ServerAxis(1, "sequence", 1, 16)]))


def test_declared_axes_survive_the_job_file() -> None:
    spec = ConversionSpec(inputs=[ServerSpec("x", "FP32", [-1, 8], [ServerAxis(1, "s", 2, 9)])])
    again = spec_from_dict(json.loads(to_json(spec)))
    assert again.inputs == spec.inputs


def _graph(path: Path, metadata: str | None) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq"])
    model = helper.make_model(
        helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    if metadata is not None:
        helper.set_model_props(model, {"ferry.dynamic_axes": metadata})
    onnx.save(model, str(path))


def test_a_session_reads_the_bounds_its_file_carries(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    _graph(path, '{"x": {"1": ["seq", 2, 16]}}')
    session = OrtSession(path, OnnxRuntimeConfig())
    (spec,) = session.inputs
    assert [(b.axis, b.name, b.min, b.max) for b in spec.bounds] == [(1, "seq", 2, 16)]
    (out,) = session.run({"x": np.ones((1, 4), np.float32)})
    assert out.shape == (1, 4)


@pytest.mark.parametrize(
    "metadata",
    [
        "not json",
        '{"x": {"0": ["seq", 2, 16]}}',
        '{"nope": {"1": ["s", 1, 2]}}',
        # These made the version FAILED (OverflowError, RecursionError) or refuse every request.
        '{"x": {"1": ["s", 1, Infinity]}}',
        "[" * 100_000,
        '{"x": {"1": ["s", 10, 1]}}',
        '{"x": {"1": ["s", -10, -1]}}',
    ],
)
def test_metadata_that_does_not_fit_the_graph_is_ignored(tmp_path: Path, metadata: str) -> None:
    path = tmp_path / "m.onnx"
    _graph(path, metadata)
    session = OrtSession(path, OnnxRuntimeConfig())
    assert session.inputs[0].bounds == ()


def test_sample_sets_that_disagree_name_each_tensor() -> None:
    """A model returning a [3] buffer beside its [4, 10] logits was refused with "[3, 4]" and no
    name: which output lacks the batch dim is the thing to fix."""
    tensors = validation.SpecTensors(
        samples={"x": np.zeros((4, 8), np.float32)},
        references={"logits": np.zeros((4, 10), np.float32), "prior": np.zeros(3, np.float32)},
    )
    with pytest.raises(InvalidArgument, match=r"\(3 in 'prior'; 4 in 'logits'\)"):
        validation.validate_spec(ConversionSpec(), tensors, source_format="onnx")


def test_calibration_and_validation_samples_may_have_any_size_a_dynamic_axis_allows(
    tmp_path: Path,
) -> None:
    """static_int8 of a model declared for sequences of 8..64 refused calibration data of
    length 20 ("the model takes [12] per sample"): only the example's length was accepted, so
    a model meant for many lengths was calibrated on one. Sizes within the bounds now pass."""
    from ferry.server.convert.worker.parity import samples_from_file

    seq = ServerAxis(1, "sequence", 8, 64)
    specs = [
        ServerSpec("ids", "INT64", [-1, 12], [seq]),
        ServerSpec("mask", "BOOL", [-1, 12], [seq]),
        ServerSpec("x", "FP32", [-1, 3]),
    ]
    field = "quantization.calibration_file"

    def load(ids: int, mask: int, x: int = 3) -> object:
        path = tmp_path / "cal.npz"
        np.savez(path, ids=np.ones((4, ids), np.int64), mask=np.ones((4, mask), bool),
                 x=np.ones((4, x), np.float32))  # fmt: skip
        return samples_from_file(path, specs, True, field)

    assert load(20, 20).arrays["ids"].shape == (4, 20)  # type: ignore[attr-defined]
    assert load(64, 64).arrays["mask"].shape == (4, 64)  # type: ignore[attr-defined]
    with pytest.raises(
        InvalidArgument, match=r"shape \[65\], the model takes \[sequence=8\.\.64\]"
    ):
        load(65, 65)
    with pytest.raises(InvalidArgument, match=r"'sequence' is 20 in 'ids' but 21 in 'mask'"):
        load(20, 21)
    with pytest.raises(InvalidArgument, match=r"'x' has samples of shape \[4\], .* takes \[3\]"):
        load(20, 20, 4)
