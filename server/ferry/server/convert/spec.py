"""The contract between the server (torch-free) and the conversion child process (torch).

The server validates a ``Job`` and writes it as JSON; the child (``ferry.server.convert.worker.child``)
reads it, writes ``model.onnx`` and ``report.json`` into ``Job.work_dir``, and streams
``ProgressEvent`` JSON lines on the file descriptor it is given. Nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from ferry.server.convert.strategies import pruning, quantization

# Pruning methods and quantization modes: the registries in ``strategies``, which validation
# checks these fields against.

BENCHMARK_MODES = ("full", "quick", "off")
SOURCE_FORMATS = (
    "state_dict", "safetensors", "onnx", "exported_program", "torchscript", "onnx_archive",
)  # fmt: skip
ONNX_FORMATS = ("onnx", "onnx_archive")  # an archive is model.onnx with its external data
# Weights above this many bytes are saved as external data (``worker/external``): an ONNX file
# is one protobuf message, which cannot exceed 2 GiB; the rest of the graph needs some room.
EXTERNAL_DATA_THRESHOLD = int(1.8 * (1 << 30))
CODE_BEARING_FORMATS = ("exported_program", "torchscript")
STAGES = (
    "queued",
    "load",
    "prune",
    "export",
    "check",
    "optimize",
    "quantize",
    "validate",
    "benchmark",
    "publish",
    "done",
)


@dataclass
class DynamicAxis:
    """A dim besides the batch that varies between requests: kept symbolic at export, run at
    both bounds, and enforced at the door of the served version."""

    axis: int  # index in the input's shape, >= 1
    name: str  # axes sharing a name must agree in a request
    min: int = 1
    max: int = 0  # 0: no upper bound


@dataclass
class InputSpec:
    name: str
    datatype: str  # "FP32", "INT64", ... (Open Inference Protocol names)
    shape: list[int]  # -1: dynamic; the first dim is the batch dim when batching
    # Dims that vary besides the batch; ``shape`` gives the size samples are made at.
    dynamic_axes: list[DynamicAxis] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.dynamic_axes = [
            a if isinstance(a, DynamicAxis) else DynamicAxis(**a) for a in self.dynamic_axes
        ]


@dataclass
class PruningSpec:
    method: str = pruning.DEFAULT.name
    amount: float = 0.0  # fraction of weights (unstructured) or channels (structured) removed


@dataclass
class QuantizationSpec:
    mode: str = quantization.DEFAULT.name
    calibration: str = quantization.DEFAULT_CALIBRATION
    per_channel: bool = True
    calibration_file: str = ""  # .npz in the job folder: input name -> [N, ...] samples
    # Publish a variant the benchmark found clearly slower than fp32: auto then picks the
    # fastest within budget even when slower; an explicit mode publishes its variant instead of
    # failing the job (without it, a slower variant never replaces the served version).
    keep_slower: bool = False


@dataclass
class ValidationSpec:
    rtol: float = 1e-3
    atol: float = 1e-4
    samples: int = 16  # generated from the input specs when no sample file is given
    sample_file: str = ""  # .npz: input name -> [N, ...]
    reference_file: str = ""  # .npz: output name -> [N, ...], the client's own PyTorch outputs
    min_cosine: float = 0.99  # accuracy budget for pruned/quantized variants vs fp32
    min_top1_agreement: float = 0.0  # for classifier logits; 0 disables
    keep_failed: bool = False  # publish a variant below the budget anyway (report says so)


@dataclass
class ConversionSpec:
    inputs: list[InputSpec] = field(default_factory=list)  # required unless the source carries them
    opset: int = 20
    pruning: PruningSpec = field(default_factory=PruningSpec)
    quantization: QuantizationSpec = field(default_factory=QuantizationSpec)
    validation: ValidationSpec = field(default_factory=ValidationSpec)
    max_batch_size: int = 32  # exported dynamic batch is verified at 1 and this size
    # "full", "quick" (fewer, shorter rounds) or "off" (no speed figures: auto cannot choose,
    # and an explicit mode is published without knowing whether it is slower).
    benchmark: str = "full"
    # "": serve the new version as the version policy says; "shadow": the current version keeps
    # the traffic and ``rollout_fraction`` of it is shadowed to the new one (core.rollout).
    rollout: str = ""
    rollout_fraction: float = 0.1
    serving_config: dict[str, Any] = field(default_factory=dict)  # written as <version>/config.json


@dataclass
class Job:
    job_id: str
    model: str
    source_path: str  # absolute path of the uploaded bytes
    source_format: str
    source_sha256: str
    architecture: str = ""  # for state_dict / safetensors
    architecture_kwargs: dict[str, Any] = field(default_factory=dict)
    spec: ConversionSpec = field(default_factory=ConversionSpec)
    work_dir: str = ""  # the child writes model.onnx + report.json here
    allow_code_formats: bool = False
    # The execution providers the version will be served with ({name, options} each): parity
    # and the benchmark measure there. Empty: CPU.
    providers: list[dict[str, Any]] = field(default_factory=list)
    # Save the variants with external data (model.onnx + model.onnx.data) when the weights are
    # over this many bytes, or whenever the source came with external data.
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD


@dataclass
class ProgressEvent:
    stage: str
    fraction: float  # 0..1 over the whole job
    message: str = ""
    error_kind: str = ""  # set on the last event of a failed job (an ErrorKind value)


def to_json(obj: Any) -> str:
    return json.dumps(dataclasses.asdict(obj), sort_keys=True)


def job_from_json(text: str) -> Job:
    raw = json.loads(text)
    spec = raw.pop("spec", {})
    return Job(**raw, spec=spec_from_dict(spec))


def spec_from_dict(raw: dict[str, Any]) -> ConversionSpec:
    raw = dict(raw)
    return ConversionSpec(
        inputs=[InputSpec(**i) for i in raw.pop("inputs", [])],
        pruning=PruningSpec(**raw.pop("pruning", {})),
        quantization=QuantizationSpec(**raw.pop("quantization", {})),
        validation=ValidationSpec(**raw.pop("validation", {})),
        **raw,
    )


# The report (report.json, stored beside model.onnx and in the job store) is written by the child
# from the typed records of ``ferry.server.convert.worker.report``, which document its keys.
