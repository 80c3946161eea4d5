"""The Python gRPC floor: a plain synchronous grpcio server with a 4-thread pool, no batching
and no Ferry server code (only the generated ferry.v1 messages, so the same client drives it).
It is what the peers' measurements call "plain grpcio server, ~90 lines"."""

from __future__ import annotations

import sys
from concurrent import futures

import grpc
import numpy as np
import onnxruntime as ort

from ferry.proto.v1 import inference_pb2 as pb
from ferry.proto.v1 import inference_pb2_grpc as pb_grpc
from ferry.proto.v1 import tensor_pb2

FP32 = tensor_pb2.DATA_TYPE_FP32


class Plain(pb_grpc.InferenceServicer):
    def __init__(self, path: str) -> None:
        so = ort.SessionOptions()
        so.inter_op_num_threads = 1
        self.session = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        self.out_name = self.session.get_outputs()[0].name

    def Infer(self, request: pb.InferRequest, context: grpc.ServicerContext) -> pb.InferResponse:
        t = request.inputs[0]
        x = np.frombuffer(t.data, dtype=np.float32).reshape(tuple(t.shape))
        (y,) = self.session.run([self.out_name], {t.name: x})
        out = tensor_pb2.Tensor(name=self.out_name, dtype=FP32, shape=y.shape, data=y.tobytes())
        return pb.InferResponse(model=request.model, version=1, id=request.id, outputs=[out])


def main() -> None:
    path, port = sys.argv[1], int(sys.argv[2])
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=4),
        options=[
            ("grpc.max_receive_message_length", 1 << 27),
            ("grpc.max_send_message_length", 1 << 27),
        ],
    )
    pb_grpc.add_InferenceServicer_to_server(Plain(path), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print("ready", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
