"""The interceptor every RPC of a listener passes through: bearer tokens and safe parsing.

Tokens. Each listener has one ``ListenerGuard``; when it holds tokens, every call — unary or
streaming, reflection included — must carry ``authorization: Bearer <token>`` metadata. The check
runs before any handler does, and an unknown method gets UNAUTHENTICATED too, so a caller without
a token cannot tell which methods exist; a stream is refused before its first message is read.
A call with more than one ``authorization`` value is refused too: which one counts would be a
guess, and a proxy in front may have read the other. Tokens are compared with
``hmac.compare_digest`` against every accepted token (no early exit), so the time taken says
nothing about how much of a guess was right. Health may stay open: orchestrator probes rarely can
send a token, and health reveals nothing but SERVING / NOT_SERVING (grpc.health.v1, and the Open
Inference Protocol's ServerLive and ServerReady, as its HTTP health paths).

Parsing. gRPC Python deserializes a request before the handler runs; a protobuf ``DecodeError``
there escapes as UNKNOWN ("Unexpected <class 'DecodeError'>") with an ERROR traceback in the log,
for what is simply a malformed request. The guard therefore hands gRPC raw-bytes handlers and
parses inside them: unary requests are parsed in a wrapper that answers INVALID_ARGUMENT
"malformed request"; for streaming requests the parser raises ``MalformedRequest`` (an
``InvalidArgument``, so servicers that translate domain errors answer it correctly too) and a
wrapper answers it with INVALID_ARGUMENT if it escapes the servicer. Wrapped handlers are built
once per method and cached, so the per-call cost is one dict lookup and one coroutine frame.
"""

from __future__ import annotations

import hmac
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, NoReturn, cast

import grpc
from grpc import aio

from ferry.server.errors import ErrorKind, InvalidArgument
from ferry.server.grpc.status import trailing
from ferry.server.security import Tokens

log = logging.getLogger(__name__)

HEALTH_PREFIX = "/grpc.health.v1.Health/"
# The Open Inference Protocol's own health questions over gRPC, open whenever grpc.health.v1 is,
# as their HTTP forms (/v2/health/live, /v2/health/ready) are: they were refused without a token,
# so a KServe or Triton gRPC probe failed on a serving replica. The rest of the protocol
# (metadata, statistics, inference) still needs the token.
OIP_HEALTH = (
    "/inference.GRPCInferenceService/ServerLive",
    "/inference.GRPCInferenceService/ServerReady",
)
AUTHORIZATION = "authorization"
MISSING, WRONG, DENIED = "missing", "wrong", "denied"  # why a token was refused
# More than one authorization value: which one counts would be a guess (a proxy in front may read
# the other one), so none does.
TWICE = "twice"
Deserializer = Callable[[bytes], Any]
Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]]


class MalformedRequest(InvalidArgument):
    """A request message that is not valid protobuf for its method."""


def _strict(deserializer: Deserializer, method: str) -> Deserializer:
    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:
            raise MalformedRequest(f"malformed request for {method}: {exc}") from None

    return parse


async def _reject(context: aio.ServicerContext, exc: InvalidArgument) -> NoReturn:
    context.set_trailing_metadata(trailing(exc.kind.value))
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, exc.message)
    raise AssertionError("context.abort returned")  # it raises; this tells the type checker


def safe_handler(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    """The same method, with request parsing failures answered as INVALID_ARGUMENT.

    Handlers without a deserializer (raw bytes already) or with synchronous behaviours are
    returned unchanged: wrapping a sync behaviour in a coroutine would run it on the event loop."""
    des = handler.request_deserializer
    if des is None:
        return handler
    ser = handler.response_serializer
    if not handler.request_streaming:
        unary = handler.unary_stream if handler.response_streaming else handler.unary_unary
        if not (inspect.iscoroutinefunction(unary) or inspect.isasyncgenfunction(unary)):
            return handler
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(
                _unary_stream(unary, des, method), response_serializer=ser
            )

        call = cast("Callable[..., Awaitable[Any]]", unary)  # a coroutine function, checked above

        async def unary_unary(raw: bytes, context: aio.ServicerContext) -> Any:
            try:
                request = des(raw)
            except Exception as exc:
                await _reject(context, MalformedRequest(f"malformed request for {method}: {exc}"))
            return await call(request, context)

        return grpc.unary_unary_rpc_method_handler(unary_unary, response_serializer=ser)
    streaming = handler.stream_stream if handler.response_streaming else handler.stream_unary
    parse = _strict(des, method)
    if handler.response_streaming:
        if inspect.isasyncgenfunction(streaming):
            return grpc.stream_stream_rpc_method_handler(
                _stream_gen(streaming), request_deserializer=parse, response_serializer=ser
            )
        if inspect.iscoroutinefunction(streaming):
            return grpc.stream_stream_rpc_method_handler(
                _stream_coro(streaming), request_deserializer=parse, response_serializer=ser
            )
        return handler
    if not inspect.iscoroutinefunction(streaming):
        return handler
    return grpc.stream_unary_rpc_method_handler(
        _stream_coro(streaming), request_deserializer=parse, response_serializer=ser
    )


def _unary_stream(behavior: Any, des: Deserializer, method: str) -> Any:
    if inspect.isasyncgenfunction(behavior):

        async def gen(raw: bytes, context: aio.ServicerContext) -> AsyncIterator[Any]:
            try:
                request = des(raw)
            except Exception as exc:
                await _reject(context, MalformedRequest(f"malformed request for {method}: {exc}"))
            async for response in behavior(request, context):
                yield response

        return gen

    async def coro(raw: bytes, context: aio.ServicerContext) -> Any:
        try:
            request = des(raw)
        except Exception as exc:
            await _reject(context, MalformedRequest(f"malformed request for {method}: {exc}"))
        return await behavior(request, context)

    return coro


def _stream_gen(behavior: Any) -> Any:
    async def gen(requests: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            async for response in behavior(requests, context):
                yield response
        except MalformedRequest as exc:
            await _reject(context, exc)

    return gen


def _stream_coro(behavior: Any) -> Any:
    async def coro(requests: Any, context: aio.ServicerContext) -> Any:
        try:
            return await behavior(requests, context)
        except MalformedRequest as exc:
            await _reject(context, exc)

    return coro


def _refusal(
    code: grpc.StatusCode, message: str, kind: ErrorKind, like: grpc.RpcMethodHandler | None
) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``like`` that refuses without reading the request."""

    async def refuse(request: Any, context: aio.ServicerContext) -> None:
        context.set_trailing_metadata(trailing(kind.value))
        await context.abort(code, message)

    req = like is not None and like.request_streaming
    resp = like is not None and like.response_streaming
    if req and resp:
        return grpc.stream_stream_rpc_method_handler(refuse)
    if req:
        return grpc.stream_unary_rpc_method_handler(refuse)
    if resp:
        return grpc.unary_stream_rpc_method_handler(refuse)
    return grpc.unary_unary_rpc_method_handler(refuse)


class ListenerGuard(aio.ServerInterceptor):
    """Authentication and safe parsing for one listener.

    ``accept``: tokens that may call this listener (empty: no token check). ``forbidden``:
    tokens that are valid elsewhere but not here (PERMISSION_DENIED rather than UNAUTHENTICATED,
    so a client with the inference token learns it holds the wrong kind, not a wrong token).
    ``open_prefixes``: methods that need no token: a name ending in "/" opens a whole service,
    any other opens that one method only (a prefix match let ``.../ServerLiveX`` past the
    check, which only "method not found" stopped: a method added later under such a name
    would have been open).
    """

    def __init__(
        self,
        name: str,
        *,
        accept: Sequence[bytes] = (),
        forbidden: Sequence[bytes] = (),
        open_prefixes: tuple[str, ...] = (),
    ) -> None:
        self.name = name
        self._accept = tuple(accept)
        self._forbidden = tuple(forbidden)
        self._open_services = tuple(p for p in open_prefixes if p.endswith("/"))
        self._open_methods = frozenset(p for p in open_prefixes if not p.endswith("/"))
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}
        self._missing = (
            grpc.StatusCode.UNAUTHENTICATED,
            f"the {name} listener requires a token: send 'authorization: Bearer <token>' "
            "metadata (the SDK's token= option)",
            ErrorKind.UNAUTHENTICATED,
        )
        self._wrong = (
            grpc.StatusCode.UNAUTHENTICATED,
            f"invalid token for the {name} listener",
            ErrorKind.UNAUTHENTICATED,
        )
        self._denied = (
            grpc.StatusCode.PERMISSION_DENIED,
            f"this token may not call the {name} listener: use the {name} token",
            ErrorKind.PERMISSION_DENIED,
        )
        self._twice = (
            grpc.StatusCode.UNAUTHENTICATED,
            f"the {name} listener got more than one authorization value: send one "
            "'authorization: Bearer <token>'",
            ErrorKind.UNAUTHENTICATED,
        )
        self._refusals: dict[tuple[str, bool, bool], grpc.RpcMethodHandler] = {}

    @property
    def requires_token(self) -> bool:
        return bool(self._accept)

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        method: str = handler_call_details.method
        handler = self._handlers.get(method)
        if handler is None:
            real = await continuation(handler_call_details)
            # Cache only methods that exist: their number is bounded, unknown names are not.
            if real is not None:
                handler = self._handlers[method] = safe_handler(real, method)
        if self._accept and not self._is_open(method):
            refusal = self._check(handler_call_details.invocation_metadata)
            if refusal is not None:
                log.debug("%s listener refused %s: %s", self.name, method, refusal[1])
                return self._refusal(refusal, handler)
        return handler

    def _is_open(self, method: str) -> bool:
        return method in self._open_methods or method.startswith(self._open_services)

    def _check(self, metadata: Any) -> tuple[grpc.StatusCode, str, ErrorKind] | None:
        verdict = self.verdict_of([v for key, v in metadata or () if key == AUTHORIZATION])
        if verdict is None:
            return None
        return {
            MISSING: self._missing,
            WRONG: self._wrong,
            DENIED: self._denied,
            TWICE: self._twice,
        }[verdict]

    def verdict_of(self, values: Sequence[str | bytes]) -> str | None:
        """``verdict`` of a request's authorization values, all of them: TWICE for more than
        one."""
        if len(values) > 1:
            return TWICE
        return self.verdict(values[0] if values else None)

    def verdict(self, value: str | bytes | None) -> str | None:
        """None when ``value`` (an ``authorization`` value) carries a token this listener
        accepts; else MISSING, WRONG or DENIED. Shared with the HTTP listener, which sends the
        same tokens in the ``Authorization`` header."""
        if value is None:
            return MISSING
        raw = value.encode("utf-8", "replace") if isinstance(value, str) else bytes(value)
        scheme, _, credential = raw.strip().partition(b" ")
        credential = credential.strip()
        if scheme.lower() != b"bearer" or not credential:
            return MISSING
        ok = False
        for token in self._accept:
            ok |= hmac.compare_digest(credential, token)
        if ok:
            return None
        for token in self._forbidden:
            if hmac.compare_digest(credential, token):
                return DENIED
        return WRONG

    def _refusal(
        self,
        refusal: tuple[grpc.StatusCode, str, ErrorKind],
        like: grpc.RpcMethodHandler | None,
    ) -> grpc.RpcMethodHandler:
        req = like is not None and like.request_streaming
        resp = like is not None and like.response_streaming
        key = (refusal[1], req, resp)
        handler = self._refusals.get(key)
        if handler is None:
            handler = self._refusals[key] = _refusal(*refusal, like)
        return handler


def inference_guard(tokens: Tokens, *, health_requires_token: bool) -> ListenerGuard:
    """The management token is accepted here too: whoever may load models may run them."""
    accept = [t for t in (tokens.inference, tokens.management) if t is not None]
    if tokens.inference is None:
        accept = []  # no inference token configured: the inference listener is open
    return ListenerGuard(
        "inference",
        accept=accept,
        open_prefixes=() if health_requires_token else (HEALTH_PREFIX, *OIP_HEALTH),
    )


def management_guard(tokens: Tokens) -> ListenerGuard:
    accept = [tokens.management] if tokens.management is not None else []
    forbidden = [tokens.inference] if tokens.inference is not None else []
    return ListenerGuard("management", accept=accept, forbidden=forbidden)
