"""A heavy model's run time beside a busy core, with its intra-op pool at the loaders' priority
(how a session built on a niced loader thread kept it) and at normal priority (how
core/priority.py builds it now).

Threads keep the nice value of the thread that starts them. A session with intra_op_threads = 2
built on a loader at nice +10 runs every request's parallel half on a thread at nice 10, which
loses the core to any busy normal-priority thread (the event loop, a load generator).

    .venv/bin/python bench/pool_priority.py                 # 1 busy process, 6 rounds
    .venv/bin/python bench/pool_priority.py --busy 0        # the quiet reference

Figures, not assertions; the two sessions alternate round by round, so a host that changes
speed meanwhile moves both.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ferry.server.examples import mlp_model

SIZES = (1024, 2048, 2048, 1024, 10)  # ~33.6 MB of weights, ~1 ms a batch of 8 on 2 threads


def _session(path: Path, niced: bool) -> ort.InferenceSession:
    """Built on a fresh thread, niced first or not: its pool's threads inherit that."""
    out: list[ort.InferenceSession] = []

    def build() -> None:
        if niced:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        so = ort.SessionOptions()
        so.intra_op_num_threads = 2
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        out.append(ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]))

    thread = threading.Thread(target=build)
    thread.start()
    thread.join()
    return out[0]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--busy", type=int, default=1, help="busy normal-priority processes")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--runs", type=int, default=60, help="timed runs per session per round")
    p.add_argument("--batch", type=int, default=8)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        path.write_bytes(mlp_model(SIZES, seed=1).SerializeToString())
        sessions = {
            "pool at nice 10 (built on a loader)": _session(path, niced=True),
            "pool at nice 0 (core/priority.py)": _session(path, niced=False),
        }
        name = next(iter(sessions.values())).get_inputs()[0].name
        feeds = {name: np.ones((args.batch, SIZES[0]), np.float32)}
        busy = [
            subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)
        ]
        try:
            times: dict[str, list[float]] = {k: [] for k in sessions}
            for _ in range(args.rounds):
                for label, session in sessions.items():
                    for _ in range(5):
                        session.run(None, feeds)
                    for _ in range(args.runs):
                        start = time.perf_counter()
                        session.run(None, feeds)
                        times[label].append((time.perf_counter() - start) * 1e3)
        finally:
            for proc in busy:
                proc.kill()
    print(f"batch {args.batch} of a {SIZES} MLP, 2 intra-op threads, {args.busy} busy process(es)")
    print("| pool | median ms | p90 ms | p99 ms |\n|---|---|---|---|")
    for label, values in times.items():
        values.sort()
        p90, p99 = values[int(0.9 * len(values))], values[int(0.99 * len(values))]
        print(f"| {label} | {statistics.median(values):.2f} | {p90:.2f} | {p99:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
