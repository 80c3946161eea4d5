"""Module uploads bind example inputs by name, end to end (issue 13 item 1).

A dict of example inputs out of ``forward()``'s order once produced a served model that took
``attention_mask`` as ``input_ids`` while its job SUCCEEDED with parity 1.0: the reference outputs
came from the same swapped call. Here the SDK exports, the real conversion child converts, the
served model is queried by input name, and its outputs are compared with the user's own call
``module(*args, **kwargs)`` in torch. The last tests plant that swap and require the server's
validation to fail the job.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from serverutil import ConversionServers, ServerThread

from ferry.client import (
    ConversionClient,
    ConversionError,
    FerryError,
    InferenceClient,
    InvalidInputError,
    JobFailedError,
    Validation,
)

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.slow

Start = Callable[[], tuple[ServerThread, ConversionClient]]


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Start]:
    """A server with the real conversion child on tmp_path/repo."""
    servers = ConversionServers(tmp_path / "repo")
    yield servers.start
    servers.close()


class XY(torch.nn.Module):
    """Asymmetric in x and y, so that a swap shows in every output."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3, 3)

    def forward(self, x: Any, y: Any, z: Any = None) -> Any:
        out = self.linear(2 * x - y)
        return out if z is None else out + 10 * z


def _rand(*shape: int, seed: int) -> Any:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _served(srv: ServerThread, model: str, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    with InferenceClient(srv.target, timeout=60) as client:
        return dict(client.infer(model, feed))


def _numpy(named: dict[str, Any]) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in named.items()}


def test_bert_with_a_tokenizer_ordered_dict_serves_the_right_model(start: Start) -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        vocab_size=100,
    )  # fmt: skip
    bert = transformers.BertModel(config).eval()
    ids = torch.randint(1, 100, (3, 8), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 8, dtype=torch.int64)
    mask[0, 5:] = 0
    mask[2, 3:] = 0
    examples = {"attention_mask": mask, "input_ids": ids}  # not forward()'s order
    srv, conv = start()
    up = conv.upload("bert", bert, example_inputs=examples)
    assert sorted(s.name for s in up.inputs) == ["attention_mask", "input_ids"]
    assert all(s.datatype == "INT64" for s in up.inputs)
    done = conv.convert(up).wait(progress=False)
    assert done.report is not None and done.report.raw["reference"]["max_abs"] < 1e-4
    # Parity against the module's own outputs, in typed fields (not only in report.raw).
    parity, fp32 = done.report.parity, done.report.variant("fp32")
    assert parity is not None and parity.against == "pytorch (reference_outputs)"
    assert parity.max_abs < 1e-4 and parity.samples == 3
    assert fp32 is not None and fp32.vs_pytorch is not None and fp32.vs_pytorch.cosine > 0.9999
    assert done.report.reference is not None and done.report.reference.max_abs < 1e-4
    got = _served(srv, "bert", _numpy(examples))
    with torch.no_grad():
        want = bert(**examples)
    assert set(got) == {"last_hidden_state", "pooler_output"}  # the model's own names
    for name in got:
        np.testing.assert_allclose(got[name], want[name].numpy(), rtol=1e-4, atol=1e-4)
    # The swap the old SDK made would be far off: the check above can see it.
    with torch.no_grad():
        swapped = bert(input_ids=mask, attention_mask=ids.clamp(max=1))
    assert np.abs(got["last_hidden_state"] - swapped.last_hidden_state.numpy()).max() > 0.1


def test_a_t5_encoder_uploads_and_serves_its_outputs(start: Start) -> None:
    """Exported with autograd on, torch's decompositions failed on T5's attention ("Cannot
    view a tensor with shape [s43, 12, 4, 8] and strides ..."): the upload was refused though
    the model exports under no_grad, the mode its reference outputs are computed in."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.T5Config(
        d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, vocab_size=100,
        relative_attention_num_buckets=8, relative_attention_max_distance=16,
    )  # fmt: skip
    t5 = transformers.T5EncoderModel(config).eval()
    ids = torch.randint(1, 100, (3, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 12, dtype=torch.int64)
    srv, conv = start()
    up = conv.upload("t5", t5, example_inputs={"input_ids": ids, "attention_mask": mask})
    conv.convert(up).wait(progress=False)
    fresh = torch.randint(1, 100, (2, 12), generator=torch.Generator().manual_seed(2))
    got = _served(srv, "t5", {"input_ids": fresh.numpy(), "attention_mask": mask[:2].numpy()})
    with torch.no_grad():
        want = t5(input_ids=fresh, attention_mask=mask[:2]).last_hidden_state.numpy()
    np.testing.assert_allclose(got["last_hidden_state"], want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "form", ["dict in reverse order", "tuple", "(args, kwargs)", "tuple then dict"]
)
def test_every_form_of_example_inputs_serves_the_users_call(start: Start, form: str) -> None:
    torch.manual_seed(1)
    module = XY().eval()
    x, y, z = (_rand(4, 3, seed=s) for s in (1, 2, 3))
    examples, args, kwargs = {
        "dict in reverse order": ({"y": y, "x": x}, (), {"y": y, "x": x}),
        "tuple": ((x, y), (x, y), {}),
        "(args, kwargs)": (((x,), {"z": z, "y": y}), (x,), {"z": z, "y": y}),
        "tuple then dict": ((x, {"y": y}), (x,), {"y": y}),
    }[form]
    srv, conv = start()
    up = conv.upload("xy", module, example_inputs=examples)
    conv.convert(up).wait(progress=False)
    feed = {"x": x.numpy(), "y": y.numpy(), **({"z": z.numpy()} if "z" in kwargs else {})}
    assert {s.name for s in up.inputs} == set(feed)
    with torch.no_grad():
        want = module(*args, **kwargs).numpy()
    np.testing.assert_allclose(_served(srv, "xy", feed)["output"], want, rtol=1e-4, atol=1e-5)


def test_a_key_that_is_not_a_parameter_is_refused_before_anything_is_sent(start: Start) -> None:
    _, conv = start()
    x = _rand(2, 3, seed=1)
    with pytest.raises(InvalidInputError, match=r"'w'.*its parameters are \(x, y, z\)"):
        conv.upload("xy", XY(), example_inputs={"x": x, "w": x})
    assert conv.list_jobs() == []


class Lookup(torch.nn.Module):
    """Scores each row of x against every row of a table of its own length."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3, 3)

    def forward(self, x: Any, table: Any) -> Any:
        return self.linear(x) @ table.T


def test_inputs_of_different_batch_sizes_are_refused_with_the_rule(start: Start) -> None:
    """A table of 5 rows beside 8 samples failed inside torch.export with a page of exporter
    text ("L['table'].size()[0] = 5 is not equal to L['x'].size()[0] = 8")."""
    _, conv = start()
    examples = {"x": _rand(8, 3, seed=1), "table": _rand(5, 3, seed=2)}
    with pytest.raises(InvalidInputError) as info:
        conv.upload("lookup", Lookup().eval(), example_inputs=examples)
    message = str(info.value)
    assert "disagree on dim 0 ('x' has 8, 'table' has 5)" in message, message
    assert "dim 0 of every input is the batch" in message and "buffer or parameter" in message
    assert conv.list_uploads() == []


class BranchOnValue(torch.nn.Module):
    """A Python ``if`` on a tensor's value: torch.export cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3, 3)

    def forward(self, x: Any) -> Any:
        y = self.linear(x)
        if y.sum() > 0:
            return y * 2
        return -y


def test_a_module_torch_cannot_export_raises_a_ferry_error(start: Start) -> None:
    """torch's TorchExportError escaped upload(), a page of exporter text that `except
    FerryError` (every exception the SDK raises, by its docs) did not catch."""
    _, conv = start()
    with pytest.raises(ConversionError) as info:
        conv.upload("branch", BranchOnValue().eval(), example_inputs=_rand(4, 3, seed=1))
    err = info.value
    assert isinstance(err, FerryError) and err.kind == "CONVERSION_FAILED"
    assert "BranchOnValue cannot be exported to ONNX (" in err.message
    assert "data-dependent" in err.message and "torch.where or torch.cond" in err.message
    assert "\x1b[" not in err.message  # the exporter's terminal colours stay out
    assert err.__cause__ is not None  # the exporter's own exception, for its details
    assert conv.list_uploads() == []


class RunningMean(torch.nn.Module):
    """Updates a running mean in forward whatever the mode, and normalizes by it."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3, 3)
        self.register_buffer("mean", torch.zeros(3))

    def forward(self, x: Any) -> Any:
        self.mean.mul_(0.9).add_(0.1 * x.mean(0))
        return self.linear(x - self.mean)


def test_a_forward_that_changes_its_buffers_is_refused_and_undone(start: Start) -> None:
    """Every call answered differently and the export froze one state: the job failed parity
    saying the outputs disagree "with validation.reference_file", a file nobody gave, and the
    upload had moved the caller's running mean three times."""
    _, conv = start()
    module = RunningMean().eval()
    with pytest.raises(InvalidInputError) as info:
        conv.upload("running", module, example_inputs=_rand(4, 3, seed=1))
    assert "RunningMean.forward changes its buffers 'mean' in eval mode" in str(info.value)
    assert "only when self.training" in str(info.value)
    assert not module.mean.any()  # as it was before the upload
    assert conv.list_uploads() == []


def test_a_bfloat16_module_is_refused_with_what_to_upload(start: Start) -> None:
    """torch's .numpy() refuses bfloat16: the upload raised its bare "TypeError: Got
    unsupported ScalarType BFloat16", not a FerryError."""
    _, conv = start()
    module = torch.nn.Linear(3, 2).to(torch.bfloat16).eval()
    with pytest.raises(InvalidInputError, match=r"bfloat16 tensors.*upload module\.float\(\)"):
        conv.upload("bf16", module, example_inputs=_rand(4, 3, seed=1).to(torch.bfloat16))
    assert conv.list_uploads() == []


class Echo(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3, 2)

    def forward(self, x: Any) -> Any:
        return {"logits": self.linear(x), "echo": x}


def test_an_input_returned_unchanged_is_refused_with_the_fix(start: Start) -> None:
    """The exporter renamed the graph's input ("x_orig"), and the refusal blamed example_inputs."""
    _, conv = start()
    with pytest.raises(
        InvalidInputError, match=r"returns its input 'x' unchanged as output 'echo'"
    ):
        conv.upload("echo", Echo().eval(), example_inputs={"x": _rand(2, 3, seed=1)})
    assert conv.list_uploads() == []


def test_reference_outputs_from_swapped_inputs_fail_the_job(start: Start) -> None:
    torch.manual_seed(2)
    module = XY().eval()
    x, y = _rand(4, 3, seed=4), _rand(4, 3, seed=5)
    _, conv = start()
    up = conv.upload("xy", module, example_inputs={"y": y, "x": x})
    assert up.sample_inputs is not None
    with torch.no_grad():
        planted = {"output": module(y, x).numpy()}  # the old SDK's positional call
    validation = Validation(sample_inputs=up.sample_inputs, reference_outputs=planted)
    with pytest.raises(JobFailedError, match=r"disagrees with validation\.reference") as failed:
        conv.convert(up, validation=validation).wait(progress=False)
    assert failed.value.job.state == "FAILED" and failed.value.job.version is None


def test_a_graph_with_swapped_input_names_fails_the_job(start: Start, tmp_path: Path) -> None:
    """What the old SDK uploaded: exported positionally from a dict, named after its keys."""
    torch.manual_seed(3)
    module = XY().eval()
    x, y = _rand(4, 3, seed=6), _rand(4, 3, seed=7)
    examples = {"y": y, "x": x}
    batch = torch.export.Dim("batch", min=1, max=4096)
    with contextlib.redirect_stdout(io.StringIO()):
        program = torch.onnx.export(
            module, tuple(examples.values()), dynamo=True, input_names=list(examples),
            output_names=["output"], dynamic_shapes=({0: batch}, {0: batch}), opset_version=20,
        )  # fmt: skip
    program.save(str(tmp_path / "swapped.onnx"), external_data=False)
    _, conv = start()
    up = conv.upload("xy", tmp_path / "swapped.onnx")
    with torch.no_grad():
        reference = {"output": module(**examples).numpy()}  # the user's own call
    validation = Validation(sample_inputs=_numpy(examples), reference_outputs=reference)
    with pytest.raises(JobFailedError, match=r"disagrees with validation\.reference") as failed:
        conv.convert(up, validation=validation).wait(progress=False)
    assert failed.value.job.state == "FAILED" and failed.value.job.version is None


class BranchOnBatch(torch.nn.Module):
    """Adds 1 only when there is more than one sample: the export froze the branch the
    example took, validation ran at the example's batch, and batch-1 requests were served the
    other branch's answer."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(8, 3)

    def forward(self, x: Any) -> Any:
        y = self.fc(x)
        return y + 1.0 if x.shape[0] > 1 else y


def test_a_branch_on_the_batch_size_frozen_by_the_export_fails_the_job(start: Start) -> None:
    _, conv = start()
    up = conv.upload("branch", BranchOnBatch().eval(), example_inputs={"x": _rand(4, 8, seed=1)})
    with pytest.raises(JobFailedError) as failed:
        conv.convert(up).wait(progress=False)
    assert failed.value.job.version is None  # nothing published


class CentredOnTheBatch(torch.nn.Module):
    """Each sample depends on the others (x - x.mean(0)): exported faithfully, but merging
    requests would change every answer."""

    def forward(self, x: Any) -> Any:
        return x - x.mean(0, keepdim=True)


def test_a_model_whose_samples_depend_on_each_other_is_never_served_merged(
    start: Start,
) -> None:
    """Converted as it is, the load-time probe serves it unbatched and each request gets the
    module's answer; a serving config that states a batch (which the probe leaves as stated)
    is refused, or clients would get each other's rows."""
    from ferry.client import InferenceClient, Serving

    srv, conv = start()
    x = _rand(4, 3, seed=2)
    up = conv.upload("centred", CentredOnTheBatch().eval(), example_inputs={"x": x})
    with pytest.raises(JobFailedError, match="merges requests") as failed:
        conv.convert(up, serving=Serving(max_batch_size=8)).wait(progress=False)
    assert failed.value.job.version is None
    done = conv.convert(up).wait(progress=False)
    assert done.version is not None and "samples depend on each other" in done.report_json
    with InferenceClient(srv.target) as client:
        assert client.model_metadata("centred").batching.max_batch_size == 0
        got = client.infer("centred", {"x": x.numpy()})
    np.testing.assert_allclose(next(iter(got.values())), (x - x.mean(0)).numpy(), atol=1e-5)


class SmallTable(torch.nn.Module):
    """A categorical feature with three values: generated samples (0..9) are outside it."""

    def __init__(self) -> None:
        super().__init__()
        self.table = torch.nn.Embedding(3, 4)
        self.head = torch.nn.Linear(4, 2)

    def forward(self, ids: Any) -> Any:
        return self.head(self.table(ids).mean(1))


def test_a_small_table_converts_on_its_own_samples_and_is_batched(start: Start) -> None:
    """The batch check ran generated integers (0..9) through a Gather into a table of three
    and refused the model as 'fixed inside', although its example inputs were valid."""
    from ferry.client import InferenceClient

    srv, conv = start()
    ids = torch.tensor([[0, 1, 2], [2, 2, 0], [1, 0, 1], [0, 0, 2]])
    up = conv.upload("small", SmallTable().eval(), example_inputs={"ids": ids})
    done = conv.convert(up).wait(progress=False)
    assert done.version is not None
    with InferenceClient(srv.target) as client:
        assert client.model_metadata("small").batching.max_batch_size == 32


def test_a_dynamic_int8_version_keeps_its_batch_and_runs_each_request_alone(start: Start) -> None:
    """Its activations share one quantization scale per run, set by the run's largest value:
    batched with others, one caller's answer moved with what other callers sent (an output
    -3.73 alone, 1.50 beside a row 100 times larger). It keeps the batch dimension of the
    version it is split with (the README's int8 flow was served unbatched, and then a split
    with fp32 was refused), and each request runs alone: its config has no dynamic batcher."""
    from ferry.client import InferenceClient, Serving

    srv, conv = start()
    torch.manual_seed(3)
    mlp = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    up = conv.upload("q", mlp.eval(), example_inputs={"input": _rand(8, 16, seed=3)})
    done = conv.convert(up, quantization="dynamic_int8", benchmark="off").wait(progress=False)
    assert done.version is not None and "dynamic_int8" in done.message
    config = srv.settings.repository / "q" / str(done.version) / "config.json"
    assert json.loads(config.read_text())["batching"]["combine_requests"] is False
    with InferenceClient(srv.target) as client:
        assert client.model_metadata("q").batching.max_batch_size == 32
    stated = conv.convert(
        up, quantization="dynamic_int8", benchmark="off", serving=Serving(max_batch_size=8)
    ).wait(progress=False)
    assert stated.version is not None
    with InferenceClient(srv.target) as client:
        assert client.model_metadata("q", version=stated.version).batching.max_batch_size == 8


@pytest.mark.parametrize("architecture", ["mlp", None])
def test_a_module_whose_file_cannot_be_written_leaves_no_scratch_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, architecture: str | None
) -> None:
    """A full temporary disk failed the write of the weights (or of the exported graph) part
    way, and the partial file stayed in the temporary folder for good."""
    import errno
    import shutil
    import tempfile

    from ferry.client import ConversionClient

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    def full(source: Any, target: Any, *args: Any, **kwargs: Any) -> None:
        Path(target).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    monkeypatch.setattr(shutil, "move", full)
    module = torch.nn.Sequential(torch.nn.Linear(4, 2))
    with ConversionClient("127.0.0.1:1") as conv, pytest.raises(OSError, match="No space"):
        conv.upload("m", module, example_inputs=(torch.zeros(2, 4),), architecture=architecture)
    assert list(tmp_path.glob("ferry-upload-*")) == []
