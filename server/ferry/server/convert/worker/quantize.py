"""The quantize stage's child-side half: the facts auto's rules read, and auto's final pick.

Which variants a mode builds, and how each is built, is the registry's
(``ferry.server.convert.strategies.quantization``); never torch's eager quantized modules, which
neither exporter can export.
"""

from __future__ import annotations

import math

import onnx

from ferry.server.convert.strategies.quantization import (
    AUTO_MIN_SPEEDUP,
    BuildInputs,
    GraphFacts,
    Quantizer,
)
from ferry.server.convert.worker.graph import first_line, has_conv
from ferry.server.convert.worker.report import VariantRecord
from ferry.server.errors import ConversionFailed, InvalidArgument

__all__ = ["AUTO_MIN_SPEEDUP", "build", "choose", "facts"]


def facts(model: onnx.ModelProto) -> GraphFacts:
    return GraphFacts(has_conv=has_conv(model))


def build(quantizer: Quantizer, inputs: BuildInputs) -> str:
    """Run ``quantizer``'s builder; a library failure becomes a ConversionFailed naming it."""
    try:
        return quantizer.build(inputs)
    except (InvalidArgument, ConversionFailed):
        raise
    except Exception as exc:
        raise ConversionFailed(
            f"onnxruntime.quantization could not build the {quantizer.name} variant "
            f"({first_line(exc)}); convert with another quantization mode"
        ) from None


def _score(variant: VariantRecord) -> float:
    """Geometric mean of the speed-ups over the measured batch sizes (fp32 scores 1)."""
    speedups = variant.benchmark.speedup_vs_fp32 if variant.benchmark is not None else {}
    ratios = [r for r in speedups.values() if r > 0]
    return math.exp(sum(math.log(r) for r in ratios) / len(ratios)) if ratios else 0.0


def choose(variants: list[VariantRecord], *, keep_slower: bool) -> tuple[VariantRecord, str]:
    """auto's pick among benchmarked variants (fp32 first): (the variant, the reason, for the
    report).

    The fastest variant within the accuracy budget wins if it beats fp32 by AUTO_MIN_SPEEDUP;
    with ``keep_slower`` the fastest non-fp32 variant within budget wins even when slower.
    """
    fp32, candidates = variants[0], [v for v in variants[1:] if v.within_budget]
    scores = ", ".join(f"{v.name} {_score(v):.2f}x" for v in variants)
    if not candidates:
        return fp32, f"no quantized variant is within the accuracy budget ({scores})"
    best = max(candidates, key=_score)
    if keep_slower or _score(best) >= AUTO_MIN_SPEEDUP:
        rule = "keep_slower" if keep_slower else f"at least {AUTO_MIN_SPEEDUP}x faster than fp32"
        return best, f"fastest within budget ({rule}): {scores}"
    return fp32, f"no variant within budget is {AUTO_MIN_SPEEDUP}x faster than fp32: {scores}"
