"""Does a batch that grows make its tightest request late? The real DynamicBatcher under open-loop
overload, in simulated time (an event loop whose clock jumps to its next timer instead of
sleeping), so a run of minutes takes seconds and every run of a seed is the same.

    .venv/bin/python bench/batch_deadlines.py                   # factors 0.8, 1.5, 3, 6
    .venv/bin/python bench/batch_deadlines.py --factors 3 --seconds 60
    .venv/bin/python bench/batch_deadlines.py --deadline-ms 15 --max-queue-delay-ms 10

A model runs a batch of n rows in ``fixed + per_row * n`` seconds, times a lognormal noise; one
instance; requests of one row arrive as a Poisson process at ``factor`` x the capacity of full
batches, each with the same deadline. Counted per request: ``ok`` (answered by its deadline),
``late`` (answered after it: executed for nobody), ``refused`` (QueueFull or DeadlineExceeded at
the door), ``expired`` (dropped from the queue unrun). Goodput is ``ok`` per second.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import selectors
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))

from ferry.server.batching.batcher import BatchInfo, DynamicBatcher
from ferry.server.errors import DeadlineExceeded, QueueFull


class _Idle(selectors.DefaultSelector):
    """No file descriptor ever becomes ready: a select() that would block jumps the clock."""

    def __init__(self, loop: SimLoop) -> None:
        super().__init__()
        self._sim = loop

    def select(self, timeout: float | None = None) -> list[Any]:
        if timeout:
            self._sim.now += timeout
        return super().select(0)


class SimLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        self.now = 0.0
        super().__init__(_Idle(self))

    def time(self) -> float:
        return self.now


async def _scenario(
    *,
    factor: float,
    seconds: float,
    deadline: float,
    fixed: float,
    per_row: float,
    limit: int,
    delay: float,
    seed: int,
) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    rng = random.Random(seed)

    async def handler(items: Sequence[int], info: BatchInfo) -> list[int]:
        await asyncio.sleep((fixed + per_row * info.size) * rng.lognormvariate(0.0, 0.1))
        return list(items)

    batcher: DynamicBatcher[int, int] = DynamicBatcher(
        handler,
        max_batch_size=limit,
        max_queue_delay=delay,
        max_queue_size=100_000,
        clock=loop.time,
    )
    counts = {"ok": 0, "late": 0, "refused": 0, "expired": 0}

    async def one(i: int) -> None:
        due = loop.time() + deadline
        try:
            await batcher.submit(i, deadline=due)
        except QueueFull:
            counts["refused"] += 1
            return
        except DeadlineExceeded as exc:
            counts["expired" if "queued" in str(exc) else "refused"] += 1
            return
        counts["ok" if loop.time() <= due else "late"] += 1

    rate = factor * limit / (fixed + per_row * limit)
    tasks: list[asyncio.Task[None]] = []
    at = 0.0
    i = 0
    while at < seconds:
        at += rng.expovariate(rate)
        await asyncio.sleep(max(0.0, at - loop.time()))
        tasks.append(loop.create_task(one(i)))
        i += 1
    await asyncio.gather(*tasks)
    await batcher.close()
    out: dict[str, float] = dict(counts)
    out["offered"] = i
    out["capacity/s"] = rate / factor
    out["goodput/s"] = counts["ok"] / seconds
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--factors", type=float, nargs="+", default=[0.8, 1.5, 3.0, 6.0])
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--deadline-ms", type=float, default=50.0)
    ap.add_argument("--fixed-ms", type=float, default=2.0)
    ap.add_argument("--per-row-ms", type=float, default=0.25)
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--max-queue-delay-ms", "--delay-ms", dest="delay_ms", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    print("factor  capacity/s  offered  ok  late  refused  expired  goodput/s  (% of capacity)")
    for factor in a.factors:
        loop = SimLoop()
        try:
            r = loop.run_until_complete(
                _scenario(
                    factor=factor,
                    seconds=a.seconds,
                    deadline=a.deadline_ms / 1000,
                    fixed=a.fixed_ms / 1000,
                    per_row=a.per_row_ms / 1000,
                    limit=a.max_batch_size,
                    delay=a.delay_ms / 1000,
                    seed=a.seed,
                )
            )
        finally:
            loop.close()
        share = 100 * r["goodput/s"] / r["capacity/s"]
        print(
            f"{factor:>6}  {r['capacity/s']:>10.0f}  {r['offered']:>7.0f}  {r['ok']:.0f}  "
            f"{r['late']:.0f}  {r['refused']:.0f}  {r['expired']:.0f}  "
            f"{r['goodput/s']:.0f}  ({share:.0f}%)"
        )


if __name__ == "__main__":
    main()
