"""The committed generated code matches the .proto files, and the checker really checks."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).with_name("check_protos.py")


def _checker() -> ModuleType:
    spec = importlib.util.spec_from_file_location("check_protos", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_code_is_fresh() -> None:
    """``make check-protos``: fails the suite when someone edits a .proto without `make protos`."""
    r = subprocess.run(
        [sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=300, check=False
    )
    assert r.returncode == 0, r.stderr


def test_checker_reports_missing_extra_and_stale_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checker = _checker()
    copy = tmp_path / "client"
    shutil.copytree(checker.OUTPUT / "ferry" / "proto", copy / "ferry" / "proto")
    proto = copy / "ferry" / "proto" / "v1"
    (proto / "tensor_pb2.pyi").unlink()
    (proto / "old_pb2.py").write_text("# a module of a deleted .proto\n")
    with (proto / "inference_pb2.py").open("a") as fh:
        fh.write("# hand edit\n")
    (proto / "__pycache__").mkdir(exist_ok=True)
    (proto / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"ignored")
    monkeypatch.setattr(checker, "OUTPUT", copy)
    assert checker.problems() == [
        "missing: client/ferry/proto/v1/tensor_pb2.pyi (generated from protos/ but not committed)",
        "extra: client/ferry/proto/v1/old_pb2.py (no .proto generates it)",
        "stale: client/ferry/proto/v1/inference_pb2.py (differs from what protoc generates)",
    ]
    assert checker.main() == 1
