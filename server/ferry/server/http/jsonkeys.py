"""Duplicate keys in a request's JSON, found without slowing the parse that reads it.

A JSON object that names a key twice (``{"inputs": [...], "inputs": [...]}``, a tensor with two
``datatype``) has no agreed meaning: RFC 8259 leaves it to the reader; Python's readers and orjson
keep the last value, RapidJSON (Triton's reader) keeps both and its lookups find the first. A
proxy or gateway that checks a request with one reader and a server that runs it with another
act on different tensors, the classic smuggling gap, so such a body is refused (400, naming the
key) rather than read either way.

orjson, the fast reader, keeps the last value without a word, and the standard library's
``object_pairs_hook``, which sees every pair, parses numbers about 9 times slower. So the parse
stays orjson's and duplicates are found by counting: each object of the text is one dict, so the
keys the text writes (its ':' outside strings) outnumber the keys the dicts hold exactly when an
object repeats one. The text's ':' and '{' are first counted strings included (a pass in C, or
memchr across a large body's runs of numbers); when the ':' match the dicts' keys, no key
repeats. Only when a string holds one, or a key repeats, are the strings told apart (by splitting
on quotes, or with numpy in a large body). The dicts are counted shortest list first and only
until every object is found, so tensor data lists are not walked. A body that does repeat a key
is parsed again, by the standard library, to name the key.
"""

from __future__ import annotations

import heapq
import json
from typing import Any

import numpy as np

from ferry.codec._json_keys import DuplicateKey, unique_object

# Bodies up to this size are counted by plain bytes methods (each a pass in C); larger ones by
# bytes.find (memchr) while marks are few, then by numpy.
SMALL = 4096
# Marks found one by one in a larger body before it is counted by numpy: a tensor request has a
# few dozen, and past a few hundred numpy's passes cost less than the loop.
SCANNED = 256
_QUOTE, _COLON, _BRACE = ord('"'), ord(":"), ord("{")
# Lists up to this length are walked where they are met; longer ones (tensor data) wait, shortest
# first, until no object is left to find.
_SHORT = 8


def check_unique(value: Any, data: bytes) -> None:
    """Raise DuplicateKey when ``data`` (valid JSON, which orjson read as ``value``) repeats a key
    in one of its objects."""
    braces, colons = _anywhere(data)
    if braces == 0:
        return  # no object, so no key
    if braces > 0 and held(value, braces) == colons:
        # Every ':' of the text is a key the dicts hold: none is repeated (nor inside a string).
        # With '{' inside strings the walk does not stop early, and counts every dict.
        return
    objects, keys = written(data)
    if objects and held(value, objects) != keys:
        raise DuplicateKey(_repeated(data))


def _anywhere(data: bytes) -> tuple[int, int]:
    """The "{" and ":" in ``data``, strings included; (-1, -1) when a large body has more than
    SCANNED of either."""
    if len(data) <= SMALL:
        return data.count(b"{"), data.count(b":")
    counts = [0, 0]
    for i, mark in enumerate((b"{", b":")):
        at = data.find(mark)
        while at >= 0:
            counts[i] += 1
            if counts[i] > SCANNED:
                return -1, -1
            at = data.find(mark, at + 1)
    return counts[0], counts[1]


def written(data: bytes) -> tuple[int, int]:
    """(objects, keys) the JSON text writes: its "{" and ":" outside strings, where valid JSON
    has them only as an object's start and a key's end."""
    if b"\\" in data:
        # Escapes come in pairs, backslash first: with \\ and \" blanked, in that order as the
        # pairs read from the left, every '"' left opens or closes a string.
        data = data.replace(b"\\\\", b"__").replace(b'\\"', b"__")
    if len(data) <= SMALL:
        outside = b"".join(data.split(b'"')[::2])
        return outside.count(b"{"), outside.count(b":")
    # A mark is outside every string when an even number of quotes comes before it.
    text = np.frombuffer(data, np.uint8)
    found = ((text == _QUOTE) | (text == _COLON) | (text == _BRACE)).nonzero()[0]
    marks = text[found]  # by index: twice as fast as by the mask itself
    outside = (np.cumsum(marks == _QUOTE) & 1) == 0
    objects = np.count_nonzero(outside & (marks == _BRACE))
    return int(objects), int(np.count_nonzero(outside & (marks == _COLON)))


def held(value: Any, objects: int) -> int:
    """Keys the dicts in ``value`` hold, counted until ``objects`` dicts are found. Long lists are
    walked last, shortest first, so a body's tensor data is reached only while an object is
    still missing."""
    keys = found = order = 0
    stack = [value]
    waiting: list[tuple[int, int, list[Any]]] = []  # (length, order, list): a heap
    while True:
        while stack:
            item = stack.pop()
            kind = type(item)
            if kind is dict:
                found += 1
                keys += len(item)
                if found == objects:
                    return keys
                stack.extend(item.values())
            elif kind is list:
                if len(item) <= _SHORT:
                    stack.extend(item)
                else:
                    order += 1  # lists of one length never compare themselves
                    heapq.heappush(waiting, (len(item), order, item))
        if not waiting:
            return keys
        stack.extend(heapq.heappop(waiting)[2])


def _repeated(data: bytes) -> str | None:
    """The key a body repeats, found by the standard library's reader (orjson, which read the
    body, keeps the last value of a repeated key without saying so)."""
    try:
        json.loads(data, object_pairs_hook=unique_object)
    except DuplicateKey as exc:
        return exc.key
    except (ValueError, RecursionError):
        pass
    return None
