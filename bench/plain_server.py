"""The Python gRPC floor: a plain synchronous grpcio server with a 4-thread pool, one onnxruntime
session (1 intra-op thread), ``np.frombuffer`` decoding, no batching, no validation, no metrics and
no Ferry server code. It is what a developer writes in an afternoon (the "plain floor" of
``shared/reference/measuring.md``); a serving product should not be slower.

    python bench/plain_server.py MODEL.onnx PORT                 # ferry.v1 (bench/serving.py)
    python bench/plain_server.py MODEL.onnx PORT --protocol oip  # Open Inference Protocol
    python bench/plain_server.py MODEL.onnx PORT --protocol oip --aio  # the same on grpc.aio

``--aio`` serves the same handlers from a grpc.aio server (the event loop Ferry runs on), so a
run can tell grpc.aio's own per-call cost from Ferry's: measured, grpc.aio was not the gap under
concurrency (docs/benchmarking.md).

The OIP mode answers what perf_analyzer needs (ModelInfer, ModelStreamInfer, ModelMetadata,
ModelConfig, liveness and readiness) and nothing else; the handlers are registered under
``inference.GRPCInferenceService`` with the message classes Ferry compiles for that protocol.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort

from ferry.proto.kserve.v2 import grpc_service_pb2 as kpb
from ferry.proto.kserve.v2 import model_config_pb2 as mc
from ferry.proto.v1 import inference_pb2 as pb
from ferry.proto.v1 import inference_pb2_grpc as pb_grpc
from ferry.proto.v1 import tensor_pb2

FP32 = tensor_pb2.DATA_TYPE_FP32


def open_session(path: str) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


class Plain(pb_grpc.InferenceServicer):
    def __init__(self, path: str) -> None:
        self.session = open_session(path)
        self.out_name = self.session.get_outputs()[0].name

    def Infer(self, request: pb.InferRequest, context: grpc.ServicerContext) -> pb.InferResponse:
        t = request.inputs[0]
        x = np.frombuffer(t.data, dtype=np.float32).reshape(tuple(t.shape))
        (y,) = self.session.run([self.out_name], {t.name: x})
        out = tensor_pb2.Tensor(name=self.out_name, dtype=FP32, shape=y.shape, data=y.tobytes())
        return pb.InferResponse(model=request.model, version=1, id=request.id, outputs=[out])


class PlainOIP:
    """ModelInfer with raw contents, FP32 in and out, batch dimension first."""

    def __init__(self, path: str, name: str) -> None:
        self.session = open_session(path)
        self.name = name
        self.inp = self.session.get_inputs()[0]
        self.out = self.session.get_outputs()[0]

    def _dims(self, node: Any) -> list[int]:
        return [d if isinstance(d, int) else -1 for d in node.shape]

    def infer(self, request: kpb.ModelInferRequest) -> kpb.ModelInferResponse:
        t = request.inputs[0]
        x = np.frombuffer(request.raw_input_contents[0], dtype=np.float32).reshape(tuple(t.shape))
        (y,) = self.session.run([self.out.name], {t.name: x})
        response = kpb.ModelInferResponse(
            model_name=request.model_name, model_version="1", id=request.id
        )
        response.outputs.add(name=self.out.name, datatype="FP32", shape=y.shape)
        response.raw_output_contents.append(y.tobytes())
        return response

    def ModelInfer(
        self, request: kpb.ModelInferRequest, context: grpc.ServicerContext
    ) -> kpb.ModelInferResponse:
        return self.infer(request)

    def ModelStreamInfer(
        self, requests: Iterator[kpb.ModelInferRequest], context: grpc.ServicerContext
    ) -> Iterator[kpb.ModelStreamInferResponse]:
        for request in requests:
            response = kpb.ModelStreamInferResponse()
            response.infer_response.CopyFrom(self.infer(request))
            yield response

    def ModelMetadata(
        self, request: kpb.ModelMetadataRequest, context: grpc.ServicerContext
    ) -> kpb.ModelMetadataResponse:
        T = kpb.ModelMetadataResponse.TensorMetadata
        return kpb.ModelMetadataResponse(
            name=self.name,
            versions=["1"],
            platform="onnxruntime_onnx",
            inputs=[T(name=self.inp.name, datatype="FP32", shape=self._dims(self.inp))],
            outputs=[T(name=self.out.name, datatype="FP32", shape=self._dims(self.out))],
        )

    def ModelConfig(
        self, request: kpb.ModelConfigRequest, context: grpc.ServicerContext
    ) -> kpb.ModelConfigResponse:
        config = mc.ModelConfig(
            name=self.name,
            platform="onnxruntime_onnx",
            backend="onnxruntime",
            max_batch_size=64,
            input=[
                mc.ModelInput(
                    name=self.inp.name, data_type=mc.TYPE_FP32, dims=self._dims(self.inp)[1:]
                )
            ],
            output=[
                mc.ModelOutput(
                    name=self.out.name, data_type=mc.TYPE_FP32, dims=self._dims(self.out)[1:]
                )
            ],
        )
        return kpb.ModelConfigResponse(config=config)

    def ServerLive(
        self, request: kpb.ServerLiveRequest, context: grpc.ServicerContext
    ) -> kpb.ServerLiveResponse:
        return kpb.ServerLiveResponse(live=True)

    def ServerReady(
        self, request: kpb.ServerReadyRequest, context: grpc.ServicerContext
    ) -> kpb.ServerReadyResponse:
        return kpb.ServerReadyResponse(ready=True)

    def ServerMetadata(
        self, request: kpb.ServerMetadataRequest, context: grpc.ServicerContext
    ) -> kpb.ServerMetadataResponse:
        return kpb.ServerMetadataResponse(name="plain", version="0")

    def ModelReady(
        self, request: kpb.ModelReadyRequest, context: grpc.ServicerContext
    ) -> kpb.ModelReadyResponse:
        return kpb.ModelReadyResponse(ready=request.name == self.name)

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler("inference.GRPCInferenceService", self.table())

    def table(self) -> dict[str, grpc.RpcMethodHandler]:
        """Method name -> handler, for the sync server (``handler``) and the grpc.aio one."""

        def unary(fn: Any, req: Any, resp: Any) -> grpc.RpcMethodHandler:
            return grpc.unary_unary_rpc_method_handler(
                fn, request_deserializer=req.FromString, response_serializer=resp.SerializeToString
            )

        table = {
            "ModelInfer": unary(self.ModelInfer, kpb.ModelInferRequest, kpb.ModelInferResponse),
            "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(
                self.ModelStreamInfer,
                request_deserializer=kpb.ModelInferRequest.FromString,
                response_serializer=kpb.ModelStreamInferResponse.SerializeToString,
            ),
            "ModelMetadata": unary(
                self.ModelMetadata, kpb.ModelMetadataRequest, kpb.ModelMetadataResponse
            ),
            "ModelConfig": unary(self.ModelConfig, kpb.ModelConfigRequest, kpb.ModelConfigResponse),
            "ServerLive": unary(self.ServerLive, kpb.ServerLiveRequest, kpb.ServerLiveResponse),
            "ServerReady": unary(self.ServerReady, kpb.ServerReadyRequest, kpb.ServerReadyResponse),
            "ModelReady": unary(self.ModelReady, kpb.ModelReadyRequest, kpb.ModelReadyResponse),
            "ServerMetadata": unary(
                self.ServerMetadata, kpb.ServerMetadataRequest, kpb.ServerMetadataResponse
            ),
        }
        return table


def serve_aio(servicer: PlainOIP, port: int) -> None:
    """The OIP handlers on grpc.aio: each sync handler wrapped in a coroutine, run on the loop."""
    import asyncio

    def wrap(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        if handler.unary_unary is None:
            return handler  # streaming stays a sync generator: grpc.aio runs it on a thread
        fn = handler.unary_unary

        async def call(request: Any, context: Any) -> Any:
            return fn(request, context)

        return grpc.unary_unary_rpc_method_handler(
            call,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    table = {name: wrap(h) for name, h in servicer.table().items()}

    async def run() -> None:
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", 1 << 27)])
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("inference.GRPCInferenceService", table),)
        )
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        print("ready", flush=True)
        await server.wait_for_termination()

    asyncio.run(run())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("model", help="ONNX file")
    ap.add_argument("port", type=int)
    ap.add_argument("--protocol", choices=("ferry", "oip"), default="ferry")
    ap.add_argument("--name", default="model", help="model name (OIP mode)")
    ap.add_argument("--aio", action="store_true", help="serve on grpc.aio (OIP only)")
    args = ap.parse_args()
    if args.aio:
        if args.protocol != "oip":
            ap.error("--aio serves the Open Inference Protocol only: add --protocol oip")
        serve_aio(PlainOIP(args.model, args.name), args.port)
        return
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=4),
        options=[
            ("grpc.max_receive_message_length", 1 << 27),
            ("grpc.max_send_message_length", 1 << 27),
        ],
    )
    if args.protocol == "oip":
        server.add_generic_rpc_handlers((PlainOIP(args.model, args.name).handler(),))
    else:
        pb_grpc.add_InferenceServicer_to_server(Plain(args.model), server)
    server.add_insecure_port(f"127.0.0.1:{args.port}")
    server.start()
    print("ready", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
