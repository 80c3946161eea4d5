"""Model configuration: defaults, every accepted form, and errors that name what to fix."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

from ferry.server.core.config import (
    FLOAT_LIMITS,
    BatchingConfig,
    InstancesConfig,
    ModelConfig,
    OnnxRuntimeConfig,
    VersionPolicy,
    apply_version_config,
    config_to_dict,
    load_config,
    parse_config,
)
from ferry.server.errors import InvalidArgument

FULL_TOML = """
default_version = 2
version_policy = { latest = 2 }

[batching]
max_batch_size = 16
max_queue_delay_ms = 1.5
max_queue_size = 8
default_timeout_ms = 250
default_priority = 3

[instances]
count = 2

[onnxruntime]
intra_op_threads = 4
inter_op_threads = 2
execution_providers = ["CPUExecutionProvider"]
memory_arena = false
allow_spinning = false
graph_optimization = "basic"
"""


def test_defaults_when_no_file(tmp_path: Path) -> None:
    cfg = load_config(tmp_path)
    assert cfg == ModelConfig()
    assert cfg.default_version is None
    assert cfg.batching.max_batch_size is None  # derived from the graph at load
    assert cfg.batching.max_queue_size == 1024
    assert cfg.instances.count == 1
    assert cfg.version_policy.select([3, 1, 2]) == [3]


def test_full_toml(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text(FULL_TOML)
    cfg = load_config(tmp_path)
    assert cfg.default_version == 2
    assert cfg.version_policy == VersionPolicy(latest=2)
    assert cfg.batching == BatchingConfig(16, 1.5, 8, 250.0, 3)
    assert cfg.instances.count == 2
    ort = cfg.onnxruntime
    assert (ort.intra_op_threads, ort.inter_op_threads) == (4, 2)
    assert ort.execution_providers == ("CPUExecutionProvider",)
    assert (ort.memory_arena, ort.allow_spinning, ort.graph_optimization) == (False, False, "basic")


def test_json_equals_toml(tmp_path: Path) -> None:
    toml_dir, json_dir = tmp_path / "t", tmp_path / "j"
    toml_dir.mkdir()
    json_dir.mkdir()
    (toml_dir / "config.toml").write_text(FULL_TOML)
    (json_dir / "config.json").write_text(json.dumps(config_to_dict(load_config(toml_dir))))
    assert load_config(json_dir) == load_config(toml_dir)


@pytest.mark.parametrize(
    "cfg",
    [
        ModelConfig(),
        parse_config({"version_policy": {"all": True}, "default_version": 1}),
        parse_config({"version_policy": {"specific": [1, 3]}, "batching": {"max_batch_size": 0}}),
    ],
)
def test_config_to_dict_round_trips(cfg: ModelConfig) -> None:
    assert parse_config(config_to_dict(cfg)) == cfg


def test_both_files_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text("")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(InvalidArgument, match=r"both config\.toml and config\.json"):
        load_config(tmp_path)


def test_every_float_setting_has_a_bound() -> None:
    """A new float key without one would fail every config that sets it."""
    floats = {
        f.name
        for section in (BatchingConfig, InstancesConfig, OnnxRuntimeConfig)
        for f in fields(section)
        if isinstance(getattr(section(), f.name), float)
    }
    assert floats == set(FLOAT_LIMITS)


def test_json_nan_and_infinity_literals_are_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"batching": {"max_queue_delay_ms": NaN}}')
    with pytest.raises(InvalidArgument, match="max_queue_delay_ms must be a number within"):
        load_config(tmp_path)


@pytest.mark.parametrize(
    ("name", "text", "fragment"),
    [
        ("config.toml", "batching = [", "cannot be parsed"),
        ("config.json", "{not json", "cannot be parsed"),
        ("config.json", "[1, 2]", "must hold a table/object"),
    ],
)
def test_unparseable_files(tmp_path: Path, name: str, text: str, fragment: str) -> None:
    (tmp_path / name).write_text(text)
    with pytest.raises(InvalidArgument, match=fragment) as info:
        load_config(tmp_path)
    assert name in info.value.message


@pytest.mark.parametrize(
    ("raw", "fragments"),
    [
        ({"max_batch_sise": 4}, ["unknown keys", "max_batch_sise"]),
        ({"batching": {"max_batch_sise": 4}}, ["[batching]", "max_batch_sise", "max_batch_size"]),
        ({"instances": {"cont": 2}}, ["[instances]", "cont"]),
        ({"onnxruntime": {"threads": 2}}, ["[onnxruntime]", "threads"]),
        ({"batching": 4}, ["[batching] must be a table"]),
        ({"batching": {"max_batch_size": -1}}, ["batching.max_batch_size", "integer within 0.."]),
        ({"batching": {"max_batch_size": True}}, ["batching.max_batch_size"]),
        ({"batching": {"max_batch_size": 1.5}}, ["batching.max_batch_size"]),
        ({"batching": {"max_batch_size": 65537}}, ["over 65536"]),
        ({"batching": {"max_queue_size": 0}}, ["max_queue_size must be within 1..1048576"]),
        ({"batching": {"max_queue_size": 2**40}}, ["max_queue_size", "got 1099511627776"]),
        ({"batching": {"max_queue_delay_ms": -1}}, ["max_queue_delay_ms", "within 0..60000"]),
        # inf and 1e300 loaded READY and never ran a request; NaN answered INTERNAL on metadata.
        ({"batching": {"max_queue_delay_ms": float("inf")}}, ["max_queue_delay_ms", "got inf"]),
        ({"batching": {"max_queue_delay_ms": float("nan")}}, ["max_queue_delay_ms", "got nan"]),
        ({"batching": {"max_queue_delay_ms": 1e300}}, ["max_queue_delay_ms", "0..60000"]),
        ({"batching": {"default_timeout_ms": float("inf")}}, ["default_timeout_ms", "0..8.64e+07"]),
        ({"batching": {"default_timeout_ms": float("nan")}}, ["default_timeout_ms", "got nan"]),
        ({"onnxruntime": {"intra_op_threads": 2**40}}, ["intra_op_threads", "0..2147483647"]),
        ({"batching": {"max_queue_delay_ms": "1"}}, ["max_queue_delay_ms"]),
        ({"batching": {"default_priority": 0}}, ["default_priority must be >= 1"]),
        ({"instances": {"count": 0}}, ["instances.count", "1..64"]),
        ({"instances": {"count": 65}}, ["instances.count", "1..64"]),
        ({"onnxruntime": {"memory_arena": 1}}, ["memory_arena must be true or false"]),
        ({"onnxruntime": {"execution_providers": "CPU"}}, ["list of strings"]),
        ({"onnxruntime": {"execution_providers": []}}, ["must not be empty"]),
        ({"onnxruntime": {"graph_optimization": "max"}}, ["graph_optimization"]),
        ({"onnxruntime": {"graph_optimization": 1}}, ["graph_optimization must be a string"]),
        ({"default_version": 0}, ["default_version", "positive integer"]),
        ({"default_version": "2"}, ["default_version"]),
        ({"default_version": 2**100}, ["default_version", "at most 9007199254740992"]),
        ({"version_policy": {"specific": [1, 2**60]}}, ["version_policy.specific[]"]),
        ({"version_policy": {"latest": 0}}, ["version_policy.latest"]),
        ({"version_policy": {"latest": 1, "all": True}}, ["exactly one of"]),
        ({"version_policy": {"all": False}}, ["bad version_policy"]),
        ({"version_policy": {"specific": []}}, ["bad version_policy"]),
        ({"version_policy": {"specific": [1, -2]}}, ["version_policy.specific[]"]),
        # A generated [1, 1, ...] was kept whole and scanned per version on every sync.
        (
            {"version_policy": {"specific": [1] * 1025}},
            ["version_policy.specific lists 1025 entries, at most 1024"],
        ),
        ({"version_policy": "latest"}, ["exactly one of"]),
        # A value under a microsecond is 0 ("none") on every wire, and refused every request.
        ({"batching": {"default_timeout_ms": 0.0001}}, ["default_timeout_ms", "microsecond"]),
        ({"batching": {"max_queue_delay_ms": 0.0004}}, ["max_queue_delay_ms", "microsecond"]),
        # Planned sizes past max_batch_size were dropped without a word; unbatched, ignored.
        (
            {"batching": {"max_batch_size": 8, "planned_batch_sizes": [4, 64]}},
            ["planned_batch_sizes [4, 64] include [64], over max_batch_size 8"],
        ),
        (
            {"batching": {"max_batch_size": 0, "planned_batch_sizes": [2, 4]}},
            ["not batched (max_batch_size = 0)"],
        ),
        # A pool this size failed the load with std::bad_alloc, naming nothing.
        ({"onnxruntime": {"intra_op_threads": 2**31 - 1}}, ["intra_op_threads", "over 1024"]),
    ],
)
def test_errors_name_the_key(raw: dict[str, Any], fragments: list[str]) -> None:
    """Each refusal names the file and the key; every number a config holds is bounded."""
    with pytest.raises(InvalidArgument) as info:
        parse_config(raw, where="m/config.toml")
    assert info.value.message.startswith("m/config.toml")
    for fragment in fragments:
        assert fragment in info.value.message


@pytest.mark.parametrize(
    ("policy", "versions", "selected"),
    [
        ({"latest": 1}, [1, 2, 3], [3]),
        ({"latest": 2}, [3, 1, 2], [2, 3]),
        ({"latest": 5}, [1, 2], [1, 2]),
        ({"all": True}, [2, 1, 10], [1, 2, 10]),
        ({"specific": [1, 3]}, [1, 2, 3, 4], [1, 3]),
        ({"specific": [7]}, [1, 2], []),
        ({"specific": [3, 1, 3, 1]}, [1, 2, 3], [1, 3]),
        ({"latest": 1}, [], []),
    ],
)
def test_version_policy_selects(
    policy: dict[str, Any], versions: list[int], selected: list[int]
) -> None:
    assert parse_config({"version_policy": policy}).version_policy.select(versions) == selected


def test_integer_delays_are_accepted_as_floats() -> None:
    cfg = parse_config({"batching": {"max_queue_delay_ms": 2, "default_timeout_ms": 0}})
    assert cfg.batching.max_queue_delay_ms == 2.0
    assert isinstance(cfg.batching.max_queue_delay_ms, float)


# ---- per-version overrides -------------------------------------------------------------------


def _version_dir(tmp_path: Path, config: dict[str, Any] | str | None) -> Path:
    vdir = tmp_path / "m" / "2"
    vdir.mkdir(parents=True)
    if isinstance(config, str):
        (vdir / "config.json").write_text(config)
    elif config is not None:
        (vdir / "config.json").write_text(json.dumps(config))
    return vdir


def test_version_config_overrides_key_by_key(tmp_path: Path) -> None:
    base = parse_config(
        {
            "version_policy": {"latest": 2},
            "default_version": 1,
            "batching": {"max_batch_size": 8, "max_queue_size": 10},
            "instances": {"count": 2},
        }
    )
    vdir = _version_dir(tmp_path, {"batching": {"max_batch_size": 4}, "instances": {"count": 3}})
    cfg = apply_version_config(base, vdir)
    assert cfg.batching.max_batch_size == 4
    assert cfg.batching.max_queue_size == 10  # kept from the model's config
    assert cfg.instances.count == 3
    assert cfg.version_policy == base.version_policy
    assert cfg.default_version == 1


def test_a_key_twice_in_json_is_refused_as_toml_refuses_it(tmp_path: Path) -> None:
    """json kept the last value: {"max_batch_size": 8, "max_batch_size": 0} served unbatched."""
    (tmp_path / "config.json").write_text(
        '{"batching": {"max_batch_size": 8, "max_batch_size": 0}}'
    )
    with pytest.raises(InvalidArgument, match="'max_batch_size' is given twice"):
        load_config(tmp_path)


def test_a_byte_order_mark_is_read_past(tmp_path: Path) -> None:
    """Editors on Windows may start a file with one; tomllib refused line 1, invisibly."""
    (tmp_path / "config.toml").write_bytes(b"\xef\xbb\xbf[batching]\nmax_batch_size = 4\n")
    assert load_config(tmp_path).batching.max_batch_size == 4


@pytest.mark.parametrize("kind", ["folder", "dangling link"])
def test_a_config_that_is_not_a_file_is_refused_not_skipped(tmp_path: Path, kind: str) -> None:
    """A folder or a dangling link named config.toml served the model with every default."""
    path = tmp_path / "config.toml"
    if kind == "folder":
        path.mkdir()
    else:
        path.symlink_to(tmp_path / "nowhere.toml")
    with pytest.raises(InvalidArgument, match=r"config\.toml is not a readable file"):
        load_config(tmp_path)


def test_a_version_config_that_is_not_a_file_names_the_model_and_the_version(
    tmp_path: Path,
) -> None:
    """The message named the version's folder alone ('1/config.json'), not whose version."""
    vdir = tmp_path / "resnet" / "1"
    (vdir / "config.json").mkdir(parents=True)
    with pytest.raises(InvalidArgument, match=r"^resnet/1/config\.json is not a readable file"):
        apply_version_config(ModelConfig(), vdir)
    (vdir / "config.json").rmdir()
    (vdir / "config.json").write_text("{}")
    (vdir / "config.toml").write_text("")
    with pytest.raises(InvalidArgument, match=r"folder 'resnet/1' has both"):
        apply_version_config(ModelConfig(), vdir)


def test_a_version_config_may_name_its_providers_either_way(tmp_path: Path) -> None:
    """The documented execution_providers form met the model's providers in the merge and was
    refused as setting both."""
    base = parse_config({"onnxruntime": {"providers": ["CPUExecutionProvider"]}})
    own = {"onnxruntime": {"execution_providers": ["CPUExecutionProvider"]}}
    merged = apply_version_config(base, _version_dir(tmp_path, own))
    assert merged.onnxruntime.execution_providers == ("CPUExecutionProvider",)


def test_no_version_config_is_the_model_config(tmp_path: Path) -> None:
    base = parse_config({"batching": {"max_batch_size": 8}})
    assert apply_version_config(base, _version_dir(tmp_path, None)) is base


@pytest.mark.parametrize(
    ("config", "fragment"),
    [
        ({"default_version": 1}, "may only set"),
        ({"version_policy": {"all": True}}, "may only set"),
        ({"batching": 3}, "[batching] must be a table"),
        ({"batching": {"max_batch_sise": 3}}, "max_batch_sise"),
        ("{oops", "cannot be parsed"),
        ("[]", "must hold a table/object"),
    ],
)
def test_bad_version_configs(tmp_path: Path, config: dict[str, Any] | str, fragment: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        apply_version_config(ModelConfig(), _version_dir(tmp_path, config))
    assert fragment in info.value.message
    assert "m/2/config.json" in info.value.message


def test_a_repeated_specific_version_is_kept_once() -> None:
    """[1, 1, 1] was kept (and shown by model config, GetModelRollout...) as written."""
    config = parse_config({"version_policy": {"specific": [3, 1, 3] + [1] * 1000}})
    assert config.version_policy.specific == (1, 3)
