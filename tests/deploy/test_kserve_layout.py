"""KServe's storage initializer copies what storageUri names to /mnt/models, which Ferry serves as
its repository: a storageUri naming a model file or a model's folder (not the repository) must
say so in the log, since the pod then serves nothing and never turns ready."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import pytest
from helpers import make_repo

from ferry.server.examples import seed_model


@pytest.mark.parametrize(
    ("layout", "expected"),
    [
        ("model.onnx", "has model.onnx at its top"),  # storageUri: .../seed/1/model.onnx
        ("1/model.onnx", "holds model.onnx like a version folder"),  # storageUri: .../seed
        ("seed/model.onnx", "move it to a version folder, seed/1/model.onnx"),
        # A Triton repository's names Ferry does not serve: skipped without a word.
        ("text encoder/1/model.onnx", "folder 'text encoder' holds a model but is not a valid"),
        ("seed/v1/model.onnx", "model 'seed' has model.onnx in folder 'v1', which is not a"),
        ("seed/01/model.onnx", "in folder '01', which is not a version folder"),
    ],
)
def test_a_model_file_where_none_is_served_is_named_in_the_log(
    layout: str,
    expected: str,
    tmp_path: Path,
    start_server: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    built = make_repo(tmp_path / "built", {"seed": seed_model()})
    mnt = tmp_path / "mnt-models"
    (mnt / layout).parent.mkdir(parents=True)
    shutil.copy(built / "seed" / "1" / "model.onnx", mnt / layout)
    with caplog.at_level(logging.WARNING, logger="ferry.server.grpc.app"):
        start_server(mnt)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(expected in w and "<model>/<version>/model.onnx" in w for w in warnings), warnings


@pytest.mark.parametrize("kind", ["link", "bad name"])
def test_a_model_folder_skipped_for_its_kind_or_name_is_named_in_the_log(
    kind: str, tmp_path: Path, start_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A model folder that is a link (repo/bert -> /models/bert), or named as Triton allows and
    Ferry does not ("bert@2"), served nothing, and the log said nothing."""
    built = make_repo(tmp_path / "built", {"seed": seed_model()})
    mnt = tmp_path / "mnt-models"
    mnt.mkdir()
    if kind == "link":
        (mnt / "seed").symlink_to(built / "seed", target_is_directory=True)
        expected = "model folder 'seed' is a symbolic link, which is not served"
    else:
        shutil.copytree(built / "seed", mnt / "bert@2")
        expected = "folder 'bert@2' holds a model but is not a valid model name"
    with caplog.at_level(logging.WARNING, logger="ferry.server.grpc.app"):
        start_server(mnt)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(expected in w for w in warnings), warnings


def test_a_repository_laid_out_right_logs_no_such_warning(
    tmp_path: Path, start_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    root = make_repo(tmp_path / "repo", {"seed": seed_model()})
    with caplog.at_level(logging.WARNING, logger="ferry.server.grpc.app"):
        start_server(root)
    assert not [r for r in caplog.records if "<model>/<version>/model.onnx" in r.getMessage()]
