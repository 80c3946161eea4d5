"""Protobuf framing written by hand for the hot messages, shared by the SDK and the server.

Through protobuf's Python objects a tensor is copied three times on the way out (``tobytes``,
into the message, again when serializing), each copy a fresh allocation, and every field is a
Python object. Here a message is a list of byte strings joined once: each tensor's data is
copied exactly once, from the array's memory into the message. The SDK frames its requests with
these functions and the server its responses (``ferry.v1`` and the Open Inference Protocol); the
tests compare every encoder byte for byte with protobuf's own serialization.

Only numpy and the codec are imported, so the light SDK can use this module and the server can
share it without the SDK ever importing the server.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

from ferry.codec._dtypes import datatype_name, datatype_of
from ferry.codec._tensor import to_bytes

_MASK64 = (1 << 64) - 1
_LITTLE_ENDIAN_HOST = sys.byteorder == "little"

Chunk = bytes | memoryview


def encode_varint(n: int) -> bytes:
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


def text_field(key: bytes, value: str) -> list[bytes]:
    """A string field (``key`` is its one-byte tag), ready to extend a parts list."""
    raw = value.encode("utf-8")
    return [key, encode_varint(len(raw)), raw]


def _size(chunks: list[Chunk]) -> int:
    return sum(len(c) if isinstance(c, bytes) else c.nbytes for c in chunks)


def message_field(key: bytes, chunks: list[Chunk]) -> list[Chunk]:
    """``chunks`` framed as an embedded message field."""
    return [key, encode_varint(_size(chunks)), *chunks]


# dtype -> DataType for the dtypes whose memory is already the wire layout (fixed size, little-
# endian or single-byte); filled on first sight, so the per-tensor check is one dict lookup.
_WIRE_READY: dict[np.dtype[Any], int | None] = {}


def _wire_code(dtype: np.dtype[Any]) -> int | None:
    code = _WIRE_READY.get(dtype, -1)
    if code == -1:
        order = dtype.byteorder
        ready = dtype.kind in "biuf" and (order in "<|" or (order == "=" and _LITTLE_ENDIAN_HOST))
        code = _WIRE_READY[dtype] = datatype_of(dtype) if ready else None
    return code


def payload(array: np.ndarray) -> tuple[int, tuple[int, ...], Chunk]:
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


def _packed(shape: tuple[int, ...]) -> bytes:
    return b"".join([encode_varint(d) for d in shape])


@functools.lru_cache(maxsize=1024)
def tensor_head(name: str, code: int, shape: tuple[int, ...]) -> bytes:
    """A ``ferry.v1`` ``Tensor``'s fields 1 name, 2 dtype and 3 packed shape; the same few
    recur, so cached."""
    meta: list[bytes] = text_field(b"\x0a", name) if name else []
    if code:
        meta += [b"\x10", encode_varint(code)]
    if shape:
        dims = _packed(shape)
        meta += [b"\x1a", encode_varint(len(dims)), dims]
    return b"".join(meta)


def tensor_field(key: bytes, name: str, array: np.ndarray) -> list[Chunk]:
    """One ``ferry.v1`` ``Tensor`` framed as the field ``key``; its data referenced, not copied."""
    code, shape, data = payload(array)
    head = tensor_head(name, code, shape)
    size = len(data) if isinstance(data, bytes) else data.nbytes
    if size:
        size_head = encode_varint(size)
        total = len(head) + 1 + len(size_head) + size
        return [key, encode_varint(total), head, b"\x22", size_head, data]
    return [key, encode_varint(len(head)), head]


def infer_response_parts(
    model: str, version: int, request_id: str, outputs: Mapping[str, np.ndarray]
) -> list[Chunk]:
    """``ferry.v1.InferResponse`` (1 model, 2 version, 3 id, 4 outputs), unjoined."""
    parts: list[Chunk] = []
    if model:
        parts += text_field(b"\x0a", model)
    if version:
        parts += [b"\x10", encode_varint(version)]
    if request_id:
        parts += text_field(b"\x1a", request_id)
    for name, array in outputs.items():
        parts += tensor_field(b"\x22", name, array)
    return parts


def encode_infer_response(
    model: str, version: int, request_id: str, outputs: Mapping[str, np.ndarray]
) -> bytes:
    """The serialized ``ferry.v1.InferResponse``, each output's data copied once."""
    return b"".join(infer_response_parts(model, version, request_id, outputs))


def encode_stream_result(
    request_id: str, model: str, version: int, outputs: Mapping[str, np.ndarray]
) -> bytes:
    """The serialized ``ferry.v1.InferStreamResponse`` carrying a result (1 id, 2 response)."""
    parts: list[Chunk] = []
    if request_id:
        parts += text_field(b"\x0a", request_id)
    parts += message_field(b"\x12", infer_response_parts(model, version, request_id, outputs))
    return b"".join(parts)


@functools.lru_cache(maxsize=1024)
def _oip_output_head(name: str, code: int, shape: tuple[int, ...]) -> bytes:
    """``ModelInferResponse.outputs`` entry (field 5): 1 name, 2 datatype, 3 packed shape."""
    meta: list[bytes] = text_field(b"\x0a", name) if name else []
    meta += text_field(b"\x12", datatype_name(code))
    if shape:
        dims = _packed(shape)
        meta += [b"\x1a", encode_varint(len(dims)), dims]
    body = b"".join(meta)
    return b"\x2a" + encode_varint(len(body)) + body


# ``parameters`` (4) {"triton_final_response": InferParameter{bool_param: true}}: what Triton
# puts on every stream response that completes its request, success or failure. Clients loop
# until they see it (tritonclient's ``enable_empty_final_response`` callers, Triton-based
# services), so without it they waited forever. Each of Ferry's stream responses is its
# request's last (no decoupled models).
OIP_FINAL_RESPONSE = b"\x22\x1b\x0a\x15triton_final_response\x12\x02\x08\x01"


def oip_response_parts(
    model: str,
    version: str,
    request_id: str,
    outputs: Mapping[str, np.ndarray],
    *,
    final: bool = False,
) -> list[Chunk]:
    """Open Inference Protocol ``ModelInferResponse`` (1 model_name, 2 model_version, 3 id,
    4 parameters with ``final``, 5 outputs, 6 raw_output_contents), every output as raw
    contents, unjoined."""
    parts: list[Chunk] = []
    if model:
        parts += text_field(b"\x0a", model)
    if version:
        parts += text_field(b"\x12", version)
    if request_id:
        parts += text_field(b"\x1a", request_id)
    if final:
        parts.append(OIP_FINAL_RESPONSE)
    raws: list[Chunk] = []
    for name, array in outputs.items():
        code, shape, data = payload(array)
        parts.append(_oip_output_head(name, code, shape))
        size = len(data) if isinstance(data, bytes) else data.nbytes
        raws += [b"\x32", encode_varint(size), data]  # empty bytes still take their slot
    parts += raws
    return parts


def encode_oip_response(
    model: str, version: str, request_id: str, outputs: Mapping[str, np.ndarray]
) -> bytes:
    """The serialized ``ModelInferResponse``, each output's data copied once."""
    return b"".join(oip_response_parts(model, version, request_id, outputs))


def encode_oip_stream_result(
    model: str, version: str, request_id: str, outputs: Mapping[str, np.ndarray]
) -> bytes:
    """The serialized ``ModelStreamInferResponse`` carrying a result (2 infer_response), marked
    as its request's final response."""
    parts = oip_response_parts(model, version, request_id, outputs, final=True)
    return b"".join(message_field(b"\x12", parts))
