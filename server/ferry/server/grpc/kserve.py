"""The Open Inference Protocol (KServe v2, with Triton's extensions) over gRPC.

A thin translator over the same ``DataPlane`` and registry as ``ferry.v1``, so both protocols give
the same answers and the same errors. The messages are compiled under ``ferry.kserve.v2``, and the
handlers registered by hand under the path clients call, ``inference.GRPCInferenceService``: the
wire sees only that path and the field numbers, and a process can import both Ferry and
tritonclient (whose generated ``package inference`` would otherwise clash in the descriptor pool).

The full service is served on both listeners. Repository load/unload change what the server serves,
so on the inference listener they answer PERMISSION_DENIED and point at the management listener,
which may be bound to loopback only; the read-only index works on both.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from grpc import aio

from ferry.proto.kserve.v2 import grpc_service_pb2 as pb
from ferry.server.core.dataplane import DataPlane
from ferry.server.core.types import (
    InferenceRequest,
    Limits,
    names_version,
    parse_version,
    version_label,
)
from ferry.server.errors import InvalidArgument, PermissionDenied, Unavailable, Unimplemented
from ferry.server.grpc._base import (
    call_deadline,
    echo_too_long,
    end_stream,
    fits,
    sendable,
    translate_errors,
)
from ferry.server.grpc.kserve_model import config_of, metadata_of, repository_index, statistics_of
from ferry.server.grpc.kserve_tensors import (
    decode_request,
    serialize_response,
    serialize_stream_response,
)
from ferry.server.grpc.status import status_of

SERVICE = "inference.GRPCInferenceService"
SERVER_NAME = "ferry"
# What a client may rely on. Shared memory, sequences, classification, trace and logging are not
# implemented, so they are not claimed.
EXTENSIONS = ("model_repository", "model_configuration", "statistics")

# The implemented methods: name -> (request message, response message, bidirectional stream).
# Reflection describes the service from this (grpc/reflection.py); a test checks it matches the
# handlers table.
METHODS: dict[str, tuple[str, str, bool]] = {
    "ServerLive": ("ServerLiveRequest", "ServerLiveResponse", False),
    "ServerReady": ("ServerReadyRequest", "ServerReadyResponse", False),
    "ServerMetadata": ("ServerMetadataRequest", "ServerMetadataResponse", False),
    "ModelReady": ("ModelReadyRequest", "ModelReadyResponse", False),
    "ModelMetadata": ("ModelMetadataRequest", "ModelMetadataResponse", False),
    "ModelConfig": ("ModelConfigRequest", "ModelConfigResponse", False),
    "ModelStatistics": ("ModelStatisticsRequest", "ModelStatisticsResponse", False),
    "ModelInfer": ("ModelInferRequest", "ModelInferResponse", False),
    "ModelStreamInfer": ("ModelInferRequest", "ModelStreamInferResponse", True),
    "RepositoryIndex": ("RepositoryIndexRequest", "RepositoryIndexResponse", False),
    "RepositoryModelLoad": ("RepositoryModelLoadRequest", "RepositoryModelLoadResponse", False),
    "RepositoryModelUnload": (
        "RepositoryModelUnloadRequest",
        "RepositoryModelUnloadResponse",
        False,
    ),
}

_SHARED_MEMORY = (
    "Ferry does not support system or CUDA shared memory: send tensors in raw_input_contents "
    "(tritonclient's set_data_from_numpy does)"
)
# Methods answered UNIMPLEMENTED, with what to do instead.
UNIMPLEMENTED = {
    "SystemSharedMemoryStatus": _SHARED_MEMORY,
    "SystemSharedMemoryRegister": _SHARED_MEMORY,
    "SystemSharedMemoryUnregister": _SHARED_MEMORY,
    "CudaSharedMemoryStatus": _SHARED_MEMORY,
    "CudaSharedMemoryRegister": _SHARED_MEMORY,
    "CudaSharedMemoryUnregister": _SHARED_MEMORY,
    "TraceSetting": "Ferry does not support Triton's trace settings: use its Prometheus metrics "
    "and ModelStatistics",
    "LogSettings": "Ferry does not change log settings over gRPC: set --log-level "
    "(FERRY_LOG_LEVEL) when starting the server",
}


def server_version() -> str:
    try:
        return importlib.metadata.version("ferry-serve")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


class WireInfer:
    """A ModelInferRequest as the core decodes it (``core.types.WireRequest``)."""

    __slots__ = ("msg",)

    def __init__(self, msg: pb.ModelInferRequest) -> None:
        self.msg = msg

    @property
    def model(self) -> str:
        return self.msg.model_name

    @property
    def version_label(self) -> int:
        return version_label(self.msg.model_version)

    @property
    def version_named(self) -> bool:
        return names_version(self.msg.model_version)

    @property
    def request_id(self) -> str:
        return self.msg.id

    def decode(self, limits: Limits) -> InferenceRequest:
        return decode_request(self.msg, limits)


class KServeServicer:
    """One instance per listener. ``management_address`` is read when a request is refused, since
    the management port is bound after the inference listener is set up; None means disabled.
    ``max_message_bytes``: the listener's send limit, which every inference answer is checked
    against (``sendable``); None where none is set."""

    def __init__(
        self,
        dataplane: DataPlane,
        *,
        repository_control: bool,
        management_address: Callable[[], str | None],
        max_message_bytes: int | None = None,
    ) -> None:
        self.dataplane = dataplane
        self.max_message_bytes = max_message_bytes
        self.repository_control = repository_control
        self.management_address = management_address
        self.version = server_version()

    # ---- health and metadata ----
    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=self.dataplane.live())

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.dataplane.ready())

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name=SERVER_NAME, version=self.version, extensions=EXTENSIONS
        )

    @translate_errors
    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        """Not-found and not-ready both answer ready=false, as Triton does: a readiness probe
        asks a yes/no question. A malformed version is the client's INVALID_ARGUMENT."""
        version = parse_version(request.version)
        return pb.ModelReadyResponse(ready=self.dataplane.model_ready(request.name, version))

    @translate_errors
    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        return metadata_of(self.dataplane.metadata(request.name, parse_version(request.version)))

    @translate_errors
    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: aio.ServicerContext
    ) -> pb.ModelConfigResponse:
        meta = self.dataplane.metadata(request.name, parse_version(request.version))
        return pb.ModelConfigResponse(config=config_of(meta))

    @translate_errors
    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: aio.ServicerContext
    ) -> pb.ModelStatisticsResponse:
        """An empty name means every model; a name without a version, its served versions."""
        stats = await self.dataplane.total_statistics(request.name, parse_version(request.version))
        return pb.ModelStatisticsResponse(model_stats=[statistics_of(s) for s in stats])

    # ---- inference ----
    @translate_errors
    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: aio.ServicerContext
    ) -> bytes:
        """Answers the serialized response, built once (``handlers`` registers a pass-through)."""
        result = await self.dataplane.infer(WireInfer(request), deadline=call_deadline(context))
        return sendable(serialize_response(result), self.max_message_bytes, request.id)

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: aio.ServicerContext
    ) -> AsyncIterator[pb.ModelStreamInferResponse | bytes]:
        """Requests run concurrently and responses go out in request order (clients may match
        them by order, ``id`` being optional); a failed request answers with ``error_message``
        and the stream stays open."""
        deadline = call_deadline(context)

        async def respond(msg: pb.ModelInferRequest) -> pb.ModelStreamInferResponse | bytes:
            try:
                result = await self.dataplane.infer(WireInfer(msg), deadline=deadline)
                return sendable(serialize_stream_response(result), self.max_message_bytes, msg.id)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failed = _stream_failure(exc, msg, echo=True)
                limit = self.max_message_bytes
                if limit is None or fits(failed, limit):
                    return failed
                # Without what the request sent, which no answer can carry: one that cannot be
                # sent would end the stream, every other request on it with it.
                echoed = len(f"{msg.model_name}{msg.model_version}{msg.id}".encode())
                refusal = echo_too_long(echoed, limit, "model name, version and id")
                return _stream_failure(refusal, msg, echo=False)

        # In request order, as Triton answers a model that is not decoupled (core.streams).
        try:
            async for response in self.dataplane.stream(request_iterator, respond, ordered=True):
                yield response
        except Unavailable as exc:  # the server's stop ended it (core.streams)
            await end_stream(context, exc)

    # ---- repository ----
    @translate_errors
    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: aio.ServicerContext
    ) -> pb.RepositoryIndexResponse:
        _one_repository(request.repository_name)
        return repository_index(await self.dataplane.index(ready_only=request.ready))

    def _require_control(self, rpc: str) -> None:
        if self.repository_control:
            return
        address = self.management_address()
        where = (
            f"on the management listener ({address})"
            if address
            else "on the management listener, which this server runs without (management_port = -1)"
        )
        raise PermissionDenied(
            f"repository control is served {where}; {rpc} is refused on the inference listener"
        )

    @translate_errors
    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: aio.ServicerContext
    ) -> pb.RepositoryModelLoadResponse:
        self._require_control("RepositoryModelLoad")
        _one_repository(request.repository_name)
        for key in request.parameters:
            if key == "config" or key.startswith("file:"):
                raise Unimplemented(
                    f"RepositoryModelLoad parameter {key[:64]!r} is not supported: Ferry loads "
                    "models from its repository folder only; publish the model there (or convert "
                    "it with ferry.v1) and load it by name"
                )
        await self.dataplane.load(request.model_name)
        return pb.RepositoryModelLoadResponse()

    @translate_errors
    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: aio.ServicerContext
    ) -> pb.RepositoryModelUnloadResponse:
        self._require_control("RepositoryModelUnload")
        _one_repository(request.repository_name)
        # A model not loaded (or not there) is OK with nothing done, as in Triton.
        await self.dataplane.unload(request.model_name, missing_ok=True)
        return pb.RepositoryModelUnloadResponse()


def _stream_failure(
    exc: Exception, msg: pb.ModelInferRequest, *, echo: bool
) -> pb.ModelStreamInferResponse:
    """A stream's answer to a failed request; ``echo``: with its model name, version and id."""
    code, message, _ = status_of(exc)
    # The stream has no status per message, so the code leads the text, in the form
    # tritonclient gives its unary errors.
    failed = pb.ModelStreamInferResponse(error_message=f"[StatusCode.{code.name}] {message}")
    if echo:
        failed.infer_response.model_name = msg.model_name
        failed.infer_response.model_version = msg.model_version
        failed.infer_response.id = msg.id
    # The request's last response, as a success's is (codec OIP_FINAL_RESPONSE).
    failed.infer_response.parameters["triton_final_response"].bool_param = True
    return failed


class _Refusal:
    """The handler of a method Ferry does not implement: UNIMPLEMENTED, saying what to do instead.
    Registered without a deserializer, so the request's message type need not exist here."""

    def __init__(self, why: str) -> None:
        self.why = why

    @translate_errors
    async def handle(self, request: bytes, context: aio.ServicerContext) -> bytes:
        raise Unimplemented(self.why)


def _one_repository(name: str) -> None:
    if name:
        raise InvalidArgument(
            f"repository_name {name[:64]!r}: Ferry serves a single repository; leave it empty"
        )


def _serialized(response: Any) -> bytes:
    """Inference answers arrive serialized by the hot path; error answers are messages."""
    if isinstance(response, bytes):
        return response
    data: bytes = response.SerializeToString()
    return data


def handlers(servicer: KServeServicer) -> dict[str, grpc.RpcMethodHandler]:
    """Method name -> handler, with the Ferry-package messages' own (de)serializers."""

    def unary(fn: Any, request: Any, response: Any) -> grpc.RpcMethodHandler:
        return grpc.unary_unary_rpc_method_handler(
            fn,
            request_deserializer=request.FromString,
            response_serializer=response.SerializeToString,
        )

    s = servicer
    table: dict[str, grpc.RpcMethodHandler] = {
        "ServerLive": unary(s.ServerLive, pb.ServerLiveRequest, pb.ServerLiveResponse),
        "ServerReady": unary(s.ServerReady, pb.ServerReadyRequest, pb.ServerReadyResponse),
        "ServerMetadata": unary(
            s.ServerMetadata, pb.ServerMetadataRequest, pb.ServerMetadataResponse
        ),
        "ModelReady": unary(s.ModelReady, pb.ModelReadyRequest, pb.ModelReadyResponse),
        "ModelMetadata": unary(s.ModelMetadata, pb.ModelMetadataRequest, pb.ModelMetadataResponse),
        "ModelConfig": unary(s.ModelConfig, pb.ModelConfigRequest, pb.ModelConfigResponse),
        "ModelStatistics": unary(
            s.ModelStatistics, pb.ModelStatisticsRequest, pb.ModelStatisticsResponse
        ),
        "ModelInfer": grpc.unary_unary_rpc_method_handler(
            s.ModelInfer,
            request_deserializer=pb.ModelInferRequest.FromString,
            response_serializer=_serialized,
        ),
        "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(
            s.ModelStreamInfer,
            request_deserializer=pb.ModelInferRequest.FromString,
            response_serializer=_serialized,
        ),
        "RepositoryIndex": unary(
            s.RepositoryIndex, pb.RepositoryIndexRequest, pb.RepositoryIndexResponse
        ),
        "RepositoryModelLoad": unary(
            s.RepositoryModelLoad, pb.RepositoryModelLoadRequest, pb.RepositoryModelLoadResponse
        ),
        "RepositoryModelUnload": unary(
            s.RepositoryModelUnload,
            pb.RepositoryModelUnloadRequest,
            pb.RepositoryModelUnloadResponse,
        ),
    }
    for method, why in UNIMPLEMENTED.items():
        table[method] = grpc.unary_unary_rpc_method_handler(_Refusal(why).handle)
    return table


def add_to_server(server: aio.Server, servicer: KServeServicer) -> list[str]:
    table = handlers(servicer)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, table),))
    return [SERVICE]
