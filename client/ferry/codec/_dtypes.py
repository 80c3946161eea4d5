"""Mapping between the wire ``DataType`` enum and numpy dtypes.

The tables are built once at import so that the per-request paths are plain dict lookups on
ints, never enum conversions. ``ml_dtypes`` (for BF16) is optional and imported only when a BF16
tensor is actually seen, so that the light SDK does not pay for it.
"""

from __future__ import annotations

import functools
import sys
from typing import Any

import numpy as np

from ferry.proto.v1 import tensor_pb2

DataType = tensor_pb2.DataType

BOOL = tensor_pb2.DATA_TYPE_BOOL
BF16 = tensor_pb2.DATA_TYPE_BF16
BYTES = tensor_pb2.DATA_TYPE_BYTES

# Host byte order decides whether a native ('=') dtype must be swapped before going on the wire.
BIG_ENDIAN_HOST = sys.byteorder == "big"


class CodecError(ValueError):
    """A tensor could not be encoded or decoded.

    A ``ValueError`` so that servers can map it to INVALID_ARGUMENT without knowing the codec;
    messages say what was expected and what came, since they end up in a client's error.
    """


# Fixed-size types that decode without ml_dtypes: DataType -> (little-endian numpy dtype, size).
# BF16 and BYTES are deliberately absent: they take the slow path.
FIXED: dict[int, tuple[np.dtype[Any], int]] = {
    int(tensor_pb2.DATA_TYPE_BOOL): (np.dtype("?"), 1),
    int(tensor_pb2.DATA_TYPE_UINT8): (np.dtype("u1"), 1),
    int(tensor_pb2.DATA_TYPE_UINT16): (np.dtype("<u2"), 2),
    int(tensor_pb2.DATA_TYPE_UINT32): (np.dtype("<u4"), 4),
    int(tensor_pb2.DATA_TYPE_UINT64): (np.dtype("<u8"), 8),
    int(tensor_pb2.DATA_TYPE_INT8): (np.dtype("i1"), 1),
    int(tensor_pb2.DATA_TYPE_INT16): (np.dtype("<i2"), 2),
    int(tensor_pb2.DATA_TYPE_INT32): (np.dtype("<i4"), 4),
    int(tensor_pb2.DATA_TYPE_INT64): (np.dtype("<i8"), 8),
    int(tensor_pb2.DATA_TYPE_FP16): (np.dtype("<f2"), 2),
    int(tensor_pb2.DATA_TYPE_FP32): (np.dtype("<f4"), 4),
    int(tensor_pb2.DATA_TYPE_FP64): (np.dtype("<f8"), 8),
}

# numpy (kind, itemsize) -> DataType. Keyed this way so that any byte order maps alike.
BY_KIND: dict[tuple[str, int], int] = {(dt.kind, size): code for code, (dt, size) in FIXED.items()}
_TEXT_KINDS = frozenset("OSUT")  # T: numpy 2's variable-width StringDType

# Open Inference Protocol / Triton names, in wire order.
NAMES: dict[int, str] = {
    value: key.removeprefix("DATA_TYPE_")
    for key, value in tensor_pb2.DataType.items()
    if value != tensor_pb2.DATA_TYPE_UNSPECIFIED
}
_BY_NAME: dict[str, int] = {name: value for value, name in NAMES.items()}
_SIZES: dict[int, int] = {code: size for code, (_, size) in FIXED.items()} | {BF16: 2, BYTES: 0}
_SUPPORTED_NUMPY = (
    "bool, uint8, uint16, uint32, uint64, int8, int16, int32, int64, float16, float32, "
    "float64, bfloat16 (ml_dtypes), object/str/bytes (BYTES)"
)


@functools.cache
def _bfloat16() -> np.dtype[Any] | None:
    """Import ml_dtypes on first use only; None when it is not installed.

    Tests monkeypatch this function to simulate a missing ml_dtypes, so callers must look it up
    through the module at call time rather than binding it.
    """
    try:
        import ml_dtypes
    except ImportError:
        return None
    bf16: np.dtype[Any] = np.dtype(ml_dtypes.bfloat16)
    return bf16


def unknown(dtype: object) -> CodecError:
    """Build the error for a value outside the enum, listing the valid ones to help debugging."""
    valid = ", ".join(f"{value} ({name})" for value, name in NAMES.items())
    return CodecError(f"unknown DataType {dtype!r}; expected one of {valid}")


def numpy_dtype(dtype: int) -> np.dtype[Any]:
    """Return the numpy dtype that holds ``dtype`` elements (little-endian for multi-byte types).

    BYTES maps to ``object`` (elements are ``bytes``). BF16 maps to ``ml_dtypes.bfloat16`` and
    raises CodecError when ml_dtypes is missing: there is no numpy-native bfloat16. Decoding does
    not need this, though: ``from_bytes`` falls back to an exact float32 copy for BF16.
    """
    fixed = FIXED.get(dtype)
    if fixed is not None:
        return fixed[0]
    if dtype == BYTES:
        return np.dtype(object)
    if dtype == BF16:
        bf16 = _bfloat16()
        if bf16 is None:
            raise CodecError(
                "BF16 needs a bfloat16 numpy dtype, which numpy lacks: "
                "install ml_dtypes (pip install ferry-serve[bf16])"
            )
        return bf16
    raise unknown(dtype)


def datatype_of(array_dtype: np.dtype[Any]) -> int:
    """Return the wire DataType for a numpy dtype, whatever its byte order.

    Text and object arrays all map to BYTES, since that is the only variable-size type on the wire.
    """
    code = BY_KIND.get((array_dtype.kind, array_dtype.itemsize))
    if code is not None:
        return code
    if array_dtype.kind in _TEXT_KINDS:
        return int(BYTES)
    if array_dtype.kind == "V" and array_dtype.itemsize == 2:
        bf16 = _bfloat16()
        if bf16 is not None and array_dtype == bf16:
            return int(BF16)
    raise CodecError(f"unsupported numpy dtype {array_dtype!s}; supported: {_SUPPORTED_NUMPY}")


def datatype_name(dtype: int) -> str:
    """Return the Open Inference Protocol name (``FP32``), which KServe and Triton clients send."""
    name = NAMES.get(dtype)
    if name is None:
        raise unknown(dtype)
    return name


def datatype_from_name(name: str) -> int:
    """Parse an Open Inference Protocol name; exact and case-sensitive, as the protocol is."""
    code = _BY_NAME.get(name)
    if code is None:
        raise CodecError(f"unknown data type name {name!r}; expected one of {', '.join(_BY_NAME)}")
    return code


def element_size(dtype: int) -> int:
    """Return bytes per element, or 0 for BYTES whose elements vary in size."""
    size = _SIZES.get(dtype)
    if size is None:
        raise unknown(dtype)
    return size
