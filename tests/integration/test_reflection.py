"""Server reflection describes every served service, the Open Inference Protocol under its
standard name ``inference.GRPCInferenceService`` included, and a client can invoke it from the
reflected descriptors alone (what grpcurl does), using grpcio-reflection's own client."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf import descriptor_pool, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from serverutil import ServerThread

from ferry.server.core.repository import ModelRepository
from ferry.server.examples import identity_model, write_model
from ferry.server.grpc import kserve

OIP = "inference.GRPCInferenceService"


@pytest.fixture
def srv(tmp_path: Path) -> Iterator[ServerThread]:
    repo = ModelRepository(tmp_path / "repo")
    write_model(repo, "alpha", identity_model("FP32"))
    with ServerThread(repo.root) as server:
        yield server


def test_the_oip_method_table_matches_the_handlers() -> None:
    servicer = kserve.KServeServicer(None, repository_control=False, management_address=str)  # type: ignore[arg-type]
    assert set(kserve.handlers(servicer)) == set(kserve.METHODS) | set(kserve.UNIMPLEMENTED)


@pytest.mark.parametrize("listener", ["inference", "management"])
def test_every_listed_service_is_describable(srv: ServerThread, listener: str) -> None:
    target = srv.target if listener == "inference" else srv.management_target
    with grpc.insecure_channel(target) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        services = db.get_services()
        assert OIP in services
        pool = descriptor_pool.DescriptorPool(db)
        for name in services:
            assert pool.FindServiceByName(name).methods, name
        oip = pool.FindServiceByName(OIP)
        infer = oip.methods_by_name["ModelInfer"]
        assert infer.input_type.full_name == "inference.ModelInferRequest"
        assert oip.methods_by_name["ModelStreamInfer"].output_type.full_name == (
            "inference.ModelStreamInferResponse"
        )
        assert "ModelConfig" in oip.methods_by_name
        config = pool.FindMessageTypeByName("inference.ModelConfigResponse")
        assert config.fields_by_name["config"].message_type.full_name == "inference.ModelConfig"


def test_the_oip_can_be_invoked_from_reflection_alone(srv: ServerThread) -> None:
    with grpc.insecure_channel(srv.target) as channel:
        pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
        method = pool.FindServiceByName(OIP).methods_by_name["ModelInfer"]
        request_cls = message_factory.GetMessageClass(method.input_type)
        response_cls = message_factory.GetMessageClass(method.output_type)
        x = np.arange(6, dtype=np.float32).reshape(2, 3)
        request = request_cls(model_name="alpha")
        request.inputs.add(name="input", datatype="FP32", shape=[2, 3])
        request.raw_input_contents.append(x.tobytes())
        call = channel.unary_unary(
            f"/{OIP}/ModelInfer",
            request_serializer=request_cls.SerializeToString,
            response_deserializer=response_cls.FromString,
        )
        response = call(request, timeout=10)
    assert response.model_name == "alpha"
    out = np.frombuffer(response.raw_output_contents[0], dtype=np.float32).reshape(2, 3)
    assert np.array_equal(out, x)
