"""``ferry serve`` / ``python -m ferry.server``: flags + environment -> settings -> run."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from ferry.server.logs import configure_logging
from ferry.server.settings import SettingsError, add_arguments, from_args


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(
        prog="ferry serve", description="Serve the ONNX models of a model repository over gRPC."
    )
    add_arguments(parser)
    return parser


def serve(args: argparse.Namespace) -> int:
    try:
        from ferry.server.errors import FerryError
        from ferry.server.grpc.app import FerryServer
        from ferry.server.workers.fleet import WorkerStartError
    except ImportError as exc:  # the SDK alone is installed: say which extra serves
        print(
            f"ferry serve: the server is not installed ({exc}); install it with "
            "pip install 'ferry-serve[server]' (or 'ferry-serve[gpu]' for onnxruntime-gpu)",
            file=sys.stderr,
        )
        return 1
    try:
        settings = from_args(args)
    except SettingsError as exc:  # a deployment mistake: one line that says what to set, no trace
        print(f"ferry serve: {exc}", file=sys.stderr)
        return 1
    configure_logging(settings.log_level, settings.log_format)
    from ferry.server.open_files import raise_open_files_limit

    raise_open_files_limit()
    try:
        server = FerryServer(settings)  # a missing repository folder raises here
        asyncio.run(server.run_until_signal())
    except (OSError, SettingsError) as exc:  # a port in use, a bad token or certificate file
        print(f"ferry serve: {exc}", file=sys.stderr)
        return 1
    except FerryError as exc:  # e.g. a missing repository folder
        print(f"ferry serve: {exc.message}", file=sys.stderr)
        return 1
    except WorkerStartError as exc:  # --workers: one died while the fleet started
        print(f"ferry serve: {exc}", file=sys.stderr)
        return 1
    if server.registry.opening:
        _exit_now()
    return 0


def _exit_now() -> None:
    """Exit 0 at once: the server has stopped (listeners closed, workers stopped, run folder
    removed), but a model load the stop gave up (SIGTERM during the start-up load) still runs
    in a loader thread that onnxruntime does not let go of. The interpreter's exit joined it,
    minutes for a large model: past a pod's grace period, so the kubelet killed the process."""
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main(argv: list[str] | None = None) -> int:
    return serve(build_parser().parse_args(argv))
