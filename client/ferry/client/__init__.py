"""Ferry's Python SDK: typed clients that hide tensor serialization.

Light by design: grpcio, protobuf and numpy only; torch tensors are accepted when the caller
already has torch, but this package never imports torch or onnxruntime.
"""

from __future__ import annotations

from ferry.client._errors import (
    AlreadyExistsError,
    AuthenticationError,
    CancelledError,
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
from ferry.client._sync import InferenceClient, RepositoryClient
from ferry.client._types import (
    BatchingPolicy,
    DurationStat,
    InferResult,
    ModelMetadata,
    ModelStatistics,
    ModelVersionStatus,
    TensorInfo,
    Timings,
)

__all__ = [
    "AlreadyExistsError",
    "AuthenticationError",
    "BatchingPolicy",
    "CancelledError",
    "ConnectionError_",
    "ConversionError",
    "DeadlineExceededError",
    "DurationStat",
    "FerryError",
    "InferResult",
    "InferenceClient",
    "InvalidInputError",
    "JobNotFoundError",
    "LimitExceededError",
    "ModelMetadata",
    "ModelNotFoundError",
    "ModelNotReadyError",
    "ModelStatistics",
    "ModelVersionStatus",
    "NotFoundError",
    "PermissionDeniedError",
    "RepositoryClient",
    "ResourceExhaustedError",
    "ServerError",
    "ServerOverloadedError",
    "TensorInfo",
    "Timings",
    "UnavailableError",
    "UnimplementedError",
]
