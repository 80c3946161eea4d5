"""The repository as a served folder: refresh on request (management listener), version
policies, default versions, model configs and their errors, seen through the public RPCs."""

from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
from helpers import StartServer, hold_loads, make_repo, reference, write_config
from onnx import TensorProto, helper
from serverutil import ServerThread
from tritonclient.grpc import service_pb2 as kserve_pb2
from tritonclient.grpc import service_pb2_grpc as kserve_pb2_grpc

from ferry.client import (
    ConversionClient,
    ConversionError,
    FailedPreconditionError,
    FerryError,
    InferenceClient,
    InvalidInputError,
    ModelNotFoundError,
    RepositoryClient,
    UnimplementedError,
)
from ferry.proto.v1 import repository_pb2, repository_pb2_grpc
from ferry.server.core.repository import ModelRepository
from ferry.server.examples import identity_model, mlp_model, seed_model, write_model

SEED_IN = {"input": np.ones((1, 3), np.float32)}


@pytest.fixture
def clients(server: ServerThread) -> Iterator[tuple[InferenceClient, RepositoryClient]]:
    with (
        InferenceClient(server.target, timeout=30) as client,
        RepositoryClient(server.management_target, timeout=60) as repo,
    ):
        yield client, repo


def _listing(client: InferenceClient, model: str = "") -> dict[tuple[str, int], str]:
    return {(m.name, m.version): m.state for m in client.list_models(model)}


def test_new_version_after_start_is_served_after_refresh(
    repo_path: Path, clients: tuple[InferenceClient, RepositoryClient]
) -> None:
    client, repo = clients
    write_model(ModelRepository(repo_path), "mlp", mlp_model(seed=5), version=2)
    assert _listing(client, "mlp") == {("mlp", 1): "READY"}  # nothing changes until asked
    result = repo.refresh()
    assert list(result.loaded) == ["mlp/2"]
    assert list(result.unloaded) == ["mlp/1"]  # the default policy serves the latest only
    assert list(result.failed) == []
    assert _listing(client, "mlp") == {("mlp", 2): "READY"}
    out = client.infer("mlp", {"input": np.ones((1, 64), np.float32)})
    assert out.version == 2
    with pytest.raises(ModelNotFoundError):
        client.infer("mlp", {"input": np.ones((1, 64), np.float32)}, version=1)


def test_removed_model_is_not_found_after_refresh(
    repo_path: Path, clients: tuple[InferenceClient, RepositoryClient]
) -> None:
    client, repo = clients
    shutil.rmtree(repo_path / "two_io")
    assert list(repo.refresh().unloaded) == ["two_io/1"]
    with pytest.raises(ModelNotFoundError):
        client.infer("two_io", {"a": np.ones((1, 4), np.float32)})
    with pytest.raises(ModelNotFoundError):
        client.model_metadata("two_io")
    assert ("two_io", 1) not in _listing(client)


def test_a_model_whose_version_folders_were_deleted_says_why_everywhere(
    repo_path: Path, server: ServerThread, clients: tuple[InferenceClient, RepositoryClient]
) -> None:
    """GetModel of a model whose version folders were all deleted answered no version and no
    reason, and ListModels left the model out, while the repository index said it was
    UNAVAILABLE and why. Each says the same reason now, as do metadata and ready."""
    client, repo = clients
    shutil.rmtree(repo_path / "two_io" / "1")
    assert list(repo.refresh().unloaded) == ["two_io/1"]
    why = "no version folders (<model>/<N>/model.onnx)"
    with ConversionClient(server.management_target, timeout=30) as conversion:
        info = conversion.get_model("two_io")
    assert (info.versions, info.reason) == ((), why)
    (row,) = client.list_models("two_io")
    assert (row.version, row.state, row.reason) == (0, "UNLOADED", why)
    assert [m for m in client.list_models() if m.name == "two_io"] == [row]
    with grpc.insecure_channel(server.management_target) as channel:
        stub = kserve_pb2_grpc.GRPCInferenceServiceStub(channel)
        index = stub.RepositoryIndex(kserve_pb2.RepositoryIndexRequest(), timeout=30)
        (entry,) = [m for m in index.models if m.name == "two_io"]
        assert (entry.state, entry.reason) == ("UNAVAILABLE", why)
    with grpc.insecure_channel(server.target) as channel:
        stub = kserve_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as error:
            stub.ModelMetadata(kserve_pb2.ModelMetadataRequest(name="two_io"), timeout=30)
        assert why in str(error.value.details())
    for path in ("/v2/models/two_io", "/v2/models/two_io/ready"):
        request = urllib.request.Request(f"http://{server.http_target}{path}")
        with pytest.raises(urllib.error.HTTPError) as http_error:
            urllib.request.urlopen(request, timeout=30)
        assert http_error.value.code == 503
        assert why in json.loads(http_error.value.read())["error"]


def test_new_model_folder_is_loaded_by_refresh(
    repo_path: Path, clients: tuple[InferenceClient, RepositoryClient]
) -> None:
    client, repo = clients
    repository = ModelRepository(repo_path)
    repository.model_dir("seed").mkdir()  # the folder can be seen before its first version
    assert list(repo.refresh().loaded) == []
    write_model(repository, "seed", seed_model())
    assert list(repo.refresh().loaded) == ["seed/1"]
    assert client.infer("seed", SEED_IN)["logits"].shape == (1, 1)


def test_unload_and_load_by_request(clients: tuple[InferenceClient, RepositoryClient]) -> None:
    client, repo = clients
    repo.unload_model("fixed")
    with pytest.raises(ModelNotFoundError):
        client.infer("fixed", {"input": np.ones(3, np.float32)})
    assert list(repo.refresh().loaded) == []  # an explicit unload survives a refresh
    repo.load_model("fixed")
    assert client.infer("fixed", {"input": np.ones(3, np.float32)})["output"].shape == (3,)
    with pytest.raises(ModelNotFoundError):
        repo.unload_model("ghost")
    with pytest.raises(ModelNotFoundError):
        repo.load_model("ghost")
    with pytest.raises(InvalidInputError, match="invalid model name"):
        repo.load_model("../etc")


def test_a_model_that_fails_to_load_is_a_failed_precondition(
    repo_path: Path, clients: tuple[InferenceClient, RepositoryClient]
) -> None:
    """It was raised as ConversionError, the one class FAILED_PRECONDITION mapped to, although
    no conversion was involved."""
    _, repo = clients
    (repo_path / "broken" / "1").mkdir(parents=True)
    (repo_path / "broken" / "1" / "model.onnx").write_bytes(b"not an onnx file")
    with pytest.raises(FailedPreconditionError, match="no version ready") as info:
        repo.load_model("broken")
    assert not isinstance(info.value, ConversionError)
    assert info.value.code is grpc.StatusCode.FAILED_PRECONDITION


def test_management_service_is_not_on_the_inference_port(server: ServerThread) -> None:
    with grpc.insecure_channel(server.target) as channel:
        stub = repository_pb2_grpc.ModelRepositoryStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Refresh(repository_pb2.RefreshRequest(), timeout=10)
    assert info.value.code() is grpc.StatusCode.UNIMPLEMENTED
    with (
        RepositoryClient(server.target, timeout=10) as wrong,
        pytest.raises(UnimplementedError),
    ):
        wrong.refresh()


@pytest.mark.parametrize(
    ("policy", "served"),
    [
        (None, [3]),
        ({"latest": 2}, [2, 3]),
        ({"all": True}, [1, 2, 3]),
        ({"specific": [1, 3]}, [1, 3]),
    ],
)
def test_version_policies(
    tmp_path: Path, start_server: StartServer, policy: dict[str, object] | None, served: list[int]
) -> None:
    root = make_repo(tmp_path / "repo", {"seed": [seed_model(seed=v) for v in (1, 2, 3)]})
    if policy is not None:
        write_config(root, "seed", {"version_policy": policy})
    srv = start_server(root)
    with InferenceClient(srv.target, timeout=30) as client:
        statuses = client.list_models("seed")
        assert [m.version for m in statuses] == served
        assert [m.version for m in statuses if m.is_default] == [max(served)]
        meta = client.model_metadata("seed")
        assert (meta.version, meta.versions, meta.default_version) == (
            max(served),
            tuple(served),
            max(served),
        )
        for v in served:
            assert client.infer("seed", SEED_IN, version=v).version == v
        for v in sorted({1, 2, 3} - set(served)):
            with pytest.raises(ModelNotFoundError, match=f"version {v}"):
                client.infer("seed", SEED_IN, version=v)


def test_default_version_from_config(tmp_path: Path, start_server: StartServer) -> None:
    root = make_repo(tmp_path / "repo", {"seed": [seed_model(seed=1), seed_model(seed=2)]})
    write_config(root, "seed", {"version_policy": {"all": True}, "default_version": 1})
    srv = start_server(root)
    with InferenceClient(srv.target, timeout=30) as client:
        assert [m.version for m in client.list_models("seed") if m.is_default] == [1]
        assert client.infer("seed", SEED_IN).version == 1
        assert client.infer("seed", SEED_IN, version=2).version == 2
        meta = client.model_metadata("seed")
        assert (meta.version, meta.default_version) == (1, 1)
        assert client.model_metadata("seed", version=2).version == 2


def test_metadata_states_the_timeout_a_request_without_one_gets(
    tmp_path: Path, start_server: StartServer
) -> None:
    """A model without default_timeout_ms reported 0 ("no default timeout") while every
    request without a deadline was cut at the server's --default-request-timeout; on both
    protocols the figure is now the one that applies."""
    root = make_repo(tmp_path / "repo", {"own": [seed_model()], "server": [seed_model()]})
    write_config(root, "own", {"batching": {"default_timeout_ms": 2500}})
    srv = start_server(root, default_request_timeout=7.0)
    with InferenceClient(srv.target, timeout=30) as client:
        assert client.model_metadata("own").batching.default_timeout == 2.5
        assert client.model_metadata("server").batching.default_timeout == 7.0
    with grpc.insecure_channel(srv.target) as channel:
        stub = kserve_pb2_grpc.GRPCInferenceServiceStub(channel)
        for name, micros in (("own", 2_500_000), ("server", 7_000_000)):
            config = stub.ModelConfig(kserve_pb2.ModelConfigRequest(name=name), timeout=30).config
            assert config.dynamic_batching.default_queue_policy.default_timeout_microseconds == (
                micros
            )


def test_config_error_fails_the_model_naming_the_key(
    tmp_path: Path, start_server: StartServer
) -> None:
    root = make_repo(tmp_path / "repo", {"seed": seed_model(), "mlp": mlp_model()})
    write_config(root, "seed", {"batching": {"max_batch_sise": 8}})
    srv = start_server(root)
    with (
        InferenceClient(srv.target, timeout=30) as client,
        RepositoryClient(srv.management_target) as repo,
    ):
        (status,) = client.list_models("seed")
        assert status.state == "FAILED"
        assert "max_batch_sise" in status.reason
        assert client.infer("mlp", {"input": np.ones((1, 64), np.float32)}).version == 1
        assert client.ready()
        write_config(root, "seed", {"batching": {"max_batch_size": 8}, "bogus": 1})
        failed = repo.refresh().failed  # version -> reason
        assert list(failed) == ["seed/1"]
        assert "bogus" in failed["seed/1"]
        write_config(root, "seed", {"batching": {"max_batch_size": 8}})
        assert list(repo.refresh().loaded) == ["seed/1"]
        assert client.model_metadata("seed").batching.max_batch_size == 8


def test_a_load_that_fails_is_an_error_though_the_old_load_serves(
    tmp_path: Path, start_server: StartServer
) -> None:
    """A reload whose new config is broken answered OK (tritonclient's load_model returned),
    so the caller believed it live; the reason showed only in the index."""
    root = make_repo(tmp_path / "repo", {"seed": seed_model()})
    srv = start_server(root)
    with (
        InferenceClient(srv.target, timeout=30) as client,
        RepositoryClient(srv.management_target) as repo,
    ):
        write_config(root, "seed", {"batching": {"max_batch_sise": 8}})
        with pytest.raises(FailedPreconditionError) as failed:
            repo.load_model("seed")
        assert "did not load as asked" in str(failed.value)
        assert "max_batch_sise" in str(failed.value)
        assert "version(s) 1 keep serving as before" in str(failed.value)
        assert client.infer("seed", SEED_IN).version == 1
        (status,) = client.list_models("seed")
        assert status.state == "READY" and "still serving previous load" in status.reason


def _identity(shape: list[int] | None) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_an_input_of_unknown_rank_is_refused_at_load_not_served_as_a_scalar(
    tmp_path: Path, start_server: StartServer
) -> None:
    """onnxruntime reports no shape as rank 0: the model was READY and refused every tensor
    ("must have shape [], got [2, 3]"). A real scalar input still serves."""
    root = make_repo(tmp_path / "repo", {"anyrank": _identity(None), "scalar": _identity([])})
    srv = start_server(root)
    with InferenceClient(srv.target, timeout=30) as client:
        (status,) = client.list_models("anyrank")
        assert status.state == "FAILED"
        assert "input 'x' declares no shape, so its rank is unknown" in status.reason
        x = np.float32(2.5)
        assert client.infer("scalar", {"x": x})["y"] == x


def test_model_without_a_batch_dimension(tmp_path: Path, start_server: StartServer) -> None:
    root = make_repo(
        tmp_path / "repo",
        {"fixed": identity_model("FP32", dims=(2, 3)), "dyn": identity_model("INT64")},
    )
    write_config(root, "dyn", {"batching": {"max_batch_size": 0}})
    srv = start_server(root)
    with InferenceClient(srv.target, timeout=30) as client:
        meta = client.model_metadata("fixed")
        assert meta.batching.max_batch_size == 0
        assert meta.inputs[0].shape == (2, 3)
        x = np.arange(6, dtype=np.float32).reshape(2, 3)
        np.testing.assert_array_equal(client.infer("fixed", {"input": x})["output"], x)
        with pytest.raises(InvalidInputError, match=r"\[2, 3\]"):
            client.infer("fixed", {"input": x[None]})
        # max_batch_size = 0 on a graph with dynamic dims: the first dim is not a batch, so any
        # size is accepted and requests run one at a time.
        assert client.model_metadata("dyn").batching.max_batch_size == 0
        big = np.arange(100 * 2, dtype=np.int64).reshape(100, 2)
        np.testing.assert_array_equal(client.infer("dyn", {"input": big})["output"], big)
        (s,) = client.statistics("dyn")
        assert (s.inference_count, s.execution_count) == (1, 1)


def test_request_larger_than_max_batch_size(tmp_path: Path, start_server: StartServer) -> None:
    root = make_repo(tmp_path / "repo", {"mlp": mlp_model()})
    write_config(root, "mlp", {"batching": {"max_batch_size": 4}})
    srv = start_server(root)
    with InferenceClient(srv.target, timeout=30) as client:
        assert client.infer("mlp", {"input": np.ones((4, 64), np.float32)})["logits"].shape[0] == 4
        with pytest.raises(InvalidInputError) as info:
            client.infer("mlp", {"input": np.ones((5, 64), np.float32)})
    assert info.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert "batch size 5" in info.value.message
    assert "max_batch_size 4" in info.value.message


def test_per_version_config_overrides_the_model_config(
    tmp_path: Path, start_server: StartServer
) -> None:
    root = make_repo(tmp_path / "repo", {"mlp": [mlp_model(), mlp_model(seed=1)]})
    write_config(root, "mlp", {"version_policy": {"all": True}, "batching": {"max_queue_size": 9}})
    (root / "mlp" / "2" / "config.json").write_text(
        json.dumps({"batching": {"max_batch_size": 4}, "instances": {"count": 2}})
    )
    srv = start_server(root)
    with InferenceClient(srv.target, timeout=30) as client:
        b1 = client.model_metadata("mlp", version=1).batching
        b2 = client.model_metadata("mlp", version=2).batching
        assert (b1.max_batch_size, b1.max_queue_size, b1.instance_count) == (32, 9, 1)
        assert (b2.max_batch_size, b2.max_queue_size, b2.instance_count) == (4, 9, 2)
        with pytest.raises(InvalidInputError, match="max_batch_size 4"):
            client.infer("mlp", {"input": np.ones((5, 64), np.float32)}, version=2)
        assert client.infer("mlp", {"input": np.ones((5, 64), np.float32)}, version=1).version == 1


def test_new_external_weights_are_loaded_by_refresh(
    tmp_path: Path, start_server: StartServer
) -> None:
    """A version over 2 GiB keeps its weights in model.onnx.data beside a graph file that new
    weights leave byte for byte the same: a refresh must see the weights file change too."""
    x = {"input": np.ones((1, 3), np.float32)}
    folder = tmp_path / "repo" / "seed" / "1"
    folder.mkdir(parents=True)

    def save(seed: int, where: Path) -> None:
        onnx.save_model(
            seed_model(seed=seed),
            str(where / "model.onnx"),
            save_as_external_data=True,
            location="model.onnx.data",
            size_threshold=0,
        )

    save(1, folder)
    srv = start_server(tmp_path / "repo")
    with (
        InferenceClient(srv.target, timeout=30) as client,
        RepositoryClient(srv.management_target, timeout=60) as repo,
    ):
        before = client.infer("seed", x)["logits"]
        other = tmp_path / "other"
        other.mkdir()
        save(9, other)
        assert (other / "model.onnx").read_bytes() == (folder / "model.onnx").read_bytes()
        (other / "model.onnx.data").replace(folder / "model.onnx.data")
        assert list(repo.refresh().loaded) == ["seed/1"]
        after = client.infer("seed", x)["logits"]
        assert not np.array_equal(before, after)
        np.testing.assert_allclose(after, reference(folder / "model.onnx", x)["logits"], rtol=1e-5)


def test_a_triton_config_alone_fails_the_model_instead_of_being_ignored(
    tmp_path: Path, start_server: StartServer
) -> None:
    """A Triton repository served as it is: its config.pbtxt's version policy (version 1 only)
    was ignored, and requests naming no version were answered OK by version 2."""
    root = make_repo(tmp_path / "repo", {"seed": [seed_model(seed=1), seed_model(seed=2)]})
    pbtxt = root / "seed" / "config.pbtxt"
    pbtxt.write_text('name: "seed"\nversion_policy: { specific: { versions: [1] } }\n')
    srv = start_server(root)
    with (
        InferenceClient(srv.target, timeout=30) as client,
        RepositoryClient(srv.management_target, timeout=60) as repo,
    ):
        (status,) = client.list_models("seed")
        assert status.state == "FAILED" and "config.pbtxt" in status.reason
        with pytest.raises(FerryError, match=r"config\.pbtxt"):
            client.infer("seed", SEED_IN)
        write_config(root, "seed", {"version_policy": {"specific": [1]}})
        assert list(repo.refresh().loaded) == ["seed/1"]  # a Ferry config beside it is read
        assert client.infer("seed", SEED_IN).version == 1
        (root / "seed" / "config.json").unlink()
        pbtxt.unlink()
        assert list(repo.refresh().loaded) == ["seed/2"]  # removed: Ferry's defaults
        assert client.infer("seed", SEED_IN).version == 2


def test_edits_naming_models_that_are_not_there_leave_nothing_behind(
    server: ServerThread,
) -> None:
    """DeleteModelVersion and SetDefaultVersion took a per-model lock before looking: every
    name a mistaken call gave was kept for the server's life, without bound."""
    from ferry.client import ConversionClient

    assert server.app is not None
    registry = server.app.registry
    before = len(registry._locks)
    with ConversionClient(server.management_target, timeout=30) as conversion:
        for i in range(50):
            with pytest.raises(ModelNotFoundError):
                conversion.delete_version(f"missing-{i}", 1)
            with pytest.raises(ModelNotFoundError):
                conversion.set_default_version(f"absent-{i}", 1)
    assert len(registry._locks) == before


def test_a_new_version_that_does_not_load_leaves_the_served_one_serving(
    tmp_path: Path, start_server: StartServer
) -> None:
    """Under ``latest = 1`` a broken (or half-copied) version 3 made a refresh unload version
    2, and every request naming no version failed until someone fixed the folder."""
    root = make_repo(tmp_path / "repo", {"seed": [seed_model(seed=1), seed_model(seed=2)]})
    srv = start_server(root)
    broken = root / "seed" / "3" / "model.onnx"
    with (
        InferenceClient(srv.target, timeout=30) as client,
        RepositoryClient(srv.management_target, timeout=60) as repo,
    ):
        broken.parent.mkdir()
        broken.write_bytes(b"not an onnx model")
        result = repo.refresh()
        assert list(result.failed) == ["seed/3"] and list(result.unloaded) == []
        states = {m.version: (m.state, m.reason) for m in client.list_models("seed")}
        assert states[3][0] == "FAILED"
        assert states[2] == (
            "READY",
            "kept serving: version(s) [3] of the version policy did not load",
        )
        assert client.infer("seed", SEED_IN).version == 2
        with pytest.raises(FailedPreconditionError, match=r"version\(s\) 2 keep serving"):
            repo.load_model("seed")
        onnx.save(seed_model(seed=3), str(broken))  # fixed: it takes over
        result = repo.refresh()
        assert (list(result.loaded), list(result.unloaded)) == (["seed/3"], ["seed/2"])
        assert client.infer("seed", SEED_IN).version == 3


def test_a_load_after_a_reload_failed_is_an_error_not_ok(
    tmp_path: Path, start_server: StartServer
) -> None:
    """model.onnx rewritten in place and broken: the refresh (or poll) that first tried it
    reported it, and every LoadModel after answered OK while the previous load kept serving."""
    root = make_repo(tmp_path / "repo", {"seed": seed_model()})
    srv = start_server(root)
    with (
        InferenceClient(srv.target, timeout=30) as client,
        RepositoryClient(srv.management_target, timeout=60) as repo,
    ):
        (root / "seed" / "1" / "model.onnx").write_bytes(b"half of a copy")
        assert list(repo.refresh().failed) == ["seed/1"]
        for _ in range(2):  # asked again, the same answer
            with pytest.raises(FailedPreconditionError, match=r"version\(s\) 1 keep serving"):
                repo.load_model("seed")
            assert list(repo.refresh().failed) == ["seed/1"]
        assert client.infer("seed", SEED_IN).version == 1


def test_a_folder_where_ferry_keeps_a_file_is_a_precondition_not_internal(
    tmp_path: Path, start_server: StartServer
) -> None:
    """``rollout.json`` or ``.deleted-versions`` made a folder by mistake: SetRollout and
    DeleteModelVersion answered INTERNAL with a traceback in the log."""
    from ferry.client import ConversionClient

    root = make_repo(tmp_path / "repo", {"seed": [seed_model(seed=1), seed_model(seed=2)]})
    srv = start_server(root)
    (root / "seed" / "rollout.json").mkdir()
    (root / "seed" / ".deleted-versions").mkdir()
    with (
        RepositoryClient(srv.management_target, timeout=60) as repo,
        ConversionClient(srv.management_target, timeout=60) as conversion,
    ):
        with pytest.raises(FailedPreconditionError, match=r"seed/rollout\.json is a folder"):
            repo.set_rollout("seed", {1: 1, 2: 1})
        with pytest.raises(FailedPreconditionError, match=r"seed/\.deleted-versions is a folder"):
            conversion.delete_version("seed", 1)
    assert sorted(p.name for p in (root / "seed").iterdir()) == [
        ".deleted-versions",
        "1",
        "2",
        "rollout.json",
    ]


def test_a_refresh_whose_caller_left_still_loads_the_new_version(tmp_path: Path) -> None:
    """The client's deadline passed while Refresh loaded a new version: cancelled, the version
    stayed LOADING for good (no later refresh loaded it) and version 1 kept every request.
    The refresh now runs to its end."""

    from helpers import wait_for

    from ferry.client import DeadlineExceededError
    from ferry.server.examples import seed_model

    root = make_repo(tmp_path / "repo", {"m": seed_model(seed=1)})
    with ServerThread(root) as server:
        assert server.app is not None
        registry = server.app.registry
        entered, gate = hold_loads(server, "2")
        shutil.copytree(root / "m" / "1", root / "m" / "2")
        with RepositoryClient(server.management_target, timeout=1.0) as repo:
            with pytest.raises(DeadlineExceededError):
                repo.refresh()
            assert entered.is_set()
            gate.set()
            wait_for(
                lambda: (
                    [(s.version, s.state.value) for s in registry.statuses("m")] == [(2, "READY")]
                ),
                "version 2 to serve in place of version 1",
            )
