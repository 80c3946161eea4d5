"""The quantize stage: int8 and fp16 variants of the fp32 graph, with onnxruntime.quantization.

Never torch's eager quantized modules: neither exporter can export them. Which variants a mode
builds is decided here (``plan``) so that "auto" never spends time on one known to lose: dynamic
int8 turns each Conv into ConvInteger, 4-12x slower than fp32 on CPU, so auto skips it for convs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from ferry.server.convert.spec import QuantizationSpec
from ferry.server.convert.worker.graph import first_line, has_conv
from ferry.server.convert.worker.parity import Samples
from ferry.server.errors import ConversionFailed, InvalidArgument

# auto keeps fp32 unless a variant is clearly faster: latency differences smaller than this are
# within the noise of a shared machine, and a variant always costs some accuracy.
AUTO_MIN_SPEEDUP = 1.15
CALIBRATION_BATCH = 16
FEW_CALIBRATION_SAMPLES = 100
CONV_TRAP = (
    "dynamic int8 turns convolutions into ConvInteger, typically 4-12x slower than fp32 on CPU: "
    "prefer static_int8 with calibration data for convolutional models"
)
FP16_NOTE = (
    "fp16 halves the file, but onnxruntime's CPU provider computes in fp32 (it casts back), so "
    "expect no speed-up on CPU"
)


@dataclass
class Plan:
    variants: list[str]
    skipped: dict[str, str]  # variant -> why auto did not build it
    notes: dict[str, str]  # variant -> a caveat the report carries


def plan(spec: QuantizationSpec, model: onnx.ModelProto) -> Plan:
    convs = has_conv(model)
    notes = {"fp16": FP16_NOTE}
    if spec.mode == "none":
        return Plan([], {}, {})
    if spec.mode != "auto":
        if spec.mode == "dynamic_int8" and convs:
            notes["dynamic_int8"] = CONV_TRAP
        return Plan([spec.mode], {}, notes)
    variants, skipped = [], {}
    if convs:
        skipped["dynamic_int8"] = CONV_TRAP
    else:
        variants.append("dynamic_int8")
    if spec.calibration_file:
        variants.append("static_int8")
    else:
        skipped["static_int8"] = "no quantization.calibration_file was given"
    variants.append("fp16")
    return Plan(variants, skipped, notes)


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


def build(
    name: str, base: Path, target: Path, spec: QuantizationSpec, calibration: Samples | None
) -> str:
    """Write variant ``name`` of ``base`` to ``target``; returns a note ('' when none)."""
    try:
        if name == "dynamic_int8":
            narrow = reduce_range()
            quantize_dynamic(base, target, weight_type=QuantType.QInt8, reduce_range=narrow)
            return _RANGE_NOTE if narrow else ""
        if name == "fp16":
            from onnxruntime.transformers.float16 import convert_float_to_float16

            model = convert_float_to_float16(onnx.load(str(base)), keep_io_types=True)
            onnx.save(model, str(target))
            return ""
        if calibration is None:
            raise InvalidArgument("static_int8 needs quantization.calibration_file")
        return _static(base, target, spec, calibration)
    except (InvalidArgument, ConversionFailed):
        raise
    except Exception as exc:
        raise ConversionFailed(
            f"onnxruntime.quantization could not build the {name} variant ({first_line(exc)}); "
            "convert with another quantization mode"
        ) from None


class _Reader(CalibrationDataReader):
    def __init__(self, samples: Samples) -> None:
        self._batches = samples.batches(CALIBRATION_BATCH)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def _static(base: Path, target: Path, spec: QuantizationSpec, samples: Samples) -> str:
    notes = []
    prepared = target.with_name(target.stem + ".pre.onnx")
    how = _pre_process(base, prepared)
    if how:
        notes.append(how)
    source = prepared if prepared.exists() else base
    if len(samples) < FEW_CALIBRATION_SAMPLES:
        notes.append(
            f"calibrated on {len(samples)} samples; {FEW_CALIBRATION_SAMPLES}+ give steadier ranges"
        )
    method = (
        CalibrationMethod.MinMax if spec.calibration == "minmax" else CalibrationMethod.Percentile
    )
    narrow = reduce_range()
    if narrow:
        notes.append(_RANGE_NOTE)
    quantize_static(
        source,
        target,
        _Reader(samples),
        quant_format=QuantFormat.QDQ,
        per_channel=spec.per_channel,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=method,
        reduce_range=narrow,
    )
    prepared.unlink(missing_ok=True)
    return "; ".join(notes)


def _pre_process(base: Path, target: Path) -> str:
    """quant_pre_process can crash in symbolic shape inference: retry without it, then skip it."""
    try:
        quant_pre_process(base, target)
        return ""
    except Exception as first:
        try:
            quant_pre_process(base, target, skip_symbolic_shape=True)
            return f"pre-processing ran without symbolic shape inference ({first_line(first)})"
        except Exception as second:
            target.unlink(missing_ok=True)
            return f"quantized without pre-processing ({first_line(second)})"


def _score(entry: dict[str, Any]) -> float:
    """Geometric mean of the speed-ups over the measured batch sizes (fp32 scores 1)."""
    ratios = [r for r in entry.get("speedup_vs_fp32", {}).values() if r > 0]
    return math.exp(sum(math.log(r) for r in ratios) / len(ratios)) if ratios else 0.0


def choose(entries: list[dict[str, Any]], *, keep_slower: bool) -> tuple[str, str]:
    """auto's pick among benchmarked variants (fp32 first): (name, the reason, for the report).

    The fastest variant within the accuracy budget wins if it beats fp32 by AUTO_MIN_SPEEDUP;
    with ``keep_slower`` the fastest non-fp32 variant within budget wins even when slower.
    """
    fp32, candidates = entries[0], [e for e in entries[1:] if e.get("within_budget")]
    scores = ", ".join(f"{e['name']} {_score(e):.2f}x" for e in entries)
    if not candidates:
        return fp32["name"], f"no quantized variant is within the accuracy budget ({scores})"
    best = max(candidates, key=_score)
    if keep_slower or _score(best) >= AUTO_MIN_SPEEDUP:
        rule = "keep_slower" if keep_slower else f"at least {AUTO_MIN_SPEEDUP}x faster than fp32"
        return best["name"], f"fastest within budget ({rule}): {scores}"
    return fp32[
        "name"
    ], f"no variant within budget is {AUTO_MIN_SPEEDUP}x faster than fp32: {scores}"
