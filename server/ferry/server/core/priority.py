"""Where loads run on the CPU: below serving threads, without lowering what they start.

A load (building an onnxruntime session: graph optimisation, weight prepacking) is CPU-bound
C++ that releases the GIL, so loader threads run at a lower priority (nice) and requests for
the models already served come first.

A thread inherits the nice value (and scheduling class) of the thread that starts it, for its
whole life. A session with an intra-op pool of its own starts that pool's threads as its build
begins: built on a loader, a heavy model ran every request's parallel work on threads at the
loader's priority, behind every serving thread of every other model (seen in /proc: the pool's
threads at nice 10; a batch of 8 of a 33 MB MLP took 1.5 ms instead of 0.9 beside one busy
core). So such a session is built by ``with_own_threads``: on a fresh thread started at normal
priority, which lowers itself to the loaders' priority as soon as the session's threads exist,
so the build itself (the costly part: prepacking) still yields to serving. Building it wholly at
normal priority made a 50-model refresh's p99 for other models 1.2-1.5x worse.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

# How much lower than serving threads a loader runs (Linux nice increment).
NICENESS = 10
# How much CPU a build may spend before its threads exist, after which its builder is lowered
# anyway (an onnxruntime session starts its pool within milliseconds of its own CPU). Counted in
# the builder's CPU time, not the wall clock's: on a busy host a builder that waits for a core
# has done nothing yet, and lowering it then left the session's pool at the loaders' priority.
THREADS_CPU_S = 0.5
# The wall-clock bound on that wait (a build blocked in I/O uses no CPU), which also bounds how
# long other builds wait for this one's window.
THREADS_WAIT_S = 15.0
TASKS = "/proc/self/task"

_local = threading.local()
_starter: list[ThreadPoolExecutor] = []
_starter_lock = threading.Lock()
_watch = threading.Lock()


def lower_current_thread() -> None:
    """Make the calling thread (a loader) yield the CPU to serving threads.

    On Linux a thread id names one thread, so this changes the caller only. Nice, not the
    SCHED_IDLE class: an idle-class loader gets no CPU at all while serving saturates the host,
    so a load during a peak would never finish; at nice +10 it still gets about a tenth."""
    if _lower(threading.get_native_id()):
        _local.lowered = True


def _lower(tid: int) -> bool:
    try:
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + NICENESS)
    except (AttributeError, OSError) as exc:  # not permitted or not Linux
        log.debug("thread %s keeps its priority: %s", tid, exc)
        return False
    return True


def is_lowered() -> bool:
    return bool(getattr(_local, "lowered", False))


def start_starter() -> None:
    """Start the thread that starts builders, from the calling thread, whose priority it and
    every builder inherit: call it where the serving process is set up, not from a loader.
    The first call decides; it serves every later ThreadPools of the process."""
    with _starter_lock:
        if _starter or is_lowered():
            return
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ferry-build")
        pool.submit(int).result()  # its one thread exists from now on, started here
        _starter.append(pool)


def with_own_threads(build: Callable[[], T], threads: int | None) -> T:
    """``build()``, which starts ``threads`` threads of its own (a session's intra-op pool), so
    that they run at normal priority and the rest of the build at the caller's lower one
    (``None``: a number not known beforehand, a GPU provider's; then all of the build runs at
    normal priority). The caller waits: a load keeps its order and its errors.

    The build runs on a fresh thread that the starter starts (so at normal priority); the
    caller lowers it once ``threads`` new native threads exist (the session's own, which keep
    normal priority), or once it has spent THREADS_CPU_S of CPU (or THREADS_WAIT_S have passed)
    without them. A native thread of something else starting
    meanwhile can make it lower early: the session's threads are then lowered, as they were
    before this existed, never worse."""
    if not is_lowered() or not _starter or not os.path.isdir(TASKS):
        return build()
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = build()
        except BaseException as exc:  # handed to the caller below
            outcome["error"] = exc

    # One build's window at a time (until its threads exist, a few milliseconds): two builds
    # starting together would each count the other's threads as their own.
    with _watch:
        before = set(os.listdir(TASKS))
        builder = _starter[0].submit(_start, run).result()
        if threads is not None:
            pause = threading.Event()
            end = time.monotonic() + THREADS_WAIT_S
            while builder.is_alive() and time.monotonic() < end:
                if len(_new_native(before)) >= threads or _cpu_s(builder) >= THREADS_CPU_S:
                    break
                pause.wait(0.0005)
            if builder.is_alive() and builder.native_id is not None:
                _lower(builder.native_id)
    builder.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _cpu_s(thread: threading.Thread) -> float:
    """CPU seconds ``thread`` has run; 0 where that cannot be read (the thread ended)."""
    try:
        return time.clock_gettime(time.pthread_getcpuclockid(thread.ident or 0))
    except (AttributeError, OSError):
        return 0.0


def _new_native(before: set[str]) -> set[str]:
    """Tasks started since ``before`` that are not Python threads: an onnxruntime pool's
    (another loader or pool thread starting meanwhile is a Python thread, and not counted)."""
    python = {str(t.native_id) for t in threading.enumerate()}
    return set(os.listdir(TASKS)) - before - python


def _start(run: Callable[[], None]) -> threading.Thread:
    """On the starter thread: a thread started here inherits its normal priority."""
    thread = threading.Thread(target=run, name="ferry-build-session", daemon=True)
    thread.start()
    return thread
