"""Fixtures for the Open Inference Protocol tests: one Ferry server per module, driven by
Triton's own clients (tritonclient.grpc and tritonclient.http) so that what passes here is what
Triton users will see."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import tritonclient.grpc as tg
import tritonclient.http as th
from helpers import close_on_this_thread
from kserve_common import DATATYPES, STATS_CONFIG, STATS_MODEL, identity_name
from serverutil import ServerThread
from tritonclient.grpc import service_pb2_grpc

from ferry.server.core.repository import ModelRepository
from ferry.server.examples import identity_model, mlp_model, two_io_model, write_model


@pytest.fixture(scope="module")
def kserve_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = ModelRepository(tmp_path_factory.mktemp("kserve") / "repo")
    for datatype in DATATYPES:
        write_model(repo, identity_name(datatype), identity_model(datatype))
    write_model(repo, "two_io", two_io_model())
    write_model(repo, "mlp", mlp_model())
    write_model(repo, "fixed", identity_model("FP32", dims=(3,)))
    write_model(repo, STATS_MODEL, identity_model("FP32"), config=STATS_CONFIG)
    return repo.root


@pytest.fixture(scope="module")
def kserve_server(kserve_repo: Path) -> Iterator[ServerThread]:
    with ServerThread(kserve_repo) as srv:
        yield srv


@pytest.fixture(scope="module")
def triton(kserve_server: ServerThread) -> Iterator[tg.InferenceServerClient]:
    """tritonclient on the inference listener."""
    client = tg.InferenceServerClient(kserve_server.target)
    yield client
    client.close()


@pytest.fixture(scope="module")
def stub(kserve_server: ServerThread) -> Iterator[service_pb2_grpc.GRPCInferenceServiceStub]:
    """Triton's generated stub, for requests tritonclient's helpers cannot build (typed
    contents, deliberately malformed requests)."""
    with grpc.insecure_channel(kserve_server.target) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture(scope="module")
def triton_http(kserve_server: ServerThread) -> Iterator[th.InferenceServerClient]:
    """tritonclient.http on the inference HTTP listener."""
    clients = [th.InferenceServerClient(kserve_server.http_target)]
    yield clients[0]
    close_on_this_thread(clients)
