"""Server credentials for a listener: TLS, or mutual TLS when a client CA is given."""

from __future__ import annotations

from pathlib import Path

import grpc

from ferry.server.security import ListenerTLS


def _read(path: str, what: str) -> bytes:
    """Read now, at start: a missing or unreadable file must stop the server before it binds,
    with the file named, not fail the first handshake."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise OSError(f"cannot read the {what} {path!r}: {exc.strerror}") from None
    if b"-----BEGIN" not in data:
        raise OSError(f"the {what} {path!r} is not a PEM file")
    return data


def server_credentials(tls: ListenerTLS | None) -> grpc.ServerCredentials | None:
    """None for plaintext. With ``client_ca_file`` every client must present a certificate signed
    by that CA (``require_client_auth``): the handshake fails before any RPC reaches Ferry."""
    if tls is None:
        return None
    cert = _read(tls.cert_file, "TLS certificate")
    key = _read(tls.key_file, "TLS key")
    ca = _read(tls.client_ca_file, "client CA certificate") if tls.client_ca_file else None
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=ca is not None
    )
