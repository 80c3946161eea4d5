"""The conversion report as typed records, one per section, serialised to report.json once.

The pipeline fills these as stages run and decides from their fields; ``Report.to_dict`` is the
only place that knows report.json's shape, which the SDK (``ferry.client.Report``) and the gRPC
``ConversionReport`` message parse, so keys and nesting stay as they were: a section not reached
is absent, figures are objects ``{max_abs, mean_abs, cosine, top1_agreement}``.

report.json, all keys optional except "variants" and "published":

    job_id, model, source_format, source_sha256, architecture, torch, onnx, onnxruntime, inputs
                                                                     (SourceRecord, flattened)
    exporter, opset                                                  (ExportRecord, flattened)
    stages: {stage: seconds}, notes: [caveat, ...]
    validation: {samples_from, keep_failed, top_up?: {calibration, drawn}} (ValidationRecord)
    pruning: {method, amount, sparsity, fine_tuned, params_before, params_after,
              nonzero_params_after, note, vs_unpruned: figures}      (PruningRecord)
    quantization: {mode, candidates, skipped: {name: why}, selection?} (QuantizationRecord)
    parity: {figures..., samples, against}                           (ParityRecord)
    reference: figures                    (fp32 against the client's reference outputs)
    variants: [{name, note, vs_fp32, vs_pytorch, vs_reference?, budget_against, within_budget,
                published, size_bytes?, gzip_bytes?, sparsity?, latency_ms?: {batch: ms},
                speedup_vs_fp32?: {batch: x}, latency_iqr_ms?/speedup_iqr?: {batch: {low, high}},
                rounds?: {batch: n}, speed?, speed_note?}]            (VariantRecord)
    benchmark: "full" | "quick" | "off"
    published: variant name | null, within_budget (once published)
    error: {stage, kind, message}                                    (on failure)
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ferry.server.convert.spec import InputSpec
from ferry.server.convert.worker.parity import Figures
from ferry.server.core.repository import REPORT_FILE


def _figures(value: Figures | None) -> dict[str, Any] | None:
    return None if value is None else value.to_dict()


def _asdict_present(record: Any, *optional: str) -> dict[str, Any]:
    """``asdict`` without the ``optional`` keys while they are None: a section not reached is
    absent from report.json, never null."""
    out: dict[str, Any] = asdict(record)
    for key in optional:
        if out[key] is None:
            del out[key]
    return out


@dataclass
class SourceRecord:
    job_id: str
    model: str
    source_format: str
    source_sha256: str
    architecture: str | None
    torch: str | None
    onnx: str
    onnxruntime: str | None
    inputs: list[InputSpec] | None = None  # known once the source is loaded

    def to_dict(self) -> dict[str, Any]:
        return _asdict_present(self, "inputs")


@dataclass
class ExportRecord:
    opset: int | None  # an ONNX source's own, when it declares one
    exporter: str | None = None  # None: not exported (yet, or an ONNX source)


@dataclass
class ValidationRecord:
    samples_from: str
    keep_failed: bool
    # The rows a sample file shorter than validation.samples was topped up with (worker.drawn),
    # on which every variant was judged too: {calibration, drawn}, absent when none were.
    top_up: dict[str, int] | None = None
    # The other sizes of each declared dynamic axis every variant was judged at too
    # (worker.lengths): {axis name: [sizes]}, absent when none were.
    lengths: dict[str, list[int]] | None = None

    def to_dict(self) -> dict[str, Any]:
        return _asdict_present(self, "top_up", "lengths")


@dataclass
class PruningRecord:
    method: str
    amount: float
    sparsity: float
    fine_tuned: bool
    params_before: int
    params_after: int
    nonzero_params_after: int
    note: str
    vs_unpruned: Figures | None = None  # the pruned PyTorch model against the unpruned one

    def to_dict(self) -> dict[str, Any]:
        return _asdict_present(self, "vs_unpruned")


@dataclass
class QuantizationRecord:
    mode: str
    candidates: list[str]
    skipped: dict[str, str]  # quantizer -> why auto did not build it
    selection: str | None = None  # auto's reasoning, once it chose

    def to_dict(self) -> dict[str, Any]:
        return _asdict_present(self, "selection")


@dataclass
class ParityRecord:
    """The fp32 ONNX model against the original PyTorch model's outputs when they exist (the
    module run in the child, or the client's reference outputs for an ONNX source), else against
    the ONNX source it was optimized from."""

    figures: Figures
    samples: int
    # "pytorch", "pytorch (pruned)", "pytorch (reference_outputs)", "onnx_source" or
    # "onnx_source (pruned)"
    against: str

    def to_dict(self) -> dict[str, Any]:
        return {**self.figures.to_dict(), "samples": self.samples, "against": self.against}


@dataclass
class BenchmarkRecord:
    """Figures of ``worker.benchmark``; batch sizes are keys as text. A variant dropped early
    (clearly slower) lacks the batch sizes it was not timed at."""

    size_bytes: int
    gzip_bytes: int
    sparsity: float
    latency_ms: dict[str, float]  # median ms per batch
    speedup_vs_fp32: dict[str, float]  # median of the per-round ratios fp32 / variant
    latency_iqr_ms: dict[str, dict[str, float]] = field(default_factory=dict)  # {low, high}
    speedup_iqr: dict[str, dict[str, float]] = field(default_factory=dict)  # {low, high}
    rounds: dict[str, int] = field(default_factory=dict)  # timing rounds per batch
    speed: str = ""  # "faster", "slower", "same", "unclear" against fp32; "" not judged
    speed_note: str = ""  # dropped early, or a spread too wide for the figure to mean much


@dataclass
class VariantRecord:
    name: str
    note: str = ""
    vs_fp32: Figures | None = None  # None for fp32 itself
    # Against the original PyTorch outputs: the module's, or the client's reference outputs for
    # an ONNX source; None only when neither exists.
    vs_pytorch: Figures | None = None
    vs_reference: Figures | None = None  # against the client's reference outputs, when given
    budget_against: str = ""
    within_budget: bool = False
    published: bool = False
    benchmark: BenchmarkRecord | None = None  # once benchmarked

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "note": self.note,
            "vs_fp32": _figures(self.vs_fp32),
            "vs_pytorch": _figures(self.vs_pytorch),
            "budget_against": self.budget_against,
            "within_budget": self.within_budget,
            "published": self.published,
        }
        if self.vs_reference is not None:
            out["vs_reference"] = self.vs_reference.to_dict()
        if self.benchmark is not None:
            out.update(asdict(self.benchmark))
        return out


@dataclass
class ErrorRecord:
    stage: str
    kind: str
    message: str


@dataclass
class Report:
    source: SourceRecord
    export: ExportRecord
    stages: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    validation: ValidationRecord | None = None
    pruning: PruningRecord | None = None
    quantization: QuantizationRecord | None = None
    parity: ParityRecord | None = None
    reference: Figures | None = None
    variants: list[VariantRecord] = field(default_factory=list)
    published: VariantRecord | None = None
    error: ErrorRecord | None = None
    benchmark: str | None = None  # the spec's benchmark mode
    # False when a sample answers differently alone than in a batch (dims.verify_batch): the
    # server then publishes the version unbatched unless its serving config states a batch.
    rows_apart: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            **self.source.to_dict(),
            **asdict(self.export),
            "stages": dict(self.stages),
            "notes": list(self.notes),
            "variants": [v.to_dict() for v in self.variants],
            "published": self.published.name if self.published is not None else None,
        }
        if self.published is not None:
            out["within_budget"] = self.published.within_budget
        if self.error is not None:
            out["error"] = asdict(self.error)
        for key, record in (
            ("validation", self.validation),
            ("pruning", self.pruning),
            ("quantization", self.quantization),
            ("parity", self.parity),
        ):
            if record is not None:
                out[key] = record.to_dict()
        if self.reference is not None:
            out["reference"] = self.reference.to_dict()
        if self.benchmark is not None:
            out["benchmark"] = self.benchmark
        if self.rows_apart is not None:
            out["rows_apart"] = self.rows_apart
        return out

    def write(self, work: Path) -> None:
        """Atomic, so a reader never sees half a report."""
        tmp = work / (REPORT_FILE + ".tmp")
        # Strict JSON: a NaN or infinite figure (a cosine of NaN outputs) is null, not the
        # NaN literal that JSON readers other than Python's refuse.
        text = json.dumps(
            _finite(self.to_dict()), indent=2, sort_keys=True, default=str, allow_nan=False
        )
        tmp.write_text(text)
        os.replace(tmp, work / REPORT_FILE)


def _finite(value: Any) -> Any:
    """``value`` with every float that is not finite replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value
