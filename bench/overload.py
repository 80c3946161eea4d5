"""Goodput under overload (issue 10): open-loop load at several times the measured capacity, with
per-request deadlines, from separate processes, against a Ferry server started as a subprocess.

    .venv/bin/python bench/overload.py                        # 4 scenarios, ~3.5 min on 2 cores
    .venv/bin/python bench/overload.py --scenarios ferry-unary --seconds 10
    .venv/bin/python bench/overload.py --generator python       # the Python generator throughout

For each scenario (protocol ferry.v1 or Open Inference Protocol, unary or streaming):
1. capacity: a closed loop (every caller sends again as soon as it is answered) for a few seconds;
2. overload: an open loop (requests leave on schedule, answered or not) at ``--factor`` x capacity
   for ``--seconds`` s, every request with a ``--deadline-ms`` deadline;
3. after: the closed loop again, right away (does full throughput come back at once?).

Two generators. ``--generator cpp`` (the default when bench/loadgen/build.sh can build them,
i.e. libgrpc++-dev and pkg-config are installed) runs every phase with C++ gRPC clients:
bench/loadgen/openloop for unary calls, bench/loadgen/openstream for streams. A Python grpc.aio
generator falls seconds behind its schedule at tens of thousands of requests per second (a
stream writer most of all: its messages wait in its own queue, unseen), and then the figures
measure the generator, not the server. The C++ ones measure latency from each request's
scheduled time, so a sender that falls behind cannot hide it. ``--generator python`` is
``--procs`` worker processes, each with its own grpc.aio channel and event loop, sending
pre-serialised requests. Unary calls carry a gRPC deadline; stream messages carry the request's
own timeout (``timeout_us`` / the ``timeout`` parameter; the C++ stream client sets what is left
of the deadline when it writes the message, and does not send one whose deadline passed while it
waited to be written), and an answer later than the deadline counts as DEADLINE_EXCEEDED, as it
would for a client that gave up. A request still unanswered when its stream ends is counted as
DEADLINE_EXCEEDED too (``lost`` says how many). For streams the report adds ``client_wait_ms``:
how long messages waited in the client before HTTP/2 flow control let them be written.

Figures, not assertions: printed, and written to bench/results/overload.json. Targets (issue 10):
goodput >= 90% of capacity; only OK, RESOURCE_EXHAUSTED and DEADLINE_EXCEEDED; accepted p99 <= the
deadline; rejections p99 < 5 ms; RSS bounded; full throughput right after. The generator shares
the machine's cores with the server, so the table's generator column says which generator ran a
row and how far behind its schedule the overload's sender was at the end and at worst: "offered"
counts requests sent, however late; only a small lag means the server was offered that rate.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

SCENARIOS = ("ferry-unary", "ferry-stream", "oip-unary", "oip-stream")
FERRY_INFER = "/ferry.v1.Inference/Infer"
FERRY_STREAM = "/ferry.v1.Inference/InferStream"
OIP_INFER = "/inference.GRPCInferenceService/ModelInfer"
OIP_STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"
MODEL = "mlp"
RING = 32768
LOADGEN = HERE / "loadgen"
LOADGEN_BIN = LOADGEN / "build" / "openloop"
STREAM_BIN = LOADGEN / "build" / "openstream"


# ---------------------------------------------------------------------------------------------
# worker process side
# ---------------------------------------------------------------------------------------------


def _payload(protocol: str, timeout_us: int, request_id: str = "") -> bytes:
    x = np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)
    if protocol == "ferry":
        from ferry.client._requests import build_infer_request

        msg = build_infer_request(MODEL, {"input": x}, request_id=request_id)
        msg.timeout_us = timeout_us
        return bytes(msg.SerializeToString())
    from ferry.proto.kserve.v2 import grpc_service_pb2 as kpb

    req = kpb.ModelInferRequest(model_name=MODEL, id=request_id)
    t = req.inputs.add()
    t.name, t.datatype = "input", "FP32"
    t.shape.extend(x.shape)
    req.raw_input_contents.append(x.tobytes())
    if timeout_us:
        req.parameters["timeout"].int64_param = timeout_us
    return bytes(req.SerializeToString())


class Census:
    """Outcomes of one worker: code -> count, and latencies of the ones the targets are about."""

    def __init__(self) -> None:
        self.codes: dict[str, int] = {}
        self.ok_ms: list[float] = []
        self.rejected_ms: list[float] = []
        self.details: dict[str, str] = {}
        self.sent = 0
        self.lost = 0
        self.behind_ms = 0.0  # open loop: how late the last request left, and the worst
        self.max_behind_ms = 0.0

    def late(self, seconds: float) -> None:
        self.behind_ms = max(0.0, seconds * 1000)
        self.max_behind_ms = max(self.max_behind_ms, self.behind_ms)

    def add(self, code: str, ms: float, detail: str = "") -> None:
        self.codes[code] = self.codes.get(code, 0) + 1
        if code == "OK":
            self.ok_ms.append(ms)
        elif code == "RESOURCE_EXHAUSTED":
            self.rejected_ms.append(ms)
        if detail and code not in self.details:
            self.details[code] = detail[:200]

    def as_dict(self) -> dict[str, Any]:
        return {
            "codes": self.codes,
            "ok_ms": self.ok_ms,
            "rejected_ms": self.rejected_ms,
            "details": self.details,
            "sent": self.sent,
            "lost": self.lost,
            "behind_ms": self.behind_ms,
            "max_behind_ms": self.max_behind_ms,
        }


def _stream_outcome(protocol: str, raw: bytes) -> tuple[str, str, str]:
    """(request id, code, detail) of one stream response."""
    if protocol == "ferry":
        from ferry.proto.v1 import inference_pb2 as fpb

        r = fpb.InferStreamResponse.FromString(raw)
        if r.HasField("error"):
            import grpc

            code = {c.value[0]: c.name for c in grpc.StatusCode}.get(r.error.code, "UNKNOWN")
            return r.id, code, r.error.message
        return r.id, "OK", ""
    from ferry.proto.kserve.v2 import grpc_service_pb2 as kpb

    k = kpb.ModelStreamInferResponse.FromString(raw)
    if k.error_message:
        code = k.error_message.split("]", 1)[0].removeprefix("[StatusCode.")
        return k.infer_response.id, code, k.error_message
    return k.infer_response.id, "OK", ""


async def _load(spec: dict[str, Any]) -> dict[str, Any]:
    from grpc import aio

    protocol, mode, kind = spec["protocol"], spec["mode"], spec["kind"]
    deadline = spec["deadline_ms"] / 1000.0
    seconds = spec["seconds"]
    census = Census()
    start_at = spec["start_at"]
    options = [("grpc.max_receive_message_length", 8 << 20)]
    async with aio.insecure_channel(spec["target"], options=options) as channel:
        await channel.channel_ready()
        await asyncio.sleep(max(0.0, start_at - time.time()))
        t0 = time.perf_counter()
        end = t0 + seconds
        if mode == "unary":
            call = channel.unary_unary(FERRY_INFER if protocol == "ferry" else OIP_INFER)
            payload = _payload(protocol, 0)
            timeout = deadline if kind == "open" else 30.0

            async def one() -> None:
                t = time.perf_counter()
                try:
                    await call(payload, timeout=timeout)
                    census.add("OK", (time.perf_counter() - t) * 1000)
                except aio.AioRpcError as exc:
                    census.add(exc.code().name, (time.perf_counter() - t) * 1000, exc.details())

            if kind == "closed":

                async def caller() -> None:
                    while time.perf_counter() < end:
                        census.sent += 1
                        await one()

                await asyncio.gather(*(caller() for _ in range(spec["concurrency"])))
            else:
                rate = spec["rate"]
                tasks: set[asyncio.Task[None]] = set()
                i = 0
                while True:
                    due = t0 + i / rate
                    if due >= end:
                        break
                    now = time.perf_counter()
                    if due > now:
                        await asyncio.sleep(due - now)
                    census.late(time.perf_counter() - due)
                    task = asyncio.create_task(one())
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                    census.sent += 1
                    i += 1
                if tasks:
                    await asyncio.wait(tasks)
        else:
            await _stream_load(channel, spec, census, t0, end)
        census_dict = census.as_dict()
        census_dict["elapsed"] = time.perf_counter() - t0
        return census_dict


async def _stream_load(
    channel: Any, spec: dict[str, Any], census: Census, t0: float, end: float
) -> None:
    protocol, kind = spec["protocol"], spec["kind"]
    deadline_ms = spec["deadline_ms"]
    n_streams = spec["streams"]
    method = FERRY_STREAM if protocol == "ferry" else OIP_STREAM
    timeout_us = deadline_ms * 1000 if kind == "open" else 0
    # Pre-serialised messages on a ring of ids (an id comes round again long after its answer).
    ring = [_payload(protocol, timeout_us, str(k)) for k in range(RING)]
    t0 = time.perf_counter()  # the ring took a moment: the schedule starts now
    end = t0 + spec["seconds"]
    sent_at: dict[str, float] = {}
    queues: list[asyncio.Queue[bytes | None]] = [asyncio.Queue() for _ in range(n_streams)]
    in_window = [spec.get("concurrency", 0)]  # closed loop: each answer lets one more request go
    wake = asyncio.Event()
    drained = asyncio.Event()

    def send(i: int) -> None:
        sent_at[str(i % RING)] = time.perf_counter()
        census.sent += 1
        queues[i % n_streams].put_nowait(ring[i % RING])

    async def requests(q: asyncio.Queue[bytes | None]) -> AsyncIterator[bytes]:
        while (m := await q.get()) is not None:
            yield m

    async def reader(call: Any) -> None:
        async for raw in call:
            rid, code, detail = _stream_outcome(protocol, raw)
            t = sent_at.pop(rid, None)
            if t is None:
                continue
            if not sent_at:
                drained.set()
            ms = (time.perf_counter() - t) * 1000
            if kind == "open" and code == "OK" and ms > deadline_ms:
                code, detail = "DEADLINE_EXCEEDED", f"answered after {ms:.0f} ms"
            census.add(code, ms, detail)
            if kind == "closed":
                in_window[0] += 1
                wake.set()

    calls = [
        channel.stream_stream(method)(requests(q), timeout=spec["seconds"] + 60) for q in queues
    ]
    readers = [asyncio.create_task(reader(c)) for c in calls]
    i = 0
    if kind == "closed":
        while time.perf_counter() < end:
            while in_window[0] > 0:
                in_window[0] -= 1
                send(i)
                i += 1
            wake.clear()
            try:
                await asyncio.wait_for(wake.wait(), timeout=max(0.0, end - time.perf_counter()))
            except TimeoutError:
                break
    else:
        rate = spec["rate"]
        while (due := t0 + i / rate) < end:
            now = time.perf_counter()
            if due > now:
                await asyncio.sleep(due - now)
            census.late(time.perf_counter() - due)
            send(i)
            i += 1
    # Let the last answers arrive (at most a deadline, plus slack), then close the streams.
    grace_end = time.perf_counter() + deadline_ms / 1000.0 + 1.0
    drained.clear()
    if sent_at:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(drained.wait(), timeout=grace_end - time.perf_counter())
    for q in queues:
        q.put_nowait(None)
    await asyncio.wait(readers, timeout=5.0)
    for task in readers:
        task.cancel()
    census.lost = len(sent_at)
    for _ in range(len(sent_at)):
        census.add("DEADLINE_EXCEEDED", float(deadline_ms), "never answered")


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    return asyncio.run(_load(spec))


# ---------------------------------------------------------------------------------------------
# driver side
# ---------------------------------------------------------------------------------------------


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_server(repo: Path, extra: list[str]) -> tuple[subprocess.Popen[str], str]:
    from serving import ferry_command, free_port, wait_ready

    port = free_port()
    proc = subprocess.Popen(ferry_command(repo, port, *extra), text=True)
    target = f"127.0.0.1:{port}"
    wait_ready(proc, target)
    return proc, target


def run_phase(pool: Any, procs: int, **spec: Any) -> dict[str, Any]:
    """One phase with the Python generator, summarised like the C++ generator's report."""
    spec["start_at"] = time.time() + 1.0
    if "rate" in spec:
        spec["rate"] = spec["rate"] / procs
    results = pool.map(worker, [dict(spec) for _ in range(procs)])
    merged = Census()
    for r in results:
        for code, n in r["codes"].items():
            merged.codes[code] = merged.codes.get(code, 0) + n
        merged.ok_ms += r["ok_ms"]
        merged.rejected_ms += r["rejected_ms"]
        merged.sent += r["sent"]
        merged.lost += r["lost"]
        for code, d in r["details"].items():
            merged.details.setdefault(code, d)
    return {
        "seconds": spec["seconds"],
        "sent": merged.sent,
        "codes": merged.codes,
        "details": merged.details,
        "lost": merged.lost,
        "ok_p50_ms": pct(merged.ok_ms, 0.5),
        "ok_p99_ms": pct(merged.ok_ms, 0.99),
        "rejected_p50_ms": pct(merged.rejected_ms, 0.5),
        "rejected_p99_ms": pct(merged.rejected_ms, 0.99),
        "behind_ms": max(r["behind_ms"] for r in results),
        "max_behind_ms": max(r["max_behind_ms"] for r in results),
    }


def build_loadgen() -> bool:
    """Whether bench/loadgen/build.sh built the C++ generator (it says why not on stderr)."""
    built = subprocess.run(
        ["sh", str(LOADGEN / "build.sh")], stdout=subprocess.DEVNULL, check=False
    )
    return built.returncode == 0


def cpp_phase(
    payload: Path, method: str, args: argparse.Namespace, *, kind: str, seconds: float, **spec: Any
) -> dict[str, Any]:
    """One phase with a C++ generator: closed loop (``concurrency``) or open (``rate``). Unary
    closed loops get a 30 s deadline, as the Python generator's do, and stream messages none, so
    only the overload's deadline shapes what is counted."""
    stream = spec["mode"] == "stream"
    cmd: list[str] = [
        *(str(STREAM_BIN if stream else LOADGEN_BIN), "--target", spec["target"]),
        *("--method", method, "--payload", str(payload), "--seconds", str(seconds)),
        *("--max-message-bytes", str(8 << 20)),
    ]
    if stream:  # each message gets its id, and in open loop its remaining budget, appended
        cmd += ["--protocol", spec["protocol"], "--streams", str(args.streams)]
        cmd += ["--channels", str(args.stream_channels)]
    else:
        cmd += ["--channels", str(args.channels), "--threads", str(args.threads)]
    if kind == "closed":
        cmd += ["--concurrency", str(spec["concurrency"])]
        cmd += [] if stream else ["--deadline-ms", "30000"]
    else:
        cmd += ["--rate", f"{spec['rate']:.3f}", "--deadline-ms", str(spec["deadline_ms"])]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{cmd[0]} exited {done.returncode}: {done.stderr.strip()}")
    r = json.loads(done.stdout.strip().splitlines()[-1])
    nan = float("nan")

    def q(part: str, key: str) -> float:
        v = r[part][key]
        return nan if v is None else float(v)

    return {
        "seconds": seconds,
        "sent": r["sent"],
        "codes": r["codes"],
        "details": r["details"],
        "lost": r["lost"],
        "ok_p50_ms": q("ok_ms", "p50"),
        "ok_p99_ms": q("ok_ms", "p99"),
        "ok_p99_from_send_ms": q("ok_ms_from_send", "p99"),
        "rejected_p50_ms": q("rejected_ms", "p50"),
        "rejected_p99_ms": q("rejected_ms", "p99"),
        "behind_ms": r["behind_ms"],
        "max_behind_ms": r["max_behind_ms"],
        "codes_ms": r["codes_ms"],  # when each outcome came, from its scheduled time
        # streams: how long messages waited in the client to be written (flow control)
        "client_wait_ms": r.get("client_wait_ms", {}),
    }


def pct(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    v = sorted(values)
    return v[min(len(v) - 1, int(q * len(v)))]


def scenario(
    pool: Any, repo: Path, name: str, args: argparse.Namespace, tmp: Path
) -> dict[str, Any]:
    protocol, mode = name.split("-")
    generator = args.generator
    proc, target = start_server(repo, args.server_arg)
    common = {"target": target, "protocol": protocol, "mode": mode, "streams": args.streams}
    common["deadline_ms"] = args.deadline_ms
    if generator == "cpp":
        payload = tmp / f"{protocol}.bin"
        # Unary calls carry the gRPC deadline, stream messages a timeout the generator appends.
        payload.write_bytes(_payload(protocol, 0))
        if mode == "unary":
            method = FERRY_INFER if protocol == "ferry" else OIP_INFER
        else:
            method = FERRY_STREAM if protocol == "ferry" else OIP_STREAM

        def phase(**spec: Any) -> dict[str, Any]:
            if "concurrency" in spec:
                spec["concurrency"] = args.concurrency  # one process: all the callers
            return cpp_phase(payload, method, args, **spec)
    else:

        def phase(**spec: Any) -> dict[str, Any]:
            return run_phase(pool, args.procs, **spec)

    try:
        conc = max(1, args.concurrency // args.procs)
        phase(kind="closed", seconds=2.0, concurrency=conc, **common)
        cap = phase(kind="closed", seconds=args.cap_seconds, concurrency=conc, **common)
        capacity = cap["codes"].get("OK", 0) / cap["seconds"]
        rss_before = rss_mib(proc.pid)
        over = phase(kind="open", seconds=args.seconds, rate=args.factor * capacity, **common)
        rss_after = rss_mib(proc.pid)
        after = phase(kind="closed", seconds=args.cap_seconds, concurrency=conc, **common)
        alive = proc.poll() is None
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    goodput = over["codes"].get("OK", 0) / over["seconds"]
    after_rate = after["codes"].get("OK", 0) / after["seconds"]
    return {
        "scenario": name,
        "generator": generator,
        "behind_ms": over["behind_ms"],
        "max_behind_ms": over["max_behind_ms"],
        "capacity": capacity,
        "offered_target": args.factor * capacity,
        "offered": over["sent"] / over["seconds"],
        "goodput": goodput,
        "goodput_ratio": goodput / capacity if capacity else float("nan"),
        "codes": over["codes"],
        "details": over["details"],
        "codes_ms": over.get("codes_ms", {}),
        "client_wait_ms": over.get("client_wait_ms", {}),
        "lost": over["lost"],
        "ok_p50_ms": over["ok_p50_ms"],
        "ok_p99_ms": over["ok_p99_ms"],
        "ok_p99_from_send_ms": over.get("ok_p99_from_send_ms", float("nan")),
        "rejected_p50_ms": over["rejected_p50_ms"],
        "rejected_p99_ms": over["rejected_p99_ms"],
        "rss_before_mib": rss_before,
        "rss_after_mib": rss_after,
        # Calls a closed loop (a client that waits for each answer) did not get answered: a
        # shedding rule that counts calls can refuse them though nothing is late.
        "closed_failed": sum(n for c, n in cap["codes"].items() if c != "OK")
        + sum(n for c, n in after["codes"].items() if c != "OK"),
        "closed_sent": cap["sent"] + after["sent"],
        "after": after_rate,
        "after_ratio": after_rate / capacity if capacity else float("nan"),
        "server_alive": alive,
    }


def table(rows: list[dict[str, Any]], deadline_ms: int) -> str:
    head = (
        "| scenario | generator (behind ms: end, worst) | capacity/s | offered/s (aim) | "
        "goodput/s | goodput/cap | codes | "
        f"ok p99 ms (<= {deadline_ms}) | refused p99 ms | RSS MiB before->after | after/s (ratio) | "
        "closed loops: failed/sent |"
    )
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        codes = ", ".join(f"{k} {v}" for k, v in sorted(r["codes"].items()))
        # Refusals by code (the C++ generator times each code): grpc's core refuses with
        # CANCELLED or UNAVAILABLE, Ferry with RESOURCE_EXHAUSTED.
        refused = {
            c: v["p99"]
            for c, v in sorted(r["codes_ms"].items())
            if c not in ("OK", "DEADLINE_EXCEEDED") and v.get("p99") is not None
        }
        refused_p99 = (
            ", ".join(f"{c} {ms:.1f}" for c, ms in refused.items())
            if refused
            else f"{r['rejected_p99_ms']:.1f}"
        )
        lines.append(
            f"| {r['scenario']} | {r['generator']} ({r['behind_ms']:,.1f}, "
            f"{r['max_behind_ms']:,.1f}) | {r['capacity']:,.0f} | {r['offered']:,.0f} "
            f"({r['offered_target']:,.0f}) | {r['goodput']:,.0f} | {r['goodput_ratio']:.0%} | "
            f"{codes} | {r['ok_p99_ms']:.1f} | {refused_p99} | "
            f"{r['rss_before_mib']:.0f}->{r['rss_after_mib']:.0f} | "
            f"{r['after']:,.0f} ({r['after_ratio']:.0%}) | "
            f"{r['closed_failed']:,}/{r['closed_sent']:,} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=SCENARIOS)
    p.add_argument("--factor", type=float, default=5.0, help="offered load / capacity")
    p.add_argument("--seconds", type=float, default=30.0, help="length of the overload")
    p.add_argument("--deadline-ms", type=int, default=200)
    p.add_argument("--cap-seconds", type=float, default=4.0, help="closed-loop phases")
    p.add_argument("--concurrency", type=int, default=16, help="closed-loop callers, all procs")
    p.add_argument(
        "--generator",
        choices=("python", "cpp"),
        help="unary scenarios' generator; default: cpp if bench/loadgen/build.sh builds it",
    )
    p.add_argument("--procs", type=int, default=2, help="Python generator processes")
    p.add_argument("--channels", type=int, default=8, help="C++ generator: TCP connections")
    p.add_argument("--threads", type=int, default=2, help="C++ generator: completion queues")
    p.add_argument(
        "--streams", type=int, default=4, help="streams per connection (C++) or process (Python)"
    )
    p.add_argument(
        "--stream-channels", type=int, default=2, help="C++ stream generator: TCP connections"
    )
    p.add_argument(
        "--server-arg", action="append", default=[], help="extra ferry serve flag (repeatable)"
    )
    p.add_argument("--out", type=Path, default=HERE / "results" / "overload.json")
    args = p.parse_args()
    if args.generator is None:
        args.generator = "cpp" if build_loadgen() else "python"
    elif args.generator == "cpp" and not build_loadgen():
        p.error("--generator cpp: bench/loadgen/build.sh failed")
    print(f"generator: {args.generator}")

    from models import build

    rows = []
    ctx = mp.get_context("spawn")  # the driver uses grpc: never fork it
    with tempfile.TemporaryDirectory() as tmp, ctx.Pool(args.procs) as pool:
        repo = Path(tmp) / "repo"
        build(MODEL, repo / MODEL / "1" / "model.onnx")
        for name in args.scenarios:
            row = scenario(pool, repo, name, args, Path(tmp))
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items()}, default=str), flush=True)
    print()
    print(
        f"open loop at {args.factor:g}x capacity for {args.seconds:g} s, "
        f"{args.deadline_ms} ms deadlines, generator {args.generator} "
        + (
            f"(unary: {args.channels} connections, {args.threads} threads; streams: "
            f"{args.stream_channels} connections x {args.streams} streams), "
            if args.generator == "cpp"
            else f"({args.procs} processes, {args.streams} streams each), "
        )
        + f"cpus {os.cpu_count()}"
    )
    print(table(rows, args.deadline_ms))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1, default=str))


if __name__ == "__main__":
    main()
