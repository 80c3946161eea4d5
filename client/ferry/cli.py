"""The ``ferry`` command. Subcommands that need the server import it only when run, so the
client-side commands work with the SDK install alone."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ferry", description="Ferry: PyTorch -> ONNX -> gRPC.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve a model repository over gRPC")
    try:
        from ferry.server.cli import build_parser, serve as run_serve
    except ImportError as exc:  # the server extra is not installed
        serve.set_defaults(func=lambda _a: _missing_server(exc))
    else:
        build_parser(serve)
        serve.set_defaults(func=run_serve)
    args = parser.parse_args(argv)
    return int(args.func(args))


def _missing_server(exc: ImportError) -> int:
    print(f"ferry serve needs the server extra: pip install 'ferry-serve[server]' ({exc})",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
