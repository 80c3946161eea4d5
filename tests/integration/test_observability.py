"""What the server says about itself: reflection, Prometheus metrics, model listings, metadata
and statistics."""

from __future__ import annotations

import http.client
import logging
import re
import socket
import struct
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from helpers import make_repo, scrape, wait_for
from serverutil import ServerThread

from ferry.client import InferenceClient, InvalidInputError, ModelNotFoundError, TensorInfo
from ferry.server.core.repository import ModelRepository
from ferry.server.examples import seed_model, write_model

X = {"input": np.ones((3, 64), np.float32)}


def _sample(text: str, name: str, **labels: str) -> float | None:
    """The value of one Prometheus sample, matched by name and a subset of its labels."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_reflection_lists_the_inference_service(server: ServerThread) -> None:
    with grpc.insecure_channel(server.target) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        assert {"ferry.v1.Inference", "grpc.health.v1.Health"} <= services
        assert "ferry.v1.ModelRepository" not in services  # management listener only
        pool = DescriptorPool(database)
        infer = pool.FindServiceByName("ferry.v1.Inference").FindMethodByName("Infer")
        assert infer.input_type.full_name == "ferry.v1.InferRequest"
    with grpc.insecure_channel(server.management_target) as channel:
        assert "ferry.v1.ModelRepository" in set(
            ProtoReflectionDescriptorDatabase(channel).get_services()
        )


def test_metrics_endpoint(server: ServerThread, client: InferenceClient) -> None:
    assert server.app is not None
    for _ in range(3):
        client.infer("mlp", X)
    with pytest.raises(InvalidInputError):
        client.infer("mlp", {"input": np.ones((3, 64), np.float64)})
    text = scrape(server.app.metrics_port)
    assert "ferry_requests" in text
    assert "ferry_batch_size" in text
    mlp = {"model": "mlp", "version": "1"}
    assert _sample(text, "ferry_requests_total", code="OK", **mlp) == 3
    # The refused request is counted once, by the core, against the version it was resolved to.
    assert _sample(text, "ferry_requests_total", code="INVALID_ARGUMENT", **mlp) == 1
    assert _sample(text, "ferry_batch_size_count", **mlp) == 3
    assert _sample(text, "ferry_batch_size_sum", **mlp) == 9
    assert _sample(text, "ferry_batch_size_bucket", le="2", **mlp) == 0
    assert _sample(text, "ferry_batch_size_bucket", le="4", **mlp) == 3
    assert _sample(text, "ferry_inferences_total", **mlp) == 9
    assert _sample(text, "ferry_executions_total", **mlp) == 3
    assert _sample(text, "ferry_request_seconds_count", **mlp) == 4
    assert _sample(text, "ferry_queue_depth", **mlp) == 0
    assert _sample(text, "ferry_model_state", state="READY", **mlp) == 1
    assert _sample(text, "ferry_model_state", state="FAILED", **mlp) == 0


def test_client_chosen_names_and_versions_do_not_grow_labels(
    server: ServerThread, client: InferenceClient
) -> None:
    assert server.app is not None
    for i in range(5):
        with pytest.raises(ModelNotFoundError):
            client.infer(f"ghost{i}", X)
        with pytest.raises(ModelNotFoundError):
            client.infer("mlp", X, version=1000 + i)
    text = scrape(server.app.metrics_port)
    assert "ghost" not in text
    assert 'version="100' not in text
    assert _sample(text, "ferry_requests_total", model="_unknown", code="NOT_FOUND") == 5
    assert _sample(text, "ferry_requests_total", model="mlp", version="0", code="NOT_FOUND") == 5


def test_list_models_states(server: ServerThread, client: InferenceClient) -> None:
    models = client.list_models()
    assert [(m.name, m.version, m.state, m.is_default) for m in models] == [
        ("fixed", 1, "READY", True),
        ("mlp", 1, "READY", True),
        ("two_io", 1, "READY", True),
    ]
    assert all(m.reason == "" for m in models)
    assert [m.name for m in client.list_models("mlp")] == ["mlp"]


def test_metadata_shapes_and_batching_policy(client: InferenceClient) -> None:
    mlp = client.model_metadata("mlp")
    assert (mlp.name, mlp.version, mlp.versions, mlp.default_version) == ("mlp", 1, (1,), 1)
    assert mlp.platform == "onnxruntime_onnx"
    assert mlp.inputs == (TensorInfo("input", "FP32", (-1, 64)),)
    assert mlp.outputs == (TensorInfo("logits", "FP32", (-1, 10)),)
    b = mlp.batching
    assert (b.max_batch_size, b.max_queue_delay, b.max_queue_size) == (32, 0.0, 1024)
    # No default_timeout_ms: the server's --default-request-timeout (10 s) is what applies.
    assert (b.default_timeout, b.instance_count) == (10.0, 1)
    two = client.model_metadata("two_io")
    assert two.inputs == (TensorInfo("a", "FP32", (-1, 4)), TensorInfo("b", "INT64", (-1, 4)))
    assert two.outputs == (
        TensorInfo("sum", "FP32", (-1, 4)),
        TensorInfo("scaled", "INT64", (-1, 4)),
    )
    fixed = client.model_metadata("fixed")
    assert fixed.inputs == (TensorInfo("input", "FP32", (3,)),)
    assert fixed.batching.max_batch_size == 0


def test_statistics_after_requests(client: InferenceClient) -> None:
    before_ms = int(time.time() * 1000)
    client.infer("mlp", X)
    client.infer("mlp", {"input": np.ones((1, 64), np.float32)})
    with pytest.raises(InvalidInputError):
        client.infer("mlp", {"input": np.ones((1, 64), np.int32)})
    (s,) = client.statistics("mlp")
    assert (s.name, s.version) == ("mlp", 1)
    assert (s.inference_count, s.execution_count) == (4, 2)
    assert s.batch_sizes == {3: 1, 1: 1}
    assert s.success.count == 2
    assert s.success.ns > 0
    assert s.queue.count == 2
    assert s.compute_infer.count == 2
    assert s.compute_infer.ns > 0
    assert s.last_inference_ms >= before_ms
    assert (s.rejected_count, s.expired_count, s.queue_depth) == (0, 0, 0)
    everything = client.statistics()
    assert sorted(x.name for x in everything) == ["fixed", "mlp", "two_io"]
    assert [x.version for x in client.statistics("mlp", version=1)] == [1]


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
            return resp.status, resp.read().decode("utf-8")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8")


def test_the_metrics_port_answers_only_what_it_serves(server: ServerThread) -> None:
    """An httpGet probe pointed at a wrong path must fail, not get the metrics text."""
    assert server.app is not None
    port = server.app.metrics_port
    for path in ("/", "/healthz", "/metrics/x", "/v2/health"):
        status, body = _get(port, path)
        assert status == 404, path
        assert "/metrics" in body
    assert _get(port, "/v2/health/live")[0] == 200
    assert _get(port, "/v2/health/ready")[0] == 200
    status, text = _get(port, "/metrics")
    assert status == 200
    assert "process_resident_memory_bytes" in text
    assert "process_open_fds" in text
    assert "_created" not in text


def test_the_metrics_port_names_the_methods_it_answers(server: ServerThread) -> None:
    """POST and the like were http.server's 501 "Unsupported method" (no such method known)."""
    assert server.app is not None
    conn = http.client.HTTPConnection("127.0.0.1", server.app.metrics_port, timeout=10)
    try:
        for method in ("POST", "PUT", "DELETE", "PATCH"):
            conn.request(method, "/metrics", body=b"x" * 100)
            resp = conn.getresponse()
            assert (resp.status, resp.getheader("Allow")) == (405, "GET, HEAD, OPTIONS"), method
            assert b"not allowed" in resp.read()
            conn.close()  # the server closes it: its body was never read
        conn.request("OPTIONS", "/metrics")
        resp = conn.getresponse()
        assert (resp.status, resp.getheader("Allow")) == (204, "GET, HEAD, OPTIONS")
        resp.read()
        conn.request("GET", "/v2/health/live")  # the same connection still answers
        assert conn.getresponse().status == 200
    finally:
        conn.close()


def test_a_scraper_that_hangs_up_leaves_no_traceback(
    server: ServerThread, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    """socketserver printed a traceback to stderr (past logging) for every client that reset
    its connection mid-request: 200 of them, 200 tracebacks."""
    assert server.app is not None
    caplog.set_level(logging.DEBUG, logger="ferry.server.metrics_http")
    sock = socket.create_connection(("127.0.0.1", server.app.metrics_port), timeout=30)
    sock.sendall(b"GET /metrics HTTP/1.1\r\n")  # and no end of headers
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()  # a reset, not a FIN
    wait_for(
        lambda: any("went away" in r.getMessage() for r in caplog.records),
        "the metrics server to see the client go",
    )
    assert "Traceback" not in capsys.readouterr().err
    assert _get(server.app.metrics_port, "/v2/health/live")[0] == 200


def test_http_readiness_follows_the_replica(tmp_path: Path) -> None:
    root = make_repo(tmp_path / "repo", {"seed": seed_model()})
    with ServerThread(root, require_models="seed,later") as srv:
        assert srv.app is not None
        app = srv.app
        assert _get(app.metrics_port, "/v2/health/ready")[0] == 503  # "later" is not there
        assert _get(app.metrics_port, "/v2/health/live")[0] == 200
        write_model(ModelRepository(root), "later", seed_model())
        srv.call(lambda: app.dataplane.load("later"))
        wait_for(lambda: _get(app.metrics_port, "/v2/health/ready")[0] == 200, "ready")


def test_a_cancelled_call_is_not_counted_as_a_server_error(server: ServerThread) -> None:
    """A caller that goes away leaves no outcome behind: it is not INTERNAL in the metrics."""
    from helpers import ExecutionGate

    from ferry.codec import encode_tensor
    from ferry.proto.v1 import inference_pb2 as pb
    from ferry.proto.v1 import inference_pb2_grpc as pb_grpc

    assert server.app is not None
    app = server.app
    request = pb.InferRequest(model="mlp", inputs=[encode_tensor("input", X["input"])])
    with ExecutionGate(server, "mlp") as gate, grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.InferenceStub(channel)
        first = stub.Infer.future(request, timeout=30)
        gate.wait_entered()  # the only instance is busy: the next request queues
        second = stub.Infer.future(request, timeout=30)
        batcher = app.registry.get("mlp").batcher
        wait_for(lambda: batcher.queue_depth == 1, "the second request to queue")
        second.cancel()
        wait_for(lambda: batcher.queue_depth == 0, "the cancelled request to leave the queue")
        gate.release()
        first.result(30)
    text = scrape(app.metrics_port)
    assert _sample(text, "ferry_requests_total", code="INTERNAL") is None
    assert _sample(text, "ferry_requests_total", code="OK", model="mlp") == 1


def test_calls_ended_by_their_deadline_while_queued_are_counted_as_such(
    server: ServerThread,
) -> None:
    """grpc cancels a call at its deadline, often before the queue's own timer fires: such
    calls failed with DEADLINE_EXCEEDED and were never run, and every one of them is counted so
    (fail, expired and ferry_requests_total), not only those the queue's timer reached first."""
    from helpers import ExecutionGate

    from ferry.codec import encode_tensor
    from ferry.proto.v1 import inference_pb2 as pb
    from ferry.proto.v1 import inference_pb2_grpc as pb_grpc

    assert server.app is not None
    app = server.app
    request = pb.InferRequest(model="mlp", inputs=[encode_tensor("input", X["input"])])
    late = 20
    with ExecutionGate(server, "mlp") as gate, grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.InferenceStub(channel)
        first = stub.Infer.future(request, timeout=30)
        gate.wait_entered()  # the only instance is busy: the others queue until their deadline
        calls = [stub.Infer.future(request, timeout=0.2 + 0.01 * i) for i in range(late)]
        for call in calls:
            assert call.exception(30) is not None
            assert call.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        wait_for(
            lambda: app.dataplane.statistics("mlp", 1)[0].fail.count == late,
            "every call that ended by its deadline to be counted",
        )
        gate.release()
        first.result(30)
    statistics = app.dataplane.statistics("mlp", 1)[0]
    assert (statistics.fail.count, statistics.expired) == (late, late)
    assert (statistics.success.count, gate.calls) == (1, 1)  # none of them ran
    text = scrape(app.metrics_port)
    assert _sample(text, "ferry_requests_total", code="DEADLINE_EXCEEDED", model="mlp") == late
    assert _sample(text, "ferry_expired_total", model="mlp") == late


def test_calls_that_ended_while_running_add_no_per_request_time(server: ServerThread) -> None:
    """A call ended while its batch ran (its deadline: a failure; its caller's cancel: nothing)
    is no success, so its queue and compute are not charged: they were, and perf_analyzer,
    which divides them by the success count, read them as every request's. The executions
    and inferences stay: the model did run them."""
    from helpers import ExecutionGate

    from ferry.codec import encode_tensor
    from ferry.proto.v1 import inference_pb2 as pb
    from ferry.proto.v1 import inference_pb2_grpc as pb_grpc

    assert server.app is not None
    app = server.app
    request = pb.InferRequest(model="mlp", inputs=[encode_tensor("input", X["input"])])
    with ExecutionGate(server, "mlp") as gate, grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.InferenceStub(channel)
        running = stub.Infer.future(request, timeout=1)
        gate.wait_entered()  # it runs, held, until the gate opens: its deadline passes first
        assert running.exception(30) is not None
        assert running.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        wait_for(
            lambda: app.dataplane.statistics("mlp", 1)[0].fail.count == 1,
            "the call its deadline ended to be counted",
        )
        gate.release()
        wait_for(lambda: app.registry.get("mlp").batcher.in_flight == 0, "its run to end")
    s = app.dataplane.statistics("mlp", 1)[0]
    assert (s.success.count, s.fail.count, s.execution_count, s.inference_count) == (0, 1, 1, 3)
    assert (s.queue.count, s.compute_input.count, s.compute_infer.count) == (0, 0, 0)
    assert (s.queue.ns, s.compute_infer.ns, s.compute_output.count) == (0, 0, 0)
    assert [b.compute_infer.count for b in s.batches] == [1]  # the execution, per batch size


def test_a_version_loaded_again_in_place_does_not_send_its_counters_down(
    server: ServerThread, client: InferenceClient
) -> None:
    """New files under a served version, loaded: ModelStatistics counts since that load (as
    Triton's), but the Prometheus series never left, and it read 6 then 0: a counter going
    down. Its counters go on from what they were, as Triton's do across a reload; an unload
    still takes them away with the version."""
    import onnx

    from ferry.server.examples import mlp_model

    assert server.app is not None
    app = server.app
    mlp = {"model": "mlp", "version": "1"}
    for _ in range(2):
        client.infer("mlp", X)
    before = scrape(app.metrics_port)
    assert _sample(before, "ferry_inferences_total", **mlp) == 6
    assert _sample(before, "ferry_executions_total", **mlp) == 2
    onnx.save(
        mlp_model(seed=1), str(ModelRepository(Path(app.settings.repository)).model_file("mlp", 1))
    )
    server.call(lambda: app.dataplane.load("mlp"))
    assert client.statistics("mlp")[0].inference_count == 0  # a new load: counted from it
    client.infer("mlp", X)
    after = scrape(app.metrics_port)
    assert _sample(after, "ferry_inferences_total", **mlp) == 9
    assert _sample(after, "ferry_executions_total", **mlp) == 3
    assert _sample(after, "ferry_batch_size_count", **mlp) == 3
    assert _sample(after, "ferry_batch_size_sum", **mlp) == 9
    assert _sample(after, "ferry_queue_depth", **mlp) == 0
    server.call(lambda: app.dataplane.unload("mlp"))
    assert _sample(scrape(app.metrics_port), "ferry_inferences_total", **mlp) is None
    server.call(lambda: app.dataplane.load("mlp"))
    assert _sample(scrape(app.metrics_port), "ferry_inferences_total", **mlp) == 0


def test_a_reload_that_outcounts_the_old_load_before_a_scrape_is_still_carried(
    server: ServerThread, client: InferenceClient
) -> None:
    """A reload in place is told from the old load by the load, not by its counts going down:
    6 before the reload, then 9 on the new load before the next scrape read 9 (the 6 lost,
    increase() 3 for 9 served). It reads 6 + 9 now."""
    import onnx

    from ferry.server.examples import mlp_model

    assert server.app is not None
    app = server.app
    mlp = {"model": "mlp", "version": "1"}
    for _ in range(2):
        client.infer("mlp", X)
    assert _sample(scrape(app.metrics_port), "ferry_inferences_total", **mlp) == 6
    onnx.save(
        mlp_model(seed=1), str(ModelRepository(Path(app.settings.repository)).model_file("mlp", 1))
    )
    server.call(lambda: app.dataplane.load("mlp"))
    for _ in range(3):
        client.infer("mlp", X)
    after = scrape(app.metrics_port)
    assert _sample(after, "ferry_inferences_total", **mlp) == 15
    assert _sample(after, "ferry_executions_total", **mlp) == 5


def test_a_version_unloaded_and_loaded_between_scrapes_goes_on_counting(
    server: ServerThread, client: InferenceClient
) -> None:
    """Prometheus sees only its scrapes: a version unloaded and loaded again between two, whose
    new load outcounted the old, read 6 then 9, growth of 3 for 9 served (and 311102e, which
    restarted it at the unload, did the same). A counter never goes down for one label set
    unless a scrape saw the series gone, so it goes on: 6 + 9. A scrape that saw it gone is
    a new series, which starts from zero (test above)."""
    assert server.app is not None
    app = server.app
    mlp = {"model": "mlp", "version": "1"}
    for _ in range(2):
        client.infer("mlp", X)
    assert _sample(scrape(app.metrics_port), "ferry_inferences_total", **mlp) == 6
    server.call(lambda: app.dataplane.unload("mlp"))
    server.call(lambda: app.dataplane.load("mlp"))
    for _ in range(3):
        client.infer("mlp", X)
    after = scrape(app.metrics_port)
    assert _sample(after, "ferry_inferences_total", **mlp) == 15
    assert _sample(after, "ferry_executions_total", **mlp) == 5


def test_a_request_that_fails_to_decode_is_a_failure_of_the_version_it_asked_for(
    server: ServerThread, client: InferenceClient
) -> None:
    """Data that does not fill its shape, over HTTP JSON and Open Inference Protocol gRPC raw
    contents: refused while decoding, it was in no ModelStatistics fail (a wrong datatype,
    refused a step later, was) and in ferry_requests_total under version "0", the label of a
    version that does not exist. It is now the asked version's failure, on both counts."""
    import json

    from tritonclient.grpc import service_pb2 as kpb
    from tritonclient.grpc import service_pb2_grpc as kgrpc

    assert server.app is not None
    body = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [1.0]}]}
    req = urllib.request.Request(
        f"http://{server.http_target}/v2/models/mlp/infer",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(req, timeout=30)
    assert refused.value.code == 400
    raw = kpb.ModelInferRequest(model_name="mlp")
    t = raw.inputs.add()
    t.name, t.datatype = "input", "FP32"
    t.shape.extend([1, 64])
    raw.raw_input_contents.append(b"\0" * 12)  # 3 floats for 64
    with grpc.insecure_channel(server.target) as channel, pytest.raises(grpc.RpcError) as rpc:
        kgrpc.GRPCInferenceServiceStub(channel).ModelInfer(raw, timeout=30)
    assert rpc.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    (s,) = client.statistics("mlp")
    assert (s.success.count, s.fail.count) == (0, 2)
    text = scrape(server.app.metrics_port)
    mlp = {"model": "mlp", "version": "1"}
    assert _sample(text, "ferry_requests_total", code="INVALID_ARGUMENT", **mlp) == 2
    assert _sample(text, "ferry_requests_total", version="0") is None
    # A version named but invalid is no version's: its label stays "0", an unknown version's.
    raw.model_version = "one"
    with grpc.insecure_channel(server.target) as channel, pytest.raises(grpc.RpcError) as rpc:
        kgrpc.GRPCInferenceServiceStub(channel).ModelInfer(raw, timeout=30)
    assert rpc.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert client.statistics("mlp")[0].fail.count == 2
    text = scrape(server.app.metrics_port)
    assert _sample(text, "ferry_requests_total", code="INVALID_ARGUMENT", **mlp) == 2
    assert _sample(text, "ferry_requests_total", model="mlp", version="0") == 1


def test_two_scrapes_at_once_count_nothing_twice(
    server: ServerThread, client: InferenceClient
) -> None:
    """Two scrapes at once (two Prometheus servers, a curl beside one): the one that read the
    statistics first compared them after the other, took its lower counts for a new load,
    and carried the other's into every later scrape, so ferry_inferences_total read 6 + 9,
    then 9 + 9 for good. A scrape whose read was overtaken compares nothing."""
    import threading

    assert server.app is not None
    metrics = server.app.metrics
    real = metrics._dataplane
    read, go = threading.Event(), threading.Event()

    class HeldFirstRead:
        """The real data plane, the first statistics() held after it read."""

        def __init__(self) -> None:
            self.held = False

        def __getattr__(self, name: str) -> object:
            return getattr(real, name)

        def statistics(self) -> object:
            stats = real.statistics()
            if not self.held:
                self.held = True
                read.set()
                assert go.wait(30)
            return stats

    mlp = {"model": "mlp", "version": "1"}
    for _ in range(2):
        client.infer("mlp", X)
    metrics._dataplane = HeldFirstRead()
    try:
        first: list[bytes] = []
        slow = threading.Thread(target=lambda: first.append(metrics.render()))
        slow.start()
        assert read.wait(30)
        client.infer("mlp", X)
        assert _sample(scrape(server.app.metrics_port), "ferry_inferences_total", **mlp) == 9
        go.set()
        slow.join(30)
        assert first
    finally:
        go.set()
        metrics._dataplane = real
    assert _sample(first[0].decode(), "ferry_inferences_total", **mlp) in (6, 9)
    assert _sample(scrape(server.app.metrics_port), "ferry_inferences_total", **mlp) == 9


def test_the_metrics_text_parses_as_prometheus_and_is_consistent(
    server: ServerThread, client: InferenceClient
) -> None:
    """The scrape is written by hand (a generic renderer cost 80 ms of GIL per scrape at 200
    models): Prometheus's own parser must read every family, with the types and series it had
    when prometheus_client wrote them, and every histogram must be cumulative and add up."""
    from prometheus_client.parser import text_string_to_metric_families

    assert server.app is not None
    for _ in range(4):
        client.infer("mlp", X)
    with pytest.raises(ModelNotFoundError):
        client.infer("no-such-model", X)
    families = {f.name: f for f in text_string_to_metric_families(scrape(server.app.metrics_port))}
    expected = {
        "ferry_requests": "counter",
        "ferry_request_seconds": "histogram",
        "ferry_queue_seconds": "counter",
        "ferry_compute_seconds": "counter",
        "ferry_inferences": "counter",
        "ferry_executions": "counter",
        "ferry_rejected": "counter",
        "ferry_expired": "counter",
        "ferry_queue_depth": "gauge",
        "ferry_batch_size": "histogram",
        "ferry_model_state": "gauge",
        "process_resident_memory_bytes": "gauge",
    }
    for name, kind in expected.items():
        assert families[name].type == kind, name
    for name in ("ferry_request_seconds", "ferry_batch_size"):
        series: dict[tuple[tuple[str, str], ...], list[tuple[float, float]]] = {}
        counts: dict[tuple[tuple[str, str], ...], float] = {}
        for s in families[name].samples:
            key = tuple(sorted((k, v) for k, v in s.labels.items() if k != "le"))
            if s.name.endswith("_bucket"):
                series.setdefault(key, []).append((float(s.labels["le"]), s.value))
            elif s.name.endswith("_count"):
                counts[key] = s.value
        assert series and series.keys() == counts.keys(), name
        for key, buckets in series.items():
            values = [v for _, v in sorted(buckets)]
            assert values == sorted(values), (name, key)  # cumulative
            assert values[-1] == counts[key], (name, key)  # +Inf bucket == count
    requests = {
        (s.labels["model"], s.labels["code"]): s.value for s in families["ferry_requests"].samples
    }
    assert requests[("mlp", "OK")] == 4
    assert requests[("_unknown", "NOT_FOUND")] == 1
