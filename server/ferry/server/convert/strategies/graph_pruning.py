"""Pruning an ONNX graph's weights directly, so that any upload can be pruned without its class.

A module uploaded through the SDK arrives as ONNX (exported on the user's side), and the server
must never unpickle code to rebuild it, so the prune stage works on the graph itself: on weight
*initializers* of MatMul, Gemm and Conv nodes, which are plain tensors in protobuf.

- Unstructured: zero the smallest-magnitude entries of each weight (or of all weights at once).
- Structured: remove hidden units between two weight layers, only where the dependency is provably
  local: the producer's output reaches, through per-channel or elementwise ops only, nothing but
  weight layers that consume that channel dim. Anything else (a graph output, a Reshape that
  moves the channels off the last axis, a residual Add, a Concat, an attention MatMul) leaves
  the producer whole, and the summary line says why. Channels are ranked by the L2 norm of the
  producer's weights.

It lives beside the registry, not in the child's ``worker`` package, because the registry's
builders may import only what the serving process could (numpy, onnx); it runs in the child only.
What a weight layer is, and the graph lookups, live in ``graph_weights``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ferry.server.convert.strategies.graph_weights import (
    BINARY,
    UNARY,
    Graph,
    NothingToPrune,
    Weight,
    int_attribute,
    nothing_to_prune,
    runtime_note,
    weight_layers,
    weight_of,
)

__all__ = ["NothingToPrune", "structured", "unstructured"]


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
        raise nothing_to_prune("has no MatMul, Gemm or Conv node whose weight is an initializer")
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
    return f"zeroed weights of {len(layers)} weight layers on the ONNX graph{runtime_note(runtime)}"


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
    # Reshapes whose shape a Concat computes, its last item (a constant) the channel count.
    computed_shapes: list[Any] = field(default_factory=list)
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
    if op == "Reshape" and layout == DENSE:
        return _rows_reshaped(g, node, group)
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
        keepdims = int_attribute(node, "keepdims", 1)
        if axes is None or {a % rank for a in axes} != spatial:
            raise Blocked(f"it feeds a {op} over other axes than the spatial ones")
        return (from_end, True) if keepdims else DENSE
    if op == "Flatten" and pooled and int_attribute(node, "axis", 1) == 1:
        return DENSE
    if op == "Squeeze" and pooled:
        axes = _ints(g, node, "axes", 1)
        if axes is not None and {a % rank for a in axes} == spatial:
            return DENSE
    if op == "Reshape" and pooled and node.input[1] in g.inits:
        target = [int(v) for v in g.array(node.input[1]).reshape(-1)]
        zero_ok = not int_attribute(node, "allowzero", 0)
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


def _rows_reshaped(g: Graph, node: Any, group: Group) -> Layout:
    """A Reshape that regroups the rows of a dense tensor and keeps its last dim, the channels:
    GPT-2's Conv1D flattens [N, T, C] to [N*T, C] for its Gemm and back, the way back naming C
    as the last item of a Concat of runtime dims. The channels stay on the last axis, so the
    Reshape passes them when the C it names (a constant, edited with them) is its last dim."""
    target = node.input[1]
    if node.input[0] not in group.layout or target in group.layout:
        raise Blocked("it feeds a Reshape's shape")
    zero_ok = not int_attribute(node, "allowzero", 0)
    if target in g.inits:
        values = [int(v) for v in g.array(target).reshape(-1)]
        if values and values[-1] == group.channels and not (zero_ok and 0 in values):
            group.shapes.append((node, 1))
            return DENSE
        raise Blocked("it feeds a Reshape that moves its channels off the last axis")
    concat = g.producer.get(target)
    if (
        concat is None
        or concat.op_type != "Concat"
        or concat.input[-1] not in g.inits
        or target in g.outputs
        or target in g.subgraph_reads
    ):
        raise Blocked("it feeds a Reshape to a shape computed at run time")
    last = [int(v) for v in g.array(concat.input[-1]).reshape(-1)]
    if not last or last[-1] != group.channels or (zero_ok and 0 in last):
        raise Blocked("it feeds a Reshape that moves its channels off the last axis")
    group.computed_shapes.append(node)
    return DENSE


def _fresh_name(g: Graph, name: str) -> tuple[str, int]:
    """A name for a private copy of ``name`` that no initializer, node output or node input
    uses yet, and its number (``name.N``); the Concat's copy numbers its node's name with it."""
    copy, number = name, 0
    while copy in g.inits or copy in g.producer or copy in g.consumers:
        number += 1
        copy = f"{name}.{number}"
    return copy, number


def _own_concat(g: Graph, reshape: Any) -> Any:
    """The Concat that computes ``reshape``'s shape, copied for it alone when other nodes read
    the same shape (an exporter computes one [N, T, C] for every layer of a width)."""
    name = reshape.input[1]
    concat = g.producer[name]
    if g.uses(name) == 1:
        return concat
    copy, number = _fresh_name(g, name)
    nodes = g.model.graph.node
    position = next(i for i, n in enumerate(nodes) if n is concat)
    made = type(concat)()
    made.CopyFrom(concat)
    made.output[0] = copy
    made.name = f"{concat.name}.{number}" if concat.name else ""
    nodes.insert(position + 1, made)  # beside the original: the nodes stay in topological order
    clone = nodes[position + 1]
    g.producer[copy] = clone
    for source in clone.input:
        if source:
            g.consumers.setdefault(source, []).append(clone)
    reshape.input[1] = copy
    g.consumers[name].remove(reshape)
    g.consumers[copy] = [reshape]
    return clone


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
    copy, _ = _fresh_name(g, name)
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
    for reshape in group.computed_shapes:
        concat = _own_concat(g, reshape)
        group.shapes.append((concat, len(concat.input) - 1))
    for node, index in group.shapes:
        name = _own(g, node, index)
        values = g.array(name).copy()
        values.reshape(-1)[-1] = keep.size  # the channels' count, always the last item
        g.set(name, values)


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
        raise nothing_to_prune("has no MatMul, Gemm or Conv node whose weight is an initializer")
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
        raise nothing_to_prune(
            f"has no hidden layer whose channels only feed another weight layer ({total} weight "
            f"layers: {why})"
        )
    del model.graph.value_info[:]  # intermediate shapes changed: let shape inference redo them
    before = sum(c for c, _ in pruned)
    after = sum(k for _, k in pruned)
    left = f"; {total - len(pruned)} left whole: {why}" if reasons else ""
    return (
        f"structured pruning on the ONNX graph: {len(pruned)} of {total} weight layers pruned "
        f"({before} -> {after} hidden channels){left}{runtime_note(runtime)}"
    )
