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
    │   └── LimitExceededError          over a configured limit, message size included (not retryable)
    ├── DeadlineExceededError       DEADLINE_EXCEEDED: the deadline passed, queued or in flight
    ├── CancelledError              CANCELLED
    │   └── ServerCancelledError        the server dropped the call unstarted (retryable)
    ├── FailedPreconditionError     FAILED_PRECONDITION: the server's state forbids it now
    │   └── ConversionError             a conversion failed (carries the report)
    ├── AuthenticationError         UNAUTHENTICATED: missing or wrong token
    ├── PermissionDeniedError       PERMISSION_DENIED: the token may not call this RPC
    ├── UnimplementedError          UNIMPLEMENTED (an unknown method: the wrong listener?)
    └── ClientClosedError           a call on a closed client

Every class keeps the gRPC ``code``, the server's ``message`` and its domain ``kind`` (from the
``ferry-error`` trailing metadata), so nothing the server said is lost. ``from_rpc_error`` is the
one place where ``grpc.RpcError`` becomes one of these, and so the one place where gRPC's own
answers, which name no setting and no listener, get the words a user needs: a message over a size
limit becomes ``LimitExceededError`` naming both settings, and an unknown method says which
listener serves what.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import ClassVar, cast

import grpc

ERROR_KIND_METADATA = "ferry-error"

# gRPC core's answer for a message over a size limit: "CLIENT: Sent message larger than max
# (N vs. M)", or "SERVER: Received message larger than max (N vs. M)" when the peer refused it.
_MESSAGE_SIZE = re.compile(
    r"(?:(?P<side>CLIENT|SERVER):\s*)?(?P<dir>Sent|Received) message larger than max "
    r"\((?P<size>\d+) vs\. (?P<limit>\d+)\)"
)
CLIENT_LIMIT = "the client's max_message_bytes option (InferenceClient(max_message_bytes=...))"
SERVER_LIMIT = (
    "the server's max_message_bytes setting (--max-message-bytes, FERRY_MAX_MESSAGE_BYTES)"
)
# The details grpc gives a call the peer reset (HTTP/2 RST_STREAM CANCEL); a local cancel says
# "Locally cancelled by application!", a closed channel "Channel closed!".
PEER_RESET = "CANCELLED"
WRONG_LISTENER = (
    "is this the right listener? Inference (ferry.v1.Inference, the Open Inference Protocol) is "
    "on the inference port (8001 by default); repository control and conversion "
    "(RepositoryClient, ConversionClient) on the management port (127.0.0.1:8003 by default)"
)


class FerryError(Exception):
    """Base class of every exception the SDK raises."""

    retryable: ClassVar[bool] = False
    code: grpc.StatusCode | None
    message: str
    kind: str

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


class InvalidArgumentError(InvalidInputError, ValueError, TypeError):
    """An argument the SDK refuses before anything is sent: a client's or a RetryPolicy's option,
    a stream's ``max_in_flight``. An ``InvalidInputError``, so that ``except FerryError`` catches
    every error of the SDK, and the ``ValueError``/``TypeError`` these raised before."""


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


class ServerCancelledError(CancelledError):
    """The server's side reset the call before answering it. grpc's core does this to calls it
    had received but not yet handed to the server when the server shuts down (about one per
    caller in flight at SIGTERM, measured), and to calls over ``--max-pending-calls``: neither
    reached a handler, so an idempotent call is retried (on another replica, if there is one).
    A call this client cancelled or whose channel it closed stays a plain CancelledError."""

    retryable = True


class FailedPreconditionError(FerryError):
    """The request is well formed but the server's state forbids it now: a model that failed to
    load, deleting the version a configured default_version or a rollout names (the newest one,
    the default by rule alone, may be deleted), an upload a running job reads.
    The message says what to change first."""


class ConversionError(FailedPreconditionError):
    """A conversion failed (its job's status, or a ``wait()`` on it): its own code is
    FAILED_PRECONDITION too, so ``except FailedPreconditionError`` catches both."""


class AuthenticationError(FerryError):
    pass


class PermissionDeniedError(FerryError):
    pass


class UnimplementedError(FerryError):
    pass


class ClientClosedError(FerryError):
    """A call on a client after ``close()`` (or after its ``with`` block), or one of its calls
    that was in flight or between retries when it closed (a stream's requests too): make a new
    client."""

    @classmethod
    def of(cls, client: object) -> ClientClosedError:
        return cls(
            f"this {type(client).__name__} is closed (close() was called, or its `with` block "
            "ended): create a new client"
        )


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
    "FAILED_PRECONDITION": FailedPreconditionError,
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
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
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


def message_size_error(code: grpc.StatusCode | None, message: str) -> LimitExceededError | None:
    """gRPC's "message larger than max" as the request-limit error the SDK documents, naming the
    setting to raise: which side refused is in gRPC's prefix (a bare message, from an older
    core, names both)."""
    if code is not grpc.StatusCode.RESOURCE_EXHAUSTED:
        return None
    m = _MESSAGE_SIZE.search(message)
    if m is None:
        return None
    size, limit = int(m["size"]), int(m["limit"])
    side, sent = m["side"], m["dir"] == "Sent"
    if side == "CLIENT" and sent:
        what = (
            f"this client refused to send a {size:,}-byte message: over {CLIENT_LIMIT}, {limit:,}"
        )
    elif side == "CLIENT":
        what = (
            f"this client refused a {size:,}-byte answer: over {CLIENT_LIMIT}, {limit:,}; the "
            f"server's own limit is {SERVER_LIMIT}"
        )
    elif side == "SERVER":
        what = (
            f"the server refused a {size:,}-byte message: over {SERVER_LIMIT}, {limit:,}; the "
            f"client's own limit is {CLIENT_LIMIT}"
        )
    else:
        what = (
            f"a {size:,}-byte message is over a {limit:,}-byte limit: {SERVER_LIMIT} on the "
            f"server, {CLIENT_LIMIT} in the client"
        )
    return LimitExceededError(
        f"{what}. Send smaller batches, or raise the limit ({message})",
        code=code,
        kind="LIMIT_EXCEEDED",
    )


def from_rpc_error(exc: grpc.RpcError) -> FerryError:
    """Translate a grpc error (sync or aio) into the SDK's exception tree."""
    code: grpc.StatusCode | None = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else None
    message: str = details or (code.name if code is not None else str(exc))
    kind = ""
    trailing = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    # Sync calls give (key, value) namedtuples, aio calls an aio.Metadata of pairs: both iterate
    # as pairs, which the stubs do not say.
    pairs = cast("Iterable[tuple[str, str | bytes]]", trailing or ())
    for key, value in pairs:
        if key == ERROR_KIND_METADATA:
            kind = value if isinstance(value, str) else bytes(value).decode("ascii", "replace")
    if code is grpc.StatusCode.UNAVAILABLE and not kind:
        return ConnectionError_(message, code=code)
    if code is grpc.StatusCode.CANCELLED and not kind and message == PEER_RESET:
        return ServerCancelledError(message, code=code)
    if not kind:
        # Answers from gRPC itself (no kind): the ones that would otherwise name nothing.
        too_large = message_size_error(code, message)
        if too_large is not None:
            return too_large
        if code is grpc.StatusCode.UNIMPLEMENTED and "Method not found" in message:
            message = f"{message.rstrip('!. ')}: {WRONG_LISTENER}"
    return from_status(code, message, kind)
