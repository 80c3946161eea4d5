"""Domain errors: what went wrong, in the core's words.

The core (registry, batchers, sessions, conversion jobs) raises these and never imports grpc. The
protocol adapters translate them at one boundary (``ferry.server.grpc.status``), so a status code is
decided in exactly one table and a client's mistake can never leak out as INTERNAL.
"""

from __future__ import annotations

import enum


class ErrorKind(enum.Enum):
    """A domain error's kind. Its value is sent to clients (trailing metadata ``ferry-error``)
    so the SDK can raise a finer exception than the status code alone allows."""

    MODEL_NOT_FOUND = "MODEL_NOT_FOUND"
    VERSION_NOT_FOUND = "VERSION_NOT_FOUND"
    JOB_NOT_FOUND = "JOB_NOT_FOUND"
    UPLOAD_NOT_FOUND = "UPLOAD_NOT_FOUND"
    INVALID_INPUT = "INVALID_INPUT"
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    MODEL_NOT_READY = "MODEL_NOT_READY"
    UNAVAILABLE = "UNAVAILABLE"
    QUEUE_FULL = "QUEUE_FULL"
    LIMIT_EXCEEDED = "LIMIT_EXCEEDED"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    CANCELLED = "CANCELLED"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    CONVERSION_FAILED = "CONVERSION_FAILED"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    UNIMPLEMENTED = "UNIMPLEMENTED"
    INTERNAL = "INTERNAL"


class FerryError(Exception):
    """Base of every domain error. ``message`` must say what to fix, not only what failed."""

    kind: ErrorKind = ErrorKind.INTERNAL

    def __init__(self, message: str, *, kind: ErrorKind | None = None) -> None:
        super().__init__(message)
        self.message = message
        if kind is not None:
            self.kind = kind


class ModelNotFound(FerryError):
    kind = ErrorKind.MODEL_NOT_FOUND


class VersionNotFound(FerryError):
    kind = ErrorKind.VERSION_NOT_FOUND


class JobNotFound(FerryError):
    kind = ErrorKind.JOB_NOT_FOUND


class InvalidInput(FerryError):
    """A request's tensors do not match the model: name, dtype, shape or byte length."""

    kind = ErrorKind.INVALID_INPUT


class InvalidArgument(FerryError):
    """A request or configuration field is malformed (not a tensor mismatch)."""

    kind = ErrorKind.INVALID_ARGUMENT


class ModelNotReady(FerryError):
    """The model exists but is loading, failed, or unloading: retrying later may succeed."""

    kind = ErrorKind.MODEL_NOT_READY


class Unavailable(FerryError):
    """The server is shutting down or a component is closed."""

    kind = ErrorKind.UNAVAILABLE


class QueueFull(FerryError):
    """A batcher's bounded queue is full: rejected at once instead of waiting without bound."""

    kind = ErrorKind.QUEUE_FULL


class LimitExceeded(FerryError):
    """A request is over a configured limit; the message names the limit and its value."""

    kind = ErrorKind.LIMIT_EXCEEDED


class DeadlineExceeded(FerryError):
    kind = ErrorKind.DEADLINE_EXCEEDED


class Cancelled(FerryError):
    kind = ErrorKind.CANCELLED


class AlreadyExists(FerryError):
    kind = ErrorKind.ALREADY_EXISTS


class ConversionFailed(FerryError):
    """A conversion job failed (export, parity, accuracy budget). It is raised in the conversion
    child, so it carries no report: the report so far reaches the job through report.json, which
    the child writes on every failure."""

    kind = ErrorKind.CONVERSION_FAILED


class FailedPrecondition(FerryError):
    kind = ErrorKind.FAILED_PRECONDITION


class Unauthenticated(FerryError):
    kind = ErrorKind.UNAUTHENTICATED


class PermissionDenied(FerryError):
    kind = ErrorKind.PERMISSION_DENIED


class Unimplemented(FerryError):
    kind = ErrorKind.UNIMPLEMENTED


class InternalError(FerryError):
    """A bug or an environment failure; logged with a traceback by the adapter."""

    kind = ErrorKind.INTERNAL


def first_line(exc: BaseException) -> str:
    """An exception as one line for a message: its first line, bounded (library errors from
    onnx, onnxruntime or torch can run to pages)."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:500]
