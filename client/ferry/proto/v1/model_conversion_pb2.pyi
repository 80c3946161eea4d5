from google.protobuf import struct_pb2 as _struct_pb2
from ferry.proto.v1 import inference_pb2 as _inference_pb2
from ferry.proto.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SourceFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SOURCE_FORMAT_UNSPECIFIED: _ClassVar[SourceFormat]
    SOURCE_FORMAT_STATE_DICT: _ClassVar[SourceFormat]
    SOURCE_FORMAT_SAFETENSORS: _ClassVar[SourceFormat]
    SOURCE_FORMAT_ONNX: _ClassVar[SourceFormat]
    SOURCE_FORMAT_EXPORTED_PROGRAM: _ClassVar[SourceFormat]
    SOURCE_FORMAT_TORCHSCRIPT: _ClassVar[SourceFormat]
    SOURCE_FORMAT_ONNX_ARCHIVE: _ClassVar[SourceFormat]

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    JOB_STATE_QUEUED: _ClassVar[JobState]
    JOB_STATE_RUNNING: _ClassVar[JobState]
    JOB_STATE_SUCCEEDED: _ClassVar[JobState]
    JOB_STATE_FAILED: _ClassVar[JobState]
    JOB_STATE_CANCELLED: _ClassVar[JobState]
SOURCE_FORMAT_UNSPECIFIED: SourceFormat
SOURCE_FORMAT_STATE_DICT: SourceFormat
SOURCE_FORMAT_SAFETENSORS: SourceFormat
SOURCE_FORMAT_ONNX: SourceFormat
SOURCE_FORMAT_EXPORTED_PROGRAM: SourceFormat
SOURCE_FORMAT_TORCHSCRIPT: SourceFormat
SOURCE_FORMAT_ONNX_ARCHIVE: SourceFormat
JOB_STATE_UNSPECIFIED: JobState
JOB_STATE_QUEUED: JobState
JOB_STATE_RUNNING: JobState
JOB_STATE_SUCCEEDED: JobState
JOB_STATE_FAILED: JobState
JOB_STATE_CANCELLED: JobState

class UploadHeader(_message.Message):
    __slots__ = ("model", "format", "architecture", "architecture_kwargs_json", "architecture_kwargs", "description", "expected_sha256", "size_bytes")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_KWARGS_JSON_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_KWARGS_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    model: str
    format: SourceFormat
    architecture: str
    architecture_kwargs_json: str
    architecture_kwargs: _struct_pb2.Struct
    description: str
    expected_sha256: str
    size_bytes: int
    def __init__(self, model: _Optional[str] = ..., format: _Optional[_Union[SourceFormat, str]] = ..., architecture: _Optional[str] = ..., architecture_kwargs_json: _Optional[str] = ..., architecture_kwargs: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., description: _Optional[str] = ..., expected_sha256: _Optional[str] = ..., size_bytes: _Optional[int] = ...) -> None: ...

class UploadModelRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: UploadHeader
    chunk: bytes
    def __init__(self, header: _Optional[_Union[UploadHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class Upload(_message.Message):
    __slots__ = ("upload_id", "model", "format", "sha256", "size_bytes", "architecture", "architecture_kwargs_json", "description", "created_ms", "inputs")
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_KWARGS_JSON_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    CREATED_MS_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    upload_id: str
    model: str
    format: SourceFormat
    sha256: str
    size_bytes: int
    architecture: str
    architecture_kwargs_json: str
    description: str
    created_ms: int
    inputs: _containers.RepeatedCompositeFieldContainer[InputSpec]
    def __init__(self, upload_id: _Optional[str] = ..., model: _Optional[str] = ..., format: _Optional[_Union[SourceFormat, str]] = ..., sha256: _Optional[str] = ..., size_bytes: _Optional[int] = ..., architecture: _Optional[str] = ..., architecture_kwargs_json: _Optional[str] = ..., description: _Optional[str] = ..., created_ms: _Optional[int] = ..., inputs: _Optional[_Iterable[_Union[InputSpec, _Mapping]]] = ...) -> None: ...

class ListUploadsRequest(_message.Message):
    __slots__ = ("model", "limit", "page_token")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    model: str
    limit: int
    page_token: str
    def __init__(self, model: _Optional[str] = ..., limit: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListUploadsResponse(_message.Message):
    __slots__ = ("uploads", "next_page_token")
    UPLOADS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    uploads: _containers.RepeatedCompositeFieldContainer[Upload]
    next_page_token: str
    def __init__(self, uploads: _Optional[_Iterable[_Union[Upload, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class DeleteUploadRequest(_message.Message):
    __slots__ = ("upload_id",)
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    upload_id: str
    def __init__(self, upload_id: _Optional[str] = ...) -> None: ...

class DeleteUploadResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InputSpec(_message.Message):
    __slots__ = ("name", "dtype", "shape", "dynamic_axes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DYNAMIC_AXES_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: _tensor_pb2.DataType
    shape: _containers.RepeatedScalarFieldContainer[int]
    dynamic_axes: _containers.RepeatedCompositeFieldContainer[DynamicAxis]
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[_tensor_pb2.DataType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., dynamic_axes: _Optional[_Iterable[_Union[DynamicAxis, _Mapping]]] = ...) -> None: ...

class DynamicAxis(_message.Message):
    __slots__ = ("axis", "name", "min", "max")
    AXIS_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    MIN_FIELD_NUMBER: _ClassVar[int]
    MAX_FIELD_NUMBER: _ClassVar[int]
    axis: int
    name: str
    min: int
    max: int
    def __init__(self, axis: _Optional[int] = ..., name: _Optional[str] = ..., min: _Optional[int] = ..., max: _Optional[int] = ...) -> None: ...

class PruningSpec(_message.Message):
    __slots__ = ("method", "amount")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    method: str
    amount: float
    def __init__(self, method: _Optional[str] = ..., amount: _Optional[float] = ...) -> None: ...

class QuantizationSpec(_message.Message):
    __slots__ = ("mode", "calibration", "per_channel", "calibration_inputs", "keep_slower")
    MODE_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_FIELD_NUMBER: _ClassVar[int]
    PER_CHANNEL_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_INPUTS_FIELD_NUMBER: _ClassVar[int]
    KEEP_SLOWER_FIELD_NUMBER: _ClassVar[int]
    mode: str
    calibration: str
    per_channel: bool
    calibration_inputs: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.Tensor]
    keep_slower: bool
    def __init__(self, mode: _Optional[str] = ..., calibration: _Optional[str] = ..., per_channel: _Optional[bool] = ..., calibration_inputs: _Optional[_Iterable[_Union[_tensor_pb2.Tensor, _Mapping]]] = ..., keep_slower: _Optional[bool] = ...) -> None: ...

class ValidationSpec(_message.Message):
    __slots__ = ("rtol", "atol", "samples", "sample_inputs", "reference_outputs", "min_cosine", "min_top1_agreement", "keep_failed")
    RTOL_FIELD_NUMBER: _ClassVar[int]
    ATOL_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_INPUTS_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    MIN_COSINE_FIELD_NUMBER: _ClassVar[int]
    MIN_TOP1_AGREEMENT_FIELD_NUMBER: _ClassVar[int]
    KEEP_FAILED_FIELD_NUMBER: _ClassVar[int]
    rtol: float
    atol: float
    samples: int
    sample_inputs: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.Tensor]
    reference_outputs: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.Tensor]
    min_cosine: float
    min_top1_agreement: float
    keep_failed: bool
    def __init__(self, rtol: _Optional[float] = ..., atol: _Optional[float] = ..., samples: _Optional[int] = ..., sample_inputs: _Optional[_Iterable[_Union[_tensor_pb2.Tensor, _Mapping]]] = ..., reference_outputs: _Optional[_Iterable[_Union[_tensor_pb2.Tensor, _Mapping]]] = ..., min_cosine: _Optional[float] = ..., min_top1_agreement: _Optional[float] = ..., keep_failed: _Optional[bool] = ...) -> None: ...

class ServingConfig(_message.Message):
    __slots__ = ("max_batch_size", "max_queue_delay_ms", "max_queue_size", "default_timeout_ms", "instance_count", "combine_requests")
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_DELAY_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_SIZE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_COUNT_FIELD_NUMBER: _ClassVar[int]
    COMBINE_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    max_batch_size: int
    max_queue_delay_ms: float
    max_queue_size: int
    default_timeout_ms: float
    instance_count: int
    combine_requests: bool
    def __init__(self, max_batch_size: _Optional[int] = ..., max_queue_delay_ms: _Optional[float] = ..., max_queue_size: _Optional[int] = ..., default_timeout_ms: _Optional[float] = ..., instance_count: _Optional[int] = ..., combine_requests: _Optional[bool] = ...) -> None: ...

class ConversionSpec(_message.Message):
    __slots__ = ("inputs", "opset", "pruning", "quantization", "validation", "max_batch_size", "serving", "benchmark", "rollout", "rollout_fraction")
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    OPSET_FIELD_NUMBER: _ClassVar[int]
    PRUNING_FIELD_NUMBER: _ClassVar[int]
    QUANTIZATION_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    SERVING_FIELD_NUMBER: _ClassVar[int]
    BENCHMARK_FIELD_NUMBER: _ClassVar[int]
    ROLLOUT_FIELD_NUMBER: _ClassVar[int]
    ROLLOUT_FRACTION_FIELD_NUMBER: _ClassVar[int]
    inputs: _containers.RepeatedCompositeFieldContainer[InputSpec]
    opset: int
    pruning: PruningSpec
    quantization: QuantizationSpec
    validation: ValidationSpec
    max_batch_size: int
    serving: ServingConfig
    benchmark: str
    rollout: str
    rollout_fraction: float
    def __init__(self, inputs: _Optional[_Iterable[_Union[InputSpec, _Mapping]]] = ..., opset: _Optional[int] = ..., pruning: _Optional[_Union[PruningSpec, _Mapping]] = ..., quantization: _Optional[_Union[QuantizationSpec, _Mapping]] = ..., validation: _Optional[_Union[ValidationSpec, _Mapping]] = ..., max_batch_size: _Optional[int] = ..., serving: _Optional[_Union[ServingConfig, _Mapping]] = ..., benchmark: _Optional[str] = ..., rollout: _Optional[str] = ..., rollout_fraction: _Optional[float] = ...) -> None: ...

class ConvertRequest(_message.Message):
    __slots__ = ("upload_id", "model", "spec")
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    upload_id: str
    model: str
    spec: ConversionSpec
    def __init__(self, upload_id: _Optional[str] = ..., model: _Optional[str] = ..., spec: _Optional[_Union[ConversionSpec, _Mapping]] = ...) -> None: ...

class ParityReport(_message.Message):
    __slots__ = ("max_abs", "mean_abs", "cosine", "top1_agreement", "samples", "against", "rel_error", "spread_error")
    MAX_ABS_FIELD_NUMBER: _ClassVar[int]
    MEAN_ABS_FIELD_NUMBER: _ClassVar[int]
    COSINE_FIELD_NUMBER: _ClassVar[int]
    TOP1_AGREEMENT_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    AGAINST_FIELD_NUMBER: _ClassVar[int]
    REL_ERROR_FIELD_NUMBER: _ClassVar[int]
    SPREAD_ERROR_FIELD_NUMBER: _ClassVar[int]
    max_abs: float
    mean_abs: float
    cosine: float
    top1_agreement: float
    samples: int
    against: str
    rel_error: float
    spread_error: float
    def __init__(self, max_abs: _Optional[float] = ..., mean_abs: _Optional[float] = ..., cosine: _Optional[float] = ..., top1_agreement: _Optional[float] = ..., samples: _Optional[int] = ..., against: _Optional[str] = ..., rel_error: _Optional[float] = ..., spread_error: _Optional[float] = ...) -> None: ...

class PruningReport(_message.Message):
    __slots__ = ("method", "amount", "sparsity", "fine_tuned", "params_before", "params_after", "vs_unpruned")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    SPARSITY_FIELD_NUMBER: _ClassVar[int]
    FINE_TUNED_FIELD_NUMBER: _ClassVar[int]
    PARAMS_BEFORE_FIELD_NUMBER: _ClassVar[int]
    PARAMS_AFTER_FIELD_NUMBER: _ClassVar[int]
    VS_UNPRUNED_FIELD_NUMBER: _ClassVar[int]
    method: str
    amount: float
    sparsity: float
    fine_tuned: bool
    params_before: int
    params_after: int
    vs_unpruned: ParityReport
    def __init__(self, method: _Optional[str] = ..., amount: _Optional[float] = ..., sparsity: _Optional[float] = ..., fine_tuned: _Optional[bool] = ..., params_before: _Optional[int] = ..., params_after: _Optional[int] = ..., vs_unpruned: _Optional[_Union[ParityReport, _Mapping]] = ...) -> None: ...

class VariantReport(_message.Message):
    __slots__ = ("name", "size_bytes", "gzip_bytes", "sparsity", "latency_ms", "speedup_vs_fp32", "vs_fp32", "vs_pytorch", "within_budget", "published", "note", "vs_reference", "latency_iqr_ms", "speedup_iqr", "rounds", "speed", "speed_note")
    class LatencyMsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class SpeedupVsFp32Entry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class LatencyIqrMsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Range
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Range, _Mapping]] = ...) -> None: ...
    class SpeedupIqrEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Range
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Range, _Mapping]] = ...) -> None: ...
    class RoundsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    GZIP_BYTES_FIELD_NUMBER: _ClassVar[int]
    SPARSITY_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    SPEEDUP_VS_FP32_FIELD_NUMBER: _ClassVar[int]
    VS_FP32_FIELD_NUMBER: _ClassVar[int]
    VS_PYTORCH_FIELD_NUMBER: _ClassVar[int]
    WITHIN_BUDGET_FIELD_NUMBER: _ClassVar[int]
    PUBLISHED_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    VS_REFERENCE_FIELD_NUMBER: _ClassVar[int]
    LATENCY_IQR_MS_FIELD_NUMBER: _ClassVar[int]
    SPEEDUP_IQR_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    SPEED_FIELD_NUMBER: _ClassVar[int]
    SPEED_NOTE_FIELD_NUMBER: _ClassVar[int]
    name: str
    size_bytes: int
    gzip_bytes: int
    sparsity: float
    latency_ms: _containers.ScalarMap[str, float]
    speedup_vs_fp32: _containers.ScalarMap[str, float]
    vs_fp32: ParityReport
    vs_pytorch: ParityReport
    within_budget: bool
    published: bool
    note: str
    vs_reference: ParityReport
    latency_iqr_ms: _containers.MessageMap[str, Range]
    speedup_iqr: _containers.MessageMap[str, Range]
    rounds: _containers.ScalarMap[str, int]
    speed: str
    speed_note: str
    def __init__(self, name: _Optional[str] = ..., size_bytes: _Optional[int] = ..., gzip_bytes: _Optional[int] = ..., sparsity: _Optional[float] = ..., latency_ms: _Optional[_Mapping[str, float]] = ..., speedup_vs_fp32: _Optional[_Mapping[str, float]] = ..., vs_fp32: _Optional[_Union[ParityReport, _Mapping]] = ..., vs_pytorch: _Optional[_Union[ParityReport, _Mapping]] = ..., within_budget: _Optional[bool] = ..., published: _Optional[bool] = ..., note: _Optional[str] = ..., vs_reference: _Optional[_Union[ParityReport, _Mapping]] = ..., latency_iqr_ms: _Optional[_Mapping[str, Range]] = ..., speedup_iqr: _Optional[_Mapping[str, Range]] = ..., rounds: _Optional[_Mapping[str, int]] = ..., speed: _Optional[str] = ..., speed_note: _Optional[str] = ...) -> None: ...

class Range(_message.Message):
    __slots__ = ("low", "high")
    LOW_FIELD_NUMBER: _ClassVar[int]
    HIGH_FIELD_NUMBER: _ClassVar[int]
    low: float
    high: float
    def __init__(self, low: _Optional[float] = ..., high: _Optional[float] = ...) -> None: ...

class ConversionReport(_message.Message):
    __slots__ = ("exporter", "opset", "torch", "onnx", "onnxruntime", "source_sha256", "source_format", "pruning", "parity", "stages", "variants", "published", "within_budget", "error", "reference", "benchmark")
    class StagesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    EXPORTER_FIELD_NUMBER: _ClassVar[int]
    OPSET_FIELD_NUMBER: _ClassVar[int]
    TORCH_FIELD_NUMBER: _ClassVar[int]
    ONNX_FIELD_NUMBER: _ClassVar[int]
    ONNXRUNTIME_FIELD_NUMBER: _ClassVar[int]
    SOURCE_SHA256_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FORMAT_FIELD_NUMBER: _ClassVar[int]
    PRUNING_FIELD_NUMBER: _ClassVar[int]
    PARITY_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    VARIANTS_FIELD_NUMBER: _ClassVar[int]
    PUBLISHED_FIELD_NUMBER: _ClassVar[int]
    WITHIN_BUDGET_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    BENCHMARK_FIELD_NUMBER: _ClassVar[int]
    exporter: str
    opset: int
    torch: str
    onnx: str
    onnxruntime: str
    source_sha256: str
    source_format: str
    pruning: PruningReport
    parity: ParityReport
    stages: _containers.ScalarMap[str, float]
    variants: _containers.RepeatedCompositeFieldContainer[VariantReport]
    published: str
    within_budget: bool
    error: ReportError
    reference: ParityReport
    benchmark: str
    def __init__(self, exporter: _Optional[str] = ..., opset: _Optional[int] = ..., torch: _Optional[str] = ..., onnx: _Optional[str] = ..., onnxruntime: _Optional[str] = ..., source_sha256: _Optional[str] = ..., source_format: _Optional[str] = ..., pruning: _Optional[_Union[PruningReport, _Mapping]] = ..., parity: _Optional[_Union[ParityReport, _Mapping]] = ..., stages: _Optional[_Mapping[str, float]] = ..., variants: _Optional[_Iterable[_Union[VariantReport, _Mapping]]] = ..., published: _Optional[str] = ..., within_budget: _Optional[bool] = ..., error: _Optional[_Union[ReportError, _Mapping]] = ..., reference: _Optional[_Union[ParityReport, _Mapping]] = ..., benchmark: _Optional[str] = ...) -> None: ...

class ReportError(_message.Message):
    __slots__ = ("stage", "kind", "message")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    stage: str
    kind: str
    message: str
    def __init__(self, stage: _Optional[str] = ..., kind: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("job_id", "model", "upload_id", "format", "source_sha256", "state", "stage", "fraction", "message", "version", "error", "report", "report_json", "created_ms", "started_ms", "finished_ms", "spec_json")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_SHA256_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    FRACTION_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    REPORT_FIELD_NUMBER: _ClassVar[int]
    REPORT_JSON_FIELD_NUMBER: _ClassVar[int]
    CREATED_MS_FIELD_NUMBER: _ClassVar[int]
    STARTED_MS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_MS_FIELD_NUMBER: _ClassVar[int]
    SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    model: str
    upload_id: str
    format: SourceFormat
    source_sha256: str
    state: JobState
    stage: str
    fraction: float
    message: str
    version: int
    error: _inference_pb2.Error
    report: ConversionReport
    report_json: str
    created_ms: int
    started_ms: int
    finished_ms: int
    spec_json: str
    def __init__(self, job_id: _Optional[str] = ..., model: _Optional[str] = ..., upload_id: _Optional[str] = ..., format: _Optional[_Union[SourceFormat, str]] = ..., source_sha256: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ..., stage: _Optional[str] = ..., fraction: _Optional[float] = ..., message: _Optional[str] = ..., version: _Optional[int] = ..., error: _Optional[_Union[_inference_pb2.Error, _Mapping]] = ..., report: _Optional[_Union[ConversionReport, _Mapping]] = ..., report_json: _Optional[str] = ..., created_ms: _Optional[int] = ..., started_ms: _Optional[int] = ..., finished_ms: _Optional[int] = ..., spec_json: _Optional[str] = ...) -> None: ...

class ProgressEvent(_message.Message):
    __slots__ = ("job_id", "seq", "stage", "fraction", "message", "state", "error_kind", "time_ms")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    FRACTION_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ERROR_KIND_FIELD_NUMBER: _ClassVar[int]
    TIME_MS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    seq: int
    stage: str
    fraction: float
    message: str
    state: JobState
    error_kind: str
    time_ms: int
    def __init__(self, job_id: _Optional[str] = ..., seq: _Optional[int] = ..., stage: _Optional[str] = ..., fraction: _Optional[float] = ..., message: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ..., error_kind: _Optional[str] = ..., time_ms: _Optional[int] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class WatchJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("model", "limit", "page_token")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    model: str
    limit: int
    page_token: str
    def __init__(self, model: _Optional[str] = ..., limit: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs", "next_page_token")
    JOBS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    next_page_token: str
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class VersionInfo(_message.Message):
    __slots__ = ("version", "state", "reason", "is_default", "job_id", "size_bytes", "report", "report_json")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    IS_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    REPORT_FIELD_NUMBER: _ClassVar[int]
    REPORT_JSON_FIELD_NUMBER: _ClassVar[int]
    version: int
    state: _inference_pb2.ModelState
    reason: str
    is_default: bool
    job_id: str
    size_bytes: int
    report: ConversionReport
    report_json: str
    def __init__(self, version: _Optional[int] = ..., state: _Optional[_Union[_inference_pb2.ModelState, str]] = ..., reason: _Optional[str] = ..., is_default: _Optional[bool] = ..., job_id: _Optional[str] = ..., size_bytes: _Optional[int] = ..., report: _Optional[_Union[ConversionReport, _Mapping]] = ..., report_json: _Optional[str] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "default_version", "versions", "reason")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_VERSION_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    name: str
    default_version: int
    versions: _containers.RepeatedCompositeFieldContainer[VersionInfo]
    reason: str
    def __init__(self, name: _Optional[str] = ..., default_version: _Optional[int] = ..., versions: _Optional[_Iterable[_Union[VersionInfo, _Mapping]]] = ..., reason: _Optional[str] = ...) -> None: ...

class DeleteModelVersionRequest(_message.Message):
    __slots__ = ("model", "version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class DeleteModelVersionResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SetDefaultVersionRequest(_message.Message):
    __slots__ = ("model", "version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class SetDefaultVersionResponse(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: ModelInfo
    def __init__(self, model: _Optional[_Union[ModelInfo, _Mapping]] = ...) -> None: ...
