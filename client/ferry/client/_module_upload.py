"""Turn an ``nn.Module`` and its example inputs into an upload: bind by name, never by position.

The served graph must take each tensor under the name the module gives it. A dict of example
inputs is not in ``forward()``'s order in general (a tokenizer's usually isn't), so calling the
module positionally with it would swap inputs, and reference outputs computed by that same call
would agree with the swapped graph: the server's validation could not see the mistake. So:

- example inputs bind to ``forward()``'s signature exactly as a call ``module(*args, **kwargs)``
  would, and the reference outputs come from that call, never from the export's input order;
- the export gets the same ``args`` and ``kwargs``, and the graph's input names are then read back
  from the ONNX file and must be exactly the bound parameter names;
- the samples that travel with the upload are keyed by those names, so the server's comparison
  of the served graph with the reference outputs is independent of the exporter.

torch is passed in by the caller (taken from ``sys.modules``): this module never imports it.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import os
import re
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ferry.client import _archive
from ferry.client._conversion_types import DynamicAxis, InputSpec
from ferry.client._errors import ConversionError, InvalidInputError
from ferry.codec import datatype_name, datatype_of

_VAR = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


@dataclass
class Bound:
    """The call the user described: ``module(*args, **kwargs)``, with each tensor's name."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    named: dict[str, Any]  # input name -> tensor, in call order (args, then kwargs as given)
    signature: inspect.Signature
    arguments: dict[str, Any]  # parameter name -> value, as inspect binds them


def split_examples(torch: Any, examples: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A tensor, a tuple of positional tensors, a dict of keyword tensors, or torch.export's
    ``(args, kwargs)``: a tuple whose last item is a dict of keyword tensors."""
    if isinstance(examples, torch.Tensor):
        return (examples,), {}
    if isinstance(examples, Mapping):
        return (), _keyword_dict(examples)
    if isinstance(examples, tuple | list):
        items = list(examples)
        kwargs: dict[str, Any] = {}
        if items and isinstance(items[-1], Mapping):
            kwargs = _keyword_dict(items.pop())
            if len(items) == 1 and isinstance(items[0], tuple | list):
                items = list(items[0])  # (args, kwargs)
        return tuple(items), kwargs
    raise InvalidInputError(
        f"example_inputs is a {type(examples).__name__}: pass a tensor, a tuple of tensors, a dict "
        "name -> tensor, or (args, kwargs)"
    )


def _keyword_dict(mapping: Mapping[Any, Any]) -> dict[str, Any]:
    bad = [k for k in mapping if not isinstance(k, str)]
    if bad:
        raise InvalidInputError(f"example_inputs keys must be parameter names, got {bad[0]!r}")
    return dict(mapping)


def bind(torch: Any, module: Any, examples: Any) -> Bound:
    """Bind the examples to ``module.forward``'s parameters as Python would bind the call."""
    args, kwargs = split_examples(torch, examples)
    try:
        signature = inspect.signature(module.forward)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(
            f"cannot read the signature of {type(module).__name__}.forward ({exc}): wrap the "
            "model in a module whose forward names its tensor parameters"
        ) from None
    params = signature.parameters
    listing = _listing(signature)
    named_params = [p for p in params.values() if p.kind not in _VAR]
    takes_var_keyword = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for key in kwargs:
        param = params.get(key)
        # A key that names no parameter is a typo even when forward also takes **kwargs (as
        # Hugging Face models do): it would vanish into them. Only a forward that takes nothing
        # but **kwargs is given free names.
        if (param is None or param.kind in _VAR) and (named_params or not takes_var_keyword):
            raise InvalidInputError(
                f"example_inputs names {key!r}, which is not a parameter of "
                f"{type(module).__name__}.forward; its parameters are {listing}"
            )
        if param is not None and param.kind is inspect.Parameter.POSITIONAL_ONLY:
            raise InvalidInputError(
                f"example_inputs names {key!r}, a positional-only parameter of "
                f"{type(module).__name__}.forward{listing}: pass it in the positional tuple"
            )
    try:
        arguments = dict(signature.bind(*args, **kwargs).arguments)
    except TypeError as exc:
        raise InvalidInputError(
            f"example_inputs do not fit {type(module).__name__}.forward{listing}: {exc}"
        ) from None
    named: dict[str, Any] = {}
    ordered = [p for p in params.values() if p.kind in _POSITIONAL]
    star = next((p for p in params.values() if p.kind is inspect.Parameter.VAR_POSITIONAL), None)
    for i, value in enumerate(args):
        if i < len(ordered):
            named[ordered[i].name] = value
        elif star is not None:  # signature.bind has checked that there is one
            named[f"{star.name}_{i - len(ordered)}"] = value  # the exporter's name for it
    named.update(kwargs)
    for name, value in named.items():
        _check_tensor(torch, name, value)
    return Bound(args, kwargs, named, signature, arguments)


def _listing(signature: inspect.Signature) -> str:
    stars: dict[inspect._ParameterKind, str] = {
        inspect.Parameter.VAR_POSITIONAL: "*",
        inspect.Parameter.VAR_KEYWORD: "**",
    }
    return (
        "(" + ", ".join(stars.get(p.kind, "") + p.name for p in signature.parameters.values()) + ")"
    )


def _check_tensor(torch: Any, name: str, value: Any) -> None:
    if value is None:
        raise InvalidInputError(
            f"example_inputs[{name!r}] is None: leave it out to keep forward's default, or give "
            "a tensor"
        )
    if not isinstance(value, torch.Tensor):
        raise InvalidInputError(
            f"example_inputs[{name!r}] is a {type(value).__name__}: only tensors become model "
            "inputs; fix other arguments in a wrapper module (or functools.partial on forward)"
        )
    if value.dim() == 0:
        raise InvalidInputError(
            f"example_inputs[{name!r}] is a scalar: model inputs need a batch dim first"
        )


def call(torch: Any, module: Any, bound: Bound) -> Any:
    """The user's own call, whose outputs every later check is judged against."""
    module.eval()
    try:
        with torch.no_grad():
            return module(*bound.args, **bound.kwargs)
    except Exception as exc:
        raise InvalidInputError(
            f"{type(module).__name__} fails on example_inputs: {type(exc).__name__}: {exc}"
        ) from None


def _buffers(module: Any) -> dict[str, Any]:
    """A copy of the module's buffers (running statistics, counters; parameters are left out:
    forward runs under no_grad and a model's weights would double the memory)."""
    return {name: value.detach().clone() for name, value in module.named_buffers()}


def _refuse_changed_buffers(torch: Any, module: Any, before: Mapping[str, Any]) -> None:
    """A forward that updates a buffer in eval mode (a running mean it keeps normalizing by, a
    call counter) answers differently on every call, and the export freezes one state: the job
    failed its parity check with "disagrees with validation.reference_file ... computed in eval
    mode", a file the user never gave. Refused here naming the buffers, and the module is put
    back as it was (the upload's own call must not change the caller's model)."""
    changed = [
        name
        for name, value in module.named_buffers()
        if name in before
        and (value.shape != before[name].shape or not torch.equal(value, before[name]))
    ]
    if not changed:
        return
    with torch.no_grad():
        for name, value in module.named_buffers():
            if name in changed and value.shape == before[name].shape:
                value.copy_(before[name])
    listing = ", ".join(map(repr, changed[:5])) + (", ..." if len(changed) > 5 else "")
    raise InvalidInputError(
        f"{type(module).__name__}.forward changes its buffers {listing} in eval mode, so every "
        "call answers differently and the exported graph would keep one state: update them "
        "only when self.training, or keep the state outside the module (an input and an output)"
    )


def flatten_outputs(torch: Any, result: Any) -> dict[str, Any]:
    """Output name -> tensor, in the order the exporter flattens them (pytree order). The
    model's own names are kept: dict / ModelOutput keys, namedtuple fields; positions otherwise
    (``output``, or ``output_0``... for a tuple)."""
    flat: dict[str, Any] = {}

    def walk(value: Any, name: str) -> None:
        if value is None:
            return  # pytree drops it; so does the exporter
        if isinstance(value, torch.Tensor):
            flat[name] = value
        elif isinstance(value, Mapping):
            for key, item in value.items():
                walk(item, f"{name}_{key}" if name else str(key))
        elif isinstance(value, tuple) and hasattr(value, "_fields"):
            for key, item in zip(value._fields, value, strict=True):
                walk(item, f"{name}_{key}" if name else key)
        elif isinstance(value, tuple | list):
            prefix = f"{name}_" if name else "output_"
            for i, item in enumerate(value):
                walk(item, f"{prefix}{i}")
        else:
            raise InvalidInputError(
                f"forward returns a {type(value).__name__} at {name or 'the top level'}: only "
                "tensors (in tuples, lists or dicts) can be served"
            )

    if isinstance(result, torch.Tensor):
        return {"output": result}
    walk(result, "")
    if not flat:
        raise InvalidInputError("forward returns no tensor: nothing could be served")
    return flat


def _numpy(tensor: Any) -> np.ndarray:
    if str(tensor.dtype) == "torch.bfloat16":
        # torch's .numpy() refuses bfloat16, and a bf16 module's upload failed with its bare
        # "TypeError: Got unsupported ScalarType BFloat16"; onnxruntime's CPU provider has no
        # bfloat16 Gemm or MatMul either, so such a graph would not run there.
        raise InvalidInputError(
            "the module takes or returns bfloat16 tensors, which the SDK cannot upload and "
            "onnxruntime's CPU provider cannot run (no bfloat16 Gemm/MatMul): upload "
            "module.float() with float32 example inputs, and ask for quantization='fp16' to "
            "halve the file"
        )
    return np.asarray(tensor.detach().cpu().numpy())


Axes = dict[str, dict[int, DynamicAxis]]  # input name -> dim -> its declaration


def _spec(name: str, array: np.ndarray, axes: Axes) -> InputSpec:
    datatype = datatype_name(datatype_of(array.dtype))
    return InputSpec(name, datatype, [-1, *array.shape[1:]], axes.get(name, {}))


def declared_axes(bound: Bound, given: Any) -> Axes:
    """``dynamic_axes`` checked against the bound inputs: input name -> {dim: DynamicAxis}; a
    plain string names an unbounded axis."""
    if not given:
        return {}
    if not isinstance(given, Mapping):
        raise InvalidInputError(
            'dynamic_axes maps input names to {dim: DynamicAxis}, e.g. {"input_ids": '
            '{1: DynamicAxis("sequence", max=512)}}'
        )
    out: Axes = {}
    sizes: dict[str, tuple[str, int, DynamicAxis]] = {}
    for name, dims in given.items():
        if name not in bound.named:
            raise InvalidInputError(
                f"dynamic_axes names {name!r}, which is not an input; the inputs are "
                f"{list(bound.named)}"
            )
        tensor = bound.named[name]
        if not isinstance(dims, Mapping):
            raise InvalidInputError(f"dynamic_axes[{name!r}] must map dims to DynamicAxis")
        out[name] = {}
        for dim, declared in dims.items():
            where = f"dynamic_axes[{name!r}][{dim!r}]"
            axis = DynamicAxis(declared) if isinstance(declared, str) else declared
            if not isinstance(axis, DynamicAxis):
                raise InvalidInputError(f"{where} must be a DynamicAxis or a name")
            if not isinstance(dim, int) or dim == 0 or not 0 < dim < tensor.dim():
                raise InvalidInputError(
                    f"{where}: dims 1..{tensor.dim() - 1} of {name!r} can be declared (dim 0, "
                    "the batch, is always dynamic)"
                )
            size = int(tensor.shape[dim])
            if axis.min < 1 or (axis.max is not None and not axis.min <= size <= axis.max):
                raise InvalidInputError(
                    f"{where} ({axis.name}): the example's size {size} must lie within "
                    f"min..max ({axis.min}..{axis.max}), and min >= 1"
                )
            first = sizes.setdefault(axis.name, (name, size, axis))
            if (first[1], first[2]) != (size, axis):
                raise InvalidInputError(
                    f"dynamic axis {axis.name!r}: {name!r} dim {dim} is {size} ({axis}) but "
                    f"{first[0]!r} has {first[1]} ({first[2]}): axes sharing a name must agree"
                )
            out[name][dim] = axis
    return out


def from_module(
    torch: Any,
    module: Any,
    examples: Any,
    architecture: str | None,
    opset: int,
    *,
    dynamic_axes: Any = None,
) -> tuple[Path, str, dict[str, Any]]:
    """The upload's bytes, its format, and what travels with it (input specs, samples keyed by
    the served input names, and the module's outputs on them)."""
    bound = bind(torch, module, examples)
    _refuse_unequal_batches(bound)
    axes = declared_axes(bound, dynamic_axes)
    buffers = _buffers(module)
    result = call(torch, module, bound)
    _refuse_changed_buffers(torch, module, buffers)
    samples = {name: _numpy(t) for name, t in bound.named.items()}
    if architecture:
        return _state_dict(torch, module, bound, result, samples=samples, axes=axes)
    outputs = flatten_outputs(torch, result)
    _refuse_passed_through(bound, outputs)
    _refuse_input_names(bound, outputs)
    alone = _batch_one_reference(torch, module, bound, outputs)
    data, graph_inputs = _export(torch, module, bound, list(outputs), opset=opset, axes=axes)
    reference = {name: _numpy(t) for name, t in outputs.items()}
    checked = samples
    if alone is not None:  # the server checks the graph where the module differs: at batch 1
        checked = {name: array[:1] for name, array in samples.items()}
        reference = alone
    extras = {
        "inputs": tuple(_spec(name, samples[name], axes) for name in graph_inputs),
        "sample_inputs": {name: checked[name] for name in graph_inputs},
        "reference_outputs": reference,
    }
    fmt = "onnx" if data.suffix == ".onnx" else _archive.ARCHIVE_FORMAT
    return data, fmt, extras


def _weight_bytes(module: Any) -> int:
    return sum(int(t.numel()) * int(t.element_size()) for t in module.state_dict().values())


def _state_dict(
    torch: Any,
    module: Any,
    bound: Bound,
    result: Any,
    *,
    samples: dict[str, np.ndarray],
    axes: Axes,
) -> tuple[Path, str, dict[str, Any]]:
    """The server rebuilds the architecture and calls it positionally in spec order, so the
    examples must be forward's leading parameters, and the specs go in signature order."""
    leading = [p.name for p in bound.signature.parameters.values()][: len(bound.named)]
    given = set(bound.named)
    if given != set(leading) or any(
        bound.signature.parameters[n].kind not in _POSITIONAL for n in leading
    ):
        raise InvalidInputError(
            f"with architecture=, the server calls forward positionally: example_inputs must give "
            f"forward's first {len(given)} positional parameters {_listing(bound.signature)}, "
            f"got {sorted(given)}; or upload without architecture= to export it here"
        )
    outputs = flatten_outputs(torch, result)  # the server's export names them the same way
    extras = {
        "inputs": tuple(_spec(name, samples[name], axes) for name in leading),
        "sample_inputs": {name: samples[name] for name in leading},
        "reference_outputs": {name: _numpy(t) for name, t in outputs.items()},
    }
    kept = _scratch_file(".pt")
    with _removed_on_failure(kept):
        torch.save(module.state_dict(), kept)
    return kept, "state_dict", extras


def _scratch_file(suffix: str) -> Path:
    """A temporary file the upload streams from and removes: the weights are written to disk
    once, so the caller's process holds the model once (its own module), not twice."""
    fd, name = tempfile.mkstemp(prefix="ferry-upload-", suffix=suffix)
    os.close(fd)
    return Path(name)


@contextlib.contextmanager
def _removed_on_failure(path: Path) -> Iterator[None]:
    """A write into a scratch file that fails part way (a full temporary disk, a Ctrl-C) left
    the partial file in the temporary folder for good: the upload that removes it never ran."""
    try:
        yield
    except BaseException:
        path.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Keep the exporter's progress lines, warnings and log records out of the caller's
    terminal: an upload that worked says nothing. When the export fails, what it said is
    written to stderr after all, since it may explain the failure."""
    said = io.StringIO()
    failed = True
    try:
        with (
            contextlib.redirect_stdout(said),
            contextlib.redirect_stderr(said),
            warnings.catch_warnings(),
        ):
            warnings.simplefilter("ignore")
            quiet = [logging.getLogger(name) for name in _NOISY_LOGGERS]
            levels = [logger.level for logger in quiet]
            for logger in quiet:
                logger.setLevel(logging.ERROR)
            try:
                yield
            finally:
                for logger, level in zip(quiet, levels, strict=True):
                    logger.setLevel(level)
        failed = False
    finally:
        if failed and said.getvalue():
            sys.stderr.write(said.getvalue())


_NOISY_LOGGERS = ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")


def _refuse_unequal_batches(bound: Bound) -> None:
    """Dim 0 of every input is the batch, one size in a request (the export gives them one
    symbolic dim, and the server batches requests by concatenating every input along it). A
    model with a second input of its own length (a table, a set of candidates: ``x`` of 8 rows
    beside ``table`` of 5) failed in torch.export with a page of exporter text ending in
    "L['table'].size()[0] = 5 is not equal to L['x'].size()[0] = 8", which said nothing of
    this rule or what to change."""
    sizes = {name: int(value.shape[0]) for name, value in bound.named.items()}
    if len(set(sizes.values())) > 1:
        listing = ", ".join(f"{name!r} has {size}" for name, size in sizes.items())
        raise InvalidInputError(
            f"example_inputs disagree on dim 0 ({listing}): dim 0 of every input is the batch, "
            "the same size within a request, since requests are batched by joining every input "
            "along it; an input that is not per sample (a lookup table, a set of candidates) "
            "belongs in the module (a buffer or parameter), or repeat it once per sample"
        )


def _refuse_passed_through(bound: Bound, outputs: Mapping[str, Any]) -> None:
    """An input returned as it is cannot be exported under its output's name: ONNX names a
    value once, so the exporter renamed the graph's input ("x" became "x_orig") and the upload
    was refused as if example_inputs had named it wrongly."""
    inputs = {id(value): name for name, value in bound.named.items()}
    for out_name, value in outputs.items():
        in_name = inputs.get(id(value))
        if in_name is not None:
            raise InvalidInputError(
                f"the module returns its input {in_name!r} unchanged as output {out_name!r}, "
                "which ONNX cannot name twice: return a copy (e.g. x.clone()) or leave that "
                "output out"
            )


def _refuse_input_names(bound: Bound, outputs: Mapping[str, Any]) -> None:
    """An output named like an input cannot be exported: ONNX names each value once, and the
    job failed late with onnxruntime's "Duplicate definition of name" from a server path."""
    for out_name in outputs:
        if out_name in bound.named:
            raise InvalidInputError(
                f"forward returns an output named {out_name!r}, which is also the name of an "
                "input, and ONNX names each value once: rename that output (its dict key or "
                f"namedtuple field), e.g. to {out_name + '_out'!r}"
            )


# The server's default validation tolerance (validation.rtol / atol).
_RTOL, _ATOL = 1e-3, 1e-4


def _batch_one_reference(
    torch: Any, module: Any, bound: Bound, outputs: Mapping[str, Any]
) -> dict[str, np.ndarray] | None:
    """The module's outputs on the first example alone, when they differ from its row in the
    example's batch (None when they agree, or cannot be had).

    The export keeps the path the example took: a branch on the batch size (``if
    x.shape[0] > 1``) is frozen to the example's, and the server, which checked the graph at
    the example's batch, published a version whose batch-1 answers were the other branch's.
    Only this process has the module, so the batch-1 answers are taken here and sent as the
    reference: the server then runs the graph at batch 1 against them, which refuses a frozen
    branch (the graph disagrees) and lets a model whose samples depend on each other through
    (the graph agrees; the server decides how it may be batched)."""
    if not bound.named:
        return None
    batch = next(iter(bound.named.values())).shape[0]
    if batch < 2 or any(t.shape[0] != batch for t in bound.named.values()):
        return None

    def first(value: Any) -> Any:
        return value[:1] if isinstance(value, torch.Tensor) else value

    try:
        with torch.no_grad():
            alone = flatten_outputs(
                torch,
                module(
                    *(first(a) for a in bound.args),
                    **{k: first(v) for k, v in bound.kwargs.items()},
                ),
            )
    except Exception:  # left to the server's own runs of the graph at batch 1
        return None
    if set(alone) != set(outputs):
        return None
    differs = False
    for name, together in outputs.items():
        if together.dim() == 0 or together.shape[0] != batch:
            return None  # not batched outputs: the server refuses those itself
        want, got = _numpy(together[:1]), _numpy(alone[name])
        if want.shape != got.shape or not np.allclose(got, want, _RTOL, _ATOL, equal_nan=True):
            differs = True
    return {name: _numpy(t) for name, t in alone.items()} if differs else None


def _export(
    torch: Any, module: Any, bound: Bound, out_names: list[str], *, opset: int, axes: Axes
) -> tuple[Path, list[str]]:
    """Export with the user's own ``args`` and ``kwargs``; return the file and the graph's input
    names in the graph's order, read from the file and checked against the bound names."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    named_dims = {
        a.name: torch.export.Dim(a.name, min=a.min, max=a.max)
        for dims in axes.values()
        for a in dims.values()
    }
    # Tensor identity -> input name: the examples reach dims() inside their containers.
    names = {id(value): name for name, value in bound.named.items()}

    def widened(value: Any) -> Any:
        # An example of size 1 can freeze a dim (the exporter specializes on 0 and 1): export
        # with 2 along the batch and along each declared axis whose bounds allow it.
        if value.shape[0] < 2:
            value = torch.cat([value, value])
        for dim, a in axes.get(names.get(id(value), ""), {}).items():
            if value.shape[dim] == 1 and (a.max is None or a.max >= 2):
                value = torch.cat([value, value], dim=dim)
        return value

    def dims(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {k: dims(v) for k, v in value.items()}
        if isinstance(value, tuple | list):
            return tuple(dims(v) for v in value)
        declared = axes.get(names.get(id(value), ""), {})
        return {0: batch, **{dim: named_dims[a.name] for dim, a in declared.items()}}

    dynamic_shapes = {name: dims(value) for name, value in bound.arguments.items()}
    args = tuple(widened(a) for a in bound.args)
    kwargs = {k: widened(v) for k, v in bound.kwargs.items()}
    _forget_rnn_dispatch(torch)
    try:
        # Under no_grad, as the reference call ran: traced with autograd on, torch's
        # decompositions failed on Hugging Face's T5 encoder ("Cannot view a tensor with shape
        # [s43, 12, 4, 8] and strides ..."), so the model could not be uploaded at all.
        with _quiet(), torch.no_grad():
            program = torch.onnx.export(
                module,
                args,
                kwargs=kwargs,
                dynamo=True,
                output_names=out_names,
                dynamic_shapes=dynamic_shapes,
                opset_version=opset,
            )
    except Exception as exc:
        if axes and _specializes(exc):
            raise InvalidInputError(
                f"{type(module).__name__} cannot export with the declared dynamic_axes: it "
                f"fixes one of them to the example's size ({_first_line(exc)}); write the "
                "model with x.shape[...] or -1 instead of literal sizes, or drop that axis"
            ) from None
        # torch's own exception (TorchExportError and kin) escaped upload(), against the SDK's
        # rule that everything it raises is a FerryError: a module with a Python `if` on a
        # tensor's value, or a packed sequence, raised a page of exporter text that
        # `except FerryError` did not catch. Its summary line stays; the chain keeps the rest.
        raise ConversionError(
            f"{type(module).__name__} cannot be exported to ONNX ({_summary(exc)}); make forward "
            "traceable by torch.export (torch.where or torch.cond for a branch on a tensor's "
            "value, no packed sequences), or export it yourself and upload the .onnx file",
            kind="CONVERSION_FAILED",
        ) from exc
    # The exported graph as torch built it (ONNXProgram.model_proto): the SDK reads its real
    # input and output names without importing onnx itself. Checked before anything is
    # written, so a refused export leaves no file behind (and says nothing but why).
    graph_inputs = _check_graph(program.model_proto.graph, bound, out_names, axes)
    _check_other_sizes(torch, module, program, bound, axes)
    # Over the threshold the weights go beside the graph (an ONNX file cannot exceed 2 GiB),
    # and the upload is the folder as one archive.
    external = _weight_bytes(module) > _archive.EXTERNAL_DATA_THRESHOLD
    with tempfile.TemporaryDirectory() as tmp, _quiet():
        path = Path(tmp) / "model.onnx"
        program.save(str(path), external_data=external)
        if external:
            return _archive.pack_folder(Path(tmp)), graph_inputs
        data = _scratch_file(".onnx")
        with _removed_on_failure(data):
            shutil.move(path, data)
        return data, graph_inputs


def _resized(torch: Any, value: Any, dims: Mapping[int, DynamicAxis], name: str, size: int) -> Any:
    """``value`` with every dim declared as axis ``name`` at ``size``: a shorter size keeps
    the first positions, a longer one repeats them (the server's rule for other sizes)."""
    for dim, axis in dims.items():
        if axis.name == name:
            reps = -(-size // value.shape[dim])
            value = torch.cat([value] * reps, dim=dim).narrow(dim, 0, size)
    return value


def _check_other_sizes(torch: Any, module: Any, program: Any, bound: Bound, axes: Axes) -> None:
    """Refuse an export that computes another function at other sizes of a declared axis.

    torch.export traced ``adaptive_avg_pool2d(x, (4, 4))`` of an image with dynamic sides as an
    AveragePool with the example's kernel: at 8x8 the graph answered [N, 12] where the module
    answers [N, 48], and the server, which has only the graph, published and served that. The
    exported program (torch, not onnxruntime) shows it here: each axis is tried at one other
    size, its min (or twice the example's, within max), against the module itself. A size the
    module itself fails at is left to the server's runs at the bounds."""
    if not axes or any(not isinstance(v, torch.Tensor) for v in bound.arguments.values()):
        return
    names = {id(value): name for name, value in bound.named.items()}
    sizes: dict[str, tuple[int, DynamicAxis]] = {}
    for name, dims in axes.items():
        for dim, axis in dims.items():
            sizes.setdefault(axis.name, (int(bound.named[name].shape[dim]), axis))
    for axis_name, (size, axis) in sizes.items():
        other = axis.min if axis.min != size else 2 * size
        if axis.max is not None:
            other = min(other, axis.max)
        if other == size:
            continue

        def resize(value: Any, axis_name: str = axis_name, other: int = other) -> Any:
            return _resized(torch, value, axes.get(names.get(id(value), ""), {}), axis_name, other)

        args = tuple(resize(a) for a in bound.args)
        kwargs = {k: resize(v) for k, v in bound.kwargs.items()}
        try:
            with torch.no_grad():
                want = flatten_outputs(torch, module(*args, **kwargs))
                got = flatten_outputs(torch, program.exported_program.module()(*args, **kwargs))
        except Exception:
            continue
        for out, tensor in want.items():
            mine = got.get(out)
            if mine is not None and mine.shape == tensor.shape:
                if np.allclose(_numpy(mine), _numpy(tensor), _RTOL, _ATOL, equal_nan=True):
                    continue
                what = "other values"
            else:
                shape = "nothing" if mine is None else list(mine.shape)
                what = f"shape {shape} where the module's is {list(tensor.shape)}"
            raise ConversionError(
                f"{type(module).__name__} exports wrongly at {axis_name}={other} (the example has "
                f"{size}): the exported graph's {out!r} has {what}, since torch.export traced a "
                "size-dependent op (adaptive pooling, a size computed in Python) with the "
                "example's sizes; write that part for any size (a global pooling as "
                "x.mean((2, 3)), sizes from x.shape), or drop the axis from dynamic_axes",
                kind="CONVERSION_FAILED",
            )


def _forget_rnn_dispatch(torch: Any) -> None:
    """For a dynamic sequence length, torch.onnx swaps a while-loop GRU and LSTM in for the
    export by setting the ops' Python kernels directly (torch/export/_patches.py, torch 2.13),
    which leaves each op's dispatch cache as an earlier export filled it. So the second upload
    of a recurrent module in one process unrolled the loop and fixed the sequence length
    ("the exporter fixed dim 1"), though the first had exported it dynamic. Emptying the caches
    makes every export look the kernels up afresh, as the first one did."""
    for op in (torch.ops.aten.gru.input, torch.ops.aten.lstm.input):
        cache = getattr(op, "_dispatch_cache", None)
        if isinstance(cache, dict):
            cache.clear()


def _check_graph(graph: Any, bound: Bound, out_names: list[str], axes: Axes) -> list[str]:
    """The graph's input names in its order: exactly the bound names, the declared axes
    symbolic, the outputs the module's own."""
    initializers = {init.name for init in graph.initializer}
    graph_inputs = [v.name for v in graph.input if v.name not in initializers]
    graph_outputs = [v.name for v in graph.output]
    if sorted(graph_inputs) != sorted(bound.named):
        missing = sorted(set(bound.named) - set(graph_inputs))
        hint = (
            f"; the graph does not use {', '.join(missing)} (the exporter drops unused inputs): "
            "leave it out of example_inputs"
            if missing and set(graph_inputs) <= set(bound.named)
            else ""
        )
        raise InvalidInputError(
            f"the exported graph takes inputs {graph_inputs}, but example_inputs name "
            f"{list(bound.named)}{hint}"
        )
    for name, declared in axes.items():
        value = next(v for v in graph.input if v.name == name)
        shape = value.type.tensor_type.shape.dim
        for dim, a in declared.items():
            if not shape[dim].dim_param:
                raise InvalidInputError(
                    f"the exporter fixed dim {dim} ({a.name}) of {name!r} to "
                    f"{shape[dim].dim_value}: the model specializes on its size; write it with "
                    "x.shape[...] or -1 instead of a literal size"
                )
    if graph_outputs != out_names:
        raise InvalidInputError(
            f"the exported graph gives outputs {graph_outputs}, the module returns {out_names}: "
            "wrap the model so that forward returns a tensor or a tuple of tensors"
        )
    return graph_inputs


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _summary(exc: BaseException) -> str:
    """The line torch.onnx puts under "## Exception summary" (the cause, with its class), else
    the exception's first line; without the terminal colours the exporter writes."""
    lines = [_ANSI.sub("", line).strip() for line in str(exc).splitlines()]
    lines = [line for line in lines if line]
    for index, line in enumerate(lines):
        if line.startswith("## Exception summary") and index + 1 < len(lines):
            return lines[index + 1][:300]
    return (lines[0] if lines else type(exc).__name__)[:300]


def _specializes(exc: BaseException) -> bool:
    """torch.export's refusal of a dim the model fixes (its "Constraints violated" family)."""
    text = f"{type(exc).__name__}: {exc}"
    return any(
        marker in text
        for marker in ("Constraints violated", "specialized", "ConstraintViolation", "Not all")
    )


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in lines:
        if "specialized" in line or "must be" in line or "Constraints" in line:
            return line[:300]
    return lines[0][:300] if lines else type(exc).__name__
