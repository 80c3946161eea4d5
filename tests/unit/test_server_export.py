"""The server's own export (a state_dict with an architecture, TorchScript, a .pt2) of models
the torch.export-based exporter takes only under no_grad."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from ferry.server.convert.spec import InputSpec
from ferry.server.convert.worker import export, nets
from ferry.server.convert.worker.load import Source


def _exported(module: torch.nn.Module, spec: InputSpec, path: Path, out: str) -> export.Exported:
    source = Source("state_dict", [spec], True, module=module.eval())
    return export.export(source, export.example_inputs(source), [out], path, 18)


def test_t5_encoder_exports_with_the_first_exporter(tmp_path: Path) -> None:
    """Traced with autograd on, the torch.export-based exporter failed on T5's attention
    ("Cannot view a tensor with shape [s72, 8, 4, 8]"), and the server fell back to the legacy
    exporter with a note; exported under no_grad it takes the first route and answers as
    PyTorch does at another batch size."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.T5Config(
        vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4
    )
    t5 = transformers.T5EncoderModel(config)
    path = tmp_path / "t5.onnx"
    spec = InputSpec("input_ids", "INT64", [-1, 8])
    result = _exported(t5, spec, path, "last_hidden_state")
    assert result.exporter == export.DYNAMO and result.notes == [], result.notes
    ids = np.random.default_rng(1).integers(0, 100, (3, 8)).astype(np.int64)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"input_ids": ids})
    with torch.no_grad():
        want = t5(torch.from_numpy(ids)).last_hidden_state.numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_torch_transformer_encoder_still_exports_with_the_first_exporter(tmp_path: Path) -> None:
    """Under no_grad nn.TransformerEncoder may take its fused fast path: the export must not."""
    torch.manual_seed(0)
    model = nets.TransformerEncoderNet(num_classes=10)
    path = tmp_path / "te.onnx"
    result = _exported(model, InputSpec("x", "FP32", [-1, 16, 64]), path, "output")
    assert result.exporter == export.DYNAMO and result.notes == [], result.notes
    x = np.random.default_rng(1).standard_normal((3, 16, 64)).astype(np.float32)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"x": x})
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
