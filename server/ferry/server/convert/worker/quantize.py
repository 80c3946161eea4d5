"""The quantize stage's child-side half: the facts auto's rules read, and auto's final pick.

Which variants a mode builds, and how each is built, is the registry's
(``ferry.server.convert.strategies.quantization``); never torch's eager quantized modules, which
neither exporter can export.
"""

from __future__ import annotations

import numpy as np
import onnx

from ferry.server.convert.strategies.quantization import (
    AUTO_MIN_SPEEDUP,
    CALIBRATION_BATCH,
    BuildInputs,
    GraphFacts,
    Quantizer,
)
from ferry.server.convert.summary import mean_speedup, speedup_spread
from ferry.server.convert.worker.graph import has_conv
from ferry.server.convert.worker.report import VariantRecord
from ferry.server.errors import ConversionFailed, InvalidArgument, first_line

__all__ = ["AUTO_MIN_SPEEDUP", "build", "choose", "facts"]


def facts(model: onnx.ModelProto) -> GraphFacts:
    return GraphFacts(has_conv=has_conv(model))


def build(quantizer: Quantizer, inputs: BuildInputs) -> str:
    """Run ``quantizer``'s builder and load what it wrote; a library failure, or a graph
    onnxruntime cannot load, becomes a ConversionFailed naming the mode."""
    try:
        note = quantizer.build(inputs)
    except (InvalidArgument, ConversionFailed):
        raise
    except Exception as exc:
        why = _calibration_failure(inputs) if quantizer.needs_calibration else ""
        if why:
            raise InvalidArgument(
                f"quantization.calibration_file: {why}, so {quantizer.name} cannot be "
                f"calibrated on them ({first_line(exc)}); give finite samples the model "
                "takes (ids within its tables, values in its domain)"
            ) from None
        raise ConversionFailed(
            f"onnxruntime.quantization could not build the {quantizer.name} variant "
            f"({first_line(exc)}); convert with another quantization mode"
        ) from None
    _check_loads(quantizer.name, inputs)
    return note


def _calibration_failure(inputs: BuildInputs) -> str:
    """Why the calibration samples themselves made the quantizer fail, or ''. Calibration runs
    the fp32 graph on them: ids past an embedding table failed the job as "could not build the
    static_int8 variant (... indices element out of data bounds); convert with another
    quantization mode", and NaN samples as "(scale issue)", advice that fixes neither. Only
    asked once the quantizer failed, so a good job pays nothing for it."""
    from ferry.server.convert.worker import parity

    if inputs.calibration is None:
        return ""
    batches = list(inputs.calibration.batches(CALIBRATION_BATCH))
    for name in batches[0] if batches else ():
        values = np.concatenate([np.ravel(feed[name]) for feed in batches])
        if values.dtype.kind == "f" and not np.isfinite(values).all():
            bad = int(np.count_nonzero(~np.isfinite(values)))
            return f"{name!r} holds NaN or infinity in {bad} of {values.size} values"
    try:
        run = parity.onnx_runner(inputs.base, 1)
        outputs = [out for feed in batches for out in run(feed) if out.dtype.kind == "f"]
    except Exception as exc:
        return f"the fp32 model fails on these samples in onnxruntime ({first_line(exc)})"
    bad = sum(int(np.count_nonzero(~np.isfinite(out))) for out in outputs)
    if bad:
        total = sum(out.size for out in outputs)
        return f"the fp32 model answers NaN or infinity in {bad} of {total} output values on them"
    return ""


def _check_loads(name: str, inputs: BuildInputs) -> None:
    """The converters can write a graph onnxruntime refuses: the fp16 one typed a value inside
    the If in the Loop of an nn.EmbeddingBag float16 where its subgraph declares float. The
    validate stage then failed the job with onnxruntime's load error and no advice, and under
    ``auto`` that one candidate failed the whole job though fp32 was fine. Loading it here (no
    graph optimization: only whether it loads) makes it a failure of this variant's build."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    try:
        ort.InferenceSession(str(inputs.target), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ConversionFailed(
            f"the {name} variant onnxruntime.quantization built does not load in onnxruntime "
            f"({first_line(exc)}); convert with another quantization mode"
        ) from None


def _score(variant: VariantRecord) -> float:
    """Geometric mean of the speed-ups over the measured batch sizes (fp32 scores 1)."""
    bench = variant.benchmark
    return mean_speedup(bench.speedup_vs_fp32 if bench is not None else None) or 0.0


def _clearly_faster(variant: VariantRecord) -> bool:
    """The benchmark's verdict (interleaved rounds, spread included); a record without one
    (older reports, tests) falls back to its median speed-up."""
    bench = variant.benchmark
    if bench is not None and bench.speed:
        return bench.speed == "faster"
    return _score(variant) >= AUTO_MIN_SPEEDUP


def _figure(variant: VariantRecord) -> str:
    """``dynamic_int8 1.92x (1.80-2.05)``: the median speed-up and, when measured, the widest
    interquartile range over the batch sizes."""
    text = f"{variant.name} {_score(variant):.2f}x"
    bench = variant.benchmark
    if bench is not None and variant.name != "fp32":
        text += speedup_spread(bench.speedup_iqr)
    if bench is not None and bench.speed == "unclear":
        text += " unclear"
    return text


def choose(variants: list[VariantRecord], *, keep_slower: bool) -> tuple[VariantRecord, str]:
    """auto's pick among benchmarked variants (fp32 first): (the variant, the reason, for the
    report).

    The fastest variant within the accuracy budget that is clearly faster than fp32 (at least
    AUTO_MIN_SPEEDUP, and faster in most rounds at every batch size) wins; a figure the noise
    leaves unclear never displaces fp32. With ``keep_slower`` the fastest non-fp32 variant
    within budget wins even when slower.
    """
    fp32, candidates = variants[0], [v for v in variants[1:] if v.within_budget]
    scores = ", ".join(_figure(v) for v in variants)
    if not candidates:
        return fp32, f"no quantized variant is within the accuracy budget ({scores})"
    if keep_slower:
        return max(candidates, key=_score), (
            f"fastest quantized variant within budget (keep_slower: fp32 is not a candidate, "
            f"however fast): {scores}"
        )
    faster = [v for v in candidates if _clearly_faster(v)]
    if faster:
        rule = f"at least {AUTO_MIN_SPEEDUP}x faster than fp32"
        return max(faster, key=_score), f"fastest within budget ({rule}): {scores}"
    return (
        fp32,
        f"no variant within budget is clearly {AUTO_MIN_SPEEDUP}x faster than fp32: {scores}",
    )


def slower_refusal(variant: VariantRecord, hint: str) -> str:
    """'' unless the benchmark found ``variant`` clearly slower than fp32; else the one line the
    failed job says: the served version stays what it was."""
    bench = variant.benchmark
    if bench is None or bench.speed != "slower":
        return ""
    per_batch = ", ".join(f"batch {b}: {x:.2f}x" for b, x in bench.speedup_vs_fp32.items())
    return (
        f"not published: {variant.name} runs at {_score(variant):.2f}x the speed of fp32 here "
        f"({per_batch}), so the served version stays as it was; {hint}, or set "
        "quantization.keep_slower to publish it anyway"
    )
