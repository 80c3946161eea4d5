"""``ferry.v1.ModelRepository``: load, unload and refresh, on the management listener only."""

from __future__ import annotations

from grpc import aio

from ferry.proto.v1 import repository_pb2 as pb
from ferry.proto.v1 import repository_pb2_grpc as pb_grpc
from ferry.server.core.dataplane import DataPlane
from ferry.server.grpc._base import translate_errors


class RepositoryServicer(pb_grpc.ModelRepositoryServicer):
    def __init__(self, dataplane: DataPlane) -> None:
        self.dataplane = dataplane

    @translate_errors
    async def Refresh(
        self, request: pb.RefreshRequest, context: aio.ServicerContext
    ) -> pb.RefreshResponse:
        r = await self.dataplane.refresh()
        return pb.RefreshResponse(loaded=r.loaded, unloaded=r.unloaded, failed=r.failed)

    @translate_errors
    async def LoadModel(
        self, request: pb.LoadModelRequest, context: aio.ServicerContext
    ) -> pb.LoadModelResponse:
        await self.dataplane.load(request.model)
        return pb.LoadModelResponse()

    @translate_errors
    async def UnloadModel(
        self, request: pb.UnloadModelRequest, context: aio.ServicerContext
    ) -> pb.UnloadModelResponse:
        await self.dataplane.unload(request.model)
        return pb.UnloadModelResponse()
