"""Every failure a client can cause or meet ends with the right status, kind and message, and the
server's statistics show what happened to the request (rejected, expired, never executed).

Overload, deadlines and cancellation are staged with an ``ExecutionGate`` holding the only
instance busy, so "queued" is a state the server reports before the test acts, not a timing.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from helpers import ExecutionGate, StartServer, make_repo, stats, wait_for, write_config
from serverutil import ServerThread

from ferry.client import (
    DeadlineExceededError,
    InferenceClient,
    InvalidInputError,
    ModelNotFoundError,
    ModelNotReadyError,
    RetryPolicy,
    ServerOverloadedError,
)
from ferry.client._errors import ERROR_KIND_METADATA
from ferry.client._requests import build_infer_request
from ferry.codec import encode_tensor
from ferry.proto.v1 import inference_pb2 as pb
from ferry.proto.v1 import inference_pb2_grpc as pb_grpc
from ferry.proto.v1 import tensor_pb2
from ferry.server.core.types import InferenceRequest, Limits
from ferry.server.examples import identity_model, mlp_model, two_io_model
from ferry.server.grpc._base import client_remaining
from ferry.server.http.tensors import HttpInfer

ONE = {"input": np.ones((1, 64), np.float32)}


@pytest.fixture
def stub(server: ServerThread) -> Iterator[pb_grpc.InferenceStub]:
    """The generated stub, for requests the SDK would never build."""
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.InferenceStub(channel)


def _raw_infer(stub: pb_grpc.InferenceStub, request: pb.InferRequest) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        stub.Infer(request, timeout=30)
    return info.value


def _kind(error: grpc.RpcError) -> str:
    return dict(error.trailing_metadata() or ()).get(ERROR_KIND_METADATA, "")  # type: ignore[attr-defined]


# ---- overload, deadlines, cancellation ------------------------------------------------------


def _gated_mlp(tmp_path: Path, start_server: StartServer, **batching: object) -> ServerThread:
    root = make_repo(tmp_path / "repo", {"mlp": mlp_model()})
    write_config(root, "mlp", {"batching": batching, "instances": {"count": 1}})
    return start_server(root)


def test_full_queue_rejects_at_once(tmp_path: Path, start_server: StartServer) -> None:
    srv = _gated_mlp(tmp_path, start_server, max_queue_size=2)
    with (
        InferenceClient(srv.target, timeout=60) as client,
        ThreadPoolExecutor(4) as pool,
        ExecutionGate(srv, "mlp") as gate,
    ):
        held = pool.submit(client.infer, "mlp", ONE)
        gate.wait_entered()
        queued = [pool.submit(client.infer, "mlp", ONE) for _ in range(2)]
        wait_for(lambda: stats(client, "mlp").queue_depth == 2, "two requests queued")
        # One attempt, so the count below is this call's (the SDK retries overload by default).
        with (
            InferenceClient(srv.target, timeout=60, retry=RetryPolicy.disabled()) as once,
            pytest.raises(ServerOverloadedError) as info,
        ):
            once.infer("mlp", ONE)
        assert info.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert info.value.kind == "QUEUE_FULL"
        assert "max_queue_size=2" in info.value.message
        assert info.value.retryable
        assert stats(client, "mlp").rejected_count == 1
        gate.release()
        for f in [held, *queued]:
            assert f.result(60)["logits"].shape == (1, 10)
        s = stats(client, "mlp")
    assert s.inference_count == 3
    assert s.rejected_count == 1


def test_deadline_expires_while_queued_and_the_request_never_runs(
    tmp_path: Path, start_server: StartServer
) -> None:
    """``timeout_us`` in the request shortens the budget: the server itself expires the queued
    request, answers DEADLINE_EXCEEDED and counts it; it never reaches the model."""
    srv = _gated_mlp(tmp_path, start_server)
    with (
        InferenceClient(srv.target, timeout=60) as client,
        ThreadPoolExecutor(2) as pool,
        grpc.insecure_channel(srv.target) as channel,
        ExecutionGate(srv, "mlp") as gate,
    ):
        held = pool.submit(client.infer, "mlp", ONE)
        gate.wait_entered()
        request = build_infer_request("mlp", ONE)
        request.timeout_us = 200_000
        error = _raw_infer(pb_grpc.InferenceStub(channel), request)
        assert error.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        assert _kind(error) == "DEADLINE_EXCEEDED"
        assert "queued" in (error.details() or "")
        s = stats(client, "mlp")
        assert (s.expired_count, s.queue_depth, s.fail.count) == (1, 0, 1)
        gate.release()
        held.result(60)
        s = stats(client, "mlp")
    assert gate.calls == 1
    assert (s.execution_count, s.inference_count, s.success.count) == (1, 1, 1)


def test_default_timeout_from_config_expires_queued_requests(
    tmp_path: Path, start_server: StartServer
) -> None:
    srv = _gated_mlp(tmp_path, start_server, default_timeout_ms=50)
    with (
        InferenceClient(srv.target, timeout=60) as client,
        ThreadPoolExecutor(2) as pool,
        ExecutionGate(srv, "mlp") as gate,
    ):
        assert client.model_metadata("mlp").batching.default_timeout == pytest.approx(0.05)
        held = pool.submit(client.infer, "mlp", ONE)
        gate.wait_entered()
        with pytest.raises(DeadlineExceededError) as info:
            client.infer("mlp", ONE)
        assert info.value.kind == "DEADLINE_EXCEEDED"
        assert stats(client, "mlp").expired_count == 1
        gate.release()
        held.result(60)
    assert gate.calls == 1


def test_call_deadline_while_queued_raises_and_never_runs(
    tmp_path: Path, start_server: StartServer
) -> None:
    """The SDK's own timeout is the call's gRPC deadline: whichever side notices first, the
    caller gets DeadlineExceededError and the queued request leaves the queue unexecuted."""
    srv = _gated_mlp(tmp_path, start_server)
    with (
        InferenceClient(srv.target, timeout=60) as client,
        ThreadPoolExecutor(2) as pool,
        ExecutionGate(srv, "mlp") as gate,
    ):
        held = pool.submit(client.infer, "mlp", ONE)
        gate.wait_entered()
        with pytest.raises(DeadlineExceededError) as info:
            client.infer("mlp", ONE, timeout=0.1)
        assert info.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
        wait_for(lambda: stats(client, "mlp").queue_depth == 0, "the expired request to leave")
        gate.release()
        held.result(60)
        s = stats(client, "mlp")
    assert gate.calls == 1
    assert s.execution_count == 1


@pytest.mark.parametrize(("header", "client_at_most"), [(0.301, 0.3), (5.01, 5.0), (151.0, 150.0)])
def test_the_rounding_of_grpc_timeout_headers_is_taken_off(
    header: float, client_at_most: float
) -> None:
    """gRPC's C core rounds a call's deadline up to a millisecond, then its grpc-timeout header up
    to three significant figures: what the server reads is at most one unit and 1 ms over."""
    assert client_remaining(header) <= client_at_most
    assert client_remaining(header) >= client_at_most - header / 50


def test_a_call_deadline_never_reaches_the_queue_later_than_the_client_gave_it(
    tmp_path: Path, start_server: StartServer
) -> None:
    """An SDK call with a 5 s timeout arrived with 5.009 s remaining (150 s: 151 s), by grpc's
    rounding of the grpc-timeout header: the server admitted, queued and ran work its client had
    given up on. The deadline that reaches the batcher leaves at most what the client gave."""
    srv = _gated_mlp(tmp_path, start_server)
    assert srv.app is not None
    batcher = srv.app.registry.get("mlp", 1).batcher
    submit = batcher.submit
    remaining: list[float] = []

    async def spy(item: object, *, deadline: float | None = None, **kw: object) -> object:
        assert deadline is not None
        remaining.append(deadline - time.monotonic())
        return await submit(item, deadline=deadline, **kw)  # type: ignore[arg-type]

    batcher.submit = spy  # type: ignore[method-assign]
    timeouts = (1.0, 5.0, 10.0, 150.0)
    with InferenceClient(srv.target) as client:
        for timeout in timeouts:
            client.infer("mlp", ONE, timeout=timeout)
    assert len(remaining) == len(timeouts)
    over = [(t, r) for t, r in zip(timeouts, remaining, strict=True) if r > t]
    assert not over, f"(timeout, remaining at the queue) over the client's: {over}"


def test_a_request_timeout_counts_from_its_arrival(
    tmp_path: Path, start_server: StartServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The request's own timeout (the OIP ``timeout`` parameter here) counted from after its
    body was decoded: the server's deadline was later than its client's by the decoding (a JSON
    body, thousands of strings). It counts from the request's arrival, before the decoding."""
    srv = _gated_mlp(tmp_path, start_server)
    assert srv.app is not None
    batcher = srv.app.registry.get("mlp", 1).batcher
    submit, decode = batcher.submit, HttpInfer.decode
    decoded: list[float] = []
    deadlines: list[float] = []

    def decoding(wire: HttpInfer, limits: Limits) -> InferenceRequest:
        request = decode(wire, limits)
        decoded.append(time.monotonic())
        return request

    async def queued(item: object, *, deadline: float | None = None, **kw: object) -> object:
        assert deadline is not None
        deadlines.append(deadline)
        return await submit(item, deadline=deadline, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(HttpInfer, "decode", decoding)
    batcher.submit = queued  # type: ignore[method-assign]
    timeout_s = 30.0
    body = json.dumps(
        {
            "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [0.5] * 64}],
            "parameters": {"timeout": int(timeout_s * 1e6)},
        }
    ).encode()
    req = urllib.request.Request(
        f"http://{srv.http_target}/v2/models/mlp/infer",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=60) as answer:
        assert answer.status == 200
    assert len(decoded) == len(deadlines) == 1
    assert deadlines[0] < decoded[0] + timeout_s


def test_cancelled_call_leaves_the_queue_and_never_runs(
    tmp_path: Path, start_server: StartServer
) -> None:
    srv = _gated_mlp(tmp_path, start_server)
    with (
        InferenceClient(srv.target, timeout=60) as client,
        ThreadPoolExecutor(2) as pool,
        grpc.insecure_channel(srv.target) as channel,
        ExecutionGate(srv, "mlp") as gate,
    ):
        held = pool.submit(client.infer, "mlp", ONE)
        gate.wait_entered()
        call = pb_grpc.InferenceStub(channel).Infer.future(build_infer_request("mlp", ONE))
        wait_for(lambda: stats(client, "mlp").queue_depth == 1, "the call to be queued")
        assert call.cancel()
        wait_for(lambda: stats(client, "mlp").queue_depth == 0, "the cancelled call to leave")
        gate.release()
        held.result(60)
        s = stats(client, "mlp")
    assert call.cancelled()
    assert gate.calls == 1
    assert (s.execution_count, s.inference_count) == (1, 1)
    assert (s.expired_count, s.rejected_count) == (0, 0)


# ---- invalid requests -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "inputs", "fragments"),
    [
        ("mlp", {"input": np.ones((2, 64), np.float64)}, ["'input'", "FP32", "FP64"]),
        ("mlp", {"input": np.ones((2, 63), np.float32)}, ["'input'", "[?, 64]", "[2, 63]"]),
        ("mlp", {"input": np.ones(64, np.float32)}, ["'input'", "[?, 64]", "[64]"]),
        ("mlp", {"x": np.ones((2, 64), np.float32)}, ["missing inputs ['input']", "'x'"]),
        (
            "mlp",
            {"input": np.ones((1, 64), np.float32), "extra": np.ones(1, np.float32)},
            ["unexpected inputs ['extra']"],
        ),
        (
            "two_io",
            {"a": np.ones((2, 4), np.float32), "b": np.ones((3, 4), np.int64)},
            ["batch dimension", "'b'", "2 vs 3"],
        ),
        ("two_io", {"a": np.ones((1, 4), np.float32)}, ["missing inputs ['b']"]),
        ("mlp", {"input": np.ones((33, 64), np.float32)}, ["batch size 33", "max_batch_size 32"]),
        ("mlp", {"input": np.ones((0, 64), np.float32)}, ["at least 1", "got 0"]),
        ("fixed", {"input": np.ones((1, 3), np.float32)}, ["'input'", "[3]", "[1, 3]"]),
    ],
)
def test_invalid_inputs_name_the_input_and_what_was_expected(
    client: InferenceClient, model: str, inputs: dict[str, np.ndarray], fragments: list[str]
) -> None:
    with pytest.raises(InvalidInputError) as info:
        client.infer(model, inputs)
    assert info.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.kind == "INVALID_INPUT"
    for fragment in fragments:
        assert fragment in info.value.message


def test_wrong_byte_length(stub: pb_grpc.InferenceStub) -> None:
    tensor = tensor_pb2.Tensor(
        name="input", dtype=tensor_pb2.DATA_TYPE_FP32, shape=[2, 64], data=b"\0" * 500
    )
    error = _raw_infer(stub, pb.InferRequest(model="mlp", inputs=[tensor]))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert _kind(error) == "INVALID_ARGUMENT"
    details = error.details() or ""
    for fragment in ("'input'", "FP32", "[2, 64]", "512 bytes", "got 500"):
        assert fragment in details


@pytest.mark.parametrize(
    ("tensor", "fragments"),
    [
        (
            tensor_pb2.Tensor(name="input", dtype=99, shape=[1, 64], data=b"\0" * 256),  # type: ignore[arg-type]
            ["unknown DataType 99"],
        ),
        (
            tensor_pb2.Tensor(
                name="input", dtype=tensor_pb2.DATA_TYPE_FP32, shape=[-1, 64], data=b""
            ),
            ["'input'", "negative dimension"],
        ),
    ],
)
def test_malformed_tensors(
    stub: pb_grpc.InferenceStub, tensor: tensor_pb2.Tensor, fragments: list[str]
) -> None:
    error = _raw_infer(stub, pb.InferRequest(model="mlp", inputs=[tensor]))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    for fragment in fragments:
        assert fragment in (error.details() or "")


def test_duplicate_input_and_unknown_output(stub: pb_grpc.InferenceStub) -> None:
    t = encode_tensor("input", np.ones((1, 64), np.float32))
    error = _raw_infer(stub, pb.InferRequest(model="mlp", inputs=[t, t]))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "'input' appears twice" in (error.details() or "")
    error = _raw_infer(stub, pb.InferRequest(model="mlp", inputs=[t], outputs=["nope"]))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown outputs ['nope']" in (error.details() or "")
    assert "['logits']" in (error.details() or "")


def test_bytes_inputs_must_be_utf8(tmp_path: Path, start_server: StartServer) -> None:
    """onnxruntime string tensors hold text: non-UTF-8 BYTES are the request's error, and valid
    UTF-8 (not only ASCII) round-trips exactly."""
    srv = start_server(make_repo(tmp_path / "repo", {"text": identity_model("BYTES")}))
    with InferenceClient(srv.target, timeout=30) as client:
        text = np.array([["héllo".encode(), b"", "日本".encode()]], dtype=object)
        assert client.infer("text", {"input": text})["output"].tolist() == text.tolist()
        bad = np.array([[b"ok", b"\xff\xfe"]], dtype=object)
        with pytest.raises(InvalidInputError) as info:
            client.infer("text", {"input": bad})
    assert "'input'" in info.value.message
    assert "element 1 is not valid UTF-8" in info.value.message


# ---- unknown and broken models -------------------------------------------------------------


def test_unknown_model_or_version_is_not_found(client: InferenceClient) -> None:
    with pytest.raises(ModelNotFoundError) as info:
        client.infer("nope", ONE)
    assert info.value.code is grpc.StatusCode.NOT_FOUND
    assert info.value.kind == "MODEL_NOT_FOUND"
    assert "'nope'" in info.value.message
    with pytest.raises(ModelNotFoundError) as info:
        client.infer("mlp", ONE, version=7)
    assert info.value.kind == "VERSION_NOT_FOUND"
    assert "version 7" in info.value.message
    for call in (
        lambda: client.model_metadata("nope"),
        lambda: client.model_metadata("mlp", version=7),
        lambda: client.list_models("nope"),
        lambda: client.statistics("nope"),
        lambda: client.statistics("mlp", version=7),
    ):
        with pytest.raises(ModelNotFoundError):
            call()


def test_corrupt_model_fails_alone(tmp_path: Path, start_server: StartServer) -> None:
    root = make_repo(tmp_path / "repo", {"mlp": mlp_model(), "two_io": two_io_model()})
    (root / "broken" / "1").mkdir(parents=True)
    (root / "broken" / "1" / "model.onnx").write_bytes(b"this is not an onnx model\x00\xff")
    srv = start_server(root)
    with InferenceClient(srv.target, timeout=30) as client:
        states = {(m.name, m.version): m for m in client.list_models()}
        assert {k: m.state for k, m in states.items()} == {
            ("broken", 1): "FAILED",
            ("mlp", 1): "READY",
            ("two_io", 1): "READY",
        }
        assert states[("broken", 1)].reason
        assert "model.onnx" in states[("broken", 1)].reason or "Protobuf" in (
            states[("broken", 1)].reason
        )
        with pytest.raises(ModelNotReadyError) as info:
            client.infer("broken", ONE)
        assert info.value.code is grpc.StatusCode.UNAVAILABLE
        assert "FAILED" in info.value.message
        assert client.infer("mlp", ONE)["logits"].shape == (1, 10)
        assert client.ready()  # the failed model does not take the others down
        assert not client.ready("broken")
        assert client.ready("mlp")
