"""Validating a conversion before a process is spent on it: the one validation module.

Everything decidable without torch and without the model is decided here, so a typo in a mode or
an amount out of range comes back at once as INVALID_ARGUMENT naming the field, instead of as a
failed job minutes later. The server runs ``check_job`` and ``validate_spec`` when a Convert
request arrives; the conversion child runs ``check_job`` again first, so both apply the same rule
(the refusal of code-bearing formats lives here, and only here, and runs before anything opens
the file). What needs the model itself (does the architecture exist, do the weights fit, does
the graph export) is the child's to report; how close the converted outputs are to the original
is ``worker.parity``'s.
"""

from __future__ import annotations

import math
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ferry.server.convert.spec import (
    BENCHMARK_MODES,
    CODE_BEARING_FORMATS,
    ONNX_FORMATS,
    SOURCE_FORMATS,
    ConversionSpec,
    InputSpec,
    Job,
)
from ferry.server.convert.strategies import pruning as pruning_methods
from ferry.server.convert.strategies import quantization as quantization_modes
from ferry.server.core.config import MAX_BATCH_SIZE_LIMIT, parse_config
from ferry.server.errors import FailedPrecondition, InvalidArgument

MAX_PRUNING_AMOUNT = pruning_methods.MAX_AMOUNT
MIN_OPSET = 13
# Pruned as a torch module (registered architecture) or on the ONNX graph (any ONNX upload).
PRUNABLE_FORMATS = ("state_dict", "safetensors", "onnx")
USE_INSTEAD = (
    "upload the weights as a state_dict (torch.save(model.state_dict(), path)) or as safetensors, "
    "with the name of a registered architecture, or export the model to ONNX"
)

ROLLOUTS = ("", "shadow")  # how a conversion's new version meets live traffic


def max_opset() -> int:
    import onnx.defs

    return int(onnx.defs.onnx_opset_version())


def check_job(job: Job) -> None:
    """Raise the error the job would fail with for reasons visible in the spec alone."""
    fmt = job.source_format
    if fmt not in SOURCE_FORMATS:
        raise InvalidArgument(
            f"unknown source format {fmt!r}: use one of {', '.join(SOURCE_FORMATS)}"
        )
    if fmt in CODE_BEARING_FORMATS and not job.allow_code_formats:
        raise FailedPrecondition(
            f"{fmt} sources are refused because loading them executes code from the file; the "
            f"server operator must enable them with --allow-code-formats, or {USE_INSTEAD}"
        )
    spec = job.spec
    pruning, quantization = spec.pruning, spec.quantization
    method = pruning_methods.method(pruning.method)  # an unknown name is refused here
    if method is not pruning_methods.NONE:
        if fmt == "onnx_archive":
            raise InvalidArgument(
                "an onnx_archive source (a graph with external data) cannot be pruned: graph "
                "pruning takes a self-contained ONNX file (under 2 GiB); prune the model before "
                f"exporting it, or convert with pruning.method {pruning_methods.NONE.name!r}"
            )
        if fmt not in PRUNABLE_FORMATS:
            raise InvalidArgument(
                f"a {fmt} source cannot be pruned: upload the model as ONNX (pruned on its "
                "graph; ConversionClient.upload(name, module, example_inputs=...) does that), "
                "or its weights as a state_dict or safetensors of a registered architecture, "
                f"or convert with pruning.method {pruning_methods.NONE.name!r}"
            )
        if not 0.0 <= pruning.amount <= MAX_PRUNING_AMOUNT:
            raise InvalidArgument(
                f"pruning.amount must be within [0, {MAX_PRUNING_AMOUNT}], got {pruning.amount}"
            )
    mode = quantization_modes.mode(quantization.mode)
    quantization_modes.calibration_method(quantization.calibration)
    if quantization_modes.requires_calibration(mode) and not quantization.calibration_file:
        others = [q.name for q in quantization_modes.QUANTIZERS.values() if not q.needs_calibration]
        raise InvalidArgument(
            f"{mode.name} needs quantization.calibration_file: an .npz holding, per input name, "
            "[N, ...] representative samples (100 or more recommended); or use "
            f"{' or '.join(others) or 'another mode'}"
        )
    if spec.benchmark not in BENCHMARK_MODES:
        raise InvalidArgument(
            f"unknown benchmark mode {spec.benchmark!r}: use one of {', '.join(BENCHMARK_MODES)}"
        )
    if spec.rollout not in ROLLOUTS:
        raise InvalidArgument(
            f"unknown rollout {spec.rollout!r}: use one of {', '.join(repr(r) for r in ROLLOUTS)}"
        )
    if not 0 < spec.rollout_fraction <= 1:
        raise InvalidArgument(
            f"rollout_fraction must be within (0, 1], got {spec.rollout_fraction}"
        )
    if spec.benchmark == "off" and mode.chooses:
        raise InvalidArgument(
            f"quantization {mode.name!r} picks the variant by its measured speed, which "
            'benchmark "off" does not measure: use benchmark "quick", or name the mode you want '
            f"({', '.join(quantization_modes.QUANTIZERS)})"
        )
    if fmt not in ONNX_FORMATS and not MIN_OPSET <= spec.opset <= max_opset():
        raise InvalidArgument(
            f"opset must be within [{MIN_OPSET}, {max_opset()}], got {spec.opset}"
        )
    if spec.max_batch_size < 1 or spec.validation.samples < 1:
        raise InvalidArgument("max_batch_size and validation.samples must be at least 1")
    names = [i.name for i in spec.inputs]
    if len(set(names)) != len(names) or not all(names):
        raise InvalidArgument(f"input names must be unique and non-empty, got {names}")


# Formats whose file carries no input signature: the spec must give it.
NEEDS_INPUTS = ("state_dict", "safetensors", "torchscript")
DATATYPES = (
    "BOOL",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FP16",
    "BF16",
    "FP32",
    "FP64",
)
MAX_INPUTS = 64
MAX_RANK = 16
MAX_SAMPLE_ELEMENTS = 1 << 26  # a 3 x 2160 x 3840 image is 25M
MAX_SAMPLES = 100_000


@dataclass
class SpecTensors:
    """Tensors that travel with a spec; stored as .npz files in the job folder."""

    calibration: dict[str, np.ndarray] = field(default_factory=dict)
    samples: dict[str, np.ndarray] = field(default_factory=dict)
    references: dict[str, np.ndarray] = field(default_factory=dict)


def validate_spec(spec: ConversionSpec, tensors: SpecTensors, *, source_format: str) -> None:
    """What ``check_job`` (shared with the child) does not cover: names, ranges,
    the tensors and the serving config."""
    _check_inputs(spec, source_format)
    if not 1 <= spec.max_batch_size <= MAX_BATCH_SIZE_LIMIT:
        raise InvalidArgument(f"max_batch_size must be within 1..{MAX_BATCH_SIZE_LIMIT}")
    p = spec.pruning
    method = pruning_methods.method(p.method)
    if method is pruning_methods.NONE and p.amount:
        raise InvalidArgument(
            f"pruning.amount is set but pruning.method is {method.name!r}: choose a method"
        )
    if method is not pruning_methods.NONE and not p.amount > 0.0:
        raise InvalidArgument(f"pruning.amount must be above 0 for {p.method!r}, got {p.amount}")
    q = spec.quantization
    mode = quantization_modes.mode(q.mode)
    if quantization_modes.requires_calibration(mode) and not tensors.calibration:
        # Before check_job, whose message names the contract's calibration_file: a field no
        # request has, so a client was told to set something it could not find.
        others = [m.name for m in quantization_modes.QUANTIZERS.values() if not m.needs_calibration]
        raise InvalidArgument(
            f"{mode.name} needs quantization.calibration_inputs: per input name, [N, ...] "
            "representative samples (100 or more recommended; Quantization(calibration_inputs="
            "...) in the SDK, --calibration FILE.npz in the CLI); or use "
            f"{' or '.join(others) or 'another mode'}"
        )
    if tensors.calibration and not quantization_modes.uses_calibration(mode):
        served = [
            m.name for m in quantization_modes.modes() if quantization_modes.uses_calibration(m)
        ]
        raise InvalidArgument(
            f"calibration inputs only serve the quantization modes {', '.join(served)}; "
            f"quantization.mode is {q.mode!r}"
        )
    v = spec.validation
    for name, value, lo, hi in (
        ("rtol", v.rtol, 0.0, 1.0),
        ("atol", v.atol, 0.0, 1e3),
        ("min_cosine", v.min_cosine, -1.0, 1.0),
        ("min_top1_agreement", v.min_top1_agreement, 0.0, 1.0),
    ):
        if not (math.isfinite(value) and lo <= value <= hi):
            raise InvalidArgument(f"validation.{name} {value} is out of range [{lo}, {hi}]")
    if not 1 <= v.samples <= 10_000:
        raise InvalidArgument(f"validation.samples {v.samples} is out of range: use 1..10000")
    if tensors.references and not tensors.samples:
        raise InvalidArgument(
            "validation.reference_outputs need the sample_inputs they were computed from"
        )
    names = {i.name for i in spec.inputs}
    _check_set("quantization.calibration_inputs", tensors.calibration, names)
    _check_set("validation.sample_inputs", tensors.samples, names)
    _check_set("validation.reference_outputs", tensors.references, set())
    if tensors.samples and tensors.references:
        n_in = next(iter(tensors.samples.values())).shape[0]
        name, first = next(iter(tensors.references.items()))
        n_out = first.shape[0]
        if n_in != n_out:
            # An SDK module upload sends the module's own outputs: for a model whose one output
            # has no batch dim (a mean over the batch) or not first, the user never wrote
            # reference_outputs, and "have 3 samples" named nothing they could change.
            raise InvalidArgument(
                f"validation.reference_outputs have {n_out} samples but sample_inputs have "
                f"{n_in}: output {name!r} is {list(first.shape)} for {n_in} input samples; the "
                "first dim of every output counts samples, so an output without a batch dim, or "
                "with the batch elsewhere, cannot be compared per sample: wrap the model so "
                "that forward returns the batch first"
            )
    try:
        parse_config(spec.serving_config, where="serving config")
    except InvalidArgument as exc:
        raise InvalidArgument(exc.message) from None


def _check_inputs(spec: ConversionSpec, source_format: str) -> None:
    if not spec.inputs and source_format in NEEDS_INPUTS:
        raise InvalidArgument(
            f"a {source_format} source carries no input signature: give the input specs "
            "(name, datatype, shape with -1 for dynamic dims, e.g. input FP32 [-1, 64])"
        )
    if len(spec.inputs) > MAX_INPUTS:
        raise InvalidArgument(f"{len(spec.inputs)} inputs: at most {MAX_INPUTS} are supported")
    seen: set[str] = set()
    for i in spec.inputs:
        _check_name("input", i.name)
        if i.name in seen:
            raise InvalidArgument(f"input {i.name!r} is given twice")
        seen.add(i.name)
        if i.datatype not in DATATYPES:
            raise InvalidArgument(
                f"input {i.name!r}: datatype {i.datatype!r} cannot be exported; use one of "
                f"{', '.join(DATATYPES)}"
            )
        if len(i.shape) > MAX_RANK or any(d < -1 or d == 0 for d in i.shape):
            raise InvalidArgument(
                f"input {i.name!r}: shape {i.shape} must list dims > 0, or -1 for a dynamic "
                f"dim (rank <= {MAX_RANK})"
            )
        fixed = math.prod(d for d in i.shape if d > 0)
        if fixed > MAX_SAMPLE_ELEMENTS:
            # The child builds sample inputs of this shape: 2**62 crashed it (INTERNAL).
            raise InvalidArgument(
                f"input {i.name!r}: shape {i.shape} holds {fixed} elements per sample, over "
                f"the {MAX_SAMPLE_ELEMENTS} a conversion can build samples of"
            )
        _check_axes(i)
    _check_shared_axes(spec.inputs)


def _check_axes(i: InputSpec) -> None:
    seen: set[int] = set()
    for a in i.dynamic_axes:
        where = f"input {i.name!r} dynamic axis {a.axis}"
        if a.axis == 0:
            raise InvalidArgument(
                f"{where}: dim 0 is the batch dim, which is always dynamic; name only the others"
            )
        if not 0 < a.axis < len(i.shape):
            raise InvalidArgument(f"{where}: the shape {i.shape} has no dim {a.axis}")
        if a.axis in seen:
            raise InvalidArgument(f"{where} is given twice")
        seen.add(a.axis)
        if not a.name or len(a.name) > 64 or not a.name.isidentifier():
            raise InvalidArgument(
                f"{where}: name {a.name[:80]!r} must be an identifier such as 'sequence'"
            )
        if a.min < 1 or (a.max and a.max < a.min) or a.max < 0:
            raise InvalidArgument(
                f"{where} ({a.name}): bounds {a.min}..{a.max or 'unbounded'} must have "
                "1 <= min <= max (max 0: unbounded)"
            )
        size = i.shape[a.axis]
        if size != -1 and not a.min <= size <= (a.max or size):
            raise InvalidArgument(
                f"{where} ({a.name}): the shape gives size {size}, outside its bounds "
                f"{a.min}..{a.max}: samples are made at the shape's size"
            )


def _check_shared_axes(inputs: list[InputSpec]) -> None:
    """Axes sharing a name are one size in every request: they must agree on everything."""
    first: dict[str, tuple[str, int, int, int]] = {}
    for i in inputs:
        for a in i.dynamic_axes:
            here = (i.name, i.shape[a.axis], a.min, a.max)
            there = first.setdefault(a.name, here)
            if here[1:] != there[1:]:
                raise InvalidArgument(
                    f"dynamic axis {a.name!r} is size {here[1]} in {i.name!r} "
                    f"({a.min}..{a.max or 'unbounded'}) but size {there[1]} in {there[0]!r} "
                    f"({there[2]}..{there[3] or 'unbounded'}): axes sharing a name must agree"
                )


def _check_name(what: str, name: str) -> None:
    if not name or len(name) > 256 or not name.isprintable() or "/" in name:
        raise InvalidArgument(
            f"{what} name {name[:64]!r} is invalid: use 1-256 printable characters without '/'"
        )


def _check_set(what: str, arrays: Mapping[str, np.ndarray], names: set[str]) -> None:
    if not arrays:
        return
    counts: dict[int, list[str]] = {}
    for name, array in arrays.items():
        _check_name(f"{what} tensor", name)
        if names and name not in names:
            raise InvalidArgument(f"{what}: {name!r} is not an input; inputs: {sorted(names)}")
        if array.dtype.kind not in "biuf" or array.ndim < 1:
            raise InvalidArgument(
                f"{what}: {name!r} must be a numeric tensor whose first dim counts samples"
            )
        counts.setdefault(array.shape[0], []).append(name)
    if len(counts) != 1:
        each = "; ".join(
            f"{n} in {', '.join(map(repr, names_))}" for n, names_ in sorted(counts.items())
        )
        raise InvalidArgument(
            f"{what}: tensors disagree on the sample count ({each}): the first dim of each "
            "counts samples, so an output without a batch dim cannot be compared per sample"
        )
    if not 1 <= next(iter(counts)) <= MAX_SAMPLES:
        raise InvalidArgument(f"{what}: the sample count must be within 1..{MAX_SAMPLES}")
    if names and set(arrays) != names:
        raise InvalidArgument(f"{what}: missing tensors for inputs {sorted(names - set(arrays))}")


def save_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> str:
    """np.savez's format, written member by member: np.savez would take an input named
    ``file`` or ``allow_pickle`` as its own keyword, and pickled (object) arrays are refused
    so that the child can load with ``allow_pickle=False``."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, array in arrays.items():
            with zf.open(f"{name}.npy", "w", force_zip64=True) as fh:
                np.lib.format.write_array(fh, np.ascontiguousarray(array), allow_pickle=False)
    return str(path)


def serving_config(
    *,
    max_batch_size: int | None = None,
    max_queue_delay_ms: float | None = None,
    max_queue_size: int | None = None,
    default_timeout_ms: float | None = None,
    instance_count: int | None = None,
    combine_requests: bool | None = None,
) -> dict[str, Any]:
    """The version's config.json content: only the keys the caller set."""
    batching: dict[str, Any] = {}
    for key, value in (
        ("max_batch_size", max_batch_size),
        ("max_queue_delay_ms", max_queue_delay_ms),
        ("max_queue_size", max_queue_size),
        ("default_timeout_ms", default_timeout_ms),
        ("combine_requests", combine_requests),
    ):
        if value is not None:
            batching[key] = value
    out: dict[str, Any] = {}
    if batching:
        out["batching"] = batching
    if instance_count is not None:
        out["instances"] = {"count": instance_count}
    return out
