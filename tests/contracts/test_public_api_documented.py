"""docs/sdk.md names every public name of the SDK: a name exported but described nowhere (a
dozen return types were) leaves a user reading the source to learn what a call gives back."""

from __future__ import annotations

import re
from pathlib import Path

import ferry.client

SDK_DOC = Path(__file__).resolve().parents[2] / "docs" / "sdk.md"


def test_every_public_name_is_on_the_sdk_page() -> None:
    text = SDK_DOC.read_text()
    missing = [n for n in ferry.client.__all__ if not re.search(rf"`[^`]*\b{n}\b[^`]*`", text)]
    assert missing == []
