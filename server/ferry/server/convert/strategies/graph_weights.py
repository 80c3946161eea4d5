"""An ONNX graph's weight layers, as graph pruning sees them (``graph_pruning``).

Which MatMul, Gemm and Conv nodes take their weight from an initializer (possibly behind the
exporter's Transpose or Identity), the lookups over the main graph that pruning needs, and the
counts the prune stage reports. numpy and onnx only, like the registry that uses it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

WEIGHT_OPS = ("MatMul", "Gemm", "Conv")
# Ops that act on each element alone: a channel removed before them is removed after them too.
UNARY = {
    "Relu", "LeakyRelu", "Gelu", "Sigmoid", "Tanh", "Erf", "Identity", "Elu", "Selu", "Softplus",
    "HardSigmoid", "HardSwish", "Neg", "Abs", "Sqrt", "Exp", "Celu", "Mish", "Dropout", "Clip",
    "Cast",
}  # fmt: skip
BINARY = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min"}
FLOATS = (np.float16, np.float32, np.float64)


@dataclass
class Graph:
    """Lookups over one ModelProto's main graph; initializers are edited through ``set``."""

    model: Any  # onnx.ModelProto, edited in place
    inits: dict[str, Any] = field(default_factory=dict)  # name -> TensorProto
    producer: dict[str, Any] = field(default_factory=dict)  # tensor -> NodeProto
    consumers: dict[str, list[Any]] = field(default_factory=dict)  # tensor -> [NodeProto]
    # Names that leave this graph's sight: its outputs, and what If/Loop/Scan bodies read from
    # the outer scope. Their shapes must not change, and a constant among them is shared.
    outputs: set[str] = field(default_factory=set)
    subgraph_reads: set[str] = field(default_factory=set)

    @classmethod
    def of(cls, model: Any) -> Graph:
        g = cls(model)
        graph = model.graph
        g.inits = {t.name: t for t in graph.initializer}
        g.outputs = {o.name for o in graph.output}
        for node in graph.node:
            for out in node.output:
                g.producer[out] = node
            for name in node.input:
                if name:
                    g.consumers.setdefault(name, []).append(node)
            for body in _bodies(node):
                g.subgraph_reads |= _read_in(body)
        return g

    def array(self, name: str) -> np.ndarray:
        from onnx import numpy_helper

        return np.asarray(numpy_helper.to_array(self.inits[name]))

    def set(self, name: str, value: np.ndarray) -> None:
        from onnx import numpy_helper

        self.inits[name].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(value), name))

    def uses(self, name: str) -> int:
        return (
            len(self.consumers.get(name, []))
            + (name in self.outputs)
            + (name in self.subgraph_reads)
        )

    def shape(self, name: str) -> tuple[int, ...] | None:
        """A constant's shape (initializer or Constant node), None for a runtime tensor."""
        if name in self.inits:
            return tuple(self.inits[name].dims)
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    return tuple(attr.t.dims)
                if attr.name in ("value_float", "value_int"):
                    return ()
        return None


def _bodies(node: Any) -> list[Any]:
    """The subgraphs a control-flow node carries."""
    from onnx import AttributeProto

    bodies = []
    for attr in node.attribute:
        if attr.type == AttributeProto.GRAPH:
            bodies.append(attr.g)
        elif attr.type == AttributeProto.GRAPHS:
            bodies.extend(attr.graphs)
    return bodies


def _read_in(graph: Any) -> set[str]:
    """Every name a (sub)graph's nodes read, nested bodies included: a superset of what it reads
    from outside, which is all a conservative caller needs."""
    names: set[str] = set()
    for node in graph.node:
        names.update(n for n in node.input if n)
        for body in _bodies(node):
            names |= _read_in(body)
    return names


@dataclass(frozen=True)
class Weight:
    """A weight layer's weight: ``init`` holds it as stored; ``out_axis`` and ``in_axis`` say
    which of its axes are the layer's output channels and input features."""

    node: Any
    init: str
    out_axis: int
    in_axis: int
    family: str  # "dense" (channel on the last axis) or "conv" (channel on axis 1)
    transpose: Any = None  # the Transpose/Identity node between init and the layer, if any


def int_attribute(node: Any, name: str, default: int) -> int:
    for attr in node.attribute:
        if attr.name == name:
            return int(attr.i)
    return default


def weight_of(g: Graph, node: Any) -> Weight | None:
    """The layer's initializer weight, or None when it is computed at run time."""
    if node.op_type not in WEIGHT_OPS or len(node.input) < 2:
        return None
    name, hop = node.input[1], None
    if name not in g.inits:
        hop = g.producer.get(name)
        if (
            hop is None
            or hop.op_type not in ("Transpose", "Identity")
            or hop.input[0] not in g.inits
        ):
            return None
        name = hop.input[0]
    if np.dtype(dtype_of(g.inits[name])) not in [np.dtype(f) for f in FLOATS]:
        return None
    dims = tuple(g.inits[name].dims)
    if node.op_type == "Conv":
        if len(dims) < 3 or hop is not None or int_attribute(node, "group", 1) != 1:
            return None
        return Weight(node, name, 0, 1, "conv")
    if len(dims) != 2:
        return None
    if node.op_type == "Gemm" and int_attribute(node, "transA", 0):
        return None
    out_axis, in_axis = 1, 0  # MatMul's B is [in, out]
    if node.op_type == "Gemm" and int_attribute(node, "transB", 0):
        out_axis, in_axis = 0, 1
    if hop is not None and hop.op_type == "Transpose":
        perm = [int(p) for a in hop.attribute if a.name == "perm" for p in a.ints] or [1, 0]
        if perm == [1, 0]:
            out_axis, in_axis = in_axis, out_axis
    return Weight(node, name, out_axis, in_axis, "dense", hop)


def dtype_of(tensor: Any) -> Any:
    from onnx import helper

    return helper.tensor_dtype_to_np_dtype(tensor.data_type)


def weight_layers(g: Graph) -> tuple[list[Weight], int]:
    """Every weight layer with an initializer weight, and how many weight ops have none."""
    found, runtime = [], 0
    for node in g.model.graph.node:
        if node.op_type in WEIGHT_OPS:
            w = weight_of(g, node)
            if w is None:
                runtime += 1
            else:
                found.append(w)
    return found, runtime


# ---- unstructured ----


def runtime_note(count: int) -> str:
    if not count:
        return ""
    return f"; {count} MatMul/Gemm/Conv of run-time tensors (attention, computed weights) untouched"


class NothingToPrune(Exception):
    """The graph has nothing this method can prune; the message completes "the ONNX graph"."""


def nothing_to_prune(why: str) -> NothingToPrune:
    return NothingToPrune(f"the ONNX graph {why}")


def initializer_counts(model: Any, names: Iterable[str] | None = None) -> tuple[int, int]:
    """(elements, non-zero elements) of the graph's initializers, or of those named."""
    from onnx import numpy_helper

    wanted = None if names is None else set(names)
    total = nonzero = 0
    for init in model.graph.initializer:
        if wanted is not None and init.name not in wanted:
            continue
        values = numpy_helper.to_array(init)
        total += values.size
        nonzero += int(np.count_nonzero(values))
    return total, nonzero


def weight_names(model: Any) -> list[str]:
    layers, _ = weight_layers(Graph.of(model))
    return list(dict.fromkeys(w.init for w in layers))
