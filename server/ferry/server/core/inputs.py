"""Checking a request against the version it goes to: names, dtypes, shapes, batch, limits.

One validation for every protocol, run in the core before a request is queued, so ``ferry.v1``
and the Open Inference Protocol refuse the same requests with the same messages.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from ferry.codec import datatype_name, datatype_of
from ferry.codec._tensor import MAX_DIMS, too_many_dims
from ferry.server.batching.tensors import batch_key
from ferry.server.core.loaded import LoadedVersion, Work
from ferry.server.core.types import InferenceRequest, Limits, TensorSpec, short
from ferry.server.errors import InvalidArgument, InvalidInput, LimitExceeded


def check_wire_elements(
    shapes: Iterable[Sequence[int]], limits: Limits, strings: Iterable[Sequence[int]] = ()
) -> None:
    """Refuse a request whose declared shapes exceed ``max_request_elements``, or whose BYTES
    inputs' shapes (``strings``) exceed ``max_request_bytes_elements``, before any tensor is
    decoded: BYTES elements become Python objects several times their wire size, built one by
    one on the event loop, so the limits must hold before that time and memory are spent. A
    shape longer than any array's is refused on its length first."""
    total = 0
    for index, shape in enumerate(shapes):
        if len(shape) > MAX_DIMS:  # before a loop over millions of dims
            raise InvalidArgument(
                f"the request's input {index} (0-based): {too_many_dims(len(shape), '')}"
            )
        total += _declared(shape)
        if total > limits.max_elements:
            raise LimitExceeded(
                f"the request declares more than {limits.max_elements} tensor elements, the "
                "limit per request (max_request_elements)"
            )
    total = 0
    for shape in strings:
        total += _declared(shape)
        if total > limits.max_bytes_elements:
            raise _too_many_strings(limits)


def _declared(shape: Sequence[int]) -> int:
    """Elements a wire shape declares: ints (protobuf int64, or checked JSON); a dim <= 0
    holds nothing."""
    count = 1
    for dim in shape:
        if dim <= 0:
            return 0
        count *= dim
    return count


def _too_many_strings(limits: Limits) -> LimitExceeded:
    return LimitExceeded(
        f"the request declares more than {limits.max_bytes_elements} BYTES elements, the limit "
        "per request (max_request_bytes_elements): each string is decoded into Python objects "
        "while every other request waits; send fewer strings per request"
    )


def check_counts(inputs: int, outputs: int, limits: Limits) -> None:
    """Refuse more inputs or requested outputs than ``max_request_inputs`` and
    ``max_request_outputs`` allow. The wire decoders call it as soon as the counts are known,
    before a tensor is decoded or a name compared: the per-request work must be bounded by the
    limits, not by the body size (a 1 MB body holds 40,000 output names)."""
    if inputs > limits.max_inputs:
        raise LimitExceeded(
            f"{inputs} inputs is over the limit of {limits.max_inputs} per request "
            "(max_request_inputs)"
        )
    if outputs > limits.max_outputs:
        raise LimitExceeded(
            f"{outputs} requested outputs is over the limit of "
            f"{limits.max_outputs} per request (max_request_outputs)"
        )


def validate(lv: LoadedVersion, request: InferenceRequest, limits: Limits) -> Work:
    """The request checked against the version's signature and the server's limits, as the
    batcher will queue it: one validation for every protocol. It runs for every request on the
    event loop, so the common case costs few calls: messages are only built for a refusal."""
    inputs = request.inputs
    check_counts(len(inputs), len(request.outputs or ()), limits)
    if inputs.keys() != lv.input_specs.keys():
        missing = sorted(set(lv.input_specs) - set(inputs))
        unexpected = sorted(set(inputs) - set(lv.input_specs))
        parts = []
        if missing:
            parts.append(f"missing inputs {missing}")
        if unexpected:
            parts.append(f"unexpected inputs {[short(n) for n in unexpected]}")
        raise InvalidInput(f"{_where(lv)}: {'; '.join(parts)}; it takes {lv.input_names}")
    batch: int | None = None
    elements = 0
    strings = 0  # BYTES elements, bounded apart (check_wire_elements)
    text = 0  # characters of the BYTES elements: a string costs a run what its length does
    # The request's own arrays stay as sent: text is decoded into a copy.
    feeds = dict(inputs) if lv.text_inputs or not isinstance(inputs, dict) else inputs
    batched = lv.max_batch_size > 0
    for name, spec in lv.input_specs.items():
        arr = inputs[name]
        if arr.dtype != lv.input_numpy[name]:
            raise InvalidInput(
                f"{_where(lv)}: input {name!r} must be {datatype_name(spec.dtype)}, got "
                f"{_dtype_name(arr)}"
            )
        shape = arr.shape
        if len(shape) != len(spec.shape):
            raise _wrong_shape(lv, name, spec, shape)
        for want, got in zip(spec.shape, shape, strict=True):
            if want not in (got, -1):
                raise _wrong_shape(lv, name, spec, shape)
        if name in lv.text_inputs:
            strings += arr.size
            if strings > limits.max_bytes_elements:
                raise _too_many_strings(limits)
            feeds[name], chars = _as_text(arr, f"{_where(lv)}: input {name!r}")
            text += chars
        elements += arr.size
        if batched:
            if batch is None:
                batch = shape[0]
            elif shape[0] != batch:
                raise InvalidInput(
                    f"{_where(lv)}: inputs disagree on the batch dimension ({batch} vs "
                    f"{shape[0]} for {name!r}); every input's first dim is the batch size"
                )
    if lv.bounded:
        _check_bounds(_where(lv), lv.bounded, inputs)
    if elements > limits.max_elements:
        raise LimitExceeded(
            f"{elements} tensor elements is over the limit of {limits.max_elements} "
            "per request (max_request_elements)"
        )
    if batched:
        assert batch is not None
        if batch < 1:
            raise InvalidInput(f"{_where(lv)}: the batch dimension must be at least 1, got {batch}")
        if 0 < limits.max_batch < batch:
            raise LimitExceeded(
                f"batch size {batch} is over the limit of {limits.max_batch} per "
                "request (max_request_batch_size); split the request"
            )
        if batch > lv.max_batch_size:
            raise InvalidInput(
                f"{_where(lv)}: batch size {batch} is over the model's max_batch_size "
                f"{lv.max_batch_size}; split the request"
            )
    outputs = tuple(request.outputs) if request.outputs else None
    if outputs is not None:
        unknown = [o for o in outputs if o not in lv.output_names]
        if unknown:
            raise InvalidInput(
                f"{_where(lv)}: unknown outputs {[short(o) for o in unknown]}; "
                f"it has {lv.output_names}"
            )
        if len(set(outputs)) != len(outputs):
            twice = next(o for i, o in enumerate(outputs) if o in outputs[:i])
            raise InvalidInput(f"{_where(lv)}: output {short(twice)!r} is requested twice")
    key = batch_key(feeds, lv.input_names) if batched else ()
    return Work(feeds, outputs, batch or 1, key, elements + text)


def _where(lv: LoadedVersion) -> str:
    return f"model {lv.name!r} version {lv.version}"


def _wrong_shape(
    lv: LoadedVersion, name: str, spec: TensorSpec, shape: tuple[int, ...]
) -> InvalidInput:
    return InvalidInput(
        f"{_where(lv)}: input {name!r} must have shape {_show(spec.shape)}, got {list(shape)}"
    )


def _as_text(arr: np.ndarray, where: str) -> tuple[np.ndarray, int]:
    """BYTES elements as ``str``. onnxruntime's Python binding feeds a ``bytes`` element of a
    string tensor as its repr (``b"ab"`` becomes ``"b'ab'"``), silently corrupting the input, and
    its string tensors hold UTF-8 text. Decoding here, per request, makes a non-UTF-8 element
    this request's INVALID_ARGUMENT instead of its whole batch's failure. Also returns the
    characters, which is what a string costs a run (one 1 MB string took StringSplit 430 ms)."""
    out = np.empty(arr.shape, dtype=object)
    flat = out.reshape(-1)  # a view: writing it fills ``out``
    chars = 0
    for index, element in enumerate(arr.reshape(-1)):
        if isinstance(element, str):
            flat[index] = element
            chars += len(element)
        elif isinstance(element, bytes | bytearray):
            chars += len(element)
            try:
                flat[index] = bytes(element).decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InvalidInput(
                    f"{where}: BYTES element {index} is not valid UTF-8 ({exc.reason} at byte "
                    f"{exc.start}); onnxruntime string tensors hold UTF-8 text"
                ) from None
        else:
            raise InvalidInput(
                f"{where}: BYTES element {index} must be bytes or str, got {type(element).__name__}"
            )
    return out, chars


def _check_bounds(
    where: str, bounded: Sequence[TensorSpec], inputs: Mapping[str, np.ndarray]
) -> None:
    """The sizes the version was verified at, and axes sharing a name being one size."""
    named: dict[str, tuple[str, int]] = {}  # dynamic axis name -> (first input, its size)
    for spec in bounded:
        shape = inputs[spec.name].shape
        for b in spec.bounds:
            size = shape[b.axis]
            if size < b.min or (b.max and size > b.max):
                upper = b.max or "any"
                raise InvalidInput(
                    f"{where}: input {spec.name!r} dim {b.axis} ({b.name}) is {size}, outside "
                    f"{b.min}..{upper}: the version was verified within these bounds"
                )
            first = named.setdefault(b.name, (spec.name, size))
            if first[1] != size:
                raise InvalidInput(
                    f"{where}: inputs disagree on {b.name} ({first[1]} for {first[0]!r} vs "
                    f"{size} for {spec.name!r}); inputs sharing a dynamic axis must have the same "
                    "size there"
                )


def _show(shape: Sequence[int]) -> str:
    return "[" + ", ".join("?" if d == -1 else str(d) for d in shape) + "]"


def _dtype_name(arr: np.ndarray) -> str:
    try:
        return datatype_name(datatype_of(arr.dtype))
    except ValueError:
        return str(arr.dtype)
