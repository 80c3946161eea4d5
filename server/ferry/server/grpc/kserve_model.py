"""What the Open Inference Protocol says about a model: metadata, Triton's ModelConfig subset,
statistics and the repository index, each translated from what the core already knows.

Nothing is counted or derived twice: statistics are the core's snapshots (Triton's semantics
already), and the config is the core's ``ModelMetadata`` in Triton's shape.
"""

from __future__ import annotations

from typing import cast

from ferry.codec import DataType, datatype_name
from ferry.proto.kserve.v2 import grpc_service_pb2 as pb
from ferry.proto.kserve.v2 import model_config_pb2 as mc
from ferry.server.core.types import (
    Duration,
    IndexEntry,
    ModelMetadata,
    State,
    TensorSpec,
    VersionPolicyView,
    VersionStatistics,
)

BACKEND = "onnxruntime"
# Triton's priority_levels N means priorities 1..N are kept apart (1 first) and any other is the
# default's. Ferry's queue orders every priority a request can carry (OIP's uint64, 1 first), so
# the levels in force are all of them; 0 would say priorities are off, which they never are.
PRIORITY_LEVELS = 2**64 - 1


def _config_type(code: int) -> mc.DataType:
    name = datatype_name(code)
    return cast(
        mc.DataType, mc.DataType.Value("TYPE_STRING" if name == "BYTES" else f"TYPE_{name}")
    )


# Ferry DataType -> Triton's config enum (BYTES is TYPE_STRING there).
CONFIG_TYPES = {
    code: _config_type(code) for code in DataType.values() if code != DataType.DATA_TYPE_UNSPECIFIED
}

# Triton's index states: a version that failed or was unloaded is UNAVAILABLE with a reason.
INDEX_STATES = {
    State.LOADING: "LOADING",
    State.READY: "READY",
    State.FAILED: "UNAVAILABLE",
    State.UNLOADING: "UNLOADING",
    State.UNLOADED: "UNAVAILABLE",
}


def metadata_of(m: ModelMetadata) -> pb.ModelMetadataResponse:
    """Shapes as the graph declares them: the batch dimension is included, as -1."""
    return pb.ModelMetadataResponse(
        name=m.name,
        versions=[str(v) for v in m.ready_versions],
        platform=m.platform,
        inputs=[_tensor_metadata(s) for s in m.inputs],
        outputs=[_tensor_metadata(s) for s in m.outputs],
    )


def _tensor_metadata(spec: TensorSpec) -> pb.ModelMetadataResponse.TensorMetadata:
    return pb.ModelMetadataResponse.TensorMetadata(
        name=spec.name, datatype=datatype_name(spec.dtype), shape=spec.shape
    )


def config_of(m: ModelMetadata) -> mc.ModelConfig:
    """The fields tritonclient and perf_analyzer read. ``dims`` leave the batch dimension out when
    the model batches, as Triton's do; a model that batches has the dynamic batcher, whose queue
    policy is Ferry's (requests past the queue bound or their timeout are rejected), and whose
    preferred batch sizes are the config's planned ones (the batcher sends a batch that reaches
    one at once). Its priority levels are all a request can carry, and the default level is
    ``batching.default_priority``, the one a request without a priority is queued at."""
    b = m.batching
    batching = b.max_batch_size > 0
    skip = 1 if batching else 0
    kind = (
        mc.ModelInstanceGroup.KIND_GPU if m.device_kind == "gpu" else mc.ModelInstanceGroup.KIND_CPU
    )
    config = mc.ModelConfig(
        name=m.name,
        platform=m.platform,
        backend=BACKEND,
        version_policy=_version_policy(m.version_policy),
        max_batch_size=b.max_batch_size,
        input=[
            mc.ModelInput(name=s.name, data_type=CONFIG_TYPES[s.dtype], dims=s.shape[skip:])
            for s in m.inputs
        ],
        output=[
            mc.ModelOutput(name=s.name, data_type=CONFIG_TYPES[s.dtype], dims=s.shape[skip:])
            for s in m.outputs
        ],
        instance_group=[
            mc.ModelInstanceGroup(name=m.name, count=m.instance_count, kind=kind, gpus=m.device_ids)
        ],
        model_transaction_policy=mc.ModelTransactionPolicy(decoupled=False),
    )
    # A version that runs each request alone (batching.combine_requests false) has a batch
    # dimension and no dynamic batcher, as a Triton config without dynamic_batching.
    if batching and b.combine_requests:
        config.dynamic_batching.CopyFrom(
            mc.ModelDynamicBatching(
                preferred_batch_size=b.preferred_batch_sizes,
                max_queue_delay_microseconds=round(b.max_queue_delay_ms * 1000),
                priority_levels=PRIORITY_LEVELS,
                default_priority_level=b.default_priority,
                default_queue_policy=mc.ModelQueuePolicy(
                    timeout_action=mc.ModelQueuePolicy.REJECT,
                    default_timeout_microseconds=round(b.default_timeout_ms * 1000),
                    allow_timeout_override=True,  # a request's timeout may shorten it
                    max_queue_size=b.max_queue_size,
                ),
            )
        )
    return config


def _version_policy(policy: VersionPolicyView) -> mc.ModelVersionPolicy:
    if policy.all:
        return mc.ModelVersionPolicy(all=mc.ModelVersionPolicy.All())
    if policy.specific:
        return mc.ModelVersionPolicy(
            specific=mc.ModelVersionPolicy.Specific(versions=policy.specific)
        )
    return mc.ModelVersionPolicy(
        latest=mc.ModelVersionPolicy.Latest(num_versions=policy.latest or 1)
    )


def _duration(d: Duration) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=d.count, ns=d.ns)


def statistics_of(s: VersionStatistics) -> pb.ModelStatistics:
    return pb.ModelStatistics(
        name=s.name,
        version=str(s.version),
        last_inference=s.last_inference_ms,
        inference_count=s.inference_count,
        execution_count=s.execution_count,
        inference_stats=pb.InferStatistics(
            success=_duration(s.success),
            fail=_duration(s.fail),
            queue=_duration(s.queue),
            compute_input=_duration(s.compute_input),
            compute_infer=_duration(s.compute_infer),
            compute_output=_duration(s.compute_output),
            cache_hit=pb.StatisticDuration(),
            cache_miss=pb.StatisticDuration(),
        ),
        batch_stats=[
            pb.InferBatchStatistics(
                batch_size=b.batch_size,
                compute_input=_duration(b.compute_input),
                compute_infer=_duration(b.compute_infer),
                compute_output=_duration(b.compute_output),
            )
            for b in s.batches
        ],
    )


def repository_index(rows: list[IndexEntry]) -> pb.RepositoryIndexResponse:
    """The core's index in Triton's words: a model without a version is UNAVAILABLE."""
    Index = pb.RepositoryIndexResponse.ModelIndex
    return pb.RepositoryIndexResponse(
        models=[
            Index(
                name=r.name,
                version=str(r.version) if r.version is not None else "",
                state=INDEX_STATES[r.state],
                reason=r.reason,
            )
            for r in rows
        ]
    )
