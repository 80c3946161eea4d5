"""Array <-> (DataType, shape, raw bytes), the per-request hot path.

``from_bytes`` is zero-copy for fixed-size types: the array is a read-only view on ``data``.
BF16 decodes as ``ml_dtypes.bfloat16`` (zero-copy) when ml_dtypes is installed and otherwise as an
exact float32 copy (each 16-bit value shifted into the high half of a float32), so a BF16 output
is always readable. Encoding BF16 needs ml_dtypes, since only it can produce a bfloat16 array.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import numpy as np

from ferry.codec import _dtypes
from ferry.codec._bytes import _prefix, decode_bytes_elements, encode_bytes_elements
from ferry.codec._dtypes import BIG_ENDIAN_HOST, BY_KIND, BYTES, FIXED, CodecError, datatype_of
from ferry.proto.v1 import tensor_pb2

# Bound on the product of the non-zero dims: 2**59 elements of up to 8 bytes stay below numpy's
# intp limit, so reshape never overflows, and no honest tensor comes close.
MAX_ELEMENTS = 2**59
# numpy's limit on an array's dimensions: a longer shape is refused on its length alone, before
# anything loops over its dims or quotes them in a message (8 MB of dims took seconds of both).
MAX_DIMS = 64
_SWAP_ORDER = "=" if BIG_ENDIAN_HOST else ">"


def to_bytes(array: np.ndarray[Any, Any]) -> tuple[int, list[int], bytes]:
    """Encode to (DataType, shape, little-endian row-major bytes).

    A C-contiguous little-endian array costs one ``tobytes()`` copy and nothing else; other layouts
    are made contiguous by that same copy, and only big-endian arrays pay for a swap first.
    """
    if not isinstance(array, np.ndarray):
        raise CodecError(f"expected a numpy.ndarray, got {type(array).__name__}")
    array = unmasked(array)
    dtype = array.dtype
    code = BY_KIND.get((dtype.kind, dtype.itemsize))
    if code is None:
        code = datatype_of(dtype)
        if code == BYTES:
            return code, list(array.shape), encode_bytes_elements(array)
    if dtype.byteorder == _SWAP_ORDER:
        array = array.astype(dtype.newbyteorder("<"))
    return code, list(array.shape), array.tobytes()


def unmasked(array: np.ndarray[Any, Any], name: str = "") -> np.ndarray[Any, Any]:
    """``array`` itself, or a masked array's values when none is masked; refused when some are.

    The wire has no mask: a masked array went out with whatever values lay under its mask,
    and the model answered for numbers its caller had masked out, a wrong answer without a
    word. Which value stands for a masked element is the caller's to say (``filled``)."""
    if type(array) is np.ndarray or not isinstance(array, np.ma.MaskedArray):
        return array
    mask = np.ma.getmaskarray(array)
    if not mask.any():
        return np.asarray(array.data)
    first = int(np.flatnonzero(mask)[0])
    raise CodecError(
        f"{_prefix(name)}a numpy masked array with {int(mask.sum()):,} masked element(s) (the "
        f"first at flat index {first}): the wire carries no mask, so the values under it would "
        "be sent and answered for; send array.filled(value) with the value the model should "
        "see there (or the mask as an input of its own)"
    )


def _negative_dim(shape: Sequence[int], dim: int, name: str) -> CodecError:
    return CodecError(f"{_prefix(name)}shape {list(shape)} has a negative dimension {dim}")


def too_many_dims(dims: int, name: str) -> CodecError:
    """A shape longer than any array's, said without quoting it."""
    return CodecError(
        f"{_prefix(name)}the shape has {dims:,} dimensions; a tensor has at most {MAX_DIMS}"
    )


def too_many_elements(shape: Sequence[int], name: str) -> CodecError | None:
    """Check the product of the non-zero dims, so a zero cannot hide absurd neighbours."""
    nonzero = 1
    for dim in shape:
        if dim:
            nonzero *= dim
    if nonzero <= MAX_ELEMENTS:
        return None
    return CodecError(
        f"{_prefix(name)}shape {list(shape)} has too many elements ({nonzero} > {MAX_ELEMENTS})"
    )


def nesting_mismatch(nested: Sequence[int], shape: Sequence[int], name: str) -> str:
    """'' when data nested as ``nested`` (the sizes of its lists, outermost first) is a tensor
    of ``shape`` read row-major, else what is wrong with it: its lists must be the shape's dims,
    the last of them may hold the remaining dims flat. Only the element count was checked, so
    rows sent transposed (``[[1, 4], [2, 5], [3, 6]]`` for shape [2, 3]) were read in another
    order and each row was answered for values that were not its own. Dims of 1 change no order
    and are left out of the comparison (``[[1, 2, 3]]`` for shape [3] is the same tensor)."""
    lists = [n for n in nested if n != 1]
    dims = [d for d in shape if d != 1]
    if len(lists) <= 1 or 0 in dims:
        return ""  # flat (or one list of all elements): row-major by definition; or empty
    k = len(lists)
    rest = 1
    for d in dims[k - 1 :]:
        rest *= d
    if k <= len(dims) and lists[:-1] == dims[: k - 1] and lists[-1] == rest:
        return ""
    return (
        f"{_prefix(name)}the data is nested as {list(nested)}, which is not its shape "
        f"{list(shape)}: nest the data as the shape's dims (rows first, row-major) or send it "
        "flat"
    )


def from_bytes(
    dtype: int, shape: Sequence[int], data: bytes, *, name: str = ""
) -> np.ndarray[Any, Any]:
    """Decode raw bytes into an array of ``shape``; zero-copy (read-only) for fixed-size types.

    Nothing in ``shape`` or ``data`` is trusted: dims, element count and byte length are all
    checked in Python ints before numpy sees them, and ``name`` goes into every message.
    """
    if len(shape) > MAX_DIMS:
        raise too_many_dims(len(shape), name)
    # One conversion up front: iterating and reshaping with a tuple is about twice as fast as with
    # the protobuf repeated container that decode_tensor passes.
    shape = tuple(shape)
    count = 1
    for dim in shape:
        if dim < 0:
            raise _negative_dim(shape, dim, name)
        count *= dim
    if count == 0 or count > MAX_ELEMENTS:
        error = too_many_elements(shape, name)
        if error is not None:
            raise error
    fixed = FIXED.get(dtype)
    if fixed is None:
        return _from_bytes_special(dtype, shape, data, name, count)
    np_dtype, itemsize = fixed
    if len(data) != count * itemsize:
        raise _length_error(dtype, shape, count * itemsize, len(data), name)
    if dtype == _dtypes.BOOL and count:
        _check_bool_bytes(data, name)
    try:
        return np.frombuffer(data, np_dtype).reshape(shape)
    except ValueError as exc:  # e.g. more dims than numpy supports
        raise CodecError(f"{_prefix(name)}cannot reshape to {list(shape)}: {exc}") from None


def _check_bool_bytes(data: bytes, name: str) -> None:
    """A BOOL element is one byte, 0 or 1. numpy and onnxruntime read any other byte as a bool
    that is neither (a Where fed the byte 2 chose neither branch and answered 0.0), so such a
    tensor is refused, never served a silently wrong answer."""
    octets = np.frombuffer(data, np.uint8)
    if octets.max() > 1:
        index = int(np.flatnonzero(octets > 1)[0])
        raise CodecError(
            f"{_prefix(name)}BOOL elements are one byte each, 0 (false) or 1 (true); "
            f"element {index} is the byte {int(octets[index])}"
        )


def _length_error(
    dtype: int, shape: Sequence[int], expected: int, got: int, name: str
) -> CodecError:
    return CodecError(
        f"{_prefix(name)}{_dtypes.datatype_name(dtype)} tensor of shape {list(shape)} "
        f"needs {expected} bytes, got {got}"
    )


def _from_bytes_special(
    dtype: int, shape: Sequence[int], data: bytes, name: str, count: int
) -> np.ndarray[Any, Any]:
    """BYTES, BF16 and unknown types: the paths that cannot be a single frombuffer."""
    if dtype == BYTES:
        elements = decode_bytes_elements(data, count, name=name)
        out = np.empty(count, dtype=object)
        out[:] = elements
        return out.reshape(shape)
    if dtype == _dtypes.BF16:
        if len(data) != count * 2:
            raise _length_error(dtype, shape, count * 2, len(data), name)
        bf16 = _dtypes._bfloat16()
        if bf16 is not None:
            return np.frombuffer(data, bf16).reshape(shape)
        # bfloat16 is the top half of a float32, so widening the bits is exact.
        wide = np.frombuffer(data, "<u2").astype("<u4") << 16
        return wide.view("<f4").reshape(shape)
    raise _dtypes.unknown(dtype)


def encode_tensor(name: str, array: np.ndarray[Any, Any]) -> tensor_pb2.Tensor:
    """Build the wire message for ``array``."""
    code, shape, data = to_bytes(array)
    return tensor_pb2.Tensor(
        name=name, dtype=cast(tensor_pb2.DataType, code), shape=shape, data=data
    )


def decode_tensor(tensor: tensor_pb2.Tensor) -> np.ndarray[Any, Any]:
    """Decode a wire message; its name labels any error."""
    return from_bytes(tensor.dtype, tensor.shape, tensor.data, name=tensor.name)
