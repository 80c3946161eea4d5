"""Open Inference Protocol REST tensors <-> the core's numpy request and result.

A request body is a JSON header, optionally followed by the binary tensor data extension: when the
``Inference-Header-Content-Length`` header is present, the JSON is the body's first that many
bytes and the rest holds the tensors whose ``parameters`` carry ``binary_data_size``, back to back
in input order, each in the raw layout gRPC's ``raw_input_contents`` uses (``ferry.codec``). Binary
is the fast path (one ``np.frombuffer`` per input); JSON ``data`` (flat or nested, row-major) is
the convenient one and pays for a conversion.

Only what is particular to this wire format is checked here, with the gRPC adapter's words where
the mistake is the same; whether the tensors fit the model is decided once, in ``DataPlane``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import orjson

from ferry.codec import (
    CodecError,
    DataType,
    datatype_from_name,
    datatype_name,
    datatype_of,
    from_bytes,
    to_bytes,
)
from ferry.codec._json_keys import DuplicateKey, unique_object
from ferry.codec._tensor import MAX_DIMS, nesting_mismatch, too_many_dims
from ferry.server.core.inputs import check_counts, check_wire_elements
from ferry.server.core.types import (
    InferenceRequest,
    InferenceResult,
    Limits,
    names_version,
    parse_version,
    short,
    version_label,
)
from ferry.server.errors import InvalidArgument, LimitExceeded, Unimplemented
from ferry.server.grpc.kserve_tensors import (
    NO_SEQUENCES,
    SHARED_MEMORY,
    TYPED,
    UNSUPPORTED_OUTPUT_PARAMETERS,
    reshape_input,
)
from ferry.server.http.jsonkeys import check_unique

BINARY_SIZE = "binary_data_size"
# The binary extension's header: the JSON's length, in a request and a response.
HEADER_LENGTH = "Inference-Header-Content-Length"
BINARY_OUTPUT = "binary_data"
BINARY_ALL = "binary_data_output"
# The gRPC refusals, told in HTTP's words: an HTTP answer has no raw_output_contents.
OUTPUT_REFUSALS = {
    **UNSUPPORTED_OUTPUT_PARAMETERS,
    SHARED_MEMORY: "shared memory is not supported; outputs come back in the response body "
    "(JSON 'data', or binary after the JSON with parameters.binary_data)",
}
_BYTES = DataType.DATA_TYPE_BYTES
_BF16 = DataType.DATA_TYPE_BF16
_FP16 = DataType.DATA_TYPE_FP16
_BOOL = DataType.DATA_TYPE_BOOL
_FLOATS = frozenset({DataType.DATA_TYPE_FP32, DataType.DATA_TYPE_FP64, _FP16})
# NaN, Infinity and -Infinity as Python's json writes (and reads) them; orjson writes null.
_NON_FINITE = np.array([b"NaN", b"Infinity", b"-Infinity"], dtype=object)


class HttpInfer:
    """An infer request body as the core decodes it (``core.types.WireRequest``). After
    ``decode`` it also knows how each output is to be sent back (binary or JSON)."""

    __slots__ = (
        "binary_all",
        "binary_outputs",
        "body",
        "header_length",
        "model",
        "request_id",
        "version_text",
    )

    def __init__(self, model: str, version: str, body: bytes, header_length: int | None) -> None:
        self.model = model
        self.version_text = version
        self.body = body
        self.header_length = header_length
        self.binary_all = False
        self.binary_outputs: dict[str, bool] = {}
        self.request_id = ""  # read with the JSON, before anything in it can be refused

    @property
    def version_label(self) -> int:
        return version_label(self.version_text)

    @property
    def version_named(self) -> bool:
        return names_version(self.version_text)

    def decode(self, limits: Limits) -> InferenceRequest:
        version = parse_version(self.version_text)
        head, binary = _split(self.body, self.header_length)
        if len(head) > limits.max_json_bytes:
            raise LimitExceeded(
                f"the request's JSON is {len(head):,} bytes, over the limit of "
                f"{limits.max_json_bytes:,} (max_request_json_bytes): send tensor data in "
                "binary (the binary tensor extension: Inference-Header-Content-Length, or "
                "tritonclient's binary_data=True), or raise the limit"
            )
        try:
            parsed = loads(head)
        except InvalidArgument as exc:
            raise self._split_hint(exc, head) from None
        request = _object(parsed, "the request")
        request_id = request.get("id", "")
        if isinstance(request_id, str):
            self.request_id = request_id
        raw_inputs = request.get("inputs")
        if not isinstance(raw_inputs, list):
            raise InvalidArgument("the request needs an 'inputs' list of tensors")
        raw_outputs = request.get("outputs")
        # Before any tensor is decoded or name compared (a list that is not is refused below).
        outputs_count = len(raw_outputs) if isinstance(raw_outputs, list) else 0
        check_counts(len(raw_inputs), outputs_count, limits)
        specs = [_input_spec(t, i) for i, t in enumerate(raw_inputs)]
        check_wire_elements(
            (shape for _, _, shape, _ in specs),
            limits,
            (shape for _, code, shape, _ in specs if code == _BYTES),
        )
        inputs: dict[str, np.ndarray] = {}
        offset = 0
        for name, code, shape, tensor in specs:
            params = _object(tensor.get("parameters", {}), f"input {short(name)!r} parameters")
            if SHARED_MEMORY in params:
                raise Unimplemented(
                    f"input {name!r}: shared memory is not supported; send the data in the "
                    "request body (JSON 'data' or binary_data_size)"
                )
            if BINARY_SIZE in params:
                if "data" in tensor:
                    raise InvalidArgument(
                        f"input {name!r} has both 'data' and parameters.binary_data_size: send "
                        "one or the other"
                    )
                size = _count(params[BINARY_SIZE], f"input {name!r} binary_data_size")
                if offset + size > len(binary):
                    raise InvalidArgument(
                        f"input {name!r}: binary_data_size {size} runs past the end of the "
                        f"binary data ({len(binary) - offset} bytes left after the JSON header)"
                    )
                array = _from_binary(code, shape, binary[offset : offset + size], name)
                offset += size
            else:
                array = _from_json(code, shape, tensor.get("data"), name, tensor)
            if name in inputs:
                raise InvalidArgument(f"input {name!r} appears twice in the request")
            inputs[name] = array
        if offset != len(binary):
            raise InvalidArgument(
                f"the request has {len(binary) - offset} bytes of binary data that no input "
                "claims: each binary input sets parameters.binary_data_size"
            )
        params = _object(request.get("parameters", {}), "the request parameters")
        self.binary_all = _flag(params.get(BINARY_ALL, False), BINARY_ALL)
        outputs = self._outputs(raw_outputs)
        timeout, priority = _request_parameters(params)
        request_id = request.get("id", "")
        if not isinstance(request_id, str):
            raise InvalidArgument(f"the request id must be a string, got {_kind(request_id)}")
        return InferenceRequest(
            model=self.model,
            inputs=inputs,
            version=version,
            id=request_id,
            outputs=outputs,
            timeout=timeout,
            priority=priority,
        )

    def _split_hint(self, exc: InvalidArgument, head: bytes) -> InvalidArgument:
        """A JSON error that comes from where the JSON ends, said so: with binary data after
        the JSON, the parser's own words ("can't decode byte 0x80", "Extra data") point at the
        tensor bytes, not at the header the client has to send or correct."""
        if self.header_length is not None:
            return InvalidArgument(
                f"{exc.message}; the JSON is the body's first {self.header_length} bytes "
                f"({HEADER_LENGTH}): that header must be the JSON's exact length in bytes"
            )
        if BINARY_SIZE.encode() in head:
            return InvalidArgument(
                f"{exc.message}; the body names {BINARY_SIZE}, so binary tensor data follows "
                f"its JSON: send the header {HEADER_LENGTH} with the JSON's length in bytes"
            )
        return exc

    def _outputs(self, raw: Any) -> list[str] | None:
        if raw is None:
            return None
        if not isinstance(raw, list):
            raise InvalidArgument("the request's 'outputs' must be a list")
        names: dict[str, None] = {}  # in request order; a set's lookup, not a list's scan
        for i, item in enumerate(raw):
            out = _object(item, f"output {i}")
            name = out.get("name")
            if not isinstance(name, str):
                raise InvalidArgument(f"output {i} needs a 'name' string")
            params = _object(out.get("parameters", {}), f"output {short(name)!r} parameters")
            for key, why in OUTPUT_REFUSALS.items():
                # "" asks for nothing, as on gRPC (its string kind's empty value).
                if key in params and params[key] not in (0, None, False, ""):
                    raise Unimplemented(f"output {name!r}: {why}")
            if name in names:
                raise InvalidArgument(f"output {name!r} is requested twice")
            names[name] = None
            if BINARY_OUTPUT in params:
                self.binary_outputs[name] = _flag(params[BINARY_OUTPUT], f"{name} binary_data")
        return list(names) or None

    def encode(self, result: InferenceResult) -> tuple[bytes, int | None]:
        """The response body, and the JSON header's length when binary data follows it."""
        outputs = []
        chunks: list[bytes] = []
        for name, array in result.outputs.items():
            binary = self.binary_outputs.get(name, self.binary_all)
            entry: dict[str, Any]
            if not binary:
                entry = _json_output(name, array)
                if entry:
                    outputs.append(entry)
                    continue
            # Binary asked for, or JSON impossible (BYTES that are not UTF-8).
            code, shape, data = to_bytes(array)
            entry = {"name": name, "datatype": datatype_name(code), "shape": shape}
            entry["parameters"] = {BINARY_SIZE: len(data)}
            outputs.append(entry)
            chunks.append(data)
        head: dict[str, Any] = {"model_name": result.model, "model_version": str(result.version)}
        if result.id:
            head["id"] = result.id
        head["outputs"] = outputs
        text = dumps(head)
        if not chunks:
            return text, None
        return b"".join([text, *chunks]), len(text)


def _split(body: bytes, header_length: int | None) -> tuple[bytes, bytes]:
    if header_length is None:
        return body, b""
    if header_length > len(body):
        raise InvalidArgument(
            f"Inference-Header-Content-Length {header_length} is larger than the request body "
            f"({len(body)} bytes)"
        )
    return body[:header_length], body[header_length:]


def loads(data: bytes, what: str = "the request body") -> Any:
    """orjson (about 15x faster than the standard library on a float tensor), falling back to
    the standard library for what only it reads: the NaN and Infinity that tritonclient and
    Python's json write for non-finite floats. An object that names a key twice is refused
    (``jsonkeys``): readers differ on which of the two counts."""
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        pass
    else:
        try:
            check_unique(value, data)
        except DuplicateKey as exc:
            raise _duplicate(what, exc.key) from None
        return value
    try:
        return json.loads(data, parse_float=_finite_float, object_pairs_hook=_unicode_object)
    except _NotUnicode as exc:
        raise InvalidArgument(
            f"{what} holds a string with a lone UTF-16 surrogate escape ({exc}): JSON strings "
            "must be Unicode text; escape a character outside the BMP as a surrogate pair"
        ) from None
    except DuplicateKey as exc:
        raise _duplicate(what, exc.key) from None
    except _TooLarge as exc:
        raise InvalidArgument(
            f"{what} holds the number {exc}, too large for any float (it is not Infinity); "
            "send Infinity if that is what you mean"
        ) from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError
        raise InvalidArgument(f"{what} is not valid JSON: {str(exc)[:200]}") from None


def _duplicate(what: str, key: str | None) -> InvalidArgument:
    named = f"the key {short(key)!r}" if key is not None else "a key"
    return InvalidArgument(
        f"{what} names {named} twice in one object: send each key once (JSON readers differ "
        "on which of the two counts)"
    )


class _TooLarge(Exception):
    pass


class _NotUnicode(Exception):
    pass


def _unicode_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``unique_object``, refusing a key or string value with a lone surrogate (``"\\ud800"``),
    which orjson refuses and the standard library reads into a str no UTF-8 writer takes: a
    request ``id`` holding one was run, then its answer failed to encode (500 INTERNAL).
    Strings in lists are BYTES data, checked where they are encoded (``_flatten``)."""
    for key, value in pairs:
        for text in (key, value):
            if isinstance(text, str) and not text.isascii():
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError as exc:
                    raise _NotUnicode(ascii(text[exc.start : exc.end])) from None
    return unique_object(pairs)


def _finite_float(text: str) -> float:
    """A JSON number literal is finite: 1e400 is too large for a float, not infinity."""
    value = float(text)
    if math.isinf(value):
        raise _TooLarge(text[:40])
    return value


def dumps(value: Any) -> bytes:
    """orjson, which writes numpy arrays directly (float data holding NaN or Infinity comes
    written already, as a ``Fragment``: ``_json_output``)."""
    return orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY)


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidArgument(f"{what} must be a JSON object, got {_kind(value)}")
    return value


def _kind(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    return names.get(type(value), "a number" if isinstance(value, int | float) else "a value")


def _count(value: Any, what: str) -> int:
    if isinstance(value, float) and value >= 2**64 and value.is_integer():
        # JSON readers hand an integer past 64 bits on as a float: it was refused as not an
        # integer at all ("got 1.8446744073709552e+19"), though the client sent one.
        raise InvalidArgument(f"{what} must be below 2**64, got {value:.0f} or about that")
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidArgument(f"{what} must be a non-negative integer, got {value!r:.40}")
    if value >= 2**64:  # what gRPC's uint64 carries; the standard library's JSON reads any size
        raise InvalidArgument(f"{what} must be below 2**64, got {value!r:.40}")
    return value


def _flag(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidArgument(f"parameter {what!r} must be true or false, got {value!r:.40}")
    return value


def _input_spec(raw: Any, index: int) -> tuple[str, int, tuple[int, ...], dict[str, Any]]:
    tensor = _object(raw, f"input {index}")
    name = tensor.get("name")
    if not isinstance(name, str):
        raise InvalidArgument(f"input {index} needs a 'name' string")
    datatype = tensor.get("datatype")
    if not isinstance(datatype, str):
        raise InvalidArgument(f"input {short(name)!r} needs a 'datatype' string (FP32, INT64...)")
    try:
        code = datatype_from_name(datatype)
    except CodecError as exc:
        raise InvalidArgument(f"input {short(name)!r}: {exc}") from None
    shape = tensor.get("shape")
    if isinstance(shape, list) and len(shape) > MAX_DIMS:
        raise InvalidArgument(str(too_many_dims(len(shape), short(name))))
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) for d in shape
    ):
        raise InvalidArgument(f"input {short(name)!r} needs a 'shape' list of integers")
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"input {short(name)!r}: shape {shape} has a negative dimension")
    return name, code, tuple(shape), tensor


def _from_binary(code: int, shape: tuple[int, ...], data: bytes, name: str) -> np.ndarray:
    try:
        return from_bytes(code, shape, data, name=name)
    except CodecError as exc:
        raise InvalidArgument(str(exc)) from None


def _from_json(
    code: int, shape: tuple[int, ...], data: Any, name: str, tensor: Mapping[str, Any]
) -> np.ndarray:
    count = 1
    for dim in shape:
        count *= dim
    if "data" not in tensor:
        raise InvalidArgument(
            f"input {name!r} has no data: send it in 'data' or as binary data "
            "(parameters.binary_data_size)"
        )
    if code == _BF16:
        raise InvalidArgument(
            f"input {name!r}: BF16 has no JSON form; send it as binary data "
            "(parameters.binary_data_size), as tritonclient's binary_data=True does"
        )
    if not isinstance(data, list):
        data = [data]  # a scalar for a one-element tensor
    if code == _BYTES:
        flat = _flatten(data, name)
        if len(flat) != count:
            raise _count_error(name, shape, count, len(flat))
        _check_nesting(_nesting(data), shape, name)
        array = np.empty(count, dtype=object)
        array[:] = flat
        return reshape_input(array, shape, name)
    try:
        values = np.asarray(data)
    except (ValueError, OverflowError) as exc:
        raise InvalidArgument(
            f"input {name!r}: 'data' is not a regular (non-ragged) list of numbers: {exc}"
        ) from None
    if values.size != count:
        raise _count_error(name, shape, count, values.size)
    _check_nesting(values.shape, shape, name)
    wanted = TYPED[code][2] if code != _FP16 else np.dtype(np.float16)
    kind = values.dtype.kind
    if count and code != _BOOL and kind in "iufO" and _holds_bool(data, values):
        # numpy reads [5, true, false] as [5, 1, 0]: a true or false among numbers is a
        # mistake of the client's, refused as an all-true/false list is.
        raise InvalidArgument(
            f"input {name!r} is {datatype_name(code)}: 'data' must hold numbers, got true or "
            "false among them; send 1 and 0 if that is what you mean"
        )
    if count and wanted.kind in "iu" and kind in "fO":
        # numpy widens a mix of int64 and larger ints to float64 (or object), losing digits:
        # the elements themselves decide whether they are integers.
        values = _exact_integers(data, values)
        kind = values.dtype.kind
    if count and not _compatible(code, kind):
        what = "true/false" if code == _BOOL else "integers" if wanted.kind in "iu" else "numbers"
        why = ""
        if wanted.kind in "iu" and kind == "f":
            # JSON readers hand integers past 64 bits on as floats: say so, or a client that
            # sent 18446744073709551616 reads that it sent floats.
            why = (
                " (a fraction, an exponent such as 1e3, NaN or Infinity; or integers beyond 64"
                " bits, which JSON readers take as floats)"
            )
        raise InvalidArgument(
            f"input {name!r} is {datatype_name(code)}: 'data' must hold {what}, got "
            f"{_found(values)}{why}"
        )
    if count and wanted.kind in "iu":
        info = np.iinfo(wanted)  # type: ignore[type-var]
        low, high = values.min(), values.max()
        if low < info.min or high > info.max:
            raise InvalidArgument(
                f"input {name!r}: {datatype_name(code)} values must lie in [{info.min}, "
                f"{info.max}], got values in [{low}, {high}]"
            )
    with np.errstate(over="ignore"):  # an overflow is refused below, not warned about
        cast = values.astype(wanted, copy=False)
    if count and wanted.kind == "f" and wanted.itemsize < values.itemsize:
        _check_float_range(values, cast, code, name)
    return reshape_input(cast, shape, name)


def _nesting(data: list[Any]) -> tuple[int, ...]:
    """The sizes of ``data``'s nested lists, read down its first elements (a BYTES ``data``,
    which numpy does not shape)."""
    sizes = []
    level: Any = data
    while isinstance(level, list):
        sizes.append(len(level))
        level = level[0] if level else None
    return tuple(sizes)


def _check_nesting(nested: tuple[int, ...], shape: tuple[int, ...], name: str) -> None:
    """Refuse nested ``data`` that is not ``shape`` read row-major (codec.nesting_mismatch)."""
    problem = nesting_mismatch(nested, shape, name)
    if problem:
        raise InvalidArgument(problem)


def _found(values: np.ndarray) -> str:
    """What ``data`` holds, in JSON's words: numpy's were said ("got str96 values", "got
    object values" for a null), which named neither the value to fix nor its JSON form."""
    kind = values.dtype.kind
    if kind == "O":  # a null, an object, a string or an integer past 64 bits among numbers
        for value in values.reshape(-1).tolist():
            if isinstance(value, bool) or not isinstance(value, int | float):
                return f"{_kind(value)} among them"
        return "integers beyond 64 bits"
    words = {"U": "strings", "S": "strings", "b": "true/false", "i": "integers", "u": "integers"}
    words["f"] = "numbers that are not all integers"
    return words.get(kind, f"{values.dtype.name} values")


def _check_float_range(values: np.ndarray, cast: np.ndarray, code: int, name: str) -> None:
    """A finite number the datatype cannot hold (1e300 as FP32) would become inf and run as
    such: refused like an out-of-range integer. inf and NaN sent as such pass through."""
    overflow = np.isfinite(values) & ~np.isfinite(cast)
    if overflow.any():
        first = values.reshape(-1)[int(np.flatnonzero(overflow.reshape(-1))[0])]
        largest = float(np.finfo(cast.dtype).max)
        raise InvalidArgument(
            f"input {name!r}: {datatype_name(code)} values must lie within "
            f"+-{largest:g}, got {float(first)!r}"
        )


def _holds_bool(data: list[Any], values: np.ndarray) -> bool:
    """Whether a JSON true or false is among ``data``'s numbers. numpy read each as 1 or 0, so
    with no 0 or 1 among ``values`` there is none, and the scan of every element is skipped."""
    if values.dtype.kind in "iuf" and not ((values == 0) | (values == 1)).any():
        return False
    return _scan_bool(data)


def _scan_bool(data: list[Any]) -> bool:
    if not data or not isinstance(data[0], list):
        return bool in set(map(type, data))
    return any(_scan_bool(row) for row in data)


def _exact_integers(data: list[Any], values: np.ndarray) -> np.ndarray:
    flat = np.asarray(data, dtype=object).reshape(-1).tolist()
    if not all(type(v) is int for v in flat):
        return values  # not all integers: refused by the kind check
    low = min(flat)
    if low < -(2**63) or max(flat) >= 2**64 or (low < 0 and max(flat) >= 2**63):
        return np.array([0.0])  # no 64-bit integer holds them: refused as floats
    return np.array(flat, dtype=np.uint64 if low >= 0 else np.int64)


def _compatible(code: int, kind: str) -> bool:
    if code == _BOOL:
        return kind == "b"
    if code in _FLOATS:
        return kind in "iuf"
    return kind in "iu"


def _count_error(name: str, shape: tuple[int, ...], count: int, got: int) -> InvalidArgument:
    return InvalidArgument(
        f"input {name!r}: shape {list(shape)} holds {count} elements, got {got} in 'data'"
    )


def _flatten(data: list[Any], name: str) -> list[bytes]:
    out: list[bytes] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            if not isinstance(item, str):
                raise InvalidArgument(
                    f"input {name!r} is BYTES: 'data' must hold strings (UTF-8), got "
                    f"{_kind(item)}; send raw bytes as binary data"
                )
            try:
                out.append(item.encode("utf-8"))
            except UnicodeEncodeError as exc:  # a lone surrogate escaped in the JSON
                raise InvalidArgument(
                    f"input {name!r}: a string is not valid UTF-8: {exc}"
                ) from None
        else:
            stack.pop()
    return out


def _json_output(name: str, array: np.ndarray) -> dict[str, Any]:
    """An output as JSON ``data`` (flat, row-major), or {} when it has no JSON form."""
    shape = list(array.shape)
    flat = array.reshape(-1)
    if array.dtype.kind in "OSU":
        try:
            data: list[Any] = [
                e.decode("utf-8") if isinstance(e, bytes) else str(e) for e in flat.tolist()
            ]
        except UnicodeDecodeError:
            return {}
        return {"name": name, "datatype": "BYTES", "shape": shape, "data": data}
    code = datatype_of(array.dtype)
    if code == _BF16:
        flat = flat.astype(np.float32)
    data_value: Any = np.ascontiguousarray(flat)
    if flat.dtype.kind == "f":
        finite = np.isfinite(data_value)
        if not finite.all():
            data_value = _non_finite_json(data_value, finite)
    return {"name": name, "datatype": datatype_name(code), "shape": shape, "data": data_value}


def _non_finite_json(flat: np.ndarray, finite: np.ndarray) -> orjson.Fragment:
    """Float data holding NaN or Infinity, written as JSON. orjson writes each as null, so its
    text is taken and every null (in float data, exactly the non-finite elements, in order)
    replaced by the element's own word. The standard library wrote such data before, from a
    list of Python floats: ten times slower, on the event loop (4 M elements held every other
    request for 5 s, where orjson takes 0.5), and a float64 repr for every float32."""
    parts = orjson.dumps(flat, option=orjson.OPT_SERIALIZE_NUMPY).split(b"null")
    bad = flat[~finite]
    words = _NON_FINITE[np.where(np.isnan(bad), 0, np.where(bad > 0, 1, 2))]
    pieces = np.empty(2 * len(parts) - 1, dtype=object)  # part, word, part, ..., part
    pieces[0::2] = parts
    pieces[1::2] = words
    return orjson.Fragment(b"".join(pieces.tolist()))


def _request_parameters(params: Mapping[str, Any]) -> tuple[float | None, int]:
    """``timeout`` (microseconds; 0 keeps the model's default) and ``priority`` (0 keeps the
    model's default, 1 is the highest), as on gRPC; a sequence cannot be honoured."""
    timeout: float | None = None
    priority = 0
    if "timeout" in params:
        us = _count(params["timeout"], "request parameter 'timeout'")
        timeout = us / 1e6 if us else None
    if "priority" in params:
        priority = _count(params["priority"], "request parameter 'priority'")
    if params.get("sequence_id") not in (None, 0, ""):
        raise Unimplemented(NO_SEQUENCES)
    return timeout, priority
