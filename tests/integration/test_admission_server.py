"""Admission at the door, on a real server, both protocols, unary and streaming.

An ``ExecutionGate`` holds the single instance busy and requests queue behind it (a state the test
establishes, not a timing); the version's measured cost is then set to 10 s per request, as a slow
model's would be, so which request can finish before its deadline is arithmetic:
one running (half of it counted: 5 s) + one queued (10 s) + its own execution (10 s) = 25 s.
A request with a 20 s deadline is refused at once with RESOURCE_EXHAUSTED and why; one with 60 s
is admitted; a high-priority one with 20 s is judged by the queue ahead of it (5 + 10 = 15 s) and
admitted. No refused request ever reaches the model.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
from helpers import ExecutionGate, StartServer, make_repo, stats, wait_for, write_config
from onnx import TensorProto, helper
from tritonclient.grpc import service_pb2 as kpb
from tritonclient.grpc import service_pb2_grpc as kgrpc

from ferry.client import (
    DeadlineExceededError,
    InferenceClient,
    InferResult,
    RetryPolicy,
    ServerOverloadedError,
)
from ferry.client._errors import ERROR_KIND_METADATA
from ferry.server.batching.service_time import ServiceTime
from ferry.server.examples import mlp_model

COST_S = 10.0
REFUSED_S = 20.0  # < 25 s predicted at default priority
ADMITTED_S = 60.0
X = np.ones((1, 64), np.float32)


def _oip_request(timeout_s: float) -> kpb.ModelInferRequest:
    req = kpb.ModelInferRequest(model_name="mlp", id="oip")
    t = req.inputs.add()
    t.name, t.datatype = "input", "FP32"
    t.shape.extend(X.shape)
    req.raw_input_contents.append(X.tobytes())
    req.parameters["timeout"].int64_param = int(timeout_s * 1e6)
    return req


@pytest.fixture
def busy(tmp_path: Path, start_server: StartServer):  # type: ignore[no-untyped-def]
    """A server whose one instance is held with one request queued behind it, and whose
    measured cost is 10 s per request; yields (server, client, gate, pool, futures)."""
    root = make_repo(tmp_path / "repo", {"mlp": mlp_model()})
    write_config(
        root,
        "mlp",
        {"batching": {"max_batch_size": 0, "default_priority": 5}, "instances": {"count": 1}},
    )
    srv = start_server(root)
    assert srv.app is not None
    loaded = srv.app.registry.get("mlp", 1)
    estimate = ServiceTime()
    estimate.observe(1, COST_S)
    loaded.batcher.service_time = estimate
    with (
        InferenceClient(srv.target, timeout=ADMITTED_S, retry=RetryPolicy.disabled()) as client,
        ThreadPoolExecutor(8) as pool,
        ExecutionGate(srv, "mlp") as gate,
    ):
        futures: list[Future[InferResult]] = [pool.submit(client.infer, "mlp", {"input": X})]
        gate.wait_entered()
        futures.append(pool.submit(client.infer, "mlp", {"input": X}))
        wait_for(lambda: stats(client, "mlp").queue_depth == 1, "one request queued")
        yield srv, client, gate, pool, futures
        gate.release()
        for f in futures:
            assert f.result(ADMITTED_S)["logits"].shape == (1, 10)


def test_refused_at_arrival_with_why_both_protocols_unary_and_stream(busy) -> None:  # type: ignore[no-untyped-def]
    srv, client, gate, _pool, _futures = busy
    # ferry.v1 unary: the SDK's retryable overload error, with the prediction in the message.
    with pytest.raises(ServerOverloadedError) as refused:
        client.infer("mlp", {"input": X}, timeout=REFUSED_S)
    assert refused.value.retryable
    assert "predicted wait 25000.0 ms" in str(refused.value)
    assert "remaining" in str(refused.value)
    # ferry.v1 stream: the request's own timeout; the answer is the same error, stream open.
    with client.stream("mlp") as stream:
        rid = stream.submit({"input": X}, timeout=REFUSED_S)
        ((got_id, outcome),) = list(stream.results())
    assert got_id == rid and isinstance(outcome, ServerOverloadedError)
    assert "predicted wait" in str(outcome)
    with grpc.insecure_channel(srv.target) as channel:
        stub = kgrpc.GRPCInferenceServiceStub(channel)
        # Open Inference Protocol unary: RESOURCE_EXHAUSTED, kind QUEUE_FULL.
        with pytest.raises(grpc.RpcError) as rpc:
            stub.ModelInfer(_oip_request(REFUSED_S), timeout=REFUSED_S)
        assert rpc.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "predicted wait 25000.0 ms" in rpc.value.details()
        kinds = dict(rpc.value.trailing_metadata() or ())
        assert kinds[ERROR_KIND_METADATA] == "QUEUE_FULL"
        # Open Inference Protocol stream: an error response, the code leading its text.
        (answer,) = list(stub.ModelStreamInfer(iter([_oip_request(REFUSED_S)]), timeout=30))
    assert answer.error_message.startswith("[StatusCode.RESOURCE_EXHAUSTED]")
    assert "predicted wait" in answer.error_message
    s = stats(client, "mlp")
    assert s.queue_depth == 1
    assert gate.calls == 1  # only the held request reached the model


def test_admitted_when_it_fits_and_priority_is_judged_by_the_queue_ahead(busy) -> None:  # type: ignore[no-untyped-def]
    srv, client, gate, pool, futures = busy
    # Same queue, a deadline long enough: admitted (queued behind the others).
    futures.append(pool.submit(client.infer, "mlp", {"input": X}, timeout=ADMITTED_S))
    wait_for(lambda: stats(client, "mlp").queue_depth == 2, "the long-deadline request queued")
    # 20 s at the default priority (5) is refused; at priority 1 nothing is ahead of it but the
    # running request: 5 + 10 = 15 s < 20 s, admitted.
    with pytest.raises(ServerOverloadedError):
        client.infer("mlp", {"input": X}, timeout=REFUSED_S)
    high = pool.submit(client.infer, "mlp", {"input": X}, timeout=REFUSED_S, priority=1)
    wait_for(lambda: stats(client, "mlp").queue_depth == 3, "the high-priority request queued")
    with grpc.insecure_channel(srv.target) as channel:
        stub = kgrpc.GRPCInferenceServiceStub(channel)
        # 30 s: at the default priority 3 queued are ahead (5 + 30 + 10 = 45 s): refused; at
        # priority 1 only the other high-priority one is (5 + 10 + 10 = 25 s): admitted.
        low = _oip_request(30.0)
        with pytest.raises(grpc.RpcError) as rpc:
            stub.ModelInfer(low, timeout=30.0)
        assert rpc.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        oip = _oip_request(30.0)
        oip.parameters["priority"].int64_param = 1  # the OIP request's own priority
        answer = stub.ModelInfer.future(oip, timeout=ADMITTED_S)
        wait_for(lambda: stats(client, "mlp").queue_depth == 4, "the OIP high-priority queued")
        gate.release()
        assert answer.result(ADMITTED_S).outputs[0].name == "logits"
    assert high.result(ADMITTED_S)["logits"].shape == (1, 10)
    for f in futures:
        assert f.result(ADMITTED_S)["logits"].shape == (1, 10)
    s = stats(client, "mlp")
    assert gate.calls == 5  # held, queued, long deadline, two high-priority: nothing refused ran
    assert s.success.count == 5


def test_a_deadline_shorter_than_one_run_is_deadline_exceeded_even_behind_a_queue(busy) -> None:  # type: ignore[no-untyped-def]
    """A 5 s deadline for a request whose own run takes 10 s: no wait, retry or other replica
    could finish it, queue or not. Behind the held and the queued request it was refused
    RESOURCE_EXHAUSTED ('retry with backoff'), the SDK's retryable overload error, and counted
    as a queue-full rejection; it is DEADLINE_EXCEEDED, as it is with nothing ahead of it."""
    srv, client, gate, _pool, _futures = busy
    short = 5.0  # < the 10 s of its own run
    with pytest.raises(DeadlineExceededError) as refused:
        client.infer("mlp", {"input": X}, timeout=short)
    assert "one run takes 10000.0 ms" in str(refused.value)
    assert "give it a longer deadline" in str(refused.value)
    with grpc.insecure_channel(srv.target) as channel:
        stub = kgrpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as rpc:
            stub.ModelInfer(_oip_request(short), timeout=30.0)
        assert rpc.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        assert "give it a longer deadline" in rpc.value.details()
    body = json.dumps(
        {
            "inputs": [
                {"name": "input", "datatype": "FP32", "shape": [1, 64], "data": X.ravel().tolist()}
            ],
            "parameters": {"timeout": int(short * 1e6)},
        }
    ).encode()
    req = urllib.request.Request(
        f"http://{srv.http_target}/v2/models/mlp/infer",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as http:
        urllib.request.urlopen(req, timeout=30)
    assert http.value.headers["ferry-error"] == "DEADLINE_EXCEEDED"
    assert "give it a longer deadline" in json.loads(http.value.read())["error"]
    s = stats(client, "mlp")
    assert s.queue_depth == 1
    assert s.rejected_count == 0  # not overload: ferry_rejected_total stays as it was
    assert gate.calls == 1


def test_a_refusal_counts_only_the_requests_ahead_of_it(busy) -> None:  # type: ignore[no-untyped-def]
    """A priority-1 request with 12 s: nothing of its priority is queued, so the prediction is
    half the running 10 s plus its own 10 s (15 s), refused. The message said '(1 queued, 1
    running)': the queued one is at the default priority, behind it, and not in the
    prediction. It now says what the prediction counted."""
    _srv, client, _gate, _pool, _futures = busy
    with pytest.raises(ServerOverloadedError) as refused:
        client.infer("mlp", {"input": X}, timeout=12.0, priority=1)
    assert "predicted wait 15000.0 ms (0 queued ahead of it, 1 running)" in str(refused.value)
    with pytest.raises(ServerOverloadedError) as low:
        client.infer("mlp", {"input": X}, timeout=REFUSED_S)
    assert "predicted wait 25000.0 ms (1 queued ahead of it, 1 running)" in str(low.value)


def _relu_model() -> onnx.ModelProto:
    """x [batch, n] -> Relu: requests of other lengths n have other batch keys."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "n"])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_head_expired_at_dispatch_does_not_let_a_lower_priority_run_first(
    tmp_path: Path, start_server: StartServer
) -> None:
    """a1 (length 2, priority 1) heads the queue, b1 (length 3, priority 1) is next, a2
    (length 2, priority 5) last. When the instance frees, a1 cannot finish in time (10 s a
    row, 9 s left): it expires, and the batch it chose was still its length's, so a2 ran
    ahead of b1. Now b1 runs first."""
    root = make_repo(tmp_path / "repo", {"relu": _relu_model()})
    write_config(root, "relu", {"batching": {"max_batch_size": 8}, "instances": {"count": 1}})
    srv = start_server(root)
    assert srv.app is not None
    batcher = srv.app.registry.get("relu", 1).batcher
    with (
        InferenceClient(srv.target, timeout=ADMITTED_S, retry=RetryPolicy.disabled()) as client,
        ThreadPoolExecutor(8) as pool,
        ExecutionGate(srv, "relu") as gate,
    ):
        session = gate.session
        gated = session.run
        order: list[int] = []

        def recorded(feeds: dict[str, np.ndarray], names: list[str] | None = None) -> object:
            order.append(feeds["x"].shape[1])
            return gated(feeds, names)

        session.run = recorded  # type: ignore[method-assign]
        two, three = np.ones((1, 2), np.float32), np.ones((1, 3), np.float32)
        held = pool.submit(client.infer, "relu", {"x": two})
        gate.wait_entered()
        # Admitted before anything was measured; then a measurement of 10 s a row (the
        # per-element line set slower, so rows decide).
        a1 = pool.submit(client.infer, "relu", {"x": two}, timeout=9.0, priority=1)
        wait_for(lambda: stats(client, "relu").queue_depth == 1, "a1 queued")
        rows, elements = ServiceTime(), ServiceTime()
        for _ in range(40):
            for n in (1, 2):
                rows.observe(n, COST_S * n)
                elements.observe(n, 2 * COST_S * n)
        batcher.service_time = rows
        batcher._cost_time = elements
        b1 = pool.submit(client.infer, "relu", {"x": three}, priority=1)
        wait_for(lambda: stats(client, "relu").queue_depth == 2, "b1 queued")
        a2 = pool.submit(client.infer, "relu", {"x": two}, priority=5)
        wait_for(lambda: stats(client, "relu").queue_depth == 3, "a2 queued")
        gate.release()
        for f in (held, b1, a2):
            assert f.result(ADMITTED_S)["y"].shape[0] == 1
        with pytest.raises(DeadlineExceededError):
            a1.result(ADMITTED_S)
    assert order == [2, 3, 2]  # held, b1, a2; a1 never ran
