"""Where a graph's external data goes when a conversion writes it: one data file per variant,
``<variant>.onnx.data``, beside it.

Torch-free and import-light (onnx is imported when a graph is saved): the quantization
registry's builders (``strategies.quantization``) and the child's stages
(``worker.external``, ``worker.graph``) share it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

DATA_SUFFIX = ".data"
MIN_EXTERNAL_BYTES = 1024  # smaller tensors stay in the graph (onnx's own default threshold)


def data_name(path: Path) -> str:
    """The one data file a variant written here has: ``fp16.onnx`` -> ``fp16.onnx.data``."""
    return path.name + DATA_SUFFIX


def session_options(options: Any, target: Path, external: bool) -> None:
    """Have onnxruntime write its optimized graph to ``target``, with the initializers in
    ``target``'s data file when ``external`` (without it, a graph over 2 GiB fails to save)."""
    options.optimized_model_filepath = str(target)
    if external:
        (target.parent / data_name(target)).unlink(missing_ok=True)
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name", data_name(target)
        )
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_min_size_in_bytes",
            str(MIN_EXTERNAL_BYTES),
        )


def save(model: Any, path: Path, external: bool) -> None:
    """Write ``model`` to ``path``; external: every tensor of 1 KiB and more goes to one data
    file beside it. Tensors whose data is already external and not loaded keep their
    references (onnx rewrites only tensors that hold their bytes)."""
    import onnx

    if not external:
        onnx.save_model(model, str(path))
        return
    (path.parent / data_name(path)).unlink(missing_ok=True)
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=data_name(path),
        size_threshold=MIN_EXTERNAL_BYTES,
    )
