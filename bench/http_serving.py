"""HTTP/REST benchmark (issue 12): Ferry's Open Inference Protocol over HTTP, JSON and binary.

    flock /work/notes/bench.lock .venv/bin/python bench/http_serving.py            # ~4 min on 2 cores
    .venv/bin/python bench/http_serving.py --duration 3 --skip-perf-analyzer          # quicker

One Ferry server process (the tiny MLP 64-256-256-10, FP32, single-sample requests; an FP32
identity model for the size sweep), then:

1. wrk (Debian's package), one connection per concurrent client, c = 1, 16, 64: the same request
   replayed, a JSON body and the binary tensor extension. The reference is KServe 0.21's REST
   server on the same model, measured in the same run just before Ferry when ``--kserve-python``
   names an interpreter with kserve installed (bench/kserve_rest.py); otherwise the issue's
   anchor (1,419 / 1,323 / 1,346 req/s, measured on this box earlier);
2. perf_analyzer -i http (JSON and binary tensors) at the same concurrencies, when installed;
3. JSON vs binary by tensor size (4 KiB to 1 MiB, identity model, c = 1), where the binary
   extension must pay off.

Figures, not assertions: a table on stdout and bench/results/http_serving.json. Only 127.0.0.1 is
contacted; every run is bounded in time. Run it alone on the box (the lock).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from ferry.server.core.repository import ModelRepository
from ferry.server.examples import identity_model, mlp_model, write_model

HERE = Path(__file__).parent
PERF_ANALYZER = Path(os.environ.get("PERF_ANALYZER", "/work/perf-analyzer/bin/perf_analyzer"))
KSERVE_REST = {1: 1419.0, 16: 1323.0, 64: 1346.0}  # the anchor, req/s (issue 12)
CONCURRENCY = (1, 16, 64)
SIZES = (4 << 10, 64 << 10, 256 << 10, 1 << 20)  # bytes of FP32 tensor data


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(repo: Path, log: Path) -> tuple[subprocess.Popen[bytes], int, int]:
    """(process, gRPC port, HTTP port) of a Ferry server that answers ready."""
    port, http_port = free_port(), free_port()
    cmd = [
        sys.executable, "-m", "ferry.server", "--repository", str(repo),
        "--host", "127.0.0.1", "--port", str(port), "--http-port", str(http_port),
        "--management-port", "-1", "--management-http-port", "-1", "--metrics-port", "-1",
        "--log-level", "WARNING",
    ]  # fmt: skip
    with open(log, "ab") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
    wait_ready(proc, http_port, log)
    return proc, port, http_port


def start_kserve(python: str, model: Path, log: Path) -> tuple[subprocess.Popen[bytes], int]:
    http_port, grpc_port = free_port(), free_port()
    cmd = [python, str(HERE / "kserve_rest.py"), str(model), str(http_port), str(grpc_port)]
    with open(log, "ab") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
    wait_ready(proc, http_port, log)
    return proc, http_port


def wait_ready(proc: subprocess.Popen[bytes], http_port: int, log: Path) -> None:
    deadline = time.monotonic() + 120
    url = f"http://127.0.0.1:{http_port}/v2/health/ready"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}; see {log}")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)  # polling a starting process, not synchronising a test
    proc.kill()
    raise RuntimeError(f"server not ready in time; see {log}")


def bodies(model: str, x: np.ndarray) -> dict[str, tuple[bytes, dict[str, str]]]:
    """The same request in both forms: JSON tensors, and the binary extension."""
    shape = list(x.shape)
    plain = {
        "inputs": [
            {"name": "input", "datatype": "FP32", "shape": shape, "data": x.ravel().tolist()}
        ]
    }
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "datatype": "FP32",
                    "shape": shape,
                    "parameters": {"binary_data_size": x.nbytes},
                },
            ],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    return {
        "json": (json.dumps(plain).encode(), {"Content-Type": "application/json"}),
        "binary": (
            header + x.tobytes(),
            {
                "Content-Type": "application/octet-stream",
                "Inference-Header-Content-Length": str(len(header)),
            },
        ),
    }


def check(url: str, body: bytes, headers: dict[str, str]) -> None:
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    with urllib.request.urlopen(request, timeout=60) as r:
        assert r.status == 200, r.status
        r.read()


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def wrk(
    url: str, body: bytes, headers: dict[str, str], *, concurrency: int, seconds: float, tmp: Path
) -> dict[str, float]:
    body_file = tmp / "body.bin"
    body_file.write_bytes(body)
    lines = [f'local f = assert(io.open("{body_file}", "rb"))', "wrk.body = f:read('*a')"]
    lines += ["f:close()", 'wrk.method = "POST"']
    lines += [f'wrk.headers["{k}"] = "{v}"' for k, v in headers.items()]
    script = tmp / "post.lua"
    script.write_text("\n".join(lines) + "\n")
    threads = 1 if concurrency == 1 else 2
    cmd = ["wrk", f"-t{threads}", f"-c{concurrency}", f"-d{max(1, round(seconds))}s", "--latency"]
    cmd += ["-s", str(script), url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, check=True)
    text = out.stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))  # type: ignore[union-attr]
    p50 = re.search(r"50%\s+([\d.]+)(us|ms|s)", text)
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", text)
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    errors = re.search(r"Socket errors:.*", text)
    return {
        "rps": rps,
        "p50_ms": float(p50.group(1)) * _UNITS[p50.group(2)] if p50 else float("nan"),
        "p99_ms": float(p99.group(1)) * _UNITS[p99.group(2)] if p99 else float("nan"),
        "non_2xx": float(bad.group(1)) if bad else 0.0,
        "socket_errors": 1.0 if errors else 0.0,
    }


def perf_analyzer(
    http_port: int, model: str, data: Path, concurrency: int, fmt: str
) -> dict[str, float]:
    cmd = [
        str(PERF_ANALYZER), "-i", "http", "-u", f"127.0.0.1:{http_port}", "-m", model,
        "-b", "1", "--concurrency-range", str(concurrency), "-p", "3000", "-s", "100",
        "--warmup-request-count", "200", "--input-data", str(data),
        "--input-tensor-format", fmt, "--output-tensor-format", fmt,
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=240, check=False)
    m = re.search(
        r"Concurrency: \d+, throughput: ([\d.]+) infer/sec, latency (\d+) usec", out.stdout
    )
    if out.returncode != 0 or m is None:
        tail = (out.stdout + out.stderr).strip().splitlines()[-5:]
        raise RuntimeError("perf_analyzer failed:\n" + "\n".join(tail))
    return {"rps": float(m.group(1)), "avg_ms": int(m.group(2)) / 1000}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per wrk run")
    parser.add_argument("--skip-perf-analyzer", action="store_true")
    parser.add_argument("--skip-sizes", action="store_true")
    parser.add_argument(
        "--kserve-python",
        default=os.environ.get("KSERVE_PYTHON", ""),
        help="python of an environment with kserve==0.21.0 and onnxruntime: measure KServe's "
        "REST server in the same run (default $KSERVE_PYTHON)",
    )
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("bench/http_serving.py needs wrk: apt-get install -y wrk")

    results: dict[str, Any] = {"anchor_kserve_rest_json": KSERVE_REST}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        repo = ModelRepository(tmp / "repo")
        write_model(repo, "mlp", mlp_model())
        write_model(repo, "identity", identity_model("FP32"))
        x = np.random.default_rng(1).standard_normal((1, 64)).astype(np.float32)
        if args.kserve_python:
            onnx_file = tmp / "mlp.onnx"
            onnx_file.write_bytes(mlp_model().SerializeToString())
            kserve, kport = start_kserve(args.kserve_python, onnx_file, tmp / "kserve.log")
            try:
                body, headers = bodies("mlp", x)["json"]
                url = f"http://127.0.0.1:{kport}/v2/models/mlp/infer"
                check(url, body, headers)
                wrk(url, body, headers, concurrency=1, seconds=2, tmp=tmp)  # warm-up
                results["kserve_rest_json"] = {
                    c: wrk(url, body, headers, concurrency=c, seconds=args.duration, tmp=tmp)
                    for c in CONCURRENCY
                }
            finally:
                kserve.terminate()
                kserve.wait(timeout=60)
        proc, _, http_port = start_server(repo.root, tmp / "server.log")
        base = f"http://127.0.0.1:{http_port}/v2/models"
        try:
            mlp = bodies("mlp", x)
            for body, headers in mlp.values():
                check(f"{base}/mlp/infer", body, headers)
            for fmt, (body, headers) in mlp.items():
                runs = results.setdefault(f"wrk_mlp_{fmt}", {})
                wrk(
                    f"{base}/mlp/infer", body, headers, concurrency=1, seconds=2, tmp=tmp
                )  # warm-up
                for c in CONCURRENCY:
                    runs[c] = wrk(
                        f"{base}/mlp/infer", body, headers,
                        concurrency=c, seconds=args.duration, tmp=tmp,
                    )  # fmt: skip
            if not args.skip_perf_analyzer and PERF_ANALYZER.exists():
                data = tmp / "input.json"
                data.write_text(json.dumps({"data": [{"input": x.ravel().tolist()}]}))
                for fmt in ("json", "binary"):
                    runs = results.setdefault(f"perf_analyzer_mlp_{fmt}", {})
                    for c in CONCURRENCY:
                        runs[c] = perf_analyzer(http_port, "mlp", data, c, fmt)
            if not args.skip_sizes:
                for size in SIZES:
                    t = np.random.default_rng(2).standard_normal((1, size // 4)).astype(np.float32)
                    for fmt, (body, headers) in bodies("identity", t).items():
                        check(f"{base}/identity/infer", body, headers)
                        url = f"{base}/identity/infer"
                        seconds = args.duration / 2
                        run = wrk(url, body, headers, concurrency=1, seconds=seconds, tmp=tmp)
                        results.setdefault("sizes", {}).setdefault(size, {})[fmt] = run
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    report(results)
    out = HERE / "results" / "http_serving.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str))
    print(f"\nwritten to {out}")
    return 0


def report(results: dict[str, Any]) -> None:
    measured = results.get("kserve_rest_json")
    reference = {c: r["rps"] for c, r in measured.items()} if measured else KSERVE_REST
    where = "measured in this run" if measured else "the issue's anchor, not this run"
    print(f"\nHTTP infer, tiny MLP, batch 1: req/s (p50 ms) and x KServe 0.21 REST JSON ({where})")
    print(f"{'server, client, body':<30}" + "".join(f"{'c=' + str(c):>24}" for c in CONCURRENCY))
    for key, label in [
        ("kserve_rest_json", "KServe 0.21 REST, wrk, JSON"),
        ("wrk_mlp_json", "Ferry, wrk, JSON"),
        ("wrk_mlp_binary", "Ferry, wrk, binary"),
        ("perf_analyzer_mlp_json", "Ferry, perf_analyzer, JSON"),
        ("perf_analyzer_mlp_binary", "Ferry, perf_analyzer, binary"),
    ]:
        runs = results.get(key)
        if not runs:
            continue
        cells = []
        for c in CONCURRENCY:
            r = runs[c]
            latency = r.get("p50_ms", r.get("avg_ms", float("nan")))
            ratio = r["rps"] / reference[c]
            flag = " !" if r.get("non_2xx") or r.get("socket_errors") else ""
            cells.append(f"{r['rps']:>8,.0f} ({latency:.2f}) {ratio:.2f}x{flag}")
        print(f"{label:<30}" + "".join(f"{cell:>24}" for cell in cells))
    anchor = "".join(f"{v:>24,.0f}" for v in KSERVE_REST.values())
    print(f"{'(issue anchor, KServe REST)':<30}" + anchor)
    sizes = results.get("sizes")
    if sizes:
        print("\nJSON vs binary by tensor size, identity FP32, c=1, wrk (req/s; p50 ms)")
        print(f"{'tensor':>10}{'JSON':>22}{'binary':>22}{'binary/JSON':>14}")
        for size, runs in sizes.items():
            j, b = runs["json"], runs["binary"]
            print(
                f"{size // 1024:>8} KiB{j['rps']:>12,.0f} ({j['p50_ms']:.2f}){b['rps']:>12,.0f} "
                f"({b['p50_ms']:.2f}){b['rps'] / j['rps']:>13.1f}x"
            )


if __name__ == "__main__":
    raise SystemExit(main())
