from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RefreshRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RefreshResponse(_message.Message):
    __slots__ = ("loaded", "unloaded", "failed")
    LOADED_FIELD_NUMBER: _ClassVar[int]
    UNLOADED_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    loaded: _containers.RepeatedScalarFieldContainer[str]
    unloaded: _containers.RepeatedScalarFieldContainer[str]
    failed: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, loaded: _Optional[_Iterable[str]] = ..., unloaded: _Optional[_Iterable[str]] = ..., failed: _Optional[_Iterable[str]] = ...) -> None: ...

class LoadModelRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class LoadModelResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class UnloadModelRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class UnloadModelResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SetRolloutRequest(_message.Message):
    __slots__ = ("model", "split", "reason", "shadow_version", "shadow_fraction", "rules")
    class SplitEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: float
        def __init__(self, key: _Optional[int] = ..., value: _Optional[float] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SPLIT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SHADOW_VERSION_FIELD_NUMBER: _ClassVar[int]
    SHADOW_FRACTION_FIELD_NUMBER: _ClassVar[int]
    RULES_FIELD_NUMBER: _ClassVar[int]
    model: str
    split: _containers.ScalarMap[int, float]
    reason: str
    shadow_version: int
    shadow_fraction: float
    rules: RolloutRules
    def __init__(self, model: _Optional[str] = ..., split: _Optional[_Mapping[int, float]] = ..., reason: _Optional[str] = ..., shadow_version: _Optional[int] = ..., shadow_fraction: _Optional[float] = ..., rules: _Optional[_Union[RolloutRules, _Mapping]] = ...) -> None: ...

class RolloutRules(_message.Message):
    __slots__ = ("promote_after", "min_cosine", "max_error_rate", "max_latency_ratio")
    PROMOTE_AFTER_FIELD_NUMBER: _ClassVar[int]
    MIN_COSINE_FIELD_NUMBER: _ClassVar[int]
    MAX_ERROR_RATE_FIELD_NUMBER: _ClassVar[int]
    MAX_LATENCY_RATIO_FIELD_NUMBER: _ClassVar[int]
    promote_after: int
    min_cosine: float
    max_error_rate: float
    max_latency_ratio: float
    def __init__(self, promote_after: _Optional[int] = ..., min_cosine: _Optional[float] = ..., max_error_rate: _Optional[float] = ..., max_latency_ratio: _Optional[float] = ...) -> None: ...

class GetRolloutRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class RolloutChange(_message.Message):
    __slots__ = ("at", "by", "reason", "split", "shadow_version", "shadow_fraction")
    class SplitEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: float
        def __init__(self, key: _Optional[int] = ..., value: _Optional[float] = ...) -> None: ...
    AT_FIELD_NUMBER: _ClassVar[int]
    BY_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SPLIT_FIELD_NUMBER: _ClassVar[int]
    SHADOW_VERSION_FIELD_NUMBER: _ClassVar[int]
    SHADOW_FRACTION_FIELD_NUMBER: _ClassVar[int]
    at: str
    by: str
    reason: str
    split: _containers.ScalarMap[int, float]
    shadow_version: int
    shadow_fraction: float
    def __init__(self, at: _Optional[str] = ..., by: _Optional[str] = ..., reason: _Optional[str] = ..., split: _Optional[_Mapping[int, float]] = ..., shadow_version: _Optional[int] = ..., shadow_fraction: _Optional[float] = ...) -> None: ...

class Rollout(_message.Message):
    __slots__ = ("model", "split", "error", "history", "shadow_version", "shadow_fraction", "shadow", "rules")
    class SplitEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: float
        def __init__(self, key: _Optional[int] = ..., value: _Optional[float] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SPLIT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    SHADOW_VERSION_FIELD_NUMBER: _ClassVar[int]
    SHADOW_FRACTION_FIELD_NUMBER: _ClassVar[int]
    SHADOW_FIELD_NUMBER: _ClassVar[int]
    RULES_FIELD_NUMBER: _ClassVar[int]
    model: str
    split: _containers.ScalarMap[int, float]
    error: str
    history: _containers.RepeatedCompositeFieldContainer[RolloutChange]
    shadow_version: int
    shadow_fraction: float
    shadow: ShadowComparison
    rules: RolloutRules
    def __init__(self, model: _Optional[str] = ..., split: _Optional[_Mapping[int, float]] = ..., error: _Optional[str] = ..., history: _Optional[_Iterable[_Union[RolloutChange, _Mapping]]] = ..., shadow_version: _Optional[int] = ..., shadow_fraction: _Optional[float] = ..., shadow: _Optional[_Union[ShadowComparison, _Mapping]] = ..., rules: _Optional[_Union[RolloutRules, _Mapping]] = ...) -> None: ...

class ShadowComparison(_message.Message):
    __slots__ = ("compared", "errors", "shed", "mean_cosine", "min_cosine", "max_abs_diff", "top1_agreement", "served_ms_mean", "shadow_ms_mean", "rel_error", "spread_error", "label_agreement")
    COMPARED_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    SHED_FIELD_NUMBER: _ClassVar[int]
    MEAN_COSINE_FIELD_NUMBER: _ClassVar[int]
    MIN_COSINE_FIELD_NUMBER: _ClassVar[int]
    MAX_ABS_DIFF_FIELD_NUMBER: _ClassVar[int]
    TOP1_AGREEMENT_FIELD_NUMBER: _ClassVar[int]
    SERVED_MS_MEAN_FIELD_NUMBER: _ClassVar[int]
    SHADOW_MS_MEAN_FIELD_NUMBER: _ClassVar[int]
    REL_ERROR_FIELD_NUMBER: _ClassVar[int]
    SPREAD_ERROR_FIELD_NUMBER: _ClassVar[int]
    LABEL_AGREEMENT_FIELD_NUMBER: _ClassVar[int]
    compared: int
    errors: int
    shed: int
    mean_cosine: float
    min_cosine: float
    max_abs_diff: float
    top1_agreement: float
    served_ms_mean: float
    shadow_ms_mean: float
    rel_error: float
    spread_error: float
    label_agreement: float
    def __init__(self, compared: _Optional[int] = ..., errors: _Optional[int] = ..., shed: _Optional[int] = ..., mean_cosine: _Optional[float] = ..., min_cosine: _Optional[float] = ..., max_abs_diff: _Optional[float] = ..., top1_agreement: _Optional[float] = ..., served_ms_mean: _Optional[float] = ..., shadow_ms_mean: _Optional[float] = ..., rel_error: _Optional[float] = ..., spread_error: _Optional[float] = ..., label_agreement: _Optional[float] = ...) -> None: ...
