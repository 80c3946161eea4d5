"""Open Inference Protocol request decoding and response encoding, without sockets."""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np
import pytest

from ferry.proto.kserve.v2 import grpc_service_pb2 as pb
from ferry.server.core.types import InferenceResult, parse_version
from ferry.server.errors import InvalidArgument, Unimplemented
from ferry.server.grpc.kserve_tensors import decode_request, serialize_response

RAW_SAMPLES: dict[str, np.ndarray] = {
    "BOOL": np.array([[True, False, True]]),
    "UINT8": np.array([[0, 7, 255]], np.uint8),
    "UINT16": np.array([[0, 7, 65535]], np.uint16),
    "UINT32": np.array([[0, 7, 2**32 - 1]], np.uint32),
    "UINT64": np.array([[0, 7, 2**64 - 1]], np.uint64),
    "INT8": np.array([[-128, 0, 127]], np.int8),
    "INT16": np.array([[-32768, 0, 32767]], np.int16),
    "INT32": np.array([[-(2**31), 0, 2**31 - 1]], np.int32),
    "INT64": np.array([[-(2**63), 0, 2**63 - 1]], np.int64),
    "FP16": np.array([[np.nan, np.inf, -0.5]], np.float16),
    "FP32": np.array([[np.nan, -np.inf, 1e-30]], np.float32),
    "FP64": np.array([[np.nan, np.inf, 1e-300]], np.float64),
    "BF16": np.array([[np.nan, np.inf, 1.5]], ml_dtypes.bfloat16),
}

TYPED: dict[str, tuple[str, list[Any], np.dtype[Any]]] = {
    "BOOL": ("bool_contents", [True, False], np.dtype(np.bool_)),
    "UINT8": ("uint_contents", [0, 255], np.dtype(np.uint8)),
    "UINT16": ("uint_contents", [0, 65535], np.dtype(np.uint16)),
    "UINT32": ("uint_contents", [0, 2**32 - 1], np.dtype(np.uint32)),
    "UINT64": ("uint64_contents", [0, 2**64 - 1], np.dtype(np.uint64)),
    "INT8": ("int_contents", [-128, 127], np.dtype(np.int8)),
    "INT16": ("int_contents", [-32768, 32767], np.dtype(np.int16)),
    "INT32": ("int_contents", [-(2**31), 2**31 - 1], np.dtype(np.int32)),
    "INT64": ("int64_contents", [-(2**63), 2**63 - 1], np.dtype(np.int64)),
    "FP32": ("fp32_contents", [float("nan"), float("inf")], np.dtype(np.float32)),
    "FP64": ("fp64_contents", [float("-inf"), 1e-300], np.dtype(np.float64)),
    "BYTES": ("bytes_contents", [b"", b"\x00abc"], np.dtype(object)),
}


def _request(**fields: Any) -> pb.ModelInferRequest:
    return pb.ModelInferRequest(model_name="m", **fields)


def _raw(datatype: str, array: np.ndarray, data: bytes | None = None) -> pb.ModelInferRequest:
    request = _request()
    request.inputs.add(name="x", datatype=datatype, shape=list(array.shape))
    request.raw_input_contents.append(array.tobytes() if data is None else data)
    return request


def _typed(datatype: str, field: str, values: list[Any], shape: list[int]) -> pb.ModelInferRequest:
    request = _request()
    tensor = request.inputs.add(name="x", datatype=datatype, shape=shape)
    getattr(tensor.contents, field).extend(values)
    return request


def _invalid(request: pb.ModelInferRequest, match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        decode_request(request)


@pytest.mark.parametrize("datatype", list(RAW_SAMPLES))
def test_raw_decodes_zero_copy_for_every_fixed_size_datatype(datatype: str) -> None:
    sample = RAW_SAMPLES[datatype]
    decoded = decode_request(_raw(datatype, sample)).inputs["x"]
    assert decoded.dtype == sample.dtype
    assert decoded.tobytes() == sample.tobytes()  # bit-exact: NaN payloads and -0.0 included
    assert not decoded.flags.writeable  # a view on the received bytes, not a copy


def test_raw_bytes_elements_are_length_prefixed() -> None:
    data = b"".join(len(e).to_bytes(4, "little") + e for e in (b"ab", b"", b"\xff"))
    decoded = decode_request(_raw("BYTES", np.empty((1, 3)), data)).inputs["x"]
    assert decoded.dtype == object
    assert decoded.tolist() == [[b"ab", b"", b"\xff"]]


@pytest.mark.parametrize("datatype", list(TYPED))
def test_typed_contents_decode_to_the_declared_datatype(datatype: str) -> None:
    field, values, dtype = TYPED[datatype]
    decoded = decode_request(_typed(datatype, field, values, [1, 2])).inputs["x"]
    assert decoded.dtype == dtype
    assert decoded.shape == (1, 2)
    np.testing.assert_array_equal(decoded.reshape(-1), np.array(values, dtype=dtype))


@pytest.mark.parametrize("datatype", ["FP16", "BF16"])
def test_typed_half_precision_is_raw_only(datatype: str) -> None:
    _invalid(_typed(datatype, "fp32_contents", [1.0], [1]), f"{datatype} .*raw only")


def test_typed_data_in_the_wrong_field_names_the_right_one() -> None:
    _invalid(
        _typed("FP32", "int_contents", [1, 2], [2]),
        "'x' is FP32, whose data goes in contents.fp32_contents; got int_contents",
    )


def test_typed_count_must_match_the_shape() -> None:
    _invalid(
        _typed("INT64", "int64_contents", [1, 2, 3], [2, 2]),
        r"shape \[2, 2\] holds 4 elements, got 3 in contents.int64_contents",
    )
    _invalid(_typed("INT64", "int64_contents", [], [2]), "'x' has no data")


def test_zero_element_tensors_need_no_data() -> None:
    assert decode_request(_typed("FP32", "fp32_contents", [], [0, 3])).inputs["x"].shape == (0, 3)


@pytest.mark.parametrize(
    ("datatype", "value"), [("INT8", 128), ("INT16", -32769), ("UINT8", 256), ("UINT16", 70000)]
)
def test_narrow_typed_integers_are_range_checked(datatype: str, value: int) -> None:
    field = "int_contents" if datatype.startswith("INT") else "uint_contents"
    _invalid(_typed(datatype, field, [0, value], [2]), f"{datatype} values must lie in")


def test_raw_byte_length_must_match_the_shape() -> None:
    _invalid(_raw("FP32", np.zeros((2, 2), np.float32), bytes(12)), "needs 16 bytes, got 12")


def test_raw_entries_must_match_the_inputs() -> None:
    request = _raw("FP32", np.zeros(2, np.float32))
    request.inputs.add(name="y", datatype="FP32", shape=[2])
    _invalid(request, "2 inputs but 1 raw_input_contents")


def test_raw_and_typed_must_not_mix() -> None:
    request = _raw("FP32", np.zeros(1, np.float32))
    request.inputs[0].contents.fp32_contents.append(1.0)
    _invalid(request, "'x' has typed contents .* use one or the other")
    # One input raw, the other typed: named as a mix, not as a miscount of raw entries.
    request = _raw("FP32", np.zeros(1, np.float32))
    request.inputs.add(name="y", datatype="FP32", shape=[1]).contents.fp32_contents.append(1.0)
    _invalid(request, "'y' has typed contents .* use one or the other")


def test_negative_dims_unknown_datatypes_and_duplicate_inputs_are_invalid() -> None:
    _invalid(_typed("FP32", "fp32_contents", [], [-1]), "negative dimension")
    request = _raw("FP32", np.zeros(1, np.float32))
    request.inputs[0].shape[:] = [-1]
    _invalid(request, "negative dimension")
    _invalid(_typed("FLOAT", "fp32_contents", [1.0], [1]), "unknown data type name 'FLOAT'")
    request = _typed("FP32", "fp32_contents", [1.0], [1])
    request.inputs.add().CopyFrom(request.inputs[0])
    _invalid(request, "'x' appears twice")


def test_timeout_priority_version_and_outputs() -> None:
    request = _typed("FP32", "fp32_contents", [1.0], [1])
    request.id = "abc"
    request.model_version = "3"
    request.parameters["timeout"].int64_param = 250_000
    request.parameters["priority"].uint64_param = 2
    request.outputs.add(name="b")
    request.outputs.add(name="a")
    decoded = decode_request(request)
    assert (decoded.model, decoded.version, decoded.id) == ("m", 3, "abc")
    assert decoded.timeout == pytest.approx(0.25)
    assert decoded.priority == 2
    assert decoded.outputs == ["b", "a"]
    defaults = decode_request(_typed("FP32", "fp32_contents", [1.0], [1]))
    assert (defaults.version, defaults.timeout, defaults.priority, defaults.outputs) == (
        None,
        None,
        0,
        None,
    )


@pytest.mark.parametrize(
    ("key", "kind", "value", "match"),
    [
        ("timeout", "int64_param", -1, "'timeout' must be >= 0"),
        ("timeout", "string_param", "1s", "'timeout' must be an int64_param or uint64_param"),
        ("priority", "bool_param", True, "'priority' must be an int64_param"),
    ],
)
def test_bad_parameters_are_invalid(key: str, kind: str, value: Any, match: str) -> None:
    request = _typed("FP32", "fp32_contents", [1.0], [1])
    setattr(request.parameters[key], kind, value)
    _invalid(request, match)


@pytest.mark.parametrize(
    ("kind", "value"),
    [("int64_param", 5), ("uint64_param", 5), ("string_param", "s1"), ("bool_param", True),
     ("double_param", 2.0)],
)  # fmt: skip
def test_a_sequence_id_of_any_kind_is_unimplemented(kind: str, value: Any) -> None:
    """A uint64 sequence_id was answered statelessly, as if no sequence had been asked for."""
    request = _typed("FP32", "fp32_contents", [1.0], [1])
    setattr(request.parameters["sequence_id"], kind, value)
    with pytest.raises(Unimplemented, match="sequence"):
        decode_request(request)


@pytest.mark.parametrize(("kind", "value"), [("int64_param", 0), ("string_param", "")])
def test_a_sequence_id_of_zero_means_none(kind: str, value: Any) -> None:
    request = _typed("FP32", "fp32_contents", [1.0], [1])
    setattr(request.parameters["sequence_id"], kind, value)
    assert decode_request(request).inputs["x"].tolist() == [1.0]


def test_unhonourable_features_are_unimplemented() -> None:
    sequence = _typed("FP32", "fp32_contents", [1.0], [1])
    sequence.parameters["sequence_id"].int64_param = 5
    with pytest.raises(Unimplemented, match="sequence"):
        decode_request(sequence)
    classification = _typed("FP32", "fp32_contents", [1.0], [1])
    classification.outputs.add(name="y").parameters["classification"].int64_param = 3
    with pytest.raises(Unimplemented, match="classification"):
        decode_request(classification)
    shared = _raw("FP32", np.zeros(1, np.float32))
    shared.inputs[0].parameters["shared_memory_region"].string_param = "r"
    with pytest.raises(Unimplemented, match="shared memory"):
        decode_request(shared)


def test_class_count_zero_is_no_classification_as_on_http() -> None:
    """Triton's class_count 0 means "no classification"; HTTP's JSON took it so, gRPC answered
    UNIMPLEMENTED for it. A non-zero count is still refused."""
    request = _typed("FP32", "fp32_contents", [1.0], [1])
    request.outputs.add(name="y").parameters["classification"].int64_param = 0
    assert decode_request(request).outputs == ["y"]
    request.outputs[0].parameters["classification"].int64_param = 1
    with pytest.raises(Unimplemented, match="classification"):
        decode_request(request)


def test_duplicate_requested_outputs_are_invalid() -> None:
    request = _typed("FP32", "fp32_contents", [1.0], [1])
    request.outputs.add(name="y")
    request.outputs.add(name="y")
    _invalid(request, "'y' is requested twice")


def test_versions() -> None:
    assert parse_version("") is None
    assert parse_version("0") is None
    assert parse_version("12") == 12
    # str.isdigit() accepts "²" and other scripts' digits, which int() refuses; a huge number
    # must not cost a bignum parse: every one is the client's INVALID_ARGUMENT.
    for bad in ("-1", "v1", "1.0", "²", "\u0661", "9" * 5000, " 1", "1 ", str(2**53 + 1)):
        with pytest.raises(InvalidArgument, match="positive integer in ASCII digits"):
            parse_version(bad)


def test_the_response_is_raw_in_output_order() -> None:
    outputs = {
        "s": np.array([["a", "é"]], dtype=object),
        "f": np.arange(6, dtype=np.float32).reshape(2, 3)[:, ::2],  # not contiguous
        "b": np.array([True, False]),
    }
    data = serialize_response(InferenceResult("m", 4, "id-1", outputs))
    response = pb.ModelInferResponse.FromString(data)
    assert (response.model_name, response.model_version, response.id) == ("m", "4", "id-1")
    assert [(t.name, t.datatype, list(t.shape)) for t in response.outputs] == [
        ("s", "BYTES", [1, 2]),
        ("f", "FP32", [2, 2]),
        ("b", "BOOL", [2]),
    ]
    s, f, b = response.raw_output_contents
    assert s == b"\x01\x00\x00\x00a\x02\x00\x00\x00\xc3\xa9"
    assert f == np.array([[0, 2], [3, 5]], np.float32).tobytes()
    assert b == b"\x01\x00"
    assert not response.outputs[0].HasField("contents")
