"""The strategy registries (``convert.strategies``): their metadata, refusals of unknown names
everywhere a name is read, auto's skip rules, the docs tables, and that a strategy added to a
registry alone is picked up by validation, the plan and the pipeline.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from ferry.server.convert import validation
from ferry.server.convert.spec import (
    ConversionSpec,
    InputSpec,
    Job,
    PruningSpec,
    QuantizationSpec,
    job_from_json,
    to_json,
)
from ferry.server.convert.strategies import pruning, quantization
from ferry.server.convert.strategies.quantization import (
    AUTO,
    CONV_TRAP,
    FP16_NOTE,
    NO_CALIBRATION,
    NONE,
    BuildInputs,
    GraphFacts,
    Quantizer,
)
from ferry.server.errors import InvalidArgument

ROOT = Path(__file__).resolve().parents[2]
INPUT = InputSpec("x", "FP32", [-1, 8])


def job(spec: ConversionSpec, fmt: str = "onnx", source: str = "/nonexistent.onnx") -> Job:
    return Job("j", "m", source, fmt, "0" * 64, spec=spec)


def q_spec(mode: str, *, calibration: str = "minmax", keep_slower: bool = False) -> ConversionSpec:
    q = QuantizationSpec(mode=mode, calibration=calibration, keep_slower=keep_slower)
    return ConversionSpec(inputs=[INPUT], quantization=q)


# ---- metadata ----


def test_quantization_modes_and_their_metadata() -> None:
    assert quantization.names() == ["none", "dynamic_int8", "static_int8", "fp16", "auto"]
    assert quantization.modes()[0] is NONE and quantization.modes()[-1] is AUTO
    calibrating = {q.name for q in quantization.QUANTIZERS.values() if q.needs_calibration}
    assert calibrating == {"static_int8"}
    for m in quantization.modes():
        assert m.name and m.builds and m.use_for, m
    for q in quantization.QUANTIZERS.values():
        assert q.candidates() == (q,) and not q.chooses and q.auto_rule
    assert AUTO.chooses and not NONE.chooses
    assert list(AUTO.candidates()) == list(quantization.QUANTIZERS.values())
    assert list(NONE.candidates()) == []
    # Only auto may take calibration data without needing it; an explicit mode needing it requires it.
    assert [m.name for m in quantization.modes() if quantization.uses_calibration(m)] == [
        "static_int8",
        "auto",
    ]
    assert [m.name for m in quantization.modes() if quantization.requires_calibration(m)] == [
        "static_int8"
    ]
    assert set(quantization.CALIBRATION_METHODS) == {"minmax", "percentile"}


def test_pruning_methods_and_their_metadata() -> None:
    assert pruning.names() == ["none", "l1_unstructured", "global_unstructured", "structured"]
    assert pruning.methods()[0] is pruning.NONE and pruning.NONE.build is None
    assert {m.name: m.structured for m in pruning.METHODS.values()} == {
        "l1_unstructured": False,
        "global_unstructured": False,
        "structured": True,
    }
    for m in pruning.methods():
        assert m.does and m.gives, m
    for m in pruning.METHODS.values():
        assert m.build is not None


def test_spec_defaults_come_from_the_registries() -> None:
    assert QuantizationSpec().mode == quantization.DEFAULT.name == "none"
    assert QuantizationSpec().calibration == quantization.DEFAULT_CALIBRATION
    assert PruningSpec().method == pruning.DEFAULT.name == "none"


def test_docs_tables_are_the_registries() -> None:
    """docs/conversion.md's tables are rendered from the registries; after adding a strategy,
    paste ``markdown_table()`` there."""
    text = (ROOT / "docs" / "conversion.md").read_text()
    assert quantization.markdown_table() in text
    assert pruning.markdown_table() in text


def test_registry_modules_import_neither_torch_nor_onnxruntime_quantization() -> None:
    import subprocess
    import sys

    code = (
        "import sys, json; import ferry.server.convert.validation;"
        "print(json.dumps([m for m in ('torch', 'onnxruntime.quantization', "
        "'ferry.server.convert.worker') if m in sys.modules]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


# ---- unknown names are refused everywhere ----


def test_unknown_quantization_mode_refused_everywhere() -> None:
    listing = ", ".join(quantization.names())
    expected = f"unknown quantization mode 'int3': use one of {listing}"
    with pytest.raises(InvalidArgument, match=expected):
        quantization.mode("int3")
    with pytest.raises(InvalidArgument, match=expected):
        quantization.plan(QuantizationSpec(mode="int3"), GraphFacts())
    with pytest.raises(InvalidArgument, match=expected):
        validation.check_job(job(q_spec("int3")))
    with pytest.raises(InvalidArgument, match=expected):
        validation.validate_spec(q_spec("int3"), validation.SpecTensors(), source_format="onnx")
    # "" is not "none": the adapters turn an unset field into the default before this.
    with pytest.raises(InvalidArgument, match="unknown quantization mode ''"):
        quantization.mode("")


def test_unknown_pruning_method_refused_everywhere() -> None:
    expected = f"unknown pruning method 'l0': use one of {', '.join(pruning.names())}"
    spec = ConversionSpec(inputs=[INPUT], pruning=PruningSpec("l0", 0.5))
    with pytest.raises(InvalidArgument, match=expected):
        pruning.method("l0")
    with pytest.raises(InvalidArgument, match=expected):
        validation.check_job(job(spec, "state_dict"))
    with pytest.raises(InvalidArgument, match=expected):
        validation.validate_spec(spec, validation.SpecTensors(), source_format="state_dict")


def test_unknown_calibration_method_refused() -> None:
    spec = q_spec("auto", calibration="entropy")
    with pytest.raises(InvalidArgument, match="unknown calibration method 'entropy': use one of"):
        validation.check_job(job(spec))


def test_calibration_rules_follow_the_registry() -> None:
    with pytest.raises(InvalidArgument, match=r"static_int8 needs quantization\.calibration_file"):
        validation.check_job(job(q_spec("static_int8")))
    validation.check_job(job(q_spec("auto")))  # auto skips static_int8 instead
    tensors = validation.SpecTensors(calibration={"x": np.zeros((4, 8), np.float32)})
    for mode in ("static_int8", "auto"):
        validation.validate_spec(q_spec(mode), tensors, source_format="onnx")
    with pytest.raises(
        InvalidArgument, match="only serve the quantization modes static_int8, auto"
    ):
        validation.validate_spec(q_spec("fp16"), tensors, source_format="onnx")


# ---- auto's plan ----


@pytest.mark.parametrize(
    ("has_conv", "calibrated", "built", "skipped"),
    [
        (False, False, ["dynamic_int8", "fp16"], {"static_int8": NO_CALIBRATION}),
        (False, True, ["dynamic_int8", "static_int8", "fp16"], {}),
        (True, False, ["fp16"], {"dynamic_int8": CONV_TRAP, "static_int8": NO_CALIBRATION}),
        (True, True, ["static_int8", "fp16"], {"dynamic_int8": CONV_TRAP}),
    ],
)
def test_auto_skips_with_reasons(
    has_conv: bool, calibrated: bool, built: list[str], skipped: dict[str, str]
) -> None:
    spec = QuantizationSpec(mode="auto", calibration_file="c.npz" if calibrated else "")
    plan = quantization.plan(spec, GraphFacts(has_conv=has_conv))
    assert [q.name for q in plan.variants] == built
    assert plan.skipped == skipped
    assert plan.notes == {"fp16": FP16_NOTE}
    assert plan.needs_calibration is calibrated


def test_explicit_modes_build_their_variant_with_caveats() -> None:
    conv = GraphFacts(has_conv=True)
    plan = quantization.plan(QuantizationSpec(mode="dynamic_int8"), conv)
    assert [q.name for q in plan.variants] == ["dynamic_int8"] and plan.skipped == {}
    assert plan.notes == {"dynamic_int8": CONV_TRAP}  # built on request, with the warning
    assert quantization.plan(QuantizationSpec(mode="dynamic_int8"), GraphFacts()).notes == {}
    none = quantization.plan(QuantizationSpec(mode="none"), conv)
    assert (none.variants, none.skipped, none.notes) == ([], {}, {})


# ---- a strategy added to the registry alone ----


def _copy_fp32(inputs: BuildInputs) -> str:
    """A stand-in quantizer: writes the fp32 graph unchanged."""
    shutil.copyfile(inputs.base, inputs.target)
    return "copied"


FAKE = Quantizer(
    name="copy_fp32",
    builds="the fp32 graph, copied",
    use_for="testing the registry",
    needs_calibration=False,
    build=_copy_fp32,
    auto_rule="not for convolutional models",
    auto_skip=lambda facts, spec: "convs" if facts.has_conv else "",
    caveat=lambda facts: "a copy",
)


@pytest.fixture
def with_fake(monkeypatch: pytest.MonkeyPatch) -> Quantizer:
    monkeypatch.setitem(quantization.QUANTIZERS, FAKE.name, FAKE)
    return FAKE


def test_a_new_quantizer_reaches_validation_plan_and_docs(with_fake: Quantizer) -> None:
    assert quantization.names()[-2:] == ["copy_fp32", "auto"]
    validation.check_job(job(q_spec("copy_fp32")))
    validation.validate_spec(q_spec("copy_fp32"), validation.SpecTensors(), source_format="onnx")
    with pytest.raises(InvalidArgument, match=r"use one of .*copy_fp32, auto"):
        validation.check_job(job(q_spec("int3")))
    explicit = quantization.plan(QuantizationSpec(mode="copy_fp32"), GraphFacts())
    assert explicit.variants == [with_fake] and explicit.notes == {"copy_fp32": "a copy"}
    auto = quantization.plan(QuantizationSpec(mode="auto"), GraphFacts())
    assert [q.name for q in auto.variants] == ["dynamic_int8", "fp16", "copy_fp32"]
    conv = quantization.plan(QuantizationSpec(mode="auto"), GraphFacts(has_conv=True))
    assert conv.skipped["copy_fp32"] == "convs"
    assert '| `"copy_fp32"` | the fp32 graph, copied | testing the registry |' in (
        quantization.markdown_table()
    )
    assert "copy_fp32 (not for convolutional models)" in quantization.markdown_table()


def _onnx_mlp(path: Path) -> Path:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        initializer=[w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("mode", ["copy_fp32", "auto"])
def test_a_new_quantizer_runs_in_the_pipeline(
    with_fake: Quantizer, tmp_path: Path, mode: str
) -> None:
    """The conversion child's own entry (in this process, so the monkeypatch holds): the fake
    is planned, built, validated, benchmarked and, asked for by name, published."""
    import hashlib

    from ferry.server.convert.worker import child

    source = _onnx_mlp(tmp_path / "mm.onnx")
    contract = replace(
        job(q_spec(mode, keep_slower=True)),
        source_path=str(source),
        source_sha256=hashlib.sha256(source.read_bytes()).hexdigest(),
        work_dir=str(tmp_path / "work"),
    )
    contract = job_from_json(to_json(contract))  # as the child reads it
    progress = tmp_path / "progress.jsonl"
    # From tmp_path, as the real child works in its scratch folder: the quantizer may write
    # into the current folder (test_convert_child.convert_here).
    with progress.open("w") as stream, contextlib.chdir(tmp_path):
        rc = child.run(contract, child.Progress(stream))
    events = [json.loads(line) for line in progress.read_text().splitlines()]
    assert rc == 0, events[-1]
    report = json.loads((tmp_path / "work" / "report.json").read_text())
    names = [v["name"] for v in report["variants"]]
    assert "copy_fp32" in names and report["quantization"]["candidates"] == ["fp32", *names[1:]]
    fake = next(v for v in report["variants"] if v["name"] == "copy_fp32")
    # The quantizer's own note first; a busy machine may add the benchmark's noise warning.
    assert fake["note"].startswith("a copy; copied") and fake["within_budget"]
    assert fake["vs_fp32"]["cosine"] == pytest.approx(1.0)
    if mode == "copy_fp32":
        assert report["published"] == "copy_fp32" and fake["published"]
    else:
        assert names == ["fp32", "dynamic_int8", "fp16", "copy_fp32"]
        assert "selection" in report["quantization"]


def _unloadable(inputs: BuildInputs) -> str:
    """A stand-in for onnxruntime's fp16 converter on an nn.EmbeddingBag: a graph that passes
    the builder but declares float where its node makes float16, which onnxruntime refuses."""
    graph = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT16)],
        "typed wrong",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(inputs.target))
    return ""


@pytest.mark.parametrize("mode", ["unloadable", "auto"])
def test_a_variant_onnxruntime_cannot_load_fails_its_build(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, mode: str
) -> None:
    """fp16 of an EmbeddingBag model was built, then failed the validate stage with
    onnxruntime's load error and no advice; under auto that one candidate failed the whole job
    though fp32 (and dynamic int8) were fine. Asked for by name, the mode fails in the quantize
    stage saying what to do; auto skips it and says why."""
    import hashlib

    from ferry.server.convert.worker import child

    broken = replace(FAKE, name="unloadable", build=_unloadable, auto_skip=lambda f, s: "")
    monkeypatch.setitem(quantization.QUANTIZERS, broken.name, broken)
    source = _onnx_mlp(tmp_path / "mm.onnx")
    contract = replace(
        job(q_spec(mode, keep_slower=True)),
        source_path=str(source),
        source_sha256=hashlib.sha256(source.read_bytes()).hexdigest(),
        work_dir=str(tmp_path / "work"),
    )
    progress = tmp_path / "progress.jsonl"
    # From tmp_path, as the real child works in its scratch folder: the quantizer may write
    # into the current folder (test_convert_child.convert_here).
    with progress.open("w") as stream, contextlib.chdir(tmp_path):
        rc = child.run(job_from_json(to_json(contract)), child.Progress(stream))
    last = json.loads(progress.read_text().splitlines()[-1])
    report = json.loads((tmp_path / "work" / "report.json").read_text())
    if mode == "unloadable":
        assert rc == 2 and last["stage"] == "quantize", last
        assert (
            "the unloadable variant onnxruntime.quantization built does not load"
            in (last["message"])
        )
        assert "convert with another quantization mode" in last["message"]
        return
    assert rc == 0, last
    assert "does not load in onnxruntime" in report["quantization"]["skipped"]["unloadable"]
    assert "unloadable" not in [v["name"] for v in report["variants"]]
    assert report["published"] in ("fp32", "dynamic_int8", "fp16")


def test_a_new_pruning_method_reaches_validation(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = pruning.Method("zero_all", "zeroes everything", "zeros", False, build=lambda j: None)
    monkeypatch.setitem(pruning.METHODS, fake.name, fake)
    spec = ConversionSpec(inputs=[INPUT], pruning=PruningSpec("zero_all", 0.5))
    validation.check_job(job(spec, "state_dict"))
    validation.validate_spec(spec, validation.SpecTensors(), source_format="state_dict")
    assert pruning.names()[-1] == "zero_all"
    assert '| `"zero_all"` | zeroes everything | zeros |' in pruning.markdown_table()


def test_an_output_without_a_batch_dim_is_named_in_the_refusal() -> None:
    """An SDK upload of a module whose one output is a mean over the batch ([3] for 8 samples)
    was refused with "validation.reference_outputs have 3 samples but sample_inputs have 8":
    reference outputs the user never wrote, and nothing about the output to change."""
    spec = ConversionSpec(inputs=[INPUT])
    tensors = validation.SpecTensors(
        samples={"x": np.zeros((8, 8), np.float32)},
        references={"output": np.zeros(3, np.float32)},
    )
    with pytest.raises(InvalidArgument) as info:
        validation.validate_spec(spec, tensors, source_format="onnx")
    assert "output 'output' is [3] for 8 input samples" in info.value.message
    assert "wrap the model so that forward returns the batch first" in info.value.message
