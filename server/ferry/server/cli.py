"""``ferry serve`` / ``python -m ferry.server``: flags + environment -> settings -> run."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from ferry.server.settings import SettingsError, add_arguments, from_args


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(
        prog="ferry serve", description="Serve the ONNX models of a model repository over gRPC."
    )
    add_arguments(parser)
    return parser


def serve(args: argparse.Namespace) -> int:
    from ferry.server.grpc.app import FerryServer

    try:
        settings = from_args(args)
    except SettingsError as exc:  # a deployment mistake: one line that says what to set, no trace
        print(f"ferry serve: {exc}", file=sys.stderr)
        return 1
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        asyncio.run(FerryServer(settings).run_until_signal())
    except OSError as exc:
        print(f"ferry serve: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    return serve(build_parser().parse_args(argv))
