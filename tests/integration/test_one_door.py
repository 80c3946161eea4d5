"""The core is the only door: every protocol's RPCs go through ``DataPlane``, and ferry.v1 and
the Open Inference Protocol agree on every repository outcome (driven side by side here)."""

from __future__ import annotations

import asyncio
import functools
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from helpers import StartServer
from serverutil import ServerThread
from tritonclient.grpc import service_pb2 as kpb
from tritonclient.grpc import service_pb2_grpc as kgrpc

from ferry.codec import encode_tensor
from ferry.proto.v1 import inference_pb2 as ipb
from ferry.proto.v1 import inference_pb2_grpc as igrpc
from ferry.proto.v1 import repository_pb2 as rpb
from ferry.proto.v1 import repository_pb2_grpc as rgrpc
from ferry.server.core.repository import MODEL_FILE, ModelRepository
from ferry.server.examples import identity_model, write_model
from ferry.server.grpc.app import FerryServer

DOOR = ("infer", "metadata", "statistics", "list_models", "index", "ready", "model_ready")
DOOR += ("load", "unload", "refresh", "stream")


class Spy:
    """Counts the calls of the DataPlane's public methods, by wrapping them on the instance."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()

    def install(self, app: FerryServer) -> None:
        dp = app.dataplane
        for name in DOOR:
            original = getattr(dp, name)
            setattr(dp, name, self._wrap(name, original))

    def _wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        if asyncio.iscoroutinefunction(fn):

            async def awrapper(*args: Any, **kwargs: Any) -> Any:
                self.calls[name] += 1
                return await fn(*args, **kwargs)

            return awrapper

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    def take(self) -> Counter[str]:
        calls, self.calls = self.calls, Counter()
        return calls


@pytest.fixture
def door(tmp_path: Path, start_server: StartServer) -> tuple[ServerThread, Spy, ModelRepository]:
    repo = ModelRepository(tmp_path / "repo")
    write_model(repo, "alpha", identity_model("FP32"))
    spy = Spy()
    return start_server(repo.root, configure=spy.install), spy, repo


def _v1_infer(x: np.ndarray) -> ipb.InferRequest:
    return ipb.InferRequest(model="alpha", inputs=[encode_tensor("input", x)])


def _oip_infer(x: np.ndarray) -> kpb.ModelInferRequest:
    req = kpb.ModelInferRequest(model_name="alpha")
    req.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    req.raw_input_contents.append(x.tobytes())
    return req


def test_every_rpc_of_both_protocols_goes_through_the_door(door: Any) -> None:
    srv, spy, _ = door
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    spy.take()
    with grpc.insecure_channel(srv.target) as ch:
        v1 = igrpc.InferenceStub(ch)
        oip = kgrpc.GRPCInferenceServiceStub(ch)
        cases: list[tuple[Callable[[], Any], str]] = [
            (lambda: v1.Infer(_v1_infer(x)), "infer"),
            (lambda: list(v1.InferStream(iter([_v1_infer(x)] * 2))), "stream"),
            (lambda: v1.GetModelMetadata(ipb.GetModelMetadataRequest(model="alpha")), "metadata"),
            (lambda: v1.ListModels(ipb.ListModelsRequest()), "list_models"),
            (lambda: v1.GetModelStatistics(ipb.GetModelStatisticsRequest()), "statistics"),
            (lambda: oip.ModelInfer(_oip_infer(x)), "infer"),
            (lambda: list(oip.ModelStreamInfer(iter([_oip_infer(x)] * 2))), "stream"),
            (lambda: oip.ModelMetadata(kpb.ModelMetadataRequest(name="alpha")), "metadata"),
            (lambda: oip.ModelConfig(kpb.ModelConfigRequest(name="alpha")), "metadata"),
            (lambda: oip.ModelStatistics(kpb.ModelStatisticsRequest()), "statistics"),
            (lambda: oip.ModelReady(kpb.ModelReadyRequest(name="alpha")), "model_ready"),
            (lambda: oip.ServerReady(kpb.ServerReadyRequest()), "ready"),
            (lambda: oip.RepositoryIndex(kpb.RepositoryIndexRequest()), "index"),
        ]
        for call, method in cases:
            call()
            calls = spy.take()
            assert calls[method] >= 1, (method, calls)
            if method == "stream":
                # Each request of the stream is one inference through the same door.
                assert calls["infer"] == 2, calls
    with grpc.insecure_channel(srv.management_target) as ch:
        repo_v1 = rgrpc.ModelRepositoryStub(ch)
        oip = kgrpc.GRPCInferenceServiceStub(ch)
        for call, method in [
            (lambda: repo_v1.Refresh(rpb.RefreshRequest()), "refresh"),
            (lambda: repo_v1.UnloadModel(rpb.UnloadModelRequest(model="alpha")), "unload"),
            (lambda: repo_v1.LoadModel(rpb.LoadModelRequest(model="alpha")), "load"),
            (
                lambda: oip.RepositoryModelUnload(
                    kpb.RepositoryModelUnloadRequest(model_name="alpha")
                ),
                "unload",
            ),
            (
                lambda: oip.RepositoryModelLoad(kpb.RepositoryModelLoadRequest(model_name="alpha")),
                "load",
            ),
        ]:
            call()
            assert spy.take()[method] == 1, method


def _outcome(call: Callable[[], Any]) -> tuple[str, str]:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code().name, exc.details() or ""
    return "OK", ""


@pytest.mark.parametrize(
    "case",
    ["unknown", "bad_name", "broken", "no_versions", "ok", "unload_unknown", "unload_ok"],
)
def test_both_protocols_agree_on_every_repository_outcome(door: Any, case: str) -> None:
    srv, _, repo = door
    if case == "broken":
        broken = repo.model_dir("gamma") / "1"
        broken.mkdir(parents=True)
        (broken / MODEL_FILE).write_bytes(b"not an onnx file")
    if case == "no_versions":
        repo.model_dir("empty").mkdir()
    name = {
        "unknown": "no_such_model",
        "bad_name": "../escape",
        "broken": "gamma",
        "no_versions": "empty",
        "ok": "alpha",
        "unload_unknown": "no_such_model",
        "unload_ok": "alpha",
    }[case]
    unload = case.startswith("unload")
    expected = {
        "unknown": "NOT_FOUND",
        "bad_name": "INVALID_ARGUMENT",
        "broken": "FAILED_PRECONDITION",
        "no_versions": "FAILED_PRECONDITION",
        "ok": "OK",
        "unload_unknown": "NOT_FOUND",
        "unload_ok": "OK",
    }[case]
    with grpc.insecure_channel(srv.management_target) as ch:
        v1 = rgrpc.ModelRepositoryStub(ch)
        oip = kgrpc.GRPCInferenceServiceStub(ch)
        if unload:
            a = _outcome(lambda: v1.UnloadModel(rpb.UnloadModelRequest(model=name)))
            if case == "unload_ok":  # the same state for the second protocol's turn
                v1.LoadModel(rpb.LoadModelRequest(model=name))
            b = _outcome(
                lambda: oip.RepositoryModelUnload(kpb.RepositoryModelUnloadRequest(model_name=name))
            )
        else:
            a = _outcome(lambda: v1.LoadModel(rpb.LoadModelRequest(model=name)))
            b = _outcome(
                lambda: oip.RepositoryModelLoad(kpb.RepositoryModelLoadRequest(model_name=name))
            )
        ready = (
            oip.ModelReady(kpb.ModelReadyRequest(name="alpha")).ready if name == "alpha" else None
        )
    if case == "unload_unknown":
        # ferry.v1 tells its caller of the typo; the OIP answers OK with nothing done, as
        # Triton does (its L0_lifecycle test: "Unload non-existing model, nothing should happen").
        assert a[0] == expected and b == ("OK", ""), (case, a, b)
        return
    assert a == b, (case, a, b)
    assert a[0] == expected, (case, a)
    if expected == "FAILED_PRECONDITION":
        assert name in a[1] and "no version ready" in a[1]
    if ready is not None:
        assert ready is (not unload)


def test_versions_are_parsed_one_way_for_every_rpc(door: Any) -> None:
    """A version string that str.isdigit() accepts but int() refuses, or a huge one, is the
    client's INVALID_ARGUMENT on every RPC that takes one, never INTERNAL."""
    srv, _, _ = door
    with grpc.insecure_channel(srv.target) as ch:
        oip = kgrpc.GRPCInferenceServiceStub(ch)
        for bad in ("²", "9" * 5000, "-1", "1.0"):
            calls: list[Callable[[str], Any]] = [
                lambda v: oip.ModelReady(kpb.ModelReadyRequest(name="alpha", version=v)),
                lambda v: oip.ModelMetadata(kpb.ModelMetadataRequest(name="alpha", version=v)),
                lambda v: oip.ModelConfig(kpb.ModelConfigRequest(name="alpha", version=v)),
                lambda v: oip.ModelStatistics(kpb.ModelStatisticsRequest(name="alpha", version=v)),
                lambda v: oip.ModelInfer(
                    kpb.ModelInferRequest(model_name="alpha", model_version=v)
                ),
            ]
            for call in calls:
                code, message = _outcome(functools.partial(call, bad))
                assert code == "INVALID_ARGUMENT", (bad[:8], code, message)
                assert "ASCII digits" in message
            responses = list(
                oip.ModelStreamInfer(
                    iter([kpb.ModelInferRequest(model_name="alpha", model_version=bad)])
                )
            )
            assert "INVALID_ARGUMENT" in responses[0].error_message


def test_a_version_out_of_range_is_invalid_in_ferry_v1_too(door: Any) -> None:
    """ferry.v1 carries versions as int64: a negative one, or one past what every protocol
    accepts, is the same INVALID_ARGUMENT the text forms get (it was "not found" here)."""
    srv, _, _ = door
    with grpc.insecure_channel(srv.target) as ch:
        v1 = igrpc.InferenceStub(ch)
        for bad in (-1, -(2**63), 2**53 + 1):
            calls: list[Callable[[int], Any]] = [
                lambda v: v1.Infer(ipb.InferRequest(model="alpha", version=v)),
                lambda v: v1.GetModelMetadata(
                    ipb.GetModelMetadataRequest(model="alpha", version=v)
                ),
                lambda v: v1.GetModelStatistics(
                    ipb.GetModelStatisticsRequest(model="alpha", version=v)
                ),
            ]
            for call in calls:
                code, message = _outcome(functools.partial(call, bad))
                assert code == "INVALID_ARGUMENT", (bad, code, message)
                assert f"invalid model version {bad}" in message
            answers = list(v1.InferStream(iter([ipb.InferRequest(model="alpha", version=bad)])))
            assert answers[0].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
