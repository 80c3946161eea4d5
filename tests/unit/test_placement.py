"""Instances placed per device (issue 16, part 4), the config and the placement logic, tested on
CPU: ``instances.device_ids`` is parsed and bounded, and each instance's GPU providers get its
device id, with refusals that say what to change."""

from __future__ import annotations

from typing import Any

import pytest

from ferry.server.core.config import (
    InstancesConfig,
    ProviderConfig,
    config_to_dict,
    parse_config,
)
from ferry.server.errors import InvalidArgument
from ferry.server.runtime.placement import Device, device_config, place

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TRT = "TensorrtExecutionProvider"


def _cfg(instances: dict[str, Any], providers: list[Any] | None = None) -> Any:
    raw: dict[str, Any] = {"instances": instances}
    if providers is not None:
        raw["onnxruntime"] = {"providers": providers}
    return parse_config(raw)


def test_device_ids_are_parsed_in_order_and_written_back() -> None:
    cfg = _cfg({"count": 2, "device_ids": [1, 0]})
    assert cfg.instances == InstancesConfig(count=2, device_ids=(1, 0))
    assert cfg.instances.total == 4
    assert config_to_dict(cfg)["instances"] == {"count": 2, "device_ids": [1, 0]}
    assert parse_config(config_to_dict(cfg)) == cfg
    # Without device_ids nothing changes: count is the version's concurrency, as before.
    plain = parse_config({"instances": {"count": 3}})
    assert plain.instances.total == 3 and config_to_dict(plain)["instances"] == {"count": 3}
    assert _cfg({"device_ids": []}).instances == InstancesConfig()


@pytest.mark.parametrize(
    ("instances", "message"),
    [
        ({"device_ids": 0}, "must be a list of at most 16 GPU ids within 0..255"),
        ({"device_ids": [-1]}, "must be a list of at most 16 GPU ids"),
        ({"device_ids": ["0"]}, "must be a list of at most 16 GPU ids"),
        ({"device_ids": [True]}, "must be a list of at most 16 GPU ids"),
        ({"device_ids": [1.0]}, "must be a list of at most 16 GPU ids"),
        ({"device_ids": [256]}, "within 0..255"),
        ({"device_ids": list(range(17))}, "at most 16"),
        ({"device_ids": [0, 1, 0]}, "lists device 0 more than once .* raise instances.count"),
        ({"count": 8, "device_ids": list(range(9))}, "is 72 instances, over 64"),
        ({"device_id": [0]}, r"unknown keys in \[instances\]: \['device_id'\]"),
    ],
)
def test_bad_device_ids_are_refused_with_what_to_fix(
    instances: dict[str, Any], message: str
) -> None:
    with pytest.raises(InvalidArgument, match=message):
        _cfg(instances)


def test_one_device_with_two_instances() -> None:
    cfg = _cfg({"count": 2, "device_ids": [0]}, [{"name": CUDA}, {"name": CPU}])
    on_zero = (ProviderConfig(CUDA, (("device_id", 0),)), ProviderConfig(CPU))
    assert place(cfg.onnxruntime.providers, cfg.instances) == [Device(0, on_zero, 2)]


def test_two_devices_with_one_instance_each_and_every_gpu_provider_placed() -> None:
    providers = [
        {"name": TRT, "options": {"trt_fp16_enable": True}},
        {"name": CUDA, "options": {"cudnn_conv_algo_search": "HEURISTIC"}},
        {"name": CPU},
    ]
    cfg = _cfg({"device_ids": [1, 0]}, providers)
    placed = place(cfg.onnxruntime.providers, cfg.instances)
    assert [(d.device_id, d.count) for d in placed] == [(1, 1), (0, 1)]
    for device in placed:
        trt, cuda, cpu = device.providers
        assert trt.options_dict() == {"device_id": device.device_id, "trt_fp16_enable": True}
        # The other options are kept; the CPU fallback is left as written.
        assert cuda.options_dict() == {
            "device_id": device.device_id,
            "cudnn_conv_algo_search": "HEURISTIC",
        }
        assert cpu == ProviderConfig(CPU)
    one = device_config(cfg, placed[0])
    assert one.onnxruntime.providers == placed[0].providers
    assert one.instances == InstancesConfig(count=1)
    assert one.batching == cfg.batching


def test_without_device_ids_the_providers_are_left_as_written() -> None:
    cfg = _cfg({"count": 3}, [{"name": CUDA, "options": {"device_id": 2}}])
    assert place(cfg.onnxruntime.providers, cfg.instances) == [
        Device(None, cfg.onnxruntime.providers, 3)
    ]


@pytest.mark.parametrize(
    ("providers", "message"),
    [
        (
            [{"name": CPU}],
            r"instances.device_ids \[0, 1\] places instances on GPUs, but none of "
            r"onnxruntime.providers \['CPUExecutionProvider'\] runs on a GPU .*"
            "CUDAExecutionProvider.* or remove device_ids",
        ),
        ([{"name": "OpenVINOExecutionProvider"}], "runs on a GPU"),
        (
            [{"name": CUDA, "options": {"device_id": 1}}, {"name": CPU}],
            r"provider CUDAExecutionProvider sets options.device_id = 1 and "
            r"instances.device_ids \[0, 1\] places it too: remove one",
        ),
        ([{"name": "CUDAExecutonProvider"}], "unknown execution provider 'CUDAExecutonProvider'"),
    ],
)
def test_placement_refuses_what_cannot_mean_anything(providers: list[Any], message: str) -> None:
    cfg = _cfg({"device_ids": [0, 1]}, providers)
    with pytest.raises(InvalidArgument, match=message):
        place(cfg.onnxruntime.providers, cfg.instances)
