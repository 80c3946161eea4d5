"""The one line a finished job says about what it published (``Job.message``).

Users act on the job's result, not on the report behind it: a variant that is slower than fp32,
whose speed the noise left unclear, or that missed the accuracy budget must say so where they
look. Read from report.json (the child's typed records, serialised), torch-free.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any


def mean_speedup(speedups: Mapping[str, float] | None) -> float | None:
    """A variant's one speed-up figure: the geometric mean of its per-batch median speed-ups
    against fp32; None when none was measured. The child's auto choice (``worker.quantize``)
    ranks variants by it, so the job's line and the choice it reports read the same figure."""
    ratios = [r for r in (speedups or {}).values() if r and r > 0]
    if not ratios:
        return None
    return math.exp(sum(math.log(r) for r in ratios) / len(ratios))


def speedup_spread(iqr: Mapping[str, Mapping[str, float]] | None) -> str:
    """`` (1.80-2.05)``: the widest interquartile range of the speed-up over the batch sizes;
    '' when none was measured."""
    ranges = list((iqr or {}).values())
    if not ranges:
        return ""
    return f" ({min(r['low'] for r in ranges):.2f}-{max(r['high'] for r in ranges):.2f})"


def _speed(report: dict[str, Any], variant: dict[str, Any]) -> str:
    if report.get("benchmark") == "off":
        return "not benchmarked"
    if variant.get("name") == "fp32":
        ms = variant.get("latency_ms") or {}
        return f"{ms['1']:.3g} ms at batch 1" if "1" in ms else ""
    speedup = mean_speedup(variant.get("speedup_vs_fp32"))
    if speedup is None:
        return "speed not measured"
    figure = f"{speedup:.2f}x fp32{speedup_spread(variant.get('speedup_iqr'))}"
    verdict = variant.get("speed", "")
    if verdict == "slower":
        return f"SLOWER than fp32 at {figure}, published because quantization.keep_slower is set"
    if verdict == "unclear":
        return f"{figure}, but the timing noise leaves its speed unclear"
    return figure


def _figure(value: Any, spec: str) -> str | None:
    """A figure as text; None where report.json holds none (a non-finite one is written null)."""
    return format(value, spec) if isinstance(value, int | float) else None


def _accuracy(report: dict[str, Any], variant: dict[str, Any]) -> str:
    for key, against in (("vs_pytorch", "PyTorch"), ("vs_fp32", "fp32")):
        figures = variant.get(key)
        if isinstance(figures, dict):
            cosine = _figure(figures.get("cosine"), ".6f")
            return f"cosine {cosine or 'not measurable'} vs {against}"
    parity = report.get("parity")
    if isinstance(parity, dict):
        max_abs = _figure(parity.get("max_abs"), ".2g")
        return f"max_abs {max_abs or 'not measurable'} vs {parity.get('against', 'the source')}"
    return ""


def published_line(report_json: str) -> str:
    """``dynamic_int8, 1.92x fp32 (1.80-2.05), cosine 0.999981 vs PyTorch``; '' when the report
    says nothing was published (or cannot be read). It never raises: the job's message is
    decorated with it around publication, and a report it cannot read must not fail a job whose
    version is serving."""
    try:
        return _line(json.loads(report_json) if report_json else {})
    except (ValueError, TypeError, KeyError, AttributeError):
        return ""


def _line(report: Any) -> str:
    name = report.get("published") if isinstance(report, dict) else None
    if not name:
        return ""
    variant: dict[str, Any] = next(
        (v for v in report.get("variants", []) if v.get("name") == name), {}
    )
    parts = [name, _speed(report, variant), _accuracy(report, variant)]
    if variant and not variant.get("within_budget", True):
        parts.append("BELOW the accuracy budget, published because validation.keep_failed is set")
    selection = (report.get("quantization") or {}).get("selection", "")
    if name == "fp32" and selection.startswith("no "):
        parts.append("auto kept fp32: " + selection.split(":")[0].split(" (")[0])
    return ", ".join(p for p in parts if p)
