"""A session's builder is lowered by the CPU it spends, not by the time a busy host takes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# A build that never starts threads of its own and keeps computing until its thread has been
# lowered. Its wall-clock bound is far off, so only the CPU the builder spends can lower it.
SCENARIO = """
import os, threading, time
from ferry.server.core import priority

priority.THREADS_WAIT_S = 600.0
priority.THREADS_CPU_S = 0.05
priority.start_starter()
seen = {}

def build():
    tid = threading.get_native_id()
    start = os.getpriority(os.PRIO_PROCESS, tid)
    end = time.monotonic() + 60
    while os.getpriority(os.PRIO_PROCESS, tid) == start and time.monotonic() < end:
        sum(range(1000))
    return os.getpriority(os.PRIO_PROCESS, tid) - start

def loader():
    priority.lower_current_thread()
    seen["raised_by"] = priority.with_own_threads(build, 2)

thread = threading.Thread(target=loader)
thread.start()
thread.join()
print(seen["raised_by"])
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="Linux threads")
def test_a_builder_that_starts_no_threads_is_lowered_by_the_cpu_it_spent() -> None:
    run = subprocess.run(
        [sys.executable, "-c", SCENARIO], capture_output=True, text=True, timeout=120, check=False
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert int(run.stdout.strip()) > 0
