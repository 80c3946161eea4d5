"""Bearer tokens per listener, checked on every RPC (streams and reflection included).

One server with both tokens serves the module: each test only calls it. Health stays open by
default; the inference token never grants management (PERMISSION_DENIED), the management token
is accepted for inference.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from helpers import make_repo
from sechelpers import Certs
from serverutil import ServerThread

from ferry.client import (
    AuthenticationError,
    InferenceClient,
    PermissionDeniedError,
    RepositoryClient,
)
from ferry.client._requests import build_infer_request
from ferry.proto.kserve.v2 import grpc_service_pb2 as kpb
from ferry.proto.v1 import inference_pb2 as pb
from ferry.proto.v1 import inference_pb2_grpc as pb_grpc
from ferry.proto.v1 import model_conversion_pb2 as cpb
from ferry.proto.v1 import model_conversion_pb2_grpc as cpb_grpc
from ferry.server.examples import identity_model
from ferry.server.security import is_loopback
from ferry.server.settings import Settings, add_arguments

INFERENCE_TOKEN = "inf-3c1b9e0f6a"
MANAGEMENT_TOKEN = "mgmt-8d2a74c5b1"
X = {"input": np.arange(3, dtype=np.float32)}
REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
KSERVE = "/inference.GRPCInferenceService/"


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def code_of(call: object) -> grpc.StatusCode:
    try:
        call()  # type: ignore[operator]
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_repo(
        tmp_path_factory.mktemp("auth") / "repo", {"fixed": identity_model("FP32", (3,))}
    )


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[ServerThread]:
    with ServerThread(
        repo, inference_token=INFERENCE_TOKEN, management_token=MANAGEMENT_TOKEN
    ) as srv:
        yield srv


def test_inference_needs_the_token_and_health_stays_open(server: ServerThread) -> None:
    with InferenceClient(server.target, timeout=10) as anonymous:
        assert anonymous.ready()  # health: open by default (probes cannot send tokens)
        with pytest.raises(AuthenticationError) as info:
            anonymous.infer("fixed", X)
        assert info.value.code is grpc.StatusCode.UNAUTHENTICATED
        assert info.value.kind == "UNAUTHENTICATED"
        assert "Bearer" in info.value.message
        with pytest.raises(AuthenticationError):
            anonymous.list_models()
    with (
        InferenceClient(server.target, timeout=10, token="wrong-token") as wrong,
        pytest.raises(AuthenticationError, match="invalid token"),
    ):
        wrong.infer("fixed", X)
    for token in (INFERENCE_TOKEN, MANAGEMENT_TOKEN):
        with InferenceClient(server.target, timeout=10, token=token) as client:
            assert client.infer("fixed", X)["output"].tolist() == [0.0, 1.0, 2.0]


def test_malformed_authorization_headers_are_unauthenticated(server: ServerThread) -> None:
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.InferenceStub(channel)
        request = pb.ListModelsRequest()
        for value in (
            "",
            "Bearer",
            "Bearer ",
            f"Basic {INFERENCE_TOKEN}",
            INFERENCE_TOKEN,
            f"Bearer {INFERENCE_TOKEN}x",
            f"Bearer {INFERENCE_TOKEN[:-1]}",
        ):
            md = (("authorization", value),)
            assert code_of(lambda md=md: stub.ListModels(request, metadata=md, timeout=10)) is (
                grpc.StatusCode.UNAUTHENTICATED
            ), value
        ok = stub.ListModels(request, metadata=(("authorization", f"bearer  {INFERENCE_TOKEN}"),))
        assert [m.name for m in ok.models] == ["fixed"]
        # Two values: which one counts would be a guess (a proxy may read the other), the
        # right token first or last. The first was taken.
        right, wrong = f"Bearer {INFERENCE_TOKEN}", "Bearer guess"
        for pair in ((right, wrong), (wrong, right), (right, right)):
            md = tuple(("authorization", v) for v in pair)
            with pytest.raises(grpc.RpcError) as info:
                stub.ListModels(request, metadata=md, timeout=10)
            assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED, pair
            assert "more than one authorization value" in (info.value.details() or ""), pair


def test_streams_are_checked_before_their_first_message(server: ServerThread) -> None:
    request = build_infer_request("fixed", X, request_id="r1")
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.InferenceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            list(stub.InferStream(iter([request]), timeout=10))
        assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED
        (answer,) = stub.InferStream(iter([request]), timeout=10, metadata=bearer(INFERENCE_TOKEN))
        assert answer.id == "r1" and not answer.HasField("error")
        # The SDK's stream carries the token too.
    with InferenceClient(server.target, timeout=10, token=INFERENCE_TOKEN) as client:
        results = dict(client.infer_many("fixed", [X, X]))
        assert sorted(results) == ["0", "1"]


def test_open_inference_protocol_and_reflection_follow_the_token(server: ServerThread) -> None:
    with grpc.insecure_channel(server.target) as channel:
        infer = channel.unary_unary(
            KSERVE + "ModelMetadata",
            request_serializer=kpb.ModelMetadataRequest.SerializeToString,
            response_deserializer=kpb.ModelMetadataResponse.FromString,
        )
        request = kpb.ModelMetadataRequest(name="fixed")
        assert code_of(lambda: infer(request, timeout=10)) is grpc.StatusCode.UNAUTHENTICATED
        assert infer(request, timeout=10, metadata=bearer(INFERENCE_TOKEN)).name == "fixed"
        reflect = channel.stream_stream(REFLECTION)
        message = b"\x3a\x00"  # ServerReflectionRequest{list_services: ""}
        assert code_of(lambda: list(reflect(iter([message]), timeout=10))) is (
            grpc.StatusCode.UNAUTHENTICATED
        )
        (listing,) = reflect(iter([message]), timeout=10, metadata=bearer(INFERENCE_TOKEN))
        assert b"ferry.v1.Inference" in listing


def test_unknown_methods_do_not_reveal_themselves_without_a_token(server: ServerThread) -> None:
    with grpc.insecure_channel(server.target) as channel:
        probe = channel.unary_unary("/ferry.v1.Secret/Nothing")
        assert code_of(lambda: probe(b"", timeout=10)) is grpc.StatusCode.UNAUTHENTICATED
        assert code_of(lambda: probe(b"", timeout=10, metadata=bearer(INFERENCE_TOKEN))) is (
            grpc.StatusCode.UNIMPLEMENTED
        )


@pytest.mark.parametrize(
    "method", [KSERVE + "ServerLiveX", KSERVE + "ServerReady/", KSERVE + "ServerReadyz"]
)
def test_a_name_that_only_begins_like_an_open_method_needs_the_token(
    server: ServerThread, method: str
) -> None:
    """ServerLive and ServerReady are open by name, not as prefixes: a prefix match let
    ``.../ServerLiveX`` past the token check (only "method not found" stopped it)."""
    with grpc.insecure_channel(server.target) as channel:
        probe = channel.unary_unary(method)
        assert code_of(lambda: probe(b"", timeout=10)) is grpc.StatusCode.UNAUTHENTICATED


def test_management_refuses_the_inference_token(server: ServerThread) -> None:
    with (
        RepositoryClient(server.management_target, timeout=30) as anonymous,
        pytest.raises(AuthenticationError),
    ):
        anonymous.refresh()
    with RepositoryClient(server.management_target, timeout=30, token=INFERENCE_TOKEN) as client:
        with pytest.raises(PermissionDeniedError) as info:
            client.load_model("fixed")
        assert info.value.code is grpc.StatusCode.PERMISSION_DENIED
        assert "management token" in info.value.message
    with RepositoryClient(server.management_target, timeout=30, token=MANAGEMENT_TOKEN) as admin:
        admin.refresh()
    with grpc.insecure_channel(server.management_target) as channel:
        conv = cpb_grpc.ModelConversionStub(channel)
        jobs = cpb.ListJobsRequest()
        watch = cpb.WatchJobRequest(job_id="nope")
        load = channel.unary_unary(
            KSERVE + "RepositoryModelLoad",
            request_serializer=kpb.RepositoryModelLoadRequest.SerializeToString,
            response_deserializer=kpb.RepositoryModelLoadResponse.FromString,
        )
        for token, expected in (
            (None, grpc.StatusCode.UNAUTHENTICATED),
            (INFERENCE_TOKEN, grpc.StatusCode.PERMISSION_DENIED),
        ):
            md = bearer(token) if token else None
            assert code_of(lambda md=md: conv.ListJobs(jobs, timeout=10, metadata=md)) is expected
            assert code_of(lambda md=md: list(conv.WatchJob(watch, timeout=10, metadata=md))) is (
                expected
            )
            assert (
                code_of(
                    lambda md=md: conv.UploadModel(
                        iter([cpb.UploadModelRequest()]), timeout=10, metadata=md
                    )
                )
                is expected
            )
            req = kpb.RepositoryModelLoadRequest(model_name="fixed")
            assert code_of(lambda md=md, req=req: load(req, timeout=30, metadata=md)) is expected
        assert conv.ListJobs(jobs, timeout=10, metadata=bearer(MANAGEMENT_TOKEN)) is not None


def _oip_health(target: str, metadata: tuple[tuple[str, str], ...] = ()) -> list[object]:
    """ServerLive and ServerReady of the Open Inference Protocol over gRPC: each its answer's
    flag, or the status code that refused it."""
    out: list[object] = []
    with grpc.insecure_channel(target) as channel:
        for method, req, reply in (
            ("ServerLive", kpb.ServerLiveRequest, kpb.ServerLiveResponse),
            ("ServerReady", kpb.ServerReadyRequest, kpb.ServerReadyResponse),
        ):
            call = channel.unary_unary(
                KSERVE + method,
                request_serializer=req.SerializeToString,
                response_deserializer=reply.FromString,
            )
            try:
                answer = call(req(), timeout=10, metadata=metadata)
            except grpc.RpcError as exc:
                out.append(exc.code())
            else:
                out.append(answer.live if method == "ServerLive" else answer.ready)
    return out


def test_open_inference_protocol_health_is_open_as_its_http_paths_are(
    server: ServerThread,
) -> None:
    """/v2/health/live and /ready answer a probe without a token; their gRPC forms were refused
    UNAUTHENTICATED, so a KServe or Triton gRPC probe failed on a serving replica."""
    assert _oip_health(server.target) == [True, True]
    with grpc.insecure_channel(server.target) as channel:  # the rest still needs the token
        metadata = channel.unary_unary(
            KSERVE + "ServerMetadata",
            request_serializer=kpb.ServerMetadataRequest.SerializeToString,
            response_deserializer=kpb.ServerMetadataResponse.FromString,
        )
        assert code_of(lambda: metadata(kpb.ServerMetadataRequest(), timeout=10)) is (
            grpc.StatusCode.UNAUTHENTICATED
        )


def test_health_can_require_the_token(repo: Path) -> None:
    with ServerThread(repo, inference_token=INFERENCE_TOKEN, health_requires_token=True) as srv:
        with InferenceClient(srv.target, timeout=10) as anonymous:
            assert not anonymous.ready()
        with InferenceClient(srv.target, timeout=10, token=INFERENCE_TOKEN) as client:
            assert client.ready()
        refused = grpc.StatusCode.UNAUTHENTICATED
        assert _oip_health(srv.target) == [refused, refused]
        assert _oip_health(srv.target, bearer(INFERENCE_TOKEN)) == [True, True]


def test_tokens_from_files(repo: Path, tmp_path: Path) -> None:
    inf, mgmt = tmp_path / "inference.token", tmp_path / "management.token"
    inf.write_text("file-inference-token\n")
    mgmt.write_text("  file-management-token\n\n")
    with ServerThread(repo, inference_token_file=str(inf), management_token_file=str(mgmt)) as srv:
        with InferenceClient(srv.target, timeout=10, token="file-inference-token") as client:
            assert client.infer("fixed", X)["output"].shape == (3,)
        with RepositoryClient(srv.management_target, token="file-management-token") as admin:
            admin.refresh()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"inference_token": "a", "inference_token_file": "/x"}, "not both"),
        ({"tls_cert_file": "/x.pem"}, "tls_key_file"),
        ({"tls_client_ca_file": "/ca.pem"}, "tls_cert_file"),
        ({"management_host": "0.0.0.0"}, "FERRY_MANAGEMENT_TOKEN"),
        ({"management_host": "::"}, "FERRY_MANAGEMENT_TOKEN"),
        ({"management_host": "ferry.example.com"}, "FERRY_MANAGEMENT_TOKEN"),
        ({"management_host": "0.0.0.0", "inference_token": "x"}, "--management-host 127.0.0.1"),
    ],
)
def test_unsafe_or_inconsistent_settings_are_refused(
    settings: dict[str, str], message: str, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match=message):
        Settings(repository=tmp_path, **settings)  # type: ignore[arg-type]


def test_management_off_loopback_needs_a_token_or_mutual_tls(tmp_path: Path, certs: Certs) -> None:
    Settings(repository=tmp_path, management_host="0.0.0.0", management_token="t")
    Settings(
        repository=tmp_path, management_host="0.0.0.0", management_port=-1,
        management_http_port=-1,
    )  # fmt: skip
    # Management off is both its listeners: nothing of it listens on 0.0.0.0.
    off = Settings(repository=tmp_path, management_host="0.0.0.0", management_port=-1)
    assert off.management_http_port == -1
    Settings(
        repository=tmp_path, management_host="0.0.0.0", tls_cert_file=str(certs.server_cert),
        tls_key_file=str(certs.server_key), management_tls_client_ca_file=str(certs.ca),
    )  # fmt: skip
    for host in ("127.0.0.1", "127.8.0.1", "::1", "[::1]", "localhost"):
        assert is_loopback(host), host
        Settings(repository=tmp_path, management_host=host)
    for host in ("0.0.0.0", "::", "10.0.0.1", "example.com", ""):
        assert not is_loopback(host), host


def test_equal_or_empty_tokens_stop_the_start(repo: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty.token"
    empty.write_text("\n")
    for settings, message in (
        ({"inference_token": "same", "management_token": "same"}, "different tokens"),
        ({"inference_token_file": str(empty)}, "is empty"),
        ({"management_token_file": str(tmp_path / "missing")}, "cannot read"),
        # No client could send these: every call was refused as a wrong token.
        ({"management_token": "admin "}, "no spaces around it"),
        ({"inference_token": "\tsecret"}, "no spaces around it"),
        ({"management_token": "s\u00e9same"}, "printable ASCII"),
        ({"inference_token": "a\x01b"}, "printable ASCII"),
    ):
        srv = ServerThread(repo, **settings)
        with pytest.raises((ValueError, OSError), match=message):
            srv.start()
        srv.stop()


@pytest.mark.parametrize("token", ["tok\ten", "s\u00e9same", "a\x01b"])
def test_the_sdk_refuses_a_token_grpc_cannot_send(token: str) -> None:
    """gRPC refuses such metadata in the client, which the SDK reported as the server's
    INTERNAL ('Invalid metadata') on every call, though no call ever left."""
    with pytest.raises(ValueError, match="printable ASCII"):
        InferenceClient("127.0.0.1:1", token=token)
    with pytest.raises(ValueError, match="printable ASCII"):
        RepositoryClient("127.0.0.1:1", token=token)


def test_the_cli_refuses_exposed_management_in_one_line(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ferry.server", "--repository", str(tmp_path),
         "--management-host", "0.0.0.0"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "FERRY_MANAGEMENT_TOKEN" in lines[0] and "--management-token-file" in lines[0]


def test_tokens_come_from_the_environment_and_never_show(tmp_path: Path) -> None:
    import argparse

    env = {"FERRY_INFERENCE_TOKEN": "env-secret", "FERRY_MANAGEMENT_TOKEN": "env-admin"}
    s = Settings.from_env(env, repository=tmp_path)
    assert (s.inference_token, s.management_token) == ("env-secret", "env-admin")
    assert "env-secret" not in repr(s) and "env-admin" not in repr(s)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    flags = {a for action in parser._actions for a in action.option_strings}
    assert "--inference-token" not in flags and "--management-token" not in flags
    assert "--inference-token-file" in flags and "--management-token-file" in flags


def test_the_sdks_configuration_never_shows_its_token_or_private_key(certs: Certs) -> None:
    """ChannelConfig's repr carried the bearer token and TLSConfig's a client key given as
    bytes: whatever printed or logged a client's configuration (an error report capturing
    locals, a debug line) leaked the secret. The server's Settings already hid its tokens."""
    from ferry.client import ChannelConfig, TLSConfig

    key = certs.client_key.read_bytes()
    tls = TLSConfig(ca_cert=certs.ca, client_cert=certs.client_cert, client_key=key)
    config = ChannelConfig("127.0.0.1:8001", tls=tls, token="sdk-secret-token")
    shown = repr(config) + str(config) + repr(tls)
    assert "sdk-secret-token" not in shown
    assert key.decode() not in shown and "PRIVATE KEY" not in shown
    assert "127.0.0.1:8001" in shown  # the rest still shows
