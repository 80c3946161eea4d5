"""Readiness is a statement about the replica, not a flicker: a model loading beside the served
ones, or a new version rolling in, changes nothing; health answers under the full service names
and on the management listener too.

Loading is held deterministically by a gate in the registry's opener (no sleeps, no timing)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import StartServer, wait_for
from serverutil import ServerThread

from ferry.client import InferenceClient
from ferry.server.core.repository import ModelRepository
from ferry.server.examples import identity_model, write_model
from ferry.server.grpc.app import FerryServer

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class LoadGate:
    """Holds the opening of every version folder whose path contains ``match`` until released."""

    def __init__(self) -> None:
        self.match = "\0"
        self.entered = threading.Event()
        self._open = threading.Event()

    def install(self, app: FerryServer) -> None:
        original: Callable[..., Any] = app.registry._opener

        def gated(path: Path, config: Any) -> Any:
            if self.match in str(path):
                self.entered.set()
                assert self._open.wait(30), "the test never released the load gate"
            return original(path, config)

        app.registry._opener = gated

    def hold(self, match: str) -> None:
        self.match = match

    def release(self) -> None:
        self._open.set()


@pytest.fixture
def gated(
    tmp_path: Path, start_server: StartServer
) -> tuple[ServerThread, LoadGate, ModelRepository]:
    repo = ModelRepository(tmp_path / "repo")
    write_model(repo, "alpha", identity_model("FP32"))
    gate = LoadGate()
    srv = start_server(repo.root, configure=gate.install)
    srv.before_stop(gate.release)
    return srv, gate, repo


def _health(target: str, service: str = "") -> int:
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        return int(reply.status)


def _refresh_in_background(srv: ServerThread) -> Future[Any]:
    assert srv.app is not None
    return srv.submit(srv.app.dataplane.refresh)


def test_a_model_loading_beside_the_served_ones_does_not_flip_readiness(gated: Any) -> None:
    srv, gate, repo = gated
    assert _health(srv.target) == SERVING
    gate.hold("beta")
    write_model(repo, "beta", identity_model("FP32"))
    done = _refresh_in_background(srv)
    assert gate.entered.wait(30)
    # beta is LOADING now: the replica still serves alpha, so it stays ready.
    with InferenceClient(srv.target) as client:
        states = {m.name: m.state for m in client.list_models()}
        assert states["beta"] == "LOADING"
        assert _health(srv.target) == SERVING
        assert _health(srv.target, "beta") == NOT_SERVING
        x = np.ones((1, 3), np.float32)
        assert np.array_equal(client.infer("alpha", {"input": x}).as_numpy("output"), x)
    gate.release()
    done.result(30)
    assert _health(srv.target, "beta") == SERVING


def test_a_new_version_rolls_in_without_a_gap(gated: Any) -> None:
    """With ``latest = 1``, version 2 loads while version 1 keeps answering; version 1 goes
    only once version 2 serves."""
    srv, gate, repo = gated
    gate.hold("/alpha/2/")
    write_model(repo, "alpha", identity_model("FP32"), version=2)
    done = _refresh_in_background(srv)
    assert gate.entered.wait(30)
    with InferenceClient(srv.target) as client:
        x = np.ones((2, 3), np.float32)
        assert client.infer("alpha", {"input": x}).version == 1
        assert _health(srv.target) == SERVING
        gate.release()
        done.result(30)
        wait_for(lambda: client.infer("alpha", {"input": x}).version == 2, "version 2 serving")
        assert [m.version for m in client.list_models("alpha")] == [2]


def test_health_under_service_names_and_on_the_management_listener(gated: Any) -> None:
    srv, _, _ = gated
    for service in ("ferry.v1.Inference", "inference.GRPCInferenceService"):
        assert _health(srv.target, service) == SERVING
    for service in ("", "ferry.v1.ModelRepository", "ferry.v1.ModelConversion"):
        assert _health(srv.management_target, service) == SERVING


def test_required_models_decide_readiness(tmp_path: Path) -> None:
    repo = ModelRepository(tmp_path / "repo")
    write_model(repo, "alpha", identity_model("FP32"))
    with ServerThread(repo.root, require_models="alpha,beta") as srv:
        assert _health(srv.target) == NOT_SERVING  # beta is not there
        write_model(repo, "beta", identity_model("FP32"))
        assert srv.app is not None
        app = srv.app
        srv.call(lambda: app.dataplane.load("beta"))
        assert _health(srv.target) == SERVING
        srv.call(lambda: app.dataplane.unload("alpha"))  # an explicit unload: no longer required
        assert _health(srv.target) == SERVING


def test_deleting_a_models_last_version_leaves_the_replica_ready(tmp_path: Path) -> None:
    """DeleteModelVersion of alpha's only version: alpha was required only because it served
    at start, and the whole replica turned NOT ready (a load balancer took beta off it too).
    A model --require-models names still holds readiness."""
    from ferry.client import ConversionClient

    repo = ModelRepository(tmp_path / "repo")
    for name in ("alpha", "beta", "gamma"):
        write_model(repo, name, identity_model("FP32"))
    with (
        ServerThread(repo.root) as srv,
        ConversionClient(srv.management_target, timeout=60) as conversion,
    ):
        conversion.delete_version("alpha", 1)
        assert _health(srv.target) == SERVING
    with (
        ServerThread(repo.root, require_models="beta") as srv,
        ConversionClient(srv.management_target, timeout=60) as conversion,
    ):
        assert _health(srv.target) == SERVING
        conversion.delete_version("beta", 1)
        assert _health(srv.target) == NOT_SERVING


@pytest.mark.parametrize("service", ["", "alpha", "no-such-name"])
def test_watch_streams_end_once_the_stop_has_said_not_serving(gated: Any, service: str) -> None:
    """A Watch (gRPC client-side health checking, Envoy) stayed open through the stop: it held
    the whole grace period and was then cut. It now ends, OK, after its last status."""
    srv, _, _ = gated
    app = srv.app
    with grpc.insecure_channel(srv.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        # The deadline only guards against a hang: the stream must end well before it.
        watch = stub.Watch(health_pb2.HealthCheckRequest(service=service), timeout=60)
        first = next(watch).status
        srv.call(app.health.enter_graceful_shutdown)
        rest = [reply.status for reply in watch]  # ends: no DEADLINE_EXCEEDED raised
        assert watch.code() == grpc.StatusCode.OK
        if service == "no-such-name":
            assert first == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN and rest == []
        else:
            assert first == SERVING and rest == [NOT_SERVING]
        # One begun after the stop said so answers and ends at once.
        late = list(stub.Watch(health_pb2.HealthCheckRequest(service=service), timeout=60))
        assert len(late) == 1 and late[0].status != SERVING


def test_health_watch_streams_are_bounded_per_process(tmp_path: Path) -> None:
    """Watch streams were unbounded: one client held 2,000 open, each a call and a coroutine
    for as long as it liked. Past --max-health-watches (every listener of the process
    together) one more is refused RESOURCE_EXHAUSTED naming the flag; Check still answers, and
    a closed stream's place is taken again."""
    repo = ModelRepository(tmp_path / "repo")
    request = health_pb2.HealthCheckRequest(service="")
    with (
        ServerThread(repo.root, max_health_watches=3) as srv,
        grpc.insecure_channel(srv.target) as channel,
        grpc.insecure_channel(srv.management_target) as management,
    ):
        assert srv.app is not None
        stub, mstub = health_pb2_grpc.HealthStub(channel), health_pb2_grpc.HealthStub(management)
        # Deadlines guard against a hang only: every stream is read or cancelled long before.
        held = [stub.Watch(request, timeout=60), stub.Watch(request, timeout=60)]
        held.append(mstub.Watch(request, timeout=60))
        answered = (SERVING, NOT_SERVING)  # whichever it is: the stream is open and answers
        assert all(next(watch).status in answered for watch in held)
        for extra in (stub, mstub):
            with pytest.raises(grpc.RpcError) as err:
                next(extra.Watch(request, timeout=60))
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "--max-health-watches (3)" in (err.value.details() or "")
        assert _health(srv.target) in answered
        held.pop().cancel()
        slots = srv.app.watch_slots
        wait_for(lambda: slots.open == 2, "the cancelled Watch's place to be given back")
        again = stub.Watch(request, timeout=60)
        assert next(again).status in answered
        for watch in [*held, again]:
            watch.cancel()


def test_an_unknown_health_name_is_not_found_with_what_to_ask(gated: Any) -> None:
    srv, _, _ = gated
    with pytest.raises(grpc.RpcError) as err:
        _health(srv.target, "no-such-model")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "a model name" in (err.value.details() or "")
    with pytest.raises(grpc.RpcError) as err:  # the management listener has no model names
        _health(srv.management_target, "alpha")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "ferry.v1.ModelRepository" in (err.value.details() or "")


def test_once_draining_every_readiness_question_says_not_ready(gated: Any) -> None:
    """SIGTERM's first step made gRPC health NOT_SERVING for the replica and each model, and OIP
    ServerReady false; OIP ModelReady (gRPC and HTTP) still said ready, so a client routing by
    model readiness kept sending to a replica that was going away. And /v2/health/ready blamed a
    model still loading."""
    import http.client

    from ferry.proto.kserve.v2 import grpc_service_pb2 as kpb

    srv, _, _ = gated
    app = srv.app
    srv.call(app.health.enter_graceful_shutdown)
    app.dataplane.drain()  # what stop() does first, before the listeners close
    assert _health(srv.target, "alpha") == NOT_SERVING
    with grpc.insecure_channel(srv.target) as channel:
        model_ready = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelReady",
            request_serializer=kpb.ModelReadyRequest.SerializeToString,
            response_deserializer=kpb.ModelReadyResponse.FromString,
        )
        assert not model_ready(kpb.ModelReadyRequest(name="alpha"), timeout=10).ready
    conn = http.client.HTTPConnection("127.0.0.1", app.http_port, timeout=30)
    try:
        for path in ("/v2/models/alpha/ready", "/v2/health/ready"):
            conn.request("GET", path)
            reply = conn.getresponse()
            body = reply.read().decode()
            assert reply.status == 503, path
            assert "shutting down" in body, (path, body)
    finally:
        conn.close()


def test_a_model_cannot_take_a_served_services_health_name(
    tmp_path: Path, start_server: StartServer
) -> None:
    """grpc.health.v1 answers by one name for a model and a service alike: a model folder named
    inference.GRPCInferenceService served, and an unload of it left its health SERVING (the
    service's status). Such a folder is not served; LoadModel and Check of it say why."""
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    from ferry.client import ConversionClient, InvalidInputError, RepositoryClient
    from ferry.server.core.repository import SERVICE_NAMES

    repo = ModelRepository(tmp_path / "repo")
    write_model(repo, "alpha", identity_model("FP32"))
    clash = "inference.GRPCInferenceService"
    (repo.root / clash / "1").mkdir(parents=True)
    (repo.root / clash / "1" / "model.onnx").write_bytes(
        (repo.root / "alpha" / "1" / "model.onnx").read_bytes()
    )
    srv = start_server(repo.root)
    assert srv.app is not None
    assert clash not in {s.name for s in srv.app.dataplane.list_models()}
    assert any(clash in line for line in repo.misplaced_model_files())
    refused = pytest.raises(InvalidInputError, match="name of a gRPC service Ferry serves")
    with RepositoryClient(srv.management_target, timeout=30) as client, refused:
        client.load_model(clash)
    refused = pytest.raises(InvalidInputError, match="name of a gRPC service Ferry serves")
    with ConversionClient(srv.management_target, timeout=30) as conversion, refused:
        conversion.upload("ferry.v1.Inference", b"onnx", format="onnx")
    for target in (srv.target, srv.management_target):  # every name a listener serves is refused
        with grpc.insecure_channel(target) as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            ask = reflection_pb2.ServerReflectionRequest(list_services="")
            (reply,) = stub.ServerReflectionInfo(iter([ask]), timeout=10)
            served = {s.name for s in reply.list_services_response.service}
            assert served and served <= SERVICE_NAMES
    assert _health(srv.target, clash) == SERVING  # the service's status, the replica's
    assert _health(srv.target, "alpha") == SERVING
