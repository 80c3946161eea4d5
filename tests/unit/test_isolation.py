"""One model's business never holds up another's (issue 10, part 4): management calls on one
model do not wait behind another model's load, and threads are bounded by the host, not by the
number of models.

Real ONNX models and onnxruntime sessions; the slow load is a gate in the registry's opener,
released by the test, so nothing depends on timing.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from asyncutil import LOAD_GUARD_S, arun

from ferry.server.core.config import ModelConfig
from ferry.server.core.dataplane import DataPlane, InferenceRequest
from ferry.server.core.pools import READ_THREADS
from ferry.server.core.registry import ModelRegistry
from ferry.server.core.repository import ModelRepository
from ferry.server.core.types import State
from ferry.server.cpus import usable_cores
from ferry.server.examples import mlp_model, seed_model, write_model
from ferry.server.runtime.session import OrtSession, open_session


class GatedOpener:
    """Opens sessions normally, except ``model``'s, which waits for the test's release."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.entered = threading.Event()
        self._open = threading.Event()

    def __call__(self, path: Path, config: ModelConfig) -> OrtSession:
        if path.parent.parent.name == self.model:
            self.entered.set()
            assert self._open.wait(LOAD_GUARD_S), "the test never released the gate"
        return open_session(path, config)

    def release(self) -> None:
        self._open.set()


def test_management_on_one_model_does_not_wait_behind_another_models_load(
    tmp_path: Path,
) -> None:
    repo = ModelRepository(tmp_path / "repo")
    write_model(repo, "fast", seed_model())
    opener = GatedOpener("slow")
    registry = ModelRegistry(repo, opener, warm_up=False)
    dataplane = DataPlane(registry)
    x = {"input": np.zeros((1, 3), np.float32)}

    async def scenario() -> None:
        await registry.refresh()
        write_model(repo, "slow", seed_model())
        refresh = asyncio.create_task(registry.refresh())  # its load of "slow" blocks
        await asyncio.to_thread(opener.entered.wait, LOAD_GUARD_S)
        # While "slow" is loading: another model unloads, loads and serves.
        await registry.unload_model("fast")
        assert "fast" not in {s.name for s in registry.statuses()}
        outcome = await registry.load_model("fast")
        assert outcome.loaded == ["fast/1"]
        assert (await dataplane.infer(InferenceRequest("fast", x))).version == 1
        assert not refresh.done()
        assert {s.name: s.state for s in registry.statuses()}["slow"] is State.LOADING
        opener.release()
        await refresh
        assert {s.name: s.state for s in registry.statuses()}["slow"] is State.READY
        await registry.close()

    arun(scenario, LOAD_GUARD_S)


def test_a_model_unloaded_during_a_refresh_stays_unloaded(tmp_path: Path) -> None:
    repo = ModelRepository(tmp_path / "repo")
    write_model(repo, "slow", seed_model())
    write_model(repo, "other", seed_model())
    opener = GatedOpener("slow")
    registry = ModelRegistry(repo, opener, warm_up=False)

    async def scenario() -> None:
        other_ready = asyncio.Event()

        def follow() -> None:
            if any(s.name == "other" and s.state is State.READY for s in registry.statuses()):
                other_ready.set()

        registry.add_listener(follow)
        start = asyncio.create_task(registry.refresh())
        await other_ready.wait()  # "other" loads beside the gated "slow"
        assert not start.done()
        await registry.unload_model("other")
        opener.release()
        await start
        await registry.refresh()
        assert "other" not in {s.name for s in registry.statuses()}
        assert {s.name: s.state for s in registry.statuses()}["slow"] is State.READY
        await registry.close()

    arun(scenario, LOAD_GUARD_S)


# Run in a process of its own: in the test process, threads other libraries start at any time
# (gRPC's executor, from earlier tests) would be counted too.
THREADS_SCENARIO = """
import asyncio, os, sys
from pathlib import Path
import numpy as np
from ferry.server.core.dataplane import DataPlane, InferenceRequest
from ferry.server.core.pools import ThreadPools
from ferry.server.core.registry import ModelRegistry
from ferry.server.core.repository import ModelRepository
from ferry.server.runtime import session as session_module
from ferry.server.runtime.session import open_session

# Every model is judged light, as the tiny MLP is on a quiet host: a heavy model's own
# onnxruntime pool is intended (tests/unit/test_providers.py), and a busy CI host must not
# make this count depend on that timing.
session_module.AUTO_HEAVY_NS = 10**12

def threads():
    return len(os.listdir("/proc/self/task"))

repo = ModelRepository(Path(sys.argv[1]))
pools = ThreadPools()
registry = ModelRegistry(repo, open_session, warm_up=True, pools=pools)
dataplane = DataPlane(registry)
x = {"input": np.zeros((16, 64), np.float32)}

async def scenario():
    before = threads()
    await registry.refresh()
    for lv in registry.loaded_versions():
        lv._inline = False  # every batch goes to the execution pool, as a slow model's
    for _ in range(2):
        await asyncio.gather(*(dataplane.infer(InferenceRequest(n, x)) for n in repo.list_models()))
    print(threads() - before, pools.execution_threads, pools.loader_threads)
    await registry.close()

asyncio.run(scenario())
"""


def _scenario(script: str, root: Path) -> str:
    """Run ``script`` in a fresh interpreter on the repository at ``root``; its stdout."""
    run = subprocess.run(
        [sys.executable, "-c", script, str(root)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc")
def test_threads_are_bounded_by_the_host_not_by_the_number_of_models(tmp_path: Path) -> None:
    """Every version executes on the shared pools: 40 models, each asked enough to run on a
    worker thread, add at most the pools' threads (OS threads, onnxruntime's included),
    whatever the number of models."""
    repo = ModelRepository(tmp_path / "repo")
    for i in range(40):
        write_model(repo, f"m{i:02d}", mlp_model())
    grown, execution, loader = (int(n) for n in _scenario(THREADS_SCENARIO, repo.root).split())
    # + the files thread and the management reads' (which list the repository off the loop)
    assert grown <= execution + loader + 1 + READ_THREADS, (grown, execution, loader)
    assert execution == usable_cores() and loader <= 2


# A subprocess: the scheduling class of every thread of the process is read, and a pytest
# process holds threads from earlier tests.
PRIORITY_SCENARIO = """
import asyncio, json, os, sys, threading
from pathlib import Path
from ferry.server.core.pools import ThreadPools
from ferry.server.core.registry import ModelRegistry
from ferry.server.core.repository import ModelRepository
from ferry.server.runtime import session as session_module
from ferry.server.runtime.session import open_session

# "plain" stays light (one thread, built on its loader) even on a busy host, where its batch of
# one can take over a millisecond and would give it a pool of its own too.
session_module.AUTO_HEAVY_NS = 10**12

def lowered():
    out = set()
    for tid in os.listdir("/proc/self/task"):
        fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(") ", 1)[1].split()
        nice, policy = int(fields[16]), int(fields[38])
        if nice > 0 or policy == os.SCHED_IDLE:
            out.add(int(tid))
    return out

async def scenario():
    registry = ModelRegistry(ModelRepository(Path(sys.argv[1])), open_session, pools=ThreadPools())
    before = set(os.listdir("/proc/self/task"))
    await registry.refresh()
    pooled = [lv for lv in registry.loaded_versions() if lv.name == "pooled" and lv.session.intra_op_threads == 3]
    python = {t.native_id for t in threading.enumerate()}
    loaders = {t.native_id for t in threading.enumerate() if t.name.startswith("ferry-load")}
    # Threads started during the loads that are not Python's: onnxruntime's (the pool's two,
    # and whatever else it starts on a loader).
    native = {int(t) for t in set(os.listdir("/proc/self/task")) - before} - python
    print(json.dumps({
        "pooled": len(pooled),
        "loaders": len(loaders),
        "native_at_normal_priority": len(native - lowered()),
        "python_lowered": sorted((lowered() & python) - loaders),
        "loaders_not_lowered": sorted(loaders - lowered()),
    }))
    await registry.close()

asyncio.run(scenario())
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads priorities in /proc")
def test_loads_run_lowered_but_a_models_own_threads_do_not(tmp_path: Path) -> None:
    """Loader threads run below serving threads, and a session with an intra-op pool of its
    own (which starts its threads while it is built) is not built on them: threads inherit
    their creator's priority for life, and that pool serves every request of the model."""
    repo = ModelRepository(tmp_path / "repo")
    write_model(repo, "plain", mlp_model())
    write_model(repo, "pooled", mlp_model())
    (repo.root / "pooled" / "config.toml").write_text("[onnxruntime]\nintra_op_threads = 3\n")
    seen = json.loads(_scenario(PRIORITY_SCENARIO, repo.root))
    assert seen["pooled"] == 1
    # The pooled model's pool (3 threads: the caller and 2 of its own) runs at normal
    # priority; built on a loader, both were at nice 10.
    assert seen["native_at_normal_priority"] >= 2
    assert seen["python_lowered"] == []  # of Python's threads, only the loaders run lowered
    assert seen["loaders_not_lowered"] == []  # and every loader does
