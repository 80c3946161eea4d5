"""Serving benchmark (issue 2): Ferry vs the in-process onnxruntime ceiling and vs a plain grpcio
server, for a tiny MLP, a small CNN and a ResNet-18-style net, with single-sample requests at
several concurrencies, dynamic batching on and off.

    .venv/bin/python bench/serving.py                       # everything (~6 min on 2 cores)
    .venv/bin/python bench/serving.py --models mlp --duration 3

Servers run in their own processes; the load generator is one grpc.aio process sending
pre-serialized requests (so the client costs as little as possible) to 127.0.0.1 only. Figures,
not assertions: results go to stdout and bench/results/serving.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).parent))

from models import SHAPES, build

from ferry.proto.v1 import inference_pb2 as pb
from ferry.proto.v1 import tensor_pb2

INFER = "/ferry.v1.Inference/Infer"
HERE = Path(__file__).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ceiling(path: Path, shape: tuple[int, ...], seconds: float) -> dict[str, float]:
    """Best samples/s of session.run over batch sizes, same session options as the servers."""
    so = ort.SessionOptions()
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    out: dict[str, float] = {}
    for b in (1, 2, 4, 8, 16, 32, 64):
        x = np.random.default_rng(0).standard_normal((b, *shape)).astype(np.float32)
        sess.run(None, {"input": x})
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            sess.run(None, {"input": x})
            n += b
        out[str(b)] = n / (time.perf_counter() - t0)
        if len(shape) == 3 and b >= 16:
            break
    return out


def request_bytes(model: str, shape: tuple[int, ...]) -> bytes:
    x = np.random.default_rng(1).standard_normal((1, *shape)).astype(np.float32)
    t = tensor_pb2.Tensor(
        name="input", dtype=tensor_pb2.DATA_TYPE_FP32, shape=x.shape, data=x.tobytes()
    )
    return pb.InferRequest(model=model, inputs=[t]).SerializeToString()


async def closed_loop(
    target: str, payload: bytes, concurrency: int, warmup: float, seconds: float
) -> dict[str, float]:
    opts = [("grpc.max_receive_message_length", 1 << 27), ("grpc.max_send_message_length", 1 << 27)]
    async with grpc.aio.insecure_channel(target, options=opts) as channel:
        call = channel.unary_unary(INFER, request_serializer=None, response_deserializer=None)
        latencies: list[float] = []
        errors = 0
        measuring = False
        stop_at = time.perf_counter() + warmup + seconds

        async def worker() -> None:
            nonlocal errors
            while True:
                t0 = time.perf_counter()
                if t0 >= stop_at:
                    return
                try:
                    await call(payload, timeout=30)
                except grpc.aio.AioRpcError:
                    errors += 1
                    continue
                if measuring:
                    latencies.append(time.perf_counter() - t0)

        tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
        await asyncio.sleep(warmup)  # a benchmark's warm-up window, not test synchronisation
        measuring = True
        t_start = time.perf_counter()
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - t_start
    latencies.sort()
    if not latencies:
        return {"throughput": 0.0, "p50_ms": float("nan"), "p99_ms": float("nan"), "errors": errors}
    return {
        "throughput": len(latencies) / elapsed,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
        "errors": errors,
    }


def wait_ready(proc: subprocess.Popen[str], target: str, timeout: float = 120) -> None:
    from ferry.client import InferenceClient

    deadline = time.monotonic() + timeout
    with InferenceClient(target) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}")
            if client.ready(timeout=1.0):
                return
            time.sleep(0.2)
    raise RuntimeError("server not ready in time")


def memory_mib(pid: int) -> tuple[float, float]:
    """(RSS, PSS) in MiB of one process: PSS splits each shared page between the processes
    mapping it, so PSS adds up across processes where RSS counts shared pages again."""
    from ferry.server.memory import process_memory  # the server's own reading of smaps

    memory = process_memory(pid)
    if memory is None:
        raise RuntimeError(f"cannot read the memory of process {pid}")
    return memory["rss"] / 2**20, memory["pss"] / 2**20


def ferry_command(repo: Path, port: int, *flags: str) -> list[str]:
    """``python -m ferry.server`` with gRPC inference on 127.0.0.1:``port`` and every other
    listener off, so that a benchmark measures one listener and never binds a fixed default port
    another run holds; ``flags`` come last and win (e.g. ``--metrics-port 9100`` turns one on)."""
    return [
        *(sys.executable, "-m", "ferry.server", "--repository", str(repo)),
        *("--host", "127.0.0.1", "--port", str(port)),
        *("--management-port", "-1", "--metrics-port", "-1"),
        *("--http-port", "-1", "--management-http-port", "-1"),
        *("--log-level", "WARNING", *flags),
    ]


def start_ferry(repo: Path) -> tuple[subprocess.Popen[str], str]:
    port = free_port()
    proc = subprocess.Popen(ferry_command(repo, port), text=True)
    target = f"127.0.0.1:{port}"
    wait_ready(proc, target)
    return proc, target


def start_plain(path: Path) -> tuple[subprocess.Popen[str], str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "plain_server.py"), str(path), str(port)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "ready":
        raise RuntimeError("plain server failed to start")
    return proc, f"127.0.0.1:{port}"


def stop(proc: subprocess.Popen[Any]) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def write_repo(root: Path, models: dict[str, Path], max_batch_size: int) -> Path:
    for name, src in models.items():
        vdir = root / name / "1"
        vdir.mkdir(parents=True, exist_ok=True)
        (vdir / "model.onnx").write_bytes(src.read_bytes())
        (root / name / "config.json").write_text(
            json.dumps({"batching": {"max_batch_size": max_batch_size}})
        )
    return root


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--models", default="mlp,cnn,resnet")
    ap.add_argument("--concurrency", default="1,8,64")
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--cache", type=Path, default=HERE / "results" / "models")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "serving.json")
    args = ap.parse_args()
    names = args.models.split(",")
    levels = [int(c) for c in args.concurrency.split(",")]
    paths = {n: build(n, args.cache / f"{n}.onnx") for n in names}
    results: dict[str, dict[str, object]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        repo_on = write_repo(Path(tmp) / "batch-on", paths, 32)
        repo_off = write_repo(Path(tmp) / "batch-off", paths, 1)
        for name in names:
            shape = SHAPES[name]
            r: dict[str, object] = {"ceiling": ceiling(paths[name], shape, min(args.duration, 2.0))}
            payload = request_bytes(name, shape)
            for label, starter in (
                ("plain", lambda n=name: start_plain(paths[n])),
                ("ferry_batching", lambda: start_ferry(repo_on)),
                ("ferry_no_batching", lambda: start_ferry(repo_off)),
            ):
                proc, target = starter()
                try:
                    r[label] = {
                        str(c): asyncio.run(
                            closed_loop(target, payload, c, args.warmup, args.duration)
                        )
                        for c in levels
                    }
                finally:
                    stop(proc)
                print(name, label, json.dumps(r[label]), flush=True)
            results[name] = r
    report(results, levels)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"cpus": os.cpu_count(), "onnxruntime": ort.__version__, "duration_s": args.duration}
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"\nwrote {args.out}")


def report(results: dict[str, dict[str, object]], levels: list[int]) -> None:
    print(
        "\n| model | ceiling samples/s (best batch) | server | "
        + " | ".join(f"c={c} req/s (p50/p99 ms)" for c in levels)
        + " |"
    )
    print("|---|---|---|" + "---|" * len(levels))
    for name, r in results.items():
        ceil = r["ceiling"]
        assert isinstance(ceil, dict)
        best_b, best = max(ceil.items(), key=lambda kv: kv[1])
        for label in ("plain", "ferry_no_batching", "ferry_batching"):
            row = r[label]
            assert isinstance(row, dict)
            cells = [
                f"{row[str(c)]['throughput']:.0f} ({row[str(c)]['p50_ms']:.2f}/{row[str(c)]['p99_ms']:.2f})"
                for c in levels
            ]
            print(f"| {name} | {best:.0f} (b={best_b}) | {label} | " + " | ".join(cells) + " |")
        top = max(levels)
        fb = r["ferry_batching"][str(top)]["throughput"]  # type: ignore[index]
        pl = r["plain"][str(top)]["throughput"]  # type: ignore[index]
        low = min(levels)
        p50f = r["ferry_batching"][str(low)]["p50_ms"]  # type: ignore[index]
        p50p = r["plain"][str(low)]["p50_ms"]  # type: ignore[index]
        print(
            f"|  | {name}: Ferry c={top} = {100 * fb / best:.0f}% of ceiling, {fb / pl:.2f}x plain; "
            f"p50 c={low}: Ferry {p50f:.3f} ms vs plain {p50p:.3f} ms (+{p50f - p50p:.3f}) | | |"
        )


if __name__ == "__main__":
    main()
