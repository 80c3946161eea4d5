"""``ferry infer`` and ``ferry loadtest`` given files or shapes they cannot use: one line that
says what to fix and a non-zero exit, never a traceback, and before the work, not after it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ferry.cli import main


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    _, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return code, lines[0]


def test_unusable_files_and_shapes_are_one_line_errors(
    server: Any, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    t = ("--target", server.target)
    x = tmp_path / "x.npy"
    np.save(x, np.ones((1, 64), np.float32))
    folder = tmp_path / "out.npz"
    folder.mkdir()
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    load = ("loadtest", "mlp", "-n", "2", "--warmup", "0", "--no-progress")

    cases: list[tuple[tuple[str, ...], str]] = [
        (("infer", "mlp", "-i", str(x), "-o", str(folder)), "is a folder"),
        (("infer", "mlp", "-i", str(deep)), "nested too deeply"),
        (("infer", "mlp", "--random", "--batch-size", str(10**12)), "one gRPC message"),
        ((*load, "--json", str(folder)), "is a folder"),
        ((*load, "--csv", str(folder)), "is a folder"),
        ((*load, "-i", str(deep)), "nested too deeply"),
        ((*load, "--batch-size", str(10**12)), "one gRPC message"),
    ]
    for argv, expected in cases:
        code, line = run(capsys, *argv, *t)
        assert code == 2, (argv, line)
        assert line.startswith("ferry ") and expected in line, (argv, line)
    assert list(folder.iterdir()) == []


def test_a_write_that_fails_after_the_checks_is_one_line(
    server: Any, capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: Any
) -> None:
    x = tmp_path / "x.npy"
    np.save(x, np.ones((1, 64), np.float32))

    def refuse(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied", str(tmp_path / "out.npz"))

    monkeypatch.setattr(np, "savez", refuse)
    argv = ("infer", "mlp", "-i", str(x), "-o", str(tmp_path / "out.npz"))
    code, line = run(capsys, *argv, "--target", server.target)
    assert code == 1 and "Permission denied" in line, line
