"""What the wire cannot carry is refused in the SDK, never masked into another request.

The hand-written encoder wrote varints masked to 64 bits: ``version=2**64`` was sent as version 0
(the default) and answered by it, ``priority=2**40`` as the default priority.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest

from ferry.client import InvalidInputError
from ferry.client._requests import build_infer_request
from ferry.client._wire import encode_infer_request
from ferry.proto.v1 import inference_pb2 as pb

X = {"input": np.ones((1, 4), np.float32)}


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"version": 2**64}, "version must be an int64"),
        ({"version": 2**63}, "version must be an int64"),
        ({"version": "1"}, "version must be an int64"),
        ({"version": True}, "version must be an int64"),
        ({"priority": 2**40}, "priority must be an integer within 0..2**32-1"),
        ({"priority": -1}, "priority must be an integer within 0..2**32-1"),
        ({"timeout": float("nan")}, "timeout must be a finite number"),
        ({"timeout": float("inf")}, "timeout must be a finite number"),
        ({"timeout": -1.0}, "timeout must be a finite number"),
        ({"timeout": 1e20}, "timeout must be a finite number"),
    ],
)
def test_out_of_range_numbers_are_refused(kwargs: dict[str, Any], words: str) -> None:
    with pytest.raises(InvalidInputError, match=re.escape(words)):
        encode_infer_request("m", X, **kwargs)
    with pytest.raises(InvalidInputError, match=re.escape(words)):
        build_infer_request("m", X, **kwargs)


def test_numbers_in_range_are_the_bytes_protobuf_writes() -> None:
    kwargs: dict[str, Any] = {"version": 2**53, "priority": 2**32 - 1, "timeout": 2.5}
    ours = pb.InferRequest.FromString(encode_infer_request("m", X, **kwargs))
    assert (ours.version, ours.priority, ours.timeout_us) == (2**53, 2**32 - 1, 2_500_000)
    assert encode_infer_request("m", X, **kwargs) == (
        build_infer_request("m", X, **kwargs).SerializeToString()
    )
