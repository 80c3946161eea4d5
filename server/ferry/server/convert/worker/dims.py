"""Dynamic axes besides the batch: proven at export, carried by the published file.

A declared axis (a sequence length, an image side) must stay symbolic through the export, and
the graph must run at both of its bounds: an exporter that froze it, or a model that only works
at the example's size (a literal reshape, a position table shorter than ``max``), is refused
at conversion rather than failing on the first request of another size (a frozen dim where the
graph is read: ``export.verify_batch``, ``load``; the runs at the bounds here). The bounds travel inside the
published ONNX file (model metadata ``ferry.dynamic_axes``), so the version describes itself:
the serving side refuses a request outside them before it reaches onnxruntime.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np

from ferry.server.convert.spec import DynamicAxis, InputSpec
from ferry.server.convert.worker.parity import cycled, generate, tolerance_failure
from ferry.server.errors import ConversionFailed, first_line

# The model metadata key (ONNX metadata_props) the serving side reads: runtime.session.
METADATA_KEY = "ferry.dynamic_axes"
# An unbounded axis is run at this multiple of its sample size (and at its min).
UNBOUNDED_PROBE = 2


def metadata(inputs: list[InputSpec]) -> str:
    """``{input: {axis: [name, min, max]}}`` as JSON; "" when no input declares an axis."""
    table = {
        spec.name: {str(a.axis): [a.name, a.min, a.max] for a in spec.dynamic_axes}
        for spec in inputs
        if spec.dynamic_axes
    }
    return json.dumps(table, sort_keys=True) if table else ""


def probe_sizes(inputs: list[InputSpec]) -> list[dict[str, int]]:
    """One {axis name: size} per run: every named axis at its min, then at its max (or a
    multiple of its sample size when unbounded); axes sharing a name move together."""
    axes: dict[str, tuple[DynamicAxis, int]] = {}
    for spec in inputs:
        for a in spec.dynamic_axes:
            axes.setdefault(a.name, (a, spec.shape[a.axis]))
    if not axes:
        return []
    low = {name: a.min for name, (a, _) in axes.items()}
    high = {name: a.max or max(size * UNBOUNDED_PROBE, a.min) for name, (a, size) in axes.items()}
    return [low, high] if low != high else [low]


def resized(inputs: list[InputSpec], sizes: dict[str, int]) -> list[InputSpec]:
    """The specs with each declared axis at the size ``sizes`` gives its name."""
    out = []
    for spec in inputs:
        shape = list(spec.shape)
        for a in spec.dynamic_axes:
            shape[a.axis] = sizes[a.name]
        out.append(replace(spec, shape=shape))
    return out


def verify(
    inputs: list[InputSpec],
    run: Callable[[dict[str, np.ndarray]], Any],
    seen: list[list[tuple[int, ...]]] | None = None,
) -> list[str]:
    """Run the graph at both bounds of every declared axis (batch 1); return the report's note
    naming the sizes it ran at, and add each run's output shapes to ``seen``. That the axes are
    symbolic is checked where the graph is read: ``export.verify_batch`` for an export, ``load``
    for an ONNX source."""
    ran = []
    for sizes in probe_sizes(inputs):
        feed = generate(resized(inputs, sizes), 1, batched=True).arrays
        shown = ", ".join(f"{name}={size}" for name, size in sizes.items())
        try:
            outputs = run(feed)
            if seen is not None:
                seen.append([tuple(np.shape(o)) for o in outputs])
        except Exception as exc:
            said = first_line(exc)
            raise ConversionFailed(
                f"the exported model fails at {shown} in onnxruntime ({said}): "
                + (
                    _fixed_reshape(said, inputs, sizes)
                    or "check the dynamic axes' bounds (a position table, a fixed-size buffer) "
                    "or lower max"
                )
            ) from None
        ran.append(shown)
    if not ran:
        return []
    return [f"dynamic axes verified: the model runs at {' and at '.join(ran)} (batch 1)"]


# onnxruntime's words for a Reshape whose literal shape does not fit its input.
_RESHAPE = re.compile(r"Reshape node.*requested shape:\{([-\d,\s]+)\}", re.S)


def _fixed_reshape(said: str, inputs: list[InputSpec], sizes: dict[str, int]) -> str:
    """What to fix when onnxruntime failed on a Reshape whose literal shape holds an axis's
    size in the example, run at another size: no bound is at fault (the hint said "lower
    max"), the export wrote the example's length into the graph ("" when it is not that)."""
    found = _RESHAPE.search(said)
    if found is None:
        return ""
    literal = [int(d) for d in found.group(1).split(",") if d.strip()]
    for spec in inputs:
        for a in spec.dynamic_axes:
            held = spec.shape[a.axis]
            if held > 0 and held != sizes.get(a.name) and held in literal:
                shown = "{" + ",".join(map(str, literal)) + "}"
                return (
                    f"a Reshape in the graph asks for shape {shown}, with {held}, the example's "
                    f"size of {a.name}, written into it: the export took the example's length "
                    f"as a constant, and the model runs only at {a.name}={held}, whatever the "
                    "bounds. Make the model's code follow the input's size where it reshapes "
                    "(-1 or x.shape[...], not a number; an RNN with batch_first=False fed "
                    "[batch, time, ...] takes the time for its batch: set batch_first=True or "
                    f"transpose), then upload it again; or leave {a.name} fixed at {held}"
                )
    return ""


Run = Callable[[dict[str, np.ndarray]], list[np.ndarray]]
# Why a graph with a symbolic batch dim fails at a batch size, and what to do.
FIXED_BATCH_HINT = (
    "a graph that runs only at the example's batch size fixes dim 0 inside (a Reshape or Expand "
    "with a literal size; a seq-first RNN, whose dim 0 is time, not the batch), and every "
    "request of batch {batch} would fail; export it with a symbolic batch that is dim 0 of "
    "every input and output. If onnxruntime's words name an index or a value instead (a "
    "Gather past its table), the samples are outside what the model takes: give your own "
    "(validation sample inputs, or upload the nn.Module with example_inputs)"
)


def verify_batch(
    inputs: list[InputSpec],
    run: Run,
    max_batch: int,
    seen: list[list[tuple[int, ...]]] | None,
    *,
    rtol: float,
    atol: float,
    reference: Run | None = None,
    merges: bool = False,
    samples: dict[str, np.ndarray] | None = None,
) -> list[str]:
    """Run the graph at the largest batch it will be served with and at batch 1 (that batch's
    first sample), and refuse it unless it answers each the way a batched model must; returns
    the report's notes.

    A graph whose samples depend on each other (``x - x.mean(0)``: a sample's answer alone
    differs from its answer in the batch) is faithful, and right when served unbatched: the
    note returned marks the report (``rows_apart``), and the server publishes the version with
    batching.max_batch_size 0 (jobs.batching_of_published). It is refused only when ``merges``:
    the job's serving config states a max_batch_size above 1, so requests would be merged and
    each answered with the others' rows.

    Validation runs only at the samples' batch, so a graph that is right there and wrong at
    another size was published: a branch on the batch size that the export froze to the
    example's (batch-1 requests got the other branch's answer), a Reshape fixed to the example's
    first dim (a seq-first LSTM: every other size failed at serving time with INTERNAL). Each
    run must give outputs with the batch first; the first sample must get the same answer
    alone as in the full batch (the batcher merges requests, so samples must not influence each
    other); and with ``reference`` (the PyTorch model) both runs must match it within
    rtol/atol."""
    # The job's samples where there are several (a single one, cycled, makes a batch of equal
    # rows, in which rows that depend on each other cannot show it).
    if samples and len(next(iter(samples.values()))) > 1:
        full = cycled(samples, max_batch)
    else:
        full = generate(inputs, max_batch, batched=True).arrays
    feeds = {max_batch: full, 1: {name: array[:1] for name, array in full.items()}}
    answers: dict[int, list[np.ndarray]] = {}
    for batch in sorted(feeds, reverse=True):
        feed = feeds[batch]
        try:
            outputs = answers[batch] = [np.asarray(o) for o in run(feed)]
        except Exception as exc:
            raise ConversionFailed(
                f"the ONNX model fails at batch {batch} in onnxruntime ({first_line(exc)}): "
                + FIXED_BATCH_HINT.format(batch=batch)
            ) from None
        if any(o.ndim == 0 or o.shape[0] != batch for o in outputs):
            raise ConversionFailed(
                f"the ONNX model's outputs at batch {batch} do not have the batch dim first "
                f"({[list(o.shape) for o in outputs]}): outputs must be [batch, ...], their dim 0 "
                "following the inputs' (an output fixed to the example's size cannot be served "
                "at another batch size)"
            )
        if seen is not None:
            seen.append([tuple(o.shape) for o in outputs])
        if reference is not None:
            _match_reference(outputs, reference(feed), batch, rtol, atol)
    if max_batch > 1:
        failure = _rows_failure(run, full, answers, max_batch, rtol=rtol, atol=atol)
        if failure and merges:
            raise ConversionFailed(
                f"the ONNX model answers a sample differently alone (batch 1) than in a batch of "
                f"{max_batch}: {failure}; the serving config's max_batch_size merges requests, "
                "so each would be answered with the others' rows: serve it with "
                "batching.max_batch_size 0 (or 1), or make dim 0 of every input the batch (not "
                "time or sequence, as in a seq-first RNN or attention over dim 0)"
            )
        if failure:
            return [
                ROWS_DEPEND + f" (a sample answers differently alone than in a batch of "
                f"{max_batch}: {failure}): published with batching.max_batch_size 0, so "
                "requests are never merged"
            ]
    return []


def _rows_failure(
    run: Run,
    full: dict[str, np.ndarray],
    answers: dict[int, list[np.ndarray]],
    max_batch: int,
    *,
    rtol: float,
    atol: float,
) -> str:
    """'' when the first, middle and last samples each answer alone as they do in the full
    batch, else the first disagreement (``tolerance_failure``'s words).

    The first sample alone was the only one compared, and a model that works across dim 0
    without touching its first row passed: a cumulative sum over the batch (row 0 is its own
    sum). Its dynamic int8 variant was then published with the job's max_batch_size (the load
    probe, which would have caught it, does not second-guess a stated one), and concurrent
    single-row requests were answered with the sums of other callers' rows."""
    together = answers[max_batch]
    for index in sorted({0, max_batch // 2, max_batch - 1}):
        if index == 0:
            alone = answers[1]
        else:
            try:
                alone = [
                    np.asarray(o) for o in run({n: a[index : index + 1] for n, a in full.items()})
                ]
            except Exception as exc:
                return f"sample {index} fails alone ({first_line(exc)})"
        failure = tolerance_failure(
            alone, [o[index : index + 1] for o in together], rtol, atol, equal_nan=True
        )
        if failure:
            return f"sample {index}: {failure}"
    return ""


# The note dims.verify_batch returns for a graph whose samples depend on each other: the
# pipeline reads it to mark the report (Report.rows_apart).
ROWS_DEPEND = "samples depend on each other along dim 0"


# A difference within these is float rounding (a few float32 ulps), not another code path.
ROUNDING_RTOL = 1e-5
ROUNDING_ATOL = 1e-7


def _match_reference(
    outputs: list[np.ndarray], expected: list[np.ndarray], batch: int, rtol: float, atol: float
) -> None:
    shapes = [list(o.shape) for o in outputs], [list(np.shape(e)) for e in expected]
    failure = (
        f"output shapes {shapes[0]} vs {shapes[1]} (PyTorch)"
        if shapes[0] != shapes[1]
        else tolerance_failure(outputs, expected, rtol, atol, equal_nan=True)
    )
    if failure and not tolerance_failure(
        outputs, expected, max(rtol, ROUNDING_RTOL), max(atol, ROUNDING_ATOL), equal_nan=True
    ):
        # Within float rounding of PyTorch: another batch size sums in another order, which
        # --rtol 0 --atol 0 cannot allow; a branch on the batch would differ far more.
        raise ConversionFailed(
            f"the exported model disagrees with the PyTorch model at batch {batch}: {failure}; "
            "the difference is float rounding (within a relative "
            f"{ROUNDING_RTOL:g}): the tolerances are tighter than float arithmetic allows; "
            "raise --rtol/--atol (the defaults are 1e-3 and 1e-4)"
        )
    if failure:
        raise ConversionFailed(
            f"the exported model disagrees with the PyTorch model at batch {batch}: {failure}; "
            "the model takes another path at this batch size than at the export's example "
            "(a branch on x.shape[0] or on a size, which the export froze to the example's): "
            "compute the same way for every batch size, e.g. without branching on the batch"
        )


def varying_axes(seen: list[list[tuple[int, ...]]]) -> dict[int, set[int]]:
    """{output index: the axes whose size differed between the runs in ``seen``}: dims the
    graph must not declare with a fixed size (an exporter may write the example's)."""
    varying: dict[int, set[int]] = {}
    for i, shapes in enumerate(zip(*seen, strict=True)) if seen else ():
        for axis in range(min(len(s) for s in shapes)):
            if len({s[axis] for s in shapes}) > 1:
                varying.setdefault(i, set()).add(axis)
    return varying
