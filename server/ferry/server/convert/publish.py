"""Turning a finished job's staging folder into a served version.

The folder is checked to load in onnxruntime with the serving config it will have *before* the
rename, because a published version is immutable and visible at once: a graph that cannot be
served must fail the job, not become the model's newest version.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from ferry.server.core.config import ModelConfig, apply_version_config, load_config
from ferry.server.core.registry import ModelRegistry, State
from ferry.server.core.repository import (
    MODEL_FILE,
    REPORT_FILE,
    VERSION_CONFIG_FILE,
    ModelRepository,
    write_file_atomic,
)
from ferry.server.errors import ConversionFailed, FerryError, InternalError

log = logging.getLogger("ferry.convert")

KEPT = {MODEL_FILE, REPORT_FILE}


async def publish(
    repository: ModelRepository,
    registry: ModelRegistry,
    model: str,
    staged: Path,
    serving_config: dict[str, Any],
) -> tuple[int, str]:
    """Publish ``staged`` as the model's next version and load it; returns the version and a
    note for the job's message when the new version is not served."""
    await asyncio.to_thread(_prepare, staged, serving_config)
    await asyncio.to_thread(check_loads, repository, model, staged)
    version = await asyncio.to_thread(repository.publish, model, staged)
    await registry.load_model(model)
    status = {s.version: s for s in registry.statuses(model)}.get(version)
    if status is None:
        note = " (not served: the model's version_policy does not select it)"
    elif status.state is State.FAILED:
        note = f" (but loading it failed: {status.reason})"
    else:
        note = ""
    return version, note


def _prepare(staged: Path, serving_config: dict[str, Any]) -> None:
    """Keep only what a version holds; write the serving config the job asked for."""
    if not (staged / MODEL_FILE).is_file():
        raise InternalError(f"the conversion process exited 0 without writing {MODEL_FILE}")
    for entry in staged.iterdir():  # intermediate files of the child stay out of the version
        if entry.name not in KEPT:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
    if serving_config:
        text = json.dumps(serving_config, indent=2, sort_keys=True) + "\n"
        write_file_atomic(staged / VERSION_CONFIG_FILE, text.encode())


def check_loads(repository: ModelRepository, model: str, staged: Path) -> None:
    """Create the session the registry will create, with the config the version will have."""
    from ferry.server.runtime.session import OrtSession

    try:
        base = load_config(repository.model_dir(model))
    except FerryError:
        base = ModelConfig()  # the model's own config is broken: the registry reports that
    try:
        config = apply_version_config(base, staged)
        session = OrtSession(staged / MODEL_FILE, config.onnxruntime)
    except Exception as exc:
        why = exc.message if isinstance(exc, FerryError) else f"{type(exc).__name__}: {exc}"
        raise ConversionFailed(
            f"the converted model does not load in this server's onnxruntime: {why[:500]}"
        ) from None
    mbs = config.batching.max_batch_size
    if mbs and not session.batchable():
        raise ConversionFailed(
            f"the serving config sets max_batch_size = {mbs} but the converted graph has no "
            "dynamic first dimension on every input and output; set max_batch_size to 0 or "
            "give inputs a -1 batch dimension"
        )
