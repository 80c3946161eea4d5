"""What a stream keeps to send a request with list inputs once more (the server refused the
dtypes its lists took): the inputs exactly as submitted, whatever the caller does to its lists
and arrays afterwards, without a second copy of the arrays the request's bytes already hold."""

from __future__ import annotations

import tracemalloc
from typing import Any

import numpy as np

from ferry.client._stream import Resend, StreamState


def kept(inputs: dict[str, Any]) -> Resend:
    state = StreamState(None, "m", fresh_dtypes=lambda *args: None)
    dtypes = {"ids": np.dtype(np.int32)}
    _, request, _ = state._build(inputs, "r", timeout=None, priority=None, outputs=None,
                                 dtypes=dtypes)  # fmt: skip
    keep = state._keep(inputs, request, dtypes, timeout=None, priority=None, outputs=None,
                       deadline=None)  # fmt: skip
    assert keep is not None
    return keep


def test_a_resend_carries_the_inputs_as_submitted() -> None:
    row = [[5, 6]]
    image = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    inputs: dict[str, Any] = {
        "ids": row,
        "image": image[:, ::2],  # not contiguous
        "wide": np.arange(3, dtype=">f8"),  # big-endian
        "text": np.array([b"a\x00", b""], dtype=object),
        "empty": np.zeros((0, 4), np.int16),
        "nested": [np.array([1.5, 2.5])],
    }
    arrays = ("image", "wide", "text", "empty")
    expected = {name: np.array(inputs[name]) for name in arrays}  # copies, as submitted
    keep = kept(inputs)
    row[0][:] = [7, 8]  # refilled for the next request
    image[:] = -1
    inputs["nested"][0][:] = 0
    again = keep.inputs()
    assert list(again) == list(inputs)  # the order submitted
    assert again["ids"] == [[5, 6]]
    np.testing.assert_array_equal(again["nested"][0], [1.5, 2.5])
    for name in arrays:
        assert again[name].shape == expected[name].shape
        assert again[name].tolist() == expected[name].tolist()


def test_a_resend_keeps_no_second_copy_of_array_inputs() -> None:
    image = np.ones((16, 3, 224, 224), np.float32)  # 9.6 MB
    inputs = {"ids": [[1, 2]], "image": image}
    tracemalloc.start()
    try:
        state = StreamState(None, "m", fresh_dtypes=lambda *args: None)
        dtypes = {"ids": np.dtype(np.int32)}
        _, request, _ = state._build(inputs, "r", timeout=None, priority=None, outputs=None,
                                     dtypes=dtypes)  # fmt: skip
        before = tracemalloc.get_traced_memory()[0]
        keep = state._keep(inputs, request, dtypes, timeout=None, priority=None,
                           outputs=None, deadline=None)  # fmt: skip
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert keep is not None
    assert held < image.nbytes // 10


def test_a_resend_keeps_a_memoryview_of_numbers_as_numbers() -> None:
    """A memoryview of numbers (an int8 array's) was kept as its bytes, and the request sent
    again went out as one BYTES element instead of the numbers first sent; a memoryview of
    bytes is kept as bytes, as sent."""
    numbers = np.array([-1, 2], np.int8)
    keep = kept({"ids": [[5, 6]], "raw": memoryview(numbers), "text": memoryview(b"a\x00")})
    numbers[:] = 0  # reused for the next request
    again = keep.inputs()
    assert again["text"] == b"a\x00"
    assert np.asarray(again["raw"]).dtype == np.int8 and np.asarray(again["raw"]).tolist() == [
        -1,
        2,
    ]
