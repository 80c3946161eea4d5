"""Inference over the Open Inference Protocol's REST form, through tritonclient.http unchanged
and through plain HTTP requests (what curl sends): JSON tensors and the binary extension."""

from __future__ import annotations

import gzip
import json
import logging
import socket
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as tg
import tritonclient.http as th
from helpers import ExecutionGate, StartServer, make_repo, until_closed, wait_for, write_config
from kserve_common import DATATYPES, http_call, identity_name
from serverutil import ServerThread
from test_kserve_infer import SAMPLES
from tritonclient.utils import InferenceServerException

from ferry.server.examples import mlp_model
from ferry.server.http import listener
from ferry.server.http.encodings import ENCODINGS, brotli

JSON_INPUT_TYPES = [d for d in DATATYPES if d != "BF16"]  # BF16 has no JSON form


def _input(name: str, array: np.ndarray, datatype: str, binary: bool = True) -> th.InferInput:
    tensor = th.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array, binary_data=binary)
    return tensor


def _infer(target: str, model: str, request: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    status, _, body = http_call(
        target, "POST", f"/v2/models/{model}/infer", json.dumps(request).encode()
    )
    return status, json.loads(body)


def _status(exc: pytest.ExceptionInfo[InferenceServerException]) -> str:
    return str(exc.value.status())


@pytest.mark.parametrize("datatype", DATATYPES)
def test_binary_round_trip_every_datatype(
    triton_http: th.InferenceServerClient, datatype: str
) -> None:
    sample = SAMPLES[datatype]
    result = triton_http.infer(
        identity_name(datatype), [_input("input", sample, datatype)], request_id="r-1"
    )
    response = result.get_response()
    assert response["id"] == "r-1"
    assert (response["model_name"], response["model_version"]) == (identity_name(datatype), "1")
    (output,) = response["outputs"]
    assert (output["datatype"], output["shape"]) == (datatype, [2, 3])
    assert "binary_data_size" in output["parameters"]  # no outputs named: all binary
    np.testing.assert_array_equal(result.as_numpy("output"), sample)


@pytest.mark.parametrize("datatype", JSON_INPUT_TYPES)
def test_json_round_trip_every_datatype(
    triton_http: th.InferenceServerClient, datatype: str
) -> None:
    sample = SAMPLES[datatype]
    result = triton_http.infer(
        identity_name(datatype),
        [_input("input", sample, datatype, binary=False)],
        outputs=[th.InferRequestedOutput("output", binary_data=False)],
    )
    (output,) = result.get_response()["outputs"]
    assert "data" in output and "parameters" not in output
    got = result.as_numpy("output")
    if datatype == "BYTES":  # JSON carries text: tritonclient gives str elements back
        got = np.vectorize(lambda s: s.encode("utf-8"), otypes=[object])(got)
    np.testing.assert_array_equal(got, sample)


def test_bf16_binary_in_json_out(triton_http: th.InferenceServerClient) -> None:
    sample = SAMPLES["BF16"]
    result = triton_http.infer(
        identity_name("BF16"),
        [_input("input", sample, "BF16")],
        outputs=[th.InferRequestedOutput("output", binary_data=False)],
    )
    np.testing.assert_array_equal(result.as_numpy("output"), sample)  # floats, exact in BF16
    status, body = _infer(
        triton_http._parsed_url.netloc,
        identity_name("BF16"),
        {"inputs": [{"name": "input", "datatype": "BF16", "shape": [1], "data": [1.0]}]},
    )
    assert status == 400
    assert "BF16 has no JSON form" in body["error"]


def test_mixed_binary_and_json_tensors(triton_http: th.InferenceServerClient) -> None:
    a = np.arange(8, dtype=np.float32).reshape(2, 4)
    b = np.arange(8, dtype=np.int64).reshape(2, 4)
    result = triton_http.infer(
        "two_io",
        [_input("a", a, "FP32", binary=False), _input("b", b, "INT64", binary=True)],
        outputs=[
            th.InferRequestedOutput("scaled", binary_data=True),
            th.InferRequestedOutput("sum", binary_data=False),
        ],
    )
    outputs = result.get_response()["outputs"]
    assert [o["name"] for o in outputs] == ["scaled", "sum"]  # in the order asked
    assert "binary_data_size" in outputs[0]["parameters"] and "data" in outputs[1]
    np.testing.assert_array_equal(result.as_numpy("scaled"), b * 3)
    np.testing.assert_array_equal(result.as_numpy("sum"), a + b)
    only = triton_http.infer(
        "two_io", [_input("a", a, "FP32"), _input("b", b, "INT64")],
        outputs=[th.InferRequestedOutput("sum")],
    )  # fmt: skip
    assert [o["name"] for o in only.get_response()["outputs"]] == ["sum"]


def test_plain_json_request_with_nested_data(kserve_server: ServerThread) -> None:
    """What a curl user sends: nested rows, no binary; the answer is plain JSON."""
    request = {
        "id": "curl-1",
        "inputs": [
            {
                "name": "a",
                "datatype": "FP32",
                "shape": [2, 4],
                "data": [[1, 2, 3, 4], [5, 6, 7, 8.5]],
            },
            {"name": "b", "datatype": "INT64", "shape": [2, 4], "data": list(range(8))},
        ],
        "outputs": [{"name": "sum"}],
    }
    status, headers, body = http_call(
        kserve_server.http_target, "POST", "/v2/models/two_io/infer", json.dumps(request).encode()
    )
    assert status == 200
    assert headers["content-type"].startswith("application/json")
    response = json.loads(body)
    assert response["id"] == "curl-1"
    (output,) = response["outputs"]
    assert (output["name"], output["datatype"], output["shape"]) == ("sum", "FP32", [2, 4])
    assert output["data"] == [1, 3, 5, 7, 9, 11, 13, 15.5]


@pytest.mark.parametrize(
    ("datatype", "data"),
    [
        ("FP32", [[0.0, 3.0], [1.0, 4.0], [2.0, 5.0]]),  # the rows of [2, 3], transposed
        ("INT64", [[0, 1], [2, 3], [4, 5]]),  # row-major, but nested as [3, 2]
        ("BYTES", [["a", "b"], ["c", "d"], ["e", "f"]]),
    ],
)
def test_json_data_nested_otherwise_than_its_shape_is_400(
    kserve_server: ServerThread, datatype: str, data: list[Any]
) -> None:
    """Six elements for shape [2, 3] nested as [3, 2] (a matrix sent transposed) were read
    row-major with only their count checked: each row was answered for values that were not
    its own, with a 200. The nesting must be the shape's (the last list may hold the remaining
    dims flat, and dims of 1 change nothing), as a flat list always is."""
    status, _, body = http_call(
        kserve_server.http_target,
        "POST",
        f"/v2/models/{identity_name(datatype)}/infer",
        json.dumps(
            {"inputs": [{"name": "input", "datatype": datatype, "shape": [2, 3], "data": data}]}
        ).encode(),
    )
    assert status == 400, body
    error = json.loads(body)
    assert error["kind"] == "INVALID_ARGUMENT"
    assert "is nested as [3, 2], which is not its shape [2, 3]" in error["error"]
    # What the shape says, nested as it, flat, or with a dim of 1 wrapped around, is served.
    rows = [["a", "b", "c"], ["d", "e", "f"]] if datatype == "BYTES" else [[0, 1, 2], [3, 4, 5]]
    flat = rows[0] + rows[1]
    for same in (rows, flat, [flat], [[[v] for v in row] for row in rows]):
        request = {
            "inputs": [{"name": "input", "datatype": datatype, "shape": [2, 3], "data": same}]
        }
        status, _, body = http_call(
            kserve_server.http_target,
            "POST",
            f"/v2/models/{identity_name(datatype)}/infer",
            json.dumps(request).encode(),
        )
        assert status == 200, (same, body)
        assert json.loads(body)["outputs"][0]["data"] == flat


def test_binary_extension_by_hand(kserve_server: ServerThread) -> None:
    """The binary extension's layout, built without tritonclient: JSON header, then tensors."""
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "datatype": "FP32",
                    "shape": [2, 3],
                    "parameters": {"binary_data_size": x.nbytes},
                },
            ],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    status, headers, body = http_call(
        kserve_server.http_target,
        "POST",
        f"/v2/models/{identity_name('FP32')}/versions/1/infer",
        header + x.tobytes(),
        {"Inference-Header-Content-Length": str(len(header))},
    )
    assert status == 200
    assert headers["content-type"] == "application/octet-stream"
    length = int(headers["inference-header-content-length"])
    response = json.loads(body[:length])
    (output,) = response["outputs"]
    assert output["parameters"] == {"binary_data_size": x.nbytes}
    np.testing.assert_array_equal(np.frombuffer(body[length:], np.float32).reshape(2, 3), x)


def test_results_equal_the_grpc_path(
    triton_http: th.InferenceServerClient, triton: tg.InferenceServerClient
) -> None:
    x = np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)
    grpc_input = tg.InferInput("input", [3, 64], "FP32")
    grpc_input.set_data_from_numpy(x)
    via_grpc = triton.infer("mlp", [grpc_input]).as_numpy("logits")
    for binary in (True, False):
        via_http = triton_http.infer(
            "mlp",
            [_input("input", x, "FP32", binary)],
            outputs=[th.InferRequestedOutput("logits", binary_data=binary)],
        ).as_numpy("logits")
        np.testing.assert_array_equal(via_http, via_grpc)


def test_nan_inf_and_parameters(triton_http: th.InferenceServerClient) -> None:
    data = np.array([[np.nan, np.inf, -np.inf, 1.0]], np.float32)
    for binary in (True, False):
        result = triton_http.infer(
            identity_name("FP32"),
            [_input("input", data, "FP32", binary)],
            outputs=[th.InferRequestedOutput("output", binary_data=binary)],
            priority=1,
            timeout=30_000_000,
        )
        np.testing.assert_array_equal(result.as_numpy("output"), data)


def test_json_data_with_nan_is_written_as_without(kserve_server: ServerThread) -> None:
    """A float output holding NaN or Infinity was written by the standard library from a list
    of Python floats, ten times slower than orjson writes the same output without them, on the
    event loop (a 16 MB binary request with one NaN held every other request for 5 s), and
    each float32 as its float64 repr. Now it is written as the finite data is, its non-finite
    elements as NaN, Infinity and -Infinity."""
    finite = np.array([[0.1, 1e-3, 3.0, 65504.0]], np.float32)
    special = np.array([[np.nan, 0.1, np.inf, -np.inf]], np.float32)
    texts = []
    for data in (finite, special):
        header = json.dumps(
            {
                "inputs": [
                    {
                        "name": "input",
                        "datatype": "FP32",
                        "shape": [1, 4],
                        "parameters": {"binary_data_size": data.nbytes},
                    }
                ]
            }
        ).encode()
        status, _, body = http_call(
            kserve_server.http_target,
            "POST",
            f"/v2/models/{identity_name('FP32')}/infer",
            header + data.tobytes(),
            {"Inference-Header-Content-Length": str(len(header))},
        )
        assert status == 200
        texts.append(body)
        (output,) = json.loads(body)["outputs"]
        np.testing.assert_array_equal(np.array(output["data"], np.float32).reshape(1, 4), data)
    assert b'"data":[0.1,0.001,3.0,65504.0]' in texts[0]
    assert b'"data":[NaN,0.1,Infinity,-Infinity]' in texts[1]


def test_compressed_request_bodies(triton_http: th.InferenceServerClient) -> None:
    x = np.ones((2, 64), np.float32)
    for algorithm in ("gzip", "deflate"):
        result = triton_http.infer(
            "mlp", [_input("input", x, "FP32")], request_compression_algorithm=algorithm
        )
        assert result.as_numpy("logits").shape == (2, 10)


def test_model_mismatch_is_400_with_the_grpc_words(
    triton_http: th.InferenceServerClient, triton: tg.InferenceServerClient
) -> None:
    wrong = np.ones((1, 5), np.float32)
    with pytest.raises(InferenceServerException) as exc:
        triton_http.infer("mlp", [_input("input", wrong, "FP32")])
    assert _status(exc) == "400"
    grpc_input = tg.InferInput("input", [1, 5], "FP32")
    grpc_input.set_data_from_numpy(wrong)
    with pytest.raises(InferenceServerException) as grpc_exc:
        triton.infer("mlp", [grpc_input])
    assert exc.value.message() == grpc_exc.value.message()  # the same words, from the core
    with pytest.raises(InferenceServerException) as exc:
        triton_http.infer("mlp", [_input("input", np.ones((1, 64), np.float64), "FP64")])
    assert _status(exc) == "400"
    assert "must be FP32, got FP64" in exc.value.message()


def test_unknown_model_or_version_is_404_and_bad_version_400(
    triton_http: th.InferenceServerClient,
) -> None:
    x = [_input("input", np.ones((1, 64), np.float32), "FP32")]
    with pytest.raises(InferenceServerException) as exc:
        triton_http.infer("no_such_model", x)
    assert _status(exc) == "404"
    with pytest.raises(InferenceServerException) as exc:
        triton_http.infer("mlp", x, model_version="9")
    assert _status(exc) == "404"
    with pytest.raises(InferenceServerException) as exc:
        triton_http.infer("mlp", x, model_version="abc")
    assert _status(exc) == "400"
    assert "invalid model version 'abc'" in exc.value.message()


def test_a_model_not_served_is_404_whatever_the_body(kserve_server: ServerThread) -> None:
    """The body was judged before the model: a request to a model not served here with a body
    that is not what the model takes answered 400 ("needs an 'inputs' list") where gRPC's
    ModelInfer, and Triton, answer NOT_FOUND. Now the same answer as gRPC, in its words."""
    grpc_client = tg.InferenceServerClient(kserve_server.target)
    x = tg.InferInput("nothing", [1], "INT8")
    x.set_data_from_numpy(np.zeros(1, np.int8))
    with pytest.raises(InferenceServerException) as exc:
        grpc_client.infer("no_such_model", [x])
    assert str(exc.value.status()) == "StatusCode.NOT_FOUND"
    for body, headers in [
        (b"{}", {}),
        (b"{not json", {}),
        (b'{"inputs": []}', {"Inference-Header-Content-Length": "x"}),
    ]:
        status, response_headers, answer = http_call(
            kserve_server.http_target, "POST", "/v2/models/no_such_model/infer", body, headers
        )
        assert (status, response_headers["ferry-error"]) == (404, "MODEL_NOT_FOUND"), answer
        assert json.loads(answer)["error"] == exc.value.message()


@pytest.mark.parametrize(
    ("body", "headers", "words"),
    [
        (b"{not json", {}, "not valid JSON"),
        (b"[]", {}, "must be a JSON object"),
        (b'{"inputs": {}}', {}, "'inputs' list"),
        (b'{"inputs": [{"name": "input", "datatype": "FP99", "shape": [1], "data": [1]}]}', {},
         "unknown data type name 'FP99'"),
        (b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, -2], "data": []}]}', {},
         "negative dimension"),
        (b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 2], "data": [1, 2, 3]}]}',
         {}, "holds 4 elements, got 3"),
        (b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 2], "data": ["a", "b"]}]}',
         {}, "must hold numbers"),
        (b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 2], "data": [[1], [2, 3]]}]}',
         {}, "not a regular (non-ragged) list"),
        (b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1]}]}', {}, "has no data"),
        # A key named twice: readers differ on which counts (Python's the last, Triton's the
        # first), so neither is taken.
        (b'{"inputs": [{"name": "input", "datatype": "INT8", "datatype": "FP32", "shape": [1, 1], '
         b'"data": [1]}]}', {}, "the request body names the key 'datatype' twice in one object"),
        (b'{"inputs": [], "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1], '
         b'"data": [1]}]}', {}, "names the key 'inputs' twice"),
        (b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1], "parameters": '
         b'{"binary_data_size": 4, "binary_data_size": 8}}]}' + bytes(8),
         {"Inference-Header-Content-Length": "130"}, "names the key 'binary_data_size' twice"),
        (b'{"inputs": []}', {"Inference-Header-Content-Length": "99"}, "larger than the request body"),
        (b'{"inputs": []}', {"Inference-Header-Content-Length": "x"}, "non-negative integer"),
    ],
)  # fmt: skip
def test_malformed_requests_are_400(
    kserve_server: ServerThread, body: bytes, headers: dict[str, str], words: str
) -> None:
    status, response_headers, answer = http_call(
        kserve_server.http_target,
        "POST",
        f"/v2/models/{identity_name('FP32')}/infer",
        body,
        headers,
    )
    assert status == 400, answer
    error = json.loads(answer)
    assert words in error["error"]
    assert error["kind"] == response_headers["ferry-error"] == "INVALID_ARGUMENT"


@pytest.mark.parametrize(
    ("datatype", "data", "words"),
    [
        ("INT8", [127, 128], "values must lie in [-128, 127]"),
        ("UINT8", [-1, 2], "values must lie in [0, 255]"),
        ("INT32", [1.5, 2], "must hold integers"),
        ("BOOL", [1, 0], "must hold true/false"),
        ("BYTES", ["a", 1], "must hold strings"),
        # Finite but out of range: it would run as inf.
        ("FP32", [1.0, 1e300], "FP32 values must lie within +-3.40282e+38, got 1e+300"),
        ("FP16", [70000.0, 1.0], "FP16 values must lie within +-65504, got 70000.0"),
        # Said in JSON's words: numpy's were "got object values" for a null, "got str96
        # values" for strings, "got int64 values" for 1 and 0 sent as BOOL.
        ("FP32", [1.0, None], "must hold numbers, got null among them"),
        ("FP32", [1.0, {"a": 1}], "must hold numbers, got an object among them"),
        ("FP32", ["1.0", "2"], "must hold numbers, got strings"),
        ("BOOL", [1, 0], "must hold true/false, got integers"),
        ("INT64", [1, 2.5], "got numbers that are not all integers (a fraction"),
    ],
)
def test_json_values_are_checked_against_the_datatype(
    kserve_server: ServerThread, datatype: str, data: list[Any], words: str
) -> None:
    request = {"inputs": [{"name": "input", "datatype": datatype, "shape": [1, 2], "data": data}]}
    status, body = _infer(kserve_server.http_target, identity_name(datatype), request)
    assert status == 400
    assert words in body["error"]


@pytest.mark.parametrize(
    ("size", "tail", "words"),
    [
        (4, struct.pack("<f", 1.0) + b"extra", "5 bytes of binary data that no input claims"),
        (8, struct.pack("<f", 1.0), "runs past the end of the binary data"),
        (-1, b"", "binary_data_size must be a non-negative integer"),
        # Read as a float by the JSON reader: it was "must be a non-negative integer, got
        # 1.8446744073709552e+19", though an integer was sent.
        (2**64, b"", "binary_data_size must be below 2**64, got 18446744073709551616"),
    ],
)
def test_binary_sizes_must_cover_the_tail_exactly(
    kserve_server: ServerThread, size: int, tail: bytes, words: str
) -> None:
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "datatype": "FP32",
                    "shape": [1, 1],
                    "parameters": {"binary_data_size": size},
                }
            ]
        }
    ).encode()
    status, _, body = http_call(
        kserve_server.http_target,
        "POST",
        f"/v2/models/{identity_name('FP32')}/infer",
        header + tail,
        {"Inference-Header-Content-Length": str(len(header))},
    )
    assert status == 400
    assert words in json.loads(body)["error"]


@pytest.mark.parametrize(
    ("off_by", "words"),
    [
        (None, "send the header Inference-Header-Content-Length with the JSON's length"),
        (2, "(Inference-Header-Content-Length): that header must be the JSON's exact length"),
        (-10, "(Inference-Header-Content-Length): that header must be the JSON's exact length"),
    ],
)
def test_a_binary_body_whose_json_length_is_missing_or_wrong_says_so(
    kserve_server: ServerThread, off_by: int | None, words: str
) -> None:
    """The binary extension without its header (curl users forget it), or with a wrong one:
    the parser's own words pointed at the tensor bytes ("can't decode byte 0x80", "Extra
    data"), not at the header to send or correct."""
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "datatype": "FP32",
                    "shape": [1, 2],
                    "parameters": {"binary_data_size": 8},
                }
            ]
        }
    ).encode()
    # None: no header; else the JSON's length off by some bytes (into the tensor, or short).
    headers = (
        {} if off_by is None else {"Inference-Header-Content-Length": str(len(header) + off_by)}
    )
    status, _, body = http_call(
        kserve_server.http_target,
        "POST",
        f"/v2/models/{identity_name('FP32')}/infer",
        header + np.array([1.0, -2.0], np.float32).tobytes(),
        headers,
    )
    assert status == 400
    assert words in json.loads(body)["error"]


def test_unsupported_request_features_are_501(triton_http: th.InferenceServerClient) -> None:
    x = [_input("input", np.ones((1, 64), np.float32), "FP32")]
    with pytest.raises(InferenceServerException) as exc:
        triton_http.infer("mlp", x, sequence_id=7, sequence_start=True)
    assert _status(exc) == "501"
    with pytest.raises(InferenceServerException) as exc:
        triton_http.infer("mlp", x, outputs=[th.InferRequestedOutput("logits", class_count=3)])
    assert _status(exc) == "501"
    assert "classification" in exc.value.message()


def test_shared_memory_tensors_are_501_in_http_words(
    triton_http: th.InferenceServerClient,
) -> None:
    """tritonclient's set_shared_memory on an input or output: refused, and the message says
    where HTTP carries the data (there is no raw_output_contents in an HTTP answer)."""
    x = _input("input", np.ones((1, 64), np.float32), "FP32")
    shm_input = th.InferInput("input", [1, 64], "FP32")
    shm_input.set_shared_memory("region", 256)
    with pytest.raises(InferenceServerException) as exc:
        triton_http.infer("mlp", [shm_input])
    assert _status(exc) == "501"
    assert "shared memory" in exc.value.message() and "request body" in exc.value.message()
    output = th.InferRequestedOutput("logits")
    output.set_shared_memory("region", 40)
    with pytest.raises(InferenceServerException) as exc:
        triton_http.infer("mlp", [x], outputs=[output])
    assert _status(exc) == "501"
    message = exc.value.message()
    assert "shared memory" in message and "response body" in message
    assert "raw_output_contents" not in message


def _identity_body(values: list[float]) -> bytes:
    tensor = {"name": "input", "datatype": "FP32", "shape": [1, len(values)], "data": values}
    return json.dumps({"inputs": [tensor]}).encode()


def _raw_deflate(data: bytes) -> bytes:
    c = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return c.compress(data) + c.flush()


def _encoded_bodies(body: bytes) -> list[tuple[str, bytes]]:
    """One body in every encoding and form the listener must take."""
    half = len(body) // 2
    bodies = [
        ("gzip", gzip.compress(body)),
        ("gzip", gzip.compress(body[:half]) + gzip.compress(body[half:])),  # two members
        ("deflate", zlib.compress(body)),
        ("deflate", _raw_deflate(body)),  # raw RFC 1951, as some clients send "deflate"
        ("identity", body),
    ]
    return bodies + ([("br", brotli.compress(body))] if ENCODINGS.count("br") else [])


def test_every_encoding_of_a_body_gives_the_same_answer(kserve_server: ServerThread) -> None:
    values = [float(v) for v in range(-300, 300)]
    for encoding, encoded in _encoded_bodies(_identity_body(values)):
        status, _, answer = http_call(
            kserve_server.http_target,
            "POST",
            f"/v2/models/{identity_name('FP32')}/infer",
            encoded,
            {"Content-Encoding": encoding},
        )
        assert status == 200, (encoding, answer)
        assert json.loads(answer)["outputs"][0]["data"] == values, encoding


def test_a_compressed_body_cut_short_is_400_saying_so(kserve_server: ServerThread) -> None:
    """aiohttp's own decoding passed on what a truncated gzip stream decoded to, so a cut upload
    was refused as "not valid JSON", or read unchecked when cut inside the trailer."""
    body = _identity_body([float(v) for v in range(300)])
    for encoding, encoded in _encoded_bodies(body):
        if encoding == "identity":
            continue
        for cut in (len(encoded) // 2, len(encoded) - 4, len(encoded) - 1):
            status, _, answer = http_call(
                kserve_server.http_target,
                "POST",
                f"/v2/models/{identity_name('FP32')}/infer",
                encoded[:cut],
                {"Content-Encoding": encoding},
            )
            assert status == 400, (encoding, cut, answer)
            error = json.loads(answer)["error"]
            assert f"the {encoding} body ends before its compressed stream does" in error, error


def test_data_after_a_compressed_body_is_400(kserve_server: ServerThread) -> None:
    body = _identity_body([1.0, 2.0])
    for encoding, encoded in (("gzip", gzip.compress(body)), ("deflate", zlib.compress(body))):
        status, _, answer = http_call(
            kserve_server.http_target,
            "POST",
            f"/v2/models/{identity_name('FP32')}/infer",
            encoded + b"trailing bytes",
            {"Content-Encoding": encoding},
        )
        assert status == 400, (encoding, answer)
        assert "could not be read" in json.loads(answer)["error"]


def test_a_gzip_body_that_is_not_gzip_is_400(kserve_server: ServerThread) -> None:
    status, _, body = http_call(
        kserve_server.http_target,
        "POST",
        "/v2/models/mlp/infer",
        b"this is not gzip" * 4,
        {"Content-Encoding": "gzip"},
    )
    assert status == 400, body
    assert "could not be read" in json.loads(body)["error"]


def _binary_header(datatype: str, shape: list[int], size: int) -> bytes:
    """The JSON header of a one-input request whose tensor follows it as binary data."""
    tensor = {
        "name": "input",
        "datatype": datatype,
        "shape": shape,
        "parameters": {"binary_data_size": size},
    }
    return json.dumps({"inputs": [tensor]}).encode()


def test_binary_bool_bytes_other_than_0_and_1_are_refused(kserve_server: ServerThread) -> None:
    """A BOOL byte of 2 or 255 is neither true nor false to onnxruntime (a Where fed one chose
    neither branch): refused with the element named, never served a wrong answer."""
    header = _binary_header("BOOL", [1, 3], 3)
    status, _, body = http_call(
        kserve_server.http_target,
        "POST",
        f"/v2/models/{identity_name('BOOL')}/infer",
        header + bytes([1, 0, 2]),
        {"Inference-Header-Content-Length": str(len(header))},
    )
    assert status == 400, body
    assert "element 2 is the byte 2" in json.loads(body)["error"]


def _connect(target: str) -> socket.socket:
    host, port = target.rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=30)


def _raw_http(target: str, request: bytes) -> bytes:
    """Bytes as sent, for what no HTTP client library will send (malformed requests, repeated
    headers); returns whatever the server answers before it closes the connection."""
    with _connect(target) as sock:
        sock.sendall(request)
        return until_closed(sock)


def test_an_unknown_content_encoding_is_415_not_read_as_plain(kserve_server: ServerThread) -> None:
    body = json.dumps(
        {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1], "data": [1.0]}]}
    ).encode()
    status, _, answer = http_call(
        kserve_server.http_target,
        "POST",
        f"/v2/models/{identity_name('FP32')}/infer",
        body,
        {"Content-Encoding": "foo"},
    )
    assert status == 415, answer
    assert "Content-Encoding 'foo' is not supported" in json.loads(answer)["error"]
    assert "deflate, gzip" in json.loads(answer)["error"]


def test_a_repeated_binary_header_length_is_refused(kserve_server: ServerThread) -> None:
    header = _binary_header("FP32", [1, 1], 4)
    body = header + struct.pack("<f", 1.0)
    request = (
        f"POST /v2/models/{identity_name('FP32')}/infer HTTP/1.1\r\n"
        f"Host: x\r\nContent-Length: {len(body)}\r\n"
        f"Inference-Header-Content-Length: {len(header)}\r\n"
        "Inference-Header-Content-Length: 2\r\nConnection: close\r\n\r\n"
    ).encode() + body
    answer = _raw_http(kserve_server.http_target, request)
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    assert b"Inference-Header-Content-Length is sent more than once" in answer


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"POST /v2/models/x/infer HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
        b"FOO /v2 HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /v2 HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"GET /v2 HTTP/1.1\r\nHost: x\r\nX-Bad: a\x01b\r\n\r\n",
    ],
)
def test_malformed_http_is_refused_without_an_error_in_the_log(
    kserve_server: ServerThread, caplog: pytest.LogCaptureFixture, request_bytes: bytes
) -> None:
    """A client's broken HTTP is the client's business: aiohttp logged each with a traceback at
    ERROR, before any token check, so anyone who could connect could fill the log."""
    caplog.set_level(logging.DEBUG, logger="ferry.server.http")
    answer = _raw_http(kserve_server.http_target, request_bytes)
    assert answer.split(b"\r\n", 1)[0].endswith(b" 400 Bad Request"), answer[:200]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    # In the body every other error has (it was aiohttp's plain text, which tritonclient could
    # not read), on one line.
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"\r\nferry-error: INVALID_ARGUMENT\r\n" in head, head
    error = json.loads(body)
    assert error["kind"] == "INVALID_ARGUMENT"
    assert error["error"].startswith("the request is not valid HTTP/1.1: "), error
    assert "\n" not in error["error"], error


@pytest.mark.parametrize(
    ("chunks", "reason"),
    [
        (b"zz\r\nabc\r\n0\r\n\r\n", "Invalid character in chunk size"),
        (b"3\r\nabcXX", "Expected LF after chunk data"),
        (b"ffffffffffffffffffff\r\n", "Chunk size overflow"),
    ],
)
def test_a_malformed_chunk_is_refused_at_once_with_its_reason(
    kserve_server: ServerThread,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    chunks: bytes,
    reason: str,
) -> None:
    # A malformed chunk that came after the head was parsed left the body waiting: answered
    # 408 "arrived too slowly" once BODY_IDLE passed (shortened here: what was 30 s).
    monkeypatch.setattr(listener, "BODY_IDLE", 5.0)
    caplog.set_level(logging.DEBUG, logger="ferry.server.http")
    with _connect(kserve_server.http_target) as sock:
        sock.sendall(
            f"POST /v2/models/{identity_name('FP32')}/infer HTTP/1.1\r\nHost: x\r\n"
            "Transfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n".encode()
        )
        # The body is being read once the server asks for it: the chunk comes after the head.
        assert sock.recv(25) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(chunks)
        answer = until_closed(sock)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), answer
    assert b"\r\nconnection: close" in head.lower(), head
    error = json.loads(body)
    assert error["kind"] == "INVALID_ARGUMENT"
    assert error["error"].startswith(f"the request body could not be read: {reason}"), error
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("version", ["1.0", "1.1"])
def test_an_expectation_of_100_continue_is_met_only_in_http_1_1(
    kserve_server: ServerThread, version: str
) -> None:
    # An HTTP/1.0 client knows no interim answer: it read "100 Continue" as the answer.
    body = json.dumps(
        {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1], "data": [1.0]}]}
    ).encode()
    request = (
        f"POST /v2/models/{identity_name('FP32')}/infer HTTP/{version}\r\nHost: x\r\n"
        f"Expect: 100-continue\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    interim = b"HTTP/1.1 100 Continue\r\n\r\n"
    if version == "1.0":
        answer = _raw_http(kserve_server.http_target, request + body)
        assert answer.startswith(b"HTTP/1.0 200 OK\r\n"), answer[:200]
    else:
        with _connect(kserve_server.http_target) as sock:  # the body once it is asked for
            sock.sendall(request)
            assert sock.recv(len(interim)) == interim
            sock.sendall(body)
            answer = until_closed(sock)
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n"), answer[:200]
    assert json.loads(answer.rpartition(b"\r\n\r\n")[2])["outputs"][0]["data"] == [1.0]


def test_a_client_gone_mid_body_leaves_no_error_in_the_log(
    kserve_server: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="ferry.server.http")
    with _connect(kserve_server.http_target) as sock:
        sock.sendall(
            f"POST /v2/models/{identity_name('FP32')}/infer HTTP/1.1\r\nHost: x\r\n"
            'Content-Length: 100000\r\n\r\n{"inputs": ['.encode()
        )
    # The server noticed (it logs the disconnect, or the body its half-close cut short, at
    # DEBUG), and nothing above that.
    gone = ("Connection lost", "shut its side of the connection")
    wait_for(
        lambda: any(g in r.getMessage() for r in caplog.records for g in gone),
        "the server to see the client go",
    )
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_a_request_whose_client_went_away_is_never_run(
    tmp_path: Path, start_server: StartServer
) -> None:
    """A client that closes its connection while its inference is queued (a timeout, then a
    retry) leaves nothing behind: the request leaves the queue and never runs, as a cancelled
    gRPC call does. aiohttp kept such handlers running, so every abandoned request was run."""
    root = make_repo(tmp_path / "repo", {"mlp": mlp_model()})
    write_config(root, "mlp", {"batching": {"max_batch_size": 0}, "instances": {"count": 1}})
    srv = start_server(root, default_request_timeout=0)  # no deadline would drop them either
    assert srv.app is not None
    batcher = srv.app.registry.get("mlp", 1).batcher
    body = json.dumps(
        {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0.5] * 64}]}
    ).encode()
    head = (
        "POST /v2/models/mlp/infer HTTP/1.1\r\nHost: ferry\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    with ExecutionGate(srv, "mlp") as gate:
        held = socket.create_connection(("127.0.0.1", srv.app.http_port), timeout=30)
        held.sendall(head + body)
        gate.wait_entered()  # the only instance is busy: the next requests queue
        gone = [socket.create_connection(("127.0.0.1", srv.app.http_port)) for _ in range(3)]
        for sock in gone:
            sock.sendall(head + body)
        wait_for(lambda: batcher.queue_depth == 3, "three requests queued")
        for sock in gone:
            sock.close()
        wait_for(lambda: batcher.queue_depth == 0, "the abandoned requests to leave the queue")
        gate.release()
        assert held.recv(12) == b"HTTP/1.1 200"
        held.close()
    statistics = srv.app.dataplane.statistics("mlp", 1)[0]
    assert (gate.calls, statistics.execution_count, statistics.success.count) == (1, 1, 1)
