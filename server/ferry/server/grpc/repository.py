"""``ferry.v1.ModelRepository``: load, unload, refresh and rollout, on the management listener
only."""

from __future__ import annotations

from grpc import aio

from ferry.proto.v1 import repository_pb2 as pb
from ferry.proto.v1 import repository_pb2_grpc as pb_grpc
from ferry.server.core.dataplane import DataPlane
from ferry.server.core.types import RolloutView
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

    @translate_errors
    async def SetRollout(
        self, request: pb.SetRolloutRequest, context: aio.ServicerContext
    ) -> pb.Rollout:
        view = await self.dataplane.set_rollout(
            request.model,
            dict(request.split),
            by=f"management call from {context.peer()}",
            why=request.reason,
        )
        return _rollout(view)

    @translate_errors
    async def GetRollout(
        self, request: pb.GetRolloutRequest, context: aio.ServicerContext
    ) -> pb.Rollout:
        return _rollout(self.dataplane.rollout(request.model))


def _rollout(view: RolloutView) -> pb.Rollout:
    history = []
    for entry in view.history:
        if not isinstance(entry, dict):
            continue
        raw = entry.get("split")
        history.append(
            pb.RolloutChange(
                at=str(entry.get("at", "")),
                by=str(entry.get("by", "")),
                reason=str(entry.get("why", "")),
                split=_split(raw) if isinstance(raw, dict) else {},
            )
        )
    return pb.Rollout(model=view.model, split=dict(view.split), error=view.error, history=history)


def _split(raw: dict[object, object]) -> dict[int, float]:
    """A recorded split as the protocol carries it; a hand-edited entry that is not one is
    shown as empty rather than failing the call."""
    try:
        split = {int(str(v)): float(w) for v, w in raw.items()}  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return {}
    return {v: w for v, w in split.items() if 0 < v < 2**53}
