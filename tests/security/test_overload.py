"""Overload: offer about five times the measured capacity, briefly, and check the server degrades
the way the peers' users asked for (Triton #914/#980/#4662, TorchServe serve#3342).

- The server stays up, and what it accepts finishes within its deadline.
- The excess is rejected at once with RESOURCE_EXHAUSTED (kind QUEUE_FULL): never INTERNAL,
  never a hang, never a DEADLINE_EXCEEDED for a request that waited in an unbounded queue.
- Memory stays bounded: server RSS (a subprocess, so it is the server's own) barely moves.
- Throughput comes back once the load stops: a closed loop afterwards reaches at least half of
  the first measurement (a loose, behavioural threshold, not a benchmark).

Everything is bounded in count and time: ~60 requests per closed loop, an open loop of ~2.5 s
capped at 1,500 requests, 10 s deadlines, all on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from grpc import aio
from helpers import make_repo, write_config
from sechelpers import ServerProcess, rss_kib, slow_model

from ferry.client._errors import ERROR_KIND_METADATA
from ferry.client._requests import build_infer_request

INFER = "/ferry.v1.Inference/Infer"
DEADLINE = 10.0
CLOSED_LOOP_REQUESTS = 60
OVERLOAD_FACTOR = 5
OVERLOAD_SECONDS = 2.5
MAX_OFFERED = 1500
QUEUE = 4


@dataclass
class Tally:
    codes: dict[str, int] = field(default_factory=dict)
    kinds: dict[str, int] = field(default_factory=dict)
    latency: dict[str, list[float]] = field(default_factory=dict)
    details: set[str] = field(default_factory=set)

    def add(self, code: str, kind: str, seconds: float) -> None:
        self.codes[code] = self.codes.get(code, 0) + 1
        if kind:
            self.kinds[kind] = self.kinds.get(kind, 0) + 1
        self.latency.setdefault(code, []).append(seconds)


async def one(call: aio.UnaryUnaryMultiCallable, payload: bytes, tally: Tally) -> None:
    start = time.perf_counter()
    try:
        await call(payload, timeout=DEADLINE)
        code, kind = "OK", ""
    except aio.AioRpcError as exc:
        code = exc.code().name
        kind = dict(exc.trailing_metadata() or ()).get(ERROR_KIND_METADATA, "")
        if code not in ("RESOURCE_EXHAUSTED",):
            tally.details.add(f"{code}: {exc.details()}"[:200])
    tally.add(code, str(kind), time.perf_counter() - start)


async def closed_loop(call: aio.UnaryUnaryMultiCallable, payload: bytes, count: int) -> float:
    """Requests per second with two callers, so the single instance is never idle."""
    tally = Tally()
    left = iter(range(count))

    async def caller() -> None:
        for _ in left:
            await one(call, payload, tally)

    start = time.perf_counter()
    await asyncio.gather(caller(), caller())
    elapsed = time.perf_counter() - start
    assert tally.codes == {"OK": count}, tally.codes
    return count / elapsed


async def open_loop(
    call: aio.UnaryUnaryMultiCallable, payload: bytes, rate: float, seconds: float
) -> Tally:
    """Fire at a fixed rate whatever the answers (an open loop), then wait for every answer."""
    tally = Tally()
    total = min(int(rate * seconds), MAX_OFFERED)
    tasks = []
    start = time.perf_counter()
    for i in range(total):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)  # pacing the generator, not synchronising with the server
        tasks.append(asyncio.create_task(one(call, payload, tally)))
    await asyncio.gather(*tasks)
    return tally


async def scenario(srv: ServerProcess) -> None:
    payload = build_infer_request(
        "slow", {"input": np.ones((1, 256), np.float32)}
    ).SerializeToString()
    async with aio.insecure_channel(srv.target) as channel:
        call = channel.unary_unary(INFER)
        await closed_loop(call, payload, 10)  # warm-up: sessions, arenas, connection
        capacity = await closed_loop(call, payload, CLOSED_LOOP_REQUESTS)
        rss_before = rss_kib(srv.pid)
        offered = OVERLOAD_FACTOR * capacity
        tally = await open_loop(call, payload, offered, OVERLOAD_SECONDS)
        rss_after = rss_kib(srv.pid)
        assert srv.proc is not None and srv.proc.poll() is None, "the server died under overload"
        recovered = await closed_loop(call, payload, CLOSED_LOOP_REQUESTS)
    lat = {k: statistics.median(v) * 1000 for k, v in tally.latency.items()}
    print(
        f"\ncapacity {capacity:.0f}/s, offered {offered:.0f}/s for {OVERLOAD_SECONDS}s: "
        f"{tally.codes} kinds {tally.kinds}; median ms {lat}; "
        f"RSS {rss_before / 1024:.0f} -> {rss_after / 1024:.0f} MiB; "
        f"recovered {recovered:.0f}/s ({recovered / capacity:.0%})"
    )
    assert set(tally.codes) <= {"OK", "RESOURCE_EXHAUSTED"}, (tally.codes, tally.details)
    assert tally.codes.get("OK", 0) > 0
    assert tally.codes.get("RESOURCE_EXHAUSTED", 0) > 0, "5x the capacity was never rejected"
    assert tally.kinds == {"QUEUE_FULL": tally.codes["RESOURCE_EXHAUSTED"]}
    assert rss_after - rss_before < 64 * 1024, f"RSS grew {(rss_after - rss_before) / 1024:.0f} MiB"
    assert recovered >= 0.5 * capacity


def test_overload_is_shed_and_the_server_recovers(tmp_path: Path, server_process: type) -> None:
    repo = make_repo(tmp_path / "repo", {"slow": slow_model(layers=12)})
    write_config(
        repo,
        "slow",
        {
            "batching": {"max_batch_size": 0, "max_queue_size": QUEUE},
            "instances": {"count": 1},
            "onnxruntime": {"intra_op_threads": 1, "inter_op_threads": 1},
        },
    )
    srv = server_process(repo).start()
    asyncio.run(scenario(srv))
    assert srv.stop() == 0  # and it still shuts down cleanly
