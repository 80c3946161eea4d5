"""Start, health, repository polling and graceful shutdown of a real server."""

from __future__ import annotations

import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import ExecutionGate, StartServer, make_repo, reference, wait_for
from serverutil import ServerThread

from ferry.client import (
    ConnectionError_,
    InferenceClient,
    RepositoryClient,
    RetryPolicy,
    UnavailableError,
)
from ferry.server.core.repository import ModelRepository
from ferry.server.examples import mlp_model, seed_model, write_model
from ferry.server.grpc.app import FerryServer

ONE = {"input": np.ones((1, 64), np.float32)}


def _health(target: str, service: str = "") -> int:
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return int(stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status)


def test_health_after_load(server: ServerThread, client: InferenceClient) -> None:
    serving = health_pb2.HealthCheckResponse.SERVING
    assert _health(server.target) == serving
    for model in ("mlp", "two_io", "fixed"):
        assert _health(server.target, model) == serving
        assert client.ready(model)
    assert client.ready()
    # An unknown service is NOT_FOUND on the standard service; the SDK says "not ready".
    with pytest.raises(grpc.RpcError) as info:
        _health(server.target, "ghost")
    assert info.value.code() is grpc.StatusCode.NOT_FOUND
    assert not client.ready("ghost")


def test_empty_repository_is_not_serving(tmp_path: Path, start_server: StartServer) -> None:
    srv = start_server(ModelRepository(tmp_path / "empty").root)
    assert _health(srv.target) == health_pb2.HealthCheckResponse.NOT_SERVING
    with InferenceClient(srv.target, timeout=10) as client:
        assert not client.ready()
        assert client.list_models() == []


def test_only_failed_models_is_not_serving(tmp_path: Path, start_server: StartServer) -> None:
    root = tmp_path / "repo"
    (root / "broken" / "1").mkdir(parents=True)
    (root / "broken" / "1" / "model.onnx").write_bytes(b"junk")
    srv = start_server(root)
    assert _health(srv.target) == health_pb2.HealthCheckResponse.NOT_SERVING
    assert _health(srv.target, "broken") == health_pb2.HealthCheckResponse.NOT_SERVING


def test_health_follows_a_removed_model(tmp_path: Path, start_server: StartServer) -> None:
    root = make_repo(tmp_path / "repo", {"mlp": mlp_model(), "seed": seed_model()})
    srv = start_server(root)
    with (
        InferenceClient(srv.target, timeout=10) as client,
        RepositoryClient(srv.management_target) as repo,
    ):
        assert client.ready("seed")
        shutil.rmtree(root / "seed")
        assert list(repo.refresh().unloaded) == ["seed/1"]
        wait_for(lambda: not client.ready("seed"), "health of the removed model to change")
        assert client.ready("mlp")
        assert client.ready()


def test_poll_interval_picks_up_a_new_model(tmp_path: Path, start_server: StartServer) -> None:
    root = make_repo(tmp_path / "repo", {"mlp": mlp_model()})
    srv = start_server(root, poll_interval=0.05)
    with InferenceClient(srv.target, timeout=10) as client:
        write_model(ModelRepository(root), "seed", seed_model())

        def seed_ready() -> bool:
            return [(m.name, m.state) for m in client.list_models("seed")] == [("seed", "READY")]

        def listed() -> bool:
            return any(m.name == "seed" for m in client.list_models())

        wait_for(listed, "the poll to find the new model folder")
        wait_for(seed_ready, "the poll to load the new model")
        result = client.infer("seed", {"input": np.ones((2, 3), np.float32)})
        assert result["logits"].shape == (2, 1)
        wait_for(lambda: client.ready("seed"), "health of the polled model")


def test_poll_reloads_a_model_file_replaced_keeping_its_size_and_time(
    tmp_path: Path, start_server: StartServer
) -> None:
    """A refresh compared a version's files by (mtime, size): ``model.onnx`` overwritten by a
    retrained model of the same architecture with its time kept (``cp -p``, ``rsync -t``) was
    never reloaded, and the old weights kept answering. Written in place, then renamed over."""
    import os

    root = make_repo(tmp_path / "repo", {"seed": seed_model(0)})
    model_file = root / "seed" / "1" / "model.onnx"
    x = {"input": np.ones((1, 3), np.float32)}
    srv = start_server(root, poll_interval=0.05)
    with InferenceClient(srv.target, timeout=10) as client:
        before = client.infer("seed", x)["logits"]
        for seed, in_place in ((1, True), (2, False)):
            weights = seed_model(seed).SerializeToString()
            st = model_file.stat()
            assert len(weights) == st.st_size  # the same size: only the weights differ
            if in_place:
                with open(model_file, "r+b") as f:
                    f.write(weights)
                target = model_file
            else:
                target = model_file.with_name("model.onnx.new")
                target.write_bytes(weights)
            os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))  # and the same time
            if not in_place:
                os.replace(target, model_file)
            want = reference(model_file, x)["logits"]
            assert not np.allclose(want, before)

            def reloaded(want: np.ndarray = want) -> bool:
                return bool(np.allclose(client.infer("seed", x)["logits"], want))

            wait_for(reloaded, "the poll to serve the replaced model file")
            before = want


async def _ready(app: FerryServer) -> bool:
    return app.dataplane.ready()


def test_graceful_shutdown_completes_in_flight_requests(
    tmp_path: Path, start_server: StartServer
) -> None:
    """Stop with a grace period while a request executes: the request completes OK, health
    turns NOT_SERVING, and calls made after the stop began are refused as UNAVAILABLE."""
    root = make_repo(tmp_path / "repo", {"mlp": mlp_model(), "seed": seed_model()})
    srv = start_server(root)
    app = srv.app
    assert app is not None
    with (
        InferenceClient(srv.target, timeout=60) as client,
        InferenceClient(srv.target, timeout=10, retry=RetryPolicy.disabled()) as late,
        ThreadPoolExecutor(2) as pool,
        ExecutionGate(srv, "mlp") as gate,
    ):
        in_flight = pool.submit(client.infer, "mlp", ONE)
        gate.wait_entered()
        stopped = threading.Event()
        stopper = threading.Thread(
            target=lambda: (srv.call(lambda: app.stop(grace=30)), stopped.set()), daemon=True
        )
        stopper.start()
        # Once stop() has begun, new calls are refused (the probe uses another model, so it
        # is never held by the gate).
        seed = {"input": np.ones((1, 3), np.float32)}

        def refused() -> bool:
            try:
                late.infer("seed", seed)
            except (UnavailableError, ConnectionError_) as exc:
                assert exc.code is grpc.StatusCode.UNAVAILABLE
                return True
            return False

        wait_for(refused, "calls to be refused after stop began")
        assert not stopped.is_set()  # the held request keeps the server draining
        # Not ready on every protocol while it drains (OIP ServerReady said ready till the end).
        assert srv.call(lambda: _ready(app)) is False
        gate.release()
        result = in_flight.result(60)
        assert result["logits"].shape == (1, 10)
        stopper.join(60)
        assert stopped.is_set()
        with pytest.raises((UnavailableError, ConnectionError_)) as info:
            late.infer("mlp", ONE)
        assert info.value.code is grpc.StatusCode.UNAVAILABLE


def test_stop_is_idempotent(tmp_path: Path) -> None:
    root = make_repo(tmp_path / "repo", {"seed": seed_model()})
    srv = ServerThread(root).start()
    app = srv.app
    assert app is not None
    srv.call(lambda: app.stop(0))
    srv.call(lambda: app.stop(0))  # a second stop waits for the first and returns
    assert app.registry.models == {}
    srv.stop()


def test_a_start_never_removes_a_live_writers_staging_folder(tmp_path: Path) -> None:
    """Servers sharing a repository (workers, replicas, a publisher) clean what a dead writer
    left at start, never the staging folder of a publish still under way in another process."""
    import subprocess
    import sys

    from ferry.server.core.repository import ModelRepository

    root = make_repo(tmp_path / "repo", {"seed": seed_model()})
    hold = (
        "import sys\n"
        "from ferry.server.core.repository import ModelRepository\n"
        "with ModelRepository(sys.argv[1]).staging('seed', 'live') as s:\n"
        "    print(s, flush=True)\n"
        "    sys.stdin.readline()\n"
    )
    writer = subprocess.Popen(
        [sys.executable, "-c", hold, str(root)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert writer.stdout is not None
        live = Path(writer.stdout.readline().strip())
        dead = ModelRepository(root).staging_path("seed", "dead")
        dead.mkdir()  # no process holds it: what a killed writer leaves
        with ServerThread(root, management_port=-1, management_http_port=-1):
            assert live.is_dir() and not dead.exists()
    finally:
        assert writer.stdin is not None
        writer.stdin.write("\n")
        writer.stdin.flush()
        writer.wait(30)
    assert not live.exists()  # its writer ended the staging itself
