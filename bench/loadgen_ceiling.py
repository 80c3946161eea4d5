"""The load generator's own ceiling: ``ferry loadtest`` against a server that does nothing.

    .venv/bin/python bench/loadgen_ceiling.py [--duration 5] [--json FILE]

A trivial grpc.aio server, in its own process, answers ``Infer`` and ``ModelInfer`` with canned
bytes and echoes ids on ``InferStream``; ``GetModelMetadata`` describes an ``mlp``-shaped model so
the load generator can build its request. Whatever rate the generator reaches here is the most it
can measure of a real server: a server result close to these figures says more about the client
than about the server. "gen CPU" is the generator process's CPU seconds per second (1.0 = one
core busy): near 1.0 the generator is the limit, well below it the trivial server is.

Figures, not assertions. On a machine with two cores the generator and the trivial server share
them; real ceilings on a larger machine are higher.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import sys
from multiprocessing.connection import Connection
from typing import Any

import grpc
import numpy as np
from grpc import aio

from ferry.client.loadtest import LoadTestConfig, LoadTestReport, run
from ferry.codec import encode_tensor
from ferry.proto.v1 import inference_pb2 as pb
from ferry.proto.v1 import tensor_pb2

RESULT = np.zeros((1, 10), np.float32)


def _canned() -> dict[str, bytes]:
    from ferry.proto.kserve.v2 import grpc_service_pb2 as kpb

    response = pb.InferResponse(model="mlp", version=1, outputs=[encode_tensor("logits", RESULT)])
    k = kpb.ModelInferResponse(model_name="mlp", model_version="1")
    k.outputs.add(name="logits", datatype="FP32", shape=[1, 10])
    k.raw_output_contents.append(RESULT.tobytes())
    meta = pb.ModelMetadata(
        name="mlp",
        version=1,
        versions=[1],
        default_version=1,
        platform="trivial",
        inputs=[
            tensor_pb2.TensorMetadata(name="input", dtype=tensor_pb2.DATA_TYPE_FP32, shape=[-1, 64])
        ],
        outputs=[
            tensor_pb2.TensorMetadata(
                name="logits", dtype=tensor_pb2.DATA_TYPE_FP32, shape=[-1, 10]
            )
        ],
        batching=pb.BatchingPolicy(max_batch_size=32, instance_count=1),
    )
    return {
        "infer": response.SerializeToString(),
        "kserve": k.SerializeToString(),
        "meta": meta.SerializeToString(),
        "stats": pb.GetModelStatisticsResponse().SerializeToString(),
    }


async def _serve(conn: Connection) -> None:
    canned = _canned()
    response = pb.InferResponse.FromString(canned["infer"])

    async def unary(request: bytes, context: Any, key: str) -> bytes:
        return canned[key]

    async def stream(requests: Any, context: Any) -> Any:
        async for raw in requests:
            rid = pb.InferRequest.FromString(raw).id
            yield pb.InferStreamResponse(id=rid, response=response).SerializeToString()

    def raw_unary(key: str) -> grpc.RpcMethodHandler:
        async def handler(request: bytes, context: Any) -> bytes:
            return await unary(request, context, key)

        return grpc.unary_unary_rpc_method_handler(handler)

    server = aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "ferry.v1.Inference",
                {
                    "Infer": raw_unary("infer"),
                    "GetModelMetadata": raw_unary("meta"),
                    "GetModelStatistics": raw_unary("stats"),
                    "InferStream": grpc.stream_stream_rpc_method_handler(stream),
                },
            ),
            grpc.method_handlers_generic_handler(
                "inference.GRPCInferenceService",
                {
                    "ModelInfer": raw_unary("kserve"),
                },
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    conn.send(port)  # ready: the parent connects only after this
    await asyncio.get_running_loop().run_in_executor(None, conn.recv)  # until told to stop
    await server.stop(0)


def _server_main(conn: Connection) -> None:
    asyncio.run(_serve(conn))


CASES: list[tuple[str, dict[str, Any]]] = [
    ("unary c=1", {"concurrency": (1,)}),
    ("unary c=16", {"concurrency": (16,)}),
    ("unary c=64", {"concurrency": (64,)}),
    ("unary c=64, 2 connections", {"concurrency": (64,), "connections": 2}),
    ("stream c=64", {"concurrency": (64,), "mode": "stream"}),
    ("kserve unary c=64", {"concurrency": (64,), "protocol": "kserve"}),
    ("open loop 2000/s", {"rate": (2000.0,)}),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per case")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_server_main, args=(child,), daemon=True)
    proc.start()
    try:
        port = parent.recv()
        target = f"127.0.0.1:{port}"
        results: dict[str, Any] = {}
        print(f"{'case':<28} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'gen CPU':>8}")
        for name, kwargs in CASES:
            config = LoadTestConfig(
                "mlp", target=target, duration=args.duration, warmup=args.warmup, **kwargs
            )
            report: LoadTestReport = run(config, progress=False)
            lv = report.levels[0]
            results[name] = lv.to_dict()
            print(
                f"{name:<28} {lv.throughput:9.0f} {lv.latency_ms['p50']:8.3f} "
                f"{lv.latency_ms['p99']:8.3f} {lv.client_cpu:8.2f}"
                + (f"  errors {lv.errors}" if lv.errors else "")
            )
            sys.stdout.flush()
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=2)
    finally:
        parent.send("stop")
        proc.join(10)
        if proc.is_alive():
            proc.terminate()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
