"""What every client-side command shares: connection flags, exit codes and one-line errors.

Errors are one line on stderr that say what to fix, because the reader is usually a person at a
terminal or a CI log, and a traceback there answers neither "what happened" nor "what now".
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO, TypeVar

from ferry.client import (
    AuthenticationError,
    ChannelConfig,
    ConnectionError_,
    DeadlineExceededError,
    FerryError,
    InferenceClient,
    InvalidInputError,
    LimitExceededError,
    ModelNotFoundError,
    ModelNotReadyError,
    PermissionDeniedError,
    ServerOverloadedError,
    TLSConfig,
    UnimplementedError,
)
from ferry.client._channel import HOST_LIST_HINT
from ferry.client._errors import WRONG_LISTENER
from ferry.client._requests import MAX_TIMEOUT_S

EXIT_OK = 0
EXIT_FAILED = 1  # the server answered with an error, or the check did not pass
EXIT_USAGE = 2  # bad flags, files or values: fix the command line (argparse uses 2 too)
EXIT_UNREACHABLE = 3  # nothing answered at the target
EXIT_INTERRUPTED = 130

DEFAULT_TARGET = "127.0.0.1:8001"
DEFAULT_MANAGEMENT_TARGET = "127.0.0.1:8003"
Handler = Callable[[argparse.Namespace], int]
# A command's own hints, tried before the inference ones: a hint must match the command.
Hinter = Callable[[FerryError, argparse.Namespace], str | None]
C = TypeVar("C")


class UsageError(Exception):
    """A problem with what the user asked for; exits with EXIT_USAGE."""


def connection_parent(
    *,
    default_target: str | None = None,
    target_env: str = "FERRY_TARGET",
    token: str | None = None,
    token_env: str = "FERRY_TOKEN",
    timeout: float = 30.0,
    timeout_note: str = "",
) -> argparse.ArgumentParser:
    """Flags of every command that talks to a server; environment variables give defaults, so
    that a token never has to appear in a shell history or a process list."""
    if default_target is None:
        default_target = os.environ.get("FERRY_TARGET", DEFAULT_TARGET)
    if token is None:
        token = os.environ.get("FERRY_TOKEN")
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("connection")
    g.add_argument(
        "--target",
        default=default_target,
        help="HOST:PORT of the listener, or IP:PORT,IP:PORT,... balanced round-robin "
        f"(env {target_env}; default {default_target})",
    )
    g.add_argument(
        "--timeout",
        type=seconds,
        default=timeout,
        action=_GivenTimeout,
        help=f"seconds each call may take, any retries included (default {timeout:g}"
        f"{timeout_note})",
    )
    g.add_argument(
        "--token",
        default=token,
        help=f"bearer token (env {token_env}; prefer the variable: flags show in ps)",
    )
    g.add_argument(
        "--tls", action="store_true", help="use TLS, trusting the system's root certificates"
    )
    g.add_argument("--tls-ca", type=Path, help="PEM CA certificate to trust (implies --tls)")
    g.add_argument("--tls-cert", type=Path, help="PEM client certificate, for mutual TLS")
    g.add_argument("--tls-key", type=Path, help="PEM client key, for mutual TLS")
    g.add_argument(
        "--tls-server-name", help="check the server certificate against this name instead"
    )
    return p


class _GivenTimeout(argparse.Action):
    """--timeout, remembering that it was given: an upload or a job's wait has no deadline by
    default (a large model or a long conversion has no sensible bound), but one given on the
    command line was ignored there, so `ferry upload --timeout 5` to a stalled server hung."""

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, *args: Any
    ) -> None:
        setattr(namespace, self.dest, args[0])
        namespace.timeout_given = True


def given_timeout(args: argparse.Namespace) -> float | None:
    """--timeout when the command line gave it, else None (no deadline)."""
    return args.timeout if getattr(args, "timeout_given", False) else None


def management_parent(timeout: float = 60.0) -> argparse.ArgumentParser:
    """Connection flags of the commands that talk to the management listener: their own
    variables, so that the inference target and token never reach it by accident."""
    return connection_parent(
        default_target=os.environ.get("FERRY_MANAGEMENT_TARGET", DEFAULT_MANAGEMENT_TARGET),
        target_env="FERRY_MANAGEMENT_TARGET",
        token=os.environ.get("FERRY_MANAGEMENT_TOKEN", os.environ.get("FERRY_TOKEN")),
        token_env="FERRY_MANAGEMENT_TOKEN",
        timeout=timeout,
        timeout_note="; an upload or a job's wait: none unless given",
    )


def management_hint(exc: FerryError, args: argparse.Namespace) -> str | None:
    """Hints for every management command; None: no management-specific one."""
    target = getattr(args, "target", DEFAULT_MANAGEMENT_TARGET)
    if isinstance(exc, ConnectionError_):
        return (
            f"nothing answered at {target}: management listens on 127.0.0.1:8003 unless the "
            "server says otherwise (--management-port); point --target (or "
            "FERRY_MANAGEMENT_TARGET) at it"
        )
    if isinstance(exc, UnimplementedError):
        return (
            "this listener does not offer that call: management commands go to the management "
            "listener (FERRY_MANAGEMENT_TARGET, default 127.0.0.1:8003), not the inference one"
        )
    if isinstance(exc, AuthenticationError):
        return "pass the management token with FERRY_MANAGEMENT_TOKEN"
    if isinstance(exc, PermissionDeniedError):
        return (
            "the inference token may not manage: use the management token (FERRY_MANAGEMENT_TOKEN)"
        )
    if isinstance(exc, ModelNotFoundError):
        return "`ferry models list` shows what is served; the repository folder, what exists"
    if isinstance(exc, InvalidInputError):
        return f"see `ferry {command_name(args)} --help`"
    return None


def command_name(args: argparse.Namespace) -> str:
    """The command as typed, with its action (`models rollout`): `--help` of the group alone
    (`ferry models --help`) lists the actions, not the flags the message is about."""
    action = getattr(args, f"{args.command}_command", None)
    return f"{args.command} {action}" if action else str(args.command)


def tls_config(args: argparse.Namespace) -> TLSConfig | None:
    if not (args.tls or args.tls_ca or args.tls_cert or args.tls_key or args.tls_server_name):
        return None
    try:
        return TLSConfig(
            ca_cert=args.tls_ca,
            client_cert=args.tls_cert,
            client_key=args.tls_key,
            server_name_override=args.tls_server_name,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def usage_error(exc: ValueError) -> UsageError:
    """A connection option the SDK refused, worded for the command line: the SDK's advice for
    several host names is an option (load_balancing) that no flag sets."""
    text = str(exc)
    if text.endswith(HOST_LIST_HINT):
        text = text.removesuffix(HOST_LIST_HINT) + (
            "give IP addresses (--target 10.0.0.1:8001,10.0.0.2:8001), or one host name, "
            "which reaches one of the servers it resolves to"
        )
    return UsageError(text)


def channel_config(args: argparse.Namespace) -> ChannelConfig:
    try:
        return ChannelConfig(args.target, tls=tls_config(args), token=args.token)
    except ValueError as exc:
        raise usage_error(exc) from None


def connect(cls: Callable[..., C], args: argparse.Namespace, **options: Any) -> C:
    """A client of any kind (inference, repository, conversion) from the connection flags; a
    target or TLS setting the client refuses is a usage error."""
    try:
        return cls(
            args.target, timeout=args.timeout, tls=tls_config(args), token=args.token, **options
        )
    except ValueError as exc:
        raise usage_error(exc) from None


# gRPC's own bound on a message (a C int). A command sends one request whose inputs it has
# read already, so the server's --max-message-bytes decides what goes: with the SDK's default
# (80 MiB), `ferry infer` refused a larger input itself, naming a client option no flag reaches.
MAX_MESSAGE_BYTES = 2**31 - 1


def make_client(args: argparse.Namespace) -> InferenceClient:
    return connect(InferenceClient, args, max_message_bytes=MAX_MESSAGE_BYTES)


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:  # nan passed a plain "> 0" test
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def seconds(text: str) -> float:
    """--timeout and --wait: what a gRPC deadline can be. ``--wait 1e20`` overflowed gRPC's
    deadline arithmetic, so the watch ended at once and a serving server was reported
    UNREACHABLE (exit 3); ``--timeout 1e20`` failed every call with DEADLINE_EXCEEDED."""
    value = positive_float(text)
    if value >= MAX_TIMEOUT_S:
        raise argparse.ArgumentTypeError(
            f"must be below {MAX_TIMEOUT_S:g} seconds (about 31 years), got {text}"
        )
    return value


MAX_VERSION = 2**53


def _int_within(text: str, low: int, high: int | None) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if high is None and value < low:
        raise argparse.ArgumentTypeError(f"must be >= {low}, got {text}")
    if high is not None and not low <= value <= high:
        raise argparse.ArgumentTypeError(f"must be within {low}..{high}, got {text}")
    return value


def version_number(text: str) -> int:
    """--version: what the server accepts (1..2**53); a larger one made the request message
    itself fail with a Python traceback."""
    return _int_within(text, 1, MAX_VERSION)


def seed_int(text: str) -> int:
    return _int_within(text, 0, 2**32 - 1)


def positive_int(text: str) -> int:
    return _int_within(text, 1, None)


def count_or_all(text: str) -> int | None:
    """--limit of a listing: 0 for every record (None to the SDK, which follows the pages)."""
    return _int_within(text, 0, None) or None


def add_listing_flags(p: argparse.ArgumentParser, records: str) -> None:
    """MODEL, --limit and --json of the management listings (uploads, jobs)."""
    p.add_argument("model", nargs="?", default="", help=f"only this model's {records}")
    p.add_argument(
        "--limit", type=count_or_all, default=100, help="at most this many (default 100; 0: all)"
    )
    p.add_argument("--json", action="store_true", help="print JSON")


def add_progress_flags(p: argparse.ArgumentParser) -> None:
    """--progress / --no-progress of the commands that follow a conversion job."""
    bar = p.add_mutually_exclusive_group()
    bar.add_argument("--progress", action="store_true", help="always draw the progress bar")
    bar.add_argument("--no-progress", action="store_true", help="never draw it")


def progress_of(args: argparse.Namespace) -> bool | None:
    """None: a bar when stderr is a terminal (Job.wait decides)."""
    return True if args.progress else False if args.no_progress else None


def utc_time(stamp: float | None) -> str:
    if not stamp:
        return "-"
    when = datetime.datetime.fromtimestamp(stamp, tz=datetime.UTC)
    return when.strftime("%Y-%m-%d %H:%M:%SZ")


def shape_spec(text: str) -> tuple[str, tuple[int, ...]]:
    """``NAME=D,D,...`` for --shape."""
    name, sep, dims = text.partition("=")
    try:
        if not sep or not name:
            raise ValueError
        return name, tuple(int(d) for d in dims.split(",") if d.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected NAME=D1,D2,... (e.g. input=1,64)"
        ) from None


# How the server words a refusal of the requested outputs (core/inputs.py): an unknown name or
# one asked twice. Such a request's inputs are fine; the hint must not send the user to them.
_OUTPUT_REFUSALS = (": unknown outputs ", "' is requested twice")


def _names_outputs(message: str) -> bool:
    return any(marker in message for marker in _OUTPUT_REFUSALS)


def _hint(exc: FerryError, args: argparse.Namespace) -> str:
    if isinstance(exc, UnimplementedError) and WRONG_LISTENER in exc.message:
        return ""  # the SDK's message already says which listener serves what
    own: Hinter | None = getattr(args, "hint", None)
    if own is not None:
        hint = own(exc, args)
        if hint is not None:
            return hint
    target = getattr(args, "target", DEFAULT_TARGET)
    if isinstance(exc, ConnectionError_):
        return (
            f"nothing answered at {target}: start a server with `ferry serve`, or point "
            "--target (or FERRY_TARGET) at one"
        )
    if isinstance(exc, ModelNotFoundError):
        return "`ferry models list` shows what is served"
    if isinstance(exc, ModelNotReadyError):
        return "the model is still loading or failed: see `ferry models list`"
    if isinstance(exc, InvalidInputError):
        if _names_outputs(exc.message):
            return "compare the output names (--output) with `ferry models describe MODEL`"
        return "compare the inputs with `ferry models describe MODEL`"
    if isinstance(exc, DeadlineExceededError):
        return "the call ran out of time: raise --timeout, or lower the load"
    if isinstance(exc, ServerOverloadedError):
        return "the model's queue is full: retry later or send less at once"
    if isinstance(exc, AuthenticationError):
        return "pass the server's token with FERRY_TOKEN (or --token)"
    if isinstance(exc, PermissionDeniedError):
        return "this token may not call that; management calls go to the management listener"
    if isinstance(exc, UnimplementedError):
        return "this server does not offer that call: is --target the right listener?"
    if isinstance(exc, LimitExceededError):
        return "send smaller batches, or raise the limit the message names"
    return ""


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def report_error(prog: str, message: str, hint: str = "", stream: TextIO | None = None) -> None:
    line = f"{prog}: error: {one_line(message)}"
    if hint:
        line += f" — {hint}"
    print(line, file=stream or sys.stderr)


def check_destination(dest: str | Path, flag: str) -> None:
    """Refuse a file a command would write after its work (an inference, minutes of load) when
    the write is bound to fail: a folder of that name, a missing or read-only folder."""
    path = Path(dest)
    if path.is_dir():
        raise UsageError(f"{flag} {path}: is a folder; name a file")
    folder = path.parent
    if not folder.is_dir():
        raise UsageError(f"{flag} {path}: folder {folder} does not exist")
    if not os.access(folder if not path.exists() else path, os.W_OK):
        raise UsageError(f"{flag} {path}: not writable")


def run_handler(prog: str, handler: Handler, args: argparse.Namespace) -> int:
    """Run a command, turning every expected failure into one line and an exit code."""
    try:
        return handler(args)
    except UsageError as exc:
        report_error(prog, str(exc))
        return EXIT_USAGE
    except FerryError as exc:
        report_error(prog, str(exc), _hint(exc, args))
        if isinstance(exc, InvalidInputError) and exc.code is None:
            # Refused here, before anything was sent (a file of no known format, an array of
            # a dtype the wire lacks): the command line's to fix, not the server's answer.
            return EXIT_USAGE
        return EXIT_UNREACHABLE if isinstance(exc, ConnectionError_) else EXIT_FAILED
    except KeyboardInterrupt:
        # What the command leaves going on (a conversion job keeps running on the server).
        report_error(prog, "interrupted", getattr(args, "interrupted_hint", ""))
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `ferry ... | head`
        return EXIT_OK
    except OSError as exc:  # a file that could not be read or written after the checks
        report_error(prog, str(exc))
        return EXIT_FAILED


def print_table(rows: list[list[Any]], header: list[str], stream: TextIO | None = None) -> None:
    out = stream or sys.stdout
    cells = [header, *[[str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip(), file=out)


def finite(value: Any, spell: Callable[[float], Any] = lambda _: None) -> Any:
    """``value`` with each float that is not finite replaced by ``spell(x)`` (None: null).

    Python's json writes NaN and Infinity as bare words that strict JSON readers (jq, JSON.parse,
    Go, serde) refuse, so every ``--json`` document goes through this first."""
    if isinstance(value, float):
        return value if math.isfinite(value) else spell(value)
    if isinstance(value, dict):
        return {k: finite(v, spell) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v, spell) for v in value]
    return value


def json_text(value: Any) -> str:
    """``value`` as strict JSON for ``--json``: a float that is not finite (a statistic of
    nothing, a figure of NaN outputs) is null."""
    return json.dumps(finite(value), indent=2, allow_nan=False)
