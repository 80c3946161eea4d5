"""What a model's folder holds, as a refresh compares it with what is served: the stat
signatures of its configs, its rollout file and each version's files, and the scan of one
model's folder (read off the event loop)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ferry.server.core import rollout as rollouts
from ferry.server.core.config import CONFIG_NAMES, TRITON_CONFIG, ModelConfig, load_config
from ferry.server.core.repository import MODEL_DATA_FILE, MODEL_FILE, ModelRepository
from ferry.server.core.slots import Signature
from ferry.server.core.watched import file_signature as _file_signature
from ferry.server.core.watched import tree_signature
from ferry.server.errors import FailedPrecondition, FerryError


def _model_config(repository: ModelRepository, name: str) -> tuple[Signature, ModelConfig, bool]:
    """A model's config signature and config, and whether it parsed (a publish's look)."""
    mdir = repository.model_dir(name)
    signature = _config_signature(mdir)
    try:
        return signature, load_config(mdir), True
    except FerryError:
        return signature, ModelConfig(), False  # a sync reports the broken config


def _published_signature(repository: ModelRepository, name: str, version: int) -> Signature:
    return _version_signature(repository.version_dir(name, version))


def _rollout_signature(repository: ModelRepository, name: str) -> str | None:
    return rollouts.signature(repository.model_dir(name))


def _config_signature(mdir: Path) -> Signature:
    """Every config name's signature: a config.json added beside config.toml, or one of
    two removed, is a change (only the first file found was watched). Triton's config.pbtxt
    too, which load_config refuses alone: its removal is the fix a refresh must see."""
    sigs = tuple(_file_signature(mdir / n) for n in (*CONFIG_NAMES, TRITON_CONFIG))
    return None if all(sig is None for sig in sigs) else sigs


@dataclass
class _FolderScan:
    """What one model's folder holds, read off the event loop (``_scan``)."""

    folder: Path
    config_signature: Signature
    config: ModelConfig
    config_error: str
    on_disk: list[int]
    rollout_signature: str | None
    rollout: rollouts.Rollout | None
    rollout_error: str
    signatures: dict[int, Signature]
    read_error: str = ""  # the folder cannot be listed: nothing else was read

    def model_file(self, version: int) -> Path:
        return self.folder / str(version) / MODEL_FILE


def _scan(
    repository: ModelRepository,
    name: str,
    config_signature: Signature,
    rollout_signature: str | None,
) -> _FolderScan:
    """A model's config (parsed only if its signature differs from the one given), versions,
    rollout file (likewise) and each version's model file signature."""
    mdir = repository.model_dir(name)
    scan = _FolderScan(mdir, _config_signature(mdir), ModelConfig(), "", [], None, None, "", {})
    try:
        scan.on_disk = repository.list_versions(name)
    except FailedPrecondition as exc:
        # Listed first: a folder that cannot be read also hides its config files, which then
        # looked removed (every version reloaded with the defaults).
        scan.read_error = f"{exc.message}, then refresh"
        return scan
    except FerryError:
        scan.on_disk = []
    if scan.config_signature != config_signature:
        try:
            scan.config = load_config(mdir)
        except FerryError as exc:
            scan.config_error = exc.message
    scan.rollout_signature, parsed = rollouts.scan(mdir, rollout_signature)
    if parsed is not None:
        scan.rollout, scan.rollout_error = parsed
    # A version's own config is part of what it serves: an edit of it reloads the version (it
    # was ignored until the model's config changed).
    scan.signatures = {v: _version_signature(scan.folder / str(v)) for v in scan.on_disk}
    return scan


def _version_signature(vdir: Path) -> Signature:
    """What a version serves, as a refresh compares it: its model file, its own config, and
    its external weights (``model.onnx.data``). The weights file was left out, so new weights
    copied over it (the graph file byte for byte the same) were never loaded: Refresh reported
    nothing, the old weights kept answering, and a worker started again served the new ones.
    Then every other file under the folder (core.watched): weights in a subfolder, or behind a
    link, went unwatched the same way."""
    return (
        _file_signature(vdir / MODEL_FILE),
        _config_signature(vdir),
        _file_signature(vdir / MODEL_DATA_FILE),
        tree_signature(vdir),
    )
