"""``make demo``, the README's first command: examples/demo.py run as the Makefile runs it."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

DEMO = Path(__file__).resolve().parents[2] / "examples" / "demo.py"


@pytest.mark.slow
def test_the_demo_publishes_and_answers_on_both_versions(tmp_path: Path) -> None:
    """The demo converts fp32 and dynamic int8 and infers on each. Its model is so small that
    int8 runs slower than fp32, which the server refuses to publish unless asked: the demo
    stopped with a JobFailedError traceback at its second conversion."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FERRY_")}
    r = subprocess.run(
        [sys.executable, str(DEMO), "--repository", str(tmp_path / "repo"), "--duration", "1"],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        check=False,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    for label in ("fp32", "dynamic_int8"):
        assert f"== infer on {label} (version " in r.stdout, r.stdout[-3000:]
    # Each conversion is said once: "published demo version 1 (published as demo version 1:
    # ...)" read as a stutter to someone trying Ferry for the first time.
    assert r.stdout.count("published as demo version") == 2, r.stdout[-3000:]
    assert "(published as" not in r.stdout, r.stdout[-3000:]
    assert (tmp_path / "repo" / "demo" / "2" / "model.onnx").is_file()
    # The closing lines suggest `ferry loadtest mlp`: on a repository `make install` had not
    # written (`make demo REPO=other`) there was no mlp, and that answered NOT_FOUND.
    for example in ("mlp", "seed"):
        assert (tmp_path / "repo" / example / "1" / "model.onnx").is_file(), example


def _demo_module() -> Any:
    spec = importlib.util.spec_from_file_location("ferry_demo", DEMO)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_next_steps_serve_the_repository_the_demo_wrote(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After `make demo REPO=other`, the closing `make serve` served ./model-repository, which
    has no 'demo' model, so the next line (`ferry infer demo --random`) answered NOT_FOUND."""
    monkeypatch.chdir(tmp_path)
    next_steps = _demo_module().next_steps
    other = tmp_path / "other repo"
    text = next_steps(other, "t", "m", {"fp32": 1})
    assert f"make serve REPO='{other}'" in text
    default = next_steps(Path("model-repository"), "t", "m", {"fp32": 1})
    assert "make serve " in default and "REPO=" not in default
