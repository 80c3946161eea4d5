"""The shared hand-written wire codec (``ferry.codec._wire``) against protobuf's own bytes: the
server's responses, ferry.v1 and Open Inference Protocol, unary and stream, for every dtype and the
awkward layouts (non-contiguous, big-endian, empty, BYTES, long names, no model or id)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from ferry.codec import datatype_name, encode_tensor, to_bytes
from ferry.codec._wire import (
    encode_infer_response,
    encode_oip_response,
    encode_oip_stream_result,
    encode_stream_result,
)
from ferry.proto.kserve.v2 import grpc_service_pb2 as kpb
from ferry.proto.v1 import inference_pb2 as pb
from ferry.server.core.types import InferenceResult


def to_response(result: InferenceResult) -> pb.InferResponse:
    """The oracle: the ferry.v1 response as protobuf's own message."""
    return pb.InferResponse(
        model=result.model,
        version=result.version,
        id=result.id,
        outputs=[encode_tensor(name, arr) for name, arr in result.outputs.items()],
    )


def encode_response(result: InferenceResult, response: kpb.ModelInferResponse) -> None:
    """The oracle: the OIP response as protobuf's own message, outputs as raw contents."""
    response.model_name = result.model
    response.model_version = str(result.version)
    response.id = result.id
    for name, array in result.outputs.items():
        code, shape, data = to_bytes(array)
        response.outputs.add(name=name, datatype=datatype_name(code), shape=shape)
        response.raw_output_contents.append(data)


ARRAYS: dict[str, np.ndarray] = {
    "bool": np.array([[True, False, True]]),
    "u8": np.arange(6, dtype=np.uint8).reshape(2, 3),
    "i64": np.array([[-(2**63), 0, 2**63 - 1]], np.int64),
    "u64": np.array([2**64 - 1], np.uint64),
    "f16": np.array([[np.inf, -0.5]], np.float16),
    "f32": np.random.default_rng(0).standard_normal((4, 10)).astype(np.float32),
    "f64": np.array([[np.nan, 1e-300]], np.float64),
    "bf16": np.array([[1.5, -2.0]], ml_dtypes.bfloat16),
    "big_endian": np.arange(5, dtype=">i4"),
    "strided": np.arange(24, dtype=np.float32).reshape(4, 6)[:, ::2],
    "fortran": np.asfortranarray(np.arange(6, dtype=np.int32).reshape(2, 3)),
    "empty": np.zeros((0, 3), np.float32),
    "scalar": np.array(3.5, np.float64),
    "bytes": np.array([[b"ab", b"", "\u00e9"]], dtype=object),
    "x" * 300: np.ones((1, 200), np.float32),  # a name and a length over one varint byte
}


def cases() -> list[InferenceResult]:
    return [
        InferenceResult("mlp", 3, "req-1", {"logits": ARRAYS["f32"]}),
        InferenceResult("", 0, "", {"logits": ARRAYS["f32"]}),
        InferenceResult("m" * 200, 2**40, "id" * 100, dict(ARRAYS)),
        InferenceResult("none", 1, "", {}),
    ]


@pytest.mark.parametrize("result", cases(), ids=["plain", "defaults", "every-kind", "no-outputs"])
def test_ferry_v1_response_bytes_equal_protobuf(result: InferenceResult) -> None:
    expected = to_response(result)
    data = encode_infer_response(result.model, result.version, result.id, result.outputs)
    assert data == expected.SerializeToString()
    stream = encode_stream_result(result.id, result.model, result.version, result.outputs)
    assert stream == pb.InferStreamResponse(id=result.id, response=expected).SerializeToString()
    assert pb.InferResponse.FromString(data) == expected


@pytest.mark.parametrize("result", cases(), ids=["plain", "defaults", "every-kind", "no-outputs"])
def test_oip_response_bytes_equal_protobuf(result: InferenceResult) -> None:
    expected = kpb.ModelInferResponse()
    encode_response(result, expected)
    version = str(result.version)
    data = encode_oip_response(result.model, version, result.id, result.outputs)
    assert data == expected.SerializeToString()
    stream = encode_oip_stream_result(result.model, version, result.id, result.outputs)
    expected.parameters["triton_final_response"].bool_param = True  # each is its request's last
    wrapped = kpb.ModelStreamInferResponse(infer_response=expected)
    assert stream == wrapped.SerializeToString()
    del expected.parameters["triton_final_response"]
    assert kpb.ModelInferResponse.FromString(data) == expected


def test_response_owns_its_bytes() -> None:
    """The message is a copy: changing the array afterwards does not change what was sent."""
    array = np.arange(4, dtype=np.float32)
    data = encode_oip_response("m", "1", "", {"y": array})
    before = bytes(data)
    array[:] = -1
    assert data == before
