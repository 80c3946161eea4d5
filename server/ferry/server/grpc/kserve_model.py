"""What the Open Inference Protocol says about a model: metadata, Triton's ModelConfig subset,
statistics and the repository index, each translated from what the core already knows.

Nothing is counted or derived twice: statistics are ``LoadedVersion.stats`` as the core keeps
them (Triton's semantics already), and the config is the served ``ModelConfig`` plus the graph's
signature.
"""

from __future__ import annotations

from typing import cast

from ferry.codec import DataType, datatype_name
from ferry.proto.kserve.v2 import grpc_service_pb2 as pb
from ferry.proto.kserve.v2 import model_config_pb2 as mc
from ferry.server.core.config import VersionPolicy
from ferry.server.core.loaded import LoadedVersion
from ferry.server.core.registry import ModelRegistry, State
from ferry.server.core.stats import Duration
from ferry.server.runtime.session import TensorSpec

PLATFORM = "onnxruntime_onnx"
BACKEND = "onnxruntime"


def _config_type(code: int) -> mc.DataType:
    name = datatype_name(code)
    return cast(
        mc.DataType, mc.DataType.Value("TYPE_STRING" if name == "BYTES" else f"TYPE_{name}")
    )


# Ferry DataType -> Triton's config enum (BYTES is TYPE_STRING there).
CONFIG_TYPES = {
    code: _config_type(code) for code in DataType.values() if code != DataType.DATA_TYPE_UNSPECIFIED
}

# Execution providers that put an instance on an accelerator: Triton's KIND_GPU.
GPU_PROVIDERS = frozenset(
    {
        "CUDAExecutionProvider",
        "TensorrtExecutionProvider",
        "ROCMExecutionProvider",
        "MIGraphXExecutionProvider",
    }
)

# Triton's index states: a version that failed or was unloaded is UNAVAILABLE with a reason.
INDEX_STATES = {
    State.LOADING: "LOADING",
    State.READY: "READY",
    State.FAILED: "UNAVAILABLE",
    State.UNLOADING: "UNLOADING",
    State.UNLOADED: "UNAVAILABLE",
}


def metadata_of(lv: LoadedVersion, ready_versions: list[int]) -> pb.ModelMetadataResponse:
    """Shapes as the graph declares them: the batch dimension is included, as -1."""
    return pb.ModelMetadataResponse(
        name=lv.name,
        versions=[str(v) for v in ready_versions],
        platform=PLATFORM,
        inputs=[_tensor_metadata(s) for s in lv.inputs],
        outputs=[_tensor_metadata(s) for s in lv.outputs],
    )


def _tensor_metadata(spec: TensorSpec) -> pb.ModelMetadataResponse.TensorMetadata:
    return pb.ModelMetadataResponse.TensorMetadata(
        name=spec.name, datatype=datatype_name(spec.dtype), shape=spec.shape
    )


def config_of(lv: LoadedVersion) -> mc.ModelConfig:
    """The fields tritonclient and perf_analyzer read. ``dims`` leave the batch dimension out when
    the model batches, as Triton's do; a model that batches has the dynamic batcher, whose queue
    policy is Ferry's (requests past the queue bound or their timeout are rejected)."""
    batching = lv.max_batch_size > 0
    skip = 1 if batching else 0
    kind = (
        mc.ModelInstanceGroup.KIND_GPU
        if lv.session.providers and lv.session.providers[0] in GPU_PROVIDERS
        else mc.ModelInstanceGroup.KIND_CPU
    )
    config = mc.ModelConfig(
        name=lv.name,
        platform=PLATFORM,
        backend=BACKEND,
        version_policy=_version_policy(lv.config.version_policy),
        max_batch_size=lv.max_batch_size,
        input=[
            mc.ModelInput(name=s.name, data_type=CONFIG_TYPES[s.dtype], dims=s.shape[skip:])
            for s in lv.inputs
        ],
        output=[
            mc.ModelOutput(name=s.name, data_type=CONFIG_TYPES[s.dtype], dims=s.shape[skip:])
            for s in lv.outputs
        ],
        instance_group=[
            mc.ModelInstanceGroup(name=lv.name, count=lv.config.instances.count, kind=kind)
        ],
        model_transaction_policy=mc.ModelTransactionPolicy(decoupled=False),
    )
    if batching:
        b = lv.config.batching
        config.dynamic_batching.CopyFrom(
            mc.ModelDynamicBatching(
                max_queue_delay_microseconds=round(b.max_queue_delay_ms * 1000),
                default_queue_policy=mc.ModelQueuePolicy(
                    timeout_action=mc.ModelQueuePolicy.REJECT,
                    default_timeout_microseconds=round(b.default_timeout_ms * 1000),
                    allow_timeout_override=True,  # a request's timeout may shorten it
                    max_queue_size=b.max_queue_size,
                ),
            )
        )
    return config


def _version_policy(policy: VersionPolicy) -> mc.ModelVersionPolicy:
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


def statistics_of(lv: LoadedVersion) -> pb.ModelStatistics:
    s = lv.stats
    return pb.ModelStatistics(
        name=lv.name,
        version=str(lv.version),
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
            for _, b in sorted(s.batches.items())
        ],
    )


def repository_index(registry: ModelRegistry, *, ready_only: bool) -> pb.RepositoryIndexResponse:
    """Every version the registry knows, plus the repository's models it does not serve (never
    loaded, or unloaded on request) as UNAVAILABLE, so a client can see what it may load."""
    Index = pb.RepositoryIndexResponse.ModelIndex
    rows: list[pb.RepositoryIndexResponse.ModelIndex] = []
    for entry in registry.models.values():
        if not entry.versions:
            rows.append(Index(name=entry.name, state="UNAVAILABLE", reason=entry.config_error))
    for status in registry.statuses():
        rows.append(
            Index(
                name=status.name,
                version=str(status.version),
                state=INDEX_STATES[status.state],
                reason=status.reason,
            )
        )
    for name in registry.repository.list_models():
        if name not in registry.models:
            rows.append(Index(name=name, state="UNAVAILABLE", reason="unloaded"))
    if ready_only:
        rows = [r for r in rows if r.state == "READY"]
    rows.sort(key=lambda r: (r.name, int(r.version or 0)))
    return pb.RepositoryIndexResponse(models=rows)
