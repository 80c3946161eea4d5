"""Pruning an ONNX graph's weights directly, so that any upload can be pruned without its class.

A module uploaded through the SDK arrives as ONNX (exported on the user's side), and the server
must never unpickle code to rebuild it, so the prune stage works on the graph itself: on weight
*initializers* of MatMul, Gemm and Conv nodes, which are plain tensors in protobuf.

- Unstructured: zero the smallest-magnitude entries of each weight (or of all weights at once).
- Structured: remove hidden units between two weight layers, only where the dependency is provably
  local: the producer's output reaches, through per-channel or elementwise ops only, nothing but
  weight layers that consume that channel dim. Anything else (a graph output, a Reshape, a
  residual Add, a Concat, an attention MatMul) leaves the producer whole, and the summary line says
  why. Channels are ranked by the L2 norm of the producer's weights.

It lives beside the registry, not in the child's ``worker`` package, because the registry's
builders may import only what the serving process could (numpy, onnx); it runs in the child only.
"""

from __future__ import annotations

from collections import Counter
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


def _attr(node: Any, name: str, default: int) -> int:
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
    if np.dtype(_dtype(g.inits[name])) not in [np.dtype(f) for f in FLOATS]:
        return None
    dims = tuple(g.inits[name].dims)
    if node.op_type == "Conv":
        if len(dims) < 3 or hop is not None or _attr(node, "group", 1) != 1:
            return None
        return Weight(node, name, 0, 1, "conv")
    if len(dims) != 2:
        return None
    if node.op_type == "Gemm" and _attr(node, "transA", 0):
        return None
    out_axis, in_axis = 1, 0  # MatMul's B is [in, out]
    if node.op_type == "Gemm" and _attr(node, "transB", 0):
        out_axis, in_axis = 0, 1
    if hop is not None and hop.op_type == "Transpose":
        perm = [int(p) for a in hop.attribute if a.name == "perm" for p in a.ints] or [1, 0]
        if perm == [1, 0]:
            out_axis, in_axis = in_axis, out_axis
    return Weight(node, name, out_axis, in_axis, "dense", hop)


def _dtype(tensor: Any) -> Any:
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


def _zero_smallest(values: np.ndarray, count: int) -> np.ndarray:
    flat = values.reshape(-1).copy()
    if count > 0:
        flat[np.argpartition(np.abs(flat), count - 1)[:count]] = 0
    return flat.reshape(values.shape)


def unstructured(model: Any, amount: float, *, scope: str) -> str:
    """Zero ``amount`` of the weights, per layer (``scope="layer"``) or across all layers."""
    g = Graph.of(model)
    layers, runtime = weight_layers(g)
    names = list(dict.fromkeys(w.init for w in layers))  # a shared weight is pruned once
    if not names:
        raise _nothing_to_prune("has no MatMul, Gemm or Conv node whose weight is an initializer")
    arrays = {name: g.array(name) for name in names}
    if scope == "layer":
        for name, values in arrays.items():
            g.set(name, _zero_smallest(values, round(amount * values.size)))
    else:
        magnitudes = np.concatenate(
            [np.abs(a).reshape(-1).astype(np.float64) for a in arrays.values()]
        )
        count = round(amount * magnitudes.size)
        if count > 0:
            threshold = np.partition(magnitudes, count - 1)[count - 1]
            budget = count  # ties at the threshold: zero only as many as asked
            for name, values in arrays.items():
                below = np.abs(values) < threshold
                at = np.flatnonzero(np.abs(values).reshape(-1) == threshold)
                flat = np.where(below, 0, values).reshape(-1)
                budget -= int(below.sum())
                take = at[: max(0, min(budget, at.size))]
                flat[take] = 0
                budget -= take.size
                g.set(name, flat.reshape(values.shape))
    return f"zeroed weights of {len(layers)} weight layers on the ONNX graph{_runtime(runtime)}"


# ---- structured ----


# Where a tensor's channels sit: (axis counted from the last, 1 for dense, spatial rank + 1 for
# conv; whether every spatial dim is 1, after a global pooling).
Layout = tuple[int, bool]
DENSE: Layout = (1, False)
POOLS = ("GlobalAveragePool", "GlobalMaxPool")
REDUCES = ("ReduceMean", "ReduceMax", "ReduceSum", "ReduceMin")
WINDOWS = ("MaxPool", "AveragePool", "LpPool")


@dataclass
class Group:
    """A producer, what its channels flow through, and the layers that consume them."""

    producer: Weight
    channels: int
    layout: dict[str, Layout] = field(default_factory=dict)  # tensors carrying the channels
    # Constants sliced with the channels, as (node, input index, channel axis); a constant other
    # nodes share is copied for this node first, since an exporter deduplicates equal tensors.
    per_channel: list[tuple[Any, int, int]] = field(default_factory=list)
    shapes: list[tuple[Any, int]] = field(default_factory=list)  # Reshapes naming the channels
    consumers: list[Weight] = field(default_factory=list)


class Blocked(Exception):
    """Why a producer's channels cannot be removed locally (one short phrase)."""


def _channel_axis(shape: tuple[int, ...], from_end: int) -> int | None:
    """The axis of a broadcast constant that lines up with the channel dim; None for a scalar."""
    if int(np.prod(shape, dtype=np.int64)) == 1:
        return None
    if len(shape) < from_end:
        raise Blocked("a per-channel constant of a shape that does not line up with the channels")
    axis = len(shape) - from_end
    if any(d != 1 for i, d in enumerate(shape) if i != axis):
        raise Blocked("a constant that varies along other axes than the channels")
    return axis


def _layout_of(g: Graph, w: Weight) -> Layout:
    """The layout a weight layer's output has, and the one its data input must have."""
    return DENSE if w.family == "dense" else (len(g.inits[w.init].dims) - 1, False)


def _consumer(g: Graph, node: Any, tensor: str, layout: Layout) -> Weight | None:
    w = weight_of(g, node)
    if w is None or node.input[0] != tensor or tensor in node.input[1:]:
        return None
    return w if _layout_of(g, w)[0] == layout[0] else None


def trace(g: Graph, producer: Weight) -> Group:
    """Follow the producer's output to the layers that consume its channels, or raise Blocked."""
    node = producer.node
    shape = tuple(g.inits[producer.init].dims)
    group = Group(producer, shape[producer.out_axis])
    if g.uses(producer.init) != 1 or (
        producer.transpose is not None and g.uses(producer.transpose.output[0]) != 1
    ):
        raise Blocked("its weight is shared")
    if node.op_type in ("Gemm", "Conv") and len(node.input) > 2 and node.input[2]:
        bias = node.input[2]
        bias_shape = g.shape(bias)
        if bias not in g.inits or bias_shape is None:
            raise Blocked("its bias is computed at run time")
        axis = _channel_axis(bias_shape, 1)
        if axis is not None:
            group.per_channel.append((node, 2, axis))
    # First everything the channels reach (a GELU's Mul meets x twice, by two paths), then each
    # op's other operands, which must be constants once every channel-carrying tensor is known.
    pending = [node.output[0]]
    group.layout[node.output[0]] = _layout_of(g, producer)
    passed: dict[int, Any] = {}
    while pending:
        tensor = pending.pop()
        layout = group.layout[tensor]
        if tensor in g.outputs:
            raise Blocked("it reaches a graph output")
        if tensor in g.subgraph_reads:
            raise Blocked("an If/Loop/Scan body reads it")
        for user in g.consumers.get(tensor, []):
            consumer = _consumer(g, user, tensor, layout)
            if consumer is not None:
                if consumer.node is node or any(c.node is user for c in group.consumers):
                    continue
                if g.uses(consumer.init) != 1 or (
                    consumer.transpose is not None and g.uses(consumer.transpose.output[0]) != 1
                ):
                    raise Blocked("the next layer's weight is shared")
                group.consumers.append(consumer)
                continue
            if user.domain not in ("", "ai.onnx"):
                raise Blocked(f"it feeds {user.domain}::{user.op_type}")
            if user.op_type in UNARY | BINARY | {"BatchNormalization"}:
                passed[id(user)] = user
                after = layout
            else:
                after = _reshaped(g, user, layout, group)
            out = user.output[0]
            if out in group.layout:  # reached before, by another path
                if group.layout[out] != after:
                    raise Blocked(f"its channels meet in {user.op_type} in two layouts")
                continue
            group.layout[out] = after
            pending.append(out)
    for user in passed.values():
        _check_operands(g, user, group)
    if not group.consumers:
        raise Blocked("no weight layer consumes its channels")
    return group


def _ints(g: Graph, node: Any, name: str, index: int) -> list[int] | None:
    """An int list given as attribute ``name`` (old opsets) or as constant input ``index``."""
    for attr in node.attribute:
        if attr.name == name:
            return [int(i) for i in attr.ints]
    if len(node.input) > index and node.input[index]:
        if node.input[index] not in g.inits:
            return None
        return [int(i) for i in g.array(node.input[index]).reshape(-1)]
    return []


def _reshaped(g: Graph, node: Any, layout: Layout, group: Group) -> Layout:
    """A classifier head's pooling and flattening: the channels survive a global pooling, and a
    flatten of a pooled [N, C, 1, ...] is [N, C]. Anything else that moves axes is Blocked."""
    op, (from_end, pooled) = node.op_type, layout
    rank = from_end + 1  # [N, C, spatial...]
    spatial = set(range(2, rank))
    if from_end < 2:  # dense tensors: never reshaped here
        raise Blocked(f"it feeds {op}")
    if op in POOLS:
        return (from_end, True)
    if op in WINDOWS and (len(node.output) == 1 or not node.output[1]):
        return layout  # pools each channel's own window: spatial dims shrink, channels stay
    if len(node.output) != 1:
        raise Blocked(f"it feeds {op}")
    if op in REDUCES:
        axes = _ints(g, node, "axes", 1)
        keepdims = _attr(node, "keepdims", 1)
        if axes is None or {a % rank for a in axes} != spatial:
            raise Blocked(f"it feeds a {op} over other axes than the spatial ones")
        return (from_end, True) if keepdims else DENSE
    if op == "Flatten" and pooled and _attr(node, "axis", 1) == 1:
        return DENSE
    if op == "Squeeze" and pooled:
        axes = _ints(g, node, "axes", 1)
        if axes is not None and {a % rank for a in axes} == spatial:
            return DENSE
    if op == "Reshape" and pooled and node.input[1] in g.inits:
        target = [int(v) for v in g.array(node.input[1]).reshape(-1)]
        zero_ok = not _attr(node, "allowzero", 0)
        if (
            len(target) == 2
            and target[0] in ((-1, 0) if zero_ok else (-1,))
            and target[1] in (-1, group.channels)
            and target != [-1, -1]
        ):
            if target[1] == group.channels:
                group.shapes.append((node, 1))
            return DENSE
    raise Blocked(f"it feeds {op}")


def _check_operands(g: Graph, node: Any, group: Group) -> None:
    """Blocked unless ``node`` keeps each channel on its own: its operands that do not carry
    the channels are scalars or per-channel constants (recorded, to be sliced with them)."""
    op = node.op_type
    from_end, _ = group.layout[node.output[0]]
    if op == "BatchNormalization":
        if from_end < 2 or len(node.output) > 1:
            raise Blocked("it feeds a BatchNormalization of another layout")
        for index, param in enumerate(node.input[1:5], start=1):
            shape = g.shape(param)
            if param not in g.inits or shape is None or len(shape) != 1:
                raise Blocked("it feeds a BatchNormalization with parameters computed at run time")
            group.per_channel.append((node, index, 0))
        return
    if op in UNARY:
        if op == "Dropout" and len(node.output) > 1 and node.output[1]:
            raise Blocked("it feeds a Dropout whose mask is used")
        for extra in node.input[1:]:  # Clip's min/max, Dropout's ratio: scalars
            shape = g.shape(extra) if extra else ()
            if shape is None or int(np.prod(shape, dtype=np.int64)) != 1:
                raise Blocked(f"it feeds a {op} with a non-constant operand")
        return
    for index, operand in enumerate(node.input):  # BINARY
        if operand in group.layout:
            if group.layout[operand] != group.layout[node.output[0]]:
                raise Blocked(f"its channels meet in {op} in two layouts")
            continue
        shape = g.shape(operand)
        if shape is None:
            raise Blocked(f"it meets another branch in {op} (a residual or gate)")
        axis = _channel_axis(shape, from_end)
        if axis is not None:
            if operand not in g.inits:
                raise Blocked(f"it meets a per-channel Constant node in {op}")
            group.per_channel.append((node, index, axis))


def _take(g: Graph, name: str, keep: np.ndarray, axis: int) -> None:
    g.set(name, np.take(g.array(name), keep, axis=axis))


def _own(g: Graph, node: Any, index: int) -> str:
    """The initializer ``node`` reads at ``index``, copied for it alone when others read it too."""
    name = node.input[index]
    if g.uses(name) == 1:
        return name
    copy, number = name, 0
    while copy in g.inits or copy in g.producer or copy in g.consumers:
        number += 1
        copy = f"{name}.{number}"
    tensor = g.model.graph.initializer.add()
    tensor.CopyFrom(g.inits[name])
    tensor.name = copy
    g.inits[copy] = tensor
    node.input[index] = copy
    g.consumers[name].remove(node)
    g.consumers[copy] = [node]
    return copy


def _apply(g: Graph, group: Group, keep: np.ndarray) -> None:
    producer = group.producer
    _take(g, producer.init, keep, producer.out_axis)
    for node, index, axis in group.per_channel:
        _take(g, _own(g, node, index), keep, axis)
    for consumer in group.consumers:
        _take(g, consumer.init, keep, consumer.in_axis)
    for node, index in group.shapes:
        name = _own(g, node, index)
        g.set(name, np.array([g.array(name)[0], keep.size], np.int64))


def _keep(g: Graph, producer: Weight, amount: float, channels: int) -> np.ndarray:
    values = g.array(producer.init).astype(np.float64)
    rows = np.moveaxis(values, producer.out_axis, 0).reshape(channels, -1)
    norms = np.linalg.norm(rows, axis=1)
    kept = max(1, channels - round(amount * channels))
    return np.sort(np.argsort(-norms, kind="stable")[:kept])


def structured(model: Any, amount: float) -> str:
    """Remove ``amount`` of the hidden units of every producer whose channels are local."""
    g = Graph.of(model)
    layers, runtime = weight_layers(g)
    if not layers:
        raise _nothing_to_prune("has no MatMul, Gemm or Conv node whose weight is an initializer")
    reasons: Counter[str] = Counter()
    pruned: list[tuple[int, int]] = []
    for layer in layers:
        try:
            group = trace(g, layer)
        except Blocked as blocked:
            reasons[str(blocked)] += 1
            continue
        keep = _keep(g, layer, amount, group.channels)
        if keep.size == group.channels:
            reasons["the amount removes no channel of it"] += 1
            continue
        _apply(g, group, keep)
        pruned.append((group.channels, int(keep.size)))
    total = len(layers)
    why = "; ".join(f"{n} because {reason}" for reason, n in reasons.most_common())
    if not pruned:
        raise _nothing_to_prune(
            f"has no hidden layer whose channels only feed another weight layer ({total} weight "
            f"layers: {why})"
        )
    del model.graph.value_info[:]  # intermediate shapes changed: let shape inference redo them
    before = sum(c for c, _ in pruned)
    after = sum(k for _, k in pruned)
    left = f"; {total - len(pruned)} left whole: {why}" if reasons else ""
    return (
        f"structured pruning on the ONNX graph: {len(pruned)} of {total} weight layers pruned "
        f"({before} -> {after} hidden channels){left}{_runtime(runtime)}"
    )


def _runtime(count: int) -> str:
    if not count:
        return ""
    return f"; {count} MatMul/Gemm/Conv of run-time tensors (attention, computed weights) untouched"


class NothingToPrune(Exception):
    """The graph has nothing this method can prune; the message completes "the ONNX graph"."""


def _nothing_to_prune(why: str) -> NothingToPrune:
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
