"""Rows to top a short sample file up with, so that a variant is not judged on one or two rows.

A sample file of one row judged a quantized top-k model on three indices: they agreed, the budget
(min_cosine 0.99) passed, and the int8 variant was published although it named other indices in
4% of fresh rows (16 rows of the same data refused it). The rows a budget sees decide what it can
notice, so a file with fewer rows than ``validation.samples`` is topped up to that count, and
every variant is judged on those rows too (``pipeline._validate``).

Real rows first: the calibration file's, when the job has one shaped like the samples. The rest
are drawn like the rows at hand (the samples and the calibration rows together), close to the
data rather than to a guessed distribution: floating inputs are a given row with noise at each
element's own scale (``_draw_floats``), so what is constant in the data (padding, a fixed
channel) stays constant; integer inputs take values within the range the data holds
(``_draw_discrete``: a token id is one the model's tables have), masks and flags only the values
it holds. The model itself decides whether such rows are usable: rows where the reference answers
NaN are dropped, and a reference that fails on them drops them all (``usable``); the budget is
then judged on the given rows alone and the report says why.

Measured on hand-written models (top-k and argmax heads, logits, a CNN, a bag of words, a
tabular regression; 3 seeds, dynamic and static int8, files of 1 and 2 rows; the truth: 64 real
rows): see ``docs/conversion.md``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ferry.server.convert.worker.parity import Samples, answered_rows, is_class_scores

# Apart from parity.SEED: a rerun of a job draws the same rows, and they differ from the
# generated samples a job without a sample file gets.
DRAWN_SEED = 1


@dataclass
class TopUp:
    rows: Samples
    calibration: int  # how many of them are the calibration file's
    drawn: int  # the rest

    def describe(self, given: str) -> str:
        """``given``: what the rows stand beside ("the sample file's 1")."""
        parts = [f"{self.calibration} of the calibration file's"] if self.calibration else []
        parts += [f"{self.drawn} drawn like them"] if self.drawn else []
        return f"{len(self.rows)} rows beside {given} ({', '.join(parts)})"

    def first(self, count: int) -> TopUp:
        """The first ``count`` rows (the calibration file's come first)."""
        calibration = min(self.calibration, count)
        return TopUp(self.rows.rows(slice(0, count)), calibration, count - calibration)


# An output judged by the share of equal elements (integer and boolean outputs; class scores
# under min_top1_agreement) is judged by counting changed elements, and 16 rows cannot count a
# change of the budget's size: an int8 variant that named another class for 2% of rows showed
# no change on 16 rows 72% of the time (0.98^16), and was published. So such outputs are judged
# on ``AGREEMENT_CHANGES / (1 - limit)`` elements, 500 at 0.99, the added rows apart from the
# samples (any change there refuses; on 484 added rows, 5 do). It was 3 / (1 - limit), the
# rule of three's 300 (3 in 284 refused): a variant within budget at 0.5% was refused 23% of
# the time, and judged on more rows by the same share both errors fall, for every rate of
# change (binomial, the 16 samples included): within budget at 0.5%, refused 17% instead of
# 23%, at 0.8% 42% instead of 47%; past it, at 1.2% refused 74% instead of 72%, at 1.5% 88%
# instead of 84%, at 2% 97.5% instead of 94%. (Judged as one count with the samples, it
# published 2 of 6 argmax variants that changed 4% of fresh labels: drawn rows show fewer
# changes than fresh data, their margins being the given rows'.)
AGREEMENT_CHANGES = 5
# At most this many rows, whatever the limit (a limit of 1 wants every row there is).
AGREEMENT_MOST_ROWS = 512
# The rows past validation.samples are run within this many seconds of the source model's time
# (a large model is judged on fewer, with a note), so that counting does not take a large model's
# conversion hours.
AGREEMENT_SECONDS = 30.0


def agreement_rows(outputs: list[np.ndarray], rows: int, min_cosine: float, min_top1: float) -> int:
    """How many rows the outputs judged by agreement need (0: none is), from the reference's
    ``outputs`` on ``rows`` rows: ``AGREEMENT_CHANGES / (1 - limit)`` elements of each such
    output, at most ``AGREEMENT_MOST_ROWS`` rows."""
    need = 0
    for out in outputs:
        if not out.ndim or not out.size or not rows:
            continue
        if out.dtype.kind in "biu":
            per_row, limit = out.size // rows, min_cosine
        elif min_top1 > 0 and is_class_scores(out):
            per_row, limit = 1, min_top1
        else:
            continue
        if limit >= 1:
            return AGREEMENT_MOST_ROWS
        need = max(need, math.ceil(AGREEMENT_CHANGES / (1 - max(limit, 0.0)) / max(per_row, 1)))
    return min(need, AGREEMENT_MOST_ROWS)


def top_up(samples: Samples, count: int, calibration: Samples | None) -> TopUp | None:
    """``count - len(samples)`` more rows; None when the samples already number ``count``."""
    extra = count - len(samples)
    if extra <= 0:
        return None
    rng = np.random.default_rng(DRAWN_SEED)
    real, pool = samples.rows(np.arange(0)), samples
    if calibration is not None and samples.stacks_with(calibration):
        real = calibration.rows(rng.permutation(len(calibration))[:extra])
        pool = samples.joined(calibration)
    rest = extra - len(real)
    if rest:
        drawn = Samples({n: _draw(a, rest, rng) for n, a in pool.arrays.items()}, real.batched)
        real = real.joined(drawn)
    return TopUp(real, extra - rest, rest)


def _draw(array: np.ndarray, extra: int, rng: np.random.Generator) -> np.ndarray:
    if array.dtype.kind == "f":
        return _draw_floats(array, extra, rng)
    return _draw_discrete(array, extra, rng)


def _draw_discrete(array: np.ndarray, extra: int, rng: np.random.Generator) -> np.ndarray:
    """Integers within the range the data holds, at random positions: resampling only the ids
    a one-row file holds left a bag of words' mean where it was, and an int8 variant that
    named another class for 5% of fresh texts agreed on every drawn row. Two values or fewer
    (a mask, a flag, a constant length) and anything not an integer keep to the values held."""
    shape = (extra, *array.shape[1:])
    values = np.unique(array.reshape(-1))
    if array.dtype.kind in "iu" and len(values) > 2:
        low, high = int(values[0]), int(values[-1])
        return rng.integers(low, high, size=shape, endpoint=True).astype(array.dtype)
    return values[rng.integers(0, len(values), size=shape)]


# How far a drawn row strays from the given row it starts from, in units of each element's own
# scale: far enough to name other top-k indices than the given rows do, near enough that an
# int8 variant calibrated on data like them stays within its calibrated range.
STRAY = 0.5


def _draw_floats(array: np.ndarray, extra: int, rng: np.random.Generator) -> np.ndarray:
    """A given row plus noise at each element's own scale: its spread over the rows, or with a
    single row its own size. Each element keeps its scale: a pooled spread drew an age with the
    noise of an income, and per-element spreads used as the rows' distribution (two rows give
    one degree of freedom) drew some elements at three times their range; calibrated int8
    variants then failed on values no client sends. An element the same in every row stays so
    (padding, a constant channel), and so does a zero in a single row (or in copies of one:
    a calibration file holding the sample row is still one row)."""
    a64 = np.where(np.isfinite(array), array, 0.0).astype(np.float64)
    distinct = len(np.unique(a64.reshape(len(a64), -1), axis=0))
    scale = a64.std(axis=0) if distinct > 1 else np.abs(a64[0])
    picks = rng.integers(0, len(array), size=extra)
    drawn = a64[picks] + STRAY * scale * rng.standard_normal((extra, *array.shape[1:]))
    info = np.finfo(array.dtype)
    drawn = np.clip(drawn, float(info.min), float(info.max)).astype(array.dtype)
    # A NaN or infinity in the file (a fill value) stays where it was, untouched.
    given = array[picks]
    return np.where(np.isfinite(given), drawn, given)


def usable(top: TopUp, reference: list[np.ndarray]) -> tuple[TopUp, list[np.ndarray]]:
    """The rows the reference answers without NaN (``parity.answered_rows``), and its outputs
    on them."""
    keep = answered_rows(reference, len(top.rows))
    calibration = int(keep[: top.calibration].sum())
    rows = TopUp(top.rows.rows(keep), calibration, int(keep.sum()) - calibration)
    return rows, [out[keep] for out in reference]
