"""The server's layers, held by its imports (a static scan of every module, function-level
imports included):

* protocol adapters reach the serving core only through its door (``core.dataplane``), its
  vocabulary (``core.types``) and the wire-size check (``core.inputs``): never the registry,
  loaded versions, statistics, repository or runtime;
* the core knows no wire format, no runtime and no conversion: it imports none of ``grpc``,
  ``ferry.server.grpc``, ``ferry.server.runtime``, ``ferry.server.convert``, onnxruntime;
* the runtime implements the core's ``Session`` and never reaches back into adapters;
* no adapter imports the server assembly (``grpc.app``): adapters get their dependencies
  explicitly, never the whole app.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from importscan import imports, matching, under

ROOT = Path(__file__).resolve().parents[2]
SERVER = ROOT / "server" / "ferry" / "server"

ADAPTERS = [
    p
    for folder in ("grpc", "http", "workers")
    for p in sorted((SERVER / folder).glob("*.py"))
    if p.name not in ("app.py", "__init__.py")
]
CORE = sorted((SERVER / "core").glob("*.py"))
RUNTIME = sorted((SERVER / "runtime").glob("*.py"))
DOOR = ("ferry.server.core.dataplane", "ferry.server.core.types", "ferry.server.core.inputs")
# The conversion adapter's core is the conversion service, not the serving core.
CONVERSION_ADAPTER = SERVER / "grpc" / "conversion.py"


def _rel(p: Path) -> str:
    return p.relative_to(ROOT).as_posix()


def test_the_scan_finds_the_layers() -> None:
    names = {p.name for p in ADAPTERS}
    assert {"inference.py", "kserve.py", "repository.py", "conversion.py", "oip.py"} <= names
    assert {"dataplane.py", "registry.py", "types.py"} <= {p.name for p in CORE}
    assert {"session.py", "providers.py"} <= {p.name for p in RUNTIME}


@pytest.mark.parametrize("path", ADAPTERS, ids=_rel)
def test_adapters_go_through_the_door(path: Path) -> None:
    bad = sorted(
        name
        for name in imports(path)
        if under(name, "ferry.server.core")
        and name != "ferry.server.core"
        and not any(under(name, door) for door in DOOR)
    )
    bad += matching(imports(path), ("ferry.server.runtime", "ferry.server.grpc.app"))
    if path == CONVERSION_ADAPTER:  # its core is the conversion service; it reads ModelView
        bad = [n for n in bad if not under(n, "ferry.server.core.versions")]
    assert bad == [], f"{_rel(path)} reaches past the core's door: {bad}"


@pytest.mark.parametrize("path", CORE, ids=_rel)
def test_the_core_knows_no_wire_format_runtime_or_conversion(path: Path) -> None:
    forbidden = (
        "grpc",
        "ferry.server.grpc",
        "ferry.server.http",
        "aiohttp",
        "ferry.server.runtime",
        "ferry.server.convert",
        "ferry.server.metrics",
        "onnxruntime",
        "torch",
        "prometheus_client",
    )
    bad = matching(imports(path), forbidden)
    assert bad == [], f"{_rel(path)} imports {bad}"


@pytest.mark.parametrize("path", RUNTIME, ids=_rel)
def test_the_runtime_never_reaches_back(path: Path) -> None:
    forbidden = ("grpc", "ferry.server.grpc", "ferry.server.convert", "ferry.server.core.dataplane")
    forbidden += ("ferry.server.core.registry", "ferry.server.core.loaded")
    bad = matching(imports(path), forbidden)
    assert bad == [], f"{_rel(path)} imports {bad}"
