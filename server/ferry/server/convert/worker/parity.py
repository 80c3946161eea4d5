"""Validation inputs and the figures that decide whether a converted model may be served.

Samples are a dict ``input name -> [N, ...]``. A batched model (every input's first dim dynamic)
runs them in slices; an unbatched ONNX source runs them one at a time at its fixed shape. Outputs
come back the same way, ``output name -> [N, ...]``, so every comparison is array against array.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ferry.codec import CodecError, datatype_from_name, numpy_dtype
from ferry.server.accuracy import SPREAD, max_rel_error
from ferry.server.convert.spec import InputSpec
from ferry.server.errors import ConversionFailed, InvalidArgument
from ferry.server.runtime import optimizers

if TYPE_CHECKING:
    import onnxruntime as ort

Arrays = dict[str, np.ndarray]
SEED = 0


def dtype_of(spec: InputSpec) -> np.dtype[Any]:
    try:
        return numpy_dtype(datatype_from_name(spec.datatype))
    except CodecError as exc:
        raise InvalidArgument(f"input {spec.name!r}: {exc}") from None


def is_batched(inputs: list[InputSpec]) -> bool:
    return all(spec.shape and spec.shape[0] == -1 for spec in inputs)


def sample_shape(spec: InputSpec, batched: bool) -> list[int]:
    """The shape of one sample: without the batch dim when batched, the full shape otherwise."""
    shape = spec.shape[1:] if batched else spec.shape
    if any(d < 0 for d in shape):
        raise InvalidArgument(
            f"input {spec.name!r} has shape {spec.shape} with a dynamic dim besides the batch dim: "
            "give the size to sample it at in spec.inputs, and declare it a dynamic axis with "
            "bounds (InputSpec.dynamic_axes; on the command line input_ids:INT64:-1,128@"
            "sequence=1..512) so that it is verified and served at other sizes"
        )
    return shape


@dataclass
class Samples:
    arrays: Arrays
    batched: bool

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))

    def stacks_with(self, other: Samples) -> bool:
        """Whether ``other``'s rows can join these in one batch: every input of one shape (past
        the rows) and dtype in both. A file at another size of a dynamic axis holds the same
        data, but cannot."""
        return all(
            other.arrays[name].shape[1:] == array.shape[1:]
            and other.arrays[name].dtype == array.dtype
            for name, array in self.arrays.items()
        )

    def joined(self, other: Samples) -> Samples:
        """These rows, then ``other``'s (``stacks_with``)."""
        arrays = {n: np.concatenate([a, other.arrays[n]]) for n, a in self.arrays.items()}
        return Samples(arrays, self.batched)

    def rows(self, keep: np.ndarray | slice) -> Samples:
        """The rows ``keep`` selects (a mask, indices or a slice)."""
        return Samples({name: array[keep] for name, array in self.arrays.items()}, self.batched)

    def batches(self, size: int) -> Iterator[Arrays]:
        if not self.batched:
            for index in range(len(self)):
                yield {name: array[index] for name, array in self.arrays.items()}
            return
        for start in range(0, len(self), size):
            yield {name: array[start : start + size] for name, array in self.arrays.items()}


def generate(inputs: list[InputSpec], count: int, batched: bool) -> Samples:
    """Seeded so that a rerun of a job validates on the same inputs."""
    rng = np.random.default_rng(SEED)
    arrays: Arrays = {}
    for spec in inputs:
        dtype = dtype_of(spec)
        shape = [count, *sample_shape(spec, batched)]
        if dtype.kind == "f":
            arrays[spec.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind == "b":
            arrays[spec.name] = rng.integers(0, 2, shape).astype(dtype)
        elif dtype.kind in "iu":
            arrays[spec.name] = rng.integers(0, 10, shape).astype(dtype)
        else:
            raise InvalidArgument(
                f"input {spec.name!r} of type {spec.datatype} cannot be generated: supply "
                "validation.sample_file"
            )
    return Samples(arrays, batched)


def cycled(arrays: Arrays, rows: int) -> Arrays:
    """The job's own samples, cycled to ``rows``: values in the model's domain, where generated
    ones may not be (integers 0..9 through a Gather into a table of three)."""
    count = len(next(iter(arrays.values())))
    index = np.arange(rows) % max(count, 1)
    return {name: array[index] for name, array in arrays.items()}


def load_npz(path: Path, names: list[str], field: str) -> Arrays:
    """Read an .npz without pickle (an object array in it is refused, never unpickled)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except FileNotFoundError:
        raise InvalidArgument(f"{field} {str(path)!r} does not exist") from None
    except (ValueError, OSError) as exc:
        raise InvalidArgument(
            f"{field} {str(path)!r} is not a readable .npz of numeric arrays ({exc}): save it with "
            "numpy.savez(path, **{name: array})"
        ) from None
    missing = [n for n in names if n not in arrays]
    if missing:
        raise InvalidArgument(
            f"{field} lacks {', '.join(map(repr, missing))}: it must hold one [N, ...] array per "
            f"name ({', '.join(names)}); it has {', '.join(sorted(arrays)) or 'nothing'}"
        )
    counts = {len(arrays[n]) if arrays[n].ndim else 0 for n in names}
    if len(counts) != 1 or 0 in counts:
        raise InvalidArgument(
            f"{field}: every array needs the same number N >= 1 of samples (dim 0)"
        )
    return {n: arrays[n] for n in names}


def _check_shape(
    spec: InputSpec, got: list[int], batched: bool, field: str, seen: dict[str, tuple[int, str]]
) -> None:
    """Refuse samples the served version would refuse: a fixed dim of another size, or a
    declared dynamic axis outside its bounds or unlike the same axis of another input. Within
    its bounds a dynamic axis may have any size: a model declared for sequences of 1..512 is
    calibrated and validated on data of the lengths it serves, not only the example's."""
    expected = sample_shape(spec, batched)
    offset = 1 if batched else 0
    dynamic = {a.axis - offset: a for a in spec.dynamic_axes}
    wanted = [
        f"{a.name}={a.min}..{a.max or ''}" if (a := dynamic.get(i)) else str(d)
        for i, d in enumerate(expected)
    ]
    fits = len(got) == len(expected) and all(
        g == d or ((a := dynamic.get(i)) is not None and a.min <= g and (not a.max or g <= a.max))
        for i, (g, d) in enumerate(zip(got, expected, strict=True))
    )
    if not fits:
        raise InvalidArgument(
            f"{field}: {spec.name!r} has samples of shape {got}, the model takes "
            f"[{', '.join(wanted)}] per sample"
        )
    for i, axis in dynamic.items():
        first = seen.setdefault(axis.name, (got[i], spec.name))
        if first[0] != got[i]:
            raise InvalidArgument(
                f"{field}: dynamic axis {axis.name!r} is {first[0]} in {first[1]!r} but {got[i]} "
                f"in {spec.name!r}: inputs sharing an axis must agree on its size"
            )


def samples_from_file(path: Path, inputs: list[InputSpec], batched: bool, field: str) -> Samples:
    arrays = load_npz(path, [spec.name for spec in inputs], field)
    seen: dict[str, tuple[int, str]] = {}
    for spec in inputs:
        _check_shape(spec, list(arrays[spec.name].shape[1:]), batched, field, seen)
        given = arrays[spec.name]
        try:
            arrays[spec.name] = given.astype(dtype_of(spec), copy=False)
        except (ValueError, TypeError) as exc:
            # Strings for a numeric input crashed the child: INTERNAL, no field named.
            raise InvalidArgument(
                f"{field}: {spec.name!r} holds {given.dtype} values that are not "
                f"{spec.datatype} ({exc}): save an array of the values the model takes"
            ) from None
    return Samples(arrays, batched)


def answered_rows(outputs: list[np.ndarray], count: int) -> np.ndarray:
    """Which of ``count`` rows a model answered without NaN in any floating output: a NaN is
    the model's domain speaking (a mask drawn all zeros, a prefix of padding only), not
    something a variant can match."""
    keep = np.ones(count, dtype=bool)
    for out in outputs:
        if out.dtype.kind in "fc" and out.ndim:
            keep &= ~np.isnan(out.reshape(len(out), -1)).any(axis=1)
    return keep


def run_batches(
    run: Callable[[Arrays], list[np.ndarray]],
    samples: Samples,
    batch: int,
    stop: Callable[[int], bool] | None = None,
) -> list[np.ndarray]:
    """Run ``run`` over ``samples`` and join its positional outputs back into [N, ...] arrays.
    ``stop(rows run so far)``, asked before each batch after the first: True ends the run
    there, and the outputs cover the rows that ran."""
    parts: list[list[np.ndarray]] = []
    done = 0
    for feed in samples.batches(batch):
        if parts and stop is not None and stop(done):
            break
        parts.append(run(feed))
        done += len(next(iter(feed.values()))) if samples.batched else 1
    join = np.concatenate if samples.batched else np.stack
    return [join([p[i] for p in parts]) for i in range(len(parts[0]))]


def onnx_session(
    path: Path, threads: int, providers: list[tuple[str, dict[str, str]]] | None = None
) -> ort.InferenceSession:
    """The conversion child's one way to open a graph (parity, benchmark, pruning): on
    ``providers`` (default CPU), ``threads`` threads, the serving session's optimizers."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(
        str(path),
        options,
        providers=providers or [("CPUExecutionProvider", {})],
        disabled_optimizers=optimizers.disabled(),
    )


def onnx_runner(
    path: Path, threads: int, providers: list[tuple[str, dict[str, str]]] | None = None
) -> Callable[[Arrays], list[np.ndarray]]:
    """Run the graph on ``providers`` (default CPU): parity is measured where it will serve."""
    try:
        session = onnx_session(path, threads, providers)
    except Exception as exc:
        raise ConversionFailed(f"onnxruntime cannot load {path.name}: {exc}") from None

    def run(feed: Arrays) -> list[np.ndarray]:
        return [np.asarray(o) for o in session.run(None, feed)]

    return run


# ---- figures ----

# An element identical in both outputs and this many times the typical computed magnitude is a
# constant the model writes (masked_fill's -1e4, -1e9, finfo.min), not a result it computes.
FILL_RATIO = 10.0


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    norms = float(np.linalg.norm(a64) * np.linalg.norm(b64))
    if norms == 0.0:
        return 1.0 if not a64.any() and not b64.any() else 0.0
    return float(np.dot(a64, b64) / norms)


def _computed_figures(cand: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """The cosine and the relative error over the elements the model computes: finite in both,
    and not a fill value.

    A fill (the same large constant in both at the masked positions) agrees by construction and,
    left in, outweighs every computed element: a 90%-pruned classifier whose logits were masked
    with -1e9 scored 0.9999999999 while it picked another class for a third of the samples. The
    typical magnitude is the median over the elements that differ, so fills that are most of an
    output (long padding) cannot set it; where those are zero no fill is assumed, so a variant
    whose only differences are tiny is never judged on them alone."""
    finite = np.isfinite(cand) & np.isfinite(ref)
    identical = finite & (cand == ref)
    differing = finite & ~identical
    if not differing.any():
        return 1.0, 0.0  # every finite element agrees exactly (non-finite ones are judged apart)
    scale = float(np.median(np.abs(ref[differing])))
    keep = finite
    if scale > 0.0:
        keep = finite & ~(identical & (np.abs(ref) > FILL_RATIO * scale))
    return _cosine(cand[keep], ref[keep]), _rel_error(cand[keep], ref[keep])


def _rel_error(cand: np.ndarray, ref: np.ndarray) -> float:
    """||cand - ref|| / ||ref||: the size of the error, which the cosine does not see. A variant
    whose outputs keep their direction but not their size has a cosine of 1: a regression model
    whose every prediction was halved, or one whose [N, 1] outputs all lie near one value (the
    cosine of two nearly constant vectors is nearly 1 whatever the constants)."""
    r64, c64 = ref.astype(np.float64).ravel(), cand.astype(np.float64).ravel()
    norm, error = float(np.linalg.norm(r64)), float(np.linalg.norm(c64 - r64))
    if norm == 0.0:
        return 0.0 if error == 0.0 else math.inf
    return error / norm


def _agreement(cand: np.ndarray, ref: np.ndarray) -> float:
    """The share of elements equal in both: an integer or boolean output holds labels, ids or a
    mask, where 3 for 7 is as wrong as 3 for 4. It is the cosine of the outputs' one-hot
    encodings, so it stands in the cosine's place; the plain cosine of two label vectors stayed
    near 1 while labels changed (0.9999 with half the ids, drawn from 900-999, changed)."""
    return float(np.mean(cand == ref)) if ref.size else 1.0


def _spread_error(cand: np.ndarray, ref: np.ndarray, finite: np.ndarray) -> float:
    """The relative error of one value per sample ([N] or [N, 1], a regression output) measured
    about the reference's mean over the samples: ||cand - ref|| / ||ref - mean(ref)||. Around a
    large common value (a temperature in kelvin, a price) both the cosine and ``_rel_error`` see
    only that value: a 90%-pruned regressor whose predictions kept 0.19 correlation with the
    model's scored cosine 0.99998 and relative error 0.006 and was published within budget, and
    so would one predicting the mean for every sample. 0 (not judged) for other shapes, fewer
    than two finite samples, or a spread under ``SPREAD`` of the size (an output that hardly
    varies is not judged on its noise). Both arrays are float64 and ``finite`` marks where both
    are finite, as ``compare`` has them already."""
    if ref.ndim not in (1, 2) or (ref.ndim == 2 and ref.shape[1] != 1):
        return 0.0
    r, c = ref[finite], cand[finite]
    if r.size < 2:
        return 0.0
    mean = float(r.mean())
    spread = float(np.linalg.norm(r - mean))
    if spread == 0.0 or spread < SPREAD * float(np.linalg.norm(r)):
        return 0.0
    return float(np.linalg.norm(c - r)) / spread


# A position (an element's place in an output, the same in every sample) whose value varies
# across the samples by less than 1/STEADY of its size is held there by the model (a mask)
# rather than computed from the input.
STEADY = 100.0


def _fill_positions(cand: np.ndarray, ref: np.ndarray) -> np.ndarray | None:
    """The positions the model fills rather than computes, when it has both kinds (None when
    not: a single sample, or nothing computed beside them): large (FILL_RATIO times the
    computed positions' typical size), steady across the samples, and the same on average in
    both. An additive mask (``logits + (1 - mask) * -1e4``) differs in its last bits between
    variants, so the exact-fill rule misses it, and it outweighed what the model computes: a
    90%-pruned classifier scored 0.9999999995 while the computed positions agreed at 0.38."""
    if cand.ndim == 0 or cand.shape[0] < 2:
        return None
    c2, r2 = cand.reshape(cand.shape[0], -1), ref.reshape(ref.shape[0], -1)
    finite = np.isfinite(c2).all(axis=0) & np.isfinite(r2).all(axis=0)
    c2, r2 = np.where(finite, c2, 0.0), np.where(finite, r2, 0.0)  # judged apart (compare)
    mean_r, mean_c = r2.mean(axis=0), c2.mean(axis=0)
    steady = (
        finite
        & (np.abs(mean_r) > STEADY * r2.std(axis=0))
        & (np.abs(mean_c - mean_r) <= 1e-3 * np.abs(mean_r))
    )
    computed = finite & ~steady
    if not computed.any():
        return None
    typical = float(np.median(np.abs(r2[:, computed])))
    fills = steady & (np.abs(mean_r) > FILL_RATIO * typical)
    return fills if fills.any() and typical > 0.0 else None


# How many tiers of fill a value rule peels off (a -1e9 padding beside a -1e4 mask is two).
FILL_TIERS = 4


def _fill_values(cand: np.ndarray, ref: np.ndarray) -> np.ndarray | None:
    """The elements holding a fill, wherever each sample puts it (None when there are none): the
    reference's largest magnitudes, all within 1/STEADY of one another and FILL_RATIO times
    every other element, peeled off tier by tier.

    The exact rule needs the fill unchanged in the variant and the positional rule needs it at
    the same place in every sample. An additive mask over each sample's own padding (``logits
    + (1 - mask) * -1e4``) meets neither, and static int8 quantizes the output over the fill's
    range: its computed logits came back as multiples of 39 (off by up to 5 on values near 1)
    while the cosine, dominated by the -1e4s, read 1.000000 and the variant was published; an
    unrelated variant with the same padding scored 0.99999998."""
    finite = np.isfinite(cand) & np.isfinite(ref)
    size = np.where(finite, np.abs(ref), 0.0)
    fills = np.zeros(ref.shape, dtype=bool)
    rest = finite
    for _ in range(FILL_TIERS):
        if not rest.any():
            break
        floor = float(size[rest].max()) * (1.0 - 1.0 / STEADY)
        tier = rest & (size >= floor)
        others = rest & ~tier
        if not others.any() or not floor > FILL_RATIO * float(size[others].max()):
            break  # one cluster (a constant-ish output) or no gap: nothing is a fill
        fills |= tier
        rest = others
    return fills if fills.any() else None


# Positions (an element's place in a sample) are told apart by their size only over this many
# samples: over one or two, a logit that happened to be near 0 would look like another scale.
SCALE_SAMPLES = 4
# A scale this far below an output's largest is beneath every variant's resolution (fp16's
# smallest normal, int8's step): what sits there is not judged apart.
NEGLIGIBLE = 1e-4
# A group of smaller values holding under this share of an output's positions is a few odd
# channels of one quantity, not another quantity: judged apart, one near-dead ReLU channel of a
# 32-wide embedding (RMS 4e-4 beside 0.37, under int8's step) scored cosine 0 and relative error
# 1.0, and refused a static int8 variant whose largest error was 0.005 and whose embedding kept
# cosine 0.9999. A detection head's probabilities are most of its positions (80 of 84 in
# YOLOv8's, 1 of 5 for an objectness beside a box), so they are still judged apart.
MINOR_SHARE = 0.05


def _scale_groups(ref: np.ndarray) -> list[np.ndarray]:
    """The positions of an output grouped by size, when it holds values of different scales
    (empty when it does not): each position's RMS over the samples, sorted, split wherever one
    is FILL_RATIO times the next smaller; groups under NEGLIGIBLE of the largest, and smaller
    groups of under MINOR_SHARE of the positions, are left out.

    One tensor can carry quantities of different units: a detection head concatenates boxes in
    pixels (~300) with objectness and class probabilities (~0.5). The cosine over the tensor
    is the boxes' alone: static int8 quantized the head's output over the boxes' range, served
    every probability as 0.0 (every detection under any threshold) and was published at cosine
    0.999995 vs PyTorch. Judged apart, each group answers for itself."""
    if ref.ndim < 2 or ref.shape[0] < SCALE_SAMPLES:
        return []
    flat = ref.reshape(ref.shape[0], -1)
    finite = np.isfinite(flat)
    count = finite.sum(axis=0)
    squares = np.where(finite, flat, 0.0) ** 2
    rms = np.sqrt(squares.sum(axis=0) / np.maximum(count, 1))
    live = np.flatnonzero(rms > 0.0)
    if live.size < 2:
        return []
    order = live[np.argsort(rms[live])]
    sizes = rms[order]
    cuts = np.flatnonzero(sizes[1:] >= FILL_RATIO * sizes[:-1]) + 1
    if not cuts.size:
        return []
    groups = np.split(order, cuts)
    floor = NEGLIGIBLE * float(sizes[-1])
    minor = MINOR_SHARE * live.size
    # The largest group is always judged; a smaller one when it is more than a few positions.
    return [
        group
        for group in groups
        if float(rms[group].max()) >= floor and (group is groups[-1] or group.size >= minor)
    ]


@dataclass(frozen=True)
class Figures:
    """How close one set of outputs is to another (report.json: an object with these keys, and
    ``nonfinite_mismatch`` when it is not 0)."""

    max_abs: float
    mean_abs: float
    cosine: float  # integer and boolean outputs: the share of equal elements (_agreement)
    top1_agreement: float | None  # None: no [N, classes] output
    rel_error: float = 0.0  # the largest over floating outputs (_rel_error)
    # Elements NaN or infinite on one side and not the very same value on the other: an error
    # no figure measures, so any fails the budget (max_abs and mean_abs are then infinite).
    nonfinite_mismatch: int = 0
    # One value per sample: the error against the reference's spread over the samples, not its
    # size (``_spread_error``; 0 when not judged). The largest over such outputs.
    spread_error: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("nonfinite_mismatch", "spread_error"):
            if not out[key]:
                del out[key]
        return out


def compare(candidate: list[np.ndarray], reference: list[np.ndarray]) -> Figures:
    """Worst case over outputs: max error, overall mean error, lowest cosine and top-1 agreement.

    Errors and the cosine are measured where both outputs are finite (the cosine without fill
    values: ``_computed_cosine``); elsewhere the two must hold the same value (an -inf mask in
    both agrees, NaN with NaN too), and every element that does not is counted in
    ``nonfinite_mismatch``. Top-1 agreement is reported only for outputs that look like class
    scores: floating point, 2-D ``[N, C]`` with ``C > 1``, where argmax over C names a class.
    Other outputs (hidden states, sequences, integer ids, one regression value) have no top-1,
    and a model with none reports None. An embedding ``[N, D]`` passes the rule too: a budget on
    top-1 agreement is the user's statement that the outputs are classes.
    """
    max_abs, abs_sum, count, mismatched = 0.0, 0.0, 0, 0
    cosines: list[float] = []
    rel_errors: list[float] = []
    spread_errors: list[float] = []
    top1: list[float] = []
    for cand, ref in zip(candidate, reference, strict=True):
        if cand.shape != ref.shape:
            raise ConversionFailed(
                f"output shapes differ: {list(cand.shape)} vs {list(ref.shape)} (reference)"
            )
        c64, r64 = cand.astype(np.float64), ref.astype(np.float64)
        finite = np.isfinite(c64) & np.isfinite(r64)
        same = (c64 == r64) | (np.isnan(c64) & np.isnan(r64))
        mismatched += int(np.count_nonzero(~finite & ~same))
        diff = np.abs(c64[finite] - r64[finite])
        if diff.size:
            max_abs = max(max_abs, float(diff.max()))
        abs_sum += float(diff.sum())
        count += diff.size
        if ref.dtype.kind in "biu" and cand.dtype.kind in "biu":
            cosines.append(_agreement(cand, ref))
            continue
        cosine, rel = _computed_figures(c64, r64)
        fills = _fill_positions(c64, r64)
        if fills is not None:  # judged on what the model computes as well
            n = c64.shape[0]
            keep = ~fills
            computed = _computed_figures(c64.reshape(n, -1)[:, keep], r64.reshape(n, -1)[:, keep])
            cosine, rel = min(cosine, computed[0]), max(rel, computed[1])
        spots = _fill_values(c64, r64)
        if spots is not None:  # fills wherever each sample has them: judged without them too
            computed = _computed_figures(c64[~spots], r64[~spots])
            cosine, rel = min(cosine, computed[0]), max(rel, computed[1])
        n = c64.shape[0] if c64.ndim else 1
        for group in _scale_groups(r64):  # values of different scales: each judged apart too
            computed = _computed_figures(c64.reshape(n, -1)[:, group], r64.reshape(n, -1)[:, group])
            cosine, rel = min(cosine, computed[0]), max(rel, computed[1])
        cosines.append(cosine)
        rel_errors.append(rel)
        spread_errors.append(_spread_error(c64, r64, finite))
        if is_class_scores(ref):
            top1.append(float(np.mean(cand.argmax(axis=1) == ref.argmax(axis=1))))
    return Figures(
        max_abs=np.inf if mismatched else max_abs,
        mean_abs=np.inf if mismatched else (abs_sum / count if count else 0.0),
        cosine=min(cosines) if cosines else 1.0,
        top1_agreement=min(top1) if top1 else None,
        rel_error=max(rel_errors) if rel_errors else 0.0,
        nonfinite_mismatch=mismatched,
        spread_error=max(spread_errors) if spread_errors else 0.0,
    )


def is_class_scores(output: np.ndarray) -> bool:
    """The rule of ``compare``'s top-1 agreement: a floating [N, C > 1] output."""
    return output.ndim == 2 and output.shape[1] > 1 and output.dtype.kind == "f"


def tolerance_failure(
    candidate: list[np.ndarray],
    reference: list[np.ndarray],
    rtol: float,
    atol: float,
    *,
    equal_nan: bool = False,
) -> str:
    """'' when np.allclose(candidate, reference, rtol, atol) holds for every output, else figures.

    np.isclose decides, element by element, what np.allclose does: a NaN on either side is never
    close, an infinity only to the same infinity. (A NaN in the reference used to make the
    largest excess NaN, which compares as not > 0, and a model that disagreed was published;
    an all-NaN one crashed the child.)"""
    for index, (cand, ref) in enumerate(zip(candidate, reference, strict=True)):
        c64, r64 = cand.astype(np.float64), ref.astype(np.float64)
        close = np.isclose(c64, r64, rtol=rtol, atol=atol, equal_nan=equal_nan)
        if close.all():
            continue
        with np.errstate(invalid="ignore", over="ignore"):
            excess = np.abs(c64 - r64) - (atol + rtol * np.abs(r64))
        # The worst element: a non-finite disagreement first, else the largest excess.
        ranked = np.where(close, -np.inf, np.where(np.isfinite(excess), excess, np.inf))
        worst = int(np.argmax(ranked))
        bad = int(np.count_nonzero(~close))
        return (
            f"output {index}: {bad} of {close.size} elements outside rtol={rtol}, atol={atol}; "
            f"worst {float(c64.flat[worst]):.6g} vs {float(r64.flat[worst]):.6g}"
        )
    return ""


def budget_failure(figures: Figures, min_cosine: float, min_top1: float) -> str:
    """'' when within the accuracy budget, else which limit failed and by how much. Written as
    ``not figure >= limit``: a NaN figure fails (it compared as not below the limit, and a model
    with NaN figures was published)."""
    reasons = []
    if figures.nonfinite_mismatch:
        reasons.append(
            f"{figures.nonfinite_mismatch} output elements are NaN or infinite where the "
            "reference is not (or the reverse)"
        )
    if not figures.cosine >= min_cosine:
        reasons.append(f"cosine {figures.cosine:.6f} < min_cosine {min_cosine}")
    most = max_rel_error(min_cosine)
    if most is not None and not figures.rel_error <= most:
        reasons.append(
            f"relative error {figures.rel_error:.4f} > {most:.4f}, the most min_cosine "
            f"{min_cosine} allows (outputs that keep their direction but not their size)"
        )
    if most is not None and not figures.spread_error <= most:
        reasons.append(
            f"error {figures.spread_error:.4f} of the spread of a one-value output over the "
            f"samples > {most:.4f}, the most min_cosine {min_cosine} allows (predictions near "
            "one common value, judged on how they vary, not on that value)"
        )
    top1 = figures.top1_agreement
    if min_top1 > 0 and top1 is not None and not top1 >= min_top1:
        reasons.append(f"top-1 agreement {top1:.4f} < min_top1_agreement {min_top1}")
    return "; ".join(reasons)
