"""One wording for a listener's address and for one that cannot bind, shared by the gRPC, HTTP
and metrics listeners, so a typo in any of the host flags reads the same and says what to give
instead."""

from __future__ import annotations

import socket


def host_port(host: str, port: int) -> str:
    """``host:port``, an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def bind_failure(address: str, host: str, exc: OSError) -> OSError:
    """The one line ``ferry serve`` ends with. A name that does not resolve is told apart from a
    taken or forbidden port: grpc reported both as "in use or not permitted"."""
    if isinstance(exc, socket.gaierror):
        return OSError(
            f"cannot listen on {address}: {host!r} is not an IP address or a host name this "
            f"machine resolves ({exc.strerror}); use an address of this machine, 0.0.0.0 (all "
            "IPv4), :: (all IPv6) or 127.0.0.1 (this machine only)"
        )
    return OSError(f"cannot listen on {address}: {exc.strerror or exc}")
