"""Building requests and parsing responses, with no IO: shared by the sync and async clients."""

from __future__ import annotations

import functools
import sys
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import grpc
import numpy as np

from ferry.client._errors import FerryError, ServerError, from_status
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
    datatype_from_name,
    datatype_name,
    datatype_of,
    decode_tensor,
    encode_tensor,
    from_bytes,
    numpy_dtype,
    to_bytes,
)
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
    array's own dtype is the caller's choice. Only same-kind casts are made (float64 -> float32,
    int -> float), never float -> int, so a real mismatch is still reported by the server.
    """
    if is_array(value):
        return as_array_fast(value)
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError) as exc:
        raise CodecError(
            f"input {name!r}: cannot convert {type(value).__name__} to an array: {exc}"
        ) from None
    if arr.dtype.kind == "U":
        arr = arr.astype(object)
    elif dtype is not None and arr.dtype != dtype and np.can_cast(arr.dtype, dtype, "same_kind"):
        arr = arr.astype(dtype)
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
    return value.detach().cpu().numpy()  # type: ignore[no-any-return]


def needs_dtypes(inputs: Mapping[str, ArrayLike]) -> bool:
    """Whether some input is a list or scalar, whose dtype must come from the model."""
    return not all(is_array(v) for v in inputs.values())


def input_dtypes(meta: ModelMetadata) -> dict[str, np.dtype[Any]]:
    """Declared numpy dtype per input, for :func:`as_array`; BYTES and BF16 are left out (lists
    of str/bytes already become BYTES; bfloat16 needs ml_dtypes)."""
    return {
        t.name: numpy_dtype(datatype_from_name(t.datatype))
        for t in meta.inputs
        if t.datatype not in ("BYTES", "BF16")
    }


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
    if dtypes:
        tensors = [
            encode_tensor(name, as_array(value, name, dtypes.get(name)))
            for name, value in inputs.items()
        ]
    else:
        tensors = [encode_tensor(name, as_array(value, name)) for name, value in inputs.items()]
    return pb.InferRequest(
        model=model,
        version=version or 0,
        id=request_id,
        inputs=tensors,
        outputs=list(outputs or ()),
        timeout_us=int(timeout * 1e6) if timeout else 0,
        priority=priority,
    )


_MASK64 = (1 << 64) - 1


def _varint(n: int) -> bytes:
    """Protobuf base-128 varint; negative int64 values take their 10-byte two's complement."""
    n &= _MASK64
    if n < 0x80:
        return bytes((n,))
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _text(key: bytes, value: str) -> list[bytes]:
    raw = value.encode("utf-8")
    return [key, _varint(len(raw)), raw]


_LITTLE_ENDIAN_HOST = sys.byteorder == "little"
_KEY1, _KEY2, _KEY3, _KEY4 = b"\x0a", b"\x10", b"\x1a", b"\x22"  # fields 1..4, as used below
_KEY5, _KEY6, _KEY7 = b"\x2a", b"\x30", b"\x38"


# dtype -> DataType for the dtypes whose memory is already the wire layout (fixed size, little-
# endian or single-byte); filled on first sight, so the per-request check is one dict lookup.
_WIRE_READY: dict[np.dtype[Any], int | None] = {}


def _wire_code(dtype: np.dtype[Any]) -> int | None:
    code = _WIRE_READY.get(dtype, -1)
    if code == -1:
        order = dtype.byteorder
        ready = dtype.kind in "biuf" and (order in "<|" or (order == "=" and _LITTLE_ENDIAN_HOST))
        code = _WIRE_READY[dtype] = datatype_of(dtype) if ready else None
    return code


def _payload(array: np.ndarray) -> tuple[int, tuple[int, ...], bytes | memoryview]:
    """(DataType, shape, raw bytes) with no copy when the array's memory is already the wire
    layout (C-contiguous, little-endian, fixed size); otherwise the codec's one-copy path."""
    code = _wire_code(array.dtype)
    if code is not None and array.flags.c_contiguous:
        try:
            return code, array.shape, memoryview(array).cast("B")  # type: ignore[arg-type]
        except (TypeError, ValueError):  # a buffer format memoryview cannot cast
            pass
    wire_code, shape, data = to_bytes(array)
    return wire_code, tuple(shape), data


@functools.lru_cache(maxsize=1024)
def _tensor_head(name: str, code: int, shape: tuple[int, ...]) -> bytes:
    """A ``Tensor``'s fields 1 name, 2 dtype and 3 packed shape; the same few recur, so cached."""
    meta: list[bytes] = _text(_KEY1, name) if name else []
    if code:
        meta += [_KEY2, _varint(code)]
    if shape:
        dims = b"".join([_varint(d) for d in shape])
        meta += [_KEY3, _varint(len(dims)), dims]
    return b"".join(meta)


def _tensor(name: str, array: np.ndarray) -> list[bytes | memoryview]:
    """One ``Tensor`` framed as field 4 of ``InferRequest``; the data is referenced, not copied."""
    code, shape, data = _payload(array)
    head = _tensor_head(name, code, shape)
    size = len(data) if isinstance(data, bytes) else data.nbytes
    if size:
        size_head = _varint(size)
        total = len(head) + 1 + len(size_head) + size
        return [_KEY4, _varint(total), head, _KEY4, size_head, data]
    return [_KEY4, _varint(len(head)), head]


def encode_infer_request(
    model: str,
    inputs: Mapping[str, ArrayLike],
    *,
    version: int | None = None,
    outputs: Sequence[str] | None = None,
    timeout: float | None = None,
    priority: int = 0,
    request_id: str = "",
    dtypes: Mapping[str, np.dtype[Any]] | None = None,
) -> bytes:
    """The serialized ``InferRequest``: the same bytes as ``build_infer_request(...)
    .SerializeToString()``, made with a single copy of each tensor's data, from the array's memory
    straight into the message.

    Why by hand: through protobuf objects a tensor is copied three times (``tobytes``, into the
    message's arena, out again when serializing), each time into a fresh allocation, and for a
    600 KB image that is most of the client's cost. The format is seven plain fields; the tests
    check byte-equality with protobuf's own serialization.
    """
    parts: list[bytes | memoryview] = []
    if model:
        parts += _text(_KEY1, model)
    if version:
        parts += [_KEY2, _varint(version)]
    if request_id:
        parts += _text(_KEY3, request_id)
    for name, value in inputs.items():
        parts += _tensor(name, as_array(value, name, dtypes.get(name) if dtypes else None))
    for out in outputs or ():
        parts += _text(_KEY5, out)
    timeout_us = int(timeout * 1e6) if timeout else 0
    if timeout_us:
        parts += [_KEY6, _varint(timeout_us)]
    if priority:
        parts += [_KEY7, _varint(priority)]
    return b"".join(parts)


def _read_varint(buf: bytes, i: int) -> tuple[int, int]:
    b = buf[i]
    if b < 0x80:
        return b, i + 1
    result, shift = b & 0x7F, 7
    i += 1
    while True:
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, i
        shift += 7
        if shift > 63:
            raise CodecError("malformed response: a varint runs past 10 bytes")


def _signed(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _skip(buf: bytes, i: int, wire: int) -> int:
    """Past a field we do not read (a newer server may send more)."""
    if wire == 0:
        return _read_varint(buf, i)[1]
    if wire == 1:
        return i + 8
    if wire == 5:
        return i + 4
    if wire == 2:
        length, i = _read_varint(buf, i)
        return i + length
    raise CodecError(f"malformed response: unsupported wire type {wire}")


def _decode_tensor(buf: bytes, mv: memoryview, i: int, end: int) -> tuple[str, np.ndarray]:
    """A ``Tensor`` (1 name, 2 dtype, 3 shape, 4 data) in ``buf[i:end]``. The hot path reads
    whole key bytes and one-byte varints inline: every call here is per response."""
    name, dtype, shape = "", 0, []
    data = None
    while i < end:
        key = buf[i]
        i += 1
        if key in (0x10, 0x18):  # dtype, or an unpacked shape entry
            v = buf[i]
            if v < 0x80:
                i += 1
            else:
                v, i = _read_varint(buf, i)
            if key == 0x10:
                dtype = v
            else:
                shape.append(_signed(v))
        elif key in (0x0A, 0x1A, 0x22):  # name, packed shape, data
            n = buf[i]
            if n < 0x80:
                i += 1
            else:
                n, i = _read_varint(buf, i)
            j = i + n
            if key == 0x22:
                data = mv[i:j]
            elif key == 0x0A:
                name = buf[i:j].decode("utf-8")
            else:
                while i < j:
                    d = buf[i]
                    if d < 0x80:
                        i += 1
                    else:
                        d, i = _read_varint(buf, i)
                        d = _signed(d)
                    shape.append(d)
            i = j
        else:  # a field this client does not know: skip it
            if key >= 0x80:
                key, i = _read_varint(buf, i - 1)
            i = _skip(buf, i, key & 7)
    if i != end:
        raise CodecError(f"malformed response: tensor {name!r} overruns its message")
    # A view of the received bytes: no copy, and read-only (it keeps the message alive).
    view: Any = mv[0:0] if data is None else data  # from_bytes reads any buffer
    return name, from_bytes(dtype, shape, view, name=name)


def _decode_response(
    buf: bytes, mv: memoryview, i: int, end: int, timings: Timings | None
) -> InferResult:
    """An ``InferResponse`` (1 model, 2 version, 3 id, 4 outputs) in ``buf[i:end]``."""
    model = rid = ""
    version = 0
    outputs: dict[str, np.ndarray] = {}
    try:
        while i < end:
            key = buf[i]
            i += 1
            if key in (0x22, 0x0A, 0x1A):  # outputs, model, id
                n = buf[i]
                if n < 0x80:
                    i += 1
                else:
                    n, i = _read_varint(buf, i)
                j = i + n
                if j > end:
                    raise CodecError("malformed response: a field runs past the message")
                if key == 0x22:
                    name, array = _decode_tensor(buf, mv, i, j)
                    outputs[name] = array
                elif key == 0x0A:
                    model = buf[i:j].decode("utf-8")
                else:
                    rid = buf[i:j].decode("utf-8")
                i = j
            elif key == 0x10:
                v, i = _read_varint(buf, i)
                version = _signed(v)
            else:
                if key >= 0x80:
                    key, i = _read_varint(buf, i - 1)
                i = _skip(buf, i, key & 7)
    except (IndexError, UnicodeDecodeError) as exc:
        raise CodecError(f"malformed response: {exc}") from None
    if i != end:
        raise CodecError("malformed response: the last field runs past the message")
    return InferResult(outputs, model=model, version=version, id=rid, timings=timings)


def decode_infer_response(raw: bytes, timings: Timings | None = None) -> InferResult:
    """An ``InferResponse`` straight from the bytes gRPC received, equal to
    ``parse_infer_response(InferResponse.FromString(raw))`` but with outputs that are views of
    ``raw`` itself: protobuf would copy each output twice (into its arena, then out of it)."""
    return _decode_response(raw, memoryview(raw), 0, len(raw), timings)


def decode_stream_response(raw: bytes) -> tuple[str, InferResult | FerryError]:
    """An ``InferStreamResponse`` from its bytes: the request id and its result or error."""
    mv = memoryview(raw)
    rid, i, end = "", 0, len(raw)
    answer: InferResult | FerryError | None = None
    try:
        while i < end:
            key, i = _read_varint(raw, i)
            field, wire = key >> 3, key & 7
            if wire == 2 and field in (1, 2, 3):
                length, i = _read_varint(raw, i)
                j = i + length
                if j > end:
                    raise CodecError("malformed stream answer: a field runs past the message")
                if field == 1:
                    rid = raw[i:j].decode("utf-8")
                elif field == 2:
                    answer = _decode_response(raw, mv, i, j, None)
                else:
                    err = pb.Error.FromString(raw[i:j])
                    answer = from_status(status_code(err.code), err.message, err.kind)
                i = j
            else:
                i = _skip(raw, i, wire)
    except (IndexError, UnicodeDecodeError) as exc:
        raise CodecError(f"malformed stream answer: {exc}") from None
    if answer is None:
        answer = ServerError(
            f"stream answer for request {rid!r} carries neither a result nor an error"
        )
    return rid, answer


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
        )
        for s in resp.models
    ]


def channel_options(
    max_message_bytes: int, extra: Sequence[tuple[str, Any]] = ()
) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        *extra,
    ]
