"""Fail when the committed generated code differs from what ``make protos`` would write.

Regenerates every ``protos/**/*.proto`` into a temporary folder with the pinned grpcio-tools and
compares the result with ``client/ferry/proto`` in both directions: a file missing there, an extra
file there (a stale module of a deleted .proto), or a file whose content differs. Exits 1 with one
line per problem and the command that fixes them; 0 when fresh.

Run as ``python tests/contracts/check_protos.py`` (``make check-protos``) from any directory.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTOS = ROOT / "protos"
OUTPUT = ROOT / "client"
GENERATED = Path("ferry") / "proto"
# Byproducts of importing or caching the generated modules, not generated files.
IGNORED_PARTS = frozenset({"__pycache__"})
IGNORED_SUFFIXES = frozenset({".pyc", ".pyo"})


def _files(base: Path) -> dict[str, bytes]:
    """Relative path -> content of every file under ``base/ferry/proto``."""
    top = base / GENERATED
    out: dict[str, bytes] = {}
    if not top.is_dir():
        return out
    for path in sorted(top.rglob("*")):
        rel = path.relative_to(base)
        if not path.is_file() or IGNORED_PARTS & set(rel.parts):
            continue
        if path.suffix in IGNORED_SUFFIXES:
            continue
        out[rel.as_posix()] = path.read_bytes()
    return out


def generate(into: Path) -> None:
    protos = sorted(p.relative_to(PROTOS).as_posix() for p in PROTOS.rglob("*.proto"))
    if not protos:
        raise SystemExit(f"check-protos: no .proto files under {PROTOS}")
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{PROTOS}",
        f"--python_out={into}",
        f"--grpc_python_out={into}",
        f"--pyi_out={into}",
        *protos,
    ]
    result = subprocess.run(cmd, cwd=PROTOS, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"check-protos: protoc failed:\n{result.stderr.strip()}")


def problems() -> list[str]:
    """Every difference between fresh generated code and the committed one, as messages."""
    with tempfile.TemporaryDirectory(prefix="ferry-protos-") as tmp:
        generate(Path(tmp))
        fresh = _files(Path(tmp))
    committed = _files(OUTPUT)
    out = []
    for rel in sorted(fresh.keys() - committed.keys()):
        out.append(f"missing: client/{rel} (generated from protos/ but not committed)")
    for rel in sorted(committed.keys() - fresh.keys()):
        out.append(f"extra: client/{rel} (no .proto generates it)")
    for rel in sorted(fresh.keys() & committed.keys()):
        if fresh[rel] != committed[rel]:
            out.append(f"stale: client/{rel} (differs from what protoc generates)")
    return out


def main() -> int:
    found = problems()
    if not found:
        print("check-protos: generated code is fresh")
        return 0
    for line in found:
        print(f"check-protos: {line}", file=sys.stderr)
    print("check-protos: run `make protos` and commit the result", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
