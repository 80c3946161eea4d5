"""The ``ferry`` command.

Client-side commands work with the SDK install alone. ``serve`` imports the server only when it is
the command being run: ``ferry --help`` and every other command stay fast and work without the
``server`` extra. Each command group lives in its own module with a ``register(subparsers)``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from types import ModuleType

from ferry.cli import health, infer, loadtest, models
from ferry.cli._common import EXIT_USAGE, report_error, run_handler

try:
    from importlib.metadata import PackageNotFoundError, version

    __version__ = version("ferry-serve")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0+unknown"

DESCRIPTION = "Ferry: PyTorch -> pruned/quantized ONNX -> served over gRPC with dynamic batching."
EPILOG = """exit status: 0 ok, 1 the server said no (or a check failed), 2 bad usage or files,
3 nothing answered at the target.

environment: FERRY_TARGET (default --target), FERRY_TOKEN (bearer token).
`ferry COMMAND --help` describes each command."""


def _conversion_commands() -> list[ModuleType]:
    """The upload/convert/uploads commands, when this install has the conversion client."""
    try:
        return [
            importlib.import_module(f"ferry.cli.{name}")
            for name in ("conversion", "uploads", "jobs")
        ]
    except ImportError:
        return []


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ferry",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"ferry {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # Listed here for --help only; main() hands `serve` to the server's own parser.
    sub.add_parser(
        "serve",
        help="serve a model repository over gRPC (needs the server extra)",
        add_help=False,
    )
    models.register(sub)
    infer.register(sub)
    for commands in _conversion_commands():
        commands.register(sub)
    health.register(sub)
    loadtest.register(sub)
    return parser


def _serve(argv: Sequence[str]) -> int:
    try:
        from ferry.server.cli import build_parser as build_serve_parser
        from ferry.server.cli import serve
    except ImportError as exc:  # the server extra is not installed
        report_error(
            "ferry serve",
            f"the server is not installed ({exc})",
            "pip install 'ferry-serve[server]'",
        )
        return EXIT_USAGE
    parser = build_serve_parser(argparse.ArgumentParser(prog="ferry serve"))
    return int(serve(parser.parse_args(list(argv))))


def _take_trailing(
    parser: argparse.ArgumentParser, args: argparse.Namespace, extra: list[str]
) -> None:
    """Positionals given after an option: argparse fills a ``nargs="*"`` positional before the
    options and then refuses the rest (`ferry models rollout m --target h:p 1=1` was
    "unrecognized arguments: 1=1"). A command that names such a positional
    (``trailing_positionals``: its destination and type) takes them; any other is refused as
    before."""
    trailing = getattr(args, "trailing_positionals", None)
    command = _command_parser(parser, args)
    if trailing is None or any(item.startswith("-") for item in extra):
        command.error(f"unrecognized arguments: {' '.join(extra)}")
    dest, convert = trailing
    try:
        values = [convert(item) for item in extra]
    except argparse.ArgumentTypeError as exc:
        command.error(str(exc))
    setattr(args, dest, [*(getattr(args, dest) or []), *values])


def _command_parser(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> argparse.ArgumentParser:
    """The parser of the command given (``jobs cancel``), to refuse its arguments with its
    own usage: the top parser's said "usage: ferry [-h] [--version] COMMAND ..." and
    "ferry: error: unrecognized arguments: --json" for `ferry jobs cancel ID --json`, naming
    neither the command nor the flags it takes."""
    names = [args.command, getattr(args, f"{args.command}_command", None)]
    for name in filter(None, names):
        subparsers = next(
            (a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None
        )
        if subparsers is None or name not in subparsers.choices:
            break
        parser = subparsers.choices[name]
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["serve"]:
        return _serve(args_list[1:])
    parser = build_parser()
    args, extra = parser.parse_known_args(args_list)
    if extra:
        _take_trailing(parser, args, extra)
    prog = f"ferry {args.command}"
    action = getattr(args, f"{args.command}_command", None)
    if action:
        prog += f" {action}"
    return run_handler(prog, args.func, args)


if __name__ == "__main__":
    sys.exit(main())
