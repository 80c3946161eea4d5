"""The one varint writer (``ferry.codec._wire``) and the SDK's reader (``ferry.client._wire``)
against protobuf's own encoding, and the two hand-framed messages that use them (the health
check, the load generator's request id)."""

from __future__ import annotations

import pytest
from google.protobuf import wrappers_pb2
from grpc_health.v1 import health_pb2

from ferry.client import ServerError, _health
from ferry.client._wire import decode_infer_response, decode_stream_response, read_varint
from ferry.client.loadtest._engine import id_field
from ferry.codec import CodecError
from ferry.codec._wire import encode_varint
from ferry.proto.v1 import inference_pb2 as pb

UNSIGNED_EDGES = [0, 1, 127, 128, 300, 16383, 16384, 2**31, 2**32, 2**63 - 1, 2**63, 2**64 - 1]
SIGNED_EDGES = [-1, -2, -128, -(2**31), -(2**63)]


def _protobuf_uint64(n: int) -> bytes:
    """protobuf's bytes for ``n`` as a varint: a UInt64Value is the key 0x08 then the varint."""
    raw = wrappers_pb2.UInt64Value(value=n).SerializeToString()
    assert raw[:1] == b"\x08"
    return raw[1:]


@pytest.mark.parametrize("n", UNSIGNED_EDGES)
def test_encode_varint_matches_protobuf(n: int) -> None:
    if n == 0:  # proto3 omits a zero scalar: compare with the well-known single zero byte
        assert encode_varint(0) == b"\x00"
        return
    assert encode_varint(n) == _protobuf_uint64(n)


@pytest.mark.parametrize("n", SIGNED_EDGES)
def test_negative_int64_takes_ten_bytes_like_protobuf(n: int) -> None:
    raw = wrappers_pb2.Int64Value(value=n).SerializeToString()
    assert encode_varint(n) == raw[1:]
    assert len(encode_varint(n)) == 10


@pytest.mark.parametrize("n", UNSIGNED_EDGES)
def test_read_varint_round_trips_and_returns_the_next_index(n: int) -> None:
    raw = b"\xff" + encode_varint(n) + b"\x01"
    assert read_varint(raw, 1) == (n, len(raw) - 1)


def test_read_varint_rejects_a_truncated_or_overlong_varint() -> None:
    with pytest.raises(IndexError):
        read_varint(b"\x80\x80", 0)
    with pytest.raises(CodecError, match="past 10 bytes"):
        read_varint(b"\xff" * 11 + b"\x01", 0)


@pytest.mark.parametrize("service", ["", "mlp", "m" * 200])
def test_health_request_is_what_grpc_health_serializes(service: str) -> None:
    expected = health_pb2.HealthCheckRequest(service=service).SerializeToString()
    assert _health.encode_check_request(service) == expected


@pytest.mark.parametrize("status", [0, 1, 2, 3])
def test_health_response_decodes_what_grpc_health_serializes(status: int) -> None:
    raw = health_pb2.HealthCheckResponse(status=status).SerializeToString()
    assert _health.decode_check_response(raw) == status


def test_health_response_that_is_truncated_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="truncated"):
        _health.decode_check_response(b"\x08\x80")


@pytest.mark.parametrize("length", [0, 1, 127, 128, 20000])
def test_request_id_field_appends_as_protobuf_parses_it(length: int) -> None:
    base = pb.InferRequest(model="m", id="old").SerializeToString()
    assert pb.InferRequest.FromString(base + id_field("x" * length)).id == "x" * length


@pytest.mark.parametrize(
    "raw",
    [
        b"\x22\x05abc",  # an output field longer than the message
        b"\x22\x02\x0a\xff",  # a tensor name cut short
        b"\x0a\x02\xff\xfe",  # a model name that is not UTF-8
        b"\x10" + b"\xff" * 11,  # a varint over 10 bytes
    ],
)
def test_an_answer_the_sdk_cannot_read_is_a_server_error(raw: bytes) -> None:
    """The codec's own error (a ValueError) came out of infer(), outside FerryError."""
    with pytest.raises(ServerError, match="the server's answer cannot be read"):
        decode_infer_response(raw)
    with pytest.raises(ServerError, match="the server's answer cannot be read"):
        decode_stream_response(b"\x0a\x01r\x12" + bytes([len(raw)]) + raw)


def test_a_stream_answer_with_a_broken_error_is_a_server_error() -> None:
    with pytest.raises(ServerError, match="malformed stream answer"):
        decode_stream_response(b"\x1a\x02\x08\xff")


def test_a_health_answer_the_sdk_cannot_read_is_not_serving() -> None:
    assert _health.is_serving(health_pb2.HealthCheckResponse(status=1).SerializeToString())
    assert not _health.is_serving(b"\x08")
    assert not _health.is_serving(b"\x0b")
