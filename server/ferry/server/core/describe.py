"""What is served, described in the core's own types: a version's metadata and configuration
(``ModelMetadata``), its statistics and which versions serve an earlier load. ``DataPlane`` answers
every protocol with these, so ``ferry.v1`` and the Open Inference Protocol describe a model alike.
"""

from __future__ import annotations

from ferry.server.core.registry import ModelRegistry, serves_earlier_load
from ferry.server.core.types import (
    BatchingPolicy,
    ModelMetadata,
    VersionPolicyView,
    VersionStatistics,
)
from ferry.server.errors import InvalidArgument

PLATFORM = "onnxruntime_onnx"


def metadata(
    registry: ModelRegistry, model: str, version: int | None, default_timeout: float
) -> ModelMetadata:
    """A version's, or with none named the version that answers requests that name none
    (a live split's largest share). ``default_timeout``: the server's bound on a request that
    sets none (``DataPlane.default_timeout``)."""
    lv = registry.get(model, version or registry.serving_version(model))
    entry = registry.models[lv.name]
    b = lv.config.batching
    policy = lv.config.version_policy
    return ModelMetadata(
        name=lv.name,
        version=lv.version,
        ready_versions=tuple(entry.ready_versions()),
        default_version=entry.serving_version(),
        platform=PLATFORM,
        inputs=tuple(lv.inputs),
        outputs=tuple(lv.outputs),
        batching=BatchingPolicy(
            max_batch_size=lv.max_batch_size,
            max_queue_delay_ms=b.max_queue_delay_ms,
            max_queue_size=b.max_queue_size,
            # The timeout a request that sets none gets: the model's own, else the
            # server's bound. Reported as the model's 0 ("no default") while every such
            # request was cut at --default-request-timeout.
            default_timeout_ms=b.default_timeout_ms or default_timeout * 1000.0,
            default_priority=b.default_priority,
            preferred_batch_sizes=tuple(b.planned_batch_sizes or ()),
            combine_requests=lv.combines_requests,  # as it runs now
            run_alone_reason=lv.run_alone_reason,
        ),
        instance_count=lv.config.instances.count,
        device_kind=lv.session.device_kind,
        providers=tuple(lv.session.providers),
        version_policy=VersionPolicyView(policy.latest, policy.all, policy.specific),
        # Where the instances are: only when they run on a GPU (a build without the GPU
        # provider falls back to CPU, and the ids would then describe nothing).
        device_ids=lv.config.instances.device_ids if lv.session.device_kind == "gpu" else (),
    )


def statistics(
    registry: ModelRegistry, model: str = "", version: int | None = None
) -> list[VersionStatistics]:
    """Every served version (no model), a model's served versions (no version), or one."""
    if model and version:
        return [registry.get(model, version).statistics()]
    if version:
        raise InvalidArgument("a model version needs a model name")
    if model:
        registry.statuses(model)  # NOT_FOUND for an unknown model
    stats = [lv.statistics() for lv in registry.loaded_versions() if not model or lv.name == model]
    if model and not stats:
        # A model none of whose versions serves (failed, still loading) answers why, as
        # its metadata and a named version's statistics do, not an empty list that a
        # client reading its one entry (perf_analyzer) takes for a broken server.
        registry.get(model, registry.serving_version(model))
    return stats


def earlier_loads(registry: ModelRegistry, model: str = "") -> dict[str, list[int]]:
    """model -> the READY versions that serve the load made before their files changed,
    their reload having failed (with --workers, compared across processes)."""
    out: dict[str, list[int]] = {}
    for s in registry.statuses(model):
        if serves_earlier_load(s):
            out.setdefault(s.name, []).append(s.version)
    return out
