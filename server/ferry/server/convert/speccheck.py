"""Checks of a Job that need neither torch nor the model: the child runs them first, and the server
may run them when a Convert request arrives, to refuse a bad spec without starting a child.

The refusal of code-bearing formats lives here, and only here, so that both places apply the same
rule; it must run before anything opens the file.
"""

from __future__ import annotations

from ferry.server.convert.spec import (
    CALIBRATION_METHODS,
    CODE_BEARING_FORMATS,
    PRUNING_METHODS,
    QUANTIZATION_MODES,
    SOURCE_FORMATS,
    Job,
)
from ferry.server.errors import FailedPrecondition, InvalidArgument

MAX_PRUNING_AMOUNT = 0.95
MIN_OPSET = 13
PRUNABLE_FORMATS = ("state_dict", "safetensors")
USE_INSTEAD = (
    "upload the weights as a state_dict (torch.save(model.state_dict(), path)) or as safetensors, "
    "with the name of a registered architecture, or export the model to ONNX"
)


def max_opset() -> int:
    import onnx.defs

    return int(onnx.defs.onnx_opset_version())


def check_job(job: Job) -> None:
    """Raise the error the job would fail with for reasons visible in the spec alone."""
    fmt = job.source_format
    if fmt not in SOURCE_FORMATS:
        raise InvalidArgument(
            f"unknown source format {fmt!r}: use one of {', '.join(SOURCE_FORMATS)}"
        )
    if fmt in CODE_BEARING_FORMATS and not job.allow_code_formats:
        raise FailedPrecondition(
            f"{fmt} sources are refused because loading them executes code from the file; the "
            f"server operator must enable them with --allow-code-formats, or {USE_INSTEAD}"
        )
    spec = job.spec
    pruning, quantization = spec.pruning, spec.quantization
    if pruning.method not in PRUNING_METHODS:
        raise InvalidArgument(
            f"unknown pruning method {pruning.method!r}: use one of {', '.join(PRUNING_METHODS)}"
        )
    if pruning.method != "none":
        if fmt not in PRUNABLE_FORMATS:
            raise InvalidArgument(
                f"pruning needs a PyTorch source with a registered architecture, not {fmt}: upload "
                "the weights as a state_dict or safetensors, or convert with pruning.method 'none'"
            )
        if not 0.0 <= pruning.amount <= MAX_PRUNING_AMOUNT:
            raise InvalidArgument(
                f"pruning.amount must be within [0, {MAX_PRUNING_AMOUNT}], got {pruning.amount}"
            )
    if quantization.mode not in QUANTIZATION_MODES:
        raise InvalidArgument(
            f"unknown quantization mode {quantization.mode!r}: use one of "
            f"{', '.join(QUANTIZATION_MODES)}"
        )
    if quantization.calibration not in CALIBRATION_METHODS:
        raise InvalidArgument(
            f"unknown calibration method {quantization.calibration!r}: use one of "
            f"{', '.join(CALIBRATION_METHODS)}"
        )
    if quantization.mode == "static_int8" and not quantization.calibration_file:
        raise InvalidArgument(
            "static_int8 needs quantization.calibration_file: an .npz holding, per input name, "
            "[N, ...] representative samples (100 or more recommended); or use dynamic_int8"
        )
    if fmt != "onnx" and not MIN_OPSET <= spec.opset <= max_opset():
        raise InvalidArgument(
            f"opset must be within [{MIN_OPSET}, {max_opset()}], got {spec.opset}"
        )
    if spec.max_batch_size < 1 or spec.validation.samples < 1:
        raise InvalidArgument("max_batch_size and validation.samples must be at least 1")
    names = [i.name for i in spec.inputs]
    if len(set(names)) != len(names) or not all(names):
        raise InvalidArgument(f"input names must be unique and non-empty, got {names}")
