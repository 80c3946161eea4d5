"""Server and model description RPCs, statistics, unimplemented extensions, repository control."""

from __future__ import annotations

import base64
import json
import queue
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tg
from kserve_common import DATATYPES, STATS_MODEL, http_call, identity_name
from serverutil import ServerThread
from tritonclient.grpc import model_config_pb2 as triton_config
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from ferry.server.core.repository import MODEL_FILE, ModelRepository
from ferry.server.examples import identity_model, write_model

WAIT = 30.0


def test_server_live_ready_and_metadata(triton: tg.InferenceServerClient) -> None:
    assert triton.is_server_live()
    assert triton.is_server_ready()
    meta = triton.get_server_metadata()
    assert meta.name == "ferry"
    assert meta.version
    assert {"model_repository", "model_configuration", "statistics"} <= set(meta.extensions)


def test_model_ready(triton: tg.InferenceServerClient) -> None:
    assert triton.is_model_ready("mlp")
    assert triton.is_model_ready("mlp", "1")
    assert not triton.is_model_ready("mlp", "2")
    assert not triton.is_model_ready("no_such_model")


def test_model_metadata_includes_the_batch_dim(triton: tg.InferenceServerClient) -> None:
    meta = triton.get_model_metadata("two_io")
    assert meta.name == "two_io"
    assert list(meta.versions) == ["1"]
    assert meta.platform == "onnxruntime_onnx"
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
        ("a", "FP32", [-1, 4]),
        ("b", "INT64", [-1, 4]),
    ]
    assert [(t.name, t.datatype) for t in meta.outputs] == [("sum", "FP32"), ("scaled", "INT64")]
    for datatype in DATATYPES:
        (tensor,) = triton.get_model_metadata(identity_name(datatype)).inputs
        assert tensor.datatype == datatype
    with pytest.raises(InferenceServerException) as exc:
        triton.get_model_metadata("no_such_model")
    assert str(exc.value.status()) == "StatusCode.NOT_FOUND"


def test_model_config_subset(triton: tg.InferenceServerClient) -> None:
    config = triton.get_model_config("two_io").config
    assert config.name == "two_io"
    assert config.platform == "onnxruntime_onnx"
    assert config.backend == "onnxruntime"
    assert config.max_batch_size == 32
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [
        ("a", triton_config.TYPE_FP32, [4]),  # batch dim excluded when batching
        ("b", triton_config.TYPE_INT64, [4]),
    ]
    assert [(o.name, o.data_type, list(o.dims)) for o in config.output] == [
        ("sum", triton_config.TYPE_FP32, [4]),
        ("scaled", triton_config.TYPE_INT64, [4]),
    ]
    (group,) = config.instance_group
    assert (group.count, group.kind) == (1, triton_config.ModelInstanceGroup.KIND_CPU)
    assert config.WhichOneof("scheduling_choice") == "dynamic_batching"
    assert config.HasField("model_transaction_policy")
    assert not config.model_transaction_policy.decoupled
    assert config.version_policy.latest.num_versions == 1

    stats_config = triton.get_model_config(STATS_MODEL).config
    batching = stats_config.dynamic_batching
    assert stats_config.max_batch_size == 8
    assert batching.max_queue_delay_microseconds == 500_000
    assert batching.default_queue_policy.max_queue_size == 1024
    assert batching.default_queue_policy.timeout_action == triton_config.ModelQueuePolicy.REJECT

    fixed = triton.get_model_config("fixed").config  # no batch dim: dims are the full shape
    assert fixed.max_batch_size == 0
    assert list(fixed.input[0].dims) == [3]
    assert fixed.WhichOneof("scheduling_choice") is None

    strings = triton.get_model_config(identity_name("BYTES")).config
    assert strings.input[0].data_type == triton_config.TYPE_STRING


def test_statistics_after_batched_concurrent_load(triton: tg.InferenceServerClient) -> None:
    """Triton's semantics, read back from the core's counters: requests vs batch elements vs
    executions must agree with each other and with what was sent."""
    sizes = [1 + i % 2 for i in range(24)]  # batches of 1 and 2 elements
    done: queue.Queue[Any] = queue.Queue()
    for i, size in enumerate(sizes):
        tensor = tg.InferInput("input", [size, 4], "FP32")
        tensor.set_data_from_numpy(np.full((size, 4), i, np.float32))
        triton.async_infer(
            STATS_MODEL, [tensor], callback=lambda result, error: done.put(error), request_id=str(i)
        )
    errors = [done.get(timeout=WAIT) for _ in sizes]
    assert errors == [None] * len(sizes)

    (stats,) = triton.get_inference_statistics(STATS_MODEL).model_stats
    inference = stats.inference_stats
    assert (stats.name, stats.version) == (STATS_MODEL, "1")
    assert stats.last_inference > 0
    assert inference.success.count == len(sizes)
    assert inference.fail.count == 0
    assert inference.queue.count == len(sizes)
    for duration in (inference.compute_input, inference.compute_infer, inference.compute_output):
        assert duration.count == len(sizes)  # one per request, as Triton counts
    assert stats.inference_count == sum(sizes)  # batch elements, not requests
    assert stats.inference_count >= stats.execution_count
    assert sum(b.compute_infer.count for b in stats.batch_stats) == stats.execution_count
    assert sum(b.batch_size * b.compute_infer.count for b in stats.batch_stats) == sum(sizes)
    assert all(1 <= b.batch_size <= 8 for b in stats.batch_stats)


def test_statistics_of_every_model_and_of_an_unknown_one(triton: tg.InferenceServerClient) -> None:
    names = {s.name for s in triton.get_inference_statistics("").model_stats}
    assert {"mlp", "two_io", "fixed", STATS_MODEL} <= names
    with pytest.raises(InferenceServerException) as exc:
        triton.get_inference_statistics("no_such_model")
    assert str(exc.value.status()) == "StatusCode.NOT_FOUND"


def test_statistics_of_a_model_whose_versions_all_failed_say_why(tmp_path: Path) -> None:
    """Not an empty list (a client reading its one entry, as perf_analyzer does, would take it
    for a broken server): the reason, as the model's metadata and a named version's statistics
    give it. Every model's statistics leave it out."""
    repo = ModelRepository(tmp_path / "repo")
    write_model(repo, "alpha", identity_model("FP32"))
    (repo.model_dir("broken") / "1").mkdir(parents=True)
    (repo.model_dir("broken") / "1" / MODEL_FILE).write_bytes(b"not an onnx model")
    with ServerThread(repo.root) as srv:
        client = tg.InferenceServerClient(srv.target)
        try:
            for version in ("", "1"):
                with pytest.raises(InferenceServerException) as exc:
                    client.get_inference_statistics("broken", version)
                assert str(exc.value.status()) == "StatusCode.UNAVAILABLE"
                assert "'broken' version 1 is FAILED" in exc.value.message()
            names = [s.name for s in client.get_inference_statistics("").model_stats]
        finally:
            client.close()
        status, _, body = http_call(srv.http_target, "GET", "/v2/models/broken/stats")
    assert names == ["alpha"]
    assert status == 503 and "is FAILED" in json.loads(body)["error"]


@pytest.mark.parametrize(
    "call",
    [
        lambda c: c.get_system_shared_memory_status(),
        lambda c: c.register_system_shared_memory("region", "/ferry_shm", 64),
        lambda c: c.unregister_system_shared_memory("region"),
        lambda c: c.get_cuda_shared_memory_status(),
        lambda c: c.register_cuda_shared_memory("region", base64.b64encode(b"handle"), 0, 64),
        lambda c: c.unregister_cuda_shared_memory("region"),
        lambda c: c.get_trace_settings(),
        lambda c: c.get_log_settings(),
    ],
)
def test_unimplemented_extensions_say_so(triton: tg.InferenceServerClient, call: Any) -> None:
    with pytest.raises(InferenceServerException) as exc:
        call(triton)
    assert str(exc.value.status()) == "StatusCode.UNIMPLEMENTED"
    assert "Ferry does not" in exc.value.message()


# ---- repository control: a server of its own, since these tests change what it serves ----


@pytest.fixture
def repo_server(tmp_path: Path) -> Any:
    repo = ModelRepository(tmp_path / "repo")
    write_model(repo, "alpha", identity_model("FP32"))
    write_model(repo, "beta", identity_model("INT64"))
    with ServerThread(repo.root) as srv:
        yield repo, srv


def test_repository_control_is_refused_on_the_inference_listener(repo_server: Any) -> None:
    _, srv = repo_server
    client = tg.InferenceServerClient(srv.target)
    index = client.get_model_repository_index()
    assert [(m.name, m.version, m.state) for m in index.models] == [
        ("alpha", "1", "READY"),
        ("beta", "1", "READY"),
    ]
    for call in (client.load_model, client.unload_model):
        with pytest.raises(InferenceServerException) as exc:
            call("alpha")
        assert str(exc.value.status()) == "StatusCode.PERMISSION_DENIED"
        assert f"management listener ({srv.management_target})" in exc.value.message()
    assert client.is_model_ready("alpha")


def test_repository_index_load_and_unload_on_the_management_listener(repo_server: Any) -> None:
    repo, srv = repo_server
    manager = tg.InferenceServerClient(srv.management_target)
    inference = tg.InferenceServerClient(srv.target)
    assert manager.is_model_ready("alpha")  # the full service is on this listener too

    manager.unload_model("alpha")
    assert not inference.is_model_ready("alpha")
    # As Triton's: unloading a model that is not loaded, or not there, is OK with nothing done.
    manager.unload_model("alpha")
    manager.unload_model("no_such_model")
    index = {m.name: m for m in manager.get_model_repository_index().models}
    assert (index["alpha"].state, index["alpha"].reason) == ("UNAVAILABLE", "unloaded")
    with grpc.insecure_channel(srv.management_target) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        ready = stub.RepositoryIndex(service_pb2.RepositoryIndexRequest(ready=True)).models
    assert [m.name for m in ready] == ["beta"]

    manager.load_model("alpha")
    assert inference.is_model_ready("alpha")

    with pytest.raises(InferenceServerException) as exc:
        manager.load_model("no_such_model")
    assert str(exc.value.status()) == "StatusCode.NOT_FOUND"
    with pytest.raises(InferenceServerException) as exc:
        manager.load_model("alpha", config='{"max_batch_size": 4}')
    assert str(exc.value.status()) == "StatusCode.UNIMPLEMENTED"

    broken = repo.model_dir("gamma") / "1"
    broken.mkdir(parents=True)
    (broken / MODEL_FILE).write_bytes(b"not an onnx file")
    with pytest.raises(InferenceServerException) as exc:
        manager.load_model("gamma")
    assert str(exc.value.status()) == "StatusCode.FAILED_PRECONDITION"
    assert "gamma" in exc.value.message()
    index = {m.name: m for m in manager.get_model_repository_index().models}
    assert index["gamma"].state == "UNAVAILABLE"
    assert index["gamma"].reason


def test_the_index_says_why_a_model_whose_versions_were_deleted_is_unavailable(
    repo_server: Any,
) -> None:
    """Its row was UNAVAILABLE with an empty reason (gRPC and HTTP), where a request for the
    model was told it has no version folders."""
    from ferry.client import ConversionClient

    _, srv = repo_server
    with ConversionClient(srv.management_target, timeout=60) as conversion:
        conversion.delete_version("alpha", 1)
    manager = tg.InferenceServerClient(srv.management_target)
    with pytest.raises(InferenceServerException) as exc:
        manager.get_model_metadata("alpha")
    told = exc.value.message().rpartition("has no version ready: ")[2]
    assert told
    index = {m.name: m for m in manager.get_model_repository_index().models}
    assert (index["alpha"].state, index["alpha"].reason) == ("UNAVAILABLE", told)
    status, _, body = http_call(srv.management_http_target, "POST", "/v2/repository/index", b"{}")
    assert status == 200
    rows = {row["name"]: row for row in json.loads(body)}
    assert (rows["alpha"]["state"], rows["alpha"]["reason"]) == ("UNAVAILABLE", told)


def test_planned_batch_sizes_are_the_configs_preferred_batch_sizes(tmp_path: Path) -> None:
    """The batcher sends a partial batch that reaches a planned size at once, as Triton's
    dynamic batcher does at a preferred size; the config a Triton user reads says so (gRPC and
    HTTP), and a model without planned sizes lists none."""
    repo = ModelRepository(tmp_path / "repo")
    config = {"batching": {"max_batch_size": 8, "planned_batch_sizes": [2, 4, 8]}}
    write_model(repo, "planned", identity_model("FP32"), config=config)
    write_model(repo, "unplanned", identity_model("FP32"), config={"batching": {}})
    with ServerThread(repo.root) as srv:
        client = tg.InferenceServerClient(srv.target)
        try:
            batching = client.get_model_config("planned").config.dynamic_batching
            assert list(batching.preferred_batch_size) == [2, 4, 8]
            unplanned = client.get_model_config("unplanned").config.dynamic_batching
            assert list(unplanned.preferred_batch_size) == []
        finally:
            client.close()
        status, _, body = http_call(srv.http_target, "GET", "/v2/models/planned/config")
    assert status == 200
    assert json.loads(body)["dynamic_batching"]["preferred_batch_size"] == [2, 4, 8]


def test_the_config_states_the_priority_levels_in_force(tmp_path: Path) -> None:
    """The queue orders every priority a request carries (1 first) and queues one without a
    priority at batching.default_priority, but the config said priority_levels 0 (Triton's
    "priorities off") and default_priority_level 0 (outside Triton's [1, priority_levels])."""
    repo = ModelRepository(tmp_path / "repo")
    write_model(
        repo, "urgent", identity_model("FP32"), config={"batching": {"default_priority": 3}}
    )
    with ServerThread(repo.root) as srv:
        client = tg.InferenceServerClient(srv.target)
        try:
            batching = client.get_model_config("urgent").config.dynamic_batching
        finally:
            client.close()
        status, _, body = http_call(srv.http_target, "GET", "/v2/models/urgent/config")
    assert (batching.priority_levels, batching.default_priority_level) == (2**64 - 1, 3)
    assert status == 200
    http = json.loads(body)["dynamic_batching"]
    assert (http["priority_levels"], http["default_priority_level"]) == (2**64 - 1, 3)


def test_without_a_management_listener_repository_control_says_so(tmp_path: Path) -> None:
    repo = ModelRepository(tmp_path / "repo")
    write_model(repo, "alpha", identity_model("FP32"))
    with ServerThread(repo.root, management_port=-1) as srv:
        client = tg.InferenceServerClient(srv.target)
        with pytest.raises(InferenceServerException) as exc:
            client.unload_model("alpha")
        assert str(exc.value.status()) == "StatusCode.PERMISSION_DENIED"
        assert "management_port = -1" in exc.value.message()


def test_stream_with_one_slot_answers_every_request(tmp_path: Path) -> None:
    """A slot is held until its response is written: with one slot the stream runs requests one
    at a time, and still answers all of them."""
    repo = ModelRepository(tmp_path / "repo")
    write_model(repo, "alpha", identity_model("FP32"))
    with ServerThread(repo.root, max_stream_in_flight=1) as srv:
        client = tg.InferenceServerClient(srv.target)
        received: queue.Queue[Any] = queue.Queue()
        client.start_stream(callback=lambda result, error: received.put((result, error)))
        try:
            for i in range(6):
                tensor = tg.InferInput("input", [1, 2], "FP32")
                tensor.set_data_from_numpy(np.full((1, 2), i, np.float32))
                client.async_stream_infer("alpha", [tensor], request_id=str(i))
            answers = [received.get(timeout=WAIT) for _ in range(6)]
        finally:
            client.stop_stream()
    assert [error for _, error in answers] == [None] * 6
    assert sorted(int(r.get_response().id) for r, _ in answers) == list(range(6))
