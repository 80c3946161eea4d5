"""``ferry serve --workers N`` against ``--workers 1`` (issue 11, part 1), by perf_analyzer in one
run, each server alone on the box, plus the plain floor as the reference:

    flock /work/notes/bench.lock .venv/bin/python bench/workers.py                 # ~3 min
    .venv/bin/python bench/workers.py --workers 1,2,4 --concurrency 16,64

For each worker count: Ferry is started on a repository holding the tiny MLP (default settings
but the listeners the benchmark does not use), measured unary at each concurrency, then asked
how many requests each worker served (over the workers' control sockets: SO_REUSEPORT spreads
connections, and perf_analyzer's connections decide the spread), and its memory is read per
process: RSS, and PSS (RSS with shared pages divided among the processes sharing them, so the
PSS column adds up to what the workers really cost together).

Figures, not assertions: a table on stdout and bench/results/workers.json.
"""

from __future__ import annotations

import argparse
import json
import queue
import re
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from models import build
from perf_floor import input_data, perf, start_floor, wait_port, write_repo
from serving import ferry_command, free_port, memory_mib, stop

HERE = Path(__file__).parent


def _served(run_dir: Path, workers: int, model: str) -> list[int]:
    import grpc

    from ferry.server.workers import control

    out = []
    for i in range(workers):
        with grpc.insecure_channel(f"unix:{run_dir / f'worker-{i}.sock'}") as channel:
            raw = channel.unary_unary(control.STATISTICS)(
                control.encode({"model": model, "version": None}), timeout=10
            )
        out.append(sum(s["inference_count"] for s in control.decode(raw)))
    return out


def start(repo: Path, workers: int) -> tuple[subprocess.Popen[str], int, list[int], Path | None]:
    port = free_port()
    cmd = ferry_command(repo, port, "--workers", str(workers), "--log-level", "INFO")
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stderr or ()], daemon=True).start()
    pids, run_dir = [proc.pid], None
    if workers > 1:
        while True:
            line = lines.get(timeout=300)
            m = re.search(
                r"inference workers on port \d+ \(pids ([\d,]+); control sockets in (\S+)\)", line
            )
            if m:
                pids, run_dir = [int(p) for p in m.group(1).split(",")], Path(m.group(2))
                break
    wait_port(proc, port)  # type: ignore[arg-type]
    return proc, port, pids, run_dir


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--concurrency", default="1,16,64")
    ap.add_argument("--window-ms", type=int, default=3000)
    ap.add_argument("--model", default="mlp")
    ap.add_argument("--skip-floor", action="store_true")
    ap.add_argument("--cache", type=Path, default=HERE / "results" / "models")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "workers.json")
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    counts = [int(w) for w in args.workers.split(",")]
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        path = build(args.model, args.cache / f"{args.model}.onnx")
        data = input_data(folder, args.model)
        if not args.skip_floor:
            proc, port = start_floor(path, args.model)
            try:
                results["floor"] = {
                    c: perf(port, args.model, data, c, streaming=False, window_ms=args.window_ms)
                    for c in levels
                }
            finally:
                stop(proc)
        repo = write_repo(folder / "repo", args.model, path, None)
        for n in counts:
            proc, port, pids, run_dir = start(repo, n)
            try:
                rows = {
                    c: perf(port, args.model, data, c, streaming=False, window_ms=args.window_ms)
                    for c in levels
                }
                memory = [memory_mib(p) for p in pids]
                served = _served(run_dir, n, args.model) if run_dir is not None else []
                results[f"workers={n}"] = {
                    **rows,
                    "rss_mib": [round(r, 1) for r, _ in memory],
                    "pss_mib": [round(p, 1) for _, p in memory],
                    "served_per_worker": served,
                }
            finally:
                stop(proc)  # type: ignore[arg-type]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=str))
    base = results.get("workers=1")
    print(f"\ntiny {args.model}, unary, perf_analyzer: req/s (p50 ms) [x workers=1]")
    print(
        "| server | "
        + " | ".join(f"c={c}" for c in levels)
        + " | RSS MiB (PSS) per process | served per worker |"
    )
    print("|---|" + "---|" * (len(levels) + 2))
    for label, row in results.items():
        cells = []
        for c in levels:
            r = row[c]
            ratio = f" [{r['rps'] / base[c]['rps']:.2f}x]" if base and label != "floor" else ""
            cells.append(f"{r['rps']:,.0f} ({r['p50']:.2f}){ratio}")
        mem = ", ".join(
            f"{r} ({p})"
            for r, p in zip(row.get("rss_mib", []), row.get("pss_mib", []), strict=True)
        )
        print(
            f"| {label} | "
            + " | ".join(cells)
            + f" | {mem or '-'} | {row.get('served_per_worker') or '-'} |"
        )
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
