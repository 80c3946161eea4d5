"""Page tokens of ListUploads and ListJobs: where the next page of a listing starts.

A listing is newest first and keyed by (created_ms, row): the token names the last record a
page held, and the next page starts strictly after it. An offset would skip or repeat records
when uploads arrive or are deleted between pages (``ferry uploads delete --all`` deletes while
it lists). The token is opaque to clients (base64 of a small JSON array) and says which model
filter it belongs to, so a token reused with another filter is refused, not misread.
"""

from __future__ import annotations

import base64
import binascii
import json

from ferry.server.errors import InvalidArgument

Position = tuple[int, int]  # (created_ms, rowid) of the last record a page held
_VERSION = 1
_MAX_TOKEN = 1024  # characters; a token this server gives is well under 400


def encode(position: Position, model: str) -> str:
    raw = json.dumps([_VERSION, position[0], position[1], model], separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode("utf-8")).decode("ascii").rstrip("=")


def decode(token: str, model: str) -> Position | None:
    """The position ``token`` names (None: the first page), for the listing of ``model``."""
    if not token:
        return None
    if len(token) > _MAX_TOKEN:
        raise _malformed()
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        parsed = json.loads(raw.decode("utf-8"))
    except (binascii.Error, ValueError):
        raise _malformed() from None
    if (
        not isinstance(parsed, list)
        or len(parsed) != 4
        or parsed[0] != _VERSION
        or not all(type(n) is int and 0 <= n < 2**63 for n in parsed[1:3])
        or not isinstance(parsed[3], str)
    ):
        raise _malformed()
    if parsed[3] != model:
        given = f"model {parsed[3]!r}" if parsed[3] else "every model"
        raise InvalidArgument(
            f"page_token belongs to the listing of {given}: ask with the same model filter as "
            "the request that returned it"
        )
    return parsed[1], parsed[2]


def _malformed() -> InvalidArgument:
    return InvalidArgument(
        "page_token is not one this server gave: pass the previous answer's next_page_token "
        "unchanged, or none for the first page"
    )
