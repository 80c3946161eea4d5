"""Dynamic axes besides the batch, end to end (issue 13 item 8).

A transformer user declares the sequence length dynamic, with bounds: the SDK exports it
symbolic, the real conversion child runs the graph at both bounds, the published file carries
them, and the served version answers at every length in between as PyTorch does, keeps the
model's own output names, and refuses a length outside the bounds with INVALID_ARGUMENT. The
server-side export (a state_dict with a registered architecture) honours declared axes too.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnx
import pytest
from serverutil import ConversionServers, ServerThread

from ferry.client import (
    ConversionClient,
    ConversionError,
    DynamicAxis,
    InferenceClient,
    InputSpec,
    InvalidInputError,
    JobFailedError,
)

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.slow

Start = Callable[[], tuple[ServerThread, ConversionClient]]
SEQ = DynamicAxis("sequence", min=2, max=24)


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Start]:
    """A server with the real conversion child on tmp_path/repo."""
    servers = ConversionServers(tmp_path / "repo", timeout=180)
    yield servers.start
    servers.close()


def _bert() -> Any:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        vocab_size=100, max_position_embeddings=24,
    )  # fmt: skip
    return transformers.BertModel(config).eval()


def _tokens(batch: int, length: int, seed: int) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (batch, length), generator=gen)
    mask = torch.ones(batch, length, dtype=torch.int64)
    mask[0, length // 2 :] = 0
    return {"input_ids": ids, "attention_mask": mask}


def test_a_bert_serves_every_sequence_length_within_its_bounds(start: Start) -> None:
    bert = _bert()
    srv, conv = start()
    up = conv.upload(
        "bert",
        bert,
        example_inputs=_tokens(3, 8, seed=1),
        dynamic_axes={"input_ids": {1: SEQ}, "attention_mask": {1: SEQ}},
    )
    assert {s.name: dict(s.dynamic_axes) for s in up.inputs} == {
        "input_ids": {1: SEQ},
        "attention_mask": {1: SEQ},
    }
    done = conv.convert(up, benchmark="off").wait(progress=False)
    assert done.report is not None
    notes = " ".join(done.report.raw["notes"])
    assert "sequence=2" in notes and "sequence=24" in notes, notes
    path = srv.settings.repository / "bert" / "1" / "model.onnx"
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(props["ferry.dynamic_axes"]) == {
        "attention_mask": {"1": ["sequence", 2, 24]},
        "input_ids": {"1": ["sequence", 2, 24]},
    }
    with InferenceClient(srv.target, timeout=60) as client:
        for batch, length in ((1, 2), (2, 5), (3, 24)):
            feed = _tokens(batch, length, seed=length)
            got = dict(client.infer("bert", {k: v.numpy() for k, v in feed.items()}))
            with torch.no_grad():
                want = bert(**feed)
            assert set(got) == {"last_hidden_state", "pooler_output"}  # the model's own names
            for name, value in got.items():
                np.testing.assert_allclose(value, want[name].numpy(), rtol=1e-4, atol=1e-4)
        too_long = {k: v.numpy() for k, v in _tokens(1, 25, seed=3).items()}
        with pytest.raises(InvalidInputError) as err:
            client.infer("bert", too_long)
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "dim 1 (sequence) is 25, outside 2..24" in err.value.message
        mixed = {"input_ids": too_long["input_ids"][:, :10], "attention_mask": too_long[
            "attention_mask"][:, :12]}  # fmt: skip
        with pytest.raises(InvalidInputError, match="inputs disagree on sequence"):
            client.infer("bert", mixed)


class Recurrent(torch.nn.Module):
    """A GRU's states for every step and its last one: the exporter writes the example's length
    into the first output's declared shape, though it follows the input's."""

    def __init__(self) -> None:
        super().__init__()
        self.gru = torch.nn.GRU(4, 6, batch_first=True)

    def forward(self, x: Any) -> Any:
        states, last = self.gru(x)
        return states, last.transpose(0, 1)


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_every_recurrent_upload_in_one_process_keeps_its_sequence_dynamic(kind: str) -> None:
    """The second upload of a GRU in one process was refused ("the exporter fixed dim 1"):
    torch's while-loop decomposition for the export left a stale dispatch cache behind."""
    from ferry.client._module_upload import from_module

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            rnn = torch.nn.GRU if kind == "gru" else torch.nn.LSTM
            self.rnn = rnn(4, 6, batch_first=True)

        def forward(self, x: Any) -> Any:
            return self.rnn(x)[0][:, -1]

    for seed in range(2):
        torch.manual_seed(seed)
        data, _, extras = from_module(
            torch, Net().eval(), torch.randn(2, 8, 4), None, 18, dynamic_axes={"x": {1: "seq"}}
        )
        shape = onnx.load(str(data)).graph.input[0].type.tensor_type.shape.dim
        assert shape[1].dim_param, f"upload {seed + 1} fixed the sequence length"
        assert extras["inputs"][0].dynamic_axes[1].name == "seq"
        data.unlink()


def test_an_output_that_follows_a_dynamic_axis_is_published_dynamic(start: Start) -> None:
    """The published metadata said states was [-1, 12, 6] while every answer at another
    length had that length: a client sizing buffers from the metadata was misled."""
    torch.manual_seed(0)
    module = Recurrent().eval()
    srv, conv = start()
    up = conv.upload(
        "gru",
        module,
        example_inputs=torch.randn(2, 12, 4),
        dynamic_axes={"x": {1: DynamicAxis("steps", min=1, max=30)}},
    )
    conv.convert(up, benchmark="off").wait(progress=False)
    with InferenceClient(srv.target, timeout=60) as client:
        shapes = {o.name: o.shape for o in client.model_metadata("gru").outputs}
        assert list(shapes.values()) == [(-1, -1, 6), (-1, 1, 6)], shapes
        x = torch.randn(2, 30, 4)
        got = client.infer("gru", {"x": x.numpy()})
        with torch.no_grad():
            want = module(x)
        for value, expected in zip(got.values(), want, strict=True):
            np.testing.assert_allclose(value, expected.numpy(), rtol=1e-4, atol=1e-5)


class FixedLength(torch.nn.Module):
    """Reshapes with a literal sequence length: it cannot be exported with that dim dynamic."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)

    def forward(self, x: Any) -> Any:
        return self.linear(x).reshape(x.shape[0], 8 * 4)


def test_a_model_that_fixes_a_declared_axis_is_refused_before_upload(
    start: Start, capfd: pytest.CaptureFixture[str]
) -> None:
    """torch.export fixes the dim without a word; the SDK reads the graph back and says which
    dim, and nothing reaches the server (no upload is kept) or the terminal."""
    _, conv = start()
    capfd.readouterr()
    with pytest.raises(InvalidInputError, match=r"exporter fixed dim 1 \(sequence\) of 'x' to 8"):
        conv.upload(
            "fixed",
            FixedLength().eval(),
            example_inputs=torch.randn(2, 8, 4),
            dynamic_axes={"x": {1: DynamicAxis("sequence", max=16)}},
        )
    assert capfd.readouterr() == ("", "")
    assert conv.list_uploads() == []


class AdaptivePool(torch.nn.Module):
    """A conv, then adaptive pooling to 4x4: [N, 32] at every image size."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 2, 3, padding=1)

    def forward(self, x: Any) -> Any:
        return torch.nn.functional.adaptive_avg_pool2d(self.conv(x), (4, 4)).flatten(1)


def test_an_export_that_computes_another_function_at_other_sizes_is_refused(
    start: Start,
) -> None:
    """torch.export traced the adaptive pooling with the example's kernel: the graph answered
    [N, 8] at 8x8 where the module answers [N, 32], the server (which has only the graph)
    published it, and every request at another image size got a wrong answer."""
    _, conv = start()
    side = DynamicAxis("side", min=8, max=64)
    with pytest.raises(ConversionError) as info:
        conv.upload(
            "pool",
            AdaptivePool().eval(),
            example_inputs=torch.randn(2, 3, 16, 16),
            dynamic_axes={"x": {2: side, 3: side}},
        )
    assert info.value.kind == "CONVERSION_FAILED"
    assert "exports wrongly at side=8 (the example has 16)" in info.value.message
    assert "'output' has shape [2, 8] where the module's is [2, 32]" in info.value.message
    assert conv.list_uploads() == []


@pytest.mark.parametrize(
    ("axes", "match"),
    [
        ({"x": {0: "batch"}}, "dim 0, the batch, is always dynamic"),
        ({"y": {1: "sequence"}}, "'y', which is not an input"),
        ({"x": {1: DynamicAxis("sequence", min=10, max=16)}}, "example's size 8 must lie"),
        ({"x": {3: "sequence"}}, "dims 1..2 of 'x' can be declared"),
    ],
)
def test_wrong_declarations_are_refused_with_what_to_fix(
    start: Start, axes: dict[str, Any], match: str
) -> None:
    _, conv = start()
    with pytest.raises(InvalidInputError, match=match):
        conv.upload(
            "m", FixedLength().eval(), example_inputs=torch.randn(2, 8, 4), dynamic_axes=axes
        )


def test_the_server_export_honours_declared_axes_and_the_bounds_it_ran(start: Start) -> None:
    """A state_dict of a built-in architecture, with a spatial side declared dynamic: the child
    exports it symbolic, runs it at both bounds, and the served version takes other sizes."""
    from ferry.server.convert.worker import nets  # the built-in architectures

    srv, conv = start()
    torch.manual_seed(0)
    kwargs = {"width": 8, "depth": 2}
    model = nets.small_cnn(**kwargs).eval()
    up = conv.upload("cnn", model, architecture="small_cnn", architecture_kwargs=kwargs,
                     example_inputs=torch.randn(2, 3, 16, 16))  # fmt: skip
    side = DynamicAxis("side", min=8, max=32)
    spec = InputSpec("input", "FP32", [-1, 3, 16, 16], {2: side, 3: DynamicAxis("side2", 8, 32)})
    done = conv.convert(up, inputs=[spec], benchmark="off").wait(progress=False)
    assert done.report is not None and "side=8" in " ".join(done.report.raw["notes"])
    with InferenceClient(srv.target, timeout=60) as client:
        x = np.random.default_rng(0).standard_normal((2, 3, 24, 12)).astype(np.float32)
        got = client.infer("cnn", {"input": x})["output"]
        with torch.no_grad():
            want = model(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
        with pytest.raises(InvalidInputError, match=r"dim 2 \(side\) is 40, outside 8..32"):
            client.infer("cnn", {"input": np.zeros((1, 3, 40, 16), np.float32)})


def test_declared_axis_on_an_onnx_graph_that_fixes_it_fails_the_job(
    start: Start, tmp_path: Path
) -> None:
    """An ONNX upload whose graph fixes the declared dim: the job says which dim and how."""
    module = torch.nn.Linear(4, 4).eval()
    path = tmp_path / "fixed.onnx"
    torch.onnx.export(module, (torch.randn(2, 8, 4),), str(path), dynamo=False,
                      input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "b"}})  # fmt: skip
    _, conv = start()
    up = conv.upload("fixedonnx", path)
    spec = InputSpec("x", "FP32", [-1, 8, 4], {1: DynamicAxis("sequence", max=16)})
    with pytest.raises(JobFailedError, match=r"dim 1 \(sequence\) is declared dynamic, but the "):
        conv.convert(up, inputs=[spec], benchmark="off").wait(progress=False)


class GruThenLstm(torch.nn.Module):
    """A batch-first GRU, then a seq-first LSTM fed its [batch, time, ...] states: the LSTM
    takes the batch for its time, and the export writes the example's sizes into Reshapes."""

    def __init__(self) -> None:
        super().__init__()
        self.gru = torch.nn.GRU(6, 12, batch_first=True)
        self.lstm = torch.nn.LSTM(12, 8)

    def forward(self, x: Any) -> Any:
        return self.lstm(self.gru(x)[0])[0]


def test_a_source_that_answers_other_rows_at_another_length_fails_the_job_not_the_child(
    start: Start,
) -> None:
    """At another length of the declared axis the source model answered 4 rows for 8 (its
    Reshape fixed to the example's size), and judging its answers row by row crashed the
    conversion child: INTERNAL, "operands could not be broadcast together". That length is
    left out with a note, and the job fails on what is wrong: the batch fixed inside."""
    torch.manual_seed(0)
    _, conv = start()
    up = conv.upload(
        "gl",
        GruThenLstm().eval(),
        example_inputs=torch.randn(4, 9, 6),
        dynamic_axes={"x": {1: DynamicAxis("t", 1, 64)}},
    )
    with pytest.raises(JobFailedError) as info:
        conv.convert(up, benchmark="off").wait(progress=False)
    message = str(info.value)
    assert "crashed" not in message and "broadcast" not in message, message
    assert "do not have the batch dim first" in message, message
