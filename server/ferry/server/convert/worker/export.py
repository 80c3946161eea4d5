"""The export stage: PyTorch -> one self-contained ONNX file with a symbolic batch dim.

The torch.export-based exporter is tried first; the legacy TorchScript one is the fallback (and the
only option for TorchScript sources). An example batch of 1 can silently freeze the batch dim, so
the example batch is 2 and the result is checked: symbolic first dims, and a run at batch 1 and at
the largest batch the version will be served with.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from ferry.server.convert.worker import graph
from ferry.server.convert.worker.load import Source
from ferry.server.convert.worker.parity import generate, onnx_runner
from ferry.server.errors import (
    ConversionFailed,
    FerryError,
    InvalidArgument,
    Unimplemented,
    first_line,
)

DYNAMO = "torch.onnx.export(dynamo=True)"
LEGACY = "torch.onnx.export(dynamo=False)"
MAX_BATCH_DIM = 4096
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_DYNAMO_OP = re.compile(r"No ONNX function found for <OpOverload\(op='([\w.:]+)'")
_LEGACY_OP = re.compile(r"operator '([\w.:]+)'")


@dataclass
class Exported:
    exporter: str
    notes: list[str] = field(default_factory=list)


def export(
    source: Source,
    example: tuple[torch.Tensor, ...],
    out_names: list[str],
    path: Path,
    opset: int,
    *,
    external: bool = False,
) -> Exported:
    """Export to ``path``; ``external``: the weights go to ``path``'s data file (models over
    2 GiB; the legacy exporter decides that on its own, writing one file per tensor)."""
    names = [spec.name for spec in source.inputs]
    result = Exported(DYNAMO)
    dynamo_error: BaseException | None = None
    if not isinstance(source.module, torch.jit.ScriptModule):
        try:
            # Under no_grad, as the SDK exports and as the graph serves: traced with autograd
            # on, torch.export records the training IR, whose decompositions failed on Hugging
            # Face's T5 attention ("Cannot view a tensor with shape [s72, 8, 4, 8] and strides
            # (256, 8, 64, 1)"), and every such model took the legacy exporter with a note.
            # The legacy exporter keeps autograd on: under no_grad nn.TransformerEncoder takes
            # its fused fast path, which it cannot export.
            with torch.no_grad():
                _dynamo(
                    source, example, names, out_names, path=path, opset=opset, external=external
                )
            return result
        except Exception as exc:
            dynamo_error = exc
    try:
        torch.onnx.export(
            source.module,
            example,
            str(path),
            dynamo=False,
            input_names=names,
            output_names=out_names,
            dynamic_axes={
                **{spec.name: _legacy_axes(spec) for spec in source.inputs},
                **{name: {0: "batch"} for name in out_names},
            },
            opset_version=opset,
            do_constant_folding=True,
        )
    except Exception as legacy_error:
        raise _export_error(dynamo_error, legacy_error, opset) from None
    result.exporter = LEGACY
    if dynamo_error is not None:
        result.notes.append(
            f"the torch.export-based exporter failed ({_clean(dynamo_error)}); exported with the "
            "legacy TorchScript exporter instead"
        )
    return result


def _dynamo(
    source: Source,
    example: tuple[torch.Tensor, ...],
    names: list[str],
    out_names: list[str],
    *,
    path: Path,
    opset: int,
    external: bool,
) -> None:
    common: dict[str, Any] = {
        "dynamo": True,
        "input_names": names,
        "output_names": out_names,
        "opset_version": opset,
    }
    if source.program is not None and _program_batch_is_dynamic(source.program):
        # The program already carries its dynamic dims; re-tracing its module could specialize them.
        program = torch.onnx.export(source.program, example, **common)
    else:
        program = torch.onnx.export(
            source.module, example, dynamic_shapes=dynamic_shapes(source), **common
        )
    if program is None:  # only when given a path, which this call never does
        raise ConversionFailed("the exporter returned no program")
    program.save(str(path), external_data=external)
    _strip_debug_metadata(path)


def dynamic_shapes(source: Source) -> tuple[dict[int, Any], ...]:
    """torch.export's dims: the batch, and each declared axis (one Dim per name, so axes that
    share a name are one size)."""
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH_DIM)
    named: dict[str, Any] = {}
    shapes = []
    for spec in source.inputs:
        dims: dict[int, Any] = {0: batch}
        for a in spec.dynamic_axes:
            if a.name not in named:
                named[a.name] = torch.export.Dim(a.name, min=a.min, max=a.max or None)
            dims[a.axis] = named[a.name]
        shapes.append(dims)
    return tuple(shapes)


def _legacy_axes(spec: Any) -> dict[int, str]:
    return {0: "batch", **{a.axis: a.name for a in spec.dynamic_axes}}


def _strip_debug_metadata(path: Path) -> None:
    """Drop the exporter's per-node provenance (module paths, stack traces; ``graph.
    strip_provenance``, at every depth): a third of a small model's file, which would otherwise
    inflate every variant built from this graph. Only the graph is read and written."""
    model = onnx.load(str(path), load_external_data=False)  # the graph; the data stays put
    if graph.strip_provenance(model):
        onnx.save(model, str(path))


def _program_batch_is_dynamic(program: Any) -> bool:
    user = set(program.graph_signature.user_inputs)
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in user:
            value = node.meta.get("val")
            if value is None or not value.shape or isinstance(value.shape[0], int):
                return False
    return True


def _clean(exc: BaseException) -> str:
    """The exporter's one useful line (its exception summary), without colour codes."""
    text = _ANSI.sub("", str(exc)).strip()
    found = _DYNAMO_OP.search(text)
    if found:
        return text[found.start() :].splitlines()[0][:300]
    if "## Exception summary" in text:
        text = text.split("## Exception summary", 1)[1].strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def _export_error(dynamo: BaseException | None, legacy: BaseException, opset: int) -> FerryError:
    # The legacy exporter names the aten operator the user wrote; the dynamo one its decomposition.
    texts = [_ANSI.sub("", str(e)) for e in (legacy, dynamo) if e is not None]
    operator = next(
        (m.group(1) for p in (_LEGACY_OP, _DYNAMO_OP) for t in texts if (m := p.search(t))), ""
    )
    unsupported = isinstance(legacy, torch.onnx.errors.UnsupportedOperatorError) or any(
        "No ONNX function found" in t for t in texts
    )
    if unsupported:
        return Unimplemented(
            f"operator {operator or '(unknown)'} has no ONNX conversion at opset {opset} in either "
            "exporter: rewrite that part of the model with supported operations, try another "
            "opset, or export to ONNX yourself with a custom symbolic and upload the ONNX file"
        )
    dynamo_text = f"torch.export-based exporter: {_clean(dynamo)}; " if dynamo is not None else ""
    return ConversionFailed(
        f"ONNX export failed ({dynamo_text}legacy exporter: {first_line(legacy)}); check that "
        "the model runs on inputs shaped like spec.inputs, or export it yourself and upload ONNX"
    )


def verify_batch(
    path: Path,
    source: Source,
    max_batch: int,
    threads: int,
    seen: list[list[tuple[int, ...]]] | None = None,
    *,
    rtol: float,
    atol: float,
    merges: bool = False,
    samples: dict[str, np.ndarray] | None = None,
) -> list[str]:
    """Prove the batch dim and every declared dynamic axis symbolic, and the graph usable at
    both ends of the served batch range, giving the PyTorch model's answers there
    (``dims.verify_batch``), and at each axis's bounds (``dims.verify``); returns the report's
    notes."""
    from ferry.server.convert.worker import dims as dynamic

    model = onnx.load(str(path), load_external_data=False)
    initializers = {init.name for init in model.graph.initializer}
    declared = {spec.name: spec.dynamic_axes for spec in source.inputs}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        dims = value.type.tensor_type.shape.dim
        if not dims or not dims[0].HasField("dim_param"):
            frozen = dims[0].dim_value if dims else "no dims"
            raise ConversionFailed(
                f"the exporter froze the batch dim of input {value.name!r} to {frozen}: the model "
                "specializes on the batch size (e.g. a reshape with a literal batch); write it "
                "with x.shape[0] or -1 so that any batch size exports"
            )
        for a in declared.get(value.name, []):
            if not dims[a.axis].HasField("dim_param"):
                raise ConversionFailed(
                    f"the exporter froze dim {a.axis} ({a.name}) of input {value.name!r} to "
                    f"{dims[a.axis].dim_value}: the model specializes on its size (e.g. a reshape "
                    "or view with a literal size, or a loop over it); write it with "
                    "x.shape[...] or -1 so that any size exports"
                )
    run = onnx_runner(path, threads)
    notes = dynamic.verify_batch(
        source.inputs,
        run,
        max_batch,
        seen,
        rtol=rtol,
        atol=atol,
        reference=torch_runner(source),
        merges=merges,
        samples=samples,
    )
    return notes + dynamic.verify(source.inputs, run, seen)


def example_inputs(source: Source) -> tuple[torch.Tensor, ...]:
    """A batch of 2: an example batch of 1 lets the exporter specialize the batch dim to 1; a
    declared axis of size 1 is made 2 for the same reason, when its bounds allow."""
    from ferry.server.convert.worker import dims

    sizes = {
        a.name: 2 if spec.shape[a.axis] == 1 and (a.max or 2) >= 2 else spec.shape[a.axis]
        for spec in source.inputs
        for a in spec.dynamic_axes
    }
    arrays = generate(dims.resized(source.inputs, sizes), 2, batched=True).arrays
    return tuple(torch.from_numpy(arrays[spec.name]) for spec in source.inputs)


def torch_outputs(result: Any) -> dict[str, torch.Tensor]:
    """Output name -> tensor, named as the model names them (dict and ModelOutput keys,
    namedtuple fields; ``output`` / ``output_i`` by position otherwise), in the exporter's order.
    The SDK's module export names them by the same rule."""
    from ferry.client import InvalidInputError
    from ferry.client._module_upload import flatten_outputs

    try:
        return flatten_outputs(torch, result)
    except InvalidInputError as exc:
        raise InvalidArgument(
            f"{exc.message}; wrap the model so that forward returns tensors"
        ) from None


def torch_runner(source: Source) -> Callable[[dict[str, np.ndarray]], list[np.ndarray]]:
    """Run the PyTorch model on named numpy inputs; outputs in ``torch_outputs``' order."""
    names = [spec.name for spec in source.inputs]

    def run(feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        with torch.inference_mode():
            result = source.module(
                *(torch.from_numpy(np.ascontiguousarray(feed[n])) for n in names)
            )
        return [o.detach().cpu().numpy() for o in torch_outputs(result).values()]

    return run


def module_output_names(source: Source) -> list[str]:
    """The names the export gives the outputs: the model's own (``torch_outputs``)."""
    with torch.inference_mode():
        return list(torch_outputs(source.module(*example_inputs(source))))
