"""A JSON object that names a key twice, refused by whichever reader meets it.

RFC 8259 leaves such an object to the reader (Python's and orjson keep the last value, Triton's
RapidJSON the first), so a config file or a request body that repeats a key is refused rather
than read either way. One ``object_pairs_hook`` for the standard library's reader, used by the
model config (core.config), the HTTP bodies (http.jsonkeys), an upload's architecture kwargs
and the CLI's JSON arguments. In the codec, which the server and the CLI both have.
"""

from __future__ import annotations

from typing import Any


class DuplicateKey(ValueError):
    """An object names ``key`` twice (None: which one could not be said)."""

    def __init__(self, key: str | None) -> None:
        super().__init__(f"the key {key!r} is given twice in one object")
        self.key = key


def unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` for the standard library's reader: the object, or DuplicateKey."""
    value = dict(pairs)
    if len(value) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise DuplicateKey(key)
            seen.add(key)
    return value
