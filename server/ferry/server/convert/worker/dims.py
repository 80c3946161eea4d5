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
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np

from ferry.server.convert.spec import DynamicAxis, InputSpec
from ferry.server.convert.worker.parity import generate
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
            raise ConversionFailed(
                f"the exported model fails at {shown} in onnxruntime ({first_line(exc)}): check "
                "the dynamic axes' bounds (a position table, a fixed-size buffer) or lower max"
            ) from None
        ran.append(shown)
    if not ran:
        return []
    return [f"dynamic axes verified: the model runs at {' and at '.join(ran)} (batch 1)"]


def varying_axes(seen: list[list[tuple[int, ...]]]) -> dict[int, set[int]]:
    """{output index: the axes whose size differed between the runs in ``seen``}: dims the
    graph must not declare with a fixed size (an exporter may write the example's)."""
    varying: dict[int, set[int]] = {}
    for i, shapes in enumerate(zip(*seen, strict=True)) if seen else ():
        for axis in range(min(len(s) for s in shapes)):
            if len({s[axis] for s in shapes}) > 1:
                varying.setdefault(i, set()).add(axis)
    return varying
