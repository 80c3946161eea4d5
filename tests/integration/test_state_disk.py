"""A conversion state database that does not open (a full state disk) leaves models serving."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest
from helpers import StartServer, make_repo

from ferry.client import ConversionClient, FailedPreconditionError, InferenceClient
from ferry.server.convert import service
from ferry.server.examples import seed_model


def test_a_state_database_that_does_not_open_stops_conversion_alone(
    tmp_path: Path, start_server: StartServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full state disk (sqlite could not make its -shm: "disk I/O error") stopped the server
    at start, so a disk only conversion writes took every model's serving down. Now models
    serve, conversion calls are refused naming the file and the fix, and conversion comes back
    once the file opens."""
    refusing = True
    opened = service.JobStore

    def store(path: Path) -> service.JobStore:
        if refusing:
            raise sqlite3.OperationalError("disk I/O error")
        return opened(path)

    monkeypatch.setattr(service, "JobStore", store)
    monkeypatch.setattr(service, "REOPEN_EVERY_S", 0.0, raising=False)  # each call tries it again
    root = make_repo(tmp_path / "repo", {"m": seed_model()})
    srv = start_server(root, state_dir=str(tmp_path / "state"))
    with InferenceClient(srv.target, timeout=30) as client:
        result = client.infer("m", {"input": np.ones((1, 3), np.float32)})
        assert result.version == 1
    with ConversionClient(srv.management_target, timeout=30) as conversion:
        with pytest.raises(
            FailedPreconditionError, match=r"state\.sqlite3 .*disk I/O error.*serving"
        ):
            conversion.list_jobs()
        assert [v.version for v in conversion.get_model("m").versions] == [1]
        refusing = False  # space freed
        assert conversion.list_jobs() == []
