"""Whether a graph keeps the rows of its first dimension apart: the check behind batching a model
whose config does not say.

A graph whose every input and output has a dynamic first dimension looks batchable, but that
dimension may be a set the model works across (a Softmax or a mean over it, a sort, a cumulative
sum, attention between rows). Batching such a model concatenates two clients' requests and gives
each an answer that depends on the other, and padding a batch to a planned size changes every
answer. Nothing fails: the answers are silently wrong. Triton's auto-complete guesses from the
shapes alone; Ferry also runs two different rows alone and together before it batches a model
nobody configured, and batches it only if every output row agrees. An explicit
``batching.max_batch_size`` is the user's word and is not second-guessed. A model the probe
rows cannot run on (an index past its table, a length it refuses) is batched on its shapes, as
before the probe, with a WARNING that says how to turn batching off.

The rows are 1 and 0 (True/False, "a"/""): apart from one another, and ordered so that a sort,
a reversal, a cumulative sum, a max, a min or a mean across them each changes some row.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ferry.server.errors import first_line

# onnxruntime may pick other kernels (or another summation order) for another batch size: a
# ulp or two apart is the same answer, a set-level model is off by far more.
_RTOL = 1e-3
_RTOL_HALF = 1e-2


def probe(session: Any) -> tuple[bool | None, str]:
    """Whether two different rows give the same answers alone and together: (True, '') when
    they do, (False, why) when they do not, (None, why) when the probe cannot tell (the model
    does not run on one probe row: an input outside its domain, a length it refuses).
    ``session`` has ``zero_feeds``, ``run`` and ``output_names``."""
    together = session.zero_feeds(2)
    for array in together.values():
        array[0] = "a" if array.dtype == object else 1
    try:
        alone = [session.run({n: a[i : i + 1] for n, a in together.items()}) for i in (0, 1)]
    except Exception as exc:
        return None, f"it does not run on a probe row ({first_line(exc)})"
    try:
        both = session.run(together)
    except Exception as exc:
        return False, f"it runs one row but not two ({first_line(exc)})"
    for name, out, first, second in zip(session.output_names, both, *alone, strict=True):
        for row, one in enumerate((first, second)):
            if np.ndim(out) == 0 or np.ndim(one) == 0 or out.shape[0] != 2 or one.shape[0] != 1:
                return False, (
                    f"output {name!r} is {list(np.shape(out))} for two rows and "
                    f"{list(np.shape(one))} for one: its first dimension is not the rows'"
                )
            if out.shape[1:] != one.shape[1:] or not _same(out[row], one[0]):
                return False, (
                    f"output {name!r} for row {row} differs when another row runs beside it: the "
                    "model works across its first dimension"
                )
    return True, ""


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    if a.dtype.kind == "f" or a.dtype.name == "bfloat16":
        rtol = _RTOL if a.dtype.itemsize >= 4 else _RTOL_HALF
        x, y = a.astype(np.float64), b.astype(np.float64)
        finite = np.abs(y[np.isfinite(y)])
        scale = max(1.0, float(finite.max(initial=0.0)))
        return bool(np.allclose(x, y, rtol=rtol, atol=rtol * 1e-2 * scale, equal_nan=True))
    return bool(np.array_equal(a, b))
