"""grpc.health.v1 Check without depending on grpcio-health-checking.

The two messages are one field each, so they are encoded by hand; importing a second compiled
copy of ``grpc.health.v1`` would clash with grpcio-health-checking's in the descriptor pool.
"""

from __future__ import annotations

CHECK_METHOD = "/grpc.health.v1.Health/Check"
SERVING = 1
NOT_SERVING = 2
SERVICE_UNKNOWN = 3


def encode_check_request(service: str) -> bytes:
    raw = service.encode("utf-8")
    if not raw:
        return b""
    return b"\x0a" + _varint(len(raw)) + raw


def decode_check_response(data: bytes) -> int:
    """The ``status`` field (1, varint); 0 (UNKNOWN) when absent."""
    i = 0
    status = 0
    while i < len(data):
        key, i = _read_varint(data, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _read_varint(data, i)
            if field == 1:
                status = value
        elif wire == 2:
            length, i = _read_varint(data, i)
            i += length
        else:
            raise ValueError("unexpected wire type in HealthCheckResponse")
    return status


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _read_varint(data: bytes, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        if i >= len(data) or shift > 63:
            raise ValueError("truncated varint in HealthCheckResponse")
        b = data[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7
