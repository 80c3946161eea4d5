"""grpc.health.v1 Check without depending on grpcio-health-checking.

The two messages are one field each, so they are encoded by hand; importing a second compiled
copy of ``grpc.health.v1`` would clash with grpcio-health-checking's in the descriptor pool.
"""

from __future__ import annotations

from ferry.client._errors import InvalidInputError
from ferry.client._wire import read_varint
from ferry.codec._wire import encode_varint

CHECK_METHOD = "/grpc.health.v1.Health/Check"
SERVING = 1
NOT_SERVING = 2
SERVICE_UNKNOWN = 3


def encode_check_request(service: str) -> bytes:
    if not isinstance(service, str):  # ready(1) raised AttributeError ('int' ... 'encode')
        raise InvalidInputError(f"model must be a name (str), got {type(service).__name__}")
    try:
        raw = service.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate
        raise InvalidInputError(f"model name is not encodable as UTF-8: {exc.reason}") from None
    if not raw:
        return b""
    return b"\x0a" + encode_varint(len(raw)) + raw


def decode_check_response(data: bytes) -> int:
    """The ``status`` field (1, varint); 0 (UNKNOWN) when absent."""
    i = 0
    status = 0
    try:
        while i < len(data):
            key, i = read_varint(data, i)
            field, wire = key >> 3, key & 7
            if wire == 0:
                value, i = read_varint(data, i)
                if field == 1:
                    status = value
            elif wire == 2:
                length, i = read_varint(data, i)
                i += length
            else:
                raise ValueError("unexpected wire type in HealthCheckResponse")
    except IndexError:
        raise ValueError("truncated varint in HealthCheckResponse") from None
    return status


def is_serving(data: bytes) -> bool:
    """Whether an answer says SERVING; one this client cannot read does not (``ready()`` answers
    a yes or no, and a malformed answer raised the decoder's ValueError through it)."""
    try:
        return decode_check_response(data) == SERVING
    except ValueError:
        return False
