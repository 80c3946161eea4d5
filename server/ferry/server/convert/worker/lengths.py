"""Other sizes of each declared dynamic axis, on which every variant is judged too.

All rows of a sample file share one size of each dynamic axis (``parity._check_shape``), and so
do a calibration file's; ``dims.verify`` proves only that the fp32 graph *runs* at the bounds. A
text classifier (an embedding mean) whose static int8 variant was calibrated and judged at
sequence length 12 was published within budget, and answered cosine 0.93 and relative error
0.52 against the model at length 1: a mean of one embedding spans a range the calibration at
12 never saw, and int8 clipped it. The served version accepts every size within the bounds, so
the budget is judged at a few of them as well.

The sizes (``sizes``): the axis' lower bound, one between it and the samples' size, and twice
the samples' size (within the upper bound); at most three per axis name, none larger than twice
what the samples hold, on the samples' rows (at most ``validation.samples``) and the
calibration file's after them (``MOST_ROWS`` in all). Every input sharing the axis name is
resized together, ids and their mask alike (``resized``): a shorter size keeps each row's first
positions (a prefix of a text is a text, and right padding stays at the end), a longer one
repeats the row's positions (the same tokens, values the data holds; a padded row gets padding
inside it, which a mask is there to describe). The source model's outputs on them, before
pruning, are the reference: rows it answers NaN on are left out, and a size where it fails (or
answers NaN on every row) is not judged, with a note; none of that refuses a job its samples
pass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ferry.server.convert.spec import InputSpec
from ferry.server.convert.worker.parity import Arrays, Samples, answered_rows
from ferry.server.errors import first_line

Outputs = list[np.ndarray]
# Each size judged is at most this multiple of the samples' size: bounded cost and memory.
LONGER = 2
# Calibration rows join the samples' at each size up to this many rows in all: 16 rows of one
# token each showed a bag of words' int8 variant within budget (cosine 0.9965) that answered
# cosine 0.982 on fresh one-token texts.
MOST_ROWS = 64


@dataclass
class Probe:
    """One size of one axis name, the rows at that size and the source model's outputs."""

    axis: str
    size: int
    sample_size: int
    rows: Samples
    reference: Outputs
    calibration: int = 0  # how many of the rows are the calibration file's

    def describe(self) -> str:
        how = "their first positions" if self.size < self.sample_size else "theirs repeated"
        cal = f", {self.calibration} of them the calibration file's" if self.calibration else ""
        return (
            f"at {self.axis}={self.size} ({len(self.rows)} rows{cal}: the samples' "
            f"{self.sample_size} positions, {how})"
        )


def _axes(inputs: list[InputSpec], samples: Samples) -> dict[str, list[tuple[str, int]]]:
    """{axis name: [(input, array axis)]}: where each declared axis lies in the sample arrays
    (they lead with the rows; an unbatched spec's shape has no batch dim of its own)."""
    shift = 0 if samples.batched else 1
    axes: dict[str, list[tuple[str, int]]] = {}
    for spec in inputs:
        for a in spec.dynamic_axes:
            axes.setdefault(a.name, []).append((spec.name, a.axis + shift))
    return axes


def sizes(inputs: list[InputSpec], samples: Samples) -> list[tuple[str, int, int]]:
    """(axis name, size, the samples' size) to judge at, beside the samples' own size."""
    bounds = {a.name: (a.min, a.max) for spec in inputs for a in spec.dynamic_axes}
    out = []
    for name, places in _axes(inputs, samples).items():
        input_name, axis = places[0]
        held = samples.arrays[input_name].shape[axis]
        low, high = bounds[name]
        longer = LONGER * held if not high else min(high, LONGER * held)
        wanted = [low, (low + held) // 2, longer]
        out += [(name, s, held) for s in sorted(set(wanted) - {held}) if s >= 1]
    return out


def resized(inputs: list[InputSpec], samples: Samples, name: str, size: int) -> Samples:
    """The samples with every axis named ``name`` at ``size``: prefixes, or the row repeated."""
    arrays: Arrays = dict(samples.arrays)
    for input_name, axis in _axes(inputs, samples)[name]:
        array = arrays[input_name]
        held = array.shape[axis]
        index = np.arange(size) % held  # a prefix when size <= held
        arrays[input_name] = np.take(array, index, axis=axis)
    return Samples(arrays, samples.batched)


def probes(
    inputs: list[InputSpec],
    samples: Samples,
    count: int,
    source: Callable[[Samples], Outputs],
    notes: list[str],
    *,
    calibration: Samples | None = None,
) -> list[Probe]:
    """The sizes to judge at, with ``source``'s outputs on the first ``count`` rows of the
    samples at each, and rows of ``calibration`` after them up to ``MOST_ROWS`` in all; a size
    the source cannot answer is skipped, and ``notes`` says so."""
    head = samples.rows(slice(0, count))
    room = max(0, MOST_ROWS - len(head))
    more = None
    if calibration is not None and room:
        more = calibration.rows(slice(0, room))
    out = []
    for name, size, held in sizes(inputs, head):
        rows = resized(inputs, head, name, size)
        if more is not None:
            longer = resized(inputs, more, name, size)
            rows = rows.joined(longer) if rows.stacks_with(longer) else rows
        skipped = f"variants not judged at {name}={size} (rows made from the samples' {held})"
        try:
            reference = source(rows)
        except Exception as exc:
            notes.append(f"{skipped}: the source model fails there ({first_line(exc)})")
            continue
        short = next((o.shape for o in reference if o.ndim and len(o) != len(rows)), None)
        if short is not None:
            # Rows in, other rows out: the export fixed this axis somewhere inside (a Reshape
            # to the example's size), and the bounds' runs (dims.verify) say so; judged by row
            # here, it crashed the child (INTERNAL).
            notes.append(
                f"{skipped}: the source model's output there has shape {list(short)}, not "
                f"{len(rows)} rows"
            )
            continue
        keep = answered_rows(reference, len(rows))
        if not keep.any():
            notes.append(f"{skipped}: the source model answers NaN on every row")
            continue
        kept = rows.rows(keep)
        calibration_rows = int(keep[len(head) :].sum())
        out.append(Probe(name, size, held, kept, [o[keep] for o in reference], calibration_rows))
    return out
