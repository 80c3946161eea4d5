"""A full disk in the conversion child is the operator's (LIMIT_EXCEEDED, nothing published),
never a crash: the child said "crashed ... report it" (INTERNAL), on a repository disk that
could not take the source's copy or the converted model."""

from __future__ import annotations

import errno
import io
import json
from pathlib import Path

import pytest

from ferry.server.convert.spec import Job, to_json
from ferry.server.convert.worker import child, pipeline
from ferry.server.examples import mlp_model


def _job(tmp_path: Path) -> Job:
    source = tmp_path / "source.onnx"
    source.write_bytes(mlp_model(sizes=(8, 4), seed=0).SerializeToString())
    work = tmp_path / "work"
    work.mkdir()
    return Job(
        job_id="f" * 32,
        model="m",
        source_path=str(source),
        source_format="onnx",
        source_sha256="0" * 64,
        work_dir=str(work),
    )


def _full(*_: object) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def _events(text: str) -> list[dict[str, str]]:
    return [json.loads(line) for line in text.splitlines()]


def test_a_full_disk_while_converting_is_the_limit_not_a_crash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def export_fails(self: pipeline.Pipeline) -> None:
        try:
            _full()
        except OSError as exc:  # as an exporter does: its own error, the OSError its cause
            raise RuntimeError("failed to save the model") from exc

    monkeypatch.setattr(pipeline.Pipeline, "run", export_fails)
    monkeypatch.setattr(pipeline.Report, "write", _full)  # the report does not fit either
    out = io.StringIO()
    assert child.run(_job(tmp_path), child.Progress(out)) == child.EXIT_FAILED
    last = _events(out.getvalue())[-1]
    assert last["error_kind"] == "LIMIT_EXCEEDED"
    assert last["message"].startswith("the disk holding the model repository is full")
    assert "convert again" in last["message"]


def test_a_source_copy_that_does_not_fit_is_the_limit_not_a_crash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_json = tmp_path / "job.json"
    job_json.write_text(to_json(_job(tmp_path)))
    monkeypatch.setattr(child, "_redirect_stdout", lambda: None)
    monkeypatch.setattr(child, "_confine_temp", lambda work: None)
    monkeypatch.setattr(child, "_stage_source", _full)
    progress = tmp_path / "progress.jsonl"
    code = child.main(["--job", str(job_json), "--progress-file", str(progress)])
    assert code == child.EXIT_FAILED
    last = _events(progress.read_text())[-1]
    assert last["error_kind"] == "LIMIT_EXCEEDED"
    assert "disk holding the model repository is full" in last["message"]
