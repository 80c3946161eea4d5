"""A model Ferry published can be uploaded to Ferry again, as it is (issue 13 item 6).

onnxruntime's optimizer and quantizer declare every opset domain they know
(``ai.onnx.training``, ``com.microsoft.nchwc``...) in the files they write, and the upload
check once refused those: a user who downloaded a published version could not upload it to
another Ferry. Here each mode's published file, taken from the repository folder byte for byte,
is uploaded and converted again, and the second version answers as the first does.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from serverutil import ServerThread

from ferry.client import ConversionClient, InferenceClient, Quantization
from ferry.server.examples import mlp_model

pytestmark = pytest.mark.slow


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[ServerThread, ConversionClient]]:
    repo = tmp_path / "repo"
    repo.mkdir()
    srv = ServerThread(repo).start()
    client = ConversionClient(srv.management_target, timeout=180)
    yield srv, client
    client.close()
    srv.stop()


@pytest.mark.parametrize("mode", ["none", "fp16", "dynamic_int8"])
def test_a_published_file_uploads_and_converts_again(
    server: tuple[ServerThread, ConversionClient], tmp_path: Path, mode: str
) -> None:
    srv, conv = server
    source = tmp_path / "mlp.onnx"
    onnx.save(mlp_model(), str(source))
    quantization = Quantization(mode=mode, keep_slower=True)
    first = conv.convert(conv.upload("first", source), quantization=quantization, benchmark="quick")
    first.wait(progress=False)
    published = srv.settings.repository / "first" / "1" / "model.onnx"
    declared = {o.domain for o in onnx.load(str(published)).opset_import}
    used = {n.domain for n in onnx.load(str(published)).graph.node}
    assert declared <= used | {"", "ai.onnx"}, f"declares unused domains {declared - used}"

    again = conv.upload("again", published.read_bytes(), format="onnx")
    second = conv.convert(again, quantization="none", benchmark="off").wait(progress=False)
    assert second.report is not None and second.report.published == "fp32"
    x = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    with InferenceClient(srv.target, timeout=60) as client:
        want = client.infer("first", {"input": x})["logits"]
        got = client.infer("again", {"input": x})["logits"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
