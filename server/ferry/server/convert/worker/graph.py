"""ONNX graph inspection and the check/optimize stages (onnx + onnxruntime, no torch).

An uploaded ONNX file is untrusted input to the serving process: onnxruntime would follow an
external-data path anywhere on disk and fail late on a custom-op domain it has no kernels for. So a
source file is refused unless it is self-contained and uses only domains the server registers
(``onnx_safety.check_source``, which the load stage runs).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx

from ferry.codec import datatype_name, datatype_of
from ferry.server.convert import external_data, onnx_safety
from ferry.server.convert.spec import InputSpec
from ferry.server.convert.worker import external
from ferry.server.errors import ConversionFailed, InvalidArgument, first_line

CONV_OPS = frozenset({"Conv", "ConvTranspose", "QLinearConv", "ConvInteger"})


def _all_nodes(model: onnx.ModelProto) -> Iterator[onnx.NodeProto]:
    """Every node: main graph, subgraphs at any depth, local functions, training graphs."""
    yield from onnx_safety.messages(model, onnx_safety.NODES)


def prepare_publish(path: Path, metadata: dict[str, str]) -> list[str]:
    """Rewrite ``path`` without the opset imports no node uses, with ``metadata`` (its empty
    values left out) set in its metadata_props; return the domains dropped.

    onnxruntime's optimizer and quantizer declare every domain they know in the files they
    write; a published file declaring ``ai.onnx.training`` would be refused by a stricter
    consumer (it was by Ferry's own upload check), so the published file declares what it uses.
    Only the graph is read and written (external data keeps its references)."""
    model = onnx.load(str(path), load_external_data=False)
    unused = onnx_safety.unused_opset_imports(model)
    if prepare_model(model, metadata):
        onnx.save(model, str(path))
    return unused


def strip_provenance(model: onnx.ModelProto) -> bool:
    """Drop the metadata_props of everything below the model itself (nodes, graphs, functions,
    values, tensors, at any depth); return whether there were any. torch's exporter records
    per-node provenance there: module paths and stack traces that name the files of whoever
    exported the model, which a published model must not carry to every client, and which made
    a small model's fp16 file larger than its fp32 one. The model's own metadata_props (where
    Ferry keeps what the serving side reads) stay."""
    changed = False
    for step in onnx_safety.walk(model):
        message = step.message
        if message is model or "metadata_props" not in message.DESCRIPTOR.fields_by_name:
            continue
        if len(message.metadata_props):
            del message.metadata_props[:]
            changed = True
    return changed


def stripped_source(path: Path, scratch: Path) -> Path:
    """An ONNX source without the exporter's provenance (``strip_provenance``), as a copy in
    ``scratch``; ``path`` itself when it has none, or when its weights are external data (the
    copy would lose its data files' relative paths: the published file is stripped anyway)."""
    model = onnx.load(str(path), load_external_data=False)
    if next(onnx_safety.external_tensors(model), None) is not None:
        return path
    if not strip_provenance(model):
        return path
    target = scratch / "source.onnx"
    onnx.save(model, str(target))
    return target


def prepare_model(
    model: onnx.ModelProto,
    metadata: dict[str, str],
    varying: dict[int, set[int]] | None = None,
) -> bool:
    """``prepare_publish`` on a loaded model, with the output dims ``varying`` names (output
    index -> axes) made symbolic; returns whether anything changed."""
    stripped = strip_provenance(model)
    relaxed = relax_outputs(model.graph, varying or {})
    unused = onnx_safety.unused_opset_imports(model)
    metadata = {k: v for k, v in metadata.items() if v}
    if unused:
        kept = [o for o in model.opset_import if o.domain not in unused]
        del model.opset_import[:]
        model.opset_import.extend(kept)
    if metadata:
        props = {p.key: p.value for p in model.metadata_props} | metadata
        del model.metadata_props[:]
        model.metadata_props.extend(
            onnx.StringStringEntryProto(key=k, value=v) for k, v in props.items()
        )
    resorted = _sort_nodes(model.graph)
    return bool(stripped or relaxed or unused or metadata or resorted)


def relax_outputs(graph: onnx.GraphProto, varying: dict[int, set[int]]) -> bool:
    """Give each output dim in ``varying`` (output index -> axes) that the graph declares with
    a fixed size a name instead; return whether any changed. torch's exporter can write the
    example's length for an output that follows the input's (a GRU's sequence of states): the
    published metadata then promised a size the answers did not have."""
    changed = False
    for index, axes in varying.items():
        if index >= len(graph.output):
            continue
        value = graph.output[index]
        dims = value.type.tensor_type.shape.dim
        for axis in sorted(axes):
            if axis < len(dims) and not dims[axis].dim_param:
                dims[axis].dim_param = f"{value.name}_dim{axis}"  # clears dim_value (a oneof)
                changed = True
    return changed


def _sort_nodes(graph: onnx.GraphProto) -> bool:
    """Put the nodes in an order where each comes after the producers of its inputs; return
    whether it changed. onnxruntime's fp16 converter appends the Cast nodes it adds for kept
    fp32 inputs at the end: onnxruntime runs that file, but onnx.checker (and so Ferry's own
    upload) refuses it. Names no node produces (inputs, initializers, an outer scope) are
    available from the start; the original order breaks ties, so a sorted graph is unchanged."""
    nodes = list(graph.node)
    produced = {out: i for i, node in enumerate(nodes) for out in node.output if out}
    waiting = [
        {produced[name] for name in node.input if name in produced and produced[name] != i}
        for i, node in enumerate(nodes)
    ]
    if all(all(j < i for j in deps) for i, deps in enumerate(waiting)):
        return False
    users: dict[int, list[int]] = {}
    for i, deps in enumerate(waiting):
        for j in deps:
            users.setdefault(j, []).append(i)
    ready = [i for i, deps in enumerate(waiting) if not deps]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for user in users.get(i, []):
            waiting[user].discard(i)
            if not waiting[user]:
                heapq.heappush(ready, user)
    if len(order) != len(nodes):
        return False  # a cycle: leave the graph as it is for onnx.checker to name
    del graph.node[:]
    graph.node.extend(nodes[i] for i in order)
    return True


def datatype_of_elem(elem_type: int) -> str:
    """ONNX element type -> Open Inference Protocol name (``FP32``)."""
    return datatype_name(datatype_of(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))))


def graph_inputs(model: onnx.ModelProto) -> list[InputSpec]:
    """The real inputs (old IRs list initializers as inputs too); symbolic dims become -1."""
    initializers = {init.name for init in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor = value.type.tensor_type
        if not value.type.HasField("tensor_type"):
            raise InvalidArgument(
                f"ONNX input {value.name!r} is not a tensor (sequences and maps are not served)"
            )
        shape = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
        specs.append(InputSpec(value.name, datatype_of_elem(tensor.elem_type), shape))
    return specs


def output_names(path: Path) -> list[str]:
    model = onnx.load(str(path), load_external_data=False)
    return [value.name for value in model.graph.output]


def has_conv(model: onnx.ModelProto) -> bool:
    return any(node.op_type in CONV_OPS for node in _all_nodes(model))


def check(path: Path, external: bool = False, *, uploaded: bool = False) -> None:
    """onnx.checker with shape inference: catches graphs onnxruntime would reject at load.

    ``uploaded``: the graph is the client's own ONNX file (not an export of its weights), so a
    refusal is the request's INVALID_ARGUMENT, as is every other fault of an uploaded file; a
    graph the exporter wrote that fails is the conversion's failure.

    A graph with external data is checked without its data: its external initializers become
    graph inputs of the same type and shape (the load stage has checked every reference against
    the files; the checker would refuse the source's data files, which the child reaches through
    hard links, as a "hardlink attack", and would read gigabytes it does not need)."""
    try:
        target: onnx.ModelProto | str = str(path)
        if external:
            model = _as_inputs(onnx.load(str(path), load_external_data=False))
            # A tensor elsewhere (a Constant, a subgraph's or a sparse initializer) stays
            # external, and the checker resolves an in-memory model's data against the
            # process's working folder, not the model's: a good archive was refused ("should be
            # stored in c.bin, but it is not regular file"). Such a graph is checked from its
            # file, whose folder holds the copies of the data files the load stage confined it
            # to (regular files, not links: the checker accepts them).
            if next(onnx_safety.external_tensors(model), None) is None:
                target = model
        onnx.checker.check_model(target, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        # The checker's words run over lines ("input 't' of node:", then the node): one line,
        # so the node it names is not cut off.
        words = " ".join(str(exc).split())[:500] or type(exc).__name__
        if uploaded:
            raise InvalidArgument(
                f"the uploaded ONNX graph fails onnx.checker: {words}; fix the graph or "
                "re-export it with a current exporter, and upload it again"
            ) from None
        raise ConversionFailed(f"the exported ONNX graph fails onnx.checker: {words}") from None


def weight_bytes(model: onnx.ModelProto) -> int:
    """What the initializers' dims and types take, read from the graph alone (external tensors
    are not loaded): decides whether the variants need external data."""
    return sum(onnx_safety.tensor_nbytes(init) or 0 for init in model.graph.initializer)


def _as_inputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with each external initializer of its main graph turned into an input."""
    graph = model.graph
    kept = []
    for init in graph.initializer:
        if init.data_location != onnx.TensorProto.EXTERNAL:
            kept.append(init)
            continue
        graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, init.dims))
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return model


def optimize(source: Path, target: Path, threads: int, external_data_wanted: bool = False) -> str:
    """Write onnxruntime's EXTENDED-level graph; '' on success, else a note (source is copied).

    EXTENDED fuses portable operators only; ENABLE_ALL adds layout transforms specific to this
    CPU, which the serving process applies itself when it loads the model.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    external_data.session_options(options, target, external_data_wanted)
    options.intra_op_num_threads = threads
    try:
        ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
        onnx.checker.check_model(str(target))
    except Exception as exc:  # any failure keeps the checked, unoptimized graph
        external.copy(source, target, external_data_wanted)
        return (
            f"onnxruntime graph optimization failed ({first_line(exc)}); serving the exported graph"
        )
    return ""
