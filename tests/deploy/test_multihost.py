"""Many hosts on one machine (issue 11, part 4): deploy/multihost.py builds a control host and two
serving replicas in network namespaces it creates, sharing one repository folder, and a client
namespace whose SDK balances over the replicas. Traffic never leaves those namespaces."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import wait_for

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "deploy" / "multihost.py"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("ip") is None,
        reason="needs root and iproute2 to create network namespaces (CI runs as root)",
    ),
]


def test_replicas_share_a_repository_follow_a_publish_and_survive_a_killed_peer() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FERRY_")}
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--json", "--poll-interval", "0.5", "--load-seconds", "3"],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    figures = json.loads(run.stdout.strip().splitlines()[-1])
    calls = figures["calls_per_replica"]
    assert len(calls) == 2 and all(n > 0 for n in calls.values()), calls  # balanced over both
    served = figures["served_after_publish"]
    assert len(served) == 2 and all(2 in versions for versions in served.values()), served
    during = figures["during_kill"]
    assert during["ok"] > 0 and during["failed"] == 0, during  # retried away, none lost
    assert figures["namespaces_left"] == []


def test_sigterm_removes_what_it_built() -> None:
    """A `timeout` or a cancelled CI job sends SIGTERM: the namespaces, servers and temporary
    folder it had made were left on the machine."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FERRY_")}
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--poll-interval", "0.5", "--load-seconds", "3"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    prefix = f"fy{proc.pid % 100000}-"

    def ours() -> list[str]:
        names = subprocess.run(
            ["ip", "netns", "list"], capture_output=True, text=True, timeout=60, check=True
        ).stdout.split()
        return [n for n in names if n.startswith(prefix)]

    try:
        wait_for(lambda: f"{prefix}cli" in ours(), "the client namespace", timeout=120)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert ours() == []
