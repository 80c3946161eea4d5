"""Tensor codec: numpy arrays <-> the wire ``Tensor`` (raw little-endian, row-major bytes).

Part of the light SDK, so it imports only numpy, protobuf and the stdlib; ``ml_dtypes`` is loaded
lazily, and only for BF16. BF16 always decodes: as ``ml_dtypes.bfloat16`` (zero-copy) when
ml_dtypes is installed, otherwise as an exact float32 copy (the 16 bits shifted into the high half
of each float32). Fixed-size types decode zero-copy into read-only views of the received bytes.
"""

from __future__ import annotations

from ferry.codec._bytes import decode_bytes_elements, encode_bytes_elements
from ferry.codec._dtypes import (
    CodecError,
    DataType,
    datatype_from_name,
    datatype_name,
    datatype_of,
    element_size,
    numpy_dtype,
)
from ferry.codec._tensor import decode_tensor, encode_tensor, from_bytes, to_bytes

__all__ = [
    "CodecError",
    "DataType",
    "datatype_from_name",
    "datatype_name",
    "datatype_of",
    "decode_bytes_elements",
    "decode_tensor",
    "element_size",
    "encode_bytes_elements",
    "encode_tensor",
    "from_bytes",
    "numpy_dtype",
    "to_bytes",
]
