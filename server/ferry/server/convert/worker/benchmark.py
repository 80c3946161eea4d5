"""The benchmark stage: what each variant costs to store and to run, as the server will run it.

Latency is measured with serving's session settings (ENABLE_ALL, sequential, one inter-op thread).
The machine is shared with the serving process and whatever else runs there, so one variant's
figure alone means little: variants are timed in rounds, each round running every variant once
in a rotating order, and a variant's speed-up is the median of its per-round ratios against fp32
in the same round, so a burst of load from elsewhere slows both sides of a ratio instead of one
figure. The spread of those ratios (their interquartile range) is reported beside them, and a
verdict says whether the variant is clearly faster, clearly slower, as fast, or whether the noise
leaves it unclear.

The stage is time-boxed (``BUDGETS``): a variant clearly slower than fp32 stops being timed once
that is established (a ConvInteger graph ten times slower than fp32 once took 36 of a job's 38 s),
and a stage that reaches its budget stops with the rounds it has. The figures compare variants
on this machine; they are not a load test.
"""

from __future__ import annotations

import math
import statistics
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort

from ferry.server.convert.spec import InputSpec
from ferry.server.convert.strategies.quantization import AUTO_MIN_SPEEDUP
from ferry.server.convert.worker import external
from ferry.server.convert.worker.parity import Arrays, cycled, generate, onnx_session
from ferry.server.convert.worker.placement import CPU_ONLY
from ferry.server.convert.worker.report import BenchmarkRecord

WARMUP = 2
GZIP_LEVEL = 6
# A variant whose ratios against fp32 are all (to the upper quartile) below this after the
# minimum rounds is clearly slower: it is not timed any further (nor at larger batches).
DROP_BELOW = 0.5
# Ratios whose upper quartile is over this many times their lower quartile: the machine was too
# busy for the figure to mean anything.
NOISY_SPREAD = 1.5
# Fewer rounds than this cannot give a spread.
MIN_ROUNDS_FOR_VERDICT = 3

FASTER, SLOWER, SAME, UNCLEAR = "faster", "slower", "same", "unclear"


@dataclass(frozen=True)
class Budget:
    """How long the stage may take: rounds per batch size, and seconds."""

    min_rounds: int
    max_rounds: int
    per_variant_s: float  # per batch size, after the minimum rounds
    stage_s: float  # the whole stage; reached, it stops with the rounds it has


BUDGETS = {
    "full": Budget(min_rounds=5, max_rounds=40, per_variant_s=0.6, stage_s=30.0),
    "quick": Budget(min_rounds=3, max_rounds=8, per_variant_s=0.15, stage_s=6.0),
}


# Above this, the gzip size is estimated from GZIP_SAMPLE_BLOCKS blocks of 1 MiB spread evenly over
# the file: compressing a 2.5 GiB data file whole took minutes per variant (about 20 MB/s).
GZIP_WHOLE_BYTES = 256 << 20
GZIP_SAMPLE_BLOCKS = 64


def gzip_size(path: Path) -> int:
    """Size of the file gzip-compressed at level 6, streamed so a large model stays out of
    memory; for a file over GZIP_WHOLE_BYTES, scaled from evenly spread samples."""
    compressor = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31)  # wbits 31: the gzip container
    total = path.stat().st_size
    block = 1 << 20
    size = read = 0
    with path.open("rb") as f:
        if total <= GZIP_WHOLE_BYTES:
            while chunk := f.read(block):
                size += len(compressor.compress(chunk))
            return size + len(compressor.flush())
        stride = total // GZIP_SAMPLE_BLOCKS
        for i in range(GZIP_SAMPLE_BLOCKS):
            f.seek(i * stride)
            chunk = f.read(block)
            read += len(chunk)
            size += len(compressor.compress(chunk))
    size += len(compressor.flush())
    return round(size * total / max(read, 1))


def _session(
    path: Path, threads: int, providers: list[tuple[str, dict[str, str]]] | None = None
) -> ort.InferenceSession:
    return onnx_session(path, threads, providers or CPU_ONLY)


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """(lower quartile, median, upper quartile); a single value is all three."""
    if len(values) < 2:
        return values[0], values[0], values[0]
    low, mid, high = statistics.quantiles(values, n=4, method="inclusive")
    return low, mid, high


@dataclass
class Timings:
    """Seconds per run, per variant and batch size; ratios pair fp32 with a variant per round."""

    seconds: dict[str, dict[str, list[float]]]  # variant -> batch -> [s per round]
    ratios: dict[str, dict[str, list[float]]]  # variant -> batch -> [fp32 s / variant s]
    dropped: dict[str, str]  # variant -> when and why it stopped being timed
    cut_short: bool  # the stage budget ended it


def time_rounds(
    paths: dict[str, Path],
    inputs: list[InputSpec],
    batched: bool,
    batches: list[int],
    threads: int,
    *,
    budget: Budget,
    providers: list[tuple[str, dict[str, str]]] | None = None,
    samples: Arrays | None = None,
) -> Timings:
    """Time every variant in rounds (``paths`` has "fp32" first), batch sizes in ascending
    order, so that a variant found clearly slower on a small batch is spared the large one."""
    sessions = {name: _session(path, threads, providers) for name, path in paths.items()}
    timings = Timings({n: {} for n in paths}, {n: {} for n in paths}, {}, False)
    stage_end = time.perf_counter() + budget.stage_s
    for batch in sorted(batches) if batched else [1]:
        key = str(batch)
        live = [n for n in sessions if n not in timings.dropped]
        if samples and batched:  # the job's samples: values the model takes
            feed = cycled(samples, batch)
        elif samples:
            feed = {name: array[0] for name, array in samples.items()}
        else:
            feed = next(generate(inputs, batch, batched).batches(batch))
        for name in live:
            for _ in range(WARMUP):
                sessions[name].run(None, feed)
            timings.seconds[name][key] = []
            timings.ratios[name][key] = []
        end = time.perf_counter() + budget.per_variant_s * len(live)
        for round_ in range(budget.max_rounds):
            now = time.perf_counter()
            if now > stage_end and round_ > 0:
                timings.cut_short = True
                break
            if round_ >= budget.min_rounds and now > end:
                break
            order = live[round_ % len(live) :] + live[: round_ % len(live)]  # rotate the order
            took = {}
            for name in order:
                start = time.perf_counter()
                sessions[name].run(None, feed)
                took[name] = time.perf_counter() - start
            for name in live:
                timings.seconds[name][key].append(took[name])
                if took[name] > 0:
                    timings.ratios[name][key].append(took["fp32"] / took[name])
            if round_ + 1 >= budget.min_rounds:
                for name in [n for n in live if n != "fp32"]:
                    high = quartiles(timings.ratios[name][key])[2]
                    if high < DROP_BELOW:
                        timings.dropped[name] = (
                            f"stopped timing after {round_ + 1} rounds at batch {batch}: "
                            f"clearly slower than fp32 ({high:.2f}x at best)"
                        )
                        live.remove(name)
        if timings.cut_short:
            break
    return timings


def verdict(ratios: dict[str, list[float]]) -> tuple[str, str]:
    """(FASTER | SLOWER | SAME | UNCLEAR, a note when the spread makes the figure meaningless).

    Clearly faster: a geometric-mean median speed-up of at least AUTO_MIN_SPEEDUP with every
    batch size's lower quartile above 1 (above AUTO_MIN_SPEEDUP itself when the spread is
    noisy); clearly slower: the mirror image. The same speed: every interquartile range within
    [1/AUTO_MIN_SPEEDUP, AUTO_MIN_SPEEDUP]. Anything else, or too few rounds, is unclear."""
    measured = {b: r for b, r in ratios.items() if r}
    if not measured:
        return UNCLEAR, ""
    spreads = {b: quartiles(r) for b, r in measured.items()}
    score = math.exp(statistics.fmean(math.log(mid) for _, mid, _ in spreads.values()))
    noisy = [
        f"batch {b}: {low:.2f}-{high:.2f}x"
        for b, (low, _, high) in spreads.items()
        if low > 0 and high / low > NOISY_SPREAD
    ]
    note = (
        f"speed-up varied widely between rounds ({'; '.join(noisy)}, interquartile): the "
        "machine was busy, so the figure says little; convert again on a quieter machine"
        if noisy
        else ""
    )
    if max(len(r) for r in measured.values()) < MIN_ROUNDS_FOR_VERDICT:
        return UNCLEAR, note or "too few timing rounds for a verdict on speed"
    # Under noise, a verdict needs the pessimistic end of every range to clear the bar itself.
    floor, ceiling = (AUTO_MIN_SPEEDUP, 1 / AUTO_MIN_SPEEDUP) if noisy else (1.0, 1.0)
    if score >= AUTO_MIN_SPEEDUP and all(low > floor for low, _, _ in spreads.values()):
        return FASTER, note
    if score <= 1 / AUTO_MIN_SPEEDUP and all(high < ceiling for _, _, high in spreads.values()):
        return SLOWER, note
    band = (1 / AUTO_MIN_SPEEDUP, AUTO_MIN_SPEEDUP)
    if all(band[0] <= low and high <= band[1] for low, _, high in spreads.values()):
        return SAME, note
    return UNCLEAR, note


def measure(
    paths: dict[str, Path],
    inputs: list[InputSpec],
    batched: bool,
    max_batch: int,
    threads: int,
    *,
    mode: str = "full",
    providers: list[tuple[str, dict[str, str]]] | None = None,
    samples: Arrays | None = None,
) -> tuple[dict[str, BenchmarkRecord], list[str]]:
    """Per variant: size, gzip size, weight sparsity, latency (median and interquartile range)
    and speed-up against "fp32" (median of the per-round ratios, and their interquartile range),
    on the providers the version will serve with; and the stage's notes."""
    timings = time_rounds(
        paths, inputs, batched, sorted({1, max_batch}), threads, budget=BUDGETS[mode],
        providers=providers, samples=samples,
    )  # fmt: skip
    notes = []
    if timings.cut_short:
        notes.append(
            f"the benchmark stopped at its {BUDGETS[mode].stage_s:g} s budget ({mode}): speed "
            "figures rest on fewer rounds"
        )
    records = {}
    for name, path in paths.items():
        seconds = timings.seconds[name]
        ratios = {b: r for b, r in timings.ratios[name].items() if r}
        latency = {b: quartiles([s * 1000.0 for s in runs]) for b, runs in seconds.items() if runs}
        speed = {b: quartiles(r) for b, r in ratios.items()}
        if name == "fp32":
            speed_verdict, note = SAME, ""
        else:
            speed_verdict, note = verdict(ratios)
        records[name] = BenchmarkRecord(
            size_bytes=external.size(path),  # model.onnx and its data file, if any
            gzip_bytes=sum(gzip_size(p) for p in external.files(path)),
            sparsity=external.weight_sparsity(path),
            latency_ms={b: mid for b, (_, mid, _) in latency.items()},
            speedup_vs_fp32={b: mid for b, (_, mid, _) in speed.items()},
            latency_iqr_ms={b: {"low": lo, "high": hi} for b, (lo, _, hi) in latency.items()},
            speedup_iqr={b: {"low": lo, "high": hi} for b, (lo, _, hi) in speed.items()},
            rounds={b: len(runs) for b, runs in seconds.items()},
            speed=speed_verdict,
            speed_note="; ".join(filter(None, [timings.dropped.get(name, ""), note])),
        )
    return records, notes
