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


def _rows() -> dict[str, list[tuple[str, str]]]:
    """The settings table: environment variable -> every (flag, default) row naming it."""
    rows: dict[str, list[tuple[str, str]]] = {}
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[1].strip("`").startswith("FERRY_"):
            rows.setdefault(cells[1].strip("`"), []).append((cells[0], cells[2].strip("`")))
    return rows


def test_each_setting_has_one_row_with_its_flag_and_the_default_help_prints() -> None:
    """The table once listed --http-port twice and defaults --help spells otherwise (30 for
    30.0): a reader comparing the two could not tell which was true."""
    rows = _rows()
    wrong = []
    for f in fields(Settings):
        found = rows.pop(f"FERRY_{f.name.upper()}", [])
        if len(found) != 1:
            wrong.append(f"{f.name}: {len(found)} rows")
            continue
        flag, default = found[0]
        if f.metadata.get("flag", True) and flag != f"`--{f.name.replace('_', '-')}`":
            wrong.append(f"{f.name}: flag {flag}")
        if default != str(f.default):
            wrong.append(f"{f.name}: default {default!r}, --help says {f.default}")
    wrong += [f"{env}: no such setting" for env in rows]
    assert not wrong, wrong
