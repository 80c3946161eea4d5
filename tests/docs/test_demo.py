"""``make demo``, the README's first command: examples/demo.py run as the Makefile runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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
    assert (tmp_path / "repo" / "demo" / "2" / "model.onnx").is_file()
