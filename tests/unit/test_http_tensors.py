"""The REST form's tensor translation and its error table, without a server."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from ferry.server.core.types import InferenceResult, Limits
from ferry.server.errors import (
    ErrorKind,
    FerryError,
    InvalidArgument,
    LimitExceeded,
    Unimplemented,
)
from ferry.server.http.errors import HTTP_STATUS, error_of
from ferry.server.http.tensors import HttpInfer


def decode(request: dict[str, Any], limits: Limits | None = None) -> dict[str, np.ndarray]:
    wire = HttpInfer("m", "", json.dumps(request).encode(), None)
    return dict(wire.decode(limits or Limits()).inputs)


def tensor(datatype: str, shape: list[int], data: Any) -> dict[str, Any]:
    return {"inputs": [{"name": "x", "datatype": datatype, "shape": shape, "data": data}]}


def encode(outputs: dict[str, np.ndarray], binary: bool = False) -> tuple[dict[str, Any], bytes]:
    wire = HttpInfer("m", "", b'{"inputs": []}', None)
    wire.decode(Limits())
    wire.binary_all = binary
    body, length = wire.encode(InferenceResult("m", 1, "id", outputs))
    if length is None:
        return json.loads(body), b""
    return json.loads(body[:length]), body[length:]


def test_every_kind_has_an_http_status() -> None:
    assert set(HTTP_STATUS) == set(ErrorKind)
    assert error_of(FerryError("x", kind=ErrorKind.QUEUE_FULL))[0] == 503  # as Triton
    assert error_of(RuntimeError("boom"))[:3] == (
        500,
        "internal error (RuntimeError); the server log has the traceback",
        ErrorKind.INTERNAL,
    )


def test_json_forms_of_data() -> None:
    assert decode(tensor("FP32", [], 2.5))["x"].shape == ()  # a scalar for a 0-d tensor
    empty = decode(tensor("INT64", [0, 3], []))["x"]
    assert (empty.shape, empty.dtype) == ((0, 3), np.dtype(np.int64))
    nested = decode(tensor("INT16", [2, 2], [[1, 2], [3, 4]]))["x"]
    np.testing.assert_array_equal(nested, np.array([[1, 2], [3, 4]], np.int16))
    big = decode(tensor("UINT64", [3], [0, 2**64 - 1, 2**40]))["x"]
    assert big.dtype == np.uint64 and int(big[1]) == 2**64 - 1  # no float rounding
    assert decode(tensor("FP16", [2], [0.5, 1]))["x"].dtype == np.float16


@pytest.mark.parametrize(
    ("datatype", "data", "words"),
    [
        ("INT64", [-1, 2**64 - 1], "must hold integers"),  # no 64-bit type holds both
        ("UINT64", [2**64, 1], "integers beyond 64 bits"),
        ("INT64", [10**400, 10**401], "must hold integers"),  # past a float too
        ("FP32", [True, False], "must hold numbers"),
        ("FP32", [None, 1.0], "must hold numbers"),
        ("BYTES", ["\ud800", "a"], "not valid UTF-8"),
        # numpy read these as [5, 1] and [0.5, 0.0]: served, with values nobody sent
        ("INT64", [5, True], "got true or false among them"),
        ("FP32", [0.5, False], "got true or false among them"),
        ("UINT8", [[2, True]], "got true or false among them"),
        ("UINT64", [2**64 - 1, True], "got true or false among them"),
    ],
)
def test_json_values_that_do_not_fit(datatype: str, data: list[Any], words: str) -> None:
    with pytest.raises(InvalidArgument, match=words):
        decode(tensor(datatype, [2], data))


@pytest.mark.parametrize("number", [b"1e400", b"-1e400", b"1.5e309"])
def test_a_number_too_large_for_any_float_is_not_infinity(number: bytes) -> None:
    """orjson refuses these literals; the standard library, which reads the NaN and Infinity that
    orjson does not, read them as infinities, so they were served as such."""
    body = b'{"inputs": [{"name": "x", "datatype": "FP64", "shape": [2], "data": [0, %s]}]}'
    wire = HttpInfer("m", "", body % number, None)
    with pytest.raises(InvalidArgument, match="too large for any float"):
        wire.decode(Limits())
    infinity = HttpInfer("m", "", body % b"-Infinity", None)  # what a client means by it
    assert np.isneginf(dict(infinity.decode(Limits()).inputs)["x"][1])


@pytest.mark.parametrize(
    "where",
    [
        b'"id": "a\\ud800"',  # echoed in the answer: the model ran, then the answer was a 500
        b'"id": "\\udc00x"',
        b'"parameters": {"k\\ud83d": 1}',
    ],
)
def test_a_lone_surrogate_escape_is_refused_before_the_model_runs(where: bytes) -> None:
    """orjson refuses "\\ud800" and the standard library (its fallback) read it into a str no
    UTF-8 writer takes; a request id holding one ran the model and then failed to be written,
    500 INTERNAL. A surrogate pair (one character outside the BMP) is text and passes."""
    body = b'{%s, "inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}]}'
    with pytest.raises(InvalidArgument, match="lone UTF-16 surrogate"):
        HttpInfer("m", "", body % where, None).decode(Limits())
    pair = HttpInfer("m", "", body % b'"id": "\\ud83d\\ude00 NaN", "x": NaN', None)
    assert pair.decode(Limits()).id == "\U0001f600 NaN"


def test_request_parameters_reach_the_core() -> None:
    """timeout (microseconds) and priority are what the batcher honours; a compat test that
    sends them only sees an answer, so their translation is checked here."""
    request = tensor("FP32", [1], [1.0])
    request["parameters"] = {"timeout": 30_000_000, "priority": 2, "sequence_id": 0}
    wire = HttpInfer("m", "3", json.dumps(request).encode(), None)
    decoded = wire.decode(Limits())
    assert (decoded.timeout, decoded.priority, decoded.version) == (30.0, 2, 3)
    request["parameters"] = {"timeout": 0}  # 0 keeps the model's default
    decoded = HttpInfer("m", "", json.dumps(request).encode(), None).decode(Limits())
    assert (decoded.timeout, decoded.priority) == (None, 0)
    request["parameters"] = {"sequence_id": 7}
    with pytest.raises(Unimplemented, match="sequence batching is not supported"):
        decode(request)
    request["parameters"] = {"priority": -1}
    with pytest.raises(InvalidArgument, match="'priority' must be a non-negative integer"):
        decode(request)
    request["parameters"] = {"timeout": 10**400}  # past a float: refused, not a crash
    with pytest.raises(InvalidArgument, match="'timeout' must be below 2\\*\\*64"):
        decode(request)


def test_an_empty_shared_memory_region_on_an_output_asks_for_nothing_as_on_grpc() -> None:
    """gRPC took shared_memory_region "" (its string kind's empty value) as not asked; HTTP
    answered 501 for the same request. A named region is still refused on both."""
    from ferry.proto.kserve.v2 import grpc_service_pb2 as kpb
    from ferry.server.grpc.kserve_tensors import decode_request

    request = tensor("FP32", [1], [1.0])
    for value in ("", 0, None, False):
        request["outputs"] = [{"name": "y", "parameters": {"shared_memory_region": value}}]
        assert HttpInfer("m", "", json.dumps(request).encode(), None).decode(Limits()).outputs == [
            "y"
        ]
    request["outputs"][0]["parameters"]["shared_memory_region"] = "r"
    with pytest.raises(Unimplemented, match="shared memory"):
        decode(request)
    grpc_request = kpb.ModelInferRequest(model_name="m")
    grpc_request.inputs.add(name="x", datatype="FP32", shape=[1]).contents.fp32_contents.append(1)
    grpc_request.outputs.add(name="y").parameters["shared_memory_region"].string_param = ""
    assert decode_request(grpc_request).outputs == ["y"]


def test_declared_elements_are_limited_before_decoding() -> None:
    with pytest.raises(LimitExceeded, match="max_request_elements"):
        decode(tensor("FP32", [1000, 1000], []), Limits(max_elements=1000))


def test_outputs_in_json_and_binary() -> None:
    logits = np.arange(6, dtype=np.float32).reshape(2, 3)
    head, tail = encode({"logits": logits})
    assert head["id"] == "id" and head["model_version"] == "1"
    assert head["outputs"] == [
        {"name": "logits", "datatype": "FP32", "shape": [2, 3], "data": [0, 1, 2, 3, 4, 5]}
    ]
    assert tail == b""
    head, tail = encode({"logits": logits}, binary=True)
    assert head["outputs"][0]["parameters"] == {"binary_data_size": 24}
    np.testing.assert_array_equal(np.frombuffer(tail, np.float32).reshape(2, 3), logits)


def test_non_finite_floats_are_written_as_json_can_read_them() -> None:
    """orjson writes NaN as null; such outputs go through the standard library instead, next to
    outputs that are still numpy arrays."""
    weird = np.array([np.nan, np.inf, -np.inf], np.float32)
    head, _ = encode({"weird": weird, "plain": np.array([1, 2], np.int8)})
    data = {o["name"]: o["data"] for o in head["outputs"]}
    assert np.isnan(data["weird"][0]) and data["weird"][1:] == [np.inf, -np.inf]
    assert data["plain"] == [1, 2]


def test_bytes_outputs_that_are_not_utf8_come_back_binary() -> None:
    strings = np.array([b"ok", b"\xff\xfe"], dtype=object)
    head, tail = encode({"s": strings, "t": np.array(["fine"], dtype=object)})
    first, second = head["outputs"]
    assert first["parameters"]["binary_data_size"] == len(tail) == 4 + 2 + 4 + 2
    assert second["data"] == ["fine"]
