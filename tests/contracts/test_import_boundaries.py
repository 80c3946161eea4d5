"""Import boundaries that keep installs light and processes lean.

* The SDK (``ferry.client``, ``ferry.codec``, the generated ``ferry.proto``) never imports the
  server, torch or onnxruntime: ``pip install ferry-serve`` has none of them.
* The serving process never imports torch: conversion runs in child processes, so a server that
  only serves does not pay torch's memory and start-up time.

Import checks run in fresh interpreters, since this test process has imported everything.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SDK_DIRS = [ROOT / "client" / "ferry" / d for d in ("client", "codec", "proto")]
FORBIDDEN_IN_SDK = ("ferry.server", "torch", "onnxruntime", "onnx")


def _imports(path: Path) -> set[str]:
    """Every module an ``import`` or ``from ... import`` in ``path`` names, at any depth."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            # ``from ferry import server`` names the module through its alias.
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _sdk_files() -> list[Path]:
    return sorted(p for d in SDK_DIRS for p in d.rglob("*.py"))


def test_scan_finds_the_sdk() -> None:
    names = {p.relative_to(ROOT).as_posix() for p in _sdk_files()}
    assert "client/ferry/client/__init__.py" in names
    assert "client/ferry/codec/__init__.py" in names


@pytest.mark.parametrize("path", _sdk_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_sdk_source_never_imports_the_server_torch_or_onnxruntime(path: Path) -> None:
    bad = sorted(
        name
        for name in _imports(path)
        for forbidden in FORBIDDEN_IN_SDK
        if name == forbidden or name.startswith(forbidden + ".")
    )
    assert bad == [], f"{path.relative_to(ROOT)} imports {bad}"


def _run(code: str) -> dict[str, object]:
    r = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    result: dict[str, object] = json.loads(r.stdout.strip().splitlines()[-1])
    return result


def test_importing_the_sdk_loads_neither_torch_nor_onnxruntime() -> None:
    loaded = _run(
        """
        import json, sys
        import ferry.client, ferry.codec
        from ferry.client import InferenceClient, RepositoryClient
        heavy = ("torch", "onnxruntime", "onnx", "ferry.server", "ml_dtypes")
        print(json.dumps({m: m in sys.modules for m in heavy}))
        """
    )
    assert loaded == {
        "torch": False,
        "onnxruntime": False,
        "onnx": False,
        "ferry.server": False,
        "ml_dtypes": False,
    }


def test_serving_process_never_imports_torch(tmp_path: Path) -> None:
    """Build and start a real server in a fresh interpreter, serve one inference, and look."""
    result = _run(
        f"""
        import asyncio, json, sys
        import numpy as np
        from ferry.server.core.repository import ModelRepository
        from ferry.server.examples import mlp_model, write_model
        from ferry.server.grpc.app import FerryServer
        from ferry.server.settings import Settings
        from ferry.client import InferenceClient

        repo = ModelRepository({str(tmp_path / "repo")!r})
        write_model(repo, "mlp", mlp_model())

        async def main():
            settings = Settings(
                repository=repo.root, host="127.0.0.1", port=0, management_port=0,
                metrics_host="127.0.0.1", metrics_port=0,
            )
            app = FerryServer(settings)
            await app.start()
            try:
                with InferenceClient(f"127.0.0.1:{{app.inference_port}}", timeout=60) as client:
                    feeds = {{"input": np.ones((2, 64), np.float32)}}
                    out = await asyncio.to_thread(client.infer, "mlp", feeds)
                shape = list(out["logits"].shape)
            finally:
                await app.stop(0)
            return shape

        shape = asyncio.run(main())
        print(json.dumps({{"shape": shape, "torch": "torch" in sys.modules,
                          "onnxruntime": "onnxruntime" in sys.modules}}))
        """
    )
    assert result == {"shape": [2, 10], "torch": False, "onnxruntime": True}
