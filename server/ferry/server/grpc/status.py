"""The one table: domain error kind -> gRPC status code -> SDK exception class.

Every adapter turns a ``FerryError`` into a status here and nowhere else. The third column is the
class the SDK raises for that kind (``ferry.client._errors.KIND_CLASSES``); a contract test checks
that both sides agree, so the table cannot drift.
"""

from __future__ import annotations

import logging

import grpc

from ferry.client import _errors as sdk
from ferry.server.errors import ErrorKind, FerryError

log = logging.getLogger(__name__)

ERROR_TABLE: dict[ErrorKind, tuple[grpc.StatusCode, type[sdk.FerryError]]] = {
    ErrorKind.MODEL_NOT_FOUND: (grpc.StatusCode.NOT_FOUND, sdk.ModelNotFoundError),
    ErrorKind.VERSION_NOT_FOUND: (grpc.StatusCode.NOT_FOUND, sdk.ModelNotFoundError),
    ErrorKind.JOB_NOT_FOUND: (grpc.StatusCode.NOT_FOUND, sdk.JobNotFoundError),
    ErrorKind.UPLOAD_NOT_FOUND: (grpc.StatusCode.NOT_FOUND, sdk.JobNotFoundError),
    ErrorKind.INVALID_INPUT: (grpc.StatusCode.INVALID_ARGUMENT, sdk.InvalidInputError),
    ErrorKind.INVALID_ARGUMENT: (grpc.StatusCode.INVALID_ARGUMENT, sdk.InvalidInputError),
    ErrorKind.MODEL_NOT_READY: (grpc.StatusCode.UNAVAILABLE, sdk.ModelNotReadyError),
    ErrorKind.UNAVAILABLE: (grpc.StatusCode.UNAVAILABLE, sdk.UnavailableError),
    ErrorKind.QUEUE_FULL: (grpc.StatusCode.RESOURCE_EXHAUSTED, sdk.ServerOverloadedError),
    ErrorKind.LIMIT_EXCEEDED: (grpc.StatusCode.RESOURCE_EXHAUSTED, sdk.LimitExceededError),
    ErrorKind.DEADLINE_EXCEEDED: (grpc.StatusCode.DEADLINE_EXCEEDED, sdk.DeadlineExceededError),
    ErrorKind.CANCELLED: (grpc.StatusCode.CANCELLED, sdk.CancelledError),
    ErrorKind.ALREADY_EXISTS: (grpc.StatusCode.ALREADY_EXISTS, sdk.AlreadyExistsError),
    ErrorKind.CONVERSION_FAILED: (grpc.StatusCode.FAILED_PRECONDITION, sdk.ConversionError),
    ErrorKind.FAILED_PRECONDITION: (
        grpc.StatusCode.FAILED_PRECONDITION,
        sdk.FailedPreconditionError,
    ),
    ErrorKind.UNAUTHENTICATED: (grpc.StatusCode.UNAUTHENTICATED, sdk.AuthenticationError),
    ErrorKind.PERMISSION_DENIED: (grpc.StatusCode.PERMISSION_DENIED, sdk.PermissionDeniedError),
    ErrorKind.UNIMPLEMENTED: (grpc.StatusCode.UNIMPLEMENTED, sdk.UnimplementedError),
    ErrorKind.INTERNAL: (grpc.StatusCode.INTERNAL, sdk.ServerError),
}

MAX_MESSAGE = 2000
_HEAD = MAX_MESSAGE // 2
_CUT = " [...] "


def bounded(message: str) -> str:
    """``message`` cut to MAX_MESSAGE characters in its middle. Messages quote what the client
    sent first and say what to fix last ("input '<name>' appears twice in the request"), so a
    cut at the end left a client that sent a 5,000-character name only that name, 2,000
    characters of it, and not what was wrong with it."""
    if len(message) <= MAX_MESSAGE:
        return message
    tail = MAX_MESSAGE - _HEAD - len(_CUT)
    return message[:_HEAD] + _CUT + message[len(message) - tail :]


def code_of(exc: BaseException) -> grpc.StatusCode:
    """The status a failure ends with, without logging (for metrics: the adapter logs once)."""
    return ERROR_TABLE[exc.kind][0] if isinstance(exc, FerryError) else grpc.StatusCode.INTERNAL


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str, str]:
    """(code, message, kind) for any exception; unexpected ones become INTERNAL and are logged."""
    if isinstance(exc, FerryError):
        code = ERROR_TABLE[exc.kind][0]
        return code, bounded(exc.message), exc.kind.value
    log.error("unexpected error", exc_info=exc)
    return (
        grpc.StatusCode.INTERNAL,
        f"internal error ({type(exc).__name__}); the server log has the traceback",
        ErrorKind.INTERNAL.value,
    )


def trailing(kind: str) -> tuple[tuple[str, str], ...]:
    return ((sdk.ERROR_KIND_METADATA, kind),)
