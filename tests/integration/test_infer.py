"""Served outputs equal a direct onnxruntime run of the same model file.

The oracle is an ``onnxruntime.InferenceSession`` created in the test on the very file the server
loaded, so any difference is the server's (codec, validation, batching, splitting), not the model's.
"""

from __future__ import annotations

import array
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from helpers import make_repo, reference
from serverutil import ServerThread

from ferry.client import InferenceClient, InferResult, InvalidInputError
from ferry.client._requests import build_infer_request
from ferry.proto.v1 import inference_pb2 as pb
from ferry.proto.v1 import inference_pb2_grpc as pb_grpc
from ferry.proto.v1 import tensor_pb2
from ferry.server.examples import identity_model, mlp_model, seed_model, two_io_model

RNG = np.random.default_rng(1234)
IDENTITY_DTYPES = {
    "BOOL": lambda shape: RNG.integers(0, 2, shape).astype(np.bool_),
    "UINT8": lambda shape: RNG.integers(0, 255, shape, dtype=np.uint8),
    "UINT64": lambda shape: RNG.integers(0, 2**63, shape, dtype=np.uint64),
    "INT8": lambda shape: RNG.integers(-128, 127, shape, dtype=np.int8),
    "INT32": lambda shape: RNG.integers(-(2**31), 2**31 - 1, shape, dtype=np.int32),
    "INT64": lambda shape: RNG.integers(-(2**62), 2**62, shape, dtype=np.int64),
    "FP16": lambda shape: RNG.standard_normal(shape).astype(np.float16),
    "FP64": RNG.standard_normal,
    "BYTES": lambda shape: np.array(
        [f"elem-{i}".encode() * (i % 3) for i in range(int(np.prod(shape)))], dtype=object
    ).reshape(shape),
}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerThread, Path]]:
    """One server over many models, shared by this module: loading is the slow part, and every
    test here only reads."""
    models = {
        "mlp": mlp_model(),
        "seed": seed_model(),
        "two_io": two_io_model(),
        "fixed": identity_model("FP32", dims=(3,)),
        "matrix": identity_model("FP32", dims=(2, 3)),
        "fixed_int8": identity_model("INT8", dims=(2,)),
        "fixed_uint8": identity_model("UINT8", dims=(2,)),
        **{f"id_{dt.lower()}": identity_model(dt) for dt in IDENTITY_DTYPES},
    }
    root = make_repo(tmp_path_factory.mktemp("zoo") / "repo", models)
    with ServerThread(root) as srv:
        yield srv, root


@pytest.fixture(scope="module")
def zoo_client(zoo: tuple[ServerThread, Path]) -> Iterator[InferenceClient]:
    with InferenceClient(zoo[0].target, timeout=30) as c:
        yield c


def _check(client: InferenceClient, root: Path, model: str, feeds: dict[str, np.ndarray]) -> None:
    result = client.infer(model, feeds)
    expected = reference(root / model / "1" / "model.onnx", feeds)
    assert set(result) == set(expected)
    assert result.model == model
    assert result.version == 1
    for name, want in expected.items():
        got = result[name]
        assert got.dtype == want.dtype, name
        assert got.shape == want.shape, name
        if want.dtype.kind == "f":
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
        else:
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("batch", [1, 5, 32])
def test_mlp_matches_onnxruntime(
    zoo: tuple[ServerThread, Path], zoo_client: InferenceClient, batch: int
) -> None:
    x = RNG.standard_normal((batch, 64)).astype(np.float32)
    _check(zoo_client, zoo[1], "mlp", {"input": x})


def test_seed_model_matches_onnxruntime(
    zoo: tuple[ServerThread, Path], zoo_client: InferenceClient
) -> None:
    _check(zoo_client, zoo[1], "seed", {"input": RNG.standard_normal((7, 3)).astype(np.float32)})


@pytest.mark.parametrize("batch", [1, 3])
def test_two_inputs_two_outputs_with_int64(
    zoo: tuple[ServerThread, Path], zoo_client: InferenceClient, batch: int
) -> None:
    feeds = {
        "a": RNG.standard_normal((batch, 4)).astype(np.float32),
        "b": RNG.integers(-(2**40), 2**40, (batch, 4), dtype=np.int64),
    }
    _check(zoo_client, zoo[1], "two_io", feeds)


@pytest.mark.parametrize("dtype", sorted(IDENTITY_DTYPES))
@pytest.mark.parametrize("shape", [(1, 1), (4, 7), (2, 0)])
def test_dtypes_and_shapes_round_trip(
    zoo: tuple[ServerThread, Path],
    zoo_client: InferenceClient,
    dtype: str,
    shape: tuple[int, int],
) -> None:
    make: Callable[[tuple[int, int]], np.ndarray] = IDENTITY_DTYPES[dtype]
    _check(zoo_client, zoo[1], f"id_{dtype.lower()}", {"input": make(shape)})


def test_models_without_a_batch_dimension(
    zoo: tuple[ServerThread, Path], zoo_client: InferenceClient
) -> None:
    _check(zoo_client, zoo[1], "fixed", {"input": np.array([1.5, -2.0, 3.25], np.float32)})
    matrix = RNG.standard_normal((2, 3)).astype(np.float32)
    _check(zoo_client, zoo[1], "matrix", {"input": matrix})


def test_non_contiguous_and_big_endian_inputs(
    zoo: tuple[ServerThread, Path], zoo_client: InferenceClient
) -> None:
    base = RNG.standard_normal((64, 8)).astype(np.float32)
    strided = base.T[:4]  # a Fortran-ordered view: the SDK must send row-major bytes
    assert not strided.flags.c_contiguous
    _check(zoo_client, zoo[1], "mlp", {"input": strided})
    big = RNG.standard_normal((2, 64)).astype(">f4")
    result = zoo_client.infer("mlp", {"input": big})
    expected = reference(zoo[1] / "mlp" / "1" / "model.onnx", {"input": big.astype("<f4")})
    np.testing.assert_allclose(result["logits"], expected["logits"], rtol=1e-6)


def test_requested_outputs_only(zoo_client: InferenceClient) -> None:
    feeds = {"a": np.ones((2, 4), np.float32), "b": np.arange(8, dtype=np.int64).reshape(2, 4)}
    result = zoo_client.infer("two_io", feeds, outputs=["scaled"])
    assert list(result) == ["scaled"]
    np.testing.assert_array_equal(result["scaled"], feeds["b"] * 3)
    # The same refusal on every protocol (the Open Inference Protocol's adapters had it).
    with pytest.raises(InvalidInputError, match="output 'scaled' is requested twice"):
        zoo_client.infer("two_io", feeds, outputs=["scaled", "sum", "scaled"])


def test_response_echoes_request_id_and_version(zoo_client: InferenceClient) -> None:
    result = zoo_client.infer(
        "fixed", {"input": np.zeros(3, np.float32)}, request_id="req-42", version=1
    )
    assert (result.id, result.model, result.version) == ("req-42", "fixed", 1)


def test_python_lists_take_the_model_dtype_but_arrays_are_not_cast(
    zoo_client: InferenceClient,
) -> None:
    result = zoo_client.infer("fixed", {"input": [1.0, 2.0, 3.0]})
    assert result["output"].dtype == np.float32
    assert result["output"].tolist() == [1.0, 2.0, 3.0]
    with pytest.raises(InvalidInputError, match="must be FP32, got FP64"):
        zoo_client.infer("fixed", {"input": np.array([1.0, 2.0, 3.0])})


@pytest.mark.parametrize(
    ("model", "values", "refusal"),
    [
        ("id_int8", [[300, 1]], "300 is out of the model's int8 range -128..127"),
        ("id_uint8", [[-1, 1]], "-1 is out of the model's uint8 range 0..255"),
        ("id_int64", [[2**63 - 1, 0]], None),
        ("id_fp16", [[1e6, 1.0]], r"1000000.0 is out of the model's float16 range"),
        ("id_fp16", [[float("inf"), 1.0]], None),  # inf is a value a float can be sent
        # numpy reads a mix of ints past int64 and small ones as float64: the ints decide
        ("id_uint64", [[2**64 - 1, 0]], None),
        ("id_uint64", [[2**64, 0]], "18446744073709551616 is out of the model's uint64 range"),
    ],
)
def test_python_numbers_that_do_not_fit_the_model_dtype_are_refused_not_wrapped(
    zoo_client: InferenceClient, model: str, values: list[list[float]], refusal: str | None
) -> None:
    """A list cast to the model's dtype wrapped (300 as INT8 was 44) or overflowed (1e6 as FP16
    was inf), and the model answered for numbers nobody sent."""
    if refusal is not None:
        with pytest.raises(InvalidInputError, match=refusal):
            zoo_client.infer(model, {"input": values})
        return
    assert zoo_client.infer(model, {"input": values})["output"].tolist() == values


def test_a_bool_among_python_numbers_is_refused(zoo_client: InferenceClient) -> None:
    """numpy read [True, 2.0] as [1.0, 2.0] and the SDK sent it as FP32, while OIP HTTP's
    JSON refuses true/false among numbers: the SDK refuses it too, before anything is sent."""
    for model, values in (("fixed", [True, 2.0, 3.0]), ("id_int8", [[1, False]])):
        with pytest.raises(InvalidInputError, match="a list of numbers holds True or False"):
            zoo_client.infer(model, {"input": values})
    with zoo_client.stream("fixed") as stream, pytest.raises(InvalidInputError, match="False"):
        stream.submit({"input": [2.0, np.True_, 3.0]}, "s")
    # 1 and 0 themselves are numbers, and a list of numbers alone is untouched.
    assert zoo_client.infer("fixed", {"input": [1, 0, 3.0]})["output"].tolist() == [1, 0, 3]


def test_python_strings_keep_their_trailing_nuls(zoo_client: InferenceClient) -> None:
    """numpy makes fixed-width str/bytes arrays of a list of strings, which drop trailing NULs:
    "ab\\x00" went out as b"ab"."""
    values = [["ab\x00", b"c\x00\x00", "\x00", ""]]
    expected = [[b"ab\x00", b"c\x00\x00", b"\x00", b""]]
    assert zoo_client.infer("id_bytes", {"input": values})["output"].tolist() == expected
    with zoo_client.stream("id_bytes") as stream:
        stream.submit({"input": values}, "s")
        ((_rid, result),) = list(stream.results())
    assert isinstance(result, InferResult) and result["output"].tolist() == expected
    with pytest.raises(InvalidInputError, match="element 1 is int"):
        zoo_client.infer("id_bytes", {"input": [["a", 1]]})  # was sent as the string "1"


def test_bytearrays_in_a_list_are_bytes_elements_not_rows_of_numbers(
    zoo_client: InferenceClient,
) -> None:
    """numpy reads a bytearray in a list as uint8 numbers: [bytearray(b"ab")] went out as UINT8
    [[97, 98]] and the server refused the type; with a str beside it, it did not convert."""
    values = [[bytearray(b"ab\x00"), memoryview(b"c"), "d"]]
    assert zoo_client.infer("id_bytes", {"input": values})["output"].tolist() == [
        [b"ab\x00", b"c", b"d"]
    ]
    same = [[bytearray(b"xy"), bytearray(b"zw")]]
    assert zoo_client.infer("id_bytes", {"input": same})["output"].tolist() == [[b"xy", b"zw"]]


def test_a_bytearray_alone_is_one_bytes_element_as_bytes_is(zoo_client: InferenceClient) -> None:
    """``b"ab"`` is one BYTES element (Triton's vocabulary: BYTES holds byte strings), and so is
    a bytearray in a list, but a bytearray (or a memoryview of bytes) alone went out as a UINT8
    vector of its byte values: the same bytes, another type and shape, and a stream's resend
    (which keeps it as ``bytes``) changed it to BYTES. All three are one BYTES element now; a
    UINT8 tensor of a buffer's bytes is ``np.frombuffer(buffer, np.uint8)``."""
    model = "id_bytes"
    for value in (bytearray(b"ab\x00"), memoryview(b"ab\x00")):
        assert zoo_client.infer(model, {"input": [[value]]})["output"].tolist() == [[b"ab\x00"]]
        with pytest.raises(InvalidInputError) as alone:
            zoo_client.infer(model, {"input": value})
        with pytest.raises(InvalidInputError) as as_bytes:
            zoo_client.infer(model, {"input": b"ab\x00"})
        assert str(alone.value) == str(as_bytes.value)  # the same 0-d BYTES tensor
        assert "BYTES" in str(alone.value) or "shape" in str(alone.value)
    buffer = bytearray(b"\x00\xff")
    numbers = zoo_client.infer("id_uint8", {"input": np.frombuffer(buffer, np.uint8)[None]})
    assert numbers["output"].tolist() == [[0, 255]]


def test_a_masked_array_is_refused_not_sent_with_its_masked_values(
    zoo_client: InferenceClient,
) -> None:
    """A numpy masked array went out with the values under its mask (whatever they hold): the
    model answered for numbers the caller had masked out, a wrong answer without a word. It is
    refused, saying how to send it; one with nothing masked is its values."""
    masked = np.ma.masked_array(np.ones(3, np.float32), mask=[False, True, False])
    with pytest.raises(InvalidInputError, match=r"masked array.*filled"):
        zoo_client.infer("fixed", {"input": masked})
    with zoo_client.stream("fixed") as stream, pytest.raises(InvalidInputError, match="masked"):
        stream.submit({"input": masked}, "masked")
    clear = np.ma.masked_array(np.arange(3, dtype=np.float32), mask=False)
    assert zoo_client.infer("fixed", {"input": clear})["output"].tolist() == [0.0, 1.0, 2.0]


def test_masked_arrays_inside_a_list_are_refused_too(zoo_client: InferenceClient) -> None:
    """numpy reads a list of masked arrays as their values, the masked ones included, and the
    masked constant as nan (with a warning): the model answered for values the caller had
    masked out. Refused as a masked array alone is; one with nothing masked is its values."""
    hidden = np.ma.masked_array([1.0, 99.0, 3.0], mask=[False, True, False])
    for value in ([hidden], [[1.0, 2.0, 3.0], hidden], [[1.0, np.ma.masked, 3.0]]):
        with pytest.raises(InvalidInputError, match=r"masked array.*filled"):
            zoo_client.infer("id_fp64", {"input": value})
    clear = [np.ma.masked_array([1.0, 2.0], mask=False)]
    assert zoo_client.infer("id_fp64", {"input": clear})["output"].tolist() == [[1.0, 2.0]]


def test_numpy_string_dtype_arrays_are_bytes(zoo_client: InferenceClient) -> None:
    """numpy 2's variable-width StringDType (kind T) was refused as an unsupported dtype."""
    string_dtype = getattr(np.dtypes, "StringDType", None)
    if string_dtype is None:
        pytest.skip("numpy < 2 has no StringDType")
    values = np.array([["ab\x00", "é"]], dtype=string_dtype())
    expected = [[b"ab\x00", "é".encode()]]
    assert zoo_client.infer("id_bytes", {"input": values})["output"].tolist() == expected


def test_python_ints_in_range_take_an_unsigned_dtype(zoo_client: InferenceClient) -> None:
    result = zoo_client.infer("id_uint8", {"input": [[0, 255]]})
    assert result["output"].dtype == np.uint8 and result["output"].tolist() == [[0, 255]]


def test_bool_bytes_other_than_0_and_1_are_invalid_on_ferry_v1(
    zoo: tuple[ServerThread, Path],
) -> None:
    """An SDK in another language may send a byte of 2 for true; onnxruntime would read it as
    neither value, so it is refused, naming the element."""
    request = pb.InferRequest(model="id_bool")
    request.inputs.add(
        name="input", dtype=tensor_pb2.DATA_TYPE_BOOL, shape=[1, 2], data=bytes([1, 2])
    )
    with grpc.insecure_channel(zoo[0].target) as channel, pytest.raises(grpc.RpcError) as exc:
        pb_grpc.InferenceStub(channel).Infer(request, timeout=30)
    assert exc.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "input 'input': BOOL elements are one byte each" in exc.value.details()
    assert "element 1 is the byte 2" in exc.value.details()


def test_infer_stream_answers_each_request_and_survives_errors(
    zoo: tuple[ServerThread, Path],
) -> None:
    """A failing request on a stream gets an error response with its id; the stream stays open
    and the other requests are answered correctly."""
    x = RNG.standard_normal((2, 64)).astype(np.float32)
    good = [
        build_infer_request("mlp", {"input": x[i : i + 1]}, request_id=f"ok{i}") for i in (0, 1)
    ]
    bad = build_infer_request("mlp", {"input": x.astype(np.float64)}, request_id="bad")
    missing = build_infer_request("nope", {"input": x}, request_id="missing")
    with grpc.insecure_channel(zoo[0].target) as channel:
        stub = pb_grpc.InferenceStub(channel)
        responses = list(stub.InferStream(iter([good[0], bad, missing, good[1]]), timeout=30))
    by_id: dict[str, pb.InferStreamResponse] = {r.id: r for r in responses}
    assert sorted(by_id) == ["bad", "missing", "ok0", "ok1"]
    assert by_id["bad"].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert by_id["bad"].error.kind == "INVALID_INPUT"
    assert "'input'" in by_id["bad"].error.message
    assert by_id["missing"].error.code == grpc.StatusCode.NOT_FOUND.value[0]
    assert by_id["missing"].error.kind == "MODEL_NOT_FOUND"
    expected = reference(zoo[1] / "mlp" / "1" / "model.onnx", {"input": x})["logits"]
    for i in (0, 1):
        (out,) = by_id[f"ok{i}"].response.outputs
        got = np.frombuffer(out.data, np.float32).reshape(tuple(out.shape))
        np.testing.assert_allclose(got, expected[i : i + 1], rtol=1e-5, atol=1e-6)


def test_bf16_round_trips_through_onnxruntime(tmp_path: Path) -> None:
    """onnxruntime's Python API takes BF16 only as an OrtValue and cannot return it as numpy:
    the session feeds bits and casts BF16 outputs through float32 (exact) and back."""
    import ml_dtypes
    import torch

    root = make_repo(tmp_path / "repo", {"id_bf16": identity_model("BF16")})
    x = np.array([[1.5, -2.0, 3.25], [0.0, -0.0, 65280.0]], dtype=ml_dtypes.bfloat16)
    # NaNs with payloads, signalling and quiet, and a subnormal and inf: a rounding cast back
    # from float32 turned every NaN into the default one.
    bits = np.array([[0x7FC1, 0x7F81, 0xFF81], [0xFFFF, 0x0001, 0x7F80]], np.uint16)
    with ServerThread(root) as srv, InferenceClient(srv.target) as client:
        out = client.infer("id_bf16", {"input": x})["output"]
        odd = client.infer("id_bf16", {"input": bits.view(ml_dtypes.bfloat16)})["output"]
        # numpy has no bfloat16, so torch's .numpy() refuses one: it goes by its bits
        from_torch = client.infer(
            "id_bf16", {"input": torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16)}
        )["output"]
        with pytest.raises(InvalidInputError, match=r"layout torch\.sparse_coo"):
            client.infer("id_bf16", {"input": torch.zeros(2, 3).to_sparse()})
        # A list takes the declared BF16 (it went out as FP64, which the server refused), with
        # the range check every float type has.
        listed = client.infer("id_bf16", {"input": [[1.5, -2, 3.25]]})["output"]
        with pytest.raises(InvalidInputError, match="1e\\+39 is out of the model's bfloat16"):
            client.infer("id_bf16", {"input": [[1e39, 0.0]]})
    assert listed.dtype == ml_dtypes.bfloat16 and listed.tolist() == [[1.5, -2.0, 3.25]]
    np.testing.assert_array_equal(from_torch.view(np.uint16), bits)
    assert out.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(out.view(np.uint16), x.view(np.uint16))
    np.testing.assert_array_equal(odd.view(np.uint16), bits)


def test_list_inputs_follow_a_new_default_version_with_other_dtypes(tmp_path: Path) -> None:
    """The client's dtype cache for list inputs was kept per model: once a new default version
    took INT64 where the old one took FP32, every list input was converted to FP32 and refused
    until the client was recreated. A refusal now refetches the dtypes once and retries."""
    from helpers import write_config

    from ferry.client import AsyncInferenceClient, RepositoryClient

    root = make_repo(tmp_path / "repo", {"m": [identity_model("FP32"), identity_model("INT64")]})
    write_config(root, "m", {"default_version": 1, "version_policy": {"all": True}})
    with ServerThread(root) as srv, InferenceClient(srv.target, timeout=30) as client:
        assert client.infer("m", {"input": [[1, 2]]})["output"].dtype == np.float32
        aclient = AsyncInferenceClient(srv.target, timeout=30)
        assert srv.call(lambda: aclient.infer("m", {"input": [[1, 2]]})).version == 1
        write_config(root, "m", {"default_version": 2, "version_policy": {"all": True}})
        with RepositoryClient(srv.management_target) as repository:
            repository.refresh()
        result = client.infer("m", {"input": [[1, 2]]})
        assert (result.version, result["output"].dtype) == (2, np.int64)
        assert client.infer("m", {"input": [[3, 4]]})["output"].tolist() == [[3, 4]]
        answer = srv.call(lambda: aclient.infer("m", {"input": [[1, 2]]}))
        assert (answer.version, answer["output"].dtype) == (2, np.int64)
        # A refusal that is not about a datatype stands, with no metadata call: a wrong shape
        # cost one more GetModelMetadata per call, whose answer could not cure it.
        fetched = count_metadata_calls(client)
        with pytest.raises(InvalidInputError, match="must have shape"):
            client.infer("m", {"input": [1, 2]})
        afetched = count_metadata_calls(aclient)
        with pytest.raises(InvalidInputError, match="must have shape"):
            srv.call(lambda: aclient.infer("m", {"input": [1, 2]}))
        # Nor a float list for the INT64 input it was converted for (floats are sent as they
        # are, and the fresh cache holds INT64 already): no dtypes fetched again can cure it.
        with pytest.raises(InvalidInputError, match="must be INT64, got FP64"):
            client.infer("m", {"input": [[1.5, 2.0]]})
        with client.stream("m") as stream:
            stream.submit({"input": [[1.5, 2.0]]}, "floats")
            [(_, refused)] = list(stream.results())
        assert isinstance(refused, InvalidInputError)
        assert (fetched, afetched) == ([], [])
        srv.call(aclient.close)


def count_metadata_calls(client: object) -> list[object]:
    """The metadata calls ``client`` makes from now on (one entry each): its ``model_metadata``
    is wrapped on the instance, which every dtype fetch goes through."""
    calls: list[object] = []
    original = client.model_metadata  # type: ignore[attr-defined]

    def counted(*args: object, **kwargs: object) -> object:
        calls.append(args)
        return original(*args, **kwargs)

    client.model_metadata = counted  # type: ignore[attr-defined]
    return calls


def test_the_server_words_a_datatype_refusal_as_the_sdk_recognises_it(
    zoo_client: InferenceClient,
) -> None:
    """The SDK fetches dtypes again only for a refusal of a datatype, which it knows by the
    server's words: a change of them must fail here, not silently end the stale-dtype retry."""
    from ferry.client._requests import refuses_datatype

    with pytest.raises(InvalidInputError) as wrong_type:
        zoo_client.infer("fixed", {"input": np.zeros((1, 3), np.float64)})
    with pytest.raises(InvalidInputError) as wrong_shape:
        zoo_client.infer("fixed", {"input": np.zeros((1, 4), np.float32)})
    with pytest.raises(InvalidInputError) as wrong_name:
        zoo_client.infer("fixed", {"inputs": np.zeros((1, 3), np.float32)})
    assert refuses_datatype(wrong_type.value)
    assert not refuses_datatype(wrong_shape.value)
    assert not refuses_datatype(wrong_name.value)


def test_streams_follow_a_new_default_version_with_other_dtypes(tmp_path: Path) -> None:
    """A stream converted list inputs to the dtypes cached when it first needed them: once a new
    default version took INT64 where the old one took FP32, every list request on it (and on any
    later stream of the client) was refused. A datatype refusal now fetches the dtypes once and
    sends that request again, under its id, with lists as they were when submitted."""
    from helpers import write_config

    from ferry.client import AsyncInferenceClient, RepositoryClient

    root = make_repo(tmp_path / "repo", {"m": [identity_model("FP32"), identity_model("INT64")]})
    write_config(root, "m", {"default_version": 1, "version_policy": {"all": True}})
    with ServerThread(root) as srv, InferenceClient(srv.target, timeout=30) as client:
        aclient = AsyncInferenceClient(srv.target, timeout=30)
        stream = client.stream("m")
        astream = aclient.stream("m")
        assert client.infer("m", {"input": [[1, 2]]})["output"].dtype == np.float32
        assert srv.call(lambda: aclient.infer("m", {"input": [[1, 2]]})).version == 1
        write_config(root, "m", {"default_version": 2, "version_policy": {"all": True}})
        with RepositoryClient(srv.management_target) as repository:
            repository.refresh()
        fetched = count_metadata_calls(client)
        row = [[5, 6]]
        stream.submit({"input": row}, "a")
        row[0][:] = [7, 8]  # refilled for the next request: "a" still goes as [[5, 6]]
        stream.submit({"input": row}, "b")
        stream.submit({"input": [1, 2]}, "shape")  # refused for its shape: no fetch, no resend
        answers = dict(stream.results())
        assert fetched == [("m",)]  # one fetch for both refused requests
        assert answers["a"].version == 2 and answers["a"]["output"].tolist() == [[5, 6]]
        assert answers["b"]["output"].dtype == np.int64
        assert answers["b"]["output"].tolist() == [[7, 8]]
        assert isinstance(answers["shape"], InvalidInputError)
        assert "must have shape" in answers["shape"].message
        # The cache is fresh for what comes next: no refusal, no fetch.
        stream.submit({"input": [[9, 9]]}, "c")
        stream.close()
        assert dict(stream.results())["c"]["output"].tolist() == [[9, 9]]
        assert stream.wait(30) and fetched == [("m",)]

        afetched = count_metadata_calls(aclient)

        async def run_async() -> dict[str, Any]:
            arow = [[3, 4]]
            await astream.submit({"input": arow}, "a")
            arow[0][:] = [0, 0]
            await astream.submit({"input": [1, 2]}, "shape")
            answered = {rid: r async for rid, r in astream.results()}
            await astream.close()
            await astream.wait()
            await aclient.close()
            return answered

        aanswers = srv.call(run_async)
        assert afetched == [("m",)]
        assert aanswers["a"].version == 2 and aanswers["a"]["output"].tolist() == [[3, 4]]
        assert isinstance(aanswers["shape"], InvalidInputError)


def test_a_list_number_the_stale_dtype_cannot_hold_follows_the_new_version(tmp_path: Path) -> None:
    """With FP16 cached for a model whose new default version takes FP32, a list holding 1e5 was
    refused by the client itself ("out of the model's float16 range"), never reaching the
    server, so nothing refreshed the cache: every such request failed until the client was
    recreated. That refusal now fetches the dtypes once, as the server's refusal does."""
    from helpers import write_config

    from ferry.client import AsyncInferenceClient, RepositoryClient

    root = make_repo(tmp_path / "repo", {"m": [identity_model("FP16"), identity_model("FP32")]})
    write_config(root, "m", {"default_version": 1, "version_policy": {"all": True}})
    big = {"input": [[1e5, 2.0]]}
    with ServerThread(root) as srv:
        unary, streaming = (InferenceClient(srv.target, timeout=30) for _ in range(2))
        aunary, astreaming = (AsyncInferenceClient(srv.target, timeout=30) for _ in range(2))
        for sync in (unary, streaming):
            assert sync.infer("m", {"input": [[1, 2]]})["output"].dtype == np.float16
        for aclient in (aunary, astreaming):
            assert srv.call(lambda c=aclient: c.infer("m", {"input": [[1, 2]]})).version == 1
        write_config(root, "m", {"default_version": 2, "version_policy": {"all": True}})
        with RepositoryClient(srv.management_target) as repository:
            repository.refresh()
        fetched = [count_metadata_calls(c) for c in (unary, streaming, aunary, astreaming)]

        assert unary.infer("m", big)["output"].tolist() == [[1e5, 2.0]]
        with streaming.stream("m") as stream:
            stream.submit(big, "a")
            assert dict(stream.results())["a"]["output"].tolist() == [[1e5, 2.0]]

        async def run_async() -> list[Any]:
            answer = await aunary.infer("m", big)
            async with astreaming.stream("m") as astream:
                await astream.submit(big, "a")
                answers = [r async for _, r in astream.results()]
            await aunary.close()
            await astreaming.close()
            return [answer, *answers]

        for result in srv.call(run_async):
            assert result.version == 2 and result["output"].tolist() == [[1e5, 2.0]]
        assert fetched == [[("m",)]] * 4
        # A number no declared type holds is still refused, after its one fetch.
        with pytest.raises(InvalidInputError, match="out of the model's float32 range"):
            unary.infer("m", {"input": [[1e39, 0.0]]})
        assert fetched[0] == [("m",)] * 2
        unary.close()
        streaming.close()


def test_a_memoryview_of_numbers_is_sent_as_its_numbers(zoo_client: InferenceClient) -> None:
    """A memoryview of a bytes object or a bytearray is one BYTES element (0ed5ab9), but one of
    int8 or uint8 numbers (a numpy array's, an array.array's) is those numbers, as numpy reads
    it: its format ('b', 'B') said bytes, and it went out as one BYTES element, refused
    'must be INT8, got BYTES' by a model numpy's reading of it fits."""
    for model, numbers in (
        ("fixed_int8", np.array([-1, 2], np.int8)),
        ("fixed_uint8", np.array([0, 255], np.uint8)),
        ("fixed_int8", array.array("b", [-1, 2])),
    ):
        view = memoryview(numbers)
        expected = zoo_client.infer(model, {"input": np.asarray(numbers)})["output"]
        got = zoo_client.infer(model, {"input": view})["output"]
        assert got.dtype == expected.dtype and got.tolist() == expected.tolist()


def test_a_memoryview_of_numbers_in_a_list_is_its_numbers(zoo_client: InferenceClient) -> None:
    """Inside a list too: a memoryview of uint8 numbers went out as one BYTES element (a list's
    buffers were all made bytes), while an int8 one was its numbers; a bytearray and a
    memoryview of bytes stay BYTES elements."""
    view = memoryview(np.array([0, 255], np.uint8))
    got = zoo_client.infer("id_uint8", {"input": [view]})["output"]
    assert got.dtype == np.uint8 and got.tolist() == [[0, 255]]
    text = [[bytearray(b"ab"), memoryview(b"c\x00")]]
    assert zoo_client.infer("id_bytes", {"input": text})["output"].tolist() == [[b"ab", b"c\x00"]]
