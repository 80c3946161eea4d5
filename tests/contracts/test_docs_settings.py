"""docs/configuration.md lists every server setting: adding one without documenting it fails."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from ferry.server.settings import Settings

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_every_setting_is_documented() -> None:
    text = DOC.read_text()
    missing = [f.name for f in fields(Settings) if f"FERRY_{f.name.upper()}" not in text]
    assert not missing, f"document these settings in docs/configuration.md: {missing}"
