"""A request JSON object that names a key twice is refused, naming the key, on every path the
check takes (a small body, a large one, one whose strings hold '{' or ':', one of many strings,
escapes, the standard library's reader for NaN); a body without one reads as it always did."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ferry.server.errors import InvalidArgument
from ferry.server.http import jsonkeys
from ferry.server.http.tensors import loads

FLOATS = json.dumps(np.linspace(0, 1, 2000).tolist())  # past jsonkeys.SMALL on its own
MANY = json.dumps([f"s{i}" for i in range(400)])  # more strings than jsonkeys.SCANNED
MARKED = json.dumps([f'{{"k": "{i}":}}' for i in range(400)])  # '{', ':', '"' in strings


def _refused(body: str, key: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        loads(body.encode(), "the request")
    assert f"the request names the key {key!r} twice in one object" in str(info.value)
    assert "send each key once" in str(info.value)


@pytest.mark.parametrize(
    ("body", "key"),
    [
        ('{"inputs": [], "inputs": [1]}', "inputs"),
        ('{"inputs": [{"name": "x", "datatype": "FP32", "datatype": "INT8"}]}', "datatype"),
        ('{"a": 1, "b": {"c": {"d": {"e": 1, "e": 1}}}}', "e"),
        ('{"outputs": [{"name": "o", "parameters": {"binary_data": true, "binary_data": false}}]}',
         "binary_data"),
        ('{"a": [[1, 2], [3, {"k": 1, "k": 2}]]}', "k"),  # an object inside a data list
        ('[{"k": 1}, {"k": 1, "j": 2, "k": 3}]', "k"),
        ('{"": 1, "": 2}', ""),
        # The same key written two ways: they are one key once read.
        ('{"datatype": "FP32", "\\u0064atatype": "INT8"}', "datatype"),
        ('{"a\\\\": 1, "a\\u005c": 2}', "a\\"),
        # Large bodies: counted with memchr, then with numpy.
        (f'{{"data": {FLOATS}, "shape": [1], "shape": [2]}}', "shape"),
        (f'{{"data": {MANY}, "name": "x", "name": "y"}}', "name"),
        (f'{{"data": {MARKED}, "name": "x", "name": "y"}}', "name"),
        (f'{{"inputs": [{{"data": {FLOATS}}}, {{"data": [], "data": {FLOATS}}}]}}', "data"),
        # NaN: read by the standard library.
        ('{"a": NaN, "b": 1, "b": 2}', "b"),
        (f'{{"x": {MARKED}, "a": Infinity, "a": 2}}', "a"),
    ],
)  # fmt: skip
def test_a_key_named_twice_is_refused(body: str, key: str) -> None:
    _refused(body, key)


@pytest.mark.parametrize(
    "body",
    [
        '{"inputs": [{"name": "a", "datatype": "FP32"}, {"name": "b", "datatype": "FP32"}]}',
        '{"a": "{\\"a\\": 1, \\"a\\": 2}", "b": ":::{{{", "c": "\\\\", "d": "\\\\\\""}',
        '{"a": "\\u0022:", "\\\\": "\\"", "e": "\\\\\\\\"}',
        f'{{"data": {FLOATS}, "s": "{{:}}"}}',
        f'{{"data": {MANY}, "more": {MARKED}}}',
        json.dumps({"inputs": [{"name": f"i{i}", "datatype": "FP32"} for i in range(300)]}),
        '{"a": NaN, "b": {"c": Infinity, "d": "{:"}}',
        "[]",
        "[1, 2, 3]",
        '"a string: {"',
        "{}",
        '[{}, {}, {"a": {}}]',
    ],
)
def test_a_body_without_a_repeated_key_reads_as_before(body: str) -> None:
    assert loads(body.encode()) == json.loads(body)


# A JSON text written from (key, value) pairs, so an object may repeat a key.
Node = Any
keys = st.sampled_from(["a", "b", "{", ":", '"', "\\", "a:{", "é", ""])
scalars = st.one_of(
    st.integers(-5, 5), st.floats(allow_nan=False, allow_infinity=False), st.booleans(), keys
)
nodes = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.builds(lambda pairs: ("object", pairs), st.lists(st.tuples(keys, inner), max_size=4)),
    ),
    max_leaves=20,
)


def _write(node: Node, ascii_only: bool) -> str:
    if isinstance(node, tuple):
        pairs = ", ".join(
            f"{json.dumps(k, ensure_ascii=ascii_only)}: {_write(v, ascii_only)}" for k, v in node[1]
        )
        return "{" + pairs + "}"
    if isinstance(node, list):
        return "[" + ", ".join(_write(v, ascii_only) for v in node) + "]"
    return json.dumps(node, ensure_ascii=ascii_only)


def _repeats(node: Node) -> bool:
    if isinstance(node, tuple):
        names = [k for k, _ in node[1]]
        return len(set(names)) < len(names) or any(_repeats(v) for _, v in node[1])
    if isinstance(node, list):
        return any(_repeats(v) for v in node)
    return False


@settings(max_examples=300, deadline=None)
@given(nodes, st.sampled_from(["", FLOATS, MANY, MARKED]), st.booleans())
def test_any_body_is_refused_exactly_when_an_object_repeats_a_key(
    node: Node, padding: str, ascii_only: bool
) -> None:
    # Padding before the node takes the body down the large-body paths.
    text = _write(node, ascii_only)
    body = f"[{padding}, {text}]" if padding else text
    if _repeats(node):
        with pytest.raises(InvalidArgument, match="twice in one object"):
            loads(body.encode())
    else:
        assert loads(body.encode()) == json.loads(body)


def test_the_marks_are_counted_outside_strings_on_both_paths() -> None:
    # written() is exact whichever way it counts: by splitting a small body, by numpy a large one.
    body = b'{"a": "{:\\"{", "b\\\\": [{"c": ":"}]}'
    assert jsonkeys.written(body) == (2, 3)
    padded = body[:-1] + b', "pad": ' + FLOATS.encode() + b"}"
    assert len(padded) > jsonkeys.SMALL
    assert jsonkeys.written(padded) == (2, 4)
