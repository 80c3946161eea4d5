"""The HTTP side of the one error table: domain error kind -> HTTP status.

gRPC's codes live in ``ferry.server.grpc.status``; this is the same decision in HTTP's words,
made once per kind, so the REST adapter and the gRPC adapters refuse the same requests for the
same reasons. Triton's HTTP server is the reference clients were written against, so its mapping
is followed where Triton has the same error (INTERNAL 500, NOT_FOUND 404, UNAVAILABLE 503,
UNSUPPORTED 501, everything a client sent wrong 400; a full queue is UNAVAILABLE there, so 503,
not 429). Kinds Triton lacks take their plain HTTP meaning (401, 403, 409).

Every error body is ``{"error": message, "kind": KIND}``: ``error`` is what tritonclient reads,
``kind`` is Ferry's finer error kind, also sent as the ``ferry-error`` header (the name of the
gRPC trailing metadata that carries it there).
"""

from __future__ import annotations

import json
from email.utils import formatdate
from http import HTTPStatus

from aiohttp.http import SERVER_SOFTWARE

from ferry.client._errors import ERROR_KIND_METADATA
from ferry.server.errors import ErrorKind
from ferry.server.grpc.status import MAX_MESSAGE, status_of

ERROR_HEADER = ERROR_KIND_METADATA  # the same name as the gRPC trailing metadata key

HTTP_STATUS: dict[ErrorKind, int] = {
    ErrorKind.MODEL_NOT_FOUND: 404,
    ErrorKind.VERSION_NOT_FOUND: 404,
    ErrorKind.JOB_NOT_FOUND: 404,
    ErrorKind.UPLOAD_NOT_FOUND: 404,
    ErrorKind.INVALID_INPUT: 400,
    ErrorKind.INVALID_ARGUMENT: 400,
    ErrorKind.MODEL_NOT_READY: 503,
    ErrorKind.UNAVAILABLE: 503,
    ErrorKind.QUEUE_FULL: 503,  # Triton: "Exceeds maximum queue size" is UNAVAILABLE
    ErrorKind.LIMIT_EXCEEDED: 400,  # Triton: a request over a limit is INVALID_ARG
    ErrorKind.DEADLINE_EXCEEDED: 503,  # Triton: "Request timeout expired" is UNAVAILABLE
    ErrorKind.CANCELLED: 400,
    ErrorKind.ALREADY_EXISTS: 409,
    ErrorKind.CONVERSION_FAILED: 400,
    ErrorKind.FAILED_PRECONDITION: 400,  # Triton: a model that fails to load is INVALID_ARG
    ErrorKind.UNAUTHENTICATED: 401,
    ErrorKind.PERMISSION_DENIED: 403,
    ErrorKind.UNIMPLEMENTED: 501,
    ErrorKind.INTERNAL: 500,
}


class HttpError(Exception):
    """A refusal that exists only in HTTP (no such route, wrong method, body too large): its
    status is HTTP's own, and its kind says what the gRPC side would call it."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: ErrorKind = ErrorKind.INVALID_ARGUMENT,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.headers = headers or {}


def error_of(exc: BaseException) -> tuple[int, str, ErrorKind, dict[str, str]]:
    """(status, message, kind, extra headers) for any exception; unexpected ones are 500, and
    logged and hidden by the gRPC side's ``status_of``, so both protocols treat them alike."""
    if isinstance(exc, HttpError):
        return exc.status, exc.message[:MAX_MESSAGE], exc.kind, exc.headers
    _, message, name = status_of(exc)
    kind = ErrorKind(name)
    return HTTP_STATUS[kind], message, kind, {}


def error_body(message: str, kind: ErrorKind) -> bytes:
    return json.dumps({"error": message, "kind": kind.value}).encode()


def raw_answer(
    status: int, message: str, kind: ErrorKind, headers: dict[str, str] | None = None
) -> bytes:
    """An error answer written straight to a connection, where no request has been parsed to
    answer through aiohttp (a connection past the cap, a head that never arrived whole): the
    same status line, headers and body as aiohttp's error answers, so a client reads them
    alike. They were built by hand in two places, with different headers (no Date, no Server).
    The connection is always closed after it."""
    body = error_body(message, kind)
    lines = [
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}",
        "Content-Type: application/json",
        f"{ERROR_HEADER}: {kind.value}",
        *(f"{name}: {value}" for name, value in (headers or {}).items()),
        f"Content-Length: {len(body)}",
        f"Date: {formatdate(usegmt=True)}",
        f"Server: {SERVER_SOFTWARE}",
        "Connection: close",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


if set(HTTP_STATUS) != set(ErrorKind):  # pragma: no cover - a new kind needs a row here
    raise RuntimeError(
        f"HTTP_STATUS lacks {sorted(k.value for k in set(ErrorKind) - set(HTTP_STATUS))}"
    )
