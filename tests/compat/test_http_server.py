"""Server and model description over HTTP, statistics, unimplemented extensions, routes and
repository control, through tritonclient.http; each answer is compared with the gRPC one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as tg
import tritonclient.http as th
from google.protobuf import json_format
from kserve_common import DATATYPES, STATS_MODEL, http_call, identity_name
from serverutil import ServerThread
from tritonclient.grpc import model_config_pb2, service_pb2
from tritonclient.utils import InferenceServerException

from ferry.server.core.repository import MODEL_FILE, ModelRepository
from ferry.server.examples import identity_model, write_model


def _status(exc: pytest.ExceptionInfo[InferenceServerException]) -> str:
    return str(exc.value.status())


def _as_message(answer: Any, message: Any) -> Any:
    """An HTTP answer read into Triton's own protobuf message (unknown fields refused), to be
    compared with what tritonclient.grpc got for the same question."""
    return json_format.ParseDict(answer, message)


def test_server_live_ready_and_metadata(
    triton_http: th.InferenceServerClient, triton: tg.InferenceServerClient
) -> None:
    assert triton_http.is_server_live()
    assert triton_http.is_server_ready()
    meta = triton_http.get_server_metadata()
    assert meta["name"] == "ferry"
    assert meta["version"] == triton.get_server_metadata().version
    expected = {"model_repository", "model_configuration", "statistics", "binary_tensor_data"}
    assert expected <= set(meta["extensions"])


def test_model_ready_and_why_not(
    triton_http: th.InferenceServerClient, kserve_server: ServerThread
) -> None:
    assert triton_http.is_model_ready("mlp")
    assert triton_http.is_model_ready("mlp", "1")
    assert not triton_http.is_model_ready("mlp", "2")
    assert not triton_http.is_model_ready("no_such_model")
    target = kserve_server.http_target
    assert http_call(target, "GET", "/v2/models/mlp/ready")[::2] == (200, b"")
    status, headers, body = http_call(target, "GET", "/v2/models/no_such_model/ready")
    assert (status, headers["ferry-error"]) == (404, "MODEL_NOT_FOUND")
    assert http_call(target, "GET", "/v2/models/mlp/versions/2/ready")[0] == 404
    status, _, body = http_call(target, "GET", "/v2/models/mlp/versions/x1/ready")
    assert status == 400
    assert "invalid model version 'x1'" in json.loads(body)["error"]


def test_model_metadata_equals_the_grpc_answer(
    triton_http: th.InferenceServerClient, triton: tg.InferenceServerClient
) -> None:
    meta = triton_http.get_model_metadata("two_io")
    expected = triton.get_model_metadata("two_io")
    assert _as_message(meta, service_pb2.ModelMetadataResponse()) == expected
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta["inputs"]] == [
        ("a", "FP32", [-1, 4]),
        ("b", "INT64", [-1, 4]),
    ]
    assert triton_http.get_model_metadata("two_io", "1") == meta
    for datatype in DATATYPES:
        (tensor,) = triton_http.get_model_metadata(identity_name(datatype))["inputs"]
        assert tensor["datatype"] == datatype
    with pytest.raises(InferenceServerException) as exc:
        triton_http.get_model_metadata("no_such_model")
    assert _status(exc) == "404"


def test_model_config_equals_the_grpc_answer(
    triton_http: th.InferenceServerClient, triton: tg.InferenceServerClient
) -> None:
    for model in ("two_io", "fixed", STATS_MODEL, identity_name("BYTES")):
        config = triton_http.get_model_config(model)
        expected = triton.get_model_config(model).config
        assert _as_message(config, model_config_pb2.ModelConfig()) == expected
    config = triton_http.get_model_config("two_io")
    assert config["max_batch_size"] == 32  # a number, as perf_analyzer reads it
    assert [(i["name"], i["data_type"], i["dims"]) for i in config["input"]] == [
        ("a", "TYPE_FP32", [4]),
        ("b", "TYPE_INT64", [4]),
    ]
    assert config["model_transaction_policy"] == {"decoupled": False}
    fixed = triton_http.get_model_config("fixed")
    assert (fixed["max_batch_size"], fixed["input"][0]["dims"]) == (0, [3])
    with pytest.raises(InferenceServerException) as exc:
        triton_http.get_model_config("mlp", "7")
    assert _status(exc) == "404"


def test_statistics_count_http_requests(
    triton_http: th.InferenceServerClient, triton: tg.InferenceServerClient
) -> None:
    model = identity_name("INT16")
    (before,) = triton_http.get_inference_statistics(model)["model_stats"]
    tensor = th.InferInput("input", [2, 3], "INT16")
    tensor.set_data_from_numpy(np.ones((2, 3), np.int16))
    for _ in range(3):
        triton_http.infer(model, [tensor])
    (after,) = triton_http.get_inference_statistics(model, "1")["model_stats"]
    assert (after["name"], after["version"]) == (model, "1")
    success = after["inference_stats"]["success"]
    assert success["count"] == before["inference_stats"]["success"]["count"] + 3
    assert isinstance(success["ns"], int) and success["ns"] > 0  # numbers, not strings
    assert after["inference_count"] == before["inference_count"] + 6  # batch elements
    (via_grpc,) = triton.get_inference_statistics(model).model_stats
    assert via_grpc.inference_count == after["inference_count"]
    names = {s["name"] for s in triton_http.get_inference_statistics()["model_stats"]}
    assert {"mlp", "two_io", "fixed"} <= names
    with pytest.raises(InferenceServerException) as exc:
        triton_http.get_inference_statistics("no_such_model")
    assert _status(exc) == "404"


@pytest.mark.parametrize(
    "call",
    [
        lambda c: c.get_system_shared_memory_status(),
        lambda c: c.register_system_shared_memory("region", "/ferry_shm", 64),
        lambda c: c.unregister_system_shared_memory("region"),
        lambda c: c.get_cuda_shared_memory_status(),
        lambda c: c.unregister_cuda_shared_memory(),
        lambda c: c.get_trace_settings(),
        lambda c: c.get_trace_settings(model_name="mlp"),
        lambda c: c.update_trace_settings(settings={"trace_level": ["TIMESTAMPS"]}),
        lambda c: c.get_log_settings(),
        lambda c: c.update_log_settings({"log_verbose_level": 1}),
    ],
)
def test_unimplemented_extensions_say_so(triton_http: th.InferenceServerClient, call: Any) -> None:
    with pytest.raises(InferenceServerException) as exc:
        call(triton_http)
    assert _status(exc) == "501"
    assert "Ferry does not" in exc.value.message()


def test_the_generate_extension_is_501_not_404(kserve_server: ServerThread) -> None:
    """Triton's /generate and /generate_stream answered 404 "no endpoint", as if the path were
    a typo; like the other Triton extensions Ferry lacks, they say it is not supported."""
    for path in (
        "/v2/models/mlp/generate",
        "/v2/models/mlp/generate_stream",
        "/v2/models/mlp/versions/1/generate",
    ):
        status, headers, body = http_call(kserve_server.http_target, "POST", path, b"{}")
        assert (status, headers["ferry-error"]) == (501, "UNIMPLEMENTED"), path
        assert "generate extension" in json.loads(body)["error"]


def test_unknown_routes_and_wrong_methods(kserve_server: ServerThread) -> None:
    target = kserve_server.http_target
    for path in ("/", "/v1/models", "/v2/nothing", "/v2/models/mlp/versions", "/v2/models/mlp/x"):
        status, headers, body = http_call(target, "GET", path)
        assert status == 404, path
        assert "no Open Inference Protocol endpoint" in json.loads(body)["error"]
    status, headers, body = http_call(target, "GET", "/v2/models/mlp/infer")
    assert (status, headers["allow"]) == (405, "POST")
    status, headers, body = http_call(target, "POST", "/v2/models/mlp/config", b"{}")
    assert (status, headers["allow"]) == (405, "GET, HEAD")
    assert "use GET or HEAD" in json.loads(body)["error"]
    # Percent-encoded names are decoded: the model's own name answers.
    assert http_call(target, "GET", "/v2/models/%6D%6C%70")[0] == 200
    for path in ("/v2/models/%FF", "/v2/models/mlp/versions/%C3/ready"):  # not UTF-8
        status, headers, body = http_call(target, "GET", path)
        assert (status, headers["ferry-error"]) == (400, "INVALID_ARGUMENT"), path
        assert "is not percent-encoded UTF-8" in json.loads(body)["error"]


def test_an_empty_model_name_is_one_answer_on_every_model_route(
    kserve_server: ServerThread,
) -> None:
    """``/v2/models//stats`` answered every model's statistics, ``//infer`` read the body and
    judged it, ``//ready`` said "model '' is not served here". Triton's routes need a name
    (404 for each); Ferry answers each alike, naming what is missing, before any body."""
    target = kserve_server.http_target
    routes = [("GET", s) for s in ("", "/ready", "/config", "/stats", "/versions/1/ready")]
    for method, suffix in [*routes, ("POST", "/infer"), ("POST", "/versions/1/infer")]:
        path = f"/v2/models/{suffix}"
        status, headers, body = http_call(target, method, path, b"not json" * 100)
        assert (status, headers["ferry-error"]) == (404, "MODEL_NOT_FOUND"), path
        assert f"{path!r} names no model" in json.loads(body)["error"], path
    assert http_call(target, "GET", "/v2/models/stats")[0] == 200  # every model's, as Triton


def test_an_empty_version_is_one_answer_on_every_versioned_route(
    kserve_server: ServerThread,
) -> None:
    """``/v2/models/m/versions//ready`` meant the default version; Triton's routes need a
    version there (404). Ferry answers each versioned route alike, naming what is missing,
    before any body is read."""
    target = kserve_server.http_target
    routes = [("GET", s) for s in ("", "/ready", "/config", "/stats")]
    for method, suffix in [*routes, ("POST", "/infer")]:
        path = f"/v2/models/mlp/versions/{suffix}"
        status, headers, body = http_call(target, method, path, b"not json" * 100)
        assert (status, headers["ferry-error"]) == (404, "VERSION_NOT_FOUND"), path
        assert f"{path!r} names no version" in json.loads(body)["error"], path
    assert http_call(target, "GET", "/v2/models/mlp/ready")[0] == 200  # the default version


def test_head_is_served_wherever_get_is(kserve_server: ServerThread) -> None:
    # RFC 9110 9.1: a server must support HEAD; a load balancer's HEAD health check got 405.
    target = kserve_server.http_target
    for path in ("/v2", "/v2/health/live", "/v2/health/ready", "/v2/models/mlp/config"):
        status, headers, body = http_call(target, "HEAD", path)
        assert (status, body) == (200, b""), path
        assert headers.get("content-length", "0") == str(len(http_call(target, "GET", path)[2]))
    status, headers, body = http_call(target, "HEAD", "/v2/models/nothing/ready")
    assert (status, headers["ferry-error"], body) == (404, "MODEL_NOT_FOUND", b"")
    status, headers, _ = http_call(target, "HEAD", "/v2/models/mlp/infer")
    assert (status, headers["allow"]) == (405, "POST")


def test_a_target_in_absolute_form_is_served_as_its_path(kserve_server: ServerThread) -> None:
    # RFC 9112 3.2.2: a server must accept the absolute form (a request sent through a forward
    # proxy). Its whole URL was taken for the path and answered 404.
    target = kserve_server.http_target
    assert http_call(target, "GET", f"http://{target}/v2/health/live")[0] == 200
    status, _, body = http_call(target, "GET", "HTTP://ferry:8000/v2/models/%6D%6C%70?x=1")
    assert (status, json.loads(body)["name"]) == (200, "mlp")
    status, _, body = http_call(target, "GET", "http://ferry/v2/nothing")
    assert status == 404 and "'/v2/nothing'" in json.loads(body)["error"], body


# ---- repository control: a server of its own, since these tests change what it serves ----


@pytest.fixture
def repo_server(tmp_path: Path) -> Any:
    repo = ModelRepository(tmp_path / "repo")
    write_model(repo, "alpha", identity_model("FP32"))
    write_model(repo, "beta", identity_model("INT64"))
    with ServerThread(repo.root) as srv:
        yield repo, srv


def test_repository_control_is_refused_on_the_inference_listener(
    repo_server: Any, triton_http_clients: Any
) -> None:
    _, srv = repo_server
    client = triton_http_clients(srv.http_target)
    index = client.get_model_repository_index()
    assert [(m["name"], m["version"], m["state"]) for m in index] == [
        ("alpha", "1", "READY"),
        ("beta", "1", "READY"),
    ]
    for call in (client.load_model, client.unload_model):
        with pytest.raises(InferenceServerException) as exc:
            call("alpha")
        assert _status(exc) == "403"
        assert f"management HTTP listener (http://{srv.management_http_target})" in (
            exc.value.message()
        )
    assert client.is_model_ready("alpha")


def test_repository_index_load_and_unload_on_the_management_listener(
    repo_server: Any, triton_http_clients: Any
) -> None:
    repo, srv = repo_server
    manager = triton_http_clients(srv.management_http_target)
    inference = triton_http_clients(srv.http_target)
    assert manager.is_model_ready("alpha")  # the full protocol is on this listener too

    manager.unload_model("alpha")
    assert not inference.is_model_ready("alpha")
    # As Triton's: unloading a model that is not loaded, or not there, is OK with nothing done.
    manager.unload_model("alpha")
    manager.unload_model("no_such_model")
    index = {m["name"]: m for m in manager.get_model_repository_index()}
    assert (index["alpha"]["state"], index["alpha"]["reason"]) == ("UNAVAILABLE", "unloaded")
    status, _, body = http_call(
        srv.management_http_target, "POST", "/v2/repository/index", b'{"ready": true}'
    )
    assert status == 200
    assert [m["name"] for m in json.loads(body)] == ["beta"]
    # A key named twice means what each JSON reader decides: refused, not read either way.
    status, _, body = http_call(
        srv.management_http_target,
        "POST",
        "/v2/repository/index",
        b'{"ready": false, "ready": true}',
    )
    assert status == 400, body
    assert "the index request names the key 'ready' twice" in json.loads(body)["error"]

    manager.load_model("alpha")
    assert inference.is_model_ready("alpha")

    with pytest.raises(InferenceServerException) as exc:
        manager.load_model("no_such_model")
    assert _status(exc) == "404"
    with pytest.raises(InferenceServerException) as exc:
        manager.load_model("alpha", config='{"max_batch_size": 4}')
    assert _status(exc) == "501"

    broken = repo.model_dir("gamma") / "1"
    broken.mkdir(parents=True)
    (broken / MODEL_FILE).write_bytes(b"not an onnx file")
    with pytest.raises(InferenceServerException) as exc:
        manager.load_model("gamma")
    assert _status(exc) == "400"  # Triton answers a failed load with 400 too
    assert "gamma" in exc.value.message()
    index = {m["name"]: m for m in manager.get_model_repository_index()}
    assert index["gamma"]["state"] == "UNAVAILABLE"
    assert index["gamma"]["reason"]


def test_without_a_management_http_listener_repository_control_says_so(
    tmp_path: Path, triton_http_clients: Any
) -> None:
    repo = ModelRepository(tmp_path / "repo")
    write_model(repo, "alpha", identity_model("FP32"))
    with ServerThread(repo.root, management_http_port=-1) as srv:
        assert srv.app is not None and srv.app.management_http_port == 0
        client = triton_http_clients(srv.http_target)
        with pytest.raises(InferenceServerException) as exc:
            client.unload_model("alpha")
        assert _status(exc) == "403"
        assert "management_http_port = -1" in exc.value.message()


def test_management_port_minus_one_turns_the_management_http_listener_off_too(
    tmp_path: Path, triton_http_clients: Any
) -> None:
    """``--management-port -1`` (a serving replica, management off) left the management HTTP
    listener on its port, taking repository load/unload, though the flag turns management off."""
    repo = ModelRepository(tmp_path / "repo")
    write_model(repo, "alpha", identity_model("FP32"))
    # The test server asks for a management HTTP port (0): the flag overrides it.
    with ServerThread(repo.root, management_port=-1, management_http_port=0) as srv:
        assert srv.app is not None
        assert srv.settings.management_http_port == -1
        assert (srv.app.management_port, srv.app.management_http_port) == (0, 0)
        client = triton_http_clients(srv.http_target)
        with pytest.raises(InferenceServerException) as exc:
            client.unload_model("alpha")
        assert _status(exc) == "403"
        assert client.is_model_ready("alpha")


def test_http_can_be_turned_off(tmp_path: Path) -> None:
    repo = ModelRepository(tmp_path / "repo")
    write_model(repo, "alpha", identity_model("FP32"))
    with ServerThread(repo.root, http_port=-1, management_http_port=-1) as srv:
        assert srv.app is not None
        assert (srv.app.http_port, srv.app.management_http_port) == (0, 0)
        assert tg.InferenceServerClient(srv.target).is_model_ready("alpha")
