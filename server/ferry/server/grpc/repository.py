"""``ferry.v1.ModelRepository``: load, unload, refresh and rollout, on the management listener
only."""

from __future__ import annotations

import contextlib
import re

from grpc import aio

from ferry.proto.v1 import repository_pb2 as pb
from ferry.proto.v1 import repository_pb2_grpc as pb_grpc
from ferry.server.core.dataplane import DataPlane
from ferry.server.core.types import MAX_VERSION, RolloutView
from ferry.server.errors import InvalidArgument
from ferry.server.grpc._base import translate_errors

_SURROGATE = re.compile("[\ud800-\udfff]")


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
        if request.shadow_fraction and not request.shadow_version:
            # shadow_version 0 means "no shadow": a shadow asked of version 0 (the SDK's
            # shadow=(0, 0.1)) was answered OK with no shadow, and a live one ended.
            raise InvalidArgument(
                f"shadow_fraction {request.shadow_fraction:g} without a shadow_version: name the "
                "candidate version (1 or more), or leave both unset for no shadow"
            )
        view = await self.dataplane.set_rollout(
            request.model,
            dict(request.split),
            by=f"management call from {context.peer()}",
            why=request.reason,
            shadow_of=(
                (request.shadow_version, request.shadow_fraction)
                if request.shadow_version
                else None
            ),
            rules={f.name: getattr(request.rules, f.name) for f in request.rules.DESCRIPTOR.fields}
            if request.HasField("rules")
            else None,
        )
        return _rollout(view)

    @translate_errors
    async def GetRollout(
        self, request: pb.GetRolloutRequest, context: aio.ServicerContext
    ) -> pb.Rollout:
        return _rollout(await self.dataplane.total_rollout(request.model))


def _rollout(view: RolloutView) -> pb.Rollout:
    history = []
    for entry in view.history:
        if not isinstance(entry, dict):
            continue
        raw = entry.get("split")
        change = pb.RolloutChange(
            at=_text(entry.get("at", "")),
            by=_text(entry.get("by", "")),
            reason=_text(entry.get("why", "")),
            split=_split(raw) if isinstance(raw, dict) else {},
        )
        shadow = entry.get("shadow")
        if isinstance(shadow, dict) and shadow:  # a hand-edited history may hold anything
            with contextlib.suppress(TypeError, ValueError, OverflowError):
                version, fraction = int(shadow["version"]), float(shadow["fraction"])
                if 0 < version < 2**63 and 0.0 < fraction <= 1.0:
                    change.shadow_version, change.shadow_fraction = version, fraction
        history.append(change)
    out = pb.Rollout(model=view.model, split=dict(view.split), error=view.error, history=history)
    if view.rules:
        out.rules.CopyFrom(pb.RolloutRules(**view.rules))  # type: ignore[arg-type]
    if view.shadow is not None:
        out.shadow_version, out.shadow_fraction = view.shadow
        s = view.shadow_statistics
        if s is not None:
            out.shadow.CopyFrom(
                pb.ShadowComparison(
                    compared=s.compared,
                    errors=s.errors,
                    shed=s.shed,
                    mean_cosine=s.mean_cosine,
                    min_cosine=s.cosine_min,
                    max_abs_diff=s.max_abs_diff,
                    top1_agreement=-1.0 if s.top1_agreement is None else s.top1_agreement,
                    served_ms_mean=s.served_ns / 1e6 / s.compared if s.compared else 0.0,
                    shadow_ms_mean=s.shadow_ns / 1e6 / s.compared if s.compared else 0.0,
                    rel_error=s.rel_error,
                    spread_error=s.spread_error,
                    label_agreement=s.label_agreement,
                )
            )
    return out


def _text(value: object) -> str:
    """A hand-edited history's text as the protocol can carry it: JSON's "\ud800" reads as a
    lone surrogate, which UTF-8 cannot encode (GetRollout failed INTERNAL); shown as U+FFFD."""
    return _SURROGATE.sub("\ufffd", str(value))


def _split(raw: dict[object, object]) -> dict[int, float]:
    """A recorded split as the protocol carries it; a hand-edited entry that is not one is
    shown as empty rather than failing the call."""
    try:
        split = {int(str(v)): float(w) for v, w in raw.items()}  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return {}
    return {v: w for v, w in split.items() if 0 < v <= MAX_VERSION}
