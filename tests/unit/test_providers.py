"""The execution providers table, the ``providers = [{ name, options }]`` config shape, and the
plumbing from config to onnxruntime (on CPU: the only provider this machine has)."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import pytest

from ferry.server.core.config import ProviderConfig, config_to_dict, parse_config
from ferry.server.core.loaded import open_version
from ferry.server.errors import InvalidArgument
from ferry.server.examples import identity_model
from ferry.server.runtime import providers
from ferry.server.runtime.session import open_session

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


def test_every_row_is_consistent() -> None:
    for name, row in providers.PROVIDERS.items():
        assert row.name == name
        assert row.device in (providers.CPU, providers.GPU)
        # Only CPU execution costs what the inline estimate measures.
        assert not row.inline or row.device == providers.CPU
        if row.device == providers.GPU:
            assert row.install, f"{name} must say what to install"
    assert providers.PROVIDERS[CPU].inline


def test_config_takes_providers_with_options_and_the_older_names_only_shape() -> None:
    cfg = parse_config(
        {
            "onnxruntime": {
                "providers": [
                    {"name": CUDA, "options": {"device_id": 1, "enable_cuda_graph": True}},
                    {"name": CPU},
                ]
            }
        }
    )
    assert cfg.onnxruntime.providers == (
        ProviderConfig(CUDA, (("device_id", 1), ("enable_cuda_graph", True))),
        ProviderConfig(CPU),
    )
    assert cfg.onnxruntime.execution_providers == (CUDA, CPU)
    older = parse_config({"onnxruntime": {"execution_providers": [CPU]}})
    assert older.onnxruntime.providers == (ProviderConfig(CPU),)
    # The written form parses back to the same config.
    assert parse_config(config_to_dict(cfg)) == cfg


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"providers": [{"options": {}}]}, "with a name"),
        ({"providers": [{"name": CPU, "opts": {}}]}, "unknown keys ['opts']"),
        ({"providers": [{"name": CUDA, "options": {"device_id": [0]}}]}, "options must be"),
        ({"providers": "CPU"}, "must be a list"),
        ({"providers": []}, "must not be empty"),
        ({"providers": [CPU, CPU]}, "twice"),
        ({"providers": [CPU], "execution_providers": [CPU]}, "not both"),
    ],
)
def test_malformed_provider_config_is_refused(section: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_config({"onnxruntime": section})


def test_resolve_checks_names_and_options_against_the_table() -> None:
    with pytest.raises(InvalidArgument, match=r"unknown execution provider 'Nope'.*known: CPU"):
        providers.resolve([ProviderConfig("Nope")], [CPU])
    with pytest.raises(InvalidArgument, match=r"has no option 'device'.*device_id"):
        providers.resolve([ProviderConfig(CUDA, (("device", 0),))], [CUDA, CPU])
    with pytest.raises(InvalidArgument, match=r"cudnn_conv_algo_search.*EXHAUSTIVE"):
        providers.resolve([ProviderConfig(CUDA, (("cudnn_conv_algo_search", "FAST"),))], [CUDA])
    with pytest.raises(InvalidArgument, match="true or false"):
        providers.resolve([ProviderConfig(CUDA, (("enable_cuda_graph", 1),))], [CUDA])
    with pytest.raises(InvalidArgument, match="has no option 'x'; its options: none"):
        providers.resolve([ProviderConfig(CPU, (("x", 1),))], [CPU])


def test_resolve_converts_options_to_onnxruntime_strings_and_reports_the_fallback() -> None:
    configs = [
        ProviderConfig(CUDA, (("device_id", 2), ("do_copy_in_default_stream", False))),
        ProviderConfig(CPU),
    ]
    on_gpu = providers.resolve(configs, [CUDA, CPU])
    assert on_gpu.names == [CUDA, CPU]
    assert on_gpu.options == [{"device_id": "2", "do_copy_in_default_stream": "0"}, {}]
    assert on_gpu.missing == [] and providers.placement(on_gpu.names[0]) == ("gpu", False)
    on_cpu = providers.resolve(configs, [CPU])
    assert on_cpu.names == [CPU]
    assert on_cpu.missing == [CUDA] and providers.placement(on_cpu.names[0]) == ("cpu", True)
    with pytest.raises(InvalidArgument, match="install onnxruntime-gpu"):
        providers.resolve([ProviderConfig(CUDA)], [CPU])


_POOL = ThreadPoolExecutor(max_workers=1)  # never used: no batch runs in these tests


def _model(tmp_path: Path) -> Path:
    path = tmp_path / "1" / "model.onnx"
    path.parent.mkdir()
    onnx.save(identity_model("FP32"), str(path))
    return path


def test_a_version_opens_with_the_providers_of_its_config(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = _model(tmp_path)
    cfg = parse_config(
        {"onnxruntime": {"providers": [{"name": CUDA, "options": {"device_id": 0}}, CPU]}}
    )
    with caplog.at_level(logging.WARNING):
        lv = open_version(open_session, "m", 1, path, cfg, warm_up=True, executor=_POOL)
    try:
        # This onnxruntime build has no CUDA: the fallback is logged, and what the version got
        # is what its metadata says.
        assert lv.session.providers == [CPU]
        assert lv.session.device_kind == "cpu" and lv.session.inline_allowed
        assert any(CUDA in r.getMessage() for r in caplog.records)
        x = np.ones((2, 3), np.float32)
        assert np.array_equal(lv.session.run({"input": x})[0], x)
    finally:
        lv.session.release()


def test_a_version_asking_only_for_a_missing_provider_fails_to_open(tmp_path: Path) -> None:
    path = _model(tmp_path)
    cfg = parse_config({"onnxruntime": {"providers": [{"name": CUDA}]}})
    with pytest.raises(InvalidArgument, match="none of the execution providers"):
        open_version(open_session, "m", 1, path, cfg, warm_up=False, executor=_POOL)


def test_the_conversion_child_measures_on_the_serving_providers() -> None:
    """A job carries its model's serving providers; parity and the benchmark run there, with
    the server's table and fallback (this build: CPU only)."""
    from ferry.server.convert.worker.placement import CPU_ONLY, session_providers
    from ferry.server.errors import ConversionFailed

    assert session_providers([]) == CPU_ONLY
    wanted = [{"name": CUDA, "options": {"device_id": 0}}, {"name": CPU, "options": {}}]
    assert session_providers(wanted) == [(CPU, {})]
    with pytest.raises(ConversionFailed, match="serving providers cannot run here"):
        session_providers([{"name": CUDA, "options": {}}])
    with pytest.raises(ConversionFailed, match="unknown execution provider"):
        session_providers([{"name": "Bogus", "options": {}}])


@pytest.mark.parametrize(("heavy_ns", "expected"), [(10**12, 1), (0, 2)])
def test_intra_op_threads_auto_measures_the_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, heavy_ns: int, expected: int
) -> None:
    """intra_op_threads = 0: one thread unless a batch of one is slower than the threshold,
    then the worker's cores (here 2); an explicit value is kept as it is."""
    from ferry.server.runtime import session as session_module

    path = _model(tmp_path)
    monkeypatch.setattr(session_module, "AUTO_HEAVY_NS", heavy_ns)
    monkeypatch.setitem(session_module._AUTO, "threads", 2)
    opened = session_module.open_session(path, parse_config({}))
    assert opened.intra_op_threads == expected
    x = np.ones((2, 3), np.float32)
    assert np.array_equal(opened.run({"input": x})[0], x)
    opened.release()
    explicit = session_module.open_session(
        path, parse_config({"onnxruntime": {"intra_op_threads": 3}})
    )
    assert explicit.intra_op_threads == 3
    explicit.release()
