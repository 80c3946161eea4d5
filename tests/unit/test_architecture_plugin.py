"""The plugin route of docs/conversion.md, for real: examples/ferry-architecture-plugin is
installed with pip into a folder, the server (and its conversion child) see that folder on their
path, and a state_dict of the plugin's class is converted with structured pruning over gRPC.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from serverutil import ServerThread

from ferry.client import ConversionClient, InferenceClient, Pruning, Validation
from ferry.server.convert import architectures

ROOT = Path(__file__).resolve().parents[2]
PLUGIN = ROOT / "examples" / "ferry-architecture-plugin"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """pip-install the example into a folder, once for the module (from a copy: the build writes
    next to its sources). Nothing writes to that folder afterwards."""
    tmp = tmp_path_factory.mktemp("plugin")
    source = tmp / "plugin"
    shutil.copytree(PLUGIN, source)
    site = tmp / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
         "--no-build-isolation", "--target", str(site), str(source)],
        check=True,
        timeout=300,
    )  # fmt: skip
    return site


@pytest.fixture
def installed(site: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The installed example on this process's path and the child's PYTHONPATH, for one test."""
    monkeypatch.syspath_prepend(str(site))
    path = os.environ.get("PYTHONPATH", "")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(site), path])))
    return site


def test_pip_install_registers_the_entry_point(installed: Path) -> None:
    assert "tiny_convnet" in architectures.available()
    entry = architectures.entry_points()["tiny_convnet"]
    assert entry.value == "ferry_example_plugin.nets:build_tiny_convnet"
    assert Path(str(entry.dist.locate_file(""))) == installed  # type: ignore[union-attr]


@pytest.mark.slow
def test_a_plugin_architecture_converts_with_structured_pruning(
    installed: Path, tmp_path: Path
) -> None:
    import torch
    from ferry_example_plugin.nets import TinyConvNet

    torch.manual_seed(0)
    model = TinyConvNet(width=8).eval()
    torch.save(model.state_dict(), tmp_path / "tiny.pth")
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    repo = tmp_path / "repo"
    repo.mkdir()
    with (
        ServerThread(repo) as srv,
        ConversionClient(srv.management_target, timeout=120) as conv,
    ):
        up = conv.upload(
            "tiny",
            tmp_path / "tiny.pth",
            format="state_dict",
            architecture="tiny_convnet",
            architecture_kwargs={"width": 8},
        )
        job = conv.convert(
            up,
            inputs=[("input", "FP32", [-1, 3, 16, 16])],
            pruning=Pruning("structured", 0.5),
            # An untrained CNN pruned by half without fine-tuning: the budget is not the point.
            validation=Validation(keep_failed=True),
            benchmark="off",
        )
        done = job.wait(progress=False)
        assert done.report is not None and done.report.pruning is not None
        assert done.report.raw["architecture"] == "tiny_convnet"
        pruning = done.report.pruning
        assert pruning.method == "structured"
        assert pruning.params_after < 0.5 * pruning.params_before  # channels went, not zeros
        with InferenceClient(srv.target, timeout=60) as client:
            got = client.infer("tiny", {"input": x.numpy()})
        assert np.asarray(next(iter(got.values()))).shape == (4, 10)
    served = onnx.load(str(repo / "tiny" / str(done.version) / "model.onnx"))
    conv_out = sorted(t.dims[0] for t in served.graph.initializer if len(t.dims) == 4)
    assert conv_out == [4, 8]  # 8 and 16 channels halved; the classifier keeps its 10 outputs
