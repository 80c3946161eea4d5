"""The quantization registry: every mode a ``QuantizationSpec.mode`` may name.

``QUANTIZERS`` holds the modes that build one variant of the fp32 graph; ``NONE`` and ``AUTO`` are
the two selectors, which build nothing of their own: ``none`` keeps fp32, ``auto`` builds every
quantizer whose ``auto_skip`` does not object and lets the child pick the fastest within budget.
Adding a mode is adding a ``Quantizer`` to ``QUANTIZERS``: validation (``mode``), the child's plan
(``plan``), the pipeline and the docs table (``markdown_table``) read it from there.

Builders run in the conversion child only and import onnxruntime.quantization (and the child's
``worker.graph``) when called.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ferry.server.convert.strategies import by_name
from ferry.server.errors import InvalidArgument, first_line

if TYPE_CHECKING:
    import numpy as np

    from ferry.server.convert.spec import QuantizationSpec

# auto keeps fp32 unless a variant is clearly faster: latency differences smaller than this are
# within the noise of a shared machine, and a variant always costs some accuracy.
AUTO_MIN_SPEEDUP = 1.15
CALIBRATION_BATCH = 16
_FLOAT_TYPES = (1, 10, 11, 16)  # onnx.TensorProto FLOAT, FLOAT16, DOUBLE, BFLOAT16
FEW_CALIBRATION_SAMPLES = 100
# Calibration method name -> onnxruntime.quantization.CalibrationMethod member.
CALIBRATION_METHODS = {"minmax": "MinMax", "percentile": "Percentile"}
DEFAULT_CALIBRATION = "minmax"


@dataclass(frozen=True)
class GraphFacts:
    """What ``auto_skip`` rules and caveats may look at: measured by the child on the fp32 graph."""

    has_conv: bool = False


class CalibrationData(Protocol):
    """Calibration samples (``worker.parity.Samples``): input name -> batches of [n, ...]."""

    def __len__(self) -> int: ...

    def batches(self, size: int) -> Iterator[dict[str, np.ndarray]]: ...


@dataclass(frozen=True)
class BuildInputs:
    base: Path  # the fp32 graph
    target: Path  # where the variant goes
    spec: QuantizationSpec
    calibration: CalibrationData | None  # set when the quantizer needs_calibration
    # Write the variant as <target> + <target>.data (models over 2 GiB: worker/external).
    external: bool = False


def _tries(facts: GraphFacts, spec: QuantizationSpec) -> str:
    return ""


def _no_caveat(facts: GraphFacts) -> str:
    return ""


@dataclass(frozen=True)
class Quantizer:
    """A mode that builds one variant, named like the mode."""

    name: str
    builds: str  # what the variant is
    use_for: str  # when to ask for it
    needs_calibration: bool
    build: Callable[[BuildInputs], str]  # writes the variant; returns a note ('' when none)
    auto_rule: str = "always"  # when auto builds it, in words (the docs' auto row)
    # '' when auto builds it for this graph and spec, else why not (the report's "skipped").
    auto_skip: Callable[[GraphFacts, QuantizationSpec], str] = _tries
    # A note the report carries whenever the variant is built for this graph.
    caveat: Callable[[GraphFacts], str] = _no_caveat
    chooses: bool = field(default=False, init=False)  # publishes its one variant

    def candidates(self) -> Sequence[Quantizer]:
        return (self,)

    def plan(self, facts: GraphFacts, spec: QuantizationSpec) -> Plan:
        return Plan([self], {}, _caveats([self], facts))


@dataclass(frozen=True)
class Selector:
    """``none`` or ``auto``: a mode that names no variant of its own."""

    name: str
    builds: str
    use_for: str
    chooses: bool  # True: the child picks among what was built (auto's rule)
    candidates: Callable[[], Sequence[Quantizer]]  # what the mode may build

    def plan(self, facts: GraphFacts, spec: QuantizationSpec) -> Plan:
        variants, skipped = [], {}
        for quantizer in self.candidates():
            why = quantizer.auto_skip(facts, spec)
            if why:
                skipped[quantizer.name] = why
            else:
                variants.append(quantizer)
        return Plan(variants, skipped, _caveats(variants, facts))


Mode = Quantizer | Selector


@dataclass
class Plan:
    variants: list[Quantizer]  # built in this order, after fp32
    skipped: dict[str, str]  # quantizer name -> why auto did not build it
    notes: dict[str, str]  # quantizer name -> a caveat the report carries

    @property
    def needs_calibration(self) -> bool:
        return any(q.needs_calibration for q in self.variants)


def _caveats(variants: Sequence[Quantizer], facts: GraphFacts) -> dict[str, str]:
    return {q.name: note for q in variants if (note := q.caveat(facts))}


# ---- the builders (conversion child only) ----

_RANGE_NOTE = (
    "weights quantized to 7 bits (reduce_range): this CPU has no VNNI/AMX, and onnxruntime's "
    "u8s8 kernels there add pairs of products in saturating 16-bit lanes"
)


def reduce_range() -> bool:
    """7-bit weights unless the CPU has int8 dot-product instructions (VNNI or AMX).

    Without them onnxruntime's u8s8 GEMM sums pairs of 8-bit products in 16-bit lanes that
    saturate: measured on an AVX2-only EPYC, dynamic int8 fell to cosine 0.991-0.996 against
    fp32, and 7-bit weights brought it back to >= 0.9999 at the same speed. Quantization is
    decided where the model will be served (the conversion runs on the serving machine)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True  # unknown CPU: the safe choice
    return not any(f in flags for f in (" avx512_vnni", " avx_vnni", " amx_int8"))


def _dynamic_int8(job: BuildInputs) -> str:
    """Quantize a constant-folded copy of the graph: the exporter computes an LSTM's weights
    from initializers (Slice/Concat/Unsqueeze), and onnxruntime's quantizer only quantizes an
    LSTM whose W and R *are* initializers; folded, it becomes DynamicQuantizeLSTM."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from ferry.server.convert import external_data as external

    folded = job.target.with_name(job.target.stem + ".folded.onnx")
    notes = [_fold_constants(job.base, folded, job.external)]
    source = folded if folded.exists() else job.base
    narrow = reduce_range()
    quantize_dynamic(
        source,
        job.target,
        weight_type=QuantType.QInt8,
        reduce_range=narrow,
        use_external_data_format=job.external,
    )
    notes.append(_coverage_note(source, job.target))
    folded.unlink(missing_ok=True)
    (folded.parent / external.data_name(folded)).unlink(missing_ok=True)
    notes.append(_RANGE_NOTE if narrow else "")
    return "; ".join(n for n in notes if n)


def _fold_constants(base: Path, target: Path, external: bool) -> str:
    """onnxruntime's BASIC level: constant folding and standard-operator fusions only, so the
    quantizer still sees the operators it knows; '' on success, else a note (no copy)."""
    import onnxruntime as ort

    from ferry.server.convert import external_data

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    external_data.session_options(options, target, external)
    try:
        ort.InferenceSession(str(base), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        target.unlink(missing_ok=True)
        return f"quantized without constant folding ({first_line(exc)})"
    return ""


# Below this fraction of the weights quantized, the int8 variant is mostly fp32: say so.
MOSTLY_FP32 = 0.5


def _coverage_note(source: Path, target: Path) -> str:
    """'' when most weights were quantized, else how much stayed fp32 and in which operators
    (a GRU has no int8 kernel in onnxruntime: its weights stay fp32 and the file barely
    shrinks)."""
    import onnx
    from onnxruntime.quantization.registry import IntegerOpsRegistry

    # Dims and types are all this needs: the graphs, never the weights.
    before = onnx.load(str(source), load_external_data=False)
    after = onnx.load(str(target), load_external_data=False)
    floats = {
        i.name: math.prod(i.dims)
        for i in before.graph.initializer
        if len(i.dims) >= 2 and i.data_type in _FLOAT_TYPES
    }
    total = sum(floats.values())
    if not total:
        return ""
    left = {
        i.name for i in after.graph.initializer if i.name in floats and i.data_type in _FLOAT_TYPES
    }
    kept = sum(floats[name] for name in left)
    quantized = 1.0 - kept / total
    if quantized >= MOSTLY_FP32:
        return ""
    ops = sorted(
        {node.op_type for node in before.graph.node if any(name in left for name in node.input)}
    )
    what = (
        "nothing substantial was quantized"
        if quantized < 0.05
        else (f"only {quantized:.0%} of the weights were quantized")
    )
    return (
        f"{what}: {kept / total:.0%} stay fp32 in {', '.join(ops) or 'other operators'} "
        f"(onnxruntime's dynamic quantization covers {', '.join(sorted(IntegerOpsRegistry))}), "
        "so the file barely shrinks"
    )


def _fp16(job: BuildInputs) -> str:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from ferry.server.convert import external_data as external

    # Given the path, onnxruntime infers shapes file to file (infer_shapes_path), which works
    # over 2 GiB; a loaded model would be serialized for it, which fails there.
    model = convert_float_to_float16(str(job.base), keep_io_types=True)
    external.save(model, job.target, job.external)
    return ""


def calibration_method(name: str) -> str:
    """The onnxruntime CalibrationMethod member for ``name``; unknown names are refused."""
    try:
        return CALIBRATION_METHODS[name]
    except KeyError:
        raise InvalidArgument(
            f"unknown calibration method {name!r}: use one of {', '.join(CALIBRATION_METHODS)}"
        ) from None


def _static_int8(job: BuildInputs) -> str:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    if job.calibration is None:
        raise InvalidArgument("static_int8 needs quantization.calibration_file")
    samples: CalibrationData = job.calibration

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = samples.batches(CALIBRATION_BATCH)

        def get_next(self) -> dict[str, Any] | None:
            return next(self._batches, None)

    notes = []
    from ferry.server.convert import external_data as external

    prepared = job.target.with_name(job.target.stem + ".pre.onnx")
    how = _pre_process(job.base, prepared, job.external)
    if how:
        notes.append(how)
    source = prepared if prepared.exists() else job.base
    if len(samples) < FEW_CALIBRATION_SAMPLES:
        notes.append(
            f"calibrated on {len(samples)} samples; {FEW_CALIBRATION_SAMPLES}+ give steadier ranges"
        )
    narrow = reduce_range()
    if narrow:
        notes.append(_RANGE_NOTE)
    method = getattr(CalibrationMethod, calibration_method(job.spec.calibration))
    cache = job.target.with_name(job.target.stem + ".ranges.json")
    calibrated_apart = _calibrate_apart(source, cache, Reader, method, job.external)
    quantize_static(
        source,
        job.target,
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=job.spec.per_channel,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=method,
        reduce_range=narrow,
        use_external_data_format=job.external,
        **({"calibration_cache_path": str(cache)} if calibrated_apart else {}),
    )
    cache.unlink(missing_ok=True)
    prepared.unlink(missing_ok=True)
    (prepared.parent / external.data_name(prepared)).unlink(missing_ok=True)
    return "; ".join(notes)


def _calibrate_apart(
    source: Path, cache: Path, reader: Callable[[], Any], method: Any, external: bool
) -> bool:
    """Compute the activation ranges into ``cache`` before quantize_static runs, when this
    onnxruntime can take them from a cache file; False when it cannot (it then calibrates
    itself). quantize_static loads the model first and keeps it while its calibrator holds a
    second copy and a session over an augmented third: measured on 2.5 GiB of weights, the
    child peaked at 4.4x the weights that way. Apart, calibration holds its own copies only,
    and quantization starts after they are freed."""
    import inspect
    import tempfile

    from onnxruntime.quantization import calibrate, quantize_static
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    if "calibration_cache_path" not in inspect.signature(quantize_static).parameters or not (
        hasattr(calibrate, "save_tensors_data")
    ):
        return False
    with tempfile.TemporaryDirectory(dir=cache.parent) as tmp:
        calibrator = calibrate.create_calibrator(
            source,
            list(set(QLinearOpsRegistry) | set(QDQRegistry)),  # what quantize_static calibrates
            augmented_model_path=str(Path(tmp) / "augmented_model.onnx"),
            calibrate_method=method,
            use_external_data_format=external,
        )
        calibrator.collect_data(reader())
        ranges = calibrator.compute_data()
        del calibrator
    calibrate.save_tensors_data(ranges, cache)
    return True


def _pre_process(base: Path, target: Path, external: bool) -> str:
    """quant_pre_process can crash in symbolic shape inference: retry without it, then skip it."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from ferry.server.convert import external_data

    saving: dict[str, Any] = (
        {
            "save_as_external_data": True,
            "all_tensors_to_one_file": True,
            "external_data_location": external_data.data_name(target),
        }
        if external
        else {}
    )
    try:
        quant_pre_process(base, target, **saving)
        return ""
    except Exception as first:
        try:
            quant_pre_process(base, target, skip_symbolic_shape=True, **saving)
            return f"pre-processing ran without symbolic shape inference ({first_line(first)})"
        except Exception as second:
            target.unlink(missing_ok=True)
            return f"quantized without pre-processing ({first_line(second)})"


# ---- the registry ----

CONV_TRAP = (
    "dynamic int8 turns convolutions into ConvInteger, typically 4-12x slower than fp32 on CPU: "
    "prefer static_int8 with calibration data for convolutional models"
)
FP16_NOTE = (
    "fp16 halves the file, but onnxruntime's CPU provider computes in fp32 (it casts back), so "
    "expect no speed-up on CPU"
)
NO_CALIBRATION = "no quantization.calibration_file was given"

QUANTIZERS: dict[str, Quantizer] = {
    q.name: q
    for q in (
        Quantizer(
            name="dynamic_int8",
            builds="int8 weights, activations quantized at run time (`quantize_dynamic`, QInt8); "
            "LSTMs too, GRUs stay fp32 (no int8 kernel: the report says so)",
            use_for="Linear/MatMul-heavy models (MLPs, transformers), when the CPU has fast int8 "
            "(VNNI/AMX); no calibration data needed",
            needs_calibration=False,
            build=_dynamic_int8,
            auto_rule="not for convolutional models",
            auto_skip=lambda facts, spec: CONV_TRAP if facts.has_conv else "",
            caveat=lambda facts: CONV_TRAP if facts.has_conv else "",
        ),
        Quantizer(
            name="static_int8",
            builds="int8 weights and activations, QDQ format, per-channel, ranges calibrated on "
            "`calibration_inputs` (MinMax or Percentile)",
            use_for=f"**convolutional models**; needs {FEW_CALIBRATION_SAMPLES}+ representative "
            "samples",
            needs_calibration=True,
            build=_static_int8,
            auto_rule="when calibration data is given",
            auto_skip=lambda facts, spec: "" if spec.calibration_file else NO_CALIBRATION,
        ),
        Quantizer(
            name="fp16",
            builds="fp16 weights, fp32 inputs/outputs",
            use_for="halving the file; **no speed-up on CPU**",
            needs_calibration=False,
            build=_fp16,
            caveat=lambda facts: FP16_NOTE,
        ),
    )
}

NONE = Selector(
    name="none",
    builds="fp32 only",
    use_for="the reference; anything small",
    chooses=False,
    candidates=lambda: (),
)
AUTO = Selector(
    name="auto",
    builds="fp32, then each mode above unless auto skips it for the model",
    use_for="letting the server pick: the fastest variant within the accuracy budget **if it is "
    f"at least {AUTO_MIN_SPEEDUP}x faster than fp32**, else fp32 (`keep_slower=True` picks the fastest within "
    "budget even when slower)",
    chooses=True,
    candidates=lambda: tuple(QUANTIZERS.values()),
)
DEFAULT = NONE


def modes() -> list[Mode]:
    """Every mode, in the order they are documented: none, the quantizers, auto."""
    return [NONE, *QUANTIZERS.values(), AUTO]


def names() -> list[str]:
    return [m.name for m in modes()]


def mode(name: str) -> Mode:
    """The mode ``name`` selects; an unknown name is refused with every known one."""
    return by_name(modes(), name, "quantization mode")


def uses_calibration(selected: Mode) -> bool:
    """Whether calibration data can serve ``selected`` (a mode that may build a quantizer that
    needs it)."""
    return any(q.needs_calibration for q in selected.candidates())


def requires_calibration(selected: Mode) -> bool:
    """Whether ``selected`` cannot run without calibration data: an explicit mode whose variant
    needs it (auto skips such a quantizer instead)."""
    return not selected.chooses and uses_calibration(selected)


def plan(spec: QuantizationSpec, facts: GraphFacts) -> Plan:
    return mode(spec.mode).plan(facts, spec)


def markdown_table() -> str:
    """docs/conversion.md's quantization table (a test keeps the two equal)."""
    rows = ["| `quantization=` | what it builds | use it for |", "|---|---|---|"]
    for m in modes():
        builds = m.builds
        if m is AUTO:
            rules = ", ".join(f"{q.name} ({q.auto_rule})" for q in QUANTIZERS.values())
            builds = f"{builds}: {rules}"
        default = " (default)" if m is DEFAULT else ""
        rows.append(f'| `"{m.name}"`{default} | {builds} | {m.use_for} |')
    return "\n".join(rows)
