"""Hostile input, property-based: nothing crashes, nothing answers INTERNAL, nothing escapes.

Hypothesis generates malformed protobuf bytes, byte lengths that lie about shapes, element counts
that overflow, negative and huge dims, NaN/Inf, empty tensors, BYTES elements with lying length
prefixes, and names with ``../``, absolute paths, NUL bytes and 10k characters — against both
protocols and the management RPCs. Every answer must be a precise status (never INTERNAL or
UNKNOWN), the server must log no error, and no file may appear outside the repository: hostile
path names carry a unique marker that is searched for afterwards.

Examples are derandomized and bounded so that the suite is reproducible and its time is known.
"""

from __future__ import annotations

import io
import json
import logging
import pickle
import pickletools
import struct
import urllib.error
import urllib.request
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from helpers import make_repo
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serverutil import ServerThread

from ferry.client._requests import build_infer_request
from ferry.proto.kserve.v2 import grpc_service_pb2 as kpb
from ferry.proto.v1 import inference_pb2 as pb
from ferry.proto.v1 import model_conversion_pb2 as cpb
from ferry.proto.v1 import model_conversion_pb2_grpc as cpb_grpc
from ferry.proto.v1 import repository_pb2 as rpb
from ferry.proto.v1 import tensor_pb2
from ferry.server.examples import identity_model, mlp_model, two_io_model

pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr")
MARK = f"ferry-escape-{uuid.uuid4().hex[:8]}"
BAD_CODES = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS}
MODELS = ["mlp", "two_io", "fixed", "id_bytes", "id_fp16"]
FUZZ = settings(
    max_examples=120,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

HOSTILE_NAMES = [
    "", ".", "..", "../mlp", f"../{MARK}", f"../../{MARK}", f"/tmp/{MARK}", f"{MARK}/../../{MARK}",
    f"mlp/../../{MARK}", "mlp\x00", "\x00", "mlp\x00../../x", "a" * 10_000, "C:\\Windows\\x",
    "%2e%2e%2f" + MARK, "~/" + MARK, "mlp/1", "mlp/../mlp", " mlp", "\u202emlp", "\n",
]  # fmt: skip
names = st.one_of(st.sampled_from(HOSTILE_NAMES), st.text(max_size=40))
model_names = st.one_of(st.sampled_from(MODELS), names)
input_names = st.one_of(st.sampled_from(["input", "a", "b", "output"]), names)
dims = st.one_of(
    st.integers(-3, 70),
    st.sampled_from([-(2**63), 2**63 - 1, 2**62, 2**32, 2**31, 2**31 - 1, -1, 0]),
    st.integers(-(2**63), 2**63 - 1),
)
shapes = st.one_of(
    st.lists(dims, max_size=6),
    st.sampled_from([[1] * 70, [0] * 40, [2**62, 2**62], [2**62, 0, 2**62], [1, 64], [0, 64]]),
)
FIXED_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 2, 8: 4, 9: 8, 10: 2, 11: 2, 12: 4, 13: 8}


@st.composite
def lying_bytes_elements(draw: st.DrawFn) -> bytes:
    """BYTES data whose 4-byte length prefixes may claim more (or less) than follows."""
    parts = []
    for _ in range(draw(st.integers(0, 5))):
        payload = draw(st.binary(max_size=16))
        claimed = draw(st.one_of(st.just(len(payload)), st.integers(0, 2**32 - 1)))
        parts.append(struct.pack("<I", claimed) + payload)
    return b"".join(parts) + draw(st.binary(max_size=3))


@st.composite
def tensors(draw: st.DrawFn) -> tensor_pb2.Tensor:
    dtype = draw(st.one_of(st.sampled_from([12, 12, 14, 10, 9, 1]), st.integers(-2, 40)))
    shape = draw(shapes)
    count = int(np.prod([max(d, 0) for d in shape], dtype=object)) if shape else 1
    honest = draw(st.booleans()) and all(d >= 0 for d in shape) and count <= 4096
    if dtype == 14:
        data = draw(lying_bytes_elements())
    elif honest and dtype == 12:
        floats = st.floats(width=32, allow_nan=True, allow_infinity=True)
        data = np.array(draw(st.lists(floats, min_size=count, max_size=count)), "<f4").tobytes()
    elif honest and dtype in FIXED_SIZES:
        data = draw(
            st.binary(min_size=count * FIXED_SIZES[dtype], max_size=count * FIXED_SIZES[dtype])
        )
    else:
        data = draw(st.binary(max_size=64))
    return tensor_pb2.Tensor(name=draw(input_names), dtype=dtype, shape=shape, data=data)  # type: ignore[arg-type]


random_infer_requests = st.builds(
    lambda model, version, inputs, outputs, timeout, priority, rid: pb.InferRequest(
        model=model, version=version, inputs=inputs, outputs=outputs, timeout_us=timeout,
        priority=priority, id=rid,
    ),
    model_names,
    st.one_of(st.just(0), st.integers(-(2**63), 2**63 - 1)),
    st.lists(tensors(), max_size=4),
    st.lists(input_names, max_size=3),
    st.one_of(st.just(0), st.integers(0, 2**64 - 1)),
    st.one_of(st.just(0), st.integers(0, 2**32 - 1)),
    names,
)  # fmt: skip

DATATYPES = ["FP32", "BYTES", "INT64", "UINT8", "BOOL", "FP16", "BF16", "../FP32", "", "fp32"]


@st.composite
def random_kserve_requests(draw: st.DrawFn) -> kpb.ModelInferRequest:
    request = kpb.ModelInferRequest(
        model_name=draw(model_names),
        model_version=draw(
            st.one_of(st.sampled_from(["", "1", "-1", "0", "1e3", "99" * 20]), names)
        ),
        id=draw(names),
    )
    raw = draw(st.booleans())
    for _ in range(draw(st.integers(0, 3))):
        tensor = request.inputs.add(
            name=draw(input_names),
            datatype=draw(st.one_of(st.sampled_from(DATATYPES), st.text(max_size=8))),
            shape=draw(shapes),
        )
        if raw:
            request.raw_input_contents.append(
                draw(st.one_of(lying_bytes_elements(), st.binary(max_size=64)))
            )
        else:
            contents = draw(st.integers(0, 3))
            if contents == 0:
                tensor.contents.fp32_contents.extend(
                    draw(st.lists(st.floats(width=32), max_size=8))
                )
            elif contents == 1:
                tensor.contents.bytes_contents.extend(
                    draw(st.lists(st.binary(max_size=8), max_size=8))
                )
            elif contents == 2:
                tensor.contents.int64_contents.extend(
                    draw(st.lists(st.integers(-(2**63), 2**63 - 1), max_size=8))
                )
    if draw(st.booleans()) and raw:
        request.raw_input_contents.append(b"\x00" * draw(st.integers(0, 8)))  # one too many
    for name in draw(st.lists(input_names, max_size=2)):
        request.outputs.add(name=name)
    if draw(st.booleans()):
        request.parameters["timeout"].int64_param = draw(st.integers(-(2**63), 2**63 - 1))
        request.parameters["priority"].string_param = draw(names)
    return request


# Near-valid requests: a correct request for a served model with at most one thing wrong, so
# that the fuzzing also reaches validation, batching and execution, not only the decoder.
SIGNATURES: dict[str, list[tuple[str, int, list[int]]]] = {
    "mlp": [("input", 12, [-1, 64])],
    "two_io": [("a", 12, [-1, 4]), ("b", 9, [-1, 4])],
    "fixed": [("input", 12, [3])],
    "id_bytes": [("input", 14, [-1, -1])],
    "id_fp16": [("input", 10, [-1, -1])],
}
KSERVE_TYPES = {12: "FP32", 9: "INT64", 14: "BYTES", 10: "FP16"}
MUTATIONS = ["none", "none", "none", "name", "dtype", "shape", "length", "drop", "dup", "outputs"]


@st.composite
def near_valid_tensors(draw: st.DrawFn) -> tuple[str, list[tensor_pb2.Tensor], str]:
    model = draw(st.sampled_from(sorted(SIGNATURES)))
    batch, n = draw(st.integers(1, 4)), draw(st.integers(0, 5))
    out = []
    for name, dtype, dims_ in SIGNATURES[model]:
        shape = [
            batch if i == 0 and d == -1 else (n if d == -1 else d) for i, d in enumerate(dims_)
        ]
        count = int(np.prod(shape))
        if dtype == 14:
            elements = draw(st.lists(st.binary(max_size=8), min_size=count, max_size=count))
            data = b"".join(struct.pack("<I", len(e)) + e for e in elements)
        elif dtype == 12:
            floats = st.floats(width=32, allow_nan=True, allow_infinity=True)
            data = np.array(draw(st.lists(floats, min_size=count, max_size=count)), "<f4").tobytes()
        else:
            size = count * FIXED_SIZES[dtype]
            data = draw(st.binary(min_size=size, max_size=size))
        out.append(tensor_pb2.Tensor(name=name, dtype=dtype, shape=shape, data=data))  # type: ignore[arg-type]
    mutation = draw(st.sampled_from(MUTATIONS))
    t = out[0]
    if mutation == "name":
        t.name = draw(input_names)
    elif mutation == "dtype":
        t.dtype = draw(st.integers(-2, 40))  # type: ignore[assignment]
    elif mutation == "shape":
        t.shape[draw(st.integers(0, len(t.shape) - 1))] = draw(dims)
    elif mutation == "length":
        t.data = draw(st.one_of(lying_bytes_elements(), st.binary(max_size=64)))
    elif mutation == "drop":
        out.pop()
    elif mutation == "dup":
        out.append(out[0])
    return model, out, mutation


@st.composite
def near_valid_infer_requests(draw: st.DrawFn) -> pb.InferRequest:
    model, inputs, mutation = draw(near_valid_tensors())
    outputs = draw(st.lists(input_names, max_size=2)) if mutation == "outputs" else []
    return pb.InferRequest(model=model, inputs=inputs, outputs=outputs, id=draw(names))


@st.composite
def near_valid_kserve_requests(draw: st.DrawFn) -> kpb.ModelInferRequest:
    model, inputs, mutation = draw(near_valid_tensors())
    request = kpb.ModelInferRequest(model_name=model, id=draw(names))
    for t in inputs:
        datatype = KSERVE_TYPES.get(t.dtype, draw(st.sampled_from(DATATYPES)))
        request.inputs.add(name=t.name, datatype=datatype, shape=t.shape)
        request.raw_input_contents.append(t.data)
    if mutation == "outputs":
        for name in draw(st.lists(input_names, max_size=2)):
            request.outputs.add(name=name)
    return request


infer_requests = st.one_of(near_valid_infer_requests(), random_infer_requests)


def kserve_requests() -> st.SearchStrategy[kpb.ModelInferRequest]:
    return st.one_of(near_valid_kserve_requests(), random_kserve_requests())


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerThread, Path]]:
    base = tmp_path_factory.mktemp("hostile")
    models = {
        "mlp": mlp_model(),
        "two_io": two_io_model(),
        "fixed": identity_model("FP32", (3,)),
        "id_bytes": identity_model("BYTES"),
        "id_fp16": identity_model("FP16"),
    }
    root = make_repo(base / "repo", models)
    with ServerThread(root) as srv:
        yield srv, base


@pytest.fixture(scope="module")
def channels(hostile: tuple[ServerThread, Path]) -> Iterator[tuple[grpc.Channel, grpc.Channel]]:
    srv = hostile[0]
    with (
        grpc.insecure_channel(srv.target) as inference,
        grpc.insecure_channel(srv.management_target) as management,
    ):
        yield inference, management


def snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def code_of(channel: grpc.Channel, method: str, payload: bytes, *, kind: str = "uu") -> Any:
    """Call ``method`` with raw bytes: ``uu`` unary, ``us`` server streaming, ``ss`` bidi."""
    try:
        if kind == "ss":
            list(channel.stream_stream(method)(iter([payload]), timeout=30))
        elif kind == "us":
            list(channel.unary_stream(method)(payload, timeout=30))
        else:
            channel.unary_unary(method)(payload, timeout=30)
    except grpc.RpcError as exc:
        return exc.code(), exc.details()
    return grpc.StatusCode.OK, ""


def assert_precise(result: tuple[grpc.StatusCode, str], what: object) -> None:
    code, details = result
    assert code not in BAD_CODES, f"{code.name} for {what!r}: {details}"


@pytest.fixture(autouse=True)
def no_server_errors(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """A hostile request must not make the server log an error (INTERNAL is logged; so is an
    exception escaping a handler)."""
    caplog.set_level(logging.WARNING)
    yield
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage()[:300] for r in errors]


INFERENCE_METHODS = [
    ("/ferry.v1.Inference/Infer", "uu"),
    ("/ferry.v1.Inference/InferStream", "ss"),
    ("/inference.GRPCInferenceService/ModelInfer", "uu"),
    ("/inference.GRPCInferenceService/ModelStreamInfer", "ss"),
    ("/ferry.v1.Inference/GetModelMetadata", "uu"),
]


@FUZZ
@given(payload=st.binary(min_size=1, max_size=256))
def test_malformed_protobuf_bytes(
    channels: tuple[grpc.Channel, grpc.Channel], payload: bytes
) -> None:
    """gRPC Python would answer a DecodeError with UNKNOWN and log a traceback; the listener's
    guard parses inside the handler and answers INVALID_ARGUMENT "malformed request"."""
    inference, management = channels
    for method, kind in INFERENCE_METHODS:
        result = code_of(inference, method, payload, kind=kind)
        assert_precise(result, (method, payload))
        if result[0] is grpc.StatusCode.INVALID_ARGUMENT and "malformed" in result[1]:
            assert "Error parsing message" in result[1]
    for method, kind in (
        ("/ferry.v1.ModelRepository/LoadModel", "uu"),
        ("/ferry.v1.ModelConversion/UploadModel", "ss"),
        ("/ferry.v1.ModelConversion/GetJob", "uu"),
        ("/ferry.v1.ModelConversion/WatchJob", "us"),
    ):
        assert_precise(code_of(management, method, payload, kind=kind), (method, payload))


def test_a_known_malformed_request_is_invalid_argument(
    channels: tuple[grpc.Channel, grpc.Channel],
) -> None:
    inference, management = channels
    for channel, method, kind in (
        (inference, "/ferry.v1.Inference/Infer", "uu"),
        (inference, "/ferry.v1.Inference/InferStream", "ss"),
        (inference, "/inference.GRPCInferenceService/ModelInfer", "uu"),
        (inference, "/inference.GRPCInferenceService/ModelStreamInfer", "ss"),
        (inference, "/grpc.health.v1.Health/Watch", "us"),
        (management, "/ferry.v1.ModelConversion/UploadModel", "ss"),
        (management, "/ferry.v1.ModelConversion/WatchJob", "us"),
    ):
        code, details = code_of(channel, method, b"\xff\xff\xff\xff", kind=kind)
        assert code is grpc.StatusCode.INVALID_ARGUMENT, (method, details)
        assert details.startswith("malformed request"), details


@FUZZ
@given(request=infer_requests)
def test_hostile_ferry_requests(
    channels: tuple[grpc.Channel, grpc.Channel], request: pb.InferRequest
) -> None:
    inference, _ = channels
    payload = request.SerializeToString()
    assert_precise(code_of(inference, "/ferry.v1.Inference/Infer", payload), request)


@settings(FUZZ, max_examples=40)
@given(requests=st.lists(infer_requests, min_size=1, max_size=6))
def test_hostile_requests_on_a_stream(
    channels: tuple[grpc.Channel, grpc.Channel], requests: list[pb.InferRequest]
) -> None:
    """On a stream each bad request gets its own error answer and the stream survives."""
    inference, _ = channels
    call = inference.stream_stream(
        "/ferry.v1.Inference/InferStream",
        request_serializer=pb.InferRequest.SerializeToString,
        response_deserializer=pb.InferStreamResponse.FromString,
    )
    for i, r in enumerate(requests):
        r.id = str(i)
    answers = list(call(iter(requests), timeout=30))
    assert sorted(a.id for a in answers) == sorted(str(i) for i in range(len(requests)))
    for a in answers:
        if a.HasField("error"):
            assert grpc.StatusCode.INTERNAL.value[0] != a.error.code, a.error.message


@FUZZ
@given(request=kserve_requests())
def test_hostile_open_inference_protocol_requests(
    channels: tuple[grpc.Channel, grpc.Channel], request: kpb.ModelInferRequest
) -> None:
    inference, _ = channels
    payload = request.SerializeToString()
    assert_precise(
        code_of(inference, "/inference.GRPCInferenceService/ModelInfer", payload), request
    )


def test_numeric_edge_values_are_served(channels: tuple[grpc.Channel, grpc.Channel]) -> None:
    """NaN, Inf and empty tensors are data, not attacks: they are served (or refused precisely)."""
    inference, _ = channels
    infer = inference.unary_unary(
        "/ferry.v1.Inference/Infer",
        request_serializer=pb.InferRequest.SerializeToString,
        response_deserializer=pb.InferResponse.FromString,
    )
    special = np.array([[np.nan, np.inf, -np.inf] + [0.0] * 61], np.float32)
    out = infer(build_infer_request("mlp", {"input": special}), timeout=30)
    assert out.outputs[0].shape == [1, 10]
    empty = infer(build_infer_request("id_bytes", {"input": np.empty((1, 0), object)}), timeout=30)
    assert list(empty.outputs[0].shape) == [1, 0]
    with pytest.raises(grpc.RpcError) as info:
        infer(build_infer_request("mlp", {"input": np.zeros((0, 64), np.float32)}), timeout=30)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT


def test_a_shape_longer_than_any_array_is_refused_on_its_length(
    hostile: tuple[ServerThread, Path], channels: tuple[grpc.Channel, grpc.Channel]
) -> None:
    """A shape of 100,000 dims (an 8 MB one held the event loop for 6-7 s: looped over, then
    quoted whole in "cannot reshape to [1, 1, ...]") is refused on its length, in every
    protocol, with a message that says how many dims a tensor may have."""
    inference, _ = channels
    dims = [1] * 100_000
    ferry = pb.InferRequest(
        model="mlp",
        inputs=[tensor_pb2.Tensor(name="input", dtype=tensor_pb2.DATA_TYPE_FP32, shape=dims)],
    )
    raw = kpb.ModelInferRequest(model_name="mlp", raw_input_contents=[bytes(4)])
    raw.inputs.add(name="input", datatype="FP32", shape=dims)
    typed = kpb.ModelInferRequest(model_name="mlp")
    typed.inputs.add(name="input", datatype="FP32", shape=dims).contents.fp32_contents.append(1)
    for method, request in (
        ("/ferry.v1.Inference/Infer", ferry),
        ("/inference.GRPCInferenceService/ModelInfer", raw),
        ("/inference.GRPCInferenceService/ModelInfer", typed),
    ):
        code, details = code_of(inference, method, request.SerializeToString())
        assert code is grpc.StatusCode.INVALID_ARGUMENT, details
        assert "100,000 dimensions" in details and "at most 64" in details, details
    tensor = {"name": "input", "datatype": "FP32", "shape": dims, "data": [1.0]}
    body = json.dumps({"inputs": [tensor]}).encode()
    url = f"http://{hostile[0].http_target}/v2/models/mlp/infer"
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(urllib.request.Request(url, data=body), timeout=30)
    assert refused.value.code == 400
    message = json.load(refused.value)["error"]
    assert "100,000 dimensions" in message and "at most 64" in message, message


MANAGEMENT_CALLS = [
    ("/ferry.v1.ModelRepository/LoadModel", lambda n: rpb.LoadModelRequest(model=n)),
    ("/ferry.v1.ModelRepository/UnloadModel", lambda n: rpb.UnloadModelRequest(model=n)),
    (
        "/inference.GRPCInferenceService/RepositoryModelLoad",
        lambda n: kpb.RepositoryModelLoadRequest(model_name=n),
    ),
    (
        "/inference.GRPCInferenceService/RepositoryModelUnload",
        lambda n: kpb.RepositoryModelUnloadRequest(model_name=n),
    ),
    ("/ferry.v1.ModelConversion/GetModel", lambda n: cpb.GetModelRequest(model=n)),
    (
        "/ferry.v1.ModelConversion/DeleteModelVersion",
        lambda n: cpb.DeleteModelVersionRequest(model=n, version=1),
    ),
    (
        "/ferry.v1.ModelConversion/SetDefaultVersion",
        lambda n: cpb.SetDefaultVersionRequest(model=n, version=1),
    ),
    ("/ferry.v1.ModelConversion/GetJob", lambda n: cpb.GetJobRequest(job_id=n)),
    ("/ferry.v1.ModelConversion/CancelJob", lambda n: cpb.CancelJobRequest(job_id=n)),
    ("/ferry.v1.ModelConversion/ListJobs", lambda n: cpb.ListJobsRequest(model=n)),
    ("/ferry.v1.ModelConversion/Convert", lambda n: cpb.ConvertRequest(upload_id=n, model=n)),
]


@settings(FUZZ, max_examples=60)
@given(name=names.filter(lambda n: n not in MODELS))
def test_hostile_names_on_the_management_listener(
    channels: tuple[grpc.Channel, grpc.Channel], name: str
) -> None:
    _, management = channels
    for method, build in MANAGEMENT_CALLS:
        result = code_of(management, method, build(name).SerializeToString())
        assert_precise(result, (method, name))
        assert result[0] is not grpc.StatusCode.OK or method.endswith(("ListJobs", "Unload")), (
            method,
            name,
        )
    result = code_of(
        management, "/ferry.v1.ModelConversion/WatchJob",
        cpb.WatchJobRequest(job_id=name).SerializeToString(), kind="us",
    )  # fmt: skip
    assert result[0] is not grpc.StatusCode.OK


def test_nothing_escaped_and_the_server_still_serves(
    hostile: tuple[ServerThread, Path], channels: tuple[grpc.Channel, grpc.Channel]
) -> None:
    """Runs last in this module: every hostile name above carried MARK."""
    srv, base = hostile
    tree = base.parent.parent  # this session's whole pytest temporary tree
    leaked = [p for p in tree.rglob(f"*{MARK}*")]
    leaked += [p for p in (Path("/tmp"), Path.cwd(), Path.home()) if (p / MARK).exists()]
    assert not leaked
    repo = srv.settings.repository
    assert sorted(p.name for p in repo.iterdir()) == sorted(MODELS)
    assert all((repo / m / "1" / "model.onnx").is_file() for m in MODELS)
    inference, _ = channels
    infer = inference.unary_unary(
        "/ferry.v1.Inference/Infer",
        request_serializer=pb.InferRequest.SerializeToString,
        response_deserializer=pb.InferResponse.FromString,
    )
    answer = infer(build_infer_request("fixed", {"input": np.ones(3, np.float32)}), timeout=30)
    assert np.frombuffer(answer.outputs[0].data, np.float32).tolist() == [1.0, 1.0, 1.0]


class _Payload:
    """Unpickling this calls ``open(marker, "w")``: the marker file is the proof it ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (self.marker, "w"))


def _payload_pickle(marker: Path) -> bytes:
    data = pickle.dumps({"0.weight": _Payload(marker)}, protocol=2)
    ops = {op.name for op, _arg, _pos in pickletools.genops(data)}
    assert {"GLOBAL", "REDUCE"} <= ops  # a real code-execution payload (inspected, never loaded)
    return data


def _torch_style_zip(members: dict[str, bytes], bomb: int = 0) -> bytes:
    """The layout torch.save writes (``<name>/data.pkl``, ``version``, ``byteorder``, stored
    records), plus optionally a deflated member that expands to ``bomb`` bytes."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        zf.writestr("archive/version", b"3\n")
        zf.writestr("archive/byteorder", b"little")
        if bomb:
            info = zipfile.ZipInfo("archive/data/0")
            info.compress_type = zipfile.ZIP_DEFLATED
            with zf.open(info, "w", force_zip64=True) as fh:
                block = bytes(1 << 20)
                for _ in range(bomb >> 20):
                    fh.write(block)
    return buf.getvalue()


def _upload(stub: cpb_grpc.ModelConversionStub, data: bytes) -> cpb.Upload:
    header = cpb.UploadHeader(
        model="victim", format=cpb.SOURCE_FORMAT_STATE_DICT, architecture="seed"
    )
    chunks = [data[i : i + (1 << 20)] for i in range(0, len(data), 1 << 20)]
    requests = [cpb.UploadModelRequest(header=header)]
    requests += [cpb.UploadModelRequest(chunk=c) for c in chunks]
    return stub.UploadModel(iter(requests), timeout=60)  # type: ignore[no-any-return]


def _finish(stub: cpb_grpc.ModelConversionStub, job_id: str) -> cpb.Job:
    for _event in stub.WatchJob(cpb.WatchJobRequest(job_id=job_id), timeout=240):
        pass
    return stub.GetJob(cpb.GetJobRequest(job_id=job_id), timeout=30)  # type: ignore[no-any-return]


def test_pickle_payloads_and_hostile_archives_never_run_or_escape(tmp_path: Path) -> None:
    """The conversion upload takes torch's state_dict zip, which holds a pickle. The server never
    unpickles; the child loads with ``torch.load(weights_only=True)``, which refuses globals
    such as ``open``. Ferry extracts no archive: a ``../`` member name and a zip bomb are bytes
    in one stored file, read (or not) by torch's zip reader in a memory-limited child."""
    marker = tmp_path / f"{MARK}-pickle-ran"
    root = make_repo(tmp_path / "repo", {"mlp": mlp_model()})
    payload = _payload_pickle(marker)
    with (
        ServerThread(root, max_concurrent_conversions=2) as srv,
        grpc.insecure_channel(srv.management_target) as channel,
    ):
        stub = cpb_grpc.ModelConversionStub(channel)
        with pytest.raises(grpc.RpcError) as bare:
            _upload(stub, payload)  # a bare pickle is refused at upload, never loaded
        assert bare.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "pickle" in bare.value.details()
        archives = [
            _torch_style_zip({"archive/data.pkl": payload}, bomb=128 << 20),
            _torch_style_zip({f"../../{MARK}/data.pkl": payload, "archive/data.pkl": payload}),
        ]
        jobs = [
            stub.Convert(cpb.ConvertRequest(upload_id=_upload(stub, a).upload_id), timeout=60)
            for a in archives
        ]
        finished = [_finish(stub, j.job_id) for j in jobs]
    for job in finished:
        assert job.state == cpb.JOB_STATE_FAILED, job
        assert job.error.code != grpc.StatusCode.INTERNAL.value[0] or "crash" in job.error.message
    assert not marker.exists(), "the pickle payload ran"
    assert not list(tmp_path.parent.rglob(f"*{MARK}*"))
    victim = root / "victim"  # a failed first conversion may leave its empty model folder
    assert not victim.exists() or not any(victim.iterdir())
