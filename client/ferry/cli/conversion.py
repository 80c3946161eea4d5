"""``ferry upload`` and ``ferry convert``: push a model to the management listener, convert it
into a served ONNX version, and follow the job with a progress bar.

Both talk to the management listener (127.0.0.1:8003 by default, loopback-only unless the operator
chose otherwise), so they take FERRY_MANAGEMENT_TARGET / FERRY_MANAGEMENT_TOKEN rather than the
inference variables. Nothing here retries: an upload or a conversion must not run twice.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from ferry.cli._common import (
    EXIT_OK,
    UsageError,
    connection_parent,
    positive_int,
    tls_config,
)
from ferry.client import (
    ConversionClient,
    InputSpec,
    Job,
    Pruning,
    Quantization,
    Serving,
    Upload,
    Validation,
)

DEFAULT_MANAGEMENT_TARGET = "127.0.0.1:8003"
FORMATS = ("state_dict", "safetensors", "onnx", "exported_program", "torchscript")
# Pruning methods and quantization modes are not listed here: the server's registry is the one
# list, and an unknown name comes back as INVALID_ARGUMENT naming every known one.


def _management_parent() -> argparse.ArgumentParser:
    return connection_parent(
        default_target=os.environ.get("FERRY_MANAGEMENT_TARGET", DEFAULT_MANAGEMENT_TARGET),
        target_env="FERRY_MANAGEMENT_TARGET",
        token=os.environ.get("FERRY_MANAGEMENT_TOKEN", os.environ.get("FERRY_TOKEN")),
        token_env="FERRY_MANAGEMENT_TOKEN",
        timeout=60.0,
    )


def _input_spec(text: str) -> InputSpec:
    """``NAME:DATATYPE:D,D,...`` with -1 for dynamic dims, e.g. ``input:FP32:-1,64``."""
    parts = text.split(":")
    try:
        if len(parts) != 3 or not parts[0]:
            raise ValueError
        return InputSpec(parts[0], parts[1].upper(), [int(d) for d in parts[2].split(",")])
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected NAME:DATATYPE:D1,D2,... with -1 for dynamic dims "
            "(e.g. input:FP32:-1,64)"
        ) from None


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError('expected a JSON object, e.g. {"sizes": [64, 10]}')
    return value


def _add_upload_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--format",
        choices=FORMATS,
        help="the file's format (default: from its suffix: .onnx, .pt/.pth, .safetensors, .pt2)",
    )
    p.add_argument("--architecture", help="registered architecture for state_dict/safetensors")
    p.add_argument(
        "--architecture-kwargs",
        type=_json_object,
        metavar="JSON",
        help="keyword arguments of the architecture, e.g. '{\"sizes\": [64, 256, 10]}'",
    )
    p.add_argument("--description", default="", help="free text kept with the upload")


def register(sub: Any) -> None:
    parent = _management_parent()
    p = sub.add_parser(
        "upload",
        parents=[parent],
        help="upload a model file to the management listener",
        description="Upload a model file (ONNX, state_dict, safetensors, ...) for MODEL and "
        "print its upload id, for `ferry convert`.",
    )
    p.add_argument("model", help="model name the upload is for")
    p.add_argument("file", type=Path, help="the model file")
    _add_upload_flags(p)
    p.add_argument("--json", action="store_true", help="print the upload as JSON")
    p.set_defaults(func=cmd_upload)

    p = sub.add_parser(
        "convert",
        parents=[parent],
        help="convert an upload (or a file) into a served ONNX version, with a progress bar",
        description="Convert an upload, or a file uploaded on the way, into the next version of\n"
        "a model: export, optional pruning and quantization, validation against the source,\n"
        "publication. Waits for the job with a progress bar unless --no-wait.",
        epilog="examples:\n"
        "  ferry convert mlp.onnx --model mlp --input input:FP32:-1,64\n"
        "  ferry convert 3f2a...e1 --quantize dynamic_int8 --max-batch-size 32\n"
        "  ferry convert weights.pt --model mlp --architecture mlp \\\n"
        "      --architecture-kwargs '{\"sizes\": [64, 10]}' --input input:FP32:-1,64 --prune "
        "l1_unstructured:0.5",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", help="an upload id, or a model file to upload first")
    p.add_argument("--model", default="", help="model name (default: the upload's)")
    _add_upload_flags(p)
    p.add_argument(
        "--input",
        type=_input_spec,
        action="append",
        default=[],
        dest="inputs",
        metavar="NAME:DTYPE:DIMS",
        help="a model input, e.g. input:FP32:-1,64; repeatable",
    )
    p.add_argument("--opset", type=positive_int, default=20, help="ONNX opset (default 20)")
    p.add_argument(
        "--prune",
        metavar="METHOD:AMOUNT",
        help="prune before export with one of the server's pruning methods (e.g. "
        "l1_unstructured:0.5); AMOUNT in (0, 1); an unknown METHOD is answered with the list",
    )
    p.add_argument(
        "--quantize",
        metavar="MODE",
        help="quantize the exported model with one of the server's quantization modes (e.g. "
        "dynamic_int8, auto); an unknown MODE is answered with the list",
    )
    p.add_argument("--rtol", type=float, help="validation relative tolerance")
    p.add_argument("--atol", type=float, help="validation absolute tolerance")
    p.add_argument("--max-batch-size", type=int, help="serving: largest dynamic batch")
    p.add_argument("--instance-count", type=positive_int, help="serving: concurrent executions")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return at once")
    bar = p.add_mutually_exclusive_group()
    bar.add_argument("--progress", action="store_true", help="always draw the progress bar")
    bar.add_argument("--no-progress", action="store_true", help="never draw it")
    p.add_argument("--json", action="store_true", help="print the final job as JSON")
    p.set_defaults(func=cmd_convert)


def _client(args: argparse.Namespace) -> ConversionClient:
    try:
        return ConversionClient(
            args.target, timeout=args.timeout, tls=tls_config(args), token=args.token
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _upload(client: ConversionClient, model: str, path: Path, args: argparse.Namespace) -> Upload:
    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    return client.upload(
        model,
        path,
        format=args.format,
        architecture=args.architecture,
        architecture_kwargs=args.architecture_kwargs,
        description=args.description,
    )


def cmd_upload(args: argparse.Namespace) -> int:
    with _client(args) as client:
        up = _upload(client, args.model, args.file, args)
    if args.json:
        print(
            json.dumps(
                {
                    "upload_id": up.upload_id,
                    "model": up.model,
                    "format": up.format,
                    "size_bytes": up.size_bytes,
                },
                indent=2,
            )
        )
    else:
        print(
            f"uploaded {args.file} for {up.model!r}: upload id {up.upload_id} ({up.format}, "
            f"{up.size_bytes:,} bytes)\nnext: ferry convert {up.upload_id} --input NAME:DTYPE:DIMS"
        )
    return EXIT_OK


def _pruning(text: str | None) -> Pruning | None:
    if text is None:
        return None
    method, _, amount = text.partition(":")
    try:
        return Pruning(method=method, amount=float(amount) if amount else 0.5)
    except ValueError:
        raise UsageError(
            f"--prune {text!r}: expected METHOD:AMOUNT, e.g. l1_unstructured:0.5"
        ) from None


def _job_summary(job: Job) -> str:
    # The server's one line: what was published, how fast against fp32, how close to PyTorch.
    if job.message:
        return f"job {job.id}: {job.message}"
    line = f"job {job.id}: {job.model!r} {job.state}"
    if job.version is not None:
        line += f", version {job.version} published"
    return line


def cmd_convert(args: argparse.Namespace) -> int:
    serving = None
    if args.instance_count is not None:
        serving = Serving(instance_count=args.instance_count)
    validation = None
    if args.rtol is not None or args.atol is not None:
        validation = Validation(rtol=args.rtol, atol=args.atol)
    with _client(args) as client:
        source: Upload | str = args.source
        path = Path(args.source)
        if path.is_file():
            if not args.model:
                raise UsageError(f"converting the file {path} needs --model NAME")
            source = _upload(client, args.model, path, args)
        job = client.convert(
            source,
            model=args.model,
            inputs=args.inputs or None,
            opset=args.opset,
            pruning=_pruning(args.prune),
            quantization=Quantization(mode=args.quantize) if args.quantize else None,
            validation=validation,
            serving=serving,
            max_batch_size=args.max_batch_size,
        )
        if args.no_wait:
            print(f"job {job.id} {job.state}; follow it with ConversionClient().job(id).wait()")
            return EXIT_OK
        progress = True if args.progress else False if args.no_progress else None
        job.wait(progress=progress)  # JobFailedError (a FerryError) on failure
    if args.json:
        print(job.report_json or json.dumps({"job_id": job.id, "state": job.state}))
    else:
        print(_job_summary(job))
    return EXIT_OK
