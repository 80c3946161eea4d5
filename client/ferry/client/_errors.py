"""The SDK's exceptions: one class per failure a caller handles differently.

::

    FerryError                      base of everything the SDK raises
    ├── ConnectionError_            cannot reach the server (UNAVAILABLE before any answer)
    ├── ServerError                 INTERNAL / UNKNOWN / DATA_LOSS: a server bug, logged there
    ├── InvalidInputError           INVALID_ARGUMENT: fix the request (name, dtype, shape, bytes)
    ├── NotFoundError               NOT_FOUND
    │   ├── ModelNotFoundError          no such model or version
    │   └── JobNotFoundError            no such conversion job or upload
    ├── AlreadyExistsError          ALREADY_EXISTS
    ├── ModelNotReadyError          UNAVAILABLE for a model that is loading or failed (retryable)
    ├── UnavailableError            UNAVAILABLE otherwise: shutting down, no connection (retryable)
    ├── ResourceExhaustedError      RESOURCE_EXHAUSTED (retryable)
    │   ├── ServerOverloadedError       a model's queue is full
    │   └── LimitExceededError          a request is over a configured limit (not retryable)
    ├── DeadlineExceededError       DEADLINE_EXCEEDED: the deadline passed, queued or in flight
    ├── CancelledError              CANCELLED
    ├── ConversionError             FAILED_PRECONDITION: a conversion failed (carries the report)
    ├── AuthenticationError         UNAUTHENTICATED: missing or wrong token
    ├── PermissionDeniedError       PERMISSION_DENIED: the token may not call this RPC
    └── UnimplementedError          UNIMPLEMENTED

Every class keeps the gRPC ``code``, the server's ``message`` and its domain ``kind`` (from the
``ferry-error`` trailing metadata), so nothing the server said is lost. ``from_rpc_error`` is the
one place where ``grpc.RpcError`` becomes one of these.
"""

from __future__ import annotations

from typing import ClassVar

import grpc

ERROR_KIND_METADATA = "ferry-error"


class FerryError(Exception):
    """Base class of every exception the SDK raises."""

    retryable: ClassVar[bool] = False

    def __init__(
        self, message: str, *, code: grpc.StatusCode | None = None, kind: str = ""
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.kind = kind

    def __str__(self) -> str:
        code = f"{self.code.name}: " if self.code is not None else ""
        return f"{code}{self.message}"


class ConnectionError_(FerryError):
    retryable = True


class ServerError(FerryError):
    pass


class InvalidInputError(FerryError):
    pass


class NotFoundError(FerryError):
    pass


class ModelNotFoundError(NotFoundError):
    pass


class JobNotFoundError(NotFoundError):
    pass


class AlreadyExistsError(FerryError):
    pass


class UnavailableError(FerryError):
    retryable = True


class ModelNotReadyError(UnavailableError):
    retryable = True


class ResourceExhaustedError(FerryError):
    retryable = True


class ServerOverloadedError(ResourceExhaustedError):
    retryable = True


class LimitExceededError(ResourceExhaustedError):
    retryable = False


class DeadlineExceededError(FerryError):
    pass


class CancelledError(FerryError):
    pass


class ConversionError(FerryError):
    pass


class AuthenticationError(FerryError):
    pass


class PermissionDeniedError(FerryError):
    pass


class UnimplementedError(FerryError):
    pass


# Server domain kind -> class; finer than the status code alone.
KIND_CLASSES: dict[str, type[FerryError]] = {
    "MODEL_NOT_FOUND": ModelNotFoundError,
    "VERSION_NOT_FOUND": ModelNotFoundError,
    "JOB_NOT_FOUND": JobNotFoundError,
    "UPLOAD_NOT_FOUND": JobNotFoundError,
    "INVALID_INPUT": InvalidInputError,
    "INVALID_ARGUMENT": InvalidInputError,
    "MODEL_NOT_READY": ModelNotReadyError,
    "UNAVAILABLE": UnavailableError,
    "QUEUE_FULL": ServerOverloadedError,
    "LIMIT_EXCEEDED": LimitExceededError,
    "DEADLINE_EXCEEDED": DeadlineExceededError,
    "CANCELLED": CancelledError,
    "ALREADY_EXISTS": AlreadyExistsError,
    "CONVERSION_FAILED": ConversionError,
    "FAILED_PRECONDITION": ConversionError,
    "UNAUTHENTICATED": AuthenticationError,
    "PERMISSION_DENIED": PermissionDeniedError,
    "UNIMPLEMENTED": UnimplementedError,
    "INTERNAL": ServerError,
}

# Status code -> class, for answers without a kind (other servers, gRPC itself).
CODE_CLASSES: dict[grpc.StatusCode, type[FerryError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidInputError,
    grpc.StatusCode.OUT_OF_RANGE: InvalidInputError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.CANCELLED: CancelledError,
    grpc.StatusCode.FAILED_PRECONDITION: ConversionError,
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.UNIMPLEMENTED: UnimplementedError,
    grpc.StatusCode.INTERNAL: ServerError,
    grpc.StatusCode.UNKNOWN: ServerError,
    grpc.StatusCode.DATA_LOSS: ServerError,
    grpc.StatusCode.ABORTED: ServerError,
}


def error_class(code: grpc.StatusCode | None, kind: str = "") -> type[FerryError]:
    cls = KIND_CLASSES.get(kind)
    if cls is not None:
        return cls
    if code is None:
        return FerryError
    return CODE_CLASSES.get(code, FerryError)


def from_status(code: grpc.StatusCode | None, message: str, kind: str = "") -> FerryError:
    return error_class(code, kind)(message, code=code, kind=kind)


def from_rpc_error(exc: grpc.RpcError) -> FerryError:
    """Translate a grpc error (sync or aio) into the SDK's exception tree."""
    code: grpc.StatusCode | None = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else None
    message = details or (code.name if code is not None else str(exc))
    kind = ""
    trailing = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    for key, value in trailing or ():
        if key == ERROR_KIND_METADATA:
            kind = value if isinstance(value, str) else bytes(value).decode("ascii", "replace")
    if code is grpc.StatusCode.UNAVAILABLE and not kind:
        return ConnectionError_(message, code=code)
    return from_status(code, message, kind)
