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


def test_a_repository_laid_out_right_logs_no_such_warning(
    tmp_path: Path, start_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    root = make_repo(tmp_path / "repo", {"seed": seed_model()})
    with caplog.at_level(logging.WARNING, logger="ferry.server.grpc.app"):
        start_server(root)
    assert not [r for r in caplog.records if "<model>/<version>/model.onnx" in r.getMessage()]
