"""``ferry health``: is the server (or a model) serving? For scripts, probes and humans.

``--wait`` uses the health service's ``Watch`` stream with wait-for-ready rather than polling:
the call waits for the server to come up, the server pushes every status change, and the command
returns the moment SERVING arrives. A server holding as many Watch streams as it allows
(``--max-health-watches``) refuses one more RESOURCE_EXHAUSTED: the command then asks ``Check``
every POLL_S seconds instead, within the same ``--wait``.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import grpc

from ferry.cli._common import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_UNREACHABLE,
    channel_config,
    connection_parent,
    seconds,
)
from ferry.client import _health
from ferry.client._channel import create_channel

WATCH_METHOD = "/grpc.health.v1.Health/Watch"
POLL_S = 0.5  # between Checks, where the server refuses one more Watch stream
STATUS_NAMES = {
    0: "UNKNOWN",
    _health.SERVING: "SERVING",
    _health.NOT_SERVING: "NOT_SERVING",
    _health.SERVICE_UNKNOWN: "SERVICE_UNKNOWN",
}


def register(sub: Any) -> None:
    p = sub.add_parser(
        "health",
        parents=[connection_parent()],
        help="check that the server (or one model) is serving",
        description="Check the standard gRPC health service. Exit status: 0 serving, 1 not "
        "serving (or unknown model, or refused: a missing token), 3 unreachable.",
    )
    p.add_argument("model", nargs="?", default="", help="a model name (default: the server)")
    p.add_argument(
        "--wait",
        type=seconds,
        metavar="SECONDS",
        help="wait up to SECONDS for SERVING (the server may still be starting)",
    )
    p.set_defaults(func=cmd_health)


def _watch(args: argparse.Namespace, channel: grpc.Channel, metadata: Any) -> str:
    """Follow status changes until SERVING or the deadline; returns the last status seen."""
    watch: grpc.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(
        WATCH_METHOD, request_serializer=None, response_deserializer=None
    )
    last = "UNREACHABLE"
    end = time.monotonic() + args.wait
    call = watch(
        _health.encode_check_request(args.model),
        timeout=args.wait,
        wait_for_ready=True,
        metadata=metadata,
    )
    try:
        for raw in call:
            last = STATUS_NAMES.get(_health.decode_check_response(raw), "UNKNOWN")
            if last == "SERVING":
                call.cancel()
                break
    except grpc.RpcError as exc:
        code = exc.code()
        if code is grpc.StatusCode.RESOURCE_EXHAUSTED and last == "UNREACHABLE":
            # The server answered but holds as many Watch streams as it allows: the wait was
            # cut short RESOURCE_EXHAUSTED; its status is still there to ask for.
            return _poll(args, channel, metadata, end)
        if code is grpc.StatusCode.UNAVAILABLE or (
            last == "UNREACHABLE" and code is not grpc.StatusCode.DEADLINE_EXCEEDED
        ):
            # Refused before any status (UNAUTHENTICATED, ...): said as _check says it; it was
            # UNREACHABLE, exit 3, as if nothing had answered.
            last = _refused(code)
    return last


def _poll(args: argparse.Namespace, channel: grpc.Channel, metadata: Any, end: float) -> str:
    """``Check`` until SERVING or ``end`` (monotonic); returns the last status seen."""
    while True:
        status = _check(args, channel, metadata, timeout=max(0.05, end - time.monotonic()))
        left = end - time.monotonic()
        if status == "SERVING" or left <= 0:
            return status
        time.sleep(min(POLL_S, left))


def _refused(code: grpc.StatusCode) -> str:
    """The status a failed check or watch reports."""
    if code is grpc.StatusCode.NOT_FOUND:
        return "SERVICE_UNKNOWN"
    return "UNREACHABLE" if code is grpc.StatusCode.UNAVAILABLE else code.name


def _check(
    args: argparse.Namespace, channel: grpc.Channel, metadata: Any, timeout: float | None = None
) -> str:
    check: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
        _health.CHECK_METHOD, request_serializer=None, response_deserializer=None
    )
    if timeout is not None and args.timeout is not None:
        timeout = min(timeout, args.timeout)
    try:
        raw = check(
            _health.encode_check_request(args.model),
            timeout=args.timeout if timeout is None else timeout,
            metadata=metadata,
        )
    except grpc.RpcError as exc:
        return _refused(exc.code())
    return STATUS_NAMES.get(_health.decode_check_response(raw), "UNKNOWN")


def cmd_health(args: argparse.Namespace) -> int:
    config = channel_config(args)
    with create_channel(config) as channel:
        check = _watch if args.wait else _check
        status = check(args, channel, config.call_metadata())
    what = f"model {args.model!r}" if args.model else args.target
    print(f"{what}: {status}")
    if status == "UNAUTHENTICATED":
        # The bare status read as "not serving" with nothing to do about it; say the fix, as
        # every other command does for UNAUTHENTICATED (same exit status, 1: the server said no).
        print(
            f"ferry health: {args.target} needs a token: pass the server's token with "
            "FERRY_TOKEN (or --token)",
            file=sys.stderr,
        )
    if status == "SERVING":
        return EXIT_OK
    return EXIT_UNREACHABLE if status == "UNREACHABLE" else EXIT_FAILED
