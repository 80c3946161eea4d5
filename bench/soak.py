"""Soak test (issue 6): mixed traffic against one server process for a long time, watching for
leaks. Not part of CI: figures and a verdict, not assertions.

    .venv/bin/python bench/soak.py                    # 10 minutes
    .venv/bin/python bench/soak.py --duration 120     # a quick validation run

The server runs as its own process (``python -m ferry.server``) on 127.0.0.1, so what is sampled
is the server's own: resident memory (VmRSS), open file descriptors and threads, every
``--interval`` seconds. Traffic, all at once:

- unary Infer with batch sizes 1-8 (varying shapes exercise onnxruntime's arena, a known grower);
- InferStream bursts, one in three cancelled mid-way (clients that vanish);
- Open Inference Protocol ModelInfer;
- unload / load of a second model every few seconds (Triton leaked there: #4966, #4528);
- conversions (upload an ONNX file, convert, delete the previous version) when the server has
  the conversion service.

The verdict fits a line to each metric after a warm-up (the first quarter of the run) and calls a
metric flat when the fitted growth over the measured window stays under a tolerance (RSS 5% or
16 MiB, whichever is larger; 4 fds; 2 threads). Exit status 1 when any metric trends upward.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from ferry.client import FerryError, InferenceClient, RepositoryClient, RetryPolicy
from ferry.proto.kserve.v2 import grpc_service_pb2 as kpb
from ferry.server.core.repository import ModelRepository
from ferry.server.examples import mlp_model, write_model

NO_RETRY = RetryPolicy.disabled()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Sample:
    t: float
    rss_mib: float
    fds: int
    threads: int
    requests: int
    errors: int


def sample(pid: int, t: float, counters: Counters) -> Sample:
    status = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            status[key] = value.strip()
    return Sample(
        t=t,
        rss_mib=int(status["VmRSS"].split()[0]) / 1024,
        fds=len(os.listdir(f"/proc/{pid}/fd")),
        threads=int(status["Threads"]),
        requests=counters.ok,
        errors=counters.failed,
    )


@dataclass
class Counters:
    ok: int = 0
    failed: int = 0
    conversions: int = 0
    kinds: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, error: BaseException | None = None) -> None:
        with self.lock:
            if error is None:
                self.ok += 1
                return
            self.failed += 1
            kind = getattr(error, "kind", "") or type(error).__name__
            self.kinds[kind] = self.kinds.get(kind, 0) + 1


class Traffic:
    def __init__(self, target: str, management: str, counters: Counters, seed: int) -> None:
        self.target = target
        self.management = management
        self.counters = counters
        self.stop = threading.Event()
        self.rng = random.Random(seed)
        self.threads: list[threading.Thread] = []

    def spawn(self, name: str, fn: Callable[[], None]) -> None:
        def loop() -> None:
            while not self.stop.is_set():
                try:
                    fn()
                except Exception as exc:  # the soak keeps going; the counters say what failed
                    self.counters.count(exc)

        thread = threading.Thread(target=loop, name=name, daemon=True)
        thread.start()
        self.threads.append(thread)

    def join(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(60)


def unary(client: InferenceClient, counters: Counters, rng: random.Random) -> Callable[[], None]:
    def step() -> None:
        x = np.random.default_rng(rng.randrange(1 << 30)).standard_normal((rng.randint(1, 8), 64))
        model = "mlp" if rng.random() < 0.8 else "mlp_b"
        try:
            client.infer(model, {"input": x.astype(np.float32)})
            counters.count()
        except FerryError as exc:  # mlp_b is unloaded part of the time: expected errors
            counters.count(exc)

    return step


def streams(client: InferenceClient, counters: Counters, rng: random.Random) -> Callable[[], None]:
    def step() -> None:
        items = [{"input": np.ones((1, 64), np.float32)} for _ in range(rng.randint(10, 60))]
        with client.stream("mlp", timeout=60) as stream:
            if rng.random() < 1 / 3:
                for item in items[: len(items) // 2]:
                    stream.submit(item)
                stream.cancel()  # a client that goes away with requests in flight
                for _rid, _result in stream.results():
                    pass  # answered or cancelled: both are what a vanishing client gets
                return
            for _rid, result in stream.infer_many(items, max_in_flight=16):
                counters.count(result if isinstance(result, Exception) else None)

    return step


def kserve(channel: grpc.Channel, counters: Counters) -> Callable[[], None]:
    call = channel.unary_unary(
        "/inference.GRPCInferenceService/ModelInfer",
        request_serializer=kpb.ModelInferRequest.SerializeToString,
        response_deserializer=kpb.ModelInferResponse.FromString,
    )
    request = kpb.ModelInferRequest(model_name="mlp")
    request.inputs.add(name="input", datatype="FP32", shape=[2, 64])
    request.raw_input_contents.append(np.ones((2, 64), np.float32).tobytes())

    def step() -> None:
        try:
            call(request, timeout=30)
            counters.count()
        except grpc.RpcError as exc:
            counters.count(exc)

    return step


def load_unload(admin: RepositoryClient, stop: threading.Event) -> Callable[[], None]:
    def step() -> None:
        admin.unload_model("mlp_b")
        stop.wait(1.0)
        admin.load_model("mlp_b")
        stop.wait(2.0)

    return step


def conversions(
    management: str, repo: ModelRepository, counters: Counters, stop: threading.Event
) -> Callable[[], None] | None:
    """Upload + convert + delete the older version, every ~15 s; None without the service."""
    try:
        from ferry.proto.v1 import model_conversion_pb2 as cpb
        from ferry.proto.v1 import model_conversion_pb2_grpc as cpb_grpc
    except ImportError:
        return None
    channel = grpc.insecure_channel(management)
    stub = cpb_grpc.ModelConversionStub(channel)
    data = mlp_model(seed=3).SerializeToString()
    try:
        stub.ListJobs(cpb.ListJobsRequest(), timeout=10)
    except grpc.RpcError as exc:
        if exc.code() is grpc.StatusCode.UNIMPLEMENTED:
            return None
        raise

    def step() -> None:
        header = cpb.UploadHeader(model="soak_conv", format=cpb.SOURCE_FORMAT_ONNX)
        upload = stub.UploadModel(
            iter([cpb.UploadModelRequest(header=header), cpb.UploadModelRequest(chunk=data)]),
            timeout=60,
        )
        job = stub.Convert(cpb.ConvertRequest(upload_id=upload.upload_id), timeout=60)
        for _event in stub.WatchJob(cpb.WatchJobRequest(job_id=job.job_id), timeout=600):
            pass
        with counters.lock:
            counters.conversions += 1
        versions = repo.list_versions("soak_conv")
        for old in versions[:-1]:  # keep the repository from growing with the soak
            stub.DeleteModelVersion(
                cpb.DeleteModelVersionRequest(model="soak_conv", version=old), timeout=60
            )
        stop.wait(15.0)

    return step


def slope_per_minute(xs: list[float], ys: list[float]) -> float:
    if len(xs) < 2 or max(xs) == min(xs):
        return 0.0
    return float(np.polyfit(np.asarray(xs) / 60.0, np.asarray(ys, dtype=float), 1)[0])


def verdict(samples: list[Sample]) -> tuple[list[str], bool]:
    """Fit after the warm-up (first quarter); flat when fitted growth stays under tolerance."""
    start = samples[0].t + (samples[-1].t - samples[0].t) / 4
    window = [s for s in samples if s.t >= start]
    minutes = (window[-1].t - window[0].t) / 60 if len(window) > 1 else 0.0
    xs = [s.t for s in window]
    lines, flat = [], True
    base_rss = window[0].rss_mib if window else 0.0
    for name, values, tolerance, unit in (
        ("RSS", [s.rss_mib for s in window], max(16.0, 0.05 * base_rss), "MiB"),
        ("open fds", [float(s.fds) for s in window], 4.0, "fds"),
        ("threads", [float(s.threads) for s in window], 2.0, "threads"),
    ):
        slope = slope_per_minute(xs, values)
        growth = slope * minutes
        ok = growth < tolerance
        flat &= ok
        lines.append(
            f"{name:>9}: slope {slope:+8.3f} {unit}/min, fitted growth {growth:+8.2f} {unit} over "
            f"{minutes:.1f} min (tolerance {tolerance:.1f}) -> "
            f"{'no upward trend' if ok else 'UPWARD TREND'}"
        )
    return lines, flat


def start_server(repo: Path, log: Path) -> tuple[subprocess.Popen[bytes], str, str]:
    port, mport = free_port(), free_port()
    cmd = [
        sys.executable, "-m", "ferry.server", "--repository", str(repo),
        "--host", "127.0.0.1", "--port", str(port),
        "--management-host", "127.0.0.1", "--management-port", str(mport),
        "--metrics-port", "-1", "--grace-period", "5",
        "--http-port", "-1", "--management-http-port", "-1",
    ]  # fmt: skip
    with open(log, "ab") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
    target, management = f"127.0.0.1:{port}", f"127.0.0.1:{mport}"
    with InferenceClient(target, retry=NO_RETRY) as probe:
        end = time.monotonic() + 120
        while not probe.ready(timeout=1.0):
            if proc.poll() is not None or time.monotonic() > end:
                raise SystemExit(f"server did not start; see {log}")
            time.sleep(0.1)
    return proc, target, management


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--duration", type=float, default=600.0, help="seconds of traffic")
    ap.add_argument("--interval", type=float, default=5.0, help="seconds between samples")
    ap.add_argument("--unary-threads", type=int, default=3)
    ap.add_argument("--stream-threads", type=int, default=1)
    ap.add_argument("--no-conversions", action="store_true", help="skip conversion traffic")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="ferry-soak-"))
    repo = ModelRepository(work / "repo")
    write_model(repo, "mlp", mlp_model())
    write_model(repo, "mlp_b", mlp_model(seed=1))
    log = work / "server.log"
    proc, target, management = start_server(repo.root, log)
    counters = Counters()
    traffic = Traffic(target, management, counters, args.seed)
    client = InferenceClient(target, timeout=30, retry=NO_RETRY)
    admin = RepositoryClient(management, timeout=120)
    channel = grpc.insecure_channel(target)
    for i in range(args.unary_threads):
        traffic.spawn(f"unary-{i}", unary(client, counters, random.Random(args.seed + i)))
    for i in range(args.stream_threads):
        traffic.spawn(f"stream-{i}", streams(client, counters, random.Random(args.seed + 100 + i)))
    traffic.spawn("kserve", kserve(channel, counters))
    traffic.spawn("load-unload", load_unload(admin, traffic.stop))
    convert = None if args.no_conversions else conversions(management, repo, counters, traffic.stop)
    if convert is not None:
        traffic.spawn("conversions", convert)

    print(f"soak: {args.duration:.0f} s against pid {proc.pid} ({target}); log {log}")
    print(f"{'t (s)':>7} {'RSS MiB':>8} {'fds':>5} {'threads':>7} {'ok':>9} {'errors':>7}")
    samples: list[Sample] = []
    start = time.monotonic()
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    while True:
        s = sample(proc.pid, time.monotonic() - start, counters)
        samples.append(s)
        print(
            f"{s.t:7.0f} {s.rss_mib:8.1f} {s.fds:5d} {s.threads:7d} {s.requests:9d} {s.errors:7d}"
        )
        if s.t >= args.duration or stop.is_set() or proc.poll() is not None:
            break
        stop.wait(min(args.interval, max(args.duration - s.t, 0.1)))
    traffic.join()
    client.close()
    admin.close()
    channel.close()
    alive = proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(60)
    lines, flat = verdict(samples)
    print(
        f"\nrequests ok {counters.ok}, failed {counters.failed} {counters.kinds}; "
        f"conversions {counters.conversions}; server {'up' if alive else 'DIED'} (exit {rc})"
    )
    for line in lines:
        print(line)
    return 0 if flat and alive else 1


if __name__ == "__main__":
    sys.exit(main())
