"""Channel construction, in one place for the sync, async and conversion clients.

Everything a client needs from the transport is decided here: the target (one endpoint or several
behind gRPC's ``round_robin``), message-size limits, keepalive, TLS and the bearer token. A client
builds a :class:`ChannelConfig`, asks it for a channel (:func:`create_channel` or
:func:`create_aio_channel`) and passes :meth:`ChannelConfig.call_metadata` on every call.

Why the token is sometimes plain metadata: gRPC refuses call credentials on an insecure channel,
so with TLS the token rides as call credentials (attached by gRPC to every call, streams included),
and without TLS it is sent as ordinary ``authorization`` metadata, which is what lets loopback
deployments and tests use tokens at all. Never send a token in clear text over a network.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc import aio

from ferry.client._errors import InvalidArgumentError

DEFAULT_MAX_MESSAGE_BYTES = 80 * 1024 * 1024
USER_AGENT = "ferry-python"
MAX_CONNECTIONS = 64

Metadata = tuple[tuple[str, str], ...]
PemSource = str | os.PathLike[str] | bytes


# Far above any certificate bundle (a system's whole CA store is a few hundred KB).
MAX_PEM_BYTES = 16 * 1024 * 1024


# gRPC's keepalive options are milliseconds in a C int.
MAX_KEEPALIVE_S = (2**31 - 1) // 1000


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _read_pem(source: PemSource | None, what: str) -> bytes | None:
    """Bytes are taken as PEM; anything else is a path, read now so that a typo fails here.
    The read is bounded: ``--tls-ca /dev/zero`` (or any endless source) took all memory;
    a pipe (``<(...)``) still works."""
    if source is None or isinstance(source, bytes):
        return source
    try:
        with open(source, "rb") as fh:
            data = fh.read(MAX_PEM_BYTES + 1)
    except OSError as exc:
        raise InvalidArgumentError(
            f"cannot read the {what} from {os.fspath(source)!r}: {exc.strerror}"
        ) from None
    if len(data) > MAX_PEM_BYTES:
        raise InvalidArgumentError(
            f"the {what} at {os.fspath(source)!r} is over {MAX_PEM_BYTES:,} bytes: "
            "not a PEM certificate or key"
        )
    return data


@dataclass(frozen=True)
class TLSConfig:
    """Server authentication (and optionally client authentication) for a channel.

    Each certificate or key is PEM bytes or a path to a PEM file. ``ca_cert=None`` trusts the
    system's roots; ``client_cert`` and ``client_key`` go together (mutual TLS).
    ``server_name_override`` checks the server's certificate against that name instead of the
    target's host: for tests and for connecting by IP to a server whose certificate names a host.
    """

    ca_cert: PemSource | None = None
    client_cert: PemSource | None = None
    # Not in the repr: given as bytes it is the private key itself, and a configuration gets
    # printed and logged (error reports that capture locals, debug lines).
    client_key: PemSource | None = field(default=None, repr=False)
    server_name_override: str | None = None

    def __post_init__(self) -> None:
        if (self.client_cert is None) != (self.client_key is None):
            raise InvalidArgumentError(
                "TLSConfig: client_cert and client_key go together (mutual TLS)"
            )

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=_read_pem(self.ca_cert, "CA certificate"),
            private_key=_client_key(self.client_key),
            certificate_chain=_read_pem(self.client_cert, "client certificate"),
        )


def _client_key(source: PemSource | None) -> bytes | None:
    """The client key, refused now if gRPC cannot use it: an encrypted key, or something else
    (a certificate) given as the key, failed every call as UNAVAILABLE "Failed to create
    security handshaker", which the retries repeated and which blamed the connection."""
    if source is None:
        return None
    key = _read_pem(source, "client key") or b""
    where = "given" if isinstance(source, bytes) else f"at {os.fspath(source)!r}"
    if b"PRIVATE KEY-----" not in key:
        raise ValueError(f"the client key {where} is not a PEM private key")
    if b"ENCRYPTED" in key:
        raise ValueError(
            f"the client key {where} is encrypted (passphrase-protected), which gRPC cannot "
            "use: give a key without a passphrase (openssl pkey -in KEY -out PLAIN.key)"
        )
    return key


def _split_host_port(endpoint: str) -> tuple[str, str]:
    host, sep, port = endpoint.rpartition(":")
    if not sep or not port.isdigit():
        raise InvalidArgumentError(f"endpoint {endpoint!r} must be HOST:PORT")
    return host, port


def _ip_version(host: str) -> int | None:
    try:
        return ipaddress.ip_address(host.strip("[]")).version
    except ValueError:
        return None


# What an SDK caller can do about several host names; the CLI, which has no load_balancing
# option, says something else in its place.
HOST_LIST_HINT = (
    "give addresses, or one DNS name that resolves to every server with "
    "load_balancing='round_robin'"
)


def split_endpoints(target: str | Sequence[str]) -> list[str]:
    """Each server a target names (``A,B``, ``ipv4:A,B`` or a list), one per entry."""
    if not isinstance(target, str):
        return [t.strip() for t in target]
    text = target.strip()
    if text.startswith(("ipv4:", "ipv6:")):
        text = text[5:].removeprefix("///")  # gRPC reads an empty authority too
    return [t.strip() for t in text.split(",") if t.strip()]


# Targets whose address is not HOST:PORT (a socket path, or a resolver with a syntax of its own).
_NOT_HOST_PORT = ("unix:", "unix-abstract:", "vsock:")


def _check_port(endpoint: str) -> None:
    """Refuse an endpoint gRPC cannot connect to, now rather than at the first call: a port
    that is not a number ("127.0.0.1:port"), an empty port or host ("127.0.0.1:", ":8001"),
    and a port no TCP endpoint has (gRPC keeps its low 16 bits, so "127.0.0.1:99999"
    connected to port 34463, whatever listens there). A host alone ("localhost") is gRPC's
    default port, and a bare IPv6 address ("::1") a host without a port."""
    if endpoint.startswith(_NOT_HOST_PORT):
        return
    body = endpoint
    if body.startswith("dns:"):
        body = body.removeprefix("dns:").lstrip("/")
        body = body.rpartition("/")[2]  # dns://AUTHORITY/HOST:PORT
    elif "://" in body:
        return  # another resolver's URI (xds:///name): its syntax is its own
    if body.startswith("["):
        host, close, rest = body[1:].partition("]")
        if not close or (rest and not rest.startswith(":")):
            raise InvalidArgumentError(
                f"endpoint {endpoint!r} must be HOST:PORT (an IPv6 address in brackets: [::1]:8001)"
            )
        sep, port = rest[:1], rest[1:]
    elif body.count(":") > 1:
        if _ip_version(body) == 6:
            return
        raise InvalidArgumentError(
            f"endpoint {endpoint!r} must be HOST:PORT (an IPv6 address in brackets: [::1]:8001)"
        )
    else:
        host, sep, port = body.rpartition(":")
        if not sep:
            host = body
    if not host:
        raise InvalidArgumentError(f"endpoint {endpoint!r} has no host: give HOST:PORT")
    if sep and not (port.isascii() and port.isdigit()):
        raise InvalidArgumentError(
            f"endpoint {endpoint!r}: the port {port!r} is not a number: give HOST:PORT"
        )
    if sep and not 0 < int(port) < 65536:
        raise InvalidArgumentError(f"endpoint {endpoint!r}: port {port} is not within 1..65535")


def _address_list(target: str) -> tuple[str, int]:
    """An ``ipv4:``/``ipv6:`` target as gRPC reads it, each address checked. gRPC's resolver for
    these schemes takes literal addresses, each with its port (no default, no names, IPv6 in
    brackets, no spaces): "ipv4:127.0.0.1" or "ipv4:127.0.0.1:1, 127.0.0.2:2" was accepted
    here and every call then failed with UNKNOWN "the target uri is not valid" (a
    ServerError; ready() said False, as if the server did not serve)."""
    scheme, _, body = target.partition(":")
    body = body.removeprefix("///")  # ipv4:///A:P, an empty authority: gRPC reads it too
    endpoints = [e.strip() for e in body.split(",") if e.strip()]
    if not endpoints:
        raise InvalidArgumentError(
            f"target {target!r} lists no address: give {scheme}:ADDRESS:PORT"
        )
    want = "an IPv4 address and a port, like 127.0.0.1:8001"
    if scheme == "ipv6":
        want = "an IPv6 address in brackets and a port, like [::1]:8001"
    for endpoint in endpoints:
        host, sep, _ = endpoint.rpartition(":")
        if scheme == "ipv6":
            ok = host[:1] == "[" and host[-1:] == "]" and _ip_version(host[1:-1]) == 6
        else:
            ok = "[" not in host and _ip_version(host) == 4
        if not sep or not ok:
            raise InvalidArgumentError(
                f"endpoint {endpoint!r} of the {scheme}: target {target!r} must be {want} "
                f"(gRPC's {scheme}: scheme has no default port and takes no host names)"
            )
        _check_port(endpoint)
    return f"{scheme}:" + ",".join(endpoints), len(endpoints)


def resolve_target(target: str | Sequence[str]) -> tuple[str, int]:
    """Return (gRPC target string, number of endpoints).

    Several endpoints become one ``ipv4:`` (or ``ipv6:``) target, gRPC's syntax for a static list of
    addresses; a comma-separated string is read as such a list. Host names cannot be listed that
    way, so several of them are refused with what to do instead. A port outside 1..65535 is
    refused.
    """
    if isinstance(target, str) and target.strip().startswith(("ipv4:", "ipv6:")):
        return _address_list(target.strip())
    for endpoint in split_endpoints(target):
        _check_port(endpoint)
    if isinstance(target, str):
        target = target.strip()  # grpc reads "" as "dns:///" and fails with no name in it
        if not target:
            raise InvalidArgumentError("no endpoint given: pass HOST:PORT or a list of them")
        if "," not in target:
            return target, 1
    endpoints = split_endpoints(target)
    if not endpoints:
        raise InvalidArgumentError("no endpoint given: pass HOST:PORT or a list of them")
    if len(endpoints) == 1:
        return endpoints[0], 1
    versions = {_ip_version(_split_host_port(e)[0]) for e in endpoints}
    if versions == {4}:
        return "ipv4:" + ",".join(endpoints), len(endpoints)
    if versions == {6}:
        return "ipv6:" + ",".join(endpoints), len(endpoints)
    raise InvalidArgumentError(
        f"several endpoints must all be IPv4 or all IPv6 addresses, got {endpoints}: a gRPC target "
        f"cannot list host names; {HOST_LIST_HINT}"
    )


@dataclass(frozen=True)
class ChannelConfig:
    """Every transport option of a client; see the module docstring for how the token travels.

    ``keepalive_time`` (seconds between pings on an idle connection) notices dead peers behind
    NATs and load balancers; servers refuse pings more often than every 5 minutes unless they are
    configured to allow them. ``load_balancing`` defaults to ``round_robin`` for several endpoints
    and to gRPC's default (``pick_first``) for one. ``options`` are raw gRPC channel arguments,
    applied last so they win.

    ``connections`` > 1 opens that many connections and spreads calls over them in turn (a
    stream stays on one). A server started with ``--workers N`` shares its port among N
    processes and the kernel balances *connections*, not calls: one connection reaches one
    worker only, so a client process that should use all of them opens at least N.
    """

    target: str | Sequence[str] = "127.0.0.1:8001"
    tls: TLSConfig | None = None
    token: str | None = field(default=None, repr=False)  # a secret: never in a repr or log line
    credentials: grpc.ChannelCredentials | None = None
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    keepalive_time: float | None = None
    keepalive_timeout: float | None = None
    keepalive_permit_without_calls: bool = False
    load_balancing: str | None = None
    options: Sequence[tuple[str, Any]] = field(default=())
    connections: int = 1

    def __post_init__(self) -> None:
        # The target is judged now, not when a channel is made: the async client makes its
        # channel on first use, and refused a bad target only at its first call.
        resolve_target(self.target)
        # gRPC takes these as C ints (milliseconds for keepalives): connections=1.5 raised
        # TypeError, keepalive_time=inf or max_message_bytes=2**40 OverflowError, when the
        # channel was made (the async client's first call); they are refused here instead.
        if not _whole(self.connections) or not 1 <= self.connections <= MAX_CONNECTIONS:
            raise InvalidArgumentError(
                f"connections must be a whole number within 1..{MAX_CONNECTIONS}, got "
                f"{self.connections!r}"
            )
        if not _whole(self.max_message_bytes) or not 0 < self.max_message_bytes < 2**31:
            raise InvalidArgumentError(
                f"max_message_bytes must be a whole number within 1..{2**31 - 1}, got "
                f"{self.max_message_bytes!r}"
            )
        for name in ("keepalive_time", "keepalive_timeout"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not 0 < value <= MAX_KEEPALIVE_S
            ):
                raise InvalidArgumentError(
                    f"{name} must be a number of seconds within (0, {MAX_KEEPALIVE_S:,}], "
                    f"got {value!r}"
                )
        if self.tls is not None and self.credentials is not None:
            raise InvalidArgumentError("pass tls= or credentials=, not both")
        if self.tls is not None:
            # Read now, as the target is judged now: the async client reads them again when it
            # makes its channel, on first use, and a missing CA file was a ValueError out of
            # its first call (a traceback from `ferry loadtest --tls-ca MISSING`).
            self.tls.credentials()
        if self.token is not None and (
            not isinstance(self.token, str) or "\n" in self.token or not self.token.strip()
        ):
            raise InvalidArgumentError("token must be a non-empty single line of text")
        if self.token is not None and not all(" " <= c <= "~" for c in self.token):
            # gRPC refuses such metadata on this side, reported as the server's INTERNAL
            # ("Invalid metadata") on every call, though no call ever left.
            raise InvalidArgumentError(
                "token must be printable ASCII (what gRPC metadata carries): check it for a "
                "tab or a non-ASCII character"
            )
        if self.load_balancing is not None and not isinstance(self.load_balancing, str):
            raise InvalidArgumentError(
                f"load_balancing must be a policy name, got {self.load_balancing!r}"
            )

    @property
    def secure(self) -> bool:
        return self.tls is not None or self.credentials is not None

    def target_string(self) -> str:
        return resolve_target(self.target)[0]

    def channel_options(self) -> list[tuple[str, Any]]:
        opts: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.primary_user_agent", USER_AGENT),
        ]
        _, endpoints = resolve_target(self.target)
        policy = self.load_balancing or ("round_robin" if endpoints > 1 else None)
        if policy is not None:
            opts.append(("grpc.lb_policy_name", policy))
        if self.keepalive_time is not None:
            opts += [
                ("grpc.keepalive_time_ms", int(self.keepalive_time * 1000)),
                ("grpc.http2.max_pings_without_data", 0),
            ]
        if self.keepalive_timeout is not None:
            opts.append(("grpc.keepalive_timeout_ms", int(self.keepalive_timeout * 1000)))
        if self.keepalive_permit_without_calls:
            opts.append(("grpc.keepalive_permit_without_calls", 1))
        if self.tls is not None and self.tls.server_name_override:
            opts.append(("grpc.ssl_target_name_override", self.tls.server_name_override))
        # grpc takes the first of two arguments with one key: appended after these, an option
        # given for one of them (a send or receive limit of its own) was ignored, while the
        # stream's pre-send check (send_limit) went by it.
        given = {key for key, _ in self.options}
        return [*(o for o in opts if o[0] not in given), *self.options]

    def send_limit(self) -> int | None:
        """The largest message this channel sends (None: no limit): ``max_message_bytes``, or
        the ``grpc.max_send_message_length`` given in ``options``, which is applied after it."""
        limit = self.max_message_bytes
        for key, value in self.options:
            if key == "grpc.max_send_message_length":
                limit = int(value)
        return limit if limit >= 0 else None

    def receive_limit(self) -> int | None:
        """The largest message this channel receives (None: no limit), as ``send_limit``."""
        limit = self.max_message_bytes
        for key, value in self.options:
            if key == "grpc.max_receive_message_length":
                limit = int(value)
        return limit if limit >= 0 else None

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        """None for an insecure channel; with a token, TLS credentials composed with it."""
        base = self.tls.credentials() if self.tls is not None else self.credentials
        if base is None:
            return None
        if self.token is None:
            return base
        return grpc.composite_channel_credentials(
            base, grpc.access_token_call_credentials(self.token)
        )

    def call_metadata(self) -> Metadata | None:
        """Metadata every call must carry: the token when it cannot ride as call credentials."""
        if self.token is None or self.secure:
            return None
        return (("authorization", f"Bearer {self.token}"),)


def _connection_options(config: ChannelConfig, index: int) -> list[tuple[str, Any]]:
    """The options of one of ``config.connections`` channels: a subchannel pool of its own, so
    grpc does not share one connection among channels to the same address."""
    opts = config.channel_options()
    if config.connections > 1:
        opts += [("grpc.use_local_subchannel_pool", 1), ("ferry.connection", index)]
    return opts


def _sync_channel(config: ChannelConfig, index: int) -> grpc.Channel:
    creds = config.channel_credentials()
    target, opts = config.target_string(), _connection_options(config, index)
    if creds is None:
        return grpc.insecure_channel(target, options=opts)
    return grpc.secure_channel(target, creds, options=opts)


def _aio_channel(config: ChannelConfig, index: int) -> aio.Channel:
    creds = config.channel_credentials()
    target, opts = config.target_string(), _connection_options(config, index)
    if creds is None:
        return aio.insecure_channel(target, options=opts)
    return aio.secure_channel(target, creds, options=opts)


class _Turns:
    """A multicallable over several channels: each call goes to the next one in turn."""

    def __init__(self, callables: list[Any]) -> None:
        self._callables = callables
        self._next = 0

    def _pick(self) -> Any:
        chosen = self._callables[self._next]
        self._next = (self._next + 1) % len(self._callables)
        return chosen

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._pick()(*args, **kwargs)

    def with_call(self, *args: Any, **kwargs: Any) -> Any:
        return self._pick().with_call(*args, **kwargs)

    def future(self, *args: Any, **kwargs: Any) -> Any:
        return self._pick().future(*args, **kwargs)


class ChannelGroup:
    """Several channels that stubs and clients use as one (``connections`` > 1)."""

    def __init__(self, channels: list[Any]) -> None:
        self.channels = channels

    def unary_unary(self, method: str, *args: Any, **kwargs: Any) -> _Turns:
        return _Turns([c.unary_unary(method, *args, **kwargs) for c in self.channels])

    def unary_stream(self, method: str, *args: Any, **kwargs: Any) -> _Turns:
        return _Turns([c.unary_stream(method, *args, **kwargs) for c in self.channels])

    def stream_unary(self, method: str, *args: Any, **kwargs: Any) -> _Turns:
        return _Turns([c.stream_unary(method, *args, **kwargs) for c in self.channels])

    def stream_stream(self, method: str, *args: Any, **kwargs: Any) -> _Turns:
        return _Turns([c.stream_stream(method, *args, **kwargs) for c in self.channels])

    def close(self) -> None:
        for channel in self.channels:
            channel.close()


class AioChannelGroup(ChannelGroup):
    async def close(self) -> None:  # type: ignore[override]
        for channel in self.channels:
            await channel.close()


def create_channel(config: ChannelConfig) -> grpc.Channel:
    """A synchronous channel (``grpc.Channel``) for ``config``; with ``connections`` > 1, a
    group of channels that the clients use as one."""
    if config.connections == 1:
        return _sync_channel(config, 0)
    group = ChannelGroup([_sync_channel(config, i) for i in range(config.connections)])
    return group  # type: ignore[return-value]


def create_aio_channel(config: ChannelConfig) -> aio.Channel:
    """An asyncio channel (``grpc.aio.Channel``) for ``config``; create it inside the event loop
    that will use it, since grpc.aio binds a channel to the loop it was made in."""
    if config.connections == 1:
        return _aio_channel(config, 0)
    group = AioChannelGroup([_aio_channel(config, i) for i in range(config.connections)])
    return group  # type: ignore[return-value]
