"""``ferry loadtest``: throughput and latency of one model, closed or open loop, with a report."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

from ferry.cli._common import (
    EXIT_FAILED,
    EXIT_OK,
    MAX_MESSAGE_BYTES,
    UsageError,
    channel_config,
    check_destination,
    connect,
    connection_parent,
    positive_float,
    positive_int,
    seed_int,
    shape_spec,
    tls_config,
    usage_error,
    version_number,
)
from ferry.client import ConnectionError_, FerryError, InferenceClient
from ferry.client.loadtest import (
    MAX_CONCURRENCY,
    MAX_DURATION,
    MAX_RATE,
    MAX_REQUESTS,
    InputError,
    LoadTestConfig,
    LoadTestConfigError,
    LoadTestReport,
    PlotUnavailableError,
    load_inputs,
    plot_report,
    run,
)


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected integers like 1,4,16,64") from None


def _float_list(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected numbers like 100,500") from None


def register(sub: Any) -> None:
    p = sub.add_parser(
        "loadtest",
        parents=[connection_parent()],
        help="measure throughput and latency (closed or open loop, sweeps, JSON/CSV/plot)",
        description="Load-test one model: a closed loop at fixed concurrencies (-c) or an open\n"
        "loop at fixed request rates (--rate). Reports throughput, latency percentiles,\n"
        "errors by status code and the server-side queue/compute split.",
        epilog="examples:\n"
        "  ferry loadtest mlp -c 1,4,16,64 -d 10 --plot sweep.png\n"
        "  ferry loadtest mlp -c 64 --mode stream -n 100000\n"
        "  ferry loadtest mlp --rate 500 --arrival poisson -d 30 --json out.json\n"
        "  ferry loadtest mlp -c 16 --protocol kserve\n\n"
        f"caps: {MAX_DURATION:g} s in all, {MAX_REQUESTS:,} requests per level, concurrency "
        f"{MAX_CONCURRENCY}, rate {MAX_RATE:g}/s; non-loopback targets need --allow-remote.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="model name")
    load = p.add_mutually_exclusive_group()
    load.add_argument(
        "-c",
        "--concurrency",
        type=_int_list,
        default=(1,),
        metavar="N[,N...]",
        help="closed loop: requests kept in flight; a list sweeps (default 1)",
    )
    load.add_argument(
        "--rate",
        type=_float_list,
        metavar="R[,R...]",
        help="open loop: requests per second offered, whatever the answers do; a list sweeps",
    )
    p.add_argument(
        "--arrival",
        choices=("constant", "poisson"),
        default="constant",
        help="open-loop arrivals: evenly spaced or Poisson (default constant)",
    )
    p.add_argument(
        "-d",
        "--duration",
        type=positive_float,
        metavar="SECONDS",
        help="seconds per level (default 10 unless -n is given)",
    )
    p.add_argument(
        "-n",
        "--requests",
        type=positive_int,
        metavar="N",
        help="requests per level (with -d: whichever ends first)",
    )
    p.add_argument(
        "--warmup",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="unmeasured load before the first level (default 1; 0: none)",
    )
    p.add_argument(
        "--mode",
        choices=("unary", "stream"),
        default="unary",
        help="one RPC per request, or all requests on one stream per connection (default unary)",
    )
    p.add_argument(
        "--protocol",
        choices=("ferry", "kserve"),
        default="ferry",
        help="ferry.v1 or the Open Inference Protocol (KServe v2 ModelInfer, ModelStreamInfer) "
        "(default ferry)",
    )
    p.add_argument(
        "--version", type=version_number, help="model version (default: the default one)"
    )
    p.add_argument(
        "--batch-size", type=positive_int, default=1, help="batch size of generated inputs"
    )
    p.add_argument(
        "--shape",
        type=shape_spec,
        action="append",
        default=[],
        metavar="NAME=D,D",
        help="shape for a generated input with dynamic dimensions; repeatable",
    )
    p.add_argument(
        "-i",
        "--input",
        action="append",
        default=[],
        metavar="SPEC",
        dest="inputs",
        help="send these inputs instead of generated ones (as for ferry infer); repeatable",
    )
    p.add_argument(
        "--connections",
        type=positive_int,
        default=1,
        help="HTTP/2 connections to spread requests over (default 1)",
    )
    p.add_argument("--seed", type=seed_int, default=0, help="seed for inputs and Poisson arrivals")
    p.add_argument("--json", metavar="FILE", help="write the report as JSON ('-': stdout)")
    p.add_argument("--csv", metavar="FILE", help="write one CSV row per level ('-': stdout)")
    p.add_argument(
        "--plot",
        type=Path,
        metavar="FILE.png",
        help="draw latency percentiles against throughput (needs ferry-serve[plot])",
    )
    p.add_argument(
        "--allow-remote",
        action="store_true",
        help="allow a non-loopback target (only servers you operate)",
    )
    p.add_argument(
        "--no-progress", action="store_true", help="no live progress line (default: on a TTY)"
    )
    p.set_defaults(func=cmd_loadtest)


def _config(args: argparse.Namespace) -> LoadTestConfig:
    duration = args.duration
    if duration is None and args.requests is None:
        duration = 10.0
    return LoadTestConfig(
        model=args.model,
        target=args.target,
        version=args.version,
        concurrency=args.concurrency,
        rate=args.rate,
        arrival=args.arrival,
        duration=duration,
        requests=args.requests,
        warmup=args.warmup,
        mode=args.mode,
        protocol=args.protocol,
        batch_size=args.batch_size,
        shapes=dict(args.shape),
        timeout=args.timeout,
        connections=args.connections,
        seed=args.seed,
        allow_remote=args.allow_remote,
        tls=tls_config(args),
        token=args.token,
        # The inputs are read already: the server's --max-message-bytes decides what goes, as
        # for `ferry infer` (the SDK's 80 MiB refused what the server would take).
        max_message_bytes=MAX_MESSAGE_BYTES,
    )


def _inputs(args: argparse.Namespace) -> dict[str, Any]:
    """-i files read as `ferry infer` reads them: with the model's metadata, so that JSON
    values take its declared dtypes and a bare .npy feeds its single input. Read without it,
    JSON lists went out as FP64 (refused by an FP32 model) and a bare .npy was refused.
    Asked only after validate(): the target is a loopback one, or allowed."""
    with connect(InferenceClient, args) as client:
        meta = client.model_metadata(args.model, version=args.version)
    try:
        return load_inputs(args.inputs, meta)
    except InputError as exc:
        raise UsageError(str(exc)) from None


def _write(dest: str, text: str) -> None:
    if dest == "-":
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
    else:
        Path(dest).write_text(text)


def _outputs(args: argparse.Namespace, report: LoadTestReport) -> None:
    if args.json:
        _write(args.json, report.to_json())
    if args.csv:
        _write(args.csv, report.to_csv())
    if args.plot:
        plot_report(report, args.plot)
        print(f"plot written to {args.plot}", file=sys.stderr)


def cmd_loadtest(args: argparse.Namespace) -> int:
    if args.json == "-" and args.csv == "-":
        raise UsageError("--json - and --csv - would both write to stdout: send one to a file")
    config = _config(args)
    try:
        config.validate()
    except ValueError as exc:  # LoadTestConfigError, or the target's InvalidArgumentError
        raise usage_error(exc) from None
    # The connection flags (a PEM file it cannot read), judged as every other command's client
    # judges them: the run makes its clients later, in its event loop, where a ValueError was
    # a traceback.
    channel_config(args)
    if args.plot:  # fail before the run, not after minutes of load
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UsageError(
                "--plot needs matplotlib: pip install 'ferry-serve[plot]' (or drop --plot)"
            ) from None
        from matplotlib.figure import Figure

        formats = Figure().canvas.get_supported_filetypes()
        suffix = Path(args.plot).suffix.lower().lstrip(".")
        if suffix not in formats:
            raise UsageError(
                f"--plot {args.plot}: matplotlib cannot write {suffix or 'a file without a '}"
                f"{' files' if suffix else 'suffix'}; name it .png, .svg or .pdf "
                f"(any of: {', '.join(sorted(formats))})"
            )
    for flag, dest in (("--json", args.json), ("--csv", args.csv), ("--plot", args.plot)):
        if dest not in (None, "-"):
            check_destination(dest, flag)
    if args.inputs:
        config = dataclasses.replace(config, inputs=_inputs(args))
    try:
        report = run(config, progress=False if args.no_progress else None)
    except (InputError, LoadTestConfigError, NotImplementedError) as exc:
        raise UsageError(str(exc)) from None
    except PlotUnavailableError as exc:
        raise UsageError(str(exc)) from None
    # The table goes to stderr when stdout carries JSON or CSV, so both can be piped.
    to_stdout = "-" not in (args.json, args.csv)
    print(report.format_table(), file=sys.stdout if to_stdout else sys.stderr)
    _outputs(args, report)
    if any(level.ok == 0 for level in report.levels):
        codes = sorted({c for lv in report.levels for c in lv.errors})
        raise FerryError(f"a level had no successful request (errors: {', '.join(codes)})")
    gone = [lv for lv in report.levels if lv.errors.get("UNAVAILABLE")]
    if gone:
        # The server stopped answering during the run: exit 3 ("nothing answered at the
        # target"), not 0, so a script does not take a run against a dead server for a result.
        where = ", ".join(f"{lv.level:g} ({lv.errors['UNAVAILABLE']})" for lv in gone)
        raise ConnectionError_(
            f"the target did not answer some requests (UNAVAILABLE at level {where}): the "
            "server went away or refused connections during the run; the figures are partial"
        )
    return EXIT_OK if report.levels else EXIT_FAILED
