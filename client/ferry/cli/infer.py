"""``ferry infer``: one request from files (or random data), outputs printed or saved."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import numpy as np

from ferry.cli._common import (
    EXIT_OK,
    UsageError,
    check_destination,
    connection_parent,
    finite,
    json_text,
    make_client,
    positive_int,
    shape_spec,
    version_number,
)
from ferry.client import InferResult
from ferry.client.loadtest import InputError, generate_inputs, load_inputs
from ferry.codec import CodecError, datatype_name, datatype_of


def register(sub: Any) -> None:
    p = sub.add_parser(
        "infer",
        parents=[connection_parent()],
        help="run one inference from .npy/.npz/JSON inputs (or random ones)",
        description="Run one inference and print the outputs, or save them with -o.",
        epilog="examples:\n"
        "  ferry infer mlp --random\n"
        "  ferry infer mlp -i batch.npy -o out.npz\n"
        "  ferry infer two_io -i inputs.json --json\n"
        "  ferry infer two_io -i a=a.npy -i b=b.npy\n\n"
        'JSON inputs: {"NAME": [[...]], ...} or {"NAME": {"data": [...], "shape": [...], '
        '"datatype": "FP32"}}; values take the dtype the model declares.',
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="model name")
    p.add_argument(
        "-i",
        "--input",
        action="append",
        default=[],
        metavar="SPEC",
        dest="inputs",
        help="FILE.npz, FILE.json, FILE.npy (single-input models) or NAME=FILE.npy; repeatable",
    )
    p.add_argument(
        "--random", action="store_true", help="random inputs shaped from the model's metadata"
    )
    p.add_argument(
        "--batch-size", type=positive_int, default=1, help="batch size for --random (default 1)"
    )
    p.add_argument(
        "--shape",
        type=shape_spec,
        action="append",
        default=[],
        metavar="NAME=D,D",
        help="shape of a --random input with dynamic dimensions; repeatable",
    )
    p.add_argument(
        "--version", type=version_number, help="model version (default: the default one)"
    )
    p.add_argument(
        "--output",
        action="append",
        default=[],
        metavar="NAME",
        dest="outputs",
        help="return only this output; repeatable (default: all)",
    )
    p.add_argument(
        "-o",
        "--output-file",
        type=Path,
        metavar="FILE",
        help="save outputs: .npz (all), .npy (exactly one output) or .json",
    )
    p.add_argument("--json", action="store_true", help="print outputs as JSON")
    p.set_defaults(func=cmd_infer)


def _spelled(value: float) -> str:
    """A float output that is not finite, as the string Python's ``float()`` reads back: strict
    JSON has no NaN or Infinity, and null would lose which one it was."""
    return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")


def _element(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    return value


def _jsonable(result: InferResult) -> dict[str, Any]:
    outputs = {}
    for name, arr in result.items():
        data = arr.tolist()
        if arr.dtype == object:  # nested like the numbers: the shape of the tensor
            flat = np.empty(arr.size, dtype=object)
            flat[:] = [_element(v) for v in arr.reshape(-1).tolist()]
            data = flat.reshape(arr.shape).tolist()
        outputs[name] = {
            "datatype": datatype_name(datatype_of(arr.dtype)),
            "shape": list(arr.shape),
            "data": finite(data, _spelled),
        }
    return {"model": result.model, "version": result.version, "id": result.id, "outputs": outputs}


def _loadable(arr: np.ndarray) -> np.ndarray:
    """What np.load gives back as numbers: bfloat16 (ml_dtypes, not numpy's own) was saved as
    two raw bytes per element ('|V2'), so it is saved widened to float32, which is exact."""
    return arr.astype(np.float32) if arr.dtype.name == "bfloat16" else np.asarray(arr)


def _save(result: InferResult, path: Path) -> None:
    suffix = path.suffix.lower()
    if suffix == ".npz":
        arrays: dict[str, Any] = {k: _loadable(v) for k, v in result.items()}
        np.savez(path, **arrays)
    elif suffix == ".npy":
        if len(result) != 1:
            raise UsageError(
                f"{path}: a .npy holds one array but the model returned {list(result)}: "
                "use .npz, or pick one with --output NAME"
            )
        np.save(path, _loadable(next(iter(result.values()))))
    elif suffix == ".json":
        path.write_text(json_text(_jsonable(result)))
    else:
        raise UsageError(f"{path}: unsupported output file type; use .npz, .npy or .json")


def _print(result: InferResult) -> None:
    t = result.timings
    print(
        f"{result.model} version {result.version}: {len(result)} output(s) in "
        f"{t.total * 1e3:.2f} ms (rpc {t.rpc * 1e3:.2f} ms)"
    )
    for name, arr in result.items():
        dt = datatype_name(datatype_of(arr.dtype))
        body = np.array2string(arr, threshold=64, edgeitems=3, precision=5)
        print(f"{name} {dt} {list(arr.shape)}\n{body}")


def cmd_infer(args: argparse.Namespace) -> int:
    if bool(args.inputs) == bool(args.random):
        raise UsageError(
            "give inputs with -i FILE (.npy, .npz or .json) or use --random, one or the other"
        )
    if args.output_file is not None:
        check_destination(args.output_file, "-o")
    with make_client(args) as client:
        meta = client.model_metadata(args.model, version=args.version)
        try:
            if args.random:
                inputs = generate_inputs(meta, batch_size=args.batch_size, shapes=dict(args.shape))
            else:
                inputs = load_inputs(args.inputs, meta)
        except InputError as exc:
            raise UsageError(str(exc)) from None
        try:
            result = client.infer(
                args.model, inputs, version=args.version, outputs=args.outputs or None
            )
        except CodecError as exc:  # an array the wire cannot carry (e.g. an object dtype)
            raise UsageError(str(exc)) from None
    if args.output_file is not None:
        _save(result, args.output_file)
        print(f"saved {list(result)} to {args.output_file}")
    elif args.json:
        print(json_text(_jsonable(result)))
    else:
        _print(result)
    return EXIT_OK
