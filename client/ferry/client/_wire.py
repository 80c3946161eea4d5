"""The ferry.v1 Infer messages, encoded and decoded by hand on the hot path.

protobuf's Python objects copy tensor bytes into and out of every message (and again on
serialize and parse). Here a request is written straight from the arrays' memory and a response's
tensors are read as zero-copy views of the received bytes, which takes the SDK's cost per request
from hundreds of microseconds to tens for large tensors. The bytes are exactly what protobuf
would produce and accept (tests compare both ways); everything else uses the generated classes.
The framing itself (varints, tensors) is ``ferry.codec._wire``, which the server shares for its
responses.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from google.protobuf.message import DecodeError

from ferry.client._errors import FerryError, InvalidInputError, ServerError, from_status
from ferry.client._requests import ArrayLike, _named, as_array, check_request, status_code
from ferry.client._types import InferResult, Timings
from ferry.codec import CodecError, from_bytes
from ferry.codec._wire import encode_varint, tensor_field, text_field
from ferry.proto.v1 import inference_pb2 as pb

__all__ = [
    "decode_infer_response",
    "decode_stream_response",
    "encode_infer_request",
    "read_varint",
    "request_inputs",
    "with_timeout",
]

_KEY1, _KEY2, _KEY3, _KEY4 = b"\x0a", b"\x10", b"\x1a", b"\x22"  # fields 1..4, as used below
_KEY5, _KEY6, _KEY7 = b"\x2a", b"\x30", b"\x38"


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
    timeout_us = check_request(model, inputs, outputs, request_id, (version, timeout, priority))
    parts: list[bytes | memoryview] = []
    try:
        if model:
            parts += text_field(_KEY1, model)
        if version:
            parts += [_KEY2, encode_varint(version)]
        if request_id:
            parts += text_field(_KEY3, request_id)
        for name, value in inputs.items():
            array = as_array(value, name, dtypes.get(name) if dtypes else None)
            parts += tensor_field(_KEY4, name, array)  # the data referenced, not copied
        for out in outputs or ():
            parts += text_field(_KEY5, out)
    except CodecError as exc:  # an input the wire cannot carry: the caller's to fix
        raise InvalidInputError(_named(exc, inputs)) from None
    except UnicodeEncodeError as exc:  # a name with a lone surrogate
        raise InvalidInputError(f"a name is not encodable as UTF-8: {exc.reason}") from None
    if timeout_us:
        parts += [_KEY6, encode_varint(timeout_us)]
    if priority:
        parts += [_KEY7, encode_varint(priority)]
    return b"".join(parts)


def with_timeout(request: bytes, seconds: float) -> bytes:
    """``request`` (a serialized ``InferRequest``) with its ``timeout_us`` set to ``seconds``.

    The field is appended, not rewritten: protobuf takes the last value of a field that is not
    repeated, so the server reads this one, and the tensors are not encoded again (one copy of
    the message, made only for a request that waited before it could be sent)."""
    return b"".join((request, _KEY6, encode_varint(max(1, int(seconds * 1e6)))))


def read_varint(buf: bytes, i: int) -> tuple[int, int]:
    """The varint at ``buf[i]`` and the index past it. A truncated one raises IndexError (the
    callers turn that into their own malformed-message error); one over 10 bytes, CodecError."""
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
        return read_varint(buf, i)[1]
    if wire == 1:
        return i + 8
    if wire == 5:
        return i + 4
    if wire == 2:
        length, i = read_varint(buf, i)
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
                v, i = read_varint(buf, i)
            if key == 0x10:
                dtype = v
            else:
                shape.append(_signed(v))
        elif key in (0x0A, 0x1A, 0x22):  # name, packed shape, data
            n = buf[i]
            if n < 0x80:
                i += 1
            else:
                n, i = read_varint(buf, i)
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
                        d, i = read_varint(buf, i)
                        d = _signed(d)
                    shape.append(d)
            i = j
        else:  # a field this client does not know: skip it
            if key >= 0x80:
                key, i = read_varint(buf, i - 1)
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
                    n, i = read_varint(buf, i)
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
                v, i = read_varint(buf, i)
                version = _signed(v)
            else:
                if key >= 0x80:
                    key, i = read_varint(buf, i - 1)
                i = _skip(buf, i, key & 7)
    except (IndexError, UnicodeDecodeError) as exc:
        raise CodecError(f"malformed response: {exc}") from None
    if i != end:
        raise CodecError("malformed response: the last field runs past the message")
    return InferResult(outputs, model=model, version=version, id=rid, timings=timings)


def decode_infer_response(raw: bytes, timings: Timings | None = None) -> InferResult:
    """An ``InferResponse`` straight from the bytes gRPC received, equal to
    ``parse_infer_response(InferResponse.FromString(raw))`` but with outputs that are views of
    ``raw`` itself: protobuf would copy each output twice (into its arena, then out of it).

    An answer this client cannot read (a server or proxy that sent other bytes) is ServerError,
    a FerryError as every SDK exception is, rather than the codec's own error."""
    try:
        return _decode_response(raw, memoryview(raw), 0, len(raw), timings)
    except CodecError as exc:
        raise ServerError(f"the server's answer cannot be read: {exc}") from None


def request_inputs(request: bytes) -> dict[str, np.ndarray]:
    """The input tensors of an ``InferRequest`` this module encoded, as read-only views of its
    bytes. Its fields 1-4 (model, version, id, tensors) are laid out as an ``InferResponse``'s,
    and the rest (outputs, timeout, priority) are skipped as unknown fields are."""
    return dict(_decode_response(request, memoryview(request), 0, len(request), None))


def decode_stream_response(raw: bytes) -> tuple[str, InferResult | FerryError]:
    """An ``InferStreamResponse`` from its bytes: the request id and its result or error."""
    mv = memoryview(raw)
    rid, i, end = "", 0, len(raw)
    answer: InferResult | FerryError | None = None
    try:
        while i < end:
            key, i = read_varint(raw, i)
            field, wire = key >> 3, key & 7
            if wire == 2 and field in (1, 2, 3):
                length, i = read_varint(raw, i)
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
    except (IndexError, UnicodeDecodeError, DecodeError) as exc:
        text = f"the server's answer cannot be read: malformed stream answer: {exc}"
        raise ServerError(text) from None
    except CodecError as exc:
        raise ServerError(f"the server's answer cannot be read: {exc}") from None
    if answer is None:
        answer = ServerError(
            f"stream answer for request {rid!r} carries neither a result nor an error"
        )
    return rid, answer
