"""Where Ferry's unary path stands against the plain servers, and where its CPU goes (issue 10).

    .venv/bin/python bench/unary_gap.py                  # tiny MLP, OIP, c = 1, 16, 64, 2 rounds
    .venv/bin/python bench/unary_gap.py --rounds 1 --concurrency 64

Three servers, one at a time, the same model and request: the plain synchronous grpcio server
(``bench/plain_server.py --protocol oip``, the floor), the same handler on grpc.aio
(``--aio``: Ferry's event loop without Ferry), and Ferry (``ferry serve``, defaults). The load is
bench/loadgen/openloop (C++, closed loop: each caller sends again when answered), which costs
the shared cores far less than perf_analyzer or a Python generator. For each server and
concurrency: requests/s, p50, and the server's CPU per request from /proc, split into its
busiest thread (the event loop, or for the sync server its poller) and the rest.

When the busiest thread is at ~100% of a core, that thread is the ceiling and its µs per
request is what to cut. Figures, not assertions; printed as a table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

from cpu_per_request import thread_ticks  # noqa: E402
from models import build  # noqa: E402
from overload import LOADGEN, LOADGEN_BIN, MODEL, OIP_INFER, _payload  # noqa: E402
from perf_floor import start_ferry, start_floor  # noqa: E402

SERVERS = ("sync", "aio", "ferry")


def start(kind: str, repo: Path) -> tuple[subprocess.Popen[bytes], int]:
    if kind == "ferry":
        return start_ferry(repo)
    return start_floor(repo / MODEL / "1" / "model.onnx", MODEL, aio=kind == "aio")


def measure(kind: str, repo: Path, levels: list[int], seconds: float) -> dict[int, dict[str, Any]]:
    proc, port = start(kind, repo)
    out = {}
    try:
        for c in levels:
            cmd = [str(LOADGEN_BIN), "--target", f"127.0.0.1:{port}", "--method", OIP_INFER]
            cmd += ["--payload", str(repo.parent / "oip.bin"), "--concurrency", str(c)]
            cmd += ["--channels", "1" if c == 1 else "4", "--threads", "1"]
            cmd += ["--seconds", str(seconds + 1.5), "--deadline-ms", "30000"]
            gen = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
            time.sleep(1.0)  # connected and steady
            t0, w0 = thread_ticks(proc.pid), time.monotonic()
            time.sleep(seconds)
            t1, wall = thread_ticks(proc.pid), time.monotonic() - w0
            report = json.loads(gen.communicate()[0].strip().splitlines()[-1])
            rate = report["codes"].get("OK", 0) / (seconds + 1.5)
            ticks = os.sysconf("SC_CLK_TCK")
            used = sorted(
                ((t1[t][1] - t0.get(t, ("", 0))[1]) / ticks / wall for t in t1), reverse=True
            )
            out[c] = {
                "rps": rate,
                "p50_ms": report["codes_ms"]["OK"]["p50"],
                "busiest_core": used[0],
                "us_per_req": sum(used) / rate * 1e6 if rate else float("nan"),
                "busiest_us_per_req": used[0] / rate * 1e6 if rate else float("nan"),
            }
    finally:
        proc.terminate()
        proc.wait(30)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--servers", nargs="+", default=list(SERVERS), choices=SERVERS)
    args = p.parse_args()
    if subprocess.run(
        ["sh", str(LOADGEN / "build.sh")], capture_output=True, check=False
    ).returncode:
        raise SystemExit("bench/loadgen/build.sh failed: apt-get install libgrpc++-dev pkg-config")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        build(MODEL, repo / MODEL / "1" / "model.onnx")
        (Path(tmp) / "oip.bin").write_bytes(_payload("oip", 0))
        for r in range(args.rounds):
            for kind in args.servers:
                for c, m in measure(kind, repo, args.concurrency, args.seconds).items():
                    rows.append({"round": r, "server": kind, "c": c, **m})
                    print(json.dumps(rows[-1]), flush=True)
    print(f"\ntiny MLP, OIP ModelInfer, C++ closed loop, cpus {os.cpu_count()}")
    print("| round | server | c | req/s | p50 ms | busiest thread | CPU µs/req (busiest) |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['round']} | {row['server']} | {row['c']} | {row['rps']:,.0f} | "
            f"{row['p50_ms']:.2f} | {row['busiest_core']:.0%} | {row['us_per_req']:.0f} "
            f"({row['busiest_us_per_req']:.0f}) |"
        )


if __name__ == "__main__":
    main()
