"""Conversion results a user can act on (issue 13): published files that upload again, reports
that compare with PyTorch, slower variants that never replace a faster version, speed figures
with their spread, recurrent layers quantized or said not to be, weights that find their
architecture.

Jobs that need no torch export run the child in this process (``convert_here``); those that
export are marked slow.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_convert_child import assert_failed, convert_here, onnx_mlp, succeeded

from ferry.client._conversion_types import parse_report
from ferry.server.convert import onnx_safety, uploads
from ferry.server.convert.spec import InputSpec
from ferry.server.convert.summary import published_line
from ferry.server.convert.worker import benchmark, graph, parity, quantize
from ferry.server.convert.worker.report import BenchmarkRecord, VariantRecord
from ferry.server.errors import InvalidArgument
from ferry.server.grpc.conversion import report_message

# ---- item 6: a published file uploads again; domains are judged by the nodes using them ----


def _with_opsets(path: Path, *domains: str) -> Path:
    model = onnx.load(str(path))
    model.opset_import.extend(helper.make_opsetid(d, 1) for d in domains)
    onnx.save(model, str(path))
    return path


def test_unused_opset_domains_are_accepted_at_upload_and_in_the_child(tmp_path: Path) -> None:
    """onnxruntime's optimizer declares every domain it knows; none of them has a node here."""
    path = _with_opsets(
        onnx_mlp(tmp_path / "declared.onnx"), "ai.onnx.training", "com.microsoft.nchwc"
    )
    uploads.check_format("onnx", path)
    onnx_safety.check_source(onnx.load(str(path)))
    result = succeeded(convert_here(tmp_path / "job", path, "onnx"))
    published = onnx.load(str(result.model))
    declared = {o.domain for o in published.opset_import}
    assert declared == onnx_safety.used_domains(published) | {""}
    assert declared <= onnx_safety.SAFE_DOMAINS
    uploads.check_format("onnx", result.model)  # what Ferry published, Ferry takes back


def test_a_custom_domain_node_is_refused_at_upload(tmp_path: Path) -> None:
    path = onnx_mlp(tmp_path / "custom.onnx", custom_domain=True)
    with pytest.raises(InvalidArgument) as info:
        uploads.check_format("onnx", path)
    assert "com.example.ops::FancyRelu" in info.value.message
    assert "custom-op domain" in info.value.message


def test_a_local_function_may_define_its_domain(tmp_path: Path) -> None:
    body = [helper.make_node("Relu", ["a"], ["b"])]
    function = helper.make_function(
        "local.fn", "MyRelu", ["a"], ["b"], body, [helper.make_opsetid("", 17)]
    )
    node = helper.make_node("MyRelu", ["x"], ["y"], domain="local.fn")
    graph_proto = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
    )
    model = helper.make_model(
        graph_proto,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local.fn", 1)],
        functions=[function],
    )
    onnx_safety.check_domains(model)
    assert onnx_safety.unused_opset_imports(model) == []


def test_drop_unused_opsets_keeps_what_nodes_use(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), "w")
    nodes = [helper.make_node("FusedMatMul", ["x", "w"], ["y"], domain="com.microsoft")]
    model = helper.make_model(
        helper.make_graph(
            nodes,
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
            initializer=[weight],
        ),
        opset_imports=[
            helper.make_opsetid("", 17),
            helper.make_opsetid("com.microsoft", 1),
            helper.make_opsetid("ai.onnx.training", 1),
            helper.make_opsetid("org.pytorch.aten", 1),
        ],
    )
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    assert sorted(graph.prepare_publish(path, {})) == ["ai.onnx.training", "org.pytorch.aten"]
    assert [o.domain for o in onnx.load(str(path)).opset_import] == ["", "com.microsoft"]
    assert graph.prepare_publish(path, {}) == []


def test_a_custom_domain_is_still_refused_by_the_child(tmp_path: Path) -> None:
    source = onnx_mlp(tmp_path / "custom.onnx", custom_domain=True)
    result = convert_here(tmp_path / "job", source, "onnx")
    assert_failed(result, "INVALID_ARGUMENT", "load", "com.example.ops::FancyRelu")


# ---- item 3: parity against PyTorch's outputs, in typed fields ----


def test_an_onnx_upload_with_reference_outputs_reports_parity_against_pytorch(
    tmp_path: Path,
) -> None:
    """What an SDK module upload sends: the ONNX export, samples and the module's outputs."""
    import onnxruntime as ort

    source = onnx_mlp(tmp_path / "m.onnx")
    x = np.random.default_rng(3).standard_normal((10, 8)).astype(np.float32)
    (y,) = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.savez(tmp_path / "samples.npz", x=x)
    np.savez(tmp_path / "ref.npz", y=y + 1e-6)  # PyTorch's figures differ from ORT's by noise
    spec = {
        "quantization": {"mode": "dynamic_int8"},
        "benchmark": "off",  # int8 on this tiny graph is slower: it would not be published
        "validation": {
            "sample_file": str(tmp_path / "samples.npz"),
            "reference_file": str(tmp_path / "ref.npz"),
        },
    }
    result = succeeded(convert_here(tmp_path / "job", source, "onnx", spec=spec))
    text = (result.work / "report.json").read_text()
    report = parse_report(report_message(text), text)
    assert report is not None and report.parity is not None and report.reference is not None
    assert report.parity.against == "pytorch (reference_outputs)"
    assert report.parity.samples == 10
    assert 0 < report.parity.max_abs < 1e-4
    for name in ("fp32", "dynamic_int8"):
        variant = report.variant(name)
        assert variant is not None and variant.vs_pytorch is not None, name
        assert variant.vs_reference == variant.vs_pytorch
    int8 = report.variant("dynamic_int8")
    assert int8 is not None and int8.vs_pytorch is not None
    assert 0.99 < int8.vs_pytorch.cosine < 1.0
    assert int8.vs_pytorch.top1_agreement is not None  # y is [N, 4] floats: class scores


def test_an_onnx_upload_without_reference_has_no_pytorch_figures(tmp_path: Path) -> None:
    result = succeeded(convert_here(tmp_path / "job", onnx_mlp(tmp_path / "m.onnx"), "onnx"))
    assert result.report["parity"]["against"] == "onnx_source"
    assert result.variant("fp32")["vs_pytorch"] is None


@pytest.mark.parametrize(
    ("output", "has_top1"),
    [
        (np.zeros((4, 3), np.float32), True),  # [N, C] class scores
        (np.zeros((4, 1), np.float32), False),  # one regression value
        (np.zeros((4, 3), np.int64), False),  # ids, not scores
        (np.zeros((4, 5, 3), np.float32), False),  # a sequence of hidden states
        (np.zeros((4,), np.float32), False),
    ],
)
def test_top1_agreement_only_for_class_scores(output: np.ndarray, has_top1: bool) -> None:
    figures = parity.compare([output], [output])
    assert (figures.top1_agreement is not None) is has_top1
    assert parity.is_class_scores(output) is has_top1


# ---- items 2, 9, 12: speed figures with their spread; a slower variant is never published
# unless asked for; the benchmark can be shortened or skipped ----


class FakeClock:
    """``benchmark``'s clock, advanced only by the sessions it times: each variant costs what the
    test says, per batch, with a noise pattern, so the stage's decisions are exact."""

    def __init__(self, costs: dict[str, float], noise: list[float] | None = None) -> None:
        self.now = 0.0
        self.total = (
            0  # runs of any variant: the noise pattern follows the machine, not one variant
        )
        self.costs = costs
        self.noise = noise or [1.0]
        self.runs: dict[str, list[int]] = {name: [] for name in costs}

    def perf_counter(self) -> float:
        return self.now

    def session(self, real: Any, name: str) -> Any:
        clock = self

        class Timed:
            def run(self, outputs: Any, feed: dict[str, np.ndarray]) -> Any:
                batch = len(next(iter(feed.values())))
                runs = clock.runs[name]
                clock.now += clock.costs[name] * batch * clock.noise[clock.total % len(clock.noise)]
                clock.total += 1
                runs.append(batch)
                return real.run(outputs, feed)

        return Timed()


@pytest.fixture
def fake_clock(monkeypatch: pytest.MonkeyPatch) -> Callable[..., FakeClock]:
    def install(costs: dict[str, float], noise: list[float] | None = None) -> FakeClock:
        clock = FakeClock(costs, noise)
        real_session = benchmark._session
        monkeypatch.setattr(benchmark.time, "perf_counter", clock.perf_counter)
        monkeypatch.setattr(
            benchmark,
            "_session",
            lambda path, *a, **k: clock.session(real_session(path, *a, **k), Path(path).stem),
        )
        return clock

    return install


def test_verdicts_from_ratio_quartiles() -> None:
    steady = [2.0, 2.1, 1.9, 2.0, 2.05]
    assert benchmark.verdict({"1": steady, "32": steady}) == ("faster", "")
    assert benchmark.verdict({"1": [0.3, 0.25, 0.28, 0.3, 0.31]})[0] == "slower"
    assert benchmark.verdict({"1": [1.0, 1.02, 0.98, 1.01, 0.99]})[0] == "same"
    # 7.5x in one round, 0.8x in another (a busy machine): the median (1.55x) says nothing.
    speed, note = benchmark.verdict({"1": [7.5, 0.8, 0.9, 2.1, 6.0, 1.0]})
    assert speed == "unclear" and "varied widely" in note and "batch 1: 0.93-5.03x" in note
    # Noisy, but even the lower quartile clears the bar: faster, with the note.
    speed, note = benchmark.verdict({"1": [7.5, 2.0, 1.3, 2.1, 6.0, 1.4]})
    assert speed == "faster" and "varied widely" in note
    assert benchmark.verdict({"1": [3.0, 3.0]}) == (
        "unclear",
        "too few timing rounds for a verdict on speed",
    )
    # Faster at batch 32, slower at batch 1: neither clearly.
    assert benchmark.verdict({"1": [0.8] * 5, "32": [2.0] * 5})[0] == "unclear"


def _variants(tmp_path: Path) -> dict[str, Path]:
    fp32 = onnx_mlp(tmp_path / "fp32.onnx")
    slow = tmp_path / "dynamic_int8.onnx"
    slow.write_bytes(fp32.read_bytes())
    return {"fp32": fp32, "dynamic_int8": slow}


INPUTS = [InputSpec("x", "FP32", [-1, 8])]


def test_a_clearly_slower_variant_is_dropped_before_the_large_batch(
    tmp_path: Path, fake_clock: Callable[..., FakeClock]
) -> None:
    clock = fake_clock({"fp32": 1e-4, "dynamic_int8": 1e-3})  # ten times slower
    records, notes = benchmark.measure(_variants(tmp_path), INPUTS, True, 32, 1, mode="full")
    slow = records["dynamic_int8"]
    assert slow.speed == "slower"
    assert set(slow.latency_ms) == {"1"} and "32" not in slow.speedup_vs_fp32
    assert slow.rounds == {"1": benchmark.BUDGETS["full"].min_rounds}
    assert "stopped timing after 5 rounds at batch 1" in slow.speed_note
    assert 32 not in clock.runs["dynamic_int8"]  # never run at the large batch (warm-up either)
    assert records["fp32"].rounds["32"] >= benchmark.BUDGETS["full"].min_rounds
    assert slow.speedup_vs_fp32["1"] == pytest.approx(0.1)
    assert slow.speedup_iqr["1"] == {"low": pytest.approx(0.1), "high": pytest.approx(0.1)}
    assert notes == []


def test_rounds_alternate_and_the_spread_is_reported(
    tmp_path: Path, fake_clock: Callable[..., FakeClock]
) -> None:
    # Equally fast, but some runs are slowed threefold (a busy machine): the paired ratios
    # swing from 1/3 to 3, and the verdict must not read a speed-up into them.
    fake_clock({"fp32": 1e-4, "dynamic_int8": 1e-4}, noise=[1.0, 3.0, 1.0])
    records, _ = benchmark.measure(_variants(tmp_path), INPUTS, True, 32, 1, mode="quick")
    int8 = records["dynamic_int8"]
    assert int8.rounds["1"] >= benchmark.BUDGETS["quick"].min_rounds
    assert int8.rounds["1"] <= benchmark.BUDGETS["quick"].max_rounds
    iqr = int8.speedup_iqr["1"]
    assert iqr["low"] < 1.0 < iqr["high"]
    assert iqr["low"] <= int8.speedup_vs_fp32["1"] <= iqr["high"]
    assert int8.speed == "unclear" and "varied widely" in int8.speed_note
    assert records["fp32"].latency_iqr_ms["1"]["low"] <= records["fp32"].latency_ms["1"]


def test_the_stage_budget_cuts_the_benchmark_short(
    tmp_path: Path, fake_clock: Callable[..., FakeClock]
) -> None:
    budget = benchmark.BUDGETS["quick"]
    fake_clock({"fp32": budget.stage_s, "dynamic_int8": budget.stage_s})  # one run: the budget
    records, notes = benchmark.measure(_variants(tmp_path), INPUTS, True, 32, 1, mode="quick")
    assert records["fp32"].rounds == {"1": 1}
    assert records["dynamic_int8"].speed == "unclear"
    assert notes and "budget" in notes[0]


def _record(name: str, ratios: list[float], within: bool = True) -> VariantRecord:
    quartile = benchmark.quartiles(ratios)
    speed = benchmark.verdict({"1": ratios})[0] if name != "fp32" else "same"
    bench = BenchmarkRecord(
        1, 1, 0.0, {"1": 1.0}, {"1": quartile[1]},
        speedup_iqr={"1": {"low": quartile[0], "high": quartile[2]}}, speed=speed,
    )  # fmt: skip
    return VariantRecord(name, within_budget=within, benchmark=bench)


def test_auto_never_picks_a_figure_the_noise_leaves_unclear() -> None:
    fp32 = _record("fp32", [1.0] * 5)
    noisy = _record("dynamic_int8", [7.5, 0.8, 0.9, 2.1, 6.0, 1.0])
    chosen, why = quantize.choose([fp32, noisy], keep_slower=False)
    assert chosen is fp32 and "unclear" in why and "(0." in why
    steady = _record("fp16", [1.6, 1.7, 1.65, 1.6, 1.7])
    chosen, why = quantize.choose([fp32, noisy, steady], keep_slower=False)
    assert chosen is steady


def test_explicit_slower_variant_fails_with_one_line(
    tmp_path: Path, fake_clock: Callable[..., FakeClock]
) -> None:
    fake_clock({"fp32": 1e-4, "dynamic_int8": 4e-4})
    spec = {"quantization": {"mode": "dynamic_int8"}}
    source = onnx_mlp(tmp_path / "m.onnx")
    result = convert_here(tmp_path / "job", source, "onnx", spec=spec)
    assert_failed(
        result, "CONVERSION_FAILED", "benchmark",
        "not published: dynamic_int8 runs at 0.25x the speed of fp32",
        "the served version stays as it was", "quantization.keep_slower",
    )  # fmt: skip
    message = result.last["message"]
    assert "\n" not in message
    int8 = next(v for v in result.report["variants"] if v["name"] == "dynamic_int8")
    assert int8["speed"] == "slower" and not int8["published"]


def test_explicit_slower_variant_with_keep_slower_is_published_and_says_so(
    tmp_path: Path, fake_clock: Callable[..., FakeClock]
) -> None:
    fake_clock({"fp32": 1e-4, "dynamic_int8": 4e-4})
    spec = {"quantization": {"mode": "dynamic_int8", "keep_slower": True}}
    result = succeeded(
        convert_here(tmp_path / "job", onnx_mlp(tmp_path / "m.onnx"), "onnx", spec=spec)
    )
    line = published_line((result.work / "report.json").read_text())
    assert line.startswith("dynamic_int8, SLOWER than fp32 at 0.25x fp32 (0.25-0.25)")
    assert "keep_slower" in line and "cosine" in line


def test_benchmark_off_skips_the_stage_and_auto_refuses_it(tmp_path: Path) -> None:
    spec = {"benchmark": "off", "quantization": {"mode": "dynamic_int8"}}
    result = succeeded(
        convert_here(tmp_path / "job", onnx_mlp(tmp_path / "m.onnx"), "onnx", spec=spec)
    )
    report = result.report
    assert report["benchmark"] == "off" and "benchmark" not in report["stages"]
    assert any("skipped" in e["message"] for e in result.events if e["stage"] == "benchmark")
    assert all("latency_ms" not in v for v in report["variants"])
    assert published_line(json.dumps(report)).startswith("dynamic_int8, not benchmarked, cosine")
    refused = convert_here(
        tmp_path / "auto", onnx_mlp(tmp_path / "a.onnx"), "onnx",
        spec={"benchmark": "off", "quantization": {"mode": "auto"}},
    )  # fmt: skip
    assert_failed(refused, "INVALID_ARGUMENT", "load", 'benchmark "off"', "quick")
    unknown = convert_here(
        tmp_path / "x", onnx_mlp(tmp_path / "x.onnx"), "onnx", spec={"benchmark": "fast"}
    )
    assert_failed(unknown, "INVALID_ARGUMENT", "load", "full, quick, off")


def test_benchmark_mode_travels_through_sdk_and_adapter() -> None:
    from ferry.client._conversion_types import build_spec
    from ferry.server.grpc.conversion import _spec

    wire = build_spec(
        [], opset=20, pruning=None, quantization=None, validation=None, serving=None,
        max_batch_size=None, benchmark="quick",
    )  # fmt: skip
    assert _spec(wire)[0].benchmark == "quick"
    unset = build_spec(
        [], opset=20, pruning=None, quantization=None, validation=None, serving=None,
        max_batch_size=None,
    )  # fmt: skip
    assert _spec(unset)[0].benchmark == "full"  # the server's default, not the client's


def test_the_published_line() -> None:
    variant = {
        "name": "dynamic_int8", "within_budget": True, "speed": "faster",
        "speedup_vs_fp32": {"1": 1.8, "32": 2.0},
        "speedup_iqr": {"1": {"low": 1.7, "high": 1.9}, "32": {"low": 1.9, "high": 2.1}},
        "vs_pytorch": {"cosine": 0.99998}, "vs_fp32": {"cosine": 0.99999},
    }  # fmt: skip
    report = {"published": "dynamic_int8", "benchmark": "full", "variants": [variant]}
    assert published_line(json.dumps(report)) == (
        "dynamic_int8, 1.90x fp32 (1.70-2.10), cosine 0.999980 vs PyTorch"
    )
    variant.update(speed="unclear", within_budget=False)
    line = published_line(json.dumps(report))
    assert "timing noise leaves its speed unclear" in line and "BELOW the accuracy budget" in line
    fp32 = {"name": "fp32", "within_budget": True, "latency_ms": {"1": 0.5}}
    kept = {
        "published": "fp32", "variants": [fp32],
        "quantization": {"selection": "no variant within budget is clearly 1.15x faster than fp32: x"},
        "parity": {"max_abs": 1e-6, "against": "onnx_source"},
    }  # fmt: skip
    assert published_line(json.dumps(kept)) == (
        "fp32, 0.5 ms at batch 1, max_abs 1e-06 vs onnx_source, auto kept fp32: no variant "
        "within budget is clearly 1.15x faster than fp32"
    )
    assert published_line("") == "" and published_line('{"published": null}') == ""


# ---- item 7: recurrent layers under dynamic int8 ----


def _export_recurrent(kind: str, path: Path) -> Path:
    import contextlib
    import io

    import torch

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = getattr(torch.nn, kind)(32, 64, batch_first=True, num_layers=2)
            self.fc = torch.nn.Linear(64, 5)

        def forward(self, x: Any) -> Any:
            out, _ = self.rnn(x)
            return self.fc(out[:, -1])

    torch.manual_seed(0)
    batch = torch.export.Dim("batch", min=1, max=1024)
    with contextlib.redirect_stdout(io.StringIO()):
        program = torch.onnx.export(
            Net().eval(), (torch.randn(2, 10, 32),), dynamo=True,
            dynamic_shapes=({0: batch},), opset_version=20,
        )  # fmt: skip
    program.save(str(path))
    return path


@pytest.mark.slow
def test_lstm_is_quantized_and_gru_says_it_is_not(tmp_path: Path) -> None:
    spec = {"quantization": {"mode": "dynamic_int8"}, "benchmark": "off"}
    lstm = succeeded(
        convert_here(
            tmp_path / "lstm", _export_recurrent("LSTM", tmp_path / "l.onnx"), "onnx", spec=spec
        )
    )
    ops = {n.op_type for n in onnx.load(str(lstm.model)).graph.node}
    assert "DynamicQuantizeLSTM" in ops and "LSTM" not in ops
    assert lstm.variant("dynamic_int8")["vs_fp32"]["cosine"] > 0.99
    assert "stay fp32" not in lstm.variant("dynamic_int8")["note"]
    gru = succeeded(
        convert_here(
            tmp_path / "gru", _export_recurrent("GRU", tmp_path / "g.onnx"), "onnx", spec=spec
        )
    )
    note = gru.variant("dynamic_int8")["note"]
    assert "of the weights were quantized" in note or "nothing substantial" in note
    assert "stay fp32 in GRU" in note


# ---- item 12: a quiet upload, a short repr ----


@pytest.mark.slow
def test_module_upload_is_silent(capfd: pytest.CaptureFixture[str]) -> None:
    import torch

    from ferry.client._module_upload import from_module

    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    capfd.readouterr()
    data, fmt, extras = from_module(torch, module, torch.randn(4, 3), None, 20)
    out, err = capfd.readouterr()
    assert fmt == "onnx" and data.stat().st_size and extras["inputs"][0].name == "input"
    data.unlink()  # the upload streams this file and removes it; here nothing sends it
    assert out == "" and err == ""


def test_upload_repr_is_short() -> None:
    from ferry.client._conversion_types import InputSpec as ClientInputSpec
    from ferry.client._conversion_types import Upload

    up = Upload(
        "ab" * 16, "bert", "onnx", "0" * 64, 1234,
        inputs=(ClientInputSpec("input_ids", "INT64", [-1, 128]),),
        sample_inputs={"input_ids": np.zeros((64, 128), np.int64)},
        reference_outputs={"last_hidden_state": np.zeros((64, 128, 768), np.float32)},
    )  # fmt: skip
    text = repr(up)
    assert len(text) < 250 and "\n" not in text and "array" not in text
    assert "inputs=[input_ids:INT64[-1, 128]]" in text and "samples=64" in text
    assert "reference_outputs=['last_hidden_state']" in text
