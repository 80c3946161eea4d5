"""The load stage: turn an uploaded file into a PyTorch module or a checked ONNX graph.

Safety decides how files are read. Weights go only through loaders that cannot run code
(``torch.load(weights_only=True)``, safetensors, protobuf); formats whose loading executes code
(``.pt2``, TorchScript) reach this module only when the operator allowed them, a gate
``validation.check_job`` applies before anything opens the file.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ferry.server.convert import architectures
from ferry.server.convert.spec import DynamicAxis, InputSpec, Job
from ferry.server.convert.validation import USE_INSTEAD
from ferry.server.convert.worker import architectures as builders
from ferry.server.convert.worker.parity import dtype_of, is_batched, sample_shape
from ferry.server.errors import InvalidArgument, first_line

log = logging.getLogger(__name__)

_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


@dataclass
class Source:
    """What the later stages need: a PyTorch module (None for ONNX) and the resolved inputs."""

    format: str
    inputs: list[InputSpec]
    batched: bool
    module: Any = None  # nn.Module, ScriptModule or the ExportedProgram's module
    program: Any = None  # the ExportedProgram of a .pt2 source
    onnx_path: Path | None = None
    opset: int | None = None  # an ONNX source's default-domain opset
    notes: list[str] = field(default_factory=list)
    external_data: bool = False  # an ONNX source whose tensors read data files beside it
    weight_bytes: int = (
        0  # the weights' size, which decides whether the variants need external data
    )


def load(job: Job, threads: int) -> Source:
    """Load ``job``'s source; the caller has run ``validation.check_job`` (the code-format gate)."""
    path = Path(job.source_path)
    if not path.is_file():
        raise InvalidArgument(f"the uploaded source {str(path)!r} does not exist; upload it again")
    if job.source_format == "onnx_archive":
        # The archive's SHA-256 was checked on receipt and the archive is not kept; what the
        # child re-checks is that the graph reads only the files that came in it.
        return _load_onnx(job, path)
    _verify_digest(path, job.source_sha256)
    if job.source_format == "onnx":
        return _load_onnx(job, path)
    import torch

    torch.set_num_threads(threads)
    if job.source_format in ("state_dict", "safetensors"):
        module = builders.build(job.architecture, job.architecture_kwargs)
        weights = (
            _read_state_dict(path) if job.source_format == "state_dict" else _read_safetensors(path)
        )
        _load_weights(module, weights, job.architecture)
        defaults = architectures.default_input_specs(job.architecture, job.architecture_kwargs)
        return _torch_source(job, module, None, job.spec.inputs or defaults)
    if job.source_format == "torchscript":
        try:
            module = torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:
            raise InvalidArgument(
                f"the file is not a loadable TorchScript archive: {first_line(exc)}"
            ) from None
        return _torch_source(job, module.eval(), None, job.spec.inputs)
    try:
        program = torch.export.load(str(path))
    except Exception as exc:
        raise InvalidArgument(
            f"the file is not a loadable torch.export program (.pt2): {first_line(exc)}"
        ) from None
    return _torch_source(
        job, program.module(), program, job.spec.inputs or _program_inputs(program)
    )


def _verify_digest(path: Path, expected: str) -> None:
    if not expected:
        return
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    if digest.hexdigest() != expected.lower():
        raise InvalidArgument(
            f"the source's SHA-256 is {digest.hexdigest()}, the upload recorded {expected}: the file "
            "changed or was truncated after upload; upload it again"
        )


def _read_state_dict(path: Path) -> dict[str, Any]:
    import torch

    try:
        obj = torch.load(str(path), weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        found = _GLOBAL.search(str(exc))
        what = f" ({found.group(1)})" if found else ""
        raise InvalidArgument(
            f"the file is not a plain state_dict: it holds a pickled object{what} that weights-only "
            "loading refuses, since unpickling it could run code (a whole module saved with "
            f"torch.save(model) is refused for that reason); {USE_INSTEAD}"
        ) from None
    except Exception as exc:
        raise InvalidArgument(
            f"the file could not be read as torch.save output ({first_line(exc)}): it may be "
            "corrupt or truncated; upload it again"
        ) from None
    return _tensor_dict(obj)


def _tensor_dict(obj: object) -> dict[str, Any]:
    import torch

    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return dict(obj)
    hint = ""
    if isinstance(obj, dict) and any(isinstance(v, dict) for v in obj.values()):
        nested = [k for k, v in obj.items() if isinstance(v, dict)]
        hint = f" (it looks like a training checkpoint: save checkpoint[{nested[0]!r}] alone)"
    raise InvalidArgument(
        f"the file is not a plain state_dict: it holds a {type(obj).__name__}, not a dict of "
        f"tensors{hint}; {USE_INSTEAD}"
    )


def _read_safetensors(path: Path) -> dict[str, Any]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return dict(load_file(str(path), device="cpu"))
    except (SafetensorError, OSError, ValueError) as exc:
        raise InvalidArgument(
            f"the file is not a valid safetensors file ({first_line(exc)}): it may be corrupt or "
            "truncated; save it with safetensors.torch.save_file(model.state_dict(), path)"
        ) from None


def rename_by_shape(expected: dict[str, Any], weights: dict[str, Any]) -> dict[str, str] | None:
    """File key -> architecture key, when the names differ but the shapes decide alone.

    The seed article saves a class with ``fc1``/``fc2`` attributes; the built-in ``seed`` is a
    Sequential (``0.``/``2.``) of the same layers. Renaming is safe only when every tensor's
    shape occurs once on each side: then no order is assumed, and two layers that could be
    swapped (the same shape twice) are never guessed at. Otherwise None: the keys must match."""
    if len(expected) != len(weights):
        return None
    by_shape = {tuple(v.shape): k for k, v in expected.items()}
    file_shapes = [tuple(v.shape) for v in weights.values()]
    if len(by_shape) != len(expected) or len(set(file_shapes)) != len(file_shapes):
        return None
    if set(file_shapes) != set(by_shape):
        return None
    return {k: by_shape[tuple(v.shape)] for k, v in weights.items()}


def _load_weights(module: Any, weights: dict[str, Any], architecture: str) -> None:
    """Explain mismatches in keys and shapes before load_state_dict's terser error can."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    renames = rename_by_shape(expected, weights) if missing and unexpected else None
    if renames is not None:
        log.info(
            "weights fit architecture %r under other names, matched by their distinct shapes: %s",
            architecture,
            ", ".join(f"{a} -> {b}" for a, b in renames.items() if a != b),
        )
        weights = {renames[k]: v for k, v in weights.items()}
        missing, unexpected = [], []
    shapes = [
        f"{k}: file {list(weights[k].shape)} vs model {list(expected[k].shape)}"
        for k in sorted(set(expected) & set(weights))
        if weights[k].shape != expected[k].shape
    ]
    if missing or unexpected or shapes:
        parts = [
            f"missing keys: {', '.join(missing[:20])}" if missing else "",
            f"unexpected keys: {', '.join(unexpected[:20])}" if unexpected else "",
            f"shape mismatches: {'; '.join(shapes[:20])}" if shapes else "",
        ]
        raise InvalidArgument(
            f"the weights do not fit architecture {architecture!r} with these kwargs ("
            + "; ".join(p for p in parts if p)
            + "): check the architecture name and architecture_kwargs; for a class of your "
            + f"own, {architectures.ROUTES}"
        )
    module.load_state_dict(weights, strict=True)


def _program_inputs(program: Any) -> list[InputSpec]:
    from ferry.codec import datatype_name, datatype_of

    user = set(program.graph_signature.user_inputs)
    specs = []
    for node in program.graph.nodes:
        if node.op != "placeholder" or node.name not in user:
            continue
        value = node.meta.get("val")
        if value is None or not hasattr(value, "shape"):
            return []
        shape = [d if isinstance(d, int) else -1 for d in value.shape]
        axes = [
            _program_axis(program, i, d) for i, d in enumerate(value.shape) if i and shape[i] < 0
        ]
        for axis in axes:
            shape[axis.axis] = min(max(PROGRAM_SAMPLE_SIZE, axis.min), axis.max or axis.min * 8)
        dtype = datatype_name(datatype_of(_numpy_dtype(value.dtype)))
        specs.append(InputSpec(node.name, dtype, shape, axes))
    return specs


# The size an ExportedProgram's dynamic dims (besides the batch) are sampled at, within bounds.
PROGRAM_SAMPLE_SIZE = 8


def _program_axis(program: Any, index: int, dim: Any) -> DynamicAxis:
    """A symbolic dim of an ExportedProgram's input, with the range torch.export proved for it:
    the program's own dynamic axis (inputs sharing a symbol share the axis)."""
    expr = dim.node.expr
    bounds = program.range_constraints.get(expr)
    low = max(int(bounds.lower), 1) if bounds is not None else 1
    upper = bounds.upper if bounds is not None else None
    high = int(upper) if upper is not None and getattr(upper, "is_Integer", False) else 0
    name = "".join(c if c.isalnum() else "_" for c in str(expr))
    return DynamicAxis(index, name if name.isidentifier() else f"dim_{name}", low, high)


def _numpy_dtype(torch_dtype: Any) -> Any:
    import torch

    return torch.empty(0, dtype=torch_dtype).numpy().dtype


def _torch_source(job: Job, module: Any, program: Any, inputs: list[InputSpec]) -> Source:
    if not inputs:
        raise InvalidArgument(
            f"spec.inputs is required for a {job.source_format} source"
            + (f" of architecture {job.architecture!r}" if job.architecture else "")
            + ": give each input's name, datatype and shape with the batch dim first as -1, "
            'e.g. {"name": "input", "datatype": "FP32", "shape": [-1, 3, 224, 224]}'
        )
    _check_names(inputs)
    source = Source(job.source_format, [], True, module=module, program=program)
    for spec in inputs:
        if not spec.shape:
            raise InvalidArgument(f"input {spec.name!r} needs a shape with the batch dim first")
        if spec.shape[0] != -1:
            source.notes.append(
                f"input {spec.name!r}: dim 0 ({spec.shape[0]}) exported as the batch dim"
            )
        resolved = InputSpec(
            spec.name, spec.datatype, [-1, *spec.shape[1:]], list(spec.dynamic_axes)
        )
        dtype_of(resolved)
        sample_shape(resolved, batched=True)
        source.inputs.append(resolved)
    return source


def _check_names(inputs: list[InputSpec]) -> None:
    names = [spec.name for spec in inputs]
    if len(set(names)) != len(names) or not all(names):
        raise InvalidArgument(f"input names must be unique and non-empty, got {names}")


def _overlay(graph_spec: InputSpec, given: InputSpec | None) -> InputSpec:
    """The graph's input with the dims it leaves dynamic filled from spec.inputs."""
    if given is None:
        return graph_spec
    if given.datatype != graph_spec.datatype or len(given.shape) != len(graph_spec.shape):
        raise InvalidArgument(
            f"spec.inputs {given.name!r} is {given.datatype}{given.shape}, the graph has "
            f"{graph_spec.datatype}{graph_spec.shape}: give the graph's type and rank"
        )
    shape = [g if s == -1 else s for g, s in zip(given.shape, graph_spec.shape, strict=True)]
    for axis in given.dynamic_axes:
        if graph_spec.shape[axis.axis] != -1:
            raise InvalidArgument(
                f"input {given.name!r} dim {axis.axis} ({axis.name}) is declared dynamic, but the "
                f"graph fixes it to {graph_spec.shape[axis.axis]}: export the model with that dim "
                "dynamic (torch.onnx.export's dynamic_shapes, or the SDK's dynamic_axes=)"
            )
    return InputSpec(graph_spec.name, graph_spec.datatype, shape, list(given.dynamic_axes))


def _load_onnx(job: Job, path: Path) -> Source:
    import onnx
    from google.protobuf.message import DecodeError

    from ferry.server.convert import onnx_safety
    from ferry.server.convert.worker import graph

    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise InvalidArgument(
            f"the file is not a valid ONNX model ({first_line(exc)}): it may be corrupt or truncated"
        ) from None
    # The upload was checked; the child checks again.
    if job.source_format == "onnx_archive":
        from ferry.server.convert import onnx_archive

        external = onnx_safety.check_confined(model, onnx_archive.listing(path.parent)) > 0
        onnx_safety.check_domains(model)
    else:
        onnx_safety.check_source(model)
        external = False
    inputs = graph.graph_inputs(model)
    by_name = {spec.name: spec for spec in job.spec.inputs}
    unknown = sorted(set(by_name) - {spec.name for spec in inputs})
    if unknown:
        raise InvalidArgument(
            f"spec.inputs names {', '.join(unknown)}, which the ONNX graph does not have; its "
            f"inputs are {', '.join(spec.name for spec in inputs)}"
        )
    resolved = [_overlay(spec, by_name.get(spec.name)) for spec in inputs]
    batched = is_batched(resolved)
    for spec in resolved:
        dtype_of(spec)
        sample_shape(spec, batched)
    notes = [] if batched else ["the graph has a fixed batch size: served and validated unbatched"]
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    source = Source("onnx", resolved, batched, onnx_path=path, opset=opset, notes=notes)
    source.external_data = external
    source.weight_bytes = graph.weight_bytes(model)
    return source
