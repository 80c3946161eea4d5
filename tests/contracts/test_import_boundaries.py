"""Import boundaries that keep installs light and processes lean.

* The SDK (``ferry.client``, ``ferry.codec``, the generated ``ferry.proto``) never imports the
  server, torch or onnxruntime: ``pip install ferry-serve`` has none of them.
* The serving process never imports torch: conversion runs in child processes, so a server that
  only serves does not pay torch's memory and start-up time.
* The process boundary is the folder ``ferry/server/convert/worker/``: the child side. No module
  outside it imports it (nor torch, torchvision, onnxscript, torch_pruning), at module level or
  inside a function; the child side may import the torch-free server modules. Held statically
  (every import statement and ``importlib.import_module``/``__import__`` call with a literal name)
  and at run time (a server that served and ran a conversion has none of them loaded).

Import checks run in fresh interpreters, since this test process has imported everything.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from importscan import imports, matching

ROOT = Path(__file__).resolve().parents[2]
SDK_DIRS = [ROOT / "client" / "ferry" / d for d in ("client", "codec", "proto")]
FORBIDDEN_IN_SDK = ("ferry.server", "torch", "onnxruntime", "onnx")


def _sdk_files() -> list[Path]:
    return sorted(p for d in SDK_DIRS for p in d.rglob("*.py"))


def test_scan_finds_the_sdk() -> None:
    names = {p.relative_to(ROOT).as_posix() for p in _sdk_files()}
    assert "client/ferry/client/__init__.py" in names
    assert "client/ferry/codec/__init__.py" in names


@pytest.mark.parametrize("path", _sdk_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_sdk_source_never_imports_the_server_torch_or_onnxruntime(path: Path) -> None:
    bad = matching(imports(path), FORBIDDEN_IN_SDK)
    assert bad == [], f"{path.relative_to(ROOT)} imports {bad}"


SERVER = ROOT / "server" / "ferry" / "server"
WORKER = SERVER / "convert" / "worker"
CHILD_SIDE = ("ferry.server.convert.worker", "torch", "torchvision", "onnxscript", "torch_pruning")


def _serving_files() -> list[Path]:
    return sorted(p for p in SERVER.rglob("*.py") if WORKER not in p.parents)


def test_scan_finds_both_sides_of_the_process_boundary() -> None:
    names = {p.relative_to(SERVER).as_posix() for p in _serving_files()}
    assert {"convert/service.py", "convert/jobs.py", "convert/onnx_safety.py"} <= names
    assert not any(n.startswith("convert/worker/") for n in names)
    assert (WORKER / "child.py").is_file()


def test_the_scan_sees_hidden_imports(tmp_path: Path) -> None:
    """Function-level, relative, aliased and dynamic imports are all seen."""
    pkg = tmp_path / "ferry" / "server" / "convert"
    pkg.mkdir(parents=True)
    for folder in (pkg, pkg.parent):
        (folder / "__init__.py").write_text("")
    probe = pkg / "probe.py"
    probe.write_text(
        "import importlib\n"
        "def f():\n"
        "    from .worker import pipeline\n"
        "    from . import worker\n"
        "    import torch.nn as nn\n"
        "    importlib.import_module('torch_pruning')\n"
        "    __import__('onnxscript')\n"
    )
    assert matching(imports(probe), CHILD_SIDE) == [
        "ferry.server.convert.worker",
        "ferry.server.convert.worker.pipeline",
        "onnxscript",
        "torch.nn",
        "torch_pruning",
    ]


# The strategy registry is shared by both processes: the server reads its names and rules, the
# child runs its builders. A builder may import torch inside its body (it only ever runs in the
# child; the runtime test below proves the serving process never loads torch); nothing at module
# level may, and nothing there may import the child's modules.
STRATEGIES = SERVER / "convert" / "strategies"


@pytest.mark.parametrize("path", _serving_files(), ids=lambda p: p.relative_to(SERVER).as_posix())
def test_serving_side_never_imports_the_child_side(path: Path) -> None:
    names = imports(path)
    if STRATEGIES in path.parents:
        deferred = names - imports(path, module_level_only=True)
        names -= {n for n in deferred if matching({n}, CHILD_SIDE[1:])}
    bad = matching(names, CHILD_SIDE)
    assert bad == [], (
        f"{path.relative_to(ROOT)} imports {bad}: only ferry/server/convert/worker/ (the "
        "conversion child) may; the serving process starts the child as a subprocess"
    )


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


def test_serving_process_never_imports_torch_or_the_child_side(tmp_path: Path) -> None:
    """Build and start a real server in a fresh interpreter, serve one inference, run one ONNX
    conversion to completion with the real child and serve its result, and look."""
    result = _run(
        f"""
        import asyncio, json, sys
        import numpy as np
        from ferry.server.core.repository import ModelRepository
        from ferry.server.examples import mlp_model, write_model
        from ferry.server.grpc.app import FerryServer
        from ferry.server.settings import Settings
        from ferry.client import ConversionClient, InferenceClient

        repo = ModelRepository({str(tmp_path / "repo")!r})
        write_model(repo, "mlp", mlp_model())

        def convert(target):
            with ConversionClient(target, timeout=120) as conv:
                data = mlp_model(sizes=(8, 16, 4), seed=1).SerializeToString()
                job = conv.convert(conv.upload("converted", data, format="onnx"))
                return job.wait(progress=False).state

        async def main():
            settings = Settings(
                repository=repo.root, host="127.0.0.1", port=0, management_port=0,
                metrics_host="127.0.0.1", metrics_port=0, http_port=-1, management_http_port=-1,
            )
            app = FerryServer(settings)
            await app.start()
            try:
                with InferenceClient(f"127.0.0.1:{{app.inference_port}}", timeout=60) as client:
                    feeds = {{"input": np.ones((2, 64), np.float32)}}
                    out = await asyncio.to_thread(client.infer, "mlp", feeds)
                    state = await asyncio.to_thread(convert, f"127.0.0.1:{{app.management_port}}")
                    feeds = {{"input": np.ones((1, 8), np.float32)}}
                    converted = await asyncio.to_thread(client.infer, "converted", feeds)
                shapes = [list(out["logits"].shape), list(converted["logits"].shape)]
            finally:
                await app.stop(0)
            return shapes, state

        shapes, state = asyncio.run(main())
        child_side = ("ferry.server.convert.worker", "torch", "torchvision", "onnxscript",
                      "torch_pruning")
        loaded = sorted(m for m in sys.modules for c in child_side
                        if m == c or m.startswith(c + "."))
        print(json.dumps({{"shapes": shapes, "conversion": state, "child_side": loaded,
                          "onnxruntime": "onnxruntime" in sys.modules}}))
        """
    )
    assert result == {
        "shapes": [[2, 10], [1, 4]],
        "conversion": "SUCCEEDED",
        "child_side": [],
        "onnxruntime": True,
    }
