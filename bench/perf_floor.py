"""The per-request cost, measured as a user measures it (issue 10, part 2): perf_analyzer against
the plain floor (``plain_server.py --protocol oip``) and against Ferry, back to back in ONE run, so
the ratios mean something on a shared machine.

    flock /work/notes/bench.lock .venv/bin/python bench/perf_floor.py                # mlp and cnn
    flock /work/notes/bench.lock .venv/bin/python bench/perf_floor.py --models mlp --profile DIR
    flock /work/notes/bench.lock .venv/bin/python bench/perf_floor.py --aio-floor   # + grpc.aio

For each model: the floor is started, measured unary at each concurrency, stopped; then Ferry
(``python -m ferry.server`` on a repository holding the model, default settings unless
``--ferry-config`` adds a config.json) is started and measured unary and ``--streaming``. Each
server runs alone. ``--profile DIR`` then keeps Ferry up for a py-spy recording under unary load
and prints its hottest frames. Figures, not assertions.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from models import SHAPES, build
from serving import ferry_command, free_port, stop

HERE = Path(__file__).parent
PERF_ANALYZER = os.environ.get("PERF_ANALYZER", "/work/perf-analyzer/bin/perf_analyzer")
PY_SPY = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")


def wait_port(proc: subprocess.Popen[bytes], port: int, timeout: float = 120) -> None:
    """Ready once ModelReady says so for the model (a TCP connect is not enough for Ferry)."""
    import grpc

    from ferry.proto.kserve.v2 import grpc_service_pb2 as kpb

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        ready = channel.unary_unary(
            "/inference.GRPCInferenceService/ServerReady",
            request_serializer=kpb.ServerReadyRequest.SerializeToString,
            response_deserializer=kpb.ServerReadyResponse.FromString,
        )
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}")
            try:
                if ready(kpb.ServerReadyRequest(), timeout=1.0).ready:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)  # polling a starting server process, not test synchronisation
    raise RuntimeError("server not ready in time")


def start_floor(path: Path, name: str, *, aio: bool = False) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    proc = subprocess.Popen(
        [
            *(sys.executable, str(HERE / "plain_server.py"), str(path), str(port)),
            *("--protocol", "oip", "--name", name),
            *(("--aio",) if aio else ()),
        ],
        stdout=subprocess.DEVNULL,
    )
    wait_port(proc, port)
    return proc, port


def start_ferry(
    repo: Path, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    proc = subprocess.Popen(ferry_command(repo, port), env=env)
    wait_port(proc, port)
    return proc, port


def input_data(folder: Path, name: str) -> Path:
    shape = SHAPES[name]
    values = np.random.default_rng(0).standard_normal(int(np.prod(shape))).astype(np.float32)
    path = folder / f"{name}-input.json"
    doc = {"data": [{"input": {"content": values.tolist(), "shape": list(shape)}}]}
    path.write_text(json.dumps(doc))
    return path


def perf(
    port: int, model: str, data: Path, concurrency: int, *, streaming: bool, window_ms: int
) -> dict[str, float]:
    """One perf_analyzer measurement: req/s and p50/p99 in ms."""
    with tempfile.NamedTemporaryFile(suffix=".csv") as out:
        cmd = [
            PERF_ANALYZER,
            "-i",
            "grpc",
            "-u",
            f"127.0.0.1:{port}",
            "-m",
            model,
            "-b",
            "1",
            "--concurrency-range",
            str(concurrency),
            "-p",
            str(window_ms),
            "-s",
            "100",
            "--warmup-request-count",
            "200",
            "--input-data",
            str(data),
            "-f",
            out.name,
        ]
        if streaming:
            cmd.append("--streaming")
        run = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300)
        if run.returncode != 0:
            print(run.stdout[-2000:], run.stderr[-2000:], file=sys.stderr)
            return {"rps": float("nan"), "p50": float("nan"), "p99": float("nan")}
        rows = list(csv.DictReader(Path(out.name).read_text().splitlines()))
    row = rows[0]
    return {
        "rps": float(row["Inferences/Second"]),
        "p50": float(row["p50 latency"]) / 1000,
        "p99": float(row["p99 latency"]) / 1000,
    }


def write_repo(root: Path, name: str, path: Path, config: dict[str, object] | None) -> Path:
    vdir = root / name / "1"
    vdir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, vdir / "model.onnx")
    if config:
        (root / name / "config.json").write_text(json.dumps(config))
    return root


def profile(port: int, pid: int, model: str, data: Path, *, seconds: int, folder: Path) -> None:
    """py-spy over Ferry while perf_analyzer drives unary load at c=16; prints the hottest
    frames by own time (leaf) and by total time (anywhere on the stack)."""
    raw = folder / f"ferry-{model}-{int(time.time())}.txt"
    spy = subprocess.Popen(
        [
            *(PY_SPY, "record", "--pid", str(pid), "--duration", str(seconds), "--rate", "200"),
            *("--format", "raw", "--output", str(raw), "--threads", "--nonblocking"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    perf(port, model, data, 16, streaming=False, window_ms=seconds * 1000 // 3)
    spy.wait(timeout=seconds + 60)
    report_profile(raw)


def report_profile(raw: Path, top: int = 25) -> None:
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    samples = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        frames = stack.split(";")
        samples += n
        threads[frames[0]] += n
        own[frames[-1]] += n
        for frame in set(frames[1:]):
            total[frame] += n
    print(f"\npy-spy {raw} ({samples} samples)")
    print("threads:", ", ".join(f"{t} {100 * n / samples:.0f}%" for t, n in threads.most_common(6)))
    print("own time:")
    for frame, n in own.most_common(top):
        print(f"  {100 * n / samples:5.1f}%  {frame}")
    print("total time:")
    for frame, n in total.most_common(top):
        print(f"  {100 * n / samples:5.1f}%  {frame}")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--models", default="mlp,cnn")
    ap.add_argument("--concurrency", default="1,16,64")
    ap.add_argument("--window-ms", type=int, default=3000, help="perf_analyzer -p")
    ap.add_argument("--ferry-config", default="", help="JSON config.json for Ferry's model")
    ap.add_argument("--skip-floor", action="store_true")
    ap.add_argument(
        "--aio-floor",
        action="store_true",
        help="also measure the floor's handler on grpc.aio (plain_server.py --aio)",
    )
    ap.add_argument("--no-streaming", action="store_true")
    ap.add_argument("--profile", type=Path, help="folder for a py-spy recording of Ferry")
    ap.add_argument("--profile-seconds", type=int, default=12)
    ap.add_argument("--cache", type=Path, default=HERE / "results" / "models")
    args = ap.parse_args()
    names = args.models.split(",")
    levels = [int(c) for c in args.concurrency.split(",")]
    config = json.loads(args.ferry_config) if args.ferry_config else None
    table: dict[tuple[str, str], dict[int, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name in names:
            path = build(name, args.cache / f"{name}.onnx")
            data = input_data(folder, name)
            floors = [] if args.skip_floor else [("floor unary", False)]
            if args.aio_floor:
                floors.append(("floor on grpc.aio", True))
            for label, aio in floors:
                proc, port = start_floor(path, name, aio=aio)
                try:
                    table[name, label] = {
                        c: perf(port, name, data, c, streaming=False, window_ms=args.window_ms)
                        for c in levels
                    }
                finally:
                    stop(proc)
            repo = write_repo(folder / f"repo-{name}", name, path, config)
            proc, port = start_ferry(repo)
            try:
                table[name, "ferry unary"] = {
                    c: perf(port, name, data, c, streaming=False, window_ms=args.window_ms)
                    for c in levels
                }
                if not args.no_streaming:
                    table[name, "ferry streaming"] = {
                        c: perf(port, name, data, c, streaming=True, window_ms=args.window_ms)
                        for c in levels
                    }
                if args.profile:
                    args.profile.mkdir(parents=True, exist_ok=True)
                    profile(
                        port,
                        proc.pid,
                        name,
                        data,
                        seconds=args.profile_seconds,
                        folder=args.profile,
                    )
            finally:
                stop(proc)
    print_table(table, names, levels)


def print_table(
    table: dict[tuple[str, str], dict[int, dict[str, float]]], names: list[str], levels: list[int]
) -> None:
    print("\n| model | server | " + " | ".join(f"c={c} req/s (p50 ms) [x floor]" for c in levels))
    print("|---|---|" + "---|" * len(levels))
    for name in names:
        floor = table.get((name, "floor unary"))
        for label in ("floor unary", "floor on grpc.aio", "ferry unary", "ferry streaming"):
            row = table.get((name, label))
            if row is None:
                continue
            cells = []
            for c in levels:
                r = row[c]
                ratio = f" [{r['rps'] / floor[c]['rps']:.2f}x]" if floor else ""
                cells.append(f"{r['rps']:,.0f} ({r['p50']:.2f}){ratio}")
            print(f"| {name} | {label} | " + " | ".join(cells) + " |")
        if floor and (name, "ferry unary") in table:
            low = min(levels)
            d = table[name, "ferry unary"][low]["p50"] - floor[low]["p50"]
            print(f"| {name} | p50 c={low}: ferry unary - floor = {d:+.3f} ms |")


if __name__ == "__main__":
    main()
