"""Ferry's Python SDK: typed clients that hide tensor serialization.

Light by design: grpcio, protobuf and numpy only; torch tensors are accepted when the caller
already has torch, but this package never imports torch or onnxruntime.
"""

from __future__ import annotations

from ferry.client._async import AsyncInferenceClient, AsyncInferStream
from ferry.client._channel import ChannelConfig, TLSConfig
from ferry.client._conversion import ConversionClient, Job, JobFailedError
from ferry.client._conversion_types import (
    InputSpec,
    ModelInfo,
    Parity,
    ProgressEvent,
    Pruning,
    PruningReport,
    Quantization,
    Report,
    Serving,
    Upload,
    Validation,
    VariantReport,
    VersionInfo,
)
from ferry.client._errors import (
    AlreadyExistsError,
    AuthenticationError,
    CancelledError,
    ClientClosedError,
    ConnectionError_,
    ConversionError,
    DeadlineExceededError,
    FerryError,
    InvalidInputError,
    JobNotFoundError,
    LimitExceededError,
    ModelNotFoundError,
    ModelNotReadyError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    ServerError,
    ServerOverloadedError,
    UnavailableError,
    UnimplementedError,
)
from ferry.client._retry import RetryPolicy
from ferry.client._stream import InferStream
from ferry.client._sync import InferenceClient, RepositoryClient
from ferry.client._types import (
    BatchingPolicy,
    DurationStat,
    InferResult,
    ModelMetadata,
    ModelStatistics,
    ModelVersionStatus,
    RefreshResult,
    TensorInfo,
    Timings,
)

__all__ = [
    "AlreadyExistsError",
    "AsyncInferStream",
    "AsyncInferenceClient",
    "AuthenticationError",
    "BatchingPolicy",
    "CancelledError",
    "ChannelConfig",
    "ClientClosedError",
    "ConnectionError_",
    "ConversionClient",
    "ConversionError",
    "DeadlineExceededError",
    "DurationStat",
    "FerryError",
    "InferResult",
    "InferStream",
    "InferenceClient",
    "InputSpec",
    "InvalidInputError",
    "Job",
    "JobFailedError",
    "JobNotFoundError",
    "LimitExceededError",
    "ModelInfo",
    "ModelMetadata",
    "ModelNotFoundError",
    "ModelNotReadyError",
    "ModelStatistics",
    "ModelVersionStatus",
    "NotFoundError",
    "Parity",
    "PermissionDeniedError",
    "ProgressEvent",
    "Pruning",
    "PruningReport",
    "Quantization",
    "RefreshResult",
    "Report",
    "RepositoryClient",
    "ResourceExhaustedError",
    "RetryPolicy",
    "ServerError",
    "ServerOverloadedError",
    "Serving",
    "TLSConfig",
    "TensorInfo",
    "Timings",
    "UnavailableError",
    "UnimplementedError",
    "Upload",
    "Validation",
    "VariantReport",
    "VersionInfo",
]
