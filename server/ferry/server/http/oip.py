"""The Open Inference Protocol's REST form (KServe v2, with Triton's extensions) over the core.

A thin translator over the same ``DataPlane`` as the gRPC adapters: each route calls the door and
turns its answer into the JSON Triton's HTTP server gives (``kserve_model``'s protobuf views,
printed as Triton prints them), so tritonclient.http and ``perf_analyzer -i http`` work unchanged
and every answer and error is the gRPC side's. Nothing here knows the HTTP server library: a route
gets the method, the path and a way to read the body, and returns (status, body, headers); errors
are raised as domain errors and turned into statuses by the listener, from ``http.errors``.

Repository load/unload change what the server serves: on the inference listener they answer 403
and point at the management listener, which may be bound to loopback only; the index is read-only
and served on both.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import unquote

from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from multidict import CIMultiDictProxy

from ferry.server.core.dataplane import DataPlane
from ferry.server.core.types import parse_version, short
from ferry.server.errors import (
    ErrorKind,
    InvalidArgument,
    ModelNotFound,
    ModelNotReady,
    PermissionDenied,
    Unavailable,
    Unimplemented,
    VersionNotFound,
)
from ferry.server.grpc.kserve import EXTENSIONS, SERVER_NAME, server_version
from ferry.server.grpc.kserve_model import (
    config_of,
    metadata_of,
    repository_index,
    statistics_of,
)
from ferry.server.http.errors import HttpError
from ferry.server.http.expect import expects_continue
from ferry.server.http.tensors import HEADER_LENGTH, HttpInfer, dumps, loads

JSON = "application/json"
BINARY = "application/octet-stream"
HTTP_EXTENSIONS = (*EXTENSIONS, "binary_tensor_data")

# (status, body, headers): what a route answers; the listener writes it.
Reply = tuple[int, bytes, dict[str, str]]
ReadBody = Callable[[], Awaitable[bytes]]

_SHARED_MEMORY = (
    "Ferry does not support system or CUDA shared memory: send tensors in the request body "
    "(tritonclient's set_data_from_numpy does)"
)
# Triton endpoints Ferry does not implement: 501, with what to do instead.
UNIMPLEMENTED = {
    "systemsharedmemory": _SHARED_MEMORY,
    "cudasharedmemory": _SHARED_MEMORY,
    "trace": "Ferry does not support Triton's trace settings: use its Prometheus metrics and "
    "model statistics (/v2/models/<model>/stats)",
    "logging": "Ferry does not change log settings over HTTP: set --log-level (FERRY_LOG_LEVEL) "
    "when starting the server",
}
# Triton's generate extension, under a model (/v2/models/<model>/generate[_stream]).
_GENERATE = ("generate", "generate_stream")
_NO_GENERATE = (
    "Ferry does not support Triton's generate extension (generate, generate_stream): send the "
    "model's input tensors to /v2/models/<model>/infer"
)
_EMPTY: dict[str, str] = {}
_JSON_HEADERS = {"Content-Type": JSON}


def proto_json(message: Message) -> dict[str, Any]:
    """A protobuf view as Triton's HTTP server prints it: field names as declared, every scalar
    present (perf_analyzer reads ``max_batch_size`` even when it is 0), enums by name, and 64-bit
    integers as JSON numbers rather than protobuf's strings (tritonclient reads them as numbers)."""
    printed = json_format.MessageToDict(
        message,
        always_print_fields_with_no_presence=True,
        preserving_proto_field_name=True,
        unquote_int64_if_possible=True,
    )
    _unquote_wide(message, printed)
    return printed


_WIDE = frozenset(
    {
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_FIXED64,
        FieldDescriptor.TYPE_SFIXED64,
    }
)


def _unquote_wide(message: Message, printed: dict[str, Any]) -> None:
    """protobuf unquotes a 64-bit integer only where a double holds it exactly: a config's
    priority_levels (2**64 - 1) stayed the string "18446744073709551615", as Triton's own
    server never prints it. Every 64-bit integer field becomes a number, by its descriptor
    (a string field of digits is left alone)."""
    for field in message.DESCRIPTOR.fields:
        name = field.name
        if name not in printed or (
            field.message_type is not None and field.message_type.GetOptions().map_entry
        ):
            continue
        value = getattr(message, name)
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            if field.is_repeated:
                for item, out in zip(value, printed[name], strict=True):
                    _unquote_wide(item, out)
            else:
                _unquote_wide(value, printed[name])
        elif field.type in _WIDE:
            printed[name] = list(value) if field.is_repeated else value


def _json(value: Any) -> Reply:
    return 200, dumps(value), _JSON_HEADERS


def _ok() -> Reply:
    return 200, b"", _EMPTY


def is_health(path: str) -> bool:
    """The probes that may stay open when the listener requires a token."""
    return path in ("/v2/health/live", "/v2/health/ready")


class OipRoutes:
    """One instance per listener. ``management_address`` is read when a request is refused
    (the management listener binds after this one is built); None means there is none."""

    def __init__(
        self,
        dataplane: DataPlane,
        *,
        repository_control: bool,
        management_address: Callable[[], str | None],
    ) -> None:
        self.dataplane = dataplane
        self.repository_control = repository_control
        self.management_address = management_address
        self.server_metadata = _json(
            {"name": SERVER_NAME, "version": server_version(), "extensions": HTTP_EXTENSIONS}
        )

    async def handle(
        self, method: str, path: str, headers: CIMultiDictProxy[str], read_body: ReadBody
    ) -> Reply:
        parts = path.split("/")
        if len(parts) < 2 or parts[0] or parts[1] != "v2":
            raise _no_route(path)
        rest = parts[2:]
        if not rest or rest == [""]:
            _method(method, "GET", path)
            return self.server_metadata
        head = rest[0]
        if head == "models" and len(rest) >= 2:
            return await self._model_route(method, path, rest[1:], headers, read_body)
        if head == "health" and len(rest) == 2 and rest[1] in ("live", "ready"):
            _method(method, "GET", path)
            ok = self.dataplane.live() if rest[1] == "live" else self.dataplane.ready()
            if ok:
                return _ok()
            if self.dataplane.draining:
                raise Unavailable("the server is shutting down: send to another replica")
            raise Unavailable(
                "the server is not ready: a model version the repository selects is still "
                "loading or failed to load (POST /v2/repository/index says which)"
            )
        if head == "repository":
            return await self._repository_route(method, path, rest[1:], read_body)
        if head in UNIMPLEMENTED:
            raise Unimplemented(UNIMPLEMENTED[head])
        raise _no_route(path)

    async def _model_route(
        self,
        method: str,
        path: str,
        rest: list[str],
        headers: CIMultiDictProxy[str],
        read_body: ReadBody,
    ) -> Reply:
        if rest == ["stats"]:  # every model's statistics (a model named "stats" too, as Triton)
            _method(method, "GET", path)
            return await self._statistics("", "")
        model = _segment(rest[0])
        if not model:
            raise _no_model(path)
        tail = rest[1:]
        version = ""
        if tail and tail[0] == "versions":
            if len(tail) < 2:
                raise _no_route(path)
            version = _segment(tail[1])
            if not version:
                raise _no_version(path)
            tail = tail[2:]
        action = tail[0] if tail else ""
        if action == "infer" and len(tail) == 1:
            _method(method, "POST", path)
            return await self._infer(model, version, headers, read_body)
        if action == "trace":
            raise Unimplemented(UNIMPLEMENTED["trace"])
        if action in _GENERATE and len(tail) == 1:  # it was 404, as if there were no such thing
            raise Unimplemented(_NO_GENERATE)
        if len(tail) > 1 or action not in ("", "ready", "config", "stats"):
            raise _no_route(path)
        _method(method, "GET", path)
        if action == "stats":
            return await self._statistics(model, version)
        number = parse_version(version)
        if action == "ready":
            if self.dataplane.model_ready(model, number):
                return _ok()
            if self.dataplane.draining:
                raise ModelNotReady("the server is shutting down: send to another replica")
            self.dataplane.metadata(model, number)  # raises the precise reason: 404 or 503
            raise ModelNotReady(f"model {short(model)!r} is not ready")
        meta = self.dataplane.metadata(model, number)
        if action == "config":
            return _json(proto_json(config_of(meta)))
        return _json(proto_json(metadata_of(meta)))

    async def _statistics(self, model: str, version: str) -> Reply:
        stats = await self.dataplane.total_statistics(model, parse_version(version))
        return _json({"model_stats": [proto_json(statistics_of(s)) for s in stats]})

    async def _infer(
        self, model: str, version: str, headers: CIMultiDictProxy[str], read_body: ReadBody
    ) -> Reply:
        if expects_continue(headers.getall("Expect", [])):
            # Refused before "100 Continue" asks for the body: a client that sent the head and
            # waited was asked for a body, up to max_message_bytes, that could only be refused
            # 404 or 503. Only then: a client sending its body unasked is still read to the
            # end, since closing on it mid-upload (after LINGER) would lose it the answer.
            self._require_served(model, parse_version(version))
            _header_length(headers.get(HEADER_LENGTH))
        payload = await read_body()
        # The model before the request, as gRPC (and Triton's HTTP) answer: a body sent to a
        # model not served here was judged first ("needs an 'inputs' list", 400) where
        # ModelInfer said NOT_FOUND.
        self._require_served(model, parse_version(version))
        wire = HttpInfer(model, version, payload, _header_length(headers.get(HEADER_LENGTH)))
        result = await self.dataplane.infer(wire)
        body, json_length = wire.encode(result)
        if json_length is None:
            return 200, body, _JSON_HEADERS
        return 200, body, {"Content-Type": BINARY, HEADER_LENGTH: str(json_length)}

    def _require_served(self, model: str, number: int | None) -> None:
        if not self.dataplane.model_ready(model, number):
            self.dataplane.metadata(model, number)  # raises the precise reason: 404 or 503

    async def _repository_route(
        self, method: str, path: str, rest: list[str], read_body: ReadBody
    ) -> Reply:
        if rest == ["index"]:
            _method(method, "POST", path)
            request = _json_object(await read_body(), "the index request")
            ready = request.get("ready", False)
            if not isinstance(ready, bool):
                raise InvalidArgument("'ready' must be true or false")
            rows = repository_index(await self.dataplane.index(ready_only=ready)).models
            return _json([proto_json(row) for row in rows])
        if len(rest) == 3 and rest[0] == "models" and rest[2] in ("load", "unload"):
            _method(method, "POST", path)
            model, action = _segment(rest[1]), rest[2]
            self._require_control(action)
            request = _json_object(await read_body(), f"the {action} request")
            parameters = request.get("parameters", {})
            if not isinstance(parameters, dict):
                raise InvalidArgument(f"the {action} request's 'parameters' must be an object")
            if action == "load":
                for key in parameters:
                    if key == "config" or key.startswith("file:"):
                        raise Unimplemented(
                            f"load parameter {key[:64]!r} is not supported: Ferry loads models "
                            "from its repository folder only; publish the model there (or "
                            "convert it with ferry.v1) and load it by name"
                        )
                await self.dataplane.load(model)
            else:
                await self.dataplane.unload(model, missing_ok=True)  # as Triton: OK if not loaded
            return _ok()
        raise _no_route("/v2/repository/" + "/".join(rest))

    def _require_control(self, action: str) -> None:
        if self.repository_control:
            return
        address = self.management_address()
        where = (
            f"on the management HTTP listener (http://{address})"
            if address
            else "on the management HTTP listener, which this server runs without "
            "(management_http_port = -1)"
        )
        raise PermissionDenied(
            f"repository control is served {where}; model {action} is refused on the "
            "inference listener"
        )


def _segment(raw: str) -> str:
    if "%" not in raw:
        return raw
    try:
        return unquote(raw, errors="strict")
    except UnicodeDecodeError:  # e.g. %FF: the client's mistake, not an internal error
        raise InvalidArgument(
            f"the path segment {short(raw)!r} is not percent-encoded UTF-8"
        ) from None


def _no_model(path: str) -> ModelNotFound:
    """``/v2/models//ready``: an empty name was answered per route, "model '' is not served
    here" by ready, metadata and config, every model's statistics by stats, and an inference
    read its body first to say what was wrong with that. Triton's routes need a name, so it
    answers 404 for each: so does Ferry, before any body is read, saying what is missing."""
    return ModelNotFound(
        f"{short(path)!r} names no model (nothing between /v2/models/ and the next '/'): send "
        "/v2/models/<model>[/versions/<v>][/ready|/config|/stats|/infer], or GET "
        "/v2/models/stats for every model's statistics"
    )


def _no_version(path: str) -> VersionNotFound:
    """``/v2/models/m/versions//ready`` meant the default version, where Triton's routes need a
    version there and answer 404: so does Ferry, before any body is read, as for an empty name
    (the default version is the route without ``/versions/<v>``)."""
    return VersionNotFound(
        f"{short(path)!r} names no version (nothing between /versions/ and the next '/'): send "
        "/v2/models/<model>/versions/<v>/..., or leave /versions/<v> out for the default version"
    )


def _method(method: str, allowed: str, path: str) -> None:
    """HEAD is served wherever GET is (RFC 9110 9.1: every general-purpose server must; the
    HTTP stack sends the head without the body): a load balancer's HEAD health check was 405."""
    if method == allowed or (method == "HEAD" and allowed == "GET"):
        return
    allow = "GET, HEAD" if allowed == "GET" else allowed
    raise HttpError(
        405,
        f"{method} is not allowed on {short(path)}: use {allow.replace(', ', ' or ')}",
        ErrorKind.UNIMPLEMENTED,
        {"Allow": allow},
    )


def _no_route(path: str) -> HttpError:
    return HttpError(
        404,
        f"no Open Inference Protocol endpoint at {short(path)!r}: see /v2, "
        "/v2/health/{live,ready}, /v2/models/<model>[/versions/<v>][/ready|/config|/stats|/infer]",
        ErrorKind.UNIMPLEMENTED,
    )


def _header_length(value: str | None) -> int | None:
    if value is None:
        return None
    text = value.strip()
    if not text.isascii() or not text.isdigit() or len(text) > 18:
        raise InvalidArgument(
            f"{HEADER_LENGTH} must be a non-negative integer (the JSON header's byte length), "
            f"got {value[:40]!r}"
        )
    return int(text)


def _json_object(body: bytes, what: str) -> dict[str, Any]:
    """An optional JSON object body: tritonclient sends an empty body where nothing is asked."""
    if not body.strip():
        return {}
    value = loads(body, what)
    if not isinstance(value, dict):
        raise InvalidArgument(f"{what} must be a JSON object")
    return value
