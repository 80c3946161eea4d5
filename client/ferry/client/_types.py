"""What the SDK returns: plain typed objects, no protobuf in the public surface."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Timings:
    """Client-side seconds: building the request, the RPC itself, decoding the response."""

    encode: float = 0.0
    rpc: float = 0.0
    decode: float = 0.0

    @property
    def total(self) -> float:
        return self.encode + self.rpc + self.decode


class InferResult(Mapping[str, np.ndarray]):
    """The outputs of one inference, by name, plus which model version answered.

    A read-only mapping, so ``result["logits"]`` and ``dict(result)`` work; arrays are decoded
    without a copy and are therefore read-only (``np.array(x)`` gives a writable copy).
    """

    __slots__ = ("_outputs", "id", "model", "timings", "version")

    def __init__(
        self,
        outputs: dict[str, np.ndarray],
        *,
        model: str,
        version: int,
        id: str,
        timings: Timings | None = None,
    ) -> None:
        self._outputs = outputs
        self.model = model
        self.version = version
        self.id = id
        self.timings = timings or Timings()

    def __getitem__(self, name: str) -> np.ndarray:
        try:
            return self._outputs[name]
        except KeyError:
            raise KeyError(f"no output {name!r}; outputs: {list(self._outputs)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._outputs)

    def __len__(self) -> int:
        return len(self._outputs)

    def as_numpy(self, name: str) -> np.ndarray:
        """tritonclient's spelling, for users coming from it."""
        return self[name]

    def __repr__(self) -> str:
        shapes = {k: list(v.shape) for k, v in self._outputs.items()}
        return f"InferResult(model={self.model!r}, version={self.version}, outputs={shapes})"


@dataclass(frozen=True)
class TensorInfo:
    name: str
    datatype: str  # "FP32", "INT64", ... (Open Inference Protocol names)
    shape: tuple[int, ...]  # -1: dynamic


@dataclass(frozen=True)
class BatchingPolicy:
    max_batch_size: int
    max_queue_delay: float  # seconds
    max_queue_size: int
    default_timeout: float | None  # seconds
    instance_count: int  # concurrent executions, on each of device_ids when any are listed
    device_ids: tuple[int, ...] = ()  # GPUs the instances are placed on; (): not placed
    # False: each request runs alone, never beside another's rows (config
    # batching.combine_requests; a dynamic int8 version), still up to max_batch_size rows.
    combine_requests: bool = True
    default_priority: int = 0  # a request that sets none is queued at it; 0: not said
    # With combine_requests False: why, when the server found it while serving (a batch
    # showed the rows mixing); "": the config says so.
    run_alone_reason: str = ""


@dataclass(frozen=True)
class ModelMetadata:
    name: str
    version: int
    versions: tuple[int, ...]
    default_version: int
    platform: str
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    batching: BatchingPolicy


@dataclass(frozen=True)
class ModelVersionStatus:
    name: str
    version: int
    state: str  # LOADING, READY, FAILED, UNLOADING, UNLOADED
    reason: str
    is_default: bool


@dataclass(frozen=True)
class DurationStat:
    count: int
    ns: int


@dataclass(frozen=True)
class ModelStatistics:
    name: str
    version: int
    last_inference_ms: int
    inference_count: int
    execution_count: int
    success: DurationStat
    fail: DurationStat
    queue: DurationStat
    compute_input: DurationStat
    compute_infer: DurationStat
    compute_output: DurationStat
    batch_sizes: dict[int, int] = field(default_factory=dict)  # executed batch size -> executions
    rejected_count: int = 0
    expired_count: int = 0
    queue_depth: int = 0
    # Planned batch sizes (config batching.planned_batch_sizes): planned size -> executions at
    # that size, every planned size listed (0 until used); empty when the version has no plan.
    # A batch of n rows runs at the smallest planned size >= n, so these count padded sizes
    # while ``batch_sizes`` counts the rows that were asked for.
    planned_executions: dict[int, int] = field(default_factory=dict)
    # Executions whose input shape differed from the previous one at the same planned size
    # (each a re-plan on a GPU provider): 0 in steady state.
    plan_changes: int = 0
    # GPU device id -> executions (config instances.device_ids); empty when not placed.
    device_executions: dict[int, int] = field(default_factory=dict)


@dataclass(frozen=True)
class RolloutChange:
    """One recorded change of a model's split and shadow."""

    at: str  # UTC, ISO 8601
    by: str
    reason: str
    split: Mapping[int, float]
    shadow_version: int = 0  # the shadow this change set; 0: none
    shadow_fraction: float = 0.0


@dataclass(frozen=True)
class Rollout:
    """A model's live traffic split: version -> weight; empty when every request that names no
    version goes to the default version. ``history`` is every recorded change, oldest first."""

    model: str
    split: Mapping[int, float]
    # why the stored split cannot be used, or what else is wrong with the rollout in force (a
    # shadow compared with itself, a rule's decision not written yet); '' when nothing is
    error: str = ""
    history: tuple[RolloutChange, ...] = ()
    shadow_version: int = 0  # 0: no shadow
    shadow_fraction: float = 0.0
    # The answering server process's comparison of the candidate against the served versions:
    # compared, errors, shed, mean_cosine, min_cosine, max_abs_diff, top1_agreement (-1: the
    # outputs are not class scores), served_ms_mean, shadow_ms_mean, rel_error (the size of
    # the error, which the cosine misses: ||served - shadow|| / ||served||), spread_error (one
    # value per sample: the error against the served values' spread), label_agreement (ids).
    shadow: Mapping[str, float] = field(default_factory=dict)
    # promote_after, min_cosine, max_error_rate, max_latency_ratio: the ones set (see set_rollout)
    rules: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class RefreshResult:
    """What a repository refresh changed; versions are ``"name/version"``."""

    loaded: tuple[str, ...] = ()  # newly served
    unloaded: tuple[str, ...] = ()  # no longer served
    failed: Mapping[str, str] = field(default_factory=dict)  # version -> why it failed to load

    @property
    def changed(self) -> bool:
        return bool(self.loaded or self.unloaded or self.failed)
