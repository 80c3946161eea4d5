"""Planned batches before/after item 3 of issue 16 (one copy each way), in-process, on CPU:

    flock /work/notes/bench.lock .venv/bin/python bench/iobinding.py --model mlp
    flock /work/notes/bench.lock .venv/bin/python bench/iobinding.py --model cnn
    python bench/iobinding.py --provider cuda --model resnet      # on a GPU host (gpu.md)

A batch of ``n`` one-row requests (n = 1..32) runs at the planned size >= n (1, 2, 4, 8, 16, 32):

* before: the requests ``concat``-ed, padded by ``pad_rows`` (a second concatenation), fed to
  ``session.run`` (what runtime.plans did before staging.py);
* after: ``PlannedSession.gather`` (rows copied once into the size's buffer, padded in place)
  and ``run_gathered`` (on CPU a plain run over the buffers; on a device, IOBinding with the
  outputs bound afresh).

Both use the same sessions. Rounds alternate which goes first; each timing lasts ~20 ms; the
figure is the median of the per-round ratios (before / after: > 1 means after is faster) with
its quartiles, and each one's median time per batch. Figures, not assertions.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from models import SHAPES, build

SIZES = [1, 2, 4, 8, 16, 32]
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
TIMING_S = 0.02


def _per_call(fn: Callable[[], object], runs: int) -> float:
    start = time.perf_counter()
    for _ in range(runs):
        fn()
    return (time.perf_counter() - start) / runs


def compare(before: Callable[[], object], after: Callable[[], object], rounds: int) -> list[float]:
    for fn in (before, after):
        for _ in range(3):  # the first runs allocate and pick kernels
            fn()
    runs = max(1, int(TIMING_S / max(_per_call(before, 1), 1e-6)))
    times: list[list[float]] = [[], []]
    for index in range(rounds):
        for which in (0, 1) if index % 2 == 0 else (1, 0):
            times[which].append(_per_call((before, after)[which], runs))
    ratios = sorted(b / a for b, a in zip(times[0], times[1], strict=True))
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    return [
        statistics.median(times[0]) * 1e3,
        statistics.median(times[1]) * 1e3,
        statistics.median(ratios),
        q1,
        q3,
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=sorted(SHAPES), default="mlp")
    parser.add_argument("--provider", choices=sorted(PROVIDERS), default="cpu")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--batches", default="1,2,3,5,8,12,16,24,32")
    args = parser.parse_args()

    from ferry.server.batching.tensors import concat
    from ferry.server.core.config import parse_config
    from ferry.server.runtime.plans import pad_rows
    from ferry.server.runtime.session import open_session

    with tempfile.TemporaryDirectory() as tmp:
        path = build(args.model, Path(tmp) / f"{args.model}.onnx")
        cfg = parse_config(
            {
                "onnxruntime": {
                    "intra_op_threads": 1,
                    "providers": [{"name": PROVIDERS[args.provider]}],
                },
                "batching": {"planned_batch_sizes": SIZES, "max_batch_size": SIZES[-1]},
            }
        )
        planned = open_session(path, cfg)
        planned.warm_up(1)
        shape = SHAPES[args.model]
        rng = np.random.default_rng(0)
        last: dict[int, tuple[tuple[int, ...], ...]] = {}
        pinned = any(s.pinned for s in planned.stagers.values())
        print(
            f"model {args.model} {list(shape)} fp32, {planned.providers[0]}, 1 intra-op thread, "
            f"one-row requests; pinned input buffers: {pinned}"
        )
        print("| requests | planned size | before ms | after ms | before/after (q1-q3) |")
        print("|---|---|---|---|---|")
        for n in (int(b) for b in args.batches.split(",")):
            parts = [
                {"input": rng.standard_normal((1, *shape)).astype(np.float32)} for _ in range(n)
            ]
            size = planned.size_for(n)
            session = planned._sessions[size]

            def before(
                parts: list[dict[str, np.ndarray]] = parts, size: int = size, session: Any = session
            ) -> object:
                # LoadedVersion's concat, then the old PlannedSession.run, bookkeeping included
                feeds = concat(parts, ["input"])
                rows = next(iter(feeds.values())).shape[0]
                padded = {k: pad_rows(v, planned.size_for(rows)) for k, v in feeds.items()}
                shape = tuple(a.shape for a in padded.values())
                if last.get(size, shape) != shape:
                    planned.plan_changes += 1
                last[size] = shape
                planned.executions[size] += 1
                return [out[:rows] for out in session.run(padded, None)]

            def after(parts: list[dict[str, np.ndarray]] = parts) -> object:
                return planned.run_gathered(planned.gather(parts, ["input"]), None)

            assert np.allclose(before()[0], after()[0], rtol=1e-3, atol=1e-4)
            b_ms, a_ms, ratio, q1, q3 = compare(before, after, args.rounds)
            print(f"| {n} | {size} | {b_ms:.3f} | {a_ms:.3f} | {ratio:.2f} ({q1:.2f}-{q3:.2f}) |")
        planned.release()


if __name__ == "__main__":
    main()
