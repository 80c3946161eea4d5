"""What the conversion client takes and returns (plain typed objects, no protobuf), and the
IO-free translation of both to and from the wire.

Options (``InputSpec``, ``Pruning``, ``Quantization``, ``Validation``, ``Serving``) leave a field
``None`` to mean "the server's default", so a default changed on the server is not pinned by an
old client. Results (``Upload``, ``ProgressEvent``, ``Report``, ``ModelInfo``) mirror the
server's messages; ``Report.raw`` keeps every key of report.json, including ones newer than this
client.
"""

from __future__ import annotations

import json
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ferry.client._errors import InvalidInputError
from ferry.client._requests import as_array
from ferry.codec import datatype_from_name, datatype_name, encode_tensor
from ferry.proto.v1 import model_conversion_pb2 as pb

ArrayMap = Mapping[str, Any]  # name -> numpy array (or anything np.asarray accepts)


@dataclass(frozen=True)
class DynamicAxis:
    """A dim besides the batch that varies between requests: a sequence length, an image side.

    Axes that share a ``name`` are one size in every request (``input_ids`` and
    ``attention_mask`` share "sequence"). The export keeps the dim symbolic and the server runs
    the model at ``min`` and ``max`` before publishing it; the served version refuses a request
    outside them with ``InvalidInputError``. ``max=None``: no upper bound (the server then also
    runs it at twice the example's size).
    """

    name: str
    min: int = 1
    max: int | None = None


@dataclass(frozen=True)
class InputSpec:
    """One model input; -1 in ``shape`` is a dynamic dimension (the first is the batch).

    ``dynamic_axes`` (dim index -> ``DynamicAxis``) declares dims besides the batch that vary;
    ``shape`` then gives the size validation samples are made at, e.g.
    ``InputSpec("input_ids", "INT64", [-1, 128], {1: DynamicAxis("sequence", max=512)})``."""

    name: str
    datatype: str  # "FP32", "INT64", ...
    shape: Sequence[int]
    dynamic_axes: Mapping[int, DynamicAxis] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class Pruning:
    """``method`` is one of the server's pruning methods (docs/conversion.md#pruning); the server
    refuses an unknown one with INVALID_ARGUMENT listing those it knows."""

    method: str = "l1_unstructured"
    amount: float = 0.5  # fraction of weights (or channels) removed, in (0, 1)


@dataclass(frozen=True)
class Quantization:
    """``mode`` is one of the server's quantization modes (docs/conversion.md#quantization); the
    server refuses an unknown one with INVALID_ARGUMENT listing those it knows."""

    mode: str = "dynamic_int8"
    calibration: str | None = None  # the server's calibration method (default: its own)
    per_channel: bool | None = None
    calibration_inputs: ArrayMap | None = None  # input name -> [N, ...] samples
    keep_slower: bool = False


@dataclass(frozen=True)
class Validation:
    rtol: float | None = None
    atol: float | None = None
    # Rows every variant is judged on (default 16): random ones without sample_inputs, and
    # fewer sample_inputs are topped up with rows like them (docs/conversion.md).
    samples: int | None = None
    sample_inputs: ArrayMap | None = None  # input name -> [N, ...]
    reference_outputs: ArrayMap | None = None  # output name -> [N, ...], your PyTorch outputs
    min_cosine: float | None = None
    min_top1_agreement: float | None = None
    keep_failed: bool = False


@dataclass(frozen=True)
class Serving:
    """The new version's serving config; None keeps the model's own setting."""

    max_batch_size: int | None = None
    max_queue_delay_ms: float | None = None
    max_queue_size: int | None = None
    default_timeout_ms: float | None = None
    instance_count: int | None = None
    # False: each request runs alone (its own rows only). None: the model's setting, except
    # that a dynamic int8 version is published with False (one activation scale per run).
    combine_requests: bool | None = None


@dataclass(frozen=True)
class Upload:
    """An uploaded source. ``inputs`` are those ``convert`` uses when given none: a built-in
    architecture's own (from the server), or those of the ``nn.Module`` it was made from, which
    also brings the module's own outputs, sent along for validation. Empty ``inputs`` for a
    state_dict of a plugin architecture or TorchScript mean ``convert`` must be told them."""

    upload_id: str
    model: str
    format: str  # "state_dict", "safetensors", "onnx", "exported_program", "torchscript"
    sha256: str
    size_bytes: int
    architecture: str = ""
    architecture_kwargs: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""
    created: float = 0.0  # seconds since the epoch
    inputs: tuple[InputSpec, ...] = ()
    sample_inputs: ArrayMap | None = None
    reference_outputs: ArrayMap | None = None

    def __repr__(self) -> str:
        """One short line: the samples and outputs are named and counted, never printed."""
        parts = [
            f"upload_id={self.upload_id!r}",
            f"model={self.model!r}",
            f"format={self.format!r}",
            f"size_bytes={self.size_bytes}",
        ]
        if self.architecture:
            parts.append(f"architecture={self.architecture!r}")
        if self.inputs:
            specs = ", ".join(f"{i.name}:{i.datatype}{list(i.shape)}" for i in self.inputs)
            parts.append(f"inputs=[{specs}]")
        if self.sample_inputs:
            count = len(next(iter(self.sample_inputs.values())))
            parts.append(f"samples={count}")
        if self.reference_outputs:
            parts.append(f"reference_outputs={list(self.reference_outputs)}")
        return f"Upload({', '.join(parts)})"


@dataclass(frozen=True)
class ProgressEvent:
    job_id: str
    seq: int
    stage: str
    fraction: float
    message: str
    state: str  # the job's state after this event
    error_kind: str = ""
    time: float = 0.0


@dataclass(frozen=True)
class Parity:
    max_abs: float
    mean_abs: float
    cosine: float
    top1_agreement: float | None
    samples: int
    against: str
    # ||candidate - reference|| / ||reference|| over floating outputs (the size of the error,
    # which the cosine misses); integer and boolean outputs count in ``cosine`` as the share of
    # equal elements.
    rel_error: float = 0.0
    # One value per sample (a regression): the error against the reference's spread about its
    # mean over the samples; 0 where no output is judged so.
    spread_error: float = 0.0


@dataclass(frozen=True)
class PruningReport:
    method: str
    amount: float
    sparsity: float
    fine_tuned: bool
    params_before: int
    params_after: int
    vs_unpruned: Parity | None = None  # pruned vs unpruned PyTorch outputs


@dataclass(frozen=True)
class VariantReport:
    name: str
    size_bytes: int
    gzip_bytes: int
    sparsity: float
    latency_ms: Mapping[int, float]  # batch size -> ms per batch
    speedup_vs_fp32: Mapping[int, float]
    vs_fp32: Parity | None
    # Against the original PyTorch outputs: the module's own (a module upload sends them), or
    # None when the server had none (an ONNX file uploaded without reference_outputs).
    vs_pytorch: Parity | None
    within_budget: bool
    published: bool
    note: str
    vs_reference: Parity | None = None  # against your reference_outputs, when given
    # The spread over the timing rounds (interquartile, per batch size): (low, high).
    latency_iqr_ms: Mapping[int, tuple[float, float]] = field(default_factory=dict)
    speedup_iqr: Mapping[int, tuple[float, float]] = field(default_factory=dict)
    rounds: Mapping[int, int] = field(default_factory=dict)
    # Against fp32: "faster", "slower", "same", "unclear" (the noise decides nothing), or ""
    # when not benchmarked.
    speed: str = ""
    speed_note: str = ""


@dataclass(frozen=True)
class Report:
    exporter: str
    opset: int
    torch: str
    onnx: str
    onnxruntime: str
    source_sha256: str
    source_format: str
    pruning: PruningReport | None
    # fp32 ONNX vs the original PyTorch outputs when they exist (``against`` says which), else
    # vs the ONNX source. ``top1_agreement`` only for class scores: a floating [N, C > 1] output.
    parity: Parity | None
    stages: Mapping[str, float]  # stage -> seconds
    variants: tuple[VariantReport, ...]
    published: str  # the variant served as model.onnx; "" when none was
    within_budget: bool = False
    error: Mapping[str, str] | None = None  # stage, kind, message: where a failed job stopped
    reference: Parity | None = None  # fp32 ONNX vs your reference_outputs, when given
    benchmark: str = ""  # "full", "quick" or "off"
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False)

    def variant(self, name: str) -> VariantReport | None:
        return next((v for v in self.variants if v.name == name), None)


@dataclass(frozen=True)
class VersionInfo:
    version: int
    state: str  # READY, LOADING, FAILED, UNLOADING, UNLOADED (on disk, not served)
    reason: str
    is_default: bool
    job_id: str
    size_bytes: int
    report: Report | None


@dataclass(frozen=True)
class ModelInfo:
    name: str
    default_version: int | None
    versions: tuple[VersionInfo, ...]
    # Why no version is listed, when none is (the repository index's words); "" otherwise.
    reason: str = ""

    def version(self, number: int) -> VersionInfo | None:
        return next((v for v in self.versions if v.version == number), None)


# ---- from the wire ----
def _parity(m: pb.ParityReport) -> Parity:
    return Parity(
        max_abs=m.max_abs,
        mean_abs=m.mean_abs,
        cosine=m.cosine,
        top1_agreement=m.top1_agreement if m.HasField("top1_agreement") else None,
        samples=m.samples,
        against=m.against,
        rel_error=m.rel_error,
        spread_error=m.spread_error,
    )


def _by_batch(values: Mapping[str, Any]) -> dict[int, Any]:
    return {int(k): v for k, v in values.items() if k.isdigit()}


def _ranges(values: Mapping[str, pb.Range]) -> dict[int, tuple[float, float]]:
    return {b: (r.low, r.high) for b, r in _by_batch(values).items()}


def parse_report(m: pb.ConversionReport, raw_json: str) -> Report | None:
    if not raw_json:
        return None
    try:
        raw = json.loads(raw_json)
    except ValueError:
        raw = {}
    p = m.pruning
    return Report(
        exporter=m.exporter,
        opset=m.opset,
        torch=m.torch,
        onnx=m.onnx,
        onnxruntime=m.onnxruntime,
        source_sha256=m.source_sha256,
        source_format=m.source_format,
        pruning=PruningReport(
            p.method,
            p.amount,
            p.sparsity,
            p.fine_tuned,
            p.params_before,
            p.params_after,
            _parity(p.vs_unpruned) if p.HasField("vs_unpruned") else None,
        )
        if m.HasField("pruning")
        else None,
        parity=_parity(m.parity) if m.HasField("parity") else None,
        stages=dict(m.stages),
        variants=tuple(
            VariantReport(
                name=v.name,
                size_bytes=v.size_bytes,
                gzip_bytes=v.gzip_bytes,
                sparsity=v.sparsity,
                latency_ms=_by_batch(v.latency_ms),
                speedup_vs_fp32=_by_batch(v.speedup_vs_fp32),
                vs_fp32=_parity(v.vs_fp32) if v.HasField("vs_fp32") else None,
                vs_pytorch=_parity(v.vs_pytorch) if v.HasField("vs_pytorch") else None,
                within_budget=v.within_budget,
                published=v.published,
                note=v.note,
                vs_reference=_parity(v.vs_reference) if v.HasField("vs_reference") else None,
                latency_iqr_ms=_ranges(v.latency_iqr_ms),
                speedup_iqr=_ranges(v.speedup_iqr),
                rounds=_by_batch(v.rounds),
                speed=v.speed,
                speed_note=v.speed_note,
            )
            for v in m.variants
        ),
        published=m.published,
        within_budget=m.within_budget,
        error={"stage": m.error.stage, "kind": m.error.kind, "message": m.error.message}
        if m.HasField("error")
        else None,
        reference=_parity(m.reference) if m.HasField("reference") else None,
        benchmark=m.benchmark,
        raw=raw if isinstance(raw, dict) else {},
    )


_FORMAT_PREFIX = "SOURCE_FORMAT_"


def format_name(value: int) -> str:
    return pb.SourceFormat.Name(value).removeprefix(_FORMAT_PREFIX).lower()


def format_value(name: str) -> str:
    return _FORMAT_PREFIX + name.upper()


def parse_upload(m: pb.Upload) -> Upload:
    try:
        kwargs = json.loads(m.architecture_kwargs_json) if m.architecture_kwargs_json else {}
    except ValueError:
        kwargs = {}
    return Upload(
        upload_id=m.upload_id,
        model=m.model,
        format=format_name(m.format),
        sha256=m.sha256,
        size_bytes=m.size_bytes,
        architecture=m.architecture,
        architecture_kwargs=kwargs,
        description=m.description,
        created=m.created_ms / 1000,
        inputs=tuple(parse_input_spec(i) for i in m.inputs),
    )


def parse_input_spec(m: pb.InputSpec) -> InputSpec:
    axes = {a.axis: DynamicAxis(a.name, a.min or 1, a.max or None) for a in m.dynamic_axes}
    return InputSpec(m.name, datatype_name(m.dtype), tuple(m.shape), axes)


def input_spec_message(i: InputSpec) -> pb.InputSpec:
    out = pb.InputSpec(name=i.name, shape=list(i.shape))
    out.dtype = datatype_from_name(i.datatype)  # type: ignore[assignment]
    for axis, a in sorted(i.dynamic_axes.items()):
        out.dynamic_axes.add(axis=axis, name=a.name, min=a.min, max=a.max or 0)
    return out


def parse_event(m: pb.ProgressEvent) -> ProgressEvent:
    return ProgressEvent(
        job_id=m.job_id,
        seq=m.seq,
        stage=m.stage,
        fraction=m.fraction,
        message=m.message,
        state=pb.JobState.Name(m.state).removeprefix("JOB_STATE_"),
        error_kind=m.error_kind,
        time=m.time_ms / 1000,
    )


def parse_model(m: pb.ModelInfo) -> ModelInfo:
    from ferry.proto.v1 import inference_pb2

    return ModelInfo(
        name=m.name,
        default_version=m.default_version or None,
        versions=tuple(
            VersionInfo(
                version=v.version,
                state=inference_pb2.ModelState.Name(v.state).removeprefix("MODEL_STATE_"),
                reason=v.reason,
                is_default=v.is_default,
                job_id=v.job_id,
                size_bytes=v.size_bytes,
                report=parse_report(v.report, v.report_json),
            )
            for v in m.versions
        ),
        reason=m.reason,
    )


# ---- to the wire ----
def _tensors(arrays: Mapping[str, Any] | None) -> list[Any]:
    return [encode_tensor(name, as_array(value, name)) for name, value in (arrays or {}).items()]


def build_spec(
    inputs: Sequence[InputSpec],
    *,
    opset: int,
    pruning: Pruning | None,
    quantization: Quantization | None,
    validation: Validation | None,
    serving: Serving | None,
    max_batch_size: int | None,
    benchmark: str | None = None,
    rollout: str | None = None,
    rollout_fraction: float | None = None,
) -> pb.ConversionSpec:
    if rollout_fraction is not None and not (
        isinstance(rollout_fraction, (int, float)) and rollout_fraction > 0
    ):
        raise InvalidInputError(
            f"rollout_fraction must be within (0, 1], not {rollout_fraction!r} (None: 0.1)"
        )
    spec = pb.ConversionSpec(
        opset=_count("opset", opset, low=1),
        max_batch_size=0 if max_batch_size is None else _count("max_batch_size", max_batch_size),
        benchmark=benchmark or "",
        rollout=rollout or "",
        rollout_fraction=rollout_fraction or 0.0,
    )
    spec.inputs.extend(input_spec_message(i) for i in inputs)
    if pruning is not None:
        spec.pruning.method, spec.pruning.amount = pruning.method, pruning.amount
    if quantization is not None:
        q = spec.quantization
        q.mode, q.keep_slower = quantization.mode, quantization.keep_slower
        q.calibration = quantization.calibration or ""
        if quantization.per_channel is not None:
            q.per_channel = quantization.per_channel
        q.calibration_inputs.extend(_tensors(quantization.calibration_inputs))
    if validation is not None:
        v = spec.validation
        for name in ("rtol", "atol", "samples", "min_cosine", "min_top1_agreement"):
            value = getattr(validation, name)
            if name == "samples" and value is not None:
                value = _count("validation.samples", value, low=0)
            if value is not None:
                _put(v, name, value, "validation.")
        v.keep_failed = validation.keep_failed
        v.sample_inputs.extend(_tensors(validation.sample_inputs))
        v.reference_outputs.extend(_tensors(validation.reference_outputs))
    if serving is not None:
        for name in (
            "max_batch_size",
            "max_queue_delay_ms",
            "max_queue_size",
            "default_timeout_ms",
            "instance_count",
            "combine_requests",
        ):
            value = getattr(serving, name)
            if name in _SERVING_COUNTS and value is not None:
                value = _count(f"serving.{name}", value, low=0)
            if value is not None:
                _put(spec.serving, name, value, "serving.")
    return spec


def _put(message: Any, name: str, value: Any, prefix: str = "") -> None:
    """Set one field, naming it when protobuf refuses the value: its own ValueError says only
    "Value out of range: 1000000000000", for samples or max_batch_size alike."""
    try:
        setattr(message, name, value)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{prefix}{name}={value!r} cannot be sent: {exc}") from None


UINT32_MAX = 2**32 - 1
_SERVING_COUNTS = ("max_batch_size", "max_queue_size", "instance_count")


def _count(name: str, value: Any, *, low: int = 1) -> int:
    """A whole number for a uint32 field, refused here naming the field: protobuf's own
    refusal ("Value out of range: -1") named none, and a 0 in a field where 0 means unset
    (``low`` 1) became the server's default without a word."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidInputError(f"{name} must be a whole number, not {value!r}")
    number = int(value)
    if not low <= number <= UINT32_MAX:
        raise InvalidInputError(f"{name} must be within {low}..{UINT32_MAX}, not {number}")
    return number
