"""The BYTES element encoding: each element is a 4-byte little-endian length, then its bytes.

This is the Triton/KServe raw layout, so the KServe adapter reuses these functions as they are.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

from ferry.codec._dtypes import CodecError

_U32 = struct.Struct("<I")
_MAX_ELEMENT = 2**32 - 1


def _prefix(name: str) -> str:
    return f"input {name!r}: " if name else ""


def encode_bytes_elements(array: np.ndarray[Any, Any]) -> bytes:
    """Encode every element of ``array`` in row-major order, whatever the array's strides.

    ``str`` elements are UTF-8 encoded. Fixed-width ``S``/``U`` arrays lose trailing NULs, as numpy
    itself strips them on element access; use an object array to keep them.
    """
    if not isinstance(array, np.ndarray):
        raise CodecError(f"expected a numpy.ndarray, got {type(array).__name__}")
    pack = _U32.pack
    parts: list[bytes] = []
    for index, element in enumerate(array.reshape(-1).tolist()):
        if isinstance(element, str):
            try:
                raw = element.encode("utf-8")
            except UnicodeEncodeError as exc:  # lone surrogates have no UTF-8 form
                message = f"BYTES element {index} is not encodable as UTF-8: {exc}"
                raise CodecError(message) from None
        elif isinstance(element, bytes | bytearray):
            raw = bytes(element)
        else:
            raise CodecError(
                f"BYTES element {index} must be bytes or str, got {type(element).__name__}"
            )
        if len(raw) > _MAX_ELEMENT:
            raise CodecError(f"BYTES element {index} is {len(raw)} bytes, more than 2**32 - 1")
        parts.append(pack(len(raw)))
        parts.append(raw)
    return b"".join(parts)


def decode_bytes_elements(data: bytes, count: int, *, name: str = "") -> list[bytes]:
    """Split ``data`` into exactly ``count`` elements, trusting none of the length prefixes.

    Every element takes at least its 4-byte prefix, so an impossible count is rejected before the
    loop: a hostile shape cannot make us spin over billions of elements.
    """
    if not isinstance(data, bytes):
        data = bytes(data)
    size = len(data)
    if count < 0:
        raise CodecError(f"{_prefix(name)}BYTES element count must be >= 0, got {count}")
    if count * 4 > size:
        raise CodecError(
            f"{_prefix(name)}BYTES tensor of {count} elements needs at least {count * 4} bytes "
            f"of length prefixes, got {size}"
        )
    unpack = _U32.unpack_from
    elements: list[bytes] = []
    offset = 0
    for index in range(count):
        if offset + 4 > size:
            raise CodecError(
                f"{_prefix(name)}BYTES element {index} of {count}: needs a 4-byte length at "
                f"offset {offset}, but data ends at {size}"
            )
        (length,) = unpack(data, offset)
        offset += 4
        end = offset + length
        if end > size:
            raise CodecError(
                f"{_prefix(name)}BYTES element {index} of {count}: length {length} at offset "
                f"{offset - 4} runs past the end of data ({size} bytes)"
            )
        elements.append(data[offset:end])
        offset = end
    if offset != size:
        raise CodecError(
            f"{_prefix(name)}BYTES tensor of {count} elements ends at byte {offset}, "
            f"got {size - offset} trailing bytes"
        )
    return elements
