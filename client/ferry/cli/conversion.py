"""``ferry upload`` and ``ferry convert``: push a model to the management listener, convert it
into a served ONNX version, and follow the job with a progress bar.

Both talk to the management listener (127.0.0.1:8003 by default, loopback-only unless the operator
chose otherwise), so they take FERRY_MANAGEMENT_TARGET / FERRY_MANAGEMENT_TOKEN rather than the
inference variables. Nothing here retries: an upload or a conversion must not run twice.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ferry.cli._common import (
    EXIT_OK,
    UsageError,
    add_progress_flags,
    command_name,
    connect,
    given_timeout,
    json_text,
    management_hint,
    management_parent,
    positive_int,
    progress_of,
)
from ferry.client import (
    ConnectionError_,
    ConversionClient,
    DeadlineExceededError,
    DynamicAxis,
    FerryError,
    InputSpec,
    InvalidInputError,
    Job,
    JobFailedError,
    JobNotFoundError,
    LimitExceededError,
    Pruning,
    Quantization,
    ResourceExhaustedError,
    Serving,
    Upload,
    Validation,
)
from ferry.client.loadtest._inputs import read_npz
from ferry.codec._json_keys import unique_object

# What the server's ids look like; anything else given as a source is a file's path. Any case:
# the server's own answer covers a wrong one.
_UPLOAD_ID = re.compile(r"[0-9a-fA-F]{32}")
FORMATS = ("state_dict", "safetensors", "onnx", "exported_program", "torchscript", "onnx_archive")
# Formats whose file carries the model's signature: convert needs no --input for them.
SELF_DESCRIBING = ("onnx", "exported_program", "onnx_archive")
# The help's example: kwargs the built-in mlp accepts (a test builds the mlp from them).
MLP_KWARGS = '{"in_features": 64, "hidden": [256], "out_features": 10}'
# Pruning methods and quantization modes are not listed here: the server's registry is the one
# list, and an unknown name comes back as INVALID_ARGUMENT naming every known one.


def _input_spec(text: str) -> InputSpec:
    """``NAME:DATATYPE:D,D,...`` with -1 for dynamic dims, e.g. ``input:FP32:-1,64``; a dim
    ``SIZE@AXIS=MIN..MAX`` (or ``SIZE@AXIS``, unbounded) declares a dynamic axis whose samples
    are made at SIZE, e.g. ``input_ids:INT64:-1,128@sequence=1..512``."""
    parts = text.split(":")
    try:
        if len(parts) != 3 or not parts[0]:
            raise ValueError
        dims: list[int] = []
        axes: dict[int, DynamicAxis] = {}
        for index, token in enumerate(parts[2].split(",")):
            size, at, axis = token.partition("@")
            dims.append(int(size))
            if at:
                axes[index] = _axis(axis)
        return InputSpec(parts[0], parts[1].upper(), dims, axes)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected NAME:DATATYPE:D1,D2,... with -1 for dynamic dims "
            "(e.g. input:FP32:-1,64), and SIZE@AXIS=MIN..MAX for a dynamic axis "
            "(e.g. input_ids:INT64:-1,128@sequence=1..512)"
        ) from None


def _axis(text: str) -> DynamicAxis:
    name, _, bounds = text.partition("=")
    if not name:
        raise ValueError
    if not bounds:
        return DynamicAxis(name)
    low, sep, high = bounds.partition("..")
    if not sep:
        raise ValueError
    return DynamicAxis(name, int(low) if low else 1, int(high) if high else None)


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text, object_pairs_hook=unique_object)
    except ValueError as exc:  # JSONDecodeError is one, and so is a key given twice
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from None
    except RecursionError:  # the parser's own guard: "[[[[..." was a traceback
        raise argparse.ArgumentTypeError(
            "nested too deeply: give the constructor arguments as a flat JSON object"
        ) from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(
            'expected a JSON object, e.g. {"in_features": 64, "hidden": [256], "out_features": 10}'
        )
    return value


def _add_upload_flags(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    p.add_argument(
        "--format",
        choices=FORMATS,
        help="the file's format (default: from its suffix: .onnx, .pt/.pth, .safetensors, .pt2, "
        ".tar; a folder, or an .onnx file with external data, goes as onnx_archive)",
    )
    p.add_argument("--architecture", help="registered architecture for state_dict/safetensors")
    p.add_argument(
        "--architecture-kwargs",
        type=_json_object,
        metavar="JSON",
        help=f"keyword arguments of the architecture, e.g. '{MLP_KWARGS}' for the built-in mlp",
    )
    p.add_argument("--description", default="", help="free text kept with the upload")


def conversion_hint(exc: FerryError, args: argparse.Namespace) -> str | None:
    """Hints in the words of ``upload`` and ``convert``: their flags, not inference's."""
    if isinstance(exc, JobFailedError):
        text = exc.message.lower()
        if "budget" in text:
            return (
                "the accuracy budget was missed: loosen --min-cosine/--min-top1-agreement, "
                "prune or quantize less, or --keep-failed to publish it anyway (the report says so)"
            )
        if "tolerance" in text or "rtol" in text or "atol" in text:
            return (
                "the ONNX model differs from PyTorch beyond --rtol/--atol: see the report "
                f"(`ferry jobs show {exc.job.id} --json`)"
            )
        # Not "rerun with --json": a rerun converts again, and printed no report either.
        return (
            f"`ferry jobs show {exc.job.id} --json` prints its report, which says where it stopped"
        )
    waited = getattr(args, "waited_job", None)
    if isinstance(exc, DeadlineExceededError) and waited:
        return f"the job did not end within --timeout; {still_running(waited)}"
    if isinstance(exc, ConnectionError_) and waited:
        # The server answered until now: "nothing answered at HOST:PORT: management listens
        # on 127.0.0.1:8003 unless ..." sent the user to check an address that was right, and
        # never named the job, which a stopped server fails and a lost connection leaves going.
        return (
            f"the server stopped answering while this command followed job {waited}: once it "
            f"answers again, `ferry jobs show {waited}` says whether the job still runs (a "
            "server that stopped failed it) or how it ended"
        )
    if isinstance(exc, JobNotFoundError):
        if getattr(args, "job_id", None):
            return "`ferry jobs list` shows the jobs the server keeps"
        return "`ferry uploads list` shows the uploads the server keeps"
    if isinstance(exc, LimitExceededError):
        return "the server's --max-upload-bytes (or message size) limit refused it: see the message"
    if isinstance(exc, ResourceExhaustedError):
        return "the conversion queue is full: wait for a job to end (--max-queued-conversions)"
    if isinstance(exc, InvalidInputError):
        # The failing command's own help: `ferry upload` without a known suffix was sent to
        # convert's, which does not say what upload's --format takes.
        return f"the message names the field; `ferry {command_name(args)} --help` lists the flags"
    return management_hint(exc, args)


def still_running(job_id: str) -> str:
    return (
        f"job {job_id} keeps running on the server: follow it with `ferry jobs wait {job_id}`, "
        f"stop it with `ferry jobs cancel {job_id}`"
    )


def follow(job: Job, args: argparse.Namespace, as_json: Callable[[Job], Any]) -> None:
    """Wait for ``job`` to end (JobFailedError when it did not succeed). A Ctrl-C or --timeout
    ends the waiting, not the job: the command said only "interrupted" or "raise --timeout",
    and a user who had not seen the job's id could neither follow nor stop it.

    With --json a job that failed is printed too (``as_json``), before the error line: stdout
    was empty, so a script reading it got no JSON, and no report, for the one job it most
    needed them for."""
    args.waited_job = job.id
    args.interrupted_hint = still_running(job.id)
    try:
        job.wait(timeout=given_timeout(args), progress=progress_of(args))
    except JobFailedError:
        if args.json:
            print(json_text(as_json(job)))
        raise


def final_json(job: Job) -> Any:
    """``convert --json``'s document of an ended job: its report, or, when it got none, the job
    (with its error when it failed)."""
    if job.report_json:
        return json.loads(job.report_json)
    row: dict[str, Any] = {"job_id": job.id, "state": job.state}
    if not job.succeeded:
        row.update(error_kind=job.error_kind, error_message=job.error_message)
    return row


def register(sub: Any) -> None:
    parent = management_parent()
    p = sub.add_parser(
        "upload",
        parents=[parent],
        help="upload a model file to the management listener",
        description="Upload a model file (ONNX, state_dict, safetensors, ...) for MODEL and "
        "print its upload id, for `ferry convert`.",
    )
    p.add_argument("model", help="model name the upload is for")
    p.add_argument(
        "file",
        type=Path,
        help="the model file, or a folder holding model.onnx and its external-data files",
    )
    _add_upload_flags(p)
    p.add_argument("--json", action="store_true", help="print the upload as JSON")
    p.set_defaults(func=cmd_upload, hint=conversion_hint)

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
        f"      --architecture-kwargs '{MLP_KWARGS}' --input input:FP32:-1,64 --prune "
        "l1_unstructured:0.5\n"
        "  ferry convert seed.pt --model seed --architecture seed --quantize static_int8 \\\n"
        "      --calibration samples.npz --min-cosine 0.98\n\n"
        "--calibration and --validation-inputs take an .npz with one array per model input,\n"
        "first dimension = samples (e.g. np.savez('samples.npz', input=x) with x of shape\n"
        "[N, 3]).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", help="an upload id, or a model file to upload first")
    p.add_argument("--model", default="", help="model name (default: the upload's)")
    _add_upload_flags(
        p.add_argument_group(
            "uploading a file (refused with an upload id, which was stored with its own)"
        )
    )
    p.add_argument(
        "--input",
        type=_input_spec,
        action="append",
        default=[],
        dest="inputs",
        metavar="NAME:DTYPE:DIMS",
        help="a model input, e.g. input:FP32:-1,64; a dim SIZE@AXIS=MIN..MAX is a dynamic axis "
        "whose samples are made at SIZE (e.g. input_ids:INT64:-1,128@sequence=1..512); "
        "repeatable",
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
    p.add_argument(
        "--calibration",
        type=Path,
        metavar="FILE.npz",
        help="representative inputs for static quantization (static_int8): one array per "
        "input, first dimension = samples",
    )
    p.add_argument(
        "--calibration-method",
        metavar="NAME",
        help="how static quantization picks ranges (the server's: minmax, percentile)",
    )
    p.add_argument(
        "--keep-slower",
        action="store_true",
        help="publish the quantized variant even when it measured slower than fp32 (a named "
        "mode is otherwise refused; auto otherwise keeps fp32)",
    )
    p.add_argument(
        "--rollout",
        choices=("shadow",),
        help="shadow: the version serving now keeps the traffic and a share of requests also "
        "runs on the new one, compared (see ferry models rollout)",
    )
    p.add_argument(
        "--rollout-fraction",
        type=float,
        metavar="F",
        help="with --rollout shadow: the share of requests shadowed (0 < F <= 1; 0.1)",
    )
    budget = p.add_argument_group(
        "validation and accuracy budget (the server's defaults when not given)"
    )
    budget.add_argument(
        "--rtol", type=float, help="relative tolerance of ONNX fp32 against PyTorch (1e-3)"
    )
    budget.add_argument(
        "--atol", type=float, help="absolute tolerance of ONNX fp32 against PyTorch (1e-4)"
    )
    budget.add_argument(
        "--min-cosine",
        type=float,
        metavar="C",
        help="budget of a pruned/quantized variant: cosine similarity to fp32 (0.99)",
    )
    budget.add_argument(
        "--min-top1-agreement",
        type=float,
        metavar="F",
        help="budget for classifiers: fraction of samples whose arg-max agrees (0: off)",
    )
    budget.add_argument(
        "--keep-failed",
        action="store_true",
        help="publish a variant that missed the budget anyway (the report says so)",
    )
    budget.add_argument(
        "--validation-inputs",
        type=Path,
        metavar="FILE.npz",
        help="inputs to validate on instead of random ones (one array per input)",
    )
    budget.add_argument(
        "--samples", type=positive_int, help="random validation samples when none are given (16)"
    )
    p.add_argument(
        "--max-batch-size",
        type=positive_int,
        help="serving: largest dynamic batch (the export is checked at it too)",
    )
    p.add_argument("--instance-count", type=positive_int, help="serving: concurrent executions")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return at once")
    add_progress_flags(p)
    p.add_argument(
        "--json",
        action="store_true",
        help="print the final job as JSON (with --no-wait: the job as it started)",
    )
    p.set_defaults(func=cmd_convert, hint=conversion_hint)


def _upload(client: ConversionClient, model: str, path: Path, args: argparse.Namespace) -> Upload:
    if not path.is_file() and not path.is_dir():
        what = "not a regular file or folder" if path.exists() else "no such file or folder"
        raise UsageError(f"{path}: {what}")
    return client.upload(
        model,
        path,
        format=args.format,
        architecture=args.architecture,
        architecture_kwargs=args.architecture_kwargs,
        description=args.description,
        timeout=given_timeout(args),
    )


def cmd_upload(args: argparse.Namespace) -> int:
    with connect(ConversionClient, args) as client:
        up = _upload(client, args.model, args.file, args)
    if args.json:
        print(
            json_text(
                {
                    "upload_id": up.upload_id,
                    "model": up.model,
                    "format": up.format,
                    "size_bytes": up.size_bytes,
                }
            )
        )
    else:
        print(
            f"uploaded {args.file} for {up.model!r}: upload id {up.upload_id} ({up.format}, "
            f"{up.size_bytes:,} bytes)\nnext: {next_step(up)}"
        )
    return EXIT_OK


def next_step(up: Upload) -> str:
    """The convert command for an upload, asking only for what the server cannot know."""
    command = f"ferry convert {up.upload_id}"
    if up.format in SELF_DESCRIBING:
        return f"{command}   (the file names its inputs)"
    if up.inputs:
        known = ", ".join(f"{i.name} {i.datatype} {list(i.shape)}" for i in up.inputs)
        return f"{command}   (inputs from architecture {up.architecture!r}: {known})"
    return f"{command} --input NAME:DTYPE:DIMS   (e.g. input:FP32:-1,64; -1 is dynamic)"


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


def job_summary(job: Job) -> str:
    # The server's one line: what was published, how fast against fp32, how close to PyTorch.
    if job.message:
        return f"job {job.id}: {job.message}"
    line = f"job {job.id}: {job.model!r} {job.state}"
    if job.version is not None:
        line += f", version {job.version} published"
    return line


def _arrays(path: Path | None, flag: str) -> dict[str, np.ndarray] | None:
    """An .npz of named arrays, read without pickle (an object array is refused)."""
    if path is None:
        return None
    if not path.is_file():
        # /dev/zero, or a named pipe nobody writes, was read for ever before anything else.
        what = "is not a regular file" if path.exists() else "does not exist"
        raise UsageError(f"{flag} {path}: {what}; give an .npz written with np.savez")
    try:
        arrays = read_npz(path)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise UsageError(
            f"{flag} {path}: cannot read it as .npz ({exc}); write it with "
            "np.savez(FILE, NAME=array, ...), one array per model input"
        ) from None
    if not arrays:
        raise UsageError(f"{flag} {path}: the file holds no array")
    return arrays


def _validation(args: argparse.Namespace) -> Validation | None:
    fields = {
        "rtol": args.rtol,
        "atol": args.atol,
        "min_cosine": args.min_cosine,
        "min_top1_agreement": args.min_top1_agreement,
        "samples": args.samples,
        "sample_inputs": _arrays(args.validation_inputs, "--validation-inputs"),
    }
    given = {k: v for k, v in fields.items() if v is not None}
    if not given and not args.keep_failed:
        return None
    return Validation(keep_failed=args.keep_failed, **given)


def _quantization(args: argparse.Namespace) -> Quantization | None:
    calibration = _arrays(args.calibration, "--calibration")
    if args.quantize is None:
        if calibration is not None or args.calibration_method or args.keep_slower:
            raise UsageError(
                "--calibration, --calibration-method and --keep-slower need --quantize MODE "
                "(static_int8 calibrates; auto may)"
            )
        return None
    return Quantization(
        mode=args.quantize,
        calibration=args.calibration_method,
        calibration_inputs=calibration,
        keep_slower=args.keep_slower,
    )


def _forget_upload(client: ConversionClient, up: Upload, args: argparse.Namespace) -> None:
    """Remove this command's own upload after its Convert failed or was interrupted. When the
    Convert got through all the same (a Ctrl-C or a deadline after the server took it), the
    server keeps the upload for the job that reads it: the message then names that job, which
    keeps running; when the upload cannot be removed, it says how to remove it."""
    with contextlib.suppress(FerryError):
        client.delete_upload(up.upload_id)
        return
    job = None
    with contextlib.suppress(FerryError):
        job = next((j for j in client.list_jobs(up.model) if j.upload_id == up.upload_id), None)
    if job is not None:
        args.waited_job = job.id
        args.interrupted_hint = still_running(job.id)
    else:
        args.interrupted_hint = (
            f"upload {up.upload_id} stays on the server: remove it with "
            f"`ferry uploads delete {up.upload_id}`"
        )


def _refuse_upload_flags(args: argparse.Namespace) -> None:
    """The upload flags describe a file this command uploads; an upload id names one stored
    with its own. Given with an id they were dropped without a word, so a corrected
    --architecture-kwargs converted the weights with the stored (wrong) kwargs again."""
    given = [
        flag
        for flag, value in (
            ("--format", args.format),
            ("--architecture", args.architecture),
            ("--architecture-kwargs", args.architecture_kwargs),
            ("--description", args.description),
        )
        if value
    ]
    if given:
        raise UsageError(
            f"{', '.join(given)} describe a file to upload, and upload {args.source} is stored "
            "with its own: give the file instead of the id (`ferry convert FILE --model NAME "
            "...`), or leave them out"
        )


def cmd_convert(args: argparse.Namespace) -> int:
    serving = None
    if args.instance_count is not None or args.max_batch_size is not None:
        # --max-batch-size is the new version's serving batch, as its help says; it went only
        # to the job's export check, so the version was served at the load's default (32).
        serving = Serving(instance_count=args.instance_count, max_batch_size=args.max_batch_size)
    validation = _validation(args)
    quantization = _quantization(args)
    with connect(ConversionClient, args) as client:
        source: Upload | str = args.source
        path = Path(args.source)
        if path.is_file() or path.is_dir():
            if not args.model:
                raise UsageError(f"converting the file {path} needs --model NAME")
            source = _upload(client, args.model, path, args)
        elif _UPLOAD_ID.fullmatch(args.source):
            _refuse_upload_flags(args)
        else:
            # Neither an upload id nor a file here: a mistyped path went to the server as an
            # id and came back "upload id 'modle.onnx' is malformed" (exit 1, the server said
            # no), where `ferry upload` of the same path says the file is missing (exit 2).
            what = "not a regular file or folder" if path.exists() else "no such file or folder"
            raise UsageError(
                f"{path}: {what}, nor an upload id (32 hex characters, `ferry uploads list`)"
            )
        try:
            job = client.convert(
                source,
                model=args.model,
                inputs=args.inputs or None,
                opset=args.opset,
                pruning=_pruning(args.prune),
                quantization=quantization,
                validation=validation,
                serving=serving,
                max_batch_size=args.max_batch_size,
                rollout=args.rollout,
                rollout_fraction=args.rollout_fraction,
            )
        except (FerryError, KeyboardInterrupt):
            if isinstance(source, Upload):
                # This command's own upload, its id never shown: a refused spec (or a Ctrl-C)
                # left one more behind on every corrected retry.
                _forget_upload(client, source, args)
            raise
        if args.no_wait and args.json:
            # The job as it started: the human line below is no JSON for a script to read.
            started = {"job_id": job.id, "model": job.model, "state": job.state}
            print(json_text({**started, "upload_id": job.upload_id}))
            return EXIT_OK
        if args.no_wait:
            print(
                f"job {job.id} {job.state}; follow it with `ferry jobs wait {job.id}`, stop it "
                f"with `ferry jobs cancel {job.id}`"
            )
            return EXIT_OK
        follow(job, args, final_json)
    if args.json:
        print(json_text(final_json(job)))
    else:
        print(job_summary(job))
    return EXIT_OK
