"""Small ONNX models built with ``onnx.helper`` (no torch needed): the default repository's
examples and the test suite's fixtures.

``python -m ferry.server.examples --repository DIR`` writes the examples that ``make serve``
serves out of the box. Existing versions are left alone: versions are immutable.
"""

from __future__ import annotations

import argparse
import itertools
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ferry.server.core.repository import MODEL_FILE, ModelRepository

OPSET = 17
IR_VERSION = 8

ONNX_TYPES = {
    "BOOL": TensorProto.BOOL,
    "UINT8": TensorProto.UINT8,
    "UINT16": TensorProto.UINT16,
    "UINT32": TensorProto.UINT32,
    "UINT64": TensorProto.UINT64,
    "INT8": TensorProto.INT8,
    "INT16": TensorProto.INT16,
    "INT32": TensorProto.INT32,
    "INT64": TensorProto.INT64,
    "FP16": TensorProto.FLOAT16,
    "BF16": TensorProto.BFLOAT16,
    "FP32": TensorProto.FLOAT,
    "FP64": TensorProto.DOUBLE,
    "BYTES": TensorProto.STRING,
}


def _model(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def mlp_model(sizes: tuple[int, ...] = (64, 256, 256, 10), seed: int = 0) -> onnx.ModelProto:
    """Linear/ReLU stack with a dynamic batch dim: input ``input`` [B, sizes[0]] -> ``logits``."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    prev = "input"
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        w = (rng.standard_normal((fan_in, fan_out)) / np.sqrt(fan_in)).astype(np.float32)
        b = (rng.standard_normal(fan_out) * 0.1).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        last = i == len(sizes) - 2
        mm, out = f"mm{i}", ("logits" if last else f"h{i}")
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [mm]))
        nodes.append(helper.make_node("Add", [mm, f"b{i}"], [out if last else f"a{i}"]))
        if not last:
            nodes.append(helper.make_node("Relu", [f"a{i}"], [out]))
        prev = out
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", sizes[0]])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", sizes[-1]])],
        inits,
    )
    return _model(graph)


def two_io_model() -> onnx.ModelProto:
    """Two inputs, two outputs, one of them INT64: ``sum = a + float(b)``, ``scaled = b * 3``."""
    three = numpy_helper.from_array(np.array(3, dtype=np.int64), "three")
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["b"], ["b_float"], to=TensorProto.FLOAT),
            helper.make_node("Add", ["a", "b_float"], ["sum"]),
            helper.make_node("Mul", ["b", "three"], ["scaled"]),
        ],
        "two_io",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["batch", 4]),
            helper.make_tensor_value_info("b", TensorProto.INT64, ["batch", 4]),
        ],
        [
            helper.make_tensor_value_info("sum", TensorProto.FLOAT, ["batch", 4]),
            helper.make_tensor_value_info("scaled", TensorProto.INT64, ["batch", 4]),
        ],
        [three],
    )
    return _model(graph)


def identity_model(datatype: str, dims: tuple[int | str, ...] = ("batch", "n")) -> onnx.ModelProto:
    """``output = input`` for one datatype (see ONNX_TYPES); dims may be symbolic."""
    t = ONNX_TYPES[datatype]
    graph = helper.make_graph(
        [helper.make_node("Identity", ["input"], ["output"])],
        f"identity_{datatype.lower()}",
        [helper.make_tensor_value_info("input", t, list(dims))],
        [helper.make_tensor_value_info("output", t, list(dims))],
    )
    return _model(graph)


def large_model(mib: int) -> onnx.ModelProto:
    """``y = x + w`` over one flat FP32 initializer of ``mib`` MiB (values 0, 1, 2...): a
    valid model whose size is nearly all weight, for upload and memory tests."""
    n = mib * (1 << 20) // 4
    weight = numpy_helper.from_array(np.arange(n, dtype=np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        "large",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n])],
        [weight],
    )
    return _model(graph)


def seed_model(seed: int = 0) -> onnx.ModelProto:
    """The shape of the seed article's ``Sequential(Linear(3, 4), ReLU(), Linear(4, 1))``."""
    return mlp_model((3, 4, 1), seed=seed)


def write_model(
    repo: ModelRepository,
    name: str,
    model: onnx.ModelProto,
    *,
    version: int = 1,
    config: dict[str, object] | None = None,
) -> Path:
    """Publish ``model`` as ``name/version`` atomically, with an optional config.json."""
    mdir = repo.model_dir(name)
    mdir.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (mdir / "config.json").write_text(json.dumps(config, indent=2))
    with repo.staging(name) as tmp:
        onnx.save(model, str(tmp / MODEL_FILE))
        repo.publish(name, tmp, version=version)
    return repo.model_file(name, version)


DEFAULT_EXAMPLES: dict[str, Callable[[], onnx.ModelProto]] = {
    "seed": seed_model,
    "mlp": mlp_model,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write Ferry's example models into a repository.")
    parser.add_argument("--repository", type=Path, default=Path("model-repository"))
    args = parser.parse_args(argv)
    repo = ModelRepository(args.repository)
    for name, build in DEFAULT_EXAMPLES.items():
        if repo.has_model(name) and repo.list_versions(name):
            print(f"{name}: already present ({repo.root / name})")
            continue
        path = write_model(repo, name, build())
        print(f"{name}: wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
