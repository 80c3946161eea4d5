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


@pytest.mark.parametrize(
    ("model", "inputs", "kwargs", "words"),
    [
        (5, X, {}, "model must be a name (str), got int"),
        ("m", None, {}, "inputs must be a mapping of input name -> array, got NoneType"),
        ("m", np.ones(3), {}, "inputs must be a mapping"),
        ("m", X, {"outputs": "logits"}, "outputs must be a list of output names"),
        ("m", X, {"outputs": 7}, "outputs must be a list of output names"),
        ("m", X, {"request_id": 5}, "request_id must be a str, got int"),
        ("m", {"input": [[1.0, None]]}, {}, "input 'input'"),
        ("m", {"input": np.ones((1, 2), complex)}, {}, "input 'input'"),
        ("m", {"input": [[1.0], [1.0, 2.0]]}, {}, "input 'input'"),
    ],
)
def test_arguments_of_the_wrong_kind_are_invalid_input(
    model: Any, inputs: Any, kwargs: dict[str, Any], words: str
) -> None:
    """They raised AttributeError or the codec's ValueError, outside FerryError, which every
    SDK exception derives from; outputs="logits" was six one-letter names."""
    with pytest.raises(InvalidInputError, match=re.escape(words)):
        encode_infer_request(model, inputs, **kwargs)
    with pytest.raises(InvalidInputError, match=re.escape(words)):
        build_infer_request(model, inputs, **kwargs)
