"""Streaming vs unary on the tiny MLP at concurrency 64 (target: stream >= 2x unary throughput).

    .venv/bin/python bench/streaming.py [--duration 10] [--concurrency 64] [--json FILE]

Starts ``ferry serve`` in its own process on 127.0.0.1 with the example MLP (64->256->256->10),
waits for SERVING through the health service's Watch stream (no polling), then measures:

1. the load generator (grpc.aio, one pre-encoded request): unary ``Infer`` vs ``InferStream``,
   closed loop at the same concurrency;
2. the SDK as an application uses it: ``InferenceClient.infer`` from a pool of threads vs
   ``client.infer_many(..., max_in_flight=N)`` on one stream, over the same requests.

Figures, not assertions; the server-side queue/compute split comes from GetModelStatistics.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from ferry.client import InferenceClient, InferResult, _health
from ferry.client.loadtest import LoadTestConfig, run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_serving(target: str, timeout: float) -> None:
    """Follow the health Watch stream (wait_for_ready) until SERVING."""
    with grpc.insecure_channel(target) as channel:
        watch = channel.unary_stream("/grpc.health.v1.Health/Watch")
        for raw in watch(_health.encode_check_request(""), timeout=timeout, wait_for_ready=True):
            if _health.decode_check_response(raw) == _health.SERVING:
                return
    raise RuntimeError(f"{target} never reported SERVING")


def start_server(repo: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ferry.cli",
            "serve",
            "--repository",
            str(repo),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--management-port",
            "-1",
            "--metrics-port",
            "-1",
            "--http-port",
            "-1",
            "--management-http-port",
            "-1",
            "--log-level",
            "WARNING",
        ],
    )
    target = f"127.0.0.1:{port}"
    try:
        wait_serving(target, 120)
    except Exception:
        proc.kill()
        raise
    return proc, target


def sdk_comparison(target: str, concurrency: int, requests: int) -> dict[str, float]:
    inputs = [
        {"input": np.random.default_rng(i).standard_normal((1, 64)).astype(np.float32)}
        for i in range(requests)
    ]
    out: dict[str, float] = {}
    with InferenceClient(target, timeout=60) as client:
        client.infer("mlp", inputs[0])
        with ThreadPoolExecutor(concurrency) as pool:
            t0 = time.perf_counter()
            results = list(pool.map(lambda x: client.infer("mlp", x), inputs))
            out["sdk unary, threads"] = len(results) / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        answers = list(client.infer_many("mlp", inputs, max_in_flight=concurrency))
        out["sdk infer_many"] = len(answers) / (time.perf_counter() - t0)
        assert all(isinstance(r, InferResult) for _, r in answers)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per mode")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--sdk-requests", type=int, default=5000)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)
    from ferry.server.core.repository import ModelRepository
    from ferry.server.examples import mlp_model, write_model

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        repo = ModelRepository(Path(tmp) / "repo")
        write_model(repo, "mlp", mlp_model())
        proc, target = start_server(repo.root)
        try:
            for mode in ("unary", "stream"):
                config = LoadTestConfig(
                    "mlp",
                    target=target,
                    concurrency=(args.concurrency,),
                    mode=mode,
                    duration=args.duration,
                    warmup=args.warmup,
                )
                report = run(config, progress=None)
                print(report.format_table(), "\n")
                results[mode] = report.levels[0].to_dict()
            results["sdk"] = sdk_comparison(target, args.concurrency, args.sdk_requests)
        finally:
            proc.terminate()
            proc.wait(30)
    unary, stream = results["unary"]["throughput"], results["stream"]["throughput"]
    print(
        f"load generator, c={args.concurrency}: unary {unary:,.0f} req/s, stream "
        f"{stream:,.0f} req/s: stream/unary = {stream / unary:.2f}x (target >= 2x)"
    )
    sdk = results["sdk"]
    print(
        f"SDK, {args.sdk_requests} requests: infer() x {args.concurrency} threads "
        f"{sdk['sdk unary, threads']:,.0f} req/s, infer_many {sdk['sdk infer_many']:,.0f} req/s: "
        f"{sdk['sdk infer_many'] / sdk['sdk unary, threads']:.2f}x"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
