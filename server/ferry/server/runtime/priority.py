"""Where loads run on the CPU: below serving threads, without lowering what they start.

A load (building an onnxruntime session: graph optimisation, weight prepacking) is CPU-bound
C++ that releases the GIL, so loader threads run at a lower priority (nice) and requests for
the models already served come first.

A thread inherits the nice value (and scheduling class) of the thread that starts it, for its
whole life. A session with an intra-op pool of its own starts that pool's threads while it is
built: built on a loader, a heavy model ran every request's parallel work on threads at the
loader's priority, behind every serving thread of every other model (seen in /proc: the pool's
threads at nice 10). Such sessions are built on a builder thread of normal priority instead
(``at_normal``): their build competes with serving, their requests no longer lose to it.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

# How much lower than serving threads a loader runs (Linux nice increment).
NICENESS = 10

_local = threading.local()
_builder: list[ThreadPoolExecutor] = []
_builder_lock = threading.Lock()


def lower_current_thread() -> None:
    """Make the calling thread (a loader) yield the CPU to serving threads.

    On Linux a thread id names one thread, so this changes the caller only. Nice, not the
    SCHED_IDLE class: an idle-class loader gets no CPU at all while serving saturates the host,
    so a load during a peak would never finish; at nice +10 it still gets about a tenth."""
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + NICENESS)
    except (AttributeError, OSError) as exc:  # not permitted or not Linux
        log.debug("loader thread keeps its priority: %s", exc)
        return
    _local.lowered = True


def is_lowered() -> bool:
    return bool(getattr(_local, "lowered", False))


def start_builders(threads: int) -> None:
    """Start the normal-priority builder threads, one per loader (so that one slow build does
    not hold up another load's), all of them now and from the calling thread, whose priority
    they inherit: call it where the serving process is set up, not from a loader. The first
    call decides; the threads serve every later ThreadPools of the process."""
    with _builder_lock:
        if _builder or is_lowered():
            return
        pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="ferry-build")
        # An executor starts a thread per task while none is idle: tasks that wait for each
        # other make it start all of them here, none later from a loader.
        started = threading.Barrier(threads + 1)
        for _ in range(threads):
            pool.submit(started.wait)
        started.wait()
        _builder.append(pool)


def at_normal(build: Callable[[], T]) -> T:
    """``build()``, on the builder thread when the caller runs lowered (see the module doc);
    the caller waits, so a load keeps its order and its errors."""
    if not is_lowered() or not _builder:
        return build()
    return _builder[0].submit(build).result()
