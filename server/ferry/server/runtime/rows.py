"""Whether a graph keeps the rows of its first dimension apart: the check behind batching a model
whose config does not say.

A graph whose every input and output has a dynamic first dimension looks batchable, but that
dimension may be a set the model works across (a Softmax or a mean over it, a sort, a cumulative
sum, attention between rows, a peak normalisation over the whole tensor). Batching such a model
concatenates two clients' requests and gives each an answer that depends on the other, and
padding a batch to a planned size changes every answer. Nothing fails: the answers are silently
wrong. Triton's auto-complete guesses from the shapes alone; Ferry also runs eight rows alone
and together (four different ones in two orders, then all eight and a repeated one) before it
batches a model nobody configured, and batches it only if every output row agrees with its
row's run alone. An explicit ``batching.max_batch_size``
is the user's word and is not second-guessed. A model the probe rows cannot run on (an index
past its table, a length it refuses) is batched on its shapes, as before the probe, with a
WARNING that says how to turn batching off.

Why these rows. Rows of 1s and 0s were tried first and let through every operation that gives
the same answer on that pair: a peak normalisation (the max is 1 with or without the zero row),
a reversed cumulative sum (the zero row adds nothing above it), a product, a clip that only a
large or negative row trips. So each row differs from the others in every statistic such an
operation reads: float rows are seeded normals at different scales and signs (one mixed about
0, one all below -4, one all above 64, one small), so that each row's max, min, sum, norm and
place in a sort differ and a row that only matters when large or negative is there; integer
rows are the constants 2, 0, 3, 1, small enough to index any table of four or more (embedding
ids, class indices) and still apart in max, min, sum and order; bools and strings take
distinct patterns. Neither order (forward, reversed) is sorted either way, so a sort or TopK over
the rows moves some row in at least one of them, and a reversal or a cumulative op in either
direction changes the first or last row. A model that does not run on these rows alone is tried
on integers of 0 and 1 (a table of two), then on 0s and 1s for floats too (a float used as an
index), the rows the probe always used; and all of them with the dynamic dims besides the batch
at 1, then 8, then 32 (``DYNAMIC_SIZES``), before the shapes decide. Four different rows still let
through what only shows with more rows or with rows in common: a segment mean over rows that
share an id (every id was different), a count of equal rows, a shift by four rows, a change
past four rows. So four more rows repeat the first four's ids, bools and strings (reversed)
beside other floats, and the last run takes all eight and the first row again. The cost at
load is eleven tiny runs (each row alone, then three together), a few more only for a model
that refuses rows.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ferry.server.batching.tensors import same_answer
from ferry.server.errors import first_line

_ROWS = 8
_SEED = 0
# The probe's made-up rows, every input together, take at most this: eight rows of a model whose
# one row is large (a tensor of 81 MiB, a 4K image) took minutes and gigabytes at every load.
# Such a model is batched on its shapes, its rows proven apart on a real batch (core.loaded).
PROBE_MAX_BYTES = 64 << 20
# Constant rows: any table of 4 takes them, every statistic tells the first four apart; the
# last four repeat them (reversed) beside other floats, so that rows sharing an id or a segment
# (a segment mean over nodes, a group-by on an index input) meet in a batch.
_INTS = (2, 0, 3, 1, 1, 3, 0, 2)
_STRINGS = ("a", "", "ferry", "b", "b", "ferry", "", "a")
# Sorted neither way, so a sort moves a row in each of the first two; the last runs all eight
# rows and the first one again: a batch past four rows (a model that changes only then), a shift
# by four rows, and two equal rows (a count or a dedup of equal rows) all show there.
_ORDERS = ((0, 1, 2, 3), (3, 2, 1, 0), (0, 1, 2, 3, 4, 5, 6, 7, 0))

# A row's values from standard normals ``z`` (one row's shape): mixed about 0; all below -4; all
# above 64 (a row that dominates a max, a sum or a norm, and trips what only a large value does);
# small about 0.
_FLOAT_ROWS: tuple[Callable[[np.ndarray], np.ndarray], ...] = (
    lambda z: z,
    lambda z: -(1.0 + np.abs(z)) * 4.0,
    lambda z: (1.0 + np.abs(z)) * 64.0,
    lambda z: z / 8.0,
    # the last four: other values again (offset, small negative, middling, tiny)
    lambda z: z * 3.0 + 1.0,
    lambda z: -(1.0 + np.abs(z)) / 2.0,
    lambda z: (1.0 + np.abs(z)) * 8.0,
    lambda z: z / 64.0,
)

# Sizes of the dynamic dims besides the batch (within a converted version's verified bounds),
# tried in turn until the model runs the probe rows. At 1 alone, a model that refuses a length
# of 1 (a convolution without padding, a pooling window, a minimum sequence length) ran on no
# probe row and was batched on its shapes alone: one that works across its rows (a mean over
# them after a 3x3 convolution) then answered 14 of 40 concurrent callers with values mixed
# with other callers' rows.
DYNAMIC_SIZES = (1, 8, 32)

# (floats, integers), tried in turn until the model runs every row alone: the last is the 0/1
# probe this module began with, kept for a model that takes a float as an index.
_TIERS = (("normals", "small"), ("normals", "binary"), ("binary", "binary"))


def probe(session: Any) -> tuple[bool | None, str]:
    """Whether eight probe rows give the same answers alone and together (``_ORDERS``):
    (True, '') when they do, (False, why) when they do not, (None, why) when the probe cannot
    tell (the model does not run on any set of probe rows at any of ``DYNAMIC_SIZES``: an
    input outside its domain, a length it refuses). ``session`` has ``zero_feeds``, ``run`` and
    ``output_names``."""
    refused = ""
    shapes_tried: list[dict[str, tuple[int, ...]]] = []
    for size in DYNAMIC_SIZES:
        template = session.zero_feeds(_ROWS, dynamic=size)
        shapes = {name: a.shape for name, a in template.items()}
        if shapes in shapes_tried:  # no dynamic dim grew (none, or bounds hold it): refused
            continue
        shapes_tried.append(shapes)
        took = sum(a.nbytes for a in template.values())
        if took > PROBE_MAX_BYTES:  # a larger dynamic size only grows
            return None, (
                f"its rows are too large to probe at load ({_ROWS} rows take "
                f"{took / (1 << 20):,.0f} MiB; the probe makes up at most "
                f"{PROBE_MAX_BYTES >> 20} MiB)"
            )
        kinds = {_kind(a) for a in template.values()}
        tried: set[tuple[str | None, str | None]] = set()
        for floats, ints in _TIERS:
            key = (floats if "float" in kinds else None, ints if "int" in kinds else None)
            if key in tried:  # the same rows as a tier already refused
                continue
            tried.add(key)
            rng = np.random.default_rng(_SEED)  # one stream: two float inputs are not equal
            feeds = {name: _rows(a, floats, ints, rng) for name, a in template.items()}
            try:
                alone = [
                    session.run({n: a[i : i + 1] for n, a in feeds.items()}) for i in range(_ROWS)
                ]
            except Exception as exc:
                refused = first_line(exc)
                continue
            return _compare(session, feeds, alone)
    return None, f"it does not run on a probe row ({refused})"


def made_up_rows(session: Any) -> list[dict[str, np.ndarray]]:
    """The first row of each tier's probe rows (``_TIERS``: a normals row, the integer 2,
    ones), for a check that runs one row alone and repeated: what a model refusing zeros may run
    on. One row made, not eight made and seven dropped: a model's row may be large."""
    template = session.zero_feeds(1)
    out = []
    for floats, ints in _TIERS:
        rng = np.random.default_rng(_SEED)
        out.append({n: _rows(a, floats, ints, rng, count=1) for n, a in template.items()})
    return out


def _compare(
    session: Any, feeds: dict[str, np.ndarray], alone: list[list[np.ndarray]]
) -> tuple[bool, str]:
    for order in _ORDERS:
        try:
            together = session.run({n: a[list(order)] for n, a in feeds.items()})
        except Exception as exc:
            return False, f"it runs one row but not {len(order)} ({first_line(exc)})"
        for k, (name, out) in enumerate(zip(session.output_names, together, strict=True)):
            for at, row in enumerate(order):
                one = alone[row][k]
                if not _rows_first(out, one, len(order)):
                    return False, _not_rows(name, out, one, len(order))
                if out.shape[1:] != one.shape[1:] or not same_answer(out[at], one[0]):
                    return False, (
                        f"output {name!r} for row {row} differs when another row runs beside "
                        "it: the model works across its first dimension"
                    )
    return True, ""


def _rows_first(out: np.ndarray, one: np.ndarray, rows: int) -> bool:
    return np.ndim(out) > 0 and np.ndim(one) > 0 and out.shape[0] == rows and one.shape[0] == 1


def _not_rows(name: str, out: np.ndarray, one: np.ndarray, rows: int) -> str:
    return (
        f"output {name!r} is {list(np.shape(out))} for {rows} rows and "
        f"{list(np.shape(one))} for one: its first dimension is not the rows'"
    )


def _kind(a: np.ndarray) -> str:
    if a.dtype == object:
        return "string"
    if a.dtype == np.bool_:
        return "bool"
    if a.dtype.kind == "f" or a.dtype.name == "bfloat16":
        return "float"
    return "int"


def _rows(
    template: np.ndarray, floats: str, ints: str, rng: np.random.Generator, count: int = _ROWS
) -> np.ndarray:
    """``count`` (at most ``_ROWS``) rows in ``template``'s shape and dtype, each unlike the
    others. Each row is written in place in the template's dtype: made as int64 or float64 rows,
    stacked, then cast, eight rows of an 81 MiB UINT8 input took 11 GB and a minute to make at
    every load."""
    row_shape = template.shape[1:]
    kind = _kind(template)
    out = np.empty((count, *row_shape), dtype=template.dtype)
    odd: np.ndarray | None = None
    for i in range(count):
        if kind == "string":
            out[i] = _STRINGS[i]
        elif kind == "float" and floats == "normals":
            out[i] = _FLOAT_ROWS[i](rng.standard_normal(row_shape))
        elif kind == "int" and ints == "small":
            out[i] = _INTS[i]
        else:
            if odd is None:
                flat = np.zeros(int(np.prod(row_shape)), np.bool_)
                flat[1::2] = True
                odd = flat.reshape(row_shape)
            out[i] = _binary_row(odd, i)
    return out


def _binary_row(odd: np.ndarray, i: int) -> np.ndarray:
    """Row ``i`` of rows of 1s, 0s and the two alternations (then the same four reversed, as
    ``_INTS``): apart where a row has room for it, and every value a valid index into a table of
    two, a bool or a 0/1 mask."""
    pattern = i if i < 4 else 7 - i
    if pattern == 0:
        return np.ones(odd.shape, np.bool_)
    if pattern == 1:
        return np.zeros(odd.shape, np.bool_)
    return odd if pattern == 2 else ~odd
