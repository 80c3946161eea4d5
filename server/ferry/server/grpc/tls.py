"""Server credentials for a listener: TLS, or mutual TLS when a client CA is given."""

from __future__ import annotations

import ssl
from pathlib import Path

import grpc

from ferry.server.security import ListenerTLS, encrypted_key


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
    _check_fit(tls)
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=ca is not None
    )


def _check_fit(tls: ListenerTLS) -> None:
    """PEM files that do not fit (a key of another certificate, a key where a certificate
    belongs) are refused by grpc only when it binds, with nothing but a failed bind: the start
    said "cannot listen on ...: in use or not permitted". OpenSSL says what is wrong."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(tls.cert_file, tls.key_file, password=encrypted_key)
        if tls.client_ca_file:
            context.load_verify_locations(cafile=tls.client_ca_file)
    except (OSError, ssl.SSLError) as exc:
        ca = f", {tls.client_ca_file!r}" if tls.client_ca_file else ""
        raise OSError(
            f"cannot load the TLS files {tls.cert_file!r}, {tls.key_file!r}{ca}: {exc}"
        ) from None
