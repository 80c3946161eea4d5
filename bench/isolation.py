"""Isolation benchmark (issue 10, part 4): does one model's business stall another's?

Builds a repository of small MLPs (plus a few 33 MB ones) in a temporary folder, starts Ferry as a
subprocess with default settings, and measures one untouched model's latency (closed loop, one
request at a time, from a separate probe process) while the server:

* sits idle (150 models, then 200),
* refreshes the repository after 50 new models appeared (and, during the first such refresh,
  answers an unload + load of another, already served model: how long the management call
  waits); ``--refresh-rounds`` times, the 50 removed (unmeasured) in between, one window,
* is scraped at /metrics once a second (200 models),
* loads and unloads 20 other models in a loop (churn),

and the process's thread count with 1, 50 and 200 models, before and after one request to each.

    flock /work/notes/bench.lock .venv/bin/python bench/isolation.py
    .venv/bin/python bench/isolation.py --phase-seconds 3 --skip-threads     # quicker look

Figures, not assertions: a markdown table goes to stdout and JSON to bench/results/isolation.json.
Only ratios within one run mean anything on a shared machine (idle p99 is the reference).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
INFER = "/ferry.v1.Inference/Infer"
PROBE_MODEL = "m000"
SMALL = (64, 256, 256, 10)  # ~340 KB
BIG = (1024, 2048, 2048, 1024, 10)  # ~33.6 MB


# ---------------------------------------------------------------- repository
def _model_bytes(sizes: tuple[int, ...], seed: int) -> bytes:
    from ferry.server.examples import mlp_model

    return bytes(mlp_model(sizes, seed=seed).SerializeToString())


def write_models(root: Path, names: list[str], big: set[str]) -> None:
    small_b = _model_bytes(SMALL, 0)
    big_b = _model_bytes(BIG, 1) if big else b""
    for name in names:
        vdir = root / name / "1"
        vdir.mkdir(parents=True, exist_ok=True)
        (vdir / "model.onnx").write_bytes(big_b if name in big else small_b)


def names(start: int, count: int) -> list[str]:
    return [f"m{i:03d}" for i in range(start, start + count)]


# ---------------------------------------------------------------- server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    def __init__(self, repo: Path, extra: list[str]) -> None:
        self.port, self.mport, self.metrics_port = free_port(), free_port(), free_port()
        # Imported here: the probe process runs this file too and needs none of it.
        from serving import ferry_command, wait_ready

        listeners = ["--management-port", str(self.mport), "--metrics-host", "127.0.0.1"]
        listeners += ["--metrics-port", str(self.metrics_port)]
        cmd = ferry_command(repo, self.port, *listeners, *extra)
        self.proc = subprocess.Popen(cmd, text=True)
        self.target = f"127.0.0.1:{self.port}"
        self.management = f"127.0.0.1:{self.mport}"
        wait_ready(self.proc, self.target, timeout=300)

    def threads(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/task"))

    def rss_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def request_bytes(model: str, width: int = SMALL[0]) -> bytes:
    import numpy as np

    from ferry.proto.v1 import inference_pb2 as pb
    from ferry.proto.v1 import tensor_pb2

    x = np.random.default_rng(1).standard_normal((1, width)).astype(np.float32)
    t = tensor_pb2.Tensor(
        name="input", dtype=tensor_pb2.DATA_TYPE_FP32, shape=x.shape, data=x.tobytes()
    )
    return bytes(pb.InferRequest(model=model, inputs=[t]).SerializeToString())


def touch_all(target: str, models: list[str], big: set[str]) -> None:
    """One request to each model (a lazily created worker thread appears on first use)."""
    import grpc

    with grpc.insecure_channel(target) as ch:
        call = ch.unary_unary(INFER, request_serializer=None, response_deserializer=None)
        for m in models:
            call(request_bytes(m, BIG[0] if m in big else SMALL[0]), timeout=30)


# ---------------------------------------------------------------- probe (its own process)
def probe_main(target: str, model: str) -> None:
    """Closed loop, one request at a time, until stdin says stop; then prints every sample as
    JSON: [start on CLOCK_MONOTONIC (shared by processes), latency s, ok]."""
    import grpc

    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()), daemon=True).start()
    payload = request_bytes(model)
    samples: list[tuple[float, float, int]] = []
    with grpc.insecure_channel(target) as ch:
        call = ch.unary_unary(INFER, request_serializer=None, response_deserializer=None)
        deadline = time.monotonic() + 900  # bounded even if the orchestrator dies
        while not stop.is_set() and time.monotonic() < deadline:
            t0 = time.monotonic()
            try:
                call(payload, timeout=10)
                ok = 1
            except grpc.RpcError:
                ok = 0
            samples.append((t0, time.monotonic() - t0, ok))
    sys.stdout.write(json.dumps(samples))
    sys.stdout.flush()


class Probe:
    def __init__(self, target: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--probe", target, PROBE_MODEL],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def finish(self) -> list[tuple[float, float, int]]:
        out, _ = self.proc.communicate("stop\n", timeout=120)
        return [tuple(s) for s in json.loads(out)]  # type: ignore[misc]


Spans = list[tuple[float, float]]


def window_stats(samples: list[tuple[float, float, int]], spans: Spans) -> dict[str, Any]:
    def inside(t: float) -> bool:
        return any(t0 <= t < t1 for t0, t1 in spans)

    lat = sorted(s[1] for s in samples if inside(s[0]) and s[2])
    errors = sum(1 for s in samples if inside(s[0]) and not s[2])
    if not lat:
        return {"n": 0, "errors": errors}
    seconds = sum(t1 - t0 for t0, t1 in spans)
    return {
        "n": len(lat),
        "errors": errors,
        "seconds": seconds,
        "req_s": len(lat) / seconds,
        "p50_ms": 1000 * statistics.median(lat),
        "p99_ms": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))],
        "max_ms": 1000 * lat[-1],
    }


# ---------------------------------------------------------------- phases
def scrape(port: int) -> tuple[float, int]:
    t0 = time.monotonic()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
        size = len(r.read())
    return time.monotonic() - t0, size


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from ferry.client import RepositoryClient

    out: dict[str, Any] = {"phases": {}, "events": {}}
    secs = args.phase_seconds
    with tempfile.TemporaryDirectory(prefix="ferry-iso-") as tmp:
        repo = Path(tmp) / "repo"
        first = names(0, 150)
        added = names(150, 50)
        big = {first[-1], added[10], added[30]}
        write_models(repo, first, big=big)
        t = time.monotonic()
        server = Server(repo, args.server_args)
        out["events"]["start_150_s"] = time.monotonic() - t
        log(f"server up with 150 models in {out['events']['start_150_s']:.1f} s")
        try:
            probe = Probe(server.target)
            windows: dict[str, Spans] = {}
            time.sleep(1.0)  # the probe's warm-up, outside every window
            admin = RepositoryClient(server.management, timeout=300)

            t0 = time.monotonic()
            time.sleep(secs)
            windows["idle (150 models)"] = [(t0, time.monotonic())]
            log("done: idle (150 models)")

            mgmt: dict[str, float] = {}

            def management_during_refresh() -> None:
                with RepositoryClient(server.management, timeout=300) as other:
                    time.sleep(0.05)
                    a = time.monotonic()
                    other.unload_model("m100")
                    b = time.monotonic()
                    other.load_model("m100")
                    c = time.monotonic()
                    mgmt.update(unload_s=b - a, load_s=c - b, end=c)

            # One refresh is a few hundred requests: its p99 is a handful of them. Each round
            # after the first removes the 50 (an unmeasured refresh) and brings them back.
            spans: Spans = []
            loaded: list[int] = []
            for round_ in range(args.refresh_rounds):
                if round_:
                    for name in added:
                        shutil.rmtree(repo / name)
                    admin.refresh()
                    time.sleep(0.2)  # the probe back at its idle pace before the next span
                write_models(repo, added, big=big)
                th = threading.Thread(target=management_during_refresh)
                t0 = time.monotonic()
                if not round_:
                    th.start()
                result = admin.refresh()
                spans.append((t0, time.monotonic()))
                loaded.append(len(result.loaded))
                if not round_:
                    th.join()
            windows["during 50-model refresh"] = spans
            log("done: during 50-model refresh")
            out["events"]["refresh_s"] = statistics.median(b - a for a, b in spans)
            out["events"]["refresh_rounds"] = len(spans)
            out["events"]["refresh_loaded"] = min(loaded)
            out["events"]["mgmt_unload_during_refresh_s"] = mgmt["unload_s"]
            out["events"]["mgmt_load_during_refresh_s"] = mgmt["load_s"]
            out["events"]["mgmt_done_before_refresh"] = mgmt["end"] < spans[0][1]

            t0 = time.monotonic()
            time.sleep(secs)
            windows["idle (200 models)"] = [(t0, time.monotonic())]
            log("done: idle (200 models)")

            scrapes: list[tuple[float, int]] = []
            t0 = time.monotonic()
            while time.monotonic() < t0 + 2 * secs:
                tick = time.monotonic()
                scrapes.append(scrape(server.metrics_port))
                time.sleep(max(0.0, 1.0 - (time.monotonic() - tick)))
            windows["1 Hz /metrics scrapes (200 models)"] = [(t0, time.monotonic())]
            log("done: 1 Hz /metrics scrapes (200 models)")
            out["events"]["scrape_ms_median"] = 1000 * statistics.median(s[0] for s in scrapes)
            out["events"]["scrape_ms_max"] = 1000 * max(s[0] for s in scrapes)
            out["events"]["scrape_kb"] = scrapes[-1][1] / 1024

            churned = names(180, 20)
            cycles = 0
            t0 = time.monotonic()
            while time.monotonic() < t0 + secs:
                for m in churned:
                    admin.unload_model(m)
                    admin.load_model(m)
                cycles += 1
            windows["load/unload churn of 20 models"] = [(t0, time.monotonic())]
            log("done: load/unload churn of 20 models")
            out["events"]["churn_cycles"] = cycles

            log("phases done")
            samples = probe.finish()
            for label, spans_ in windows.items():
                out["phases"][label] = window_stats(samples, spans_)

            threads: dict[str, Any] = {}
            if not args.skip_threads:
                every = first + added
                threads["200"] = {"after_start": server.threads()}
                touch_all(server.target, every, big)
                threads["200"]["after_one_request_each"] = server.threads()
                threads["200"]["rss_mb"] = server.rss_mb()
            admin.close()
        finally:
            server.stop()
        if not args.skip_threads:
            for n in (1, 50):
                small_repo = Path(tmp) / f"repo{n}"
                write_models(small_repo, names(0, n), big=set())
                srv = Server(small_repo, args.server_args)
                try:
                    row = {"after_start": srv.threads()}
                    touch_all(srv.target, names(0, n), set())
                    row["after_one_request_each"] = srv.threads()
                    row["rss_mb"] = srv.rss_mb()
                    threads[str(n)] = row
                finally:
                    srv.stop()
            out["threads"] = {k: threads[k] for k in ("1", "50", "200")}
    return out


def report(out: dict[str, Any]) -> None:
    idle = out["phases"]["idle (150 models)"]
    idle200 = out["phases"]["idle (200 models)"]
    print("\n| untouched model, c=1 | req/s | p50 ms | p99 ms | max ms | p99 / idle p99 |")
    print("|---|---|---|---|---|---|")
    for label, s in out["phases"].items():
        if not s.get("n"):
            print(f"| {label} | 0 | - | - | - | - |")
            continue
        ref = idle200 if "200" in label or "churn" in label else idle
        print(
            f"| {label} | {s['req_s']:,.0f} | {s['p50_ms']:.2f} | {s['p99_ms']:.2f} | "
            f"{s['max_ms']:.1f} | {s['p99_ms'] / ref['p99_ms']:.2f}x |"
        )
    e = out["events"]
    print(
        f"\nrefresh of 50 models: {e['refresh_s']:.2f} s (median of {e['refresh_rounds']}; "
        f"{e['refresh_loaded']} loaded); "
        f"unload + load of another model during it: {e['mgmt_unload_during_refresh_s'] * 1000:.0f}"
        f" + {e['mgmt_load_during_refresh_s'] * 1000:.0f} ms "
        f"({'done before' if e['mgmt_done_before_refresh'] else 'not done before'} the refresh)"
    )
    print(
        f"/metrics at 200 models: {e['scrape_kb']:.0f} KB, scrape median "
        f"{e['scrape_ms_median']:.1f} ms, max {e['scrape_ms_max']:.1f} ms; "
        f"churn: {e['churn_cycles']} cycles of 20 unload+load; server start with 150 models "
        f"{e['start_150_s']:.1f} s"
    )
    if "threads" in out:
        print("\n| models | threads after start | after one request each | RSS MB |")
        print("|---|---|---|---|")
        for n, row in out["threads"].items():
            print(
                f"| {n} | {row['after_start']} | {row['after_one_request_each']} | "
                f"{row['rss_mb']:.0f} |"
            )


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--probe", nargs=2, metavar=("TARGET", "MODEL"), help=argparse.SUPPRESS)
    ap.add_argument("--phase-seconds", type=float, default=5.0)
    ap.add_argument("--skip-threads", action="store_true")
    ap.add_argument(
        "--refresh-rounds", type=int, default=5, help="50-model refreshes measured (one window)"
    )
    ap.add_argument(
        "--server-arg",
        dest="server_args",
        action="append",
        default=[],
        help="extra flag for ferry serve (repeat: --server-arg=--foo --server-arg=1)",
    )
    ap.add_argument("--out", type=Path, default=HERE / "results" / "isolation.json")
    args = ap.parse_args()
    if args.probe:
        probe_main(*args.probe)
        return 0
    out = run(args)
    out["meta"] = {"cpus": os.cpu_count(), "server_args": args.server_args}
    report(out)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
