from __future__ import annotations

import pytest

from ferry.proto.v1 import inference_pb2 as pb
from ferry.proto.v1 import tensor_pb2
from ferry.server.core.inputs import check_wire_elements
from ferry.server.core.types import Limits
from ferry.server.errors import LimitExceeded
from ferry.server.grpc.inference import to_request


def test_declared_elements_are_refused_before_decoding() -> None:
    """A BYTES tensor that declares a million elements is refused on its shape alone, before
    the codec would build a million Python objects (or complain about the data)."""
    t = tensor_pb2.Tensor(name="x", dtype=tensor_pb2.DATA_TYPE_BYTES, shape=[1000, 1000], data=b"")
    with pytest.raises(LimitExceeded, match="max_request_elements"):
        to_request(pb.InferRequest(model="m", inputs=[t]), Limits(max_elements=1000))


def test_shapes_within_the_limit_pass_and_counts_add_up_across_inputs() -> None:
    limits = Limits(max_elements=10)
    check_wire_elements([[2, 5]], limits)
    check_wire_elements([[0, 1 << 40]], limits)  # zero-sized: nothing to decode
    check_wire_elements([[1 << 40, -1]], limits)  # a negative dim holds nothing either
    with pytest.raises(LimitExceeded):
        check_wire_elements([[2, 5], [1]], limits)
