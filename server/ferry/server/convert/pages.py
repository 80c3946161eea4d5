"""Page tokens of ListUploads and ListJobs: where the next page of a listing starts.

A listing is newest first and keyed by (created_ms, row): the token names the last record a
page held, and the next page starts strictly after it. An offset would skip or repeat records
when uploads arrive or are deleted between pages (``ferry uploads delete --all`` deletes while
it lists). The token is opaque to clients (base64 of a small JSON array) and says which listing
(uploads or jobs) and which model filter it belongs to, so a token reused with another listing
or filter is refused, not misread.
"""

from __future__ import annotations

import base64
import binascii
import json

from ferry.server.errors import InvalidArgument

Position = tuple[int, int]  # (created_ms, rowid) of the last record a page held
# 2: the listing is named. A version-1 token (without it) of ListUploads was taken by ListJobs
# as a position among jobs, a page starting at the upload's time: jobs skipped, silently.
_VERSION = 2
LISTINGS = ("uploads", "jobs")
_MAX_TOKEN = 1024  # characters; a token this server gives is well under 400


def encode(position: Position, model: str, listing: str) -> str:
    raw = json.dumps([_VERSION, position[0], position[1], model, listing], separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode("utf-8")).decode("ascii").rstrip("=")


def decode(token: str, model: str, listing: str) -> Position | None:
    """The position ``token`` names (None: the first page), for ``listing`` (one of LISTINGS)
    of ``model``."""
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
        or len(parsed) != 5
        or parsed[0] != _VERSION
        or not all(type(n) is int and 0 <= n < 2**63 for n in parsed[1:3])
        or not isinstance(parsed[3], str)
        or parsed[4] not in LISTINGS
    ):
        raise _malformed()
    if parsed[4] != listing:
        raise InvalidArgument(
            f"page_token belongs to the listing of {parsed[4]}, not of {listing}: pass each "
            "listing the next_page_token its own previous answer gave"
        )
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
