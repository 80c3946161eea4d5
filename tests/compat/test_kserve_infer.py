"""ModelInfer and ModelStreamInfer through tritonclient and Triton's generated stub."""

from __future__ import annotations

import queue
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tg
from kserve_common import DATATYPES, identity_name
from serverutil import ServerThread
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from ferry.client import InferenceClient

WAIT = 30.0  # upper bound on waiting for a stream response; only reached when broken

# Datatype -> a [2, 3] test array (as tritonclient takes it) covering each type's edges.
SAMPLES: dict[str, np.ndarray] = {
    "BOOL": np.array([[True, False, True], [False, False, True]]),
    "UINT8": np.array([[0, 1, 255], [7, 128, 254]], np.uint8),
    "UINT16": np.array([[0, 1, 65535], [7, 300, 2]], np.uint16),
    "UINT32": np.array([[0, 1, 2**32 - 1], [7, 70000, 2]], np.uint32),
    "UINT64": np.array([[0, 1, 2**64 - 1], [7, 2**40, 2]], np.uint64),
    "INT8": np.array([[-128, 0, 127], [-1, 5, 9]], np.int8),
    "INT16": np.array([[-32768, 0, 32767], [-1, 5, 9]], np.int16),
    "INT32": np.array([[-(2**31), 0, 2**31 - 1], [-1, 5, 9]], np.int32),
    "INT64": np.array([[-(2**63), 0, 2**63 - 1], [-1, 5, 9]], np.int64),
    "FP16": np.array([[0.5, -2.0, 65504.0], [np.inf, -0.0, 1e-3]], np.float16),
    "FP32": np.array([[0.5, -2.0, 3.4e38], [np.inf, -0.0, 1e-30]], np.float32),
    "FP64": np.array([[0.5, -2.0, 1e300], [np.inf, -0.0, 1e-300]], np.float64),
    # tritonclient takes BF16 as float32 and truncates; these values are exact in bfloat16.
    "BF16": np.array([[0.5, -2.0, 256.0], [np.inf, -0.0, 1.5]], np.float32),
    "BYTES": np.array([[b"", b"a", b"\x00\x01"], ["é".encode(), b"x" * 300, b"z"]], object),
}

# Datatype -> the typed contents field Triton defines for it (FP16/BF16 have none).
TYPED_FIELDS = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def _input(name: str, array: np.ndarray, datatype: str) -> tg.InferInput:
    tensor = tg.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def _code(exc: pytest.ExceptionInfo[InferenceServerException]) -> str:
    return str(exc.value.status())


@pytest.mark.parametrize("datatype", DATATYPES)
def test_raw_inputs_round_trip_every_datatype(
    triton: tg.InferenceServerClient, datatype: str
) -> None:
    sample = SAMPLES[datatype]
    result = triton.infer(
        identity_name(datatype), [_input("input", sample, datatype)], request_id="r-1"
    )
    response = result.get_response()
    assert response.id == "r-1"
    assert response.model_name == identity_name(datatype)
    assert response.model_version == "1"
    assert response.outputs[0].datatype == datatype
    assert list(response.outputs[0].shape) == [2, 3]
    assert len(response.raw_output_contents) == 1
    np.testing.assert_array_equal(result.as_numpy("output"), sample)


@pytest.mark.parametrize("datatype", list(TYPED_FIELDS))
def test_typed_inputs_every_datatype(stub: Any, datatype: str) -> None:
    sample = SAMPLES[datatype]
    request = service_pb2.ModelInferRequest(model_name=identity_name(datatype), id="typed")
    tensor = request.inputs.add(name="input", datatype=datatype, shape=list(sample.shape))
    getattr(tensor.contents, TYPED_FIELDS[datatype]).extend(sample.reshape(-1).tolist())
    response = stub.ModelInfer(request)
    assert response.id == "typed"
    assert len(response.raw_output_contents) == 1  # answered raw, whatever the request used
    np.testing.assert_array_equal(tg.InferResult(response).as_numpy("output"), sample)


@pytest.mark.parametrize("datatype", ["FP16", "BF16"])
def test_typed_half_precision_is_raw_only(stub: Any, datatype: str) -> None:
    request = service_pb2.ModelInferRequest(model_name=identity_name(datatype))
    tensor = request.inputs.add(name="input", datatype=datatype, shape=[1, 1])
    tensor.contents.fp32_contents.append(1.0)
    with pytest.raises(grpc.RpcError) as exc:
        stub.ModelInfer(request)
    assert exc.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "raw only" in exc.value.details()


def test_nan_and_inf_pass_through(triton: tg.InferenceServerClient) -> None:
    data = np.array([[np.nan, np.inf, -np.inf, 1.0]], np.float32)
    result = triton.infer(identity_name("FP32"), [_input("input", data, "FP32")])
    np.testing.assert_array_equal(result.as_numpy("output"), data)  # NaN == NaN here
    # perf_analyzer's default data: random bytes, so NaN, Inf and denormals, into a real model.
    noise = np.frombuffer(np.random.default_rng(0).bytes(4 * 64 * 4), np.float32).reshape(4, 64)
    result = triton.infer("mlp", [_input("input", noise, "FP32")])
    assert result.as_numpy("logits").shape == (4, 10)


def test_requested_outputs_are_honoured_in_order(triton: tg.InferenceServerClient) -> None:
    a = np.arange(8, dtype=np.float32).reshape(2, 4)
    b = np.arange(8, dtype=np.int64).reshape(2, 4)
    inputs = [_input("a", a, "FP32"), _input("b", b, "INT64")]
    only = triton.infer("two_io", inputs, outputs=[tg.InferRequestedOutput("scaled")])
    assert [o.name for o in only.get_response().outputs] == ["scaled"]
    np.testing.assert_array_equal(only.as_numpy("scaled"), b * 3)
    both = triton.infer(
        "two_io",
        inputs,
        outputs=[tg.InferRequestedOutput("scaled"), tg.InferRequestedOutput("sum")],
    )
    assert [o.name for o in both.get_response().outputs] == ["scaled", "sum"]
    np.testing.assert_array_equal(both.as_numpy("sum"), a + b)
    everything = triton.infer("two_io", inputs)
    assert [o.name for o in everything.get_response().outputs] == ["sum", "scaled"]


def test_timeout_and_priority_parameters_are_accepted(triton: tg.InferenceServerClient) -> None:
    data = np.ones((1, 4), np.float32)
    result = triton.infer(
        identity_name("FP32"), [_input("input", data, "FP32")], priority=1, timeout=30_000_000
    )
    np.testing.assert_array_equal(result.as_numpy("output"), data)


def test_results_equal_the_ferry_v1_path(
    triton: tg.InferenceServerClient, kserve_server: ServerThread
) -> None:
    x = np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)
    via_kserve = triton.infer("mlp", [_input("input", x, "FP32")]).as_numpy("logits")
    with InferenceClient(kserve_server.target, timeout=30) as client:
        via_v1 = client.infer("mlp", {"input": x})["logits"]
    assert via_kserve.dtype == via_v1.dtype
    np.testing.assert_array_equal(via_kserve, via_v1)


def test_mixed_raw_and_typed_is_invalid(stub: Any) -> None:
    request = service_pb2.ModelInferRequest(model_name="two_io")
    a = request.inputs.add(name="a", datatype="FP32", shape=[1, 4])
    a.contents.fp32_contents.extend([1.0, 2.0, 3.0, 4.0])
    request.inputs.add(name="b", datatype="INT64", shape=[1, 4])
    request.raw_input_contents.extend([np.zeros(4, np.float32).tobytes(), bytes(32)])
    with pytest.raises(grpc.RpcError) as exc:
        stub.ModelInfer(request)
    assert exc.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "raw_input_contents" in exc.value.details()


def test_counts_that_disagree_with_the_shape_are_invalid(stub: Any) -> None:
    typed = service_pb2.ModelInferRequest(model_name=identity_name("INT32"))
    t = typed.inputs.add(name="input", datatype="INT32", shape=[2, 2])
    t.contents.int_contents.extend([1, 2, 3])
    with pytest.raises(grpc.RpcError) as exc:
        stub.ModelInfer(typed)
    assert exc.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "holds 4 elements, got 3 in contents.int_contents" in exc.value.details()

    raw = service_pb2.ModelInferRequest(model_name=identity_name("FP32"))
    raw.inputs.add(name="input", datatype="FP32", shape=[2, 2])
    raw.raw_input_contents.append(bytes(12))
    with pytest.raises(grpc.RpcError) as exc:
        stub.ModelInfer(raw)
    assert exc.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "needs 16 bytes, got 12" in exc.value.details()


def test_typed_contents_of_an_absurd_empty_shape_say_it_has_too_many_elements(stub: Any) -> None:
    """A zero among dims no array can have holds no element, so no count disagrees; the answer
    is the raw path's, not numpy's 'cannot reshape array of size 0'."""
    request = service_pb2.ModelInferRequest(model_name=identity_name("FP32"))
    request.inputs.add(
        name="input", datatype="FP32", shape=[2**62, 2**62, 0]
    ).contents.SetInParent()
    with pytest.raises(grpc.RpcError) as exc:
        stub.ModelInfer(request)
    assert exc.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "input 'input': shape [4611686018427387904, 4611686018427387904, 0] has too many " in (
        exc.value.details()
    )


def test_a_long_name_leaves_the_message_saying_what_is_wrong(stub: Any) -> None:
    """Messages quote the client's names first and say what to fix last; cut at their end to
    2,000 characters, a 5,000-character name left only the name."""
    name = "n" * 5000
    twice = service_pb2.ModelInferRequest(model_name=identity_name("FP32"))
    for _ in range(2):
        twice.inputs.add(name=name, datatype="FP32", shape=[1, 1])
        twice.raw_input_contents.append(bytes(4))
    short_data = service_pb2.ModelInferRequest(model_name=identity_name("FP32"))
    short_data.inputs.add(name=name, datatype="FP32", shape=[1, 2])
    short_data.raw_input_contents.append(bytes(4))
    for request, ending in [
        (twice, "appears twice in the request"),
        (short_data, "needs 8 bytes, got 4"),
    ]:
        with pytest.raises(grpc.RpcError) as exc:
            stub.ModelInfer(request)
        assert exc.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        details = exc.value.details()
        assert details.endswith(ending), details[-200:]
        assert details.startswith("input 'nnn") and len(details) <= 2000


@pytest.mark.parametrize("octets", [bytes([2, 0, 1]), bytes([1, 255, 0])])
def test_raw_bool_bytes_other_than_0_and_1_are_invalid(stub: Any, octets: bytes) -> None:
    """onnxruntime reads a BOOL byte of 2 or 255 as neither true nor false (a Where fed one
    answered neither branch): such a tensor is refused, naming the element."""
    request = service_pb2.ModelInferRequest(model_name=identity_name("BOOL"))
    request.inputs.add(name="input", datatype="BOOL", shape=[1, 3])
    request.raw_input_contents.append(octets)
    with pytest.raises(grpc.RpcError) as exc:
        stub.ModelInfer(request)
    assert exc.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    bad = next(i for i, b in enumerate(octets) if b > 1)
    assert f"element {bad} is the byte {octets[bad]}" in exc.value.details()


def test_model_mismatch_is_invalid_argument(triton: tg.InferenceServerClient) -> None:
    """Validation against the model is DataPlane's: the same words as the ferry.v1 path."""
    wrong = np.ones((1, 5), np.float32)
    with pytest.raises(InferenceServerException) as exc:
        triton.infer("mlp", [_input("input", wrong, "FP32")])
    assert _code(exc) == "StatusCode.INVALID_ARGUMENT"
    assert "must have shape [?, 64], got [1, 5]" in exc.value.message()
    with pytest.raises(InferenceServerException) as exc:
        triton.infer("mlp", [_input("input", np.ones((1, 64), np.float64), "FP64")])
    assert _code(exc) == "StatusCode.INVALID_ARGUMENT"
    assert "must be FP32, got FP64" in exc.value.message()


def test_unknown_model_is_not_found(triton: tg.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as exc:
        triton.infer("no_such_model", [_input("input", np.ones((1, 1), np.float32), "FP32")])
    assert _code(exc) == "StatusCode.NOT_FOUND"
    with pytest.raises(InferenceServerException) as exc:
        triton.infer("mlp", [_input("input", np.ones((1, 64), np.float32), "FP32")], "9")
    assert _code(exc) == "StatusCode.NOT_FOUND"


def test_unsupported_request_features_are_refused(triton: tg.InferenceServerClient) -> None:
    inputs = [_input("input", np.ones((1, 64), np.float32), "FP32")]
    with pytest.raises(InferenceServerException) as exc:
        triton.infer("mlp", inputs, sequence_id=7, sequence_start=True)
    assert _code(exc) == "StatusCode.UNIMPLEMENTED"
    with pytest.raises(InferenceServerException) as exc:
        triton.infer("mlp", inputs, outputs=[tg.InferRequestedOutput("logits", class_count=3)])
    assert _code(exc) == "StatusCode.UNIMPLEMENTED"
    assert "classification" in exc.value.message()


@pytest.mark.parametrize("shm_first", [False, True])
def test_an_input_in_shared_memory_beside_a_raw_one_is_refused_as_shared_memory(
    triton: tg.InferenceServerClient, shm_first: bool
) -> None:
    """tritonclient sends an input in shared memory with no raw_input_contents entry, so the
    entries no longer match the inputs; the refusal names the shared memory, not the count."""
    raw = _input("a", np.ones((1, 4), np.float32), "FP32")
    shm = tg.InferInput("b", [1, 4], "FP32")
    shm.set_shared_memory("region", 16)
    with pytest.raises(InferenceServerException) as exc:
        triton.infer("two_io", [shm, raw] if shm_first else [raw, shm])
    assert _code(exc) == "StatusCode.UNIMPLEMENTED"
    assert "input 'b': shared memory is not supported" in exc.value.message()


def test_stream_error_in_the_middle_keeps_the_stream_open(
    triton: tg.InferenceServerClient,
) -> None:
    received: queue.Queue[tuple[Any, Any]] = queue.Queue()
    x = np.ones((1, 4), np.float32)
    triton.start_stream(callback=lambda result, error: received.put((result, error)))
    try:
        for request_id in ("1", "2"):
            triton.async_stream_infer(
                identity_name("FP32"),
                [_input("input", x * int(request_id), "FP32")],
                request_id=request_id,
            )
        bad = _input("input", np.ones((1, 4), np.float64), "FP64")
        triton.async_stream_infer(identity_name("FP32"), [bad], request_id="bad")
        triton.async_stream_infer("no_such_model", [bad], request_id="missing")
        answers = [received.get(timeout=WAIT) for _ in range(4)]
        errors = sorted(str(error) for result, error in answers if error is not None)
        assert len(errors) == 2
        assert "[StatusCode.INVALID_ARGUMENT]" in errors[0] and "must be FP32" in errors[0]
        assert "[StatusCode.NOT_FOUND]" in errors[1]
        ok = {r.get_response().id: r.as_numpy("output") for r, e in answers if e is None}
        assert sorted(ok) == ["1", "2"]
        np.testing.assert_array_equal(ok["2"], x * 2)
        # The errors came back on an open stream: later requests still succeed.
        triton.async_stream_infer(
            identity_name("FP32"), [_input("input", x * 3, "FP32")], request_id="3"
        )
        result, error = received.get(timeout=WAIT)
        assert error is None
        assert result.get_response().id == "3"
        np.testing.assert_array_equal(result.as_numpy("output"), x * 3)
    finally:
        triton.stop_stream()


def test_every_stream_response_says_it_is_final(
    triton: tg.InferenceServerClient, kserve_server: ServerThread
) -> None:
    """Triton marks each stream response that completes its request with the parameter
    triton_final_response; clients (enable_empty_final_response callers, Triton-based services)
    wait for it, and waited forever on Ferry, which sent none."""
    received: queue.Queue[tuple[Any, Any]] = queue.Queue()
    x = np.ones((1, 4), np.float32)
    triton.start_stream(callback=lambda result, error: received.put((result, error)))
    try:
        triton.async_stream_infer(
            identity_name("FP32"),
            [_input("input", x, "FP32")],
            request_id="ok",
            enable_empty_final_response=True,
        )
        result, error = received.get(timeout=WAIT)
        assert error is None
        response = result.get_response()
        assert response.id == "ok"
        assert response.parameters["triton_final_response"].bool_param is True
        np.testing.assert_array_equal(result.as_numpy("output"), x)
    finally:
        triton.stop_stream()
    with grpc.insecure_channel(kserve_server.target) as channel:
        bad = service_pb2.ModelInferRequest(model_name="no_such_model", id="missing")
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        (answer,) = stub.ModelStreamInfer(iter([bad]), timeout=30)
    assert answer.error_message.startswith("[StatusCode.NOT_FOUND]")
    assert answer.infer_response.id == "missing"
    assert answer.infer_response.parameters["triton_final_response"].bool_param is True
