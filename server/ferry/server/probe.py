"""``python -m ferry.server.probe``: the container's health probe (Docker HEALTHCHECK, Kubernetes
exec probes), asking the server's grpc.health.v1 service.

Why a probe of our own rather than ``ferry health`` or the kubelet's built-in gRPC probe:

* liveness needs "the process answers RPCs", which no health name states: ``""`` is the replica's
  readiness (NOT_SERVING while its required models load), and a deadline must count as dead, not
  as "not serving". ``--alive`` passes on any health answer, SERVING or NOT_SERVING, and fails on
  a timeout or an unreachable port;
* the management listener's health needs the management token, which the kubelet cannot send;
  ``--token-file`` reads it from the mounted Secret (never from a flag: flags show in ps);
* it imports grpcio and grpcio-health-checking only (no numpy, no onnxruntime): probes run every
  few seconds, so their start-up cost is paid often.

Exit status: 0 pass, 1 fail (the reason is one line on stderr).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


# grpc turned a deadline of 0 or less, and one past about 1e9 s (inf included), into an
# immediate DEADLINE_EXCEEDED against a server that was SERVING: a probe that could never pass,
# restarting a healthy pod for ever with a message that blamed the server.
MAX_TIMEOUT_S = 3600.0


def _timeout(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a number of seconds") from None
    if not 0 < value <= MAX_TIMEOUT_S:  # NaN fails this too
        raise argparse.ArgumentTypeError(f"{raw}: give seconds above 0, at most {MAX_TIMEOUT_S:g}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ferry.server.probe",
        description="Ask a Ferry listener's grpc.health.v1 service. Exit 0 pass, 1 fail.",
    )
    p.add_argument(
        "--address",
        default="127.0.0.1:8001",
        help="HOST:PORT of the listener (default %(default)s)",
    )
    p.add_argument(
        "--service",
        default="",
        help="health name: '' the replica (ready = its required models are ready), a model "
        "name, or a service name such as inference.GRPCInferenceService (default '')",
    )
    p.add_argument(
        "--alive",
        action="store_true",
        help="liveness: pass on any health answer (SERVING or NOT_SERVING); fail only when the "
        "listener does not answer within --timeout",
    )
    p.add_argument(
        "--timeout",
        type=_timeout,
        default=3.0,
        help=f"seconds, above 0 and at most {MAX_TIMEOUT_S:g} (default %(default)s)",
    )
    p.add_argument(
        "--token-file",
        type=Path,
        help="file holding the bearer token (the management listener's health needs it)",
    )
    p.add_argument("--tls-ca-file", type=Path, help="PEM CA to trust: the listener serves TLS")
    # A listener with mutual TLS (--tls-client-ca-file) refuses a handshake without a client
    # certificate: with no way to send one, the probe of such a replica failed for ever.
    p.add_argument(
        "--tls-cert-file",
        type=Path,
        help="PEM client certificate, for a listener with mutual TLS (with --tls-key-file)",
    )
    p.add_argument("--tls-key-file", type=Path, help="PEM private key of --tls-cert-file")
    # A pod's certificate names its service, not the 127.0.0.1 a probe asks: checked against
    # the address, the handshake failed and so did every probe.
    p.add_argument(
        "--tls-server-name",
        help="check the listener's certificate against this name instead of the --address "
        "host (a certificate that names the service, not 127.0.0.1)",
    )
    return p


def _channel(args: argparse.Namespace) -> grpc.Channel:
    if args.tls_ca_file is None and args.tls_cert_file is None and not args.tls_server_name:
        return grpc.insecure_channel(args.address)
    ca = args.tls_ca_file.read_bytes() if args.tls_ca_file is not None else None
    cert = key = None
    if args.tls_cert_file is not None:
        cert, key = args.tls_cert_file.read_bytes(), args.tls_key_file.read_bytes()
        if b"ENCRYPTED" in key:  # gRPC's answer: UNAVAILABLE, blaming the listener
            raise OSError(
                f"the key {str(args.tls_key_file)!r} is encrypted (passphrase-protected), which "
                "gRPC cannot use: give a key without a passphrase"
            )
    creds = grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=cert
    )
    options = []
    if args.tls_server_name:
        options.append(("grpc.ssl_target_name_override", args.tls_server_name))
    return grpc.secure_channel(args.address, creds, options=options)


def probe(args: argparse.Namespace) -> tuple[bool, str]:
    """(passed, what was seen), without raising: a probe's only outputs are its exit code and
    one line."""
    metadata: list[tuple[str, str]] = []
    if args.token_file is not None:
        path = str(args.token_file)
        try:
            token = args.token_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            return False, f"cannot read the token file {path!r}: {exc.strerror}"
        except UnicodeDecodeError:  # it was a traceback
            return False, f"the token file {path!r} is not UTF-8 text"
        # What the server accepts as a token (security._token): anything else gRPC refused to
        # send, as "INTERNAL: Invalid metadata", or the server refused as no token at all.
        if not token or not all(" " <= c <= "~" for c in token):
            return False, (
                f"the token file {path!r} must hold the token: one line of printable ASCII"
            )
        metadata.append(("authorization", f"Bearer {token}"))
    try:
        with _channel(args) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = stub.Check(
                health_pb2.HealthCheckRequest(service=args.service),
                timeout=args.timeout,
                metadata=metadata,
            )
    except grpc.RpcError as exc:
        return False, f"{exc.code().name}: {exc.details()}"
    except OSError as exc:  # an unreadable CA, certificate or key file
        if exc.filename is None:
            return False, str(exc)
        return False, f"cannot read {exc.filename!r}: {exc.strerror}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    if reply.status == SERVING:
        return True, status
    return (args.alive and reply.status == NOT_SERVING), status


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.tls_cert_file is None) != (args.tls_key_file is None):
        parser.error("--tls-cert-file and --tls-key-file go together: give both or neither")
    passed, seen = probe(args)
    what = f"{args.address} service {args.service!r}"
    if passed:
        print(f"{what}: {seen}")
        return 0
    print(f"{what}: {seen}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
