"""Building requests and parsing responses, with no IO: shared by the sync and async clients."""

from __future__ import annotations

import re
import sys
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import grpc
import numpy as np

from ferry.client._errors import InvalidInputError
from ferry.client._types import (
    BatchingPolicy,
    DurationStat,
    InferResult,
    ModelMetadata,
    ModelStatistics,
    ModelVersionStatus,
    TensorInfo,
    Timings,
)
from ferry.codec import (
    CodecError,
    DataType,
    datatype_from_name,
    datatype_name,
    datatype_of,
    decode_tensor,
    encode_tensor,
    numpy_dtype,
)
from ferry.codec._tensor import unmasked
from ferry.proto.v1 import inference_pb2 as pb

ArrayLike = Any  # numpy arrays, torch tensors, Python scalars and (nested) lists

_STATES = {
    pb.MODEL_STATE_LOADING: "LOADING",
    pb.MODEL_STATE_READY: "READY",
    pb.MODEL_STATE_FAILED: "FAILED",
    pb.MODEL_STATE_UNLOADING: "UNLOADING",
    pb.MODEL_STATE_UNLOADED: "UNLOADED",
}


def as_array(value: ArrayLike, name: str = "", dtype: np.dtype[Any] | None = None) -> np.ndarray:
    """numpy passes through; a torch tensor is converted without importing torch ourselves
    (it is only touched when the caller already has one); anything else goes via np.asarray.

    ``dtype`` (the model's declared type) applies to that last case only: Python lists and
    scalars carry no dtype, and numpy's guess (float64, int64) rarely matches a model's, whereas an
    array's own dtype is the caller's choice. Numbers are cast only where they fit (see
    ``_as_declared``), never float -> int, so a real mismatch is still reported by the server.
    """
    if is_array(value):
        return _within_a_message(unmasked(as_array_fast(value), name), name)
    if isinstance(value, bytearray) or is_bytes_view(value):
        # One BYTES element, as ``bytes`` and a bytearray in a list are (Triton's BYTES: byte
        # strings); numpy read it alone as a UINT8 vector of its byte values, and a stream's
        # resend, which keeps it as bytes, then sent it as BYTES.
        value = bytes(value)
    if isinstance(value, list | tuple):
        _refuse_masked_inside(value, name)
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError) as exc:
        buffers = _with_buffers_as_bytes(value)
        if buffers is None:
            raise CodecError(
                f"input {name!r}: cannot convert {type(value).__name__} to an array: {exc}"
            ) from None
        arr = buffers
    if arr.dtype in (np.uint8, object) and isinstance(value, list | tuple):
        # numpy reads a bytearray (or memoryview) in a list as a row of uint8 numbers:
        # [bytearray(b"ab")] became UINT8 [[97, 98]], not one BYTES element.
        buffers = _with_buffers_as_bytes(value)
        arr = arr if buffers is None else buffers
    if arr.dtype.kind in "iuf" and isinstance(value, list | tuple) and _holds_bool(value, arr):
        # numpy reads [True, 2.0] as [1.0, 2.0]: a bool among numbers is a mistake of the
        # caller's, which the server's JSON reader refuses too (OIP HTTP: true/false among
        # numbers), so the protocols agree on what a list may hold.
        raise CodecError(
            f"input {name!r}: a list of numbers holds True or False (numpy would read it as "
            "1 or 0); give 1 and 0 if that is what you mean"
        )
    if arr.dtype.kind in "US":
        # Built again as Python objects: numpy's fixed-width str/bytes drop trailing NULs, so
        # "ab\x00" went out as b"ab". (An S or U array the caller built is theirs, as sent.)
        arr = np.asarray(value, dtype=object)
    if dtype is not None and dtype.kind in "iu" and arr.dtype.kind in "fO" and arr.size:
        # numpy types a mix of ints past int64 and smaller ones as float64 (or objects):
        # the ints themselves decide, so [2**64 - 1, 0] fits UINT64.
        arr = _ints_as_declared(value, arr, dtype, name)
    if arr.dtype == object:
        # numpy made Python objects of a list it could not type (a None, a ragged row, a
        # number beyond int64): such an array goes out as BYTES, so say what went wrong here
        # rather than "BYTES element 0 must be bytes".
        flat = arr.reshape(-1)
        bad = next((i for i, v in enumerate(flat) if not isinstance(v, str | bytes)), None)
        if bad is not None:
            raise CodecError(
                f"input {name!r}: these values make an array of Python objects, which is "
                f"sent as BYTES, and element {bad} is {type(flat[bad]).__name__}: give numbers "
                "of one type and no None in rows of equal length, or only str/bytes for a "
                "BYTES input"
            )
    elif dtype is not None and arr.dtype != dtype:
        arr = _as_declared(arr, dtype, name)
    return _within_a_message(arr, name)


_BYTE_FORMATS = frozenset({"B", "b", "c"})  # a memoryview of bytes (of bytes(), bytearray)


def is_bytes_view(value: Any) -> bool:
    """Whether ``value`` is a 1-d memoryview of bytes: one of ``bytes`` or a bytearray, or of
    chars. Its format alone does not say: a numpy int8/uint8 array's or an array.array's view
    has format 'b'/'B' too, and by it went out as one BYTES element, not its numbers."""
    if not isinstance(value, memoryview) or value.ndim > 1 or value.format not in _BYTE_FORMATS:
        return False
    return value.format == "c" or isinstance(value.obj, bytes | bytearray)


_PLAIN = frozenset({float, int, bool, str, bytes})  # list elements that hide nothing


def _holds_bool(value: list[Any] | tuple[Any, ...], arr: np.ndarray) -> bool:
    """Whether a bool is among the list's numbers. numpy read each as 1 or 0, so with no 0 or
    1 in ``arr`` there is none, and the walk over every element is skipped."""
    if arr.size == 0 or not ((arr == 0) | (arr == 1)).any():
        return False
    stack: list[Any] = [value]
    while stack:
        for element in stack.pop():
            if isinstance(element, bool | np.bool_):
                return True
            if isinstance(element, list | tuple):
                stack.append(element)
    return False


def _refuse_masked_inside(value: list[Any] | tuple[Any, ...], name: str) -> None:
    """Refuse a list holding a masked array (or ``np.ma.masked``) with something masked: numpy
    reads a list of masked arrays as their values, the masked ones included, and the masked
    constant as nan, so the model answered for values its caller had masked out. Plain
    numbers are passed over by their type alone (a list of a million is walked)."""
    stack: list[list[Any] | tuple[Any, ...]] = [value]
    while stack:
        for element in stack.pop():
            if type(element) in _PLAIN:
                continue
            if isinstance(element, list | tuple):
                stack.append(element)
            elif isinstance(element, np.ma.MaskedArray):
                unmasked(element, name)


def _with_buffers_as_bytes(value: ArrayLike) -> np.ndarray | None:
    """``value`` as an object array with each bytearray/memoryview in its lists made ``bytes``;
    None when it holds none (numpy's reading of the list stands)."""
    found = False

    def walk(v: Any, depth: int) -> Any:
        nonlocal found
        if isinstance(v, bytearray) or is_bytes_view(v):
            found = True
            return bytes(v)
        if isinstance(v, list | tuple) and depth < _MAX_DIMS:
            return [walk(x, depth + 1) for x in v]
        return v

    converted = walk(value, 0)
    if not found:
        return None
    try:
        return np.asarray(converted, dtype=object)
    except (TypeError, ValueError):
        return None


_MAX_DIMS = 64  # numpy's own limit on an array's dimensions


def _ints_as_declared(
    value: ArrayLike, arr: np.ndarray, dtype: np.dtype[Any], name: str
) -> np.ndarray:
    """``value``'s Python ints in ``dtype`` when every element is an int within its range;
    ``arr`` (numpy's reading of it) unchanged when some element is not an int."""
    try:
        values = np.asarray(value, dtype=object).reshape(-1).tolist()
    except (TypeError, ValueError):
        return arr
    if not all(type(v) is int for v in values):
        return arr
    _check_int_range(min(values), max(values), dtype, name)
    return np.array(values, dtype=dtype).reshape(arr.shape)


def _check_int_range(low: Any, high: Any, dtype: np.dtype[Any], name: str) -> None:
    info = np.iinfo(dtype)
    if low < info.min or high > info.max:
        worst = low if low < info.min else high
        raise CodecError(
            f"input {name!r}: {worst} is out of the model's {dtype} range {info.min}..{info.max}"
        )


def _as_declared(arr: np.ndarray, dtype: np.dtype[Any], name: str) -> np.ndarray:
    """The list's numbers in the model's type, or CodecError when a number does not fit: a
    plain cast wraps (300 as INT8 was 44, 2**40 + 7 as INT32 was 7) or overflows (1e6 as FP16
    was inf), and the model answered for numbers nobody sent. Integers fit an unsigned type
    when they are in its range (a list is int64 to numpy, which no same-kind cast makes UINT8).
    A float never becomes an integer here: that mismatch is the server's to report."""
    if arr.size == 0:  # [] is float64 to numpy: no number to judge
        return arr.astype(dtype)
    if dtype.kind in "iu" and arr.dtype.kind in "iub":
        _check_int_range(arr.min(), arr.max(), dtype, name)
        return arr.astype(dtype)
    bf16 = dtype.kind == "V" and datatype_of(dtype) == DataType.DATA_TYPE_BF16
    if (dtype.kind == "f" or bf16) and arr.dtype.kind in "iubf":
        with np.errstate(over="ignore"):
            cast = arr.astype(dtype)
        if arr.dtype.kind == "f" or dtype.itemsize < 4:
            # bfloat16 (ml_dtypes) is judged through float32, which holds every value of it.
            overflow = np.isfinite(arr) & ~np.isfinite(cast.astype(np.float32) if bf16 else cast)
            if overflow.any():
                worst = arr[overflow].flat[0]
                largest = _BF16_MAX if bf16 else float(np.finfo(dtype).max)
                raise CodecError(
                    f"input {name!r}: {worst} is out of the model's {dtype} range "
                    f"(largest {largest:g})"
                )
        return cast
    return arr


# The largest finite bfloat16: float32's exponent range, 8 significant bits.
_BF16_MAX = float.fromhex("0x1.fep127")


# A protobuf message carries at most 2 GiB, so no one tensor of a request can be larger.
MAX_TENSOR_BYTES = 2**31 - 1


def _within_a_message(arr: np.ndarray, name: str) -> np.ndarray:
    """Refuse an input no message can carry before copying it: an array of 2**40 elements
    viewing a few bytes (np.broadcast_to, as_strided) raised MemoryError from its copy."""
    if arr.nbytes > MAX_TENSOR_BYTES:
        raise CodecError(
            f"input {name!r} is {arr.nbytes:,} bytes ({arr.size:,} elements of {arr.dtype}); one "
            f"gRPC message carries at most {MAX_TENSOR_BYTES:,}: send fewer rows per request"
        )
    return arr


def is_array(value: ArrayLike) -> bool:
    """A numpy array, or a torch tensor when the caller has imported torch."""
    if isinstance(value, np.ndarray):
        return True
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def as_array_fast(value: ArrayLike) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    return _from_torch(value)


def _from_torch(tensor: Any) -> np.ndarray:
    """A torch tensor's values. bfloat16 goes by its bits, since numpy has no bfloat16 of its
    own and torch's ``.numpy()`` refuses it; a tensor torch cannot give numpy (sparse, meta,
    quantized) is the caller's CodecError, not torch's own TypeError."""
    t = tensor.detach()
    try:
        if str(t.dtype) == "torch.bfloat16":
            bf16 = numpy_dtype(DataType.DATA_TYPE_BF16)  # CodecError without ml_dtypes
            torch = sys.modules["torch"]  # the caller's: this module never imports it
            return t.cpu().view(torch.int16).numpy().view(bf16)  # type: ignore[no-any-return]
        return t.cpu().numpy()  # type: ignore[no-any-return]
    except (TypeError, RuntimeError, NotImplementedError) as exc:
        raise CodecError(
            f"cannot take the values of a torch tensor of dtype {t.dtype} and layout "
            f"{t.layout}: {str(exc).splitlines()[0][:200]}; give a dense CPU-convertible tensor "
            "or a numpy array"
        ) from None


def needs_dtypes(inputs: Mapping[str, ArrayLike], model: object, version: object) -> bool:
    """Whether some input is a list or scalar, whose dtype must come from the model. False for
    arguments of the wrong kind, so that ``check_request`` refuses them next with
    InvalidInputError, before a metadata call fails on them (AttributeError, TypeError)."""
    if not isinstance(inputs, Mapping) or all(is_array(v) for v in inputs.values()):
        return False
    if not isinstance(model, str) or (not model.isascii() and not _encodable(model)):
        return False
    try:  # the version rule encoding applies later, here first
        check_request_numbers(version, None, 0)  # type: ignore[arg-type]
    except InvalidInputError:
        return False
    return True


def _encodable(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:  # a lone surrogate
        return False
    return True


# The server's refusal of an input sent in another datatype than the model declares: "model 'm'
# version 2: input 'input' must be INT64, got FP32" (server core/inputs.py; pinned by
# tests/integration/test_infer.py), the input named by its repr; and this module's of a list
# number out of the declared type's range ("input 'input': 1e5 is out of the model's float16
# range"), which the type a new default version declares may hold. A shape, a name or a batch
# size is worded otherwise.
_SERVER_REFUSAL = re.compile(
    r"\binput (?P<name>'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\") "
    r"must be (?P<want>[A-Z][A-Z0-9]*), got "
)
_LOCAL_REFUSAL = re.compile(r"\binput .+ is out of the model's \w+ range")


def refuses_datatype(error: object, used: Mapping[str, np.dtype[Any]] | None = None) -> bool:
    """Whether ``error`` refuses an input's datatype (the server's refusal, or this client's of a
    list number the declared type cannot hold): the refusals that dtypes fetched again can
    cure, when list inputs were converted to a stale cached dtype. Any other refusal (a wrong
    shape, a missing input) stands as it is, with no metadata call; so does one of an input
    that ``used`` (the dtypes the lists were converted to) gave the very type the server
    wants: its values were of another (floats for an integer input, sent as they are)."""
    if not isinstance(error, InvalidInputError):
        return False
    if _LOCAL_REFUSAL.search(error.message):
        return True
    m = _SERVER_REFUSAL.search(error.message)
    if m is None:
        return False
    for name, dtype in (used or {}).items():
        if repr(name) == m["name"] and _datatype_name(dtype) == m["want"]:
            return False
    return True


def _datatype_name(dtype: np.dtype[Any]) -> str:
    try:
        return datatype_name(datatype_of(dtype))
    except (ValueError, CodecError):
        return ""


def input_dtypes(meta: ModelMetadata) -> dict[str, np.dtype[Any]]:
    """Declared numpy dtype per input, for :func:`as_array`. BYTES is left out (lists of
    str/bytes already become BYTES), and so is BF16 when ml_dtypes is missing: numpy has no
    bfloat16 of its own. With ml_dtypes a list for a BF16 input is sent as BF16; it went out as
    FP64, which the server refused."""
    out: dict[str, np.dtype[Any]] = {}
    for t in meta.inputs:
        if t.datatype == "BYTES":
            continue
        try:
            out[t.name] = numpy_dtype(datatype_from_name(t.datatype))
        except CodecError:  # BF16 without ml_dtypes; a name this SDK does not know
            continue
    return out


_INT64 = (-(2**63), 2**63 - 1)
# About 31 years. gRPC's deadline is nanoseconds since the epoch in an int64: past ~7e9 s it
# overflowed and a call with timeout=1e10 failed at once with DEADLINE_EXCEEDED.
MAX_TIMEOUT_S = 1e9


def check_request(
    model: object,
    inputs: object,
    outputs: object,
    request_id: object,
    numbers: tuple[int | None, float | None, int],
) -> int:
    """Refuse arguments of the wrong kind with InvalidInputError (they raised AttributeError
    from deep inside, and ``outputs="logits"`` was taken as six one-letter names), then the
    numbers (version, timeout, priority); returns ``timeout`` in microseconds (0: none)."""
    if not isinstance(model, str):
        raise InvalidInputError(f"model must be a name (str), got {type(model).__name__}")
    if not isinstance(inputs, Mapping):
        raise InvalidInputError(
            f"inputs must be a mapping of input name -> array, got {type(inputs).__name__}"
        )
    for name in inputs:
        if not isinstance(name, str):
            raise InvalidInputError(f"input names must be str, got {name!r}"[:200])
    if outputs is not None and (
        isinstance(outputs, str | bytes)
        or not isinstance(outputs, Sequence)
        or not all(isinstance(o, str) for o in outputs)
    ):
        raise InvalidInputError(f"outputs must be a list of output names, got {outputs!r}"[:200])
    if not isinstance(request_id, str):
        raise InvalidInputError(f"request_id must be a str, got {type(request_id).__name__}")
    return check_request_numbers(*numbers)


def _named(exc: CodecError, inputs: Mapping[str, object]) -> str:
    """The codec's message, with the input it is about when it does not say (a dtype the wire
    has no type for is judged on the array alone)."""
    text = str(exc)
    if text.startswith("input ") or len(inputs) != 1:
        return text
    return f"input {next(iter(inputs))!r}: {text}"


def check_request_numbers(version: int | None, timeout: float | None, priority: int) -> int:
    """Refuse what the wire cannot carry; returns ``timeout`` in microseconds (0: none).

    The message's fields are int64 (version), uint64 (timeout_us) and uint32 (priority). The
    hand-written encoder would mask a value out of range to 64 bits, so ``version=2**64`` became
    version 0 (the default) and ``priority=2**40`` the default priority: a request answered by
    something else than it asked for. protobuf's own classes raise a bare ValueError."""
    if version is not None and (
        isinstance(version, bool)
        or not isinstance(version, int)
        or not _INT64[0] <= version <= _INT64[1]
    ):
        raise InvalidInputError(f"version must be an int64 (a positive integer), got {version!r}")
    if isinstance(priority, bool) or not isinstance(priority, int) or not 0 <= priority < 2**32:
        raise InvalidInputError(f"priority must be an integer within 0..2**32-1, got {priority!r}")
    seconds = check_timeout(timeout)
    # At least 1 µs: a budget under a microsecond truncated to 0, the wire's "no deadline".
    return 0 if seconds is None else max(1, int(seconds * 1e6))


def check_timeout(timeout: object, error: type[Exception] = InvalidInputError) -> float | None:
    """None (no deadline) or a finite number of seconds > 0, the same for every call and client.

    Zero meant "no deadline" on a stream's request and "already late" on a unary call (grpc's
    meaning), so ``timeout=0`` is refused everywhere rather than guessed. The bound is
    MAX_TIMEOUT_S. ``error``: InvalidInputError for a call, ValueError for a client."""
    if timeout is None:
        return None
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not 0 < timeout < MAX_TIMEOUT_S
    ):
        raise error(
            # The bound is said: 1e10 is finite and > 0, and "must be finite > 0" left its
            # caller guessing.
            f"timeout must be a finite number of seconds > 0 and below {MAX_TIMEOUT_S:g} "
            "(about 31 years), or None for no deadline; "
            f"got {timeout!r}"
        )
    return float(timeout)


M = TypeVar("M")


def request(cls: Callable[..., M], **fields: Any) -> M:
    """``cls(**fields)``, a request message built from a caller's arguments. protobuf refuses
    a value its field cannot hold with its own ValueError ("Value out of range: 2**64", for a
    version) or TypeError ("bad argument type for built-in operation", for a model given as an
    int): raised from the SDK's calls as such, they named neither the call nor the argument."""
    try:
        return cls(**fields)
    except (ValueError, TypeError) as exc:
        given = ", ".join(f"{k}={v!r}" for k, v in fields.items())
        name = getattr(cls, "__name__", "request")
        raise InvalidInputError(f"{name}({given}): {exc}"[:500]) from None


def new_request_id() -> str:
    return uuid.uuid4().hex


def build_infer_request(
    model: str,
    inputs: Mapping[str, ArrayLike],
    *,
    version: int | None = None,
    outputs: Sequence[str] | None = None,
    timeout: float | None = None,
    priority: int = 0,
    request_id: str = "",
    dtypes: Mapping[str, np.dtype[Any]] | None = None,
) -> pb.InferRequest:
    """``dtypes``: the model's input dtypes, applied to list and scalar inputs (see as_array)."""
    timeout_us = check_request(model, inputs, outputs, request_id, (version, timeout, priority))
    try:
        tensors = [
            encode_tensor(name, as_array(value, name, dtypes.get(name) if dtypes else None))
            for name, value in inputs.items()
        ]
        return pb.InferRequest(
            model=model,
            version=version or 0,
            id=request_id,
            inputs=tensors,
            outputs=list(outputs or ()),
            timeout_us=timeout_us,
            priority=priority,
        )
    except CodecError as exc:  # an input the wire cannot carry: the caller's to fix
        raise InvalidInputError(_named(exc, inputs)) from None
    except UnicodeEncodeError as exc:  # a name with a lone surrogate
        raise InvalidInputError(f"a name is not encodable as UTF-8: {exc.reason}") from None


def parse_infer_response(resp: pb.InferResponse, timings: Timings | None = None) -> InferResult:
    outputs = {t.name: decode_tensor(t) for t in resp.outputs}
    return InferResult(outputs, model=resp.model, version=resp.version, id=resp.id, timings=timings)


_STATUS_CODES = {code.value[0]: code for code in grpc.StatusCode}


def status_code(value: int) -> grpc.StatusCode | None:
    """The grpc.StatusCode for a google.rpc.Code number, as streams carry it; None if unknown."""
    return _STATUS_CODES.get(value)


def _tensor_info(t: Any) -> TensorInfo:
    return TensorInfo(t.name, datatype_name(t.dtype), tuple(t.shape))


def parse_metadata(m: pb.ModelMetadata) -> ModelMetadata:
    b = m.batching
    return ModelMetadata(
        name=m.name,
        version=m.version,
        versions=tuple(m.versions),
        default_version=m.default_version,
        platform=m.platform,
        inputs=tuple(_tensor_info(t) for t in m.inputs),
        outputs=tuple(_tensor_info(t) for t in m.outputs),
        batching=BatchingPolicy(
            max_batch_size=b.max_batch_size,
            max_queue_delay=b.max_queue_delay_us / 1e6,
            max_queue_size=b.max_queue_size,
            default_timeout=b.default_timeout_us / 1e6 if b.default_timeout_us else None,
            instance_count=b.instance_count,
            device_ids=tuple(b.device_ids),
            combine_requests=not b.requests_run_alone,
            run_alone_reason=b.run_alone_reason,
            default_priority=b.default_priority,
        ),
    )


def parse_list_models(resp: pb.ListModelsResponse) -> list[ModelVersionStatus]:
    return [
        ModelVersionStatus(
            m.name, m.version, _STATES.get(m.state, "UNKNOWN"), m.reason, m.is_default
        )
        for m in resp.models
    ]


def _dur(d: pb.Duration) -> DurationStat:
    return DurationStat(d.count, d.ns)


def parse_statistics(resp: pb.GetModelStatisticsResponse) -> list[ModelStatistics]:
    return [
        ModelStatistics(
            name=s.name,
            version=s.version,
            last_inference_ms=s.last_inference_ms,
            inference_count=s.inference_count,
            execution_count=s.execution_count,
            success=_dur(s.success),
            fail=_dur(s.fail),
            queue=_dur(s.queue),
            compute_input=_dur(s.compute_input),
            compute_infer=_dur(s.compute_infer),
            compute_output=_dur(s.compute_output),
            batch_sizes={b.batch_size: b.compute_infer.count for b in s.batch_stats},
            rejected_count=s.rejected_count,
            expired_count=s.expired_count,
            queue_depth=s.queue_depth,
            planned_executions={p.batch_size: p.execution_count for p in s.planned},
            plan_changes=s.plan_changes,
            device_executions={d.device_id: d.execution_count for d in s.devices},
        )
        for s in resp.models
    ]
