"""Server CPU time per request at a fixed offered rate below capacity (issue 10, part 2).

    .venv/bin/python bench/cpu_per_request.py                       # aio floor vs Ferry, 1,500/s
    .venv/bin/python bench/cpu_per_request.py --variants floor,aio,ferry --rate 1000 --rounds 3

Throughput ratios on this 2-core box move with whatever else runs (perf_analyzer shares the
cores, and so does anything a colleague starts). CPU seconds the server process spends per
request at a rate every server sustains do not: they are read from /proc for the server alone,
per thread, while perf_analyzer offers a constant rate (open loop, ``--request-rate-range``).
A variant ``ferry:NAME=VALUE+NAME2=VALUE2`` starts Ferry with those environment variables, to
compare a change behind a switch. Figures, not assertions.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from models import build
from perf_floor import PERF_ANALYZER, input_data, start_ferry, start_floor
from serving import stop

HZ = os.sysconf("SC_CLK_TCK")


def start(variant: str, repo: Path) -> tuple[subprocess.Popen[bytes], int]:
    onnx = repo / "mlp" / "1" / "model.onnx"
    if variant == "floor":
        return start_floor(onnx, "mlp")
    if variant == "aio":
        return start_floor(onnx, "mlp", aio=True)
    env = dict(os.environ)
    if ":" in variant:
        for pair in variant.split(":", 1)[1].split("+"):
            key, _, value = pair.partition("=")
            env[key] = value
    return start_ferry(repo, env)


def thread_ticks(pid: int) -> dict[str, tuple[str, int]]:
    """Thread id -> (name, user + system clock ticks)."""
    out: dict[str, tuple[str, int]] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:
            continue  # the thread ended
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        out[tid] = (name, int(fields[11]) + int(fields[12]))
    return out


def measure(variant: str, repo: Path, data: Path, rate: int, seconds: float) -> str:
    proc, port = start(variant, repo)
    load = subprocess.Popen(
        [
            *(PERF_ANALYZER, "-i", "grpc", "-u", f"127.0.0.1:{port}", "-m", "mlp"),
            *("--input-data", str(data), "--request-rate-range", str(rate)),
            *("-p", "3000", "-s", "100", "-r", "10", "--max-threads", "4", "-a"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(2.5)  # past perf_analyzer's start and the server's first requests
        before = thread_ticks(proc.pid)
        t0 = time.monotonic()
        time.sleep(seconds)
        after = thread_ticks(proc.pid)
        elapsed = time.monotonic() - t0
    finally:
        load.kill()
        load.wait()
        stop(proc)
    per_name: dict[str, int] = {}
    for tid, (name, ticks) in after.items():
        spent = ticks - before.get(tid, (name, 0))[1]
        if spent:
            per_name[name] = per_name.get(name, 0) + spent
    cpu = sum(per_name.values()) / HZ
    us = cpu / (rate * elapsed) * 1e6
    top = ", ".join(
        f"{name} {ticks / HZ / elapsed:.0%}"
        for name, ticks in sorted(per_name.items(), key=lambda kv: -kv[1])[:4]
    )
    return f"{us:6.1f} us CPU/request ({cpu / elapsed:.0%} of a core: {top})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--variants", default="aio,ferry", help="floor, aio, ferry, ferry:ENV=1")
    ap.add_argument("--rate", type=int, default=1500, help="requests/s, below every capacity")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        build("mlp", repo / "mlp" / "1" / "model.onnx")
        data = input_data(Path(tmp), "mlp")
        for r in range(args.rounds):
            for variant in args.variants.split(","):
                line = measure(variant, repo, data, args.rate, args.seconds)
                print(f"round {r} {variant:28s} {line}", flush=True)


if __name__ == "__main__":
    main()
